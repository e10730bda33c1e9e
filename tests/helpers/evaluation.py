"""Tiny reward models, SFT models and data files for the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers.models import (
    BASE_WORDS,
    make_tokenizer,
    save_model,
    transformers,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}<s> {{ m['content'] }} {% elif m['role'] == 'user' %}"
    "w1 {{ m['content'] }} w2 {% else %}{{ m['content'] }} </s>{% endif %}{% endfor %}"
)


def reward_model(
    tmp_path: Path, name: str = "rm", seed: int = 1, template: bool = True, family: str = "llama"
) -> Path:
    tok = make_tokenizer(BASE_WORDS, family=family)
    if template:
        tok.chat_template = CHAT_TEMPLATE
    return save_model(tmp_path / name, family, True, seed, tok)


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def direct_reward(folder: Path, text: str) -> float:
    """transformers alone: tokenizer and one unpadded forward pass."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, 0])


SWEEP_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}w1 {{ m['content'] }} w2 "
    "{% else %}{{ m['content'] }} </s>{% endif %}{% endfor %}"
)


def models(tmp_path: Path, domains: int = 1, **sizes: int) -> list[Path]:
    """A Llama reward model and `domains` SFT models (vocabulary reordered, grown by [PAD]);
    `sizes` go to the configs (e.g. hidden_size)."""
    tok = make_tokenizer(BASE_WORDS, added=["<rm_only>"])
    tok.chat_template = SWEEP_TEMPLATE
    out = [save_model(tmp_path / "rm", "llama", True, 1, tok, **sizes)]
    for d in range(domains):
        sft_tok = make_tokenizer(BASE_WORDS[:3] + list(reversed(BASE_WORDS[3:])), added=["[PAD]"])
        out.append(save_model(tmp_path / f"sft{d}", "llama", False, 2 + d, sft_tok, **sizes))
    return out


def data(tmp_path: Path) -> dict[str, Path]:
    rows = [
        {
            "prompt": words(3, i % 5 + 4),
            "chosen": words(10 + i % 7, 20),
            "rejected": words(30 - i % 9),
            "subset": s,
            "id": f"p{i}",
        }
        for i, s in enumerate(["math-prm", "hep-go", "hep-python"] * 4)
    ]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({**r, "id": f"v{r['id']}"}) + "\n" for r in rows[:6]))
    cands = tmp_path / "cands.jsonl"
    cands.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"q{i}",
                    "prompt": words(3 + i),
                    "candidates": [words(5 + (i + k) % 20) for k in range(4)],
                    "correct": [k % 2 == i % 2 for k in range(4)],
                }
            )
            + "\n"
            for i in range(5)
        )
    )
    return {"test": test, "val": val, "cands": cands}


def poisoned(tmp_path: Path, how: str) -> Path:
    """A reward model whose score head is NaN or inf, or whose embedding row of w7 is inf (so
    only texts holding w7 get a NaN reward)."""
    folder = reward_model(tmp_path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        if how == "nan-head":
            model.score.weight.fill_(float("nan"))
        elif how == "inf-head":
            model.score.weight.fill_(float("inf"))
        else:
            model.model.embed_tokens.weight[BASE_WORDS.index("w7")] = float("inf")
    model.save_pretrained(folder)
    return folder
