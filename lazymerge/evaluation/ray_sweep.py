"""Sweeps spread over a Ray cluster: one Ray task per point.

`ray_executor(address, gpus, cpus)` is an executor for `sweep.run_sweep`: the driver does
everything a local sweep does (plan, fingerprint, results file, texts formatted and tokenized
once, report), ships the prepared texts to the cluster once through Ray's object store, and
runs `sweep.score_point` for each point as a task asking for `gpus` GPUs and `cpus` CPUs. Each
finished point is appended to `OUT/results.jsonl` as it arrives, so a sweep can be resumed
locally or on Ray. A task whose worker dies is retried by Ray (at most twice); a point that
still fails is reported and makes the run fail, never silently missing. Ctrl-C cancels the
running tasks and keeps the finished points.

Before any scoring, every node checks that it sees the inputs and data files with the
identity the driver sees (`provenance.InputIdentity.portable`: headers, companion files and
weights files' sizes, not whole weights); a node that does
not stops the sweep before it starts.

Nothing of Ray is imported unless this module's executor runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lazymerge.errors import InputError, LazyMergeError
from lazymerge.evaluation.sweep import (
    Executor,
    PreparedTexts,
    SweepPoint,
    SweepSpec,
    _input_paths,
    _sha256_file,
    score_point,
)
from lazymerge.progress import format_duration
from lazymerge.provenance import identify_input

MAX_RETRIES = 2


def file_fingerprints(spec: SweepSpec) -> dict[str, Any]:
    """Each model input's identity as any machine holding the same files sees it (tensors,
    companion files, weights files' sizes and recorded hashes: `InputIdentity.portable`) and each
    data file's SHA-256, as this machine sees them (None for a file it cannot read)."""
    out: dict[str, Any] = {}
    for path in _input_paths(spec):
        try:
            out[str(path)] = identify_input(Path(path)).portable()
        except (OSError, LazyMergeError):
            out[str(path)] = None
    for path in [*(e.path for e in spec.pair_evals), *(b.path for b in spec.bon_evals)]:
        try:
            out[str(path)] = _sha256_file(Path(path))
        except (OSError, LazyMergeError):
            out[str(path)] = None
    return out


def score_task(spec: SweepSpec, texts: PreparedTexts, point: SweepPoint) -> tuple[dict[str, Any], str]:
    """What each Ray task runs: one point's record, and the node that scored it."""
    import ray

    node: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    return score_point(spec, texts, point), node


#: What a task runs, and what each node runs to show the driver what it sees.
Task = Callable[[SweepSpec, PreparedTexts, SweepPoint], tuple[dict[str, Any], str]]
Probe = Callable[[SweepSpec], dict[str, Any]]


def ray_executor(
    address: str = "auto",
    gpus: float | None = None,
    cpus: float = 1.0,
    *,
    task: Task = score_task,
    probe: Probe = file_fingerprints,
) -> Executor:
    """An executor for `sweep.run_sweep` running each point as a task on the Ray cluster at
    `address` ("auto": the cluster this machine belongs to).

    Args:
        task: what each point's task runs (`score_task`); tests pass one that fails on purpose.
        probe: what each node runs for the driver's check that it sees the same files
            (`file_fingerprints`); tests pass one that hides a file.
    """

    def execute(
        spec: SweepSpec,
        texts: PreparedTexts,
        todo: list[SweepPoint],
        finished: Callable[[dict[str, Any]], None],
        echo: Callable[[str], None],
    ) -> None:
        from lazymerge._optional import require

        ray = require("ray", extra="cluster")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        want_gpus = gpus if gpus is not None else (1.0 if spec.load.device.startswith("cuda") else 0.0)
        probe_address(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(
                f"--ray {address}: cannot connect to a Ray cluster ({first}); start one with "
                "`ray start --head` (see docs/evaluation.md)"
            ) from None
        try:
            _check_nodes(ray, NodeAffinitySchedulingStrategy, spec, probe)
            _run_points(ray, task, spec, texts, todo, finished, echo, want_gpus, cpus)
        finally:
            ray.shutdown()

    return execute


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when no Ray cluster answers at `address` (Ray itself keeps trying
    to connect for minutes). "auto" means RAY_ADDRESS, else the cluster `ray start` recorded on
    this machine."""
    import socket
    import tempfile

    target = address
    if address == "auto":
        target = os.environ.get("RAY_ADDRESS", "")
        recorded = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if not target and recorded.is_file():
            target = recorded.read_text().strip()
        if not target:
            raise InputError(
                "--ray auto: no Ray cluster is running on this machine; start one with `ray start --head` "
                "or give --ray HOST:PORT"
            )
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(
            f"--ray {address}: give HOST:PORT of the cluster's head (as `ray start --head` prints)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise InputError(
            f"--ray {address}: no Ray cluster answers at {host}:{port} ({exc.strerror or exc}); start one with "
            "`ray start --head` (see docs/evaluation.md)"
        ) from None


def _check_nodes(ray: Any, affinity: Any, spec: SweepSpec, probe_fn: Probe) -> None:
    """Every alive node must see every input and data file as the driver does."""
    here = file_fingerprints(spec)
    probe = ray.remote(num_cpus=0)(probe_fn)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {
        n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": probe.options(
            scheduling_strategy=affinity(node_id=n["NodeID"], soft=False)
        ).remote(spec)
        for n in nodes
    }
    for node, ref in refs.items():
        seen = ray.get(ref)
        for path, digest in here.items():
            if seen.get(path) != digest:
                what = "cannot read" if seen.get(path) is None else "sees a different"
                raise InputError(
                    f"node {node} {what} {path}; every worker must see the inputs and data at the same "
                    "path (shared filesystem or identical copies)"
                )


def _slots(resources: dict[str, float], gpus: float, cpus: float) -> int:
    """How many points the cluster runs at once with these requests (at least 1)."""
    limits = []
    if gpus > 0:
        limits.append(resources.get("GPU", 0.0) / gpus)
    if cpus > 0:
        limits.append(resources.get("CPU", 0.0) / cpus)
    return max(1, int(min(limits))) if limits else 1


def _failure(exc: Exception) -> tuple[str, str]:
    """A failed task's message and kind: lazymerge's own error whole (it names the file, line and
    point), anything else as the last line of Ray's report, cut to 300 characters."""
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the worker's exception
    if isinstance(cause, LazyMergeError):
        return str(cause), type(cause).__name__
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300], type(exc).__name__


def _run_points(
    ray: Any,
    task_fn: Task,
    spec: SweepSpec,
    texts: PreparedTexts,
    todo: list[SweepPoint],
    finished: Callable[[dict[str, Any]], None],
    echo: Callable[[str], None],
    gpus: float,
    cpus: float,
) -> None:
    task = ray.remote(task_fn).options(num_gpus=gpus, num_cpus=cpus, max_retries=MAX_RETRIES)
    spec_ref, texts_ref = ray.put(spec), ray.put(texts)  # shipped once, shared by every task
    pending = {task.remote(spec_ref, texts_ref, p): p for p in todo}
    slots = _slots(ray.cluster_resources(), gpus, cpus)
    nodes = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})
    echo(
        f"  on Ray: {len(todo)} points as tasks ({gpus:g} GPU, {cpus:g} CPU each) on {len(nodes)} node(s) "
        f"({', '.join(nodes)}), {slots} at a time, each retried up to {MAX_RETRIES} times"
    )
    failed: list[str] = []
    started, done = time.monotonic(), 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            point = pending.pop(ready[0])
            try:
                record, node = ray.get(ready[0])
            except Exception as exc:  # the task failed after its retries: reported, not lost
                first, kind = _failure(exc)
                failed.append(f"{point.label} ({kind}: {first})")
                echo(f"  {point.label}: FAILED after {MAX_RETRIES} retries: {first}")
                continue
            finished(record)
            done += 1
            eta = (time.monotonic() - started) / done * len(pending)  # at the throughput so far
            running = min(len(pending), slots)
            echo(
                f"[done {done}, running {running}, pending {len(pending) - running}, failed {len(failed)}] "
                f"{point.label} on {node}: build {record['build_s']:.1f} s, score {record['score_s']:.1f} s; "
                f"ETA {format_duration(eta)}"
            )
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    if failed:
        raise LazyMergeError(
            f"{len(failed)} point(s) failed on Ray: {'; '.join(failed[:3])}; the finished points are in "
            f"{spec.out / 'results.jsonl'}: rerun to retry the others"
        )
