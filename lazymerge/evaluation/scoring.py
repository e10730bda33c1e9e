"""Pair and candidate files, accuracy, RewardBench sections and GSM8K grading (no models here).

Pair and candidate files are untrusted JSON Lines: read a line at a time (at most
`MAX_LINE_BYTES` each), every row a JSON object whose fields have the documented types, checked
one by one; a malformed row or a file with nothing to score raises `PairFileError` or
`CandidateFileError` naming the file and line.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazymerge.errors import CandidateFileError, EvalDataError, InputError, PairFileError
from lazymerge.evaluation.rewardbench2 import Rb2Row, check_rows, looks_like_rewardbench2, parse_row
from lazymerge.evaluation.sections import CODE_SUBSETS as CODE_SUBSETS  # re-exported
from lazymerge.evaluation.sections import SECTIONS as SECTIONS  # re-exported
from lazymerge.evaluation.sections import rewardbench_sections
from lazymerge.io.header import lone_surrogate
from lazymerge.io.small_files import DuplicateKeyError, describe_json, open_regular, unique_keys

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
    #: The row's line in its file (0 when not read from one), named when its text fails.
    line: int = field(default=0, compare=False)


#: A JSON escape that may spell a lone surrogate: only a line holding one is searched for it.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def find_lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate (as `\\udXXX`) in any string or key of a parsed JSON value, or
    None. Only an unpaired escape such as `"\\ud800"` makes one; it is not text (a tokenizer, a
    UTF-8 writer or a terminal fails on it), so a file holding one is refused where it is read."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = lone_surrogate(item)
            if found is not None:
                return found
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def surrogate_message(found: str) -> str:
    return f"holds a lone surrogate ({found}, an unpaired JSON escape), not text"


#: Longest line read from a JSON Lines file, in bytes (one RewardBench row is a few KB).
MAX_LINE_BYTES = 16 << 20


def read_jsonl(path: Path, error: type[EvalDataError]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of every non-blank line, each a JSON object.

    Lines are read one at a time and at most `MAX_LINE_BYTES` long, so a hostile file costs
    memory for its rows, never for one giant line.

    Raises:
        `error` (naming the file and line) for a line that is too long, not UTF-8, not JSON, nests
        too deeply, repeats a key, is not an object or holds a lone surrogate (an unpaired
        `\\ud800` escape: not text); InputError when the file cannot be read.
    """
    rows = []
    try:
        with os.fdopen(open_regular(Path(path)), "rb") as fh:  # a FIFO must not hang the run
            number = 0
            while True:
                raw = fh.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    break
                number += 1
                where = f"{path}:{number}"
                if len(raw) > MAX_LINE_BYTES:
                    raise error(
                        f"{where}: line is longer than the {MAX_LINE_BYTES // (1 << 20)} MiB limit per line; "
                        "JSON Lines rows are one object per line"
                    )
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise error(f"{where}: not valid UTF-8 (byte {exc.start} of the line)") from None
                if number == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                try:
                    row = json.loads(line, object_pairs_hook=unique_keys)
                except DuplicateKeyError as exc:
                    raise error(
                        f"{where}: key {describe_json(exc.args[0])} appears twice; the row is ambiguous"
                    ) from None
                except RecursionError:
                    raise error(f"{where}: JSON nests too deeply") from None
                except ValueError as exc:
                    raise error(f"{where}: not a JSON object ({exc})") from None
                if not isinstance(row, dict):
                    raise error(f"{where}: is {describe_json(row)}, not a JSON object")
                if SURROGATE_ESCAPE.search(line) is not None:
                    found = find_lone_surrogate(row)
                    if found is not None:
                        raise error(f"{where}: {surrogate_message(found)}")
                rows.append((number, row))
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return rows


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


def load_pairs(path: str | Path) -> tuple[list[Pair], int]:
    """Read a pair file; returns (pairs, Auto-J ties dropped).

    Formats (JSON Lines, detected per line):
    - RewardBench: prompt, chosen, rejected (strings), optional subset (string) and id (string or
      integer);
    - Auto-J pairwise: scenario, label (the integer 0: response 1 better, 1: response 2 better,
      2: tie), prompt, "response 1", "response 2" (strings); ties are dropped and scenarios grouped
      into Math / Code / Other as DogeRM does.

    Raises:
        PairFileError naming the file and line for a malformed row, and for a file with no pair
        to score.
    """
    path = Path(path)
    return _pairs_from_rows(path, read_jsonl(path, PairFileError))


def _pairs_from_rows(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> tuple[list[Pair], int]:
    pairs, ties = [], 0
    for ordinal, (number, row) in enumerate(rows, start=1):
        where = f"{path}:{number}"
        if "num_correct" in row or "total_completions" in row:
            raise PairFileError(
                f"{where}: a RewardBench 2 row (chosen/rejected lists, num_correct) among RewardBench pairs; "
                "a file holds one format"
            )
        if {"prompt", "chosen", "rejected"} <= row.keys():
            pairs.append(
                Pair(
                    _row_id(row, ordinal, where, PairFileError),
                    _string(row, "subset", where, PairFileError) if "subset" in row else "all",
                    _string(row, "prompt", where, PairFileError),
                    _string(row, "chosen", where, PairFileError),
                    _string(row, "rejected", where, PairFileError),
                    number,
                )
            )
        elif {"scenario", "label", "prompt", "response 1", "response 2"} <= row.keys():
            label = row["label"]
            if isinstance(label, bool) or not isinstance(label, int) or label not in (0, 1, 2):
                raise PairFileError(
                    f"{where}: Auto-J label must be the integer 0, 1 or 2, found {describe_json(label)}"
                )
            texts = [
                _string(row, f, where, PairFileError)
                for f in ("scenario", "prompt", "response 1", "response 2")
            ]
            row_id = _row_id(row, ordinal, where, PairFileError)
            if label == 2:
                ties += 1
                continue
            scenario, prompt, first, second = texts
            better, worse = (first, second) if label == 0 else (second, first)
            pairs.append(Pair(row_id, AUTOJ_GROUPS.get(scenario, "Other"), prompt, better, worse, number))
        else:
            raise PairFileError(
                f"{where}: expected prompt/chosen/rejected (RewardBench) or scenario/label/prompt/"
                "response 1/response 2 (Auto-J) fields"
            )
    if not pairs:
        found = f"only {ties} Auto-J ties (label 2), which are dropped" if ties else "no rows"
        raise PairFileError(f"{path}: holds {found}; there is no pair to score")
    return pairs, ties


@dataclass(frozen=True)
class PreferenceFile:
    """What a pair file holds: RewardBench / Auto-J pairs, or RewardBench 2 rows."""

    pairs: tuple[Pair, ...] = ()
    autoj_ties: int = 0
    rewardbench2: tuple[Rb2Row, ...] = ()


def load_preferences(path: str | Path) -> PreferenceFile:
    """Read a pair file of either kind, told apart by its first row.

    RewardBench 2 rows (`rewardbench2.parse_row`): id, prompt, chosen (a list), rejected (a list),
    num_correct, total_completions, subset. Anything else is read as by `load_pairs`. A file
    mixing the two is refused.

    Raises:
        PairFileError naming the file and line for a malformed row, a mixed file, and a file with
        nothing to score.
    """
    path = Path(path)
    rows = read_jsonl(path, PairFileError)
    if not rows or not looks_like_rewardbench2(rows[0][1]):
        pairs, ties = _pairs_from_rows(path, rows)
        return PreferenceFile(tuple(pairs), ties)
    first = rows[0][0]
    parsed = []
    for number, row in rows:
        where = f"{path}:{number}"
        if not looks_like_rewardbench2(row):
            raise PairFileError(
                f"{where}: not a RewardBench 2 row (line {first} is one: chosen/rejected lists, num_correct); "
                "a file holds one format"
            )
        parsed.append((number, parse_row(row, where, number)))
    check_rows(path, parsed)
    return PreferenceFile(rewardbench2=tuple(r for _, r in parsed))


def row_texts(row: Pair | Rb2Row | CandidateSet) -> list[tuple[str, str, str]]:
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
    format_text: Callable[[str, str], str],
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


def load_candidates(path: str | Path) -> list[CandidateSet]:
    """Read a best-of-N file: prompt (string), candidates (a non-empty list of strings), and either
    `correct` (a list of true/false, one per candidate) or a gold `answer` (string or number)
    graded the GSM8K way; optional id (string or integer).

    Raises:
        CandidateFileError naming the file and line for a malformed row, and for a file with no row.
    """
    path = Path(path)
    out = []
    for ordinal, (number, row) in enumerate(read_jsonl(path, CandidateFileError), start=1):
        where = f"{path}:{number}"
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
            if len(correct) != len(candidates):
                raise CandidateFileError(
                    f"{where}: correct has {len(correct)} entries for {len(candidates)} candidates"
                )
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
        raise CandidateFileError(f"{path}: holds no rows; there is no prompt to score")
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
