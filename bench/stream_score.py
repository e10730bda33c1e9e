"""In-memory against layer-streamed scoring of a merged reward model, at a small generated shape.

Generates a random Llama-shaped reward model and domain model (bf16 safetensors, word-level
tokenizers; the domain model grows `[PAD]` as MetaMath's does) inside `--out`, then scores the
same random texts with the DogeRM merge (a) built in memory (`load_merged_reward_model`,
whole texts, no prefix cache) and (b) streamed layer by layer (`--stream-layers`), each run in
its own process so that peaks do not mix, `--repeat` times each. Reports, per mode, the median
wall time (load, score) and peak RSS (total, anonymous, file-backed: psutil's
`memory_full_info`, anonymous = rss - shared), and for the streamed runs the time per layer
split into read, merge and compute with the prediction beside the measured peaks. The rewards of
the two modes are compared to the bit.

Writes `OUT/results.json` and `OUT/results.md` (atomically, under lazymerge's output rule:
existing results only with --force, and only ones a bench wrote); the generated models live in
a temporary folder inside OUT, removed at the end, also after a failure.

    python bench/stream_score.py --out bench/results/stream-score-small
    python bench/stream_score.py --shape 1.1b --dtype bfloat16 --out bench/results/stream-score-1b
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import FORCE_HELP, OneLineParser, fail, reserve_results, write_results  # noqa: E402

SHAPE = {"hidden": 1024, "intermediate": 2816, "layers": 8, "heads": 16, "kv_heads": 4, "vocab": 8000}
#: Named shapes: `small` (the defaults) and TinyLlama-1.1B's, where both modes fit in RAM (the
#: issue's 7B shape needs weights written tensor by tensor, which this bench does not do yet).
SHAPES = {
    "small": SHAPE,
    "1.1b": {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "vocab": 32000},
}


def parse_args(argv: list[str] | None = None) -> Any:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results folder (created)")
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)
    parser.add_argument("--texts", type=int, default=16, help="texts scored (default 16)")
    parser.add_argument("--tokens", type=int, default=192, help="longest text in tokens (default 192)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode; medians reported (default 3)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per batch (default 8)")
    parser.add_argument("--shape", choices=SHAPES, default="small", help="named shape (default small)")
    for name, value in SHAPE.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, help=f"override the shape's (small: {value})"
        )
    parser.add_argument("--child", nargs=2, metavar=("MODE", "MODELS"), help=argparse_hidden())
    args = parser.parse_args(argv)
    for name, value in SHAPES[args.shape].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("texts", "tokens", "repeat", "batch_size", *SHAPE):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def make_models(folder: Path, args: Any) -> list[Path]:
    """A bf16 reward model and a domain model of the requested shape, with tokenizers."""
    import tokenizers
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its shard bars would mix with the table
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(args.vocab - 3)]
    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        pad_token_id=2,
        num_labels=1,
    )
    paths = []
    for name, cls, extra in (
        ("rm", transformers.LlamaForSequenceClassification, []),
        ("sft", transformers.LlamaForCausalLM, ["[PAD]"]),
    ):
        torch.manual_seed(len(paths))
        cfg = config.__class__(**{**config.to_dict(), "vocab_size": args.vocab + len(extra)})
        model = cls(cfg).to(torch.bfloat16)
        model.save_pretrained(folder / name)
        tok = tokenizers.Tokenizer(
            tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
        )
        tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        )
        if extra:
            fast.add_special_tokens({"additional_special_tokens": extra})
        fast.save_pretrained(folder / name)
        paths.append(folder / name)
        del model
    return paths


def texts(args: Any) -> dict[str, list[int]]:
    """Random token ids (never the pad id 2), lengths from a third of `--tokens` up to it."""
    import random

    rng = random.Random(0)
    out = {}
    for i in range(args.texts):
        n = max(1, args.tokens - (i * (2 * args.tokens // 3)) // max(1, args.texts - 1))
        out[f"t{i}"] = [1] + [rng.randrange(3, args.vocab) for _ in range(n - 1)]
    return out


class PeakSampler:
    """Peak RSS of this process, sampled in a thread from psutil's `memory_full_info`."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = {"total": 0, "anonymous": 0, "file": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _take(self) -> None:
        info = self.process.memory_full_info()
        for key, value in (("total", info.rss), ("anonymous", info.rss - info.shared), ("file", info.shared)):
            self.peak[key] = max(self.peak[key], value)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self._take()

    def __enter__(self) -> PeakSampler:
        self._take()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._take()


def child(mode: str, models: Path, args: Any) -> dict[str, Any]:
    """One scoring run in this process: load (merge), score, and what it measured."""
    from lazymerge.evaluation.in_memory import load_merged_reward_model
    from lazymerge.evaluation.layer_stream import predict_stream
    from lazymerge.evaluation.prefix_scoring import default_batch_tokens
    from lazymerge.options import MergeOptions

    encoded = texts(args)
    streamed = mode == "streamed"
    options = MergeOptions(alphas=(0.3,))
    with PeakSampler() as sampler:
        t0 = time.perf_counter()
        scorer = load_merged_reward_model(
            [models / "rm", models / "sft"],
            options,
            dtype=args.dtype,
            prefix_cache=False,
            batch_size=args.batch_size,
            stream_layers=streamed,
        )
        t1 = time.perf_counter()
        rewards = scorer.score_encoded(encoded)
        t2 = time.perf_counter()
    out: dict[str, Any] = {
        "load_s": t1 - t0,
        "score_s": t2 - t1,
        "peak_rss": sampler.peak,
        "rewards": rewards,
    }
    if streamed:
        model, stats = scorer.model, scorer.model.stream_stats
        budget = scorer.batch_tokens or default_batch_tokens("cpu")
        prediction = predict_stream(model, encoded, budget, args.batch_size)
        out["prediction"] = {**prediction.to_dict(), "line": prediction.format()}
        out["layers"] = [t.__dict__ for t in stats.timings]
        out["peak_weight_bytes"] = stats.peak_weight_bytes
    return out


def run_child(mode: str, models: Path, argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--child", mode, str(models)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        fail(f"the {mode} run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per mode, the streamed per-layer split, and whether the rewards agree."""

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    out: dict[str, Any] = {
        "identical_rewards": runs["in-memory"][0]["rewards"] == runs["streamed"][0]["rewards"]
    }
    for mode in runs:
        peaks = {
            k: statistics.median(r["peak_rss"][k] for r in runs[mode]) for k in ("total", "anonymous", "file")
        }
        out[mode] = {"load_s": med(mode, "load_s"), "score_s": med(mode, "score_s"), "peak_rss": peaks}
        out[mode]["wall_s"] = out[mode]["load_s"] + out[mode]["score_s"]
    layers = [r["layers"] for r in runs["streamed"]]
    out["streamed"]["per_group"] = [
        {
            "label": group[0]["label"],
            **{
                k: statistics.median(g[k] for g in group)
                for k in ("read_s", "merge_s", "wait_s", "compute_s")
            },
        }
        for group in zip(*layers, strict=True)
    ]
    out["streamed"]["prediction"] = runs["streamed"][0]["prediction"]
    out["streamed"]["peak_weight_bytes"] = runs["streamed"][0]["peak_weight_bytes"]
    # the same texts in both: throughput is the inverse of the time (load+merge and score)
    out["throughput_ratio"] = out["in-memory"]["wall_s"] / out["streamed"]["wall_s"]
    out["score_throughput_ratio"] = out["in-memory"]["score_s"] / out["streamed"]["score_s"]
    out["predicted_over_measured_peak"] = (
        out["streamed"]["prediction"]["host_peak"] / out["streamed"]["peak_rss"]["total"]
    )
    return out


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    mib = 2**20
    lines = [
        f"# Layer-streamed scoring, {meta['shape']}",
        "",
        f"Machine: {meta['machine']}. {meta['texts']} texts, {meta['tokens']} tokens, compute {meta['dtype']}, "
        f"medians of {meta['repeat']} runs each, page cache warm. Rewards identical: {summary['identical_rewards']}.",
        "",
        "| mode | load+merge s | score s | wall s | peak RSS MiB | anonymous MiB | file-backed MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("in-memory", "streamed"):
        m = summary[mode]
        p = m["peak_rss"]
        lines.append(
            f"| {mode} | {m['load_s']:.2f} | {m['score_s']:.2f} | {m['wall_s']:.2f} | {p['total'] / mib:.0f} "
            f"| {p['anonymous'] / mib:.0f} | {p['file'] / mib:.0f} |"
        )
    lines += [
        "",
        f"Streamed throughput {summary['throughput_ratio']:.0%} of in-memory (load+merge and score; "
        f"scoring alone {summary['score_throughput_ratio']:.0%}).",
        "",
        f"Prediction: {summary['streamed']['prediction']['line']}; "
        f"{summary['predicted_over_measured_peak']:.0%} of the measured peak RSS.",
        "",
    ]
    lines += ["| group | read s | merge s | wait s | compute s |", "|---|---|---|---|---|"]
    for g in summary["streamed"]["per_group"]:
        lines.append(
            f"| {g['label']} | {g['read_s']:.3f} | {g['merge_s']:.3f} | {g['wait_s']:.3f} | {g['compute_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {model}, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args)))
        return
    results = [args.out / "results.json", args.out / "results.md"]
    reserved = reserve_results(results, args.force)
    passed = [a for a in argv if a not in ("--force",)]
    with tempfile.TemporaryDirectory(prefix=".models-", dir=args.out) as tmp:
        models = Path(tmp)
        make_models(models, args)
        for path in models.rglob("*.safetensors"):  # warm the page cache: both modes read warm
            path.read_bytes()
        runs: dict[str, list[dict[str, Any]]] = {"in-memory": [], "streamed": []}
        for _ in range(args.repeat):
            for mode in runs:  # alternated, so a neighbour's load falls on both alike
                runs[mode].append(run_child(mode, models, passed))
    summary = summarise(runs)
    shape = ", ".join(f"{k} {getattr(args, k)}" for k in SHAPE)
    meta = {
        "machine": machine(),
        "shape": shape,
        **{k: getattr(args, k) for k in ("texts", "tokens", "dtype", "repeat")},
    }
    doc = {"bench": "stream_score", **meta, **summary}
    write_results(
        reserved,
        {
            results[0]: (json.dumps(doc, indent=2) + "\n").encode(),
            results[1]: markdown(summary, meta).encode(),
        },
    )
    print(markdown(summary, meta))


if __name__ == "__main__":
    main()
