"""Reading the small untrusted files beside the weights (index, config, tokenizer, data files).

Each is opened without blocking (a FIFO named as a config must not hang the run), must be a
regular file, and is refused above a size limit before it is read, so a hostile file cannot
make lazymerge hang or allocate without bound.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from lazymerge.errors import InputError

#: Largest index, config or tokenizer file read (real tokenizer.json files are a few MB).
SMALL_FILE_LIMIT = 256 * 2**20


def open_regular(path: Path) -> int:
    """A descriptor for reading `path`, which must be a regular file.

    Raises:
        InputError naming the file (missing, unreadable, a FIFO, a device or a folder).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"{path}: cannot open ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{path}: not a regular file")
    os.set_blocking(fd, True)
    return fd


def read_small_file(path: Path, limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The bytes of a small regular file, refused above `limit` bytes.

    Raises:
        InputError naming the file.
    """
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise InputError(f"{path}: {size} bytes, more than the {limit}-byte limit for this kind of file")
        chunks = []
        remaining = limit + 1
        while remaining > 0:
            data = os.read(fd, min(remaining, 1 << 20))
            if not data:
                break
            chunks.append(data)
            remaining -= len(data)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > limit:
        raise InputError(f"{path}: more than the {limit}-byte limit for this kind of file")
    return raw


def describe_json(value: Any) -> str:
    """A short description of an untrusted JSON value for a message."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:60] + "..."
    return f"a JSON {'array' if isinstance(value, list) else 'object'}"


class DuplicateKeyError(ValueError):
    """A JSON object repeats a key (`json.loads` would silently keep the last)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for `json.loads` that refuses repeated keys."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def parse_json(
    raw: bytes, where: str, error: type[InputError], *, limit: int, unit: str = "file", bom: bool = False
) -> Any:
    """Untrusted JSON bytes parsed, for every reader of small files and data rows: at most
    `limit` bytes, UTF-8 (a leading byte-order mark dropped with `bom`), valid JSON, nesting
    bounded by the interpreter's recursion limit, no key repeated in an object.

    Args:
        where: what the message names: a file, or `FILE:LINE` for one line of a file.
        unit: what `where` is, for the message (`file`, `row`).

    Raises:
        `error`, in one line naming `where`.
    """
    if len(raw) > limit:
        raise error(f"{where}: {len(raw):,} bytes, more than the {limit:,}-byte limit for one {unit}")
    try:
        text = raw.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateKeyError as exc:
        raise error(
            f"{where}: key {describe_json(exc.args[0])} appears twice in one object; the {unit} is ambiguous"
        ) from None
    except RecursionError:
        raise error(f"{where}: JSON nests too deeply") from None
    except ValueError as exc:
        raise error(f"{where}: not valid JSON ({exc})") from None
