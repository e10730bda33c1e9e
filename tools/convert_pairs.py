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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazymerge.errors import LazyMergeError  # noqa: E402
from lazymerge.evaluation import rewardbench2  # noqa: E402
from lazymerge.evaluation.scoring import load_pairs  # noqa: E402

REWARDBENCH_COLUMNS = ("prompt", "chosen", "rejected", "subset", "id")


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: not a readable parquet file ({exc})") from None
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def convert_rewardbench(source: Path) -> list[dict]:
    rows = read_rows(source)
    out = []
    for number, row in enumerate(rows, start=1):
        missing = [c for c in REWARDBENCH_COLUMNS[:3] if c not in row]
        if missing:
            raise SystemExit(f"{source}: row {number} lacks {', '.join(missing)}")
        out.append({c: row[c] for c in REWARDBENCH_COLUMNS if c in row})
    return out


def convert_rewardbench2(source: Path) -> list[dict]:
    rows = read_rows(source)
    out = []
    for number, row in enumerate(rows, start=1):
        where = f"{source}: row {number}"
        if not isinstance(row, dict):
            raise SystemExit(f"{where} is not an object")
        try:
            rewardbench2.parse_row(row, where)
        except LazyMergeError as exc:
            raise SystemExit(str(exc)) from None
        out.append({c: row[c] for c in rewardbench2.FIELDS})
    return out


def convert_autoj(source: Path) -> list[dict]:
    pairs, ties = load_pairs(source)
    print(f"{source}: {len(pairs)} pairs, {ties} ties dropped", file=sys.stderr)
    return [
        {"id": p.id, "subset": p.subset, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
        for p in pairs
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("format", choices=["rewardbench", "rewardbench2", "autoj"])
    parser.add_argument("source", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    convert = {
        "rewardbench": convert_rewardbench,
        "rewardbench2": convert_rewardbench2,
        "autoj": convert_autoj,
    }
    rows = convert[args.format](args.source)
    args.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} pairs to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
