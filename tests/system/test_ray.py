"""Sweeps on a real local Ray instance: the same results as a local sweep, retries, resumes both
ways, and inputs a worker cannot see refused before scoring."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lazymerge.evaluation.sweep import read_results
from tests.helpers.evaluation import data, models
from tests.helpers.models import assert_carries_signal

pytest.importorskip("ray")
pytest.importorskip("matplotlib")
pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray head with 2 CPUs on the loopback address, in its own process group and its
    own temp folder; the fixture stops exactly those processes."""
    temp = tempfile.mkdtemp(prefix="lmray", dir="/tmp")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        probe = subprocess.run(["ray", "status", f"--address={address}"], capture_output=True, env=env)
        if probe.returncode == 0:
            break
        time.sleep(0.5)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("the local Ray instance did not start")
    yield {"address": address, "env": env}
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # workers run in sessions of their own: stop those of this instance (named by its temp folder)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if temp.encode() in cmdline:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    time.sleep(1)
    shutil.rmtree(temp, ignore_errors=True)


FAULTS = Path(__file__).resolve().parents[1] / "helpers" / "ray_faults.py"


def sweep(
    args: list[str], env: dict[str, str], fault: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`lazymerge sweep ARGS`; with `fault`, through tests/helpers/ray_faults.py, which hands the
    Ray executor a task or node probe that fails on purpose."""
    command = [str(FAULTS), *fault, "--"] if fault else ["-m", "lazymerge", "sweep"]
    return subprocess.run(
        [sys.executable, *command, *args], capture_output=True, text=True, env=env, timeout=600
    )


def points(out: Path) -> list[dict]:
    return [
        {k: v for k, v in p.items() if k != "timing"}
        for p in json.loads((out / "results.json").read_text())["points"]
    ]


def test_ray_sweep_equals_local_and_retries_a_crashed_worker(tmp_path: Path, ray_cluster) -> None:
    rm, sft = models(tmp_path)
    files = data(tmp_path)
    base = [
        str(rm),
        str(sft),
        "--pairs",
        str(files["test"]),
        "--candidates",
        str(files["cands"]),
        "--n",
        "2,4",
        "--alpha",
        "0,0.25,0.5,1",
    ]
    local = tmp_path / "local"
    assert sweep([*base, "-o", str(local), "-q"], ray_cluster["env"]).returncode == 0
    on_ray = tmp_path / "ray"
    marker = tmp_path / "crashed"
    proc = sweep(
        [*base, "-o", str(on_ray), "--ray", ray_cluster["address"]],
        ray_cluster["env"],
        ["crash-once", "alpha=0.5", str(marker)],
    )
    assert proc.returncode == 0, proc.stderr
    assert marker.exists(), proc.stderr  # a worker died in the middle of alpha=0.5, and Ray ran it again
    assert re.search(r"alpha=0\.5 on \d+\.\d+\.\d+\.\d+", proc.stderr)  # the node that ran it
    labels = [json.loads(line)["label"] for line in (on_ray / "results.jsonl").read_text().splitlines()[1:]]
    assert sorted(labels) == sorted(["alpha=0", "alpha=0.25", "alpha=0.5", "alpha=1"])  # each exactly once
    _, records, _ = read_results(local / "results.jsonl")
    rows = [json.loads(line) for line in files["test"].read_text().splitlines()]
    chosen = records["alpha=0.5"]["pairs"]["test"]["chosen"]
    assert_carries_signal(rm, [f"{r['prompt']} {r['chosen']}" for r in rows], chosen)
    assert points(on_ray) == points(local)


def test_interrupted_on_ray_resumes_locally_and_back(tmp_path: Path, ray_cluster) -> None:
    rm, sft = models(tmp_path)
    files = data(tmp_path)
    base = [str(rm), str(sft), "--pairs", str(files["test"]), "-o", str(tmp_path / "s")]
    ray = ["--ray", ray_cluster["address"]]
    env = ray_cluster["env"]
    assert sweep([*base, "--alpha", "0,0.5", *ray, "-q"], env).returncode == 0
    proc = sweep([*base, "--alpha", "0,0.5,1"], env)  # locally: only the new point
    assert proc.returncode == 0 and "1 point(s) scored, 2 already done" in proc.stdout
    proc = sweep([*base, "--alpha", "0,0.5,1,0.75", *ray], env)  # on Ray again: only the new point
    assert proc.returncode == 0 and "1 point(s) scored, 3 already done" in proc.stdout, proc.stderr
    assert re.search(r"alpha=0\.75 on \d+\.\d+\.\d+\.\d+", proc.stderr)
    _, done, _ = read_results(tmp_path / "s" / "results.jsonl")
    assert sorted(done) == ["alpha=0", "alpha=0.5", "alpha=0.75", "alpha=1"]


def test_inputs_a_worker_cannot_see_are_refused_before_scoring(tmp_path: Path, ray_cluster) -> None:
    rm, sft = models(tmp_path)
    files = data(tmp_path)
    out = tmp_path / "s"
    proc = sweep(
        [
            str(rm),
            str(sft),
            "--pairs",
            str(files["test"]),
            "--alpha",
            "0,1",
            "-o",
            str(out),
            "--ray",
            ray_cluster["address"],
        ],
        ray_cluster["env"],
        ["hide", str(files["test"])],
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert (
        len(lines) == 1
        and lines[0].startswith("Error: node ")
        and "cannot read" in lines[0]
        and str(files["test"]) in lines[0]
    )
    _, done, _ = read_results(out / "results.jsonl")
    assert done == {}


def test_relative_paths_reach_the_workers_and_resume_from_another_folder(tmp_path: Path, ray_cluster) -> None:
    """Inputs, data and output named relative to the working folder: a Ray worker runs in its own
    folder, so the sweep must hand it absolute paths; resumed from another working folder with
    the same files named absolutely, the points are the same sweep's (not rescored)."""
    rm, sft = models(tmp_path)
    data(tmp_path)
    env = ray_cluster["env"]
    relative = ["rm", "sft0", "--pairs", "test.jsonl", "--alpha", "0,1", "-o", "s"]
    proc = subprocess.run(
        [sys.executable, "-m", "lazymerge", "sweep", *relative, "--ray", ray_cluster["address"]],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"alpha=1 on \d+\.\d+\.\d+\.\d+", proc.stderr)
    header, done, _ = read_results(tmp_path / "s" / "results.jsonl")
    assert sorted(done) == ["alpha=0", "alpha=1"]
    assert header is not None and header["fingerprint"]["inputs"] == [str(rm), str(sft)]  # absolute
    absolute = [
        str(rm),
        str(sft),
        "--pairs",
        str(tmp_path / "test.jsonl"),
        "--alpha",
        "0,1",
        "-o",
        str(tmp_path / "s"),
    ]
    proc = sweep(absolute, env)
    assert proc.returncode == 0 and "0 point(s) scored, 2 already done" in proc.stdout, proc.stderr


def test_non_finite_reward_on_a_worker_is_reported_with_its_source(tmp_path: Path, ray_cluster) -> None:
    """A worker's NaN reward fails its point with the data file, line and point named; the sweep
    exits 1 in one line and records no point."""
    from tests.helpers.evaluation import poisoned

    rm = poisoned(tmp_path, "nan-head")
    _, sft = models(tmp_path / "m")
    files = data(tmp_path)
    out = tmp_path / "s"
    proc = sweep(
        [
            str(rm),
            str(sft),
            "--pairs",
            str(files["test"]),
            "--alpha",
            "0",
            "-o",
            str(out),
            "--ray",
            ray_cluster["address"],
        ],
        ray_cluster["env"],
    )
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "1 point(s) failed on Ray: alpha=0" in errors[0], proc.stderr
    # every text is poisoned; the one named is the first the scorer finished, with its own line and id
    named = re.search(
        re.escape(str(files["test"])) + r':(\d+) \(id "p(\d+)", chosen\) at sweep point alpha=0;', errors[0]
    )
    assert named and int(named[1]) == int(named[2]) + 1, errors[0]
    assert "NonFiniteRewardError: " in errors[0] and "lazymerge verify --finite" in errors[0], errors[0]
    _, done, _ = read_results(out / "results.jsonl")
    assert done == {}


def test_without_ray_nothing_of_ray_is_imported() -> None:
    code = "import sys, lazymerge.cli, lazymerge.evaluation.sweep; print('ray' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


def test_no_cluster_is_one_line_not_a_hang(tmp_path: Path) -> None:
    from lazymerge.errors import InputError
    from lazymerge.evaluation.ray_sweep import probe_address

    with pytest.raises(InputError, match="no Ray cluster answers at 127.0.0.1"):
        probe_address(f"127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(InputError, match="HOST:PORT"):
        probe_address("not-an-address")
