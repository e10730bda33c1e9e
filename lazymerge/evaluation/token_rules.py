"""Token ids of a formatted text: the BOS rule, the EOS a FastChat conversation appends, truncation.

`--bos` decides how a text becomes token ids (`TokenRule.encode`):
- `auto` (the default): a text rendered from a chat template is tokenized without the tokenizer's
  special tokens, so the ids are those of `tokenizer.apply_chat_template(messages,
  tokenize=True)` (what TRL trains reward models on: the template writes its own BOS, once); a
  text formatted without a template (the plain format, a FastChat conversation) gets the
  tokenizer's special tokens, as a pipeline adds them;
- `single`: every text gets the tokenizer's special tokens, and when the ids then start with two
  BOS tokens the first is dropped (RewardBench masks the first of two leading BOS tokens; for
  the rotary models lazymerge scores the rewards agree up to rounding);
- `double`: every text gets the tokenizer's special tokens, so a template that writes `bos_token`
  gives two (what lazymerge did before this option, and what DogeRM's LLaMA-2 reward model saw
  in training).

With a FastChat conversation the tokenizer's EOS id is appended after the text, as RewardBench
does (`tokenizer.add_eos_token = True` for a tokenizer without a chat template).

`--truncation` cuts a text longer than `--max-length`: `left` drops the oldest tokens after the
leading BOS token(s), so the response and its end are kept and the model still sees its BOS;
`right` keeps the start (RewardBench 2's tokenizer truncation). Either way the EOS tokens the
tokenizer or the conversation append at the end are kept, as the tokenizer's own truncation
keeps the special tokens it adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BOS_CHOICES = ("auto", "single", "double")
TRUNCATION_SIDES = ("left", "right")


@dataclass(frozen=True)
class TokenRule:
    """How one model's texts become token ids (see the module).

    Attributes:
        tokenizer: the model's tokenizer (a transformers tokenizer).
        bos: "auto", "single" or "double".
        truncation: "left" or "right".
        max_length: most tokens kept.
        templated: the texts are rendered from a chat template.
        append_eos: append the EOS id (a FastChat conversation's texts).
    """

    tokenizer: Any
    bos: str
    truncation: str
    max_length: int
    templated: bool
    append_eos: bool = False
    _added_tail: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # (the EOS ids the tokenizer itself appends to every text: kept by truncation)
        if self.special_tokens:
            empty = list(self.tokenizer("", add_special_tokens=True)["input_ids"])
            eos = self.tokenizer.eos_token_id
            while eos is not None and empty and empty[-1] == eos:
                self._added_tail.append(empty.pop())

    @property
    def special_tokens(self) -> bool:
        """Whether the tokenizer adds its special tokens (all but `auto` on a template's text)."""
        return not (self.bos == "auto" and self.templated)

    def encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        ids = list(tok(text, add_special_tokens=self.special_tokens)["input_ids"])
        tail = len(self._added_tail) if self.special_tokens else 0
        if self.append_eos and tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
            tail += 1
        bos = tok.bos_token_id
        if self.bos == "single" and bos is not None and ids[:2] == [bos, bos]:
            del ids[0]
        return truncate(ids, self.max_length, self.truncation, bos, tail)


def truncate(ids: list[int], max_length: int, side: str, bos: int | None, tail: int = 0) -> list[int]:
    """`ids` cut to `max_length`: the leading BOS ids and the last `tail` ids (appended special
    tokens) kept, the tokens between them cut from the `side` ("left" or "right")."""
    if len(ids) <= max_length:
        return ids
    lead = 0
    while bos is not None and lead < len(ids) and ids[lead] == bos:
        lead += 1
    room = max_length - lead - tail
    if room < 1:  # a max length shorter than the kept tokens: the first max_length ids
        return ids[:max_length]
    body = ids[lead : len(ids) - tail]
    kept = body[len(body) - room :] if side == "left" else body[:room]
    return ids[:lead] + kept + ids[len(ids) - tail :]
