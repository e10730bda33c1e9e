from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import settings
from safetensors.torch import save_file

# Property tests draw the same examples on every run (a red run is reproducible, never luck);
# `--hypothesis-profile default` searches afresh, as a developer's run may.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile("ci")


@pytest.fixture
def save(tmp_path: Path):
    def _save(name: str, tensors: dict[str, torch.Tensor]) -> Path:
        path = tmp_path / name
        save_file(tensors, str(path))
        return path

    return _save
