"""lazymerge against the mergers people use and against the disk's own limits, on one pair of models.

    python bench/compare.py --size 1b                      # two TinyLlama-1.1B-shaped bf16 models
    python bench/compare.py --size 7b --mergekit ~/.cache/lazymerge/mergekit-venv/bin/mergekit-yaml

One run, one machine, every step in a subprocess measured from outside, one after another, with
both inputs evicted from the page cache (and earlier outputs synced and dropped) before each:
- `lazymerge`: `lazymerge run A B --weights 0.7,0.3` (linear, bf16 out), then the same with
  `--max-memory 256MiB` and with `--buffered-io`;
- `naive`: both models loaded whole in fp32 with transformers, averaged, saved (fp32), as
  DogeRM's reference script does. It is stopped when its resident memory passes `--naive-cap`
  (default: physical RAM less 6 GiB), where the kernel would otherwise kill it or the machine;
  the table then says it failed and how far it got;
- `mergekit`: `mergekit-yaml` (linear, the same weights, `dtype: bfloat16`), when `--mergekit`
  names it or it is on PATH (`bash bench/setup_mergekit.sh` makes its venv);
- the disk's limits, with direct I/O (no page-cache copies, so no CPU limit): `read` (both
  inputs, one reader per input), `write` (an output of the merged size, fsynced), `sequential`
  (read, then write) and `overlapped` (reading and writing at once, as a pipelined merger can),
  plus `overlapped-buffered` (the same through the page cache). The overlapped floor, the faster
  of the two, is the physical limit the ratios are given against.

Per step: wall time, peak RSS total / anonymous / file-backed sampled every 20 ms (and the
kernel's high-water mark), bytes read and written by the process (its I/O accounting), user and
system CPU time. Writes `--json` (a list of rows), a markdown table beside it (ratios to
lazymerge) and `rss-SIZE.png` (resident memory over time, one line per step), under lazymerge's
output rule: checked before the run, atomic, an existing file replaced only with --force and
only when a bench wrote it.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
# merge_memory (torch, lazymerge) is imported where needed: a disk-limit probe is a bare process
from bench_cli import FORCE_HELP, OneLineParser, reserve_results, write_results  # noqa: E402

GIB = 2**30
MIB = 2**20
BLOCK = 64 * MIB
ALIGN = 4096
SAMPLE_S = 0.02
WEIGHTS = (0.7, 0.3)


# ---------------------------------------------------------------- the disk's limits (subprocesses)


def _direct_fd(path: Path, flags: int) -> tuple[int, bool]:
    """A descriptor with O_DIRECT where the filesystem allows it, else a buffered one."""
    try:
        return os.open(path, flags | os.O_DIRECT, 0o644), True
    except OSError:
        return os.open(path, flags, 0o644), False


def _read_file(path: Path, direct: bool) -> int:
    """Read a file in 64 MiB blocks; direct ones as 2 MiB pieces, 8 at once (as lazymerge's
    direct reads go: with no read-ahead, the disk sees only the requests issued)."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    buf = mmap.mmap(-1, BLOCK)
    fd, is_direct = _direct_fd(path, os.O_RDONLY) if direct else (os.open(path, os.O_RDONLY), False)
    size = os.fstat(fd).st_size
    piece = 2 * MIB
    total = 0
    try:
        with ThreadPoolExecutor(8) as pool:
            for offset in range(0, size, BLOCK):
                if is_direct:
                    jobs = [(memoryview(buf)[k : k + piece], offset + k) for k in range(0, BLOCK, piece)]
                    total += sum(pool.map(lambda job: os.preadv(fd, [job[0]], job[1]), jobs))
                else:
                    total += os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return total


def _read_all(files: list[list[Path]], direct: bool) -> None:
    """One reader thread per input, each reading its files in order."""
    threads = [threading.Thread(target=lambda fs=fs: [_read_file(f, direct) for f in fs]) for fs in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _write(path: Path, nbytes: int, direct: bool) -> None:
    import mmap

    buf = mmap.mmap(-1, BLOCK)
    buf.write(os.urandom(MIB) * (BLOCK // MIB))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd, is_direct = _direct_fd(path, flags) if direct else (os.open(path, flags, 0o644), False)
    try:
        done = 0
        aligned = nbytes // ALIGN * ALIGN if is_direct else nbytes
        while done < aligned:
            done += os.pwrite(fd, memoryview(buf)[: min(BLOCK, aligned - done)], done)
        if done < nbytes:  # the last partial block, through the page cache
            tail = os.open(path, os.O_WRONLY)
            os.pwrite(tail, memoryview(buf)[: nbytes - done], done)
            os.close(tail)
        os.fsync(fd)
    finally:
        os.close(fd)


def probe(kind: str, inputs: list[Path], out: Path, nbytes: int) -> None:
    files = [sorted(p.glob("*.safetensors")) for p in inputs]
    direct = not kind.endswith("-buffered")
    kind = kind.removesuffix("-buffered")
    if kind in ("read", "sequential"):
        _read_all(files, direct)
    if kind in ("write", "sequential"):
        _write(out, nbytes, direct)
    if kind == "overlapped":
        writer = threading.Thread(target=_write, args=(out, nbytes, direct))
        writer.start()
        _read_all(files, direct)
        writer.join()


# ---------------------------------------------------------------- the naive merge (a subprocess)


def naive(inputs: list[Path], out: Path) -> None:
    """DogeRM's reference recipe: both models whole in fp32, averaged parameter by parameter,
    saved with save_pretrained (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(inputs[0], dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(inputs[1], dtype=torch.float32)
    other = b.state_dict()
    with torch.no_grad():
        for name, param in a.state_dict().items():
            param.mul_(WEIGHTS[0]).add_(other[name], alpha=WEIGHTS[1])
    a.save_pretrained(out)


# ---------------------------------------------------------------- measuring a step from outside


def measure(tool: str, cmd: list[str], cap: int | None = None, env: dict | None = None) -> dict:
    """Run `cmd`, sampling its memory every SAMPLE_S; its CPU time and block I/O from wait4."""
    start = time.perf_counter()
    from merge_memory import CHECKOUT_ENV
    from merge_memory import status as proc_status

    proc = subprocess.Popen(cmd, env=env or CHECKOUT_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    series: list[tuple[float, int, int, int]] = []
    peaks = {"total": 0, "anon": 0, "file": 0, "hwm": 0}
    capped = threading.Event()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            f = proc_status(proc.pid)
            if "VmRSS" in f:
                total, anon = f["VmRSS"], f.get("RssAnon", 0)
                file = f.get("RssFile", 0) + f.get("RssShmem", 0)
                series.append((time.perf_counter() - start, total, anon, file))
                for key, value in (
                    ("total", total),
                    ("anon", anon),
                    ("file", file),
                    ("hwm", f.get("VmHWM", 0)),
                ):
                    peaks[key] = max(peaks[key], value)
                if cap is not None and total > cap and not capped.is_set():
                    capped.set()
                    proc.kill()
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if capped.is_set():
        state = f"failed: stopped at the {cap / GIB:.0f} GiB cap (physical RAM {_ram() / GIB:.0f} GiB)"
    elif proc.returncode != 0:
        last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["?"]
        state = f"failed (exit {proc.returncode}): {last[0][:200]}"
    else:
        state = "ok"
    row = {
        "tool": tool,
        "status": state,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(max(peaks["total"], peaks["hwm"]) / MIB, 1),
        "peak_anon_mb": round(peaks["anon"] / MIB, 1),
        "peak_file_mb": round(peaks["file"] / MIB, 1),
        "cpu_user_s": round(usage.ru_utime, 2),
        "cpu_sys_s": round(usage.ru_stime, 2),
        # the kernel's block I/O accounting, in 512-byte units: what reached the disk
        "read_mb": round(usage.ru_inblock * 512 / MIB, 1),
        "written_mb": round(usage.ru_oublock * 512 / MIB, 1),
        "series": [(round(t, 3), total, anon, file) for t, total, anon, file in series],
    }
    print(
        f"{tool:22s} {state[:60]:60s} {wall:8.1f} s  peak {row['peak_rss_mb']:9.0f} MiB "
        f"(anon {row['peak_anon_mb']:.0f}, file {row['peak_file_mb']:.0f})",
        flush=True,
    )
    return row


def _ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def causal_lm_files(folder: Path, size: str) -> None:
    """config.json and tokenizer.json of a Llama causal LM (what transformers and mergekit load)."""
    from merge_memory import SIZES

    dims = SIZES[size]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["hidden"] // 64,
        "num_key_value_heads": dims["kv_hidden"] // 64,
        "vocab_size": dims["vocab"],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    vocab = {f"t{i}": i for i in range(dims["vocab"])}
    tokenizer = {
        "version": "1.0",
        "added_tokens": [],
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


def settle(paths: list[Path]) -> None:
    """Sync everything, then drop these files from the page cache: each step starts cold."""
    from merge_memory import evict

    os.sync()
    evict([p for p in paths if p.exists()])


def table(rows: list[dict], floor: float) -> str:
    lazy = next((r for r in rows if r["tool"] == "lazymerge" and r["status"] == "ok"), None)
    lines = [
        "| step | status | wall s | x overlapped floor | x lazymerge time | peak RSS MiB (anon / file) "
        "| x lazymerge RSS | CPU user / sys s | read / written MiB |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | --- | --- |",
    ]
    for r in rows:
        t_ratio = f"{r['wall_s'] / lazy['wall_s']:.2f}" if lazy else "-"
        m_ratio = f"{r['peak_rss_mb'] / lazy['peak_rss_mb']:.1f}" if lazy else "-"
        lines.append(
            f"| {r['tool']} | {r['status']} | {r['wall_s']:.1f} | {r['wall_s'] / floor:.2f} | {t_ratio} "
            f"| {r['peak_rss_mb']:.0f} ({r['peak_anon_mb']:.0f} / {r['peak_file_mb']:.0f}) | {m_ratio} "
            f"| {r['cpu_user_s']:.1f} / {r['cpu_sys_s']:.1f} | {r['read_mb']:.0f} / {r['written_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], title: str) -> bytes:
    """The resident-memory plot as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for r in rows:
        if r["series"] and not r["tool"].startswith(("read", "write", "sequential")):
            ts = [s[0] for s in r["series"]]
            ax.plot(ts, [s[1] / GIB for s in r["series"]], label=f"{r['tool']} ({r['status'].split(':')[0]})")
    ax.set_xlabel("seconds since the step started")
    ax.set_ylabel("resident memory, GiB (total)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["1b", "7b"], default="1b")
    parser.add_argument("--mergekit", help="path of mergekit-yaml (default: on PATH, else skipped)")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="results file (default: bench/results/compare-SIZE.json)")
    parser.add_argument("--reuse", type=Path, help="a work folder kept by --keep: skip writing the inputs")
    parser.add_argument("--keep", action="store_true", help="keep the generated inputs")
    parser.add_argument("--naive-cap", type=float, help="GiB of RSS at which the naive merge is stopped")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out")
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="*", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe, args.inputs, args.out, args.bytes)
    if args.naive:
        return naive(args.inputs, args.out)
    target = args.json or ROOT / "bench" / "results" / f"compare-{args.size}.json"
    outputs = [target, target.with_suffix(".md"), target.with_name(f"rss-{args.size}.png")]
    results = reserve_results(outputs, args.force, inputs=[p for p in (args.reuse,) if p])
    from merge_memory import CHECKOUT_ENV, machine, write_checkpoint

    mergekit = args.mergekit or shutil.which("mergekit-yaml")
    skip = set(filter(None, args.skip.split(",")))
    work = (
        args.reuse or Path(tempfile.mkdtemp(prefix=f"lazymerge-compare-{args.size}-", dir=args.dir))
    ).resolve()
    a, b = work / "a", work / "b"
    rows: list[dict] = []
    try:
        if args.reuse is None:
            t0 = time.perf_counter()
            write_checkpoint(a, args.size, seed=1)
            write_checkpoint(b, args.size, seed=2)
            print(f"wrote the inputs in {time.perf_counter() - t0:.1f} s", flush=True)
        for folder in (a, b):
            causal_lm_files(folder, args.size)
        data = sum(p.stat().st_size for p in a.glob("*.safetensors"))
        me = [sys.executable, str(Path(__file__).resolve())]
        lazymerge = [sys.executable, "-m", "lazymerge"]
        subprocess.run([*lazymerge, "demo"], check=True, capture_output=True, env=CHECKOUT_ENV)  # warm-up
        cap = int((args.naive_cap or max(1.0, _ram() / GIB - 6)) * GIB)
        config = work / "mergekit.yml"
        config.write_text(
            "merge_method: linear\ndtype: bfloat16\nmodels:\n"
            f"  - model: {a}\n    parameters:\n      weight: {WEIGHTS[0]}\n"
            f"  - model: {b}\n    parameters:\n      weight: {WEIGHTS[1]}\n"
        )
        steps: list[tuple[str, list[str], dict]] = [
            (
                kind,
                [
                    *me,
                    "--probe",
                    kind,
                    "--inputs",
                    str(a),
                    str(b),
                    "--out",
                    str(work / "out"),
                    "--bytes",
                    str(data),
                ],
                {},
            )
            for kind in ("read", "write", "sequential", "overlapped", "overlapped-buffered")
        ]
        lazy_run = [*lazymerge, "run", str(a), str(b), "-o", str(work / "out"), "--weights", "0.7,0.3", "-q"]
        steps.append(("lazymerge", lazy_run, {}))
        # the same merge with the former default budget, and through the page cache
        steps.append(("lazymerge --max-memory 256MiB", [*lazy_run, "--max-memory", "256MiB"], {}))
        steps.append(("lazymerge --buffered-io", [*lazy_run, "--buffered-io"], {}))
        if mergekit:
            steps.append(
                (
                    "mergekit",
                    [mergekit, str(config), str(work / "out"), "--no-copy-tokenizer"],
                    {"env": {**os.environ, "HF_HUB_OFFLINE": "1"}},
                )
            )
        else:
            print("mergekit: not found (give --mergekit or run bench/setup_mergekit.sh); skipped", flush=True)
        steps.append(
            ("naive", [*me, "--naive", "--inputs", str(a), str(b), "--out", str(work / "out")], {"cap": cap})
        )
        for tool, cmd, kw in steps:
            if tool in skip:
                continue
            shutil.rmtree(work / "out", ignore_errors=True)
            (work / "out").unlink(missing_ok=True) if (work / "out").is_file() else None
            settle([a, b])
            rows.append(measure(tool, cmd, **kw))
            out = work / "out"
            if out.is_dir():
                rows[-1]["output_mb"] = round(
                    sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / MIB, 1
                )
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    finally:
        if not (args.keep or args.reuse):
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "out", ignore_errors=True)
            print(f"inputs kept in {work}")

    overlapped = [r["wall_s"] for r in rows if r["tool"].startswith("overlapped") and r["status"] == "ok"]
    floor = min(overlapped) if overlapped else float("nan")
    for r in rows:
        r["x_overlapped_floor"] = round(r["wall_s"] / floor, 3)
    meta = {
        "size": args.size,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "platform": platform.platform(),
        "input_bytes_each": data,
        "overlapped_floor_s": floor,
    }
    doc = {**meta, "rows": rows}
    md = table(rows, floor)
    title = f"Resident memory, two {args.size} bf16 models ({data / 1e9:.1f} GB each)"
    write_results(
        results,
        {
            # a list of rows, each carrying the run's facts beside its own
            outputs[0]: (json.dumps([{**r, **meta} for r in rows]) + "\n").encode(),
            outputs[1]: (
                f"{doc['machine']}, {doc['date']}; two {args.size} bf16 inputs of {data / 1e9:.2f} GB\n\n{md}"
            ).encode(),
            outputs[2]: plot(rows, title),
        },
    )
    print(md)
    print(f"wrote {', '.join(map(str, outputs))}")


if __name__ == "__main__":
    main()
