"""Plan a merge from headers alone: what happens to each tensor and where its bytes go.

The plan is a plain value: it can be printed (`lazymerge plan`), tested without tensor data, and
handed to the engine, which only follows it. Two kinds of merge are planned here:

- plain: every input holds the same tensors; each is merged across all inputs;
- reward model + domain models (DogeRM): decided in `lazymerge.recipe`, which says per tensor
  which inputs contribute (heads kept or dropped) and how embedding rows line up by token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lazymerge import __version__
from lazymerge.errors import IncompatibleInputsError, LazyMergeError
from lazymerge.io.dtypes import OUTPUT_DTYPE_CHOICES, TensorInfo, is_float, itemsize
from lazymerge.io.reader import Checkpoint
from lazymerge.io.writer import OutputLayout, OutputTensor, plan_layout
from lazymerge.methods import METHODS

#: Default working-memory budget for tensor data in flight (see README, "Memory").
DEFAULT_MAX_MEMORY = 256 * 2**20
DEFAULT_SHARD_SIZE = 5 * 10**9
#: Input buffer sets alive at once: one being read, one queued, one being merged.
SLOTS = 3
#: Output buffer sets alive at once: being merged, queued, being written, queued, being hashed.
OUTPUT_SLOTS = 4


@dataclass(frozen=True, eq=False)
class TensorPlan:
    """One output tensor and how it is made.

    Attributes:
        sources: one entry per input, None where that input does not contribute.
        weights: one weight per input (0 where it does not contribute).
        action: "merge" (float method over the sources), "copy" (one source, or non-float
            tensors that all sources must hold identically) or "rows" (an embedding whose output
            rows are gathered by token from each source, see `row_maps`).
        row_maps: for "rows": per input, the source row of each output row, -1 where absent
            (None for an input that does not contribute).
        note: why, for `lazymerge plan`.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    action: str
    sources: tuple[TensorInfo | None, ...]
    weights: tuple[float, ...]
    row_maps: tuple[np.ndarray | None, ...] | None = None
    note: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_elems(self) -> int:
        """Elements per chunking unit: a whole row for "rows" tensors, else one element."""
        return math.prod(self.shape[1:]) if self.action == "rows" else 1

    def present(self) -> list[tuple[int, TensorInfo]]:
        return [(i, s) for i, s in enumerate(self.sources) if s is not None]


@dataclass(frozen=True, eq=False)
class MergePlan:
    inputs: tuple[str, ...]
    weights: tuple[float, ...]
    method: str
    tensors: dict[str, TensorPlan]
    layout: OutputLayout
    max_memory: int
    #: Elements per chunk, the same for every tensor; tensors up to this size go whole.
    chunk_elems: int
    #: Largest bytes per element of each input and of the output, over all tensors.
    input_itemsizes: tuple[int, ...]
    output_itemsize: int
    #: Role of each input ("reward model", "domain model", or "input").
    roles: tuple[str, ...] = ()
    #: Input tensors left out of the output, with the reason.
    dropped: tuple[str, ...] = ()
    #: Small files written beside the weights (config, tokenizer), name -> bytes.
    extra_files: dict[str, bytes] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    #: Index of the base model among the inputs (task-vector methods), weight 0.
    base_index: int | None = None
    density: float = 1.0
    seed: int = 0
    #: Stop on NaN or Inf in a merged tensor instead of warning.
    check_finite: bool = False
    #: One weight vector per output; several for a sweep (one read, many outputs).
    variants: tuple[tuple[float, ...], ...] = ()
    #: Sub-folder of each variant's output ("" for a single output).
    variant_names: tuple[str, ...] = ("",)
    #: The file layout of each variant (they differ only in header metadata).
    layouts: tuple[OutputLayout, ...] = ()

    @property
    def input_bytes(self) -> int:
        return sum(s.nbytes for t in self.tensors.values() for _, s in t.present())

    @property
    def output_bytes(self) -> int:
        extra = sum(len(b) for b in self.extra_files.values())
        return sum(layout.total_bytes + extra for layout in self.layouts)

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def working_memory(self) -> int:
        """Bytes of the engine's buffers for every chunk in flight: at most max_memory, unless a
        method needs whole tensors larger than the budget allows."""
        return self.buffer_elems * self.elem_cost

    @property
    def elem_cost(self) -> int:
        return chunk_cost(
            self.input_itemsizes, self.output_itemsize, len(self.variants), METHODS[self.method].scratch_bytes
        )

    @property
    def buffer_elems(self) -> int:
        """Elements per reusable buffer: the longest chunk of any tensor."""
        return max([1, *(min(self.chunk_len(t), max(t.numel, 1)) for t in self.tensors.values())])

    def chunk_len(self, tensor: TensorPlan) -> int:
        """Elements per chunk of this tensor: whole rows for "rows" tensors, the whole tensor
        for methods that are not elementwise."""
        if tensor.action == "merge" and not METHODS[self.method].elementwise:
            return max(1, tensor.numel)
        unit = tensor.row_elems
        return max(unit, self.chunk_elems // unit * unit)

    def chunks(self, tensor: TensorPlan) -> int:
        return math.ceil(tensor.numel / self.chunk_len(tensor))

    def describe(self) -> str:
        lines = [f"method {self.method}"]
        for i, name in enumerate(self.inputs):
            role = f" ({self.roles[i]})" if self.roles else ""
            lines.append(f"  input {i}: {name}{role}, weight {self.weights[i]:g}")
        for shard in self.layout.shards:
            lines.append(f"{shard.filename}: {len(shard.tensors)} tensors, {shard.file_bytes} bytes")
            for t in shard.tensors:
                tp = self.tensors[t.name]
                srcs = "/".join(s.dtype if s is not None else "-" for s in tp.sources)
                what = {"merge": "average", "copy": "copy", "rows": "rows"}[tp.action]
                note = f"  [{tp.note}]" if tp.note else ""
                lines.append(
                    f"  {what:7s} {tp.name} {list(tp.shape)} {srcs} -> {tp.dtype}, "
                    f"{self.chunks(tp)} chunk(s){note}"
                )
        lines.extend(f"  dropped {d}" for d in self.dropped)
        lines.extend(f"  wrote file {name}" for name in self.extra_files)
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append(
            f"{len(self.tensors)} tensors, {self.parameters} parameters; reads {self.input_bytes} bytes, "
            f"writes {self.output_bytes} bytes; working memory about {self.working_memory} bytes"
        )
        return "\n".join(lines)


def chunk_cost(
    input_itemsizes: Sequence[int], output_itemsize: int, outputs: int = 1, scratch: int = 0
) -> int:
    """Bytes of working memory per chunk element: raw input sets, fp32 copies, method scratch and
    output buffers (one per output of a sweep)."""
    return (
        SLOTS * sum(input_itemsizes)
        + 4 * len(input_itemsizes)
        + scratch
        + OUTPUT_SLOTS * output_itemsize * outputs
    )


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


def check_compatible(checkpoints: Sequence[Checkpoint]) -> None:
    """Every input must hold the same tensor names with the same shapes.

    Raises:
        IncompatibleInputsError naming the file and the first mismatching tensors.
    """
    first = checkpoints[0]
    for other in checkpoints[1:]:
        missing = sorted(set(first) - set(other))
        if missing:
            raise IncompatibleInputsError(
                f"{other.path}: lacks tensor {first_mismatches(missing)} that {first.path} has"
            )
        extra = sorted(set(other) - set(first))
        if extra:
            raise IncompatibleInputsError(
                f"{other.path}: has tensor {first_mismatches(extra)} that {first.path} lacks"
            )
        for name in first:
            check_same_tensor(name, first[name], first.path, other[name], other.path)


def output_dtype(sources: Sequence[TensorInfo | None], dtype: str) -> tuple[str, str]:
    """(action, output dtype) for a tensor: float tensors merge, others are copied."""
    first = next(s for s in sources if s is not None)
    if is_float(first.dtype):
        return "merge", first.dtype if dtype == "auto" else OUTPUT_DTYPE_CHOICES[dtype]
    return "copy", first.dtype


def plain_tensor_plans(
    checkpoints: Sequence[Checkpoint], weights: Sequence[float], dtype: str
) -> dict[str, TensorPlan]:
    """Every tensor merged across every input (the inputs must hold the same tensors)."""
    check_compatible(checkpoints)
    plans = {}
    for name, first in checkpoints[0].items():
        sources = tuple(c[name] for c in checkpoints)
        action, out_dtype = output_dtype(sources, dtype)
        plans[name] = TensorPlan(name, out_dtype, first.shape, action, sources, tuple(weights))
    return plans


def validate_options(
    n_inputs: int, weights: Sequence[float], method: str, dtype: str, max_memory: int, shard_size: int
) -> None:
    if n_inputs < 2:
        raise LazyMergeError("a merge needs at least two inputs")
    if len(weights) != n_inputs:
        raise LazyMergeError(f"{len(weights)} weights given for {n_inputs} inputs; give one per input")
    if method not in METHODS:
        raise LazyMergeError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    if dtype != "auto" and dtype not in OUTPUT_DTYPE_CHOICES:
        raise LazyMergeError(f"unknown dtype {dtype!r}; choose auto, {', '.join(OUTPUT_DTYPE_CHOICES)}")
    if max_memory <= 0 or shard_size <= 0:
        raise LazyMergeError("--max-memory and --shard-size must be positive")


def assemble_plan(
    checkpoints: Sequence[Checkpoint],
    variants: Sequence[Sequence[float]],
    tensors: dict[str, TensorPlan],
    *,
    method: str,
    single_file: str | None,
    shard_size: int,
    max_memory: int,
    variant_names: Sequence[str] = ("",),
    **extra: Any,
) -> MergePlan:
    """Size the chunks and lay out the output files for a set of tensor plans.

    Args:
        variants: one weight vector per output (one per input, 0 for a base model).
        variant_names: the sub-folder of each output, "" for a single output.
    """
    n = len(checkpoints)
    # one chunk size for all tensors, so the reusable buffers fit the budget whatever the dtypes
    input_itemsizes = tuple(
        max((s.itemsize for t in tensors.values() if (s := t.sources[i]) is not None), default=1)
        for i in range(n)
    )
    output_itemsize = max((itemsize(t.dtype) for t in tensors.values()), default=1)
    largest = max((t.numel for t in tensors.values()), default=1)
    cost = chunk_cost(input_itemsizes, output_itemsize, len(variants), METHODS[method].scratch_bytes)
    chunk_elems = max(1, min(largest, max_memory // cost))
    outputs = [OutputTensor(t.name, t.dtype, t.shape) for t in tensors.values()]
    layouts = []
    for weights in variants:
        metadata = {
            "format": "pt",
            "lazymerge_version": __version__,
            "lazymerge_method": method,
            "lazymerge_weights": ",".join(repr(float(w)) for w in weights),
            "lazymerge_inputs": ",".join(str(c.path.name) for c in checkpoints),
        }
        layouts.append(plan_layout(outputs, metadata, single_file, shard_size))
    return MergePlan(
        inputs=tuple(str(c.path) for c in checkpoints),
        weights=tuple(float(w) for w in variants[0]),
        method=method,
        tensors=tensors,
        layout=layouts[0],
        max_memory=max_memory,
        chunk_elems=chunk_elems,
        input_itemsizes=input_itemsizes,
        output_itemsize=output_itemsize,
        variants=tuple(tuple(float(w) for w in v) for v in variants),
        variant_names=tuple(variant_names),
        layouts=tuple(layouts),
        **extra,
    )


def attach_base(tensors: dict[str, TensorPlan], base: Checkpoint) -> tuple[dict[str, TensorPlan], list[str]]:
    """Add a base model (weight 0) as the last source of every averaged tensor.

    Task-vector methods merge x_i - base; tensors that are copied or matched by rows do not use it.

    Returns:
        (tensor plans with one more source each, base tensors left unused)

    Raises:
        IncompatibleInputsError when the base lacks an averaged tensor or its shape differs.
    """
    out = {}
    for name, tp in tensors.items():
        src: TensorInfo | None = None
        if tp.action == "merge":
            if name not in base:
                raise IncompatibleInputsError(
                    f"{base.path}: base model lacks tensor {name!r} that the inputs average"
                )
            first = next(s for s in tp.sources if s is not None)
            check_same_tensor(name, first, first.path, base[name], base.path)
            src = base[name]
        row_maps = None if tp.row_maps is None else (*tp.row_maps, None)
        out[name] = TensorPlan(
            tp.name, tp.dtype, tp.shape, tp.action, (*tp.sources, src), (*tp.weights, 0.0), row_maps, tp.note
        )
    unused = sorted(n for n in base if n not in out or out[n].action != "merge")
    return out, [f"{n} of {base.path} (base model, not averaged)" for n in unused]
