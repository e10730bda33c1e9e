"""PyTorch .bin checkpoints: read like torch.load(weights_only=True), and no pickled code runs."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from lazymerge import Checkpoint, merge
from lazymerge.errors import BinTensorError, InputError
from lazymerge.io.torch_bin import UnsafePickleError
from tests.helpers.checkpoints import load_any, reference_merge


def read_all(ckpt: Checkpoint) -> dict[str, bytes]:
    out = {}
    for name, info in ckpt.items():
        buf = bytearray(info.nbytes)
        ckpt.read_into(info, 0, memoryview(buf))
        out[name] = bytes(buf)
    return out


def test_bin_reads_like_torch_load(tmp_path: Path) -> None:
    state = {
        "f32": torch.randn(5, 3),
        "bf16": torch.randn(7).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(4),
        "scalar": torch.tensor(3.5),
        "view": torch.randn(10, 4)[2:5],  # a view into a larger storage
    }
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    ref = torch.load(path, weights_only=True)
    with Checkpoint.open(path) as ckpt:
        assert sorted(ckpt) == sorted(ref)
        raw = read_all(ckpt)
        for name, tensor in ref.items():
            assert ckpt[name].shape == tuple(tensor.shape)
            assert raw[name] == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name


def test_sharded_bin_folder_merges(tmp_path: Path) -> None:
    a = {"x": torch.randn(6, 4), "y": torch.randn(3)}
    b = {"x": torch.randn(6, 4), "y": torch.randn(3)}
    for name, state in (("a", a), ("b", b)):
        folder = tmp_path / name
        folder.mkdir()
        torch.save({"x": state["x"]}, folder / "pytorch_model-00001-of-00002.bin")
        torch.save({"y": state["y"]}, folder / "pytorch_model-00002-of-00002.bin")
        index = {
            "weight_map": {"x": "pytorch_model-00001-of-00002.bin", "y": "pytorch_model-00002-of-00002.bin"}
        }
        (folder / "pytorch_model.bin.index.json").write_text(__import__("json").dumps(index))
    merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out.safetensors", alpha=0.3)
    got, want = load_any(tmp_path / "out.safetensors"), reference_merge([a, b], [0.7, 0.3])
    assert all(torch.equal(got[k], want[k]) for k in want)


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["reduce", "eval"])
def test_malicious_pickle_refused_without_running(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    if payload == "reduce":
        data = pickle.dumps({"w": RunsCode(marker)}, protocol=2)
    else:
        data = b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode() + b"')\ntR."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/version", "3\n")
    with pytest.raises(UnsafePickleError, match="refusing to load it"):
        Checkpoint.open(path)
    assert not marker.exists()


def test_legacy_bin_gets_conversion_hint(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="legacy .*Convert it"):
        Checkpoint.open(path)


def test_tied_weights_and_views_read_and_merge_exactly(tmp_path: Path) -> None:
    """Tensors sharing one storage (tied embeddings as torch.save stores them, views into it) are
    each read from their own byte range, overlapping or not, as torch.load gives them."""
    states = []
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        embed = torch.nn.Embedding(10, 4)
        head = torch.nn.Linear(4, 10, bias=False)
        head.weight = embed.weight  # tied, as tie_word_embeddings does
        state = torch.nn.ModuleDict({"embed": embed, "head": head}).state_dict()
        state["row"] = state["embed.weight"][3]  # a view at a storage offset
        state["rows"] = state["embed.weight"][2:6]  # overlaps "row"
        torch.save(state, tmp_path / f"{name}.bin")
        states.append({k: v.clone() for k, v in state.items()})
    path = tmp_path / "a.bin"
    ref = torch.load(path, weights_only=True)
    with Checkpoint.open(path) as ckpt:
        assert ckpt["embed.weight"].offset == ckpt["head.weight"].offset  # one storage, read twice
        assert ckpt["row"].offset == ckpt["embed.weight"].offset + 3 * 4 * 4
        raw = read_all(ckpt)
    for name, tensor in ref.items():
        assert raw[name] == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name
    merge([tmp_path / "a.bin", tmp_path / "b.bin"], tmp_path / "out.safetensors", alpha=0.3)
    got, want = load_any(tmp_path / "out.safetensors"), reference_merge(states, [0.7, 0.3])
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_non_contiguous_tensor_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(3, 5).t()}, path)
    with pytest.raises(BinTensorError, match=r"'w': strides \[1, 5\] for shape \[5, 3\] are not contiguous"):
        Checkpoint.open(path)
