"""Tiny Hugging Face models and tokenizers built in memory for the tests (no network)."""

from __future__ import annotations

from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")
tokenizers = __import__("pytest").importorskip("tokenizers")

BASE_WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(37)]

FAMILIES = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForSequenceClassification,
        transformers.LlamaForCausalLM,
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForSequenceClassification,
        transformers.MistralForCausalLM,
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForSequenceClassification,
        transformers.Qwen2ForCausalLM,
    ),
}


def make_tokenizer(words: list[str], added: list[str] = ()) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (ids in order), with `added` as added special tokens."""
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if added:
        fast.add_special_tokens({"additional_special_tokens": list(added)})
    return fast


def config_for(family: str, vocab_size: int, **overrides) -> transformers.PretrainedConfig:
    config_cls = FAMILIES[family][0]
    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def save_model(
    folder: Path,
    family: str,
    reward: bool,
    seed: int,
    tokenizer: transformers.PreTrainedTokenizerFast | None,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    safe: bool = True,
    **overrides,
) -> Path:
    """Save a random tiny reward model (num_labels 1) or causal LM with its tokenizer."""
    torch.manual_seed(seed)
    vocab = vocab_size or len(tokenizer)
    config = config_for(family, vocab, **overrides)
    if reward:
        config.num_labels = 1
        model = FAMILIES[family][1](config)
    else:
        model = FAMILIES[family][2](config)
    with torch.no_grad():  # norms start at 1: randomise them so averaging them is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype).eval()
    if safe:
        model.save_pretrained(folder)
    else:  # the PyTorch .bin layout many DogeRM-era checkpoints ship
        folder.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
