"""Model cards for armada checkpoints: one template per architecture (`<model_type>.md` beside this file, plus
`peft_adapter.md`), filled with `huggingface_hub.ModelCard` / `ModelCardData`.

Everything measured comes from JSON files that armada's evaluation and benchmark code writes, never from text typed
into a card: each file is read by the first reader in `RESULT_READERS` that recognises it, which turns it into
`model-index` `EvalResult`s (shown in the card's metadata and as a table), lines about training data and budget,
and the plots (`<same name>.png`) that sit beside it. A new architecture needs one template file and its row in
`armada.ARCHITECTURES`; a new kind of results file needs one reader.

    card = build_card("outputs/demo", results=["outputs/demo/demo_summary.json"], repo_id="me/agency-demo")
    card.save("outputs/demo/README.md")      # or: armada card outputs/demo --results outputs/demo/demo_summary.json
"""

import json
import os
from dataclasses import dataclass, field

import jinja2
import jinja2.meta
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import AutoModel

TEMPLATE_DIR = os.path.dirname(os.path.abspath(__file__))
ADAPTER_TEMPLATE = os.path.join(TEMPLATE_DIR, "peft_adapter.md")
PIPELINE_TAGS = {"AutoModelForCausalLM": "text-generation", "AutoModelForMaskedLM": "fill-mask"}
PLOTS_DIR = "plots"  # where pushed cards keep their result plots, relative to the card


@dataclass
class Results:
    """What the results files say about one checkpoint."""

    eval_results: list = field(default_factory=list)  # huggingface_hub.EvalResult
    training: list = field(default_factory=list)  # markdown lines
    plots: list = field(default_factory=list)  # paths of PNG files
    sources: list = field(default_factory=list)  # the results file of each eval result


# ------------------------------------------------------------------------------------------------- results readers
def _short(path):
    """`dir/file` of a path, so that cards do not show the machine's folders."""
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path)) if "/" in path else path


def _read_demo_summary(data, path):
    """`examples/demo.py`'s demo_summary.json: the saved (best pruned) AgencyGPT2 model."""
    best, args, info = data["best"], data["args"], data.get("data", {})
    row = data["results"][best]
    train_text = _short(str(info.get("train", "?")))
    wiki_path, _, wiki_rest = str(info.get("wikitext", "wikitext")).partition(": ")
    datasets = {"held-out": f"{train_text}, held-out last 10% ({info.get('held-out', '?')} tokens)",
                "wikitext": f"{_short(wiki_path)}: {wiki_rest}" if wiki_rest else wiki_path}
    results = Results()

    def add(task_name, dataset_type, dataset_name, metric_type, value, metric_name, split=None):
        results.eval_results.append(EvalResult(
            task_type="text-generation", task_name=task_name, dataset_type=dataset_type, dataset_name=dataset_name,
            dataset_split=split, metric_type=metric_type, metric_value=value, metric_name=metric_name))

    for eval_set, ppl in row["perplexity"].items():
        add("Language modelling", f"armada/{eval_set}", datasets.get(eval_set, eval_set), "perplexity",
            round(ppl, 3), f"perplexity ({eval_set})", split="test")
    heads = row["heads_per_layer"]
    add("Head pruning", "armada/pruning", "heads", "heads_kept", sum(heads), f"heads kept (per layer {heads})")
    add("Head pruning", "armada/pruning", "heads", "pruning_level", args["level"], "fraction of heads pruned")
    results.training.append(f"- Produced by `examples/demo.py` (`{best}`): a GPT-2 trained from scratch, converted "
                            f"to AgencyGPT2 and pruned.")
    if "train" in info:
        results.training.append(f"- Training text: {train_text}, first 90% ({info.get('train_tokens', '?'):,} "
                                "tokens)")
    budget = data.get("training", {})
    if budget:
        results.training.append(f"- Budget: {budget.get('steps')} steps, {budget.get('tokens', 0):,} tokens, "
                                f"{budget.get('seconds', 0):.0f} s on CPU (final loss EMA "
                                f"{budget.get('final_loss_ema', float('nan')):.3f})")
    return results


def _read_babilong(data, path):
    """`benchmarks/armt_babilong.py`'s JSON: accuracy per input length for the UnifiedARMT runs (`model: armt`)."""
    results = Results()
    for run in data["results"]:
        if run["model"] != "armt":
            continue
        for point in run["eval"]:
            if point.get("accuracy") is None:
                continue
            results.eval_results.append(EvalResult(
                task_type="question-answering", task_name=f"BABILong {run['task']}", dataset_type="babilong",
                dataset_name=f"BABILong {run['task']} ({point['length']} tokens)", dataset_split="test",
                metric_type="accuracy", metric_value=point["accuracy"],
                metric_name=f"accuracy at {point['length']} tokens"))
        results.training.append(f"- BABILong {run['task']}: {run['steps']} steps, {run['train_seconds']:.0f} s "
                                f"on CPU, curriculum over lengths {run['stage_lengths']}; data: {data.get('data')}")
    return results


def _read_eval_results(data, path):
    """The generic form evaluation code writes: {"eval_results": [EvalResult fields, ...], "training": [...]}."""
    results = Results(training=[f"- {line}" for line in data.get("training", [])])
    for entry in data["eval_results"]:
        try:
            results.eval_results.append(EvalResult(**entry))
        except TypeError as error:
            raise ValueError(f"{path}: eval_results entry {entry} is not a huggingface_hub.EvalResult: {error}")
    return results


# (recognises the JSON, reads it) in order of preference
RESULT_READERS = (
    (lambda d: "eval_results" in d, _read_eval_results),
    (lambda d: {"best", "results", "args"} <= d.keys(), _read_demo_summary),
    (lambda d: d.get("benchmark") == "armt_babilong", _read_babilong),
)


def read_results(paths):
    """Merge what every JSON file in `paths` says (see `RESULT_READERS`); a file no reader knows is an error."""
    merged = Results()
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"results file {path!r} does not exist.")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"results file {path!r} is not valid JSON: {error}")
        reader = next((read for matches, read in RESULT_READERS if isinstance(data, dict) and matches(data)), None)
        if reader is None:
            raise ValueError(f"results file {path!r} is not one armada knows; allowed: a JSON with `eval_results`, "
                             "examples/demo.py's demo_summary.json, benchmarks/armt_babilong.py's JSON.")
        found = reader(data, path)
        merged.eval_results += found.eval_results
        merged.sources += [os.path.basename(path)] * len(found.eval_results)
        merged.training += found.training
        plot = os.path.splitext(path)[0] + ".png"
        merged.plots += [plot] if os.path.isfile(plot) else []
    return merged


# ------------------------------------------------------------------------------------------------- card fields
def architecture(model_type):
    """(config class, {Auto class name: model class}) of an armada architecture, from `armada.ARCHITECTURES`."""
    from armada import ARCHITECTURES

    for config_cls, models in ARCHITECTURES.items():
        if config_cls.model_type == model_type:
            return config_cls, {auto.__name__: model for auto, model in models.items()}
    allowed = sorted(c.model_type for c in ARCHITECTURES)
    raise ValueError(f"model_type {model_type!r} is not an armada architecture; allowed: {allowed}.")


def head_auto_class(models):
    return next(name for name in models if name != AutoModel.__name__)


def _parameters(folder, model_type):
    """Parameter count of the checkpoint in `folder` (loaded on CPU; buffers such as agency state not counted)."""
    _, models = architecture(model_type)
    return models[head_auto_class(models)].from_pretrained(folder).num_parameters()


def _architecture_lines(config, folder):
    c = config
    facts = [f"{_parameters(folder, c['model_type']):,} parameters"]
    if c["model_type"] == "agency_gpt2":
        pruned = {int(k): v for k, v in (c.get("pruned_heads") or {}).items()}
        kept = [c["n_head"] - len(pruned.get(layer, [])) for layer in range(c["n_layer"])]
        facts += [f"{c['n_layer']} layers, width {c['n_embd']}, {c['n_head']} heads per layer before pruning; "
                  f"heads kept per layer: {kept} ({sum(kept)} of {c['n_layer'] * c['n_head']})",
                  f"optimization level {c.get('optimization_level', 0)}, vocabulary {c['vocab_size']}, "
                  f"{c['n_positions']} positions"]
    elif c["model_type"] == "unified_armt":
        facts += [f"{c['num_hidden_layers']} layers, width {c['hidden_size']}, {c['num_attention_heads']} heads",
                  f"segments of {c['segment_size']} tokens + {c['num_memory_tokens']} memory tokens, associative "
                  f"memory d_mem {c['d_mem']} ({c['num_memory_heads']} head(s)), {c['position_embedding_type']} "
                  f"positions, vocabulary {c['vocab_size']}"]
    return "\n".join(f"- {fact}" for fact in facts)


def _how_to_load(repo_id, auto_class):
    return f"""With armada installed, `import armada` registers the architecture with the Auto classes:

```python
import armada  # noqa: F401
from transformers import AutoTokenizer, {auto_class}

model = {auto_class}.from_pretrained("{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```

Without armada, the checkpoint carries its own code (`configuration_*.py`, `modeling_*.py`; needs only `torch` and
`transformers`):

```python
from transformers import AutoTokenizer, {auto_class}

model = {auto_class}.from_pretrained("{repo_id}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```"""


def _adapter_how_to_load(repo_id, base_model, auto_class):
    return f"""```python
import armada  # noqa: F401  (or pass trust_remote_code=True to from_pretrained below)
from peft import PeftModel
from transformers import {auto_class}

base = {auto_class}.from_pretrained("{base_model}")
model = PeftModel.from_pretrained(base, "{repo_id}")
```"""


def _results_section(results, plots):
    if not results.eval_results:
        return "No measured results were given for this checkpoint (`armada card DIR --results JSON...`)."
    lines = ["| Task | Dataset | Metric | Value | Source |", "|---|---|---|---|---|"]
    for r, source in zip(results.eval_results, results.sources):
        lines.append(f"| {r.task_name or r.task_type} | {r.dataset_name} | {r.metric_name or r.metric_type} | "
                     f"{r.metric_value} | {source} |")
    lines += [f"\n![{os.path.basename(p)}]({p})" for p in plots]
    return "\n".join(lines)


def _render(template, card_data, fields):
    """`ModelCard.from_template` after checking that `fields` gives every variable the template uses."""
    with open(template, encoding="utf-8") as f:
        text = f.read()
    needed = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(text)) - {"card_data"}
    missing = sorted(needed - fields.keys())
    if missing:
        raise ValueError(f"card template {template} uses {missing}, which the card builder does not fill; "
                         f"fields it fills: {sorted(fields)}.")
    return ModelCard.from_template(card_data, template_str=text, **fields)


def build_card(folder, results=(), repo_id=None, template=None):
    """The card of the checkpoint (or PEFT adapter) in `folder`, with the measured results in the JSON `results`.

    `repo_id` is where the card will live (used in the loading snippets); default: the folder's name. `template`
    replaces the architecture's template (its variables must be ones this function fills).
    """
    repo_id = repo_id or os.path.basename(os.path.abspath(folder))
    measured = read_results(results)
    plots = [f"{PLOTS_DIR}/{os.path.basename(p)}" for p in measured.plots]
    training = "\n".join(measured.training) or "Not recorded: no results file describing this checkpoint's " \
                                                "training was given."
    adapter_config = os.path.join(folder, "adapter_config.json")
    if os.path.isfile(adapter_config):
        with open(adapter_config, encoding="utf-8") as f:
            adapter = json.load(f)
        base_model = adapter.get("base_model_name_or_path")
        if not base_model or os.path.isabs(base_model) or os.path.exists(base_model):
            raise ValueError(f"{adapter_config}: base_model_name_or_path is {base_model!r}; a card needs the base "
                             "model's Hub id: set it (e.g. `peft_model.peft_config['default'].base_model_name_or_"
                             "path = 'user/base'`) before saving the adapter.")
        base_config = _hub_config(base_model)
        _, models = architecture(base_config["model_type"])
        auto_class = head_auto_class(models)
        card_data = ModelCardData(library_name="peft", base_model=base_model, pipeline_tag=PIPELINE_TAGS[auto_class],
                                  tags=["armada", base_config["model_type"], adapter.get("peft_type", "").lower()],
                                  model_name=repo_id, eval_results=measured.eval_results or None)
        target = adapter.get("target_modules")
        fields = dict(model_name=repo_id, peft_type=adapter.get("peft_type", "PEFT"), base_model=base_model,
                      base_model_url=f"/{base_model}",
                      base_architecture=models[auto_class].__name__,
                      architecture=f"- target modules: {target}, rank {adapter.get('r')}, alpha "
                                   f"{adapter.get('lora_alpha')}" if target else "",
                      how_to_load=_adapter_how_to_load(repo_id, base_model, auto_class),
                      training=training, results=_results_section(measured, plots))
        return _render(template or ADAPTER_TEMPLATE, card_data, fields)

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder!r} has no config.json (nor adapter_config.json): not a saved checkpoint.")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config_cls, models = architecture(config.get("model_type"))
    auto_class = head_auto_class(models)
    card_data = ModelCardData(language="en", license="apache-2.0", library_name="transformers",
                              pipeline_tag=PIPELINE_TAGS[auto_class],
                              tags=["armada", config_cls.model_type, "custom_code"],
                              model_name=repo_id, eval_results=measured.eval_results or None)
    fields = dict(model_name=repo_id, architecture=_architecture_lines(config, folder),
                  how_to_load=_how_to_load(repo_id, auto_class), training=training,
                  results=_results_section(measured, plots))
    return _render(template or os.path.join(TEMPLATE_DIR, f"{config_cls.model_type}.md"), card_data, fields)


def _hub_config(repo_id):
    """config.json of a model on the Hub (or in the HF cache), as a dict."""
    from huggingface_hub import hf_hub_download

    with open(hf_hub_download(repo_id, "config.json"), encoding="utf-8") as f:
        return json.load(f)


__all__ = ["build_card", "read_results", "architecture", "head_auto_class", "Results", "RESULT_READERS",
           "TEMPLATE_DIR"]
