"""A fake Hugging Face cache in tmp_path, laid out as `hf download` lays it out."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save

C1 = "1" * 40


C2 = "2" * 40


def cache_model(
    cache: Path,
    repo_id: str,
    files: dict[str, bytes],
    commit: str,
    refs: tuple[str, ...] = (),
    kind: str = "models",
) -> Path:
    """One snapshot of `repo_id` in a Hugging Face cache: blobs named by content hash, the
    snapshot's files as relative symlinks to them, `refs/NAME` holding the commit. `kind` is
    the cache's folder prefix: `models`, or `datasets` for a dataset."""
    repo = cache / f"{kind}--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g), "ids": torch.arange(5)}


def model_files(seed: int, readme: str | None = None) -> dict[str, bytes]:
    files = {
        "model.safetensors": save(weights(seed)),
        "config.json": json.dumps({"model_type": "toy", "hidden_size": 4}).encode(),
    }
    if readme is not None:
        files["README.md"] = readme.encode()
    return files
