"""The DogeRM miniature (bench/mini_dogerm.py) in its --tiny form: a random 2-layer Llama of
SmolLM2's family with a word-level tokenizer and built-in data, a few training steps, the same
stages and the same `lazymerge sweep` as the full-size bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import mini_dogerm  # noqa: E402
import mini_dogerm_data as data  # noqa: E402

from lazymerge.evaluation.scoring import load_candidates, load_pairs  # noqa: E402

STAGES = ("data", "base", "rm", "sft", "check", "sweep")


def test_maths_data_is_graded_exactly(tmp_path):
    train = data.problems(data.HARD, 4, 300)
    test = data.problems(data.HARD, 6, 50, exclude=train)
    assert not set(train) & set(test)
    for p in test:
        first, last = (int(x.split(" = ")[1].rstrip(".")) for x in p.solution().split(". ", 1))
        assert first == p.a * p.b and last == p.answer
        assert eval(p.question.removeprefix("What is ").rstrip("?")) == p.answer
    rows = data.maths_pairs(test, 8, "t")
    assert len(rows) == 2 * len(test)
    for r in rows:  # a wrong solution is self-consistent but its arithmetic is off somewhere
        assert r["chosen"] != r["rejected"]
        assert r["chosen"].split()[-1] != r["rejected"].split()[-1]
    bon = data.best_of_n(test, 8)  # the same seed as the pairs: their texts, plus one more each
    for row, (last, first) in zip(bon, zip(rows[::2], rows[1::2], strict=True), strict=True):
        assert {last["chosen"], last["rejected"], first["rejected"]} < set(row["candidates"])
        assert len(set(row["candidates"])) == 4
    data.write_jsonl(tmp_path / "pairs.jsonl", rows)
    data.write_jsonl(tmp_path / "bon.jsonl", bon)
    assert len(load_pairs(tmp_path / "pairs.jsonl")[0]) == len(rows)
    sets = load_candidates(tmp_path / "bon.jsonl")  # lazymerge's grader: last number vs gold answer
    assert [sum(s.correct) for s in sets] == [1] * len(test)
    assert {s.correct.index(True) for s in sets} == {0, 1, 2, 3}  # the correct one is shuffled


def test_general_pairs_reject_off_topic_truncated_and_wrong():
    train, held = data.split_general(True, 40, 0.34, 0)
    assert train and held and not {q for q, _, _ in train} & {q for q, _, _ in held}
    rows = data.general_pairs(train, 2, 4, "g")
    assert {r["subset"] for r in rows} == {"off-topic", "truncated", "wrong"}
    for r in rows:
        if r["subset"] == "truncated":
            assert r["chosen"].startswith(r["rejected"]) and len(r["rejected"]) < len(r["chosen"])


@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage_and_caches(tmp_path, capsys, monkeypatch):
    work, results = tmp_path / "work", tmp_path / "results"
    assert mini_dogerm.main(["--tiny", "--work", str(work), "--results", str(results)]) == 0
    summary = json.loads((work / "summary.json").read_text())
    assert set(summary["stages"]) == set(STAGES)
    assert not any(s["cached"] for s in summary["stages"].values())
    folders = {name: work / f"{name}-{s['key']}" for name, s in summary["stages"].items()}
    for name, folder in folders.items():
        assert (folder / "stage.json").is_file(), name
    for model in ("rm", "sft"):
        assert (folders[model] / "model.safetensors").is_file()
        assert json.loads((folders[model] / "config.json").read_text())["architectures"] == [
            "LlamaForSequenceClassification" if model == "rm" else "LlamaForCausalLM"
        ]
    check = summary["likelihood_check"]
    assert 0.0 <= check["sft"]["rate"]["all"] <= 1.0 and check["sft"]["n"] > 0

    report = json.loads((results / "results.json").read_text())
    assert [p["weights"][1] for p in report["points"]] == [0.0, 0.5, 1.0]
    assert report["chosen"]["chosen_on"] == "validation pairs"
    names = {e["name"]: e for e in report["evaluations"]["pairs"]}
    assert names["maths-val"]["validation"] and not names["maths-test"]["validation"]
    assert "general-test" in names and report["evaluations"]["best_of_n"][0]["name"] == "maths-bon"
    for name in ("report.md", "accuracy.png", "best_of_n.png", "summary.json"):
        assert (results / name).stat().st_size > 0, name
    assert summary["headline"]["pairs"]["maths-test"]["reward model alone"]["accuracy"] >= 0.0
    # the rewards these accuracies (and the cached run's below) are made of carry a signal
    from lazymerge.evaluation.sweep import read_results
    from tests.helpers.models import assert_carries_signal

    _, records, _ = read_results(folders["sweep"] / "sweep" / "results.jsonl")
    tests = list(data.read_jsonl(folders["data"] / "maths-test.jsonl"))
    for record in records.values():
        texts = [f"{r['prompt']} {r['chosen']}" for r in tests]
        assert_carries_signal(folders["rm"], texts, record["pairs"]["maths-test"]["chosen"])

    stamps = {name: (f / "stage.json").stat().st_mtime_ns for name, f in folders.items()}
    capsys.readouterr()
    assert mini_dogerm.main(["--tiny", "--work", str(work)]) == 0
    out = capsys.readouterr().out
    for name in STAGES:
        assert f"[{name}] cached" in out
    again = json.loads((work / "summary.json").read_text())
    assert all(s["cached"] for s in again["stages"].values())
    assert {name: (f / "stage.json").stat().st_mtime_ns for name, f in folders.items()} == stamps
    assert again["headline"] == summary["headline"]

    # the best-of-N candidates hold the test pairs' texts, so the sweep scores them once
    data_dir = folders["data"]
    test = list(data.read_jsonl(data_dir / "maths-test.jsonl"))
    bon = {r["prompt"]: set(r["candidates"]) for r in data.read_jsonl(data_dir / "maths-bon.jsonl")}
    assert all({r["chosen"], r["rejected"]} <= bon[r["prompt"]] for r in test)

    # an edit of the data generator rebuilds the data; what reads unchanged bytes is kept
    edited = tmp_path / "mini_dogerm_data.py"
    edited.write_text(Path(data.__file__).read_text() + "# an edit that changes no output\n")
    monkeypatch.setattr(data, "__file__", str(edited))
    capsys.readouterr()
    assert mini_dogerm.main(["--tiny", "--work", str(work)]) == 0
    out = capsys.readouterr().out
    assert "[data] building" in out
    for name in STAGES[1:]:
        assert f"[{name}] cached" in out
    monkeypatch.undo()

    # a finer grid resumes the sweep in place: the scored points are kept, only new ones scored
    lines = (folders["sweep"] / "sweep" / "results.jsonl").read_text().splitlines()
    assert mini_dogerm.main(["--tiny", "--work", str(work), "--set", "sweep.alpha=0:1:0.25"]) == 0
    finer = (folders["sweep"] / "sweep" / "results.jsonl").read_text().splitlines()
    assert finer[: len(lines)] == lines and len(finer) == len(lines) + 2
    assert len(json.loads((folders["sweep"] / "sweep" / "results.json").read_text())["points"]) == 5

    # a changed training setting rebuilds that model and what reads it, nothing before it
    capsys.readouterr()
    assert mini_dogerm.main(["--tiny", "--work", str(work), "--set", "sft.steps=2"]) == 0
    out = capsys.readouterr().out
    for name in ("data", "base", "rm"):
        assert f"[{name}] cached" in out
    for name in ("sft", "check", "sweep"):
        assert f"[{name}] building" in out


@pytest.mark.parametrize("regime", ["medium", "hard"])
def test_domain_regimes_are_harder_than_the_reward_models_maths(regime):
    easy = data.problems(data.EASY, 1, 50)
    probs = data.problems(data.DOMAIN_REGIMES[regime], 4, 500)
    assert max(p.a * p.b for p in easy) < max(p.a * p.b for p in probs)
    assert all(p.a >= 10 for p in probs) and not set(easy) & set(probs)


@pytest.mark.slow
def test_tiny_variants_compare_on_validation_and_score_the_pick_once(tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "results"
    assert mini_dogerm.main(["--tiny", "--variants", "--work", str(work), "--results", str(results)]) == 0
    report = json.loads((results / "variants.json").read_text())
    rows = report["variants"]
    assert list(rows) == list(mini_dogerm.VARIANTS)
    gains = {name: r["val_difference"]["difference"] for name, r in rows.items()}
    assert report["picked"] == next(n for n in rows if gains[n] == max(gains.values()))
    table = (results / "variants.md").read_text()
    assert f"**{report['picked']}**" in table and all(
        f"| {n} |" in table or f"**{n}**" in table for n in rows
    )
    # validation runs never score the test pairs; the pick's run does, once
    sweeps = sorted(work.glob("sweep-*"))
    assert len(sweeps) == len(rows) + 1
    scored = [json.loads((s / "sweep" / "results.json").read_text())["evaluations"] for s in sweeps]
    with_test = [e for e in scored if "maths-test" in {p["name"] for p in e["pairs"]}]
    assert len(with_test) == 1 and with_test[0]["best_of_n"][0]["name"] == "maths-bon"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["variant"] == report["picked"] and not summary["val_only"]
    assert "maths-test" in summary["headline"]["pairs"]


def test_bad_setting_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        mini_dogerm.main(["--tiny", "--work", str(tmp_path), "--set", "rm.nope=1"])
    assert exc.value.code == 2
    assert "no setting rm.nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        mini_dogerm.main(["--tiny", "--work", str(tmp_path), "--set", "data.domain_regime=huge"])
    assert exc.value.code == 2
    assert "data.domain_regime must be one of medium, hard" in capsys.readouterr().err
    for bad, says in (
        ("rm.steps", "expected STAGE.KEY=VALUE"),
        ("rm.steps=many", "rm.steps takes a int"),
        ("rm.steps=x1e400", "rm.steps takes a int"),
        ("rm.lr=nan", "rm.lr must be a finite number above 0"),
        ("sft.steps=-5", "sft.steps must be a finite number above 0"),
        ("sft.steps=99999999999999999999", "at most 1,000,000"),
        ("data.general_eval_fraction=2", "a fraction below 1"),
    ):
        with pytest.raises(SystemExit) as exc:
            mini_dogerm.main(["--tiny", "--work", str(tmp_path), "--set", bad])
        assert exc.value.code == 2 and says in capsys.readouterr().err


def test_work_that_is_a_file_is_one_line(tmp_path, capsys):
    work = tmp_path / "file"
    work.write_text("mine")
    assert mini_dogerm.main(["--tiny", "--work", str(work)]) == 1
    assert capsys.readouterr().err == f"mini_dogerm: --work {work}: is not a folder\n"
    assert work.read_text() == "mine"


def test_variants_change_one_thing_and_set_wins():
    full = mini_dogerm.FULL
    assert mini_dogerm.configure(full, "longer-sft", [])["sft"]["steps"] == 2 * full["sft"]["steps"]
    assert mini_dogerm.configure(mini_dogerm.TINY, "longer-sft", [])["sft"]["steps"] == 6
    assert mini_dogerm.configure(full, "longer-sft", ["sft.steps=150"])["sft"]["steps"] == 150
    for name in mini_dogerm.VARIANTS:
        cfg = mini_dogerm.configure(full, name, [])
        changed = [(s, k) for s in cfg if isinstance(cfg[s], dict) for k in cfg[s] if cfg[s][k] != full[s][k]]
        assert len(changed) == len(mini_dogerm.VARIANTS[name]) <= 1


def _row(difference: float, p: float, comparisons: int = 30) -> dict:
    return {"val_difference": {"difference": difference}, "adjusted_p": min(1.0, p * comparisons)}


@pytest.mark.parametrize(
    ("rows", "picked"),
    [
        # the smallest adjusted p among the variants that gain, whatever the size of the gain
        (
            {"linear": _row(0.03, 0.39), "task-arithmetic": _row(0.05, 0.087), "ta-emb": _row(0.07, 0.009)},
            "ta-emb",
        ),
        (
            {"linear": _row(0.09, 0.2), "task-arithmetic": _row(0.02, 0.01), "ta-emb": _row(-0.05, 0.001)},
            "task-arithmetic",
        ),
        # adjusted p capped at 1 ties: the larger gain, then the order listed
        ({"linear": _row(0.01, 0.9), "task-arithmetic": _row(0.02, 0.8)}, "task-arithmetic"),
        ({"linear": _row(0.02, 0.9), "task-arithmetic": _row(0.02, 0.8)}, "linear"),
        # no gain anywhere: the linear baseline
        ({"linear": _row(0.0, 1.0), "task-arithmetic": _row(-0.01, 0.5)}, "linear"),
    ],
)
def test_merge_variant_rule(rows, picked):
    assert mini_dogerm.pick_merge_variant(rows) == picked


def test_merge_variants_are_one_change_each_and_sweep_the_same_lambdas(tmp_path):
    assert list(mini_dogerm.MERGE_VARIANTS) == ["linear", "task-arithmetic", "task-arithmetic-rm-embeddings"]
    base = tmp_path / "base"
    assert mini_dogerm.merge_arguments({}, "0:1:0.5", base) == ["--alpha", "0:1:0.5"]
    ta = mini_dogerm.merge_arguments(mini_dogerm.MERGE_VARIANTS["task-arithmetic"], "0:1:0.5", base)
    assert ta == [
        "--method",
        "task_arithmetic",
        "--base",
        str(base),
        "--weights",
        "1,0",
        "--weights",
        "1,0.5",
        "--weights",
        "1,1",
    ]
    kept = mini_dogerm.merge_arguments(
        mini_dogerm.MERGE_VARIANTS["task-arithmetic-rm-embeddings"], "0:1:0.5", base
    )
    assert kept == [*ta, "--tensor-weights", "embed_tokens=1,0"]


@pytest.mark.slow
def test_tiny_merge_variants_compare_on_validation_and_score_the_pick_once(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    argv = ["--tiny", "--merge-variants", "--work", str(work), "--results", str(results)]
    assert mini_dogerm.main(argv) == 0
    report = json.loads((results / "merge-variants.json").read_text())
    rows = report["variants"]
    assert list(rows) == list(mini_dogerm.MERGE_VARIANTS)
    assert report["comparisons"] == 3 * 2  # three variants, lambdas 0.5 and 1 (TINY's grid)
    for r in rows.values():
        assert r["adjusted_p"] == pytest.approx(min(1.0, 6 * r["val_difference"]["mcnemar_p"]), abs=1e-4)
    assert report["picked"] == mini_dogerm.pick_merge_variant(rows)
    assert f"**{report['picked']}**" in (results / "merge-variants.md").read_text()
    # validation runs never score the test pairs; the pick's run does, once
    sweeps = sorted(work.glob("sweep-*"))
    assert len(sweeps) == len(rows) + 1
    scored = [json.loads((s / "sweep" / "results.json").read_text()) for s in sweeps]
    with_test = [d for d in scored if "maths-test" in {p["name"] for p in d["evaluations"]["pairs"]}]
    assert len(with_test) == 1 and with_test[0]["evaluations"]["best_of_n"][0]["name"] == "maths-bon"
    # ... for the point chosen on validation (and the reward model alone) only, not the grid again
    chosen = rows[report["picked"]]["chosen"]
    assert {p["label"] for p in with_test[0]["points"]} <= {
        chosen,
        *(p["label"] for p in with_test[0]["points"] if p["baseline"]),
    }
    assert any(p["label"] == chosen for p in with_test[0]["points"])
    assert report["test"]["chosen"] == chosen
    assert report["test"]["chosen_on"] == "fixed before the test pairs were scored"
    picked_method = mini_dogerm.MERGE_VARIANTS[report["picked"]].get("method", "linear")
    assert with_test[0]["merge"]["method"] == picked_method
    # the task-arithmetic sweeps report their task vectors against the base; every point its diagnostics
    with_base = [d for d in scored if d["merge"]["method"] == "task_arithmetic"]
    assert len(with_base) >= 2 and all("task_vectors" in d for d in with_base)
    assert all("diagnostics" in p for d in scored for p in d["points"])
    summary = json.loads((results / "summary.json").read_text())
    assert summary["merge_variant"] == report["picked"] and not summary["val_only"]
    assert summary["base_model"] == {"kind": "random 2-layer Llama (--tiny)"}
    assert (results / "reliability.png").is_file()
