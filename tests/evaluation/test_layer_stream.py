"""Layer-streamed scoring gives the in-memory model's rewards to the bit, holding at most two
groups of weights at once, with hidden states in memory or spilled to a file that never outlives
the pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lazymerge.errors import IncompatibleInputsError, InputError
from lazymerge.evaluation.in_memory import load_merged_reward_model
from lazymerge.evaluation.layer_stream import (
    LayerStreamedModel,
    predict_stream,
    stream_folder,
    stream_merge,
)
from lazymerge.evaluation.rewards import RewardModel, load_reward_model
from lazymerge.options import MergeOptions
from lazymerge.score_options import ScoreOptions
from tests.helpers.models import BASE_WORDS, assert_carries_signal, make_tokenizer, save_model, transformers

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}w1 {{ m['content'] }} w2 "
    "{% else %}{{ m['content'] }} </s>{% endif %}{% endfor %}"
)
#: Small batches so the texts make several batches, most of them padded.
BATCH_SIZE, BATCH_TOKENS = 3, 40
MERGE = MergeOptions(alphas=(0.35,), max_memory=8192)


def pair_of_models(tmp_path: Path, family: str, **sizes) -> tuple[Path, Path]:
    """A reward model and a domain model whose vocabulary is reordered and grows `[PAD]`, as
    MetaMath-7B's does (the merge matches embedding rows by token and appends `[PAD]`)."""
    rm_tok = make_tokenizer(BASE_WORDS, added=["<rm_only>"], family=family)
    rm_tok.chat_template = TEMPLATE
    rm = save_model(tmp_path / "rm", family, True, 1, rm_tok, **sizes)
    words = BASE_WORDS[:3] + list(reversed(BASE_WORDS[3:]))
    sft = save_model(
        tmp_path / "sft", family, False, 2, make_tokenizer(words, added=["[PAD]"], family=family), **sizes
    )
    return rm, sft


def texts_of(scorer: RewardModel, extra: str = "") -> list[str]:
    """Texts of many lengths (so batches pad), some holding the grown `[PAD]` or the reward
    model's own token."""
    out = []
    for i in range(3, 19):
        answer = " ".join(f"w{j}" for j in range(3, 3 + i % 7))
        out.append(
            scorer.format_text(f"w{i} w{i + 1}", answer + (f" {extra}" if i % 3 == 0 and extra else ""))
        )
    return out


def reference(scorer: RewardModel, texts: list[str]) -> tuple[dict[str, list[int]], dict[str, float]]:
    """The in-memory model's encodings and rewards through its whole-text path."""
    encoded = scorer.encode_all(texts)
    rewards = scorer.score_encoded(encoded)
    assert scorer.scoring_stats is not None and scorer.scoring_stats.path == "whole texts"
    assert_carries_signal(scorer.tokenizer, texts, [rewards[t] for t in texts])
    return encoded, rewards


def streamed(model: LayerStreamedModel, encoded: dict[str, list[int]]) -> dict[str, float]:
    return model.score_encoded(encoded, BATCH_TOKENS, BATCH_SIZE)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_rewards_equal_the_in_memory_model(tmp_path: Path, family: str, dtype: str) -> None:
    rm, sft = pair_of_models(tmp_path, family)
    score = ScoreOptions(dtype=dtype, prefix_cache=False, batch_size=BATCH_SIZE, batch_tokens=BATCH_TOKENS)

    merged = load_merged_reward_model([rm, sft], MERGE, score)
    texts = texts_of(merged, "[PAD]")
    assert merged.tokenizer.convert_tokens_to_ids("[PAD]") in {i for t in texts for i in merged.encode(t)}
    encoded, want = reference(merged, texts)
    model = stream_merge([rm, sft], MERGE, score)
    assert streamed(model, encoded) == want  # bit-identical
    stats, ref_stats = model.scoring_stats, merged.scoring_stats
    assert stats is not None and ref_stats is not None
    assert (stats.batches, stats.padded_tokens) == (ref_stats.batches, ref_stats.padded_tokens)
    assert stats.padded_tokens > stats.tokens_computed  # padding was there to get wrong

    folder = load_reward_model(rm, score)
    encoded, want = reference(folder, texts_of(folder, "<rm_only>"))
    assert streamed(stream_folder(rm, score), encoded) == want


def test_streamed_fp32_compute_of_a_bf16_folder(tmp_path: Path) -> None:
    """Stored bf16, computed fp32: each tensor is cast as transformers' loader casts it."""
    tok = make_tokenizer(BASE_WORDS)
    tok.chat_template = TEMPLATE
    rm = save_model(tmp_path / "rm", "llama", True, 5, tok, dtype=torch.bfloat16)
    score = ScoreOptions(
        dtype="float32", prefix_cache=False, batch_size=BATCH_SIZE, batch_tokens=BATCH_TOKENS
    )
    folder = load_reward_model(rm, score)
    encoded, want = reference(folder, texts_of(folder))
    assert streamed(stream_folder(rm, score), encoded) == want


def test_at_most_two_groups_of_weights_at_once(tmp_path: Path) -> None:
    rm, sft = pair_of_models(tmp_path, "llama", num_hidden_layers=4)
    score = ScoreOptions(prefix_cache=False)
    model = stream_merge([rm, sft], MERGE, score)
    layer_params = {
        i: {f"model.layers.{i}.{n}" for n, _ in layer.named_parameters()}
        for i, layer in enumerate(model.base.layers)
    }
    seen: list[int] = []

    def only_this_layer(i: int, skeleton: torch.nn.Module) -> None:
        real = {n for n, p in skeleton.named_parameters() if not p.is_meta}
        assert real == layer_params[i], (i, sorted(real))
        seen.append(i)

    model.on_layer = only_this_layer
    merged = load_merged_reward_model([rm, sft], MERGE, score)
    encoded = merged.encode_all(texts_of(merged))
    model.score_encoded(encoded, BATCH_TOKENS, BATCH_SIZE)
    assert seen == [0, 1, 2, 3]
    assert all(p.is_meta for p in model.model.parameters())
    ledger, prediction = model.ledger, predict_stream(model, encoded, BATCH_TOKENS, BATCH_SIZE)
    assert ledger.live_bytes == 0 and not ledger.live_groups  # every streamed tensor is gone
    assert ledger.peak_groups == 2
    assert prediction.layer_bytes <= ledger.peak_bytes <= prediction.weights_peak
    whole = sum(p.numel() * p.element_size() for p in merged.model.parameters())
    assert prediction.weights_peak < whole / 2  # four layers and a vocabulary: well under the model


@pytest.mark.parametrize("budget", [0, 2000, None])
def test_spilled_activations_give_the_same_rewards(tmp_path: Path, budget: int | None) -> None:
    rm, sft = pair_of_models(tmp_path, "qwen2")
    score = ScoreOptions(dtype="bfloat16", prefix_cache=False)
    merged = load_merged_reward_model([rm, sft], MERGE, score)
    encoded, _ = reference(merged, texts_of(merged, "[PAD]"))
    whole = stream_merge([rm, sft], MERGE, score)
    want = streamed(whole, encoded)
    spill = tmp_path / "spill"
    spill.mkdir()
    model = stream_merge([rm, sft], MERGE, score, max_activations=budget, spill_dir=spill)
    prediction = predict_stream(model, encoded, BATCH_TOKENS, BATCH_SIZE)
    during: list[list[Path]] = []
    model.on_layer = lambda i, skeleton: during.append(list(spill.iterdir()))
    assert streamed(model, encoded) == want
    stats = model.stream_stats
    assert stats is not None
    assert (stats.resident_activation_bytes, stats.spilled_activation_bytes) == (
        prediction.resident_activation_bytes,
        prediction.spill_bytes,
    )
    if budget is None:
        assert stats.spilled_activation_bytes == 0
    else:
        assert stats.spilled_activation_bytes > 0 and stats.resident_activation_bytes <= budget
    assert stats.resident_activation_bytes + stats.spilled_activation_bytes == prediction.activation_bytes > 0
    assert during and all(entries == [] for entries in during)  # unlinked once mapped
    assert list(spill.iterdir()) == []


def test_spill_file_and_weights_gone_after_an_interrupt(tmp_path: Path) -> None:
    rm, sft = pair_of_models(tmp_path, "llama", num_hidden_layers=3)
    # the stream's batches, so the rescore below can equal the in-memory model's bit for bit
    score = ScoreOptions(prefix_cache=False, batch_size=BATCH_SIZE, batch_tokens=BATCH_TOKENS)
    merged = load_merged_reward_model([rm, sft], MERGE, score)
    encoded = merged.encode_all(texts_of(merged))
    spill = tmp_path / "spill"
    spill.mkdir()
    model = stream_merge([rm, sft], MERGE, score, max_activations=0, spill_dir=spill)

    def interrupt(i: int, skeleton: torch.nn.Module) -> None:
        if i == 1:
            raise KeyboardInterrupt

    model.on_layer = interrupt
    with pytest.raises(KeyboardInterrupt):
        model.score_encoded(encoded, BATCH_TOKENS, BATCH_SIZE)
    assert list(spill.iterdir()) == []
    assert all(p.is_meta for p in model.model.parameters())
    assert model.ledger.live_bytes == 0  # the layer read ahead was dropped too
    model.on_layer = None  # and the model scores again afterwards
    assert streamed(model, encoded) == merged.score_encoded(encoded)


def test_prediction_is_one_line(tmp_path: Path) -> None:
    rm, _ = pair_of_models(tmp_path, "mistral")
    model = stream_folder(rm, ScoreOptions(dtype="bfloat16"), max_activations=1000)
    folder = load_reward_model(rm)
    line = predict_stream(model, folder.encode_all(texts_of(folder)), BATCH_TOKENS, BATCH_SIZE).format()
    assert "\n" not in line
    assert "2 layers of" in line and "spilled to disk" in line and "predicted peak host RAM" in line


def test_refusals(tmp_path: Path) -> None:
    rm, sft = pair_of_models(tmp_path, "llama")
    with pytest.raises(InputError, match="no reward head"):
        stream_folder(sft, ScoreOptions())  # a causal LM: no score.weight
    with pytest.raises(InputError, match="not a model folder"):
        stream_folder(tmp_path, ScoreOptions())
    gpt2 = tmp_path / "gpt2"
    config = transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=40, num_labels=1, pad_token_id=2
    )
    transformers.GPT2ForSequenceClassification(config).save_pretrained(gpt2)
    with pytest.raises(InputError, match=r"reproduces llama, mistral, qwen2 .*not 'gpt2'"):
        stream_folder(gpt2, ScoreOptions())
    model = stream_merge([rm, sft], MERGE, ScoreOptions(), max_activations=0, spill_dir=tmp_path / "absent")
    with pytest.raises(InputError, match="absent: cannot create the activations' spill file"):
        model.score_encoded({"w3 w4": [3, 4]}, BATCH_TOKENS, BATCH_SIZE)
    with pytest.raises(InputError, match="no tokens"):
        model.score_encoded({"": []}, BATCH_TOKENS, BATCH_SIZE)


def test_a_config_that_disagrees_with_the_weights_is_refused(tmp_path: Path) -> None:
    rm, _ = pair_of_models(tmp_path, "llama")
    config = transformers.AutoConfig.from_pretrained(rm)
    config.num_hidden_layers = 3  # the folder holds two
    from lazymerge.evaluation.layer_stream import FolderWeights
    from lazymerge.io.reader import Checkpoint

    with pytest.raises(
        IncompatibleInputsError, match=r"no tensor 'model\.layers\.2\..*' .* \(and \d+ more\)"
    ):
        LayerStreamedModel(config, FolderWeights(Checkpoint.open(rm)), ScoreOptions())
    config = transformers.AutoConfig.from_pretrained(rm)
    config.intermediate_size = 48
    model = LayerStreamedModel(config, FolderWeights(Checkpoint.open(rm)), ScoreOptions(), strict=False)
    with pytest.raises(IncompatibleInputsError, match=r"has shape \(64, 32\), the config gives \(48, 32\)"):
        model.score_encoded({"w3 w4": [3, 4]}, BATCH_TOKENS, BATCH_SIZE)


def test_stream_layers_option_scores_through_the_stream(tmp_path: Path) -> None:
    """`stream_layers` in ScoreOptions: `load_reward_model` and `load_merged_reward_model` give
    a streamed model with the in-memory model's rewards, whole texts without the prefix cache and
    through the prefix tree with it (`test_stream_prefix` holds the latter in depth)."""
    from lazymerge.evaluation.stream_prefix import STREAM_PREFIX_PATH

    rm, sft = pair_of_models(tmp_path, "llama")
    spill = Path(__import__("tempfile").gettempdir())
    before = set(spill.glob(".lazymerge-activations-*"))
    for load, args in ((load_reward_model, (rm,)), (load_merged_reward_model, ([rm, sft], MERGE))):
        for cache in (False, True):
            in_memory = load(*args, prefix_cache=cache)
            texts = texts_of(in_memory, "[PAD]" if load is load_merged_reward_model else "")
            want = in_memory.score_texts(texts)
            assert_carries_signal(in_memory.tokenizer, texts, want)
            scorer = load(*args, stream_layers=True, max_activations=512, prefix_cache=cache)
            assert isinstance(scorer.model, LayerStreamedModel)
            assert scorer.score_texts(texts) == want
            stats = scorer.scoring_stats
            assert stats is not None and stats.fallback is None
            assert stats.path == (STREAM_PREFIX_PATH if cache else "layer-streamed whole texts")
            assert (
                scorer.model.stream_stats is not None
                and scorer.model.stream_stats.spilled_activation_bytes > 0
            )
    assert set(spill.glob(".lazymerge-activations-*")) == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_activations": 10}, "--max-activations limits --stream-layers"),
        ({"stream_layers": True, "max_activations": -1}, "--max-activations -1"),
    ],
)
def test_stream_layers_refusals(options: dict, message: str) -> None:
    from lazymerge.errors import OptionError

    with pytest.raises(OptionError, match=message):
        ScoreOptions(**options)


def test_stream_settings_recorded_only_when_on() -> None:
    """Off, the record is what it was before the option existed (old sweeps keep their identity)."""
    assert "stream_layers" not in ScoreOptions().record() and "max_activations" not in ScoreOptions().record()
    on = ScoreOptions(stream_layers=True, max_activations=2**20).record()
    assert on["stream_layers"] is True and on["max_activations"] == 2**20


def test_eval_stream_layers_flags(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from lazymerge.cli import main

    rm, sft = pair_of_models(tmp_path, "qwen2")
    pairs = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "w3 w4 w5 w6", "chosen": "w5 w6 [PAD]", "rejected": "w7 w8 w9"},
        {"prompt": "w3 w4", "chosen": "w9", "rejected": "w4 w11 w12 w13"},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for command in ("eval", "bon", "sweep"):
        help_text = CliRunner().invoke(main, [command, "--help"]).output
        assert "--stream-layers" in help_text and "--max-activations" in help_text, command
    docs = []
    # whole texts both ways (`test_stream_prefix` runs eval --stream-layers through the prefix tree)
    for extra in (
        ["--no-prefix-cache"],
        ["--no-prefix-cache", "--stream-layers", "--max-activations", "1KB"],
    ):
        out = tmp_path / f"r{len(docs)}.json"
        args = ["eval", str(rm), str(sft), "--alpha", "0.35", "--pairs", str(pairs), "--out", str(out), "-q"]
        result = CliRunner().invoke(main, [*args, *extra])
        assert result.exit_code == 0, result.output
        docs.append(json.loads(out.read_text()))
    assert docs[1]["settings"]["stream_layers"] is True and docs[1]["settings"]["max_activations"] == 1000
    assert docs[0]["pairs"] == docs[1]["pairs"]
    bad = CliRunner().invoke(main, ["eval", str(rm), "--pairs", str(pairs), "--max-activations", "1KB"])
    assert bad.exit_code == 2 and "--max-activations limits --stream-layers" in bad.output
    assert len(bad.output.strip().splitlines()) <= 3  # usage line(s) and the one error line, no traceback
