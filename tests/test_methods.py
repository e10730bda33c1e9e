"""Every merge method against a small in-memory reference written here in float64 numpy."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from lazymerge import merge
from lazymerge.errors import LazyMergeError
from lazymerge.methods import position_uniform
from tests.conftest import load_any


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(33, 17, generator=g),
        "v": torch.randn(257, generator=g),
        "s": torch.randn((), generator=g),
    }


@pytest.fixture
def trio(save):
    base, a, b = tensors(0), tensors(1), tensors(2)
    # task vectors: small deltas from the base, as fine-tunes are
    a = {k: base[k] + 0.1 * v for k, v in a.items()}
    b = {k: base[k] + 0.1 * v for k, v in b.items()}
    return save("base.safetensors", base), save("a.safetensors", a), save("b.safetensors", b), base, a, b


def key(seed: int, name: str, index: int) -> int:
    return int.from_bytes(
        hashlib.blake2b(f"{seed}\0{name}\0{index}".encode(), digest_size=8).digest(), "little"
    )


GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def splitmix_uniform(key: int, count: int) -> np.ndarray:
    """The documented DARE draws, written independently of lazymerge: element p draws the top 24
    bits of SplitMix64's output function applied to key + p * golden ratio (mod 2^64), / 2^24."""
    with np.errstate(over="ignore"):
        z = np.arange(count, dtype=np.uint64) * np.uint64(GOLDEN) + np.uint64(key)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def sign_merge(deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
    sign = np.sign(sum(w * d for w, d in zip(weights, deltas, strict=True)))
    total = np.zeros_like(deltas[0])
    norm = np.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        agree = (np.sign(d) == sign) & (d != 0)
        total += np.where(agree, w * d, 0)
        norm += np.where(agree, w, 0)
    return np.divide(total, norm, out=np.zeros_like(total), where=norm != 0)


def reference(method: str, base, inputs, weights, density=0.5, seed=0) -> dict[str, np.ndarray]:
    out = {}
    for name in base:
        b = np64(base[name])
        xs = [np64(t[name]) for t in inputs]
        deltas = [x - b for x in xs]
        if method == "task_arithmetic":
            out[name] = b + sum(w * d for w, d in zip(weights, deltas, strict=True))
        elif method in ("dare_linear", "dare_ties"):
            dropped = []
            for i, d in enumerate(deltas):
                u = splitmix_uniform(key(seed, name, i), d.size).reshape(d.shape)
                dropped.append(np.where(u < density, d / density, 0.0))
            if method == "dare_linear":
                out[name] = b + sum(w * d for w, d in zip(weights, dropped, strict=True))
            else:
                out[name] = b + sign_merge(dropped, weights)
        elif method == "ties":
            trimmed = []
            for d in deltas:
                k = int(round(density * d.size))
                flat = d.reshape(-1)
                keep = np.zeros(flat.size, dtype=bool)
                keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
                trimmed.append(np.where(keep, flat, 0.0).reshape(d.shape))
            out[name] = b + sign_merge(trimmed, weights)
    return out


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
