"""Merge methods: small pure functions over fp32 tensors, registered by name.

A method takes same-shaped fp32 tensors (one per weighted input; a chunk of the full tensor when
the method is elementwise), the per-input weights and, for task-vector methods, the base model's
tensor, and returns the merged fp32 tensor. The tensors are the engine's scratch copies: a method
may overwrite them (and return one of them) to save memory. Methods do no I/O and make no dtype
decisions: the engine reads, upcasts, chunks and casts.

| method | formula | streams in chunks? |
| --- | --- | --- |
| linear | sum_i w_i x_i | yes |
| task_arithmetic | base + sum_i w_i (x_i - base) | yes |
| dare_linear | base + sum_i w_i DARE(x_i - base) | yes (the drop mask depends on position only) |
| dare_ties | base + TIES-sign-merge(DARE(x_i - base)) | yes |
| ties | base + TIES-sign-merge(top-density trim(x_i - base)) | in 3 passes (`TiesStats`): two magnitude-histogram passes for the trim threshold, then the apply pass |
| slerp | spherical interpolation of two inputs, t = w_2 | in 2 passes (`SphericalStats`): the inputs' Gram matrix, then the apply pass |
| nearswap | a + clamp(t / abs(a - b), 0, 1) (b - a), t = w_2 | yes |
| ram | base + sum_i (x_i - base) [abs > eps] / (inputs whose delta is above eps) | yes |
| breadcrumbs | base + sum_i w_i outlier-and-small-trim(x_i - base) | in 3 passes (`BreadcrumbsStats`): two histogram passes for both cuts, then the apply pass |
| breadcrumbs_ties | base + TIES-sign-merge(outlier-and-small-trim(x_i - base)) | in 3 passes, as breadcrumbs |
| sce | base + select (variance top-k), calculate (mean-square weights), erase (sign election) | in 4 passes (`SceStats`): two histogram passes over the variances, the mean squares, then the apply pass |
| model_stock | base + t (mean_i x_i - base), t from the mean cosine of the deltas | in 2 passes (`ModelStockStats`): the deltas' dot products, then the apply pass |
| nuslerp | spherical interpolation of two inputs at t = w_2 / (w_1 + w_2), linear only when colinear | in 2 passes (`NuslerpStats`): norms and the dot product, then the apply pass |
| multislerp | barycentre of the inputs on the unit sphere (tangent-space mean), times the mean norm | in 2 passes, as slerp |
| karcher | Karcher mean of the inputs' directions (iterated), times the mean norm | in 2 passes, as slerp: every iterate is a combination of the inputs |
| passthrough | w_1 x_1 (one input, scaled) | yes |
| della | base + TIES-sign-merge(MagPrune(x_i - base)) | in chunks of whole slabs (`DELLA_FORM`), no statistics pass; not with the L1 rescale |
| della_linear | base + sum_i w_i MagPrune(x_i - base) | as della |
| arcee_fusion | base + (x - base) [importance >= median + 1.5 IQR] | no: row softmaxes and whole-tensor quantiles |
| ramplus_tl | ram with each input's unique deltas scaled by its overlap ratio | in 2 passes (`RamPlusStats`): the overlap counts, then the apply pass |

Non-elementwise methods receive the whole tensor, flattened, and its `shape`, unless they have a
bounded form (`MergeMethod.bounded`) and the tensor is larger than a chunk: then the engine feeds
the deltas of every chunk to the form's statistics passes and merges each chunk in an apply pass
(`TensorStats.apply`); a form with no statistics pass (della's) calls the method itself on blocks
of whole units, with the block's own `shape`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where the arithmetic runs: the CLI's option checks stay light
    import torch

from lazymerge.magnitude_select import HISTOGRAM_BYTES

MethodFn = Callable[..., "torch.Tensor"]
#: Gives the uniform [0, 1) draws of one input for the current chunk, keyed by element position.
RandomFn = Callable[[int], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    #: True when output element i depends only on input elements i, so any chunking is exact.
    elementwise: bool
    needs_base: bool
    #: Extra bytes per element the method allocates beyond the engine's buffers.
    scratch_bytes: int
    #: Exact number of weighted inputs the method takes (None: any).
    arity: int | None = None
    uses_density: bool = False
    #: The exact chunked form of a whole-tensor method (statistics passes, then an apply pass),
    #: None when the method has none yet and holds whole tensors.
    bounded: BoundedForm | None = None


@dataclass(frozen=True)
class BoundedForm:
    """How a whole-tensor method runs over chunks: `passes` statistics passes over each input's
    delta x_i - base, chunk by chunk in order, then an apply pass merging each chunk."""

    #: Statistics passes before the apply pass.
    passes: int
    #: (tensor elements, weighted inputs, density, the tensor's params) -> its statistics.
    start: Callable[[int, int, float, Mapping[str, float]], TensorStats]
    #: Bytes the statistics of one tensor hold, per weighted input.
    bytes_per_input: int
    #: Chunks and blocks of the statistics passes are multiples of this many elements (float64
    #: sums taken block by block, in the whole-tensor order).
    align: int = 1
    #: shape -> elements that every chunk and block must hold whole (della's slabs along
    #: dimension 0); None: any multiple of `align`.
    unit: Callable[[Sequence[int]], int] | None = None
    #: params -> whether the form bounds a tensor merged with these parameters (`TensorPlan.params`).
    applies: Callable[[Mapping[str, float]], bool] = lambda params: True


class TensorStats:
    """One tensor's statistics (`BoundedForm.start`): observed pass by pass, then applied."""

    def observe(self, pass_no: int, deltas: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError

    def end_pass(self, pass_no: int) -> None:
        raise NotImplementedError

    def apply(
        self,
        variant: int,
        deltas: Sequence[torch.Tensor],
        weights: Sequence[float],
        base: torch.Tensor | None,
    ) -> torch.Tensor:
        """The merged block from one block of deltas, blocks in order (per output `variant`)."""
        raise NotImplementedError


METHODS: dict[str, MergeMethod] = {}

#: Why each whole-tensor method with no bounded form yet holds whole tensors (`plan` says it).
WHOLE_TENSOR_REASONS: dict[str, str] = {
    "della": "mergekit's rescale to each delta's L1 norm sums the whole tensor, or a vector's one row is larger than a chunk",
    "della_linear": "mergekit's rescale to each delta's L1 norm sums the whole tensor, or a vector's one row is larger than a chunk",
    "arcee_fusion": "row softmaxes and whole-tensor quantiles of the importances",
}


def merge_method(
    name: str,
    *,
    elementwise: bool,
    needs_base: bool = False,
    scratch_bytes: int = 0,
    arity: int | None = None,
    uses_density: bool = False,
    bounded: BoundedForm | None = None,
) -> Callable[[MethodFn], MethodFn]:
    def register(fn: MethodFn) -> MethodFn:
        METHODS[name] = MergeMethod(
            name, fn, elementwise, needs_base, scratch_bytes, arity, uses_density, bounded
        )
        return fn

    return register


@merge_method("linear", elementwise=True)
def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | float], **_: object
) -> torch.Tensor:
    """Weighted sum: sum_i weights[i] * tensors[i], accumulated in input order (in place)."""
    out = tensors[0].mul_(weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        out.add_(tensor.mul_(weight))
    return out


def _deltas(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    return [t.sub_(base) for t in tensors]


@merge_method("task_arithmetic", elementwise=True, needs_base=True)
def task_arithmetic(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor, **_: object
) -> torch.Tensor:
    """base + sum_i w_i (x_i - base)."""
    for delta, weight in zip(_deltas(tensors, base), weights, strict=True):
        base.add_(delta.mul_(weight))
    return base


def _dare(deltas: Sequence[torch.Tensor], density: float, rand: RandomFn) -> None:
    """Drop each element with probability 1 - density and rescale survivors by 1 / density."""
    for i, delta in enumerate(deltas):
        delta.mul_(rand(i) < density).div_(density)


def _sign_consensus_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES' elect-and-merge: keep, per element, the deltas agreeing with the sign of their
    weighted sum, and average those with their weights."""
    import torch

    weighted = [d * w for d, w in zip(deltas, weights, strict=True)]
    sign = torch.sign(torch.stack(weighted).sum(0))
    total = torch.zeros_like(deltas[0])
    norm = torch.zeros_like(deltas[0])
    for d, wd, w in zip(deltas, weighted, weights, strict=True):
        agree = (torch.sign(d) == sign) & (d != 0)
        total.add_(torch.where(agree, wd, 0.0))
        norm.add_(agree.to(torch.float32) * w)
    return torch.where(norm != 0, total / torch.where(norm != 0, norm, 1.0), 0.0)


@merge_method("dare_linear", elementwise=True, needs_base=True, scratch_bytes=12, uses_density=True)
def dare_linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor,
    density: float,
    rand: RandomFn,
    **_: object,
) -> torch.Tensor:
    """base + sum_i w_i * DARE(x_i - base)."""
    deltas = _deltas(tensors, base)
    _dare(deltas, density, rand)
    for delta, weight in zip(deltas, weights, strict=True):
        base.add_(delta.mul_(weight))
    return base


@merge_method("dare_ties", elementwise=True, needs_base=True, scratch_bytes=32, uses_density=True)
def dare_ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor,
    density: float,
    rand: RandomFn,
    **_: object,
) -> torch.Tensor:
    """base + TIES sign-consensus merge of the DARE-dropped deltas."""
    deltas = _deltas(tensors, base)
    _dare(deltas, density, rand)
    return base.add_(_sign_consensus_merge(deltas, weights))


def ties_keep(density: float, numel: int) -> int:
    """Elements of each delta TIES keeps: the top round(density x numel) by magnitude."""
    return int(round(density * numel))


class TiesStats(TensorStats):
    """TIES over chunks: the exact k-th largest |delta| of each input (two histogram passes,
    `magnitude_select`), then per block each delta masked to its top k (equal magnitudes at the
    threshold taken by position) and the sign-consensus merge, which is elementwise."""

    def __init__(self, numel: int, inputs: int, density: float):
        from lazymerge.magnitude_select import MagnitudeHistogram

        self.keep = ties_keep(density, numel)
        self.numel = numel
        trims = 0 < self.keep < numel
        self.histograms = [MagnitudeHistogram(self.keep) for _ in range(inputs)] if trims else []
        self.masks: dict[int, list[Callable[[torch.Tensor], torch.Tensor]]] = {}

    def observe(self, pass_no: int, deltas: Sequence[torch.Tensor]) -> None:
        for histogram, delta in zip(self.histograms, deltas if self.histograms else (), strict=True):
            histogram.add(pass_no, delta)

    def end_pass(self, pass_no: int) -> None:
        for histogram in self.histograms:
            histogram.end_pass(pass_no)

    def _masks(self, variant: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        from lazymerge.magnitude_select import TopKMask

        if variant not in self.masks:
            self.masks[variant] = [TopKMask(h.threshold()) for h in self.histograms]
        return self.masks[variant]

    def apply(
        self,
        variant: int,
        deltas: Sequence[torch.Tensor],
        weights: Sequence[float],
        base: torch.Tensor | None,
    ) -> torch.Tensor:
        assert base is not None
        if self.keep <= 0:
            for delta in deltas:
                delta.zero_()
        for mask, delta in zip(self._masks(variant), deltas if self.histograms else (), strict=True):
            delta.mul_(mask(delta))
        return base.add_(_sign_consensus_merge(deltas, weights))


def _ties_stats(numel: int, inputs: int, density: float, params: Mapping[str, float]) -> TensorStats:
    return TiesStats(numel, inputs, density)


@merge_method(
    "ties",
    elementwise=False,
    needs_base=True,
    scratch_bytes=32,
    uses_density=True,
    bounded=BoundedForm(2, _ties_stats, HISTOGRAM_BYTES),
)
def ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor,
    density: float,
    **_: object,
) -> torch.Tensor:
    """base + TIES: keep each delta's top `density` fraction by magnitude, then sign-consensus merge.

    The top k is `magnitude_select`'s exact threshold, equal magnitudes at it taken by position
    (a stable sort's choice), as the chunked form (`TiesStats`) takes them: the two agree bit for
    bit however a tensor is chunked. (`torch.topk` would pick among equal magnitudes in no
    documented order.)
    """
    deltas = _deltas(tensors, base)
    for delta in deltas:
        trim_top_k(delta.reshape(-1), ties_keep(density, delta.numel()))
    return base.add_(_sign_consensus_merge(deltas, weights))


def trim_top_k(delta: torch.Tensor, k: int) -> None:
    """Zero all but the top k of a (n,) fp32 delta by magnitude, in place (ties by position)."""
    from lazymerge.magnitude_select import TopKMask, kth_largest_magnitude

    if k <= 0:
        delta.zero_()
    elif k < delta.numel():
        delta.mul_(TopKMask(kth_largest_magnitude(lambda: (delta,), k))(delta))


#: Elements per block of the float64 statistics (norms, dot products) over a whole tensor: the
#: temporaries stay cache-sized whatever the tensor.
STATS_BLOCK = 1 << 16
#: Bytes of the float64 copy of one block per input that a Gram statistics pass holds.
GRAM_BYTES = STATS_BLOCK * 8


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum_j a_j b_j in float64, over blocks of `STATS_BLOCK` elements (a, b: (n,) fp32)."""
    total = 0.0
    for start in range(0, a.numel(), STATS_BLOCK):
        end = start + STATS_BLOCK
        total += float(a[start:end].double().dot(b[start:end].double()))
    return total


@merge_method("nearswap", elementwise=True, arity=2, scratch_bytes=4)
def nearswap(tensors: Sequence[torch.Tensor], weights: Sequence[float], **_: object) -> torch.Tensor:
    """NearSwap (alchemonaut, the QuartetAnemoi-70B-t0.0001 model card, 2024; no paper): take the
    second input's value where it lies near the first's, keep the first's elsewhere.

    Per element, with a the first input, b the second and t = weights[1] (`--alpha t`):
    w = clamp(t / max(|a - b|, 1e-6), 0, 1), out = w b + (1 - w) a. t is a distance in the
    weights' own units (mergekit's example uses 0.0001), not a fraction.
    """
    a, b = tensors
    t = float(weights[1])
    # t / x as torch computes a scalar divided by a tensor (x.reciprocal() * t): mergekit's bits
    weight = (a - b).abs_().clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(0.0, 1.0)  # (n,) fp32
    b.mul_(weight)
    return b.add_(a.mul_(weight.neg_().add_(1.0)))


@merge_method("ram", elementwise=True, needs_base=True, scratch_bytes=16)
def ram(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor, **_: object
) -> torch.Tensor:
    """RAM, Reinforced Agent Merging (arXiv 2601.13572), as mergekit 0.1.5 computes it: per element,
    the deltas x_i - base larger than 1e-5 in magnitude are averaged (one such delta is kept
    whole), smaller ones are left out: base + sum_i d_i [|d_i| > eps] / max(1, #{i: |d_i| > eps}).
    The weights are not used.
    """
    import torch

    deltas = _deltas(tensors, base)
    count = torch.zeros_like(deltas[0])  # (n,) fp32: inputs whose delta counts, at least 1
    for delta in deltas:
        count.add_(delta.abs() > RAM_EPSILON)
    count.clamp_(min=1.0)
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        total.add_(delta.mul_(delta.abs() > RAM_EPSILON).div_(count))
    return base.add_(total)


#: Magnitude below which RAM counts a delta as no change (mergekit 0.1.5's default `epsilon`).
RAM_EPSILON = 1e-5
#: Fraction of the largest deltas breadcrumbs drops as outliers (mergekit 0.1.5's default `gamma`).
BREADCRUMBS_GAMMA = 0.01


def breadcrumbs_trim(delta: torch.Tensor, density: float, gamma: float = BREADCRUMBS_GAMMA) -> None:
    """Model Breadcrumbs' mask, in place: drop the largest `gamma` fraction of `delta` by
    magnitude (outliers) and then the smallest, keeping int(density x n) elements; a density of 1
    or more keeps everything (as mergekit 0.1.5 does). Equal magnitudes rank by position."""
    import torch

    n = delta.numel()
    if density >= 1 or n == 0:
        return
    bottom, top = breadcrumbs_cuts(n, density, gamma)
    order = torch.sort(delta.abs(), stable=True).indices  # (n,) int64, ascending magnitude
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[bottom:top]] = True
    delta.mul_(mask)


def breadcrumbs_cuts(numel: int, density: float, gamma: float = BREADCRUMBS_GAMMA) -> tuple[int, int]:
    """The ascending ranks [bottom, top) breadcrumbs keeps of a delta of `numel` elements."""
    keep = int(density * numel)
    bottom = max(0, numel - keep - int(gamma * numel))
    return bottom, bottom + keep


class AscendingTop:
    """The elements of ascending stable rank at least `rank` (the top numel - rank by magnitude,
    equal magnitudes at the cut taken from the last by position) over a tensor's chunks: two
    histogram passes (`MagnitudeHistogram`), then one mask per apply pass (`masker`)."""

    def __init__(self, numel: int, rank: int):
        from lazymerge.magnitude_select import MagnitudeHistogram

        self.size, self.numel = numel - rank, numel
        self.histogram = MagnitudeHistogram(self.size) if 0 < self.size < numel else None

    def observe(self, pass_no: int, delta: torch.Tensor) -> None:
        if self.histogram is not None:
            self.histogram.add(pass_no, delta)

    def end_pass(self, pass_no: int) -> None:
        if self.histogram is not None:
            self.histogram.end_pass(pass_no)

    def masker(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A fresh mask over the chunks in order: (n,) fp32 -> (n,) bool."""
        import torch

        from lazymerge.magnitude_select import TopKMask

        if self.histogram is not None:
            return TopKMask(self.histogram.threshold(), from_last=True)
        every = self.size > 0
        return lambda chunk: torch.full(chunk.shape, every, dtype=torch.bool)


class BreadcrumbsStats(TensorStats):
    """breadcrumbs over chunks: per input, the two cuts of its ascending stable ranking (the
    outliers' and the smallest deltas'), each exact from two histogram passes; the apply pass
    keeps the deltas between them (`AscendingTop`), which is elementwise once they are known."""

    def __init__(self, numel: int, inputs: int, density: float):
        self.trims = density < 1 and numel > 0
        bottom, top = breadcrumbs_cuts(numel, density)
        self.cuts = [(AscendingTop(numel, bottom), AscendingTop(numel, top)) for _ in range(inputs)]
        self.masks: dict[int, list[tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]]] = {}

    def observe(self, pass_no: int, deltas: Sequence[torch.Tensor]) -> None:
        for (low, high), delta in zip(self.cuts, deltas if self.trims else (), strict=True):
            low.observe(pass_no, delta)
            high.observe(pass_no, delta)

    def end_pass(self, pass_no: int) -> None:
        for low, high in self.cuts if self.trims else ():
            low.end_pass(pass_no)
            high.end_pass(pass_no)

    def trim(self, variant: int, deltas: Sequence[torch.Tensor]) -> None:
        """Mask one block of each delta in place (blocks in order, per output `variant`)."""
        if not self.trims:
            return
        if variant not in self.masks:
            self.masks[variant] = [(low.masker(), high.masker()) for low, high in self.cuts]
        for (low, high), delta in zip(self.masks[variant], deltas, strict=True):
            delta.mul_(low(delta) & ~high(delta))

    def apply(
        self,
        variant: int,
        deltas: Sequence[torch.Tensor],
        weights: Sequence[float],
        base: torch.Tensor | None,
    ) -> torch.Tensor:
        assert base is not None
        self.trim(variant, deltas)
        for delta, weight in zip(deltas, weights, strict=True):
            base.add_(delta.mul_(weight))
        return base


class BreadcrumbsTiesStats(BreadcrumbsStats):
    """breadcrumbs_ties over chunks: the breadcrumbs trim, then the elementwise sign-consensus merge."""

    def apply(
        self,
        variant: int,
        deltas: Sequence[torch.Tensor],
        weights: Sequence[float],
        base: torch.Tensor | None,
    ) -> torch.Tensor:
        assert base is not None
        self.trim(variant, deltas)
        return base.add_(_sign_consensus_merge(deltas, weights))


@merge_method(
    "breadcrumbs",
    elementwise=False,
    needs_base=True,
    scratch_bytes=32,
    uses_density=True,
    bounded=BoundedForm(
        2, lambda n, k, density, params: BreadcrumbsStats(n, k, density), 2 * HISTOGRAM_BYTES
    ),
)
def breadcrumbs(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor,
    density: float,
    **_: object,
) -> torch.Tensor:
    """Model Breadcrumbs (Davari and Belilovsky, arXiv 2312.06795): task arithmetic over deltas
    with their largest 1% (outliers) and their smallest elements masked out, `density` of each
    kept: base + sum_i w_i trim(x_i - base). Over chunks: `BreadcrumbsStats`, the same bits."""
    for delta, weight in zip(_deltas(tensors, base), weights, strict=True):
        breadcrumbs_trim(delta, density)
        base.add_(delta.mul_(weight))
    return base


@merge_method(
    "breadcrumbs_ties",
    elementwise=False,
    needs_base=True,
    scratch_bytes=32,
    uses_density=True,
    bounded=BoundedForm(
        2, lambda n, k, density, params: BreadcrumbsTiesStats(n, k, density), 2 * HISTOGRAM_BYTES
    ),
)
def breadcrumbs_ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor,
    density: float,
    **_: object,
) -> torch.Tensor:
    """Model Breadcrumbs' mask (arXiv 2312.06795) followed by TIES' sign election and disjoint
    mean (Yadav et al., arXiv 2306.01708), as mergekit combines them. Over chunks:
    `BreadcrumbsTiesStats`, the same bits."""
    deltas = _deltas(tensors, base)
    for delta in deltas:
        breadcrumbs_trim(delta, density)
    return base.add_(_sign_consensus_merge(deltas, weights))


def _sce_variance(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per element, the population variance of the deltas across the inputs: (n,) fp32."""
    import torch

    n = len(deltas)
    mean = torch.zeros_like(deltas[0])
    for delta in deltas:
        mean.add_(delta)
    mean.div_(n)
    var = torch.zeros_like(deltas[0])
    for delta in deltas:
        var.add_((delta - mean).square_())
    return var.div_(n)


def _sce_keep(nonzero: int, density: float) -> int:
    """Elements SCE selects: the `density` fraction of those whose deltas vary at all."""
    return int(nonzero * density)


def _sce_shares(square_sums: Sequence[float], numel: int) -> list[float]:
    """Each input's weight: its mean squared (selected) delta (float64 sums, block by block, then
    fp32 as mergekit's mean), normalised to sum to 1 (equal shares when the sum is below 1e-6)."""
    import torch

    means = torch.tensor([s / max(numel, 1) for s in square_sums], dtype=torch.float32)  # (inputs,)
    total = float(means.sum())
    n = len(square_sums)
    return [float(w) for w in (means / total if abs(total) >= 1e-6 else torch.full((n,), 1.0 / n))]


def _sce_erase(deltas: Sequence[torch.Tensor], shares: Sequence[float], base: torch.Tensor) -> torch.Tensor:
    """SCE's Erase: drop deltas whose sign disagrees with the sum's, weighted mean of the rest."""
    import torch

    summed = torch.zeros_like(deltas[0])
    for delta in deltas:
        summed.add_(delta)
    sign = torch.sign(summed)
    del summed
    merged = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0])
    for delta, share in zip(deltas, shares, strict=True):
        agree = (torch.sign(delta) == sign) & (delta != 0)
        merged.add_(torch.where(agree, delta * share, 0.0))
        divisor.add_(agree.to(torch.float32).mul_(share))
    return base.add_(merged.div_(divisor.clamp_(min=1e-6)))


class SceStats(TensorStats):
    """SCE over chunks, in 3 statistics passes: the exact k-th largest variance (two histogram
    passes, k counted from the nonzero variances of the first), then each input's float64 sum of
    squared selected deltas (blocks in the whole tensor's order); the apply pass selects, weighs
    and erases elementwise."""

    def __init__(self, numel: int, inputs: int, density: float):
        from lazymerge.magnitude_select import MagnitudeHistogram

        self.numel, self.density, self.selects = numel, density, density < 1
        self.nonzero = 0
        self.histogram: MagnitudeHistogram | None = MagnitudeHistogram(1) if self.selects else None
        self.square_sums = [0.0] * inputs
        self.shares: list[float] = []
        self.masks: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}

    def select(self, key: int, deltas: Sequence[torch.Tensor]) -> None:
        """Zero the deltas of one block outside the selection, in place (blocks in order per `key`)."""
        import torch

        from lazymerge.magnitude_select import TopKMask

        if not self.selects:
            return
        if key not in self.masks:
            histogram = self.histogram
            self.masks[key] = (
                TopKMask(histogram.threshold())
                if histogram is not None
                else lambda var: torch.zeros(var.shape, dtype=torch.bool)
            )
        mask = self.masks[key](_sce_variance(deltas))
        for delta in deltas:
            delta.mul_(mask)

    def observe(self, pass_no: int, deltas: Sequence[torch.Tensor]) -> None:
        import torch

        if pass_no == 2:
            self.select(-1, deltas)
            for i, delta in enumerate(deltas):
                self.square_sums[i] += _dot64(delta, delta)
            return
        if self.histogram is None:
            return
        var = _sce_variance(deltas)
        if pass_no == 0:
            self.nonzero += int(torch.count_nonzero(var))
        self.histogram.add(pass_no, var)

    def end_pass(self, pass_no: int) -> None:
        if pass_no == 0 and self.histogram is not None:
            self.histogram.k = _sce_keep(self.nonzero, self.density)
            if self.histogram.k == 0:
                self.histogram = None  # nothing selected
            else:
                self.histogram.end_pass(0)
        if pass_no == 2:
            self.shares = _sce_shares(self.square_sums, self.numel)

    def apply(
        self,
        variant: int,
        deltas: Sequence[torch.Tensor],
        weights: Sequence[float],
        base: torch.Tensor | None,
    ) -> torch.Tensor:
        assert base is not None
        self.select(variant, deltas)
        return _sce_erase(deltas, self.shares, base)


@merge_method(
    "sce",
    elementwise=False,
    needs_base=True,
    scratch_bytes=32,
    uses_density=True,
    bounded=BoundedForm(
        3, lambda n, k, density, params: SceStats(n, k, density), HISTOGRAM_BYTES, STATS_BLOCK
    ),
)
def sce(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor,
    density: float,
    **_: object,
) -> torch.Tensor:
    """SCE, from FuseChat (Wan et al., arXiv 2408.07990): Select the `density` fraction of
    elements whose deltas vary most across the inputs (of those that vary at all; equal
    variances taken by position), Calculate each input's weight as its mean squared (selected)
    delta over the tensor, normalised to sum to 1, Erase the deltas whose sign disagrees with the
    sign of the deltas' sum; the result is base + the weighted mean of the surviving deltas. The
    given weights are not used. Over chunks: `SceStats`, the same bits.
    """
    import torch

    deltas = _deltas(tensors, base)
    if density < 1:
        var = _sce_variance(deltas)
        k = _sce_keep(int(torch.count_nonzero(var)), density)
        mask = torch.zeros(var.numel(), dtype=torch.bool)
        if k:
            mask[torch.sort(var, descending=True, stable=True).indices[:k]] = True
        del var
        for delta in deltas:
            delta.mul_(mask)
        del mask
    shares = _sce_shares([_dot64(d, d) for d in deltas], deltas[0].numel())
    return _sce_erase(deltas, shares, base)


@merge_method(
    "model_stock",
    elementwise=False,
    needs_base=True,
    scratch_bytes=0,
    bounded=BoundedForm(
        1, lambda numel, inputs, density, params: ModelStockStats(inputs), GRAM_BYTES, STATS_BLOCK
    ),
)
def model_stock(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor, **_: object
) -> torch.Tensor:
    """Model Stock (Jang et al., arXiv 2403.19522): base + t (mean_i x_i - base), where
    t = k cos / (1 + (k - 1) cos) for k inputs and cos the mean cosine between pairs of deltas
    x_i - base over the whole tensor (float64; a delta of norm below 1e-3 counts as cosine 0, as
    mergekit clamps the product of norms at 1e-6); t = 0 where 1 + (k - 1) cos vanishes (below
    1e-6). The weights are not used.
    """
    deltas = _deltas(tensors, base)
    stats = ModelStockStats(len(deltas))
    stats.observe(0, deltas)
    return stats.apply(0, deltas, weights, base)


class GramStats(TensorStats):
    """One statistics pass: every pairwise float64 dot product of the inputs (or deltas), summed
    block by block of `STATS_BLOCK` elements in order (as `_dot64` sums them, so chunks that are
    whole blocks give the whole tensor's sums bit for bit)."""

    def __init__(self, inputs: int):
        self.dots = [[0.0] * inputs for _ in range(inputs)]

    def observe(self, pass_no: int, deltas: Sequence[torch.Tensor]) -> None:
        k = len(deltas)
        for start in range(0, deltas[0].numel(), STATS_BLOCK):
            blocks = [d[start : start + STATS_BLOCK].double() for d in deltas]
            for i in range(k):
                for j in range(i, k):
                    self.dots[i][j] += float(blocks[i].dot(blocks[j]))

    def end_pass(self, pass_no: int) -> None:
        pass


class ModelStockStats(GramStats):
    """model_stock from the deltas' dot products: base + t / k sum_i (x_i - base), elementwise."""

    def factor(self) -> float:
        k = len(self.dots)
        norms = [math.sqrt(self.dots[i][i]) for i in range(k)]
        cosines = [
            max(-1.0, min(1.0, self.dots[i][j] / max(norms[i] * norms[j], 1e-6)))
            for i in range(k)
            for j in range(i + 1, k)
        ]
        cos = sum(cosines) / len(cosines)
        denominator = 1 + (k - 1) * cos
        return 0.0 if abs(denominator) < 1e-6 else k * cos / denominator

    def apply(
        self,
        variant: int,
        deltas: Sequence[torch.Tensor],
        weights: Sequence[float],
        base: torch.Tensor | None,
    ) -> torch.Tensor:
        assert base is not None
        total = deltas[0]
        for delta in deltas[1:]:
            total.add_(delta)
        return base.add_(total.mul_(self.factor() / len(deltas)))


def _norm64(a: torch.Tensor) -> float:
    return math.sqrt(_dot64(a, a))


class NuslerpStats(GramStats):
    """nuslerp from the inputs' norms and dot product: an elementwise combination of the two."""

    def apply(
        self,
        variant: int,
        deltas: Sequence[torch.Tensor],
        weights: Sequence[float],
        base: torch.Tensor | None,
    ) -> torch.Tensor:
        v0, v1 = deltas
        total = float(weights[0]) + float(weights[1])
        t = 0.5 if abs(total) < 1e-6 else float(weights[1]) / total
        n0, n1 = max(math.sqrt(self.dots[0][0]), 1e-7), max(math.sqrt(self.dots[1][1]), 1e-7)
        cos = max(-1.0, min(1.0, self.dots[0][1] / (n0 * n1)))
        if 1 - cos * cos <= 1e-16:
            return v0.mul_(1 - t).add_(v1.mul_(t))
        theta = math.acos(cos)
        sin_theta = math.sin(theta)
        return v0.mul_(math.sin((1 - t) * theta) / sin_theta).add_(v1.mul_(math.sin(t * theta) / sin_theta))


@merge_method(
    "nuslerp",
    elementwise=False,
    arity=2,
    scratch_bytes=0,
    bounded=BoundedForm(
        1, lambda numel, inputs, density, params: NuslerpStats(inputs), GRAM_BYTES, STATS_BLOCK
    ),
)
def nuslerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], **_: object) -> torch.Tensor:
    """mergekit's NuSLERP (flattened, no base): Shoemake's spherical interpolation (SIGGRAPH 1985)
    of the two inputs at t = w_2 / (w_1 + w_2) (0.5 when the weights sum to 0), linear only
    when they are exactly colinear (1 - cos^2 <= 1e-16), unlike slerp's 0.9995 threshold."""
    stats = NuslerpStats(2)
    stats.observe(0, tensors)
    return stats.apply(0, tensors, weights, None)


def _gram(stats: GramStats) -> list[list[float]]:
    """The full symmetric matrix of `GramStats.dots` (which fills its upper triangle)."""
    k = len(stats.dots)
    return [[stats.dots[min(i, j)][max(i, j)] for j in range(k)] for i in range(k)]


def _quad(g: Sequence[Sequence[float]], a: Sequence[float], b: Sequence[float]) -> float:
    """a^T g b: the dot product of two combinations of the vectors whose Gram matrix is g."""
    return sum(a[i] * g[i][j] * b[j] for i in range(len(a)) for j in range(len(b)))


def _length(g: Sequence[Sequence[float]], a: Sequence[float]) -> float:
    return math.sqrt(max(_quad(g, a, a), 0.0))


def _combine(tensors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """sum_i c_i x_i, elementwise in fp32, in place (one product, then added in input order)."""
    out = tensors[0].mul_(coefficients[0])
    for tensor, c in zip(tensors[1:], coefficients[1:], strict=True):
        out.add_(tensor.mul_(c))
    return out


class SphericalStats(GramStats):
    """The SLERP family over chunks: every vector slerp, multislerp and karcher build (a mean,
    a tangent, each Karcher step) is a combination of the inputs, so the inputs' Gram matrix
    (one statistics pass of float64 dot products) gives every norm and angle they use; the apply
    pass forms the output as sum_i c_i x_i, coefficients per output `variant`."""

    def __init__(self, inputs: int, coefficients: Callable[[list[list[float]], list[float]], list[float]]):
        super().__init__(inputs)
        self.coefficients = coefficients
        self.cached: dict[int, list[float]] = {}

    def apply(
        self,
        variant: int,
        deltas: Sequence[torch.Tensor],
        weights: Sequence[float],
        base: torch.Tensor | None,
    ) -> torch.Tensor:
        if variant not in self.cached:
            self.cached[variant] = self.coefficients(_gram(self), [float(w) for w in weights])
        if not any(self.cached[variant]):
            return deltas[0].zero_()  # karcher: no input has a direction
        return _combine(deltas, self.cached[variant])


def _spherical(tensors: Sequence[torch.Tensor], weights: Sequence[float], method: str) -> torch.Tensor:
    """A SLERP-family method over whole tensors: the same statistics and apply as its chunks."""
    stats = SphericalStats(len(tensors), SPHERICAL[method])
    stats.observe(0, tensors)
    return stats.apply(0, tensors, weights, None)


def slerp_coefficients(g: list[list[float]], weights: list[float]) -> list[float]:
    """slerp's (s0, s1) from the Gram matrix of its two inputs: linear (1 - t, t) when an input
    is zero or the two are nearly parallel (|cos| > 0.9995)."""
    t = weights[1]
    n0, n1 = math.sqrt(g[0][0]), math.sqrt(g[1][1])
    if n0 == 0 or n1 == 0:
        return [1 - t, t]
    dot = max(-1.0, min(1.0, g[0][1] / (n0 * n1)))
    if abs(dot) > 0.9995:
        return [1 - t, t]
    omega = math.acos(dot)
    return [math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)]


def multislerp_coefficients(g: list[list[float]], weights: list[float]) -> list[float]:
    """multislerp's output as sum_i c_i x_i, from the inputs' Gram matrix (see `multislerp`)."""
    total = sum(weights)
    shares = [w / total for w in weights]
    k = len(shares)
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(k)]
    scaled = [n + 1e-8 for n in norms]  # each input divided by its own: a unit input
    units = [[g[i][j] / (scaled[i] * scaled[j]) for j in range(k)] for i in range(k)]
    mean_norm = _length(units, shares)
    if mean_norm < 1e-8:
        return shares
    mean = [s / mean_norm for s in shares]  # the unit mean, over the unit inputs
    dots = [_quad(units, [1.0 if j == i else 0.0 for j in range(k)], mean) for i in range(k)]
    along = sum(s * d for s, d in zip(shares, dots, strict=True))
    tangent = [s - along * m for s, m in zip(shares, mean, strict=True)]
    angle = _length(units, tangent) + 1e-8
    scale = sum(n * s for n, s in zip(norms, shares, strict=True))
    out = [
        math.cos(angle) * scale * m + math.sin(angle) / angle * scale * t
        for m, t in zip(mean, tangent, strict=True)
    ]
    return [c / n for c, n in zip(out, scaled, strict=True)]


#: Karcher iterations and tolerance (mergekit 0.1.5's defaults `max_iter` and `tol`).
KARCHER_MAX_ITER, KARCHER_TOL = 10, 1e-5


def karcher_coefficients(g: list[list[float]], weights: list[float]) -> list[float]:
    """karcher's output as sum_i c_i x_i, from the inputs' Gram matrix (see `karcher`): the mean
    and each tangent are kept as coefficients over the unit inputs, every step's dot products
    and norms taken through the Gram matrix."""
    total = sum(weights)
    alphas = [w / total for w in weights]
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(len(weights))]
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    valid = [i for i, n in enumerate(norms) if n > KARCHER_TOL]
    if not valid:
        return [0.0] * len(weights)
    units = [[g[i][j] / (norms[i] * norms[j]) for j in valid] for i in valid]
    valid_sum = sum(alphas[i] for i in valid)
    shares = [alphas[i] / valid_sum for i in valid]
    mean = _karcher_mean(units, shares)
    out = [0.0] * len(weights)
    for m, i in zip(mean, valid, strict=True):
        out[i] = scale * m / norms[i]
    return out


def _karcher_mean(units: list[list[float]], shares: list[float]) -> list[float]:
    """The weighted Karcher mean of unit vectors (Gram matrix `units`), as their coefficients."""
    k = len(shares)
    mean_norm = _length(units, shares)
    mean = [1.0] + [0.0] * (k - 1) if mean_norm < KARCHER_TOL else [s / mean_norm for s in shares]
    for _step in range(KARCHER_MAX_ITER):
        tangent = [0.0] * k
        for i, share in enumerate(shares):
            dot = max(-1.0, min(1.0, sum(units[i][j] * mean[j] for j in range(k))))
            theta = math.acos(dot)
            if theta < KARCHER_TOL:
                continue
            factor = share * theta / math.sin(theta)  # share * theta / sin(theta) * (unit - dot * mean)
            tangent[i] += factor
            tangent = [t - factor * dot * m for t, m in zip(tangent, mean, strict=True)]
        step = _length(units, tangent)
        if step < KARCHER_TOL:
            break
        mean = [math.cos(step) * m + math.sin(step) / step * t for m, t in zip(mean, tangent, strict=True)]
        unit_norm = _length(units, mean)
        if unit_norm > KARCHER_TOL:
            mean = [m / unit_norm for m in mean]
    return mean


SPHERICAL: dict[str, Callable[[list[list[float]], list[float]], list[float]]] = {
    "slerp": slerp_coefficients,
    "multislerp": multislerp_coefficients,
    "karcher": karcher_coefficients,
}


def _spherical_form(method: str) -> BoundedForm:
    return BoundedForm(
        1,
        lambda numel, inputs, density, params: SphericalStats(inputs, SPHERICAL[method]),
        GRAM_BYTES,
        STATS_BLOCK,
    )


@merge_method("slerp", elementwise=False, arity=2, bounded=_spherical_form("slerp"))
def slerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], **_: object) -> torch.Tensor:
    """Spherical interpolation (Shoemake, SIGGRAPH 1985) from the first input to the second at
    t = weights[1].

    The angle comes from the inputs' float64 norms and dot product; nearly parallel tensors
    (|cos| > 0.9995) and zero tensors fall back to linear interpolation.
    """
    return _spherical(tensors, weights, "slerp")


@merge_method("multislerp", elementwise=False, bounded=_spherical_form("multislerp"))
def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], **_: object) -> torch.Tensor:
    """Multi-SLERP (Goddard, "multislerp", 2025; mergekit 0.1.5, no base): a barycentre of the
    inputs on the unit sphere, each input scaled to unit norm (over norm + 1e-8), the weighted
    mean m of those projected back to the sphere, the weighted mean of their tangent components
    at m mapped back by the exponential map (angle its norm + 1e-8), and the result scaled by
    the weighted mean norm. Weights normalised to sum to 1; when the weighted mean of the unit
    inputs vanishes (below 1e-8), the weighted sum. Computed as a combination of the inputs
    from their float64 Gram matrix (`multislerp_coefficients`).
    """
    return _spherical(tensors, weights, "multislerp")


@merge_method("karcher", elementwise=False, bounded=_spherical_form("karcher"))
def karcher(tensors: Sequence[torch.Tensor], weights: Sequence[float], **_: object) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean on the unit sphere (Karcher, 1977; as a model merge,
    arXiv 2603.04972, mergekit 0.1.5): each input's direction, their intrinsic mean by up to 10
    gradient steps of the log/exp maps (stopping when the step is below 1e-5), scaled by the
    weighted mean norm. Inputs of norm at most 1e-5 give no direction. Weights normalised to sum
    to 1 (mergekit weighs its inputs equally: the same as lazymerge's default weights).

    Every step stays a combination of the inputs, so the iteration runs on coefficients through
    the inputs' float64 Gram matrix (`karcher_coefficients`): one statistics pass, whatever the
    number of steps.
    """
    return _spherical(tensors, weights, "karcher")


#: DELLA's half-width of the keep probabilities around the density (mergekit 0.1.5's default
#: `epsilon`): the smallest delta of a row is kept with probability density - epsilon, the largest
#: with density + epsilon.
DELLA_EPSILON = 0.15
#: How della rescales the deltas MagPrune keeps (its `rescale` parameter): not at all, by 1 / p
#: for a delta kept with probability p (the paper), or so that the delta keeps its L1 norm
#: (mergekit 0.1.5's `rescale: true`).
RESCALE_NONE, RESCALE_INVERSE, RESCALE_L1 = 0.0, 1.0, 2.0
#: Magnitudes below which mergekit 0.1.5 skips its L1 rescale (a zero or vanishing delta).
RESCALE_EPS = 1e-7


def _row_view(delta: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(numel,) -> (shape[0], shape[1], rest): the rows MagPrune ranks along dim 1, as mergekit
    ranks dim 1 of the tensor (a vector or scalar is one row)."""
    if len(shape) < 2:
        return delta.view(1, -1, 1)
    return delta.view(shape[0], shape[1], -1)


def magprune(
    delta: torch.Tensor,
    shape: Sequence[int],
    density: float,
    epsilon: float,
    uniform: torch.Tensor,
    rescale: float = RESCALE_INVERSE,
) -> None:
    """DELLA's MagPrune (Deep et al., arXiv 2406.11617), in place on a (numel,) fp32 delta: in
    each row the deltas are ranked by magnitude, rank 0 (smallest) to n - 1, and each is kept
    with probability p = density - epsilon + 2 epsilon rank / (n - 1) (p = density in rows of one
    element), i.e. when its uniform draw is below p; then rescaled per `rescale`.

    Equal magnitudes rank by position; a probability beyond [0, 1] (density within epsilon of
    0 or 1, which mergekit refuses) never or always keeps. `uniform`: (numel,) fp32 draws in [0, 1).
    """
    import torch

    if density >= 1 or delta.numel() == 0:
        return
    rows = _row_view(delta, shape)
    n = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices  # (r, n, rest) int64, ascending
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n).view(1, n, 1).expand_as(order))
    del order
    if n > 1:
        probs = ranks.to(torch.float32).mul_(2 * epsilon / (n - 1)).add_(density - epsilon)
    else:
        probs = torch.full_like(rows, density)
    del ranks
    keep = uniform.view_as(rows) < probs  # a kept delta has p > 0
    if rescale == RESCALE_L1:
        before = float(delta.abs().sum())
        rows.mul_(keep)
        after = float(delta.abs().sum())
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            delta.mul_(before / after)
    elif rescale == RESCALE_INVERSE:
        # p beyond 1 (density + epsilon > 1) keeps the delta whole
        rows.copy_(torch.where(keep, rows / probs.clamp_(max=1.0), 0.0))
    else:
        rows.mul_(keep)


def _della_deltas(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    shape: Sequence[int],
    density: float,
    epsilon: float,
    rand: RandomFn,
    rescale: float,
) -> list[torch.Tensor]:
    deltas = _deltas(tensors, base)
    for i, delta in enumerate(deltas):
        magprune(delta, shape, density, epsilon, rand(i), rescale)
    return deltas


def della_slab(shape: Sequence[int]) -> int:
    """Elements of one slab along dimension 0, within which MagPrune ranks (`_row_view`): a
    chunk of whole slabs is merged as the whole tensor is (a vector is one slab)."""
    return math.prod(shape[1:]) if len(shape) >= 2 else max(1, math.prod(shape))


def _della_bounds(params: Mapping[str, float]) -> bool:
    return params.get("rescale", RESCALE_INVERSE) != RESCALE_L1


#: della in chunks of whole slabs: no statistics pass, unless rescaled to the L1 norm.
DELLA_FORM = BoundedForm(
    0, lambda numel, inputs, density, params: TensorStats(), 0, unit=della_slab, applies=_della_bounds
)


@merge_method(
    "della", elementwise=False, needs_base=True, scratch_bytes=40, uses_density=True, bounded=DELLA_FORM
)
def della(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor,
    shape: Sequence[int],
    density: float,
    rand: RandomFn,
    epsilon: float = DELLA_EPSILON,
    rescale: float = RESCALE_INVERSE,
    scale: float = 1.0,
    **_: object,
) -> torch.Tensor:
    """DELLA-Merging (Deep, Bhardwaj, Majumder and Poria, arXiv 2406.11617): MagPrune each delta
    x_i - base (drop by magnitude-ranked probability, rescale the survivors), elect signs on the
    weighted sum and take the weighted mean of the agreeing deltas (TIES' elect and disjoint
    merge), times `scale` (mergekit's `lambda`): base + scale * merge(MagPrune(x_i - base)).
    """
    deltas = _della_deltas(tensors, base, shape, density, epsilon, rand, rescale)
    return base.add_(_sign_consensus_merge(deltas, weights).mul_(scale))


@merge_method(
    "della_linear",
    elementwise=False,
    needs_base=True,
    scratch_bytes=32,
    uses_density=True,
    bounded=DELLA_FORM,
)
def della_linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor,
    shape: Sequence[int],
    density: float,
    rand: RandomFn,
    epsilon: float = DELLA_EPSILON,
    rescale: float = RESCALE_INVERSE,
    **_: object,
) -> torch.Tensor:
    """DELLA's MagPrune (arXiv 2406.11617) without sign election: base + sum_i w_i MagPrune(x_i - base)."""
    deltas = _della_deltas(tensors, base, shape, density, epsilon, rand, rescale)
    for delta, weight in zip(deltas, weights, strict=True):
        base.add_(delta.mul_(weight))
    return base


#: arcee_fusion's quartiles: the threshold is the median plus 1.5 times the interquartile range.
FUSION_QUANTILES = (0.25, 0.5, 0.75)


@merge_method("arcee_fusion", elementwise=False, arity=2, scratch_bytes=24)
def arcee_fusion(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, shape: Sequence[int], **_: object
) -> torch.Tensor:
    """Arcee Fusion (Arcee AI, 2025, arcee.ai; mergekit 0.1.5, no paper): take the second input's
    value where it changed the first (mergekit's base) most, keep the first's elsewhere.

    With a the first input and b the second, per row (the last dimension; a vector is one row):
    importance = |b - a| * KL(softmax(b) || softmax(a)) (softmaxes plus 1e-8); the threshold is
    q2 + 1.5 (q3 - q1) over the whole tensor's importances, quantile q taken as the sorted
    value at floor(q (n - 1)); out = a + (b - a) [importance >= threshold]. mergekit estimates
    the quantiles from a million random samples when a tensor is larger; lazymerge takes them
    exactly. The weights are not used.
    """
    import torch

    a, b = tensors
    rows = (1, -1) if len(shape) < 2 else (-1, shape[-1])
    a2, b2 = a.view(rows), b.view(rows)
    p = torch.softmax(b2, dim=-1).add_(1e-8)
    q = torch.softmax(a2, dim=-1).add_(1e-8)
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # (rows, 1) fp32
    del p, q
    diff = b.sub_(a)  # b - a, in place: (numel,) fp32
    importance = diff.view(rows).abs().mul_(kl).reshape(-1)
    ordered = torch.sort(importance).values
    last = ordered.numel() - 1
    q1, q2, q3 = (ordered[int(torch.tensor(f) * last)] for f in FUSION_QUANTILES)
    del ordered
    threshold = q2 + 1.5 * (q3 - q1)
    return a.add_(diff.mul_(importance >= threshold))


#: RAM+'s defaults in mergekit 0.1.5 (`r`, `alpha`): unique deltas are scaled by
#: 1 + r * min(alpha, shared / unique), the counts of an input's overlapping and unique deltas.
RAMPLUS_R, RAMPLUS_ALPHA = 0.1, 0.2


def _ramplus_changed(deltas: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs whose delta is above 1e-5, at least 1: (n,) fp32; where several are; where one is)."""
    import torch

    count = torch.zeros_like(deltas[0])
    for delta in deltas:
        count.add_(delta.abs() > RAM_EPSILON)
    overlap, unique = count > 1, count == 1
    return count.clamp_(min=1.0), overlap, unique


def _ramplus_scale(shared: int, alone: int, r: float, alpha: float) -> float:
    """1 + r * clamp(rho, 0, alpha), rho an input's overlapping over its unique changed elements."""
    rho = shared / max(alone, RAM_EPSILON)
    return 1 + r * min(max(rho, 0.0), alpha)


def _ramplus_merge(
    deltas: Sequence[torch.Tensor], scales: Sequence[float], base: torch.Tensor
) -> torch.Tensor:
    count, overlap, unique = _ramplus_changed(deltas)
    import torch

    total = torch.zeros_like(deltas[0])
    for delta, lam in zip(deltas, scales, strict=True):
        delta.mul_(delta.abs() > RAM_EPSILON)
        total.add_(delta * unique * lam + delta * overlap / count)
    return base.add_(total)


class RamPlusStats(TensorStats):
    """ramplus_tl over chunks: one statistics pass counting, per input, its changed elements that
    another input changed too and those it alone changed (exact integers, in any order); the
    apply pass is then elementwise."""

    def __init__(self, inputs: int, params: Mapping[str, float]):
        self.counts = [[0, 0] for _ in range(inputs)]  # (shared, alone) per input
        self.r, self.alpha = params.get("r", RAMPLUS_R), params.get("alpha", RAMPLUS_ALPHA)

    def observe(self, pass_no: int, deltas: Sequence[torch.Tensor]) -> None:
        _, overlap, unique = _ramplus_changed(deltas)
        for counts, delta in zip(self.counts, deltas, strict=True):
            kept = delta.abs() > RAM_EPSILON
            counts[0] += int((kept & overlap).sum())
            counts[1] += int((kept & unique).sum())

    def end_pass(self, pass_no: int) -> None:
        pass

    def apply(
        self,
        variant: int,
        deltas: Sequence[torch.Tensor],
        weights: Sequence[float],
        base: torch.Tensor | None,
    ) -> torch.Tensor:
        assert base is not None
        scales = [_ramplus_scale(shared, alone, self.r, self.alpha) for shared, alone in self.counts]
        return _ramplus_merge(deltas, scales, base)


@merge_method(
    "ramplus_tl",
    elementwise=False,
    needs_base=True,
    scratch_bytes=16,
    bounded=BoundedForm(1, lambda n, k, density, params: RamPlusStats(k, params), 0),
)
def ramplus_tl(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor,
    r: float = RAMPLUS_R,
    alpha: float = RAMPLUS_ALPHA,
    **_: object,
) -> torch.Tensor:
    """RAM+ tensor-local (Reinforced Agent Merging Plus, arXiv 2601.13572, as mergekit 0.1.5
    computes it): RAM's mean of the deltas above 1e-5 where several inputs changed an element,
    and, where one input alone did, its delta times 1 + r * clamp(rho, 0, alpha), rho that input's
    count of overlapping changed elements over its count of unique ones in this tensor. The
    weights are not used. Over chunks: `RamPlusStats`, the same bits.
    """
    deltas = _deltas(tensors, base)
    stats = RamPlusStats(len(deltas), {"r": r, "alpha": alpha})
    stats.observe(0, deltas)
    return stats.apply(0, deltas, weights, base)


def position_uniform(key: int, start: int, count: int) -> torch.Tensor:
    """Uniform [0, 1) fp32 draws for element positions start..start+count-1 under `key`.

    A counter-based generator (SplitMix64 of key + position): the draw of an element depends only
    on the key and its position, so any chunking of a tensor gives the same draws.
    """
    import torch

    def lsr(x: torch.Tensor, k: int) -> torch.Tensor:  # logical shift right of int64 bit patterns
        return (x >> k) & ((1 << (64 - k)) - 1)

    z = torch.arange(start, start + count, dtype=torch.int64)
    z.mul_(_signed(0x9E3779B97F4A7C15)).add_(_signed(key))
    z = (z ^ lsr(z, 30)).mul_(_signed(0xBF58476D1CE4E5B9))
    z = (z ^ lsr(z, 27)).mul_(_signed(0x94D049BB133111EB))
    z = z ^ lsr(z, 31)
    return lsr(z, 40).to(torch.float32).mul_(1.0 / (1 << 24))


def _signed(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


@merge_method("passthrough", elementwise=True, arity=1)
def passthrough(tensors: Sequence[torch.Tensor], weights: Sequence[float], **_: object) -> torch.Tensor:
    """Passthrough (mergekit's; no paper: the frankenmerges of stacked layers): the one input's
    tensor, times its weight (mergekit's optional `scale`, 1 when absent). A layer stack
    (`options.LayerStack`) gives each output tensor its one source."""
    if len(tensors) != 1:
        raise ValueError(f"passthrough takes one input per tensor, got {len(tensors)}")
    return tensors[0] if weights[0] == 1 else tensors[0].mul_(weights[0])
