"""Resident sweeps: the inputs read into memory once and one model rewritten per point give the
same rewards, bit for bit, as building every point from the files; the files are read once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lazymerge.errors import OptionError
from lazymerge.evaluation import in_memory, resident
from lazymerge.evaluation.sweep import build_spec, read_results, run_sweep
from lazymerge.io import reader
from lazymerge.io.reader import Checkpoint
from tests.helpers.evaluation import data, models

REWARD_KEYS = ("pairs", "best_of_n")


def sweep_records(tmp_path: Path, inputs: list[Path], mode: str, name: str, **kw) -> dict:
    files = data(tmp_path)
    spec = build_spec(
        inputs,
        tmp_path / name,
        pair_files=[files["test"]],
        candidate_files=[files["cands"]],
        ns=[2, 4],
        resident=mode,
        **kw,
    )
    lines: list[str] = []
    run_sweep(spec, echo=lines.append)
    _, records, _ = read_results(tmp_path / name / "results.jsonl")
    return {"records": records, "lines": lines}


def rewards_of(records: dict) -> dict:
    return {label: {k: r[k] for k in REWARD_KEYS} for label, r in records.items()}


@pytest.mark.parametrize(
    "kw",
    [
        {"alpha": "0.25,0.5,1"},
        {"alpha": "0.5,1", "method": "dare_linear", "density": 0.5, "seed": 3},
    ],
    ids=["linear", "dare"],
)
def test_resident_sweep_equals_streaming_bit_for_bit(tmp_path: Path, kw: dict) -> None:
    """Same records with the inputs resident and rebuilt from disk per point: every reward equal
    (floats compared exactly), with a vocabulary grown by [PAD] and reordered in the domain
    model (embeddings merged by token), and a random-drop method (positions, not call order)."""
    rm, sft, base = models(tmp_path, domains=2)
    if kw.get("method"):
        kw = {**kw, "base": base}  # task vectors: the second domain model stands in for a base
    streamed = sweep_records(tmp_path, [rm, sft], "off", "off", **kw)
    held = sweep_records(tmp_path, [rm, sft], "on", "on", **kw)
    assert rewards_of(held["records"]) == rewards_of(streamed["records"])
    assert len(held["records"]) == len(kw["alpha"].split(",")) + 1  # with the baseline
    assert all(r["resident"] for r in held["records"].values())
    # the inputs' read is recorded once, with the point that built the model
    assert sum("resident_read_s" in r for r in held["records"].values()) == 1
    assert not any(r["resident"] for r in streamed["records"].values())
    assert any(line.startswith("  inputs: resident in RAM, read once") for line in held["lines"])
    assert any("(--resident off)" in line for line in streamed["lines"])
    # what the scorer computed, per point and once in the output: the same texts every point
    computed = [r["computed"] for r in held["records"].values()]
    assert (
        all(c == computed[0] for c in computed)
        and 0 < computed[0]["tokens_computed"] <= computed[0]["tokens_in_texts"]
    )
    assert sum("tokens computed of" in line for line in held["lines"]) == 1


def test_resident_sweep_in_4bit_equals_streaming(tmp_path: Path) -> None:
    """With --quant 4bit each point's merged weights are quantized again into the one model."""
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU kernels need rows of at least one 64-element block
    rm, sft = models(tmp_path, hidden_size=64, intermediate_size=128)
    load = {"quant": "4bit", "dtype": "float32"}
    streamed = sweep_records(tmp_path, [rm, sft], "off", "off", alpha="0.5,1", load=load)
    held = sweep_records(tmp_path, [rm, sft], "on", "on", alpha="0.5,1", load=load)
    assert rewards_of(held["records"]) == rewards_of(streamed["records"])
    values = [v for r in held["records"].values() for v in r["pairs"]["test"]["chosen"]]
    assert len(set(values)) > 1  # the points differ: each was quantized from its own merge


def test_two_domain_grid_resident_equals_streaming(tmp_path: Path) -> None:
    rm, a, b = models(tmp_path, domains=2)
    streamed = sweep_records(tmp_path, [rm, a, b], "off", "off", grid_step=0.5)
    held = sweep_records(tmp_path, [rm, a, b], "on", "on", grid_step=0.5)
    assert len(held["records"]) == 6
    assert rewards_of(held["records"]) == rewards_of(streamed["records"])


def test_resident_sweep_builds_one_model_and_reads_the_files_once(tmp_path: Path, monkeypatch) -> None:
    """Counted at the reads from the files (`_pread_fully`) and at model construction: resident,
    the inputs' used bytes are read once and one model is built for all points; streaming reads
    them for every point and builds a model per point."""
    rm, sft = models(tmp_path)
    counts = {"bytes": 0, "models": 0}
    real_read, real_empty = reader._pread_fully, in_memory._empty_model

    def counting_read(*args, **kw):
        n = real_read(*args, **kw)
        counts["bytes"] += n
        return n

    def counting_empty(*args, **kw):
        counts["models"] += 1
        return real_empty(*args, **kw)

    monkeypatch.setattr(reader, "_pread_fully", counting_read)
    monkeypatch.setattr(in_memory, "_empty_model", counting_empty)
    weights = sum(Path(p, "model.safetensors").stat().st_size for p in (rm, sft))
    per_run = {}
    for mode in ("on", "off"):
        counts.update(bytes=0, models=0)
        records = sweep_records(tmp_path, [rm, sft], mode, mode, alpha="0.25,0.5,0.75,1")["records"]
        assert len(records) == 5
        per_run[mode] = dict(counts)
    assert per_run["on"]["models"] == 1 and per_run["off"]["models"] == 5
    assert 0 < per_run["on"]["bytes"] <= weights  # each used tensor once: lm_head is dropped
    assert per_run["off"]["bytes"] > 3 * per_run["on"]["bytes"]


def test_resident_checkpoint_reads_equal_the_file(tmp_path: Path) -> None:
    """Spans and row reads from memory equal safetensors' own reader; a tensor not held is read
    from the file."""
    rm, _ = models(tmp_path)
    path = Path(rm, "model.safetensors")
    source = Checkpoint.open(path)
    names = sorted(source)
    held_names = names[::2]
    ckpt = resident.ResidentCheckpoint(source, [source[n] for n in held_names])
    try:
        assert ckpt.resident_bytes >= sum(source[n].nbytes for n in held_names)
        with safe_open(str(path), "pt") as ref:
            for name in names:
                info = ckpt[name]
                want = ref.get_tensor(name).contiguous().view(torch.uint8).flatten().numpy().tobytes()
                buffer = memoryview(bytearray(info.nbytes + 8192))
                assert bytes(ckpt.read_span(info, 0, info.nbytes, buffer)) == want
                if info.nbytes > 4:
                    part = memoryview(bytearray(info.nbytes - 4))
                    ckpt.read_into(info, 2, part)
                    assert bytes(part) == want[2:-2]
    finally:
        ckpt.close()


@pytest.mark.parametrize(
    ("mode", "need", "available", "why_not", "held"),
    [
        ("auto", 100, 1000, None, True),
        ("auto", 700, 1000, None, False),
        ("on", 700, 1000, None, True),
        ("off", 1, 1000, None, False),
        ("auto", 1, 1000, "--write", False),
    ],
)
def test_decide(mode: str, need: int, available: int, why_not: str | None, held: bool) -> None:
    assert resident.decide(mode, need, 0, available, why_not).resident is held


def test_resident_on_refuses_what_cannot_hold_inputs(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="--resident on: --write"):
        resident.decide("on", 1, 0, 1000, "--write scores each point from its written folder")
    rm, sft = models(tmp_path)
    files = data(tmp_path)
    base = [sys.executable, "-m", "lazymerge", "sweep", str(rm), str(sft), "--pairs", str(files["test"])]
    for extra, message in (
        (["--resident", "on", "--write"], "--resident on: --write"),
        (["--resident", "on", "--ray", "auto"], "--resident on: each Ray task"),
        (["--resident", "sometimes"], "'sometimes' is not one of"),
    ):
        proc = subprocess.run([*base, "-o", str(tmp_path / "s"), *extra], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "s").exists()
