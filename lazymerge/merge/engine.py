"""Execute a merge plan: read, merge, write and hash chunk by chunk, in overlapping stages.

A reader thread fills chunk buffers with positional reads (one read per input, side by side),
the calling thread upcasts to fp32 in cache-sized blocks, applies the method and casts to the
output dtype, a writer thread appends the bytes to the current output shard, and a hash thread
feeds them to the shard's SHA-256 and finishes the shard. Bounded queues and fixed pools of
reused buffers keep at most a few chunks alive, so memory stays within the plan's budget whatever
the model size; file I/O, hashing and torch's kernels release the GIL and overlap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import mmap
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
from lazymerge.io.reader import Checkpoint
from lazymerge.io.writer import OutputTransaction, StreamingShardWriter
from lazymerge.merge.plan import MergePlan, buffer_sizes
from lazymerge.merge.tensor_plan import TensorPlan
from lazymerge.merge.workspace import Stopped, Workspace, block_len
from lazymerge.methods import METHODS, TensorStats, position_uniform

_DONE = object()


@dataclass(frozen=True)
class _Chunk:
    tensor: TensorPlan
    start: int  # first element
    count: int  # elements
    shard: int  # index of the output shard
    last_in_shard: bool
    #: Which pass over the tensor (`MergePlan.passes`): statistics passes first, the apply pass last.
    pass_no: int = 0

    @property
    def ends_pass(self) -> bool:
        return self.start + self.count >= self.tensor.numel


def _chunks(plan: MergePlan) -> Iterator[_Chunk]:
    """Every chunk in output file order; an empty tensor is one chunk of 0 elements."""
    for shard_no, shard in enumerate(plan.layouts[0].shards):
        jobs = [
            (tp, start, min(step, tp.numel - start), pass_no)
            for tp, step in (
                (plan.tensors[t.name], plan.chunk_len(plan.tensors[t.name])) for t in shard.tensors
            )
            for pass_no in range(plan.passes(tp))
            for start in (range(0, tp.numel, step) if tp.numel else (0,))
        ]
        for i, (tp, start, count, pass_no) in enumerate(jobs):
            yield _Chunk(tp, start, count, shard_no, i == len(jobs) - 1, pass_no)


def _block_deltas(
    plan: MergePlan,
    chunk: _Chunk,
    raw: dict[int, torch.Tensor],
    fp32: Sequence[torch.Tensor],
    begin: int,
    end: int,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(fp32 deltas x_i - base of the weighted inputs, fp32 base) over elements begin..end of a
    chunk; without a base model, (the fp32 inputs, None)."""
    work = {i: fp32[i][: end - begin].copy_(raw[i][begin:end]) for i in raw}  # (n,) fp32
    weighted = [i for i, _ in chunk.tensor.present() if i != plan.base_index]
    if plan.base_index is None:
        return [work[i] for i in weighted], None
    base = work[plan.base_index]
    return [work[i].sub_(base) for i in weighted], base


def _raw_inputs(chunk: _Chunk, inputs: Sequence[memoryview | None]) -> dict[int, torch.Tensor]:
    return {i: torch.frombuffer(inputs[i], dtype=torch_dtype(src.dtype)) for i, src in chunk.tensor.present()}


class TensorStatistics:
    """The statistics of the tensor being merged in several passes (`MergePlan.passes`): started
    at its first chunk, fed every chunk of its statistics passes, used by its apply pass."""

    def __init__(self, plan: MergePlan):
        self.plan = plan
        self.name = ""
        self.stats: TensorStats | None = None

    def for_chunk(self, chunk: _Chunk) -> TensorStats:
        """The statistics of `chunk`'s tensor, started afresh at its first pass's first chunk."""
        tp = chunk.tensor
        bounded = self.plan.method_spec.bounded
        assert bounded is not None
        if self.stats is None or self.name != tp.name or (chunk.pass_no == 0 and chunk.start == 0):
            density = self.plan.density if tp.density is None else tp.density
            inputs = sum(1 for i, _ in tp.present() if i != self.plan.base_index)
            self.name, self.stats = tp.name, bounded.start(tp.numel, inputs, density, dict(tp.params))
        return self.stats

    def observe(
        self, chunk: _Chunk, inputs: Sequence[memoryview | None], fp32: Sequence[torch.Tensor]
    ) -> None:
        """Feed one chunk of a statistics pass, block by block."""
        stats = self.for_chunk(chunk)
        raw = _raw_inputs(chunk, inputs)
        bounded = self.plan.method_spec.bounded
        assert bounded is not None
        step = self.plan.block_elems // bounded.align * bounded.align
        for begin in range(0, chunk.count, step):
            end = min(chunk.count, begin + step)
            stats.observe(chunk.pass_no, _block_deltas(self.plan, chunk, raw, fp32, begin, end)[0])
        if chunk.ends_pass:
            stats.end_pass(chunk.pass_no)


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


def read_chunk(
    checkpoints: Sequence[Checkpoint],
    chunk: _Chunk,
    buffers: Sequence[mmap.mmap],
    pool: ThreadPoolExecutor | None = None,
) -> list[memoryview | None]:
    """Read each contributing input's bytes of `chunk` into its buffer (`Workspace` input
    buffers: page-aligned, with room for a direct read's span); None for the others.

    With `pool`, the inputs are read concurrently: separate files stream faster side by side
    than taken in turns.
    """
    tp = chunk.tensor
    views: list[memoryview | None] = [None] * len(tp.sources)

    def read_one(i: int, src: TensorInfo) -> None:
        nbytes = chunk.count * src.itemsize
        if tp.row_maps is None:
            views[i] = checkpoints[i].read_span(
                src, chunk.start * src.itemsize, nbytes, memoryview(buffers[i])
            )
            return
        view = memoryview(buffers[i])[:nbytes]
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


def _nonfinite_message(
    plan: MergePlan, chunk: _Chunk, inputs: Sequence[memoryview | None], merged_finite: bool
) -> str:
    """Name the input whose NaN or Inf reached the output, else say how finite inputs did."""
    tp = chunk.tensor
    for i, src in tp.present():
        values = torch.frombuffer(inputs[i], dtype=torch_dtype(src.dtype)).float()
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            at = f" (element {chunk.start + int(bad[0])})" if tp.row_maps is None else ""
            return f"{src.path}: tensor {tp.name!r} holds NaN or Inf{at}; the merged tensor is not finite"
    if merged_finite:
        return (
            f"tensor {tp.name!r}: merged values overflow the output dtype {tp.dtype} (cast to Inf, or "
            "NaN or its largest value for 8-bit floats); "
            "choose a wider --dtype"
        )
    return f"tensor {tp.name!r}: the merge produced NaN or Inf from finite inputs (weights too large?)"


def _block_finite(merged: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether a block's output values (`target`, cast from the fp32 `merged`) are all finite.

    One reduction over the fp32 block, which allocates nothing: its min and max are NaN when any
    element is, infinite when any is, and beyond the output dtype's range when the cast may have
    overflowed; only then is the cast output checked element by element. (A sum of the cast
    output would upcast it into a temporary per block, and those temporaries left about 0.5 GB
    of heap behind on a 1.1B model.)
    """
    low, high = (float(v) for v in torch.aminmax(merged))
    limit = torch.finfo(target.dtype).max
    if math.isfinite(low) and math.isfinite(high) and -limit <= low and high <= limit:
        return True
    if target.element_size() == 1:
        # 8-bit floats: torch's casts saturate (E4M3) or give NaN (FNUZ) or Inf (E5M2) beyond the
        # range, and torch has no isfinite for most of them: out of range is overflow
        return False
    return bool(torch.isfinite(target).all())


def _apply_method(
    plan: MergePlan,
    chunk: _Chunk,
    work: dict[int, torch.Tensor],
    weights: Sequence[float],
    begin: int,
    end: int,
) -> torch.Tensor:
    """The plan's method over one block (elements begin..end of `chunk`) of fp32 copies `work`,
    with the tensor's own density and parameters where the plan gives them."""
    tp = chunk.tensor
    weighted = [i for i, _ in tp.present() if i != plan.base_index]
    density = plan.density if tp.density is None else tp.density
    # the shape: row-wise methods (della's ranks, arcee_fusion's softmaxes) get whole tensors, or
    # whole slabs along dimension 0 (della in chunks: `MergePlan.block_unit`)
    unit = plan.block_unit(tp)
    shape = tp.shape if not plan.bounded(tp) or len(tp.shape) < 2 else ((end - begin) // unit, *tp.shape[1:])
    kwargs: dict[str, Any] = {"density": density, "shape": shape, **dict(tp.params)}
    if plan.base_index is not None:
        kwargs["base"] = work[plan.base_index]
    kwargs["rand"] = lambda k: position_uniform(
        _random_key(plan.seed, tp.name, weighted[k]), chunk.start + begin, end - begin
    )
    return plan.method_spec.fn([work[i] for i in weighted], [weights[i] for i in weighted], **kwargs)


def _copy_chunk(tp: TensorPlan, inputs: Sequence[memoryview | None], outs: Sequence[memoryview]) -> None:
    """Copy a non-float tensor's chunk, which every input must hold alike."""
    present = tp.present()
    i0, src0 = present[0]
    first = inputs[i0]
    assert first is not None
    for i, src in present[1:]:
        if inputs[i] != first:
            raise IncompatibleInputsError(
                f"{src.path}: non-float tensor {tp.name!r} ({tp.dtype}) differs from "
                f"{src0.path}; {tp.dtype} tensors are copied, not merged (integers, bool, complex "
                "and F8_E8M0 scales alike), so the inputs must agree"
            )
    for out in outs:
        out[:] = first


def merge_chunk(
    plan: MergePlan,
    chunk: _Chunk,
    inputs: Sequence[memoryview | None],
    outs: Sequence[memoryview],
    fp32: Sequence[torch.Tensor],
    warn: Callable[[str, str], None] = lambda tensor, message: None,
    stats: TensorStatistics | None = None,
) -> None:
    """Merge one chunk of raw input bytes into `outs`, one raw output chunk per weight variant.

    A chunk of a tensor merged in several passes is merged by the apply pass of `stats`, which
    must have observed the tensor's statistics passes. Non-finite output values (checked after
    the cast to the output dtype) raise NonFiniteError under `plan.check_finite`, else go to
    `warn(tensor name, message)`.
    """
    tp = chunk.tensor
    present = tp.present()
    if tp.action == "copy":
        _copy_chunk(tp, inputs, outs)
        return
    raw = _raw_inputs(chunk, inputs)
    # elementwise work goes in cache-sized blocks: the several passes of the arithmetic then
    # stay in cache instead of streaming the whole chunk through memory for each pass
    # (rows: blocks of whole rows)
    multipass = plan.passes(tp) > 1
    if multipass and (stats is None or stats.stats is None or stats.name != tp.name):
        raise ValueError(
            f"tensor {tp.name!r} is merged in {plan.passes(tp)} passes: its statistics come first"
        )
    step = block_len(tp, not plan.whole(tp), chunk.count, plan.block_elems, plan.block_unit(tp))
    # a tensor's own weights (a mergekit config's gradients and filters) hold for a one-output plan
    variants = plan.variants if tp.weights is None else (tp.weights,)
    for variant, (weights, out) in enumerate(zip(variants, outs, strict=True)):
        out_values = torch.frombuffer(out, dtype=torch_dtype(tp.dtype))
        row_weights = _row_weights(tp, chunk, weights) if tp.action == "rows" else []
        for begin in range(0, chunk.count, step):
            end = min(chunk.count, begin + step)
            if multipass:
                assert stats is not None and stats.stats is not None
                deltas, base = _block_deltas(plan, chunk, raw, fp32, begin, end)
                weighted = [weights[i] for i, _ in present if i != plan.base_index]
                merged = stats.stats.apply(variant, deltas, weighted, base)
                _store(plan, chunk, inputs, merged, out_values[begin:end], warn)
                continue
            work = {i: fp32[i][: end - begin].copy_(raw[i][begin:end]) for i, _ in present}  # (n,) fp32
            if tp.action == "rows":
                row0, row1 = begin // tp.row_elems, end // tp.row_elems
                merged = METHODS["linear"].fn(
                    [w.view(row1 - row0, tp.row_elems) for w in work.values()],
                    [w[row0:row1] for w in row_weights],
                )
            else:
                merged = _apply_method(plan, chunk, work, weights, begin, end)
            _store(plan, chunk, inputs, merged, out_values[begin:end], warn)


def _store(
    plan: MergePlan,
    chunk: _Chunk,
    inputs: Sequence[memoryview | None],
    merged: torch.Tensor,
    target: torch.Tensor,
    warn: Callable[[str, str], None],
) -> None:
    """Cast a merged fp32 block into its output values, checking they are finite."""
    target.copy_(merged.reshape(-1))
    if not _block_finite(merged, target):
        message = _nonfinite_message(plan, chunk, inputs, bool(torch.isfinite(merged).all()))
        if plan.check_finite:
            raise NonFiniteError(message + "; stopped because of --check-finite")
        warn(chunk.tensor.name, message)


class MergePipeline:
    """Writes every output shard of a plan into a transaction, in four overlapping stages.

    `read` (a thread) fills input buffer sets; `merge` (the calling thread) turns them into
    output buffers; `write` (a thread) appends those to the current shard of every output;
    `hash` (a thread) feeds the same bytes to each shard's SHA-256 and finishes the shard. The
    stages hand buffers on through queues of one item; the buffers come from a `Workspace`
    sized by `lazymerge.merge.plan.buffer_sizes(plan)`.
    """

    def __init__(
        self,
        plan: MergePlan,
        checkpoints: Sequence[Checkpoint],
        transaction: OutputTransaction,
        on_progress: Callable[[int], None] = lambda n: None,
    ):
        self.plan = plan
        self.checkpoints = checkpoints
        self.transaction = transaction
        self.on_progress = on_progress
        self.stop = threading.Event()
        self.read_q: queue.Queue[object] = queue.Queue(maxsize=1)
        self.write_q: queue.Queue[object] = queue.Queue(maxsize=1)
        self.hash_q: queue.Queue[object] = queue.Queue(maxsize=1)
        self.workspace = Workspace(buffer_sizes(plan), self.stop)
        self.statistics = TensorStatistics(plan)
        if plan.direct_io:
            for checkpoint in checkpoints:
                checkpoint.enable_direct_io()
        #: One message per tensor whose output met NaN or Inf.
        self.warnings: list[str] = []
        self._warned: set[str] = set()
        self.written = 0

    def warn(self, tensor: str, message: str) -> None:
        if tensor not in self._warned:
            self._warned.add(tensor)
            self.warnings.append(message)

    def shard_path(self, variant: int, filename: str) -> Path:
        folder = self.plan.variant_names[variant]
        return self.transaction.shard_path(f"{folder}/{filename}" if folder else filename)

    def read(self) -> None:
        """Stage 1 (thread): read each chunk's input bytes, the inputs side by side."""
        with ThreadPoolExecutor(len(self.checkpoints), thread_name_prefix="lazymerge-read") as pool:
            try:
                for chunk in _chunks(self.plan):
                    buffers = self.workspace.take(self.workspace.free_inputs)
                    views = read_chunk(self.checkpoints, chunk, buffers, pool)
                    _put(self.read_q, (chunk, buffers, views), self.stop)
            except Stopped:
                return
        _put(self.read_q, _DONE, self.stop)

    def merge(self) -> None:
        """Stage 2 (calling thread): merge each chunk into one output buffer per output."""
        while True:
            item = _get(self.read_q, self.stop)
            if item is _DONE:
                break
            chunk, buffers, views = cast(tuple[_Chunk, list[mmap.mmap], list[memoryview | None]], item)
            if chunk.pass_no < self.plan.passes(chunk.tensor) - 1:  # a statistics pass: no output
                self.statistics.observe(chunk, views, self.workspace.fp32)
                self.workspace.free_inputs.put(buffers)
                continue
            outs = self.workspace.take(self.workspace.free_outputs)
            nbytes = chunk.count * itemsize(chunk.tensor.dtype)
            if nbytes:
                merge_chunk(
                    self.plan,
                    chunk,
                    views,
                    [memoryview(o)[:nbytes] for o in outs],
                    self.workspace.fp32,
                    self.warn,
                    self.statistics,
                )
            self.workspace.free_inputs.put(buffers)
            _put(self.write_q, (chunk.shard, outs, nbytes, chunk.last_in_shard), self.stop)
            self.on_progress(sum(len(v) for v in views if v is not None))
        _put(self.write_q, _DONE, self.stop)

    def write(self) -> None:
        """Stage 3 (thread): append output bytes to the current shard of every output."""
        layouts = self.plan.layouts
        current: list[StreamingShardWriter] = []
        opened: list[StreamingShardWriter] = []  # closed on an error: close is idempotent and locked
        current_no = -1
        try:
            while True:
                item = _get(self.write_q, self.stop)
                if item is _DONE:
                    break
                shard_no, buffers, nbytes, last = cast(tuple[int, list[mmap.mmap], int, bool], item)
                if shard_no != current_no:
                    current = []
                    for v, layout in enumerate(layouts):
                        current.append(
                            StreamingShardWriter(
                                self.shard_path(v, layout.shards[shard_no].filename),
                                layout.shards[shard_no],
                                hash_on_write=False,
                                staging=self.workspace.staging[v] if self.workspace.staging else None,
                            )
                        )
                        opened.append(current[-1])
                    current_no = shard_no
                    self.written += sum(len(layout.shards[shard_no].header) for layout in layouts)
                for shard_writer, buffer in zip(current, buffers, strict=True):
                    shard_writer.write(memoryview(buffer)[:nbytes])
                    self.written += nbytes
                    if last:
                        shard_writer.release_staging()  # the next shard's writer takes the buffer
                _put(self.hash_q, (current, buffers, nbytes, last), self.stop)
            for shard_no in range(current_no + 1, len(layouts[0].shards)) if not self.stop.is_set() else ():
                # only a merge of zero tensors leaves a shard with no chunk: header only
                for v, layout in enumerate(layouts):
                    StreamingShardWriter(
                        self.shard_path(v, layout.shards[shard_no].filename), layout.shards[shard_no]
                    ).finish()
                    self.written += len(layout.shards[shard_no].header)
            _put(self.hash_q, _DONE, self.stop)
        except BaseException:
            for shard_writer in opened:  # the hash thread may be finishing some: they wait
                shard_writer.close()
            raise

    def hash(self) -> None:
        """Stage 4 (thread): hash what was written (hashlib releases the GIL), then finish each
        shard: the hash goes into its header, then fsync."""
        current: list[StreamingShardWriter] = []
        try:
            while True:
                item = _get(self.hash_q, self.stop)
                if item is _DONE:
                    return
                current, buffers, nbytes, last = cast(
                    tuple[list[StreamingShardWriter], list[mmap.mmap], int, bool], item
                )
                for shard_writer, buffer in zip(current, buffers, strict=True):
                    shard_writer.hash_update(memoryview(buffer)[:nbytes])
                self.workspace.free_outputs.put(buffers)
                if last:
                    for shard_writer in current:
                        shard_writer.finish()
        finally:
            for shard_writer in current:
                shard_writer.close()

    def run(self) -> int:
        """Write every shard, then each output's index and companion files; return bytes written."""
        # one arithmetic thread: the reader, writer and hash threads need the other core, and
        # torch's own second thread only contends with them (measured: about 25% slower with two)
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        stages = [
            _Stage("lazymerge-read", self.read, self.stop),
            _Stage("lazymerge-write", self.write, self.stop),
            _Stage("lazymerge-hash", self.hash, self.stop),
        ]
        for stage in stages:
            stage.start()
        try:
            self.merge()
        except Stopped:
            pass
        except BaseException:
            self.stop.set()
            raise
        finally:
            for stage in stages:
                stage.join()
            torch.set_num_threads(torch_threads)
        for stage in stages:
            if stage.error is not None:
                raise stage.error
        if not self.plan.single_file:
            for v, layout in enumerate(self.plan.layouts):
                small = dict(self.plan.companion_files)
                if self.plan.variant_files:
                    small.update(self.plan.variant_files[v])
                if layout.index is not None:
                    small = {layout.index_name: layout.index, **small}
                folder = self.plan.variant_names[v]
                for name, data in small.items():
                    self.transaction.write_small(f"{folder}/{name}" if folder else name, data)
                    self.written += len(data)
        return self.written


def merge_tensor(
    plan: MergePlan,
    checkpoints: Sequence[Checkpoint],
    tp: TensorPlan,
    buffers: Sequence[mmap.mmap],
    fp32: Sequence[torch.Tensor],
    raw: memoryview,
    warn: Callable[[str, str], None],
    statistics: TensorStatistics | None = None,
) -> None:
    """Merge one whole tensor of a one-output plan into `raw` (its bytes in the output dtype),
    chunk by chunk through one input buffer set: its statistics passes first where it has any
    (`MergePlan.passes`), then the apply pass."""
    statistics = statistics if statistics is not None else TensorStatistics(plan)
    size = itemsize(tp.dtype)
    step = plan.chunk_len(tp)
    passes = plan.passes(tp)
    for pass_no in range(passes):
        for start in range(0, tp.numel, step):
            count = min(step, tp.numel - start)
            chunk = _Chunk(tp, start, count, 0, False, pass_no)
            views = read_chunk(checkpoints, chunk, buffers)
            if pass_no < passes - 1:
                statistics.observe(chunk, views, fp32)
                continue
            merge_chunk(
                plan, chunk, views, [raw[start * size : (start + count) * size]], fp32, warn, statistics
            )


def iter_merged_tensors(
    plan: MergePlan,
    checkpoints: Sequence[Checkpoint],
    variant: int = 0,
    destination: Callable[[str, int], memoryview | None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every output tensor of one output of `plan`, merged in memory, in file order.

    The same reads and arithmetic as `MergePipeline` (so the same bytes as a written output),
    with no file written: each tensor is made whole in its output dtype and handed over, and
    nothing else of the model is held here. Working memory: one input set of chunk buffers and
    the fp32 blocks (see `lazymerge.merge.workspace`), a third of a pipeline's or less.

    Args:
        destination: `(name, nbytes)` -> writable memory of that size to merge the tensor into
            (a model's parameter, rewritten in place), or None for new memory.
    """
    if not 0 <= variant < len(plan.variants):
        raise IndexError(f"plan has {len(plan.variants)} outputs, not {variant + 1}")
    # read through the page cache: a sweep reads the same inputs for every point
    one = dataclasses.replace(
        plan, variants=(plan.variants[variant],), variant_names=("",), direct_io=False, staging_bytes=0
    )
    # one input set and no output buffers: chunks are merged straight into the tensor's memory
    workspace = Workspace(buffer_sizes(one), threading.Event(), input_sets=1, output_sets=0)
    buffers = workspace.take(workspace.free_inputs)
    statistics = TensorStatistics(one)
    warned: set[str] = set()

    def warn(tensor: str, message: str) -> None:
        if tensor not in warned:
            warned.add(tensor)
            import warnings

            warnings.warn(message, RuntimeWarning, stacklevel=2)

    for shard in one.layouts[0].shards:
        for entry in shard.tensors:
            tp = one.tensors[entry.name]
            size = itemsize(tp.dtype)
            # (numel,) in the output dtype. A bytearray, not torch.empty: measured, torch's
            # allocations here left the process 0.45 GB larger across sweep points
            given = destination(tp.name, tp.numel * size) if destination is not None and tp.numel else None
            data = given if given is not None else bytearray(tp.numel * size)
            raw = memoryview(data)
            merge_tensor(one, checkpoints, tp, buffers, workspace.fp32, raw, warn, statistics)
            if tp.numel:
                yield tp.name, torch.frombuffer(data, dtype=torch_dtype(tp.dtype)).view(tp.shape)
            else:
                yield tp.name, torch.empty(tp.shape, dtype=torch_dtype(tp.dtype))
