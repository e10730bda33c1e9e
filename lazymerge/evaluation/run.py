"""The evaluation jobs behind `lazymerge eval`, `lazymerge bon` and `lazymerge sweep`."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lazymerge import __version__
from lazymerge.errors import OutputError
from lazymerge.evaluation.rewards import load_reward_model, require
from lazymerge.evaluation.scoring import best_of_n, load_candidates, load_pairs, pair_results
from lazymerge.io.writer import write_report
from lazymerge.memory import PeakRssSampler
from lazymerge.progress import ProgressBar


def _gpu_peak(device: str) -> int | None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return None


def evaluate_pairs(
    model: str | Path, pairs_file: str | Path, *, progress: bool | None = False, **load: Any
) -> dict[str, Any]:
    """Pairwise accuracy of a reward model on a pair file (see `scoring.load_pairs`).

    Args:
        load: keyword arguments of `rewards.load_reward_model` (device, dtype, quant, ...).
    """
    pairs, autoj_ties = load_pairs(pairs_file)
    with PeakRssSampler() as sampler:
        rm = load_reward_model(model, **load)
        texts = [rm.format_text(p.prompt, p.chosen) for p in pairs] + [
            rm.format_text(p.prompt, p.rejected) for p in pairs
        ]
        bar = ProgressBar(len(set(texts)), "scoring", enabled=progress, unit="pairs", per=2)
        rewards = rm.score_texts(texts, bar.update)
        bar.close()
    result = pair_results(pairs, rewards[: len(pairs)], rewards[len(pairs) :], autoj_ties)
    result["written_by"] = f"lazymerge {__version__}"
    result["model"] = str(model)
    result["settings"] = {k: v for k, v in load.items() if k != "batch_size"}
    result["peak_rss"] = sampler.peak.total
    result["peak_gpu_memory"] = _gpu_peak(load.get("device", "cpu"))
    return result


def format_pair_table(result: dict[str, Any]) -> str:
    lines = [f"{'subset':28s} {'n':>6s} {'ties':>5s} {'accuracy':>9s}"]
    for name, s in result["subsets"].items():
        lines.append(f"{name:28s} {s['n']:6d} {s['ties']:5d} {100 * s['accuracy']:8.2f}%")
    lines.append(f"{'all':28s} {result['n_pairs']:6d} {result['n_ties']:5d} {100 * result['accuracy']:8.2f}%")
    for name, value in (result.get("sections") or {}).items():
        lines.append(f"section {name:20s} {'':12s} {100 * value:8.2f}%")
    return "\n".join(lines)


def evaluate_bon(
    model: str | Path,
    candidates_file: str | Path,
    ns: Sequence[int],
    *,
    progress: bool | None = False,
    **load: Any,
) -> dict[str, Any]:
    """Best-of-N reranking accuracy with oracle pass@n and majority vote beside it."""
    sets = load_candidates(candidates_file)
    with PeakRssSampler() as sampler:
        rm = load_reward_model(model, **load)
        texts = [rm.format_text(s.prompt, c) for s in sets for c in s.candidates]
        bar = ProgressBar(len(set(texts)), "scoring", enabled=progress, unit="texts")
        flat = rm.score_texts(texts, bar.update)
        bar.close()
    rewards, pos = [], 0
    for s in sets:
        rewards.append(flat[pos : pos + len(s.candidates)])
        pos += len(s.candidates)
    return {
        "written_by": f"lazymerge {__version__}",
        "model": str(model),
        "n_prompts": len(sets),
        "best_of_n": best_of_n(sets, rewards, ns),
        "rewards": [{"id": s.id, "rewards": r} for s, r in zip(sets, rewards, strict=True)],
        "peak_rss": sampler.peak.total,
        "peak_gpu_memory": _gpu_peak(load.get("device", "cpu")),
    }


def format_bon_table(result: dict[str, Any]) -> str:
    lines = [f"{'n':>4s} {'best-of-n':>10s} {'oracle':>8s} {'majority':>9s} {'prompts':>8s}"]
    for n, r in result["best_of_n"].items():
        lines.append(
            f"{n:>4s} {100 * r['accuracy']:9.2f}% {100 * r['oracle']:7.2f}% {100 * r['majority']:8.2f}% {r['n_prompts']:8d}"
        )
    return "\n".join(lines)


def run_sweep(
    inputs: Sequence[str | Path],
    alphas: Sequence[float],
    pairs_file: str | Path,
    out_dir: str | Path,
    *,
    val_pairs: str | Path | None = None,
    keep: bool = False,
    force: bool = False,
    merge_options: dict[str, Any] | None = None,
    progress: bool | None = False,
    **load: Any,
) -> dict[str, Any]:
    """For each alpha: merge (streaming), evaluate, and delete the merged model unless `keep`.

    With `val_pairs`, lambda is chosen on the validation pairs (ties to the smaller lambda) and
    the test accuracy at that lambda is reported; DogeRM's scripts pick it on the test set.
    Writes results.json and accuracy.png (accuracy against lambda per subset) into `out_dir`.
    """
    from lazymerge.api import merge
    from lazymerge.io.writer import check_report_destination

    out = Path(out_dir)
    sources = [Path(p) for p in (*inputs, pairs_file, *([val_pairs] if val_pairs else []))]
    # the sweep folder holds reports lazymerge writes: an input is never one of them, and an
    # existing folder is reused only with force, and only when lazymerge wrote its results
    if out.is_dir():
        check_report_destination(out / "results.json", sources, force)
    for given in sources:
        if Path(given).resolve() == out.resolve() or out.resolve() in Path(given).resolve().parents:
            raise OutputError(f"{out}: holds input {given}; choose another sweep folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file; a sweep writes a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "results.json").exists():
        raise OutputError(
            f"{out}: exists and holds files lazymerge did not write; choose another sweep folder"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create ({exc.strerror or exc})") from None
    rows = []
    for alpha in alphas:
        merged = out / f"alpha-{alpha:g}"
        report = merge(list(inputs), merged, alpha=alpha, **(merge_options or {}))
        try:
            test = evaluate_pairs(merged, pairs_file, progress=progress, **load)
            val = evaluate_pairs(merged, val_pairs, progress=progress, **load) if val_pairs else None
        finally:
            if not keep:
                shutil.rmtree(merged, ignore_errors=True)
        rows.append(
            {
                "alpha": alpha,
                "accuracy": test["accuracy"],
                "subsets": {k: v["accuracy"] for k, v in test["subsets"].items()},
                "sections": test.get("sections"),
                "val_accuracy": val["accuracy"] if val else None,
                "merge_wall_s": report.wall_s,
                "kept": str(merged) if keep else None,
            }
        )
    result: dict[str, Any] = {"inputs": [str(p) for p in inputs], "pairs": str(pairs_file), "rows": rows}
    best_test = max(rows, key=lambda r: (r["accuracy"], -r["alpha"]))
    result["best_on_test"] = {"alpha": best_test["alpha"], "accuracy": best_test["accuracy"]}
    if val_pairs:
        chosen = max(rows, key=lambda r: (r["val_accuracy"], -r["alpha"]))
        result["chosen_on_validation"] = {
            "alpha": chosen["alpha"],
            "val_accuracy": chosen["val_accuracy"],
            "test_accuracy": chosen["accuracy"],
        }
    result["written_by"] = f"lazymerge {__version__}"
    result["plot"] = str(plot_sweep(rows, out / "accuracy.png"))
    write_report(out / "results.json", (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return result


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for subset in sorted({s for r in rows for s in r["subsets"]}):
        ax.plot(
            alphas, [100 * r["subsets"].get(subset, float("nan")) for r in rows], marker="o", label=subset
        )
    ax.plot(
        alphas,
        [100 * r["accuracy"] for r in rows],
        color="black",
        linewidth=2.5,
        marker="s",
        label="all pairs",
    )
    if any(r["val_accuracy"] is not None for r in rows):
        ax.plot(
            alphas, [100 * r["val_accuracy"] for r in rows], color="gray", linestyle="--", label="validation"
        )
    ax.set_xlabel("lambda (weight of the domain model)")
    ax.set_ylabel("pairwise accuracy (%)")
    ax.set_title("Merged reward model accuracy against lambda")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_report(path, buffer.getvalue())
    return path


def format_sweep_table(result: dict[str, Any]) -> str:
    lines = [f"{'lambda':>7s} {'accuracy':>9s} {'validation':>11s}"]
    for r in result["rows"]:
        val = f"{100 * r['val_accuracy']:10.2f}%" if r["val_accuracy"] is not None else f"{'-':>11s}"
        lines.append(f"{r['alpha']:7.3g} {100 * r['accuracy']:8.2f}% {val}")
    lines.append(
        f"best lambda on the test pairs: {result['best_on_test']['alpha']:g} ({100 * result['best_on_test']['accuracy']:.2f}%)"
    )
    if "chosen_on_validation" in result:
        c = result["chosen_on_validation"]
        lines.append(
            f"lambda chosen on validation: {c['alpha']:g}; test accuracy there {100 * c['test_accuracy']:.2f}%"
        )
    lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)
