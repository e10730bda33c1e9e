"""Direct I/O (O_DIRECT) reads and writes give the same bytes as buffered ones."""

from __future__ import annotations

import gc
import mmap
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lazymerge import merge
from lazymerge.io import writer
from lazymerge.io.reader import SPAN_SLACK, Checkpoint
from lazymerge.merge.workspace import direct_io_fits, staging_bytes


def direct_supported(folder: Path) -> bool:
    probe = folder / "probe"
    probe.write_bytes(b"x" * 4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | getattr(os, "O_DIRECT", 0)))
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False
    finally:
        probe.unlink()


def odd_inputs(tmp_path: Path) -> list[Path]:
    """Two checkpoints whose tensors start and end at offsets that are not block-aligned."""
    g = torch.Generator().manual_seed(3)
    shapes = {"a.odd": (3, 1001), "b.bf16": (4099,), "c.big": (777, 129), "d.int": (5,), "e.tiny": (1,)}
    paths = []
    for k in range(2):
        tensors = {
            name: (
                torch.randint(0, 9, shape, generator=g) * 0
                if "int" in name
                else torch.randn(shape, generator=g)
            )
            for name, shape in shapes.items()
        }
        tensors["b.bf16"] = tensors["b.bf16"].to(torch.bfloat16)
        tensors["e.tiny"] = tensors["e.tiny"].to(torch.float16)
        path = tmp_path / f"in{k}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def test_read_span_matches_safetensors(tmp_path: Path) -> None:
    if not direct_supported(tmp_path):
        pytest.skip("the filesystem of tmp_path refuses O_DIRECT")
    path = odd_inputs(tmp_path)[0]
    # copies: safetensors' loader may map the file, and mapped pages stay in the page cache
    want = {name: t.clone() for name, t in load_file(str(path)).items()}
    gc.collect()
    with Checkpoint.open(path) as ckpt:
        # a file in the page cache (this one, just written) is read from the cache
        assert ckpt.enable_direct_io() == 0
    with Checkpoint.open(path) as ckpt:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        assert ckpt.enable_direct_io() == 1
        for name, tensor in want.items():
            info = ckpt[name]
            raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
            for start, count in [
                (0, info.nbytes),
                (2, info.nbytes - 2),
                (info.nbytes // 3 * 2, info.nbytes // 3),
            ]:
                if count <= 0:
                    continue
                buffer = mmap.mmap(-1, count + SPAN_SLACK)
                got = ckpt.read_span(info, start, count, memoryview(buffer))
                assert bytes(got) == raw[start : start + count], (name, start, count)
        assert ckpt.bytes_read > 0


def test_large_direct_reads_go_out_in_pieces(tmp_path: Path) -> None:
    if not direct_supported(tmp_path):
        pytest.skip("the filesystem of tmp_path refuses O_DIRECT")
    g = torch.Generator().manual_seed(5)
    # 20 MB that start off the block grid (after the header) and span 3 pieces
    want = {"a": torch.ones(3, dtype=torch.int16), "b": torch.randn(5_000_001, generator=g)}
    path = tmp_path / "big.safetensors"
    save_file(want, str(path))
    with Checkpoint.open(path) as ckpt:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        assert ckpt.enable_direct_io() == 1
        info = ckpt["b"]
        raw = want["b"].view(torch.uint8).numpy().tobytes()
        for start, count in [(0, info.nbytes), (4, info.nbytes - 8), (8 * 2**20 - 4, 9 * 2**20)]:
            buffer = mmap.mmap(-1, count + SPAN_SLACK)
            assert bytes(ckpt.read_span(info, start, count, memoryview(buffer))) == raw[start : start + count]


@pytest.mark.parametrize("shard_size", [None, 30_000])
def test_direct_merge_equals_buffered_merge(tmp_path: Path, shard_size: int | None) -> None:
    inputs = odd_inputs(tmp_path)
    if not direct_supported(tmp_path):
        pytest.skip("the filesystem of tmp_path refuses O_DIRECT")
    kw = {"alpha": 0.3, "max_memory": 2**20, "chunk_elems": 1500, "dtype": "auto"}
    outs = {}
    for direct in (True, False):
        name = "direct" if direct else "buffered"
        dest = tmp_path / (name if shard_size else f"{name}.safetensors")
        merge(inputs, dest, direct_io=direct, **({"shard_size": shard_size} if shard_size else {}), **kw)
        outs[name] = dest
    # the model card names its own folder: the tensors and the index are what must agree
    files = (
        sorted(p.name for p in outs["direct"].iterdir() if p.name != "README.md") if shard_size else [None]
    )
    if shard_size:
        assert len([f for f in files if f.endswith(".safetensors")]) >= 3
    for f in files:
        a = outs["direct"] / f if f else outs["direct"]
        b = outs["buffered"] / f if f else outs["buffered"]
        assert a.read_bytes() == b.read_bytes(), f
    # and the values are the merge's, read back with safetensors' own loader
    x, y = (load_file(str(p)) for p in inputs)
    got = load_file(str(outs["direct"])) if not shard_size else {}
    for name, value in got.items():
        if value.is_floating_point():
            want = (0.7 * x[name].float() + 0.3 * y[name].float()).to(value.dtype)
            assert torch.equal(value, want), name


def test_writer_uses_direct_io_and_falls_back(tmp_path: Path, monkeypatch) -> None:
    if not direct_supported(tmp_path):
        pytest.skip("the filesystem of tmp_path refuses O_DIRECT")
    used = []
    real_init = writer.StreamingShardWriter.__init__

    def spy(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        used.append(self._direct_fd >= 0)

    monkeypatch.setattr(writer.StreamingShardWriter, "__init__", spy)
    inputs = odd_inputs(tmp_path)
    merge(inputs, tmp_path / "d.safetensors", max_memory=2**20)
    assert used == [True]
    # a filesystem that refuses O_DIRECT: the same file, written through the page cache
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(writer.os, "open", no_direct)
    merge(inputs, tmp_path / "b.safetensors", max_memory=2**20)
    assert used == [True, False]
    assert (tmp_path / "d.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_staging_fits_the_budget() -> None:
    assert staging_bytes(256 * 2**20, 1) == 16 * 2**20
    assert staging_bytes(2**20, 1) == 128 * 2**10
    assert staging_bytes(2**10, 4) == 64 * 2**10
    assert all(staging_bytes(m, n) % 4096 == 0 for m in (10**6, 3 * 10**8) for n in (1, 3))
    # a budget too small for direct I/O's fixed buffers is read and written through the page cache
    assert direct_io_fits(160 * 2**20, 2, 1) and direct_io_fits(2**20, 2, 1)
    assert not direct_io_fits(50_000, 2, 1)
