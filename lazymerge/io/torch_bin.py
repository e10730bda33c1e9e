"""PyTorch `.bin` checkpoints (the zip format of `torch.save`), read without running their pickle.

A `.bin` is a zip archive holding `<prefix>/data.pkl` (a pickle describing the tensors), a
`version` record and one stored, uncompressed record per storage (`<prefix>/data/<key>`).
lazymerge unpickles `data.pkl` with its own restricted unpickler: the only globals it resolves are
stand-ins for the storage types, `OrderedDict` and torch's tensor-rebuild functions, and they only
record where each tensor's bytes lie. Nothing from the file is imported or called, so a pickle
that would run code is refused before anything runs. Tensor bytes are then read like safetensors
data, with positional reads.

The archive is validated the way `parse_header` validates a safetensors header, one error class
per failure (`BinArchiveError` and its subclasses), and at least as strictly as
`torch.load(weights_only=True)` validates it (checked by mutating archives and comparing): the
zip's end records, central directory and every local header as miniz (torch's zip reader) checks
them; the small records torch reads (`version`, `byteorder`, `.storage_alignment`,
`.data/serialization_id`); only the pickle opcodes and globals torch's weights-only unpickler
accepts; every tensor's shape, strides and storage offset (non-negative integers, 64-bit sizes,
contiguous), its rebuild arguments, and its bytes inside its storage record; every storage the
pickle references, used or not. Tensors may share a storage (tied weights, views): each is read
from its own byte range, exactly as `torch.load` gives it.

Memory stays bounded on hostile archives: the central directory, the inflated `data.pkl`, its
pickle opcodes and its tensors are counted against the limits below before they are read or
built, so a small file that would inflate to millions of objects is refused first. A pickle just
under every limit costs on the order of 100 MB. Storage records are not checksummed (that would
read every tensor twice); `torch.load` does not check them either.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import re
import stat
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

from lazymerge.errors import (
    BinFormatError,
    BinLimitError,
    BinNotZipError,
    BinPickleError,
    BinStorageError,
    BinTensorError,
    BinZipError,
    InputError,
    LazyMergeError,
    UnsafePickleError,
)
from lazymerge.io.dtypes import DTYPES, STORAGE_DTYPES, TensorInfo

__all__ = [
    "MAX_CENTRAL_DIRECTORY_BYTES",
    "MAX_DIMS",
    "MAX_PICKLE_BYTES",
    "MAX_PICKLE_OPCODES",
    "MAX_TENSORS",
    "UnsafePickleError",
    "read_bin_tensors",
]

#: Most tensors one `.bin` file may describe (a 7B model has about 300; large MoE shards a few thousand).
MAX_TENSORS = 16_384
#: Largest inflated data.pkl read, in bytes (torch writes about 150 bytes per tensor).
MAX_PICKLE_BYTES = 16 << 20
#: Most pickle opcodes in data.pkl (torch writes about 45 per tensor); bounds the objects built.
MAX_PICKLE_OPCODES = 1 << 20
#: Largest zip central directory, in bytes (about 100 bytes per record; each costs ~600 bytes parsed).
MAX_CENTRAL_DIRECTORY_BYTES = 4 << 20
#: Most zip records (one per storage, plus data.pkl, version, byteorder and a few more).
MAX_ZIP_RECORDS = MAX_TENSORS + 64
#: Most dimensions of one tensor.
MAX_DIMS = 64
#: `version` record values torch reads (its kMinSupportedFileFormatVersion..kMaxSupportedFileFormatVersion).
SUPPORTED_VERSIONS = range(1, 11)

_U64_MAX = 2**64 - 1
_LOCAL_HEADER = b"PK\x03\x04"
_END_RECORD = b"PK\x05\x06"
_END_RECORD64_LOCATOR = b"PK\x06\x07"
_END_RECORD64 = b"PK\x06\x06"
_PICKLE_MAGIC = b"\x80"
_LEGACY_HINT = (
    "Convert it once, in a trusted environment, to .safetensors (safetensors.torch.save_file "
    "of torch.load(..., weights_only=True))"
)
#: The pickle opcodes torch.load(weights_only=True) accepts (torch/_weights_only_unpickler.py), less
#: NEWOBJ and EMPTY_SET, which a state dict never needs. torch.save writes protocol 2 with these.
_ALLOWED_OPCODES = frozenset(
    "PROTO STOP MARK NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 LONG1 BINFLOAT SHORT_BINSTRING "
    "BINUNICODE EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST APPEND APPENDS EMPTY_DICT SETITEM "
    "SETITEMS GLOBAL REDUCE BUILD BINPERSID BINPUT LONG_BINPUT BINGET LONG_BINGET".split()
)
#: Opcodes that build objects of classes the pickle names, or look a global up from the stack
#: (which cannot be checked before unpickling): refused as unsafe.
_UNSAFE_OPCODES = frozenset("INST OBJ NEWOBJ NEWOBJ_EX EXT1 EXT2 EXT4 STACK_GLOBAL".split())
_MEMO_PUTS = frozenset({"BINPUT", "LONG_BINPUT"})


class _StorageType(NamedTuple):
    dtype: str


class _StorageRef(NamedTuple):
    key: str
    dtype: str
    numel: int


class _LazyTensor(NamedTuple):
    """What `_rebuild_tensor_v2` would build, unchecked: validated with its name afterwards."""

    storage: _StorageRef
    storage_offset: Any
    shape: Any
    stride: Any
    requires_grad: tuple[Any, ...]  # of the tensor, then of the Parameter wrapping it, if any


class _StateDict(dict[Any, Any]):
    """What `collections.OrderedDict()` unpickles to: a dict that ignores pickled attributes
    (torch pickles a state dict's `_metadata`, the modules' versions, with BUILD)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):  # torch.load updates the OrderedDict's __dict__ with it
            raise ValueError(f"an OrderedDict's pickled attributes are {_short(state)}, not a dict")


#: How messages call lazymerge's stand-ins for what a pickle builds.
_KINDS: dict[type, str] = {
    _StateDict: "an OrderedDict",
    _LazyTensor: "a tensor",
    _StorageRef: "a storage",
    _StorageType: "a storage type",
}


def _short(value: Any) -> str:
    """A short, one-line description of an untrusted value for a message (never a huge repr)."""
    if isinstance(value, str):
        return repr(value[:80]) + ("..." if len(value) > 80 else "")
    if isinstance(value, (int, float)):
        return "a huge integer" if isinstance(value, int) and value.bit_length() > 200 else str(value)
    if isinstance(value, (tuple, list)) and len(value) <= MAX_DIMS:
        items = [
            _short(v) if isinstance(v, (int, float, str)) else _KINDS.get(type(v), type(v).__name__)
            for v in value
        ]
        inner = ", ".join(items) + ("," if isinstance(value, tuple) and len(value) == 1 else "")
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    if value is None:
        return "None"
    return _KINDS.get(type(value), f"a {type(value).__name__}")


def _one_line(text: object, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64_MAX


#: The globals a weights-only pickle may name: OrderedDict and torch's rebuild functions (each
#: resolved to the unpickler's stand-in method of that name) and torch's storage types.
_REBUILDERS = {
    ("collections", "OrderedDict"): "_ordered_dict",
    ("torch._utils", "_rebuild_tensor_v2"): "_rebuild_tensor",
    ("torch._utils", "_rebuild_parameter"): "_rebuild_parameter",
}
_STORAGE_TYPES = {("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()}
_GLOBALS = frozenset(_REBUILDERS) | frozenset(_STORAGE_TYPES)


def _unsafe_global(source: str, module: object, name: object) -> str:
    return (
        f"{source}: pickle references {_one_line(module, 60)}.{_one_line(name, 60)}, which is not part of a "
        "weights-only checkpoint; refusing to load it (nothing was run)"
    )


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str):
        super().__init__(file)
        self.source = source
        self.tensors = 0
        self.storages: list[_StorageRef] = []

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _REBUILDERS:
            return getattr(self, _REBUILDERS[key])
        if key in _STORAGE_TYPES:
            return _STORAGE_TYPES[key]
        raise UnsafePickleError(_unsafe_global(self.source, module, name))

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[3], str)
            and _is_uint(pid[4])
        ):
            raise BinPickleError(
                f"{self.source}: data.pkl has persistent id {_short(pid)}; expected ('storage', a torch "
                "storage type, key string, location string, element count)"
            )
        ref = _StorageRef(pid[2], pid[1].dtype, pid[4])
        self.storages.append(ref)  # torch.load reads every storage referenced, used or not
        return ref

    def _ordered_dict(self, *args: Any) -> _StateDict:
        if args:
            raise UnsafePickleError(
                f"{self.source}: pickle builds an OrderedDict from {len(args)} arguments; torch.save "
                "builds it empty; refusing to load it (nothing was run)"
            )
        return _StateDict()

    def _check_hooks(self, hooks: Any, what: str) -> None:
        if not (hooks is None or (isinstance(hooks, dict) and not hooks)):
            raise BinPickleError(
                f"{self.source}: data.pkl gives a {what} backward hooks {_short(hooks)}; torch.save writes "
                "an empty OrderedDict"
            )

    def _rebuild_tensor(self, *args: Any) -> _LazyTensor:
        """Stands in for torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
        requires_grad, backward_hooks, metadata=None): records its arguments, checked later."""
        self.tensors += 1
        if self.tensors > MAX_TENSORS:
            raise BinLimitError(
                f"{self.source}: data.pkl describes more than {MAX_TENSORS} tensors, the limit per .bin "
                "file; split it into shards or convert it to .safetensors"
            )
        if len(args) not in (6, 7):
            raise BinPickleError(
                f"{self.source}: data.pkl rebuilds a tensor from {len(args)} arguments; "
                "_rebuild_tensor_v2 takes 6 or 7"
            )
        storage, storage_offset, size, stride, requires_grad, hooks = args[:6]
        if not isinstance(storage, _StorageRef):
            raise UnsafePickleError(
                f"{self.source}: pickle rebuilds a tensor from {_short(storage)}, not a storage; "
                "refusing to load it (nothing was run)"
            )
        self._check_hooks(hooks, "tensor")
        if len(args) == 7 and args[6]:
            raise BinPickleError(
                f"{self.source}: data.pkl gives a tensor metadata {_short(args[6])} (conjugate or negative "
                "views); lazymerge reads plain tensors only"
            )
        return _LazyTensor(storage, storage_offset, size, stride, (requires_grad,))

    def _rebuild_parameter(self, *args: Any) -> _LazyTensor:
        """Stands in for torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)."""
        if len(args) != 3:
            raise BinPickleError(
                f"{self.source}: data.pkl rebuilds a parameter from {len(args)} arguments; "
                "_rebuild_parameter takes 3"
            )
        data, requires_grad, hooks = args
        if not isinstance(data, _LazyTensor):
            raise UnsafePickleError(
                f"{self.source}: pickle rebuilds a parameter from {_short(data)}, not a tensor; "
                "refusing to load it (nothing was run)"
            )
        self._check_hooks(hooks, "parameter")
        return data._replace(requires_grad=(*data.requires_grad, requires_grad))


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _pread(fd: int, size: int, offset: int) -> bytes:
    return os.pread(fd, size, offset) if size > 0 else b""


class _EndRecord(NamedTuple):
    """The zip end-of-central-directory record (its zip64 version where there is one)."""

    at: int  # absolute offset of the (zip64) end record
    disk: int
    cd_disk: int
    entries_on_disk: int
    entries: int
    cd_size: int
    cd_offset: int


def _end_record(fd: int, size: int, source: str) -> _EndRecord:
    """The zip's end record, found the way `zipfile` finds it, checked as miniz (torch's zip
    reader) checks it: one disk, the central directory before the end record, bounded size.

    Raises:
        BinZipError, BinLimitError
    """
    tail_len = min(size, 22 + 0xFFFF)
    tail_start = size - tail_len
    tail = _pread(fd, tail_len, tail_start)
    if tail[-22:-18] == _END_RECORD and tail[-2:] == b"\0\0":
        at = len(tail) - 22
    else:
        at = tail.rfind(_END_RECORD)
        if at < 0 or len(tail) - at < 22:
            raise BinZipError(
                f"{source}: zip archive has no end-of-central-directory record; the file is truncated "
                "or damaged"
            )
    end = _EndRecord(tail_start + at, *struct.unpack("<HHHHII", tail[at + 4 : at + 20]))
    locator_at = tail_start + at - 20
    locator = _pread(fd, 20, locator_at) if locator_at >= 0 else b""
    if locator[:4] == _END_RECORD64_LOCATOR:
        (record_at,) = struct.unpack("<Q", locator[8:16])
        record = _pread(fd, 56, record_at) if record_at <= locator_at - 56 else b""
        if record[:4] != _END_RECORD64:
            raise BinZipError(
                f"{source}: zip64 end-record locator points to offset {record_at}, which holds no zip64 "
                "end record; the archive is damaged"
            )
        (record_size,) = struct.unpack("<Q", record[4:12])
        if record_size < 44:
            raise BinZipError(
                f"{source}: zip64 end record says it is {record_size} bytes, less than its 44 fixed bytes; "
                "the archive is damaged"
            )
        end = _EndRecord(record_at, *struct.unpack("<IIQQQQ", record[16:56]))
    if end.disk != 0 or end.cd_disk != 0 or end.entries_on_disk != end.entries:
        raise BinZipError(
            f"{source}: zip end record describes a multi-disk archive (disk {end.disk}, central directory "
            f"on disk {end.cd_disk}, {end.entries_on_disk} of {end.entries} records on this disk); "
            "torch.save writes one disk; the archive is damaged"
        )
    if end.cd_size > MAX_CENTRAL_DIRECTORY_BYTES or end.entries > MAX_ZIP_RECORDS:
        raise BinLimitError(
            f"{source}: zip central directory of {end.cd_size} bytes and {end.entries} records is over the "
            f"limit of {MAX_CENTRAL_DIRECTORY_BYTES} bytes and {MAX_ZIP_RECORDS} records; the archive is "
            "damaged or not a checkpoint"
        )
    if end.cd_offset + end.cd_size > end.at or end.cd_size < 46 * end.entries:
        raise BinZipError(
            f"{source}: zip central directory of {end.entries} records at bytes [{end.cd_offset}, "
            f"{end.cd_offset + end.cd_size}) does not fit before its end record at byte {end.at}; the "
            "archive is damaged"
        )
    _walk_central_directory(fd, end, source)
    return end


def _walk_central_directory(fd: int, end: _EndRecord, source: str) -> None:
    """The central directory must hold exactly `end.entries` headers filling exactly `end.cd_size`
    bytes, as miniz requires (`zipfile` stops at the first header past the size)."""
    data = _pread(fd, end.cd_size, end.cd_offset)
    pos = count = 0
    while pos < len(data):
        if data[pos : pos + 4] != b"PK\x01\x02" or pos + 46 > len(data):
            raise BinZipError(
                f"{source}: zip central directory entry {count} at byte {end.cd_offset + pos} has no header "
                "signature; the archive is damaged"
            )
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        pos += 46 + name_len + extra_len + comment_len
        count += 1
    if pos != end.cd_size or count != end.entries:
        raise BinZipError(
            f"{source}: zip central directory holds {count} entries in {pos} bytes; its end record says "
            f"{end.entries} entries in {end.cd_size} bytes; the archive is damaged"
        )


def _check_file(fd: int, source: str) -> _EndRecord:
    """The zip end record of an opened `.bin`, after checking it is a regular file starting like
    a zip."""
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{source}: is a folder, not a .bin file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{source}: is not a regular file (a FIFO, socket or device); expected a .bin file")
    head = _pread(fd, 4, 0)
    if head != _LOCAL_HEADER:
        if head[:1] == _PICKLE_MAGIC:
            raise BinNotZipError(
                f"{source}: legacy (pre-zip) PyTorch checkpoint; lazymerge reads only the zip format. "
                + _LEGACY_HINT
            )
        found = "is empty" if not head else f"starts with bytes {head!r}"
        raise BinNotZipError(
            f"{source}: not a torch.save zip archive: expected it to start with {_LOCAL_HEADER!r}, but it "
            f"{found}"
        )
    return _end_record(fd, st.st_size, source)


#: Every record of an archive by name, with the absolute offset of its data.
_Records = dict[str, tuple[zipfile.ZipInfo, int]]
#: zip flags torch's reader accepts: compression options, data descriptor, UTF-8 name.
_ALLOWED_ZIP_FLAGS = 0x2 | 0x4 | 0x8 | 0x800


def _info(records: _Records, name: str) -> zipfile.ZipInfo | None:
    found = records.get(name)
    return found[0] if found is not None else None


def _check_records(fd: int, archive: zipfile.ZipFile, end: _EndRecord, source: str) -> _Records:
    """Every record, checked against what miniz (torch's zip reader) accepts, by name, with the
    absolute offset of its data (from its local header).

    Raises:
        BinZipError
    """
    infos = archive.infolist()
    if len(infos) != end.entries or archive.start_dir != end.cd_offset:
        raise BinZipError(
            f"{source}: zip end record announces {end.entries} records at byte {end.cd_offset} but the "
            f"central directory holds {len(infos)} records at byte {archive.start_dir}; "
            "the archive is damaged"
        )
    records: _Records = {}
    for info in infos:
        what = f"{source}: zip record {_short(info.filename)}"
        raw_name = _raw_name(info, what)
        if info.filename in records:
            raise BinZipError(f"{what}: appears twice in the archive; it is ambiguous")
        _check_record_entry(info, what)
        records[info.filename] = (info, _data_offset(fd, info, raw_name, end, what))
    return records


def _raw_name(info: zipfile.ZipInfo, what: str) -> bytes:
    """A record's name as its headers store it, which must be UTF-8."""
    raw_name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    try:
        raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise BinZipError(f"{what}: name is not valid UTF-8; the archive is damaged") from None
    return raw_name


def _check_record_entry(info: zipfile.ZipInfo, what: str) -> None:
    """A record's central-directory entry: flags, compression, sizes, disk, not a folder."""
    if info.flag_bits & ~_ALLOWED_ZIP_FLAGS:
        raise BinZipError(
            f"{what}: has zip flags {info.flag_bits:#06x} (encryption or another feature torch's "
            "reader refuses); the archive is damaged"
        )
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise BinZipError(f"{what}: compression method {info.compress_type} is neither stored nor deflate")
    if (info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size) or (
        info.file_size and not info.compress_size
    ):
        raise BinZipError(
            f"{what}: compressed size {info.compress_size} does not fit size {info.file_size}; the "
            "archive is damaged"
        )
    if info.volume != 0:
        raise BinZipError(f"{what}: lies on disk {info.volume}; torch.save writes one disk")
    if info.filename.endswith("/") or info.external_attr & 0x10:
        raise BinZipError(
            f"{what}: is marked as a folder (external attributes {info.external_attr:#x}); torch's "
            "reader would read it as empty"
        )


def _data_offset(fd: int, info: zipfile.ZipInfo, raw_name: bytes, end: _EndRecord, what: str) -> int:
    """The absolute offset of a record's data, from its local header, which must name it too;
    the data must end before the central directory."""
    local = _pread(fd, 30 + len(raw_name), info.header_offset) if 0 <= info.header_offset else b""
    if len(local) != 30 + len(raw_name) or local[:4] != _LOCAL_HEADER:
        raise BinZipError(
            f"{what}: has no zip local header at offset {info.header_offset}; the archive is damaged"
        )
    if local[30:] != raw_name:
        raise BinZipError(
            f"{what}: local header names {_short(local[30:].decode('latin-1'))}; the archive is damaged"
        )
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    data_offset: int = info.header_offset + 30 + name_len + extra_len
    if data_offset + info.compress_size > end.cd_offset:
        raise BinZipError(
            f"{what}: data at bytes [{data_offset}, {data_offset + info.compress_size}) runs into the "
            f"central directory at byte {end.cd_offset}; the file is truncated or damaged"
        )
    return data_offset


def _read_record(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """At most `limit + 1` bytes of a record, inflated and CRC-checked by zipfile."""
    with archive.open(info) as fh:
        return fh.read(limit + 1)


def _read_small(archive: zipfile.ZipFile, info: zipfile.ZipInfo, source: str, limit: int = 64) -> bytes:
    """A small record torch.load reads whole (version, byteorder, ...), at most `limit` bytes."""
    raw = _read_record(archive, info, limit)
    if len(raw) > limit:
        raise BinFormatError(
            f"{source}: record {_short(info.filename)} is longer than {limit} bytes; torch.save writes a few"
        )
    return raw


def _check_format(archive: zipfile.ZipFile, records: _Records, prefix: str, source: str) -> None:
    """The small records torch.load reads (`version`, `byteorder`, `.storage_alignment`,
    `.data/serialization_id`), checked as it checks them."""
    version_info = _info(records, f"{prefix}.data/version") or _info(records, f"{prefix}version")
    if version_info is None:
        raise BinFormatError(f"{source}: archive has no {prefix}version record; not a torch.save file")
    raw = _read_small(archive, version_info, source)
    found = re.match(rb"\s*([+-]?\d{1,18})", raw)
    if found is None:
        raise BinFormatError(
            f"{source}: {version_info.filename} holds {raw[:32]!r}, not a format version number"
        )
    version = int(found.group(1))
    if version not in SUPPORTED_VERSIONS:
        raise BinFormatError(
            f"{source}: format version {version}; torch.load (and lazymerge) read versions "
            f"{SUPPORTED_VERSIONS.start} to {SUPPORTED_VERSIONS.stop - 1}"
        )
    byteorder_info = _info(records, f"{prefix}byteorder")
    if byteorder_info is not None:
        order = _read_small(archive, byteorder_info, source)
        if order == b"big":
            raise BinFormatError(
                f"{source}: big-endian archive (byteorder 'big'); lazymerge reads little-endian tensors "
                "only; load and re-save it on a little-endian machine"
            )
        if order != b"little":
            raise BinFormatError(
                f"{source}: byteorder record holds {order[:16]!r}; expected b'little' (or b'big')"
            )
    serialization_id = _info(records, f"{prefix}.data/serialization_id")
    if serialization_id is not None:
        try:
            _read_small(archive, serialization_id, source).decode("utf-8")
        except UnicodeDecodeError:
            raise BinFormatError(f"{source}: .data/serialization_id record is not UTF-8 text") from None
    alignment_info = _info(records, f"{prefix}.storage_alignment")
    if alignment_info is not None:
        alignment = _read_small(archive, alignment_info, source)
        try:
            int(alignment)
        except ValueError:
            raise BinFormatError(
                f"{source}: .storage_alignment record holds {alignment[:32]!r}, not an integer"
            ) from None


def _read_pickle(archive: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> bytes:
    if info.file_size > MAX_PICKLE_BYTES:
        raise BinLimitError(
            f"{source}: {info.filename} inflates to {info.file_size} bytes, over the {MAX_PICKLE_BYTES}-byte "
            "limit for a state dict's pickle; refusing to read it"
        )
    data = _read_record(archive, info, MAX_PICKLE_BYTES)
    if len(data) > MAX_PICKLE_BYTES:
        raise BinLimitError(
            f"{source}: {info.filename} inflates past the {MAX_PICKLE_BYTES}-byte limit although its "
            f"record says {info.file_size} bytes; the archive is damaged"
        )
    return data


def _scan_pickle(data: bytes, source: str) -> None:
    """Walk the pickle's opcodes without building anything: refuse opcodes torch's weights-only
    unpickler refuses, too many opcodes and memo indices beyond what was read, before the
    unpickler allocates."""
    count = 0
    previous = ""
    try:
        for opcode, arg, pos in pickletools.genops(io.BytesIO(data)):
            count += 1
            if opcode.name in ("APPENDS", "SETITEMS") and previous == "MARK":
                # Python's unpickler skips an empty one whatever it applies to; torch's refuses
                # APPENDS on anything but a list; pickle itself never writes either
                raise BinPickleError(
                    f"{source}: data.pkl has an empty {opcode.name} at byte {pos}, which pickle never writes; "
                    "the pickle is damaged"
                )
            previous = opcode.name
            if count > MAX_PICKLE_OPCODES:
                raise BinLimitError(
                    f"{source}: data.pkl holds more than {MAX_PICKLE_OPCODES} pickle opcodes, the limit for "
                    f"a state dict of at most {MAX_TENSORS} tensors; refusing to unpickle it"
                )
            if opcode.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                if (module, name) not in _GLOBALS:
                    raise UnsafePickleError(_unsafe_global(source, module, name))
            if opcode.name in _UNSAFE_OPCODES:
                raise UnsafePickleError(
                    f"{source}: data.pkl uses pickle opcode {opcode.name} at byte {pos}, which a weights-only "
                    "checkpoint never uses; refusing to load it (nothing was run)"
                )
            if opcode.name not in _ALLOWED_OPCODES:
                raise BinPickleError(
                    f"{source}: data.pkl uses pickle opcode {opcode.name} at byte {pos}, which "
                    "torch.load(weights_only=True) refuses too; re-save it with torch.save's default "
                    "pickle protocol (2)"
                )
            if opcode.name in _MEMO_PUTS and not (isinstance(arg, int) and 0 <= arg <= count):
                raise BinPickleError(
                    f"{source}: data.pkl stores memo entry {_short(arg)} at byte {pos}, beyond the "
                    f"{count} opcodes read so far; the pickle is damaged"
                )
    except LazyMergeError:
        raise
    except Exception as exc:  # pickletools reports malformed opcodes and arguments as ValueError
        raise BinPickleError(f"{source}: data.pkl is not a valid pickle ({_one_line(exc)})") from None


def _unpickle(data: bytes, source: str) -> tuple[Any, list[_StorageRef]]:
    """The unpickled object and every storage the pickle referenced."""
    _scan_pickle(data, source)
    try:
        unpickler = _WeightsUnpickler(io.BytesIO(data), source)
        return unpickler.load(), unpickler.storages
    except LazyMergeError:
        raise
    except Exception as exc:  # any other unpickling failure: a malformed pickle
        raise BinPickleError(
            f"{source}: data.pkl is not a valid weights pickle ({type(exc).__name__}: {_one_line(exc)})"
        ) from None


def _check_tensor(name: str, t: _LazyTensor, source: str) -> tuple[tuple[int, ...], int, int]:
    """(shape, byte offset in the storage, byte size) of one tensor, every field checked."""
    where = f"{source}: tensor {_short(name)}"
    shape, stride, offset = t.shape, t.stride, t.storage_offset
    if not isinstance(shape, (tuple, list)) or len(shape) > MAX_DIMS or not all(_is_uint(d) for d in shape):
        raise BinTensorError(
            f"{where}: shape {_short(shape)} is not a tuple of at most {MAX_DIMS} non-negative integers"
        )
    if not isinstance(stride, (tuple, list)) or not all(_is_uint(s) for s in stride):
        raise BinTensorError(f"{where}: stride {_short(stride)} is not a tuple of non-negative integers")
    if len(stride) != len(shape):
        raise BinTensorError(
            f"{where}: stride {_short(stride)} has {len(stride)} entries for the {len(shape)} dims of shape "
            f"{_short(shape)}"
        )
    if not _is_uint(offset):
        raise BinTensorError(f"{where}: storage offset {_short(offset)} is not a non-negative integer")
    if not all(isinstance(flag, bool) for flag in t.requires_grad):
        raise BinTensorError(f"{where}: requires_grad {_short(t.requires_grad)} is not true or false")
    if any(t.requires_grad) and not DTYPES[t.storage.dtype].is_float:
        raise BinTensorError(
            f"{where}: requires_grad is true for a {t.storage.dtype} tensor; only floating-point tensors can "
            "require gradients (torch.load refuses it too)"
        )
    shape = tuple(shape)
    itemsize = DTYPES[t.storage.dtype].itemsize
    nbytes = itemsize
    for dim in shape:
        nbytes *= dim
        if nbytes > _U64_MAX:
            raise BinTensorError(f"{where}: shape {list(shape)} overflows a 64-bit byte size")
    begin = offset * itemsize
    if begin + nbytes > _U64_MAX:
        raise BinTensorError(
            f"{where}: storage offset {offset} plus {nbytes} bytes overflows a 64-bit byte offset"
        )
    if math.prod(shape) > 1:
        expected = _contiguous_strides(shape)
        if any(s != c for s, c, d in zip(stride, expected, shape, strict=True) if d != 1):
            raise BinTensorError(
                f"{where}: strides {list(stride)} for shape {list(shape)} are not contiguous (expected "
                f"{list(expected)}); re-save it contiguous"
            )
    return shape, begin, nbytes


def _check_storages(
    refs: list[_StorageRef], users: dict[str, str], records: _Records, prefix: str, source: str
) -> dict[str, tuple[_StorageRef, int]]:
    """Every storage the pickle referenced (torch.load reads each, used or not), checked against
    its record: key -> (reference, absolute data offset)."""
    storages: dict[str, tuple[_StorageRef, int]] = {}
    for ref in refs:
        where = f"{source}: storage {_short(ref.key)}" + (
            f" (of tensor {_short(users[ref.key])})" if ref.key in users else ""
        )
        if ref.key in storages:
            first = storages[ref.key][0]
            if (first.dtype, first.numel) != (ref.dtype, ref.numel):
                raise BinStorageError(
                    f"{where}: is used as {first.numel} {first.dtype} elements and as {ref.numel} {ref.dtype} "
                    "elements; one storage has one dtype and size"
                )
            continue
        found = records.get(f"{prefix}data/{ref.key}")
        if found is None:
            raise BinStorageError(
                f"{where}: has no record {_short(prefix + 'data/' + ref.key)} in the archive"
            )
        record, data_offset = found
        if record.compress_type != zipfile.ZIP_STORED:
            raise BinStorageError(
                f"{where}: storage record {_short(record.filename)} is compressed; re-save it with torch.save"
            )
        nbytes = ref.numel * DTYPES[ref.dtype].itemsize
        if nbytes != record.file_size:
            raise BinStorageError(
                f"{where}: holds {ref.numel} {ref.dtype} elements ({nbytes} bytes) but its record has "
                f"{record.file_size} bytes"
            )
        storages[ref.key] = (ref, data_offset)
    return storages


def _tensor_infos(
    obj: Any, refs: list[_StorageRef], records: _Records, prefix: str, path: Path
) -> list[TensorInfo]:
    source = str(path)
    if not isinstance(obj, dict):
        raise BinPickleError(f"{source}: data.pkl holds {_short(obj)}, not a state dict of named tensors")
    if len(obj) > MAX_TENSORS:
        raise BinLimitError(f"{source}: data.pkl has {len(obj)} entries, over the limit of {MAX_TENSORS}")
    users: dict[str, str] = {}  # storage key -> the first tensor using it, for messages
    for name, t in obj.items():
        if not isinstance(name, str):
            raise BinPickleError(f"{source}: data.pkl has a key {_short(name)}; tensor names must be strings")
        if not isinstance(t, _LazyTensor):
            raise BinPickleError(
                f"{source}: entry {_short(name)} of data.pkl is {_short(t)}, not a tensor; lazymerge reads "
                "flat state dicts (torch.save(model.state_dict()))"
            )
        users.setdefault(t.storage.key, name)
    storages = _check_storages(refs, users, records, prefix, source)
    out = []
    for name, t in obj.items():
        shape, begin, nbytes = _check_tensor(name, t, source)
        ref, data_offset = storages[t.storage.key]
        record_size = ref.numel * DTYPES[ref.dtype].itemsize
        if begin + nbytes > record_size:
            raise BinStorageError(
                f"{source}: tensor {_short(name)}: needs bytes [{begin}, {begin + nbytes}) of its storage "
                f"{_short(ref.key)}, which holds {record_size} bytes"
            )
        out.append(TensorInfo(name, ref.dtype, shape, path, data_offset + begin, nbytes))
    return out


def _read_archive(fd: int, end: _EndRecord, path: Path) -> list[TensorInfo]:
    source = str(path)
    with os.fdopen(os.dup(fd), "rb") as fh, zipfile.ZipFile(fh) as archive:
        records = _check_records(fd, archive, end, source)
        infos = archive.infolist()
        if not infos:
            raise BinZipError(f"{source}: zip archive holds no records; not a torch.save file")
        first = infos[0].filename
        if "/" not in first:
            raise BinZipError(
                f"{source}: first record {_short(first)} is not inside a folder; not a torch.save file"
            )
        prefix = first[: first.index("/") + 1]
        stray = next((i.filename for i in infos if not i.filename.startswith(prefix)), None)
        if stray is not None:
            raise BinZipError(
                f"{source}: record {_short(stray)} is outside the archive's folder {_short(prefix)}; "
                "not a torch.save file"
            )
        pickle_info = _info(records, f"{prefix}data.pkl")
        if pickle_info is None:
            raise BinZipError(
                f"{source}: zip archive holds no {_short(prefix + 'data.pkl')}; not a torch.save file"
            )
        _check_format(archive, records, prefix, source)
        obj, refs = _unpickle(_read_pickle(archive, pickle_info, source), source)
        return _tensor_infos(obj, refs, records, prefix, path)


def read_bin_tensors(path: Path) -> list[TensorInfo]:
    """List the tensors of a `.bin` checkpoint with their byte locations, running no pickled code.

    Tensors that share a storage (tied weights, views) are listed each with its own byte range.

    Raises:
        InputError for a path that is not a readable regular file; BinNotZipError for a legacy
        (pre-zip) or non-zip file; another `BinArchiveError` subclass for each way an archive can be
        malformed or exceed a memory limit (UnsafePickleError for a pickle that is not weights-only).
    """
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"{source}: cannot open ({exc.strerror or exc})") from None
    try:
        end = _check_file(fd, source)
        try:
            return _read_archive(fd, end, Path(path))
        except LazyMergeError:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as exc:
            raise BinZipError(f"{source}: damaged zip archive ({_one_line(exc)})") from None
        except (ValueError, struct.error, OverflowError, NotImplementedError, RuntimeError) as exc:
            # zipfile reports some damage this way: undecodable names, bad zip64 fields, encryption
            raise BinZipError(
                f"{source}: damaged zip archive ({type(exc).__name__}: {_one_line(exc)})"
            ) from None
    except OSError as exc:
        raise InputError(f"{source}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
