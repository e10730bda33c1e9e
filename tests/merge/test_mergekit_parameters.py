"""mergekit parameter gradients and filters: per-tensor weights, t, density and lambda on a tiny
four-layer Llama, against float64 references of the formulas with the values computed here from
mergekit 0.1.5's documented rule (the first filter that is part of the tensor's name wins, else the
next scope; a list of numbers is interpolated linearly at t = layer / (layers - 1), t = 0 outside
the layers); `lazymerge plan` shows each tensor's values; and, when LAZYMERGE_MERGEKIT names a
mergekit 0.1.5 `mergekit-yaml`, against mergekit's own output.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lazymerge.cli import main
from tests.helpers.checkpoints import load_any
from tests.helpers.references import np64, reference

LAYERS = 4


def cli(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, Path]:
    """A base and two fine-tunes of a four-layer tiny Llama, fp32 folders."""
    models = pytest.importorskip("tests.helpers.models")
    root = tmp_path_factory.mktemp("gradients")
    tok = models.make_tokenizer(models.BASE_WORDS)
    return {
        name: models.save_model(root / name, "llama", False, seed, tok, num_hidden_layers=LAYERS)
        for seed, name in enumerate(["base", "a", "b"])
    }


def position(name: str) -> float:
    found = re.search(r"\.layers\.(\d+)\.", name)
    return int(found.group(1)) / (LAYERS - 1) if found else 0.0


def value_at(setting, name: str):
    """mergekit's rule, written from its documentation: None where no filter matches."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for cond in setting:
            if cond.get("filter") in (None, "*") or cond["filter"] in name:
                return value_at(cond["value"], name)
        return None
    if isinstance(setting, list):
        return float(np.interp(position(name) * (len(setting) - 1), np.arange(len(setting)), setting))
    return setting


def first(name: str, *settings, default=None):
    for setting in settings:
        if setting is not None and (value := value_at(setting, name)) is not None:
            return value
    return default


def slerp64(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    a, b = v0.ravel(), v1.ravel()
    dot = np.clip(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)), -1, 1)
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    omega = math.acos(dot)
    return (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)


T_SLERP = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0]},
    {"value": 0.4},
]
W_A = [1.0, 0.2, 3.0]
W_B = [{"filter": "self_attn", "value": 0.5}]  # elsewhere the global weight
DENSITY = [0.2, 0.9]
LAMBDA = [{"filter": "norm", "value": 2.0}, {"value": [0.5, 1.5]}]


def config(case: str, m: dict[str, Path]) -> str:
    a, b, base = m["a"], m["b"], m["base"]
    j = json.dumps
    if case == "slerp":
        body = f"base_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: {j(T_SLERP)}\n"
    elif case == "linear":
        body = (
            f"models:\n  - model: {a}\n    parameters: {{weight: {j(W_A)}}}\n"
            f"  - model: {b}\n    parameters: {{weight: {j(W_B)}}}\nparameters: {{weight: 1.0}}\n"
        )
    elif case == "task_arithmetic":
        body = (
            f"base_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
            f"  - model: {b}\n    parameters: {{weight: {j(W_A)}}}\nparameters: {{lambda: {j(LAMBDA)}}}\n"
        )
    else:  # ties, dare_ties: a density gradient for both models
        body = (
            f"base_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.4}}\nparameters: {{density: {j(DENSITY)}}}\n"
        )
    return f"merge_method: {case}\n{body}dtype: float32\n"


def expected(case: str, name: str, x: dict[str, dict[str, torch.Tensor]]) -> np.ndarray:
    base, a, b = (np64(x[k][name]) for k in ("base", "a", "b"))
    if case == "slerp":
        return slerp64(a, b, first(name, T_SLERP))
    if case == "linear":
        wa, wb = first(name, W_A), first(name, W_B, 1.0)
        return (wa * a + wb * b) / (wa + wb)
    if case == "task_arithmetic":
        scale = first(name, LAMBDA)
        return base + scale * (0.7 * (a - base) + first(name, W_A) * (b - base))
    one = {k: {name: x[k][name]} for k in ("base", "a", "b")}
    return reference(case, one["base"], [one["a"], one["b"]], [0.6, 0.4], first(name, DENSITY))[name]


CASES = ["slerp", "linear", "task_arithmetic", "ties", "dare_ties"]


@pytest.mark.parametrize("case", CASES)
def test_gradients_and_filters_match_float64_reference(tmp_path: Path, llamas, case: str) -> None:
    path = tmp_path / "merge.yml"
    path.write_text(config(case, llamas))
    result = cli("run", str(path), "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    got = load_any(tmp_path / "out")
    x = {k: load_any(p) for k, p in llamas.items()}
    assert sorted(got) == sorted(x["a"])
    for name, out in got.items():
        want = expected(case, name, x)
        np.testing.assert_allclose(np64(out), want, rtol=3e-6, atol=3e-7, err_msg=f"{case} {name}")


def test_plan_prints_each_tensors_values(tmp_path: Path, llamas) -> None:
    path = tmp_path / "merge.yml"
    path.write_text(config("ties", llamas))
    result = cli("plan", str(path), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    tensors = {t["name"]: t for t in plan["tensors"]}
    for name, t in tensors.items():
        assert t["weights"] == [0.6, 0.4, 0.0]
        assert t["density"] == pytest.approx(float(np.interp(position(name), [0, 1], DENSITY)))
    text = cli("plan", str(path)).stdout
    assert (
        "model.layers.3.mlp.up_proj.weight [64, 32] F32/F32/F32 -> F32, 1 chunk(s)  (weights 0.6/0.4/0, density 0.9)"
        in text
    )


# --- parity with the real mergekit 0.1.5 (optional) ---

MERGEKIT = os.environ.get("LAZYMERGE_MERGEKIT", "")
needs_mergekit = pytest.mark.skipif(
    not (MERGEKIT and os.access(MERGEKIT, os.X_OK)),
    reason="set LAZYMERGE_MERGEKIT=/path/to/mergekit-yaml (bash bench/setup_mergekit.sh makes one)",
)


@needs_mergekit
@pytest.mark.mergekit
@pytest.mark.parametrize("case", ["slerp", "linear", "task_arithmetic"])
def test_gradients_match_mergekit(tmp_path: Path, llamas, case: str) -> None:
    """The same configs through mergekit 0.1.5 (fp32, 39,712 elements): every element within one
    fp32 step of the result plus a few of the inputs' magnitude (the sums associate differently,
    slerp's angle in float64 here): a wrong per-tensor value would differ by far more."""
    path = tmp_path / "merge.yml"
    path.write_text(config(case, llamas))
    done = subprocess.run(
        [MERGEKIT, str(path), str(tmp_path / "mk"), "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert cli("run", str(path), "-o", str(tmp_path / "lz"), "-q").exit_code == 0
    mk, lz = load_any(tmp_path / "mk"), load_any(tmp_path / "lz")
    assert sorted(mk) == sorted(lz)
    x = [load_any(p) for p in llamas.values()]
    differing = 0
    for name, want in mk.items():
        scale = max(float(t[name].abs().max()) for t in x)
        diff = (want.double() - lz[name].double()).abs()
        bound = 2.0**-23 * torch.maximum(want.double().abs(), lz[name].double().abs()) + 8 * 2.0**-24 * scale
        assert bool((diff <= 4 * bound).all()), f"{case} {name}: max difference {float(diff.max()):.3g}"
        differing += int((diff > 0).sum())
    print(f"{case}: {differing} of {sum(t.numel() for t in mk.values())} elements differ")
