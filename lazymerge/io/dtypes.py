"""The one dtype table and the one tensor record every module shares.

Dtypes are named as in safetensors headers ("BF16", "F32", ...). torch is not imported here:
`torch_dtype` imports it on first use, so the header parser and the command line stay light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DtypeInfo:
    """One safetensors dtype: bytes per element, whether it is merged as a float, torch's name,
    torch's legacy storage class name in `.bin` pickles (None where torch has none), and the
    name users give it on the command line (None where it is not an output choice).

    Dtypes that are not merged (integers, bool, complex, the F8_E8M0 block scales) are copied,
    and only where every input holds the same bytes.
    """

    itemsize: int
    is_float: bool
    torch_name: str
    storage: str | None = None
    option: str | None = None


#: Every dtype lazymerge reads or writes, keyed by its safetensors name: the whole-byte dtypes
#: safetensors 0.8 reads.
DTYPES: dict[str, DtypeInfo] = {
    "F64": DtypeInfo(8, True, "float64", "DoubleStorage"),
    "F32": DtypeInfo(4, True, "float32", "FloatStorage", "float32"),
    "F16": DtypeInfo(2, True, "float16", "HalfStorage", "float16"),
    "BF16": DtypeInfo(2, True, "bfloat16", "BFloat16Storage", "bfloat16"),
    "I64": DtypeInfo(8, False, "int64", "LongStorage"),
    "I32": DtypeInfo(4, False, "int32", "IntStorage"),
    "I16": DtypeInfo(2, False, "int16", "ShortStorage"),
    "I8": DtypeInfo(1, False, "int8", "CharStorage"),
    "U64": DtypeInfo(8, False, "uint64"),
    "U32": DtypeInfo(4, False, "uint32"),
    "U16": DtypeInfo(2, False, "uint16"),
    "U8": DtypeInfo(1, False, "uint8", "ByteStorage"),
    "BOOL": DtypeInfo(1, False, "bool", "BoolStorage"),
    "C64": DtypeInfo(8, False, "complex64"),
    # 8-bit floats merge in fp32 and are cast back with torch's casts (round to nearest)
    "F8_E4M3": DtypeInfo(1, True, "float8_e4m3fn"),
    "F8_E5M2": DtypeInfo(1, True, "float8_e5m2"),
    "F8_E4M3FNUZ": DtypeInfo(1, True, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": DtypeInfo(1, True, "float8_e5m2fnuz"),
    # unsigned powers of two, the shared scales of MX block formats: meaningless averaged
    # apart from the blocks they scale, so copied like integers
    "F8_E8M0": DtypeInfo(1, False, "float8_e8m0fnu"),
}

#: Dtypes safetensors 0.8 reads that pack values below a byte (bits per value). lazymerge refuses
#: them: its chunks are whole elements.
SUB_BYTE_DTYPES: dict[str, int] = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

#: Complex dtypes: never merged, but `verify --finite` checks both parts of each value.
COMPLEX_DTYPES: frozenset[str] = frozenset(
    name for name, info in DTYPES.items() if info.torch_name.startswith("complex")
)
#: Output dtype choices of `--dtype` (besides "auto") and their safetensors names.
OUTPUT_DTYPE_CHOICES: dict[str, str] = {
    info.option: name for name, info in DTYPES.items() if info.option is not None
}
#: torch's legacy storage class names in `.bin` pickles -> safetensors dtype.
STORAGE_DTYPES: dict[str, str] = {
    info.storage: name for name, info in DTYPES.items() if info.storage is not None
}


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def is_float(dtype: str) -> bool:
    return DTYPES[dtype].is_float


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (imports torch)."""
    import torch

    return getattr(torch, DTYPES[dtype].torch_name)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in that file.

    The one record for tensors of safetensors shards and `.bin` archives alike. A checkpoint
    may hold a million of them, hence slots (no per-record `__dict__`: 80 bytes a record, not
    about 300); readers share one `path` object per file and one `dtype` string per dtype.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        """Absolute offset one past the tensor's last byte."""
        return self.offset + self.nbytes
