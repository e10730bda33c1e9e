"""TRL's preference rows (and the RewardBench CLI's) as lazymerge pairs. No models here.

TRL's dataset formats (trl docs, "Dataset formats and types"; `trl/data_utils.py`):

- standard, explicit prompt: `prompt`, `chosen`, `rejected` strings (RewardBench's own format,
  read by `scoring` as it always was);
- standard, implicit prompt: `chosen` and `rejected` strings holding prompt and answer; the prompt
  is their longest common prefix, less a space that ends it (TRL's `extract_prompt`);
- conversational, explicit prompt: `prompt` a list of messages, `chosen` and `rejected` lists of
  messages (`{"role": ..., "content": ...}`) that follow it;
- conversational, implicit prompt: `chosen` and `rejected` whole conversations; the prompt is
  their longest common run of leading messages (TRL's `extract_prompt`). The RewardBench CLI's
  preference files hold the same.

A conversation becomes one pair when the prompt is user and assistant messages taking turns,
starting and ending with the user, and each answer is one assistant message. A one-message
prompt is kept as its text (`Prompt`), as a RewardBench prompt is; a longer one as its turns,
every turn rendered through the chat template (`RewardModel.format_text`), so a multi-turn row
scores the text `apply_chat_template(prompt + answer)` gives. A system message is given once for
all rows with `--system-prompt`; a row carrying its own, and anything else, is refused naming the
row. Rows are told apart from RewardBench 2 rows (lists of strings) by their messages: a list of
objects with `role` and `content`.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from lazymerge.errors import PairFileError
from lazymerge.io.small_files import describe_json

#: A pair's prompt: one user message's text, or the turns before the answer as (role, content)
#: pairs, alternating user and assistant, starting and ending with the user.
Prompt: TypeAlias = str | tuple[tuple[str, str], ...]


def prompt_turns(prompt: Prompt) -> list[tuple[str, str]]:
    """The prompt's messages as (role, content): one user message for a text."""
    return [("user", prompt)] if isinstance(prompt, str) else list(prompt)


def prompt_text(prompt: Prompt) -> str:
    """The prompt's last user message, for showing a pair in a report."""
    return prompt if isinstance(prompt, str) else prompt[-1][1]


def prompt_json(prompt: Prompt) -> str | list[dict[str, str]]:
    """The prompt as a row writes it: the text, or TRL's list of messages."""
    return prompt if isinstance(prompt, str) else [{"role": r, "content": c} for r, c in prompt]


def is_message_list(value: Any) -> bool:
    """A non-empty list whose first item is an object with `role` and `content` (TRL's
    `is_conversational` test)."""
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], dict)
        and "role" in value[0]
        and "content" in value[0]
    )


def is_conversational(row: dict[str, Any]) -> bool:
    """A preference row whose prompt, chosen or rejected field holds messages."""
    return any(is_message_list(row.get(k)) for k in ("prompt", "chosen", "rejected"))


def is_implicit_prompt(row: dict[str, Any]) -> bool:
    """TRL's standard implicit-prompt row: chosen and rejected strings, no prompt."""
    return "prompt" not in row and isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)


def common_prefix(chosen: str, rejected: str) -> int:
    """Where TRL's `extract_prompt` splits two texts: their longest common prefix, less one
    space that ends it (so the answers keep their leading space)."""
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if 0 < idx < n and chosen[idx - 1] == " ":
        idx -= 1
    return idx


def implicit_text_pair(row: dict[str, Any], where: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a standard implicit-prompt row.

    Raises:
        PairFileError when the two texts are equal or one holds the other whole (no answer).
    """
    chosen, rejected = row["chosen"], row["rejected"]
    idx = common_prefix(chosen, rejected)
    if idx >= min(len(chosen), len(rejected)):
        raise PairFileError(
            f"{where}: chosen and rejected (TRL's implicit-prompt form) are equal or one begins with the "
            "other whole, so there is no answer to tell apart"
        )
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _messages(row: dict[str, Any], field: str, where: str) -> list[tuple[str, str]]:
    value = row[field]
    if not isinstance(value, list) or not value:
        raise PairFileError(
            f"{where}: field {field!r} must be a non-empty list of messages (role, content), "
            f"found {describe_json(value)}"
        )
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise PairFileError(f"{where}: {field}[{i}] must be a message with a string role and content")
        content = message.get("content")
        if not isinstance(content, str):
            raise PairFileError(
                f"{where}: {field}[{i}].content must be a string, found {describe_json(content)} "
                "(multimodal content is not scored)"
            )
        out.append((message["role"], content))
    return out


def conversation_pair(row: dict[str, Any], where: str) -> tuple[Prompt, str, str]:
    """(prompt, chosen, rejected) of a conversational row, explicit or implicit prompt.

    Raises:
        PairFileError naming the row for a malformed message, a prompt that is not user and
        assistant turns ending with the user, or an answer that is not one assistant message.
    """
    chosen, rejected = _messages(row, "chosen", where), _messages(row, "rejected", where)
    if "prompt" in row:
        prompt = _messages(row, "prompt", where)
    else:
        n = min(len(chosen), len(rejected))
        idx = next((i for i in range(n) if chosen[i] != rejected[i]), n)
        prompt, chosen, rejected = chosen[:idx], chosen[idx:], rejected[idx:]
    roles = [r for r, _ in prompt]
    if not _turns(roles):
        hint = (
            "; a system message is given once for all rows with --system-prompt" if "system" in roles else ""
        )
        raise PairFileError(
            f"{where}: the prompt is {len(prompt)} message(s) with roles {_show(roles)}; lazymerge scores "
            f"user and assistant turns, starting and ending with the user, answered by one assistant message{hint}"
        )
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if [r for r, _ in answer] != ["assistant"]:
            raise PairFileError(
                f"{where}: the {name} answer is {len(answer)} message(s) with roles {_show([r for r, _ in answer])} "
                "after the prompt; lazymerge scores one assistant message"
            )
    text: Prompt = prompt[0][1] if len(prompt) == 1 else tuple(prompt)
    return text, chosen[0][1], rejected[0][1]


def _turns(roles: list[str]) -> bool:
    """user, assistant, user, ...: an odd number of turns taken in order."""
    return len(roles) % 2 == 1 and all(r == ("user", "assistant")[i % 2] for i, r in enumerate(roles))


def _show(roles: list[str]) -> str:
    """Roles for a message, at most eight of them (a row may hold thousands)."""
    shown = ", ".join(describe_json(r) for r in roles[:8])
    return f"[{shown}]" if len(roles) <= 8 else f"[{shown}, and {len(roles) - 8} more]"
