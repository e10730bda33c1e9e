"""`lazymerge verify`: check a checkpoint's headers, index, sizes and recorded data hashes."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from lazymerge.errors import IntegrityError, NonFiniteError
from lazymerge.io.dtypes import COMPLEX_DTYPES, is_float, torch_dtype
from lazymerge.io.hub_cache import resolve_input
from lazymerge.io.reader import Checkpoint, read_header_file
from lazymerge.io.writer import DATA_HASH_KEY

_BLOCK = 16 * 2**20


@dataclass
class VerifyReport:
    path: str
    shards: int = 0
    tensors: int = 0
    hashes_checked: int = 0
    unhashed: list[str] = field(default_factory=list)
    finite_checked: int = 0
    #: Where a Hugging Face model id was found in the cache (None for local paths).
    source: str | None = None

    def format(self) -> str:
        lines = [
            f"{self.path}: sound: {self.shards} shard(s), {self.tensors} tensors, headers and sizes valid, "
            f"{self.hashes_checked} data hash(es) match"
        ]
        if self.source is not None:
            lines.append(f"  read {self.source}")
        if self.unhashed:
            lines.append(f"  no recorded hash (not written by lazymerge): {', '.join(self.unhashed)}")
        if self.finite_checked:
            lines.append(f"  {self.finite_checked} floating-point or complex tensors hold no NaN or Inf")
        return "\n".join(lines)


def _data_sha256(path: Path, start: int) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        position = start
        while n := os.preadv(fh.fileno(), [view], position):
            digest.update(view[:n])
            position += n
    return digest.hexdigest()


def verify_checkpoint(path: str | os.PathLike[str], finite: bool = False) -> VerifyReport:
    """Validate every header and the index, and recompute recorded SHA-256 hashes.

    `path` may be a Hugging Face model id found in the local cache (see `lazymerge.io.hub_cache`).

    Raises:
        HeaderError and friends for malformed files, IntegrityError for a hash mismatch,
        NonFiniteError (with `finite`) for NaN or Inf.
    """
    import torch

    source = resolve_input(path)
    report = VerifyReport(str(path), source=source.describe() if source.from_hub_cache else None)
    with Checkpoint.open(source.path) as ckpt:  # headers, index and file sizes are validated here
        report.tensors = len(ckpt)
        report.shards = len(ckpt.files)
        for shard in ckpt.files:
            if shard.name.endswith(".bin"):
                report.unhashed.append(shard.name)
                continue
            header = read_header_file(shard)
            recorded = header.metadata.get(DATA_HASH_KEY)
            if recorded is None:
                report.unhashed.append(shard.name)
                continue
            actual = _data_sha256(shard, header.data_start)
            if actual != recorded:
                raise IntegrityError(
                    f"{shard}: tensor data SHA-256 {actual[:16]}... differs from {recorded[:16]}... recorded "
                    "when lazymerge wrote it; the file was changed or corrupted after writing"
                )
            report.hashes_checked += 1
        if finite:
            for info in ckpt.values():
                complex_values = info.dtype in COMPLEX_DTYPES
                if not (is_float(info.dtype) or complex_values) or not info.nbytes:
                    continue
                step = max(info.itemsize, _BLOCK // info.itemsize * info.itemsize)
                buf = bytearray(min(step, info.nbytes))
                for begin in range(0, info.nbytes, step):
                    view = memoryview(buf)[: min(step, info.nbytes - begin)]
                    ckpt.read_into(info, begin, view)
                    values = torch.frombuffer(view, dtype=torch_dtype(info.dtype))
                    # a complex number is finite when both parts are; `.float()` would drop the
                    # imaginary part, so its parts are checked as a (..., 2) real view
                    values = torch.view_as_real(values) if complex_values else values.float()
                    if not bool(torch.isfinite(values).all()):
                        part = " (in its real or imaginary part)" if complex_values else ""
                        raise NonFiniteError(f"{info.path}: tensor {info.name!r} holds NaN or Inf{part}")
                report.finite_checked += 1
    return report
