"""Every merge method against a small in-memory reference written here in float64 numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lazymerge import merge
from lazymerge.errors import LazyMergeError
from lazymerge.methods import position_uniform
from tests.helpers.checkpoints import load_any
from tests.helpers.references import (
    np64,
    reference,
    splitmix_uniform,
    tensors,
)


@pytest.fixture
def trio(save):
    base, a, b = tensors(0), tensors(1), tensors(2)
    # task vectors: small deltas from the base, as fine-tunes are
    a = {k: base[k] + 0.1 * v for k, v in a.items()}
    b = {k: base[k] + 0.1 * v for k, v in b.items()}
    return save("base.safetensors", base), save("a.safetensors", a), save("b.safetensors", b), base, a, b


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "dare_ties", "ties"])
@pytest.mark.parametrize("budget", [1 << 30, 700])
def test_task_vector_methods_match_reference(tmp_path: Path, trio, method: str, budget: int) -> None:
    pbase, pa, pb, base, a, b = trio
    out = tmp_path / "out.safetensors"
    merge(
        [pa, pb], out, weights=[0.6, 0.4], method=method, base=pbase, density=0.7, seed=3, max_memory=budget
    )
    got = load_any(out)
    want = reference(method, base, [a, b], [0.6, 0.4], density=0.7, seed=3)
    for name, value in want.items():
        np.testing.assert_allclose(np64(got[name]), value, rtol=1e-5, atol=1e-6, err_msg=f"{method} {name}")


def test_dare_depends_on_seed_not_chunking(tmp_path: Path, trio) -> None:
    pbase, pa, pb, *_ = trio
    runs = {}
    for seed, budget in [(1, 1 << 30), (1, 500), (2, 1 << 30)]:
        out = tmp_path / f"out-{seed}-{budget}.safetensors"
        merge([pa, pb], out, method="dare_linear", base=pbase, density=0.5, seed=seed, max_memory=budget)
        runs[seed, budget] = load_any(out)
    assert all(torch.equal(runs[1, 1 << 30][k], runs[1, 500][k]) for k in runs[1, 500])
    assert not torch.equal(runs[1, 1 << 30]["w"], runs[2, 1 << 30]["w"])
    u = position_uniform(12345, 0, 200_000)
    np.testing.assert_array_equal(u.double().numpy(), splitmix_uniform(12345, 200_000))
    np.testing.assert_array_equal(
        position_uniform(7, 1000, 50).double().numpy(), splitmix_uniform(7, 1050)[1000:]
    )
    assert (
        0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float((u < 0.3).float().mean()) - 0.3) < 0.01
    )


def test_slerp_matches_reference(tmp_path: Path, save) -> None:
    a, b = tensors(5), tensors(6)
    b["s"] = a["s"] * 2  # parallel: falls back to linear interpolation
    out = tmp_path / "out.safetensors"
    merge(
        [save("a.safetensors", a), save("b.safetensors", b)], out, method="slerp", alpha=0.3, max_memory=256
    )
    got = load_any(out)
    for name in a:
        v0, v1 = np64(a[name]).reshape(-1), np64(b[name]).reshape(-1)
        cos = float(v0 @ v1 / (np.linalg.norm(v0) * np.linalg.norm(v1)))
        if abs(cos) > 0.9995:
            want = 0.7 * v0 + 0.3 * v1
        else:
            omega = np.arccos(cos)
            want = np.sin(0.7 * omega) / np.sin(omega) * v0 + np.sin(0.3 * omega) / np.sin(omega) * v1
        np.testing.assert_allclose(np64(got[name]).reshape(-1), want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_method_argument_errors(tmp_path: Path, trio) -> None:
    pbase, pa, pb, *_ = trio
    with pytest.raises(LazyMergeError, match="give the base model with --base"):
        merge([pa, pb], tmp_path / "o.safetensors", method="ties")
    with pytest.raises(LazyMergeError, match="--base is used by task-vector methods"):
        merge([pa, pb], tmp_path / "o.safetensors", base=pbase)
    with pytest.raises(LazyMergeError, match="takes exactly 2 inputs"):
        merge([pa, pb, pbase], tmp_path / "o.safetensors", method="slerp")
    with pytest.raises(LazyMergeError, match="--density"):
        merge([pa, pb], tmp_path / "o.safetensors", method="ties", base=pbase, density=0)
    with pytest.raises(LazyMergeError, match="unknown merge method"):
        merge([pa, pb], tmp_path / "o.safetensors", method="average")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "dare_ties"])
def test_compute_blocks_match_reference(tmp_path: Path, trio, method: str) -> None:
    pbase, pa, pb, base, a, b = trio
    out = tmp_path / "out.safetensors"
    merge([pa, pb], out, weights=[0.6, 0.4], method=method, base=pbase, density=0.7, seed=3, block_elems=13)
    want = reference(method, base, [a, b], [0.6, 0.4], density=0.7, seed=3)
    got = load_any(out)
    for name, value in want.items():
        np.testing.assert_allclose(np64(got[name]), value, rtol=1e-5, atol=1e-6, err_msg=f"{method} {name}")
