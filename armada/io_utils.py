"""Writing outputs so that nothing half-written is ever left behind, and nothing the user did not ask to delete is
deleted; checking a checkpoint folder before loading it, so that a broken one gets an error naming the file.

`atomic_directory(path)` is how armada writes a folder (a saved model, a demo's result):

- everything is written into a temporary folder beside `path` (`.NAME.armada-tmp-PID-XXXX`), then renamed into
  place, so a reader sees the old folder or the new one, never a mix;
- an existing non-empty `path` is refused unless `overwrite=True` (the CLI's `--overwrite`). Even then it is only
  replaced when it looks like armada's own output: it carries the marker file `.armada-output` (written into every
  folder armada creates) or it holds nothing but files that `save_pretrained` / `Trainer` write (a checkpoint:
  `config.json`, `*.safetensors`, tokenizer files, ...). The current directory, a folder that contains it, a folder
  that contains one of the command's inputs, the home directory and `/` are never replaced;
- the old folder is renamed aside (`.NAME.armada-old-PID-XXXX`), the new one renamed into place, and only then is the
  old one removed: writing over the input model folder in place keeps the old model until the new one is complete;
- leftovers of a run that was killed (temp and aside folders whose process is gone) are cleaned up by the next run
  on the same target; an aside folder whose target is missing (killed between the two renames) is put back first.
"""

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
import uuid

MARKER = ".armada-output"

# What `save_pretrained` (models, tokenizers, PEFT adapters, generation configs) and `Trainer` checkpoints write.
CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
    "pytorch_model*.bin.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json", "adapter_config.json", "README.md", "training_args.bin",
    "trainer_state.json", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state*.pth",
    "configuration_*.py", "modeling_*.py", ".gitattributes", MARKER,
)


class UnsafeOutputError(ValueError):
    """The output folder exists and armada will not replace it (see `atomic_directory`)."""


def _resolve(path) -> str:
    """Absolute path with its parent's symlinks resolved (the last component is kept: a link is replaced, not
    followed)."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _within(path: str, folder: str) -> bool:
    """True when `path` is `folder` or lies inside it (both absolute and real)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def looks_like_armada_output(path: str) -> bool:
    """True for a folder that carries armada's marker, or that holds only what a checkpoint save writes."""
    entries = os.listdir(path)
    if MARKER in entries:
        return True
    return bool(entries) and all(
        os.path.isfile(os.path.join(path, e)) and any(fnmatch.fnmatch(e, p) for p in CHECKPOINT_FILES)
        for e in entries)


def _check_replaceable(path: str, inputs=()):
    """Raise `UnsafeOutputError` unless the existing folder `path` may be replaced (with overwrite=True)."""
    path = os.path.realpath(path)
    home = os.path.realpath(os.path.expanduser("~"))
    if path in (os.path.realpath(os.sep), home):
        raise UnsafeOutputError(f"refusing to replace {path}: it is {'the home directory' if path == home else '/'}.")
    if _within(os.path.realpath(os.getcwd()), path):
        raise UnsafeOutputError(f"refusing to replace {path}: it is or contains the current directory; choose a "
                                "new folder for the output.")
    for source in inputs:
        source = os.path.realpath(os.path.abspath(os.fspath(source)))
        if source != path and _within(source, path):
            raise UnsafeOutputError(f"refusing to replace {path}: it contains the input {source}; choose a new "
                                    "folder for the output (or the input folder itself, to write over it in place).")
    if not looks_like_armada_output(path):
        raise UnsafeOutputError(f"refusing to replace {path}: it does not look like armada's output (no {MARKER} "
                                "marker, and it holds files a checkpoint does not); move it away yourself or choose "
                                "another folder.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(parent: str, name: str, kind: str):
    """(path, pid) of `.NAME.armada-KIND-PID-XXXX` folders in `parent` whose process is gone."""
    prefix = f".{name}.armada-{kind}-"
    for entry in sorted(os.listdir(parent)):
        if entry.startswith(prefix):
            pid = entry[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                yield os.path.join(parent, entry)


def clean_leftovers(path: str):
    """Remove what a killed `atomic_directory(path)` left beside `path`; put back an old folder that was renamed
    aside if `path` itself is missing (the run died between moving the old folder aside and the new one in)."""
    parent, name = os.path.split(_resolve(path))
    if not os.path.isdir(parent):
        return
    for old in _leftovers(parent, name, "old"):
        if not os.path.lexists(path):
            os.rename(old, path)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in _leftovers(parent, name, "tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_directory(path: str, overwrite: bool = False, inputs=()):
    """Raise `UnsafeOutputError` if `atomic_directory(path, overwrite, inputs)` would refuse `path` (call it before
    a long computation, so that a bad output path fails at once); first cleans up what a killed run left there."""
    path = _resolve(path)
    clean_leftovers(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UnsafeOutputError(f"{path} exists and is not a folder; choose another output path.")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise UnsafeOutputError(f"{path} exists and is not empty; pass --overwrite (overwrite=True) to replace "
                                    "it, or choose another folder.")
        _check_replaceable(path, inputs)


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False, inputs=()):
    """Yield a temporary folder beside `path`; on success it replaces `path`, on error it is removed.

    `overwrite`: replace an existing non-empty `path` (only one that looks like armada's output, never the current
    directory or a folder containing one of `inputs`, the paths the command reads); without it such a `path` is
    refused with `UnsafeOutputError` before anything is written. See the module docstring for the whole protocol.

    >>> with atomic_directory("out/model", overwrite=True, inputs=[model_dir]) as tmp:
    ...     model.save_pretrained(tmp)
    """
    path = _resolve(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    check_output_directory(path, overwrite, inputs)
    tmp = tempfile.mkdtemp(prefix=f".{name}.armada-tmp-{os.getpid()}-", dir=parent)
    try:
        yield tmp
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump({"written_by": "armada"}, f)
        if os.path.isdir(path):
            old = os.path.join(parent, f".{name}.armada-old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            os.unlink(old) if os.path.islink(old) else shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str, text: str):
    """Write `text` to `path` through a temporary file in the same folder and an atomic rename."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_savefig(fig, path: str, **kwargs):
    """`fig.savefig` through a temporary file beside `path` and an atomic rename (format taken from `path`)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"
    try:
        fig.savefig(tmp, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_safetensors_file(path: str):
    """Raise `OSError` naming `path` when it is not a complete safetensors file (empty, truncated, or its header is
    not the JSON table safetensors writes): the message a user needs instead of safetensors' "incomplete metadata"."""
    size = os.path.getsize(path)
    problem = None
    with open(path, "rb") as f:
        if size < 8:
            problem = f"it has {size} bytes, fewer than a safetensors header"
        else:
            header_size = int.from_bytes(f.read(8), "little")
            if 8 + header_size > size:
                problem = f"its header claims {header_size} bytes but the file has {size}"
            else:
                try:
                    header = json.loads(f.read(header_size))
                    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                    problem = "its header is not valid safetensors JSON"
                else:
                    if 8 + header_size + end != size:
                        problem = f"its tensors need {8 + header_size + end} bytes but the file has {size}"
    if problem:
        raise OSError(f"{path} looks truncated or corrupt ({problem}); an interrupted save or download? Save the model "
                      "again, or download it again (from_pretrained(..., force_download=True)).")


def check_checkpoint_folder(path: str):
    """Raise `OSError` with a clear message when the local folder `path` is not a loadable checkpoint: no
    `config.json`, or a `*.safetensors` file that is empty or truncated."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json, so it is not a saved model folder (a model saved with "
                                "save_pretrained(DIR) has one).")
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            check_safetensors_file(os.path.join(path, name))


def weights_digest(model) -> str:
    """sha256 over a model's state dict (names and bytes, in name order): equal digests mean equal weights, e.g.
    on every rank of a distributed run, or before and after a resumed training. Sharded tensors (FSDP's DTensors)
    are gathered first, so every rank must call it."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()

