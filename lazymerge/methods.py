"""Merge methods: small pure functions over fp32 tensors, registered by name.

A method takes same-shaped fp32 tensors (one per input, any chunk of the full tensor when the
method is elementwise) and the per-input weights, and returns the merged fp32 tensor. The tensors
are the engine's scratch copies: a method may overwrite them (and return one of them) to save
memory. Methods do no I/O and make no dtype decisions: the engine reads, upcasts, chunks and casts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MethodFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    #: True when output element i depends only on input elements i, so any chunking is exact.
    elementwise: bool


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, elementwise: bool) -> Callable[[MethodFn], MethodFn]:
    def register(fn: MethodFn) -> MethodFn:
        METHODS[name] = MergeMethod(name, fn, elementwise)
        return fn

    return register


@merge_method("linear", elementwise=True)
def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum: sum_i weights[i] * tensors[i], accumulated in input order (in place)."""
    out = tensors[0].mul_(weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        out.add_(tensor.mul_(weight))
    return out
