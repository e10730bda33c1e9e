"""The checks a merge, eval or sweep shares with `lazymerge check`, from the opened inputs.

Headers, configs and tokenizer files only (no tensor data; chat templates compared as text,
never rendered). Each check returns findings: `ok` (a fact for `check`'s table), `warning` (merges,
but may surprise) or `error` (refused). `preflight` runs them at the start of `plan`, `run` and
`sweep` (`merge.api.prepare`, `evaluation.sweep.build_spec`) and raises the first error, with
the line `lazymerge check` prints for it, before any tensor is planned or read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lazymerge.errors import IncompatibleInputsError, LazyMergeError
from lazymerge.io.small_files import read_small_file
from lazymerge.merge.recipe import LM_HEADS, REWARD_HEADS, ModelInput, find_reward_model

Level = Literal["ok", "warning", "error"]
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Finding:
    section: str
    subject: str
    level: Level
    message: str
    #: The refusal this error stands for, raised as it is by `preflight` (None: a check's own).
    cause: LazyMergeError | None = field(default=None, compare=False, repr=False)

    def line(self) -> str:
        return f"{self.level:<7}  {self.section:<14}  {self.subject}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {
            "section": self.section,
            "subject": self.subject,
            "level": self.level,
            "message": self.message,
        }

    def refusal(self) -> LazyMergeError:
        """The error to raise for this finding: its cause, or the line `check` prints."""
        return (
            self.cause
            if self.cause is not None
            else IncompatibleInputsError(f"{self.subject}: {self.message}")
        )


def from_error(section: str, subject: str, exc: LazyMergeError) -> Finding:
    """An error finding for a refusal met while checking, its text on one line."""
    text = " ".join(str(exc).splitlines())
    return Finding(section, subject, "error", text.removeprefix(f"{subject}: "), exc)


def preflight(models: Sequence[ModelInput], rm: int | None) -> tuple[int | None, list[Finding]]:
    """The reward model's index and the warnings of every check on `models` (`rm`: --rm).

    Raises:
        The first error found (`Finding.refusal`).
    """
    findings, rm_index = check_heads(models, rm)
    findings += check_tokenizers(models, rm_index)
    findings += check_templates(models, rm_index)
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise errors[0].refusal()
    return rm_index, [f for f in findings if f.level == "warning"]


def check_heads(models: Sequence[ModelInput], rm: int | None) -> tuple[list[Finding], int | None]:
    """Which input is the reward model (its index, or None), its head, and heads a merge or
    eval would not read as the user may think (OpenRLHF's)."""
    out = [_openrlhf(model, i, rm) for i, model in enumerate(models) if model.openrlhf is not None]
    for model in models:
        names = list(model.checkpoint)
        heads = [n for n in names if n.startswith(REWARD_HEADS)]
        lm = [n for n in names if n.startswith(LM_HEADS)]
        role = "reward model" if model.is_reward_model else "model"
        out.append(
            Finding(
                "heads", str(model.path), "ok", f"{role}; reward head {heads or 'none'}; lm_head {bool(lm)}"
            )
        )
    rm_index = None
    try:
        rm_index = find_reward_model(models, rm)
    except LazyMergeError as exc:
        out.append(from_error("heads", "inputs", exc))
    if rm_index is None and len(models) > 1:
        out.append(
            Finding(
                "heads",
                "inputs",
                "warning",
                "no input is a reward model (config.json architectures ending in ForSequenceClassification): "
                "a plain merge; eval and sweep need one (or --rm N)",
            )
        )
    return out, rm_index


def _openrlhf(model: ModelInput, index: int, rm: int | None) -> Finding:
    """What an OpenRLHF model's head means here: a reward model named with --rm is merged and
    scored; one not named, or a critic, is refused."""
    head = model.openrlhf
    assert head is not None
    archs = (model.config or {}).get("architectures")
    if head.kind == "critic":
        return Finding(
            "heads",
            str(model.path),
            "error",
            f"holds {head.tensor} of an OpenRLHF critic (architectures {archs}): a value per token, not a "
            "reward; give OpenRLHF's reward model (RewardModel) instead",
        )
    if rm != index:
        return Finding(
            "heads",
            str(model.path),
            "error",
            f"holds {head.tensor}, OpenRLHF's reward head (architectures {archs}): pass --rm {index} to name "
            "this input the reward model",
        )
    return Finding(
        "heads",
        str(model.path),
        "ok",
        f"OpenRLHF reward model (--rm {index}): {head.tensor} kept as it is, its reward read at each text's "
        "last token as OpenRLHF reads it",
    )


def check_tokenizers(models: Sequence[ModelInput], rm_index: int | None) -> list[Finding]:
    """Vocabularies and special tokens against the reward model's (or the first input's)."""
    if len(models) < 2:
        return []
    ref = models[rm_index if rm_index is not None else 0]
    out = []
    for model in models:
        if model is ref:
            continue
        if ref.vocab is None or model.vocab is None:
            out.append(
                Finding(
                    "tokenizers",
                    str(model.path),
                    "warning",
                    "no tokenizer here or in the reference: rows matched by id",
                )
            )
            continue
        only = [t for t in model.vocab if t not in ref.vocab]
        moved = [t for t in model.vocab if t in ref.vocab and ref.vocab[t] != model.vocab[t]]
        if only:
            out.append(
                Finding(
                    "tokenizers",
                    str(model.path),
                    "warning",
                    f"{len(only)} tokens not in {ref.path} (first {only[0]!r}, id {model.vocab[only[0]]}); "
                    "a reward-model merge appends them, growing the vocabulary",
                )
            )
        if moved:
            t = moved[0]
            out.append(
                Finding(
                    "tokenizers",
                    str(model.path),
                    "warning",
                    f"{len(moved)} tokens have other ids than in {ref.path} (first {t!r}: {model.vocab[t]} vs "
                    f"{ref.vocab[t]}); rows are matched by token",
                )
            )
        out.extend(_special_tokens(ref, model))
        if not only and not moved:
            out.append(
                Finding("tokenizers", str(model.path), "ok", f"same {len(model.vocab)} tokens as {ref.path}")
            )
    return out


def _special_tokens(ref: ModelInput, model: ModelInput) -> list[Finding]:
    out = []
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        a, b = (ref.config or {}).get(key), (model.config or {}).get(key)
        if a != b:
            out.append(
                Finding(
                    "tokenizers",
                    str(model.path),
                    "warning",
                    f"{key} is {b!r} here, {a!r} in {ref.path} (the output keeps the reward model's)",
                )
            )
    return out


def check_templates(models: Sequence[ModelInput], rm_index: int | None) -> list[Finding]:
    """Chat templates compared as text (never rendered here)."""
    texts = {str(m.path): template_text(m.folder) for m in models}
    if len(set(texts.values())) <= 1:
        return [Finding("chat templates", "inputs", "ok", "same chat template" if models else "no inputs")]
    ref = str(models[rm_index or 0].path)
    return [
        Finding(
            "chat templates",
            path,
            "warning",
            f"chat template differs from {ref}'s"
            + (" (none here)" if text is None else "")
            + "; the output keeps the reward model's",
        )
        for path, text in texts.items()
        if path != ref and text != texts[ref]
    ]


def template_text(folder: Path | None) -> str | None:
    """The folder's chat template as text (JSON read, nothing executed), or None."""
    if folder is None:
        return None
    for name in _TEMPLATE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        raw = read_small_file(path).decode("utf-8", "replace")
        if name.endswith(".jinja"):
            return raw
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if isinstance(doc, dict) and doc.get("chat_template") is not None:
            return json.dumps(doc["chat_template"], sort_keys=True)
    return None
