"""Multi-turn TRL conversations: read from TRL's conversational preference rows (explicit and
implicit prompt), rendered through the chat template, and tokenized to exactly the ids
transformers' own `apply_chat_template(prompt + answer, tokenize=True)` gives, on a tokenizer
built in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lazymerge.errors import PairFileError
from lazymerge.evaluation.rewards import RewardModel
from lazymerge.evaluation.scoring import load_pairs, load_preferences
from tests.helpers.models import make_tokenizer

transformers = pytest.importorskip("transformers")

ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ["<unk>", "<s>", "</s>", *ROLES] + [f"w{i}" for i in range(40)]
#: A template that writes its own BOS (as Llama 3's does) and renders every turn.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def msg(role: str, text: str) -> dict[str, str]:
    return {"role": role, "content": text}


TURNS = [msg("user", "w1 w2"), msg("assistant", "w3 w4 w5"), msg("user", "w6")]
CHOSEN, REJECTED = msg("assistant", "w7 w8"), msg("assistant", "w9")
#: TRL's conversational forms of one three-turn prompt: explicit prompt, and implicit (the
#: whole conversations; the prompt is their common leading messages).
ROWS = {
    "explicit": {"prompt": TURNS, "chosen": [CHOSEN], "rejected": [REJECTED]},
    "implicit": {"chosen": [*TURNS, CHOSEN], "rejected": [*TURNS, REJECTED]},
}


@pytest.fixture
def tokenizer() -> Any:
    tok = make_tokenizer(WORDS)
    tok.chat_template = TEMPLATE
    return tok


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True)
    return list(out["input_ids"])


@pytest.mark.parametrize("form", sorted(ROWS))
def test_multi_turn_rows_score_apply_chat_templates_ids(tmp_path: Path, tokenizer: Any, form: str) -> None:
    (pair,), _ = load_pairs(write_jsonl(tmp_path / "trl.jsonl", [ROWS[form]]))
    assert pair.prompt == tuple((m["role"], m["content"]) for m in TURNS)
    rm = RewardModel(None, tokenizer, "cpu", source="in-memory tokenizer")
    for answer, response in ((CHOSEN, pair.chosen), (REJECTED, pair.rejected)):
        assert response == answer["content"]
        text = rm.format_text(pair.prompt, response)
        assert text == tokenizer.apply_chat_template([*TURNS, answer], tokenize=False)
        ids = rm.encode(text)
        assert ids == reference_ids(tokenizer, [*TURNS, answer])
        assert ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.convert_tokens_to_ids("w3") in ids  # the earlier turns are in the text


def test_one_turn_prompts_stay_text_and_render_as_before(tmp_path: Path, tokenizer: Any) -> None:
    row = {"chosen": [TURNS[0], CHOSEN], "rejected": [TURNS[0], REJECTED]}
    (pair,), _ = load_pairs(write_jsonl(tmp_path / "one.jsonl", [row]))
    assert pair.prompt == "w1 w2"
    rm = RewardModel(None, tokenizer, "cpu")
    assert rm.encode(rm.format_text(pair.prompt, pair.chosen)) == reference_ids(tokenizer, [TURNS[0], CHOSEN])


def test_a_system_prompt_comes_first_in_a_multi_turn_text(tmp_path: Path, tokenizer: Any) -> None:
    (pair,), _ = load_pairs(write_jsonl(tmp_path / "trl.jsonl", [ROWS["explicit"]]))
    rm = RewardModel(None, tokenizer, "cpu", system_prompt="w30 w31")
    expected = reference_ids(tokenizer, [msg("system", "w30 w31"), *TURNS, CHOSEN])
    assert rm.encode(rm.format_text(pair.prompt, pair.chosen)) == expected


def test_plain_format_writes_every_turn() -> None:
    tok = make_tokenizer(WORDS)  # no chat template
    rm = RewardModel(None, tok, "cpu")
    prompt = tuple((m["role"], m["content"]) for m in TURNS)
    assert (
        rm.format_text(prompt, "w7") == "User: w1 w2\n\nAssistant: w3 w4 w5\n\nUser: w6\n\nAssistant: w7</s>"
    )
    assert rm.format_text("w1 w2", "w7") == "User: w1 w2\n\nAssistant: w7</s>"


def test_convert_writes_a_multi_turn_pair_back_as_trl_messages(tmp_path: Path) -> None:
    from lazymerge.evaluation.convert import convert

    source = write_jsonl(tmp_path / "trl.jsonl", [ROWS["implicit"]])
    out = tmp_path / "pairs.jsonl"
    convert(source, out)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["prompt"] == TURNS and row["chosen"] == [CHOSEN] and row["rejected"] == [REJECTED]
    assert load_pairs(out) == load_pairs(source)


BAD_TURNS: list[tuple[str, dict[str, Any], str]] = [
    (
        "prompt-ends-with-assistant",
        {"prompt": TURNS[:2], "chosen": [CHOSEN], "rejected": [REJECTED]},
        'roles ["user", "assistant"]',
    ),
    (
        "two-users-in-a-row",
        {"prompt": [TURNS[0], TURNS[2]], "chosen": [CHOSEN], "rejected": [REJECTED]},
        'roles ["user", "user"]',
    ),
    (
        "system-in-the-row",
        {"prompt": [msg("system", "w1"), *TURNS], "chosen": [CHOSEN], "rejected": [REJECTED]},
        "--system-prompt",
    ),
    (
        "answers-differ-after-a-shared-turn-only",
        {"chosen": [*TURNS, CHOSEN, TURNS[2]], "rejected": [*TURNS, REJECTED]},
        "the chosen answer is 2 message(s)",
    ),
    (
        "many-turns-shown-briefly",
        {"prompt": [TURNS[0]] * 20, "chosen": [CHOSEN], "rejected": [REJECTED]},
        "and 12 more]",
    ),
]


@pytest.mark.parametrize("name,row,fragment", BAD_TURNS, ids=[b[0] for b in BAD_TURNS])
def test_unusable_turns_are_refused_naming_the_line(
    tmp_path: Path, name: str, row: dict[str, Any], fragment: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS["explicit"], row])
    with pytest.raises(PairFileError) as info:
        load_preferences(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and "\n" not in message
    assert fragment in message, message
