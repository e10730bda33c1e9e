"""Finite rewards (issue 19, part 3): a NaN or infinite reward stops eval and bon with one line
naming the model and the text's data file, line, row id and place, exit 1, and no --out is
written; results and reports are strict JSON (no bare NaN)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from lazymerge.cli import main  # noqa: E402
from tests.helpers.evaluation import (  # noqa: E402
    poisoned,  # noqa: E402
    words,
    write_jsonl,
)
from tests.helpers.models import BASE_WORDS, save_model  # noqa: E402

PAIRS = [
    {"id": "a", "prompt": words(3), "chosen": words(4), "rejected": words(5)},
    {"id": "b", "prompt": words(3), "chosen": words(6), "rejected": words(7)},
]
AUTOJ = [
    {"scenario": "x", "label": 2, "prompt": words(3), "response 1": words(4), "response 2": words(5)},
    {"scenario": "x", "label": 1, "prompt": words(3), "response 1": words(7), "response 2": words(5)},
]
RB2 = [
    {
        "id": "r1",
        "subset": "Factuality",
        "prompt": words(3),
        "chosen": [words(4)],
        "rejected": [words(5), words(6), words(8)],
        "num_correct": 1,
        "total_completions": 4,
    },
    {
        "id": "r2",
        "subset": "Factuality",
        "prompt": words(3),
        "chosen": [words(4)],
        "rejected": [words(5), words(7), words(8)],
        "num_correct": 1,
        "total_completions": 4,
    },
]
CANDIDATES = [
    {"id": "c1", "prompt": words(3), "candidates": [words(4), words(5)], "correct": [True, False]},
    {"id": "c2", "prompt": words(3), "candidates": [words(6), words(7)], "correct": [False, True]},
]

# (model poisoning, command, rows, message fragment naming the source)
CASES = [
    pytest.param(
        "nan-head",
        "eval",
        PAIRS,
        'gives nan (not a finite number) for data.jsonl:1 (id "a", chosen)',
        id="nan-head-pairs",
    ),
    pytest.param(
        "inf-head",
        "eval",
        PAIRS,
        '(not a finite number) for data.jsonl:1 (id "a", chosen)',
        id="inf-head-pairs",
    ),
    pytest.param("inf-w7", "eval", PAIRS, 'for data.jsonl:2 (id "b", rejected)', id="one-token-pairs"),
    pytest.param("inf-w7", "eval", AUTOJ, "for data.jsonl:2 (id", id="one-token-autoj-after-a-tie"),
    pytest.param(
        "nan-head", "eval", RB2, 'for data.jsonl:1 (id "r1", chosen[0])', id="nan-head-rewardbench2"
    ),
    pytest.param(
        "inf-w7", "eval", RB2, 'for data.jsonl:2 (id "r2", rejected[1])', id="one-token-rewardbench2"
    ),
    pytest.param(
        "nan-head", "bon", CANDIDATES, 'for data.jsonl:1 (id "c1", candidates[0])', id="nan-head-bon"
    ),
    pytest.param(
        "inf-w7", "bon", CANDIDATES, 'for data.jsonl:2 (id "c2", candidates[1])', id="one-token-bon"
    ),
]


@pytest.mark.parametrize(("how", "command", "rows", "fragment"), CASES)
def test_non_finite_reward_stops_naming_model_and_source(
    tmp_path: Path, how: str, command: str, rows: list[dict], fragment: str
) -> None:
    folder = poisoned(tmp_path, how)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out.json"
    flag = ["--pairs", str(data)] if command == "eval" else ["--candidates", str(data), "--n", "1,2"]
    result = CliRunner().invoke(main, [command, str(folder), *flag, "--out", str(out)])
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert line.startswith(f"Error: {folder}: the reward model gives "), line
    assert fragment.replace("data.jsonl", str(data)) in line, line
    assert "\n" not in line
    assert not out.exists()


def test_in_memory_merge_names_the_merge(tmp_path: Path) -> None:
    folder = poisoned(tmp_path, "nan-head")
    domain = save_model(tmp_path / "sft", "llama", False, 2, None, vocab_size=len(BASE_WORDS))
    data = write_jsonl(tmp_path / "data.jsonl", PAIRS)
    result = CliRunner().invoke(
        main, ["eval", str(folder), str(domain), "--alpha", "0.5", "--pairs", str(data)]
    )
    assert result.exit_code == 1, result.output
    assert f"{folder} (merged in memory): the reward model gives nan" in result.output
    assert f'{data}:1 (id "a", chosen)' in result.output


def test_score_texts_carries_the_index(tmp_path: Path) -> None:
    from lazymerge.errors import NonFiniteRewardError
    from lazymerge.evaluation.rewards import load_reward_model

    rm = load_reward_model(poisoned(tmp_path, "inf-w7"))
    texts = [rm.format_text(words(3), words(i)) for i in (4, 5, 7, 4)]
    with pytest.raises(NonFiniteRewardError) as info:
        rm.score_texts(texts)
    assert info.value.index == 2 and info.value.text == texts[2] and math.isnan(info.value.value)


def test_text_source_names_file_and_line(tmp_path: Path) -> None:
    """What the sweep uses to name the text of a NonFiniteRewardError."""
    from lazymerge.evaluation.scoring import load_candidates, load_preferences, text_source

    pairs = load_preferences(write_jsonl(tmp_path / "p.jsonl", PAIRS)).pairs
    rb2 = load_preferences(write_jsonl(tmp_path / "r.jsonl", RB2)).rewardbench2
    sets = load_candidates(write_jsonl(tmp_path / "c.jsonl", CANDIDATES))

    def fmt(prompt: str, response: str) -> str:
        return f"[{prompt}|{response}]"

    sources = [(tmp_path / "p.jsonl", pairs), (tmp_path / "r.jsonl", rb2), (tmp_path / "c.jsonl", sets)]
    assert (
        text_source(sources, fmt(words(3), words(7)), fmt) == f'{tmp_path / "p.jsonl"}:2 (id "b", rejected)'
    )
    assert (
        text_source(sources[1:], fmt(words(3), words(8)), fmt)
        == f'{tmp_path / "r.jsonl"}:1 (id "r1", rejected[2])'
    )
    assert (
        text_source(sources[2:], fmt(words(3), words(6)), fmt)
        == f'{tmp_path / "c.jsonl"}:2 (id "c2", candidates[0])'
    )
    assert text_source(sources, "nowhere", fmt) is None


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(
            lambda path, doc: path.write_bytes(
                __import__("lazymerge.evaluation.run", fromlist=["x"]).report_bytes(doc)
            ),
            id="cli-out",
        ),
        pytest.param(
            lambda path, doc: __import__("lazymerge.evaluation.sweep", fromlist=["x"])._append(path, doc),
            id="sweep-results",
        ),
    ],
)
def test_reports_are_strict_json(tmp_path: Path, write) -> None:
    path = tmp_path / "r.json"
    with pytest.raises(ValueError, match="not JSON compliant"):
        write(path, {"reward": float("nan")})
    assert not path.exists() or "NaN" not in path.read_text()
    write(path, {"reward": 1.5})
    text = path.read_text()
    assert json.loads(text if text.count("\n") > 1 else text.strip()) == {"reward": 1.5}


@pytest.mark.parametrize("write", [False, True], ids=["in-memory", "written"])
def test_sweep_stops_naming_the_text_and_the_point(tmp_path: Path, write: bool) -> None:
    """The first point a sweep scores (alpha=0, the reward model alone) gives texts holding w7 a
    NaN reward: the sweep stops in one line naming the model, the data file, line, id and place,
    and the point, exit 1, and records no point (rerun, it is scored again, not reported)."""
    pytest.importorskip("matplotlib")
    from lazymerge.evaluation.sweep import read_results

    folder = poisoned(tmp_path, "inf-w7")
    domain = save_model(tmp_path / "sft", "llama", False, 2, None, vocab_size=len(BASE_WORDS))
    data = write_jsonl(tmp_path / "data.jsonl", PAIRS)
    out = tmp_path / "s"
    args = ["sweep", str(folder), str(domain), "--pairs", str(data), "-o", str(out), "-q"]
    model = out / "models" / "alpha-0" if write else f"{folder} (merged in memory)"
    for _ in range(2):
        result = CliRunner().invoke(main, [*args, "--alpha", "0,0.5", *(["--write"] if write else [])])
        assert result.exit_code == 1, result.output
        line = result.output.strip().splitlines()[-1]
        assert line.startswith(f"Error: {model}: the reward model gives nan"), line
        assert f'for {data}:2 (id "b", rejected) at sweep point alpha=0;' in line, line
        _, done, _ = read_results(out / "results.jsonl")
        assert done == {}
