"""What checking a sweep's inputs costs: the stat-and-headers identity every resume computes,
against `--rehash` (SHA-256 of every weights byte), on a generated 7B-shaped model folder.

    python bench/identity_cost.py [--gib 2] [--runs 3]

Builds a Llama-2-7B-shaped safetensors folder in a temporary folder, scaled down to --gib GiB of
weights (same tensor count and names, smaller rows), and times `identify_input` without and with
hashing, median of --runs runs, the file in the page cache (hashing from a cold disk is bounded
by the disk instead). Prints the figures and the projection to 13.5 GB (7B in bf16). Writes
nothing outside its temporary folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cli import cpu_name  # noqa: E402

from lazymerge.provenance import identify_input  # noqa: E402

LAYERS, HIDDEN, FFN = 32, 4096, 11008
BYTES_7B = 13.5e9


def tensor_names() -> list[tuple[str, int]]:
    """(name, relative size) of every tensor of a Llama-2-7B reward model."""
    out = [
        ("model.embed_tokens.weight", 32000 * HIDDEN),
        ("model.norm.weight", HIDDEN),
        ("score.weight", HIDDEN),
    ]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{x}_proj.weight", HIDDEN * HIDDEN) for x in "qkvo"]
        out += [(p + f"mlp.{x}_proj.weight", HIDDEN * FFN) for x in ("gate", "up", "down")]
        out += [(p + "input_layernorm.weight", HIDDEN), (p + "post_attention_layernorm.weight", HIDDEN)]
    return out


def build(folder: Path, total: int) -> None:
    names = tensor_names()
    scale = total / sum(n for _, n in names) / 2  # bf16
    header, offset = {}, 0
    for name, n in names:
        elems = max(1, int(n * scale))
        header[name] = {"dtype": "BF16", "shape": [elems], "data_offsets": [offset, offset + 2 * elems]}
        offset += 2 * elems
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir()
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        block = bytes(range(256)) * 4096
        left = offset
        while left:
            fh.write(block[: min(left, len(block))])
            left -= min(left, len(block))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not (0 < args.gib <= 64) or args.runs < 1:
        parser.error("--gib must be in (0, 64] and --runs at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "rm"
        build(folder, int(args.gib * 2**30))
        size = (folder / "model.safetensors").stat().st_size
        identify_input(folder, hash_weights=True)  # warm-up: the file in the page cache
        cheap = timed(lambda: identify_input(folder), args.runs)
        hashed = timed(lambda: identify_input(folder, hash_weights=True), args.runs)
    rate = size / hashed
    print(f"machine: {cpu_name()}, python {platform.python_version()}")
    print(
        f"weights: {size / 1e9:.2f} GB in {len(tensor_names())} tensors (Llama-2-7B names), page cache warm"
    )
    print(f"identity (stat, headers, companion files): {cheap * 1e3:.1f} ms (median of {args.runs})")
    print(f"--rehash: {hashed:.2f} s, {rate / 1e9:.2f} GB/s (median of {args.runs})")
    print(f"projected for 13.5 GB (7B, bf16): {BYTES_7B / rate:.1f} s per model from the page cache")


if __name__ == "__main__":
    main()
