import os
import random
import re

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

import armada.tasks as tasks
from armada.tasks import (
    BABI_TASKS,
    BabiLong,
    BabiTask,
    DynamicTaskWeights,
    MemoryRetrieval,
    MultiHop,
    PatternReasoning,
    TaskCollator,
    TaskVocab,
    answer_accuracy,
    build_dataset,
    exact_match,
    load_babilong_hf,
    tokenize_sample,
)
from armada.tokenization import gpt2_tokenizer

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare", "input.txt")
needs_shakespeare = pytest.mark.skipif(not os.path.isfile(SHAKESPEARE), reason="../shared/data is absent")
N_SPECIAL = len(TaskVocab.SPECIALS)



def check_labels(sample):
    """Labels are -100 before the answer and equal the ids on it; the answer ends the sequence."""
    ids, labels, start = sample["input_ids"], sample["labels"], sample["answer_start"]
    assert len(labels) == len(ids)
    assert all(x == -100 for x in labels[:start])
    assert labels[start:] == ids[start:]
    if not isinstance(sample["answer"], str):
        assert ids[start:] == sample["answer"]
    assert start < len(ids)


# ------------------------------------------------------------------ independent solvers for the synthetic tasks

def solve_retrieval(ids, key_length, value_length):
    v = TaskVocab(1)
    q = len(ids) - 1 - ids[::-1].index(v.QUERY)
    memory, i = {}, 1
    while i < q:
        if ids[i] == v.KEY:
            memory[tuple(ids[i + 1:i + 1 + key_length])] = ids[i + 1 + key_length:i + 1 + key_length + value_length]
            i += 1 + key_length + value_length
        else:
            i += 1
    assert ids[q + 1 + key_length] == v.ANSWER
    return memory[tuple(ids[q + 1:q + 1 + key_length])]


def solve_pattern(shown, p, n_predict, rule, coefficients=None, rule_fn=None):
    xs = list(shown)
    if rule == "arithmetic":
        d = (xs[1] - xs[0]) % p
        assert all((b - a) % p == d for a, b in zip(xs, xs[1:]))
        step = lambda h: h[-1] + d  # noqa: E731
    elif rule == "geometric":
        ratios = [r for r in range(p) if all(a * r % p == b for a, b in zip(xs, xs[1:]))]
        assert {xs[-1] * r % p for r in ratios} and len({xs[-1] * r % p for r in ratios}) == 1
        step = lambda h: h[-1] * ratios[0]  # noqa: E731
    elif rule == "fibonacci":
        assert all((a + b) % p == c for a, b, c in zip(xs, xs[1:], xs[2:]))
        step = lambda h: h[-1] + h[-2]  # noqa: E731
    elif coefficients is not None:
        m = len(coefficients)
        step = lambda h: sum(c * h[len(h) - 1 - i] for i, c in enumerate(coefficients))  # noqa: E731
        assert all(step(xs[:k]) % p == xs[k] for k in range(m, len(xs)))
    else:
        step = rule_fn
    for _ in range(n_predict):
        xs.append(step(list(xs)) % p)
    return xs[len(shown):]


def solve_multi_hop(ids, hops=None):
    v = TaskVocab(1)
    q = ids.index(v.QUERY)
    body = ids[1:q]
    triples = [body[i:i + 3] for i in range(0, len(body), 3)]
    assert all(t[2] == v.SEP for t in triples)
    pointer = {}
    for u, w, _ in triples:
        assert u not in pointer, "a source node points twice: the answer would be ambiguous"
        pointer[u] = w
    node, hops = ids[q + 1], hops or ids[q + 2] - N_SPECIAL
    for _ in range(hops):
        node = pointer[node]
    return [node]


def test_memory_retrieval_answers_and_layout():
    for kl, vl in ((1, 1), (2, 3)):
        task = MemoryRetrieval(context_length=40, n_pairs=5, key_length=kl, value_length=vl, n_symbols=16)
        for s in task.generate(50, seed=1):
            check_labels(s)
            assert s["input_ids"][0] == TaskVocab.BOS
            assert len(s["input_ids"]) == 1 + 40 + 1 + kl + 1 + vl
            assert s["input_ids"][1:41].count(TaskVocab.KEY) == 5
            assert solve_retrieval(s["input_ids"], kl, vl) == s["answer"]
            assert max(s["input_ids"]) < task.vocab.vocab_size


@pytest.mark.parametrize("rule,kwargs", [
    ("arithmetic", {}), ("fibonacci", {}), ("geometric", {"modulus": 61}),
    ("custom", {"coefficients": (2, 0, 1)}), ("custom", {"rule_fn": lambda h: h[-1] * h[-1] + 1, "order": 1}),
])
def test_pattern_reasoning_answers(rule, kwargs):
    task = PatternReasoning(rule, n_shown=6, n_predict=3, **kwargs)
    p = task.modulus
    for s in task.generate(40, seed=2):
        check_labels(s)
        ids = s["input_ids"]
        assert ids[0] == TaskVocab.BOS and ids[7] == TaskVocab.ANSWER
        shown = [x - N_SPECIAL for x in ids[1:7]]
        expected = solve_pattern(shown, p, 3, rule, kwargs.get("coefficients"), kwargs.get("rule_fn"))
        assert [x - N_SPECIAL for x in s["answer"]] == expected


def test_multi_hop_answers():
    for hops, chain in ((1, 1), (2, 2), (3, 5)):
        task = MultiHop(n_hops=hops, chain_length=chain, n_distractors=10, n_symbols=32)
        for s in task.generate(40, seed=3):
            check_labels(s)
            assert solve_multi_hop(s["input_ids"]) == s["answer"]
            assert len(s["input_ids"]) == 1 + 3 * (chain + 10) + 4 + 1


def labeled_spans(sample):
    """(position, label) of every supervised token."""
    return [(i, y) for i, y in enumerate(sample["labels"]) if y != -100]


def test_memory_retrieval_extra_queries_are_labeled_and_answered():
    task = MemoryRetrieval(context_length=40, n_pairs=4, value_length=2, n_symbols=16, n_queries=3)
    v = TaskVocab(1)
    for s in task.generate(50, seed=4):
        ids = s["input_ids"]
        assert solve_retrieval(ids, 1, 2) == s["answer"] and ids[-2:] == s["answer"]
        queries = [i for i, x in enumerate(ids) if x == v.QUERY]
        assert len(queries) == 3 and len({ids[q + 1] for q in queries}) == 3   # distinct keys
        spans = labeled_spans(s)
        assert [i for i, _ in spans] == [i for q in queries for i in (q + 3, q + 4)]
        for q in queries:   # each earlier query, answered by the solver on the sample cut after it
            assert solve_retrieval(ids[:q + 5], 1, 2) == ids[q + 3:q + 5] == s["labels"][q + 3:q + 5]
    with pytest.raises(ValueError, match="n_queries=5 .*<= n_pairs"):
        MemoryRetrieval(n_pairs=4, n_queries=5)


def test_pattern_reasoning_label_shown_labels_the_determined_terms():
    task = PatternReasoning("fibonacci", modulus=31, n_shown=7, label_shown=True)
    for s in task.generate(30, seed=5):
        ids = s["input_ids"]
        shown = [x - N_SPECIAL for x in ids[1:8]]
        assert [i for i, _ in labeled_spans(s)] == list(range(3, 8)) + [9]   # terms 2..6 and the answer
        assert [x - N_SPECIAL for x in s["labels"][3:8]] == solve_pattern(shown[:2], 31, 5, "fibonacci")
    plain = PatternReasoning("fibonacci", modulus=31, n_shown=7).generate(30, seed=5)
    assert [p["input_ids"] for p in plain] == [s["input_ids"] for s in task.generate(30, seed=5)]
    with pytest.raises(ValueError, match="label_shown must be True or False"):
        PatternReasoning(label_shown=1)


def test_multi_hop_extra_queries_are_labeled_and_answered():
    task = MultiHop(n_hops=3, chain_length=4, n_distractors=5, n_symbols=32, n_queries=4)
    v = TaskVocab(1)
    for s in task.generate(40, seed=6):
        ids = s["input_ids"]
        queries = [i for i, x in enumerate(ids) if x == v.QUERY]
        assert len(queries) == 4 and ids[queries[-1] + 2] - N_SPECIAL == 3
        assert [i for i, _ in labeled_spans(s)] == [q + 4 for q in queries]
        for q in queries:   # the solver reads the first query, so hide the earlier ones
            cut = ids[:queries[0]] + ids[q:q + 5]
            assert solve_multi_hop(cut) == [ids[q + 4]]
            assert 1 <= ids[q + 2] - N_SPECIAL <= 3
        asked = [tuple(ids[q + 1:q + 3]) for q in queries]
        assert len(set(asked)) == 4 and s["answer"][0] not in [ids[q + 4] for q in queries[:-1]]  # nothing to copy
    with pytest.raises(ValueError, match="n_queries=5: .*allowed: n_queries <= 4"):
        MultiHop(n_hops=2, chain_length=3, n_queries=5)


def test_multi_hop_show_path_labels_every_node_on_the_way():
    v = TaskVocab(1)
    for n_queries in (1, 3):
        task = MultiHop(n_hops=3, chain_length=4, n_distractors=5, n_symbols=32, n_queries=n_queries)
        plain, path = task.generate(30, seed=7), task.with_difficulty(show_path=True).generate(30, seed=7)
        for p, s in zip(plain, path):
            ids = s["input_ids"]
            queries = [i for i, x in enumerate(ids) if x == v.QUERY]
            assert len(queries) == n_queries and s["answer"] == p["answer"] and ids[-1] == s["answer"][0]
            spans = []
            for q in queries:   # the solver reads the first query, so hide the earlier ones
                hops = ids[q + 2] - N_SPECIAL
                steps = [solve_multi_hop(ids[:queries[0]] + ids[q:q + 3] + [v.ANSWER], hops=h) for h in
                         range(1, hops + 1)]
                assert ids[q + 4:q + 4 + hops] == [node for (node,) in steps]   # the path, node by node
                spans += [(i, ids[i]) for i in range(q + 4, q + 4 + hops)]
            assert labeled_spans(s) == spans   # every shown node is labeled, nothing else
    with pytest.raises(ValueError, match="show_path must be True or False"):
        MultiHop(show_path="yes")


# ---------------------------------------------------------------------------- an independent solver for bAbI

PEOPLE = r"(Mary|John|Daniel|Sandra|Fred|Bill|Jeff|Julie)"
PARSERS = [
    ("move", re.compile(PEOPLE + r" (?:went|journeyed|travelled|moved|went back) to the (\w+)\.$")),
    ("grab", re.compile(PEOPLE + r" (?:picked up|got|grabbed|took) the (\w+)(?: there)?\.$")),
    ("drop", re.compile(PEOPLE + r" (?:dropped|put down|discarded|left) the (\w+)\.$")),
    ("give", re.compile(PEOPLE + r" (?:gave|handed|passed) the (\w+) to " + PEOPLE + r"\.$")),
    ("rel", re.compile(r"The (\w+) is (north|south|east|west) of the (\w+)\.$")),
]
FACT = re.compile(r"\b(?:The \w+ is \w+ of the \w+\.|" + PEOPLE + r" [a-z ]+? the \w+(?: to \w+| there)?\.)")
FLIP = {"north": "south", "south": "north", "east": "west", "west": "east"}


def read_story(sentences):
    """Replays the sentences in order; returns the facts the solver could parse, in order."""
    state = {"where": {}, "holder": {}, "timeline": {}, "gifts": [], "map": {}}
    parsed = []
    for sentence in sentences:
        for kind, regex in PARSERS:
            m = regex.match(sentence.strip())
            if m:
                break
        else:
            continue
        parsed.append(sentence.strip())
        g = m.groups()
        if kind == "move":
            state["where"][g[0]] = g[1]
            for o, h in state["holder"].items():
                if h == g[0]:
                    state["timeline"][o].append(g[1])
        elif kind == "grab":
            state["holder"][g[1]] = g[0]
            state["timeline"].setdefault(g[1], []).append(state["where"][g[0]])
        elif kind == "drop":
            assert state["holder"].pop(g[1]) == g[0]
        elif kind == "give":
            assert state["holder"][g[1]] == g[0] and state["where"][g[0]] == state["where"][g[2]]
            state["holder"][g[1]] = g[2]
            state["gifts"].append(g)
        else:
            a, d, b = g
            state["map"][(d, b)] = a
            state["map"][(FLIP[d], a)] = b
    return state, parsed


def answer_question(state, q):
    if m := re.fullmatch(r"Where is the (\w+)\?", q):
        return state["timeline"][m[1]][-1]
    if m := re.fullmatch(r"Where is (\w+)\?", q):
        return state["where"][m[1]]
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", q):
        line = state["timeline"][m[1]]
        assert line[-1] == m[2]
        i = len(line) - 1
        while line[i] == m[2]:
            i -= 1
        return line[i]
    if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", q):
        return state["map"][(m[1], m[2])]
    if m := re.fullmatch(r"What is the (\w+) (\w+) of\?", q):
        return state["map"][(FLIP[m[2]], m[1])]
    gifts = state["gifts"][::-1]   # the latest gift first
    if m := re.fullmatch(r"Who gave the (\w+) to (\w+)\?", q):
        return next(g for g, o, r in gifts if (o, r) == (m[1], m[2]))
    if m := re.fullmatch(r"What did (\w+) give to (\w+)\?", q):
        return next(o for g, o, r in gifts if (g, r) == (m[1], m[2]))
    if m := re.fullmatch(r"Who did (\w+) give the (\w+) to\?", q):
        return next(r for g, o, r in gifts if (g, o) == (m[1], m[2]))
    if m := re.fullmatch(r"Who received the (\w+)\?", q):
        return next(r for g, o, r in gifts if o == m[1])
    raise AssertionError(f"unparsed question {q!r}")


@pytest.mark.parametrize("task", BABI_TASKS)
def test_babi_answers_by_replaying_the_story(task):
    gen = BabiTask(task, n_facts=3 if task == "qa4" else 10, n_people=3, n_locations=5)
    questions = set()
    for s in gen.generate(60, seed=4):
        sentences = re.split(r"(?<=\.) ", s["context"])
        state, parsed = read_story(sentences)
        assert parsed == s["facts"] == sentences, "every sentence is a fact of a known form"
        assert len(s["facts"]) == gen.num_facts
        assert re.fullmatch(r"\w+", s["answer"])
        assert answer_question(state, s["question"]) == s["answer"]
        questions.add(s["question"].split()[0] + " " + s["question"].split()[1])
    if task == "qa5":
        assert len(questions) >= 3   # several question forms are drawn


@pytest.mark.parametrize("task", BABI_TASKS)
def test_babi_several_questions_all_answered_by_replaying_the_story(task):
    one = BabiTask(task, n_facts=3 if task == "qa4" else 10, n_people=3, n_locations=5)
    gen = one.with_difficulty(n_questions=3)
    first, = one.generate(1, seed=2)
    samples = gen.generate(40, seed=2)
    if task in ("qa1", "qa4"):   # stories that always allow 3 questions: the first draw is kept as it is
        assert {k: samples[0][k] for k in first if k not in ("questions", "answers")} == \
            {k: v for k, v in first.items() if k not in ("questions", "answers")}, "same story and final question"
    for s in samples:
        state, _ = read_story(re.split(r"(?<=\.) ", s["context"]))
        assert len(s["questions"]) == len(set(s["questions"])) == len(s["answers"]) == 3
        assert (s["questions"][-1], s["answers"][-1]) == (s["question"], s["answer"])
        assert [answer_question(state, q) for q in s["questions"]] == s["answers"]
    assert first["questions"] == [first["question"]] and first["answers"] == [first["answer"]]


def test_babi_distinct_people_every_fact_about_another_person():
    gen = BabiTask("qa1", n_facts=4, n_people=4, distinct_people=True, n_questions=2)
    for s in gen.generate(40, seed=3):
        state, parsed = read_story(re.split(r"(?<=\.) ", s["context"]))
        subjects = [fact.split()[0] for fact in parsed]
        assert len(set(subjects)) == len(subjects) == 4
        assert [answer_question(state, q) for q in s["questions"]] == s["answers"]
    plain = BabiTask("qa1", n_facts=4, n_people=4).generate(40, seed=3)   # without it, people move twice
    assert any(len({f.split()[0] for f in s["facts"]}) < 4 for s in plain)
    for bad in (dict(n_facts=5, n_people=4), dict(task="qa2", n_facts=2)):
        with pytest.raises(ValueError, match="distinct_people .*n_facts <= n_people"):
            BabiTask(**{"task": "qa1", **bad, "distinct_people": True})


def test_tokenize_sample_labels_every_answer_of_several_questions(gpt2_tok):
    sample = BabiTask("qa1", n_questions=3).generate(1, seed=0)[0]
    row = tokenize_sample(sample, gpt2_tok)
    labeled = [i for i, label in enumerate(row["labels"]) if label != -100]
    assert [gpt2_tok.decode([row["input_ids"][i]]) for i in labeled] == [" " + a for a in sample["answers"]]
    assert all(row["labels"][i] == row["input_ids"][i] for i in labeled)
    assert labeled[-1] == row["answer_start"] == len(row["input_ids"]) - 1 and row["answer"] == sample["answer"]
    text = "".join(f"\nQuestion: {q}\nAnswer: {a}" for q, a in zip(sample["questions"], sample["answers"]))
    assert gpt2_tok.decode(row["input_ids"]) == sample["context"] + text
    short = tokenize_sample(sample, gpt2_tok, max_length=20)   # the cut start takes the first answer with it
    assert len(short["input_ids"]) == 20 and short["input_ids"] == row["input_ids"][-20:]
    assert short["labels"] == row["labels"][-20:]


@pytest.mark.parametrize("make", [
    lambda: MemoryRetrieval(context_length=30, n_pairs=3),
    lambda: PatternReasoning("fibonacci"),
    lambda: MultiHop(n_hops=2, chain_length=4),
    lambda: BabiTask("qa5"),
])
def test_same_seed_same_samples(make):
    a, b, c = make().generate(5, seed=7), make().generate(5, seed=7), make().generate(5, seed=8)
    assert a == b and a != c
    state = random.getstate()
    make().generate(2, seed=1)
    assert random.getstate() == state, "no global RNG"


def test_with_difficulty_changes_knobs_and_validates():
    task = MultiHop(n_hops=2)
    harder = task.with_difficulty(n_hops=3, chain_length=5)
    assert (harder.n_hops, harder.length, task.n_hops) == (3, 5, 2)
    with pytest.raises(ValueError, match="no knob"):
        task.with_difficulty(depth=3)
    with pytest.raises(ValueError, match="more than chain_length"):
        task.with_difficulty(chain_length=1)


def test_babilong_with_difficulty_sets_the_story_knobs_too(gpt2_tok):
    base = BabiLong(BabiTask("qa1"), target_length=200, tokenizer=gpt2_tok)
    easier = base.with_difficulty(target_length=64, n_facts=2, n_questions=2)
    assert (easier.target_length, easier.babi.n_facts, easier.babi.n_questions) == (64, 2, 2)
    assert (base.target_length, base.babi.num_facts, easier.tokenizer) == (200, 8, gpt2_tok)
    sample = easier.generate(1, seed=0)[0]
    assert len(sample["facts"]) == 2 and len(sample["questions"]) == 2
    with pytest.raises(ValueError, match=r"no knob \['n_fact'\].*the story's: \['task', 'n_facts'"):
        base.with_difficulty(n_fact=2)
    with pytest.raises(ValueError, match="n_questions must be <= n_people"):
        base.with_difficulty(n_questions=9)


@pytest.mark.parametrize("make,error,match", [
    (lambda: MemoryRetrieval(context_length=8, n_pairs=3), ValueError, r"n_pairs=3 .*allowed: n_pairs <= 2"),
    (lambda: MemoryRetrieval(context_length=64, n_pairs=5, n_symbols=2), ValueError, "distinct keys"),
    (lambda: MemoryRetrieval(context_length=0), ValueError, "context_length must be an integer >= 1"),
    (lambda: PatternReasoning("quadratic"), ValueError, "Unknown rule 'quadratic'; allowed: arithmetic"),
    (lambda: PatternReasoning("geometric", modulus=32), ValueError, "prime modulus"),
    (lambda: PatternReasoning("custom"), ValueError, "exactly one of coefficients"),
    (lambda: PatternReasoning("custom", coefficients=()), ValueError, "non-empty"),
    (lambda: PatternReasoning("custom", rule_fn=3), ValueError, "callable"),
    (lambda: PatternReasoning("arithmetic", coefficients=(1,)), ValueError, "only used with rule='custom'"),
    (lambda: PatternReasoning("fibonacci", n_shown=2), ValueError, "n_shown >= 3"),
    (lambda: PatternReasoning(modulus=31, n_symbols=10), ValueError, "n_symbols must be"),
    (lambda: MultiHop(n_hops=4, chain_length=3), ValueError, "n_hops=4 is more than chain_length=3"),
    (lambda: MultiHop(n_distractors=70), ValueError, "distinct nodes"),
    (lambda: BabiTask("qa7"), ValueError, "Unknown bAbI task 'qa7'; allowed: qa1"),
    (lambda: BabiTask("qa5", n_people=1), ValueError, "giver"),
    (lambda: BabiTask("qa3", n_facts=2), ValueError, "n_facts >= 3"),
    (lambda: BabiTask("qa4", n_facts=6), ValueError, "n_locations - 1"),
    (lambda: BabiTask(n_people=9), ValueError, "only 8"),
    (lambda: BabiTask(n_questions=0), ValueError, "n_questions must be an integer >= 1"),
    (lambda: BabiTask(n_questions=5), ValueError, "n_questions must be <= n_people = 4"),
    (lambda: BabiTask("qa3", n_facts=3, n_questions=4).generate(1), RuntimeError, "lower n_questions"),
    (lambda: BabiLong(background_path="/no/such/file.txt"), FileNotFoundError, "background_path"),
    (lambda: BabiLong(babi="qa1"), ValueError, "BabiTask"),
    (lambda: MultiHop().generate(-1), ValueError, "non-negative"),
    (lambda: load_babilong_hf("qa21"), ValueError, "qa1 .. qa20"),
    (lambda: DynamicTaskWeights([]), ValueError, "non-empty"),
    (lambda: DynamicTaskWeights(["a"], momentum=1.0), ValueError, "momentum"),
    (lambda: DynamicTaskWeights(["a"]).update("b", 1.0), ValueError, "Unknown task 'b'"),
    (lambda: DynamicTaskWeights(["a"]).update("a", -1.0), ValueError, ">= 0"),
    (lambda: exact_match(["a"], ["a", "b"]), ValueError, "as many"),
    (lambda: TaskCollator(gpt2_tokenizer(padding_side="left")), ValueError, "right"),
])
def test_bad_inputs_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ------------------------------------------------------------------------------------------------ BABILong

def check_babilong(sample, target, tokenizer):
    context = sample["context"]
    assert sample["n_tokens"] == len(tokenizer(context, verbose=False)["input_ids"])
    assert abs(sample["n_tokens"] - target) <= max(3, target // 200)
    at = -1
    for fact in sample["facts"]:   # the facts, in order
        at = context.index(fact, at + 1)
    state, parsed = read_story([m.group(0) for m in FACT.finditer(context)])
    assert parsed == sample["facts"]
    assert answer_question(state, sample["question"]) == sample["answer"]


@needs_shakespeare
@pytest.mark.parametrize("task,target", [("qa1", 1024), ("qa2", 4096), ("qa3", 16384)])
def test_babilong_reaches_target_length_with_facts_in_order(task, target, gpt2_tok):
    gen = BabiLong(BabiTask(task), target_length=target, tokenizer=gpt2_tok)
    n = 1 if target > 4096 else 3
    samples = gen.generate(n, seed=5)
    assert samples == gen.generate(n, seed=5)
    for s in samples:
        check_babilong(s, target, gpt2_tok)
        assert len(s["context"]) > 2 * len(" ".join(s["facts"]))


def test_babilong_any_file_and_short_target(tmp_path, gpt2_tok):
    path = tmp_path / "bg.txt"
    path.write_text("The sea was calm that night. Ships sailed on; gulls cried!\nNobody knew why.\n")
    gen = BabiLong(BabiTask("qa4"), target_length=300, background_path=str(path), tokenizer=gpt2_tok)
    for s in gen.generate(3, seed=0):
        check_babilong(s, 300, gpt2_tok)
        assert "Ships sailed on;" in s["context"]
    with pytest.raises(ValueError, match="smaller than the facts' length"):
        gen.with_difficulty(target_length=10).generate(1)


def test_load_babilong_hf_maps_fields(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return Dataset.from_dict({"input": ["Mary went to the kitchen. Blah.", "John got the milk."],
                                  "question": ["Where is Mary?", "Where is John?"],
                                  "target": ["kitchen", "hallway"]})

    monkeypatch.setattr(tasks.babilong, "load_dataset", fake_load_dataset)
    ds = load_babilong_hf("qa2", "4k", n=1)
    assert calls == [("RMT-team/babilong", "4k", "qa2")]
    assert len(ds) == 1 and ds[0] == {"context": "Mary went to the kitchen. Blah.", "question": "Where is Mary?",
                                      "answer": "kitchen"}
    assert exact_match([" Kitchen "], [ds[0]["answer"]]) == 1.0


def test_load_babilong_hf_offline_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'RMT-team/babilong' on the Hub")

    monkeypatch.setattr(tasks.babilong, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="needs internet access or a local datasets cache"):
        load_babilong_hf("qa1", "1k")


# ------------------------------------------------------------------------------- tokenization, data, metrics

def test_tokenize_sample_labels_only_the_answer(gpt2_tok):
    sample = BabiTask("qa1").generate(1, seed=0)[0]
    row = tokenize_sample(sample, gpt2_tok)
    check_labels(row)
    assert gpt2_tok.decode(row["input_ids"][row["answer_start"]:]) == " " + sample["answer"]
    assert gpt2_tok.decode(row["input_ids"][:row["answer_start"]]).endswith(f"Question: {sample['question']}\nAnswer:")
    short = tokenize_sample(sample, gpt2_tok, max_length=20)
    n_answer = len(row["input_ids"]) - row["answer_start"]
    assert len(short["input_ids"]) == 20 and short["input_ids"][-n_answer:] == row["input_ids"][-n_answer:]
    check_labels(short)
    with pytest.raises(ValueError, match="cannot hold the question"):
        tokenize_sample(sample, gpt2_tok, max_length=5)


def test_build_dataset_and_collator_on_synthetic_tasks():
    a = build_dataset(MultiHop(n_hops=2, n_distractors=2, n_symbols=32), 3, seed=0)
    b = build_dataset(MemoryRetrieval(context_length=12, n_pairs=2, n_symbols=32), 3, seed=0)
    assert set(a.column_names) == {"input_ids", "labels", "answer", "answer_start"}
    vocab = TaskVocab(32)
    tok = vocab.tokenizer()
    assert tok.convert_tokens_to_ids(["<pad>", "<answer>", "0", "31"]) == [0, vocab.ANSWER, vocab.symbol(0), 38]
    assert tok.decode(a[0]["input_ids"]) == vocab.decode(a[0]["input_ids"])
    rows = [a[0], b[0], a[1]]
    batch = TaskCollator(tok)(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert lengths[0] != lengths[1]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"] and (batch["input_ids"][i, n:] == 0).all()
        assert batch["labels"][i, :n].tolist() == r["labels"] and (batch["labels"][i, n:] == -100).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    assert torch.isfinite(model(**batch).loss)


def test_build_dataset_on_text_tasks(gpt2_tok):
    ds = build_dataset(BabiTask("qa2"), 4, seed=1, tokenizer=gpt2_tok)
    assert {"input_ids", "labels", "answer", "answer_start", "question"} <= set(ds.column_names)
    batch = TaskCollator(gpt2_tok, pad_to_multiple_of=8)(list(ds))
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"] != -100).sum(1).tolist() == [len(r["labels"]) - r["answer_start"] for r in ds]


def test_exact_match_and_answer_accuracy():
    assert exact_match([" Kitchen", "garden "], ["kitchen", "hallway"]) == 0.5
    assert exact_match([[7, 8], torch.tensor([9])], [[7, 8], [9]]) == 1.0
    assert exact_match([[7, 8]], [[7]]) == 0.0
    rows = MultiHop(n_symbols=16, n_distractors=2).generate(2, seed=0)
    ids = torch.tensor([r["input_ids"] for r in rows])
    labels = torch.tensor([r["labels"] for r in rows])
    perfect = torch.zeros(*ids.shape, 23)
    perfect[:, :-1].scatter_(-1, ids[:, 1:, None], 1.0)   # position t predicts token t + 1
    assert answer_accuracy(perfect, labels) == 1.0
    wrong = perfect.clone()
    wrong[1, rows[1]["answer_start"] - 1] = 0
    assert answer_accuracy(wrong, labels) == 0.5
    assert answer_accuracy(wrong.argmax(-1).numpy(), labels.numpy()) == 0.5


def test_dynamic_task_weights():
    w = DynamicTaskWeights(["retrieval", "babi"], momentum=0.5)
    assert w.weights() == {"retrieval": 0.5, "babi": 0.5}
    w.update("retrieval", 3.0)
    assert w.weights() == {"retrieval": 0.5, "babi": 0.5}   # unseen tasks count as the mean
    w.update("babi", torch.tensor(1.0))
    assert w.weights() == pytest.approx({"retrieval": 0.75, "babi": 0.25})
    w.update("retrieval", 1.0)   # EMA: 0.5 * 3 + 0.5 * 1 = 2
    assert w.ema["retrieval"] == pytest.approx(2.0)
    assert sum(w.weights().values()) == pytest.approx(1.0)

    losses = {"retrieval": torch.tensor(2.0, requires_grad=True), "babi": torch.tensor(1.0, requires_grad=True)}
    total = w.combine(losses)   # updates first: emas 2.0 and 1.0 -> weights 2/3, 1/3
    assert total.item() == pytest.approx(2 / 3 * 2.0 + 1 / 3 * 1.0)
    total.backward()
    assert losses["retrieval"].grad.item() == pytest.approx(2 / 3)
    assert losses["babi"].grad.item() == pytest.approx(1 / 3)
    only = w.combine({"babi": torch.tensor(4.0)}, update=False)   # renormalized over the tasks given
    assert only.item() == pytest.approx(4.0)


def test_task_curriculum_makes_the_stream_harder_inside_curriculum_trainer(tmp_path):
    """A UnifiedARMT trained by CurriculumTrainer on a TaskStream: each stage swaps in a harder task, later batches
    and the eval set come from it, and the history records the difficulty of every stage."""
    from transformers import TrainingArguments

    from armada import UnifiedARMTConfig, UnifiedARMTForCausalLM
    from armada.tasks import TaskStream, task_curriculum
    from armada.trainers import CurriculumTrainer

    base = MultiHop(n_hops=1, chain_length=3, n_distractors=2, n_symbols=16)
    stream = TaskStream(base, seed=0)
    curriculum = task_curriculum(stream, [{"n_hops": 1}, {"n_hops": 2}, {"n_hops": 3}], steps_per_stage=[1, 3, 2],
                                 eval_samples=8)
    config = UnifiedARMTConfig(vocab_size=base.vocab.vocab_size, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, segment_size=8, num_memory_tokens=2, d_mem=8)
    seen = []

    class Spy(TaskCollator):
        def __call__(self, features):
            seen.append(stream.task.n_hops)
            return super().__call__(features)

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no")
    trainer = CurriculumTrainer(model=UnifiedARMTForCausalLM(config), args=args, train_dataset=stream,
                                data_collator=Spy(base.vocab.tokenizer()), curriculum=curriculum)
    trainer.train()
    assert [h["params"]["n_hops"] for h in trainer.curriculum_history] == [1, 2, 3]
    assert [h["end_step"] for h in trainer.curriculum_history] == [1, 4, 6]   # per-stage steps 1, 3, 2
    assert stream.task.n_hops == 3 and set(seen) >= {2, 3}
    assert "eval_loss" in trainer.evaluate()  # the eval set of the last stage
    with pytest.raises(ValueError, match="n_hops"):
        task_curriculum(stream, [{"n_hops": 5}])  # longer than the chain: rejected before training
    with pytest.raises(ValueError, match="one steps_per_stage per stage"):
        task_curriculum(stream, [{"n_hops": 1}, {"n_hops": 2}], steps_per_stage=[5])
    # a mastery curriculum: a threshold (and a step cap) for the first stage, none for the last
    mastery = task_curriculum(stream, [{"n_hops": 1}, {"n_hops": 2}], steps_per_stage=[100, None],
                              metric="eval_accuracy", thresholds=[0.9, None])
    assert [(s.metric, s.threshold, s.max_steps) for s in mastery] == [("eval_accuracy", 0.9, 100), (None, None, None)]
    assert mastery[0].reached({"eval_accuracy": 0.95}) and not mastery[1].reached({"eval_accuracy": 1.0})


def test_babilong_without_its_default_text_says_what_to_pass(monkeypatch, tmp_path):
    """In an installed armada there is no ../shared/data beside the package: the default background is named as
    missing and the error says what to pass instead (not a path inside the virtualenv)."""
    from armada.tasks import babilong

    monkeypatch.setattr(babilong, "DEFAULT_BACKGROUND", str(tmp_path / "shared" / "input.txt"))
    with pytest.raises(FileNotFoundError, match="default background text .* pass background_path= any long text"):
        BabiLong()
