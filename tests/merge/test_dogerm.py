"""Reward model + domain SFT merges (DogeRM) against an independent in-memory implementation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lazymerge import merge
from lazymerge.errors import IncompatibleInputsError, InputError, LazyMergeError
from tests.helpers.checkpoints import load_any
from tests.helpers.models import (
    BASE_WORDS,
    FAMILIES,
    assert_carries_signal,
    make_tokenizer,
    save_model,
    tokenizer_size,
    transformers,
)

EMBED = "model.embed_tokens.weight"


def folder_state(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", weights_only=True)
    return load_any(folder)


def full_vocab(folder: Path) -> dict[str, int]:
    return transformers.PreTrainedTokenizerFast.from_pretrained(folder).get_vocab()


def reference_dogerm(
    rm: Path, sfts: list[Path], weights: list[float]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The recipe, written directly: average shared tensors, keep score, drop lm_head, embeddings by token."""
    rm_sd, sft_sds = folder_state(rm), [folder_state(s) for s in sfts]
    rm_vocab, sft_vocabs = full_vocab(rm), [full_vocab(s) for s in sfts]
    out = {}
    for name, t in rm_sd.items():
        if name.startswith("score."):
            out[name] = t.clone()
        elif name != EMBED:
            acc = weights[0] * t.float()
            for w, sd in zip(weights[1:], sft_sds, strict=True):
                acc = acc + w * sd[name].float()
            out[name] = acc.to(t.dtype)
    id_to_token = {i: tok for tok, i in rm_vocab.items()}
    tokens = [id_to_token.get(i) for i in range(rm_sd[EMBED].shape[0])]
    appended = []
    for vocab in sft_vocabs:
        for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            if tok not in rm_vocab and tok not in appended:
                appended.append(tok)
    rows = []
    for r, tok in enumerate(tokens + appended):
        parts = [(weights[0], rm_sd[EMBED][r])] if r < len(tokens) else []
        for w, sd, vocab in zip(weights[1:], sft_sds, sft_vocabs, strict=True):
            if tok is not None and tok in vocab:
                parts.append((w, sd[EMBED][vocab[tok]]))
        if len(parts) == len(weights):
            acc = weights[0] * parts[0][1].float()
            for w, row in parts[1:]:
                acc = acc + w * row.float()
        else:
            total = sum(w for w, _ in parts)
            acc = sum((w / total) * row.float() for w, row in parts)
        rows.append(acc.to(rm_sd[EMBED].dtype))
    out[EMBED] = torch.stack(rows)
    return out, appended


def check_against_reference(out: Path, rm: Path, sfts: list[Path], weights: list[float], family: str) -> dict:
    want, appended = reference_dogerm(rm, sfts, weights)
    got = load_any(out)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=1e-6, atol=1e-7, msg=name)
    cls = FAMILIES[family][1]
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == want[EMBED].shape[0]
    assert config["architectures"] == [cls.__name__]
    assert model.config.num_labels == 1 and model.score.weight.shape[0] == 1
    # rewards of a few inputs equal those of the reference weights in the same architecture
    reference = cls.from_pretrained(out)
    reference.load_state_dict(want)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    texts = ["w1 w2 w3", "w5 w6 w7 w8 w9 w10", "<s> w3 w11"]
    with torch.no_grad():
        got_logits = [model(tok(text, return_tensors="pt").input_ids).logits for text in texts]
        want_logits = [reference(tok(text, return_tensors="pt").input_ids).logits for text in texts]
    assert_carries_signal(out, texts, [float(g[0, 0]) for g in got_logits])  # tokenized as the scorer does
    for got_one, want_one in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got_one, want_one)
    return {"appended": appended, "tokenizer": tok, "config": config}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_reward_model_plus_sft_with_pad_token(tmp_path: Path, family: str) -> None:
    rm = save_model(tmp_path / "rm", family, True, 1, make_tokenizer(BASE_WORDS, family=family))
    sft_tok = make_tokenizer(BASE_WORDS, added=["[PAD]"], family=family)
    sft = save_model(tmp_path / "sft", family, False, 2, sft_tok)
    out = tmp_path / "out"
    report = merge([rm, sft], out, alpha=0.3)
    result = check_against_reference(out, rm, [sft], [0.7, 0.3], family)
    assert result["appended"] == ["[PAD]"]
    rows = tokenizer_size(BASE_WORDS, family)
    assert result["tokenizer"].convert_tokens_to_ids("[PAD]") == rows
    assert result["config"]["vocab_size"] == rows + 1
    assert report.tensors == len(load_any(out))


def test_alpha_is_the_domain_weight_whatever_the_order(tmp_path: Path) -> None:
    rm = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    sft = save_model(tmp_path / "sft", "llama", False, 2, make_tokenizer(BASE_WORDS))
    merge([rm, sft], tmp_path / "o1", alpha=0.3)
    merge([sft, rm], tmp_path / "o2", alpha=0.3)
    a, b = load_any(tmp_path / "o1"), load_any(tmp_path / "o2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rm_only_token_and_different_tokens_at_same_id(tmp_path: Path) -> None:
    rm_tok = make_tokenizer(BASE_WORDS, added=["<rm_only>", "<shared>"])
    sft_tok = make_tokenizer(BASE_WORDS, added=["<sft_only>", "<shared>"])  # <sft_only> takes <rm_only>'s id
    rm = save_model(tmp_path / "rm", "llama", True, 1, rm_tok)
    sft = save_model(tmp_path / "sft", "llama", False, 2, sft_tok)
    assert rm_tok.convert_tokens_to_ids("<rm_only>") == sft_tok.convert_tokens_to_ids("<sft_only>")
    out = tmp_path / "out"
    merge([rm, sft], out, alpha=0.4)
    result = check_against_reference(out, rm, [sft], [0.6, 0.4], "llama")
    assert result["appended"] == ["<sft_only>"]
    got, rm_sd, sft_sd = load_any(out)[EMBED], folder_state(rm)[EMBED], folder_state(sft)[EMBED]
    rm_only = rm_tok.convert_tokens_to_ids("<rm_only>")
    assert torch.equal(got[rm_only], rm_sd[rm_only])  # kept, not averaged with <sft_only>
    assert torch.equal(got[-1], sft_sd[sft_tok.convert_tokens_to_ids("<sft_only>")])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shuffled_sft_vocabulary_is_matched_by_token(tmp_path: Path, family: str) -> None:
    words = BASE_WORDS[:3] + list(reversed(BASE_WORDS[3:]))
    rm_tok, sft_tok = make_tokenizer(BASE_WORDS, family=family), make_tokenizer(words, family=family)
    moved = [t for t, i in rm_tok.get_vocab().items() if sft_tok.get_vocab()[t] != i]
    assert len(moved) > 10  # the same tokens, most of them at other ids (byte-level pieces too)
    rm = save_model(tmp_path / "rm", family, True, 1, rm_tok)
    sft = save_model(tmp_path / "sft", family, False, 2, sft_tok)
    out = tmp_path / "out"
    merge([rm, sft], out, alpha=0.5, max_memory=4096)  # rows gathered in small chunks
    check_against_reference(out, rm, [sft], [0.5, 0.5], family)


def test_three_inputs_with_weights_and_bin_input(tmp_path: Path) -> None:
    def tok(*added: str):
        return make_tokenizer(BASE_WORDS, added=list(added), family="qwen2")

    rm = save_model(tmp_path / "rm", "qwen2", True, 1, tok())
    maths = save_model(tmp_path / "maths", "qwen2", False, 2, tok("[PAD]"), safe=False)
    code = save_model(tmp_path / "code", "qwen2", False, 3, tok("<code>"))
    assert (maths / "pytorch_model.bin").exists() and not list(maths.glob("*.safetensors"))
    out = tmp_path / "out"
    merge([rm, maths, code], out, weights=[0.5, 0.3, 0.2])
    result = check_against_reference(out, rm, [maths, code], [0.5, 0.3, 0.2], "qwen2")
    assert result["appended"] == ["[PAD]", "<code>"]


def test_bf16_models(tmp_path: Path) -> None:
    rm = save_model(tmp_path / "rm", "mistral", True, 1, make_tokenizer(BASE_WORDS), dtype=torch.bfloat16)
    sft = save_model(
        tmp_path / "sft",
        "mistral",
        False,
        2,
        make_tokenizer(BASE_WORDS, added=["[PAD]"]),
        dtype=torch.bfloat16,
    )
    out = tmp_path / "out"
    merge([rm, sft], out, alpha=0.25)
    want, _ = reference_dogerm(rm, [sft], [0.75, 0.25])
    got = load_any(out)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)


def test_missing_tokenizer_falls_back_or_refuses(tmp_path: Path) -> None:
    rm = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    sft = save_model(tmp_path / "sft", "llama", False, 2, None, vocab_size=len(BASE_WORDS) + 1)
    with pytest.raises(IncompatibleInputsError, match="no tokenizer files"):
        merge([rm, sft], tmp_path / "strict", alpha=0.3, strict=True)
    assert not (tmp_path / "strict").exists()
    merge([rm, sft], tmp_path / "out", alpha=0.3)
    got, rm_sd, sft_sd = load_any(tmp_path / "out")[EMBED], folder_state(rm)[EMBED], folder_state(sft)[EMBED]
    assert got.shape[0] == len(BASE_WORDS)
    assert torch.equal(got, (0.7 * rm_sd.float() + 0.3 * sft_sd[: len(BASE_WORDS)].float()).to(got.dtype))


def test_errors(tmp_path: Path) -> None:
    tok = make_tokenizer(BASE_WORDS)
    rm = save_model(tmp_path / "rm", "llama", True, 1, tok)
    rm2 = save_model(tmp_path / "rm2", "llama", True, 2, tok)
    wide = save_model(tmp_path / "wide", "llama", False, 3, tok, hidden_size=64, intermediate_size=128)
    deep = save_model(tmp_path / "deep", "llama", False, 4, tok, num_hidden_layers=3)
    with pytest.raises(IncompatibleInputsError, match="pass --rm N"):
        merge([rm, rm2], tmp_path / "o")
    with pytest.raises(IncompatibleInputsError, match="hidden_size 64 \\(reward model: 32\\)"):
        merge([rm, wide], tmp_path / "o")
    with pytest.raises(IncompatibleInputsError, match="num_hidden_layers 3"):
        merge([rm, deep], tmp_path / "o")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no .safetensors or .bin weights"):
        merge([rm, tmp_path / "empty"], tmp_path / "o")
    small = save_model(
        tmp_path / "small",
        "llama",
        False,
        5,
        make_tokenizer(BASE_WORDS, added=["x1", "x2"]),
        vocab_size=len(BASE_WORDS),
    )
    with pytest.raises(IncompatibleInputsError, match="has only 40 rows"):
        merge([rm, small], tmp_path / "o")
    with pytest.raises(LazyMergeError, match="--rm 5"):
        merge([rm, rm2], tmp_path / "o", rm=5)
    assert not (tmp_path / "o").exists()


def test_plan_describes_recipe(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lazymerge.cli import main

    rm = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    sft = save_model(tmp_path / "sft", "llama", False, 2, make_tokenizer(BASE_WORDS, added=["[PAD]"]))
    result = CliRunner().invoke(main, ["plan", str(rm), str(sft), "--alpha", "0.3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["roles"] == ["reward model", "domain model"] and doc["weights"] == [0.7, 0.3]
    assert doc["vocab_size"] == len(BASE_WORDS) + 1
    actions = {t["name"]: t["action"] for t in doc["tensors"]}
    assert actions["score.weight"] == "copy" and actions[EMBED] == "rows"
    assert actions["model.norm.weight"] == "merge"
    assert any("lm_head.weight" in d for d in doc["dropped"])
    assert any("40 rows in every model" in n and "1 appended" in n for n in doc["notes"])
    text = CliRunner().invoke(main, ["plan", str(rm), str(sft), "--alpha", "0.3"]).output
    assert "reward head, kept from the reward model" in text and "predicted peak resident memory" in text


def test_sweep_outputs_equal_separate_runs_from_one_read(tmp_path: Path) -> None:
    from lazymerge.options import parse_alpha

    assert parse_alpha("0:1:0.25") == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert len(parse_alpha("0:1:0.05")) == 21
    rm = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    sft = save_model(tmp_path / "sft", "llama", False, 2, make_tokenizer(BASE_WORDS, added=["[PAD]"]))
    alphas = [0.0, 0.25, 1.0]
    sweep = merge([rm, sft], tmp_path / "sweep", alpha=alphas, max_memory=8192, shard_size=30_000)
    single = merge([rm, sft], tmp_path / "one", alpha=0.25)
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["alpha-0", "alpha-0.25", "alpha-1"]
    assert sweep.bytes_read == single.bytes_read  # every input tensor read once for all outputs
    for alpha in alphas:
        separate = tmp_path / f"separate-{alpha}"
        merge([rm, sft], separate, alpha=alpha, shard_size=30_000)
        swept = tmp_path / "sweep" / f"alpha-{alpha:g}"
        assert sorted(p.name for p in swept.iterdir()) == sorted(p.name for p in separate.iterdir())
        for f in separate.iterdir():
            if f.name == "README.md":  # the model card names its own output folder
                # (outside the working folder, the card names the output by its base name)
                card = (swept / f.name).read_text().replace(f"-o {swept.name} ", f"-o {separate.name} ")
                assert card.replace(f"# {swept.name}\n", f"# {separate.name}\n") == f.read_text()
                continue
            assert (swept / f.name).read_bytes() == f.read_bytes(), (alpha, f.name)
    check_against_reference(tmp_path / "sweep" / "alpha-0.25", rm, [sft], [0.75, 0.25], "llama")
    # at alpha 0 the output is the reward model, plus the domain model's row for the appended token
    got, rm_sd, sft_sd = load_any(tmp_path / "sweep" / "alpha-0"), folder_state(rm), folder_state(sft)
    assert all(torch.equal(got[k], rm_sd[k]) for k in rm_sd if k != EMBED)
    assert torch.equal(got[EMBED][:-1], rm_sd[EMBED]) and torch.equal(got[EMBED][-1], sft_sd[EMBED][-1])


def test_tied_embedding_sft(tmp_path: Path) -> None:
    tok = make_tokenizer(BASE_WORDS, family="qwen2")
    rm = save_model(tmp_path / "rm", "qwen2", True, 1, tok)
    sft = save_model(tmp_path / "sft", "qwen2", False, 2, tok, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_any(sft)  # a tied model stores the embedding once
    out = tmp_path / "out"
    merge([rm, sft], out, alpha=0.3)
    check_against_reference(out, rm, [sft], [0.7, 0.3], "qwen2")


def test_embedding_rows_in_small_compute_blocks(tmp_path: Path) -> None:
    rm_tok = make_tokenizer(BASE_WORDS, added=["<rm_only>"])
    rm = save_model(tmp_path / "rm", "llama", True, 1, rm_tok)
    sft = save_model(
        tmp_path / "sft",
        "llama",
        False,
        2,
        make_tokenizer(BASE_WORDS[:3] + list(reversed(BASE_WORDS[3:])), added=["[PAD]"]),
    )
    out = tmp_path / "out"
    merge([rm, sft], out, alpha=0.35, max_memory=20_000, block_elems=100)  # 3 rows of 32 per block
    check_against_reference(out, rm, [sft], [0.65, 0.35], "llama")
