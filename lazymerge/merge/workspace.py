"""The engine's memory model and the buffers it describes, in one place.

A merge keeps a fixed set of reusable buffers alive, sized once from the plan:

- `INPUT_SLOTS` input sets (one being read, one queued, one being merged), each one raw buffer
  per input of `buffer_elems` elements in that input's widest dtype, plus the slack a direct
  read's aligned span needs;
- `OUTPUT_SLOTS` output sets (being merged, queued, being written, being hashed), each one raw
  buffer per output of a sweep, in the widest output dtype;
- one fp32 block per input for the arithmetic (cache-sized for elementwise work, a whole tensor
  for methods that need one), plus the method's own temporaries per block element;
- for a tensor merged in several passes (`MergePlan.passes`), its statistics (`stats_bytes`);
- with direct I/O, one staging buffer per output, where the writer gathers bytes into the
  aligned blocks that O_DIRECT writes.

Raw buffers are private anonymous mmaps: page-aligned, as direct I/O needs, and counted as
anonymous memory (a shared anonymous map would count as shared memory).

`plan.MergePlan.working_memory` is `BufferSizes.total` of the same plan, and `Workspace`
allocates exactly those buffers, so the prediction and the allocation cannot drift (a test holds
them together). torch is imported only when the buffers are allocated.
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lazymerge.merge.tensor_plan import TensorPlan

#: Input buffer sets alive at once: one being read, one queued, one being merged.
INPUT_SLOTS = 3
#: Output buffer sets alive at once: being merged, queued, being written, being hashed.
OUTPUT_SLOTS = 4
FP32 = 4
#: Bytes a direct read's aligned span may add around a buffer's bytes (`reader.SPAN_SLACK`).
SPAN_SLACK = 2 * 4096
#: Staging buffer per output for direct writes (the size of each O_DIRECT write): an eighth
#: of the memory budget per output, between these bounds, a multiple of 4096.
STAGING_MIN, STAGING_MAX = 64 * 2**10, 16 * 2**20


def staging_bytes(max_memory: int, outputs: int) -> int:
    """Bytes of each output's staging buffer for direct writes: an eighth of the budget per
    output, between STAGING_MIN and STAGING_MAX, a multiple of 4096."""
    share = max_memory // (8 * max(1, outputs)) // 4096 * 4096
    return min(STAGING_MAX, max(STAGING_MIN, share))


def anonymous_buffer(nbytes: int) -> mmap.mmap:
    """`nbytes` of private anonymous memory, page-aligned."""
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def direct_io_bytes(inputs: int, outputs: int, staging: int) -> int:
    """Working memory direct I/O adds, whatever the chunk: the aligned reads' slack in every
    input set and the outputs' staging buffers."""
    return INPUT_SLOTS * inputs * SPAN_SLACK + outputs * staging


def direct_io_fits(max_memory: int, inputs: int, outputs: int) -> bool:
    """Whether direct I/O's fixed buffers take at most a quarter of the budget (a budget of a
    few hundred KB is read and written through the page cache instead)."""
    return 4 * direct_io_bytes(inputs, outputs, staging_bytes(max_memory, outputs)) <= max_memory


#: Resident memory of the interpreter with torch imported, added to the predicted peak
#: (about 230 MB measured on the reference machine; rounded up).
BASELINE_RSS = 300 * 10**6


@dataclass(frozen=True)
class BufferSizes:
    """Every buffer a merge allocates, in elements and bytes."""

    #: Elements per raw buffer (the longest chunk of any tensor).
    buffer_elems: int
    #: Bytes per element of each input's raw buffer.
    input_itemsizes: tuple[int, ...]
    #: Bytes per element of each output buffer, and buffers per output set (outputs of a sweep).
    output_itemsize: int
    outputs: int
    #: fp32 elements per input for the arithmetic, and the method's bytes per such element.
    fp32_elems: int
    scratch_per_elem: int
    #: Bytes of each output's staging buffer for direct writes (0: written buffered).
    staging_per_output: int = 0
    #: Bytes after each input buffer for a direct read's aligned span (0: read buffered).
    span_slack: int = 0
    #: Bytes of a bounded method's statistics of one tensor (histograms; 0: no multi-pass tensor).
    stats_bytes: int = 0

    @property
    def input_buffer_bytes(self) -> tuple[int, ...]:
        return tuple(self.buffer_elems * size + self.span_slack for size in self.input_itemsizes)

    @property
    def input_set_bytes(self) -> int:
        return sum(self.input_buffer_bytes)

    @property
    def staging_bytes(self) -> int:
        return self.staging_per_output * self.outputs

    @property
    def output_buffer_bytes(self) -> int:
        return max(1, self.buffer_elems * self.output_itemsize)  # an mmap has at least one byte

    @property
    def output_set_bytes(self) -> int:
        return self.output_buffer_bytes * self.outputs

    @property
    def fp32_bytes(self) -> int:
        return self.fp32_elems * FP32 * len(self.input_itemsizes)

    @property
    def scratch_bytes(self) -> int:
        return self.fp32_elems * self.scratch_per_elem

    @property
    def total(self) -> int:
        return (
            INPUT_SLOTS * self.input_set_bytes
            + OUTPUT_SLOTS * self.output_set_bytes
            + self.fp32_bytes
            + self.scratch_bytes
            + self.staging_bytes
            + self.stats_bytes
        )


def chunk_buffer_cost(input_itemsizes: Sequence[int], output_itemsize: int, outputs: int) -> int:
    """Bytes of raw buffers per chunk element: every input set and every output set."""
    return INPUT_SLOTS * sum(input_itemsizes) + OUTPUT_SLOTS * output_itemsize * outputs


def block_cost(inputs: int, scratch_per_elem: int) -> int:
    """Bytes per element of an arithmetic block: one fp32 copy per input plus method scratch."""
    return FP32 * inputs + scratch_per_elem


def size_chunks(
    max_memory: int,
    largest: int,
    input_itemsizes: Sequence[int],
    output_itemsize: int,
    outputs: int,
    scratch_per_elem: int,
    block_elems: int,
    fixed: int = 0,
) -> tuple[int, int]:
    """(chunk elements, block elements) that fit `max_memory` beside `fixed` bytes of other
    buffers (`fixed_bytes`).

    The fp32 blocks are sized first (up to `block_elems`), then chunks take the rest; a budget
    too small for a full block shrinks the block to the chunk.
    """
    max_memory = max(1, max_memory - fixed)
    per_chunk = chunk_buffer_cost(input_itemsizes, output_itemsize, outputs)
    per_block = block_cost(len(input_itemsizes), scratch_per_elem)
    block = min(block_elems, max(1, largest))
    if max_memory >= block * (per_chunk + per_block):
        chunk = (max_memory - block * per_block) // per_chunk
    else:
        chunk = max(1, max_memory // (per_chunk + per_block))
        block = min(block, chunk)
    return max(1, min(largest, chunk)), max(1, block)


def block_len(tp: TensorPlan, elementwise: bool, count: int, block_elems: int, unit: int = 1) -> int:
    """Elements per arithmetic block of a chunk of `count` elements: `block_elems` for
    elementwise work (a bounded method's passes included, in whole `unit`s of it: della's slabs;
    whole rows for row-matched tensors), the whole chunk otherwise."""
    if tp.action == "rows":
        return max(tp.row_elems, block_elems // tp.row_elems * tp.row_elems)
    if tp.action == "merge" and elementwise:
        return max(unit, block_elems // unit * unit)
    return max(count, 1)


class Stopped(Exception):
    """Another pipeline stage failed; this one gives up quietly and the caller reports that failure."""


class Workspace:
    """The buffers of `plan.buffer_sizes(plan)`, reused for every chunk.

    Fresh multi-megabyte allocations are served by new zeroed pages from the kernel; reusing
    buffers avoids those page faults, which otherwise cost more than the arithmetic. Input and
    output sets circulate through free lists.
    """

    def __init__(
        self,
        sizes: BufferSizes,
        stop: threading.Event,
        input_sets: int = INPUT_SLOTS,
        output_sets: int = OUTPUT_SLOTS,
    ):
        """`input_sets` / `output_sets`: fewer than the pipeline's for a caller that merges
        straight into its own memory, one chunk at a time (the in-memory model build)."""
        import torch

        self.sizes = sizes
        self.stop = stop
        self.free_inputs: queue.Queue[list[mmap.mmap]] = queue.Queue()
        self.free_outputs: queue.Queue[list[mmap.mmap]] = queue.Queue()
        for _ in range(input_sets):
            self.free_inputs.put([anonymous_buffer(n) for n in sizes.input_buffer_bytes])
        for _ in range(output_sets):
            self.free_outputs.put([anonymous_buffer(sizes.output_buffer_bytes) for _ in range(sizes.outputs)])
        self.fp32 = [torch.empty(sizes.fp32_elems, dtype=torch.float32) for _ in sizes.input_itemsizes]
        #: One staging buffer per output for direct writes (`StreamingShardWriter`); none without.
        self.staging = [
            anonymous_buffer(sizes.staging_per_output)
            for _ in range(sizes.outputs if sizes.staging_per_output else 0)
        ]

    def allocated_bytes(self) -> int:
        """Bytes of every buffer this workspace holds (the method's scratch is allocated by the
        method itself, per block, and counted in `BufferSizes.scratch_bytes`)."""
        sets = [*self.free_inputs.queue, *self.free_outputs.queue]
        return (
            sum(len(b) for s in sets for b in s)
            + sum(t.numel() * FP32 for t in self.fp32)
            + sum(len(b) for b in self.staging)
        )

    def take(self, free: queue.Queue[Any]) -> Any:
        while True:
            try:
                return free.get(timeout=0.05)
            except queue.Empty:
                if self.stop.is_set():
                    raise Stopped from None
