"""Run `lazymerge sweep --ray` with a fault injected through the Ray executor.

    python tests/helpers/ray_faults.py crash-once LABEL MARKER -- SWEEP_ARGS...
    python tests/helpers/ray_faults.py hide PATH -- SWEEP_ARGS...

crash-once: the worker scoring point LABEL dies (os._exit) unless MARKER exists, creating it
first, so Ray's retry runs the point again. hide: every node reports PATH as unreadable in the
driver's check of what the nodes see. The faults are functions handed to `ray_executor` (its
`task` and `probe`); run as a script, they are pickled by value, so the workers need nothing of
this file. Nothing in lazymerge reads an environment variable for them.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any


def crash_once(label: str, marker: str) -> Any:
    from lazymerge.evaluation.ray_sweep import score_task

    def task(spec: Any, texts: Any, point: Any) -> Any:
        if point.label == label and not Path(marker).exists():
            Path(marker).write_text("crashed once")
            os._exit(1)  # the worker dies mid-point: Ray retries the task
        return score_task(spec, texts, point)

    return {"task": task}


def hide(path: str) -> Any:
    from lazymerge.evaluation.ray_sweep import file_fingerprints

    def probe(spec: Any) -> Any:
        seen = file_fingerprints(spec)
        seen[path] = None
        return seen

    return {"probe": probe}


def main(argv: list[str]) -> None:
    split = argv.index("--")
    fault, *params = argv[:split]
    faults = {"crash-once": crash_once, "hide": hide}
    if fault not in faults:
        raise SystemExit(f"unknown fault {fault!r}; one of {sorted(faults)}")
    from lazymerge.cli import main as cli
    from lazymerge.evaluation import ray_sweep

    ray_sweep.ray_executor = functools.partial(ray_sweep.ray_executor, **faults[fault](*params))  # type: ignore[assignment]
    cli(["sweep", *argv[split + 1 :]], prog_name="lazymerge")


if __name__ == "__main__":
    main(sys.argv[1:])
