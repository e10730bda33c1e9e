"""Why a merge helps or not: task vectors of the inputs, and what a point's rewards look like.

Two kinds of diagnostics, each a typed value with `to_dict()` (and `markdown()` or `format()`):

- `task_vectors(models, base)`: per layer group, the relative norm of each model's delta from
  the base (||x_i - base|| / ||base||) and the cosine between the deltas, in one streaming pass
  over the inputs through lazymerge's readers (one chunk of each tensor in memory at a time).
  `lazymerge check --base BASE` and every sweep with a base model report it.
- `pair_diagnostics(...)` for one point on one pair file: the rewards' mean and standard
  deviation (the scale a policy optimiser would see), the calibration of the Bradley-Terry
  probability sigmoid(r_chosen - r_rejected) (expected calibration error over confidence bins, the
  bins a reliability plot draws), accuracy by the pair's length difference (length bias), and the
  pairs that flip against the reward model alone (both ways, the largest changes with their texts:
  DogeRM's case study as a feature). `reward_scale` alone for best-of-N and RewardBench 2 files.

Definitions (the tests recompute each independently):
- confidence of a pair = sigmoid(|r_chosen - r_rejected|), in [0.5, 1); the pair is right when
  r_chosen > r_rejected (a tie is wrong, as in the accuracy). ECE = sum over bins of
  n_bin / n * |accuracy_bin - mean confidence_bin|, CALIBRATION_BINS equal bins over [0.5, 1].
- length difference d = (len(chosen) - len(rejected)) / max(len(chosen), len(rejected)) in
  characters of the responses; bins d < -LENGTH_MARGIN (chosen shorter), |d| <= LENGTH_MARGIN,
  d > LENGTH_MARGIN (chosen longer); `prefers_longer`: the share of pairs of unequal length in
  which the longer response has the higher reward.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lazymerge.errors import IncompatibleInputsError
from lazymerge.evaluation.conversations import prompt_text

#: Elements of one tensor read at a time per model (float64 work: 8 MiB per model).
CHUNK_ELEMS = 1 << 20
CALIBRATION_BINS = 10
LENGTH_MARGIN = 0.1
#: Flipped pairs shown with their texts, per direction; characters kept of each text.
FLIPS_SHOWN = 3
TEXT_CHARS = 300
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# --- task vectors ---------------------------------------------------------------------------


def tensor_group(name: str) -> str:
    """The layer group of a tensor: `embeddings`, `layer N` or `other` (final norm, heads)."""
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    return "embeddings" if "embed" in name else "other"


@dataclass(frozen=True)
class GroupVectors:
    """One layer group's task vectors.

    Attributes:
        relative_norms: per model, ||x_i - base|| / ||base|| over the group's tensors (None
            where the base's norm is zero).
        cosines: (i, j, cosine of delta_i and delta_j) for every pair of models i < j (None
            where a delta is zero).
    """

    group: str
    tensors: int
    elements: int
    base_norm: float
    relative_norms: tuple[float | None, ...]
    cosines: tuple[tuple[int, int, float | None], ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TaskVectorReport:
    """Task vectors of `models` against `base`, per layer group and over all shared tensors."""

    models: tuple[str, ...]
    base: str
    groups: tuple[GroupVectors, ...]
    total: GroupVectors
    #: tensors left out, each with why (absent from some input, shapes differ, not floating point)
    skipped: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "base": self.base,
            "groups": [g.to_dict() for g in self.groups],
            "total": self.total.to_dict(),
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TaskVectorReport:
        """The report back from its `to_dict()` (as results.json holds it)."""

        def group(g: dict[str, Any]) -> GroupVectors:
            cosines = tuple((int(i), int(j), c) for i, j, c in g["cosines"])
            return GroupVectors(
                g["group"], g["tensors"], g["elements"], g["base_norm"], tuple(g["relative_norms"]), cosines
            )

        return cls(
            tuple(doc["models"]),
            doc["base"],
            tuple(group(g) for g in doc["groups"]),
            group(doc["total"]),
            tuple(doc["skipped"]),
        )

    def markdown(self) -> list[str]:
        """A table: one row per group, relative norms in % of the base's norm, then cosines."""
        pairs = [(i, j) for i, j, _ in self.total.cosines]
        names = [Path(m).name or m for m in self.models]
        head = [f"delta {n}, % of base" for n in names] + [f"cos({names[i]}, {names[j]})" for i, j in pairs]
        lines = ["| group | tensors | " + " | ".join(head) + " |", "| --- | --- |" + " --- |" * len(head)]
        for g in (*self.groups, self.total):
            cells = ["-" if r is None else f"{100 * r:.3g}" for r in g.relative_norms]
            cells += ["-" if c is None else f"{c:.3f}" for _, _, c in g.cosines]
            lines.append(f"| {g.group} | {g.tensors} | " + " | ".join(cells) + " |")
        if self.skipped:
            lines += ["", f"Left out: {len(self.skipped)} tensor(s), e.g. {self.skipped[0]}."]
        return lines

    def format(self) -> str:
        return "\n".join([f"task vectors against {self.base}", "", *self.markdown()])


class _GroupSums:
    """Running sums of one group in float64: ||base||^2, <delta_i, delta_j> for i <= j."""

    def __init__(self, models: int) -> None:
        self.tensors = 0
        self.elements = 0
        self.base_sq = 0.0
        self.gram = np.zeros((models, models), dtype=np.float64)

    def add(self, base: Any, deltas: Any) -> None:
        """base (n,) and deltas (models, n), float64 torch tensors."""
        self.base_sq += float(base.dot(base))
        self.gram += (deltas @ deltas.T).numpy()

    def result(self, group: str) -> GroupVectors:
        base_norm = math.sqrt(self.base_sq)
        norms = np.sqrt(np.diag(self.gram))
        cosines = tuple(
            (i, j, float(self.gram[i, j] / (norms[i] * norms[j])) if norms[i] and norms[j] else None)
            for i in range(len(norms))
            for j in range(i + 1, len(norms))
        )
        relative = tuple(float(n / base_norm) if base_norm else None for n in norms)
        return GroupVectors(group, self.tensors, self.elements, base_norm, relative, cosines)


def _shared_tensors(checkpoints: Sequence[Any], base: Any) -> tuple[list[str], list[str]]:
    """Names of the float tensors every model and the base hold with one shape; the rest, why."""
    from lazymerge.io.dtypes import is_float

    shared, skipped = [], []
    for name, info in base.items():
        others = [c.get(name) for c in checkpoints]
        if any(o is None for o in others):
            skipped.append(f"{name} (not in every model)")
        elif any(o.shape != info.shape for o in others):
            skipped.append(
                f"{name} (shapes differ: {[list(o.shape) for o in others]} vs base {list(info.shape)})"
            )
        elif not all(is_float(t.dtype) for t in (info, *others)):
            skipped.append(f"{name} (not floating point)")
        else:
            shared.append(name)
    skipped += [f"{n} (not in the base)" for c in checkpoints for n in c if n not in base]
    return shared, sorted(set(skipped))


def _read_chunk(ckpt: Any, name: str, start: int, count: int) -> Any:
    """Elements [start, start + count) of a tensor as float64, (count,)."""
    import torch

    from lazymerge.io.dtypes import torch_dtype

    info = ckpt[name]
    buffer = bytearray(count * info.itemsize)
    ckpt.read_into(info, start * info.itemsize, memoryview(buffer))
    return torch.frombuffer(buffer, dtype=torch_dtype(info.dtype)).to(torch.float64)


def task_vectors(
    models: Sequence[str | Path], base: str | Path, chunk_elems: int = CHUNK_ELEMS
) -> TaskVectorReport:
    """Task vectors of `models` (reward model and domain models, in any order) from `base`.

    One pass over the inputs: each shared tensor is read in chunks of `chunk_elems` elements per
    model, so memory holds (models + 1) chunks in float64 whatever the model size.

    Raises:
        IncompatibleInputsError when the inputs share no tensor with the base; the readers'
        errors (HeaderError, InputError, ...) for unreadable inputs.
    """
    import torch

    from lazymerge.merge.api import open_inputs

    if chunk_elems < 1:
        raise ValueError("chunk_elems must be positive")
    opened = open_inputs([*models, base])
    try:
        checkpoints, base_ckpt = opened[:-1], opened[-1]
        shared, skipped = _shared_tensors(checkpoints, base_ckpt)
        if not shared:
            raise IncompatibleInputsError(
                f"{base}: shares no tensor of one shape with {models[0]}; is it the base of these models?"
            )
        sums: dict[str, _GroupSums] = {}
        total = _GroupSums(len(checkpoints))
        for name in shared:
            group = sums.setdefault(tensor_group(name), _GroupSums(len(checkpoints)))
            numel = base_ckpt[name].numel
            for acc in (group, total):
                acc.tensors += 1
                acc.elements += numel
            for start in range(0, numel, chunk_elems):
                count = min(chunk_elems, numel - start)
                b = _read_chunk(base_ckpt, name, start, count)
                deltas = torch.stack([_read_chunk(c, name, start, count) - b for c in checkpoints])
                group.add(b, deltas)
                total.add(b, deltas)
    finally:
        for ckpt in opened:
            ckpt.close()
    return TaskVectorReport(
        models=tuple(str(m) for m in models),
        base=str(base),
        groups=tuple(sums[g].result(g) for g in sorted(sums, key=_group_order)),
        total=total.result("all"),
        skipped=tuple(skipped),
    )


def _group_order(group: str) -> tuple[int, int]:
    if group == "embeddings":
        return (0, 0)
    if group.startswith("layer "):
        return (1, int(group.split()[1]))
    return (2, 0)


# --- a point's rewards ------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardScale:
    """Mean and (population) standard deviation of every reward scored in one file."""

    n: int
    mean: float
    std: float


def reward_scale(rewards: Sequence[float]) -> RewardScale:
    values = np.asarray(rewards, dtype=np.float64)
    if not len(values):
        return RewardScale(0, 0.0, 0.0)
    return RewardScale(len(values), float(values.mean()), float(values.std()))


@dataclass(frozen=True)
class CalibrationBin:
    """Pairs whose confidence falls in [low, high): how many, their mean confidence and accuracy."""

    low: float
    high: float
    n: int
    confidence: float | None
    accuracy: float | None


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error of the Bradley-Terry probability, with its bins."""

    n: int
    ece: float
    bins: tuple[CalibrationBin, ...]


def calibration(
    chosen: Sequence[float], rejected: Sequence[float], bins: int = CALIBRATION_BINS
) -> Calibration:
    margin = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    confidence = 1.0 / (1.0 + np.exp(-np.abs(margin)))  # sigmoid(|margin|), in [0.5, 1)
    right = margin > 0
    edges = np.linspace(0.5, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    out, ece = [], 0.0
    for k in range(bins):
        members = index == k
        n = int(members.sum())
        if n:
            conf, acc = float(confidence[members].mean()), float(right[members].mean())
            ece += n / len(margin) * abs(acc - conf)
            out.append(CalibrationBin(float(edges[k]), float(edges[k + 1]), n, conf, acc))
        else:
            out.append(CalibrationBin(float(edges[k]), float(edges[k + 1]), 0, None, None))
    return Calibration(len(margin), ece, tuple(out))


@dataclass(frozen=True)
class LengthBin:
    name: str
    n: int
    accuracy: float | None


@dataclass(frozen=True)
class LengthBias:
    """Accuracy by the pair's relative length difference, and how often the longer one wins."""

    bins: tuple[LengthBin, ...]
    #: share of pairs of unequal length whose longer response has the higher reward
    prefers_longer: float | None
    unequal: int


LENGTH_BINS = ("chosen shorter", "about equal", "chosen longer")


def length_bias(
    lengths: Sequence[tuple[int, int]], chosen: Sequence[float], rejected: Sequence[float]
) -> LengthBias:
    """`lengths`: (len(chosen response), len(rejected response)) per pair, in characters."""
    both = np.asarray(lengths, dtype=np.float64).reshape(-1, 2)  # (pairs, 2)
    lc, lr = both[:, 0], both[:, 1]
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    d = (lc - lr) / np.maximum(np.maximum(lc, lr), 1.0)
    right = c > r
    masks = (d < -LENGTH_MARGIN, np.abs(d) <= LENGTH_MARGIN, d > LENGTH_MARGIN)
    bins = tuple(
        LengthBin(name, int(m.sum()), float(right[m].mean()) if m.any() else None)
        for name, m in zip(LENGTH_BINS, masks, strict=True)
    )
    unequal = lc != lr
    longer_wins = np.where(lc > lr, c > r, r > c)[unequal]
    return LengthBias(bins, float(longer_wins.mean()) if unequal.any() else None, int(unequal.sum()))


@dataclass(frozen=True)
class Flip:
    """A pair judged differently from the reward model alone: margins r_chosen - r_rejected."""

    index: int
    subset: str
    prompt: str
    chosen: str
    rejected: str
    baseline_margin: float
    point_margin: float


@dataclass(frozen=True)
class Flips:
    """Pairs the point gets right and the reward model alone wrong (`fixed`), the reverse
    (`broken`), and the largest margin changes of each kind."""

    fixed: int
    broken: int
    largest_fixed: tuple[Flip, ...]
    largest_broken: tuple[Flip, ...]


def flips(
    pairs: Sequence[Any],
    baseline: tuple[Sequence[float], Sequence[float]],
    point: tuple[Sequence[float], Sequence[float]],
    shown: int = FLIPS_SHOWN,
) -> Flips:
    """`pairs` with .prompt, .chosen, .rejected, .subset; (chosen, rejected) rewards of each."""
    base_margin = np.asarray(baseline[0], dtype=np.float64) - np.asarray(baseline[1], dtype=np.float64)
    margin = np.asarray(point[0], dtype=np.float64) - np.asarray(point[1], dtype=np.float64)
    fixed = np.flatnonzero((base_margin <= 0) & (margin > 0))
    broken = np.flatnonzero((base_margin > 0) & (margin <= 0))

    def largest(idx: np.ndarray) -> tuple[Flip, ...]:
        order = sorted(idx.tolist(), key=lambda i: (-abs(margin[i] - base_margin[i]), i))[:shown]
        return tuple(
            Flip(
                i,
                pairs[i].subset,
                _clip(prompt_text(pairs[i].prompt)),
                _clip(pairs[i].chosen),
                _clip(pairs[i].rejected),
                float(base_margin[i]),
                float(margin[i]),
            )
            for i in order
        )

    return Flips(len(fixed), len(broken), largest(fixed), largest(broken))


def _clip(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 3] + "..."


@dataclass(frozen=True)
class PairDiagnostics:
    """Everything `pair_diagnostics` says of one point on one pair file."""

    rewards: RewardScale
    calibration: Calibration
    length: LengthBias
    flips: Flips

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair_diagnostics(
    pairs: Sequence[Any],
    rewards: tuple[Sequence[float], Sequence[float]],
    baseline: tuple[Sequence[float], Sequence[float]],
) -> PairDiagnostics:
    """Diagnostics of one point's (chosen, rejected) rewards on `pairs`, against the reward
    model alone's `baseline` rewards of the same pairs."""
    chosen, rejected = rewards
    return PairDiagnostics(
        rewards=reward_scale([*chosen, *rejected]),
        calibration=calibration(chosen, rejected),
        length=length_bias([(len(p.chosen), len(p.rejected)) for p in pairs], chosen, rejected),
        flips=flips(pairs, baseline, rewards),
    )


# --- the backbone as a language model (--lm-check) --------------------------------------------

#: What reads the backbone's final hidden states as next-token logits.
LM_HEAD = "tied input embeddings (logits = h @ E^T)"


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


def _backbone_and_embeddings(model: Any, where: str) -> tuple[Any, Any]:
    """The model's backbone and its (vocab, hidden) input embedding matrix, refused where
    the embeddings are not the LM head (untied)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        raise IncompatibleInputsError(
            f"{where}: --lm-check reads the backbone through its tied input embeddings, but the "
            "config has tie_word_embeddings false (an untied domain lm_head is not read): leave out --lm-check"
        )
    return getattr(model, model.base_model_prefix), model.get_input_embeddings().weight


def mean_log_likelihoods(
    model: Any, device: str, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], where: str
) -> tuple[list[float], list[float]]:
    """Per pair of token ids (chosen, rejected): the mean log-likelihood of each response's
    tokens (from `response_start`) under the backbone read through the tied input embeddings,
    one unpadded forward pass per text (exact; logits and log-softmax in float32, for the
    response's tokens only: memory holds (response tokens, vocab) floats at a time).

    Raises:
        IncompatibleInputsError for a model whose embeddings are not its LM head.
    """
    import torch

    backbone, embeddings = _backbone_and_embeddings(model, where)
    weight = embeddings.float()  # (vocab, hidden) fp32, once: the logits of a bf16 model in fp32

    def mean_ll(ids: Sequence[int], start: int) -> float:
        x = torch.tensor([list(ids)], dtype=torch.long, device=device)
        hidden = backbone(input_ids=x).last_hidden_state[0, start - 1 : -1]  # (tokens, hidden)
        logp = torch.log_softmax(hidden.float() @ weight.T, dim=-1)  # (response tokens, vocab) fp32
        return float(logp.gather(1, x[0, start:, None]).mean())

    chosen, rejected = [], []
    with torch.no_grad():
        for c, r in pairs:
            start = response_start(c, r)
            chosen.append(mean_ll(c, start))
            rejected.append(mean_ll(r, start))
    return chosen, rejected


@dataclass(frozen=True)
class LmPreference:
    """How often the backbone's likelihood prefers the chosen response, on one pair file."""

    n: int
    right: int
    accuracy: float
    ci_low: float
    ci_high: float
    head: str = LM_HEAD


def lm_preference(chosen: Sequence[float], rejected: Sequence[float]) -> LmPreference:
    """The share of pairs whose chosen response's mean token log-likelihood is higher (a tie
    is wrong, as in the accuracy), with its 95% Wilson interval."""
    from lazymerge.evaluation.stats import wilson_interval

    right = int((np.asarray(chosen, dtype=np.float64) > np.asarray(rejected, dtype=np.float64)).sum())
    n = len(chosen)
    low, high = wilson_interval(right, n)
    return LmPreference(n, right, right / n if n else 0.0, low, high)
