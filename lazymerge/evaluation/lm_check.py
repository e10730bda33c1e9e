"""`sweep --lm-check`: each point's merged backbone read as a language model on the pair files.

A reward model has no LM head, so the head that turns the merged backbone's final hidden states
into next-token logits comes from the inputs (`choose_lm_head`, decided once per sweep):

- untied: the `lm_head.weight` of every domain model that holds one (its config not tying it
  to the embeddings). One holder: its head. Several: their rows averaged with the weights the
  merged input embedding gets at the point (that tensor's own weights where per-tensor weights
  give it some), renormalised over the holders that have the row's token; where those weights
  are all 0 (the reward model alone) the holders' rows are averaged plainly, as the merge does
  for an appended embedding row at weight 0. The base model's head, if any, is not read.
- tied: no domain model holds an untied head and the reward model's or a domain model's config
  ties the embeddings: logits = h @ E^T with E the point's merged input embeddings.

Rows are matched to the merged vocabulary by token exactly as the DogeRM recipe matches the
embedding rows (`merge.recipe`): each output row takes each holder's row of the same token (its
embedding row map, `TensorPlan.row_maps`). So a row appended to the vocabulary from a domain
model (MetaMath's and MAmmoTH's `[PAD]`, id 32000) takes that model's own `lm_head` row for
`[PAD]`, and enters the softmax like any token: the head is the SFT model's own, row for row.
A row no holder has (a token only the reward model has) has no logit: it is left out of the
softmax, and a response token that is such a token is not scored (counted per file as
`unscored`).

Definitions (the tests recompute each with transformers' LlamaForCausalLM): a pair's responses
start after the two texts' longest common token prefix (`response_start`); each response's
score is the mean log-likelihood of its tokens from there, one unpadded forward pass per text,
logits and log-softmax in float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lazymerge.errors import IncompatibleInputsError
from lazymerge.merge.recipe import EMBEDDINGS, LM_HEADS, ModelInput

if TYPE_CHECKING:
    import torch

    from lazymerge.io.reader import Checkpoint
    from lazymerge.merge.plan import MergePlan
    from lazymerge.merge.tensor_plan import TensorPlan

#: The tensor an untied domain model's LM head is read from.
LM_HEAD_TENSOR = LM_HEADS[0] + "weight"
#: What reads the backbone with tied embeddings.
TIED_HEAD = "its tied input embeddings (logits = h @ E^T, E the point's merged input embeddings)"
#: Output rows of the head built at a time (a block of (rows, hidden) fp32 per holder).
HEAD_BLOCK_ROWS = 4096


@dataclass(frozen=True)
class LmHead:
    """Which head reads the backbone (`choose_lm_head`): `tied`, or `untied` from the
    `lm_head.weight` of the inputs numbered `holders` (input order)."""

    kind: str
    holders: tuple[int, ...] = ()
    holder_paths: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """What a sweep's fingerprint keeps of the choice (the holders' paths are its inputs)."""
        return {"kind": self.kind, "tensor": LM_HEAD_TENSOR, "holders": list(self.holders)}

    def describe(self) -> str:
        """The head in words, for the report."""
        if self.kind == "tied":
            return TIED_HEAD
        names = ", ".join(self.holder_paths)
        how = (
            f"{LM_HEAD_TENSOR} of {names}"
            if len(self.holders) == 1
            else f"the {LM_HEAD_TENSOR} of {names}, averaged with the merged embedding's weights at each "
            "point (renormalised over the heads that have the token; plainly where those are all 0)"
        )
        return (
            f"{how}, rows matched to the merged vocabulary by token as the embedding rows are (an appended "
            "token such as [PAD] takes its own head row; a token no head has is left out of the softmax "
            "and not scored)"
        )


def _ties(model: ModelInput) -> bool:
    return bool((model.config or {}).get("tie_word_embeddings", False))


def choose_lm_head(models: Sequence[ModelInput], rm: int) -> LmHead:
    """The head `--lm-check` reads the merged backbone through (see the module's docstring).

    Raises:
        IncompatibleInputsError, one line, when no input has an LM head.
    """
    holders = tuple(
        i for i, m in enumerate(models) if i != rm and LM_HEAD_TENSOR in m.checkpoint and not _ties(m)
    )
    if holders:
        return LmHead("untied", holders, tuple(str(models[i].path) for i in holders))
    if any(_ties(m) for m in models):
        return LmHead("tied")
    raise IncompatibleInputsError(
        f"{models[rm].folder or models[rm].path}: --lm-check needs an LM head, and no domain model holds an untied "
        f"{LM_HEAD_TENSOR} nor does any config tie the embeddings (tie_word_embeddings): leave out --lm-check"
    )


@dataclass(frozen=True)
class HeadRows:
    """An untied head over the merged vocabulary: `weight` (vocab, hidden) fp32, and `missing`
    (vocab,) bool, True where no holder has the row's token."""

    weight: torch.Tensor
    missing: torch.Tensor


def _embedding_plan(plan: MergePlan) -> TensorPlan:
    found = [tp for name, tp in plan.tensors.items() if name.endswith(EMBEDDINGS)]
    if len(found) != 1:
        raise IncompatibleInputsError(
            f"{plan.inputs[0]}: --lm-check matches the LM head's rows to the merged input embedding's, "
            f"but the merge has {len(found)} input embeddings"
        )
    return found[0]


def _holder_rows(tp: TensorPlan, i: int) -> np.ndarray:
    """Holder i's row for each merged-vocabulary row (-1: it has no such token): the row map the
    embedding merge uses, or the same ids when the embeddings merge as plain tensors."""
    if tp.row_maps is not None and tp.row_maps[i] is not None:
        return np.asarray(tp.row_maps[i], dtype=np.int64)
    return np.arange(tp.shape[0], dtype=np.int64)


def _row_weights(weights: Sequence[float], maps: list[np.ndarray]) -> np.ndarray:
    """(holders, rows) float64: the holders' weights per output row, renormalised over the
    holders present; a plain average where the present holders' weights sum to 0."""
    present = np.stack([m >= 0 for m in maps])  # (holders, rows)
    w = np.array(weights, dtype=np.float64)[:, None] * present
    total = w.sum(axis=0)
    zero = present.any(axis=0) & (total == 0)
    w[:, zero] = present[:, zero]
    total = w.sum(axis=0)
    out: np.ndarray = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    return out


def _read_head(ckpt: Checkpoint, rows: int, hidden: int, name: str) -> torch.Tensor:
    """A holder's whole `lm_head.weight` in its own dtype, (rows, hidden), checked against its
    embedding's rows and the merged hidden size."""
    import torch

    from lazymerge.io.dtypes import is_float, torch_dtype

    info = ckpt[LM_HEAD_TENSOR]
    if tuple(info.shape) != (rows, hidden) or not is_float(info.dtype):
        raise IncompatibleInputsError(
            f"{info.path}: tensor {LM_HEAD_TENSOR!r} is {info.dtype} {list(info.shape)}; --lm-check needs a "
            f"floating-point [{rows}, {hidden}] head, one row per row of its {name!r}"
        )
    data = bytearray(info.nbytes)
    ckpt.read_into(info, 0, memoryview(data))
    return torch.frombuffer(data, dtype=torch_dtype(info.dtype)).view(rows, hidden)


def head_rows(head: LmHead, plan: MergePlan, checkpoints: Sequence[Checkpoint]) -> HeadRows:
    """The untied head of one point over the merged vocabulary (see the module's docstring).

    Memory: the output (vocab, hidden) fp32, one holder's head in its dtype, and a block of
    HEAD_BLOCK_ROWS rows in fp32.
    """
    import torch

    tp = _embedding_plan(plan)
    vocab, hidden = tp.shape[0], tp.shape[1]
    maps = [_holder_rows(tp, i) for i in head.holders]
    weights = tp.weights if tp.weights is not None else plan.variants[0]
    per_row = _row_weights([weights[i] for i in head.holders], maps)
    out = torch.zeros(vocab, hidden, dtype=torch.float32)
    for k, i in enumerate(head.holders):
        source = tp.sources[i]
        rows = source.shape[0] if source is not None else vocab
        held = _read_head(checkpoints[i], rows, hidden, tp.name)
        for start in range(0, vocab, HEAD_BLOCK_ROWS):
            end = min(vocab, start + HEAD_BLOCK_ROWS)
            index = torch.from_numpy(np.maximum(maps[k][start:end], 0))
            scale = torch.from_numpy(per_row[k, start:end].astype(np.float32))[:, None]
            out[start:end] += held.index_select(0, index).float() * scale  # (block, hidden) fp32
        del held
    missing = torch.from_numpy(~np.stack([m >= 0 for m in maps]).any(axis=0))
    return HeadRows(out, missing)


def response_start(chosen: Sequence[int], rejected: Sequence[int]) -> int:
    """Where a pair's responses start in tokens: after the two texts' longest common prefix
    (the formatted prompt, and any first response tokens they share, which cannot tell them
    apart), kept >= 1 (the first token has no prediction) and < the shorter text's length (each
    response scores at least its last token)."""
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    return max(1, min(common, len(chosen) - 1, len(rejected) - 1))


@dataclass(frozen=True)
class PairLikelihoods:
    """One pair file's mean response log-likelihoods, and the response tokens left unscored
    (tokens the head has no row for)."""

    chosen: list[float]
    rejected: list[float]
    unscored: int

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "rejected": self.rejected, "unscored": self.unscored}


def mean_log_likelihoods(
    model: Any,
    device: str,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    where: str,
    head: HeadRows | None = None,
) -> PairLikelihoods:
    """Per pair of token ids (chosen, rejected): the mean log-likelihood of each response's
    tokens (from `response_start`) under the model's backbone read through `head`, or through
    its tied input embeddings when `head` is None. One unpadded forward pass per text; logits and
    log-softmax in float32 for the response's tokens only (memory holds (response tokens, vocab)
    floats at a time).

    Raises:
        IncompatibleInputsError for a response none of whose tokens the head has a row for.
    """
    import torch

    backbone = getattr(model, model.base_model_prefix)
    if head is None:
        weight, missing = model.get_input_embeddings().weight.float(), None  # (vocab, hidden) fp32
    else:
        weight = head.weight.to(device)
        missing = head.missing.to(device) if bool(head.missing.any()) else None

    def mean_ll(ids: Sequence[int], start: int, what: str) -> tuple[float, int]:
        x = torch.tensor([list(ids)], dtype=torch.long, device=device)
        hidden = backbone(input_ids=x).last_hidden_state[0, start - 1 : -1]  # (tokens, hidden)
        logits = hidden.float() @ weight.T  # (response tokens, vocab) fp32
        targets = x[0, start:]
        if missing is None:
            return float(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).mean()), 0
        logits[:, missing] = float("-inf")
        keep = ~missing[targets]
        if not bool(keep.any()):
            raise IncompatibleInputsError(
                f"{where}: no token of {what} has a row in the LM head (they are tokens only the reward "
                "model has): leave out --lm-check"
            )
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[keep]
        return float(logp.mean()), int((~keep).sum())

    chosen: list[float] = []
    rejected: list[float] = []
    unscored = 0
    with torch.no_grad():
        for n, (c, r) in enumerate(pairs):
            start = response_start(c, r)
            for ids, out, what in ((c, chosen, "chosen"), (r, rejected, "rejected")):
                value, left = mean_ll(ids, start, f"pair {n + 1}'s {what} response")
                out.append(value)
                unscored += left
    return PairLikelihoods(chosen, rejected, unscored)


def _finite_list(value: Any, length: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def lm_record_problem(lm: Any, pairs: dict[str, int]) -> str | None:
    """What is wrong with a results line's `lm_check` (untrusted), or None: per pair file,
    `pairs[name]` finite log-likelihoods each for chosen and rejected, and a count `unscored`."""
    if not isinstance(lm, dict) or set(lm) != set(pairs):
        return f"lm_check must hold {', '.join(sorted(pairs)) or 'nothing'}"
    for name, n in pairs.items():
        entry = lm[name]
        if not isinstance(entry, dict) or not all(
            _finite_list(entry.get(k), n) for k in ("chosen", "rejected")
        ):
            return f"lm_check {name[:100]}: chosen and rejected must be {n} finite log-likelihoods each"
        unscored = entry.get("unscored", 0)
        if isinstance(unscored, bool) or not isinstance(unscored, int) or not 0 <= unscored < 1 << 62:
            return f"lm_check {name[:100]}: unscored must be a count of tokens"
    return None


@dataclass(frozen=True)
class LmPreference:
    """How often the backbone's likelihood prefers the chosen response, on one pair file."""

    n: int
    right: int
    accuracy: float
    ci_low: float
    ci_high: float
    #: response tokens not scored (the head has no row for them)
    unscored: int = 0


def lm_preference(chosen: Sequence[float], rejected: Sequence[float], unscored: int = 0) -> LmPreference:
    """The share of pairs whose chosen response's mean token log-likelihood is higher (a tie
    is wrong, as in the accuracy), with its 95% Wilson interval."""
    from lazymerge.evaluation.stats import wilson_interval

    right = int((np.asarray(chosen, dtype=np.float64) > np.asarray(rejected, dtype=np.float64)).sum())
    n = len(chosen)
    low, high = wilson_interval(right, n)
    return LmPreference(n, right, right / n if n else 0.0, low, high, unscored)


def point_likelihoods(
    head: LmHead,
    model: Any,
    device: str,
    plan: MergePlan | None,
    checkpoints: Sequence[Checkpoint],
    texts: Mapping[str, Sequence[tuple[Sequence[int], Sequence[int]]]],
    where: str,
) -> dict[str, dict[str, Any]]:
    """One sweep point's `lm_check` record: per pair file (name -> token id pairs), its
    `PairLikelihoods` as a dict, with an untied head built once for the point from the point's
    `plan` and the opened inputs (both unused for a tied head)."""
    rows = None
    if head.kind == "untied":
        if plan is None:
            raise ValueError("an untied LM head is built from the point's merge plan")
        rows = head_rows(head, plan, checkpoints)
    return {
        name: mean_log_likelihoods(model, device, pairs, f"{where}, {name}", rows).to_dict()
        for name, pairs in texts.items()
    }
