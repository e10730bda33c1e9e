"""Shared-prefix scoring (`evaluation.prefix_scoring`) against transformers' own forward of each
whole text: Llama, Mistral (a sliding window shorter than the texts) and Qwen2 (byte-level BPE,
and a model mixing sliding and full layers), fp32 within 1e-5 relative, bf16 decisions equal
outside the dtype's noise, 4-bit NF4 against the quantized model's own forward, a `[PAD]`-grown vocabulary, and pairs, best-of-N, RewardBench 2 rows
and a sweep through the public functions with the prefix cache on and off."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lazymerge.evaluation.in_memory import load_merged_reward_model  # noqa: E402
from lazymerge.evaluation.prefix_scoring import (  # noqa: E402
    CONTEXT_PER_TOKEN,
    ScoringStats,
    build_prefix_tree,
    cache_path_refusal,
    distinct_prefix_tokens,
    reward_length,
    token_batches,
    tree_tokens,
)
from lazymerge.evaluation.rewards import RewardModel, load_reward_model  # noqa: E402
from lazymerge.evaluation.run import evaluate_bon, evaluate_pairs  # noqa: E402
from lazymerge.options import MergeOptions  # noqa: E402
from tests.helpers.evaluation import CHAT_TEMPLATE, models, words, write_jsonl  # noqa: E402
from tests.helpers.models import BASE_WORDS, assert_carries_signal, make_tokenizer, save_model  # noqa: E402

#: the system prompt every text starts with (inside the chat template), as LLaMA-2's RM sees Meta's
SYSTEM = words(*range(10, 30))

#: family, config overrides, attention: Mistral's window (8) is shorter than every text; the mixed
#: Qwen2 has a sliding first layer and a full second one
ARCHITECTURES: dict[str, tuple[str, dict, str]] = {
    "llama": ("llama", {}, "sdpa"),
    "llama-eager": ("llama", {}, "eager"),
    "mistral-window": ("mistral", {"sliding_window": 8}, "sdpa"),
    "qwen2": ("qwen2", {}, "sdpa"),
    "qwen2-mixed-window": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
        "sdpa",
    ),
}


def reward_folder(tmp_path: Path, name: str, dtype: torch.dtype = torch.float32, **sizes: int) -> Path:
    family, overrides, _ = ARCHITECTURES[name]
    tok = make_tokenizer(BASE_WORDS, family=family)
    tok.chat_template = CHAT_TEMPLATE
    return save_model(
        tmp_path / name, family, True, 7, tok, dtype=dtype, max_position_embeddings=512, **overrides, **sizes
    )


def scorer(folder: Path, name: str, **load) -> RewardModel:
    """lazymerge's reward model, with the attention implementation `name` asks for."""
    rm = load_reward_model(folder, **load)
    rm.model.set_attn_implementation(ARCHITECTURES[name][2])
    return rm


def candidate_sets(seed: int, prompts: int = 6, per_prompt: int = 4) -> list[tuple[str, list[str]]]:
    """Prompts of 2-9 words, each with `per_prompt` responses of 1-12 words (two of them sharing
    their first words, so the tree nests below the prompt too)."""
    rng = random.Random(seed)
    sets = []
    for _ in range(prompts):
        prompt = words(*(rng.randrange(3, 40) for _ in range(rng.randrange(2, 10))))
        opening = [rng.randrange(3, 40) for _ in range(5)]
        responses = [words(*opening, *(rng.randrange(3, 40) for _ in range(rng.randrange(1, 8))))]
        responses += [
            words(*(rng.randrange(3, 40) for _ in range(rng.randrange(1, 13)))) for _ in range(per_prompt - 1)
        ]
        sets.append((prompt, responses))
    return sets


def whole_text_rewards(
    folder: Path, texts: list[str], dtype: torch.dtype = torch.float32, attention: str = "sdpa"
) -> list[float]:
    """The reference: transformers' own model and tokenizer, one unpadded forward per whole text."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=dtype, attn_implementation=attention
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    out = []
    with torch.no_grad():
        for text in texts:
            out.append(float(model(input_ids=tok(text, return_tensors="pt").input_ids).logits[0, 0]))
    return out


def close(got: float, want: float, scale: float) -> bool:
    """Equal within 1e-5 relative (of the reward, or of the rewards' scale for one near zero)."""
    return abs(got - want) <= 1e-5 * max(abs(want), 1e-2 * scale)


# --- the tree and the batches, pure ---------------------------------------------------------


def test_token_batches_hold_at_most_the_budget_and_the_rows() -> None:
    items = [(50, 0), (40, 0), (40, 10), (30, 0), (10, 0), (10, 0), (5, 0), (200, 0)]
    batches = token_batches(items, batch_tokens=100, batch_size=3)
    assert [i for b in batches for i in b] == list(range(len(items)))  # every item once, in order
    for batch in batches:
        assert len(batch) <= 3
        new = len(batch) * max(items[i][0] for i in batch)
        assert new <= 100 or len(batch) == 1  # a row over the budget is a batch of its own
    assert batches == [[0, 1], [2, 3], [4, 5, 6], [7]]  # 100, 80, 30 (three rows), 200 alone
    # a cached past is not counted as work, only bounded: 4 x the budget of attention context
    assert CONTEXT_PER_TOKEN == 4
    long_past = [(10, 150)] * 3 + [(10, 10)] * 5
    assert token_batches(long_past, batch_tokens=100, batch_size=8) == [[0, 1], [2, 3], [4, 5, 6, 7]]


def test_prefix_tree_gives_every_text_one_node_and_counts_distinct_tokens() -> None:
    sequences = {
        "a": [1, 2, 3, 4, 5],
        "b": [1, 2, 3, 4, 6, 7],
        "c": [1, 2, 3],  # a prefix of a and b: its reward is read inside their shared node
        "d": [1, 2, 3],  # the same ids as c
        "e": [9, 8],
    }
    root = build_prefix_tree(sequences, min_saved=0)
    found: dict[str, list[int]] = {}
    todo = [(root, [])]
    while todo:
        node, prefix = todo.pop()
        ids = [*prefix, *node.ids[node.start : node.end]]
        for text in node.texts:
            found[text] = ids
        todo += [(child, ids) for child in node.children]
    assert found == sequences
    assert distinct_prefix_tokens(list(sequences.values())) == 3 + 1 + 1 + 2 + 2 == tree_tokens(root)
    # folded: the one-token node [4] shared by two texts saves one token, under min_saved
    folded = build_prefix_tree(sequences, min_saved=2)
    assert tree_tokens(folded) == tree_tokens(root) + 1


def test_reward_length_is_the_token_transformers_reads() -> None:
    assert reward_length([5, 6, 2, 2], pad_id=2) == 2  # trailing pad ids (</s> as pad) are not read
    assert reward_length([5, 2, 6], pad_id=2) == 3
    assert reward_length([2, 2], pad_id=2) == 1  # all pad: transformers reads the first token
    assert reward_length([5, 6, 2], pad_id=None) == 3


# --- exactness against transformers ---------------------------------------------------------


def test_score_head_on_the_base_model_equals_the_models_own_logits(tmp_path: Path) -> None:
    folder = reward_folder(tmp_path, "llama")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 5, 9, 13, 7, 21]])
    with torch.no_grad():
        own = model(input_ids=ids).logits[0, 0]
        mine = model.score(model.model(input_ids=ids).last_hidden_state[0, -1])[0]
    assert torch.equal(own, mine)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("batch", [(None, 8), (48, 3)], ids=["default-batches", "small-batches"])
def test_prefix_cache_equals_whole_text_forward_in_fp32(
    tmp_path: Path, name: str, batch: tuple[int | None, int]
) -> None:
    folder = reward_folder(tmp_path, name)
    rm = scorer(folder, name, system_prompt=SYSTEM, batch_tokens=batch[0], batch_size=batch[1])
    assert cache_path_refusal(rm.model) is None
    assert rm.model.config._attn_implementation == ARCHITECTURES[name][2]
    texts = [rm.format_text(p, r) for p, responses in candidate_sets(1) for r in responses]
    got = rm.score_texts(texts)
    want = whole_text_rewards(folder, texts, attention=ARCHITECTURES[name][2])
    assert_carries_signal(rm.tokenizer, texts, want)
    scale = max(abs(w) for w in want)
    bad = [(t, g, w) for t, g, w in zip(texts, got, want, strict=True) if not close(g, w, scale)]
    assert not bad, f"{len(bad)} of {len(texts)} rewards differ, first: {bad[0]}"
    stats = rm.scoring_stats
    assert stats is not None and stats.path == "prefix tree" and stats.fallback is None
    assert stats.texts == len(set(texts))
    # one system prompt, six prompts shared by four answers: most tokens are computed once
    assert stats.ideal_tokens <= stats.tokens_computed <= 1.25 * stats.ideal_tokens
    assert stats.tokens_computed < 0.5 * stats.tokens_in_texts
    assert stats.padded_tokens >= stats.tokens_computed


def assert_decisions_equal_outside_noise(
    got: list[float], want: list[float], per_set: int, noise: float
) -> None:
    """Every pairwise decision and best-of-N pick within each set of `per_set` texts equals the
    reference's, wherever the reference's margin is larger than `noise`."""
    flips = 0
    for k in range(0, len(want), per_set):
        g, w = got[k : k + per_set], want[k : k + per_set]
        for i in range(per_set):
            for j in range(i + 1, per_set):
                if abs(w[i] - w[j]) > noise:  # a pair the reference decides outside the noise
                    flips += (g[i] > g[j]) != (w[i] > w[j])
        top = max(range(per_set), key=lambda i: w[i])
        if all(w[top] - w[i] > noise for i in range(per_set) if i != top):
            assert max(range(per_set), key=lambda i: g[i]) == top  # best-of-N pick
    assert flips == 0


def test_bf16_decisions_equal_outside_the_dtype_noise(tmp_path: Path) -> None:
    folder = reward_folder(tmp_path, "llama", dtype=torch.bfloat16)
    rm = load_reward_model(folder, dtype="bfloat16", system_prompt=SYSTEM)
    assert rm.model.dtype == torch.bfloat16
    sets = candidate_sets(2, prompts=10)
    texts = [rm.format_text(p, r) for p, responses in sets for r in responses]
    got = rm.score_texts(texts)
    want = whole_text_rewards(folder, texts, torch.bfloat16)
    assert_carries_signal(rm.tokenizer, texts, want)
    worst = max(abs(g - w) for g, w in zip(got, want, strict=True))
    scale = max(abs(w) for w in want)
    print(f"bf16: max |reward difference| {worst:.3g} (rewards up to {scale:.3g})")
    # bf16 keeps 8 bits: a few roundings of 2^-8 through two layers, never more
    assert worst <= 0.05 * scale
    assert_decisions_equal_outside_noise(got, want, 4, 2 * worst)


def test_4bit_decisions_equal_the_quantized_models_own_whole_text_forward(tmp_path: Path) -> None:
    """NF4 through bitsandbytes' CPU backend: the cache path against the same quantized model's
    own forward of each whole text (transformers', unpadded, one text a pass)."""
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU kernels take weights whose dimensions are multiples of its blocks
    folder = reward_folder(tmp_path, "llama", hidden_size=64, intermediate_size=128)
    rm = load_reward_model(folder, quant="4bit", system_prompt=SYSTEM)
    assert cache_path_refusal(rm.model) is None
    sets = candidate_sets(3, prompts=10)
    texts = [rm.format_text(p, r) for p, responses in sets for r in responses]
    got = rm.score_texts(texts)
    stats = rm.scoring_stats
    assert stats is not None and stats.path == "prefix tree" and stats.fallback is None
    want = []
    with torch.no_grad():
        for text in texts:
            ids = rm.tokenizer(text, return_tensors="pt").input_ids
            want.append(float(rm.model(input_ids=ids).logits[0, 0]))
    assert_carries_signal(rm.tokenizer, texts, want)
    worst = max(abs(g - w) for g, w in zip(got, want, strict=True))
    scale = max(abs(w) for w in want)
    print(f"4-bit: max |reward difference| {worst:.3g} (rewards up to {scale:.3g})")
    # the weights are the same quantized ones on both paths: only the compute's roundings differ
    assert worst <= 0.05 * scale
    assert_decisions_equal_outside_noise(got, want, 4, 2 * worst)


def test_pad_grown_vocabulary_merged_in_memory(tmp_path: Path) -> None:
    rm_folder, sft = models(tmp_path)  # the SFT model appends [PAD]; the RM has <rm_only>
    options = MergeOptions(alphas=[0.5])
    rm = load_merged_reward_model([rm_folder, sft], options, system_prompt=words(3, 4, 5, 6, 7, 8, 9))
    assert "[PAD]" in rm.tokenizer.get_vocab() and rm.model.config.vocab_size > len(BASE_WORDS) + 1
    pad_row = rm.tokenizer.convert_tokens_to_ids("[PAD]")
    assert pad_row >= len(BASE_WORDS)  # an appended row
    texts = [
        rm.format_text(p, r)
        for p, responses in candidate_sets(3)
        for r in [*responses, f"{responses[0]} [PAD] w7", f"<rm_only> [PAD] {responses[1]}"]
    ]
    got = rm.score_texts(texts)
    want = []
    with torch.no_grad():
        for text in texts:
            ids = rm.tokenizer(text, return_tensors="pt").input_ids
            want.append(float(rm.model(input_ids=ids).logits[0, 0]))
    assert any(pad_row in rm.encode(t) for t in texts)
    assert_carries_signal(rm.tokenizer, texts, want)
    scale = max(abs(w) for w in want)
    assert all(close(g, w, scale) for g, w in zip(got, want, strict=True))
    assert rm.scoring_stats is not None and rm.scoring_stats.path == "prefix tree"


def test_unknown_architecture_scores_whole_texts_and_says_why() -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=64, pad_token_id=2
    )
    config.num_labels = 1
    model = transformers.GPT2ForSequenceClassification(config).eval()
    rm = RewardModel(model, None, "cpu")
    encoded = {"a": [1, 5, 6, 7, 2], "b": [1, 5, 6, 8, 9, 2], "c": [1, 5, 3]}
    got = rm.score_encoded(encoded)
    stats = rm.scoring_stats
    assert stats is not None and stats.path == "whole texts"
    assert stats.fallback is not None and "GPT2ForSequenceClassification" in stats.fallback
    assert "whole texts because GPT2ForSequenceClassification" in stats.format()
    with torch.no_grad():
        want = {t: float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for t, ids in encoded.items()}
    assert len(set(want.values())) > 1
    assert got == pytest.approx(want, rel=1e-5)


def test_whole_text_batches_hold_the_token_budget(tmp_path: Path) -> None:
    folder = reward_folder(tmp_path, "llama")
    rm = load_reward_model(folder, system_prompt=SYSTEM, prefix_cache=False, batch_tokens=100, batch_size=8)
    texts = [rm.format_text(p, r) for p, responses in candidate_sets(4) for r in responses]
    got = rm.score_texts(texts)
    want = whole_text_rewards(folder, texts)
    assert_carries_signal(rm.tokenizer, texts, want)
    scale = max(abs(w) for w in want)
    assert all(close(g, w, scale) for g, w in zip(got, want, strict=True))
    stats = rm.scoring_stats
    assert isinstance(stats, ScoringStats) and stats.path == "whole texts" and stats.fallback is None
    longest = max(len(rm.encode(t)) for t in texts)
    assert longest < 100 and stats.batches >= math.ceil(stats.padded_tokens / 100)
    assert stats.tokens_computed == stats.tokens_in_texts and stats.ideal_tokens < stats.tokens_in_texts


# --- through the public evaluation functions -------------------------------------------------


def evaluation_files(tmp_path: Path) -> dict[str, Path]:
    sets = candidate_sets(5, prompts=8)
    pairs = [
        {"prompt": p, "chosen": r[0], "rejected": r[1], "subset": s, "id": f"p{i}"}
        for i, ((p, r), s) in enumerate(zip(sets, ["math-prm", "hep-go"] * 4, strict=True))
    ]
    cands = [
        {"id": f"q{i}", "prompt": p, "candidates": r, "correct": [k % 2 == i % 2 for k in range(len(r))]}
        for i, (p, r) in enumerate(sets)
    ]
    rb2 = [
        {
            "id": str(i),
            "prompt": p,
            "chosen": [r[0]],
            "rejected": r[1:],
            "num_correct": 1,
            "total_completions": len(r),
            "subset": s,
        }
        for i, ((p, r), s) in enumerate(zip(sets, ["Math", "Focus", "Safety", "Factuality"] * 2, strict=True))
    ]
    return {
        "pairs": write_jsonl(tmp_path / "pairs.jsonl", pairs),
        "cands": write_jsonl(tmp_path / "cands.jsonl", cands),
        "rb2": write_jsonl(tmp_path / "rb2.jsonl", rb2),
    }


@pytest.mark.parametrize("name", ["llama", "mistral-window", "qwen2"])
def test_pairs_best_of_n_and_rewardbench2_equal_with_and_without_prefix_cache(
    tmp_path: Path, name: str
) -> None:
    folder = reward_folder(tmp_path, name)
    files = evaluation_files(tmp_path)
    load = {"system_prompt": SYSTEM}
    runs = {on: evaluate_pairs(folder, files["pairs"], prefix_cache=on, **load) for on in (True, False)}
    on, off = runs[True], runs[False]
    rewards_on = [r for p in on["pairs"] for r in (p["chosen_reward"], p["rejected_reward"])]
    rewards_off = [r for p in off["pairs"] for r in (p["chosen_reward"], p["rejected_reward"])]
    rows = [json.loads(line) for line in files["pairs"].read_text().splitlines()]
    texts = [f"{r['prompt']} {r[k]}" for r in rows for k in ("chosen", "rejected")]
    assert_carries_signal(folder, texts, rewards_off)
    assert rewards_on == pytest.approx(rewards_off, rel=1e-5)
    assert on["accuracy"] == off["accuracy"] and on["subsets"] == off["subsets"]

    bon = {on: evaluate_bon(folder, files["cands"], [2, 4], prefix_cache=on, **load) for on in (True, False)}
    flat_on = [r for row in bon[True]["rewards"] for r in row["rewards"]]
    flat_off = [r for row in bon[False]["rewards"] for r in row["rewards"]]
    cands = [json.loads(line) for line in files["cands"].read_text().splitlines()]
    assert_carries_signal(folder, [f"{c['prompt']} {x}" for c in cands for x in c["candidates"]], flat_off)
    assert flat_on == pytest.approx(flat_off, rel=1e-5)
    assert bon[True]["best_of_n"] == bon[False]["best_of_n"]

    rb2 = {on: evaluate_pairs(folder, files["rb2"], prefix_cache=on, **load) for on in (True, False)}
    rows_on = [r for row in rb2[True]["rows"] for r in row["rewards"]]
    rows_off = [r for row in rb2[False]["rows"] for r in row["rewards"]]
    rb2_rows = [json.loads(line) for line in files["rb2"].read_text().splitlines()]
    rb2_texts = [f"{r['prompt']} {a}" for r in rb2_rows for a in r["chosen"] + r["rejected"]]
    assert_carries_signal(folder, rb2_texts, rows_off)
    assert rows_on == pytest.approx(rows_off, rel=1e-5)
    assert rb2[True]["score"] == rb2[False]["score"]


def test_sweep_points_equal_with_and_without_prefix_cache(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lazymerge.evaluation.sweep import build_spec, read_results, run_sweep

    rm_folder, sft = models(tmp_path)
    files = evaluation_files(tmp_path)
    records = {}
    for on in (True, False):
        out = tmp_path / f"sweep-{on}"
        spec = build_spec(
            [rm_folder, sft],
            out,
            alpha="0.5",
            pair_files=[files["pairs"], files["rb2"]],
            candidate_files=[files["cands"]],
            ns=[2, 4],
            load={"prefix_cache": on, "system_prompt": SYSTEM},
        )
        run_sweep(spec)
        records[on] = read_results(out / "results.jsonl")[1]["alpha=0.5"]
    on, off = records[True], records[False]
    assert on["pairs"]["pairs"]["chosen"] == pytest.approx(off["pairs"]["pairs"]["chosen"], rel=1e-5)
    assert on["pairs"]["pairs"]["rejected"] == pytest.approx(off["pairs"]["pairs"]["rejected"], rel=1e-5)
    rows = [json.loads(line) for line in files["pairs"].read_text().splitlines()]
    texts = [f"{r['prompt']} {r['chosen']}" for r in rows] + [f"{r['prompt']} {r['rejected']}" for r in rows]
    assert_carries_signal(
        rm_folder, texts, off["pairs"]["pairs"]["chosen"] + off["pairs"]["pairs"]["rejected"]
    )
    for got, want in zip(
        on["best_of_n"]["cands"]["rewards"], off["best_of_n"]["cands"]["rewards"], strict=True
    ):
        assert got == pytest.approx(want, rel=1e-5)
    for got, want in zip(
        on["rewardbench2"]["rb2"]["rewards"], off["rewardbench2"]["rb2"]["rewards"], strict=True
    ):
        assert got == pytest.approx(want, rel=1e-5)


def test_whole_texts_batch_without_a_pad_id(tmp_path: Path) -> None:
    """A model with no pad id: whole texts still go in padded batches (the filler masked, the
    reward read at each row's last real token), equal to transformers' unpadded forward."""
    folder = reward_folder(tmp_path, "llama")
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = None
    (folder / "config.json").write_text(json.dumps(config))
    rm = load_reward_model(folder, prefix_cache=False, system_prompt=SYSTEM, batch_size=8)
    assert rm.model.config.pad_token_id is None
    texts = [rm.format_text(p, r) for p, responses in candidate_sets(4) for r in responses]
    got = rm.score_texts(texts)
    want = whole_text_rewards(folder, texts)
    assert_carries_signal(rm.tokenizer, texts, want)
    scale = max(abs(w) for w in want)
    bad = [(t, g, w) for t, g, w in zip(texts, got, want, strict=True) if not close(g, w, scale)]
    assert not bad, f"{len(bad)} of {len(texts)} rewards differ, first: {bad[0]}"
    stats = rm.scoring_stats
    assert stats is not None and stats.path == "whole texts" and stats.batch_size == 8
    assert stats.batches < len(set(texts)) and stats.padded_tokens > stats.tokens_computed  # batched, padded
