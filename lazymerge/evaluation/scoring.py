"""Pair and candidate files, accuracy, RewardBench sections and GSM8K grading (no models here).

Pair and candidate files are untrusted JSON Lines: read a line at a time (at most
`MAX_LINE_BYTES` each), every row a JSON object whose fields have the documented types, checked
one by one; a malformed row or a file with nothing to score raises `PairFileError` or
`CandidateFileError` naming the file and line.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazymerge.errors import CandidateFileError, EvalDataError, InputError, PairFileError
from lazymerge.evaluation.conversations import (
    Prompt,
    conversation_pair,
    implicit_text_pair,
    is_conversational,
    is_implicit_prompt,
)
from lazymerge.evaluation.datasets import (  # noqa: F401 (read_jsonl and friends were defined here)
    MAX_LINE_BYTES,
    SURROGATE_ESCAPE,
    DataSource,
    Row,
    find_lone_surrogate,
    read_jsonl,
    read_rows,
    resolve_data,
    surrogate_message,
)
from lazymerge.evaluation.rewardbench2 import Rb2Row, check_rows, looks_like_rewardbench2, parse_row
from lazymerge.evaluation.sections import CODE_SUBSETS as CODE_SUBSETS  # re-exported
from lazymerge.evaluation.sections import SECTIONS as SECTIONS  # re-exported
from lazymerge.evaluation.sections import rewardbench_sections
from lazymerge.io.small_files import describe_json

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
    #: The text of one user message, or a multi-turn conversation's turns (`conversations.Prompt`).
    prompt: Prompt
    chosen: str
    rejected: str
    #: The row's line in its file (0 when not read from one), named when its text fails.
    line: int = field(default=0, compare=False)


def _string(row: dict[str, Any], field: str, where: str, error: type[EvalDataError]) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise error(f"{where}: field {field!r} must be a string, found {describe_json(value)}")
    return value


def _row_id(row: dict[str, Any], default: int, where: str, error: type[EvalDataError]) -> str:
    value = row.get("id", default)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise error(f"{where}: field 'id' must be a string or an integer, found {describe_json(value)}")
    return str(value)


def load_pairs(path: str | Path | DataSource) -> tuple[list[Pair], int]:
    """Read a pair file; returns (pairs, Auto-J ties dropped).

    `path` is a local file (JSON Lines, a JSON list or parquet) or a dataset id in the local
    Hugging Face cache (`datasets.resolve_data`). Formats (detected per row):
    - RewardBench (and TRL's standard explicit-prompt form): prompt, chosen, rejected (strings),
      optional subset (string) and id (string or integer);
    - TRL's implicit-prompt form: chosen and rejected strings, split at their common prefix,
      and TRL's (and the RewardBench CLI's) conversational forms, chosen/rejected as message
      lists (`conversations`);
    - Auto-J pairwise: scenario, label (the integer 0: response 1 better, 1: response 2 better,
      2: tie), prompt, "response 1", "response 2" (strings); ties are dropped and scenarios grouped
      into Math / Code / Other as DogeRM does.

    Raises:
        PairFileError naming the file and line for a malformed row, and for a file with no pair
        to score.
    """
    source = resolve_data(path)
    return _pairs_from_rows(source.given, read_rows(source, PairFileError))


def _pair_texts(row: dict[str, Any], where: str) -> tuple[Prompt, str, str] | None:
    """(prompt, chosen, rejected) of a RewardBench or TRL row, or None for another format."""
    if is_conversational(row) and {"chosen", "rejected"} <= row.keys():
        return conversation_pair(row, where)
    if {"prompt", "chosen", "rejected"} <= row.keys():
        return tuple(_string(row, f, where, PairFileError) for f in ("prompt", "chosen", "rejected"))  # type: ignore[return-value]
    if is_implicit_prompt(row):
        return implicit_text_pair(row, where)
    return None


def _pairs_from_rows(path: str, rows: list[Row]) -> tuple[list[Pair], int]:
    pairs, ties = [], 0
    for ordinal, (number, where, row) in enumerate(rows, start=1):
        if "num_correct" in row or "total_completions" in row:
            raise PairFileError(
                f"{where}: a RewardBench 2 row (chosen/rejected lists, num_correct) among RewardBench pairs; "
                "a file holds one format"
            )
        texts = _pair_texts(row, where)
        if texts is not None:
            subset = _string(row, "subset", where, PairFileError) if "subset" in row else "all"
            pairs.append(Pair(_row_id(row, ordinal, where, PairFileError), subset, *texts, number))
        elif {"scenario", "label", "prompt", "response 1", "response 2"} <= row.keys():
            label = row["label"]
            if isinstance(label, bool) or not isinstance(label, int) or label not in (0, 1, 2):
                raise PairFileError(
                    f"{where}: Auto-J label must be the integer 0, 1 or 2, found {describe_json(label)}"
                )
            fields = [
                _string(row, f, where, PairFileError)
                for f in ("scenario", "prompt", "response 1", "response 2")
            ]
            row_id = _row_id(row, ordinal, where, PairFileError)
            if label == 2:
                ties += 1
                continue
            scenario, prompt, first, second = fields
            better, worse = (first, second) if label == 0 else (second, first)
            pairs.append(Pair(row_id, AUTOJ_GROUPS.get(scenario, "Other"), prompt, better, worse, number))
        else:
            raise PairFileError(
                f"{where}: expected prompt/chosen/rejected (RewardBench, TRL), chosen/rejected (TRL's "
                "implicit prompt or conversations) or scenario/label/prompt/response 1/response 2 (Auto-J) fields"
            )
    if not pairs:
        found = f"only {ties} Auto-J ties (label 2), which are dropped" if ties else "no rows"
        raise PairFileError(f"{path}: holds {found}; there is no pair to score")
    return pairs, ties


@dataclass(frozen=True)
class PreferenceFile:
    """What a pair file holds: RewardBench / Auto-J / TRL pairs, or RewardBench 2 rows."""

    pairs: tuple[Pair, ...] = ()
    autoj_ties: int = 0
    rewardbench2: tuple[Rb2Row, ...] = ()


def is_rewardbench2(row: dict[str, Any]) -> bool:
    """A RewardBench 2 row: list-valued chosen/rejected of strings, or its count fields; TRL's
    conversations (lists of messages) are pairs."""
    return looks_like_rewardbench2(row) and not (
        is_conversational(row) and "num_correct" not in row and "total_completions" not in row
    )


def load_preferences(path: str | Path | DataSource) -> PreferenceFile:
    """Read a pair file (or cached dataset, as `load_pairs`) of either kind, told apart by its
    first row.

    RewardBench 2 rows (`rewardbench2.parse_row`): id, prompt, chosen (a list of strings),
    rejected (a list of strings), num_correct, total_completions, subset. Anything else is read as
    by `load_pairs`. A file mixing the two is refused.

    Raises:
        PairFileError naming the file and line for a malformed row, a mixed file, and a file with
        nothing to score.
    """
    source = resolve_data(path)
    rows = read_rows(source, PairFileError)
    if not rows or not is_rewardbench2(rows[0][2]):
        pairs, ties = _pairs_from_rows(source.given, rows)
        return PreferenceFile(tuple(pairs), ties)
    first = f"line {rows[0][0]}" if rows[0][1].endswith(f":{rows[0][0]}") else rows[0][1]
    parsed = []
    for number, where, row in rows:
        if not is_rewardbench2(row):
            raise PairFileError(
                f"{where}: not a RewardBench 2 row ({first} is one: chosen/rejected lists, num_correct); "
                "a file holds one format"
            )
        parsed.append((number, parse_row(row, where, number)))
    check_rows(Path(source.given), parsed)
    return PreferenceFile(rewardbench2=tuple(r for _, r in parsed))


def row_texts(row: Pair | Rb2Row | CandidateSet) -> list[tuple[Prompt, str, str]]:
    """(prompt, response, which) for every text a row is scored on, in the order eval, bon and
    the sweep format them: a pair's chosen then rejected, a RewardBench 2 row's completions
    (chosen first), a candidate set's candidates."""
    if isinstance(row, Pair):
        return [(row.prompt, row.chosen, "chosen"), (row.prompt, row.rejected, "rejected")]
    if isinstance(row, Rb2Row):
        n = len(row.chosen)
        return [
            (row.prompt, c, f"chosen[{i}]" if i < n else f"rejected[{i - n}]")
            for i, c in enumerate(row.completions)
        ]
    return [(row.prompt, c, f"candidates[{i}]") for i, c in enumerate(row.candidates)]


def row_source(path: Path | str, row: Pair | Rb2Row | CandidateSet, which: str) -> str:
    """`FILE:LINE (id ID, WHICH)`: where a scored text comes from."""
    return f"{path}:{row.line} (id {describe_json(row.id)}, {which})"


def text_source(
    evaluations: Iterable[tuple[Path | str, Iterable[Pair | Rb2Row | CandidateSet]]],
    text: str,
    format_text: Callable[[Prompt, str], str],
) -> str | None:
    """Where a formatted text comes from, `FILE:LINE (id ID, WHICH)`, or None when no row of
    `evaluations` (each a data file and its rows) formats to `text` with `format_text` (the
    formatter that made it, e.g. `RewardModel.format_text`). For naming the text of a
    `NonFiniteRewardError` (its `.text`); rows are formatted again until one matches."""
    for path, rows in evaluations:
        for row in rows:
            for prompt, response, which in row_texts(row):
                if format_text(prompt, response) == text:
                    return row_source(path, row, which)
    return None


def pair_results(
    pairs: Sequence[Pair],
    chosen: Sequence[float],
    rejected: Sequence[float],
    autoj_ties: int = 0,
    section_weights: str = "file",
) -> dict[str, Any]:
    """Accuracy overall and per subset; a pair is right only when chosen > rejected (ties wrong);
    RewardBench sections weighted as `section_weights` says (`sections`)."""
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
    sections = rewardbench_sections(result["subsets"], section_weights)
    if sections:
        result["sections"] = sections
    return result


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
    #: The row's line in its file (0 when not read from one), named when its text fails.
    line: int = field(default=0, compare=False)


def _correct_flags(row: dict[str, Any], count: int, answers: list[float | None], where: str) -> list[bool]:
    """Each candidate's correctness: the row's `correct` list, or its gold `answer` graded the
    GSM8K way against the numbers extracted from the candidates."""
    if "correct" in row:
        correct = row["correct"]
        if not isinstance(correct, list) or not all(isinstance(x, bool) for x in correct):
            raise CandidateFileError(
                f"{where}: correct must be a list of true/false (JSON booleans), found "
                + (
                    f"{describe_json(next(x for x in correct if not isinstance(x, bool)))} in the list"
                    if isinstance(correct, list)
                    else describe_json(correct)
                )
            )
        if len(correct) != count:
            raise CandidateFileError(f"{where}: correct has {len(correct)} entries for {count} candidates")
    elif "answer" in row:
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise CandidateFileError(
                f"{where}: answer must be a string or a number, found {describe_json(answer)}"
            )
        gold = extract_answer(str(answer))
        if gold is None:
            raise CandidateFileError(f"{where}: gold answer {describe_json(answer)} holds no number")
        correct = [a is not None and abs(a - gold) < 1e-6 for a in answers]
    else:
        raise CandidateFileError(f"{where}: needs a correct list or a gold answer")
    return correct


def load_candidates(path: str | Path | DataSource) -> list[CandidateSet]:
    """Read a best-of-N file (a local file or cached dataset, as `load_pairs`): prompt (string), candidates (a non-empty list of strings), and either
    `correct` (a list of true/false, one per candidate) or a gold `answer` (string or number)
    graded the GSM8K way; optional id (string or integer).

    Raises:
        CandidateFileError naming the file and line for a malformed row, and for a file with no row.
    """
    source = resolve_data(path)
    out = []
    for ordinal, (number, where, row) in enumerate(read_rows(source, CandidateFileError), start=1):
        if "prompt" not in row or not isinstance(row.get("candidates"), list) or not row["candidates"]:
            raise CandidateFileError(f"{where}: needs prompt and a non-empty candidates list")
        prompt = _string(row, "prompt", where, CandidateFileError)
        candidates = row["candidates"]
        bad = next((i for i, c in enumerate(candidates) if not isinstance(c, str)), None)
        if bad is not None:
            raise CandidateFileError(
                f"{where}: candidates[{bad}] must be a string, found {describe_json(candidates[bad])}"
            )
        answers = [extract_answer(c) for c in candidates]
        correct = _correct_flags(row, len(candidates), answers, where)
        out.append(
            CandidateSet(
                _row_id(row, ordinal, where, CandidateFileError),
                prompt,
                list(candidates),
                correct,
                answers,
                number,
            )
        )
    if not out:
        raise CandidateFileError(f"{source.given}: holds no rows; there is no prompt to score")
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
