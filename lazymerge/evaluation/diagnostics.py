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

import json
import math
import re
from collections.abc import Callable, Sequence
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


# --- task vectors of a sweep, computed once -------------------------------------------------

#: The file in a sweep folder that keeps its task vectors with the identity of the inputs they
#: were computed from (`sweep_task_vectors`).
TASK_VECTORS_FILE = "task_vectors.json"
#: Largest such file read back (a 7B model's table is a few kB).
_TASK_VECTORS_LIMIT = 16 << 20


def sweep_task_vectors(
    folder: Path,
    models: Sequence[Path],
    base: Path,
    compute: Callable[[Sequence[Path], Path], TaskVectorReport] | None = None,
) -> TaskVectorReport:
    """The task vectors of a sweep's `models` against `base`: those kept in
    `folder / TASK_VECTORS_FILE` when they were computed from these very inputs (the same
    `provenance` identity: weights files' stat, tensors, companion files), else computed by
    `compute` (default `task_vectors`) and kept there with the inputs' identity now.

    The identity is taken before computing, so an input that changes meanwhile makes the next
    call compute again. A kept file that cannot be read, is not valid, or names other inputs is
    computed over (it is the sweep's own file).
    """
    from lazymerge.io.outputs import write_report
    from lazymerge.provenance import identify_inputs

    path = folder / TASK_VECTORS_FILE
    now = identify_inputs([*models, base])
    kept = _kept_task_vectors(path, now)
    if kept is not None and kept.models == tuple(str(m) for m in models) and kept.base == str(base):
        return kept
    report = (compute or task_vectors)(models, base)
    doc = {
        "record": "task_vectors",
        "identity": [i.to_dict() for i in now],
        "task_vectors": report.to_dict(),
    }
    write_report(path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("utf-8"))
    return report


def _kept_task_vectors(path: Path, now: Sequence[Any]) -> TaskVectorReport | None:
    """The task vectors kept in `path` if it is a valid record of inputs identical to `now`."""
    from lazymerge.errors import LazyMergeError
    from lazymerge.io.small_files import read_small_file
    from lazymerge.provenance import compare_inputs, identity_from_dict

    if not path.exists():
        return None
    try:
        doc = json.loads(read_small_file(path, _TASK_VECTORS_LIMIT), parse_constant=_no_constant)
        if not isinstance(doc, dict) or doc.get("record") != "task_vectors":
            return None
        recorded = doc.get("identity")
        if not isinstance(recorded, list):
            return None
        old = [identity_from_dict(d, str(path)) for d in recorded]
        diffs, _ = compare_inputs(old, list(now), rehash=False)
        return None if diffs else _valid_report(doc.get("task_vectors"))
    except (LazyMergeError, ValueError, RecursionError):
        return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _valid_report(doc: Any) -> TaskVectorReport | None:
    """`TaskVectorReport.from_dict` of an untrusted value, None unless every field has its type
    (and the report turns back into the same value)."""
    try:
        report = TaskVectorReport.from_dict(doc)
        groups = (*report.groups, report.total)
        ok = all(_valid_group(g, len(report.models)) for g in groups) and all(
            isinstance(x, str) for x in (report.base, *report.models, *report.skipped)
        )
        return report if ok and json.loads(json.dumps(report.to_dict())) == doc else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _valid_group(g: GroupVectors, models: int) -> bool:
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    pairs = [(i, j) for i in range(models) for j in range(i + 1, models)]
    return (
        isinstance(g.group, str)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (g.tensors, g.elements))
        and number(g.base_norm)
        and len(g.relative_norms) == models
        and all(r is None or number(r) for r in g.relative_norms)
        and [(i, j) for i, j, _ in g.cosines] == pairs
        and all(c is None or number(c) for _, _, c in g.cosines)
    )
