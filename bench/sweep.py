"""A lazy sweep against the write-and-load sweep, on a 1.1B-shaped reward model and SFT model.

    python bench/sweep.py                      # 5 points, 1.1B-shaped bf16 models, CPU
    python bench/sweep.py --pairs 24 --tokens 256 --device cuda

Steps, in one run on one machine:
1. Write a TinyLlama-1.1B-shaped reward model (score head) and SFT model (lm_head, one more
   token, `[PAD]`) with random bf16 weights, tensor by tensor (never whole in RAM), plus configs
   and a word-level tokenizer; and `--pairs` preference pairs of about `--tokens` tokens each.
2. `lazymerge sweep RM SFT --alpha 0:1:0.25` twice in subprocesses, RSS sampled from outside
   every 5 ms: in memory (the default) and with `--write` (each merged checkpoint written, then
   loaded by transformers, as a write-and-load sweep does).
3. Per point, from the sweep's own results.jsonl: build time (merge + load, everything outside
   scoring), scoring time, model bytes written, the process's peak RSS.
Results print as a table and are saved as JSON (--save, default bench/results/sweep-<size>.json;
checked before the run, atomic, an existing file replaced only with --force and only when a bench
wrote it). Targets (from
the project's issue): build time per point at most half of the write-and-load path's, 0 bytes of
model written, peak RSS at most the model in the compute dtype + --max-memory + 0.5 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_cli import FORCE_HELP, OneLineParser, reserve_results, write_results  # noqa: E402
from merge_memory import CHECKOUT_ENV, SIZES, run_sampled, write_checkpoint  # noqa: E402

HEADS = {"1b": (32, 4), "7b": (32, 32)}
#: Most pairs and tokens per pair a run may ask for: the pairs file is written before the models
#: are scored, so an absurd value would fill the disk rather than fail.
MAX_PAIRS = 100_000
MAX_TOKENS = 100_000


def bounded_int(low: int, high: int):
    """An argparse type: an integer from `low` to `high`, else a one-line usage error (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high:,}")
        return value

    parse.__name__ = "integer"  # (argparse names the type in its message)
    return parse


def lazymerge_option(check):
    """An argparse type from one of lazymerge's own option parsers (OptionError -> exit 2)."""

    def parse(text: str) -> str:
        from lazymerge.errors import OptionError

        try:
            check(text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    parse.__name__ = "value"
    return parse


def alpha_text(text: str) -> None:
    from lazymerge.options import parse_alpha

    parse_alpha(text)


def size_text(text: str) -> None:
    from lazymerge.options import parse_size

    parse_size(text)


def device_text(text: str) -> None:
    from lazymerge.errors import OptionError

    if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", text):  # (as `lazymerge sweep --device` checks)
        raise OptionError(f"{text!r}: choose cpu, cuda or cuda:N")


def model_files(folder: Path, size: str, role: str) -> None:
    """A config transformers builds from, and a whitespace word-level tokenizer (t0..t31999)."""
    dims = SIZES[size]
    heads, kv_heads = HEADS[size]
    vocab = dims["vocab"] + (role == "sft")
    config = {
        "architectures": ["LlamaForSequenceClassification" if role == "rm" else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 2048,
        "vocab_size": vocab,
        "pad_token_id": 2,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "torch_dtype": "bfloat16",
    }
    added = [
        {"id": 0, "content": "<unk>", "special": True},
        {"id": 1, "content": "<s>", "special": True},
        {"id": 2, "content": "</s>", "special": True},
    ]
    if role == "sft":
        added.append({"id": dims["vocab"], "content": "[PAD]", "special": True})
    for a in added:
        a.update(single_word=False, lstrip=False, rstrip=False, normalized=False)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, dims["vocab"])}}
    tokenizer = {
        "version": "1.0",
        "added_tokens": added,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"},
    }
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))


def write_pairs(path: Path, count: int, tokens: int, vocab: int) -> None:
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(f"t{rng.randint(3, vocab - 1)}" for _ in range(n))

    with open(path, "w") as fh:
        for i in range(count):
            row = {
                "prompt": text(tokens // 2),
                "chosen": text(tokens // 2),
                "rejected": text(tokens // 2),
                "subset": "math-prm" if i % 2 else "hep-python",
                "id": f"p{i}",
            }
            fh.write(json.dumps(row) + "\n")


def sweep(
    rm: Path,
    sft: Path,
    pairs: Path,
    out: Path,
    args: argparse.Namespace,
    write: bool,
    ray_address: str | None = None,
    resident: str = "off",
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "lazymerge",
        "sweep",
        str(rm),
        str(sft),
        "--pairs",
        str(pairs),
        "--alpha",
        args.alpha,
        "-o",
        str(out),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--batch-size",
        "8",
        "-q",
        "--max-memory",
        args.max_memory,
    ]
    cmd += ["--resident", resident]
    if write:
        cmd.append("--write")
    if ray_address is not None:
        cmd += ["--ray", ray_address, "--ray-cpus", "1"]
    wall, peaks, _ = run_sampled(cmd)
    points = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[1:]]
    return {
        "mode": "ray"
        if ray_address
        else ("write+load" if write else "resident" if resident == "on" else "in-memory"),
        "wall_s": round(wall, 2),
        "peak_rss_total": peaks["total"],
        "peak_rss_anon": peaks["anon"],
        "peak_rss_file": peaks["file"],
        "points": [
            {
                k: p.get(k)
                for k in (
                    "label",
                    "build_s",
                    "score_s",
                    "bytes_written",
                    "peak_rss",
                    "peak_gpu_memory",
                    "resident_read_s",
                )
            }
            for p in points
        ],
    }


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(HEADS), default="1b")
    # every value checked here, before any model is written (a bad one failed after minutes)
    parser.add_argument("--alpha", type=lazymerge_option(alpha_text), default="0:1:0.25")
    parser.add_argument("--pairs", type=bounded_int(1, MAX_PAIRS), default=8)
    parser.add_argument("--tokens", type=bounded_int(2, MAX_TOKENS), default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--device", type=lazymerge_option(device_text), default="cpu")
    parser.add_argument("--max-memory", type=lazymerge_option(size_text), default="160MiB")
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--reuse", type=Path, help="a folder kept by a previous run: skip writing the models")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--save", type=Path, help="where the JSON goes (default: bench/results/sweep-SIZE.json)"
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="also run the sweep on a local Ray instance with 2 workers (1 CPU each)",
    )
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)
    args = parser.parse_args()
    for flag, folder in (("--dir", args.dir), ("--reuse", args.reuse)):
        if folder is not None and not folder.is_dir():
            parser.error(f"argument {flag}: {folder} is not a folder")
    target = args.save or ROOT / "bench" / "results" / f"sweep-{args.size}.json"
    results = reserve_results([target], args.force, inputs=[p for p in (args.reuse,) if p])
    work = args.reuse or Path(tempfile.mkdtemp(prefix=f"lazymerge-sweep-bench-{args.size}-", dir=args.dir))
    rm, sft = work / "rm", work / "sft"
    try:
        if args.reuse is None:
            t0 = time.perf_counter()
            write_checkpoint(rm, args.size, seed=1, role="rm")
            write_checkpoint(sft, args.size, seed=2, role="sft")
            print(f"wrote the models in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        model_files(rm, args.size, "rm")
        model_files(sft, args.size, "sft")
        pairs = work / "pairs.jsonl"
        write_pairs(pairs, args.pairs, args.tokens, SIZES[args.size]["vocab"])
        subprocess_env_warmup(rm, sft, pairs, work)
        rows = []
        for write in (False, True):
            out = work / ("sweep-write" if write else "sweep-memory")
            shutil.rmtree(out, ignore_errors=True)
            rows.append(sweep(rm, sft, pairs, out, args, write))
            shutil.rmtree(out / "models", ignore_errors=True)
        out = work / "sweep-resident"
        shutil.rmtree(out, ignore_errors=True)
        rows.append(sweep(rm, sft, pairs, out, args, False, resident="on"))
        rows[-1]["same_results_as_in_memory"] = points_without_timing(
            work / "sweep-memory"
        ) == points_without_timing(out)
        if args.ray:
            out = work / "sweep-ray"
            shutil.rmtree(out, ignore_errors=True)
            with local_ray(workers=2) as address:
                rows.append(sweep(rm, sft, pairs, out, args, False, address))
            same = points_without_timing(work / "sweep-memory") == points_without_timing(out)
            rows[-1]["same_results_as_local"] = same
        model_bytes = sum(p.stat().st_size for p in rm.glob("*.safetensors"))
        result = {
            "size": args.size,
            "machine": f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"),
            "settings": vars(args) | {"dir": None, "reuse": None, "save": None, "force": None},
            "model_bytes_bf16": model_bytes,
            "runs": rows,
        }
        for row in rows:
            builds = [p["build_s"] for p in row["points"]]
            row["mean_build_s"] = round(sum(builds) / len(builds), 2)
            row["mean_score_s"] = round(sum(p["score_s"] for p in row["points"]) / len(builds), 2)
            row["bytes_written"] = sum(p["bytes_written"] for p in row["points"])
            # whitespace tokens per pair text, both texts of each pair, plus the chat format's few
            row["score_tokens_per_s"] = round(
                2 * args.pairs * args.tokens / max(row["mean_score_s"], 1e-9), 1
            )
        mem, wr, held = rows[0], rows[1], rows[2]
        result["build_ratio"] = round(mem["mean_build_s"] / wr["mean_build_s"], 3)
        # the first point of a sweep pays one-time costs (and, resident, builds the model the
        # others rewrite in place): compare the later points with the later points
        for row in (mem, held):
            later = [p["build_s"] for p in row["points"][1:]] or [row["points"][0]["build_s"]]
            row["later_build_s"] = round(sum(later) / len(later), 3)
            row["later_build_share_of_score"] = round(
                row["later_build_s"] / max(row["mean_score_s"], 1e-9), 4
            )
        result["resident_build_ratio"] = round(held["later_build_s"] / mem["later_build_s"], 3)
        if args.ray:
            ray_row = rows[3]
            busy = sum(p["build_s"] + p["score_s"] for p in ray_row["points"])
            # worker time not spent merging or scoring: task start, imports in fresh workers,
            # shipping texts and results
            ray_row["overhead_per_point_s"] = round(
                (ray_row["wall_s"] * 2 - busy) / len(ray_row["points"]), 2
            )
        print(
            f"{'mode':12s} {'build s/pt':>10s} {'score s/pt':>10s} {'model bytes written':>20s} {'peak RSS total/anon/file GiB':>30s}"
        )
        for row in rows:
            print(
                f"{row['mode']:12s} {row['mean_build_s']:10.2f} {row['mean_score_s']:10.2f} {row['bytes_written']:20d} "
                f"{row['peak_rss_total'] / 2**30:10.2f} / {row['peak_rss_anon'] / 2**30:.2f} / {row['peak_rss_file'] / 2**30:.2f}"
            )
        print(f"in-memory build time is {result['build_ratio']:.2f}x the write-and-load path's")
        print(
            f"resident: later points build in {held['later_build_s']:.2f} s ({result['resident_build_ratio']:.2f}x "
            f"the in-memory sweep's later points, {100 * held['later_build_share_of_score']:.1f}% of scoring "
            f"against {100 * mem['later_build_share_of_score']:.1f}%); "
            f"same results: {held['same_results_as_in_memory']}"
        )
        write_results(results, {target: (json.dumps(result, indent=2) + "\n").encode()})
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    finally:
        if not args.keep and args.reuse is None:
            shutil.rmtree(work, ignore_errors=True)


def points_without_timing(out: Path) -> list[dict]:
    points = json.loads((out / "results.json").read_text())["points"]
    return [{k: v for k, v in p.items() if k != "timing"} for p in points]


@contextlib.contextmanager
def local_ray(workers: int):
    """A Ray head on this machine (its own process group and temp folder), stopped afterwards."""
    import signal
    import socket
    import subprocess

    temp = tempfile.mkdtemp(prefix="lmray", dir="/tmp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--num-cpus={workers}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    CHECKOUT_ENV["RAY_AUTH_MODE"] = "disabled"  # the sweeps run with this environment
    try:
        for _ in range(120):
            if (
                subprocess.run(
                    ["ray", "status", f"--address={address}"], capture_output=True, env=env
                ).returncode
                == 0
            ):
                break
            time.sleep(0.5)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if temp.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        time.sleep(1)
        shutil.rmtree(temp, ignore_errors=True)


def subprocess_env_warmup(rm: Path, sft: Path, pairs: Path, work: Path) -> None:
    """Import torch and transformers once so the first measured run does not pay for the cold cache."""
    import subprocess

    subprocess.run([sys.executable, "-c", "import torch, transformers"], check=True, env=CHECKOUT_ENV)


if __name__ == "__main__":
    main()
