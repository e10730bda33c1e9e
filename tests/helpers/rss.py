"""Resident memory of one merge, measured in a fresh interpreter: the peak growth of anonymous,
file-backed and shared memory (/proc/self/status, sampled every millisecond) over a warm-up
merge of small inputs, which settles thread pools, allocator arenas and lazy imports first."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

#: Allocator and interpreter noise, independent of the input size.
SLACK = 24 * 2**20

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

    job = json.loads(sys.argv[1])
    lazymerge.merge(job["warm"], job["output"] + ".warm.safetensors", **job["warm_kwargs"])
    base = rss()
    peak = dict(base)
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            for k, v in rss().items():
                peak[k] = max(peak[k], v)
            stop.wait(0.001)
    t = threading.Thread(target=sample); t.start()
    report = lazymerge.merge(job["inputs"], job["output"], **job["kwargs"])
    stop.set(); t.join()
    for k, v in rss().items():
        peak[k] = max(peak[k], v)
    print(json.dumps({"base": base, "peak": peak, "report_anon": report.peak_rss_anon,
                      "bytes_read": report.bytes_read}))
    """
)


def merge_rss(
    inputs: list[Path],
    warm: list[Path],
    output: Path,
    kwargs: dict[str, Any],
    warm_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge `inputs` into `output` with `kwargs` (JSON values) in a child interpreter, after a
    warm-up merge of `warm` (with `warm_kwargs`, default `kwargs`); returns the child's figures
    and `growth`: the peak minus the warm-up's resident bytes, per kind (anon, file, shmem)."""
    job = {
        "inputs": [str(p) for p in inputs],
        "warm": [str(p) for p in warm],
        "output": str(output),
        "kwargs": kwargs,
        "warm_kwargs": kwargs if warm_kwargs is None else warm_kwargs,
    }
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True, check=True
    )
    stats: dict[str, Any] = json.loads(result.stdout)
    stats["growth"] = {k: stats["peak"][k] - stats["base"][k] for k in stats["base"]}
    return stats
