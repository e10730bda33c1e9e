#!/usr/bin/env bash
# One prepared check for a CUDA machine (under 8 minutes): the CUDA-marked tests, then a timed
# lazy sweep of 3 points on 1.1B-shaped reward and SFT models built on the fly, in 4-bit and in
# bf16: build time, scoring tokens/s, peak GPU memory, peak host RSS. Results land in
# bench/results/gpu-<date>.json; paste the figures into the README and the session note.
#
#   bash bench/gpu_check.sh            # from the repository root, torch with CUDA installed
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="bench/results/gpu-$(date +%Y%m%d-%H%M%S).json"
mkdir -p bench/results
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'" || exit 1
pip install -q -e '.[test]' >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee /tmp/lazymerge-gpu.txt

# 1. the CUDA tests (they skip on CPU-only machines)
timeout 240 python -m pytest -q -m cuda tests 2>&1 | tail -5 | tee /tmp/lazymerge-cuda-tests.txt
tests_rc=${PIPESTATUS[0]}

# 2. timed lazy sweeps, 3 points each, 4-bit then bf16, on the GPU
WORK=$(mktemp -d /tmp/lazymerge-gpu-XXXX)
python bench/sweep.py --alpha 0,0.5,1 --pairs 24 --tokens 256 --device cuda --dir "$WORK" --keep \
  > /tmp/lazymerge-gpu-bf16.txt 2>&1
DIR=$(ls -d "$WORK"/lazymerge-sweep-bench-1b-* | head -1)
cp bench/results/sweep-1b.json /tmp/lazymerge-gpu-bf16.json 2>/dev/null
START=$(date +%s.%N)
timeout 240 python -m lazymerge sweep "$DIR/rm" "$DIR/sft" --pairs "$DIR/pairs.jsonl" --alpha 0,0.5,1 \
  --device cuda --quant 4bit -o "$WORK/sweep-4bit" -q
quant_rc=$?
END=$(date +%s.%N)
python - "$OUT" "$WORK/sweep-4bit/results.jsonl" "$START" "$END" "$tests_rc" "$quant_rc" <<'PY'
import json, sys, platform, subprocess
out, results, start, end, tests_rc, quant_rc = sys.argv[1:]
records = [json.loads(line) for line in open(results).read().splitlines()[1:]] if quant_rc == "0" else []
pairs_tokens = None
doc = {
    "gpu": open("/tmp/lazymerge-gpu.txt").read().strip(),
    "platform": platform.platform(),
    "cuda_tests": {"exit": int(tests_rc), "tail": open("/tmp/lazymerge-cuda-tests.txt").read()},
    "bf16_sweep": json.load(open("/tmp/lazymerge-gpu-bf16.json")) if __import__("os").path.exists("/tmp/lazymerge-gpu-bf16.json") else None,
    "four_bit_sweep": {
        "exit": int(quant_rc),
        "wall_s": round(float(end) - float(start), 2),
        "points": [{k: r[k] for k in ("label", "build_s", "score_s", "peak_rss", "peak_gpu_memory")} for r in records],
    },
}
json.dump(doc, open(out, "w"), indent=2)
print(json.dumps(doc, indent=2))
PY
rm -rf "$WORK"
echo "wrote $OUT"
