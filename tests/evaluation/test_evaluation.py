"""Reward evaluation: rewards equal transformers' own forward pass; accuracy, sections, best-of-N."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lazymerge.errors import InputError, MissingDependencyError
from lazymerge.evaluation.rewards import LLAMA2_SYSTEM_PROMPT, load_reward_model
from lazymerge.evaluation.run import evaluate_bon, evaluate_pairs
from lazymerge.evaluation.scoring import (
    Pair,
    best_of_n,
    extract_answer,
    load_candidates,
    load_pairs,
    pair_results,
)
from tests.helpers.evaluation import direct_reward, reward_model, words, write_jsonl
from tests.helpers.models import BASE_WORDS, assert_carries_signal, make_tokenizer, save_model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_rewards_equal_unpadded_forward_in_mixed_batches(tmp_path: Path, family: str) -> None:
    folder = reward_model(tmp_path, family=family)
    rm = load_reward_model(folder, batch_size=4, system_prompt=None)
    responses = [words(3), words(4, 5, 6, 7, 8, 9, 10), words(11, 12), words(13, 14, 15, 16), words(3)]
    texts = [rm.format_text(words(20, 21), r) for r in responses]
    assert texts[0] == "w1 w20 w21 w2 w3 </s>"
    rewards = rm.score_texts(texts)
    assert_carries_signal(rm.tokenizer, texts, rewards)
    assert rewards[0] == rewards[4]  # equal texts, equal rewards
    for text, reward in zip(texts, rewards, strict=True):
        assert reward == pytest.approx(direct_reward(folder, text), abs=1e-5)
    alone = load_reward_model(folder, batch_size=1).score_texts(texts)
    assert rewards == pytest.approx(alone, abs=1e-5)


def test_formats_system_prompt_truncation(tmp_path: Path) -> None:
    rm = load_reward_model(reward_model(tmp_path), system_prompt=LLAMA2_SYSTEM_PROMPT, max_length=5)
    assert rm.format_text("w5", "w6").startswith("<s> You are a helpful, respectful and honest assistant.")
    assert len(rm.encode(rm.format_text(words(*range(3, 30)), "w6"))) == 5
    assert rm.encode("w1 w2 w3 w4 w5 w6 w7")[-1] == rm.tokenizer.convert_tokens_to_ids(
        "w7"
    )  # cut from the left
    plain = load_reward_model(reward_model(tmp_path, "plain", template=False), system_prompt="w9")
    assert plain.format_text("w5", "w6") == "w9\n\nUser: w5\n\nAssistant: w6</s>"


def test_pair_accuracy_ties_and_sections() -> None:
    names = ["alpacaeval-easy"] * 2 + ["mt-bench-hard"] + ["math-prm"] * 2 + ["hep-python", "hep-go"]
    pairs = [Pair(str(i), s, "p", "c", "r") for i, s in enumerate(names)]
    chosen = [1.0, 0.0, 2.0, 1.0, 1.0, 3.0, 0.5]
    rejected = [0.0, 0.0, 1.0, 2.0, 0.0, 1.0, 0.5]
    result = pair_results(pairs, chosen, rejected)
    assert result["n_pairs"] == 7 and result["n_ties"] == 2
    assert result["accuracy"] == pytest.approx(4 / 7)
    assert result["subsets"]["alpacaeval-easy"] == {"accuracy": 0.5, "n": 2, "ties": 1}
    sections = result["sections"]
    assert sections["Chat"] == 0.5 and sections["Chat Hard"] == 1.0
    assert sections["Reasoning"] == pytest.approx(0.5 * 0.5 + 0.5 * (1.0 + 0.0) / 2)
    assert "Safety" not in sections and sections["mean"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert result["pairs"][0] == {
        "id": "0",
        "subset": "alpacaeval-easy",
        "chosen_reward": 1.0,
        "rejected_reward": 0.0,
    }


def test_autoj_pairs(tmp_path: Path) -> None:
    rows = [
        {"scenario": "math_reasoning", "label": 0, "prompt": "p", "response 1": "good", "response 2": "bad"},
        {"scenario": "code_generation", "label": 1, "prompt": "p", "response 1": "bad", "response 2": "good"},
        {"scenario": "chitchat", "label": 2, "prompt": "p", "response 1": "a", "response 2": "b"},
        {"scenario": "explaining_code", "label": 0, "prompt": "p", "response 1": "good", "response 2": "bad"},
    ]
    pairs, ties = load_pairs(write_jsonl(tmp_path / "autoj.jsonl", rows))
    assert ties == 1 and [p.subset for p in pairs] == ["Math", "Code", "Code"]
    assert all(p.chosen == "good" and p.rejected == "bad" for p in pairs)
    with pytest.raises(InputError, match="expected prompt/chosen/rejected"):
        load_pairs(write_jsonl(tmp_path / "bad.jsonl", [{"question": 1}]))


def test_gsm8k_answers_and_best_of_n(tmp_path: Path) -> None:
    assert extract_answer("so 3 + 4 = 7. The answer is 1,234.") == 1234
    assert extract_answer("The answer is -5 and then 9") == -5
    assert extract_answer("first 3, then 12.5") == 12.5
    assert extract_answer("no numbers") is None
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "prompt": "q1",
                "candidates": ["The answer is 5", "The answer is 6", "it is 6", "The answer is 7"],
                "answer": "6",
            },
            {"prompt": "q2", "candidates": ["a", "b", "c", "d"], "correct": [False, False, True, False]},
        ],
    )
    sets = load_candidates(path)
    assert sets[0].correct == [False, True, True, False]
    rewards = [[1.0, 1.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0]]  # ties go to the earliest candidate
    result = best_of_n(sets, rewards, [2, 4])
    assert result["2"] == {"accuracy": 0.0, "oracle": 0.5, "majority": 0.0, "n_prompts": 2}
    assert result["4"]["accuracy"] == 0.0 and result["4"]["oracle"] == 1.0 and result["4"]["majority"] == 0.5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_eval_end_to_end_and_cli(tmp_path: Path, family: str) -> None:
    from click.testing import CliRunner

    from lazymerge.cli import main

    folder = reward_model(tmp_path, family=family)
    rows = [
        {
            "prompt": words(3, 4),
            "chosen": words(5 + i),
            "rejected": words(9 + i),
            "subset": "math-prm",
            "id": f"p{i}",
        }
        for i in range(4)
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = evaluate_pairs(folder, pairs)
    rm = load_reward_model(folder)
    texts = [rm.format_text(row["prompt"], row[side]) for row in rows for side in ("chosen", "rejected")]
    scored = [entry[f"{side}_reward"] for entry in result["pairs"] for side in ("chosen", "rejected")]
    assert_carries_signal(rm.tokenizer, texts, scored)
    for entry, row in zip(result["pairs"], rows, strict=True):
        assert entry["chosen_reward"] == pytest.approx(
            direct_reward(folder, rm.format_text(row["prompt"], row["chosen"])), abs=1e-5
        )
    out = tmp_path / "results.json"
    cli = CliRunner().invoke(main, ["eval", str(folder), "--pairs", str(pairs), "--out", str(out)])
    assert cli.exit_code == 0, cli.output
    assert "math-prm" in cli.output and json.loads(out.read_text())["n_pairs"] == 4
    candidates = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "prompt": "w3",
                "candidates": [words(5), words(6), words(7), words(8)],
                "correct": [True, False, False, True],
            }
        ],
    )
    bon = evaluate_bon(folder, candidates, [2, 4])
    assert set(bon["best_of_n"]) == {"2", "4"} and bon["best_of_n"]["4"]["oracle"] == 1.0


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_on_cpu_close_to_bf16(tmp_path: Path, quant: str) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    folder = save_model(
        tmp_path / "rm", "llama", True, 3, make_tokenizer(BASE_WORDS), hidden_size=64, intermediate_size=128
    )
    texts = [words(3, 4, 5), words(6, 7, 8, 9, 10, 11), words(12, 13)]
    reference = load_reward_model(folder, dtype="bfloat16")
    bf16 = reference.score_texts(texts)
    assert_carries_signal(reference.tokenizer, texts, bf16)
    quantized = load_reward_model(folder, quant=quant, double_quant=True)
    layer = bnb.nn.Linear4bit if quant == "4bit" else bnb.nn.Linear8bitLt
    assert any(isinstance(m, layer) for m in quantized.model.modules())
    assert not isinstance(quantized.model.score, layer)  # the reward head is not quantized
    rewards = quantized.score_texts(texts)
    scale = max(abs(r) for r in bf16) + 1e-3
    assert all(abs(a - b) <= 0.25 * scale for a, b in zip(rewards, bf16, strict=True)), (rewards, bf16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_four_bit_on_cuda(tmp_path: Path) -> None:
    folder = save_model(
        tmp_path / "rm", "llama", True, 3, make_tokenizer(BASE_WORDS), hidden_size=64, intermediate_size=128
    )
    texts = [words(3, 4, 5), words(6, 7, 8, 9, 10, 11)]
    reference = load_reward_model(folder, dtype="bfloat16")
    ref = reference.score_texts(texts)
    assert_carries_signal(reference.tokenizer, texts, ref)
    got = load_reward_model(folder, device="cuda", quant="4bit").score_texts(texts)
    assert all(abs(a - b) <= 0.25 * (max(abs(r) for r in ref) + 1e-3) for a, b in zip(got, ref, strict=True))


def test_missing_extra_names_pip_command(tmp_path: Path, monkeypatch) -> None:
    import importlib

    real = importlib.import_module

    def no_bnb(name: str, *args):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_bnb)
    with pytest.raises(MissingDependencyError, match=r"pip install 'lazymerge\[eval\]'"):
        load_reward_model(reward_model(tmp_path), quant="4bit")


def test_converters(tmp_path: Path) -> None:
    import subprocess
    import sys

    tool = Path(__file__).resolve().parents[2] / "tools" / "convert_pairs.py"
    rb = tmp_path / "rb.json"
    rb.write_text(
        json.dumps(
            [{"prompt": "p", "chosen": "c", "rejected": "r", "subset": "math-prm", "id": 7, "extra": 1}]
        )
    )
    subprocess.run(
        [sys.executable, str(tool), "rewardbench", str(rb), "-o", str(tmp_path / "rb.jsonl")],
        check=True,
        capture_output=True,
    )
    pairs, _ = load_pairs(tmp_path / "rb.jsonl")
    assert pairs == [Pair("7", "math-prm", "p", "c", "r")]
    aj = write_jsonl(
        tmp_path / "aj.jsonl",
        [
            {
                "scenario": "code_generation",
                "label": 1,
                "prompt": "p",
                "response 1": "bad",
                "response 2": "good",
            },
            {"scenario": "x", "label": 2, "prompt": "p", "response 1": "a", "response 2": "b"},
        ],
    )
    subprocess.run(
        [sys.executable, str(tool), "autoj", str(aj), "-o", str(tmp_path / "aj-pairs.jsonl")],
        check=True,
        capture_output=True,
    )
    pairs, ties = load_pairs(tmp_path / "aj-pairs.jsonl")
    assert ties == 0 and pairs == [Pair("1", "Code", "p", "good", "bad")]
