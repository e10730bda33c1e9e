"""RewardBench section scores from subset accuracies, weighted by the file or by RewardBench.

RewardBench groups its 23 subsets into four sections (`rewardbench/constants.py`:
`SUBSET_MAPPING`). `--section-weights` chooses how a section averages its subsets' accuracies:

- `file` (the default): Chat, Chat Hard and Safety weight each subset by its pairs in the file
  (so a section is the accuracy over its pairs), and Reasoning is DogeRM's 0.5 x math-prm +
  0.5 x mean of the hep-* subsets, given only when math-prm and a hep-* subset are present;
- `dataset`: RewardBench's own `calculate_scores_per_section`: every section present weights each
  of its subsets present by RewardBench's fixed full-dataset count (`EXAMPLE_COUNTS`, where
  math-prm counts 984 rather than its 447 pairs so that it weighs as much as the six hep-*
  subsets together), whatever the file holds; a partial file then scores as RewardBench scores it.

Either way `mean` is the unweighted mean of the sections present.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: RewardBench subsets of each section (DogeRM reports Reasoning from math-prm and hep-*).
SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
}
CODE_SUBSETS = ["hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"]

#: RewardBench's fixed example count per subset (`rewardbench.constants.EXAMPLE_COUNTS`): the
#: weights of `--section-weights dataset`. math-prm has 447 pairs but counts 984 (the six hep-*).
REWARDBENCH_COUNTS = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 250,
    "xstest-should-respond": 154,
    "donotanswer": 136,
    **{name: 164 for name in CODE_SUBSETS},
}

#: Each section's subsets under `dataset` weights (RewardBench's `SUBSET_MAPPING`).
DATASET_SECTIONS = {**SECTIONS, "Reasoning": ["math-prm", *CODE_SUBSETS]}


def weights_note(weights: str) -> str:
    """How section scores are weighted, in words (reports name the choice)."""
    if weights == "dataset":
        return "dataset (RewardBench's fixed full-dataset subset counts)"
    return "file (each subset's pairs in this file; Reasoning 0.5 x math-prm + 0.5 x mean of hep-*)"


def section_parts(present: Mapping[str, Any], weights: str) -> dict[str, list[tuple[str, float]]]:
    """For each section scored: its subsets present, each with its weight in the section's
    weighted mean (`present` maps a subset name to its pair count in the file)."""
    out: dict[str, list[tuple[str, float]]] = {}
    if weights == "dataset":
        for section, names in DATASET_SECTIONS.items():
            parts = [(n, float(REWARDBENCH_COUNTS[n])) for n in names if n in present]
            if parts:
                out[section] = parts
        return out
    for section, names in SECTIONS.items():
        parts = [(n, float(present[n])) for n in names if n in present]
        if parts:
            out[section] = parts
    code = [n for n in CODE_SUBSETS if n in present]
    if "math-prm" in present and code:
        out["Reasoning"] = [("math-prm", 0.5), *((n, 0.5 / len(code)) for n in code)]
    return out


def rewardbench_sections(
    subsets: Mapping[str, Mapping[str, Any]], weights: str = "file"
) -> dict[str, float] | None:
    """Each section's weighted mean accuracy (`section_parts`) and their mean, or None when no
    RewardBench subset is present; `subsets` maps a name to its `accuracy` and `n`."""
    sections: dict[str, float] = {}
    for section, parts in section_parts({k: v["n"] for k, v in subsets.items()}, weights).items():
        total = sum(w for _, w in parts)
        sections[section] = sum(subsets[n]["accuracy"] * w for n, w in parts) / total
    if not sections:
        return None
    sections["mean"] = sum(sections.values()) / len(sections)
    return sections


def weighted_interval(parts: Sequence[tuple[float, int, float]], z: float) -> tuple[float, float, float]:
    """(value, low, high) of a weighted mean of binomial accuracies (accuracy, n, weight): a
    normal approximation from the subsets' binomial variances, clipped to [0, 1]."""
    total = sum(w for _, _, w in parts)
    value = sum(a * w for a, _, w in parts) / total
    var = sum((w / total) ** 2 * a * (1 - a) / n for a, n, w in parts if n)
    half = z * math.sqrt(var)
    return value, max(0.0, value - half), min(1.0, value + half)
