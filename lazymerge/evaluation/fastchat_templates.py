"""FastChat conversation formats, as RewardBench formats texts for a model without a chat template.

RewardBench (`scripts/run_rm.py`, `scripts/run_v2.py`, `--chat_template`, default `tulu`) formats
every text of a reward model whose tokenizer has no chat template with a FastChat conversation
(`fastchat/conversation.py`, frozen at fschat 0.2.36 in RewardBench's `rewardbench/conversation.py`):
the messages [user = prompt, assistant = response] rendered by the conversation's `get_prompt`,
with the conversation's own default system message. The text is then tokenized with the
tokenizer's special tokens and, because the tokenizer has no template, with its EOS token
appended (`tokenizer.add_eos_token = True`), which `encode` here does the same way.

Each conversation is one row of `CONVERSATIONS` (its separator style, system template and
message, roles and separators, as FastChat registers it); `render` implements the separator
styles those rows use, written from FastChat's documented `get_prompt` rules:

- `add_colon_two` (vicuna_v1.1): `{system}{sep}` then `{role}: {message}` followed by `sep`
  after user turns and `sep2` after assistant turns;
- `add_colon_space_single` (Ziya, pku-align): `{system}{sep}` then `{role}: {message}{sep}`;
- `add_new_line_single` (tulu): `{system}{sep}` (nothing when the system text is empty) then
  `{role}\\n{message}{sep}`;
- `no_colon_single` (raw, oasst_pythia, openbmb): `{system}` then `{role}{message}{sep}`;
- `llama2` (llama-2, mistral): the system template (or `[INST] ` without a system message),
  the first message followed by a space, later ones `{role} {message}` followed by `sep`
  (user) or `sep2` (assistant);
- `chatml` (zephyr): `{system}{sep}\\n` (nothing when empty) then `{role}\\n{message}{sep}\\n`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CONVERSATIONS", "Conversation", "render"]


@dataclass(frozen=True)
class Conversation:
    """One FastChat conversation template: how `get_prompt` lays out a conversation."""

    name: str
    style: str
    roles: tuple[str, str]
    sep: str
    sep2: str = ""
    system_template: str = "{system_message}"
    system_message: str = ""

    def system_text(self, system: str | None) -> tuple[str, str]:
        """(the system message in use, the system template filled with it); `system` replaces
        the conversation's default message when given."""
        message = self.system_message if system is None else system
        return message, self.system_template.replace("{system_message}", message)

    def record(self) -> str:
        """What results record: the name and every field that shapes the text."""
        return (
            f"fastchat:{self.name} (style {self.style}, roles {list(self.roles)!r}, sep {self.sep!r}, "
            f"sep2 {self.sep2!r}, system {self.system_template!r} / {self.system_message!r})"
        )


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

#: The conversations RewardBench uses for reward models without a chat template (its default
#: `tulu`, FastChat's `llama-2` and `mistral`, and the others its model configs name).
CONVERSATIONS: dict[str, Conversation] = {
    c.name: c
    for c in (
        Conversation("tulu", "add_new_line_single", ("<|user|>", "<|assistant|>"), "\n"),
        Conversation(
            "llama-2",
            "llama2",
            ("[INST]", "[/INST]"),
            " ",
            " </s><s>",
            system_template="[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
        ),
        Conversation(
            "mistral",
            "llama2",
            ("[INST]", "[/INST]"),
            " ",
            "</s>",
            system_template="[INST] {system_message}\n",
        ),
        Conversation(
            "zephyr",
            "chatml",
            ("<|user|>", "<|assistant|>"),
            "</s>",
            system_template="<|system|>\n{system_message}",
        ),
        Conversation(
            "vicuna_v1.1", "add_colon_two", ("USER", "ASSISTANT"), " ", "</s>", system_message=_VICUNA_SYSTEM
        ),
        Conversation("oasst_pythia", "no_colon_single", ("<|prompter|>", "<|assistant|>"), "<|endoftext|>"),
        Conversation("openbmb", "no_colon_single", ("User: ", "Assistant: "), "\n\n"),
        Conversation("Ziya", "add_colon_space_single", ("Human", "Assistant"), "\n\n"),
        Conversation(
            "pku-align",
            "add_colon_space_single",
            ("USER", "ASSISTANT"),
            " ",
            system_message="BEGINNING OF CONVERSATION:",
        ),
        Conversation("raw", "no_colon_single", ("", ""), ""),
    )
}


def render(conv: Conversation, messages: list[str], system: str | None = None) -> str:
    """The text FastChat's `get_prompt` gives for `messages` (alternating user, assistant,
    starting with the user; every one non-empty), with the conversation's system message or
    `system`."""
    message, head = conv.system_text(system)
    seps = (conv.sep, conv.sep2)
    turns = [(conv.roles[i % 2], text, seps[i % 2]) for i, text in enumerate(messages)]
    if conv.style == "add_colon_two":
        return head + conv.sep + "".join(f"{role}: {text}{sep}" for role, text, sep in turns)
    if conv.style == "add_colon_space_single":
        return head + conv.sep + "".join(f"{role}: {text}{conv.sep}" for role, text, _ in turns)
    if conv.style == "add_new_line_single":
        start = "" if head == "" else head + conv.sep
        return start + "".join(f"{role}\n{text}{conv.sep}" for role, text, _ in turns)
    if conv.style == "no_colon_single":
        return head + "".join(f"{role}{text}{conv.sep}" for role, text, _ in turns)
    if conv.style == "chatml":
        start = "" if head == "" else head + conv.sep + "\n"
        return start + "".join(f"{role}\n{text}{conv.sep}\n" for role, text, _ in turns)
    if conv.style == "llama2":
        out = head if message else "[INST] "
        for i, (role, text, sep) in enumerate(turns):
            out += text + " " if i == 0 else f"{role} {text}{sep}"
        return out
    raise ValueError(f"{conv.name}: unknown separator style {conv.style!r}")
