"""Decoder families beyond Llama, Mistral and Qwen2 (issue 23, part 4): tiny models built from
their transformers configs in tmp_path, merged by lazymerge, loaded back by transformers, and
compared with transformers' own forward pass over the state dicts averaged in memory.

Each row of `FAMILIES` is one row of the architectures table in docs/merging.md: the causal LM
with tied and with untied embeddings (a plain linear merge), and, where transformers has one,
the sequence-classification head (a DogeRM merge: a reward model with a causal LM of the same
family, the reward head kept, the LM head dropped).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lazymerge.merge.api import merge

models = pytest.importorskip("tests.helpers.models")
transformers = models.transformers

#: family -> (config class, causal LM class, sequence-classification class or None, extra config)
FAMILIES = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification", {"head_dim": 8}),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        "Gemma3TextForSequenceClassification",
        {"head_dim": 8},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "Phi3ForSequenceClassification", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", None, {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", "Olmo2ForSequenceClassification", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification", {"head_dim": 8}),
}
IDS = torch.tensor([[1, 5, 9, 12, 7, 30, 2], [1, 8, 3, 3, 21, 2, 2]])


def classes(family: str) -> tuple[type, type, type | None, dict]:
    config, causal, classifier, extra = FAMILIES[family]
    return (
        getattr(transformers, config),
        getattr(transformers, causal),
        getattr(transformers, classifier) if classifier else None,
        extra,
    )


def build(folder: Path, family: str, head: str, tie: bool, seed: int, tok) -> torch.nn.Module:
    """A random tiny model of `family` ("causal" or "classifier" head), saved with its tokenizer;
    every parameter moved off its initial value (norms start at 1 or 0)."""
    config_cls, causal, classifier, extra = classes(family)
    config = config_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=64,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
        **extra,
    )
    torch.manual_seed(seed)
    if head == "classifier":
        config.num_labels = 1
        model = classifier(config)
    else:
        model = causal(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def averaged(model: torch.nn.Module, first: dict, second: dict, alpha: float, keep: tuple[str, ...] = ()):
    """`model` loaded with (1 - alpha) first + alpha second for every tensor, those whose name
    starts with one of `keep` taken from `first` alone."""
    state = {}
    for name, value in first.items():
        if name.startswith(keep) or name not in second:
            state[name] = value
        else:
            state[name] = (1 - alpha) * value + alpha * second[name]
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_causal_lm_merge_matches_transformers(tmp_path: Path, family: str, tie: bool) -> None:
    tok = models.make_tokenizer(models.BASE_WORDS)
    a = build(tmp_path / "a", family, "causal", tie, 0, tok)
    b = build(tmp_path / "b", family, "causal", tie, 1, tok)
    merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out", alpha=0.3)
    _, causal, _, _ = classes(family)
    got = causal.from_pretrained(tmp_path / "out").eval()
    want = averaged(causal(a.config), a.state_dict(), b.state_dict(), 0.3)
    assert got.config.tie_word_embeddings == tie
    with torch.no_grad():
        torch.testing.assert_close(got(IDS).logits, want(IDS).logits, rtol=1e-5, atol=1e-5)
        # the merge is not either input
        assert not torch.allclose(got(IDS).logits, a(IDS).logits, atol=1e-3)


@pytest.mark.parametrize("family", [f for f, row in FAMILIES.items() if row[2] is not None])
def test_reward_model_merge_matches_transformers(tmp_path: Path, family: str) -> None:
    """DogeRM: the reward model's head kept, the causal LM's dropped, every shared tensor averaged."""
    tok = models.make_tokenizer(models.BASE_WORDS)
    rm = build(tmp_path / "rm", family, "classifier", False, 0, tok)
    sft = build(tmp_path / "sft", family, "causal", True, 1, tok)
    merge([tmp_path / "rm", tmp_path / "sft"], tmp_path / "out", alpha=0.4)
    _, _, classifier, _ = classes(family)
    assert classifier is not None
    got = classifier.from_pretrained(tmp_path / "out").eval()
    sft_backbone = {k: v for k, v in sft.state_dict().items() if not k.startswith("lm_head")}
    want = averaged(classifier(rm.config), rm.state_dict(), sft_backbone, 0.4, keep=("score",))
    with torch.no_grad():
        torch.testing.assert_close(got(IDS).logits, want(IDS).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.score.weight, rm.score.weight, rtol=0, atol=0)
