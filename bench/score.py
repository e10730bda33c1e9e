"""The scorer against the machine's own matmul peak, with and without the prefix cache.

    python bench/score.py                       # SmolLM2-135M shape, bf16, CPU
    python bench/score.py --sizes 135m,1b --device cuda

In one run, on one machine:
1. The measured matmul peak (GFLOP/s) of square bf16 and fp32 matmuls on the device (the best of
   a few sizes and of `a @ b` and a linear layer's `a @ b.T`, after a warm-up), before and after the
   runs: the higher of the two is the figure every other one is compared with (a lower one says
   something else shared the machine while it was measured).
2. Random Llama-shaped reward models built in memory (`--sizes`: SmolLM2-135M, TinyLlama-1.1B,
   Llama-2-7B shapes) in `--dtype`, and three data shapes built on the fly as token ids, every
   text in the LLaMA-2 chat format with Meta's default system prompt (a fixed ~140-token block,
   as DogeRM's reward model is scored) and ending in `</s>` (the pad id, as for DogeRM's RM):
   RewardBench-like pairs (prompt 40-200 tokens, responses 60-300), GSM8K-like best-of-16
   (question 40-120, answers 60-250) and RewardBench 2-like best-of-4 (prompt 40-200, answers
   60-300).
3. Each shape scored through `RewardModel.score_encoded` (lazymerge's seam) three ways, after a
   warm-up: `before`, the scorer as it was before the prefix cache and token batches (whole texts
   sorted by length, `--batch-size` rows a batch whatever their length); `whole`, whole texts in
   batches by tokens; `prefix`, the prefix cache (the default). Per path: seconds, tokens of the
   texts per second, tokens computed, the prefix tree's distinct tokens, padding, effective
   GFLOP/s (2 x non-embedding parameters x tokens computed / s) and its share of the peak; per
   shape the speed-ups of `prefix` over `before` and over `whole`, and the largest reward
   difference from `before`.

Results print as a table and are saved as JSON (--save, default bench/results/score-DEVICE.json;
checked before the run, atomic, an existing file replaced only with --force and only when a bench
wrote it).
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_cli import FORCE_HELP, OneLineParser, cpu_name, reserve_results, write_results  # noqa: E402

#: (layers, hidden, heads, kv heads, ffn, vocab) of each model shape
SHAPES = {
    "135m": (30, 576, 9, 3, 1536, 49152),  # SmolLM2-135M
    "1b": (22, 2048, 32, 4, 5632, 32000),  # TinyLlama-1.1B
    "7b": (32, 4096, 32, 32, 11008, 32000),  # Llama-2-7B
}
#: LLaMA-2 chat format with Meta's default system prompt, as token ids: "<s><s>[INST] <<SYS>>\n" +
#: the prompt (about 130 tokens) + "\n<</SYS>>\n\n"
SYSTEM_TOKENS = 140
#: (prompts, answers per prompt, prompt tokens, answer tokens) per data shape, for --scale 1
DATA = {
    "pairs": (40, 2, (40, 200), (60, 300)),
    "bon16": (5, 16, (40, 120), (60, 250)),
    "rb2": (20, 4, (40, 200), (60, 300)),
}
PAD = 2  # </s>, the pad id of DogeRM's reward model


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(
                    f for f in line.split(":", 1)[1].split() if f.startswith(("amx", "avx512_bf16"))
                )
    except OSError:
        pass
    return []


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    flags = ", ".join(cpu_flags()) or "no AMX or AVX512-BF16"
    return (
        f"{cpu_name()} ({flags}), {torch.get_num_threads()} threads of {os.cpu_count()} cores, "
        f"{platform.platform()}, torch {torch.__version__}"
    )


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: Any, seconds: float = 1.0) -> tuple[float, int]:
    """Best GFLOP/s of square matmuls of a few sizes, as `a @ b` and as a linear layer computes
    (`a @ b.T`, the kernel the model's layers run), warm-up first; and the size that gave it."""
    import torch

    sizes = (1024, 2048, 4096) if device == "cpu" else (4096, 8192, 16384)
    best, best_n = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for op in (torch.matmul, torch.nn.functional.linear):
            op(a, b)  # warm-up
            sync(device)
            runs, t0 = 0, time.perf_counter()
            while True:
                op(a, b)
                runs += 1
                sync(device)
                elapsed = time.perf_counter() - t0
                if elapsed > seconds and runs >= 2:
                    break
            rate = 2 * n**3 * runs / elapsed / 1e9
            if rate > best:
                best, best_n = rate, n
        del a, b
    return best, best_n


def measure_peaks(device: str) -> dict[str, dict[str, float]]:
    """The matmul peak of bf16 and fp32 on `device`, printed as it is measured."""
    import torch

    peaks: dict[str, dict[str, float]] = {}
    for name in ("bfloat16", "float32"):
        rate, n = matmul_peak(device, getattr(torch, name))
        peaks[name] = {"gflops": round(rate, 1), "size": n}
        print(f"matmul peak {name}: {rate:,.0f} GFLOP/s ({n}x{n})", file=sys.stderr)
    return peaks


def build_model(size: str, dtype: Any, device: str) -> tuple[Any, int]:
    """A random Llama-shaped reward model, and its parameters outside the embedding."""
    import torch
    import transformers

    layers, hidden, heads, kv, ffn, vocab = SHAPES[size]
    config = transformers.LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=ffn,
        vocab_size=vocab,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        num_labels=1,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification._from_config(config, dtype=dtype).to(device).eval()
    params = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    return model, params


def make_texts(shape: str, scale: float, vocab: int, seed: int) -> dict[str, list[int]]:
    """One data shape as token ids, keyed by a name per text."""
    prompts, per, prompt_len, answer_len = DATA[shape]
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    system = [1, 1, *ids(SYSTEM_TOKENS - 2)]
    out = {}
    for p in range(max(1, round(prompts * scale))):
        prompt = [*system, *ids(rng.randint(*prompt_len)), *ids(4)]  # ... [/INST]
        for a in range(per):
            out[f"{shape}-{p}-{a}"] = [*prompt, *ids(rng.randint(*answer_len)), PAD]
    return out


#: the scoring paths compared, in the order they run
PATHS = ("before", "whole", "prefix")
#: a token budget no batch reaches: `before` is bounded by rows only, as the scorer was
UNBOUNDED_TOKENS = 1 << 40


def score(model: Any, device: str, encoded: dict[str, list[int]], path: str, args: Any) -> dict[str, Any]:
    from lazymerge.evaluation.rewards import RewardModel

    budget = UNBOUNDED_TOKENS if path == "before" else args.batch_tokens
    rm = RewardModel(
        model, None, device, batch_size=args.batch_size, prefix_cache=path == "prefix", batch_tokens=budget
    )
    sync(device)
    t0 = time.perf_counter()
    rewards = rm.score_encoded(encoded)
    sync(device)
    seconds = time.perf_counter() - t0
    stats = rm.scoring_stats
    assert stats is not None
    return {"seconds": seconds, "rewards": rewards, "stats": stats.to_dict()}


def main() -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m", help="comma-separated: 135m, 1b, 7b")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the prompts per data shape")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-tokens", type=int, default=None)
    parser.add_argument(
        "--save", type=Path, help="where the JSON goes (default: bench/results/score-DEVICE.json)"
    )
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SHAPES:
            parser.error(f"argument --sizes: {s!r} is not one of {', '.join(SHAPES)}")
    if not 0 < args.scale <= 100:
        parser.error("argument --scale: give a number in (0, 100]")
    if args.batch_size < 1 or (args.batch_tokens is not None and args.batch_tokens < 1):
        parser.error("--batch-size and --batch-tokens must be at least 1")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"argument --device: {args.device}: no CUDA GPU is visible to torch")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error("argument --device: cpu or cuda[:N]")
    target = args.save or ROOT / "bench" / "results" / f"score-{args.device.split(':')[0]}.json"
    results = reserve_results([target], args.force)

    dtype = getattr(torch, args.dtype)
    peaks = measure_peaks(args.device)
    runs = []
    for size in sizes:
        model, params = build_model(size, dtype, args.device)
        vocab = SHAPES[size][-1]
        # warm-up: kernels, allocator, the cache path's first calls
        warm = make_texts("pairs", 2 / DATA["pairs"][0], vocab, seed=99)
        for path in PATHS:
            score(model, args.device, warm, path, args)
        scale = args.scale / (8 if size != "135m" else 1)  # the large shapes on fewer texts
        for shape in DATA:
            encoded = make_texts(shape, scale, vocab, seed=1)
            row: dict[str, Any] = {
                "size": size,
                "shape": shape,
                "texts": len(encoded),
                "non_embedding_params": params,
            }
            done = {}
            for path in PATHS:
                out = score(model, args.device, encoded, path, args)
                done[path] = out
                st = out["stats"]
                gflops = 2 * params * st["tokens_computed"] / out["seconds"] / 1e9
                row[path] = {
                    "seconds": round(out["seconds"], 3),
                    "text_tokens_per_s": round(st["tokens_in_texts"] / out["seconds"], 1),
                    "computed_tokens_per_s": round(st["tokens_computed"] / out["seconds"], 1),
                    "effective_gflops": round(gflops, 1),
                    **st,
                }
                print(f"{size} {shape} {path}: {out['seconds']:.1f} s", file=sys.stderr)
            row["speedup_over_before"] = round(done["before"]["seconds"] / done["prefix"]["seconds"], 2)
            row["speedup"] = round(done["whole"]["seconds"] / done["prefix"]["seconds"], 2)
            row["max_reward_difference"] = max(
                abs(done[path]["rewards"][t] - done["before"]["rewards"][t])
                for path in PATHS[1:]
                for t in encoded
            )
            runs.append(row)
        del model
    # measured again after the runs: a peak lower than the scorer's own rate says something else
    # shared the machine; the share of the peak uses the higher of the two
    after = measure_peaks(args.device)
    for name, rates in after.items():
        peaks[name]["gflops_after"] = rates["gflops"]
        if rates["gflops"] > peaks[name]["gflops"]:
            print(
                f"matmul peak {name} was higher after the runs: the first measurement was disturbed",
                file=sys.stderr,
            )
    own = peaks[args.dtype if args.dtype in peaks else "bfloat16"]
    best = max(own["gflops"], own["gflops_after"])
    for row in runs:
        for path in PATHS:
            row[path]["share_of_peak"] = round(row[path]["effective_gflops"] / best, 3)
    result = {
        "machine": machine(args.device),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("save", "force")},
        "matmul_peak": peaks,
        "runs": runs,
    }
    print(f"machine: {result['machine']}")
    print(
        "matmul peak (before, after the runs): "
        + ", ".join(
            f"{name} {r['gflops']:,.0f}, {r['gflops_after']:,.0f} GFLOP/s" for name, r in peaks.items()
        )
    )
    print(
        f"{'size':5s} {'data':6s} {'texts':>5s} {'path':6s} {'s':>7s} {'text tok/s':>10s} {'computed':>9s} "
        f"{'ideal':>8s} {'in texts':>9s} {'pad':>5s} {'GFLOP/s':>8s} {'peak':>5s}"
    )
    for row in runs:
        for path in PATHS:
            r = row[path]
            print(
                f"{row['size']:5s} {row['shape']:6s} {row['texts']:5d} {path:6s} {r['seconds']:7.2f} "
                f"{r['text_tokens_per_s']:10,.0f} {r['tokens_computed']:9,d} {r['ideal_tokens']:8,d} "
                f"{r['tokens_in_texts']:9,d} {100 * r['padding_waste']:4.1f}% {r['effective_gflops']:8,.0f} "
                f"{100 * r['share_of_peak']:4.0f}%"
            )
        print(
            f"{'':12s} prefix speed-up {row['speedup_over_before']:.2f}x over before, {row['speedup']:.2f}x over"
            f" whole; max |reward difference| from before {row['max_reward_difference']:.3g}"
        )
    write_results(results, {target: (json.dumps(result, indent=2) + "\n").encode()})
    print(f"saved {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
