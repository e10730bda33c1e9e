"""Convert local RewardBench and Auto-J files to lazymerge's pair format (JSON Lines).

    python tools/convert_pairs.py rewardbench filtered.parquet -o rewardbench.jsonl
    python tools/convert_pairs.py rewardbench filtered.json -o rewardbench.jsonl
    python tools/convert_pairs.py autoj testdata_pairwise.jsonl -o autoj.jsonl
    python tools/convert_pairs.py rewardbench2 test-00000-of-00001.parquet -o rewardbench2.jsonl

RewardBench (the 2,985 filtered pairs; columns prompt, chosen, rejected, subset, id) may be a
parquet file (needs pyarrow), a JSON list or JSON Lines. Auto-J's pairwise test set (scenario,
label 0/1/2, prompt, "response 1", "response 2") becomes chosen/rejected pairs with the 373 ties
dropped and scenarios grouped into Math / Code / Other as DogeRM does; `lazymerge eval` also
reads Auto-J files directly. RewardBench 2 (allenai/reward-bench-2, split test: id, prompt,
chosen and rejected lists, num_correct, total_completions, subset) may be parquet, a JSON list or
JSON Lines; every row is checked as `lazymerge eval` checks it, and only those seven fields are
kept. Nothing is downloaded.

The output is written atomically and never over the source; an existing OUTPUT is replaced
only with --force, and only when lazymerge wrote it (see `lazymerge.io.outputs`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazymerge.errors import LazyMergeError, PairFileError  # noqa: E402
from lazymerge.evaluation import rewardbench2  # noqa: E402
from lazymerge.evaluation.scoring import (  # noqa: E402
    find_lone_surrogate,
    load_pairs,
    read_jsonl,
    surrogate_message,
)
from lazymerge.io.outputs import OutputFiles  # noqa: E402
from lazymerge.io.small_files import open_regular, read_small_file  # noqa: E402

REWARDBENCH_COLUMNS = ("prompt", "chosen", "rejected", "subset", "id")
#: A JSON list is parsed whole; RewardBench's 2,985 pairs are about 10 MB.
MAX_JSON_LIST_BYTES = 1 << 30


class ConvertError(Exception):
    """A source this tool cannot convert; the message names the file (and row)."""


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes in one line with exit status 2, as lazymerge's own commands report them."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"Error: {message} (see {self.prog} --help)\n")


def _encode(source: Path, number: int, row: dict) -> bytes:
    """One output line; a lone surrogate (a `\\udXXX` escape without its pair) is not text."""
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        raise ConvertError(
            f"{source}: converted pair {number} holds a lone surrogate (a \\udXXX escape without its pair); not text"
        ) from None


def read_rows(path: Path) -> list[tuple[str, object]]:
    """(where, row) for every row of a parquet file, a JSON list or JSON Lines."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConvertError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
        os.close(open_regular(path))  # InputError for a missing file, a FIFO, a folder
        try:
            table = pq.read_table(path).to_pylist()
        except (OSError, ValueError) as exc:
            raise ConvertError(f"{path}: not a readable parquet file ({exc})") from None
        return checked_text([(f"{path}: row {n}", row) for n, row in enumerate(table, start=1)])
    with os.fdopen(open_regular(path), "rb") as fh:  # InputError for a missing file, a FIFO, a folder
        first = fh.read(1 << 12).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[":
        try:
            text = read_small_file(path, MAX_JSON_LIST_BYTES).decode("utf-8-sig")
            doc = json.loads(text)
        except UnicodeDecodeError as exc:
            raise ConvertError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
        except RecursionError:
            raise ConvertError(f"{path}: JSON nests too deeply") from None
        except ValueError as exc:
            raise ConvertError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(doc, list):
            raise ConvertError(f"{path}: starts like a JSON list but is not one")
        rows = [(f"{path}: row {n}", row) for n, row in enumerate(doc, start=1)]
        return checked_text(rows) if "\\u" in text else rows
    rows = read_jsonl(path, PairFileError)  # a malformed line: PairFileError naming file and line
    return [(f"{path}: row {n}", row) for n, (_, row) in enumerate(rows, start=1)]


def checked_text(rows: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """`rows`, refused at the first that holds a lone surrogate (an unpaired `\\ud800` escape: not
    text, which the output's UTF-8 cannot hold). JSON Lines rows are checked as they are read."""
    for where, row in rows:
        found = find_lone_surrogate(row)
        if found is not None:
            raise ConvertError(f"{where}: {surrogate_message(found)}")
    return rows


def convert_rewardbench(source: Path) -> list[dict]:
    out = []
    for where, row in read_rows(source):
        if not isinstance(row, dict):
            raise ConvertError(f"{where} is not an object")
        missing = [c for c in REWARDBENCH_COLUMNS[:3] if c not in row]
        if missing:
            raise ConvertError(f"{where} lacks {', '.join(missing)}")
        wrong = [c for c in REWARDBENCH_COLUMNS[:4] if c in row and not isinstance(row[c], str)]
        if wrong:
            raise ConvertError(f"{where}: {', '.join(wrong)} must be text")
        out.append({c: row[c] for c in REWARDBENCH_COLUMNS if c in row})
    return out


def convert_rewardbench2(source: Path) -> list[dict]:
    out = []
    for where, row in read_rows(source):
        if not isinstance(row, dict):
            raise ConvertError(f"{where} is not an object")
        rewardbench2.parse_row(row, where)
        out.append({c: row[c] for c in rewardbench2.FIELDS})
    return out


def convert_autoj(source: Path) -> list[dict]:
    pairs, ties = load_pairs(source)
    print(f"{source}: {len(pairs)} pairs, {ties} ties dropped", file=sys.stderr)
    return [
        {"id": p.id, "subset": p.subset, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
        for p in pairs
    ]


CONVERTERS = {
    "rewardbench": convert_rewardbench,
    "rewardbench2": convert_rewardbench2,
    "autoj": convert_autoj,
}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=sorted(CONVERTERS))
    parser.add_argument("source", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument(
        "--force", action="store_true", help="replace OUTPUT if this tool (or lazymerge) wrote it"
    )
    args = parser.parse_args(argv)
    try:
        # the output rule first, so a refused output costs no conversion: never the source (or a
        # link to it), never an existing file without --force, --force only over lazymerge's own
        with OutputFiles([args.output], inputs=[args.source], force=args.force) as output:
            rows = CONVERTERS[args.format](args.source)
            output.write({args.output: b"".join(_encode(args.source, n, r) for n, r in enumerate(rows, 1))})
    except (LazyMergeError, ConvertError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the source vanished or cannot be read
        print(f"Error: {args.source}: cannot read ({exc.strerror or exc})", file=sys.stderr)
        return 1
    print(f"wrote {len(rows)} pairs to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
