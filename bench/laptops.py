"""What merging two 7B or two 70B models needs on an 8, 16 or 24 GB laptop: RAM, disk and time.

    python bench/laptops.py [--compare bench/results/compare-7b.json]

Computed, not guessed:
- lazymerge's RAM is its own plan's prediction (`lazymerge plan --json`: working memory plus the
  interpreter's baseline), made on Llama-2-7B- and Llama-2-70B-shaped bf16 checkpoints that exist
  as sparse files (real headers, holes for the data: nothing but headers is on the disk). The
  prediction does not depend on the model's size; bench/compare.py measures it at 1b and 7b.
- the naive merge holds both models in fp32: 8 bytes per parameter, plus the interpreter.
- mergekit's peak RSS was measured at 7B only (bench/compare.py); 70B is not measured.
- disk: both inputs plus the output.
- time at the disk speed measured by bench/compare.py on the reference machine (the overlapped
  floor: reading both inputs while writing the output), times lazymerge's measured ratio to that
  floor, scaled by bytes.
The table goes to --out (default bench/results/laptops.md) under lazymerge's output rule: never
the --compare file, an existing file replaced only with --force and only when a bench wrote it,
atomic.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_cli import FORCE_HELP, OneLineParser, fail, reserve_results, write_results  # noqa: E402
from merge_memory import CHECKOUT_ENV  # noqa: E402

from lazymerge.demo import llama_shapes  # noqa: E402
from lazymerge.io.writer import OutputTensor, plan_layout  # noqa: E402

SHAPES = {
    "7B": {"hidden": 4096, "intermediate": 11008, "layers": 32, "vocab": 32000, "kv_hidden": 4096},
    "70B": {"hidden": 8192, "intermediate": 28672, "layers": 80, "vocab": 32000, "kv_hidden": 1024},
}
LAPTOPS_GB = (8, 16, 24)


def sparse_checkpoint(folder: Path, dims: dict[str, int]) -> int:
    """A bf16 checkpoint whose shards hold real headers and holes for the data; its parameters."""
    tensors = [OutputTensor(n, "BF16", s) for n, s in llama_shapes(**dims).items()]
    layout = plan_layout(tensors, {"format": "pt"}, None, 5 * 10**9)
    folder.mkdir(parents=True)
    for shard in layout.shards:
        with open(folder / shard.filename, "wb") as fh:
            fh.write(shard.header)
            fh.truncate(len(shard.header) + shard.data_bytes)
    (folder / "model.safetensors.index.json").write_bytes(layout.index or b"")
    return sum(s.data_bytes for s in layout.shards) // 2


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=Path, default=ROOT / "bench" / "results" / "compare-7b.json")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "laptops.md")
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)
    args = parser.parse_args()
    results = reserve_results([args.out], args.force, inputs=[args.compare])
    try:
        rows = {r["tool"]: r for r in json.loads(args.compare.read_bytes())}
        measured = rows["lazymerge"]
        floor_s = float(measured["overlapped_floor_s"])
        moved = 3 * int(measured["input_bytes_each"])  # both inputs read, one output written
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as exc:
        fail(f"{args.compare}: not a results file of bench/compare.py ({type(exc).__name__}: {exc})")
    disk_rate = moved / floor_s
    lazy_ratio = rows["lazymerge"]["wall_s"] / floor_s
    mergekit_7b = rows.get("mergekit", {}).get("peak_rss_mb")
    mergekit_7b_anon = rows.get("mergekit", {}).get("peak_anon_mb")
    lines = [
        f"Disk speed: {disk_rate / 1e9:.2f} GB/s moved (reading both inputs while writing the output), "
        f"measured on {measured['machine']}, {measured['date']}; lazymerge ran at "
        f"{lazy_ratio:.2f}x that floor.",
        "",
        "| models | laptop RAM | lazymerge RAM (fits?) | naive fp32 RAM (fits?) | mergekit RAM (fits?) "
        f"| disk needed | lazymerge time at {disk_rate / 1e9:.2f} GB/s | at 0.5 GB/s (a SATA SSD) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory(prefix="lazymerge-laptops-") as tmp:
        for size, dims in SHAPES.items():
            a, b = Path(tmp) / f"{size}-a", Path(tmp) / f"{size}-b"
            params = sparse_checkpoint(a, dims)
            sparse_checkpoint(b, dims)
            plan = json.loads(
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "lazymerge",
                        "plan",
                        str(a),
                        str(b),
                        "-o",
                        str(Path(tmp) / "out"),
                        "--json",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=CHECKOUT_ENV,
                ).stdout
            )
            lazy_gb = plan["predicted_peak_rss"] / 1e9
            naive_gb = 8 * params / 1e9 + 0.5
            disk_gb = (plan["input_bytes"] + plan["output_bytes"]) / 1e9
            seconds = (plan["input_bytes"] + plan["output_bytes"]) / disk_rate * lazy_ratio
            mk_gb = mergekit_7b * 2**20 / 1e9 if size == "7B" and mergekit_7b else None
            mk_anon = mergekit_7b_anon * 2**20 / 1e9 if mk_gb else 0.0
            for ram in LAPTOPS_GB:
                # file-backed pages (mapped inputs) can be dropped under pressure: anonymous
                # memory decides whether it fits
                mk = (
                    f"{mk_gb:.1f} GB measured, {mk_anon:.1f} anonymous ({'yes' if mk_anon < ram else 'no'})"
                    if mk_gb
                    else "not measured"
                )
                lines.append(
                    f"| 2 x {size} bf16 | {ram} GB | {lazy_gb:.2f} GB ({'yes' if lazy_gb < ram else 'no'}) "
                    f"| {naive_gb:.0f} GB ({'yes' if naive_gb < ram else 'no'}) | {mk} "
                    f"| {disk_gb:.0f} GB | {seconds / 60:.1f} min | {disk_gb * 1e9 / 0.5e9 / 60:.1f} min (disk-bound) |"
                )
    text = "\n".join(lines) + "\n"
    write_results(results, {args.out: text.encode()})
    print(text)
    os.sync()


if __name__ == "__main__":
    main()
