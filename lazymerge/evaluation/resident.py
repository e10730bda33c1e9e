"""A sweep's inputs read once and kept in memory, and one reward model every point rewrites.

Without it each sweep point opens the inputs again, reads every tensor it merges from the files
(through the page cache at best) and builds a new transformers model. With `--resident` the
tensors the sweep's merges read are copied into one anonymous memory region before the first
point (`ResidentCheckpoint`); each point then plans its merge from the same headers, merges from
that memory with the same engine and arithmetic (`engine.iter_merged_tensors`), and copies each
merged tensor into the parameters of the model the first point built. The rewards are therefore
bit-identical to the streaming in-memory build's (the tests hold this); what goes is the reads
and the model construction.

The region lives in host RAM, also for CUDA scoring: the merge runs on the CPU and each merged
tensor is copied into the model's parameters on the device.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.errors import OptionError
from lazymerge.io.dtypes import TensorInfo
from lazymerge.io.reader import Checkpoint

#: Each tensor starts at a multiple of this in the region (torch views need aligned elements).
ALIGN = 64
#: The share of the RAM available when the sweep starts that `--resident auto` may take for the
#: inputs and the model together; the rest stays for the merge's buffers, the scorer and others.
AUTO_SHARE = 0.6


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class ResidentCheckpoint(Checkpoint):
    """An opened checkpoint whose tensors named at creation are held in memory.

    The same mapping of names to `TensorInfo` as the checkpoint it copies (so plans are made from
    it unchanged); reads of held tensors come from memory (`read_span` hands out a view, with no
    copy), reads of any other tensor go to the source checkpoint, which stays open until `close`.
    """

    def __init__(self, source: Checkpoint, infos: Iterable[TensorInfo]):
        super().__init__(source.path, dict(source.items()), source.metadata, shards=source.shards)
        self._source = source
        held = {(i.path, i.offset): i for i in infos if i.nbytes}
        self.resident_bytes = sum(_aligned(i.nbytes) for i in held.values())
        # private anonymous memory (a shared mapping would count as shared memory, not the
        # process's own): never file-backed, never written back
        self._memory = mmap.mmap(-1, max(self.resident_bytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._views: dict[tuple[Path, int], memoryview] = {}
        position = 0
        for key, info in sorted(held.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            view = memoryview(self._memory)[position : position + info.nbytes]
            source.read_into(info, 0, view)  # in file order: the reads stream each file once
            self._views[key] = view
            position += _aligned(info.nbytes)
        self.bytes_read = source.bytes_read

    def stat_when_opened(self, shard: Path) -> Any:
        return self._source.stat_when_opened(shard)

    def read_into(self, info: TensorInfo, byte_start: int, buffer: memoryview) -> None:
        view = self._views.get((info.path, info.offset))
        if view is None:
            self._source.read_into(info, byte_start, buffer)
            return
        buffer[:] = view[byte_start : byte_start + len(buffer)]

    def read_span(self, info: TensorInfo, byte_start: int, nbytes: int, buffer: memoryview) -> memoryview:
        view = self._views.get((info.path, info.offset))
        if view is None:
            return self._source.read_span(info, byte_start, nbytes, buffer)
        return view[byte_start : byte_start + nbytes]

    def enable_direct_io(self) -> int:
        return 0  # held tensors are read from memory

    def close(self) -> None:
        for view in self._views.values():
            view.release()
        self._views.clear()
        try:
            self._memory.close()
        except BufferError:  # a merged tensor still viewing an input: freed with the last view
            pass
        self._source.close()


def plan_sources(plans: Iterable[Any], n_inputs: int) -> list[list[TensorInfo]]:
    """Per input, every tensor any of `plans` (`MergePlan`s over the same inputs) reads."""
    used: list[dict[tuple[Path, int], TensorInfo]] = [{} for _ in range(n_inputs)]
    for plan in plans:
        for tp in plan.tensors.values():
            for i, src in tp.present():
                used[i][(src.path, src.offset)] = src
    return [list(u.values()) for u in used]


@dataclass(frozen=True)
class ResidentDecision:
    """Whether a sweep keeps its inputs resident, and the line that says why."""

    resident: bool
    line: str


def decide(
    mode: str, input_bytes: int, model_bytes: int, available: int, why_not: str | None = None
) -> ResidentDecision:
    """Resolve `--resident auto|on|off` for inputs of `input_bytes` beside a model of
    `model_bytes`, with `available` bytes of RAM free now.

    Args:
        why_not: a reason the sweep cannot keep inputs resident at all (`--write`, Ray).

    Raises:
        OptionError for `on` with `why_not`.
    """
    from lazymerge.progress import format_bytes

    need = input_bytes + model_bytes
    sizes = f"inputs {format_bytes(input_bytes)} + model {format_bytes(model_bytes)}"
    if mode == "off":
        return ResidentDecision(False, "  inputs: read from disk for every point (--resident off)")
    if why_not is not None:
        if mode == "on":
            raise OptionError(f"--resident on: {why_not}; use --resident auto or off")
        return ResidentDecision(False, f"  inputs: read from disk for every point ({why_not})")
    if mode == "auto" and need > AUTO_SHARE * available:
        return ResidentDecision(
            False,
            f"  inputs: read from disk for every point ({sizes} is over {AUTO_SHARE:.0%} of the "
            f"{format_bytes(available)} RAM available; --resident on to force)",
        )
    return ResidentDecision(True, f"  inputs: resident in RAM, read once ({sizes}; --resident off to stream)")


def open_resident(
    checkpoints: Sequence[Checkpoint], sources: Sequence[Sequence[TensorInfo]]
) -> list[ResidentCheckpoint]:
    """Hold in memory the tensors `sources` names of each of `checkpoints` (`plan_sources`); the
    checkpoints are taken over: closed with the resident ones, or all at once on failure."""
    resident: list[ResidentCheckpoint] = []
    try:
        for ckpt, infos in zip(checkpoints, sources, strict=True):
            resident.append(ResidentCheckpoint(ckpt, infos))
    except BaseException:
        for r in resident:
            r.close()
        for ckpt in checkpoints[len(resident) :]:
            ckpt.close()
        raise
    return resident
