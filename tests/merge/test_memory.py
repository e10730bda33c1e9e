"""Resource bounds: resident memory stays within --max-memory whatever the input size: anonymous
memory grows by the budget at most, and shared or file-backed memory does not grow (no input is
mapped, no buffer is shared memory)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs Linux /proc for RssAnon"
)

BUDGET = 8 * 2**20
SLACK = 24 * 2**20  # allocator and interpreter noise, independent of the input size

CHILD = textwrap.dedent(
    """
    import json, sys, threading
    import lazymerge

    def rss():
        kinds = {"RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}
        out = {}
        for line in open("/proc/self/status"):
            key = line.split()[0]
            if key in kinds:
                out[kinds[key]] = int(line.split()[1]) * 1024
        return out

    a, b, small_a, small_b, out, budget, direct = sys.argv[1:8]
    direct = direct == "1"
    # warm-up: thread pools, allocator arenas and lazy imports settle before the measurement
    lazymerge.merge([small_a, small_b], out + ".warm.safetensors", max_memory=int(budget), direct_io=direct)
    base = rss()
    peak = dict(base)
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            for k, v in rss().items():
                peak[k] = max(peak[k], v)
            stop.wait(0.001)
    t = threading.Thread(target=sample); t.start()
    report = lazymerge.merge([a, b], out, alpha=0.5, max_memory=int(budget), direct_io=direct)
    stop.set(); t.join()
    for k, v in rss().items():
        peak[k] = max(peak[k], v)
    print(json.dumps({"base": base, "peak": peak, "report_anon": report.peak_rss_anon,
                      "bytes_read": report.bytes_read}))
    """
)


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
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            *map(str, paths),
            str(tmp_path / "small0.safetensors"),
            str(tmp_path / "small1.safetensors"),
            str(tmp_path / "out.safetensors"),
            str(BUDGET),
            "1" if direct else "0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    stats = json.loads(result.stdout)
    growth = {k: stats["peak"][k] - stats["base"][k] for k in stats["base"]}
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
