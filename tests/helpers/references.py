"""Merge methods written independently in float64 numpy: the references lazymerge's methods are tested against."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(33, 17, generator=g),
        "v": torch.randn(257, generator=g),
        "s": torch.randn((), generator=g),
    }


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
