"""Model cards for armada checkpoints: one template per architecture (`<model_type>.md` beside this file, plus
`peft_adapter.md`), filled with `huggingface_hub.ModelCard` / `ModelCardData`.

Everything measured comes from JSON files that armada's evaluation and benchmark code writes, never from text typed
into a card: each file is read by the first reader in `RESULT_READERS` that recognises it, which turns it into
`model-index` `EvalResult`s (shown in the card's metadata and as a table), lines about training data and budget,
and the plots (`<same name>.png`) that sit beside it. Readers know examples/demo.py's summary, the JSON of
benchmarks/armt_babilong.py, armt_tasks.py, pruning_comparison.py, onnx_speed.py and diffusion.py, and a generic
`{"eval_results": [...]}`; a file about another architecture than the checkpoint's is refused. A new architecture
needs one template file and its row in `armada.ARCHITECTURES`; a new kind of results file needs one reader.

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


def _result(task_type, task_name, dataset_type, dataset_name, metric_type, value, metric_name, split="test",
            config=None):
    """One EvalResult. The model-index groups results by (task_type, dataset_type, `config`, `split`) and shows one
    dataset name per group: results on different data must differ in one of those."""
    return EvalResult(task_type=task_type, task_name=task_name, dataset_type=dataset_type, dataset_name=dataset_name,
                      dataset_config=config, dataset_split=split, metric_type=metric_type, metric_value=value,
                      metric_name=metric_name)


def _quick_line(script):
    return (f"- Quick mode (`{script} --quick`): a tiny model on a smoke-test budget; these figures show that the "
            "pipeline runs, they do not measure the architecture.")


def _read_demo_summary(data, path, model_type):
    """`examples/demo.py`'s demo_summary.json: the saved (best pruned) AgencyGPT2 model."""
    best, args, info = data["best"], data["args"], data.get("data", {})
    row = data["results"][best]
    train_text = _short(str(info.get("train", "?")))
    wiki_path, _, wiki_rest = str(info.get("wikitext", "wikitext")).partition(": ")
    datasets = {"held-out": f"{train_text}, held-out last 10% ({info.get('held-out', '?')} tokens)",
                "wikitext": f"{_short(wiki_path)}: {wiki_rest}" if wiki_rest else wiki_path}
    results = Results()
    for eval_set, ppl in row["perplexity"].items():
        results.eval_results.append(_result(
            "text-generation", "Language modelling", f"armada/{eval_set}", datasets.get(eval_set, eval_set),
            "perplexity", round(ppl, 3), f"perplexity ({eval_set})"))
    heads = row["heads_per_layer"]
    results.eval_results += [
        _result("text-generation", "Head pruning", "armada/pruning", "heads", "heads_kept", sum(heads),
                f"heads kept (per layer {heads})", split=None),
        _result("text-generation", "Head pruning", "armada/pruning", "heads", "pruning_level", args["level"],
                "fraction of heads pruned", split=None)]
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


def _read_babilong(data, path, model_type):
    """`benchmarks/armt_babilong.py`'s JSON: accuracy per input length for the UnifiedARMT runs (`model: armt`)."""
    results = Results()
    for run in data["results"]:
        if run["model"] != "armt":
            continue
        for point in run["eval"]:
            if point.get("accuracy") is None:
                continue
            results.eval_results.append(_result(
                "question-answering", f"BABILong {run['task']}", "babilong", f"BABILong {run['task']}", "accuracy",
                point["accuracy"], f"accuracy at {point['length']} tokens", config=run["task"]))
        results.training.append(f"- BABILong {run['task']}: {run['steps']} steps, {run['train_seconds']:.0f} s "
                                f"on CPU, curriculum over lengths {run['stage_lengths']}; data: {data.get('data')}")
    return results


def _read_armt_tasks(data, path, model_type):
    """`benchmarks/armt_tasks.py`'s armt_tasks.json: exact-match accuracy of every UnifiedARMT run on its synthetic
    task, with its memory and with the memory reset at every segment boundary (the full-attention controls, which
    have no memory, are left out)."""
    results = Results(training=["- `benchmarks/armt_tasks.py`: every run trains a UnifiedARMT from scratch with "
                                "`CurriculumTrainer` on fresh samples of a synthetic task (`armada.tasks`) whose "
                                "answers need tokens from earlier segments, then scores exact match on held-out "
                                "samples (another seed)."])
    for run in data["results"]:
        if run["memory_init"] == "full_attention":  # armt_tasks.py's CONTROL runs
            continue
        samples = run.get("args", {}).get("eval_samples")
        dataset = f"armada.tasks {run['task']}" + (f", {samples:,} held-out samples" if samples else "")
        results.eval_results.append(_result("question-answering", f"Synthetic task: {run['task']}", "armada/tasks",
                                            dataset, "accuracy", run["accuracy"], f"accuracy ({run['name']})",
                                            config=run["task"]))
        if run.get("accuracy_memory_reset") is not None:
            results.eval_results.append(_result(
                "question-answering", f"Synthetic task: {run['task']}", "armada/tasks", dataset, "accuracy",
                run["accuracy_memory_reset"], f"accuracy, memory reset at every segment ({run['name']})",
                config=run["task"]))
        results.training.append(
            f"- {run['name']}: {run['model']} (layers x width, {run['parameters']:,} parameters), "
            f"{run['num_memory_tokens']} memory tokens ({run['memory_init']} init), segments of "
            f"{run['segment_size']} tokens, {run['steps']} steps, {run['train_seconds']:.0f} s on CPU")
    if data.get("quick"):
        results.training.append(_quick_line("benchmarks/armt_tasks.py"))
    return results


# pruning_comparison.py's variants that are AgencyGPT2 models (the others are transformers' GPT-2, the reference)
PRUNED_AGENCY_VARIANTS = {"agency": "no recovery", "agency_distilled": "distillation recovery",
                          "curriculum": "pruning curriculum with distillation"}


def _read_pruning_comparison(data, path, model_type):
    """`benchmarks/pruning_comparison.py`'s pruning_comparison.json: AgencyGPT2's perplexity for every pruning
    strategy and level (pruned, pruned + distillation recovery, pruning curriculum)."""
    info, model, budget = data["data"], data["model"], data["training"]
    dataset = f"{_short(info['eval'])}, {info['eval_note']}"
    results = Results()
    for row in data["rows"]:
        variant = PRUNED_AGENCY_VARIANTS.get(row["variant"])
        if variant is None:
            continue
        setting = (f"{row['strategy']}, {row['level']:.0%} of heads pruned, {variant}, heads per layer "
                   f"{row['heads_per_layer']}") if row["level"] else "unpruned"
        results.eval_results.append(_result("text-generation", "Language modelling after head pruning", "wikitext",
                                            dataset, "perplexity", round(row["perplexity"], 3),
                                            f"perplexity ({setting})"))
    reference = next(r for r in data["rows"] if r["variant"] == "baseline" and r["level"] == 0)
    train = ", ".join(_short(f) for f in info["train"])
    results.training += [
        f"- `benchmarks/pruning_comparison.py`: a GPT-2 ({model['n_layer']} layers, width {model['n_embd']}, "
        f"{model['n_head']} heads) trained from scratch on {train} for {budget['steps']} steps "
        f"({budget['tokens']:,} tokens, {budget['seconds']:.0f} s on CPU), converted to AgencyGPT2 and pruned by "
        f"each strategy ({', '.join(data['strategies'])}) at each level; distillation recovery: "
        f"{data['budget']['recovery_steps']} steps from the unpruned model.",
        f"- Reference: the unpruned GPT-2 has perplexity {reference['perplexity']:.3f} on the same tokens."]
    if data.get("quick"):
        results.training.append(_quick_line("benchmarks/pruning_comparison.py"))
    folder = os.path.dirname(path)
    results.plots = [os.path.join(folder, os.path.basename(figure)) for figure in data.get("figures", {}).values()
                     if os.path.isfile(os.path.join(folder, os.path.basename(figure)))]
    return results


def _read_onnx_speed(data, path, model_type):
    """`benchmarks/onnx_speed.py`'s onnx_speed.json: ONNX Runtime fp32 and int8 against PyTorch fp32 (generate and
    forward tokens/s, file size) for the families of the checkpoint's architecture."""
    architectures = {f: data["exports"].get(f, {}).get("model_type") for f in data["results"]}  # None: the peer
    families = [f for f, t in architectures.items() if t and model_type in (None, t)]
    if not families:
        found = {f: t or "not an armada model" for f, t in architectures.items()}
        raise ValueError(f"results file {path!r} has no ONNX figures for {model_type} (its families: {found}); run "
                         "benchmarks/onnx_speed.py with --families naming one of this architecture.")
    config, env = data["config"], data["environment"]
    gen, fwd = config["generate"], config["forward"]
    results = Results()
    for family in families:
        steps = gen.get("diffusion_denoising_steps") if architectures[family] == "thought_diffusion" else None
        measures = {"generate": f"generate tokens/s (batch 1, {gen['prompt_len']}-token prompt, {gen['new_tokens']} "
                                f"greedy new tokens{f' in {steps} denoising steps' if steps else ''})",
                    "forward": f"forward tokens/s (batch {fwd['batch']} x {fwd['seq_len']} tokens)"}
        for kind, runtime in (("onnx", "ONNX Runtime fp32"), ("int8", "ONNX Runtime int8")):
            entry = data["results"][family][kind]
            dataset = f"onnx_speed.py family `{family}` (random-init weights)"
            for measure, what in measures.items():
                results.eval_results.append(_result(
                    "text-generation", "Inference speed", "armada/onnx_speed", dataset, "speedup",
                    round(entry[measure]["vs_pt"], 4), f"{what}, {runtime} / PyTorch fp32 ({family})", split=None,
                    config=family))
            results.eval_results.append(_result(
                "text-generation", "Model size", "armada/onnx_speed", dataset, "size_ratio",
                round(entry["size_vs_pt"], 4), f"model file size, {runtime} / PyTorch safetensors ({family})",
                split=None, config=family))
        greedy = data.get("greedy_equal_to_pytorch", {}).get(family, {})
        results.training.append(f"- ONNX `{family}`: greedy tokens equal to PyTorch's: "
                                + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in greedy.items()))
    results.training.append(
        f"- ONNX figures: `benchmarks/onnx_speed.py` on {env['cpu']} ({env['threads']} thread(s), "
        f"{env.get('instruction_set', '?')}), ONNX Runtime {env['onnxruntime']}, dynamic int8; median over "
        f"{config['rounds']} interleaved rounds of ratios measured in the same round. The models are the "
        "benchmark's own (random-init weights at its model size: speed and size do not depend on the values), not "
        "this checkpoint.")
    if config.get("quick"):
        results.training.append(_quick_line("benchmarks/onnx_speed.py"))
    return results


def _read_diffusion(data, path, model_type):
    """`benchmarks/diffusion.py`'s diffusion.json: ThoughtDiffusion's ELBO perplexity bound on a wikitext-2 test
    subset and, where the run sampled with 16 denoising steps and the block cache (`td_16_cache`), its sampling
    speed and sample quality against a GPT-2 of the same size."""
    args, quality, env = data["args"], data["quality"], data["environment"]
    results = Results()
    blocks = quality["thought_diffusion"]["blocks"]
    dataset = f"wikitext-2 test.txt, first {blocks} blocks of {args['seq_len']} tokens"
    for name, stack in (("thought_diffusion", "empty thought stack"),
                        ("thought_diffusion_with_thought", "one self-conditioning thought")):
        q = quality[name]
        results.eval_results.append(_result(
            "text-generation", "Language modelling", "wikitext", dataset, "perplexity", round(q["perplexity"], 3),
            f"ELBO perplexity bound ({stack}, {q['t_grid']} points of t)"))
    s16 = data["sampling"].get("td_16_cache")
    if s16:
        setting = (f"{s16['num_steps']} denoising steps, block cache, {args['new_tokens']} new tokens, temperature "
                   f"{args['temperature']}")
        prompts = f"prompts from wikitext-2 test.txt ({args['rounds']})"
        for metric, key, name in (
                ("tokens_per_second", "tokens_per_s", f"tokens/s ({setting}; CPU, {env['threads']} thread(s))"),
                ("speedup", "speed_ratio_vs_gpt2", f"speed / same-size GPT-2 generate with KV cache ({setting})"),
                ("perplexity", "sample_perplexity_under_gpt2", f"sample perplexity under the same-size GPT-2 "
                                                               f"({setting})"),
                ("distinct_2", "distinct_2", f"distinct-2 of the samples ({setting})")):
            results.eval_results.append(_result("text-generation", "Sampling", "armada/sampling", prompts, metric,
                                                round(s16[key], 4), name))
    trained, vocab = data["training"]["thought_diffusion"], data["vocabulary"]
    results.training += [
        f"- `benchmarks/diffusion.py`: {args['train_steps']} AdamW steps of {args['batch_size']} x {args['seq_len']} "
        f"tokens ({trained['tokens']:,} tokens) of wikitext-2 valid.txt, {trained['seconds']:.1f} s on CPU "
        f"({env['threads']} thread(s)); width {args['hidden']}, {args['layers']} layers, {args['heads']} heads, "
        f"blocks of {args['block_length']}, {trained['parameters']:,} parameters.",
        f"- Vocabulary: the {vocab['types']:,} GPT-2 token types that occur in the benchmark's text (+ EOS and "
        "[MASK]); its perplexities are over this vocabulary.",
        f"- Same run, same blocks and budget: a GPT-2 of the same size has perplexity "
        f"{quality['gpt2']['perplexity']:.3f}; the model without a thought stack (`thought_stack_size=0`) has an "
        f"ELBO bound of {quality['no_stack']['perplexity']:.3f}."]
    if not s16:
        results.training.append(f"- This run did not sample with 16 denoising steps and the block cache "
                                f"(`td_16_cache`; its steps: {args['steps_list']}): no sampling figures.")
    if args.get("quick"):
        results.training.append(_quick_line("benchmarks/diffusion.py"))
    return results


def _read_eval_results(data, path, model_type):
    """A JSON with `eval_results`, the generic form evaluation code writes: {"eval_results": [EvalResult fields,
    ...], "training": [...]}."""
    results = Results(training=[f"- {line}" for line in data.get("training", [])])
    for entry in data["eval_results"]:
        try:
            results.eval_results.append(EvalResult(**entry))
        except TypeError as error:
            raise ValueError(f"{path}: eval_results entry {entry} is not a huggingface_hub.EvalResult: {error}")
    return results


# (recognises the JSON, reads it, the architectures whose checkpoints it describes: () = any), in order of preference.
# A reader's docstring up to its first colon names the file in the error for files no reader knows.
RESULT_READERS = (
    (lambda d: "eval_results" in d, _read_eval_results, ()),
    (lambda d: {"best", "results", "args"} <= d.keys(), _read_demo_summary, ("agency_gpt2",)),
    (lambda d: d.get("benchmark") == "armt_babilong", _read_babilong, ("unified_armt",)),
    (lambda d: d.get("benchmark") == "armt_tasks", _read_armt_tasks, ("unified_armt",)),
    (lambda d: {"rows", "strategies", "best_strategies"} <= d.keys(), _read_pruning_comparison, ("agency_gpt2",)),
    (lambda d: d.get("benchmark") == "onnx_speed", _read_onnx_speed, ()),
    (lambda d: {"quality", "sampling", "targets_definition"} <= d.keys(), _read_diffusion, ("thought_diffusion",)),
)


def _what(read):
    """The file a reader reads: its docstring up to the first colon."""
    return " ".join(read.__doc__.split(":")[0].split())


def _load_json(path):
    if not os.path.isfile(path):
        raise ValueError(f"results file {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"results file {path!r} is not valid JSON: {error}")


def read_results(paths, model_type=None):
    """Merge what every JSON file in `paths` says (see `RESULT_READERS`) about a checkpoint of `model_type` (None:
    any architecture); a file no reader knows, or one about another architecture, is an error."""
    merged = Results()
    for path in paths:
        data = _load_json(path)
        found = next(((read, types) for matches, read, types in RESULT_READERS
                      if isinstance(data, dict) and matches(data)), None)
        if found is None:
            allowed = "; ".join(_what(read) for _, read, _ in RESULT_READERS)
            raise ValueError(f"results file {path!r} is not one armada knows; allowed: {allowed}.")
        read, types = found
        if model_type is not None and types and model_type not in types:
            raise ValueError(f"results file {path!r} ({_what(read)}) describes {' or '.join(types)} "
                             f"checkpoints, not this {model_type} one.")
        result = read(data, path, model_type)
        merged.eval_results += result.eval_results
        merged.sources += [os.path.basename(path)] * len(result.eval_results)
        merged.training += result.training
        plot = os.path.splitext(path)[0] + ".png"
        merged.plots += result.plots + ([plot] if os.path.isfile(plot) else [])
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
    elif c["model_type"] == "thought_diffusion":
        attention = (f"block-causal attention between blocks of {c['block_length']} tokens (BD3-LM; sampling keeps a "
                     "block KV cache)" if c.get("block_length") else "full bidirectional attention (MDLM)")
        stack = (f"thought stack of {c['thought_stack_size']} thoughts of shape {c['thought_dims']}, read through "
                 "cross-attention" if c["thought_stack_size"] else "no thought stack (a plain MDLM / BD3-LM)")
        facts += [f"{c['num_hidden_layers']} layers, width {c['hidden_size']}, {c['num_attention_heads']} heads; "
                  f"{attention}",
                  f"{stack}; {c['noise_schedule']} noise schedule",
                  f"vocabulary {c['vocab_size']} with [MASK] = id {c['mask_token_id']}, "
                  f"{c['max_position_embeddings']} positions (prompt + new tokens)"]
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
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)  # reads the same config.json
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


def _measured(results, model_type):
    """(Results, the card's `training` and `results` fields) from the results JSON files."""
    measured = read_results(results, model_type)
    plots = [f"{PLOTS_DIR}/{os.path.basename(p)}" for p in measured.plots]
    training = "\n".join(measured.training) or "Not recorded: no results file describing this checkpoint's " \
                                                "training was given."
    return measured, training, _results_section(measured, plots)


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
        measured, training, results_section = _measured(results, base_config["model_type"])
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
                      training=training, results=results_section)
        return _render(template or ADAPTER_TEMPLATE, card_data, fields)

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder!r} has no config.json (nor adapter_config.json): not a saved checkpoint.")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config_cls, models = architecture(config.get("model_type"))
    auto_class = head_auto_class(models)
    measured, training, results_section = _measured(results, config_cls.model_type)
    card_data = ModelCardData(language="en", license="apache-2.0", library_name="transformers",
                              pipeline_tag=PIPELINE_TAGS[auto_class],
                              tags=["armada", config_cls.model_type, "custom_code"],
                              model_name=repo_id, eval_results=measured.eval_results or None)
    fields = dict(model_name=repo_id, architecture=_architecture_lines(config, folder),
                  how_to_load=_how_to_load(repo_id, auto_class), training=training, results=results_section)
    return _render(template or os.path.join(TEMPLATE_DIR, f"{config_cls.model_type}.md"), card_data, fields)


def _hub_config(repo_id):
    """config.json of a model on the Hub (or in the HF cache), as a dict."""
    from huggingface_hub import hf_hub_download

    with open(hf_hub_download(repo_id, "config.json"), encoding="utf-8") as f:
        return json.load(f)


__all__ = ["build_card", "read_results", "architecture", "head_auto_class", "Results", "RESULT_READERS",
           "TEMPLATE_DIR"]
