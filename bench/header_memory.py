"""What a header of many tensors costs `lazymerge plan`: peak RSS (total, anonymous, file-backed)
and time for two inputs of N one-element tensors each, against the same command on a
one-tensor pair (the interpreter and its imports), so the difference is the headers' and the
plan's own memory, per tensor.

    python bench/header_memory.py [--tensors 600000] [--runs 3]

Builds both inputs in a temporary folder (header written directly, F32 data), runs `lazymerge
plan A B -o OUT` and `lazymerge plan --json A B -o OUT` in subprocesses, each sampled from
outside every 10 ms (/proc/PID/status: VmRSS, RssAnon, RssFile), median of --runs runs. Linux
only. Writes nothing outside its temporary folder.
"""

from __future__ import annotations

import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cli import OneLineParser, cpu_name, fail  # noqa: E402


def build(path: Path, tensors: int, seed: int) -> None:
    """A safetensors file of `tensors` one-element F32 tensors named t0, t1, ..."""
    parts = ['"__metadata__":{"format":"pt"}']
    parts += [
        f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}' for i in range(tensors)
    ]
    raw = ("{" + ",".join(parts) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.write(struct.pack("<f", float(seed)) * tensors)


def status_kib(pid: int) -> tuple[int, int, int] | None:
    """(VmRSS, RssAnon, RssFile) of `pid` in KiB, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        return tuple(int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile"))  # type: ignore[return-value]
    except (KeyError, ValueError):
        return None


def measure(args: list[str]) -> tuple[float, tuple[int, int, int]]:
    """Wall seconds and the peak (total, anon, file) bytes of `python -m lazymerge ARGS`; the
    three peaks are each taken at the sample where the total peaked."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lazymerge", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    peak = (0, 0, 0)
    while proc.poll() is None:
        sample = status_kib(proc.pid)
        if sample is not None and sample[0] > peak[0]:
            peak = sample
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        stderr = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        fail(f"lazymerge {' '.join(args[:2])} ... exited {proc.returncode}: {stderr[-300:]}")
    return wall, (peak[0] * 1024, peak[1] * 1024, peak[2] * 1024)


def median_run(args: list[str], runs: int) -> tuple[float, tuple[int, int, int]]:
    results = [measure(args) for _ in range(runs)]
    wall = statistics.median(r[0] for r in results)
    peaks = sorted((r[1] for r in results), key=lambda p: p[0])
    return wall, peaks[len(peaks) // 2]


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=600_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not 1 <= args.tensors <= 1_000_000 or args.runs < 1:
        parser.error("--tensors must be in [1, 1000000] (lazymerge's cap per input) and --runs at least 1")
    if not Path("/proc/self/status").exists():
        fail("this bench reads /proc/PID/status (Linux)")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = []
        for label, n in (("1 tensor", 1), (f"{args.tensors:,} tensors", args.tensors)):
            a, b = folder / f"a{n}.safetensors", folder / f"b{n}.safetensors"
            build(a, n, 1)
            build(b, n, 2)
            out = str(folder / f"out{n}.safetensors")
            for command in (["plan"], ["plan", "--json"]):
                wall, peak = median_run([*command, str(a), str(b), "-o", out], args.runs)
                rows.append((label, " ".join(command), n, wall, peak))
    base = {command: peak for label, command, n, wall, peak in rows if n == 1}
    print(f"two inputs, one-element F32 tensors; median of {args.runs} runs, RSS sampled every 10 ms")
    for label, command, n, wall, (total, anon, file) in rows:
        line = f"{command:<12} {label:>18}: {wall:6.2f} s, peak RSS {gb(total)} (anon {gb(anon)}, file {gb(file)})"
        if n > 1:
            extra = total - base[command][0]
            line += f"; {extra / (2 * n):.0f} B per input tensor above the 1-tensor run"
        print(line)


if __name__ == "__main__":
    main()
