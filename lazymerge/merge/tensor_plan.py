"""One output tensor and how it is made: the unit every merge plan, recipe and memory model
works over (`TensorPlan`), and the checks two inputs' copies of a tensor must pass.

Below `plan` (the whole merge) and `recipe` (the DogeRM decisions), so both build on it and
neither imports the other's caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lazymerge.errors import IncompatibleInputsError
from lazymerge.io.dtypes import OUTPUT_DTYPE_CHOICES, TensorInfo, is_float


@dataclass(frozen=True, eq=False, slots=True)
class TensorPlan:
    """One output tensor and how it is made (slotted: a plan may hold a million of them).

    Attributes:
        sources: one entry per input, None where that input does not contribute.
        action: "merge" (float method over the sources), "copy" (one source, or non-float
            tensors that all sources must hold identically) or "rows" (an embedding whose output
            rows are gathered by token from each source, see `row_maps`).
        row_maps: for "rows": per input, the source row of each output row, -1 where absent
            (None for an input that does not contribute).
        note: why, for `lazymerge plan`.
        weights: this tensor's own weights, one per input (0 for a base model), where they vary
            across tensors (a mergekit config's gradients and filters); None: the plan's.
        density: this tensor's own density; None: the plan's.
        params: further method parameters of this tensor by name (della's epsilon, lambda).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    action: str
    sources: tuple[TensorInfo | None, ...]
    row_maps: tuple[np.ndarray | None, ...] | None = None
    note: str = ""
    weights: tuple[float, ...] | None = None
    density: float | None = None
    params: tuple[tuple[str, float], ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_elems(self) -> int:
        """Elements per chunking unit: a whole row for "rows" tensors, else one element."""
        return math.prod(self.shape[1:]) if self.action == "rows" else 1

    def present(self) -> list[tuple[int, TensorInfo]]:
        return [(i, s) for i, s in enumerate(self.sources) if s is not None]

    def values_text(self) -> str:
        """This tensor's own weights, density and parameters for `lazymerge plan` ("" if none)."""
        parts = []
        if self.weights is not None:
            parts.append("weights " + "/".join(f"{w:g}" for w in self.weights))
        if self.density is not None:
            parts.append(f"density {self.density:g}")
        parts.extend(
            f"rescale {RESCALE_NAMES.get(value, value)}" if name == "rescale" else f"{name} {value:g}"
            for name, value in self.params
        )
        return ", ".join(parts)


#: How `lazymerge plan` names della's rescale modes (`lazymerge.methods.RESCALE_*`).
RESCALE_NAMES = {0.0: "none", 1.0: "1/p (the paper)", 2.0: "to the L1 norm (mergekit)"}


def first_mismatches(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_same_tensor(
    name: str, first: TensorInfo, first_path: object, other: TensorInfo, other_path: object
) -> None:
    """Raise IncompatibleInputsError when two inputs' copies of a tensor cannot be merged."""
    if first.shape != other.shape:
        raise IncompatibleInputsError(
            f"{other_path}: tensor {name!r} has shape {list(other.shape)}, expected "
            f"{list(first.shape)} as in {first_path}"
        )
    if is_float(first.dtype) != is_float(other.dtype) or (
        not is_float(first.dtype) and first.dtype != other.dtype
    ):
        raise IncompatibleInputsError(
            f"{other_path}: tensor {name!r} is {other.dtype} but {first_path} has {first.dtype}; "
            "only floating-point tensors can be merged across dtypes"
        )


def output_dtype(sources: Sequence[TensorInfo | None], dtype: str) -> tuple[str, str]:
    """(action, output dtype) for a tensor: float tensors merge, others are copied."""
    first = next(s for s in sources if s is not None)
    if is_float(first.dtype):
        return "merge", first.dtype if dtype == "auto" else OUTPUT_DTYPE_CHOICES[dtype]
    return "copy", first.dtype
