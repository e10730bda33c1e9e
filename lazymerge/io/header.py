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
    UnknownDtypeError,
)
from lazymerge.io.dtypes import DTYPES, SUB_BYTE_DTYPES, TensorInfo

#: Largest header accepted, in bytes (the limit safetensors itself applies).
MAX_HEADER_SIZE = 100_000_000
#: Byte offsets and sizes must fit an unsigned 64-bit integer, as in the format's reference reader.
_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in file order (absolute offsets), string metadata, where the
    data starts."""

    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    data_start: int


def read_header_length(prefix: bytes, file_size: int, source: str) -> int:
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


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderJsonError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64_MAX


def parse_header(raw: bytes, file_size: int, source: str) -> Header:
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
    body = raw[8 : 8 + length]
    if len(body) < length:
        raise HeaderTooShortError(f"{source}: header is truncated ({len(body)} of {length} bytes)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderEncodingError(
            f"{source}: header is not valid UTF-8 (byte {exc.start}); the file is corrupt"
        ) from None
    if not text.startswith("{"):
        raise HeaderJsonError(f"{source}: header does not start with '{{'; not a safetensors file")
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except HeaderJsonError as exc:
        raise HeaderJsonError(f"{source}: header JSON is ambiguous: {exc}") from None
    except RecursionError:
        raise HeaderJsonError(f"{source}: header JSON nests too deeply") from None
    except ValueError as exc:
        raise HeaderJsonError(f"{source}: header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise HeaderJsonError(f"{source}: header JSON is a {type(doc).__name__}, not an object")

    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderEntryError(f"{source}: __metadata__ must map strings to strings")

    data_size = file_size - 8 - length
    data_start = 8 + length
    entries = [_parse_entry(name, info, source, data_start) for name, info in doc.items()]
    entries.sort(key=lambda e: (e.offset, e.end))
    position = 0
    for entry in entries:
        begin = entry.offset - data_start
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise OffsetError(
                f"{source}: tensor {entry.name!r} starts at data offset {begin}, expected "
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


def _parse_entry(name: str, info: Any, source: str, data_start: int) -> TensorInfo:
    where = f"{source}: tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise HeaderEntryError(f"{where}: entry must be an object with exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if isinstance(dtype, str) and dtype in SUB_BYTE_DTYPES:
        raise SubByteDtypeError(
            f"{where}: dtype {dtype} packs {SUB_BYTE_DTYPES[dtype]}-bit values below a byte, which "
            "lazymerge does not read; dequantize the checkpoint (to BF16, say) and merge that"
        )
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UnknownDtypeError(f"{where}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise HeaderEntryError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise HeaderEntryError(f"{where}: data_offsets {offsets!r} is not two unsigned integers")
    begin, end = offsets
    if end < begin:
        raise OffsetError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    nbytes = DTYPES[dtype].itemsize
    for dim in shape:
        nbytes *= dim
        if nbytes > _U64_MAX:
            raise TensorSizeError(f"{where}: shape {shape} overflows a 64-bit byte size")
    if nbytes != end - begin:
        raise TensorSizeError(
            f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets "
            f"[{begin}, {end}] hold {end - begin}"
        )
    return TensorInfo(name, dtype, tuple(shape), Path(source), data_start + begin, end - begin)
