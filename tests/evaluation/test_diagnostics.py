"""Diagnostics (lazymerge.evaluation.diagnostics): task vectors against torch on whole tensors,
calibration, length bias and flips against values computed by hand, and the sweep report's
diagnostics against the rewards in results.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lazymerge.errors import IncompatibleInputsError
from lazymerge.evaluation import diagnostics as dx
from tests.helpers.checkpoints import write_sharded

SHAPES = {
    "model.embed_tokens.weight": (11, 6),
    "model.layers.0.self_attn.q_proj.weight": (6, 6),
    "model.layers.0.mlp.up_proj.weight": (9, 6),
    "model.layers.1.self_attn.q_proj.weight": (6, 6),
    "model.layers.1.input_layernorm.weight": (6,),
    "model.norm.weight": (6,),
}


def _models(seed: int) -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    rm = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    sft = {n: t + 0.02 * torch.randn(t.shape, generator=g) + 0.5 * (rm[n] - t) for n, t in base.items()}
    rm["score.weight"] = torch.randn(1, 6, generator=g)  # the reward head: in the RM only
    return base, rm, sft


def _reference(base: dict, models: list[dict], names: list[str]) -> tuple[list[float], list[float]]:
    """torch on the whole tensors: relative norm of each delta, cosine of the two deltas."""
    b = torch.cat([base[n].double().flatten() for n in names])
    deltas = [torch.cat([m[n].double().flatten() for n in names]) - b for m in models]
    rel = [float(d.norm() / b.norm()) for d in deltas]
    return rel, [float(torch.nn.functional.cosine_similarity(deltas[0], deltas[1], dim=0))]


def test_task_vectors_equal_torch_on_whole_tensors(tmp_path: Path) -> None:
    base, rm, sft = _models(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    # the reward model in bf16 and sharded, read through lazymerge's readers in 5-element chunks
    rm16 = {n: t.to(torch.bfloat16) for n, t in rm.items()}
    write_sharded(tmp_path / "rm", rm16, shards=2)
    save_file(sft, str(tmp_path / "sft.safetensors"))
    report = dx.task_vectors(
        [tmp_path / "rm", tmp_path / "sft.safetensors"], tmp_path / "base.safetensors", 5
    )
    groups = {g.group: g for g in report.groups}
    assert list(groups) == ["embeddings", "layer 0", "layer 1", "other"]
    expected_names = {
        "embeddings": ["model.embed_tokens.weight"],
        "layer 0": [n for n in SHAPES if ".layers.0." in n],
        "layer 1": [n for n in SHAPES if ".layers.1." in n],
        "other": ["model.norm.weight"],
    }
    rm_read = {n: t.double() for n, t in rm16.items()}
    for name, tensors in [*expected_names.items(), ("all", list(SHAPES))]:
        got = groups.get(name, report.total)
        rel, cos = _reference(base, [rm_read, sft], tensors)
        assert got.tensors == len(tensors)
        assert got.elements == sum(math.prod(SHAPES[n]) for n in tensors)
        assert got.relative_norms == pytest.approx(rel, rel=1e-9)
        assert [c for _, _, c in got.cosines] == pytest.approx(cos, rel=1e-9)
    assert report.skipped == ("score.weight (not in the base)",)
    # the JSON form reads back to the same report, and its table shows every group
    again = dx.TaskVectorReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report
    table = "\n".join(report.markdown())
    rel_all = 100 * report.total.relative_norms[0]
    assert "| layer 1 | 2 |" in table and f"{rel_all:.3g}" in table


def test_task_vectors_of_a_model_equal_to_its_base_and_of_an_unrelated_base(tmp_path: Path) -> None:
    base, rm, _ = _models(1)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(rm, str(tmp_path / "rm.safetensors"))
    report = dx.task_vectors(
        [tmp_path / "rm.safetensors", tmp_path / "base.safetensors"], tmp_path / "base.safetensors"
    )
    assert report.total.relative_norms[1] == 0.0
    assert report.total.cosines == ((0, 1, None),)  # a zero delta has no direction
    save_file({"other.weight": torch.ones(3)}, str(tmp_path / "unrelated.safetensors"))
    with pytest.raises(IncompatibleInputsError, match="unrelated.safetensors: shares no tensor"):
        dx.task_vectors([tmp_path / "rm.safetensors"], tmp_path / "unrelated.safetensors")


def test_diagnose_command_prints_the_table_and_fails_in_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lazymerge.cli import main

    base, rm, sft = _models(2)
    for name, tensors in (("base", base), ("rm", rm), ("sft", sft)):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    args = [str(tmp_path / "rm.safetensors"), str(tmp_path / "sft.safetensors")]
    result = CliRunner().invoke(
        main, ["diagnose", *args, "--base", str(tmp_path / "base.safetensors"), "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    rel, cos = _reference(base, [rm, sft], list(SHAPES))
    assert doc["total"]["relative_norms"] == pytest.approx(rel) and doc["total"]["cosines"][0][
        2
    ] == pytest.approx(cos[0])
    missing = CliRunner().invoke(main, ["diagnose", *args, "--base", str(tmp_path / "nope.safetensors")])
    assert missing.exit_code == 1 and "nope.safetensors" in missing.output
    assert len(missing.output.strip().splitlines()) == 1 and "Traceback" not in missing.output


def _margin(confidence: float) -> float:
    """The reward margin whose sigmoid is `confidence`."""
    return math.log(confidence / (1 - confidence))


def test_calibration_on_a_small_table_computed_by_hand() -> None:
    # margins: a tie (confidence 0.5, wrong), two at confidence 0.775 (one right, one wrong: the
    # rejected one higher), one right at 0.925; bins of width 0.05 from 0.5
    chosen = [1.0, _margin(0.775), 0.0, _margin(0.925)]
    rejected = [1.0, 0.0, _margin(0.775), 0.0]
    cal = dx.calibration(chosen, rejected)
    # ECE = 1/4 |0 - 0.5| + 2/4 |0.5 - 0.775| + 1/4 |1 - 0.925| = 0.28125
    assert cal.ece == pytest.approx(0.28125)
    used = {round(b.low, 3): (b.n, b.confidence, b.accuracy) for b in cal.bins if b.n}
    assert used == {
        0.5: (1, pytest.approx(0.5), 0.0),
        0.75: (2, pytest.approx(0.775), 0.5),
        0.9: (1, pytest.approx(0.925), 1.0),
    }
    assert len(cal.bins) == dx.CALIBRATION_BINS and cal.n == 4


def test_length_bias_and_reward_scale_by_hand() -> None:
    # (chosen, rejected) lengths: chosen much shorter, equal, 5% longer, much longer
    lengths = [(50, 100), (40, 40), (105, 100), (300, 100)]
    chosen = [2.0, 1.0, 0.0, 5.0]
    rejected = [1.0, 3.0, 1.0, 2.0]
    bias = dx.length_bias(lengths, chosen, rejected)
    assert [(b.name, b.n, b.accuracy) for b in bias.bins] == [
        ("chosen shorter", 1, 1.0),
        ("about equal", 2, 0.0),  # 40/40 and 105/100 are within 10%; both wrong
        ("chosen longer", 1, 1.0),
    ]
    # unequal pairs 0, 2, 3: the longer response has the higher reward only in pair 3
    assert bias.unequal == 3 and bias.prefers_longer == pytest.approx(1 / 3)
    scale = dx.reward_scale([*chosen, *rejected])
    values = np.array([*chosen, *rejected])
    assert (scale.n, scale.mean, scale.std) == (8, pytest.approx(values.mean()), pytest.approx(values.std()))


def test_flips_count_both_ways_and_show_the_largest_changes() -> None:
    pairs = [
        SimpleNamespace(prompt=f"q{i}", chosen=f"c{i}" * 200, rejected=f"r{i}", subset="s") for i in range(5)
    ]
    base = ([1.0, 0.0, 2.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.5, 0.0])  # right, wrong, right, wrong, right
    point = ([1.0, 3.0, 0.0, 0.6, 0.5], [0.0, 1.0, 1.0, 0.5, 0.5])  # right, right, wrong, right, tie
    f = dx.flips(pairs, base, point, shown=1)
    assert (f.fixed, f.broken) == (2, 2)  # fixed: 1 and 3; broken: 2 and 4 (a tie is wrong)
    assert [x.index for x in f.largest_fixed] == [1]  # margin -1 -> +2 beats -0.5 -> +0.1
    assert [x.index for x in f.largest_broken] == [2]  # +1 -> -1 beats +1 -> 0
    shown = f.largest_fixed[0]
    assert (shown.baseline_margin, shown.point_margin) == (-1.0, 2.0)
    assert len(shown.chosen) == dx.TEXT_CHARS and shown.chosen.endswith("...")


@pytest.mark.slow
def test_sweep_report_diagnostics_agree_with_results_jsonl(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lazymerge.evaluation.report import markdown
    from lazymerge.evaluation.scoring import load_pairs
    from lazymerge.evaluation.sweep import build_spec, read_results, run_sweep
    from tests.helpers.evaluation import data, models

    rm, sft = models(tmp_path)
    files = data(tmp_path)
    out = tmp_path / "sweep"
    spec = build_spec(
        [rm, sft], out, alpha="0.5,1", pair_files=[files["test"]], candidate_files=[files["cands"]], ns=[2]
    )
    run_sweep(spec)
    doc = json.loads((out / "results.json").read_text())
    _, records, _ = read_results(out / "results.jsonl")
    pairs = load_pairs(files["test"])[0]
    base = records["alpha=0"]["pairs"]["test"]
    for p in doc["points"]:
        r = records[p["label"]]["pairs"]["test"]
        d = p["diagnostics"]["test"]
        # recomputed here from the rewards: mean, std, ECE, fixed and broken
        every = np.array(r["chosen"] + r["rejected"])
        assert d["rewards"]["mean"] == pytest.approx(every.mean()) and d["rewards"]["std"] == pytest.approx(
            every.std()
        )
        margin = np.array(r["chosen"]) - np.array(r["rejected"])
        conf = 1 / (1 + np.exp(-np.abs(margin)))
        idx = np.minimum(((conf - 0.5) / 0.05).astype(int), 9)
        ece = sum(
            (idx == k).sum() / len(margin) * abs((margin[idx == k] > 0).mean() - conf[idx == k].mean())
            for k in range(10)
            if (idx == k).any()
        )
        assert d["calibration"]["ece"] == pytest.approx(ece)
        base_margin = np.array(base["chosen"]) - np.array(base["rejected"])
        assert d["flips"]["fixed"] == int(((base_margin <= 0) & (margin > 0)).sum())
        assert d["flips"]["broken"] == int(((base_margin > 0) & (margin <= 0)).sum())
        assert d["flips"]["fixed"] == p["pairs"]["test"]["versus_baseline"]["only_point"]
        assert d["flips"]["broken"] == p["pairs"]["test"]["versus_baseline"]["only_baseline"]
        assert sum(b["n"] for b in d["length"]["bins"]) == len(pairs)
        cands = np.array([x for row in records[p["label"]]["best_of_n"]["cands"]["rewards"] for x in row])
        assert p["diagnostics"]["cands"]["rewards"]["mean"] == pytest.approx(cands.mean())
    report = (out / "report.md").read_text()
    assert report == markdown(doc)  # the report is rendered from results.json alone
    assert "## Diagnostics" in report and "### test" in report
    for p in doc["points"]:
        d = p["diagnostics"]["test"]
        assert (
            f"| {p['label']} | {d['rewards']['mean']:.3f} ({d['rewards']['std']:.3f}) | {d['calibration']['ece']:.3f} |"
            in report
        )
    assert "Task vectors: not computed" in report  # a linear sweep has no base
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_with_a_base_reports_task_vectors_equal_to_numpy(tmp_path: Path) -> None:
    """`lazymerge check --base` adds the task-vector section; its figures against numpy on the
    tensors safetensors reads, over the tensors all three share with one shape."""
    import re

    from click.testing import CliRunner
    from safetensors.numpy import load_file

    from lazymerge.cli import main
    from tests.helpers.evaluation import models
    from tests.helpers.models import BASE_WORDS, make_tokenizer, save_model

    rm, sft = models(tmp_path)
    base = save_model(tmp_path / "base", "llama", False, 9, make_tokenizer(BASE_WORDS))
    loaded = [load_file(str(f / "model.safetensors")) for f in (rm, sft, base)]
    shared = [n for n, t in loaded[2].items() if all(n in m and m[n].shape == t.shape for m in loaded[:2])]
    b = np.concatenate([loaded[2][n].astype(np.float64).ravel() for n in shared])
    d = [np.concatenate([m[n].astype(np.float64).ravel() for n in shared]) - b for m in loaded[:2]]
    rel = [np.linalg.norm(x) / np.linalg.norm(b) for x in d]
    cos = float(d[0] @ d[1] / (np.linalg.norm(d[0]) * np.linalg.norm(d[1])))

    args = ["check", str(rm), str(sft), "--method", "task_arithmetic", "--alpha", "0.5"]
    result = CliRunner().invoke(main, [*args, "--base", str(base), "--json"])
    assert result.exit_code == 0, result.output
    found = [f for f in json.loads(result.output)["findings"] if f["section"] == "task vectors"]
    total = next(f for f in found if f["subject"] == str(base) and f["level"] == "ok")
    assert total["message"].startswith(f"{len(shared)} tensors: ")
    got = [float(x) / 100 for x in re.findall(r"delta \w+ ([0-9.e+-]+)%", total["message"])]
    assert got == pytest.approx(rel, rel=2e-3)
    assert float(re.search(r"cos\(rm, sft0\) (-?[0-9.]+)", total["message"]).group(1)) == pytest.approx(
        cos, abs=6e-4
    )
    assert {f["subject"] for f in found} >= {"layer 0", "layer 1"}
    # the embeddings (the SFT vocabulary grew), the reward head and lm_head: left out, one warning
    left_out = {n for m in loaded for n in m} - set(shared)
    assert "model.embed_tokens.weight" in left_out and "score.weight" in left_out
    (warning,) = [f for f in found if f["level"] == "warning"]
    assert warning["message"].startswith(f"{len(left_out)} tensor(s) left out")
    # without a base, no such section
    plain = CliRunner().invoke(main, ["check", str(rm), str(sft), "--alpha", "0.5", "--json"])
    assert plain.exit_code == 0, plain.output
    assert not [f for f in json.loads(plain.output)["findings"] if f["section"] == "task vectors"]


_TASK_VECTORS = dx.task_vectors  # the real one, whatever a test patches in its place


def _counting(calls: list[tuple]):
    """A `compute` hook: `task_vectors` itself, each call recorded in `calls`."""

    def compute(models, base):
        calls.append((tuple(models), base))
        return _TASK_VECTORS(models, base)

    return compute


def test_sweep_task_vectors_are_computed_once_and_again_when_an_input_changes(tmp_path: Path) -> None:
    base, rm, sft = _models(0)
    paths = []
    for name, tensors in (("base", base), ("rm", rm), ("sft", sft)):
        paths.append(tmp_path / f"{name}.safetensors")
        save_file(tensors, str(paths[-1]))
    base_path, models = paths[0], paths[1:]
    folder = tmp_path / "sweep"
    folder.mkdir()
    calls: list[tuple] = []
    first = dx.sweep_task_vectors(folder, models, base_path, compute=_counting(calls))
    assert len(calls) == 1 and first == dx.task_vectors(models, base_path)
    kept = json.loads((folder / dx.TASK_VECTORS_FILE).read_text())
    assert [i["path"] for i in kept["identity"]] == [str(p) for p in (*models, base_path)]
    assert dx.sweep_task_vectors(folder, models, base_path, compute=_counting(calls)) == first
    assert len(calls) == 1  # the same inputs: read back, not computed
    # an input changes: computed again, and the new figures kept
    sft["model.layers.0.mlp.up_proj.weight"] += 1.0
    save_file(sft, str(models[1]))
    changed = dx.sweep_task_vectors(folder, models, base_path, compute=_counting(calls))
    assert len(calls) == 2 and changed == dx.task_vectors(models, base_path) and changed != first
    assert dx.sweep_task_vectors(folder, models, base_path, compute=_counting(calls)) == changed
    assert len(calls) == 2
    # other inputs (the models swapped) and a kept file that is not valid: computed again
    dx.sweep_task_vectors(folder, models[::-1], base_path, compute=_counting(calls))
    assert len(calls) == 3
    for bad in (
        "{",
        '{"record": "task_vectors", "identity": 3}',
        json.dumps({**kept, "task_vectors": {"x": 1}}),
    ):
        (folder / dx.TASK_VECTORS_FILE).write_text(bad)
        assert dx.sweep_task_vectors(folder, models, base_path, compute=_counting(calls)) == changed
    assert len(calls) == 6
    doc = json.loads((folder / dx.TASK_VECTORS_FILE).read_text())
    doc["task_vectors"]["total"]["relative_norms"][0] = "big"  # valid JSON, wrong type
    (folder / dx.TASK_VECTORS_FILE).write_text(json.dumps(doc))
    assert dx.sweep_task_vectors(folder, models, base_path, compute=_counting(calls)) == changed
    assert len(calls) == 7


def test_a_sweep_computes_its_task_vectors_once_across_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lazymerge.evaluation.sweep import build_spec, run_sweep
    from tests.helpers.evaluation import data, models
    from tests.helpers.models import BASE_WORDS, make_tokenizer, save_model

    rm, sft = models(tmp_path)
    base = save_model(tmp_path / "base", "llama", False, 9, make_tokenizer(BASE_WORDS))
    files = data(tmp_path)
    out = tmp_path / "sweep"
    calls: list[tuple] = []
    monkeypatch.setattr(dx, "task_vectors", _counting(calls))  # what a sweep's report computes with

    def sweep(alpha: str, **more: bool) -> dict:
        spec = build_spec(
            [rm, sft],
            out,
            alpha=alpha,
            pair_files=[files["test"]],
            method="task_arithmetic",
            base=base,
            **more,
        )
        run_sweep(spec)
        return json.loads((out / "results.json").read_text())

    first = sweep("0,1")
    assert len(calls) == 1
    resumed = sweep("0,0.5,1")  # one more point, the report written again
    assert len(calls) == 1 and resumed["task_vectors"] == first["task_vectors"]
    assert "Task vectors against" in (out / "report.md").read_text()
    restarted = sweep("0,1", restart=True)
    assert len(calls) == 2 and restarted["task_vectors"] == first["task_vectors"]
