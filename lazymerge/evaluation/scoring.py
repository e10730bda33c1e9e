"""Pair and candidate files, accuracy, RewardBench sections and GSM8K grading (no models here)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.errors import InputError

#: RewardBench subsets of each section (DogeRM reports Reasoning from math-prm and hep-*).
SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
}
CODE_SUBSETS = ["hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"]
AUTOJ_GROUPS = {
    "math_reasoning": "Math",
    "solving_exam_question_with_math": "Math",
    "code_simplification": "Code",
    "code_generation": "Code",
    "explaining_code": "Code",
    "code_to_code_translation": "Code",
    "code_correction_rewriting": "Code",
}


@dataclass(frozen=True)
class Pair:
    id: str
    subset: str
    prompt: str
    chosen: str
    rejected: str


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{number}: not a JSON object ({exc})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number}: not a JSON object")
        rows.append(row)
    return rows


def load_pairs(path: str | Path) -> tuple[list[Pair], int]:
    """Read a pair file; returns (pairs, Auto-J ties dropped).

    Formats (JSON Lines, detected per line):
    - RewardBench: prompt, chosen, rejected, optional subset and id;
    - Auto-J pairwise: scenario, label (0: response 1 better, 1: response 2 better, 2: tie),
      prompt, "response 1", "response 2"; ties are dropped and scenarios grouped into
      Math / Code / Other as DogeRM does.
    """
    path = Path(path)
    pairs, ties = [], 0
    for number, row in enumerate(_read_jsonl(path), start=1):
        if {"prompt", "chosen", "rejected"} <= row.keys():
            pairs.append(
                Pair(
                    str(row.get("id", number)),
                    str(row.get("subset", "all")),
                    str(row["prompt"]),
                    str(row["chosen"]),
                    str(row["rejected"]),
                )
            )
        elif {"scenario", "label", "prompt", "response 1", "response 2"} <= row.keys():
            label = int(row["label"])
            if label == 2:
                ties += 1
                continue
            if label not in (0, 1):
                raise InputError(f"{path}:{number}: Auto-J label {label!r} is not 0, 1 or 2")
            better, worse = (
                (row["response 1"], row["response 2"])
                if label == 0
                else (row["response 2"], row["response 1"])
            )
            group = AUTOJ_GROUPS.get(str(row["scenario"]), "Other")
            pairs.append(Pair(str(row.get("id", number)), group, str(row["prompt"]), str(better), str(worse)))
        else:
            raise InputError(
                f"{path}:{number}: expected prompt/chosen/rejected (RewardBench) or scenario/label/prompt/"
                "response 1/response 2 (Auto-J) fields"
            )
    return pairs, ties


def pair_results(
    pairs: Sequence[Pair], chosen: Sequence[float], rejected: Sequence[float], autoj_ties: int = 0
) -> dict[str, Any]:
    """Accuracy overall and per subset; a pair is right only when chosen > rejected (ties wrong)."""
    per_subset: dict[str, list[int]] = {}
    entries = []
    correct = ties = 0
    for pair, c, r in zip(pairs, chosen, rejected, strict=True):
        right, tie = c > r, c == r
        correct += right
        ties += tie
        stats = per_subset.setdefault(pair.subset, [0, 0, 0])
        stats[0] += right
        stats[1] += 1
        stats[2] += tie
        entries.append({"id": pair.id, "subset": pair.subset, "chosen_reward": c, "rejected_reward": r})
    result: dict[str, Any] = {
        "accuracy": correct / len(pairs) if pairs else 0.0,
        "n_pairs": len(pairs),
        "n_ties": ties,
        "subsets": {
            name: {"accuracy": s[0] / s[1], "n": s[1], "ties": s[2]} for name, s in sorted(per_subset.items())
        },
        "pairs": entries,
    }
    if autoj_ties:
        result["autoj_ties_dropped"] = autoj_ties
    sections = rewardbench_sections(result["subsets"])
    if sections:
        result["sections"] = sections
    return result


def rewardbench_sections(subsets: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """Chat, Chat Hard, Safety (count-weighted over their subsets) and Reasoning
    (0.5 x math-prm + 0.5 x mean of the hep-* subsets), plus their mean, for the sections present."""
    sections: dict[str, float] = {}
    for section, names in SECTIONS.items():
        present = [subsets[n] for n in names if n in subsets]
        if present:
            sections[section] = sum(s["accuracy"] * s["n"] for s in present) / sum(s["n"] for s in present)
    code = [subsets[n]["accuracy"] for n in CODE_SUBSETS if n in subsets]
    if "math-prm" in subsets and code:
        sections["Reasoning"] = 0.5 * subsets["math-prm"]["accuracy"] + 0.5 * sum(code) / len(code)
    if not sections:
        return None
    sections["mean"] = sum(sections.values()) / len(sections)
    return sections


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(text: str) -> float | None:
    """GSM8K grading: the first number after "The answer is", else the last number; commas dropped."""
    marker = text.find("The answer is")
    if marker >= 0:
        found = _NUMBER.search(text, marker)
        if found:
            return _to_number(found.group())
    numbers = _NUMBER.findall(text)
    return _to_number(numbers[-1]) if numbers else None


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


@dataclass(frozen=True)
class CandidateSet:
    id: str
    prompt: str
    candidates: list[str]
    correct: list[bool]
    answers: list[float | None]


def load_candidates(path: str | Path) -> list[CandidateSet]:
    """Read a best-of-N file: prompt, candidates, and either `correct` (list of bools) or a gold
    `answer` graded the GSM8K way."""
    path = Path(path)
    out = []
    for number, row in enumerate(_read_jsonl(path), start=1):
        if "prompt" not in row or not isinstance(row.get("candidates"), list) or not row["candidates"]:
            raise InputError(f"{path}:{number}: needs prompt and a non-empty candidates list")
        candidates = [str(c) for c in row["candidates"]]
        answers = [extract_answer(c) for c in candidates]
        if "correct" in row:
            correct = [bool(x) for x in row["correct"]]
            if len(correct) != len(candidates):
                raise InputError(
                    f"{path}:{number}: correct has {len(correct)} entries for {len(candidates)} candidates"
                )
        elif "answer" in row:
            gold = extract_answer(str(row["answer"]))
            if gold is None:
                raise InputError(f"{path}:{number}: gold answer {row['answer']!r} holds no number")
            correct = [a is not None and abs(a - gold) < 1e-6 for a in answers]
        else:
            raise InputError(f"{path}:{number}: needs a correct list or a gold answer")
        out.append(CandidateSet(str(row.get("id", number)), str(row["prompt"]), candidates, correct, answers))
    return out


def best_of_n(
    sets: Sequence[CandidateSet], rewards: Sequence[Sequence[float]], ns: Sequence[int]
) -> dict[str, Any]:
    """Per n: accuracy of the highest-reward pick among the first n candidates (ties to the
    earliest), oracle pass@n and majority vote over extracted answers (ties to the earliest)."""
    results = {}
    for n in ns:
        usable = [(s, r) for s, r in zip(sets, rewards, strict=True) if len(s.candidates) >= n]
        if not usable:
            raise InputError(f"--n {n}: no prompt has {n} candidates")
        picked = oracle = majority = 0
        for s, r in usable:
            best = max(range(n), key=lambda i: (r[i], -i))
            picked += s.correct[best]
            oracle += any(s.correct[:n])
            votes = Counter(a for a in s.answers[:n] if a is not None)
            if votes:
                top = max(votes.values())
                winner = next(a for a in s.answers[:n] if a is not None and votes[a] == top)
                majority += s.correct[s.answers.index(winner)]
        count = len(usable)
        results[str(n)] = {
            "accuracy": picked / count,
            "oracle": oracle / count,
            "majority": majority / count,
            "n_prompts": count,
        }
    return results
