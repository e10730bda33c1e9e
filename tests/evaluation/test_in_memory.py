"""A merged reward model built in memory scores exactly like `lazymerge run` + `lazymerge eval`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lazymerge import merge
from lazymerge.errors import InputError, OptionError
from lazymerge.evaluation.in_memory import load_merged_reward_model
from lazymerge.evaluation.rewards import load_reward_model
from lazymerge.options import MergeOptions
from tests.helpers.models import (
    BASE_WORDS,
    assert_carries_signal,
    make_tokenizer,
    save_model,
    scored_texts,
    tokenizer_size,
)

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}w1 {{ m['content'] }} w2 "
    "{% else %}{{ m['content'] }} </s>{% endif %}{% endfor %}"
)
TEXTS = [("w3 w4", "w5 w6 w7"), ("w8", "w9 [PAD] w10"), ("w11 w12 w13", "w14")]


def pair_of_models(
    tmp_path: Path, family: str, dtype: torch.dtype = torch.float32, **sizes
) -> tuple[Path, Path]:
    rm_tok = make_tokenizer(BASE_WORDS, added=["<rm_only>"], family=family)
    rm_tok.chat_template = TEMPLATE
    rm = save_model(tmp_path / "rm", family, True, 1, rm_tok, dtype=dtype, **sizes)
    # the domain model's vocabulary is reordered and grows a [PAD] token, as MetaMath-7B's does
    words = BASE_WORDS[:3] + list(reversed(BASE_WORDS[3:]))
    sft_tok = make_tokenizer(words, added=["[PAD]"], family=family)
    sft = save_model(tmp_path / "sft", family, False, 2, sft_tok, dtype=dtype, **sizes)
    return rm, sft


def rewards(rm) -> list[float]:
    """The rewards of TEXTS, checked to carry a signal (distinct ids, unequal rewards)."""
    texts = [rm.format_text(p, r) for p, r in TEXTS]
    scores = rm.score_texts(texts)
    assert_carries_signal(rm.tokenizer, texts, scores)
    return scores


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_memory_rewards_equal_run_then_eval(tmp_path: Path, family: str, dtype: str) -> None:
    rm, sft = pair_of_models(tmp_path, family)
    out = tmp_path / "merged"
    merge([rm, sft], out, alpha=0.35, max_memory=8192)
    written = load_reward_model(out, dtype=dtype)
    in_memory = load_merged_reward_model(
        [rm, sft], MergeOptions(alphas=(0.35,), max_memory=8192), dtype=dtype
    )
    assert in_memory.tokenizer.convert_tokens_to_ids("[PAD]") == written.tokenizer.convert_tokens_to_ids(
        "[PAD]"
    )
    rows = tokenizer_size(BASE_WORDS, family, added=["<rm_only>", "[PAD]"])
    assert written.model.config.vocab_size == in_memory.model.config.vocab_size == rows
    for name, value in written.model.state_dict().items():
        assert torch.equal(in_memory.model.state_dict()[name], value), name
    assert rewards(in_memory) == rewards(written)  # bit-identical


def test_signal_check_rejects_the_word_level_fixture_under_qwen2(tmp_path: Path) -> None:
    """The old fixture: a word-level tokenizer in a Qwen2 folder. transformers 5 loads it as
    Qwen2Tokenizer, which rebuilds a byte-level BPE from the word vocabulary and maps every
    word to nothing; all rewards were then equal, and every comparison held trivially."""
    word_level = make_tokenizer(BASE_WORDS, added=["<rm_only>"])
    word_level.chat_template = TEMPLATE
    with pytest.raises(AssertionError, match="Qwen2Tokenizer"):  # the fixture's own check
        save_model(tmp_path / "checked", "qwen2", True, 1, word_level)
    folder = save_model(tmp_path / "rm", "qwen2", True, 1, word_level, check_tokenizer=False)
    rm = load_reward_model(folder)
    assert type(rm.tokenizer).__name__ == "Qwen2Tokenizer"
    texts = [rm.format_text(p, r) for p, r in TEXTS]
    scores = rm.score_texts(texts)
    assert len(set(scores)) == 1  # what the old comparisons compared
    with pytest.raises(AssertionError, match="at most one id besides specials"):
        assert_carries_signal(rm.tokenizer, texts, scores)
    # the byte-level fixture passes; equal rewards alone are refused too
    good = load_reward_model(pair_of_models(tmp_path / "good", "qwen2")[0])
    texts = [good.format_text(p, r) for p, r in TEXTS]
    assert_carries_signal(good.tokenizer, texts, good.score_texts(texts))
    with pytest.raises(AssertionError, match="every reward is 0.5"):
        assert_carries_signal(good.tokenizer, texts, [0.5] * len(texts))
    with pytest.raises(AssertionError, match="every text tokenizes to"):
        assert_carries_signal(good.tokenizer, [texts[0]] * 2, [0.0, 1.0])


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_in_memory_quantized_close_to_bf16(tmp_path: Path, quant: str) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU kernels need rows of at least one 64-element block
    rm, sft = pair_of_models(tmp_path, "llama", hidden_size=64, intermediate_size=128)
    options = MergeOptions(alphas=(0.3,))
    bf16 = rewards(load_merged_reward_model([rm, sft], options, dtype="bfloat16"))
    quantized = load_merged_reward_model([rm, sft], options, quant=quant, double_quant=True)
    layer = bnb.nn.Linear4bit if quant == "4bit" else bnb.nn.Linear8bitLt
    assert any(isinstance(m, layer) for m in quantized.model.modules())
    assert not isinstance(quantized.model.score, layer)  # the reward head is not quantized
    got = rewards(quantized)
    scale = max(abs(r) for r in bf16) + 1e-3
    assert all(abs(a - b) <= 0.25 * scale for a, b in zip(got, bf16, strict=True)), (got, bf16)


def test_in_memory_refusals(tmp_path: Path) -> None:
    rm, sft = pair_of_models(tmp_path, "llama")
    with pytest.raises(OptionError, match="one --alpha"):
        load_merged_reward_model([rm, sft], MergeOptions(alphas=(0.1, 0.2)))
    plain = save_model(tmp_path / "lm", "llama", False, 3, make_tokenizer(BASE_WORDS))
    other = save_model(tmp_path / "lm2", "llama", False, 4, make_tokenizer(BASE_WORDS))
    with pytest.raises(InputError, match="no input is a reward model"):
        load_merged_reward_model([plain, other], MergeOptions(alphas=(0.5,)))


def test_eval_of_several_folders_scores_the_merge_without_writing(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    rm, sft = pair_of_models(tmp_path, "llama")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": r, "rejected": "w20 w21", "subset": "s"}) + "\n"
            for p, r in TEXTS
        )
    )
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lazymerge",
            "eval",
            str(rm),
            str(sft),
            "--alpha",
            "0.3",
            "--pairs",
            str(pairs),
            "--out",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    # no checkpoint written: only the report and its folder's manifest of what lazymerge wrote
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        [*before, "r.json", ".lazymerge-outputs.json"]
    )
    merge([rm, sft], tmp_path / "m", alpha=0.3)
    written = subprocess.run(
        [
            sys.executable,
            "-m",
            "lazymerge",
            "eval",
            str(tmp_path / "m"),
            "--pairs",
            str(pairs),
            "--out",
            str(tmp_path / "w.json"),
            "-q",
        ],
        capture_output=True,
        text=True,
    )
    assert written.returncode == 0, written.stderr
    got, want = json.loads(out.read_text()), json.loads((tmp_path / "w.json").read_text())
    assert_carries_signal(tmp_path / "m", *scored_texts(pairs, want))
    assert got["pairs"] == want["pairs"] and got["merged_in_memory"]["alpha"] == 0.3
    proc = subprocess.run(
        [sys.executable, "-m", "lazymerge", "eval", str(rm), "--alpha", "0.3", "--pairs", str(pairs)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "several MODEL folders" in proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant", [None, "4bit"])
def test_in_memory_on_cuda_close_to_cpu(tmp_path: Path, quant: str | None) -> None:
    rm, sft = pair_of_models(tmp_path, "llama", hidden_size=64, intermediate_size=128)
    options = MergeOptions(alphas=(0.3,))
    cpu = rewards(load_merged_reward_model([rm, sft], options, dtype="bfloat16"))
    gpu_model = load_merged_reward_model([rm, sft], options, device="cuda", dtype="bfloat16", quant=quant)
    assert next(gpu_model.model.parameters()).device.type == "cuda"
    got = rewards(gpu_model)
    scale = max(abs(r) for r in cpu) + 1e-3
    assert all(abs(a - b) <= 0.25 * scale for a, b in zip(got, cpu, strict=True)), (got, cpu)


def test_misaligned_weights_are_copied_into_aligned_memory() -> None:
    """Weights mapped from a file start where its header says; `own_aligned_memory` copies them
    to 64-byte aligned memory (the CPU kernels round by alignment) and leaves aligned ones be."""
    from lazymerge.evaluation.rewards import own_aligned_memory
    from lazymerge.memory import CPU_ALIGNMENT

    layer = torch.nn.Linear(16, 4)
    buffer = torch.randn(4 * 16 + 1)
    layer.weight.data = buffer[1:].view(4, 16)  # 4 bytes past an aligned start
    want = layer.weight.detach().clone()
    assert layer.weight.data_ptr() % CPU_ALIGNMENT != 0
    aligned_bias = layer.bias.data_ptr()
    assert own_aligned_memory(layer) == 1
    assert layer.weight.data_ptr() % CPU_ALIGNMENT == 0 and layer.bias.data_ptr() == aligned_bias
    assert torch.equal(layer.weight, want) and isinstance(layer.weight, torch.nn.Parameter)
