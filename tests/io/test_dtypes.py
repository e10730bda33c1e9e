"""Every dtype safetensors 0.8 reads: written with safetensors' own writers, merged or copied by
lazymerge, read back with safetensors' own loader and compared bit for bit; sub-byte dtypes
refused in one line naming the file and the tensor."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import deserialize, safe_open
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file, save_file

from lazymerge.errors import IncompatibleInputsError, NonFiniteError, SubByteDtypeError
from lazymerge.io.dtypes import DTYPES, SUB_BYTE_DTYPES
from lazymerge.io.reader import Checkpoint
from lazymerge.merge.api import merge

#: Copied when identical: safetensors name -> torch dtype.
COPIED = {
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "C64": torch.complex64,
    "F8_E8M0": torch.float8_e8m0fnu,
}
#: Merged in fp32 and cast back.
FLOAT8 = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}


def header_dtypes(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    doc = json.loads(raw[8 : 8 + n])
    return {k: v["dtype"] for k, v in doc.items() if k != "__metadata__"}


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def random_of(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns of `dtype` (any byte pattern; for complex, finite random values)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.complex64:
        return torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def test_the_table_holds_every_whole_byte_dtype_safetensors_writes(tmp_path: Path) -> None:
    """Each of lazymerge's dtypes round-trips through safetensors' writer under that very name."""
    for name, info in DTYPES.items():
        t = torch.zeros(4, dtype=getattr(torch, info.torch_name))
        save_file({"x": t}, str(tmp_path / "t.safetensors"))
        assert header_dtypes(tmp_path / "t.safetensors") == {"x": name}
        assert t.element_size() == info.itemsize
    assert set(COPIED) | set(FLOAT8) <= set(DTYPES)


@pytest.mark.parametrize("name", sorted(COPIED))
def test_non_float_dtypes_are_copied_bit_for_bit(tmp_path: Path, name: str) -> None:
    same = random_of(COPIED[name], (6, 5), seed=1)
    a = {"same": same, "w": torch.randn(3, 4)}
    b = {"same": same.clone(), "w": torch.randn(3, 4)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    out = tmp_path / "m.safetensors"
    merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], out, alpha=0.5)
    assert header_dtypes(out)["same"] == name
    got = load_file(str(out))
    assert got["same"].dtype == COPIED[name] and got["same"].shape == same.shape
    assert raw_bytes(got["same"]) == raw_bytes(same)
    assert torch.equal(got["w"], 0.5 * a["w"] + 0.5 * b["w"])


@pytest.mark.parametrize("name", sorted(COPIED))
def test_non_float_dtypes_that_differ_are_refused(tmp_path: Path, name: str) -> None:
    save_file({"s": random_of(COPIED[name], (8,), seed=1)}, str(tmp_path / "a.safetensors"))
    save_file({"s": random_of(COPIED[name], (8,), seed=2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(
        IncompatibleInputsError, match=rf"b\.safetensors: non-float tensor 's' \({name}\) differs"
    ):
        merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_unsigned_dtypes_from_the_numpy_writer(tmp_path: Path, dtype: type) -> None:
    values = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, size=(4, 3), dtype=dtype)
    for name in ("a", "b"):
        np_save_file({"ids": values, "w": np.ones(2, np.float32)}, str(tmp_path / f"{name}.safetensors"))
    out = tmp_path / "m.safetensors"
    merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], out)
    with safe_open(str(out), "np") as f:
        got = f.get_tensor("ids")
    assert got.dtype == dtype and got.tobytes() == values.tobytes()


@pytest.mark.parametrize("name", sorted(FLOAT8))
def test_float8_identical_inputs_merge_to_themselves(tmp_path: Path, name: str) -> None:
    """0.5 x + 0.5 x is x exactly in fp32, so casting back gives the input's bytes."""
    x = torch.randn(5, 7).to(FLOAT8[name])
    save_file({"x": x}, str(tmp_path / "a.safetensors"))
    save_file({"x": x.clone()}, str(tmp_path / "b.safetensors"))
    out = tmp_path / "m.safetensors"
    merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], out)
    got = load_file(str(out))["x"]
    assert header_dtypes(out)["x"] == name and got.dtype == FLOAT8[name]
    assert raw_bytes(got) == raw_bytes(x)


@pytest.mark.parametrize("name", sorted(FLOAT8))
def test_float8_merge_in_fp32_then_cast(tmp_path: Path, name: str) -> None:
    a = torch.randn(16, 9).to(FLOAT8[name])
    b = torch.randn(16, 9).to(FLOAT8[name])
    save_file({"x": a}, str(tmp_path / "a.safetensors"))
    save_file({"x": b}, str(tmp_path / "b.safetensors"))
    out = tmp_path / "m.safetensors"
    merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], out, alpha=0.25)
    want = (0.75 * a.float() + 0.25 * b.float()).to(FLOAT8[name])
    assert raw_bytes(load_file(str(out))["x"]) == raw_bytes(want)
    # to a wider output dtype: the fp32 merge itself, rounded once
    wide = tmp_path / "wide.safetensors"
    merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], wide, alpha=0.25, dtype="float32")
    assert torch.equal(load_file(str(wide))["x"], 0.75 * a.float() + 0.25 * b.float())


@pytest.mark.parametrize("name", sorted(FLOAT8))
def test_float8_overflow_is_a_warning_not_a_crash(tmp_path: Path, name: str) -> None:
    """torch has no isfinite for most 8-bit floats, and E4M3 saturates: a merge past the range
    still reports itself."""
    dtype = FLOAT8[name]
    big = torch.full((4,), torch.finfo(dtype).max).to(dtype)
    save_file({"x": big}, str(tmp_path / "a.safetensors"))
    save_file({"x": big.clone()}, str(tmp_path / "b.safetensors"))
    inputs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    report = merge(inputs, tmp_path / "m.safetensors", weights=[1.0, 1.0])
    assert len(report.warnings) == 1 and f"overflow the output dtype {name} " in report.warnings[0]
    with pytest.raises(NonFiniteError, match=f"overflow the output dtype {name} "):
        merge(inputs, tmp_path / "n.safetensors", weights=[1.0, 1.0], check_finite=True)
    # at the largest value itself nothing is reported
    assert merge(inputs, tmp_path / "o.safetensors", weights=[0.5, 0.5]).warnings == []


def sub_byte_file(path: Path, dtype: str, shape: list[int], nbytes: int) -> Path:
    header = json.dumps({"packed": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(nbytes)))
    deserialize(path.read_bytes())  # safetensors itself reads it
    return path


def test_f4_from_safetensors_writer_is_refused_in_one_line(tmp_path: Path) -> None:
    packed = torch.arange(8, dtype=torch.uint8).view(torch.float4_e2m1fn_x2).reshape(2, 4)
    save_file({"packed": packed, "w": torch.ones(2)}, str(tmp_path / "q.safetensors"))
    assert header_dtypes(tmp_path / "q.safetensors")["packed"] == "F4"
    with pytest.raises(SubByteDtypeError, match=r"q\.safetensors: tensor 'packed': dtype F4 packs 4-bit"):
        Checkpoint.open(tmp_path / "q.safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "lazymerge", "inspect", str(tmp_path / "q.safetensors")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "q.safetensors: tensor 'packed': dtype F4" in lines[0], result.stderr


@pytest.mark.parametrize("dtype", sorted(SUB_BYTE_DTYPES))
def test_every_sub_byte_dtype_is_refused(tmp_path: Path, dtype: str) -> None:
    bits = SUB_BYTE_DTYPES[dtype]
    path = sub_byte_file(tmp_path / "s.safetensors", dtype, [2, 8], 2 * 8 * bits // 8)
    with pytest.raises(
        SubByteDtypeError, match=rf"s\.safetensors: tensor 'packed': dtype {dtype} packs {bits}-bit"
    ):
        Checkpoint.open(path)
