"""armada demo (`make demo`): train a small GPT-2, convert it to AgencyGPT2, prune half its heads two ways,
compare perplexity / size / speed with the unpruned GPT-2, save the best, reload it through the Auto classes and
generate, export it to ONNX int8 (parity checked) and generate from the int8 file with ONNX Runtime; then train a
tiny UnifiedARMT whose answers must cross segments through its memory, and a tiny ThoughtDiffusion (sampled with its
denoising history shown). Each saved model (`<output-dir>`, `<output-dir>_armt`, `<output-dir>_diffusion`) gets a
model card built from its measured results and an int8 ONNX export beside it (`..._onnx`) that ONNX Runtime runs.
Runs offline on CPU. GPT-2 training takes a fixed 3 minutes; benchmarks/README.md has the measured runs.

Generation speed is measured as benchmarks/agency_speed.py does (benchmarks/common.py): the models take turns in
interleaved rounds (a new order each round), and each speed-up is the median over rounds of two speeds measured in
the same round. The demo warns when other processes are using the CPUs (at the start, and when samples ran under
their load): its speed column then says little.

    python examples/demo.py [--quick] [--train-seconds 180] [--output-dir outputs/demo]

Data: training text is ../shared/data/tinyshakespeare/input.txt (beside the repo) minus its last 10%, which is
held out for evaluation; the first tokens of ../shared/data/wikitext-2/test.txt are a second, out-of-domain
evaluation set. Without the shared folder a short embedded Shakespeare text is used instead.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, set_seed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # benchmarks/common.py: the speed measurement shared with the benchmarks
import armada  # noqa: E402,F401  (registers agency_gpt2 with the Auto classes)
from armada import AgencyGPT2ForCausalLM  # noqa: E402
from armada.evaluation import diffusion_elbo_perplexity, perplexity_on_blocks  # noqa: E402
from armada.io_utils import atomic_directory, atomic_write_text  # noqa: E402
from armada.pruning import prune  # noqa: E402
from armada.tokenization import gpt2_tokenizer  # noqa: E402
from benchmarks import common  # noqa: E402

DATA_DIR = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))
PROMPT = "KING RICHARD III:\nNow is the winter of our discontent\n"

# Used only when ../shared/data is absent (public domain: Hamlet III.1, As You Like It II.7, Sonnet 18).
FALLBACK_TEXT = """HAMLET:
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die, to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to: 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep, perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life.
For who would bear the whips and scorns of time,
The oppressor's wrong, the proud man's contumely,
The pangs of despised love, the law's delay,
The insolence of office and the spurns
That patient merit of the unworthy takes,
When he himself might his quietus make
With a bare bodkin? who would fardels bear,
To grunt and sweat under a weary life,
But that the dread of something after death,
The undiscover'd country from whose bourn
No traveller returns, puzzles the will
And makes us rather bear those ills we have
Than fly to others that we know not of?
Thus conscience does make cowards of us all;
And thus the native hue of resolution
Is sicklied o'er with the pale cast of thought,
And enterprises of great pith and moment
With this regard their currents turn awry,
And lose the name of action.

JAQUES:
All the world's a stage,
And all the men and women merely players:
They have their exits and their entrances;
And one man in his time plays many parts,
His acts being seven ages. At first the infant,
Mewling and puking in the nurse's arms.
And then the whining school-boy, with his satchel
And shining morning face, creeping like snail
Unwillingly to school. And then the lover,
Sighing like furnace, with a woeful ballad
Made to his mistress' eyebrow. Then a soldier,
Full of strange oaths and bearded like the pard,
Jealous in honour, sudden and quick in quarrel,
Seeking the bubble reputation
Even in the cannon's mouth. And then the justice,
In fair round belly with good capon lined,
With eyes severe and beard of formal cut,
Full of wise saws and modern instances;
And so he plays his part. The sixth age shifts
Into the lean and slipper'd pantaloon,
With spectacles on nose and pouch on side,
His youthful hose, well saved, a world too wide
For his shrunk shank; and his big manly voice,
Turning again toward childish treble, pipes
And whistles in his sound. Last scene of all,
That ends this strange eventful history,
Is second childishness and mere oblivion,
Sans teeth, sans eyes, sans taste, sans every thing.

SONNET XVIII:
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date:
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade
Nor lose possession of that fair thou owest;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou growest:
So long as men can breathe or eyes can see,
So long lives this and this gives life to thee.
"""


def section(title):
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}", flush=True)


def to_blocks(ids, size):
    """[n_blocks, size] tensor of consecutive, non-overlapping blocks (the tail that does not fill one is dropped)."""
    n = len(ids) // size
    return torch.tensor(ids[: n * size], dtype=torch.long).view(n, size)


def load_data(tokenizer, args):
    """Training blocks, calibration blocks and named evaluation block sets; records where each came from."""
    shakespeare = os.path.join(args.data_dir, "tinyshakespeare", "input.txt")
    wikitext = os.path.join(args.data_dir, "wikitext-2", "test.txt")
    if os.path.isfile(shakespeare):
        text, source = open(shakespeare, encoding="utf-8").read(), shakespeare
    else:
        text, source = FALLBACK_TEXT, "embedded fallback text (Hamlet, As You Like It, Sonnet 18)"
        print(f"! {shakespeare} not found: using the short embedded text (expect memorization, not learning)")
    ids = tokenizer(text, verbose=False)["input_ids"]
    split = int(len(ids) * 0.9)
    train = to_blocks(ids[:split], args.block_size)
    heldout = to_blocks(ids[split:], min(args.block_size, len(ids) - split))[: args.eval_blocks]
    print(f"training text : {source}\n                {len(ids):,} tokens; first 90% -> {len(train)} training blocks "
          f"of {args.block_size}")
    print(f"eval 'held-out': last 10% of the same text, {heldout.numel():,} tokens in {len(heldout)} block(s)")
    evals, info = {"held-out": heldout}, {"train": source, "train_tokens": split, "held-out": heldout.numel()}
    if os.path.isfile(wikitext):
        wiki_ids = tokenizer(open(wikitext, encoding="utf-8").read(), verbose=False)["input_ids"]
        evals["wikitext"] = to_blocks(wiki_ids[: args.eval_blocks * args.block_size], args.block_size)
        info["wikitext"] = f"{wikitext}: first {evals['wikitext'].numel():,} tokens"
        print(f"eval 'wikitext': {info['wikitext']} (out of domain), {len(evals['wikitext'])} blocks")
    else:
        print(f"! {wikitext} not found: evaluating on the held-out Shakespeare only")
    generator = torch.Generator().manual_seed(args.seed)
    calibration = train[torch.randperm(len(train), generator=generator)[: args.calibration_blocks]]
    return train, list(calibration.split(4)), evals, info


def train_gpt2(train, args):
    """A small GPT-2 trained from scratch for a fixed wall-clock budget (AdamW, warmup + cosine-in-time LR)."""
    config = GPT2Config(vocab_size=50257, n_positions=256, n_layer=args.n_layer, n_embd=args.n_embd,
                        n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    print(f"GPT2LMHeadModel: {args.n_layer} layers x {args.n_embd} wide x {args.n_head} heads, "
          f"{model.num_parameters():,} parameters; training for {args.train_seconds:.0f}s, batch {args.batch_size}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    order, cursor, step, ema, warmup = torch.randperm(len(train), generator=generator), 0, 0, None, 10
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=round(args.train_seconds), unit="s", desc="train", bar_format="{l_bar}{bar}| {n:.0f}/{total}s "
                                                                                  "{postfix}")
    while (elapsed := time.perf_counter() - start) < args.train_seconds:
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        batch = train[order[cursor: cursor + args.batch_size]]
        cursor += args.batch_size
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * elapsed / args.train_seconds))  # 1 -> 0.1 over the budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        bar.set_postfix(step=step, loss=f"{ema:.3f}", lr=f"{lr:.1e}")
        bar.update(min(time.perf_counter() - start, args.train_seconds) - bar.n)
    bar.close()
    seconds = time.perf_counter() - start
    tokens = step * args.batch_size * train.shape[1]
    print(f"{step} steps, {tokens:,} tokens ({tokens / len(train.view(-1)):.2f} epochs) in {seconds:.0f}s "
          f"({tokens / seconds:.0f} tokens/s); final loss (EMA) {ema:.3f}")
    model.eval()
    return model, {"steps": step, "tokens": tokens, "seconds": seconds, "final_loss_ema": ema}


def evaluate(model, evals):
    return {name: perplexity_on_blocks(model, blocks, batch_size=8, progress=True)["perplexity"]
            for name, blocks in evals.items()}


def sizes(model):
    total = sum(p.numel() for p in model.parameters())  # tied lm_head / wte counted once
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return {"params": total, "non_embedding_params": total - embeddings}


def heads_per_layer(model):
    if isinstance(model, AgencyGPT2ForCausalLM):
        return model.num_heads_per_layer()
    return [block.attn.num_heads for block in model.transformer.h]


def speeds(models, prompt_ids, rounds, max_wait, seed, baseline="gpt2 (unpruned)"):
    """Greedy generation, batch 1, 64 new tokens, timed as benchmarks/agency_speed.py does (benchmarks/common.py):
    interleaved rounds in a new order each round, samples under other processes' load waited out or re-run from a
    `max_wait` budget, and each speed-up the median over rounds of the two speeds measured in the same round.
    Returns ({name: (median tokens/s, paired speed-up vs `baseline`)}, contended samples, total samples)."""
    kwargs = dict(attention_mask=torch.ones_like(prompt_ids), do_sample=False, max_new_tokens=64, min_new_tokens=64,
                  pad_token_id=0)
    measures = {"generate": (lambda model: model.generate(prompt_ids, **kwargs), 64)}
    bar = tqdm(total=rounds * len(models), desc="generation speed (interleaved rounds)")
    with torch.inference_mode():
        tps, loads = common.interleaved_rounds(models, measures, rounds, warmup=1,
                                               monitor=common.LoadMonitor(max_wait), seed=seed, progress=bar)
    bar.close()
    base = tps[baseline]["generate"]
    contended = sum(load > common.CONTENDED for name in loads for load in loads[name]["generate"])
    return ({name: (statistics.median(t["generate"]), common.paired_ratio(t["generate"], base))
             for name, t in tps.items()}, contended, rounds * len(models))


def print_table(rows, eval_names, baseline="gpt2 (unpruned)"):
    header = (f"{'model':<22}{'heads/layer':<16}{'params':>12}{'non-emb':>11}"
              + "".join(f"{'ppl ' + n:>16}" for n in eval_names) + f"{'tok/s':>9}{'speedup':>9}")
    print(header + "\n" + "-" * len(header))
    for name, r in rows.items():
        print(f"{name:<22}{str(r['heads_per_layer']):<16}{r['params']:>12,}{r['non_embedding_params']:>11,}"
              + "".join(f"{r['perplexity'][n]:>16.2f}" for n in eval_names)
              + f"{r['tokens_per_s']:>9.1f}{r['speedup']:>8.2f}x")


def reload_and_generate(best, best_name, tokenizer, args):
    """Save atomically, reload through the Auto classes, check the logits and generate."""
    with atomic_directory(args.output_dir, overwrite=True) as tmp:  # replaces only its own earlier output
        best.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"saved {best_name} + tokenizer to {args.output_dir}: {sorted(os.listdir(args.output_dir))}")
    model = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
    tok = AutoTokenizer.from_pretrained(args.output_dir)
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        diff = (model(**enc).logits - best(**enc).logits).abs().max().item()
    print(f"reloaded as {type(model).__name__} ({type(tok).__name__}); heads per layer {model.num_heads_per_layer()}; "
          f"max |logits - in-memory logits| = {diff:.2e}")
    assert isinstance(model, AgencyGPT2ForCausalLM) and diff <= 1e-5, "reloaded model differs from the saved one"
    print(f"agency_report counts: {model.agency_report()['counts']}")
    samples = {}
    for label, kwargs in (("greedy", dict(do_sample=False)), ("top-k 40, T=0.8", dict(do_sample=True, top_k=40,
                                                                                       temperature=0.8))):
        torch.manual_seed(args.seed)
        out = model.generate(**enc, max_new_tokens=args.sample_tokens, pad_token_id=tok.eos_token_id, **kwargs)
        samples[label] = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"\n--- {label} ---\n{PROMPT}{samples[label]}")
    return {"max_abs_logit_diff": diff, "heads_per_layer": model.num_heads_per_layer(),
            "agency_counts": model.agency_report()["counts"], "samples": samples}


def export_int8(model_dir, **kwargs):
    """Export a saved demo model to ONNX + int8 beside it (`<dir>_onnx`; parity checked by export_onnx)."""
    from armada.export import export_onnx

    out = model_dir.rstrip("/") + "_onnx"
    report = export_onnx(model_dir, out, quantize="int8", overwrite=True, **kwargs)
    int8 = report["int8"]
    print(f"exported to {out}: fp32 max |logit diff| vs PyTorch {report['fp32']['max_abs_logit_diff']:.1e}; int8 "
          f"top-1 agreement {int8['top1_agreement']:.1%}, perplexity {int8['perplexity_int8']:.2f} vs fp32 "
          f"{int8['perplexity_fp32']:.2f} on {int8['scored_positions']} scored positions (checked: "
          f"{int8['enforced']}); files: {', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in report['files'].items())}")
    return out, report


def onnx_skipped():
    """None where ONNX export can run here, else the note the demo records instead of its ONNX results."""
    from armada.compat import onnx_export_missing

    reason = onnx_export_missing()
    if reason:
        print(f"ONNX export skipped: {reason}")
        return {"skipped": reason}
    return None


def onnx_demo(model_dir, tokenizer, args):
    """Export the saved AgencyGPT2 to ONNX + int8 and generate from the int8 file with ONNX Runtime."""
    skipped = onnx_skipped()
    if skipped:
        return skipped
    from armada.onnxruntime import ORTAgencyGPT2ForCausalLM

    out, report = export_int8(model_dir)
    model = ORTAgencyGPT2ForCausalLM.from_pretrained(out, file_name="model_quantized.onnx")
    enc = tokenizer(PROMPT, return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=args.sample_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"\n--- greedy, ONNX Runtime int8 ---\n{PROMPT}{text}")
    return {"report": report, "sample": text}


def save_with_card(model, tokenizer, folder, results):
    """save_pretrained model + tokenizer atomically into `folder`, its measured results beside them as
    `eval_results.json` (huggingface_hub EvalResult fields + training lines) and the model card built from it."""
    from armada.hub_cards import build_card

    with atomic_directory(folder, overwrite=True) as tmp:  # replaces only its own earlier output
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(os.path.join(tmp, "eval_results.json"), json.dumps(results, indent=2))
        card = build_card(tmp, results=[os.path.join(tmp, "eval_results.json")],
                          repo_id=os.path.basename(folder.rstrip("/")))
        atomic_write_text(os.path.join(tmp, "README.md"), str(card))
    print(f"saved {type(model).__name__} + tokenizer + model card ({len(card.data.eval_results)} measured results) "
          f"to {folder}")


def armt_memory_demo(args):
    """Train a tiny UnifiedARMT on key -> value retrieval whose query sits segments after the pair, then show that
    the answer comes through memory: accuracy with the memory state kept vs reset before the query's segment."""
    from transformers import Trainer, TrainingArguments

    from armada import UnifiedARMTConfig, UnifiedARMTForCausalLM
    from armada.tasks import MemoryRetrieval, TaskCollator, TaskStream, build_dataset

    task = MemoryRetrieval(context_length=3, n_pairs=1, n_symbols=8)  # <bos> <key> k v | <query> k <answer> -> v
    segment = 4  # the pair fills the first segment, the question the second: only memory links them
    config = UnifiedARMTConfig(vocab_size=task.vocab.vocab_size, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, segment_size=segment, num_memory_tokens=4, d_mem=16,
                               num_memory_heads=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               bos_token_id=task.vocab.BOS, eos_token_id=None, pad_token_id=task.vocab.PAD)
    model = UnifiedARMTForCausalLM(config)
    print(f"UnifiedARMT: 2 layers x 64 wide, segments of {segment} tokens + 4 memory tokens, "
          f"{model.num_parameters():,} parameters; task: '<bos> <key> k v' in segment 1, '<query> k <answer>' in "
          f"segment 2, predict v (8 values); {args.armt_steps} Trainer steps")
    training_args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="armada-demo-"), report_to=[],
                                      max_steps=args.armt_steps, per_device_train_batch_size=32, learning_rate=3e-3,
                                      warmup_steps=20, lr_scheduler_type="cosine", save_strategy="no",
                                      logging_steps=max(1, args.armt_steps // 5), use_cpu=True, seed=args.seed)
    trainer = Trainer(model=model, args=training_args, train_dataset=TaskStream(task, seed=args.seed),
                      data_collator=TaskCollator(task.vocab.tokenizer()))
    trainer.train()
    shutil.rmtree(training_args.output_dir, ignore_errors=True)
    test = torch.tensor(build_dataset(task, 512, seed=12345)["input_ids"])  # all samples have the same length
    prompt, answer = test[:, :-1], test[:, -1]
    cut = (prompt.shape[1] - 1) // segment * segment  # start of the segment that holds the query's answer slot
    model.eval()
    with torch.no_grad():
        kept = (model(prompt).logits[:, -1].argmax(-1) == answer).float().mean().item()
        state = model(prompt[:, :cut], use_cache=True).memory_state.reset()
        forgot = (model(prompt[:, cut:], memory_state=state).logits[:, -1].argmax(-1) == answer).float().mean().item()
        pair_in_last = (prompt[:, cut:] == task.vocab.KEY).any(-1).float().mean().item()
    print(f"answer accuracy on 512 new samples: memory kept {kept:.1%} | memory reset before the last segment "
          f"{forgot:.1%} (the pair sits in that last segment in {pair_in_last:.0%} of samples; chance is "
          f"{1 / task.n_symbols:.1%})")
    out = model.generate(prompt[:1], attention_mask=torch.ones_like(prompt[:1]), max_new_tokens=1, do_sample=False)
    print(f"generate(): {task.vocab.decode(prompt[0].tolist())} -> {task.vocab.decode(out[0, -1:].tolist())} "
          f"(expected {task.vocab.decode([answer[0].item()])})")
    info = {"accuracy_memory_kept": kept, "accuracy_memory_reset": forgot, "pair_in_last_segment": pair_in_last,
            "steps": args.armt_steps, "parameters": model.num_parameters()}
    folder = args.output_dir.rstrip("/") + "_armt"
    dataset = f"MemoryRetrieval (pair in segment 1, query in segment 2, {task.n_symbols} values), 512 new samples"
    save_with_card(model, task.vocab.tokenizer(), folder, {
        "eval_results": [dict(task_type="text-generation", task_name="Key-value retrieval across segments",
                              dataset_type="armada/memory_retrieval", dataset_name=dataset, dataset_split="test",
                              metric_type="accuracy", metric_value=round(value, 4), metric_name=name)
                         for name, value in (("answer accuracy, memory kept", kept),
                                             ("answer accuracy, memory reset before the query's segment", forgot))],
        "training": [f"Produced by `examples/demo.py`: {args.armt_steps} Trainer steps, batch 32, lr 3e-3 on "
                     f"generated MemoryRetrieval samples (seed {args.seed}), CPU"]})

    skipped = onnx_skipped()
    if skipped:
        return {**info, "saved_to": folder, "onnx": skipped}
    from armada.onnxruntime import ORTUnifiedARMTForCausalLM

    onnx_dir, report = export_int8(folder, sample_ids=test[:64].flatten().tolist())
    int8 = ORTUnifiedARMTForCausalLM.from_pretrained(onnx_dir, file_name="model_quantized.onnx")
    int8_kept = (int8(prompt).logits[:, -1].argmax(-1) == answer).float().mean().item()
    print(f"answer accuracy of the int8 ONNX model (ONNX Runtime, streamed across segments): {int8_kept:.1%} "
          f"(PyTorch fp32 {kept:.1%})")
    return {**info, "saved_to": folder, "onnx": {"report": report, "accuracy_memory_kept_int8": int8_kept}}


def write_model_card(args, summary_path):
    """The saved model's model card (README.md beside it), from the measured summary, as `armada card` writes it."""
    from armada.hub_cards import build_card

    card = build_card(args.output_dir, results=[summary_path])
    path = os.path.join(args.output_dir, "README.md")
    atomic_write_text(path, str(card))
    print(f"model card with {len(card.data.eval_results)} measured results written to {path}; push it with\n"
          f"  armada push {args.output_dir} NAMESPACE/NAME --results {summary_path}")


def diffusion_demo(train, evals, tokenizer, args):
    """Train a tiny ThoughtDiffusion (block-causal, thought stack) on the GPT-2 blocks for a few steps, then sample
    with the history shown: the canvas after each denoising step, [MASK] as '_'."""
    from armada import ThoughtDiffusionConfig, ThoughtDiffusionForMaskedLM

    mask_id = len(tokenizer)  # one token past GPT-2's vocabulary
    config = ThoughtDiffusionConfig(vocab_size=mask_id + 1, mask_token_id=mask_id, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=128, thought_dims=[8, 8],
                                    thought_stack_size=4, block_length=8, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0)
    torch.manual_seed(args.seed)
    model = ThoughtDiffusionForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    blocks = train[:, :64]
    model.train()
    for step in tqdm(range(args.diffusion_steps), desc="ThoughtDiffusion"):
        batch = blocks[torch.randint(0, len(blocks), (8,))]
        out = model(batch, labels=batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"ThoughtDiffusion: {model.num_parameters():,} parameters, {args.diffusion_steps} steps; last ELBO "
          f"{out.elbo.item():.2f} nats/token, thought loss {out.thought_loss.item():.3f}")
    model.eval()
    held_out = evals["held-out"][:8, :64]
    elbo = diffusion_elbo_perplexity(model, held_out, t_points=4)
    print(f"ELBO perplexity bound on {len(held_out)} held-out blocks of 64 tokens (4 t points): "
          f"{elbo['perplexity']:.1f}")
    prompt = blocks[:1, :8]
    result = model.generate_with_stack(prompt, max_new_tokens=16, num_steps=8, temperature=0.8, top_k=50,
                                       return_history=True)
    for entry in result.history:
        new = entry["tokens"][0, prompt.shape[1]:].tolist()
        words = "".join("_" if t == mask_id else tokenizer.decode([t]) for t in new)
        print(f"block {entry['block']} step {entry['step']}: {tokenizer.decode(prompt[0])}|{words!r}")
    info = {"steps": args.diffusion_steps, "final_elbo": out.elbo.item(), "elbo_perplexity_held_out": elbo,
            "forward_passes": result.num_forward_passes, "sample": tokenizer.decode(result.sequences[0])}

    folder = args.output_dir.rstrip("/") + "_diffusion"
    diffusion_tokenizer = gpt2_tokenizer()
    diffusion_tokenizer.add_special_tokens({"mask_token": "[MASK]"})  # id len(GPT-2) = config.mask_token_id
    save_with_card(model, diffusion_tokenizer, folder, {
        "eval_results": [dict(task_type="fill-mask", task_name="Masked diffusion language modelling",
                              dataset_type="armada/held-out", dataset_name=f"held-out Shakespeare, {len(held_out)} "
                              "blocks of 64 tokens", dataset_split="test", metric_type="perplexity",
                              metric_value=round(elbo["perplexity"], 2),
                              metric_name="ELBO perplexity bound (4 t points)")],
        "training": [f"Produced by `examples/demo.py`: {args.diffusion_steps} AdamW steps, batch 8 x 64 tokens of "
                     f"the Shakespeare training text, CPU"]})

    skipped = onnx_skipped()
    if skipped:
        return {**info, "saved_to": folder, "onnx": skipped}
    from armada.onnxruntime import ORTThoughtDiffusionForMaskedLM

    onnx_dir, report = export_int8(folder, sample_ids=held_out.flatten().tolist())
    int8 = ORTThoughtDiffusionForMaskedLM.from_pretrained(onnx_dir, file_name="model_quantized.onnx")
    greedy = dict(max_new_tokens=16, num_steps=8, top_k=1)
    pt_tokens = model.generate_with_stack(prompt, **greedy).sequences
    ort_tokens = int8.generate_with_stack(prompt, **greedy).sequences
    agree = (pt_tokens == ort_tokens).float()[0, prompt.shape[1]:].mean().item()
    print(f"greedy generate_with_stack on ONNX Runtime int8: {tokenizer.decode(ort_tokens[0])!r} ({agree:.0%} of "
          "the new tokens as PyTorch fp32)")
    return {**info, "saved_to": folder, "onnx": {"report": report, "int8_greedy_agreement": agree}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 20s of training, small evaluation")
    parser.add_argument("--train-seconds", type=float, default=None, help="training budget (default 180, quick 20)")
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--data-dir", default=DATA_DIR, help="folder with tinyshakespeare/ and wikitext-2/")
    parser.add_argument("--strategies", default="magnitude,importance", help="comma-separated pruning strategies")
    parser.add_argument("--level", type=float, default=0.5, help="fraction of all heads to prune")
    parser.add_argument("--eval-blocks", type=int, default=None, help="blocks per eval set (default 64, quick 8)")
    parser.add_argument("--calibration-blocks", type=int, default=8, help="training blocks for importance scores")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--sample-tokens", type=int, default=60)
    parser.add_argument("--armt-steps", type=int, default=None, help="UnifiedARMT training steps (default 500, "
                                                                      "quick 60)")
    parser.add_argument("--speed-rounds", type=int, default=None, help="timed rounds of generation (default 5, "
                                                                        "quick 3)")
    parser.add_argument("--max-wait", type=float, default=30.0,
                        help="seconds the speed measurement may spend waiting for other processes to go quiet")
    parser.add_argument("--diffusion-steps", type=int, default=None, help="ThoughtDiffusion training steps "
                                                                           "(default 150, quick 10)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.train_seconds = args.train_seconds or (20.0 if args.quick else 180.0)
    args.eval_blocks = args.eval_blocks or (8 if args.quick else 64)
    args.armt_steps = args.armt_steps or (60 if args.quick else 500)
    args.diffusion_steps = args.diffusion_steps or (10 if args.quick else 150)
    args.speed_rounds = args.speed_rounds or (3 if args.quick else 5)
    return args


def convert(gpt2, evals, ppl):
    """AgencyGPT2 from the trained GPT-2; its perplexities must equal GPT-2's."""
    agency = AgencyGPT2ForCausalLM.from_gpt2(gpt2).eval()
    agency_ppl = evaluate(agency, evals)
    for name in evals:
        rel = abs(agency_ppl[name] - ppl[name]) / ppl[name]
        print(f"{name:>10}: GPT-2 {ppl[name]:.4f}   AgencyGPT2 {agency_ppl[name]:.4f}   relative diff {rel:.1e}")
        assert rel < 1e-4, f"conversion changed the {name} perplexity"
    return agency, agency_ppl


def prune_and_compare(gpt2, agency, ppl, agency_ppl, calibration, evals, args, busy):
    """Prune a fresh AgencyGPT2 per strategy; size, perplexity and paired generation speed-up of every model."""
    models = {"gpt2 (unpruned)": gpt2, "agency (unpruned)": agency}
    for strategy in args.strategies.split(","):
        model = AgencyGPT2ForCausalLM.from_gpt2(gpt2).eval()  # a fresh copy for each strategy
        removed = prune(model, args.level, strategy, data=calibration)
        print(f"{strategy:>10}: removed {sum(map(len, removed.values()))} heads {removed}; "
              f"heads per layer now {model.num_heads_per_layer()}")
        models[f"agency {strategy} {args.level:.0%}"] = model
    rows = {name: {"heads_per_layer": heads_per_layer(m), **sizes(m)} for name, m in models.items()}
    for name, m in models.items():
        rows[name]["perplexity"] = ppl if m is gpt2 else agency_ppl if m is agency else evaluate(m, evals)
    prompt_ids = evals["held-out"][:1, :32]
    measured, contended, total = speeds(models, prompt_ids, args.speed_rounds, args.max_wait, args.seed)
    for name, (tps, speedup) in measured.items():
        rows[name].update(tokens_per_s=tps, speedup=speedup)
    print()
    print_table(rows, list(evals))
    lm_head = gpt2.lm_head.weight.numel() / rows["gpt2 (unpruned)"]["params"]
    removed = 1 - min(r["params"] for r in rows.values()) / rows["gpt2 (unpruned)"]["params"]
    print(f"note: decoding one token at batch 1 reads every weight once; the tied {gpt2.lm_head.weight.shape[0]}x"
          f"{gpt2.lm_head.weight.shape[1]} lm_head is {lm_head:.0%} of them and pruning removed {removed:.1%}, so the "
          "speed-up is small at this size (it grows with depth and width relative to the vocabulary).")
    print(f"speed-up: median over {args.speed_rounds} rounds of (model tokens/s / unpruned GPT-2 tokens/s in the same "
          "round); 'agency (unpruned)' computes what GPT-2 does, so its distance from 1.00x is this run's noise.")
    for warning in (busy, common.contention_warning(contended, total)):
        if warning:
            print(warning)
    return models, rows


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    start, timings = time.perf_counter(), {}
    busy = common.busy_machine_warning()
    if busy:
        print(busy)

    def done(name, since):
        timings[name] = round(time.perf_counter() - since, 1)
        print(f"[{name}: {timings[name]:.1f}s, total {time.perf_counter() - start:.1f}s]")
        return time.perf_counter()

    section("1-2. Tokenizer and data")
    t = time.perf_counter()
    tokenizer = gpt2_tokenizer()
    print(f"GPT-2 tokenizer: {type(tokenizer).__name__}, vocab {len(tokenizer):,}")
    train, calibration, evals, data_info = load_data(tokenizer, args)
    t = done("data", t)

    section("3. Train a small GPT-2 from scratch")
    gpt2, train_info = train_gpt2(train, args)
    ppl = evaluate(gpt2, evals)
    print("GPT-2 perplexity: " + ", ".join(f"{n} {p:.2f}" for n, p in ppl.items()))
    t = done("train", t)

    section("4. Convert to AgencyGPT2 (must be exactly GPT-2)")
    agency, agency_ppl = convert(gpt2, evals, ppl)
    t = done("convert", t)

    section(f"5. Prune {args.level:.0%} of the heads: {args.strategies}")
    models, rows = prune_and_compare(gpt2, agency, ppl, agency_ppl, calibration, evals, args, busy)
    t = done("prune+compare", t)

    section("6. Save the best pruned model, reload it with AutoModelForCausalLM, generate")
    pruned = [name for name in rows if name.startswith("agency ") and "unpruned" not in name]
    best_name = min(pruned, key=lambda n: rows[n]["perplexity"]["held-out"])
    print(f"best pruned model (lowest held-out perplexity): {best_name}")
    reload_info = reload_and_generate(models[best_name], best_name, tokenizer, args)
    t = done("save+reload+generate", t)

    section("6b. Export it to ONNX, quantize to int8, generate with ONNX Runtime")
    onnx_info = onnx_demo(args.output_dir, tokenizer, args)
    t = done("onnx", t)

    section("7. UnifiedARMT: a memory that carries information across segments")
    armt_info = armt_memory_demo(args)
    t = done("armt", t)

    section("8. ThoughtDiffusion: denoising block by block, the history shown")
    diffusion_info = diffusion_demo(train, evals, tokenizer, args)
    t = done("diffusion", t)

    section("9. Summary")
    timings["total"] = round(time.perf_counter() - start, 1)
    summary = {"args": vars(args), "data": data_info, "training": train_info, "results": rows,
               "best": best_name, "reload": reload_info, "onnx": onnx_info, "armt": armt_info,
               "diffusion": diffusion_info, "timings_s": timings, "busy_at_start": busy}
    path = os.path.join(args.output_dir, "demo_summary.json")
    atomic_write_text(path, json.dumps(summary, indent=2))
    print_table(rows, list(evals))
    print(f"\nsummary written to {path}; total wall time {timings['total']:.0f}s")

    section("10. Model card")
    write_model_card(args, path)


if __name__ == "__main__":
    main()
