"""Tiny Hugging Face models and tokenizers built in memory for the tests (no network)."""

from __future__ import annotations

from collections.abc import Sequence
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


#: families whose tokenizer transformers 5 rebuilds from the saved vocabulary and merges, whatever
#: tokenizer_config.json names (tokenization_auto's MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS):
#: Qwen2Tokenizer is a byte-level BPE behind Qwen's pre-tokenizer regex
BYTE_LEVEL_FAMILIES = {"qwen2"}

#: tokens every fixture tokenizer treats as special, wherever they stand in `words`
SPECIAL_WORDS = ("<unk>", "<s>", "</s>")


def make_tokenizer(
    words: list[str], added: Sequence[str] = (), family: str = "llama"
) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer over `words` (ids in their order), with `added` as added special tokens, that
    `AutoTokenizer.from_pretrained` loads back as saved for `family` (`save_model` checks it).

    Llama and Mistral get a word-level tokenizer: each word is one token, its id its place in
    `words`. Qwen2 gets a byte-level BPE with Qwen2Tokenizer's own pipeline: its pre-tokenizer
    splits `w17` into `w`, `1`, `7` (and ` w3` into `Ġw`, `3`), so the vocabulary holds those
    pieces, numbered in the order `words` first uses them (a reordered word list reorders the
    ids, as for word-level), then the rest of the 256 byte symbols, so no text maps to nothing.
    """
    if family in BYTE_LEVEL_FAMILIES:
        tok = _byte_level_bpe(words)
        pad = {"pad_token": "</s>"}  # else Qwen2Tokenizer adds <|endoftext|> past the embedding
    else:
        model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
        tok = tokenizers.Tokenizer(model)
        tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
        pad = {}
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **pad
    )
    if added:
        fast.add_special_tokens({"additional_special_tokens": list(added)})
    return fast


def _qwen2_pre_tokenizer() -> tokenizers.pre_tokenizers.PreTokenizer:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = tokenizers.pre_tokenizers
    split = pre.Split(tokenizers.Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False)
    return pre.Sequence([split, pre.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level_bpe(words: list[str]) -> tokenizers.Tokenizer:
    """Qwen2Tokenizer's pipeline (NFC, regex split, byte level, BPE) over the pieces of `words`."""
    pre = _qwen2_pre_tokenizer()
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for word in words:
        if word in SPECIAL_WORDS:
            vocab.setdefault(word, len(vocab))
            continue
        for text in (word, " " + word):  # first in a text, and after a space
            for piece, _ in pre.pre_tokenize_str(text):
                for k in range(1, len(piece) + 1):
                    vocab.setdefault(piece[k - 1], len(vocab))
                    vocab.setdefault(piece[:k], len(vocab))
                    if k > 1 and (piece[: k - 1], piece[k - 1]) not in merges:
                        merges.append((piece[: k - 1], piece[k - 1]))
    for symbol in sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()):  # sorted: a set's order varies
        vocab.setdefault(symbol, len(vocab))
    model = tokenizers.models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = tokenizers.normalizers.NFC()
    tok.pre_tokenizer = pre
    tok.decoder = tokenizers.decoders.ByteLevel()
    return tok


def tokenizer_size(words: list[str], family: str, added: Sequence[str] = ()) -> int:
    """How many tokens `make_tokenizer(words, added, family)` has (its embedding rows)."""
    return len(make_tokenizer(words, added, family))


def check_loads_as_saved(folder: Path, saved: transformers.PreTrainedTokenizerBase) -> None:
    """`AutoTokenizer.from_pretrained(folder)` (what lazymerge's scorer calls) gives the saved
    tokenizer's vocabulary and ids: a fixture whose texts all load as `</s>` proves nothing."""
    loaded = transformers.AutoTokenizer.from_pretrained(folder)
    assert loaded.get_vocab() == saved.get_vocab(), (
        f"{folder}: {type(loaded).__name__} loads another vocabulary than the saved one"
    )
    words = [w for w in saved.get_vocab() if w not in saved.all_special_tokens][:40]
    probes = [" ".join(words), "w1 w3 w17 w2", "w5 [PAD] w6 </s>", "<s> w3 <rm_only> w30"]
    for text in probes:
        want, got = saved(text)["input_ids"], loaded(text)["input_ids"]
        assert got == want, f"{folder}: {type(loaded).__name__} tokenizes {text!r} as {got}, saved: {want}"


def assert_carries_signal(
    tokenizer: transformers.PreTrainedTokenizerBase | Path, texts: Sequence[str], rewards: Sequence[float]
) -> None:
    """A reward comparison has something to compare: each text tokenizes to more than one
    distinct id besides the special tokens, the texts do not all tokenize alike, and the rewards
    are not all equal. `tokenizer` is the scorer's own, or a model folder (loaded as lazymerge
    loads it, with AutoTokenizer).

    Call it in every test that compares rewards, before the comparison: equal rewards of texts
    that all became `</s>` are equal for every model.
    """
    if isinstance(tokenizer, Path):
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer)
    assert texts, "no texts to score"
    specials = set(tokenizer.all_special_ids)
    ids = [tokenizer(text)["input_ids"] for text in texts]
    for text, row in zip(texts, ids, strict=True):
        assert len(set(row) - specials) > 1, (
            f"{type(tokenizer).__name__} tokenizes {text!r} to {row}: at most one id besides specials"
        )
    assert len({tuple(row) for row in ids}) > 1, f"every text tokenizes to {ids[0]}"
    rewards = [float(r) for r in rewards]
    assert len(set(rewards)) > 1, f"every reward is {rewards[0]} ({len(rewards)} rewards)"


def scored_texts(data: Path, result: dict) -> tuple[list[str], list[float]]:
    """The texts (prompt and answer, unformatted) of a pairs file and their rewards in `result`
    (`evaluate_pairs`' value or a `--out` file's): preference pairs or RewardBench 2 rows."""
    import json

    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    texts: list[str] = []
    rewards: list[float] = []
    if "rows" in result:  # RewardBench 2: every answer of a row, chosen first
        for row, entry in zip(rows, result["rows"], strict=True):
            texts += [f"{row['prompt']} {answer}" for answer in row["chosen"] + row["rejected"]]
            rewards += entry["rewards"]
    else:
        for row, entry in zip(rows, result["pairs"], strict=True):
            texts += [f"{row['prompt']} {row['chosen']}", f"{row['prompt']} {row['rejected']}"]
            rewards += [entry["chosen_reward"], entry["rejected_reward"]]
    return texts, rewards


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
    check_tokenizer: bool = True,
    **overrides,
) -> Path:
    """Save a random tiny reward model (num_labels 1) or causal LM with its tokenizer, and check
    that AutoTokenizer loads the tokenizer back as saved (`check_tokenizer=False` only to build
    a broken fixture on purpose)."""
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
        if check_tokenizer:
            check_loads_as_saved(folder, tokenizer)
    return folder
