"""The report of a sweep: statistics from the point records, `report.md`, `results.json`, plots.

Everything is recomputed from `results.jsonl` (rewards per pair and per candidate), so a resumed
sweep reports exactly like an uninterrupted one.

Statistics (see `stats`): accuracies with 95% Wilson intervals (pooled counts for Chat, Chat
Hard and Safety; for Reasoning = 0.5 x math-prm + 0.5 x mean of hep-*, a normal approximation
combining the subsets' binomial variances); for every point, the paired difference against the
reward model alone (a 95% paired bootstrap over pairs, 2000 resamples, seed 0) and the exact
McNemar p-value; best-of-N accuracy with Wilson intervals. RewardBench 2 files get their subset
scores and RewardBench 2 score with the intervals `rewardbench2` describes, and the paired
bootstrap difference of those scores against the reward model alone.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from lazymerge._version import __version__
from lazymerge.evaluation import rewardbench2
from lazymerge.evaluation.diagnostics import pair_diagnostics, reward_scale
from lazymerge.evaluation.lm_check import TIED_HEAD, lm_preference
from lazymerge.evaluation.scoring import best_of_n
from lazymerge.evaluation.sections import section_parts, weighted_interval, weights_note
from lazymerge.evaluation.stats import Z95, paired_bootstrap, wilson_interval
from lazymerge.io.writer import write_report
from lazymerge.progress import format_bytes

#: What DogeRM reports for context (third-party summaries of the paper; not plain accuracies on
#: these subsets, see the project's DogeRM brief): subset -> (base RM, DogeRM, merged with).
DOGERM_REFERENCE = {
    "math-prm": [(58.5, 69.9, "MetaMath-7B"), (58.5, 75.5, "MAmmoTH-7B")],
    "hep-*": [(72.6, 78.0, "code SFT model")],
}


def _interval(k: int, n: int) -> dict[str, float]:
    low, high = wilson_interval(k, n)
    return {"accuracy": k / n if n else 0.0, "ci_low": low, "ci_high": high, "n": n}


def pair_statistics(
    pairs: Sequence[Any], chosen: Sequence[float], rejected: Sequence[float], section_weights: str = "file"
) -> dict[str, Any]:
    """Overall, per-subset and per-section accuracy with 95% intervals (sections weighted as
    `section_weights` says, `sections`); `correct` per pair."""
    correct = [c > r for c, r in zip(chosen, rejected, strict=True)]
    subsets: dict[str, list[bool]] = {}
    for pair, right in zip(pairs, correct, strict=True):
        subsets.setdefault(pair.subset, []).append(right)
    out: dict[str, Any] = {
        "overall": _interval(sum(correct), len(correct)),
        "subsets": {name: _interval(sum(v), len(v)) for name, v in sorted(subsets.items())},
        "ties": sum(c == r for c, r in zip(chosen, rejected, strict=True)),
    }
    sections = {}
    for section, parts in section_parts({k: len(v) for k, v in subsets.items()}, section_weights).items():
        if section != "Reasoning" and section_weights == "file":  # pooled counts: Wilson
            pooled = [x for name, _ in parts for x in subsets[name]]
            sections[section] = _interval(sum(pooled), len(pooled))
            continue
        value, low, high = weighted_interval(
            [(sum(subsets[n]) / len(subsets[n]), len(subsets[n]), w) for n, w in parts], Z95
        )
        n = sum(len(subsets[name]) for name, _ in parts)
        sections[section] = {"accuracy": value, "ci_low": low, "ci_high": high, "n": n}
    if sections:
        out["sections"] = sections
    out["correct"] = correct
    return out


def _versus(baseline: list[bool], point: list[bool]) -> dict[str, Any]:
    comparison = paired_bootstrap(baseline, point, resamples=2000, seed=0)
    return {
        "difference": comparison.difference,
        "ci_low": comparison.ci_low,
        "ci_high": comparison.ci_high,
        "only_baseline": comparison.only_first,
        "only_point": comparison.only_second,
        "mcnemar_p": comparison.p_value,
    }


def sweep_report(spec: Any, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of every point, the chosen point, and the report files in `spec.out`."""
    baseline = next(r for r in records if r["baseline"])
    points = [_point_entry(spec, record, baseline) for record in records]
    chosen, how = choose_point(spec, points)
    doc = _report_doc(spec, points, chosen, how)
    if spec.merge.base is not None:  # once per sweep: kept in the folder with the inputs' identity
        from lazymerge.evaluation.diagnostics import sweep_task_vectors

        doc["task_vectors"] = sweep_task_vectors(spec.out, spec.inputs, spec.merge.base).to_dict()
    write_report(
        spec.out / "results.json", (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode("utf-8")
    )
    write_report(spec.out / "report.md", markdown(doc).encode("utf-8"))
    plot_accuracy(spec, points, spec.out / "accuracy.png")
    if spec.bon_evals and chosen is not None:
        plot_best_of_n(spec, points, chosen, spec.out / "best_of_n.png")
    if len(spec.inputs) == 3 and spec.pair_evals:
        plot_grid(spec, points, spec.out / "grid.png")
    if chosen is not None and any(not e.rewardbench2 for e in spec.pair_evals):
        plot_reliability(spec, points, chosen, spec.out / "reliability.png")
    return doc


#: The measurements of a point that its report shows.
TIMING_KEYS = (
    "build_s",
    "score_s",
    "bytes_written",
    "peak_rss",
    "peak_rss_anon",
    "peak_rss_file",
    "peak_gpu_memory",
)


def _point_entry(spec: Any, record: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """One point's statistics on every evaluation, against the reward model alone."""
    entry: dict[str, Any] = {
        "label": record["label"],
        "weights": record["weights"],
        "baseline": record["baseline"],
    }
    entry["pairs"] = {}
    for e in spec.pair_evals:
        if e.rewardbench2:
            entry.setdefault("rewardbench2", {})[e.name] = _rewardbench2_entry(e, record, baseline)
        else:
            entry["pairs"][e.name] = _pair_entry(e, record, baseline, spec.load.section_weights)
    entry["best_of_n"] = {}
    for b in spec.bon_evals:
        result = best_of_n(b.sets, record["best_of_n"][b.name]["rewards"], b.ns)
        for r in result.values():
            k = round(r["accuracy"] * r["n_prompts"])
            r["ci_low"], r["ci_high"] = wilson_interval(k, r["n_prompts"])
        entry["best_of_n"][b.name] = result
    entry["diagnostics"] = _diagnostics_entry(spec, record, baseline)
    entry["timing"] = {k: record.get(k) for k in TIMING_KEYS}
    return entry


def _diagnostics_entry(spec: Any, record: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Per evaluation file: the rewards' scale; for pair files also calibration, length bias and
    the pairs that flip against the reward model alone (`diagnostics`)."""
    out: dict[str, Any] = {}
    for e in spec.pair_evals:
        if e.rewardbench2:
            rewards = [r for row in record["rewardbench2"][e.name]["rewards"] for r in row]
            out[e.name] = {"rewards": dataclasses.asdict(reward_scale(rewards))}
            continue
        s, b = record["pairs"][e.name], baseline["pairs"][e.name]
        found = pair_diagnostics(e.pairs, (s["chosen"], s["rejected"]), (b["chosen"], b["rejected"]))
        out[e.name] = found.to_dict()
        if "lm_check" in record:
            lm = record["lm_check"][e.name]
            found_lm = lm_preference(lm["chosen"], lm["rejected"], lm.get("unscored", 0))
            out[e.name]["lm_check"] = dataclasses.asdict(found_lm)
    for bon in spec.bon_evals:
        rewards = [r for row in record["best_of_n"][bon.name]["rewards"] for r in row]
        out[bon.name] = {"rewards": dataclasses.asdict(reward_scale(rewards))}
    return out


def _rewardbench2_entry(e: Any, record: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    rewards = record["rewardbench2"][e.name]["rewards"]
    rb2 = rewardbench2.score_rows(e.rewardbench2, rewards)
    del rb2["rows"]
    rb2["versus_baseline"] = rewardbench2.paired_difference(
        e.rewardbench2, baseline["rewardbench2"][e.name]["rewards"], rewards
    )
    return rb2


def _pair_entry(e: Any, record: dict[str, Any], baseline: dict[str, Any], weights: str) -> dict[str, Any]:
    scores = record["pairs"][e.name]
    stats = pair_statistics(e.pairs, scores["chosen"], scores["rejected"], weights)
    base = pair_statistics(
        e.pairs, baseline["pairs"][e.name]["chosen"], baseline["pairs"][e.name]["rejected"], weights
    )
    stats["versus_baseline"] = _versus(base["correct"], stats["correct"])
    by_subset = {}
    for subset in stats["subsets"]:
        idx = [i for i, p in enumerate(e.pairs) if p.subset == subset]
        by_subset[subset] = _versus([base["correct"][i] for i in idx], [stats["correct"][i] for i in idx])
    stats["subsets_versus_baseline"] = by_subset
    del stats["correct"]
    return stats


def _report_doc(
    spec: Any, points: list[dict[str, Any]], chosen: dict[str, Any] | None, how: str
) -> dict[str, Any]:
    """results.json: what was swept and scored, how, every point, and the choice."""
    pair_files = [
        {
            "name": e.name,
            "path": str(e.path),
            "pairs": len(e.pairs),
            "validation": e.validation,
            "autoj_ties_dropped": e.autoj_ties,
            **({"format": "rewardbench2", "prompts": len(e.rewardbench2)} if e.rewardbench2 else {}),
        }
        for e in spec.pair_evals
    ]
    bon_files = [
        {"name": b.name, "path": str(b.path), "prompts": len(b.sets), "n": list(b.ns)} for b in spec.bon_evals
    ]
    return {
        "written_by": f"lazymerge {__version__}",
        "inputs": [str(p) for p in spec.inputs],
        "sources": [x.to_dict() for x in spec.sources],
        "domain_models": list(spec.domain_names),
        "merge": {"method": spec.merge.method, "density": spec.merge.density, "seed": spec.merge.seed},
        "scoring": spec.load.record(),
        **({"lm_head": {**spec.lm_head.record(), "text": spec.lm_head.describe()}} if spec.lm_head else {}),
        "evaluations": {"pairs": pair_files, "best_of_n": bon_files},
        "statistics": "95% Wilson intervals; paired bootstrap (2000 resamples, seed 0) and exact McNemar against the reward model alone",
        "points": points,
        "chosen": {"label": chosen["label"] if chosen else None, "chosen_on": how},
        "dogerm_reference": DOGERM_REFERENCE,
    }


def choose_point(spec: Any, points: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The point with the best accuracy on validation pairs (else on the first test pairs,
    marked optimistic, as DogeRM chose); ties go to the smaller total domain weight. A
    RewardBench 2 file counts by its RewardBench 2 score."""
    val = [e for e in spec.pair_evals if e.validation]
    test = [e for e in spec.pair_evals if not e.validation]
    source, how = (
        (val[0], "validation pairs")
        if val
        else (
            (test[0], "test pairs (optimistic: chosen on the data it is reported on, as DogeRM did)")
            if test
            else (None, "")
        )
    )
    if source is None:
        return None, "no pair evaluation"

    def domain_weight(p: dict[str, Any]) -> float:
        return float(sum(w for i, w in enumerate(p["weights"]) if i != spec.rm_index))

    def metric(p: dict[str, Any]) -> float:
        if source.rewardbench2:
            return float(p["rewardbench2"][source.name]["score"])
        return float(p["pairs"][source.name]["overall"]["accuracy"])

    best = max(points, key=lambda p: (metric(p), -domain_weight(p)))
    return best, how


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# lazymerge sweep report",
        "",
        f"Written by {doc['written_by']}. Inputs: {', '.join(doc['inputs'])}.",
        f"Merge: {doc['merge']}. Scoring: {doc['scoring']}.",
        f"Statistics: {doc['statistics']}.",
        "",
        f"**Chosen point: {doc['chosen']['label']}**, chosen on {doc['chosen']['chosen_on']}.",
        "",
    ]
    for e in doc["evaluations"]["pairs"]:
        lines += (
            _rewardbench2_markdown(doc, e) if e.get("format") == "rewardbench2" else _pairs_markdown(doc, e)
        )
    for b in doc["evaluations"]["best_of_n"]:
        lines += _bon_markdown(doc, b)
    return "\n".join(lines + _diagnostics_markdown(doc) + _timing_markdown(doc)) + "\n"


def _diagnostics_markdown(doc: dict[str, Any]) -> list[str]:
    """Why a point helps or not: task vectors, then per file the rewards' scale, calibration,
    length bias and flips, then the chosen point's largest flips with their texts."""
    from lazymerge.evaluation.diagnostics import CALIBRATION_BINS, LENGTH_MARGIN

    lines = ["## Diagnostics", ""]
    tv = doc.get("task_vectors")
    if tv is not None:
        from lazymerge.evaluation.diagnostics import TaskVectorReport

        lines += [f"### Task vectors against {tv['base']}", ""]
        lines += TaskVectorReport.from_dict(tv).markdown() + [""]
    else:
        lines += ["Task vectors: not computed (a sweep with a base model, --base, reports them).", ""]
    lines += [
        f"Per file: rewards' mean and standard deviation over every text scored; expected calibration error "
        f"of sigmoid(r_chosen - r_rejected) over {CALIBRATION_BINS} confidence bins (reliability.png); "
        f"accuracy by length difference of the responses (characters; 'about equal' within "
        f"{100 * LENGTH_MARGIN:g}%) and how often the longer response wins; pairs fixed / broken against "
        "the reward model alone.",
        "",
    ]
    if "lm_check" in doc["scoring"]:
        head = doc.get("lm_head", {}).get("text", TIED_HEAD)  # (reports before untied heads: tied)
        lines += [
            "LM check (--lm-check): each point's merged backbone read as a language model through "
            f"{head}; the share of pairs whose chosen response has the higher mean token "
            "log-likelihood (tokens after the pair's common prefix). Set beside the reward's accuracy, "
            "it separates the knowledge reaching the backbone from the reward head reading it.",
            "",
        ]
    names = list(doc["points"][0].get("diagnostics", {}))
    for name in names:
        lines += _diagnostics_table(doc, name)
    chosen = next((p for p in doc["points"] if p["label"] == doc["chosen"]["label"]), None)
    if chosen is not None:
        lines += _flips_markdown(chosen)
    return lines


def _diagnostics_table(doc: dict[str, Any], name: str) -> list[str]:
    has_pairs = "calibration" in doc["points"][0]["diagnostics"][name]
    has_lm = "lm_check" in doc["points"][0]["diagnostics"][name]
    head = "| point | reward mean (std) |"
    if has_pairs:
        head += " ECE | acc. chosen shorter / about equal / longer (n) | longer wins % | fixed / broken |"
    if has_lm:
        head += " LM prefers chosen % (95% CI) |"
    lines = [f"### {name}", "", head, "| --- |" + " --- |" * (head.count("|") - 2)]
    for p in doc["points"]:
        d = p["diagnostics"][name]
        row = f"| {p['label']} | {d['rewards']['mean']:.3f} ({d['rewards']['std']:.3f}) |"
        if has_pairs:
            bins = " / ".join(
                f"{'-' if b['accuracy'] is None else _pct(b['accuracy'])} ({b['n']})"
                for b in d["length"]["bins"]
            )
            longer = d["length"]["prefers_longer"]
            row += (
                f" {d['calibration']['ece']:.3f} | {bins} | {'-' if longer is None else _pct(longer)} | "
                f"{d['flips']['fixed']} / {d['flips']['broken']} |"
            )
        if has_lm:
            lm = d["lm_check"]
            unscored = f"; {lm['unscored']} response tokens unscored" if lm.get("unscored") else ""
            row += f" {_pct(lm['accuracy'])} ({_pct(lm['ci_low'])}-{_pct(lm['ci_high'])}){unscored} |"
        lines.append(row)
    return lines + [""]


def _flips_markdown(point: dict[str, Any]) -> list[str]:
    """The chosen point's largest flips on every pair file, with their texts."""
    lines: list[str] = []
    for name, d in point.get("diagnostics", {}).items():
        flips = d.get("flips")
        if not flips or not (flips["largest_fixed"] or flips["largest_broken"]):
            continue
        lines += [f"### Largest flips of {point['label']} on {name}", ""]
        for kind, key in (("fixed (right now, wrong alone)", "largest_fixed"), ("broken", "largest_broken")):
            for f in flips[key]:
                lines.append(
                    f"- {kind}, pair {f['index']} ({f['subset']}), margin {f['baseline_margin']:+.3f} -> "
                    f"{f['point_margin']:+.3f}: prompt {_quote(f['prompt'])}; chosen {_quote(f['chosen'])}; "
                    f"rejected {_quote(f['rejected'])}"
                )
        lines.append("")
    return lines


def _quote(text: str) -> str:
    """A text on one markdown line, as code (backticks and line breaks made harmless)."""
    flat = " ".join(text.split()).replace("`", "'")
    return f"`{flat}`"


def _interval_cell(a: dict[str, Any], key: str = "accuracy") -> str:
    return f"{_pct(a[key])} [{_pct(a['ci_low'])}, {_pct(a['ci_high'])}]"


def _pairs_markdown(doc: dict[str, Any], e: dict[str, Any]) -> list[str]:
    """One pair file's section: accuracy against the reward model alone, then by subset and
    section, then DogeRM's own figures for context."""
    name = e["name"]
    lines = [
        f"## {name} ({e['pairs']} pairs{', validation' if e['validation'] else ''})",
        "",
        "| point | accuracy % [95% CI] | vs reward model alone, points [95% CI] | McNemar p |",
        "| --- | --- | --- | --- |",
    ]
    for p in doc["points"]:
        s = p["pairs"][name]
        o, v = s["overall"], s["versus_baseline"]
        lines.append(
            f"| {p['label']}{' (reward model alone)' if p['baseline'] else ''} | {_interval_cell(o)} "
            f"| {100 * v['difference']:+.1f} "
            f"[{100 * v['ci_low']:+.1f}, {100 * v['ci_high']:+.1f}] | {v['mcnemar_p']:.3g} |"
        )
    first = doc["points"][0]["pairs"][name]
    subsets = sorted(first["subsets"])
    if len(subsets) > 1 or "sections" in first:
        lines += _table(doc, subsets, lambda p, sub: _interval_cell(p["pairs"][name]["subsets"][sub]))
        sections = first.get("sections")
        if sections:
            weights = (doc.get("scoring") or {}).get("section_weights", "file")
            lines += ["", f"Sections weighted by {weights_note(weights)}."]
            lines += _table(doc, list(sections), lambda p, k: _interval_cell(p["pairs"][name]["sections"][k]))
    return lines + _dogerm_reference(doc, subsets) + [""]


def _table(doc: dict[str, Any], columns: list[str], cell: Any) -> list[str]:
    """A blank line, then a table of every point (rows) by `columns`, `cell(point, column)`."""
    lines = ["", "| point | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for p in doc["points"]:
        lines.append(f"| {p['label']} | " + " | ".join(cell(p, c) for c in columns) + " |")
    return lines


def _dogerm_reference(doc: dict[str, Any], subsets: list[str]) -> list[str]:
    reference = []
    if "math-prm" in subsets:
        reference += [
            f"math-prm {b} -> {d} merged with {w}" for b, d, w in doc["dogerm_reference"]["math-prm"]
        ]
    if any(s.startswith("hep-") for s in subsets):
        reference += [f"hep-* {b} -> {d} merged with {w}" for b, d, w in doc["dogerm_reference"]["hep-*"]]
    if not reference:
        return []
    return [
        "",
        "For context, DogeRM reports (7B models; rounded differently, not plain accuracies): "
        + "; ".join(reference)
        + ".",
    ]


def _bon_markdown(doc: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """One candidate file's section: best-of-N accuracy per point and N, oracle and majority."""
    name = b["name"]
    lines = [
        f"## best-of-N: {name} ({b['prompts']} prompts)",
        "",
        "| point | " + " | ".join(f"N={n}" for n in b["n"]) + " |",
        "| --- |" + " --- |" * len(b["n"]),
    ]
    for p in doc["points"]:
        r = p["best_of_n"][name]
        lines.append(
            f"| {p['label']} | "
            + " | ".join(_interval_cell(r[str(n)]) if str(n) in r else "-" for n in b["n"])
            + " |"
        )
    first = doc["points"][0]["best_of_n"][name]
    for row, key in (("oracle", "oracle"), ("majority vote", "majority")):
        lines.append(
            f"| {row} | "
            + " | ".join(_pct(first[str(n)][key]) if str(n) in first else "-" for n in b["n"])
            + " |"
        )
    return lines + [""]


def _timing_markdown(doc: dict[str, Any]) -> list[str]:
    lines = [
        "## Time per point",
        "",
        "| point | build s | score s | model bytes written | peak RSS: total / anonymous / file-backed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in doc["points"]:
        t = p["timing"]
        rss = " / ".join(
            "-" if t.get(k) is None else format_bytes(t[k])
            for k in ("peak_rss", "peak_rss_anon", "peak_rss_file")
        )
        lines.append(f"| {p['label']} | {t['build_s']} | {t['score_s']} | {t['bytes_written']} | {rss} |")
    return lines


def _rewardbench2_markdown(doc: dict[str, Any], e: dict[str, Any]) -> list[str]:
    name = e["name"]
    lines = [
        f"## {name} (RewardBench 2, {e['prompts']} prompts{', validation' if e['validation'] else ''})",
        "",
        "Scored as RewardBench 2's own code does: best-of-N rows score 1/k with k completions tied at the top; "
        "Ties by its weighted rule; the score is the unweighted mean of the subsets. Intervals: Wilson for "
        "subsets without ties at the top, else a percentile bootstrap (2000 resamples, seed 0).",
        "",
        "| point | RewardBench 2 score % [95% CI] | vs reward model alone, points [95% CI] |",
        "| --- | --- | --- |",
    ]
    for p in doc["points"]:
        s = p["rewardbench2"][name]
        v = s["versus_baseline"]
        lines.append(
            f"| {p['label']}{' (reward model alone)' if p['baseline'] else ''} | {_pct(s['score'])} "
            f"[{_pct(s['ci_low'])}, {_pct(s['ci_high'])}] | {100 * v['difference']:+.1f} "
            f"[{100 * v['ci_low']:+.1f}, {100 * v['ci_high']:+.1f}] |"
        )
    subsets = list(doc["points"][0]["rewardbench2"][name]["subsets"])
    lines += ["", "| point | " + " | ".join(subsets) + " |", "| --- |" + " --- |" * len(subsets)]
    for p in doc["points"]:
        cells = []
        for sub in subsets:
            a = p["rewardbench2"][name]["subsets"][sub]
            cells.append(f"{_pct(a['score'])} [{_pct(a['ci_low'])}, {_pct(a['ci_high'])}]")
        lines.append(f"| {p['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _scores(p: dict[str, Any], e: Any) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(overall, per subset) as {accuracy, ci_low, ci_high} for a pair or RewardBench 2 file."""
    if not e.rewardbench2:
        s = p["pairs"][e.name]
        return s["overall"], s["subsets"]
    r = p["rewardbench2"][e.name]

    def as_accuracy(x: dict[str, Any]) -> dict[str, float]:
        return {"accuracy": x["score"], "ci_low": x["ci_low"], "ci_high": x["ci_high"]}

    return as_accuracy(r), {k: as_accuracy(v) for k, v in r["subsets"].items()}


def _pyplot() -> Any:
    from lazymerge._optional import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Any) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_report(path, buffer.getvalue())


def _x(spec: Any, points: Sequence[dict[str, Any]]) -> tuple[list[float], str]:
    if len(spec.inputs) == 2:
        return [p["weights"][1 - spec.rm_index] for p in points], "lambda (weight of the domain model)"
    return list(range(len(points))), "grid point"


def plot_accuracy(spec: Any, points: Sequence[dict[str, Any]], path: Any) -> None:
    """Accuracy against lambda per subset with 95% CI bands and the reward model's baseline."""
    plt = _pyplot()
    order = sorted(range(len(points)), key=lambda i: _x(spec, points)[0][i])
    pts = [points[i] for i in order]
    xs, xlabel = _x(spec, pts)
    tests = [e for e in spec.pair_evals] or []
    fig, axes = plt.subplots(
        1, max(1, len(tests)), figsize=(7 * max(1, len(tests)), 4.5), dpi=110, squeeze=False
    )
    for ax, e in zip(axes[0], tests, strict=False):
        baseline = _scores(next(p for p in pts if p["baseline"]), e)[0]["accuracy"]
        subsets = sorted(_scores(pts[0], e)[1])
        for sub in subsets if len(subsets) > 1 else []:
            acc = [100 * _scores(p, e)[1][sub]["accuracy"] for p in pts]
            lo = [100 * _scores(p, e)[1][sub]["ci_low"] for p in pts]
            hi = [100 * _scores(p, e)[1][sub]["ci_high"] for p in pts]
            line = ax.plot(xs, acc, marker="o", label=sub)[0]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
        acc = [100 * _scores(p, e)[0]["accuracy"] for p in pts]
        lo = [100 * _scores(p, e)[0]["ci_low"] for p in pts]
        hi = [100 * _scores(p, e)[0]["ci_high"] for p in pts]
        overall = "RewardBench 2 score" if e.rewardbench2 else "all pairs"
        ax.plot(xs, acc, color="black", linewidth=2.2, marker="s", label=overall)
        ax.fill_between(xs, lo, hi, color="black", alpha=0.1)
        ax.axhline(100 * baseline, color="gray", linestyle="--", label="reward model alone")
        ax.set_title(f"{e.name}{' (validation)' if e.validation else ''}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(("score" if e.rewardbench2 else "pairwise accuracy") + " (%), 95% CI")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_best_of_n(spec: Any, points: Sequence[dict[str, Any]], chosen: dict[str, Any], path: Any) -> None:
    """Best-of-N accuracy against N for the reward model alone and the chosen point."""
    plt = _pyplot()
    b = spec.bon_evals[0]
    baseline = next(p for p in points if p["baseline"])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for p, name in ((baseline, "reward model alone"), (chosen, f"chosen ({chosen['label']})")):
        r = p["best_of_n"][b.name]
        ns = [int(n) for n in r]
        ax.errorbar(
            ns,
            [100 * r[str(n)]["accuracy"] for n in ns],
            yerr=[
                [100 * (r[str(n)]["accuracy"] - r[str(n)]["ci_low"]) for n in ns],
                [100 * (r[str(n)]["ci_high"] - r[str(n)]["accuracy"]) for n in ns],
            ],
            marker="o",
            capsize=3,
            label=name,
        )
    r = baseline["best_of_n"][b.name]
    ns = [int(n) for n in r]
    ax.plot(ns, [100 * r[str(n)]["oracle"] for n in ns], linestyle=":", color="green", label="oracle pass@N")
    ax.plot(
        ns, [100 * r[str(n)]["majority"] for n in ns], linestyle="--", color="gray", label="majority vote"
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (candidates)")
    ax.set_ylabel("best-of-N accuracy (%), 95% CI")
    ax.set_title(b.name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_grid(spec: Any, points: Sequence[dict[str, Any]], path: Any) -> None:
    """Heatmap of the first test evaluation's accuracy over the two domain models' weights."""
    plt = _pyplot()
    e = next((x for x in spec.pair_evals if not x.validation), spec.pair_evals[0])
    domains = [i for i in range(3) if i != spec.rm_index]
    w1 = sorted({p["weights"][domains[0]] for p in points})
    w2 = sorted({p["weights"][domains[1]] for p in points})
    grid = np.full((len(w2), len(w1)), np.nan)
    for p in points:
        grid[w2.index(p["weights"][domains[1]]), w1.index(p["weights"][domains[0]])] = (
            100 * _scores(p, e)[0]["accuracy"]
        )
    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    image = ax.imshow(grid, origin="lower", cmap="viridis")
    ax.set_xticks(range(len(w1)), [f"{w:g}" for w in w1])
    ax.set_yticks(range(len(w2)), [f"{w:g}" for w in w2])
    names = list(spec.domain_names) or ["domain 1", "domain 2"]
    ax.set_xlabel(f"weight of {names[0]}")
    ax.set_ylabel(f"weight of {names[1] if len(names) > 1 else 'domain 2'}")
    ax.set_title(f"{e.name}: {'RewardBench 2 score' if e.rewardbench2 else 'accuracy'} (%)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_reliability(spec: Any, points: Sequence[dict[str, Any]], chosen: dict[str, Any], path: Any) -> None:
    """Reliability of the Bradley-Terry probability: accuracy against mean confidence per bin,
    for the reward model alone and the chosen point, one panel per pair file."""
    plt = _pyplot()
    evals = [e for e in spec.pair_evals if not e.rewardbench2]
    baseline = next(p for p in points if p["baseline"])
    fig, axes = plt.subplots(1, len(evals), figsize=(5 * len(evals), 4.5), dpi=110, squeeze=False)
    for ax, e in zip(axes[0], evals, strict=True):
        ax.plot([0.5, 1], [0.5, 1], color="gray", linestyle=":", label="perfect calibration")
        for p, name in ((baseline, "reward model alone"), (chosen, f"chosen ({chosen['label']})")):
            cal = p["diagnostics"][e.name]["calibration"]
            used = [b for b in cal["bins"] if b["n"]]
            ax.plot(
                [b["confidence"] for b in used],
                [b["accuracy"] for b in used],
                marker="o",
                label=f"{name}, ECE {cal['ece']:.3f}",
            )
        ax.set_xlabel("confidence sigmoid(|r_chosen - r_rejected|)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{e.name}{' (validation)' if e.validation else ''}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
