"""A bAbI world (qa1-qa5): people move, pick up and hand over objects; the question asks where or what."""

from dataclasses import dataclass
from typing import Optional

from .base import _check_ints, _Task

BABI_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
PEOPLE = ("Mary", "John", "Daniel", "Sandra", "Fred", "Bill", "Jeff", "Julie")
LOCATIONS = ("kitchen", "bedroom", "garden", "hallway", "bathroom", "office", "cinema", "park")
OBJECTS = ("football", "apple", "milk", "cake", "box", "book")
MOVE_VERBS = ("went to", "journeyed to", "travelled to", "moved to", "went back to")
GRAB_VERBS = ("picked up", "got", "grabbed", "took")
DROP_VERBS = ("dropped", "put down", "discarded", "left")
GIVE_VERBS = ("gave", "handed", "passed")
DIRECTIONS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
_ACTION_WEIGHTS = {"qa1": {"move": 1.0}, "qa2": {"move": 1.0, "grab": 1.0, "drop": 0.5},
                   "qa3": {"move": 1.0, "grab": 1.0, "drop": 0.5},
                   "qa5": {"move": 1.0, "grab": 1.0, "drop": 0.3, "give": 2.0}}
_MIN_FACTS = {"qa1": 1, "qa2": 2, "qa3": 3, "qa4": 1, "qa5": 4}


@dataclass
class BabiTask(_Task):
    """bAbI-style stories (qa1-qa5) from a small world simulation; answers are single words.

    qa1 "Where is Mary?"; qa2 "Where is the football?" (carried by someone who moves); qa3 "Where was the football
    before the kitchen?" (the kitchen is where it is now; the answer is where it was before it last came there);
    qa4 "What is north of the bedroom?" / "What is the kitchen north of?" (a map on a grid); qa5 "Who gave the cake
    to Fred?" / "What did Mary give to Fred?" / "Who did Mary give the cake to?" / "Who received the cake?" (the
    latest matching gift). People must move before they act; `n_facts` is the number of story sentences.
    Sample: `{"context", "question", "answer", "facts": list of sentences, "task", "questions", "answers"}`.

    `n_questions` > 1 asks that many distinct questions about the same story (denser training signal, like bAbI's
    questions every few facts): `questions`/`answers` list them; the last one is `question`/`answer`, drawn as with
    one question (the extra ones are drawn after it, so only a stream's first sample stays the same for a seed);
    `tokenize_sample` labels every answer.

    `distinct_people` (qa1, n_facts <= n_people): every fact is about another person, so the latest fact's place is the
    answer only when its person is asked: a curriculum stage that makes "answer the most recent place" stop paying off
    and the person -> place binding learnable (see the README's BABILong notes).
    """

    task: str = "qa1"
    n_facts: Optional[int] = None   # default: 2 for qa4, 8 otherwise
    n_people: int = 4
    n_locations: int = 6
    n_objects: int = 3
    n_questions: int = 1
    distinct_people: bool = False
    max_tries: int = 1000
    is_text = True

    def __post_init__(self):
        if self.task not in BABI_TASKS:
            raise ValueError(f"Unknown bAbI task {self.task!r}; allowed: {', '.join(BABI_TASKS)}.")
        _check_ints(self, 1, "n_people", "n_objects", "n_questions", "max_tries")
        if self.distinct_people not in (True, False):
            raise ValueError(f"distinct_people must be True or False, got {self.distinct_people!r}.")
        if self.distinct_people and (self.task != "qa1" or self.num_facts > self.n_people):
            raise ValueError(f"distinct_people (every fact about another person) is for qa1 with n_facts <= n_people; "
                             f"got task={self.task}, n_facts={self.num_facts}, n_people={self.n_people}.")
        if self.task == "qa1" and self.n_questions > self.n_people:
            raise ValueError(f"qa1 asks about distinct people: n_questions must be <= n_people = {self.n_people}, "
                             f"got {self.n_questions}.")
        if self.n_facts is not None:
            _check_ints(self, 1, "n_facts")
        _check_ints(self, 2, "n_locations")
        for name, pool in (("n_people", PEOPLE), ("n_locations", LOCATIONS), ("n_objects", OBJECTS)):
            if getattr(self, name) > len(pool):
                raise ValueError(f"{name}={getattr(self, name)} but only {len(pool)} are defined: {', '.join(pool)}.")
        if self.task == "qa5" and self.n_people < 2:
            raise ValueError("qa5 needs n_people >= 2 (a giver and a receiver).")
        if self.num_facts < _MIN_FACTS[self.task]:
            raise ValueError(f"{self.task} needs n_facts >= {_MIN_FACTS[self.task]}, got {self.n_facts}.")
        if self.task == "qa4" and self.num_facts > self.n_locations - 1:
            raise ValueError(f"qa4 relates distinct locations: n_facts must be <= n_locations - 1 = "
                             f"{self.n_locations - 1}, got {self.n_facts}.")

    @property
    def num_facts(self) -> int:
        return self.n_facts or (2 if self.task == "qa4" else 8)

    def sample(self, rng):
        for _ in range(self.max_tries):
            story = self._map(rng) if self.task == "qa4" else self._world(rng)
            if story is None:
                continue
            facts, question, answer, candidates = story
            others = [qa for qa in dict(candidates).items() if qa[0] != question]   # distinct questions
            if len(others) < self.n_questions - 1:
                continue
            asked = rng.sample(others, self.n_questions - 1) + [(question, answer)] if self.n_questions > 1 else \
                [(question, answer)]
            return {"context": " ".join(facts), "question": question, "answer": answer, "facts": facts,
                    "task": self.task, "questions": [q for q, _ in asked], "answers": [a for _, a in asked]}
        raise RuntimeError(f"No answerable {self.task} story with {self.n_questions} distinct question(s) in "
                           f"{self.max_tries} tries; raise n_facts or lower n_questions.")

    def _world(self, rng):
        people, locations = PEOPLE[:self.n_people], LOCATIONS[:self.n_locations]
        objects = OBJECTS[:self.n_objects]
        where, holder, place, history, gifts, facts = {}, {}, {}, {o: [] for o in objects}, [], []

        def put(o, loc):
            place[o] = loc
            if not history[o] or history[o][-1] != loc:
                history[o].append(loc)

        for _ in range(self.num_facts):
            options = {
                "move": [(p, loc) for p in people for loc in locations
                         if where.get(p) != loc and not (self.distinct_people and p in where)],
                "grab": [(p, o) for p in where for o in objects
                         if o not in holder and place.get(o, where[p]) == where[p]],   # unseen objects: anywhere
                "drop": [(p, o) for o, p in holder.items()],
                "give": [(p, o, q) for o, p in holder.items() for q in where if q != p and where[q] == where[p]],
            }
            kinds = [k for k in _ACTION_WEIGHTS[self.task] if options[k]]
            kind = rng.choices(kinds, weights=[_ACTION_WEIGHTS[self.task][k] for k in kinds])[0]
            action = rng.choice(options[kind])
            if kind == "move":
                p, loc = action
                where[p] = loc
                for o in [o for o, h in holder.items() if h == p]:
                    put(o, loc)
                facts.append(f"{p} {rng.choice(MOVE_VERBS)} the {loc}.")
            elif kind == "grab":
                p, o = action
                holder[o] = p
                put(o, where[p])
                facts.append(f"{p} {rng.choice(GRAB_VERBS)} the {o}{rng.choice(('', ' there'))}.")
            elif kind == "drop":
                p, o = action
                del holder[o]
                facts.append(f"{p} {rng.choice(DROP_VERBS)} the {o}.")
            else:
                p, o, q = action
                holder[o] = q
                gifts.append(action)
                facts.append(f"{p} {rng.choice(GIVE_VERBS)} the {o} to {q}.")

        # (question, answer) for one draw, plus every question the story answers (for n_questions > 1)
        if self.task == "qa1":
            every = [(f"Where is {p}?", where[p]) for p in sorted(where)]
            return (facts, *rng.choice(every), every)
        if self.task == "qa2":
            every = [(f"Where is the {o}?", place[o]) for o in sorted(place)]
            return (facts, *rng.choice(every), every) if every else None
        if self.task == "qa3":
            every = [(f"Where was the {o} before the {history[o][-1]}?", history[o][-2])
                     for o in sorted(objects) if len(history[o]) >= 2]
            return (facts, *rng.choice(every), every) if every else None
        if not gifts:
            return None

        def latest(match):
            return [g for g in gifts if match(g)][-1]

        def ask(p, o, q, form):
            if form == 0:
                return f"Who gave the {o} to {q}?", latest(lambda g: g[1:] == (o, q))[0]
            if form == 1:
                return f"What did {p} give to {q}?", latest(lambda g: (g[0], g[2]) == (p, q))[1]
            if form == 2:
                return f"Who did {p} give the {o} to?", latest(lambda g: g[:2] == (p, o))[2]
            return f"Who received the {o}?", latest(lambda g: g[1] == o)[2]

        p, o, q = rng.choice(gifts)
        return (facts, *ask(p, o, q, rng.randrange(4)), [ask(*g, form) for g in gifts for form in range(4)])

    def _map(self, rng):
        names = rng.sample(LOCATIONS[:self.n_locations], self.num_facts + 1)
        cell = {names[0]: (0, 0)}
        relations = []   # (a, direction, b): "The a is direction of the b."
        for new in names[1:]:
            taken = set(cell.values())
            options = [(old, d) for old in cell for d, (dx, dy) in DIRECTIONS.items()
                       if (cell[old][0] + dx, cell[old][1] + dy) not in taken]
            old, d = rng.choice(options)
            cell[new] = (cell[old][0] + DIRECTIONS[d][0], cell[old][1] + DIRECTIONS[d][1])
            relations.append((new, d, old) if rng.random() < 0.5 else (old, OPPOSITE[d], new))
        rng.shuffle(relations)
        facts = [f"The {a} is {d} of the {b}." for a, d, b in relations]
        every = [qa for a, d, b in relations
                 for qa in ((f"What is {d} of the {b}?", a), (f"What is the {a} {d} of?", b))]
        a, d, b = rng.choice(relations)
        if rng.random() < 0.5:
            return facts, f"What is {d} of the {b}?", a, every
        return facts, f"What is the {a} {d} of?", b, every
