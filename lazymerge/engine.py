"""Execute a merge plan: read, merge, write and hash chunk by chunk, in overlapping stages.

A reader thread fills chunk buffers with positional reads (one read per input, side by side),
the calling thread upcasts to fp32 in cache-sized blocks, applies the method and casts to the
output dtype, a writer thread appends the bytes to the current output shard, and a hash thread
feeds them to the shard's SHA-256 and finishes the shard. Bounded queues and fixed pools of
reused buffers keep at most a few chunks alive, so memory stays within the plan's budget whatever
the model size; file I/O, hashing and torch's kernels release the GIL and overlap.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from lazymerge.errors import IncompatibleInputsError, NonFiniteError
from lazymerge.io.dtypes import TensorInfo, itemsize, torch_dtype
from lazymerge.io.reader import INDEX_SUFFIX, Checkpoint
from lazymerge.io.writer import OutputTransaction, StreamingShardWriter
from lazymerge.methods import METHODS, position_uniform
from lazymerge.plan import OUTPUT_SLOTS, SLOTS, MergePlan, TensorPlan

_DONE = object()
#: Elements per block of elementwise arithmetic (4 MB of fp32 per input: cache-sized).
COMPUTE_BLOCK = 1 << 20
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
            (tp, start, min(step, tp.numel - start))
            for tp, step in (
                (plan.tensors[t.name], plan.chunk_len(plan.tensors[t.name])) for t in shard.tensors
            )
            for start in (range(0, tp.numel, step) if tp.numel else (0,))
        ]
        for i, (tp, start, count) in enumerate(jobs):
            yield _Chunk(tp, start, count, shard_no, i == len(jobs) - 1)


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
        elems = plan.buffer_elems
        self.stop = stop
        self.free_inputs: queue.Queue[list[bytearray]] = queue.Queue()
        self.free_outputs: queue.Queue[list[bytearray]] = queue.Queue()
        for _ in range(SLOTS):
            self.free_inputs.put([bytearray(elems * size) for size in plan.input_itemsizes])
        for _ in range(OUTPUT_SLOTS):
            self.free_outputs.put([bytearray(elems * plan.output_itemsize) for _ in plan.variants])
        fp32_elems = min(
            elems,
            max(
                [1]
                + [
                    block_len(t, plan.method, plan.chunk_len(t))
                    for t in plan.tensors.values()
                    if t.action != "copy"
                ]
            ),
        )
        self.fp32 = [torch.empty(fp32_elems, dtype=torch.float32) for _ in plan.input_itemsizes]

    def take(self, free: queue.Queue[Any]) -> Any:
        item = _get(free, self.stop)  # type: ignore[arg-type]
        if item is _DONE:
            raise _Stopped
        return item


class _Stopped(Exception):
    """Another stage failed; this one gives up quietly and the caller reports that failure."""


def read_chunk(
    checkpoints: Sequence[Checkpoint],
    chunk: _Chunk,
    buffers: Sequence[bytearray],
    pool: ThreadPoolExecutor | None = None,
) -> list[memoryview | None]:
    """Read each contributing input's bytes of `chunk` into its buffer; None for the others.

    With `pool`, the inputs are read concurrently: separate files stream faster side by side
    than taken in turns.
    """
    tp = chunk.tensor
    views: list[memoryview | None] = [None] * len(tp.sources)

    def read_one(i: int, src: TensorInfo) -> None:
        view = memoryview(buffers[i])[: chunk.count * src.itemsize]
        if tp.row_maps is None:
            checkpoints[i].read_into(src, chunk.start * src.itemsize, view)
        else:
            row_map = tp.row_maps[i]
            assert row_map is not None
            first_row = chunk.start // tp.row_elems
            rows = row_map[first_row : first_row + chunk.count // tp.row_elems]
            _read_rows(checkpoints[i], src, rows, tp.row_elems * src.itemsize, view)
        views[i] = view

    present = tp.present()
    if pool is None or len(present) < 2:
        for i, src in present:
            read_one(i, src)
    else:
        for future in [pool.submit(read_one, i, src) for i, src in present]:
            future.result()
    return views


def _read_rows(ckpt: Checkpoint, src: TensorInfo, rows: np.ndarray, row_bytes: int, view: memoryview) -> None:
    """Gather source rows into consecutive rows of `view`, one read per run of adjacent rows;
    rows marked -1 are zero-filled."""
    i, n = 0, len(rows)
    while i < n:
        if rows[i] < 0:
            view[i * row_bytes : (i + 1) * row_bytes] = bytes(row_bytes)
            i += 1
            continue
        j = i + 1
        while j < n and rows[j] == rows[j - 1] + 1:
            j += 1
        ckpt.read_into(src, int(rows[i]) * row_bytes, view[i * row_bytes : j * row_bytes])
        i = j


def _row_weights(tp: TensorPlan, chunk: _Chunk, weights: Sequence[float]) -> list[torch.Tensor]:
    """Per-row weights of each contributing input, shape (rows, 1) fp32.

    A row present in every contributing input gets the plan's weights unchanged; a row present in
    only some is their weighted average with the weights renormalised over those present (a row
    present in one input is copied from it).
    """
    assert tp.row_maps is not None
    first_row = chunk.start // tp.row_elems
    rows = chunk.count // tp.row_elems
    present = tp.present()
    maps = tp.row_maps
    mask = np.stack(
        [cast(np.ndarray, maps[i])[first_row : first_row + rows] >= 0 for i, _ in present]
    )  # (inputs, rows)
    w = np.array([weights[i] for i, _ in present], dtype=np.float64)[:, None] * mask
    partial = ~mask.all(axis=0)
    # rows whose present inputs all have weight 0 (an appended token at alpha 0) take their
    # inputs' plain average: such a token still needs a row, and only those inputs have one
    unweighted = partial & (w.sum(axis=0) == 0)
    w[:, unweighted] = mask[:, unweighted]
    w[:, partial] /= w[:, partial].sum(axis=0, keepdims=True)
    return [torch.from_numpy(w[k].astype(np.float32)).reshape(rows, 1) for k in range(len(present))]


def _random_key(seed: int, name: str, input_index: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{name}\0{input_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _report_nonfinite(
    plan: MergePlan, chunk: _Chunk, inputs: Sequence[memoryview | None], warn: Callable[[str], None]
) -> None:
    """Name the input whose NaN or Inf reached the merged chunk; raise under check_finite."""
    tp = chunk.tensor
    for i, src in tp.present():
        values = torch.frombuffer(inputs[i], dtype=torch_dtype(src.dtype)).float()  # type: ignore[arg-type]
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            at = f" (element {chunk.start + int(bad[0])})" if tp.row_maps is None else ""
            message = f"{src.path}: tensor {tp.name!r} holds NaN or Inf{at}; the merged tensor is not finite"
            break
    else:
        message = f"tensor {tp.name!r}: the merge produced NaN or Inf from finite inputs (weights too large?)"
    if plan.check_finite:
        raise NonFiniteError(message + "; stopped because of --check-finite")
    warn(message)


def block_len(tp: TensorPlan, method: str, count: int) -> int:
    """Elements per arithmetic block of a chunk: cache-sized for elementwise work (whole rows
    for row-matched tensors), the whole chunk for methods that need whole tensors."""
    if tp.action == "rows":
        return max(tp.row_elems, COMPUTE_BLOCK // tp.row_elems * tp.row_elems)
    if tp.action == "merge" and METHODS[method].elementwise:
        return COMPUTE_BLOCK
    return max(count, 1)


def merge_chunk(
    plan: MergePlan,
    chunk: _Chunk,
    inputs: Sequence[memoryview | None],
    outs: Sequence[memoryview],
    fp32: Sequence[torch.Tensor],
    warn: Callable[[str], None] = lambda message: None,
) -> None:
    """Merge one chunk of raw input bytes into `outs`, one raw output chunk per weight variant."""
    tp = chunk.tensor
    present = tp.present()
    if tp.action == "copy":
        i0, src0 = present[0]
        first = inputs[i0]
        assert first is not None
        for i, src in present[1:]:
            if inputs[i] != first:
                raise IncompatibleInputsError(
                    f"{src.path}: non-float tensor {tp.name!r} ({tp.dtype}) differs from "
                    f"{src0.path}; integer and bool tensors are copied, not merged, so "
                    "the inputs must agree"
                )
        for out in outs:
            out[:] = first
        return
    method = METHODS[plan.method]
    raw = {i: torch.frombuffer(inputs[i], dtype=torch_dtype(src.dtype)) for i, src in present}  # type: ignore[arg-type]
    # elementwise work goes in cache-sized blocks: the several passes of the arithmetic then
    # stay in cache instead of streaming the whole chunk through memory for each pass
    # (rows: blocks of whole rows)
    step = block_len(tp, plan.method, chunk.count)
    for weights, out in zip(plan.variants, outs, strict=True):
        out_values = torch.frombuffer(out, dtype=torch_dtype(tp.dtype))
        row_weights = _row_weights(tp, chunk, weights) if tp.action == "rows" else []
        for begin in range(0, chunk.count, step):
            end = min(chunk.count, begin + step)
            work = {i: fp32[i][: end - begin].copy_(raw[i][begin:end]) for i, _ in present}  # (n,) fp32
            if tp.action == "rows":
                row0, row1 = begin // tp.row_elems, end // tp.row_elems
                merged = METHODS["linear"].fn(
                    [w.view(row1 - row0, tp.row_elems) for w in work.values()],
                    [w[row0:row1] for w in row_weights],
                )
            else:
                weighted = [i for i, _ in present if i != plan.base_index]
                kwargs: dict[str, Any] = {"density": plan.density}
                if plan.base_index is not None:
                    kwargs["base"] = work[plan.base_index]
                kwargs["rand"] = lambda k, w=weighted, b=begin, e=end: position_uniform(
                    _random_key(plan.seed, tp.name, w[k]), chunk.start + b, e - b
                )
                merged = method.fn([work[i] for i in weighted], [weights[i] for i in weighted], **kwargs)
            # a sum is NaN or Inf when any element is (or, rarely, when finite values overflow
            # it): one cheap pass; the exact elementwise check runs only then
            if not math.isfinite(float(merged.sum())) and not bool(torch.isfinite(merged).all()):
                _report_nonfinite(plan, chunk, inputs, warn)
            out_values[begin:end].copy_(merged.reshape(-1))


def execute_plan(
    plan: MergePlan,
    checkpoints: Sequence[Checkpoint],
    transaction: OutputTransaction,
    on_progress: Callable[[int], None] = lambda n: None,
    warnings: list[str] | None = None,
) -> int:
    """Write every output shard of `plan` into `transaction`; return the bytes written.

    Messages about non-finite values (one per tensor) are appended to `warnings`.
    """
    warned: set[str] = set()

    def warn(message: str) -> None:
        name = message.split("tensor ", 1)[-1].split(" ", 1)[0]
        if warnings is not None and name not in warned:
            warned.add(name)
            warnings.append(message)

    stop = threading.Event()
    read_q: queue.Queue[object] = queue.Queue(maxsize=1)
    write_q: queue.Queue[object] = queue.Queue(maxsize=1)
    hash_q: queue.Queue[object] = queue.Queue(maxsize=1)
    written = [0]
    pool = _Workspace(plan, stop)

    readers = ThreadPoolExecutor(max_workers=len(checkpoints), thread_name_prefix="lazymerge-read")

    def reader() -> None:
        try:
            for chunk in _chunks(plan):
                buffers = pool.take(pool.free_inputs)
                views = read_chunk(checkpoints, chunk, buffers, readers)
                _put(read_q, (chunk, buffers, views), stop)
        except _Stopped:
            return
        _put(read_q, _DONE, stop)

    def shard_path(variant: int, filename: str) -> Path:
        folder = plan.variant_names[variant]
        return transaction.shard_path(f"{folder}/{filename}" if folder else filename)

    def writer() -> None:
        current: list[StreamingShardWriter] = []
        current_no = -1
        try:
            while True:
                item = _get(write_q, stop)
                if item is _DONE:
                    break
                shard_no, buffers, nbytes, last = cast(tuple[int, list[bytearray], int, bool], item)
                if shard_no != current_no:
                    current = [
                        StreamingShardWriter(
                            shard_path(v, layout.shards[shard_no].filename),
                            layout.shards[shard_no],
                            hash_on_write=False,
                        )
                        for v, layout in enumerate(plan.layouts)
                    ]
                    current_no = shard_no
                    written[0] += sum(len(layout.shards[shard_no].header) for layout in plan.layouts)
                for shard_writer, buffer in zip(current, buffers, strict=True):
                    shard_writer.write(memoryview(buffer)[:nbytes])
                    written[0] += nbytes
                _put(hash_q, (current, buffers, nbytes, last), stop)
            for shard_no in range(current_no + 1, len(plan.layout.shards)) if not stop.is_set() else ():
                # only a merge of zero tensors leaves a shard with no chunk: header only
                for v, layout in enumerate(plan.layouts):
                    StreamingShardWriter(
                        shard_path(v, layout.shards[shard_no].filename), layout.shards[shard_no]
                    ).finish()
                    written[0] += len(layout.shards[shard_no].header)
            _put(hash_q, _DONE, stop)
        except BaseException:
            for shard_writer in current:
                shard_writer.close()
            raise

    def hasher() -> None:
        # hashing runs beside writing (hashlib releases the GIL), then finishes each shard:
        # the hash goes into its header, then fsync
        current: list[StreamingShardWriter] = []
        try:
            while True:
                item = _get(hash_q, stop)
                if item is _DONE:
                    return
                current, buffers, nbytes, last = cast(
                    tuple[list[StreamingShardWriter], list[bytearray], int, bool], item
                )
                for shard_writer, buffer in zip(current, buffers, strict=True):
                    shard_writer.hash_update(memoryview(buffer)[:nbytes])
                pool.free_outputs.put(buffers)
                if last:
                    for shard_writer in current:
                        shard_writer.finish()
        finally:
            for shard_writer in current:
                shard_writer.close()

    # one arithmetic thread: the reader, writer and hash threads need the other core, and torch's
    # own second thread only contends with them (measured: about 25% slower with two)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stages = [
        _Stage("lazymerge-read", reader, stop),
        _Stage("lazymerge-write", writer, stop),
        _Stage("lazymerge-hash", hasher, stop),
    ]
    for stage in stages:
        stage.start()
    try:
        while True:
            item = _get(read_q, stop)
            if item is _DONE:
                break
            chunk, buffers, views = cast(tuple[_Chunk, list[bytearray], list[memoryview | None]], item)
            outs = pool.take(pool.free_outputs)
            nbytes = chunk.count * itemsize(chunk.tensor.dtype)
            if nbytes:
                merge_chunk(plan, chunk, views, [memoryview(o)[:nbytes] for o in outs], pool.fp32, warn)
            pool.free_inputs.put(buffers)
            _put(write_q, (chunk.shard, outs, nbytes, chunk.last_in_shard), stop)
            on_progress(sum(len(v) for v in views if v is not None))
        _put(write_q, _DONE, stop)
    except _Stopped:
        pass
    except BaseException:
        stop.set()
        raise
    finally:
        for stage in stages:
            stage.join()
        readers.shutdown()
        torch.set_num_threads(torch_threads)
    for stage in stages:
        if stage.error is not None:
            raise stage.error
    for v, layout in enumerate(plan.layouts):
        if layout.index is not None:
            transaction.write_small(
                str(shard_path(v, INDEX_NAME).relative_to(transaction.shard_path(""))), layout.index
            )
            written[0] += len(layout.index)
    return written[0]
