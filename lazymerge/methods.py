"""Merge methods: small pure functions over fp32 tensors, registered by name.

A method takes same-shaped fp32 tensors (one per input, any chunk of the full tensor when the
method is elementwise) and the per-input weights, and returns the merged fp32 tensor. Methods do
no I/O and make no dtype decisions: the engine reads, upcasts, chunks and casts.
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
    #: fp32 temporaries the method allocates per element beyond its inputs and its result.
    scratch_fp32: int


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, elementwise: bool, scratch_fp32: int) -> Callable[[MethodFn], MethodFn]:
    def register(fn: MethodFn) -> MethodFn:
        METHODS[name] = MergeMethod(name, fn, elementwise, scratch_fp32)
        return fn

    return register


@merge_method("linear", elementwise=True, scratch_fp32=1)
def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum: sum_i weights[i] * tensors[i], accumulated in input order."""
    out = torch.mul(tensors[0], weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        out.add_(torch.mul(tensor, weight))
    return out
