#!/usr/bin/env bash
# Make a separate virtual environment holding mergekit 0.1.5, for the optional parity test
# (tests/merge/test_mergekit_config.py, marker `mergekit`) and for memory/time comparisons.
#
#   bash bench/setup_mergekit.sh [VENV_DIR]     # default: ~/.cache/lazymerge/mergekit-venv
#
# Needs PyPI. Installs torch first (the CPU build where pip finds one), so that mergekit's dependencies
# do not pull a CUDA build (several GB), then mergekit itself (it brings transformers, peft, datasets).
# Never touches the environment lazymerge runs in. Prints the path of the venv's mergekit-yaml last;
# use it as LAZYMERGE_MERGEKIT=/path/to/mergekit-yaml.
set -euo pipefail
VENV=$(realpath -m "${1:-$HOME/.cache/lazymerge/mergekit-venv}")
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
MERGEKIT_VERSION=0.1.5

if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first and alone, so that mergekit's requirement is already met and pip does not pull another
# build (pip's find-links/constraints on a machine with a local CPU wheel pick that wheel)
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install --quiet "mergekit==$MERGEKIT_VERSION"

"$VENV/bin/python" - <<'PY' >&2
import importlib.metadata as md
for name in ("mergekit", "torch", "transformers", "safetensors"):
    print(name, md.version(name))
PY
test -x "$VENV/bin/mergekit-yaml" || { echo "mergekit-yaml not found in $VENV/bin" >&2; exit 1; }
echo "$VENV/bin/mergekit-yaml"
