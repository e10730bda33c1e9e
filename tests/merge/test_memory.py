"""Resource bounds: resident memory stays within --max-memory whatever the input size: anonymous
memory grows by the budget at most, and shared or file-backed memory does not grow (no input is
mapped, no buffer is shared memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.rss import SLACK, merge_rss

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs Linux /proc for RssAnon"
)

BUDGET = 8 * 2**20


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "buffered-io"])
def test_rss_growth_bounded_by_budget(tmp_path: Path, direct: bool) -> None:
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        # 4 x 16 MiB fp32 tensors: each input is 8x the budget, one tensor alone is 2x the budget
        tensors = {f"layer.{k}.weight": torch.randn(2048, 2048, generator=g) for k in range(4)}
        paths.append(tmp_path / f"in{i}.safetensors")
        save_file(tensors, str(paths[-1]))
        del tensors
    for i in range(2):
        save_file(
            {f"layer.{k}.weight": torch.randn(64, 64, generator=g) for k in range(4)},
            str(tmp_path / f"small{i}.safetensors"),
        )
    input_bytes = sum(p.stat().st_size for p in paths)
    assert input_bytes > 8 * BUDGET
    options = {"max_memory": BUDGET, "direct_io": direct}
    small = [tmp_path / "small0.safetensors", tmp_path / "small1.safetensors"]
    stats = merge_rss(paths, small, tmp_path / "out.safetensors", {**options, "alpha": 0.5}, options)
    growth = stats["growth"]
    assert growth["anon"] <= BUDGET + SLACK, (
        f"anonymous RSS grew by {growth['anon'] / 2**20:.1f} MiB for a {BUDGET / 2**20:.0f} MiB budget"
    )
    # no input mapped, no buffer in shared memory: neither grows with the merge (4 MiB: pages of
    # libraries first touched by the larger merge)
    assert growth["file"] + growth["shmem"] <= 4 * 2**20, growth
    assert stats["bytes_read"] == sum(
        4 * 2048 * 2048 * 4 for _ in paths
    )  # every tensor byte read exactly once
    assert stats["bytes_read"] <= input_bytes
