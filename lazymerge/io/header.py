"""Pure parsing and validation of safetensors headers.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the
tensor data. `parse_header` checks everything the format requires before any tensor byte is
touched, the way safetensors' own core does, so a hostile file fails here with a `HeaderError`
and never causes a large allocation.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
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
#: Brackets allowed beyond two per tensor (names such as `h[0].attn` hold some).
_SPARE_LISTS = 1_000_000
#: Most `__metadata__` entries a header may hold (real files hold a few; lazymerge's own, one
#: per input plus three). The header's object is walked and counted before the JSON is parsed
#: (`_check_metadata_objects`), so a header of millions of entries never builds them.
MAX_METADATA_ENTRIES = 10_000
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
    length: int = struct.unpack("<Q", prefix[:8])[0]
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


#: A JSON escape that may spell a lone surrogate (a gate: only a header holding one is searched).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate code point of `text` (`\\udXXX` as JSON's escape spells it), or
    None. Parsed JSON holds one only from an unpaired escape such as `"\\ud800"`: no text can be
    encoded with it, so printing or writing it fails later."""
    if text.isascii():
        return None
    found = _SURROGATE.search(text)
    return None if found is None else ascii(found.group(0))[1:-1]


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


def too_many_metadata_entries(source: object, count: int | None) -> HeaderEntryError:
    many = (
        f"{count:,} entries, more than the {MAX_METADATA_ENTRIES:,}"
        if count is not None
        else (f"more than the {MAX_METADATA_ENTRIES:,} entries")
    )
    return HeaderEntryError(
        f"{source}: __metadata__ holds {many} lazymerge reads (a bound on the memory headers "
        "take; real files hold a few); the file is corrupt or hostile"
    )


def _refuse_lone_surrogates(source: str, doc: dict[str, Any], metadata: dict[str, str]) -> None:
    """Refuse a tensor name or metadata key or value holding a lone surrogate, as safetensors'
    own reader does (it is not text: it cannot be printed, hashed as UTF-8 or written back).
    Called only when the header holds an escape that may spell one."""
    for name in doc:
        found = lone_surrogate(name)
        if found is not None:
            raise HeaderEntryError(
                f"{source}: tensor name {tensor_label(name)} holds a lone surrogate ({found}, an "
                "unpaired JSON escape), not text; the file is corrupt or hostile"
            )
    for key, value in metadata.items():
        for what, text in (("key", key), ("value", value)):
            found = lone_surrogate(text)
            if found is not None:
                raise HeaderEntryError(
                    f"{source}: __metadata__ {what} {describe_value(text)} holds a lone surrogate "
                    f"({found}, an unpaired JSON escape), not text; the file is corrupt or hostile"
                )


#: A key that is `__metadata__` once JSON escapes are read (each of its 12 characters as itself
#: or as `\u00XX`), then the object it opens.
_METADATA_KEY_ESCAPED = re.compile(r'"(?:[_metad]|\\u00[0-9a-fA-F]{2}){12}"[ \t\n\r]*:[ \t\n\r]*\{')
_METADATA_KEY_PLAIN = re.compile(r'"__metadata__"[ \t\n\r]*:[ \t\n\r]*\{')
#: The string scanner of `json`'s own decoder (its C one where built), which typeshed omits.
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_JSON_SPACE = re.compile(r"[ \t\n\r]+")


def _skip_space(text: str, pos: int) -> int:
    found = _JSON_SPACE.match(text, pos)
    return pos if found is None else found.end()


def _check_metadata_objects(text: str, source: str) -> None:
    """Count the entries of the header's `__metadata__` object before the JSON is parsed: the
    parser builds every pair of an object before its hook sees one, so a cap checked after the
    parse would come after the memory is spent (3 million entries: 880 MB).

    The object is walked with the JSON string scanner, each key and value read and dropped, and
    the walk stops at `MAX_METADATA_ENTRIES` + 1: it costs at most that many entries whatever
    the header holds. Only the top level may hold `__metadata__` (anywhere else the header is
    invalid), so a second such object is refused, which bounds the walks to one.

    Raises:
        HeaderEntryError for more than `MAX_METADATA_ENTRIES` entries, a value that is not a
        string, or a second `__metadata__` object. A malformed object is left to the parser.
    """
    pattern = _METADATA_KEY_PLAIN if "\\u00" not in text else _METADATA_KEY_ESCAPED
    seen = 0
    for match in pattern.finditer(text):
        start = match.start()
        # a key's quote follows `{`, `,` or a space; after a backslash it is escaped (the tail of
        # another string) or closes a string (then the JSON is invalid): no metadata either way
        if start and text[start - 1] == "\\":
            continue
        if match.group(0)[1:13] != "__metadata__" and _decoded_key(match.group(0)) != "__metadata__":
            continue
        seen += 1
        if seen > 1:
            raise HeaderEntryError(
                f"{source}: __metadata__ appears more than once; only the top level may hold it"
            )
        _count_metadata_entries(text, match.end(), source)


def _decoded_key(found: str) -> str | None:
    try:
        return _scanstring(found, 1)[0]
    except ValueError:
        return None


def _count_metadata_entries(text: str, pos: int, source: str) -> None:
    """Walk the object whose `{` ends just before `pos`, counting its entries (see
    `_check_metadata_objects`); stop quietly at anything malformed, which the parse reports."""
    scan = _scanstring
    pos = _skip_space(text, pos)
    if text.startswith("}", pos):
        return
    count = 0
    try:
        while text.startswith('"', pos):
            _, pos = scan(text, pos + 1)
            pos = _skip_space(text, pos)
            if not text.startswith(":", pos):
                return
            pos = _skip_space(text, pos + 1)
            if not text.startswith('"', pos):
                if pos < len(text):
                    raise HeaderEntryError(f"{source}: __metadata__ must map strings to strings")
                return
            _, pos = scan(text, pos + 1)
            count += 1
            if count > MAX_METADATA_ENTRIES:
                raise too_many_metadata_entries(source, None)
            pos = _skip_space(text, pos)
            if not text.startswith(",", pos):
                return
            pos = _skip_space(text, pos + 1)
    except ValueError:  # a malformed string: the parse says where
        return


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
    text = _header_text(raw, length, source)
    _check_metadata_objects(text, source)
    hook = _EntryParser(source, raw, length)
    doc = _parse_json(text, hook, source)
    metadata = _take_metadata(doc, text, source)
    del text  # (the decoded copy of the header: as large as the header again)

    data_start = 8 + length
    path = Path(source)  # one path object shared by every record of the file
    entries = [_parse_entry(name, info, path, data_start, hook.shapes) for name, info in doc.items()]
    del doc
    entries.sort(key=lambda e: (e.offset, e.end))
    _check_contiguous(entries, data_start, file_size - data_start, source)
    return Header(tensors=tuple(entries), metadata=dict(metadata), data_start=data_start)


def _header_text(raw: bytes | bytearray, length: int, source: str) -> str:
    """The header's JSON text (the `length` bytes after the length prefix), refused before it is
    parsed when truncated, not UTF-8, not an object, or holding more lists than tensors need."""
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
    return text


def _parse_json(text: str, hook: _EntryParser, source: str) -> dict[str, Any]:
    """The header's top-level object, each tensor entry checked by `hook` as it is parsed."""
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
    if isinstance(doc, tuple):  # the whole header is one entry, with no tensor name around it
        raise HeaderJsonError(f"{source}: header JSON is one tensor entry, not an object of named entries")
    if not isinstance(doc, dict):
        raise HeaderJsonError(f"{source}: header JSON is a {type(doc).__name__}, not an object")
    return doc


def _take_metadata(doc: dict[str, Any], text: str, source: str) -> dict[str, str]:
    """Remove `__metadata__` from `doc` and return it, checked: strings to strings, at most
    `MAX_METADATA_ENTRIES`, and (as every name) no lone surrogate in the header's text."""
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderEntryError(f"{source}: __metadata__ must map strings to strings")
    if len(metadata) > MAX_METADATA_ENTRIES:  # (the walk before the parse counted them already)
        raise too_many_metadata_entries(source, len(metadata))
    if _SURROGATE_ESCAPE.search(text) is not None:
        _refuse_lone_surrogates(source, doc, metadata)
    return metadata


def _check_contiguous(entries: list[TensorInfo], data_start: int, data_size: int, source: str) -> None:
    """Entries sorted by offset must cover the `data_size` data bytes exactly, from 0, with no
    gap or overlap."""
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
