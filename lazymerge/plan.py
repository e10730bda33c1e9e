"""Plan a merge from headers alone: what happens to each tensor and where its bytes go.

The plan is a plain value: it can be printed (`lazymerge plan`), tested without tensor data, and
handed to the engine, which only follows it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lazymerge import __version__
from lazymerge.errors import IncompatibleInputsError, LazyMergeError
from lazymerge.io.header import DTYPE_SIZES, FLOAT_DTYPES
from lazymerge.io.reader import Checkpoint, TensorInfo
from lazymerge.io.writer import OutputLayout, OutputTensor, plan_layout
from lazymerge.methods import METHODS

DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
#: Default working-memory budget for tensor data in flight (see README, "Memory").
DEFAULT_MAX_MEMORY = 256 * 2**20
DEFAULT_SHARD_SIZE = 5 * 10**9
#: Buffer sets alive at once per stage: one being filled, one queued, one being consumed.
SLOTS = 3


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its sources (one per input), what is done, and its chunk size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    action: str  # "merge" (float method) or "copy" (non-float, inputs must agree)
    sources: tuple[TensorInfo, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
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

    @property
    def input_bytes(self) -> int:
        return sum(src.nbytes for t in self.tensors.values() for src in t.sources)

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def working_memory(self) -> int:
        """Bytes of the engine's reusable buffers for every chunk in flight (at most max_memory)."""
        return self.chunk_elems * chunk_cost(self.input_itemsizes, self.output_itemsize)

    def chunks(self, tensor: TensorPlan) -> int:
        return math.ceil(tensor.numel / self.chunk_elems)

    def describe(self) -> str:
        lines = [
            f"method {self.method}, weights {', '.join(f'{w:g}' for w in self.weights)}",
            *(f"  input {i}: {name}" for i, name in enumerate(self.inputs)),
        ]
        for shard in self.layout.shards:
            lines.append(f"{shard.filename}: {len(shard.tensors)} tensors, {shard.file_bytes} bytes")
            for t in shard.tensors:
                tp = self.tensors[t.name]
                srcs = "/".join(s.dtype for s in tp.sources)
                lines.append(
                    f"  {tp.action:5s} {tp.name} {list(tp.shape)} {srcs} -> {tp.dtype}, {self.chunks(tp)} chunk(s)"
                )
        lines.append(
            f"{len(self.tensors)} tensors, {self.parameters} parameters; reads {self.input_bytes} bytes, "
            f"writes {self.layout.total_bytes} bytes; working memory about {self.working_memory} bytes"
        )
        return "\n".join(lines)


def chunk_cost(input_itemsizes: Sequence[int], output_itemsize: int) -> int:
    """Bytes of working memory per chunk element: raw input sets, fp32 copies, output buffers."""
    return SLOTS * sum(input_itemsizes) + 4 * len(input_itemsizes) + SLOTS * output_itemsize


def _first_mismatches(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


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
                f"{other.path}: lacks tensor {_first_mismatches(missing)} that {first.path} has"
            )
        extra = sorted(set(other) - set(first))
        if extra:
            raise IncompatibleInputsError(
                f"{other.path}: has tensor {_first_mismatches(extra)} that {first.path} lacks"
            )
        for name in first:
            a, b = first[name], other[name]
            if a.shape != b.shape:
                raise IncompatibleInputsError(
                    f"{other.path}: tensor {name!r} has shape {list(b.shape)}, expected "
                    f"{list(a.shape)} as in {first.path}"
                )
            if (a.dtype in FLOAT_DTYPES) != (b.dtype in FLOAT_DTYPES) or (
                a.dtype not in FLOAT_DTYPES and a.dtype != b.dtype
            ):
                raise IncompatibleInputsError(
                    f"{other.path}: tensor {name!r} is {b.dtype} but {first.path} has {a.dtype}; "
                    "only floating-point tensors can be merged across dtypes"
                )


def plan_merge(
    checkpoints: Sequence[Checkpoint],
    weights: Sequence[float],
    *,
    dtype: str = "auto",
    method: str = "linear",
    single_file: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> MergePlan:
    """Plan a merge of same-architecture checkpoints from their headers.

    Args:
        checkpoints: the opened inputs, in weight order.
        weights: one weight per input.
        dtype: "auto" (each tensor keeps the first input's dtype) or float32/float16/bfloat16.
        method: a registered merge method name.
        single_file: write one file of this name; otherwise Hugging Face-style shards.
        shard_size: largest data bytes per output shard.
        max_memory: working-memory budget in bytes; larger tensors are merged in chunks.

    Raises:
        IncompatibleInputsError, LazyMergeError for bad arguments.
    """
    if len(checkpoints) < 2:
        raise LazyMergeError("a merge needs at least two inputs")
    if len(weights) != len(checkpoints):
        raise LazyMergeError(
            f"{len(weights)} weights given for {len(checkpoints)} inputs; give one per input"
        )
    if method not in METHODS:
        raise LazyMergeError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise LazyMergeError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPE_NAMES)}")
    if max_memory <= 0 or shard_size <= 0:
        raise LazyMergeError("--max-memory and --shard-size must be positive")
    check_compatible(checkpoints)

    plans: dict[str, TensorPlan] = {}
    for name, first in checkpoints[0].items():
        sources = tuple(c[name] for c in checkpoints)
        if first.dtype in FLOAT_DTYPES:
            action = "merge"
            out_dtype = first.dtype if dtype == "auto" else DTYPE_NAMES[dtype]
        else:
            action, out_dtype = "copy", first.dtype
        plans[name] = TensorPlan(name, out_dtype, first.shape, action, sources)
    # one chunk size for all tensors, so the reusable buffers fit the budget whatever the dtypes
    input_itemsizes = tuple(
        max((t.sources[i].itemsize for t in plans.values()), default=1) for i in range(len(checkpoints))
    )
    output_itemsize = max((DTYPE_SIZES[t.dtype] for t in plans.values()), default=1)
    largest = max((t.numel for t in plans.values()), default=1)
    chunk_elems = max(1, min(largest, max_memory // chunk_cost(input_itemsizes, output_itemsize)))

    metadata = {
        "format": "pt",
        "lazymerge_version": __version__,
        "lazymerge_method": method,
        "lazymerge_weights": ",".join(repr(float(w)) for w in weights),
        "lazymerge_inputs": ",".join(str(c.path.name) for c in checkpoints),
    }
    outputs = [OutputTensor(t.name, t.dtype, t.shape) for t in plans.values()]
    layout = plan_layout(outputs, metadata, single_file, shard_size)
    return MergePlan(
        inputs=tuple(str(c.path) for c in checkpoints),
        weights=tuple(float(w) for w in weights),
        method=method,
        tensors=plans,
        layout=layout,
        max_memory=max_memory,
        chunk_elems=chunk_elems,
        input_itemsizes=input_itemsizes,
        output_itemsize=output_itemsize,
    )
