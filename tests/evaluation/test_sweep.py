"""Lazy sweeps: points scored in memory equal written checkpoints; resumable after SIGKILL;
changed settings refused; report, plots and JSON agree."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lazymerge import merge
from lazymerge.evaluation.run import evaluate_bon, evaluate_pairs
from lazymerge.evaluation.sweep import build_spec, read_results, run_sweep
from tests.helpers.evaluation import data, models
from tests.helpers.models import assert_carries_signal, scored_texts
from tests.helpers.pause_at import finish, start_paused

pytest.importorskip("matplotlib")


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def test_sweep_points_equal_written_checkpoints_and_report_agrees(tmp_path: Path) -> None:
    rm, sft = models(tmp_path)
    files = data(tmp_path)
    out = tmp_path / "sweep"
    spec = build_spec(
        [rm, sft],
        out,
        alpha="0.5,1",
        pair_files=[files["test"]],
        val_pairs=files["val"],
        candidate_files=[files["cands"]],
        ns=[2, 4],
    )
    run = run_sweep(spec)
    # the baseline (alpha 0) is scored once although not in the grid
    assert run.scored == ["alpha=0", "alpha=0.5", "alpha=1"]
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png",
        "best_of_n.png",
        "reliability.png",
        "report.md",
        "results.json",
        "results.jsonl",
    ]
    _, records, _ = read_results(out / "results.jsonl")
    for alpha in (0.5, 1.0):
        folder = tmp_path / f"merged-{alpha}"
        merge([rm, sft], folder, alpha=alpha)
        written = evaluate_pairs(folder, files["test"])
        assert_carries_signal(folder, *scored_texts(files["test"], written))
        record = records[f"alpha={alpha:g}"]
        # lazymerge run + lazymerge eval, to fp32 rounding: the sweep scores every file's texts
        # in one prefix tree, so a text's shared prefixes end where other files' texts branch
        exact = pytest.approx
        assert record["pairs"]["test"]["chosen"] == exact(
            [p["chosen_reward"] for p in written["pairs"]], rel=1e-5
        )
        assert record["pairs"]["test"]["rejected"] == exact(
            [p["rejected_reward"] for p in written["pairs"]], rel=1e-5
        )
        bon = evaluate_bon(folder, files["cands"], [2, 4])
        for got, want in zip(record["best_of_n"]["cands"]["rewards"], bon["rewards"], strict=True):
            assert got == exact(want["rewards"], rel=1e-5)
        point = next(p for p in run.report["points"] if p["label"] == f"alpha={alpha:g}")
        assert point["pairs"]["test"]["overall"]["accuracy"] == written["accuracy"]
        for n in ("2", "4"):
            assert point["best_of_n"]["cands"][n]["accuracy"] == bon["best_of_n"][n]["accuracy"]
    doc = json.loads((out / "results.json").read_text())
    assert doc["chosen"]["chosen_on"] == "validation pairs"
    report = (out / "report.md").read_text()
    for p in doc["points"]:
        acc = 100 * p["pairs"]["test"]["overall"]["accuracy"]
        assert f"| {p['label']}" in report and f"{acc:.1f} [" in report
    assert "DogeRM reports" in report and "McNemar" in report
    for png in ("accuracy.png", "best_of_n.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_domain_grid_equals_separate_merges(tmp_path: Path) -> None:
    rm, a, b = models(tmp_path, domains=2)
    files = data(tmp_path)
    out = tmp_path / "grid"
    spec = build_spec([rm, a, b], out, grid_step=0.5, pair_files=[files["test"]])
    run = run_sweep(spec)
    assert len(run.scored) == 6  # (0,0) (0,.5) (0,1) (.5,0) (.5,.5) (1,0)
    assert (out / "grid.png").exists()
    _, records, _ = read_results(out / "results.jsonl")
    folder = tmp_path / "merged"
    merge([rm, a, b], folder, weights=[0.0, 0.5, 0.5])
    written = evaluate_pairs(folder, files["test"])
    assert_carries_signal(folder, *scored_texts(files["test"], written))
    assert records["w=0.5,0.5"]["pairs"]["test"]["chosen"] == [p["chosen_reward"] for p in written["pairs"]]


def cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazymerge", *args], capture_output=True, text=True, **kw)


#: the sweep scores its points one by one through this function: parked at its N-th call, the
#: first N - 1 points are recorded (appended and fsynced) and no later one has started
SCORE_POINT = "lazymerge.evaluation.sweep:score_point"


def test_sweep_killed_then_rerun_scores_only_unfinished_points(tmp_path: Path) -> None:
    rm, sft = models(tmp_path)
    files = data(tmp_path)
    args = ["sweep", str(rm), str(sft), "--pairs", str(files["test"]), "--alpha", "0:1:0.1"]
    killed = tmp_path / "killed"
    proc = start_paused(SCORE_POINT, [*args, "-o", str(killed)], call=4)  # 3 points done
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    results = killed / "results.jsonl"
    _, before, _ = read_results(results)
    assert len(before) == 3
    rerun = cli(*args, "-o", str(killed))
    assert rerun.returncode == 0, rerun.stderr
    scored = re.findall(r"\] (alpha=[0-9.]+):", rerun.stderr)
    assert set(scored).isdisjoint(before) and len(scored) + len(before) == 11
    fresh = tmp_path / "fresh"
    assert cli(*args, "-o", str(fresh), "-q").returncode == 0
    a = json.loads((killed / "results.json").read_text())["points"]
    b = json.loads((fresh / "results.json").read_text())["points"]
    _, records, _ = read_results(fresh / "results.jsonl")
    rows = [json.loads(line) for line in files["test"].read_text().splitlines()]
    point = records["alpha=0.5"]["pairs"]["test"]
    assert_carries_signal(rm, [f"{r['prompt']} {r['chosen']}" for r in rows], point["chosen"])
    strip = lambda points: [{k: v for k, v in p.items() if k != "timing"} for p in points]  # noqa: E731
    assert strip(a) == strip(b)


def test_changed_settings_are_refused_and_restart_starts_over(tmp_path: Path) -> None:
    rm, sft = models(tmp_path)
    files = data(tmp_path)
    out = tmp_path / "s"
    args = ["sweep", str(rm), str(sft), "--pairs", str(files["test"]), "--alpha", "0,1", "-o", str(out), "-q"]
    assert cli(*args).returncode == 0
    again = cli(*args)
    assert again.returncode == 0  # same sweep: nothing to do
    proc = cli(*args, "--max-length", "7")
    assert proc.returncode == 2 and "scoring.max_length (2048 then, 7 now)" in proc.stderr
    with open(files["test"], "a") as fh:
        fh.write(
            json.dumps({"prompt": "w3", "chosen": "w4", "rejected": "w5", "subset": "x", "id": "new"}) + "\n"
        )
    proc = cli(*args)
    assert proc.returncode == 2 and "pairs" in proc.stderr
    assert cli(*args, "--restart").returncode == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["evaluations"]["pairs"][0]["pairs"] == 13


def test_sweep_option_mistakes_exit_2(tmp_path: Path) -> None:
    rm, sft = models(tmp_path)
    files = data(tmp_path)
    base = ["sweep", str(rm), str(sft), "-o", str(tmp_path / "x")]
    for extra, fragment in [
        ([], "something to score"),
        (["--pairs", str(files["test"]), "--alpha", "0.5", "--grid", "0.5"], "not --alpha and --grid"),
        (["--pairs", str(files["test"]), "--weights", "0.5"], "1 weights for 2 inputs"),
        (["--pairs", str(files["test"]), "--grid", "0.3"], "whole number of steps"),
        (["--pairs", str(files["test"]), "--alpha", "nan"], "finite"),
        (["--pairs", str(files["test"]), "--ray-cpus", "2"], "need --ray"),
        (["--pairs", str(files["test"]), "--ray", "--ray-gpus", "nan"], "not a finite number"),
        (["--pairs", str(files["test"]), "--ray-cpus", "1e999"], "--ray-cpus"),
    ]:
        proc = cli(*base, *extra)
        assert proc.returncode == 2 and fragment in proc.stderr, (extra, proc.stderr)
    assert not (tmp_path / "x").exists()


def test_ctrl_c_exits_130_and_keeps_finished_points(tmp_path: Path) -> None:
    rm, sft = models(tmp_path)
    files = data(tmp_path)
    out = tmp_path / "s"
    args = ["sweep", str(rm), str(sft), "--pairs", str(files["test"]), "--alpha", "0:1:0.1", "-o", str(out)]
    proc = start_paused(SCORE_POINT, args, call=3)  # 2 points recorded, the third not started
    proc.send_signal(signal.SIGINT)
    _, err = finish(proc)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    _, done, _ = read_results(out / "results.jsonl")
    assert len(done) == 2
    assert not [p.name for p in tmp_path.iterdir() if "lazymerge-" in p.name]


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant", [None, "4bit"])
def test_sweep_on_cuda_close_to_cpu_with_per_point_gpu_peaks(tmp_path: Path, quant: str | None) -> None:
    rm, sft = models(tmp_path)
    files = data(tmp_path)
    runs = {}
    for device in ("cpu", "cuda"):
        load = {"device": device, "dtype": "bfloat16", "quant": quant if device == "cuda" else None}
        spec = build_spec([rm, sft], tmp_path / device, alpha="0.5,1", pair_files=[files["test"]], load=load)
        run_sweep(spec)
        runs[device] = read_results(tmp_path / device / "results.jsonl")[1]
    peaks = [r["peak_gpu_memory"] for r in runs["cuda"].values()]
    assert all(r["peak_gpu_memory"] is None for r in runs["cpu"].values())
    # each point's own peak: a model left over from the last point would double the next one's
    assert all(p > 0 for p in peaks) and max(peaks) <= 1.5 * min(peaks), peaks
    rows = [json.loads(line) for line in files["test"].read_text().splitlines()]
    texts = [f"{r['prompt']} {r['chosen']}" for r in rows] + [f"{r['prompt']} {r['rejected']}" for r in rows]
    for label, cpu in runs["cpu"].items():
        want = cpu["pairs"]["test"]["chosen"] + cpu["pairs"]["test"]["rejected"]
        assert_carries_signal(rm, texts, want)
        got = (
            runs["cuda"][label]["pairs"]["test"]["chosen"] + runs["cuda"][label]["pairs"]["test"]["rejected"]
        )
        scale = max(abs(r) for r in want) + 1e-3
        assert all(abs(a - b) <= 0.25 * scale for a, b in zip(got, want, strict=True)), (label, got, want)
