"""Streaming merges equal an in-memory reference merge read and written with safetensors itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lazymerge import merge
from tests.helpers.checkpoints import load_any, reference_merge, write_sharded


def random_tensors(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(37, 16, generator=g).to(dtype),
        "block.0.attn.weight": torch.randn(16, 16, generator=g).to(dtype),
        "block.0.norm.weight": torch.randn(16, generator=g).to(dtype),
        "scalar": torch.randn((), generator=g).to(dtype),
        "empty": torch.empty(0, 4, dtype=dtype),
        "long.vector": torch.randn(1001, generator=g).to(dtype),
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("max_memory", [1 << 30, 200])
def test_two_inputs_match_reference(tmp_path: Path, save, dtype: torch.dtype, max_memory: int) -> None:
    a, b = random_tensors(1, dtype), random_tensors(2, dtype)
    out = tmp_path / "out.safetensors"
    report = merge(
        [save("a.safetensors", a), save("b.safetensors", b)], out, alpha=0.3, max_memory=max_memory
    )
    assert_same(load_any(out), reference_merge([a, b], [0.7, 0.3]))
    assert report.tensors == len(a)
    assert report.parameters == sum(t.numel() for t in a.values())
    assert report.bytes_read == 2 * sum(t.numel() * t.element_size() for t in a.values())
    assert report.bytes_written == out.stat().st_size


def test_chunk_boundaries_do_not_change_result(tmp_path: Path, save) -> None:
    a, b = random_tensors(3, torch.bfloat16), random_tensors(4, torch.bfloat16)
    pa, pb = save("a.safetensors", a), save("b.safetensors", b)
    outputs = []
    # chunks of 1, 7 and 25 elements, and whole tensors
    for i, chunk in enumerate([1, 7, 25, None]):
        out = tmp_path / f"out{i}.safetensors"
        merge([pa, pb], out, alpha=0.6, chunk_elems=chunk)
        outputs.append(out.read_bytes())
    assert all(o == outputs[0] for o in outputs[1:])
    assert_same(load_any(tmp_path / "out0.safetensors"), reference_merge([a, b], [0.4, 0.6]))


def test_mixed_input_dtypes_follow_first_input(tmp_path: Path, save) -> None:
    a, b = random_tensors(5, torch.bfloat16), random_tensors(6, torch.float16)
    c = random_tensors(7, torch.float32)
    out = tmp_path / "out.safetensors"
    merge(
        [save("a.safetensors", a), save("b.safetensors", b), save("c.safetensors", c)],
        out,
        weights=[0.2, 0.3, 0.5],
    )
    assert_same(load_any(out), reference_merge([a, b, c], [0.2, 0.3, 0.5]))


@pytest.mark.parametrize(
    "dtype,torch_dtype",
    [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)],
)
def test_explicit_output_dtype(tmp_path: Path, save, dtype: str, torch_dtype: torch.dtype) -> None:
    a, b = random_tensors(8, torch.bfloat16), random_tensors(9, torch.float32)
    out = tmp_path / "out.safetensors"
    merge([save("a.safetensors", a), save("b.safetensors", b)], out, alpha=0.5, dtype=dtype)
    assert_same(load_any(out), reference_merge([a, b], [0.5, 0.5], dtype=torch_dtype))


def test_sharded_inputs_and_outputs(tmp_path: Path) -> None:
    a, b = random_tensors(10, torch.bfloat16), random_tensors(11, torch.bfloat16)
    pa = write_sharded(tmp_path / "a", a, shards=2)
    pb = write_sharded(tmp_path / "b", b, shards=3)
    out = tmp_path / "merged"
    report = merge([pa, pb / "model.safetensors.index.json"], out, alpha=0.25, shard_size=600, max_memory=300)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert shards == sorted(p.name for p in out.glob("*.safetensors"))
    assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    # the report lists every file the plan wrote (shards, then the index) and their bytes
    assert [Path(f).name for f in report.files] == [*shards, "model.safetensors.index.json", "README.md"]
    assert report.bytes_written == sum(Path(f).stat().st_size for f in report.files)
    assert_same(load_any(out), reference_merge([a, b], [0.75, 0.25]))


def test_folder_output_with_one_shard_is_model_safetensors(tmp_path: Path, save) -> None:
    a, b = random_tensors(12, torch.float16), random_tensors(13, torch.float16)
    out = tmp_path / "merged"
    merge([save("a.safetensors", a), save("b.safetensors", b)], out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]
    assert_same(load_any(out), reference_merge([a, b], [0.5, 0.5]))


def test_non_float_tensors_copied_when_inputs_agree(tmp_path: Path, save) -> None:
    ids = torch.arange(10, dtype=torch.int64)
    mask = torch.tensor([True, False, True])
    a = {"w": torch.ones(3), "ids": ids, "mask": mask, "u8": torch.arange(5, dtype=torch.uint8)}
    b = {
        "w": torch.zeros(3),
        "ids": ids.clone(),
        "mask": mask.clone(),
        "u8": torch.arange(5, dtype=torch.uint8),
    }
    out = tmp_path / "out.safetensors"
    merge([save("a.safetensors", a), save("b.safetensors", b)], out, alpha=0.5)
    got = load_any(out)
    assert torch.equal(got["ids"], ids) and torch.equal(got["mask"], mask)
    assert torch.equal(got["w"], torch.full((3,), 0.5))


def test_output_readable_by_safe_open_with_metadata(tmp_path: Path, save) -> None:
    a, b = random_tensors(14, torch.bfloat16), random_tensors(15, torch.bfloat16)
    out = tmp_path / "out.safetensors"
    merge([save("a.safetensors", a), save("b.safetensors", b)], out, alpha=0.3)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == "pt"
        assert meta["lazymerge_method"] == "linear"
        assert meta["lazymerge_weights"] == "0.7,0.3"
        assert meta["lazymerge_inputs"] == "a.safetensors,b.safetensors"
        assert "lazymerge_version" in meta
        assert sorted(f.keys()) == sorted(a)
        assert torch.equal(
            f.get_tensor("long.vector"),
            (0.7 * a["long.vector"].float() + 0.3 * b["long.vector"].float()).bfloat16(),
        )
    header_len = int.from_bytes(out.read_bytes()[:8], "little")
    assert header_len % 8 == 0
    assert oct(out.stat().st_mode & 0o777) == "0o644"


def test_layout_orders_by_dtype_size_then_name(tmp_path: Path, save) -> None:
    a = {
        "z16": torch.ones(2, dtype=torch.float16),
        "a16": torch.ones(2, dtype=torch.float16),
        "m32": torch.ones(2),
        "b8": torch.ones(2, dtype=torch.uint8),
        "d64": torch.ones(2, dtype=torch.float64),
    }
    out = tmp_path / "out.safetensors"
    merge([save("a.safetensors", a), save("b.safetensors", a)], out)
    header = json.loads(out.read_bytes()[8 : 8 + int.from_bytes(out.read_bytes()[:8], "little")])
    names = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    assert [n for _, n in names] == ["d64", "m32", "a16", "z16", "b8"]


@pytest.mark.parametrize("block", [1, 5, 64])
def test_compute_blocks_do_not_change_result(tmp_path: Path, save, block: int) -> None:
    a, b, c = (
        random_tensors(21, torch.bfloat16),
        random_tensors(22, torch.float16),
        random_tensors(23, torch.float32),
    )
    out = tmp_path / "out.safetensors"
    merge(
        [save("a.safetensors", a), save("b.safetensors", b), save("c.safetensors", c)],
        out,
        weights=[0.2, 0.5, 0.3],
        max_memory=3000,
        block_elems=block,
    )
    assert_same(load_any(out), reference_merge([a, b, c], [0.2, 0.5, 0.3]))


def test_output_modes_ignore_umask(tmp_path: Path, save) -> None:
    import os

    a, b = random_tensors(30, torch.float32), random_tensors(31, torch.float32)
    pa, pb = save("a.safetensors", a), save("b.safetensors", b)
    old = os.umask(0o077)
    try:
        merge([pa, pb], tmp_path / "one.safetensors")
        merge([pa, pb], tmp_path / "folder", shard_size=2000)
    finally:
        os.umask(old)
    assert (tmp_path / "one.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (tmp_path / "folder").iterdir())
