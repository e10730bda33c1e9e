"""Layer-streamed scoring through the prefix cache (`evaluation.stream_prefix`): the rewards of
the in-memory prefix path to the bit (Llama, Mistral with a sliding window shorter than the
texts, Qwen2; fp32, bf16 and 4-bit NF4), with a `[PAD]`-grown vocabulary, hidden states spilled,
from a merge and from a folder; the same tokens computed; a model the cache path refuses falls
back to whole texts as the in-memory path does; and fp32 within 1e-5 relative of transformers'
own forward of each whole text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lazymerge.evaluation.in_memory import load_merged_reward_model
from lazymerge.evaluation.layer_stream import (
    LayerStreamedModel,
    predict_stream,
    stream_folder,
    stream_merge,
)
from lazymerge.evaluation.prefix_scoring import ScoringStats
from lazymerge.evaluation.rewards import RewardModel, load_reward_model
from lazymerge.evaluation.stream_prefix import STREAM_PREFIX_PATH
from lazymerge.options import MergeOptions
from lazymerge.score_options import ScoreOptions
from tests.helpers.evaluation import CHAT_TEMPLATE, words
from tests.helpers.models import BASE_WORDS, assert_carries_signal, make_tokenizer, save_model, transformers

#: Small batches, so nodes of different prompts share batches and most batches pad.
BATCH_SIZE, BATCH_TOKENS = 3, 40
MERGE = MergeOptions(alphas=(0.35,), max_memory=8192)
#: The system prompt every text starts with: the tree's shared root.
SYSTEM = words(*range(10, 28))
#: family and config overrides: Mistral's window (8) is shorter than every text
FAMILIES = {"llama": {}, "mistral-window": {"sliding_window": 8}, "qwen2": {}}


def pair_of_models(tmp_path: Path, name: str, **sizes: object) -> tuple[Path, Path]:
    """A reward model and a domain model whose vocabulary is reordered and grows `[PAD]` (the
    merge matches embedding rows by token and appends `[PAD]`)."""
    family = name.split("-")[0]
    overrides = {**FAMILIES[name], "max_position_embeddings": 256, **sizes}
    rm_tok = make_tokenizer(BASE_WORDS, added=["<rm_only>"], family=family)
    rm_tok.chat_template = CHAT_TEMPLATE
    rm = save_model(tmp_path / "rm", family, True, 1, rm_tok, **overrides)
    reordered = BASE_WORDS[:3] + list(reversed(BASE_WORDS[3:]))
    sft_tok = make_tokenizer(reordered, added=["[PAD]"], family=family)
    sft = save_model(tmp_path / "sft", family, False, 2, sft_tok, **overrides)
    return rm, sft


def texts_of(scorer: RewardModel, seed: int = 0, extra: str = "") -> list[str]:
    """Pairs sharing a long prompt and best-of-4 sets (two candidates sharing their opening),
    all after one system prompt; `extra` (e.g. `[PAD]`) in some responses."""
    rng = random.Random(seed)

    def some(low: int, high: int) -> list[int]:
        return [rng.randrange(3, 37) for _ in range(rng.randrange(low, high))]

    texts = []
    for i in range(4):  # pairs: a prompt of 16+ tokens, so its node saves enough to be shared
        prompt = words(*some(16, 20))
        for _ in range(2):
            texts.append(
                scorer.format_text(prompt, words(*some(1, 8)) + (f" {extra}" if extra and i % 2 else ""))
            )
    for _ in range(3):  # best of 4
        prompt, opening = words(*some(6, 10)), some(5, 6)
        texts += [scorer.format_text(prompt, words(*opening, *some(1, 6))) for _ in range(2)]
        texts += [
            scorer.format_text(prompt, words(*some(1, 9)) + (f" {extra}" if extra else "")) for _ in range(2)
        ]
    return texts


def in_memory(scorer: RewardModel, texts: list[str]) -> tuple[dict[str, list[int]], dict[str, float]]:
    """The in-memory model's encodings and rewards through its prefix path."""
    encoded = scorer.encode_all(texts)
    rewards = scorer.score_encoded(encoded)
    stats = scorer.scoring_stats
    assert stats is not None and stats.path == "prefix tree" and stats.fallback is None
    assert_carries_signal(scorer.tokenizer, texts, [rewards[t] for t in texts])
    return encoded, rewards


def assert_same_work(stream: ScoringStats | None, memory: ScoringStats | None) -> None:
    """The stream computed what the in-memory prefix path computed, batch for batch."""
    assert stream is not None and memory is not None
    assert stream.path == STREAM_PREFIX_PATH and stream.fallback is None
    fields = ("texts", "tokens_in_texts", "ideal_tokens", "tokens_computed", "padded_tokens", "batches")
    assert [getattr(stream, f) for f in fields] == [getattr(memory, f) for f in fields]
    assert stream.tokens_computed < 0.6 * stream.tokens_in_texts  # prefixes were shared
    assert stream.padded_tokens > stream.tokens_computed  # padding was there to get wrong


def scored(
    model: LayerStreamedModel, encoded: dict[str, list[int]], budget: int = BATCH_TOKENS
) -> dict[str, float]:
    """The stream's rewards, after checking its batches hold what there is to get wrong: rows
    whose pasts differ in length (left-padded) and rows of different widths (right-padded)."""
    walk, _ = model.prefix_walk(encoded, budget, BATCH_SIZE)
    assert walk is not None
    assert any(len({n.start for n in batch}) > 1 for batch in walk.batches if min(n.start for n in batch))
    assert any(len(set(inputs.lengths)) > 1 for inputs in walk.inputs)
    return model.score_encoded(encoded, budget, BATCH_SIZE)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_prefix_rewards_equal_the_in_memory_prefix_path(
    tmp_path: Path, name: str, dtype: str
) -> None:
    rm, sft = pair_of_models(tmp_path, name)
    budget = BATCH_TOKENS * (4 if name == "qwen2" else 1)  # byte-level BPE: about 4 tokens a word
    score = ScoreOptions(dtype=dtype, system_prompt=SYSTEM, batch_size=BATCH_SIZE, batch_tokens=budget)
    merged = load_merged_reward_model([rm, sft], MERGE, score)
    texts = texts_of(merged, extra="[PAD]")
    assert merged.tokenizer.convert_tokens_to_ids("[PAD]") in {i for t in texts for i in merged.encode(t)}
    encoded, want = in_memory(merged, texts)
    model = stream_merge([rm, sft], MERGE, score, max_activations=2048)
    prediction = predict_stream(model, encoded, budget, BATCH_SIZE)
    assert scored(model, encoded, budget) == want  # bit-identical
    assert_same_work(model.scoring_stats, merged.scoring_stats)
    stream = model.stream_stats
    assert stream is not None and stream.spilled_activation_bytes > 0
    assert (stream.resident_activation_bytes, stream.spilled_activation_bytes) == (
        prediction.resident_activation_bytes,
        prediction.spill_bytes,
    )
    # nodes' keys and values were held for their children, within the prediction
    assert 0 < stream.peak_prefix_kv_bytes <= prediction.prefix_kv_bytes

    folder = load_reward_model(rm, score)
    encoded, want = in_memory(folder, texts_of(folder, seed=1, extra="<rm_only>"))
    streamed = stream_folder(rm, score, max_activations=0)
    assert scored(streamed, encoded, budget) == want
    assert_same_work(streamed.scoring_stats, folder.scoring_stats)


def test_streamed_prefix_fp32_equals_transformers_whole_text_forward(tmp_path: Path) -> None:
    """An independent reference: transformers' own model, one unpadded forward per whole text."""
    rm, _ = pair_of_models(tmp_path, "qwen2")
    scorer = load_reward_model(
        rm, stream_layers=True, system_prompt=SYSTEM, batch_size=BATCH_SIZE, batch_tokens=BATCH_TOKENS
    )
    assert isinstance(scorer.model, LayerStreamedModel)
    texts = texts_of(scorer, seed=2)
    got = scorer.score_texts(texts)
    assert scorer.scoring_stats is not None and scorer.scoring_stats.path == STREAM_PREFIX_PATH
    model = transformers.AutoModelForSequenceClassification.from_pretrained(rm).eval()
    tok = transformers.AutoTokenizer.from_pretrained(rm)
    with torch.no_grad():
        want = [float(model(input_ids=tok(t, return_tensors="pt").input_ids).logits[0, 0]) for t in texts]
    assert_carries_signal(tok, texts, want)
    scale = max(abs(w) for w in want)
    assert all(abs(g - w) <= 1e-5 * max(abs(w), 1e-2 * scale) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_streamed_prefix_equals_the_in_memory_quantized_prefix_path(
    tmp_path: Path, quant: str
) -> None:
    """NF4 (and int8) through bitsandbytes' CPU backend: each layer quantized as it arrives, the
    rewards those of the model quantized in memory and scored through the prefix cache, to the bit."""
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU kernels take rows of at least one 64-element block
    rm, _ = pair_of_models(tmp_path, "llama", hidden_size=64, intermediate_size=128)
    load = {"quant": quant, "system_prompt": SYSTEM, "batch_size": BATCH_SIZE, "batch_tokens": BATCH_TOKENS}
    whole = load_reward_model(rm, **load)
    texts = texts_of(whole, seed=3)
    want = whole.score_texts(texts)
    assert whole.scoring_stats is not None and whole.scoring_stats.path == "prefix tree"
    assert_carries_signal(whole.tokenizer, texts, want)
    streamed = load_reward_model(rm, stream_layers=True, **load)
    assert isinstance(streamed.model, LayerStreamedModel)
    assert streamed.score_texts(texts) == want
    assert_same_work(streamed.scoring_stats, whole.scoring_stats)


def test_a_model_the_cache_path_refuses_is_streamed_whole_text_by_whole_text(tmp_path: Path) -> None:
    """A config asking for bidirectional attention: the in-memory path scores whole texts, saying
    why; the stream falls back in the same words, to the same rewards."""
    rm, _ = pair_of_models(tmp_path, "mistral-window", is_causal=False)
    load = {"system_prompt": SYSTEM, "batch_size": BATCH_SIZE, "batch_tokens": BATCH_TOKENS}
    whole = load_reward_model(rm, **load)
    texts = texts_of(whole, seed=4)
    want = whole.score_texts(texts)
    assert_carries_signal(whole.tokenizer, texts, want)
    memory = whole.scoring_stats
    assert memory is not None and memory.path == "whole texts"
    assert memory.fallback is not None and "bidirectional" in memory.fallback
    streamed = load_reward_model(rm, stream_layers=True, **load)
    assert streamed.score_texts(texts) == want
    stats = streamed.scoring_stats
    assert stats is not None and stats.path == "layer-streamed whole texts"
    assert stats.fallback == memory.fallback and stats.format().count(memory.fallback) == 1
    assert stats.tokens_computed == stats.tokens_in_texts


def test_eval_stream_layers_scores_through_the_prefix_tree(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lazymerge.cli import main

    rm, sft = pair_of_models(tmp_path, "llama")
    scorer = load_reward_model(rm)
    rows = []
    for i, text in enumerate(texts_of(scorer, seed=5)[:8:2]):
        prompt = " ".join(f"w{3 + (i + k) % 30}" for k in range(18))
        rows.append({"prompt": prompt, "chosen": text.split()[-3], "rejected": f"w{5 + i} w{9 + i}"})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = []
    for extra in ([], ["--stream-layers", "--max-activations", "1KB"]):
        out = tmp_path / f"r{len(docs)}.json"
        args = ["eval", str(rm), str(sft), "--alpha", "0.35", "--pairs", str(pairs), "--out", str(out), "-q"]
        result = CliRunner().invoke(main, [*args, *extra])
        assert result.exit_code == 0, result.output
        docs.append(json.loads(out.read_text()))
    memory, streamed = (json.dumps(doc) for doc in docs)
    assert '"path": "prefix tree"' in memory and f'"path": "{STREAM_PREFIX_PATH}"' in streamed
    assert docs[1]["settings"]["stream_layers"] is True
    assert docs[0]["pairs"] == docs[1]["pairs"]  # the same rewards, to the bit
