"""RewardBench 2: scores against hand-computed values from the published definitions
(allenai/reward-bench: `reroll_and_score_dataset`, `process_single_model`, `_compute_prompt_stats`
in rewardbench/utils.py; `scripts/run_v2.py`), malformed rows, `lazymerge eval` and a sweep."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lazymerge.errors import PairFileError
from lazymerge.evaluation.rewardbench2 import Rb2Row, best_of_n_score, paired_difference, score_rows
from lazymerge.evaluation.scoring import load_preferences
from lazymerge.evaluation.stats import wilson_interval

ROOT = Path(__file__).resolve().parents[2]


def row(id: str, subset: str, chosen: int = 1, rejected: int = 3, prompt: str = "p") -> dict:
    return {
        "id": id,
        "prompt": prompt,
        "chosen": [f"c{i}" for i in range(chosen)],
        "rejected": [f"r{i}" for i in range(rejected)],
        "num_correct": chosen,
        "total_completions": chosen + rejected,
        "subset": subset,
    }


def rb2(r: dict) -> Rb2Row:
    return Rb2Row(r["id"], r["subset"], r["prompt"], tuple(r["chosen"]), tuple(r["rejected"]))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_best_of_four_rows_hand_computed() -> None:
    # the first completion is the first chosen answer; it scores 1/k with k completions at the top
    assert best_of_n_score([3.0, 1.0, 0.0, 2.0]) == 1.0
    assert best_of_n_score([3.0, 3.0, 1.0, 0.0]) == 0.5
    assert best_of_n_score([2.0, 2.0, 2.0, 0.0]) == pytest.approx(1 / 3)
    assert best_of_n_score([1.0, 1.0, 1.0, 1.0]) == 0.25
    assert best_of_n_score([1.0, 3.0, 0.0, 3.0]) == 0.0
    rows = [rb2(row(str(i), "Math")) for i in range(4)]
    rewards = [[3, 1, 0, 2], [3, 3, 1, 0], [1, 1, 1, 1], [1, 3, 0, 0]]
    result = score_rows(rows, rewards)
    math_ = result["subsets"]["Math"]
    assert math_["score"] == pytest.approx((1 + 0.5 + 0.25 + 0) / 4)
    assert math_["ties_at_top"] == 2 and math_["interval"] == "bootstrap"
    assert math_["ci_low"] <= math_["score"] <= math_["ci_high"]
    assert [r["score"] for r in result["rows"]] == [1.0, 0.5, 0.25, 0.0]
    # without ties at the top the subset score is a proportion: Wilson interval
    plain = score_rows(rows[:1] + rows[3:], [[3, 1, 0, 2], [1, 3, 0, 0]])["subsets"]["Math"]
    assert plain["interval"] == "wilson" and (plain["ci_low"], plain["ci_high"]) == wilson_interval(1, 2)


def test_row_with_several_chosen_answers_counts_only_the_first() -> None:
    # RewardBench compares the first completion with all others, further chosen answers included
    r = rb2(row("7", "Focus", chosen=2, rejected=2))
    assert r.completions == ("c0", "c1", "r0", "r1")
    assert score_rows([r], [[2.0, 5.0, 1.0, 0.0]])["subsets"]["Focus"]["score"] == 0.0
    assert score_rows([r], [[5.0, 5.0, 1.0, 0.0]])["subsets"]["Focus"]["score"] == 0.5
    assert score_rows([r], [[5.0, 4.0, 1.0, 0.0]])["subsets"]["Focus"]["score"] == 1.0


def test_ties_weighted_rule_hand_computed() -> None:
    """Five prompt ids: (ref rewards, tied rewards); the first num_correct rewards are correct."""
    cases = {
        1: ([5, 1, 2], 1, [4, 3, 1, 0], 2),  # both accurate; spread 1, margins 3 and 2
        2: ([1, 2, 0], 1, [6, 2, 3, 0], 2),  # both wrong; spread 4, margins -1 and -1
        3: (None, 1, [3, 3, 1], 2),  # tied only, accurate (spread 0)
        4: ([2, 2], 1, None, 2),  # ref only, a tie at the margin is not accurate
        5: ([4, 1], 1, [2, 2, 0], 2),  # both accurate; spread 0, margins 3 and 2
    }
    rows, rewards = [], []
    for pid, (ref, _, tied, n_tied) in cases.items():
        if ref is not None:
            rows.append(rb2(row(f"ref:{pid}", "Ties", 1, len(ref) - 1)))
            rewards.append(ref)
        if tied is not None:
            rows.append(rb2(row(f"tied:{pid}", "Ties", n_tied, len(tied) - n_tied)))
            rewards.append(tied)
    # by hand, from `process_single_model`:
    tied_accuracy = 3 / 4  # ids 1, 3, 5 of 1, 2, 3, 5
    ref_accuracy = 2 / 4  # ids 1, 5 of 1, 2, 4, 5
    # over the ids with both rows (1, 2, 5): tied margin > spread, min(ref, tied margin) > spread
    preferred = 2 / 3  # 2 > 1, -1 > 4 no, 2 > 0
    preferred_hard = 2 / 3  # min(3, 2) > 1, min(-1, -1) > 4 no, min(3, 2) > 0
    # tanh(min margin / spread - 1); 2 / 0 is +inf in numpy, tanh(+inf) = 1
    margin_score = (math.tanh(2 / 1 - 1) + math.tanh(-1 / 4 - 1) + 1.0) / 3
    expected = (
        0.30 * tied_accuracy
        + 0.30 * ref_accuracy
        + 0.20 * preferred
        + 0.20 * preferred_hard
        + 0.01 * margin_score
    )
    ties = score_rows(rows, rewards)["subsets"]["Ties"]
    assert ties["score"] == pytest.approx(expected, abs=1e-12)
    assert ties["terms"]["tied_accuracy"] == tied_accuracy
    assert ties["terms"]["ref_accuracy"] == ref_accuracy
    assert ties["terms"]["margin_score"] == pytest.approx(margin_score)
    assert ties["terms"]["prompts_with_both"] == 3 and ties["prompts"] == 5
    assert ties["interval"] == "bootstrap" and ties["ci_low"] <= ties["score"] <= ties["ci_high"]
    # the order of the rows does not matter (rows are grouped by prompt id)
    again = score_rows(rows[::-1], rewards[::-1])["subsets"]["Ties"]["score"]
    assert again == pytest.approx(expected, abs=1e-12)


def test_score_is_unweighted_mean_of_six_subsets() -> None:
    subsets = ["Factuality", "Precise IF", "Math", "Safety", "Focus"]
    rows, rewards = [], []
    for k, name in enumerate(subsets):  # subset k: k + 1 rows, the first one right
        for i in range(k + 1):
            rows.append(rb2(row(f"{name}{i}", name)))
            rewards.append([1, 0, 0, 0] if i == 0 else [0, 1, 0, 0])
    rows += [rb2(row("ref:1", "Ties")), rb2(row("tied:1", "Ties", 2, 2))]
    rewards += [[3, 0, 0, 0], [4, 3, 1, 0]]  # margins 3 and 2, spread 1
    result = score_rows(rows, rewards)
    assert list(result["subsets"]) == [*subsets, "Ties"] and result["complete"]
    ties = 0.3 + 0.3 + 0.2 + 0.2 + 0.01 * math.tanh(min(3, 2) / 1 - 1)
    expected = (1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5 + ties) / 6  # not weighted by row counts
    assert result["score"] == pytest.approx(expected)
    assert result["ci_low"] <= result["score"] <= result["ci_high"]
    same = paired_difference(rows, rewards, rewards)
    assert same["difference"] == 0 and same["ci_low"] == 0 == same["ci_high"]
    better = [list(r) for r in rewards]
    better[2] = [1, 0, 0, 0]  # Precise IF: second row now right
    diff = paired_difference(rows, rewards, better)
    assert diff["subsets"]["Precise IF"]["difference"] == pytest.approx(0.5)
    assert diff["difference"] == pytest.approx(0.5 / 6)


MALFORMED = [
    ("num-correct", {**row("1", "Math"), "num_correct": 2}, ":2: num_correct is 2 but chosen holds 1"),
    ("total", {**row("1", "Math"), "total_completions": 5}, ":2: total_completions is 5"),
    ("chosen-str", {**row("1", "Math"), "chosen": "c"}, ":2: field 'chosen' must be a non-empty list"),
    ("rejected-empty", {**row("1", "Math"), "rejected": [], "total_completions": 1}, ":2: field 'rejected'"),
    ("chosen-item", {**row("1", "Math"), "chosen": [3]}, ":2: chosen\\[0\\] must be a string"),
    ("count-bool", {**row("1", "Math"), "num_correct": True}, ":2: field 'num_correct' must be an integer"),
    ("missing", {k: v for k, v in row("1", "Math").items() if k != "subset"}, ":2: .*missing subset"),
    ("ties-id", row("x:1", "Ties"), ":2: a Ties row's id must be ref:N or tied:N"),
    ("tied-one", row("tied:3", "ties"), ":2: tied row tied:3 needs at least two correct answers"),
    ("dup-ties", row("ref:0", "Ties"), ":2: Ties id ref:0 already given on line 1"),
    (
        "mixed",
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        ":2: not a RewardBench 2 row \\(line 1 is one",
    ),
]


@pytest.mark.parametrize("name,bad,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_rows_name_file_and_line(tmp_path: Path, name: str, bad: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "rb2.jsonl", [row("ref:0", "Ties"), bad])
    with pytest.raises(PairFileError, match=r"rb2\.jsonl" + message):
        load_preferences(path)


def test_rewardbench2_row_among_pairs_refused(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, row("1", "Math")]
    )
    with pytest.raises(PairFileError, match=r"p\.jsonl:2: a RewardBench 2 row"):
        load_preferences(path)


# --- with models ----------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def rb2_rows() -> list[dict]:
    rows = []
    for i, subset in enumerate(["Math", "Math", "Focus", "Safety", "Factuality", "Precise IF"]):
        rows.append(
            {
                **row(str(i), subset),
                "prompt": words(3, 4 + i),
                "chosen": [words(5 + i)],
                "rejected": [words(12 + i), words(20 + i), words(5 + i)],  # one ties with chosen
            }
        )
    for pid in (0, 1):
        rows.append(
            {
                **row(f"ref:{pid}", "Ties", 1, 2),
                "prompt": words(8 + pid),
                "chosen": [words(30)],
                "rejected": [words(31), words(32)],
            }
        )
        rows.append(
            {
                **row(f"tied:{pid}", "Ties", 2, 2),
                "prompt": words(8 + pid),
                "chosen": [words(30), words(33)],
                "rejected": [words(31), words(32)],
            }
        )
    return rows


def test_eval_end_to_end_against_transformers(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lazymerge.cli import main
    from lazymerge.evaluation.rewards import load_reward_model
    from lazymerge.evaluation.run import evaluate_pairs
    from tests.helpers.evaluation import direct_reward, reward_model
    from tests.helpers.models import assert_carries_signal, scored_texts

    folder = reward_model(tmp_path)
    rows = rb2_rows()
    path = write_jsonl(tmp_path / "rb2.jsonl", rows)
    result = evaluate_pairs(folder, path)
    assert_carries_signal(folder, *scored_texts(path, result))
    rm = load_reward_model(folder)
    by_subset: dict[str, list[float]] = {}
    for entry, r in zip(result["rows"], rows, strict=True):
        texts = [rm.format_text(r["prompt"], c) for c in r["chosen"] + r["rejected"]]
        direct = [direct_reward(folder, t) for t in texts]  # transformers alone
        assert entry["rewards"] == pytest.approx(direct, abs=1e-5)
        if r["subset"] != "Ties":
            rewards = entry["rewards"]
            top = max(rewards)
            by_subset.setdefault(r["subset"], []).append(1 / rewards.count(top) if rewards[0] == top else 0.0)
    # the row whose chosen text reappears among the rejected ties with it at best
    assert result["rows"][0]["score"] in (0.0, 0.5)
    for name, scores in by_subset.items():
        assert result["subsets"][name]["score"] == pytest.approx(sum(scores) / len(scores))
    assert result["complete"] and set(result["subsets"]) == {
        "Factuality",
        "Precise IF",
        "Math",
        "Safety",
        "Focus",
        "Ties",
    }
    assert result["score"] == pytest.approx(sum(s["score"] for s in result["subsets"].values()) / 6)
    out = tmp_path / "out.json"
    cli = CliRunner().invoke(main, ["eval", str(folder), "--pairs", str(path), "--out", str(out)])
    assert cli.exit_code == 0, cli.output
    assert "RewardBench 2 score" in cli.output and "Ties (weighted)" in cli.output
    assert json.loads(out.read_text())["score"] == pytest.approx(result["score"])


def test_eval_malformed_rewardbench2_exits_1_naming_file_and_line(tmp_path: Path) -> None:
    from tests.helpers.evaluation import reward_model

    folder = reward_model(tmp_path)
    path = write_jsonl(tmp_path / "bad.jsonl", [row("1", "Math"), {**row("2", "Math"), "num_correct": 3}])
    proc = subprocess.run(
        [sys.executable, "-m", "lazymerge", "eval", str(folder), "--pairs", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: {path}:2: num_correct is 3 but chosen holds 1 answers"
    ]


def test_sweep_scores_rewardbench2_and_chooses_on_validation(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lazymerge import merge
    from lazymerge.evaluation.run import evaluate_pairs
    from lazymerge.evaluation.sweep import build_spec, read_results, run_sweep
    from tests.helpers.evaluation import models
    from tests.helpers.models import assert_carries_signal, scored_texts

    rm, sft = models(tmp_path)
    rows = rb2_rows()
    test = write_jsonl(tmp_path / "rb2.jsonl", rows)
    val = write_jsonl(tmp_path / "rb2-val.jsonl", rows[:4])
    out = tmp_path / "sweep"
    spec = build_spec([rm, sft], out, alpha="0.5,1", pair_files=[test], val_pairs=val)
    run = run_sweep(spec)
    assert run.scored == ["alpha=0", "alpha=0.5", "alpha=1"]
    _, records, _ = read_results(out / "results.jsonl")
    folder = tmp_path / "merged"
    merge([rm, sft], folder, alpha=0.5)
    written = evaluate_pairs(folder, test)
    assert_carries_signal(folder, *scored_texts(test, written))
    # the in-memory point's rewards equal lazymerge run + lazymerge eval of the written folder
    assert records["alpha=0.5"]["rewardbench2"]["rb2"]["rewards"] == [r["rewards"] for r in written["rows"]]
    doc = json.loads((out / "results.json").read_text())
    point = next(p for p in doc["points"] if p["label"] == "alpha=0.5")
    assert point["rewardbench2"]["rb2"]["score"] == pytest.approx(written["score"])
    base = next(p for p in doc["points"] if p["baseline"])
    assert point["rewardbench2"]["rb2"]["versus_baseline"]["difference"] == pytest.approx(
        written["score"] - base["rewardbench2"]["rb2"]["score"]
    )
    val_scores = {p["label"]: p["rewardbench2"]["rb2-val"]["score"] for p in doc["points"]}
    best = max(val_scores.values())
    weight = {"alpha=0": 0, "alpha=0.5": 0.5, "alpha=1": 1}
    expected = min((label for label, s in val_scores.items() if s == best), key=weight.__getitem__)
    assert doc["chosen"] == {"label": expected, "chosen_on": "validation pairs"}
    report = (out / "report.md").read_text()
    assert "## rb2 (RewardBench 2, 10 prompts)" in report and "Ties" in report
    assert f"{100 * point['rewardbench2']['rb2']['score']:.1f} [" in report


def test_convert_rewardbench2(tmp_path: Path) -> None:
    tool = ROOT / "tools" / "convert_pairs.py"
    rows = [{**r, "extra": 1} for r in rb2_rows()[:3]]
    source = tmp_path / "rb2.json"
    source.write_text(json.dumps(rows))
    target = tmp_path / "rb2.jsonl"
    subprocess.run(
        [sys.executable, str(tool), "rewardbench2", str(source), "-o", str(target)],
        check=True,
        capture_output=True,
    )
    loaded = load_preferences(target).rewardbench2
    assert loaded == tuple(rb2(r) for r in rows)
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [rows[0], {**rows[1], "total_completions": 9}])
    proc = subprocess.run(
        [sys.executable, str(tool), "rewardbench2", str(bad), "-o", str(tmp_path / "x.jsonl")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and f"{bad}:2: total_completions is 9" in proc.stderr
    assert not (tmp_path / "x.jsonl").exists()
    parquet = tmp_path / "rb2.parquet"
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        parquet.write_bytes(b"PAR1")
        proc = subprocess.run(
            [sys.executable, str(tool), "rewardbench2", str(parquet), "-o", str(target), "--force"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 1 and "needs pyarrow: pip install pyarrow" in proc.stderr
    else:
        pq.write_table(pyarrow.Table.from_pylist(rows), parquet)
        subprocess.run(
            [sys.executable, str(tool), "rewardbench2", str(parquet), "-o", str(target), "--force"],
            check=True,
        )
        assert load_preferences(target).rewardbench2 == tuple(rb2(r) for r in rows)
