"""Push checkpoints to the Hugging Face Hub and pull them back, through `huggingface_hub` (HfApi, snapshot_download).

    push("outputs/demo", "me/agency-demo", results=["outputs/demo/demo_summary.json"])    # armada push DIR REPO
    pull("me/agency-demo", "models/agency-demo", revision="main")                         # armada pull REPO DIR

`push` uploads a checkpoint folder (model or PEFT adapter) as ONE commit (`HfApi.create_commit`), so an interrupted
push leaves the repo at its previous commit: the config, the safetensors weights (pickled `.bin` weights are
refused), the tokenizer files, the model's own code (`configuration_*.py`, `modeling_*.py` and `auto_map`, written
by `save_pretrained`, so that `trust_remote_code=True` loads it without armada), a model card (the folder's
README.md, or one built by `armada.hub_cards` from the results JSON given) and the result plots beside those JSON
files. `pull` downloads a revision into the HF cache (`HF_HUB_CACHE`; with `HF_HUB_OFFLINE=1` it is read from
there) and copies it into a folder, after checking that it is a checkpoint this armada can load.

Both honour `HF_ENDPOINT`, `HF_TOKEN` and the HF cache like every `huggingface_hub` call; bad input (a malformed
repo id, an unknown revision, a private push without a token, a folder without weights or config, a config with
fields this armada does not know) is a one-line `ValueError`, raised before anything is uploaded or written.
"""

import json
import os
import shutil
import tempfile

from . import __version__
from .io_utils import atomic_directory, check_output_directory

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files a checkpoint folder may hold that are pushed (with the code, weights, tokenizer and card).
UPLOADED_SUFFIXES = (".json", ".safetensors", ".py", ".txt", ".model", ".md", ".jinja", ".png")


def validate_repo_id(repo_id):
    """`namespace/name` or `name` as the Hub allows them, else ValueError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    try:
        hub_validate(repo_id)
    except HFValidationError as error:
        raise ValueError(f"malformed repo id {repo_id!r}: {str(error).splitlines()[0]} Allowed: 'name' or "
                         "'namespace/name' with letters, digits, '-', '_' and '.' (at most 96 per part).")


def _checkpoint_kind(folder):
    """'model' or 'adapter', after checking the folder has a config and safetensors weights."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a folder.")
    names = set(os.listdir(folder))
    if "adapter_config.json" in names:
        kind, weights = "adapter", {"adapter_model.safetensors"}
    elif "config.json" in names:
        kind, weights = "model", {"model.safetensors", "model.safetensors.index.json"}
    else:
        raise ValueError(f"{folder!r} has no config.json (nor adapter_config.json): not a saved checkpoint.")
    if not weights & names:
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        hint = (f"; it has pickled weights {pickles}, which armada does not push: re-save with "
                "save_pretrained(safe_serialization=True)") if pickles else ""
        raise ValueError(f"{folder!r} has no safetensors weights ({' or '.join(sorted(weights))}){hint}.")
    return kind


def check_config(config):
    """Refuse a config (dict from config.json) with fields this armada's config class does not know.

    A checkpoint saved by a newer armada can carry such fields; this version would silently ignore them and build a
    different model. Its own code (`trust_remote_code=True`) reads them.
    """
    import inspect

    from transformers import PretrainedConfig

    from .hub_cards import architecture

    config_cls, _ = architecture(config.get("model_type"))
    known = set(inspect.signature(config_cls.__init__).parameters) | set(PretrainedConfig().to_dict())
    known |= {"auto_map", "architectures", "armada_version", "_name_or_path", "torch_dtype", "dtype",
              "transformers_version", "model_type"}
    unknown = sorted(set(config) - known)
    if unknown:
        saved_by = config.get("armada_version", "an unknown armada version")
        raise ValueError(
            f"config.json has fields {unknown} that {config_cls.__name__} of armada {__version__} does not know "
            f"(saved by {saved_by}): upgrade armada, or load the checkpoint with its own code, "
            "`from_pretrained(path, trust_remote_code=True)`.")


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _stage(folder, kind, staging, results, repo_id):
    """Copy what is pushed from `folder` into `staging`: model code and auto_map, card, plots."""
    for name in sorted(os.listdir(folder)):
        if os.path.isfile(os.path.join(folder, name)) and name.endswith(UPLOADED_SUFFIXES):
            shutil.copy2(os.path.join(folder, name), staging)
    if os.path.isdir(os.path.join(folder, "plots")):
        shutil.copytree(os.path.join(folder, "plots"), os.path.join(staging, "plots"))
    if kind == "model":
        config = _read_json(os.path.join(staging, "config.json"))
        check_config(config)
        if not config.get("auto_map"):  # saved before armada wrote remote code: save again, which adds it
            from .hub_cards import architecture, head_auto_class

            _, models = architecture(config["model_type"])
            models[head_auto_class(models)].from_pretrained(folder).save_pretrained(staging)
            config = _read_json(os.path.join(staging, "config.json"))
        config["armada_version"] = __version__
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    if results or not os.path.isfile(os.path.join(folder, "README.md")):
        from .hub_cards import build_card, read_results

        build_card(folder, results=results, repo_id=repo_id).save(os.path.join(staging, "README.md"))
        plots = read_results(results).plots
        if plots:
            os.makedirs(os.path.join(staging, "plots"), exist_ok=True)
        for plot in plots:
            shutil.copy2(plot, os.path.join(staging, "plots"))


def push(folder, repo_id, *, private=False, revision=None, token=None, results=(), commit_message=None):
    """Upload the checkpoint (or PEFT adapter) in `folder` to `repo_id` as one commit; return its CommitInfo.

    The repo is created if needed (`private` only then); `revision` names a branch, created from main if it does not
    exist. `results`: JSON files from armada's evaluation/benchmark code, for the model card (see
    `armada.hub_cards`); without them the folder's README.md is pushed, or a card without results if it has none.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    validate_repo_id(repo_id)
    kind = _checkpoint_kind(folder)
    token = token or get_token()
    if private and not token:
        raise ValueError(f"a private push of {repo_id!r} needs a token (set HF_TOKEN or run `hf auth login`); "
                         "nothing was uploaded.")
    if not token:
        raise ValueError(f"pushing to {repo_id!r} needs a token with write access (set HF_TOKEN or run "
                         "`hf auth login`); nothing was uploaded.")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="armada-push-") as staging:
        _stage(folder, kind, staging, list(results), repo_id)
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            # The staged files, and the deletion of every other file of the repo but .gitattributes, in one commit:
            # upload_folder(delete_patterns="*") builds the same, but huggingface_hub 2.x's (with hf_xet) may split a
            # folder into several commits.
            files = sorted(os.path.relpath(os.path.join(root, name), staging).replace(os.sep, "/")
                           for root, _, names in os.walk(staging) for name in names)
            stale = set(api.list_repo_files(repo_id, revision=revision)) - set(files) - {".gitattributes"}
            operations = [CommitOperationDelete(path_in_repo=path) for path in sorted(stale)] + [
                CommitOperationAdd(path_in_repo=path, path_or_fileobj=os.path.join(staging, path)) for path in files]
            return api.create_commit(repo_id, operations, revision=revision,
                                     commit_message=commit_message or f"Upload {kind} with armada {__version__}")
        except HfHubHTTPError as error:
            if error.response is not None and error.response.status_code == 401:
                raise ValueError(f"the Hub at {api.endpoint} refused the token for {repo_id!r} (401): use a token "
                                 "with write access to it.") from error
            raise


def pull(repo_id, out_dir, *, revision=None, overwrite=False, token=None, cache_dir=None):
    """Download `repo_id` at `revision` (branch, tag or commit; default main) into `out_dir`; return `out_dir`.

    Files go through the HF cache, so a second pull (or `HF_HUB_OFFLINE=1`) reads them from there. An existing,
    non-empty `out_dir` is refused unless `overwrite`; nothing is written unless the download is a complete
    checkpoint this armada can load.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    validate_repo_id(repo_id)
    check_output_directory(out_dir, overwrite)  # before any download: a refused output fails at once
    try:
        snapshot = snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir)
    except RevisionNotFoundError:
        raise ValueError(f"revision {revision!r} does not exist in {repo_id!r}; allowed: a branch, tag or commit "
                         f"of the repo ({_branches(repo_id, token)}).") from None
    except RepositoryNotFoundError:
        raise ValueError(f"repo {repo_id!r} was not found (a private repo needs HF_TOKEN with access to it).") from None
    except LocalEntryNotFoundError as error:
        raise ValueError(f"{repo_id!r} at {revision or 'main'} is not in the HF cache and the Hub cannot be "
                         f"reached (HF_HUB_OFFLINE=1?): {str(error).splitlines()[0]}") from None
    kind = _checkpoint_kind(snapshot)
    if kind == "model":
        check_config(_read_json(os.path.join(snapshot, "config.json")))
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        shutil.copytree(snapshot, tmp, dirs_exist_ok=True)  # follows the cache's symlinks: real files
    return out_dir


def _branches(repo_id, token):
    from huggingface_hub import HfApi

    try:
        return "branches: " + ", ".join(b.name for b in HfApi(token=token).list_repo_refs(repo_id).branches)
    except Exception:  # only decorates an error message
        return "branches unknown"


__all__ = ["push", "pull", "check_config", "validate_repo_id"]
