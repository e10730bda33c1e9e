"""Merge methods: small pure functions over fp32 tensors, registered by name.

A method takes same-shaped fp32 tensors (one per weighted input; a chunk of the full tensor when
the method is elementwise), the per-input weights and, for task-vector methods, the base model's
tensor, and returns the merged fp32 tensor. The tensors are the engine's scratch copies: a method
may overwrite them (and return one of them) to save memory. Methods do no I/O and make no dtype
decisions: the engine reads, upcasts, chunks and casts.

| method | formula | streams in chunks? |
| --- | --- | --- |
| linear | sum_i w_i x_i | yes |
| task_arithmetic | base + sum_i w_i (x_i - base) | yes |
| dare_linear | base + sum_i w_i DARE(x_i - base) | yes (the drop mask depends on position only) |
| dare_ties | base + TIES-sign-merge(DARE(x_i - base)) | yes |
| ties | base + TIES-sign-merge(top-density trim(x_i - base)) | no: the trim threshold needs the whole tensor |
| slerp | spherical interpolation of two inputs, t = w_2 | no: the angle needs whole-tensor norms |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where the arithmetic runs: the CLI's option checks stay light
    import torch

MethodFn = Callable[..., "torch.Tensor"]
#: Gives the uniform [0, 1) draws of one input for the current chunk, keyed by element position.
RandomFn = Callable[[int], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    #: True when output element i depends only on input elements i, so any chunking is exact.
    elementwise: bool
    needs_base: bool
    #: Extra bytes per element the method allocates beyond the engine's buffers.
    scratch_bytes: int
    #: Exact number of weighted inputs the method takes (None: any).
    arity: int | None = None
    uses_density: bool = False


METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    elementwise: bool,
    needs_base: bool = False,
    scratch_bytes: int = 0,
    arity: int | None = None,
    uses_density: bool = False,
) -> Callable[[MethodFn], MethodFn]:
    def register(fn: MethodFn) -> MethodFn:
        METHODS[name] = MergeMethod(name, fn, elementwise, needs_base, scratch_bytes, arity, uses_density)
        return fn

    return register


@merge_method("linear", elementwise=True)
def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | float], **_: object
) -> torch.Tensor:
    """Weighted sum: sum_i weights[i] * tensors[i], accumulated in input order (in place)."""
    out = tensors[0].mul_(weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        out.add_(tensor.mul_(weight))
    return out


def _deltas(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    return [t.sub_(base) for t in tensors]


@merge_method("task_arithmetic", elementwise=True, needs_base=True)
def task_arithmetic(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor, **_: object
) -> torch.Tensor:
    """base + sum_i w_i (x_i - base)."""
    for delta, weight in zip(_deltas(tensors, base), weights, strict=True):
        base.add_(delta.mul_(weight))
    return base


def _dare(deltas: Sequence[torch.Tensor], density: float, rand: RandomFn) -> None:
    """Drop each element with probability 1 - density and rescale survivors by 1 / density."""
    for i, delta in enumerate(deltas):
        delta.mul_(rand(i) < density).div_(density)


def _sign_consensus_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES' elect-and-merge: keep, per element, the deltas agreeing with the sign of their
    weighted sum, and average those with their weights."""
    import torch

    weighted = [d * w for d, w in zip(deltas, weights, strict=True)]
    sign = torch.sign(torch.stack(weighted).sum(0))
    total = torch.zeros_like(deltas[0])
    norm = torch.zeros_like(deltas[0])
    for d, wd, w in zip(deltas, weighted, weights, strict=True):
        agree = (torch.sign(d) == sign) & (d != 0)
        total.add_(torch.where(agree, wd, 0.0))
        norm.add_(agree.to(torch.float32) * w)
    return torch.where(norm != 0, total / torch.where(norm != 0, norm, 1.0), 0.0)


@merge_method("dare_linear", elementwise=True, needs_base=True, scratch_bytes=12, uses_density=True)
def dare_linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor,
    density: float,
    rand: RandomFn,
    **_: object,
) -> torch.Tensor:
    """base + sum_i w_i * DARE(x_i - base)."""
    deltas = _deltas(tensors, base)
    _dare(deltas, density, rand)
    for delta, weight in zip(deltas, weights, strict=True):
        base.add_(delta.mul_(weight))
    return base


@merge_method("dare_ties", elementwise=True, needs_base=True, scratch_bytes=32, uses_density=True)
def dare_ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor,
    density: float,
    rand: RandomFn,
    **_: object,
) -> torch.Tensor:
    """base + TIES sign-consensus merge of the DARE-dropped deltas."""
    deltas = _deltas(tensors, base)
    _dare(deltas, density, rand)
    return base.add_(_sign_consensus_merge(deltas, weights))


@merge_method("ties", elementwise=False, needs_base=True, scratch_bytes=32, uses_density=True)
def ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor,
    density: float,
    **_: object,
) -> torch.Tensor:
    """base + TIES: keep each delta's top `density` fraction by magnitude, then sign-consensus merge."""
    import torch

    deltas = _deltas(tensors, base)
    for delta in deltas:
        k = int(round(density * delta.numel()))
        if k <= 0:
            delta.zero_()
        elif k < delta.numel():
            mask = torch.zeros(delta.numel(), dtype=torch.bool)
            mask[torch.topk(delta.reshape(-1).abs(), k, sorted=False).indices] = True
            delta.mul_(mask.reshape(delta.shape))
    return base.add_(_sign_consensus_merge(deltas, weights))


@merge_method("slerp", elementwise=False, arity=2, scratch_bytes=16)
def slerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], **_: object) -> torch.Tensor:
    """Spherical interpolation from the first input to the second at t = weights[1].

    The angle comes from the normalised tensors; nearly parallel tensors (|cos| > 0.9995) and
    zero tensors fall back to linear interpolation.
    """
    import torch

    v0, v1 = tensors
    t = float(weights[1])
    a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
    n0, n1 = float(a.norm()), float(b.norm())
    if n0 == 0 or n1 == 0:
        return v0.mul_(1 - t).add_(v1.mul_(t))
    dot = max(-1.0, min(1.0, float(torch.dot(a, b)) / (n0 * n1)))
    del a, b
    if abs(dot) > 0.9995:
        return v0.mul_(1 - t).add_(v1.mul_(t))
    omega = math.acos(dot)
    s0 = math.sin((1 - t) * omega) / math.sin(omega)
    s1 = math.sin(t * omega) / math.sin(omega)
    return v0.mul_(s0).add_(v1.mul_(s1))


def position_uniform(key: int, start: int, count: int) -> torch.Tensor:
    """Uniform [0, 1) fp32 draws for element positions start..start+count-1 under `key`.

    A counter-based generator (SplitMix64 of key + position): the draw of an element depends only
    on the key and its position, so any chunking of a tensor gives the same draws.
    """
    import torch

    def lsr(x: torch.Tensor, k: int) -> torch.Tensor:  # logical shift right of int64 bit patterns
        return (x >> k) & ((1 << (64 - k)) - 1)

    z = torch.arange(start, start + count, dtype=torch.int64)
    z.mul_(_signed(0x9E3779B97F4A7C15)).add_(_signed(key))
    z = (z ^ lsr(z, 30)).mul_(_signed(0xBF58476D1CE4E5B9))
    z = (z ^ lsr(z, 27)).mul_(_signed(0x94D049BB133111EB))
    z = z ^ lsr(z, 31)
    return lsr(z, 40).to(torch.float32).mul_(1.0 / (1 << 24))


def _signed(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value
