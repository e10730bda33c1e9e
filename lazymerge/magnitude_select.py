"""Exact top-k by magnitude over a tensor's chunks, in bounded memory: the statistics pass that
TIES, breadcrumbs and SCE need before their apply pass (issue 23, part 2).

Non-negative fp32 values order like their bit patterns read as integers, so the k-th largest
magnitude is found digit by digit: one pass over the chunks counts the high 16 bits of every
|x| (a 65,536-bin histogram), which names the bin holding the k-th largest; a second pass counts
the low 16 bits inside that bin, which names the value itself. The threshold is then exactly the
value a sort would put at position k (NaN ranking above infinity, as `torch.topk` ranks it), in
two passes and 1 MiB of counts whatever the tensor's size. An apply pass keeps every element
above the threshold and, of those equal to it, the first ones by position (`TopKMask`), which is
the stable sort's choice; or, for the top of an ascending stable sort (breadcrumbs' trim), the
last ones by position (`TopKMask(..., from_last=True)`).

`MagnitudeHistogram` is the same two passes fed one chunk at a time, as the engine's statistics
passes read them (`methods.TiesStats`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_BINS = 1 << 16


def _magnitude_bits(chunk: torch.Tensor) -> torch.Tensor:
    """(n,) fp32 -> (n,) int64 bit patterns of |x| (sign bit cleared)."""
    import torch

    return chunk.contiguous().view(torch.int32).to(torch.int64).bitwise_and_(0x7FFFFFFF)


def _pick(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest, elements in the bins above it)."""
    import torch

    from_top = counts.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor(k, dtype=torch.int64)))
    return _BINS - 1 - index, int(from_top[index - 1]) if index else 0


@dataclass(frozen=True)
class Threshold:
    """The k-th largest magnitude, how many elements equal to it the top k takes, and how many
    elements equal it in all."""

    value: float
    take_equal: int
    equal: int


#: Bytes one `MagnitudeHistogram` holds at most (one 65,536-bin int64 histogram at a time).
HISTOGRAM_BYTES = _BINS * 8


class MagnitudeHistogram:
    """The k-th largest |x| over a tensor's chunks, fed incrementally: every chunk in pass 0,
    `end_pass(0)`, every chunk again in pass 1, then `threshold()`. `k` may be set until
    `end_pass(0)` (SCE's k counts the nonzero variances the first pass sees)."""

    def __init__(self, k: int):
        import torch

        self.k = k
        self._counts = torch.zeros(_BINS, dtype=torch.int64)
        self._top = -1
        self._above = 0

    def add(self, pass_no: int, chunk: torch.Tensor) -> None:
        import torch

        bits = _magnitude_bits(chunk)
        if pass_no == 0:
            self._counts += torch.bincount(bits >> 16, minlength=_BINS)
        else:
            self._counts += torch.bincount(bits[(bits >> 16) == self._top] & 0xFFFF, minlength=_BINS)

    def end_pass(self, pass_no: int) -> None:
        if pass_no == 0:
            total = int(self._counts.sum())
            if not 1 <= self.k <= total:
                raise ValueError(f"k = {self.k} is not between 1 and the {total} elements")
            self._top, self._above = _pick(self._counts, self.k)
            self._counts.zero_()

    def threshold(self) -> Threshold:
        import torch

        bottom, above_low = _pick(self._counts, self.k - self._above)
        pattern = torch.tensor([(self._top << 16) | bottom], dtype=torch.int32)
        equal = int(self._counts[bottom])
        return Threshold(float(pattern.view(torch.float32)), self.k - self._above - above_low, equal)


def kth_largest_magnitude(chunks: Callable[[], Iterable[torch.Tensor]], k: int) -> Threshold:
    """The k-th largest |x| over every element the chunks yield, exactly, in two passes.

    Args:
        chunks: called once per pass; yields the tensor's (n_i,) fp32 chunks in order.
        k: 1 <= k <= the number of elements.
    """
    histogram = MagnitudeHistogram(k)
    for pass_no in (0, 1):
        for chunk in chunks():
            histogram.add(pass_no, chunk)
        histogram.end_pass(pass_no)
    return histogram.threshold()


class TopKMask:
    """The apply pass: the top-k mask of each chunk in order, from a `Threshold`.

    Of the elements equal to the threshold, the first `take_equal` by position are taken (a
    descending stable sort's top k), or with `from_last` the last ones (an ascending stable
    sort's top k: the first `equal - take_equal` of them are skipped).
    """

    def __init__(self, threshold: Threshold, from_last: bool = False):
        self.threshold = threshold
        self._equal_left = threshold.take_equal
        self._skip_left = threshold.equal - threshold.take_equal if from_last else 0
        self._from_last = from_last

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        """(n,) fp32 -> (n,) bool: above the threshold, or equal to it and taken."""
        import torch

        bits = _magnitude_bits(chunk)
        limit = int(torch.tensor([self.threshold.value], dtype=torch.float32).view(torch.int32))
        mask = bits > limit
        equal = (bits == limit).nonzero().reshape(-1)
        if self._from_last:
            skipped = min(len(equal), self._skip_left)
            self._skip_left -= skipped
            mask[equal[skipped:]] = True
            return mask
        taken = equal[: self._equal_left]
        self._equal_left -= len(taken)
        mask[taken] = True
        return mask
