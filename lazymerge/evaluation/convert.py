"""`lazymerge convert`: any data lazymerge reads, written as lazymerge's own JSON Lines.

The source is read exactly as `eval`, `bon` and `sweep` read it (`scoring.load_preferences`,
`scoring.load_candidates`: JSON Lines, JSON lists, parquet, cached Hugging Face datasets;
RewardBench, RewardBench 2, Auto-J and TRL's forms), every row checked, and written back in one
canonical form:

- pairs: `id`, `subset`, `prompt`, `chosen`, `rejected` (Auto-J ties dropped, scenarios grouped
  as DogeRM does; TRL conversations reduced to their one user and one assistant message);
- RewardBench 2 rows: `id`, `prompt`, `chosen`, `rejected`, `num_correct`, `total_completions`,
  `subset`;
- candidate sets (`kind="candidates"`): `id`, `prompt`, `candidates`, `correct` (a gold
  `answer` graded the GSM8K way, as `bon` grades it).

The output follows the output rule (`io.outputs.OutputFiles`): never an input, never an existing
file without `force` (and then only one lazymerge wrote), written atomically or not at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.errors import PairFileError
from lazymerge.evaluation.conversations import prompt_json
from lazymerge.evaluation.datasets import data_paths, resolve_data
from lazymerge.evaluation.scoring import load_candidates, load_preferences

#: What a source may be converted as: `pairs` (pairs or RewardBench 2 rows, whichever it holds),
#: `rewardbench2` (RewardBench 2 rows only), `candidates` (best-of-N sets).
KINDS = ("pairs", "rewardbench2", "candidates")


@dataclass(frozen=True)
class Conversion:
    """What `convert` wrote: how many rows of which kind, and the Auto-J ties it dropped."""

    source: str
    output: Path
    rows: int
    kind: str
    autoj_ties: int = 0

    def format(self) -> str:
        ties = f" ({self.autoj_ties} Auto-J ties dropped)" if self.autoj_ties else ""
        return f"wrote {self.rows} {self.kind} to {self.output}{ties}"


def converted_rows(
    source: str | os.PathLike[str], kind: str = "pairs"
) -> tuple[list[dict[str, Any]], str, int]:
    """(canonical rows, what they are, Auto-J ties dropped) of a data source.

    Raises:
        PairFileError / CandidateFileError naming the file and row, as the scorers raise them;
        PairFileError when `kind` is `rewardbench2` and the source holds pairs.
    """
    data_source = resolve_data(source)
    if kind == "candidates":
        sets = load_candidates(data_source)
        return (
            [
                {"id": s.id, "prompt": s.prompt, "candidates": s.candidates, "correct": s.correct}
                for s in sets
            ],
            "candidate sets",
            0,
        )
    data = load_preferences(data_source)
    if data.rewardbench2:
        return (
            [
                {
                    "id": r.id,
                    "prompt": r.prompt,
                    "chosen": list(r.chosen),
                    "rejected": list(r.rejected),
                    "num_correct": len(r.chosen),
                    "total_completions": len(r.completions),
                    "subset": r.subset,
                }
                for r in data.rewardbench2
            ],
            "RewardBench 2 rows",
            0,
        )
    if kind == "rewardbench2":
        raise PairFileError(f"{data_source.given}: holds preference pairs, not RewardBench 2 rows")
    rows = [_pair_row(p) for p in data.pairs]
    return rows, "pairs", data.autoj_ties


def convert(
    source: str | os.PathLike[str], output: Path, kind: str = "pairs", force: bool = False
) -> Conversion:
    """Read `source` (see the module docstring) and write its rows to `output` as JSON Lines.

    Raises:
        OutputError (before anything is read) when `output` is an input or exists without
        `force`; the readers' errors for a malformed source; nothing is written then.
    """
    from lazymerge.io.outputs import OutputFiles

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    # the output rule first, so a refused output costs no conversion
    with OutputFiles([output], inputs=data_paths(source), force=force) as files:
        rows, what, ties = converted_rows(source, kind)
        # strings read from JSON or parquet are text (lone surrogates are refused where read)
        body = b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in rows)
        files.write({output: body})
    return Conversion(os.fspath(source), output, len(rows), what, ties)


def _pair_row(pair: Any) -> dict[str, Any]:
    """A pair as a row: RewardBench's strings, or TRL's explicit-prompt conversation for a
    multi-turn prompt (read back as the same pair)."""
    if isinstance(pair.prompt, str):
        return {
            "id": pair.id,
            "subset": pair.subset,
            "prompt": pair.prompt,
            "chosen": pair.chosen,
            "rejected": pair.rejected,
        }
    return {
        "id": pair.id,
        "subset": pair.subset,
        "prompt": prompt_json(pair.prompt),
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
    }
