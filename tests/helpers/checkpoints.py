"""Checkpoints written and read with safetensors' own writer and reader, and an in-memory
reference merge: the references the merge tests compare against."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int) -> Path:
    """Write `tensors` as a Hugging Face-style sharded checkpoint with safetensors' own writer."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / filename))
        weight_map.update(dict.fromkeys(part, filename))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


def load_any(path: Path) -> dict[str, torch.Tensor]:
    """Load a single file, or every shard named by a folder's index, with safetensors' reader."""
    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    index = path / "model.safetensors.index.json"
    if index.exists():
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(path / shard)))
        return out
    return load_file(str(path / "model.safetensors"))


def reference_merge(
    inputs: list[dict[str, torch.Tensor]], weights: list[float], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """An in-memory merge: sum of w_i * fp32(t_i), cast to the first input's dtype."""
    out = {}
    for name, first in inputs[0].items():
        if first.is_floating_point():
            acc = sum(w * t[name].float() for w, t in zip(weights, inputs, strict=True))
            out[name] = acc.to(dtype or first.dtype)
        else:
            out[name] = first.clone()
    return out
