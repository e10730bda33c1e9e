"""Memory and speed of a streaming merge of two Llama-shaped bf16 checkpoints, against the I/O floor.

    python bench/merge_memory.py --size 1b          # two TinyLlama-1.1B-shaped inputs (2.2 GB each)
    python bench/merge_memory.py --size 7b          # two Llama-2-7B-shaped inputs (13.5 GB each)

Steps, all in one run on one machine:
1. Write two synthetic bf16 checkpoints (Hugging Face shard layout) straight to disk, tensor by
   tensor: they are never held in RAM.
2. Warm-up: a small merge, so interpreter, torch and lazymerge are in the page cache.
3. I/O floor: read both inputs and write an output of the merged size with plain file I/O and an
   fsync, the least any merger must do.
4. `lazymerge run` in a subprocess, its RSS (total, anonymous, file-backed) sampled from outside
   every 5 ms, plus the kernel's high-water mark.
Steps 3 and 4 run twice, in the order floor, merge, merge, floor, and the means are reported
(each run is kept in the JSON).
The input and output files are evicted from the page cache (posix_fadvise DONTNEED) before steps 3
and 4, so both start cold. Results print as a table and are saved as JSON (--save, default
bench/results/merge-SIZE[-dogerm].json) under lazymerge's output rule: checked before the run,
atomic, an existing file replaced only with --force and only when a bench wrote it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_cli import FORCE_HELP, OneLineParser, reserve_results, write_results  # noqa: E402

from lazymerge.demo import llama_shapes  # noqa: E402
from lazymerge.io.writer import OutputTensor, StreamingShardWriter, plan_layout  # noqa: E402
from lazymerge.merge.workspace import anonymous_buffer  # noqa: E402

SIZES = {
    "1b": {"hidden": 2048, "intermediate": 5632, "layers": 22, "vocab": 32000, "kv_hidden": 256},
    "7b": {"hidden": 4096, "intermediate": 11008, "layers": 32, "vocab": 32000, "kv_hidden": 4096},
}
BLOCK = 64 * 2**20
#: Run the lazymerge of this checkout, whatever copy pip installed.
CHECKOUT_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


def write_model_files(folder: Path, size: str, role: str) -> None:
    """config.json and a word-level tokenizer.json for a DogeRM reward model or SFT model.

    Both tokenizers hold the same 32000 tokens; the SFT model adds `[PAD]` as id 32000, as
    MetaMath-7B and MAmmoTH-7B do.
    """
    dims = SIZES[size]
    vocab = {f"t{i}": i for i in range(dims["vocab"])}
    added = [
        {
            "id": dims["vocab"],
            "content": "[PAD]",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    ]
    config = {
        "architectures": ["LlamaForSequenceClassification" if role == "rm" else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"],
        "num_hidden_layers": dims["layers"],
        "vocab_size": dims["vocab"] + (role == "sft"),
        "num_labels": 1,
        "pad_token_id": 2,
    }
    tokenizer = {
        "version": "1.0",
        "added_tokens": added if role == "sft" else [],
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


def write_checkpoint(folder: Path, size: str, seed: int, role: str = "plain") -> int:
    """Stream a random bf16 checkpoint to `folder`; return its tensor bytes.

    role "rm" swaps the lm_head for a reward head (score.weight); "sft" grows the vocabulary by one
    token; both also get config.json and tokenizer.json.
    """
    dims = dict(SIZES[size])
    if role == "sft":
        dims["vocab"] += 1
    shapes = llama_shapes(**dims)
    if role == "rm":
        del shapes["lm_head.weight"]
        shapes["score.weight"] = (1, dims["hidden"])
    tensors = [OutputTensor(name, "BF16", shape) for name, shape in shapes.items()]
    layout = plan_layout(tensors, {"format": "pt"}, None, 5 * 10**9)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    # a pool of random bf16 values; each tensor is a window of it at a random start
    pool = (torch.randn(BLOCK // 2, generator=gen) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy()
    pool = memoryview(pool.tobytes() * 2)
    staging = anonymous_buffer(16 * 2**20)  # direct writes: little CPU, no page cache filled
    for shard in layout.shards:
        writer = StreamingShardWriter(folder / shard.filename, shard, staging=staging)
        for t in shard.tensors:
            remaining = t.nbytes
            while remaining:
                start = int(torch.randint(0, BLOCK // 2, (1,), generator=gen)) * 2
                n = min(remaining, BLOCK)
                writer.write(pool[start : start + n])
                remaining -= n
        writer.finish()
    if layout.index is not None:
        (folder / "model.safetensors.index.json").write_bytes(layout.index)
    if role != "plain":
        write_model_files(folder, size, role)
    return sum(s.data_bytes for s in layout.shards)


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache so the next read comes from disk."""
    for root in paths:
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fdatasync(fd) if os.access(path, os.W_OK) else None
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def io_floor(inputs: list[Path], out_path: Path, out_bytes: int) -> float:
    """Seconds to read every input file and write+fsync `out_bytes` with plain file I/O."""
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    start = time.perf_counter()
    for root in inputs:
        for path in sorted(root.glob("*.safetensors")):
            fd = os.open(path, os.O_RDONLY)
            offset = 0
            while n := os.preadv(fd, [view], offset):
                offset += n
            os.close(fd)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    remaining = out_bytes
    while remaining:
        remaining -= os.write(fd, view[: min(remaining, BLOCK)])
    os.fsync(fd)
    os.close(fd)
    elapsed = time.perf_counter() - start
    out_path.unlink()
    return elapsed


def status(pid: int) -> dict[str, int]:
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return fields


def run_sampled(cmd: list[str]) -> tuple[float, dict[str, int], str]:
    """Run `cmd`, sampling its RSS every 5 ms; return wall time, peaks and stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=CHECKOUT_ENV)
    peaks = {"total": 0, "anon": 0, "file": 0, "hwm": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            f = status(proc.pid)
            if "VmRSS" in f:
                peaks["total"] = max(peaks["total"], f["VmRSS"])
                peaks["anon"] = max(peaks["anon"], f.get("RssAnon", 0))
                peaks["file"] = max(peaks["file"], f.get("RssFile", 0) + f.get("RssShmem", 0))
                peaks["hwm"] = max(peaks["hwm"], f.get("VmHWM", 0))
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"lazymerge failed with exit {proc.returncode}")
    return wall, peaks, out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary folder)")
    parser.add_argument("--max-memory", default="160MiB")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument(
        "--dogerm", action="store_true", help="inputs are a reward model and an SFT model with one more token"
    )
    parser.add_argument("--reuse", type=Path, help="a folder kept by --keep: skip writing the inputs")
    parser.add_argument("--save", type=Path, help="results file (default: bench/results/merge-SIZE.json)")
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)
    args = parser.parse_args()
    target = (
        args.save or ROOT / "bench" / "results" / f"merge-{args.size}{'-dogerm' if args.dogerm else ''}.json"
    )
    results = reserve_results([target], args.force, inputs=[p for p in (args.reuse,) if p])

    work = args.reuse or Path(tempfile.mkdtemp(prefix=f"lazymerge-bench-{args.size}-", dir=args.dir))
    try:
        a, b, out = work / "a", work / "b", work / "merged"
        shutil.rmtree(out, ignore_errors=True)
        if args.reuse:
            nbytes = sum(p.stat().st_size for p in a.glob("*.safetensors"))
            nbytes -= sum(int.from_bytes(p.read_bytes()[:8], "little") + 8 for p in a.glob("*.safetensors"))
        else:
            t0 = time.perf_counter()
            nbytes = write_checkpoint(a, args.size, seed=1, role="rm" if args.dogerm else "plain")
            write_checkpoint(b, args.size, seed=2, role="sft" if args.dogerm else "plain")
            print(
                f"wrote two {args.size} inputs of {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )

        lazymerge = [sys.executable, "-m", "lazymerge"]
        subprocess.run([*lazymerge, "demo"], check=True, capture_output=True, env=CHECKOUT_ENV)  # warm-up

        cmd = [*lazymerge, "run", str(a), str(b), "-o", str(out), "--alpha", "0.3", "--json", "-q"]
        cmd += ["--max-memory", args.max_memory]
        # ABBA order (floor, merge, merge, floor): whatever the disk still does after one step
        # (write-back of the last output, say) weighs on both measurements alike
        floors: list[float] = []
        merges: list[tuple[float, dict[str, int], dict]] = []
        for step in ("floor", "merge", "merge", "floor"):
            evict([a, b])
            if step == "floor":
                floors.append(io_floor([a, b], work / "floor.bin", nbytes))
            else:
                shutil.rmtree(out, ignore_errors=True)
                wall, peaks, out_json = run_sampled(cmd)
                merges.append((wall, peaks, json.loads(out_json)))
            print(f"{step}: {floors[-1] if step == 'floor' else merges[-1][2]['wall_s']:.1f} s", flush=True)
        floor = sum(floors) / len(floors)
        wall = sum(m[0] for m in merges) / len(merges)
        merge_wall = sum(m[2]["wall_s"] for m in merges) / len(merges)
        report = merges[-1][2]
        peaks = {k: max(m[1][k] for m in merges) for k in merges[0][1]}
        result = {
            "size": args.size,
            "kind": "dogerm (reward model + SFT, embeddings by token)" if args.dogerm else "plain",
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"),
            "input_bytes_each": nbytes,
            "io_floor_s": round(floor, 2),
            "io_floor_runs_s": [round(f, 2) for f in floors],
            "merge_wall_s": round(merge_wall, 2),
            "merge_runs_s": [round(m[2]["wall_s"], 2) for m in merges],
            "process_wall_s": round(wall, 2),
            "ratio_to_floor": round(merge_wall / floor, 3),
            "gb_per_s": round((report["bytes_read"] + report["bytes_written"]) / 1e9 / merge_wall, 3),
            "peak_rss_total": max(peaks["hwm"], peaks["total"]),
            "peak_rss_anon": peaks["anon"],
            "peak_rss_file": peaks["file"],
            "report_peak_rss_anon": report["peak_rss_anon"],
            "max_memory": args.max_memory,
        }
    finally:
        if args.keep or args.reuse:
            shutil.rmtree(work / "merged", ignore_errors=True)
            print(f"inputs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    gib = 2**30
    rows = [
        ("inputs", f"2 x {result['input_bytes_each'] / 1e9:.2f} GB bf16"),
        ("I/O floor (read both, write one, fsync)", f"{result['io_floor_s']:.1f} s"),
        (
            "lazymerge merge wall time",
            f"{result['merge_wall_s']:.1f} s ({result['ratio_to_floor']:.2f}x floor)",
        ),
        ("lazymerge process wall time (with start-up)", f"{result['process_wall_s']:.1f} s"),
        ("throughput (read + write)", f"{result['gb_per_s']:.2f} GB/s"),
        ("peak RSS total", f"{result['peak_rss_total'] / gib:.3f} GiB"),
        ("peak RSS anonymous", f"{result['peak_rss_anon'] / gib:.3f} GiB"),
        ("peak RSS file-backed", f"{result['peak_rss_file'] / gib:.3f} GiB"),
    ]
    print(f"machine: {result['machine']}")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    write_results(results, {target: (json.dumps(result, indent=2) + "\n").encode()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
