"""Execute a merge plan: read, merge and write chunk by chunk, in three overlapping stages.

A reader thread fills chunk buffers with positional reads, the calling thread upcasts to fp32,
applies the method and casts to the output dtype, and a writer thread appends the bytes to the
current output shard. Bounded queues between the stages keep at most a few chunks alive, so memory
stays within the plan's budget whatever the model size; file reads and writes release the GIL and
overlap with the arithmetic.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lazymerge.errors import IncompatibleInputsError
from lazymerge.io.header import DTYPE_SIZES
from lazymerge.io.reader import INDEX_SUFFIX, Checkpoint
from lazymerge.io.writer import OutputTransaction, StreamingShardWriter
from lazymerge.methods import METHODS
from lazymerge.plan import SLOTS, MergePlan, TensorPlan

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

_DONE = object()
INDEX_NAME = "model" + INDEX_SUFFIX


@dataclass(frozen=True)
class _Chunk:
    tensor: TensorPlan
    start: int  # first element
    count: int  # elements
    shard: int  # index of the output shard
    last_in_shard: bool


def _chunks(plan: MergePlan) -> Iterator[_Chunk]:
    """Every chunk in output file order; an empty tensor is one chunk of 0 elements."""
    for shard_no, shard in enumerate(plan.layout.shards):
        jobs = [
            (tp, start)
            for tp in (plan.tensors[t.name] for t in shard.tensors)
            for start in (range(0, tp.numel, plan.chunk_elems) if tp.numel else (0,))
        ]
        for i, (tp, start) in enumerate(jobs):
            yield _Chunk(tp, start, min(plan.chunk_elems, tp.numel - start), shard_no, i == len(jobs) - 1)


class _Stage(threading.Thread):
    """A pipeline stage thread whose failure is handed back to the caller."""

    def __init__(self, name: str, target: Callable[[], None], stop: threading.Event):
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self._stop_event = stop
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:  # handed to the calling thread, which re-raises it
            self.error = exc
            self._stop_event.set()


def _put(q: queue.Queue[object], item: object, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue[object], stop: threading.Event) -> object:
    while True:
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            if stop.is_set():
                return _DONE


class _Workspace:
    """Buffers reused for every chunk, so steady-state merging allocates nothing.

    Fresh multi-megabyte allocations are served by new zeroed pages from the kernel; reusing
    buffers avoids those page faults, which otherwise cost more than the arithmetic.
    Input sets and output buffers circulate through free lists: one being filled, one queued,
    one being consumed, which is what `plan.SLOTS` budgets for.
    """

    def __init__(self, plan: MergePlan, stop: threading.Event):
        elems = plan.chunk_elems
        self.stop = stop
        self.free_inputs: queue.Queue[list[bytearray]] = queue.Queue()
        self.free_outputs: queue.Queue[bytearray] = queue.Queue()
        for _ in range(SLOTS):
            self.free_inputs.put([bytearray(elems * size) for size in plan.input_itemsizes])
            self.free_outputs.put(bytearray(elems * plan.output_itemsize))
        self.fp32 = [torch.empty(elems, dtype=torch.float32) for _ in plan.input_itemsizes]

    def take(self, free: queue.Queue[Any]) -> Any:
        item = _get(free, self.stop)  # type: ignore[arg-type]
        if item is _DONE:
            raise _Stopped
        return item


class _Stopped(Exception):
    """Another stage failed; this one gives up quietly and the caller reports that failure."""


def merge_chunk(
    chunk: _Chunk,
    inputs: Sequence[memoryview],
    out: memoryview,
    fp32: Sequence[torch.Tensor],
    method: str,
    weights: Sequence[float],
) -> None:
    """Merge one chunk of raw input bytes into `out` (raw output bytes of the same chunk)."""
    tp = chunk.tensor
    if tp.action == "copy":
        first = inputs[0]
        for src, raw in zip(tp.sources[1:], inputs[1:], strict=True):
            if raw != first:
                raise IncompatibleInputsError(
                    f"{src.path}: non-float tensor {tp.name!r} ({tp.dtype}) differs from "
                    f"{tp.sources[0].path}; integer and bool tensors are copied, not merged, so "
                    "the inputs must agree"
                )
        out[:] = first
        return
    work = []
    for src, raw, buf in zip(tp.sources, inputs, fp32, strict=True):
        view = buf[: chunk.count]
        view.copy_(torch.frombuffer(raw, dtype=TORCH_DTYPES[src.dtype]))  # (count,) fp32
        work.append(view)
    merged = METHODS[method].fn(work, weights)
    torch.frombuffer(out, dtype=TORCH_DTYPES[tp.dtype]).copy_(merged)


def execute_plan(
    plan: MergePlan,
    checkpoints: Sequence[Checkpoint],
    transaction: OutputTransaction,
    on_progress: Callable[[int], None] = lambda n: None,
) -> int:
    """Write every output shard of `plan` into `transaction`; return the bytes written."""
    stop = threading.Event()
    read_q: queue.Queue[object] = queue.Queue(maxsize=1)
    write_q: queue.Queue[object] = queue.Queue(maxsize=1)
    shards = plan.layout.shards
    written = [0]
    pool = _Workspace(plan, stop)

    def reader() -> None:
        try:
            for chunk in _chunks(plan):
                buffers = pool.take(pool.free_inputs)
                views = []
                for ckpt, src, buf in zip(checkpoints, chunk.tensor.sources, buffers, strict=True):
                    view = memoryview(buf)[: chunk.count * src.itemsize]
                    ckpt.read_into(src, chunk.start * src.itemsize, view)
                    views.append(view)
                _put(read_q, (chunk, buffers, views), stop)
        except _Stopped:
            return
        _put(read_q, _DONE, stop)

    def writer() -> None:
        current: StreamingShardWriter | None = None
        current_no = -1
        try:
            while True:
                item = _get(write_q, stop)
                if item is _DONE:
                    break
                shard_no, buffer, nbytes, last = item  # type: ignore[misc]
                if shard_no != current_no:
                    current = StreamingShardWriter(
                        transaction.shard_path(shards[shard_no].filename), shards[shard_no]
                    )
                    current_no = shard_no
                    written[0] += len(shards[shard_no].header)
                assert current is not None
                current.write(memoryview(buffer)[:nbytes])
                pool.free_outputs.put(buffer)
                written[0] += nbytes
                if last:
                    current.finish()
            for shard in shards[current_no + 1 :] if not stop.is_set() else ():
                # only a merge of zero tensors leaves a shard with no chunk: header only
                StreamingShardWriter(transaction.shard_path(shard.filename), shard).finish()
                written[0] += len(shard.header)
        finally:
            if current is not None:
                current.close()

    stages = [_Stage("lazymerge-read", reader, stop), _Stage("lazymerge-write", writer, stop)]
    for stage in stages:
        stage.start()
    try:
        while True:
            item = _get(read_q, stop)
            if item is _DONE:
                break
            chunk, buffers, views = item  # type: ignore[misc]
            out = pool.take(pool.free_outputs)
            nbytes = chunk.count * DTYPE_SIZES[chunk.tensor.dtype]
            if nbytes:
                merge_chunk(chunk, views, memoryview(out)[:nbytes], pool.fp32, plan.method, plan.weights)
            pool.free_inputs.put(buffers)
            _put(write_q, (chunk.shard, out, nbytes, chunk.last_in_shard), stop)
            on_progress(sum(len(v) for v in views))
        _put(write_q, _DONE, stop)
    except _Stopped:
        pass
    except BaseException:
        stop.set()
        raise
    finally:
        for stage in stages:
            stage.join()
    for stage in stages:
        if stage.error is not None:
            raise stage.error
    if plan.layout.index is not None:
        transaction.write_small(INDEX_NAME, plan.layout.index)
        written[0] += len(plan.layout.index)
    return written[0]
