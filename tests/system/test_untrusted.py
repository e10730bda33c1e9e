"""Untrusted files other than safetensors headers, held to the header's standard: one error class
per failure, a one-line message naming the file, bounded memory.

- `.bin` archives (torch.save zip files): crafted pickles and mutated torch.save files;
- tokenizer and config files of model folders;
- pair and candidate files of `lazymerge eval`.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lazymerge import Checkpoint
from lazymerge.errors import (
    BinFormatError,
    BinLimitError,
    BinNotZipError,
    BinPickleError,
    BinStorageError,
    BinTensorError,
    BinZipError,
    CandidateFileError,
    ConfigFileError,
    InputError,
    LazyMergeError,
    PairFileError,
    TokenizerFileError,
    UnsafePickleError,
    VocabularyMismatchError,
)
from lazymerge.evaluation.scoring import MAX_LINE_BYTES, load_candidates, load_pairs
from lazymerge.io import torch_bin
from lazymerge.io.dtypes import DTYPES
from lazymerge.io.hf_folder import (
    added_token_entries,
    output_companion_files,
    read_config,
    read_vocab,
)
from lazymerge.io.torch_bin import read_bin_tensors

ROOT = Path(__file__).resolve().parents[2]


def assert_one_line(message: str, path: Path, fragment: str) -> None:
    assert fragment in message, message
    assert str(path) in message, message
    assert "\n" not in message and "Traceback" not in message


# --------------------------------------------------------------------------------------------
# .bin archives
# --------------------------------------------------------------------------------------------


class Storage:
    """Pickles as torch.save's persistent id of a storage."""

    def __init__(self, key: str, numel: int, kind: str = "FloatStorage", pid: Any = None):
        self.pid = pid if pid is not None else ("storage", getattr(torch, kind), key, "cpu", numel)


class Tensor:
    """Pickles as torch.save pickles a tensor: `_rebuild_tensor_v2(storage, offset, size, stride, ...)`."""

    def __init__(
        self,
        storage: Any,
        offset: Any = 0,
        shape: Any = (2, 2),
        stride: Any = (2, 1),
        rest: tuple[Any, ...] = (False, collections.OrderedDict()),
    ):
        self.args = (storage, offset, shape, stride, *rest)

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch._utils._rebuild_tensor_v2, self.args)


class Call:
    """Pickles as a call of any global with any arguments."""

    def __init__(self, func: Any, *args: Any):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


class StateDict:
    """Pickles as nn.Module.state_dict does: OrderedDict(), its items, then BUILD of its attributes."""

    def __init__(self, items: dict[str, Any], attributes: Any):
        self.items, self.attributes = items, attributes

    def __reduce__(self) -> tuple[Any, ...]:
        return (collections.OrderedDict, (), self.attributes, None, iter(self.items.items()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, Storage) else None


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


F32_RECORD = np.arange(4, dtype=np.float32).tobytes()


def bin_bytes(
    state: Any = None,
    *,
    pkl: bytes | None = None,
    records: dict[str, bytes] | None = None,
    version: bytes | None = b"3\n",
    byteorder: bytes | None = b"little",
    extra: tuple[tuple[str, bytes], ...] = (),
    pkl_compress: int = zipfile.ZIP_STORED,
    record_compress: int = zipfile.ZIP_STORED,
) -> bytes:
    """A torch.save-style archive: archive/data.pkl, byteorder, data/<key> records, version."""
    if pkl is None:
        pkl = dumps({"w": Tensor(Storage("0", 4))} if state is None else state)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl, compress_type=pkl_compress)
        if byteorder is not None:
            zf.writestr("archive/byteorder", byteorder)
        for key, raw in ({"0": F32_RECORD} if records is None else records).items():
            zf.writestr(f"archive/data/{key}", raw, compress_type=record_compress)
        if version is not None:
            zf.writestr("archive/version", version)
        for name, raw in extra:
            zf.writestr(name, raw)
    return buf.getvalue()


def saved_bytes(state: dict[str, torch.Tensor] | None = None, **options: Any) -> bytes:
    """What torch.save writes for a small state dict."""
    buf = io.BytesIO()
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)} if state is None else state
    torch.save(state, buf, **options)
    return buf.getvalue()


def record_span(raw: bytes, suffix: str) -> tuple[int, int, int]:
    """(local header offset, data offset, size) of the record whose name ends with `suffix`."""
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset, info.header_offset + 30 + name_len + extra_len, info.file_size


def patched(raw: bytes, at: int, new: bytes) -> bytes:
    return raw[:at] + new + raw[at + len(new) :]


def flip_in_record(suffix: str, delta: int) -> bytes:
    """torch.save bytes with one byte of a record's data flipped (data.pkl's: a CRC mismatch)."""
    raw = saved_bytes()
    _, data, _ = record_span(raw, suffix)
    return patched(raw, data + delta, bytes([raw[data + delta] ^ 0x01]))


def central_entry(raw: bytes, suffix: str) -> int:
    """Offset of the central-directory header of the record whose name ends with `suffix`."""
    pos = raw.index(b"PK\x01\x02")
    while True:
        name_len, extra_len, comment_len = struct.unpack("<HHH", raw[pos + 28 : pos + 34])
        if raw[pos + 46 : pos + 46 + name_len].endswith(suffix.encode()):
            return pos
        pos += 46 + name_len + extra_len + comment_len


def external_attr(suffix: str, value: int) -> bytes:
    raw = saved_bytes()
    return patched(raw, central_entry(raw, suffix) + 38, struct.pack("<I", value))


def cd_method(suffix: str, value: int) -> bytes:
    raw = saved_bytes()
    return patched(raw, central_entry(raw, suffix) + 10, struct.pack("<H", value))


def cd_flags(suffix: str, value: int) -> bytes:
    raw = saved_bytes()
    return patched(raw, central_entry(raw, suffix) + 8, struct.pack("<H", value))


def cd_name_byte(suffix: str, value: int) -> bytes:
    raw = saved_bytes()
    return patched(raw, central_entry(raw, suffix) + 46 + 8, bytes([value]))


def end_record_count(count: int) -> bytes:
    raw = bin_bytes()  # zipfile's writer: a plain end record, no zip64
    at = raw.rindex(b"PK\x05\x06")
    return patched(raw, at + 8, struct.pack("<HH", count, count))


def zip64_disk(disk: int) -> bytes:
    raw = saved_bytes()  # torch.save writes a zip64 end record
    at = raw.rindex(b"PK\x06\x06")
    return patched(raw, at + 16, struct.pack("<I", disk))


def local_extra_len(suffix: str, value: int) -> bytes:
    raw = saved_bytes()
    header, _, _ = record_span(raw, suffix)
    return patched(raw, header + 28, struct.pack("<H", value))


def local_name_byte(suffix: str) -> bytes:
    raw = saved_bytes()
    header, _, _ = record_span(raw, suffix)
    return patched(raw, header + 30, b"X")


def central_directory_broken() -> bytes:
    raw = saved_bytes()
    at = raw.index(b"PK\x01\x02")
    return patched(raw, at, b"PK\x01\x09")


def legacy_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def deflated_storage() -> bytes:
    return bin_bytes(record_compress=zipfile.ZIP_DEFLATED)


def duplicate_record() -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate name
        return bin_bytes(extra=(("archive/data/0", F32_RECORD),))


def pickle_with(opcodes: bytes) -> bytes:
    return bin_bytes(pkl=b"\x80\x02" + opcodes + b".")


W = Storage("0", 4)

#: (id, archive bytes, error class, message fragment)
MALFORMED_BIN: list[tuple[str, Callable[[], bytes], type[Exception], str]] = [
    # not a zip at all
    ("empty-file", lambda: b"", BinNotZipError, "is empty"),
    ("legacy-torch-save", legacy_bytes, BinNotZipError, "legacy (pre-zip) PyTorch checkpoint"),
    ("random-bytes", lambda: b"hello world" * 10, BinNotZipError, "not a torch.save zip archive"),
    # damaged zip structure
    ("truncated", lambda: saved_bytes()[:-100], BinZipError, "no end-of-central-directory record"),
    ("truncated-half", lambda: saved_bytes()[: len(saved_bytes()) // 2], BinZipError, "truncated"),
    (
        "bad-central-directory",
        central_directory_broken,
        BinZipError,
        "central directory entry 0 at byte",
    ),
    (
        "central-directory-count",
        lambda: end_record_count(3),
        BinZipError,
        "its end record says 3 entries",
    ),
    (
        "multi-disk",
        lambda: zip64_disk(1),
        BinZipError,
        "multi-disk archive",
    ),
    (
        "record-marked-folder",
        lambda: external_attr("data/0", 0x10),
        BinZipError,
        "record 'archive/data/0': is marked as a folder",
    ),
    (
        "deflate-garbage",
        lambda: cd_method("byteorder", zipfile.ZIP_DEFLATED),
        BinZipError,
        "damaged zip archive (Error -3 while decompressing data",
    ),
    (
        "encrypted-record",
        lambda: cd_flags("data/0", 0x1),
        BinZipError,
        "has zip flags 0x0001",
    ),
    (
        "non-utf8-record-name",
        lambda: cd_name_byte("serialization_id", 0xFF),
        BinZipError,
        "can't decode byte 0xff",
    ),
    (
        "serialization-id-not-utf8",
        lambda: bin_bytes(extra=(("archive/.data/serialization_id", b"\x80abc"),)),
        BinFormatError,
        "serialization_id record is not UTF-8",
    ),
    (
        "storage-alignment-not-int",
        lambda: bin_bytes(extra=(("archive/.storage_alignment", b"x4"),)),
        BinFormatError,
        ".storage_alignment record holds b'x4'",
    ),
    (
        "bad-local-header-storage",
        lambda: local_name_byte("data/0"),
        BinZipError,
        "record 'archive/data/0': local header names 'Xrchive/data/0'",
    ),
    (
        "bad-local-header-version",
        lambda: local_name_byte("/version"),
        BinZipError,
        "record 'archive/version': local header names 'Xrchive/version'",
    ),
    ("crc-of-data-pkl", lambda: flip_in_record("data.pkl", 40), BinZipError, "CRC"),
    (
        "duplicate-record",
        lambda: duplicate_record(),
        BinZipError,
        "record 'archive/data/0': appears twice",
    ),
    (
        "stray-record",
        lambda: bin_bytes(extra=(("other/x", b""),)),
        BinZipError,
        "outside the archive's folder",
    ),
    (
        "no-data-pkl",
        lambda: saved_bytes().replace(b"data.pkl", b"data.pkX"),
        BinZipError,
        "holds no",
    ),
    (
        "record-data-past-central-directory",
        lambda: local_extra_len("data/0", 0xFFFF),
        BinZipError,
        "runs into the central directory",
    ),
    # torch's own format records
    ("no-version", lambda: bin_bytes(version=None), BinFormatError, "no archive/version record"),
    ("version-99", lambda: bin_bytes(version=b"99\n"), BinFormatError, "format version 99"),
    ("version-0", lambda: bin_bytes(version=b"0\n"), BinFormatError, "format version 0"),
    ("version-text", lambda: bin_bytes(version=b"x\n"), BinFormatError, "not a format version number"),
    (
        "version-too-long",
        lambda: bin_bytes(version=b"3" + b" " * 100),
        BinFormatError,
        "record 'archive/version' is longer than 64 bytes",
    ),
    ("big-endian", lambda: bin_bytes(byteorder=b"big"), BinFormatError, "big-endian"),
    ("byteorder-garbage", lambda: bin_bytes(byteorder=b"middle"), BinFormatError, "byteorder record holds"),
    # the pickle: malformed, or not weights-only
    ("pickle-garbage", lambda: bin_bytes(pkl=b"\x80\x02\xff\xfe"), BinPickleError, "not a valid pickle"),
    ("pickle-no-stop", lambda: bin_bytes(pkl=b"\x80\x02}"), BinPickleError, "not a valid pickle"),
    ("pickle-protocol-9", lambda: bin_bytes(pkl=b"\x80\x09}."), BinPickleError, "not a valid weights pickle"),
    ("pickle-memo-index", lambda: pickle_with(b"}r\xff\xff\xff\x0f"), BinPickleError, "memo entry"),
    ("pickle-empty-appends", lambda: pickle_with(b"](e"), BinPickleError, "empty APPENDS at byte 4"),
    ("pickle-empty-set", lambda: pickle_with(b"\x8f"), BinPickleError, "opcode EMPTY_SET at byte 2"),
    (
        "pickle-protocol-4",
        lambda: saved_bytes({"w": torch.ones(2)}, pickle_protocol=4),
        BinPickleError,
        "opcode FRAME at byte 2, which torch.load(weights_only=True) refuses too",
    ),
    (
        "pickle-global-in-scan",
        lambda: pickle_with(b"cbuiltins\neval\n"),
        UnsafePickleError,
        "pickle references builtins.eval",
    ),
    (
        "pickle-newobj",
        lambda: pickle_with(b"ccollections\nOrderedDict\n)\x81"),
        UnsafePickleError,
        "opcode NEWOBJ",
    ),
    (
        "pickle-global",
        lambda: bin_bytes({"w": Call(os.system, "true")}),
        UnsafePickleError,
        "refusing to load it (nothing was run)",
    ),
    (
        "ordered-dict-with-args",
        lambda: bin_bytes(Call(collections.OrderedDict, [("a", 1)])),
        UnsafePickleError,
        "builds an OrderedDict from 1 arguments",
    ),
    (
        "tensor-from-non-storage",
        lambda: bin_bytes({"w": Tensor([1, 2, 3])}),
        UnsafePickleError,
        "rebuilds a tensor from [1, 2, 3], not a storage",
    ),
    (
        "bad-persistent-id",
        lambda: bin_bytes({"w": Tensor(Storage("0", 4, pid=("storage", "x")))}),
        BinPickleError,
        "persistent id",
    ),
    (
        "persistent-id-numel-negative",
        lambda: bin_bytes({"w": Tensor(Storage("0", -4))}),
        BinPickleError,
        "persistent id",
    ),
    (
        "rebuild-argument-count",
        lambda: bin_bytes({"w": Call(torch._utils._rebuild_tensor_v2, W, 0, (2, 2), (2, 1))}),
        BinPickleError,
        "rebuilds a tensor from 4 arguments; _rebuild_tensor_v2 takes 6 or 7",
    ),
    (
        "backward-hooks",
        lambda: bin_bytes({"w": Tensor(W, rest=(False, {"hook": 1}))}),
        BinPickleError,
        "gives a tensor backward hooks",
    ),
    (
        "tensor-metadata",
        lambda: bin_bytes({"w": Tensor(W, rest=(False, None, {"neg": True}))}),
        BinPickleError,
        "gives a tensor metadata",
    ),
    (
        "parameter-argument-count",
        lambda: bin_bytes({"w": Call(torch._utils._rebuild_parameter, Tensor(W))}),
        BinPickleError,
        "rebuilds a parameter from 1 arguments; _rebuild_parameter takes 3",
    ),
    (
        "requires-grad-int",
        lambda: bin_bytes({"w": Tensor(W, rest=(1, None))}),
        BinTensorError,
        "requires_grad (1,) is not true or false",
    ),
    (
        "requires-grad-on-integers",
        lambda: bin_bytes(
            {"w": Tensor(Storage("0", 2, "LongStorage"), shape=(2,), stride=(1,), rest=(True, None))}
        ),
        BinTensorError,
        "requires_grad is true for a I64 tensor",
    ),
    (
        "parameter-requires-grad-on-integers",
        lambda: bin_bytes(
            {
                "w": Call(
                    torch._utils._rebuild_parameter,
                    Tensor(Storage("0", 2, "LongStorage"), shape=(2,), stride=(1,)),
                    True,
                    collections.OrderedDict(),
                )
            }
        ),
        BinTensorError,
        "requires_grad is true for a I64 tensor",
    ),
    (
        "ordered-dict-state-not-dict",
        lambda: bin_bytes(StateDict({"w": Tensor(W)}, "abc")),
        BinPickleError,
        "an OrderedDict's pickled attributes are 'abc', not a dict",
    ),
    (
        "unused-storage-missing",
        lambda: bin_bytes(StateDict({"w": Tensor(W)}, {"_metadata": Tensor(Storage("9", 4))})),
        BinStorageError,
        "storage '9': has no record 'archive/data/9'",
    ),
    ("not-a-dict", lambda: bin_bytes([Tensor(W)]), BinPickleError, "not a state dict of named tensors"),
    (
        "nested-dict",
        lambda: bin_bytes({"model": {"w": Tensor(W)}}),
        BinPickleError,
        "entry 'model' of data.pkl is a dict, not a tensor",
    ),
    ("int-key", lambda: bin_bytes({3: Tensor(W)}), BinPickleError, "tensor names must be strings"),
    # tensors: shape, strides, storage offset
    (
        "negative-storage-offset",
        lambda: bin_bytes({"w": Tensor(W, offset=-10, shape=(2,), stride=(1,))}),
        BinTensorError,
        "storage offset -10 is not a non-negative integer",
    ),
    (
        "string-storage-offset",
        lambda: bin_bytes({"w": Tensor(W, offset="1", shape=(2,), stride=(1,))}),
        BinTensorError,
        "storage offset '1'",
    ),
    (
        "negative-dim",
        lambda: bin_bytes({"w": Tensor(W, shape=(-1, 4), stride=(4, 1))}),
        BinTensorError,
        "shape (-1, 4) is not a tuple of at most 64 non-negative integers",
    ),
    (
        "float-dim",
        lambda: bin_bytes({"w": Tensor(W, shape=(2.0, 2), stride=(2, 1))}),
        BinTensorError,
        "shape (2.0, 2)",
    ),
    (
        "bool-dim",
        lambda: bin_bytes({"w": Tensor(W, shape=(True, 4), stride=(4, 1))}),
        BinTensorError,
        "shape (True, 4)",
    ),
    (
        "too-many-dims",
        lambda: bin_bytes({"w": Tensor(W, shape=(1,) * 65, stride=(1,) * 65)}),
        BinTensorError,
        "a tuple of 65 items",
    ),
    (
        "stride-wrong-length",
        lambda: bin_bytes({"w": Tensor(W, shape=(2, 2), stride=(1,))}),
        BinTensorError,
        "stride (1,) has 1 entries for the 2 dims",
    ),
    (
        "negative-stride",
        lambda: bin_bytes({"w": Tensor(W, shape=(2, 2), stride=(-2, 1))}),
        BinTensorError,
        "stride (-2, 1) is not a tuple of non-negative integers",
    ),
    (
        "non-contiguous",
        lambda: saved_bytes({"w": torch.arange(6.0).reshape(2, 3).t()}),
        BinTensorError,
        "strides [1, 3] for shape [3, 2] are not contiguous (expected [2, 1])",
    ),
    (
        "shape-overflow",
        lambda: bin_bytes({"w": Tensor(W, shape=(2**40, 2**40), stride=(2**40, 1))}),
        BinTensorError,
        "overflows a 64-bit byte size",
    ),
    (
        "offset-overflow",
        lambda: bin_bytes({"w": Tensor(W, offset=2**63, shape=(2,), stride=(1,))}),
        BinTensorError,
        "overflows a 64-bit byte offset",
    ),
    # storages
    (
        "tensor-past-storage",
        lambda: bin_bytes({"w": Tensor(W, offset=3, shape=(4,), stride=(1,))}),
        BinStorageError,
        "needs bytes [12, 28) of its storage '0', which holds 16 bytes",
    ),
    (
        "storage-size-mismatch",
        lambda: bin_bytes({"w": Tensor(Storage("0", 8), shape=(2,), stride=(1,))}),
        BinStorageError,
        "holds 8 F32 elements (32 bytes) but its record has 16 bytes",
    ),
    ("missing-record", lambda: bin_bytes(records={}), BinStorageError, "has no record 'archive/data/0'"),
    ("compressed-record", deflated_storage, BinStorageError, "storage record 'archive/data/0' is compressed"),
    (
        "one-storage-two-dtypes",
        lambda: bin_bytes(
            {
                "w": Tensor(W, shape=(4,), stride=(1,)),
                "v": Tensor(Storage("0", 8, "HalfStorage"), shape=(8,), stride=(1,)),
            }
        ),
        BinStorageError,
        "one storage has one dtype and size",
    ),
    # limits
    (
        "pickle-inflates-too-far",
        lambda: bin_bytes(
            pkl=b"\x80\x02N" + b"0" * torch_bin.MAX_PICKLE_BYTES + b".", pkl_compress=zipfile.ZIP_DEFLATED
        ),
        BinLimitError,
        "over the 16777216-byte limit",
    ),
    (
        "too-many-opcodes",
        lambda: pickle_with(b"(" + b"N" * torch_bin.MAX_PICKLE_OPCODES + b"l"),
        BinLimitError,
        "more than 1048576 pickle opcodes",
    ),
]


@pytest.mark.parametrize("name,build,error,fragment", MALFORMED_BIN, ids=[m[0] for m in MALFORMED_BIN])
def test_malformed_bin_raises_its_error(
    tmp_path: Path, name: str, build: Callable[[], bytes], error: type[Exception], fragment: str
) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(build())
    with pytest.raises(error) as info:
        Checkpoint.open(path)
    assert_one_line(str(info.value), path, fragment)


def test_bin_limits_on_tensors_and_central_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({f"t{i}": torch.ones(2) for i in range(5)}, path)
    monkeypatch.setattr(torch_bin, "MAX_TENSORS", 4)
    with pytest.raises(BinLimitError) as info:
        read_bin_tensors(path)
    assert_one_line(str(info.value), path, "more than 4 tensors")
    monkeypatch.setattr(torch_bin, "MAX_TENSORS", 5)
    assert len(read_bin_tensors(path)) == 5
    monkeypatch.setattr(torch_bin, "MAX_CENTRAL_DIRECTORY_BYTES", 300)
    with pytest.raises(BinLimitError) as info:
        read_bin_tensors(path)
    assert_one_line(str(info.value), path, "is over the limit of 300 bytes")


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    def fail(*_: Any) -> None:
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fifo_and_folder_named_bin_neither_hang_nor_trace_back(tmp_path: Path) -> None:
    fifo = tmp_path / "pytorch_model.bin"
    os.mkfifo(fifo)
    with alarm(10):
        with pytest.raises(InputError) as info:
            read_bin_tensors(fifo)
        assert_one_line(str(info.value), fifo, "not a regular file")
        with pytest.raises(LazyMergeError):
            Checkpoint.open(fifo)
    folder = tmp_path / "shard.bin"
    folder.mkdir()
    with pytest.raises(InputError) as info:
        read_bin_tensors(folder)
    assert_one_line(str(info.value), folder, "is a folder")


def test_legacy_bin_is_still_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(legacy_bytes())
    with pytest.raises(InputError, match="legacy .*Convert it"):
        Checkpoint.open(path)


def read_all(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    with Checkpoint.open(path) as ckpt:
        out = {}
        for name, info in ckpt.items():
            buf = bytearray(info.nbytes)
            ckpt.read_into(info, 0, memoryview(buf))
            out[name] = (info.dtype, info.shape, bytes(buf))
        return out


def torch_view(loaded: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """What `read_all` gives, from torch.load's tensors."""
    names = {getattr(torch, info.torch_name): name for name, info in DTYPES.items()}
    return {
        name: (
            names.get(t.dtype, str(t.dtype)),
            tuple(t.shape),
            t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(),
        )
        for name, t in loaded.items()
    }


def fuzz_state() -> dict[str, torch.Tensor]:
    """A state dict as nn.Module.state_dict gives it (an OrderedDict with `_metadata`, which
    torch.save pickles with BUILD), with tied and overlapping tensors and several dtypes."""
    base = torch.arange(12, dtype=torch.float32)
    state = collections.OrderedDict(
        w=base.reshape(3, 4),
        tied=base.reshape(3, 4),  # a second tensor over the same storage (tied weights)
        view=base[4:10].reshape(2, 3),  # an overlapping view of that storage
        h=torch.arange(3, dtype=torch.bfloat16),
        i=torch.tensor([7, -1], dtype=torch.int64),
        s=torch.tensor(2.5),
    )
    state._metadata = collections.OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    return state


FUZZ_BIN = saved_bytes(fuzz_state())
FUZZ_PICKLE = record_span(FUZZ_BIN, "data.pkl")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_bin_reads_like_torch_load_or_raises(tmp_path: Path, data: st.DataObject) -> None:
    """Byte flips and truncations of a valid archive: lazymerge refuses it with a LazyMergeError,
    or reads exactly what torch.load(weights_only=True) reads from the same mutated file (a flip in
    tensor data changes both readers' bytes alike; torch checksums no record, nor does lazymerge)."""
    raw = bytearray(FUZZ_BIN)
    _, pkl_start, pkl_size = FUZZ_PICKLE
    anywhere = st.integers(0, len(raw) - 1)
    in_pickle = st.integers(pkl_start, pkl_start + pkl_size - 1)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.one_of(anywhere, in_pickle))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "fuzz.bin"
    path.write_bytes(bytes(raw))
    try:
        ours = read_all(path)
    except LazyMergeError as exc:
        assert "\n" not in str(exc)
        return
    theirs = torch_view(torch.load(path, weights_only=True, map_location="cpu"))
    assert ours == theirs


def with_crc_fixed(raw: bytearray) -> bytearray:
    """`raw` with data.pkl's CRC-32 recomputed in its local and central headers, so that a mutated
    pickle reaches both unpicklers instead of failing zipfile's CRC check."""
    header, start, size = FUZZ_PICKLE
    crc = struct.pack("<I", zlib.crc32(bytes(raw[start : start + size])))
    raw[header + 14 : header + 18] = crc
    central = central_entry(bytes(raw), "data.pkl")
    raw[central + 16 : central + 20] = crc
    return raw


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_pickle_reads_like_torch_load_or_raises(tmp_path: Path, data: st.DataObject) -> None:
    """The same property for mutations of data.pkl alone, its CRC fixed: every pickle that
    lazymerge's restricted unpickler accepts, torch's weights-only unpickler reads the same way."""
    raw = bytearray(FUZZ_BIN)
    _, start, size = FUZZ_PICKLE
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(start, start + size - 1))
        raw[pos] = data.draw(
            st.one_of(st.integers(0, 255), st.sampled_from([raw[pos] ^ 1, (raw[pos] + 1) % 256]))
        )
    path = tmp_path / "fuzz.bin"
    path.write_bytes(bytes(with_crc_fixed(raw)))
    try:
        ours = read_all(path)
    except LazyMergeError as exc:
        assert "\n" not in str(exc)
        return
    assert ours == torch_view(torch.load(path, weights_only=True, map_location="cpu"))


def test_tied_and_overlapping_views_read_exactly(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(FUZZ_BIN)
    ours = read_all(path)
    assert ours == torch_view(torch.load(path, weights_only=True))
    with Checkpoint.open(path) as ckpt:
        assert ckpt["w"].offset == ckpt["tied"].offset and ckpt["view"].offset == ckpt["w"].offset + 16
    assert b"_metadata" in FUZZ_BIN and b"q\x00" in FUZZ_BIN


MEMORY_CHILD = textwrap.dedent(
    """
    import resource, sys
    from lazymerge.errors import LazyMergeError
    from lazymerge.io.torch_bin import read_bin_tensors

    def peak():  # this process's peak resident memory in bytes (VmHWM; else ru_maxrss)
        try:
            with open("/proc/self/status") as fh:
                return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    try:
        read_bin_tensors(sys.argv[1])  # warm up: imports, first allocations
    except LazyMergeError:
        pass
    try:  # start the peak from here (Linux: clear_refs 5 resets VmHWM to the current RSS)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    before = peak()
    try:
        read_bin_tensors(sys.argv[2])
        error = "none"
    except LazyMergeError as exc:
        error = type(exc).__name__
    print(error, peak() - before)
    """
)


@pytest.mark.parametrize(
    "opcodes,error,budget_mib",
    [
        # 10 million empty lists in a 10 KB file: unpickled, this took 0.77 GB before the refusal
        (b"(" + b"]" * 10_000_000 + b"l", "BinLimitError", 32),
        # 200 MB of pickle deflated to 200 KB: refused from the record's size, never inflated
        (b"(" + b"N" * 200_000_000 + b"l", "BinLimitError", 8),
        # a 9-byte pickle storing memo entry 2**28: Python's unpickler would allocate 4 GB for it
        (b"}r\xff\xff\xff\x0f", "BinPickleError", 8),
        # just under the opcode limit: a million empty dicts, about the most a pickle may build
        (b"(" + b"}" * 1_000_000 + b"l", "BinPickleError", 128),
    ],
    ids=["ten-million-lists", "inflates-to-200MB", "huge-memo-index", "just-under-the-limits"],
)
def test_hostile_pickle_memory_stays_bounded(
    tmp_path: Path, opcodes: bytes, error: str, budget_mib: int
) -> None:
    warm = tmp_path / "warm.bin"
    warm.write_bytes(saved_bytes())
    path = tmp_path / "hostile.bin"
    path.write_bytes(
        bin_bytes(pkl=b"\x80\x02" + opcodes + b".", pkl_compress=zipfile.ZIP_DEFLATED, records={})
    )
    assert path.stat().st_size < 1_000_000
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(warm), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    got, grown = proc.stdout.split()
    assert got == error
    assert int(grown) < budget_mib * 2**20, f"peak RSS grew by {int(grown) / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------
# tokenizer and config files
# --------------------------------------------------------------------------------------------

VOCAB = {"<unk>": 0, "a": 1, "b": 2, "c": 3}


def tokenizer_json(vocab: Any = None, added: Any = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "model": {
            "type": "WordLevel",
            "vocab": dict(VOCAB) if vocab is None else vocab,
            "unk_token": "<unk>",
        },
        "added_tokens": [{"id": 4, "content": "[PAD]", "special": True}] if added is None else added,
    }
    doc.update(extra)
    return doc


def deep(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def as_bytes(doc: Any) -> bytes:
    return doc if isinstance(doc, bytes) else json.dumps(doc).encode()


#: (id, {file name: JSON document or raw bytes}, the file the message names, message fragment)
MALFORMED_TOKENIZER: list[tuple[str, dict[str, Any], str, str]] = [
    ("not-utf8", {"tokenizer.json": b'{"model": "\xff"}'}, "tokenizer.json", "not valid UTF-8 (byte 11)"),
    ("not-json", {"tokenizer.json": b"{model"}, "tokenizer.json", "not valid JSON"),
    ("deep-json", {"tokenizer.json": b'{"model": ' + deep() + b"}"}, "tokenizer.json", "nests too deeply"),
    ("not-object", {"tokenizer.json": [1, 2]}, "tokenizer.json", "is a JSON array, not a JSON object"),
    (
        "repeated-key",
        {"tokenizer.json": b'{"model": {}, "model": {}}'},
        "tokenizer.json",
        '"model" appears twice',
    ),
    ("model-is-list", {"tokenizer.json": {"model": []}}, "tokenizer.json", "model must be an object"),
    (
        "no-vocab",
        {"tokenizer.json": {"model": {"type": "BPE"}}},
        "tokenizer.json",
        "model.vocab must be an object",
    ),
    (
        "vocab-id-string",
        {"tokenizer.json": tokenizer_json({"a": "1"})},
        "tokenizer.json",
        'gives token "a" the id "1"',
    ),
    ("vocab-id-negative", {"tokenizer.json": tokenizer_json({"a": -1})}, "tokenizer.json", "the id -1"),
    ("vocab-id-float", {"tokenizer.json": tokenizer_json({"a": 1.0})}, "tokenizer.json", "the id 1.0"),
    ("vocab-id-bool", {"tokenizer.json": tokenizer_json({"a": True})}, "tokenizer.json", "the id true"),
    ("vocab-id-huge", {"tokenizer.json": tokenizer_json({"a": 2**40})}, "tokenizer.json", "[0, 4294967295]"),
    (
        "vocab-id-duplicate",
        {"tokenizer.json": tokenizer_json({"a": 1, "b": 1})},
        "tokenizer.json",
        'gives id 1 to both "a" (tokenizer.json) and "b" (tokenizer.json)',
    ),
    (
        "unigram-entry",
        {"tokenizer.json": tokenizer_json([["a", -1.0], "b"])},
        "tokenizer.json",
        "model.vocab entry 1 must be [piece string, score number]",
    ),
    (
        "unigram-piece-twice",
        {"tokenizer.json": tokenizer_json([["a", -1.0], ["a", -2.0]])},
        "tokenizer.json",
        'gives token "a" ids 0 and 1',
    ),
    (
        "added-tokens-not-list",
        {"tokenizer.json": tokenizer_json(added={"[PAD]": 4})},
        "tokenizer.json",
        "added_tokens must be a list",
    ),
    (
        "added-token-without-id",
        {"tokenizer.json": tokenizer_json(added=[{"content": "[PAD]"}])},
        "tokenizer.json",
        "added_tokens[0]: id must be an integer in [0, 4294967295], found no id",
    ),
    (
        "added-token-negative-id",
        {"tokenizer.json": tokenizer_json(added=[{"content": "[PAD]", "id": -1}])},
        "tokenizer.json",
        "added_tokens[0]: id must be an integer",
    ),
    (
        "added-token-content",
        {"tokenizer.json": tokenizer_json(added=[{"content": 5, "id": 4}])},
        "tokenizer.json",
        "added_tokens[0]: content must be a string, found 5",
    ),
    (
        "added-token-flag",
        {"tokenizer.json": tokenizer_json(added=[{"content": "[PAD]", "id": 4, "special": "yes"}])},
        "tokenizer.json",
        'special must be true or false, found "yes"',
    ),
    (
        "added-token-twice",
        {"tokenizer.json": tokenizer_json(added=[{"content": "x", "id": 4}, {"content": "x", "id": 5}])},
        "tokenizer.json",
        'token "x" is added twice, with ids 4 and 5',
    ),
    (
        "added-token-takes-vocab-id",
        {"tokenizer.json": tokenizer_json(added=[{"content": "[PAD]", "id": 2}])},
        "tokenizer.json",
        "gives id 2 to both",
    ),
    (
        "added-tokens-json-list",
        {"tokenizer.json": tokenizer_json(), "added_tokens.json": ["[X]"]},
        "added_tokens.json",
        "is a JSON array, expected an object of token -> id",
    ),
    (
        "added-tokens-json-negative",
        {"tokenizer.json": tokenizer_json(), "added_tokens.json": {"[X]": -1}},
        "added_tokens.json",
        'gives token "[X]" the id -1',
    ),
    (
        "added-tokens-json-string",
        {"tokenizer.json": tokenizer_json(), "added_tokens.json": {"[X]": "5"}},
        "added_tokens.json",
        'the id "5"',
    ),
    (
        "added-tokens-json-clash",
        {"tokenizer.json": tokenizer_json(), "added_tokens.json": {"[X]": 3}},
        "added_tokens.json",
        'gives id 3 to both "c" (tokenizer.json) and "[X]" (added_tokens.json)',
    ),
    (
        "added-tokens-json-deep",
        {"tokenizer.json": tokenizer_json(), "added_tokens.json": deep()},
        "added_tokens.json",
        "nests too deeply",
    ),
    (
        "tokenizer-config-not-object",
        {"tokenizer.json": tokenizer_json(), "tokenizer_config.json": "x"},
        "tokenizer_config.json",
        'is "x", not a JSON object',
    ),
    (
        "decoder-not-object",
        {"tokenizer.json": tokenizer_json(), "tokenizer_config.json": {"added_tokens_decoder": []}},
        "tokenizer_config.json",
        "added_tokens_decoder must be an object of id -> token",
    ),
    (
        "decoder-key",
        {"tokenizer.json": tokenizer_json(), "tokenizer_config.json": {"added_tokens_decoder": {"-4": {}}}},
        "tokenizer_config.json",
        'key "-4" is not a token id',
    ),
    (
        "decoder-entry",
        {
            "tokenizer.json": tokenizer_json(),
            "tokenizer_config.json": {"added_tokens_decoder": {"4": {"content": ["[PAD]"]}}},
        },
        "tokenizer_config.json",
        "added_tokens_decoder[4]: content must be a string, found a JSON array",
    ),
    (
        "sentencepiece-garbage",
        {"tokenizer.model": b"\x0a\xff\xff"},
        "tokenizer.model",
        "not a readable SentencePiece model",
    ),
]


def write_folder(folder: Path, files: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, doc in files.items():
        (folder / name).write_bytes(as_bytes(doc))
    return folder


@pytest.mark.parametrize(
    "name,files,named,fragment", MALFORMED_TOKENIZER, ids=[m[0] for m in MALFORMED_TOKENIZER]
)
def test_malformed_tokenizer_raises_its_error(
    tmp_path: Path, name: str, files: dict[str, Any], named: str, fragment: str
) -> None:
    folder = write_folder(tmp_path / "model", files)
    with pytest.raises(TokenizerFileError) as info:
        read_vocab(folder)
    assert_one_line(str(info.value), folder / named, fragment)
    assert isinstance(info.value, InputError)


def test_valid_tokenizer_files_still_read(tmp_path: Path) -> None:
    folder = write_folder(
        tmp_path / "m",
        {
            "tokenizer.json": tokenizer_json(
                added=[{"id": 0, "content": "<unk>"}, {"id": 4, "content": "[PAD]"}]
            ),
            "added_tokens.json": {"[PAD]": 4, "<x>": 5},
            "tokenizer_config.json": {"added_tokens_decoder": {"4": {"content": "[PAD]", "special": True}}},
        },
    )
    assert read_vocab(folder) == {**VOCAB, "[PAD]": 4, "<x>": 5}
    assert added_token_entries(folder)["[PAD]"]["id"] == 4
    unigram = write_folder(
        tmp_path / "u", {"tokenizer.json": tokenizer_json([["<unk>", 0], ["a", -1.5]], added=[])}
    )
    assert read_vocab(unigram) == {"<unk>": 0, "a": 1}


def test_output_companion_files_refuse_malformed_inputs(tmp_path: Path) -> None:
    folder = write_folder(
        tmp_path / "m",
        {"tokenizer.json": tokenizer_json(), "tokenizer_config.json": [], "config.json": {"vocab_size": 5}},
    )
    with pytest.raises(TokenizerFileError) as info:
        output_companion_files(folder, [("[X]", 5, None)], 6)
    assert_one_line(str(info.value), folder / "tokenizer_config.json", "not a JSON object")
    (folder / "config.json").write_text('{"vocab_size": "5"}')
    with pytest.raises(ConfigFileError) as cinfo:
        output_companion_files(folder, [], 6)
    assert_one_line(str(cinfo.value), folder / "config.json", "field 'vocab_size' must be a positive integer")


MALFORMED_CONFIG: list[tuple[str, Any, str]] = [
    ("not-utf8", b'{"model_type": "\xfe"}', "not valid UTF-8"),
    ("not-json", b"{vocab_size: 3}", "not valid JSON"),
    ("deep", b'{"a": ' + deep() + b"}", "nests too deeply"),
    ("not-object", [], "is a JSON array, not a JSON object"),
    ("repeated-key", b'{"vocab_size": 3, "vocab_size": 4}', '"vocab_size" appears twice'),
    (
        "architectures-string",
        {"architectures": "LlamaForCausalLM"},
        "'architectures' must be a list of strings",
    ),
    ("architectures-ints", {"architectures": [1]}, "'architectures' must be a list of strings"),
    (
        "vocab-size-string",
        {"vocab_size": "32000"},
        "'vocab_size' must be a positive integer or null, found \"32000\"",
    ),
    ("vocab-size-zero", {"vocab_size": 0}, "'vocab_size' must be a positive integer or null, found 0"),
    ("vocab-size-negative", {"vocab_size": -5}, "found -5"),
    ("vocab-size-float", {"vocab_size": 32000.0}, "found 32000.0"),
    (
        "hidden-size-bool",
        {"hidden_size": True},
        "'hidden_size' must be a positive integer or null, found true",
    ),
    ("layers-list", {"num_hidden_layers": [2]}, "'num_hidden_layers' must be a positive integer"),
    ("tie-string", {"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false"),
    ("pad-string", {"pad_token_id": "0"}, "'pad_token_id' must be an integer or null"),
    ("pad-float", {"pad_token_id": 0.0}, "'pad_token_id' must be an integer or null"),
    ("model-type-int", {"model_type": 3}, "'model_type' must be a string"),
]


@pytest.mark.parametrize("name,doc,fragment", MALFORMED_CONFIG, ids=[m[0] for m in MALFORMED_CONFIG])
def test_malformed_config_raises_its_error(tmp_path: Path, name: str, doc: Any, fragment: str) -> None:
    folder = write_folder(tmp_path / "model", {"config.json": doc})
    with pytest.raises(ConfigFileError) as info:
        read_config(folder)
    assert_one_line(str(info.value), folder / "config.json", fragment)


def test_valid_config_values_pass(tmp_path: Path) -> None:
    doc = {
        "architectures": None,
        "vocab_size": 32000,
        "pad_token_id": -1,  # early LLaMA conversions
        "head_dim": None,
        "tie_word_embeddings": False,
        "rope_scaling": {"anything": ["goes"]},
    }
    assert read_config(write_folder(tmp_path / "m", {"config.json": doc})) == doc


def test_vocabulary_must_fit_the_embedding(tmp_path: Path) -> None:
    from lazymerge import merge
    from tests.helpers.models import BASE_WORDS, make_tokenizer, save_model

    rm = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    sft = save_model(tmp_path / "sft", "llama", False, 2, make_tokenizer(BASE_WORDS))
    config = json.loads((sft / "config.json").read_text())
    config["vocab_size"] = len(BASE_WORDS) + 8
    (sft / "config.json").write_text(json.dumps(config))
    with pytest.raises(VocabularyMismatchError) as info:
        merge([rm, sft], tmp_path / "out", alpha=0.3)
    assert_one_line(str(info.value), sft / "config.json", "vocab_size is 48 but embedding")
    assert "has 40 rows" in str(info.value)
    config["vocab_size"] = len(BASE_WORDS)
    (sft / "config.json").write_text(json.dumps(config))
    added = {"far": 1000}
    (sft / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(VocabularyMismatchError) as info:
        merge([rm, sft], tmp_path / "out", alpha=0.3)
    assert_one_line(str(info.value), sft / "tokenizer.json", "at id 1000")
    assert "added_tokens.json" in str(info.value) and "has only 40 rows" in str(info.value)
    assert not (tmp_path / "out").exists()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)
vocab_like = st.dictionaries(st.text(max_size=4), st.one_of(st.integers(-3, 50), json_values), max_size=6)
added_like = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "id": st.one_of(st.integers(-3, 50), json_values),
            "content": st.one_of(st.text(max_size=4), json_values),
            "special": st.one_of(st.booleans(), json_values),
        },
    )
    | json_values,
    max_size=4,
)
tokenizer_docs = st.one_of(
    json_values,
    st.builds(
        lambda v, a: {"model": {"vocab": v}, "added_tokens": a},
        vocab_like | json_values,
        added_like | json_values,
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokenizer=tokenizer_docs, added=st.none() | vocab_like | json_values)
def test_arbitrary_tokenizer_json_parses_or_raises(tmp_path: Path, tokenizer: Any, added: Any) -> None:
    """Any JSON in tokenizer.json and added_tokens.json: a str -> non-negative int mapping with
    unique ids, or a LazyMergeError in one line."""
    folder = tmp_path / "fuzz"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "added_tokens.json").unlink(missing_ok=True)
    if added is not None:
        (folder / "added_tokens.json").write_text(json.dumps(added))
    try:
        vocab = read_vocab(folder)
        entries = added_token_entries(folder)
    except LazyMergeError as exc:
        assert "\n" not in str(exc)
        return
    assert vocab is not None
    assert all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in vocab.items())
    assert len(set(vocab.values())) == len(vocab)
    assert all(isinstance(k, str) and isinstance(e, dict) for k, e in entries.items())


# --------------------------------------------------------------------------------------------
# pair and candidate files
# --------------------------------------------------------------------------------------------

RB = {"prompt": "p", "chosen": "good", "rejected": "bad", "subset": "s", "id": "r1"}
AJ = {"scenario": "math_reasoning", "label": 0, "prompt": "p", "response 1": "good", "response 2": "bad"}


def line(row: Any) -> bytes:
    return row if isinstance(row, bytes) else json.dumps(row).encode()


#: (id, lines of the file, message fragment); the bad row is always on line 2 unless the fragment
#: is about the whole file.
MALFORMED_PAIRS: list[tuple[str, list[Any], str]] = [
    ("not-utf8", [RB, b'{"prompt": "\xff"}'], ":2: not valid UTF-8"),
    ("not-json", [RB, b"{prompt"], ":2: not valid JSON"),
    ("array-row", [RB, [RB]], ":2: is a JSON array, not a JSON object"),
    ("deep", [RB, b'{"prompt": ' + deep() + b"}"], ":2: JSON nests too deeply"),
    (
        "repeated-key",
        [RB, b'{"prompt": "a", "prompt": "b", "chosen": "c", "rejected": "d"}'],
        ':2: key "prompt"',
    ),
    (
        "chosen-list",
        [RB, {**RB, "chosen": ["good"]}],
        ":2: field 'chosen' must be a string, found a JSON array",
    ),
    ("prompt-int", [RB, {**RB, "prompt": 3}], ":2: field 'prompt' must be a string, found 3"),
    ("subset-null", [RB, {**RB, "subset": None}], ":2: field 'subset' must be a string, found null"),
    ("id-float", [RB, {**RB, "id": 1.5}], ":2: field 'id' must be a string or an integer, found 1.5"),
    ("id-bool", [RB, {**RB, "id": True}], ":2: field 'id' must be a string or an integer, found true"),
    ("label-float", [AJ, {**AJ, "label": 1.9}], ":2: Auto-J label must be the integer 0, 1 or 2, found 1.9"),
    ("label-string", [AJ, {**AJ, "label": "1"}], ':2: Auto-J label must be the integer 0, 1 or 2, found "1"'),
    ("label-bool", [AJ, {**AJ, "label": True}], ":2: Auto-J label must be the integer 0, 1 or 2, found true"),
    ("label-3", [AJ, {**AJ, "label": 3}], "found 3"),
    ("label-one-point-oh", [AJ, {**AJ, "label": 1.0}], "found 1.0"),
    ("response-list", [AJ, {**AJ, "response 1": ["a", "b"]}], ":2: field 'response 1' must be a string"),
    ("scenario-int", [AJ, {**AJ, "scenario": 7}], ":2: field 'scenario' must be a string"),
    ("unknown-format", [RB, {"question": 1}], ":2: expected prompt/chosen/rejected"),
    ("empty", [], "holds no rows; there is no pair to score"),
    ("blank-lines-only", [b"", b"  "], "holds no rows"),
    ("only-ties", [{**AJ, "label": 2}, {**AJ, "label": 2}], "holds only 2 Auto-J ties (label 2)"),
]


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_bytes(b"".join(line(r) + b"\n" for r in lines))
    return path


@pytest.mark.parametrize("name,lines,fragment", MALFORMED_PAIRS, ids=[m[0] for m in MALFORMED_PAIRS])
def test_malformed_pair_file_raises_its_error(
    tmp_path: Path, name: str, lines: list[Any], fragment: str
) -> None:
    path = write_lines(tmp_path / "pairs.jsonl", lines)
    with pytest.raises(PairFileError) as info:
        load_pairs(path)
    assert_one_line(str(info.value), path, fragment)


C = {"prompt": "q", "candidates": ["The answer is 5", "The answer is 6"], "correct": [False, True]}

MALFORMED_CANDIDATES: list[tuple[str, list[Any], str]] = [
    (
        "correct-string",
        [C, {**C, "correct": "no"}],
        ':2: correct must be a list of true/false (JSON booleans), found "no"',
    ),
    (
        "correct-strings",
        [C, {**C, "correct": ["false", "false"]}],
        ':2: correct must be a list of true/false (JSON booleans), found "false" in the list',
    ),
    ("correct-ints", [C, {**C, "correct": [0, 1]}], "found 0 in the list"),
    ("correct-length", [C, {**C, "correct": [True]}], ":2: correct has 1 entries for 2 candidates"),
    (
        "candidates-string",
        [C, {**C, "candidates": "abc"}],
        ":2: needs prompt and a non-empty candidates list",
    ),
    ("candidates-empty", [C, {**C, "candidates": []}], ":2: needs prompt and a non-empty candidates list"),
    ("candidate-int", [C, {**C, "candidates": ["a", 6]}], ":2: candidates[1] must be a string, found 6"),
    ("prompt-list", [C, {**C, "prompt": ["q"]}], ":2: field 'prompt' must be a string"),
    (
        "answer-list",
        [C, {"prompt": "q", "candidates": ["1"], "answer": [6]}],
        ":2: answer must be a string or a number",
    ),
    ("answer-bool", [C, {"prompt": "q", "candidates": ["1"], "answer": True}], "found true"),
    (
        "answer-no-number",
        [C, {"prompt": "q", "candidates": ["1"], "answer": "six"}],
        ':2: gold answer "six" holds no number',
    ),
    ("no-grading", [C, {"prompt": "q", "candidates": ["1"]}], ":2: needs a correct list or a gold answer"),
    ("not-utf8", [C, b'{"prompt": "\xc3"}'], ":2: not valid UTF-8"),
    ("deep", [C, deep()], ":2: JSON nests too deeply"),
    ("empty", [], "holds no rows; there is no prompt to score"),
]


@pytest.mark.parametrize(
    "name,lines,fragment", MALFORMED_CANDIDATES, ids=[m[0] for m in MALFORMED_CANDIDATES]
)
def test_malformed_candidate_file_raises_its_error(
    tmp_path: Path, name: str, lines: list[Any], fragment: str
) -> None:
    path = write_lines(tmp_path / "candidates.jsonl", lines)
    with pytest.raises(CandidateFileError) as info:
        load_candidates(path)
    assert_one_line(str(info.value), path, fragment)


def test_line_numbers_count_blank_lines_and_valid_files_read(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "pairs.jsonl", [b"", RB, b"", {**RB, "chosen": 5}])
    with pytest.raises(PairFileError, match=r"pairs\.jsonl:4: field 'chosen'"):
        load_pairs(path)
    pairs, ties = load_pairs(
        write_lines(tmp_path / "ok.jsonl", [b"", {**RB, "id": 7}, {**AJ, "label": 2}, AJ])
    )
    assert ties == 1 and [p.id for p in pairs] == ["7", "3"] and pairs[1].chosen == "good"
    sets = load_candidates(
        write_lines(tmp_path / "c.jsonl", [C, {"prompt": "q", "candidates": ["it is 6", "7"], "answer": 6}])
    )
    assert sets[0].correct == [False, True] and sets[1].correct == [True, False]


def test_long_line_is_refused_with_the_cap_in_the_message(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    with open(path, "wb") as fh:
        fh.write(line(RB) + b"\n" + b'{"prompt": "' + b"x" * MAX_LINE_BYTES + b'"}\n')
    with pytest.raises(PairFileError) as info:
        load_pairs(path)
    assert_one_line(str(info.value), path, ":2: line is longer than the 16 MiB limit per line")


row_like = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            k: st.one_of(st.text(max_size=5), json_values)
            for k in ("prompt", "chosen", "rejected", "subset", "id")
        },
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "scenario": st.one_of(st.text(max_size=5), json_values),
            "label": st.one_of(st.integers(-1, 3), json_values),
            "prompt": st.one_of(st.text(max_size=5), json_values),
            "response 1": st.one_of(st.text(max_size=5), json_values),
            "response 2": st.one_of(st.text(max_size=5), json_values),
        },
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": st.one_of(st.text(max_size=5), json_values),
            "candidates": st.one_of(st.lists(st.text(max_size=5), max_size=3), json_values),
            "correct": st.one_of(st.lists(st.booleans(), max_size=3), json_values),
            "answer": json_values,
        },
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row_like, max_size=4))
@example(rows=[{"prompt": "", "chosen": "", "rejected": ""}])  # a pair that loads (found by hypothesis)
def test_arbitrary_jsonl_rows_load_or_raise(tmp_path: Path, rows: list[Any]) -> None:
    """Any JSON rows: pairs and candidate sets with the documented types, or an EvalDataError."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        pairs, ties = load_pairs(path)
        assert pairs
        for p in pairs:  # every text field a string, and the line it came from
            assert all(
                isinstance(getattr(p, f), str) for f in ("id", "subset", "prompt", "chosen", "rejected")
            )
            assert type(p.line) is int and p.line >= 1
    except PairFileError as exc:
        assert "\n" not in str(exc)
    try:
        sets = load_candidates(path)
        for s in sets:
            assert s.candidates and all(isinstance(c, str) for c in s.candidates)
            assert len(s.correct) == len(s.candidates) and all(type(c) is bool for c in s.correct)
    except CandidateFileError as exc:
        assert "\n" not in str(exc)
