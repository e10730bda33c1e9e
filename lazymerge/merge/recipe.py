"""DogeRM: a reward model merged with domain SFT models, tensor by tensor, from headers.

Roles come from each model folder's config.json: the reward model (RM) is the input whose
`architectures` ends in ForSequenceClassification (or the one named by `rm`), the others are
domain SFT models. Then, per tensor:

- backbone tensors held by every input (attention, MLP, every norm) are averaged with the weights;
- the RM's reward head (`score.*`) is kept unchanged, the SFT models' `lm_head.*` is dropped;
- the input embedding is matched by token, never by row number: tokens in several inputs get the
  weighted average of their rows (weights renormalised over the inputs that have the token),
  tokens only in an SFT model are appended with that model's row, tokens only in the RM keep the
  RM's row. Without tokenizer files the rows of the common prefix are averaged (with a note), or
  the merge is refused under `strict`.

The output is the RM: its config (vocab_size grown by the appended tokens), its tokenizer with the
appended tokens added, its chat template.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lazymerge.errors import IncompatibleInputsError, LazyMergeError, VocabularyMismatchError
from lazymerge.io.hf_folder import (
    added_token_entries,
    model_folder,
    output_companion_files,
    read_config,
    read_vocab,
    tokenizer_files,
)
from lazymerge.io.reader import Checkpoint
from lazymerge.merge.tensor_plan import TensorPlan, check_same_tensor, first_mismatches, output_dtype

REWARD_HEADS = ("score.", "v_head.", "reward_head.", "value_head.")
#: OpenRLHF's models (`openrlhf/models/model.py`): a transformers backbone under OpenRLHF's own
#: class name in config.json `architectures`, with a bias-free linear head of one output named
#: `value_head` (`value_head_prefix`; later versions default to `score`). A reward model reads it
#: at each text's last token (the last position of its attention mask); a critic at every token.
OPENRLHF_ARCHITECTURES = {"RewardModel": "reward", "CriticModel": "critic"}
OPENRLHF_HEAD = "value_head.weight"
LM_HEADS = ("lm_head.",)
EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


@dataclass(frozen=True)
class ModelInput:
    """An opened input with the config and vocabulary of its model folder (None when absent)."""

    checkpoint: Checkpoint
    folder: Path | None
    config: dict[str, Any] | None
    vocab: dict[str, int] | None

    @classmethod
    def open(cls, checkpoint: Checkpoint) -> ModelInput:
        folder = model_folder(checkpoint.path)
        return cls(checkpoint, folder, read_config(folder), read_vocab(folder))

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def openrlhf(self) -> OpenRlhfHead | None:
        """OpenRLHF's head, when this is one of its models (`openrlhf_head`)."""
        return openrlhf_head(self.config, self.checkpoint.keys())

    @property
    def is_reward_model(self) -> bool:
        archs = (self.config or {}).get("architectures") or []
        return any(str(a).endswith("ForSequenceClassification") for a in archs)


@dataclass(frozen=True)
class OpenRlhfHead:
    """An OpenRLHF model's head: its tensor and what the model is (`reward` or `critic`)."""

    tensor: str
    kind: str


def openrlhf_head(config: dict[str, Any] | None, names: Collection[str]) -> OpenRlhfHead | None:
    """The OpenRLHF head of a model (its config.json and tensor names), or None for another
    model: a `value_head.weight` (that name is OpenRLHF's), or a `score.weight` under OpenRLHF's
    class names."""
    archs = [str(a) for a in (config or {}).get("architectures") or []]
    kind = next((OPENRLHF_ARCHITECTURES[a] for a in archs if a in OPENRLHF_ARCHITECTURES), None)
    if OPENRLHF_HEAD in names and "score.weight" not in names:
        return OpenRlhfHead(OPENRLHF_HEAD, kind or "reward")
    if kind is not None and "score.weight" in names:
        return OpenRlhfHead("score.weight", kind)
    return None


def find_reward_model(models: Sequence[ModelInput], rm: int | None = None) -> int | None:
    """Index of the reward model among the inputs, or None for a plain merge.

    Raises:
        LazyMergeError for two reward models without `rm`, or `rm` out of range.
    """
    if rm is not None:
        if not 0 <= rm < len(models):
            raise LazyMergeError(f"--rm {rm}: there are only {len(models)} inputs (numbered from 0)")
        return rm
    rms = [i for i, m in enumerate(models) if m.is_reward_model]
    if len(rms) > 1:
        raise IncompatibleInputsError(
            f"{models[rms[1]].path}: is a reward model, like {models[rms[0]].path}; DogeRM merges one "
            "reward model with domain models: pass --rm N to say which input is the reward model"
        )
    return rms[0] if rms else None


def check_architectures(models: Sequence[ModelInput], rm: int) -> None:
    """The inputs' configs must agree on the backbone's shape (hidden size, layers, heads...)."""
    ref = models[rm].config
    if ref is None:
        return
    for model in models:
        if model is models[rm] or model.config is None:
            continue
        diffs = [
            f"{key} {model.config.get(key)!r} (reward model: {ref.get(key)!r})"
            for key in ARCHITECTURE_KEYS
            if key in ref and key in model.config and ref[key] != model.config[key]
        ]
        if diffs:
            raise IncompatibleInputsError(
                f"{model.folder / 'config.json' if model.folder else model.path}: architecture differs from "
                f"the reward model {models[rm].path}: {'; '.join(diffs[:3])}"
                + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            )


@dataclass(frozen=True)
class RewardMergePlan:
    tensors: dict[str, TensorPlan]
    dropped: tuple[str, ...]
    extra_files: dict[str, bytes]
    notes: tuple[str, ...]
    roles: tuple[str, ...]


def plan_reward_merge(
    models: Sequence[ModelInput], rm: int, dtype: str = "auto", strict: bool = False
) -> RewardMergePlan:
    """Decide every output tensor of a reward-model merge from headers, configs and tokenizers.

    Raises:
        IncompatibleInputsError when the backbones do not line up or tokenizers conflict.
    """
    check_architectures(models, rm)
    rm_ckpt = models[rm].checkpoint
    others = [i for i in range(len(models)) if i != rm]
    tensors: dict[str, TensorPlan] = {}
    dropped: list[str] = []
    notes: list[str] = []
    mismatched: list[str] = []
    appended: list[tuple[str, int, dict[str, Any] | None]] = []
    names = sorted(set().union(*(set(m.checkpoint) for m in models)))
    for name in names:
        holders = [i for i, m in enumerate(models) if name in m.checkpoint]
        if len(holders) == len(models):
            for i in others:
                if not name.endswith(EMBEDDINGS):
                    check_same_tensor(
                        name, rm_ckpt[name], rm_ckpt.path, models[i].checkpoint[name], models[i].path
                    )
            sources = tuple(m.checkpoint[name] for m in models)
            if name.endswith(EMBEDDINGS):
                tensors[name], rows_appended, note = _embedding_plan(name, models, rm, dtype, strict)
                appended = appended or rows_appended
                notes.append(note)
            else:
                action, out_dtype = output_dtype(sources, dtype)
                tensors[name] = TensorPlan(name, out_dtype, rm_ckpt[name].shape, action, sources)
        elif holders == [rm] and name.startswith(REWARD_HEADS):
            src = rm_ckpt[name]
            head_sources = tuple(src if i == rm else None for i in range(len(models)))
            tensors[name] = TensorPlan(
                name,
                src.dtype,
                src.shape,
                "copy",
                head_sources,
                note="reward head, kept from the reward model",
            )
        elif rm not in holders and name.startswith(LM_HEADS):
            dropped.extend(f"{name} of {models[i].path} (language-model head)" for i in holders)
        else:
            missing = [str(models[i].path) for i in range(len(models)) if i not in holders]
            mismatched.append(f"{name!r} (missing in {', '.join(missing)})")
    if mismatched:
        raise IncompatibleInputsError(
            f"{models[rm].path}: the models' tensors do not line up: {first_mismatches(mismatched)}; "
            "they must share one architecture"
        )
    embed_rows = next((t.shape[0] for n, t in tensors.items() if n.endswith(EMBEDDINGS)), None)
    extra = output_companion_files(models[rm].folder, appended, embed_rows if appended else None)
    roles = tuple("reward model" if i == rm else "domain model" for i in range(len(models)))
    return RewardMergePlan(tensors, tuple(dropped), extra, tuple(notes), roles)


def _embedding_plan(
    name: str, models: Sequence[ModelInput], rm: int, dtype: str, strict: bool
) -> tuple[TensorPlan, list[tuple[str, int, dict[str, Any] | None]], str]:
    """The plan of embedding `name`: rows matched by token (tokens only the domain models have
    appended after the reward model's rows), or by position when a model has no tokenizer."""
    infos = [m.checkpoint[name] for m in models]
    _check_embedding_shapes(name, models, infos, rm)
    missing_vocab = [str(m.folder or m.path) for m in models if m.vocab is None]
    appended: list[tuple[str, int, dict[str, Any] | None]] = []
    if missing_vocab:
        if strict:
            raise IncompatibleInputsError(
                f"{missing_vocab[0]}: no tokenizer files (tokenizer.json or tokenizer.model), so embedding rows "
                "cannot be matched by token; add them, or drop --strict to average rows by position"
            )
        maps, note = _rows_by_position(name, infos, rm, missing_vocab)
    else:
        maps, appended, note = _rows_by_token(name, models, infos, rm)
    action, out_dtype = output_dtype(infos, dtype)
    plan = TensorPlan(
        name,
        out_dtype,
        (len(maps[0]), *infos[rm].shape[1:]),
        "rows",
        tuple(infos),
        row_maps=tuple(maps),
        note=note,
    )
    return plan, appended, note


def _check_embedding_shapes(name: str, models: Sequence[ModelInput], infos: Sequence[Any], rm: int) -> None:
    """Every input's embedding is (rows, the reward model's hidden size), with as many rows as
    its config's vocab_size."""
    rm_info = infos[rm]
    hidden = rm_info.shape[1:]
    for model, info in zip(models, infos, strict=True):
        if len(info.shape) != 2 or info.shape[1:] != hidden:
            raise IncompatibleInputsError(
                f"{model.path}: embedding {name!r} has shape {list(info.shape)}; expected [rows, {hidden[0]}] "
                f"as in the reward model {rm_info.path}"
            )
    for model, info in zip(models, infos, strict=True):
        vocab_size = (model.config or {}).get("vocab_size")
        if model.folder is not None and isinstance(vocab_size, int) and vocab_size != info.shape[0]:
            raise VocabularyMismatchError(
                f"{model.folder / 'config.json'}: vocab_size is {vocab_size} but embedding {name!r} in "
                f"{info.path} has {info.shape[0]} rows; the config does not belong to these weights"
            )


def _rows_by_position(
    name: str, infos: Sequence[Any], rm: int, missing_vocab: Sequence[str]
) -> tuple[list[Any], str]:
    """Row maps without tokenizers: the rows all inputs have averaged by position, the rest the
    reward model's."""
    rm_rows = infos[rm].shape[0]
    maps = []
    for info in infos:
        row_map = np.full(rm_rows, -1, dtype=np.int64)
        common = min(rm_rows, info.shape[0])
        row_map[:common] = np.arange(common)
        maps.append(row_map)
    note = (
        f"{name}: no tokenizer in {', '.join(missing_vocab)}; rows 0..{min(i.shape[0] for i in infos) - 1} "
        "averaged by position, rows beyond them kept from the reward model"
    )
    return maps, note


def _rows_by_token(
    name: str, models: Sequence[ModelInput], infos: Sequence[Any], rm: int
) -> tuple[list[Any], list[tuple[str, int, dict[str, Any] | None]], str]:
    """Row maps by token: the reward model's rows, then the domain models' new tokens appended
    (each with its added-token entry); every input's row for each output row, -1 where it has
    none."""
    rm_rows = infos[rm].shape[0]
    vocabs = [m.vocab or {} for m in models]
    for model, vocab, info in zip(models, vocabs, infos, strict=True):
        too_big = [t for t, i in vocab.items() if i >= info.shape[0]]
        if too_big:
            raise VocabularyMismatchError(
                f"{tokenizer_files(model.folder)}: tokenizer has token {too_big[0]!r} at id "
                f"{vocab[too_big[0]]} but embedding {name!r} in {info.path} has only {info.shape[0]} rows; "
                "the tokenizer does not belong to these weights"
            )
    rm_vocab = vocabs[rm]
    rm_tokens = {i: t for t, i in rm_vocab.items()}
    new_tokens: list[str] = []
    seen = set(rm_vocab)
    for i in range(len(models)):
        if i == rm:
            continue
        for token, _ in sorted(vocabs[i].items(), key=lambda kv: kv[1]):
            if token not in seen:
                seen.add(token)
                new_tokens.append(token)
    rows = rm_rows + len(new_tokens)
    row_tokens: list[str | None] = [rm_tokens.get(r) for r in range(rm_rows)]
    row_tokens.extend(new_tokens)
    maps = []
    for i, vocab in enumerate(vocabs):
        if i == rm:
            row_map = np.full(rows, -1, dtype=np.int64)
            row_map[:rm_rows] = np.arange(rm_rows)
        else:
            row_map = np.array(
                [vocab.get(t, -1) if t is not None else -1 for t in row_tokens], dtype=np.int64
            )
        maps.append(row_map)
    appended: list[tuple[str, int, dict[str, Any] | None]] = []
    for k, token in enumerate(new_tokens):
        donor = next(i for i in range(len(models)) if i != rm and token in vocabs[i])
        appended.append((token, rm_rows + k, added_token_entries(models[donor].folder).get(token)))
    present = np.stack([m >= 0 for m in maps])
    shared = int(present.all(axis=0).sum())
    rm_only = int((present[rm] & (present.sum(axis=0) == 1)).sum())
    note = (
        f"{name}: matched by token: {shared} rows in every model, {rm_only} only in the reward model, "
        f"{rows - rm_rows} appended from domain models"
        + (f" ({first_mismatches(new_tokens)})" if new_tokens else "")
        + f"; output vocabulary {rows}"
    )
    return maps, appended, note
