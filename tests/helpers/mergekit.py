"""Parity with the real mergekit 0.1.5: run its `mergekit-yaml` on a config (optional: the tests
need LAZYMERGE_MERGEKIT=/path/to/mergekit-yaml, which bash bench/setup_mergekit.sh makes), build
the tiny fp32 Llama folders the parity tests share, and compare its output with lazymerge's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers.checkpoints import load_any

MERGEKIT = os.environ.get("LAZYMERGE_MERGEKIT", "")
needs_mergekit = pytest.mark.skipif(
    not (MERGEKIT and os.access(MERGEKIT, os.X_OK)),
    reason="set LAZYMERGE_MERGEKIT=/path/to/mergekit-yaml (bash bench/setup_mergekit.sh makes one)",
)
#: Runs mergekit-yaml with torch.bernoulli(p) replaced by p > 0.5: lazymerge's draws replaced by
#: 0.5 then keep the same elements (u < p).
FIXED_DRAWS = (
    "import sys, torch\n"
    "torch.bernoulli = lambda p, *a, **k: (p > 0.5).to(p.dtype)\n"
    "from mergekit.scripts.run_yaml import main\n"
    "sys.argv[0] = 'mergekit-yaml'\n"
    "sys.exit(main())\n"
)


def run_mergekit(config: Path, out: Path, fixed_draws: bool = False) -> None:
    """Run mergekit-yaml on `config` into `out` (offline), asserting it succeeds; with
    `fixed_draws`, through its venv's python with `FIXED_DRAWS` (and none of our PYTHONPATH)."""
    if fixed_draws:
        command = [str(Path(MERGEKIT).parent / "python"), "-c", FIXED_DRAWS, str(config), str(out), "--quiet"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    else:
        command = [MERGEKIT, str(config), str(out), "--quiet"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def llama_family(root: Path, **overrides) -> dict[str, Path]:
    """Tiny fp32 Llama folders under `root`: a base and three fine-tunes a, b, c (base + 0.01
    noise, so the deltas are small against the weights, as fine-tunes' are); `overrides` go to
    the config (`num_hidden_layers=4`, ...)."""
    models = pytest.importorskip("tests.helpers.models")
    from safetensors.torch import save_file

    tok = models.make_tokenizer(models.BASE_WORDS)
    out = {"base": models.save_model(root / "base", "llama", False, 0, tok, **overrides)}
    base = load_any(out["base"])
    for seed, name in enumerate(["a", "b", "c"], start=1):
        g = torch.Generator().manual_seed(seed)
        folder = models.save_model(root / name, "llama", False, seed, tok, **overrides)
        tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(tuned, str(folder / "model.safetensors"), metadata={"format": "pt"})
        out[name] = folder
    return out


def compare_outputs(
    mk_dir: Path, lz_dir: Path, base_dir: Path, label: str, check_masks: bool
) -> tuple[int, int]:
    """Assert mergekit's and lazymerge's fp32 outputs hold the same tensors, each within 8 fp32
    steps of the base's magnitude (+1) and, with `check_masks`, left at the base's value at the
    same elements (where mergekit's mask drops a delta, lazymerge's drops it too).

    Returns:
        (elements that differ at all, elements compared).
    """
    mk, lz = load_any(mk_dir), load_any(lz_dir)
    base = load_any(base_dir)
    assert sorted(mk) == sorted(lz)
    differing = total = 0
    for name in mk:
        assert mk[name].dtype == lz[name].dtype == torch.float32
        diff = (mk[name].double() - lz[name].double()).abs()
        scale = float(base[name].abs().max()) + 1.0
        assert float(diff.max()) <= 8 * 2.0**-24 * scale, f"{label} {name}: {float(diff.max()):.3g}"
        if check_masks:
            assert torch.equal(mk[name] == base[name], lz[name] == base[name]), (
                f"{label} {name}: masks differ"
            )
        differing += int((diff > 0).sum())
        total += diff.numel()
    return differing, total
