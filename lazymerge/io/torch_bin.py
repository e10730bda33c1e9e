"""PyTorch `.bin` checkpoints (the zip format of `torch.save`), read without running their pickle.

A `.bin` is a zip archive holding `*/data.pkl` (a pickle describing the tensors) and one stored,
uncompressed record per storage (`*/data/<key>`). lazymerge unpickles `data.pkl` with its own
restricted unpickler: the only globals it resolves are stand-ins for the storage types,
`OrderedDict` and torch's tensor-rebuild functions, and they only record where each tensor's bytes
lie. Nothing from the file is imported or called, so a pickle that would run code is refused
before anything runs. Tensor bytes are then read like safetensors data, with positional reads.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.errors import HeaderError, InputError
from lazymerge.io.dtypes import DTYPES, STORAGE_DTYPES, TensorInfo


class UnsafePickleError(HeaderError):
    """A `.bin` pickle references something other than tensors and their storages."""


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _LazyTensor:
    storage: _StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _LazyTensor:
    if not isinstance(storage, _StorageRef):
        raise UnsafePickleError("tensor rebuilt from something that is not a storage")
    return _LazyTensor(
        storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    )


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    if not isinstance(data, _LazyTensor):
        raise UnsafePickleError("parameter rebuilt from something that is not a tensor")
    return data


class _WeightsUnpickler(pickle.Unpickler):
    _ALLOWED: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
    }

    def __init__(self, file: Any, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: pickle references {module}.{name}, which is not part of a weights-only "
                "checkpoint; refusing to load it (nothing was run)"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
        ):
            raise UnsafePickleError(f"{self.source}: unexpected persistent id {pid!r:.80}")
        return _StorageRef(str(pid[2]), pid[1].dtype, int(pid[4]))


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _record_data_offset(fh: Any, info: zipfile.ZipInfo) -> int:
    fh.seek(info.header_offset)
    local = fh.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise HeaderError(f"bad zip local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_bin_tensors(path: Path) -> list[TensorInfo]:
    """List the tensors of a `.bin` checkpoint with their byte locations, running no pickled code.

    Raises:
        InputError for a legacy (non-zip) file, UnsafePickleError for a pickle that is not
        weights-only, HeaderError for a malformed archive.
    """
    source = str(path)
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"{source}: legacy (pre-zip) PyTorch checkpoint; lazymerge reads only the zip format. "
            "Convert it once, in a trusted environment, to .safetensors (safetensors.torch.save_file "
            "of torch.load(..., weights_only=True))"
        )
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as fh:
            names = archive.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise HeaderError(f"{source}: zip archive holds no single */data.pkl; not a torch.save file")
            prefix = pkl[0][: -len("data.pkl")]
            with archive.open(pkl[0]) as pf:
                try:
                    obj = _WeightsUnpickler(pf, source).load()
                except (UnsafePickleError, HeaderError):
                    raise
                except Exception as exc:  # malformed pickle: any unpickling failure
                    raise HeaderError(f"{source}: data.pkl is not a valid weights pickle ({exc})") from None
            if not isinstance(obj, dict) or not all(
                isinstance(k, str) and isinstance(v, _LazyTensor) for k, v in obj.items()
            ):
                raise UnsafePickleError(f"{source}: pickle is not a flat state dict of named tensors")
            out = []
            for name, t in obj.items():
                info = archive.getinfo(f"{prefix}data/{t.storage.key}")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise HeaderError(
                        f"{source}: storage of tensor {name!r} is compressed; re-save it with torch.save"
                    )
                itemsize = DTYPES[t.storage.dtype].itemsize
                numel = math.prod(t.shape)
                if (
                    numel > 1
                    and t.stride != _contiguous_strides(t.shape)
                    and any(
                        s != c
                        for s, c, d in zip(t.stride, _contiguous_strides(t.shape), t.shape, strict=True)
                        if d != 1
                    )
                ):
                    raise InputError(f"{source}: tensor {name!r} is not contiguous; re-save it contiguous")
                begin = t.storage_offset * itemsize
                nbytes = numel * itemsize
                if begin + nbytes > info.file_size or t.storage.numel * itemsize != info.file_size:
                    raise HeaderError(
                        f"{source}: tensor {name!r} needs bytes [{begin}, {begin + nbytes}) of a "
                        f"{info.file_size}-byte storage record"
                    )
                out.append(
                    TensorInfo(
                        name, t.storage.dtype, t.shape, path, _record_data_offset(fh, info) + begin, nbytes
                    )
                )
            if out and max(t.offset + t.nbytes for t in out) > os.fstat(fh.fileno()).st_size:
                raise HeaderError(f"{source}: storage records run past the end of the file")
            return out
    except KeyError as exc:
        raise HeaderError(f"{source}: archive lacks storage record {exc}") from None
    except zipfile.BadZipFile as exc:
        raise HeaderError(f"{source}: damaged zip archive ({exc})") from None
