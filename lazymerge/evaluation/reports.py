"""Typed results of `eval` and `bon`: what was scored, with what, and the scores.

A report is a frozen value with `to_dict()` (the JSON `--out` writes) and `format()` (the table the
command prints), like the merge's `MergeReport`. It is also a dictionary of that JSON
(`report["accuracy"]`, `json.dumps(report)`), so code written for the dictionaries these jobs
returned keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lazymerge.evaluation import rewardbench2


@dataclass(frozen=True)
class ScoredWith:
    """What a report was scored with: lazymerge's version, the model as named (and the
    in-memory merge), what was read for each input and its identity (`lazymerge.provenance`),
    the data file and its SHA-256, the scoring settings and the peak memory the job took."""

    written_by: str
    model: str | list[str]
    sources: list[dict[str, Any]]
    identity: list[dict[str, Any]]
    data: dict[str, str]
    settings: dict[str, Any]
    peak_rss: int
    peak_gpu_memory: int | None
    merged_in_memory: dict[str, Any] | None = None
    #: what the scorer computed (`prefix_scoring.ScoringStats.to_dict`: tokens in the texts,
    #: computed, the prefix tree's ideal, padding, and why the prefix cache was not used)
    computed: dict[str, Any] | None = None
    #: which conventions applied (`rewards.RewardModel.conventions`: format, BOS, pad,
    #: truncation, and the section weights), in words
    conventions: dict[str, str] | None = None

    def conventions_line(self) -> str | None:
        """`conventions` in one line."""
        if not self.conventions:
            return None
        return "conventions: " + "; ".join(f"{k} {v}" for k, v in self.conventions.items())

    def computed_line(self) -> str | None:
        """`computed` in one line, as `ScoringStats.format` says it."""
        if self.computed is None:
            return None
        from lazymerge.evaluation.prefix_scoring import ScoringStats

        return ScoringStats.from_dict(self.computed).format()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "written_by": self.written_by,
            "model": self.model,
            "sources": self.sources,
            "identity": self.identity,
            "data": self.data,
        }
        if self.merged_in_memory is not None:
            out["merged_in_memory"] = self.merged_in_memory
        out.update(settings=self.settings, peak_rss=self.peak_rss, peak_gpu_memory=self.peak_gpu_memory)
        if self.computed is not None:
            out["computed"] = self.computed
        if self.conventions is not None:
            out["conventions"] = self.conventions
        return out


@dataclass(frozen=True, eq=False)
class _Report(dict[str, Any]):
    """`to_dict()`, and the report itself a dictionary of it (as the JSON it is written as:
    `json.dumps(report)` works, and it equals its JSON read back)."""

    scored_with: ScoredWith

    def __post_init__(self) -> None:
        dict.update(self, self.to_dict())

    def scores(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {**self.scores(), **self.scored_with.to_dict()}


@dataclass(frozen=True, eq=False)
class PairReport(_Report):
    """Pairwise accuracy (`scoring.pair_results`: accuracy, ties, subsets, sections, per-pair
    rewards), or a RewardBench 2 file's scores (`rewardbench2.score_rows`, `format`
    "rewardbench2")."""

    results: dict[str, Any] = field(default_factory=dict)

    def scores(self) -> dict[str, Any]:
        return dict(self.results)

    @property
    def is_rewardbench2(self) -> bool:
        return self.results.get("format") == "rewardbench2"

    def format(self) -> str:
        """The table `lazymerge eval` prints: per subset, then all pairs and the sections."""
        r = self.results
        if self.is_rewardbench2:
            return rewardbench2.format_table(r)
        lines = [f"{'subset':28s} {'n':>6s} {'ties':>5s} {'accuracy':>9s}"]
        for name, s in r["subsets"].items():
            lines.append(f"{name:28s} {s['n']:6d} {s['ties']:5d} {100 * s['accuracy']:8.2f}%")
        lines.append(f"{'all':28s} {r['n_pairs']:6d} {r['n_ties']:5d} {100 * r['accuracy']:8.2f}%")
        for name, value in (r.get("sections") or {}).items():
            lines.append(f"section {name:20s} {'':12s} {100 * value:8.2f}%")
        return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class BonReport(_Report):
    """Best-of-N accuracy per N, with oracle pass@N and majority vote (`scoring.best_of_n`), and
    every candidate's reward."""

    n_prompts: int = 0
    best_of_n: dict[str, dict[str, Any]] = field(default_factory=dict)
    rewards: list[dict[str, Any]] = field(default_factory=list)

    def scores(self) -> dict[str, Any]:
        return {"n_prompts": self.n_prompts, "best_of_n": self.best_of_n, "rewards": self.rewards}

    def format(self) -> str:
        """The table `lazymerge bon` prints: one row per N."""
        lines = [f"{'n':>4s} {'best-of-n':>10s} {'oracle':>8s} {'majority':>9s} {'prompts':>8s}"]
        for n, r in self.best_of_n.items():
            lines.append(
                f"{n:>4s} {100 * r['accuracy']:9.2f}% {100 * r['oracle']:7.2f}% {100 * r['majority']:8.2f}% "
                f"{r['n_prompts']:8d}"
            )
        return "\n".join(lines)
