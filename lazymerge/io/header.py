"""Pure parsing and validation of safetensors headers.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the
tensor data. `parse_header` checks everything the format requires before any tensor byte is
touched, the way safetensors' own core does, so a hostile file fails here with a `HeaderError`
and never causes a large allocation.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.errors import (
    DataLengthError,
    HeaderEncodingError,
    HeaderEntryError,
    HeaderJsonError,
    HeaderTooLargeError,
    HeaderTooShortError,
    OffsetError,
    SubByteDtypeError,
    TensorSizeError,
    TooManyTensorsError,
    UnknownDtypeError,
)
from lazymerge.io.dtypes import DTYPES, SUB_BYTE_DTYPES, TensorInfo

#: Largest header accepted, in bytes (the limit safetensors itself applies).
MAX_HEADER_SIZE = 100_000_000
#: Most tensors one input may list, over all its shards. Each costs about 250 bytes once read
#: (name, record, dict slot) and about as much again in the plan, so a million stays under a
#: gigabyte for a two-input plan; the largest public checkpoints list about 100,000.
MAX_TENSORS = 1_000_000
#: Most `__metadata__` entries a header may hold (real files hold a handful).
MAX_METADATA_ENTRIES = 10_000
#: Brackets allowed beyond two per tensor (names such as `h[0].attn` hold some).
_SPARE_LISTS = 1_000_000
#: Byte offsets and sizes must fit an unsigned 64-bit integer, as in the format's reference reader.
_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in file order (absolute offsets), string metadata, where the
    data starts."""

    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    data_start: int


def read_header_length(prefix: bytes | bytearray, file_size: int, source: str) -> int:
    """Return the header length announced by the first 8 bytes, checked against the file size.

    Raises:
        HeaderTooShortError, HeaderTooLargeError
    """
    if len(prefix) < 8 or file_size < 8:
        raise HeaderTooShortError(
            f"{source}: file is {file_size} bytes, shorter than the 8-byte header length prefix; "
            "it is not a safetensors file or it was truncated"
        )
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_SIZE:
        raise HeaderTooLargeError(
            f"{source}: header length {length} exceeds the {MAX_HEADER_SIZE}-byte limit; "
            "the file is corrupt or not a safetensors file"
        )
    if 8 + length > file_size:
        raise HeaderTooShortError(
            f"{source}: header announces {length} bytes but the file holds only {file_size - 8} "
            "after the length prefix; the file was truncated"
        )
    return length


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64_MAX


def describe_value(value: Any, limit: int = 60) -> str:
    """A JSON value for an error message, never longer than about `limit` characters: a hostile
    header may hold a list of millions of items, or a string of megabytes, where a shape or a
    dtype should be."""
    if isinstance(value, (list, dict)) and len(value) > 8:
        what = "list" if isinstance(value, list) else "object"
        return f"a {what} of {len(value):,} items"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text):,} characters)"


def tensor_label(name: str) -> str:
    """A tensor name for an error message (a name may be megabytes long)."""
    return describe_value(name, 200)


#: A validated entry, as the JSON parser's hook leaves it: (dtype, shape, begin, end), relative
#: offsets. Plain JSON never yields a tuple, so a tuple in the parsed document is one of these.
_Fields = tuple[str, tuple[int, ...], int, int]
_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))
#: The canonical string of each dtype name, so that every record of a file shares one object.
_DTYPE_NAMES = {name: name for name in DTYPES}


def _valid_fields(obj: dict[str, Any], shapes: dict[tuple[int, ...], tuple[int, ...]]) -> _Fields | None:
    """The fields of an entry when every check passes, else None (`_parse_entry` then says what
    is wrong, with the tensor's name, which only the enclosing object knows)."""
    dtype, shape, offsets = obj["dtype"], obj["shape"], obj["data_offsets"]
    canonical = _DTYPE_NAMES.get(dtype) if isinstance(dtype, str) else None
    if canonical is None or not isinstance(shape, list) or not isinstance(offsets, list):
        return None
    if len(offsets) != 2 or not all(_is_uint(d) for d in shape) or not all(_is_uint(o) for o in offsets):
        return None
    begin, end = offsets
    nbytes = DTYPES[canonical].itemsize
    for dim in shape:
        nbytes *= dim
        if nbytes > _U64_MAX:
            return None
    if end < begin or nbytes != end - begin:
        return None
    dims = tuple(shape)
    # one tuple per distinct shape: a model repeats a few shapes thousands of times
    return canonical, shapes.setdefault(dims, dims), begin, end


class _EntryParser:
    """The JSON parser's `object_pairs_hook` for a header.

    It refuses repeated keys, turns each valid tensor entry into a small tuple as soon as it is
    parsed (a dict of two lists costs about 1 KB per tensor; the tuple, with shared dtype and
    shape objects, under 100 bytes), and stops the parse once the objects outnumber
    `MAX_TENSORS`, so a hostile header cannot grow the parse's memory past that.
    """

    def __init__(self, source: str, raw: bytes | bytearray, length: int) -> None:
        self.source = source
        self.raw, self.length = raw, length
        self.objects = 0
        self.shapes: dict[tuple[int, ...], tuple[int, ...]] = {}

    def __call__(self, pairs: list[tuple[str, Any]]) -> Any:
        self.objects += 1
        # every tensor is one object, plus the top level and __metadata__
        if self.objects > MAX_TENSORS + 2:
            raise too_many_tensors(self.source, self.estimate())
        if len(pairs) > MAX_METADATA_ENTRIES and all(isinstance(v, str) for _, v in pairs[:100]):
            # (only `__metadata__` maps strings to strings; the top level maps names to entries)
            raise HeaderEntryError(
                f"{self.source}: __metadata__ holds {len(pairs):,} entries, more than the "
                f"{MAX_METADATA_ENTRIES:,} lazymerge reads; the file is corrupt or hostile"
            )
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise HeaderJsonError(f"key {tensor_label(key)} appears twice")
            out[key] = value
        if len(out) == 3 and out.keys() == _ENTRY_KEYS:
            fields = _valid_fields(out, self.shapes)
            if fields is not None:
                return fields
        return out

    def estimate(self) -> int:
        """How many tensors the header lists, for the message: its `"data_offsets"` keys (the
        parse stopped before it counted them all), at least the cap plus one."""
        return max(MAX_TENSORS + 1, self.raw.count(b'"data_offsets"', 8, 8 + self.length))


def too_many_tensors(source: object, count: int) -> TooManyTensorsError:
    return TooManyTensorsError(
        f"{source}: lists {count:,} tensors, more than the {MAX_TENSORS:,} lazymerge reads per input "
        "(a bound on the memory headers take); the file is corrupt or hostile"
    )


def parse_header(raw: bytes | bytearray, file_size: int, source: str) -> Header:
    """Validate a header and return its tensors in file order.

    Args:
        raw: the whole file prefix holding the header: 8 length bytes then at least the JSON.
        file_size: size of the whole file in bytes.
        source: the file name used in error messages.

    Returns:
        A `Header` whose entries are sorted by offset and cover the data exactly.

    Raises:
        HeaderError (one subclass per failed check).
    """
    length = read_header_length(raw, file_size, source)
    body = memoryview(raw)[8 : 8 + length]  # (a view: a header may be 100 MB; no copy of it)
    if len(body) < length:
        raise HeaderTooShortError(f"{source}: header is truncated ({len(body)} of {length} bytes)")
    try:
        text = str(body, "utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderEncodingError(
            f"{source}: header is not valid UTF-8 (byte {exc.start}); the file is corrupt"
        ) from None
    if not text.startswith("{"):
        raise HeaderJsonError(f"{source}: header does not start with '{{'; not a safetensors file")
    # Lists are not objects, so the hook cannot count them: a header of empty lists ("[],[],...")
    # would grow the parse to about 26 times its size. Every tensor has two (shape, offsets):
    # counting the brackets (an upper bound, names may hold some) bounds them before parsing.
    lists = raw.count(b"[", 8, 8 + length)
    if lists > 2 * MAX_TENSORS + _SPARE_LISTS:
        raise HeaderJsonError(
            f"{source}: header holds {lists:,} lists, more than {MAX_TENSORS:,} tensors need "
            "(two each); the file is corrupt or hostile"
        )
    hook = _EntryParser(source, raw, length)
    try:
        doc = json.loads(text, object_pairs_hook=hook)
    except TooManyTensorsError:
        raise
    except HeaderJsonError as exc:
        raise HeaderJsonError(f"{source}: header JSON is ambiguous: {exc}") from None
    except RecursionError:
        raise HeaderJsonError(f"{source}: header JSON nests too deeply") from None
    except ValueError as exc:
        raise HeaderJsonError(f"{source}: header is not valid JSON ({exc})") from None
    del text  # (the decoded copy of the header: as large as the header again)
    if isinstance(doc, tuple):  # the whole header is one entry, with no tensor name around it
        raise HeaderJsonError(f"{source}: header JSON is one tensor entry, not an object of named entries")
    if not isinstance(doc, dict):
        raise HeaderJsonError(f"{source}: header JSON is a {type(doc).__name__}, not an object")

    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderEntryError(f"{source}: __metadata__ must map strings to strings")

    if _LONE_SURROGATE_ESCAPE in raw or _LONE_SURROGATE_ESCAPE_UPPER in raw:
        _refuse_lone_surrogates(source, doc, metadata)
    data_size = file_size - 8 - length
    data_start = 8 + length
    path = Path(source)  # one path object shared by every record of the file
    entries = [_parse_entry(name, info, path, data_start, hook.shapes) for name, info in doc.items()]
    del doc
    entries.sort(key=lambda e: (e.offset, e.end))
    position = 0
    for entry in entries:
        begin = entry.offset - data_start
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise OffsetError(
                f"{source}: tensor {tensor_label(entry.name)} starts at data offset {begin}, expected "
                f"{position} ({what}); offsets must be contiguous from 0"
            )
        position = entry.end - data_start
    if position != data_size:
        raise DataLengthError(
            f"{source}: tensor data ends at offset {position} but the file holds {data_size} data "
            f"bytes after the header; the file is "
            f"{'truncated' if position > data_size else 'padded with unexpected bytes'}"
        )
    return Header(tensors=tuple(entries), metadata=dict(metadata), data_start=data_start)


#: A JSON escape of a UTF-16 surrogate (`\\ud800`): the only way a lone one gets into a string.
_LONE_SURROGATE_ESCAPE = b"\\ud"
_LONE_SURROGATE_ESCAPE_UPPER = b"\\uD"


def _refuse_lone_surrogates(source: str, doc: dict[str, Any], metadata: dict[str, str]) -> None:
    """Refuse tensor names and metadata holding a lone surrogate: not text (safetensors' own
    reader refuses them too), and every later print or write of the name would fail."""

    def text(value: str) -> bool:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True

    for name in doc:
        if not text(name):
            raise HeaderEntryError(
                f"{source}: tensor {ascii(name)[:100]} has a lone surrogate (\\udXXX) in its name; not UTF-8 text"
            )
    for key, value in metadata.items():
        if not (text(key) and text(value)):
            raise HeaderEntryError(
                f"{source}: __metadata__ entry {ascii(key)[:100]} holds a lone surrogate (\\udXXX); not UTF-8 text"
            )


def _parse_entry(
    name: str, info: Any, path: Path, data_start: int, shapes: dict[tuple[int, ...], tuple[int, ...]]
) -> TensorInfo:
    if isinstance(info, tuple):  # checked already, by `_EntryParser`
        dtype, dims, begin, end = info
        return TensorInfo(name, dtype, dims, path, data_start + begin, end - begin)
    where = f"{path}: tensor {tensor_label(name)}"
    if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
        raise HeaderEntryError(f"{where}: entry must be an object with exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if isinstance(dtype, str) and dtype in SUB_BYTE_DTYPES:
        raise SubByteDtypeError(
            f"{where}: dtype {dtype} packs {SUB_BYTE_DTYPES[dtype]}-bit values below a byte, which "
            "lazymerge does not read; dequantize the checkpoint (to BF16, say) and merge that"
        )
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UnknownDtypeError(
            f"{where}: unknown dtype {describe_value(dtype)}; expected one of {', '.join(DTYPES)}"
        )
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise HeaderEntryError(
            f"{where}: shape {describe_value(shape)} is not a list of non-negative integers"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise HeaderEntryError(
            f"{where}: data_offsets {describe_value(offsets)} is not two unsigned integers"
        )
    begin, end = offsets
    if end < begin:
        raise OffsetError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    nbytes = DTYPES[dtype].itemsize
    for dim in shape:
        nbytes *= dim
        if nbytes > _U64_MAX:
            raise TensorSizeError(f"{where}: shape {describe_value(shape)} overflows a 64-bit byte size")
    if nbytes != end - begin:
        raise TensorSizeError(
            f"{where}: shape {describe_value(shape)} of {dtype} needs {nbytes} bytes but data_offsets "
            f"[{begin}, {end}] hold {end - begin}"
        )
    # (not reached for entries `_EntryParser` saw: it accepts every one that passes these checks)
    dims = tuple(shape)
    return TensorInfo(
        name, _DTYPE_NAMES[dtype], shapes.setdefault(dims, dims), path, data_start + begin, nbytes
    )
