"""Resident memory of this process, split into anonymous and file-backed pages.

Mapped file pages count as resident memory, so a single RSS figure can hide whether memory went to
real allocations (anonymous) or to mapped files (file-backed). On Linux both come from
/proc/self/status; elsewhere only the total is known (psutil) and the split is reported as None.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

_STATUS = "/proc/self/status"

#: Bytes a CPU tensor's data must start on for the CPU's kernels to round as they do for torch's
#: own allocations (64: an AVX-512 vector; torch aligns its CPU memory to it).
CPU_ALIGNMENT = 64


def aligned(tensor: Any) -> Any:
    """`tensor`, or a copy of it in torch's own memory when it is a CPU tensor whose data starts
    off a `CPU_ALIGNMENT` boundary (mapped from a file at a header's offset, or read into a
    Python buffer): the CPU's matmul kernels round by alignment, and a reward must depend on the
    weights only, not on how they reached memory."""
    if tensor.device.type == "cpu" and tensor.data_ptr() % CPU_ALIGNMENT:
        return tensor.clone()
    return tensor


@dataclass(frozen=True)
class RssSample:
    """Resident bytes: total, anonymous and file-backed (None where the OS does not say)."""

    total: int
    anon: int | None
    file: int | None


def _status_fields(path: str = _STATUS) -> dict[str, int] | None:
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[key] = int(parts[0]) * 1024
    return fields


def current_rss() -> RssSample:
    fields = _status_fields()
    if fields and "RssAnon" in fields:
        return RssSample(
            fields["VmRSS"], fields["RssAnon"], fields.get("RssFile", 0) + fields.get("RssShmem", 0)
        )
    import psutil

    return RssSample(psutil.Process().memory_info().rss, None, None)


def peak_total_rss() -> int | None:
    """The kernel's own high-water mark of total RSS over the process's life (Linux)."""
    fields = _status_fields()
    return fields.get("VmHWM") if fields else None


class PeakRssSampler:
    """Samples RSS in a background thread and keeps the peak of each part.

    Example:
        >>> with PeakRssSampler() as sampler:      # doctest: +SKIP
        ...     work()
        >>> sampler.peak.anon                        # doctest: +SKIP
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lazymerge-rss", daemon=True)
        self._total = 0
        self._anon: int | None = None
        self._file: int | None = None

    def _take(self) -> None:
        s = current_rss()
        self._total = max(self._total, s.total)
        if s.anon is not None:
            self._anon = max(self._anon or 0, s.anon)
        if s.file is not None:
            self._file = max(self._file or 0, s.file)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __enter__(self) -> PeakRssSampler:
        self._take()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    @property
    def peak(self) -> RssSample:
        hwm = peak_total_rss()
        return RssSample(max(self._total, hwm or 0), self._anon, self._file)
