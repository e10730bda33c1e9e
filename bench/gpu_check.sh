#!/usr/bin/env bash
# One prepared check for a CUDA machine (about 8 minutes): the CUDA-marked tests, then a timed
# lazy sweep of 3 points on 1.1B-shaped reward and SFT models built on the fly, in bf16 (in memory,
# write+load and resident) and in 4-bit NF4: build time, scoring tokens/s, peak GPU memory, peak
# host RSS; then bench/score.py at the 1.1B shape (prefix cache against whole texts, matmul peak).
#
#   bash bench/gpu_check.sh [RESULTS_DIR]     # from anywhere; default RESULTS_DIR: bench/results
#
# Needs no network: torch with CUDA, transformers, accelerate, bitsandbytes, safetensors, click,
# psutil, numpy, matplotlib and pytest must already be importable. lazymerge itself runs from this
# checkout (PYTHONPATH), installed or not. Writes RESULTS_DIR/gpu-<date>.json plus the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=$(realpath -m "${1:-bench/results}")
mkdir -p "$RESULTS"
STAMP=$(date +%Y%m%d-%H%M%S)
OUT_JSON="$RESULTS/gpu-$STAMP.json"
LOGS="$RESULTS/gpu-$STAMP"
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# a dry run of the script on a CPU machine: GPU_CHECK_DEVICE=cpu GPU_CHECK_PAIRS=2 GPU_CHECK_TOKENS=16
DEVICE=${GPU_CHECK_DEVICE:-cuda} PAIRS=${GPU_CHECK_PAIRS:-24} TOKENS=${GPU_CHECK_TOKENS:-256}
if [ "$DEVICE" = cuda ]; then
  python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'" || exit 1
fi
python3 - <<'PY' | tee "$LOGS/versions.txt"
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "accelerate", "bitsandbytes", "safetensors", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # reported, not fatal: the step that needs it fails on its own
        print(name, "MISSING", type(exc).__name__)
PY
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } | tee "$LOGS/gpu.txt"

# 1. the CUDA tests (they skip on CPU-only machines)
timeout 150 python3 -m pytest -q -rs -m cuda tests -p no:cacheprovider 2>&1 | tail -15 | tee "$LOGS/cuda-tests.txt"
tests_rc=${PIPESTATUS[0]}

# 2. timed lazy sweeps on the GPU, 3 points each: bf16 (in memory, then write+load), then 4-bit
WORK=$(mktemp -d /tmp/lazymerge-gpu-XXXX)
timeout 300 python3 bench/sweep.py --alpha 0,0.5,1 --pairs "$PAIRS" --tokens "$TOKENS" --device "$DEVICE" \
  --dir "$WORK" --keep --save "$LOGS/bf16-sweep.json" > "$LOGS/bf16-sweep.txt" 2>&1
bf16_rc=$?
tail -8 "$LOGS/bf16-sweep.txt"
DIR=$(ls -d "$WORK"/lazymerge-sweep-bench-1b-* | head -1)
START=$(date +%s.%N)
timeout 120 python3 -m lazymerge sweep "$DIR/rm" "$DIR/sft" --pairs "$DIR/pairs.jsonl" --alpha 0,0.5,1 \
  --device "$DEVICE" --quant 4bit -o "$WORK/sweep-4bit" -q > "$LOGS/4bit-sweep.txt" 2>&1
quant_rc=$?
END=$(date +%s.%N)
tail -3 "$LOGS/4bit-sweep.txt"

# 3. the scorer against the GPU's bf16 matmul peak, with and without the prefix cache (1.1B shape)
timeout 240 python3 bench/score.py --sizes 1b --device "$DEVICE" --save "$LOGS/score.json" \
  > "$LOGS/score.txt" 2>&1
echo "bench/score.py exit $?"; tail -12 "$LOGS/score.txt"
python3 - "$OUT_JSON" "$LOGS" "$WORK/sweep-4bit/results.jsonl" "$START" "$END" "$tests_rc" "$bf16_rc" "$quant_rc" "$PAIRS" "$TOKENS" <<'PY'
import json, os, platform, sys

out, logs, results, start, end, tests_rc, bf16_rc, quant_rc, pairs, tokens = sys.argv[1:]
records = []
if quant_rc == "0" and os.path.exists(results):
    records = [json.loads(line) for line in open(results).read().splitlines()[1:]]
bf16 = f"{logs}/bf16-sweep.json"
doc = {
    "gpu": open(f"{logs}/gpu.txt").read().strip(),
    "versions": open(f"{logs}/versions.txt").read().split("\n"),
    "platform": platform.platform(),
    "cpu_cores": os.cpu_count(),
    "cuda_tests": {"exit": int(tests_rc), "tail": open(f"{logs}/cuda-tests.txt").read()},
    "bf16_sweep": {"exit": int(bf16_rc), **(json.load(open(bf16)) if bf16_rc == "0" else {})},
    "four_bit_sweep": {
        "exit": int(quant_rc),
        "wall_s": round(float(end) - float(start), 2),
        "points": [
            {k: r[k] for k in ("label", "build_s", "score_s", "peak_rss", "peak_gpu_memory")}
            for r in records
        ],
    },
}
if records:
    # the same texts as the bf16 run: PAIRS pairs of about TOKENS whitespace tokens, both sides
    scores = [r["score_s"] for r in records]
    per_s = 2 * int(pairs) * int(tokens) / (sum(scores) / len(scores))
    doc["four_bit_sweep"]["score_tokens_per_s"] = round(per_s, 1)
json.dump(doc, open(out, "w"), indent=2)
print(json.dumps(doc, indent=2))
PY
rm -rf "$WORK"
echo "wrote $OUT_JSON"
