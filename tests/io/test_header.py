"""Malformed headers: one case per check, each with its own error class and message."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lazymerge import Checkpoint
from lazymerge.errors import (
    DataLengthError,
    HeaderEncodingError,
    HeaderEntryError,
    HeaderError,
    HeaderJsonError,
    HeaderTooLargeError,
    HeaderTooShortError,
    OffsetError,
    ShardIndexError,
    TensorSizeError,
    UnknownDtypeError,
)
from lazymerge.io.header import parse_header


def file_bytes(header: bytes | dict, data: bytes = b"", length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def entry(dtype: str = "F32", shape: list = [2], offsets: list = [0, 8]) -> dict:  # noqa: B006
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


MALFORMED = [
    ("short-prefix", b"\x01\x02", HeaderTooShortError, "shorter than the 8-byte"),
    ("header-past-eof", file_bytes(b"{}", length=1000), HeaderTooShortError, "truncated"),
    ("header-too-large", file_bytes(b"{}", length=200_000_000), HeaderTooLargeError, "exceeds"),
    ("not-utf8", file_bytes(b'{"\xff\xfe": 1}'), HeaderEncodingError, "UTF-8"),
    ("not-json", file_bytes(b"{not json}"), HeaderJsonError, "not valid JSON"),
    ("not-object", file_bytes(b"[1, 2]"), HeaderJsonError, "does not start"),
    (
        "deep-json",
        file_bytes(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        HeaderJsonError,
        "nests too deeply",
    ),
    (
        "duplicate-name",
        file_bytes(
            b'{"w": ' + json.dumps(entry()).encode() + b', "w": ' + json.dumps(entry()).encode() + b"}",
            b"\0" * 8,
        ),
        HeaderJsonError,
        "appears twice",
    ),
    ("bad-metadata", file_bytes({"__metadata__": {"a": 1}}), HeaderEntryError, "__metadata__"),
    (
        "missing-field",
        file_bytes({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
        HeaderEntryError,
        "exactly dtype, shape and data_offsets",
    ),
    (
        "unknown-dtype",
        file_bytes({"w": entry(dtype="F128")}, b"\0" * 8),
        UnknownDtypeError,
        "unknown dtype 'F128'",
    ),
    (
        "negative-dim",
        file_bytes({"w": entry(shape=[-2])}, b"\0" * 8),
        HeaderEntryError,
        "not a list of non-negative",
    ),
    (
        "bad-offsets",
        file_bytes({"w": entry(offsets=[0])}, b"\0" * 8),
        HeaderEntryError,
        "two unsigned integers",
    ),
    (
        "reversed-offsets",
        file_bytes({"w": entry(offsets=[8, 0])}, b"\0" * 8),
        OffsetError,
        "end before they begin",
    ),
    ("size-mismatch", file_bytes({"w": entry(shape=[3])}, b"\0" * 8), TensorSizeError, "needs 12 bytes"),
    (
        "shape-overflow",
        file_bytes({"w": entry(shape=[2**40, 2**40], offsets=[0, 8])}, b"\0" * 8),
        TensorSizeError,
        "overflows",
    ),
    ("gap", file_bytes({"w": entry(offsets=[8, 16])}, b"\0" * 16), OffsetError, "leaves a gap"),
    ("overlap", file_bytes({"w": entry(), "v": entry(offsets=[4, 12])}, b"\0" * 12), OffsetError, "overlaps"),
    ("truncated-data", file_bytes({"w": entry()}, b"\0" * 4), DataLengthError, "truncated"),
    ("trailing-bytes", file_bytes({"w": entry()}, b"\0" * 12), DataLengthError, "padded"),
]


@pytest.mark.parametrize("name,raw,error,fragment", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_raises_its_error(
    tmp_path: Path, name: str, raw: bytes, error: type, fragment: str
) -> None:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(raw)
    with pytest.raises(error) as info:
        Checkpoint.open(path)
    message = str(info.value)
    assert fragment in message
    assert str(path) in message
    assert "\n" not in message


def test_valid_file_from_safetensors_parses(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file(
        {"b": torch.zeros(3, 2, dtype=torch.bfloat16), "a": torch.ones(()), "e": torch.zeros(0)},
        str(path),
        metadata={"k": "v"},
    )
    ckpt = Checkpoint.open(path)
    assert sorted(ckpt) == ["a", "b", "e"]
    assert ckpt["b"].shape == (3, 2) and ckpt["b"].dtype == "BF16" and ckpt["b"].nbytes == 12
    assert ckpt["a"].shape == () and ckpt["e"].numel == 0
    assert ckpt.metadata == {"k": "v"}


def test_index_errors(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    cases = [
        ({"weight_map": {"a": "missing.safetensors"}}, "does not exist"),
        ({"weight_map": {"a": "../s1.safetensors"}}, "plain file names"),
        ({"weight_map": {"a": "/etc/passwd"}}, "plain file names"),
        ({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}, "does not hold it"),
        ({"weight_map": {}}, "is empty"),
        ({"nothing": 1}, "weight_map"),
    ]
    for doc, fragment in cases:
        index.write_text(json.dumps(doc))
        with pytest.raises(ShardIndexError, match=fragment):
            Checkpoint.open(tmp_path)
    index.write_text("{not json")
    with pytest.raises(HeaderJsonError):
        Checkpoint.open(index)


def valid_header_bytes() -> bytes:
    return file_bytes(
        {"__metadata__": {"format": "pt"}, "a": entry(), "b": entry("BF16", [2, 2], [8, 16])}, b"\0" * 16
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_parse_or_raise_header_error(raw: bytes) -> None:
    try:
        parse_header(raw, len(raw), "fuzz.safetensors")
    except HeaderError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_header_parses_or_raises_header_error(data: st.DataObject) -> None:
    raw = bytearray(valid_header_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        header = parse_header(bytes(raw), len(raw), "fuzz.safetensors")
    except HeaderError:
        return
    assert sum(e.nbytes for e in header.tensors) == len(raw) - header.data_start
