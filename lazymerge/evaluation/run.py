"""The evaluation jobs behind `lazymerge eval`, `lazymerge bon` and `lazymerge sweep`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from lazymerge._version import __version__
from lazymerge.errors import NonFiniteRewardError
from lazymerge.evaluation import rewardbench2
from lazymerge.evaluation.reports import BonReport, PairReport, ScoredWith
from lazymerge.evaluation.rewards import load_reward_model
from lazymerge.evaluation.scoring import (
    best_of_n,
    load_candidates,
    load_preferences,
    pair_results,
    row_source,
    row_texts,
)
from lazymerge.io.hub_cache import ModelSource, resolve_inputs
from lazymerge.memory import PeakRssSampler
from lazymerge.options import MergeOptions, MergeRequest
from lazymerge.progress import ProgressBar
from lazymerge.score_options import ScoreOptions

R = TypeVar("R", PairReport, BonReport)


def _score(
    rm: Any, texts: list[str], bar: ProgressBar, data_file: str | Path, origins: list[tuple[Any, str]]
) -> list[float]:
    """Rewards of `texts` (`origins[i]` is the row and text each came from); a NaN or infinite
    reward stops scoring naming the model and the text's file, line, id and place."""
    try:
        return list(rm.score_texts(texts, bar.update))
    except NonFiniteRewardError as exc:
        if exc.index is None:
            raise
        row, which = origins[exc.index]
        raise exc.at(row_source(data_file, row, which)) from None
    finally:
        bar.close()


def _gpu_peak(device: str) -> int | None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return None


def _resolve(
    model: str | Path | Sequence[str | Path], merge: MergeOptions | None
) -> tuple[list[ModelSource], MergeOptions | None]:
    """Every model (and the merge's base model) as read: local paths, or Hugging Face ids found
    in the local cache (see `lazymerge.io.hub_cache`)."""
    models = [model] if isinstance(model, (str, Path)) else list(model)
    if merge is None:
        return resolve_inputs(models), None
    request = MergeRequest.resolve(models, merge)
    return list(request.sources), request.options


def _load(
    model: str | Path | Sequence[str | Path],
    merge: MergeOptions | None,
    score: ScoreOptions,
    spill_dir: Path | None,
    echo: Callable[[str], None],
) -> Any:
    """A reward model folder, or (with `merge`) the inputs of a merge built in memory; why it
    streams, when --device-memory chose it, said through `echo`."""
    if merge is None:
        path = model if isinstance(model, (str, Path)) else model[0]
        rm = load_reward_model(path, score, spill_dir=spill_dir)
    else:
        from lazymerge.evaluation.in_memory import load_merged_reward_model

        inputs = [model] if isinstance(model, (str, Path)) else list(model)
        rm = load_merged_reward_model(inputs, merge, score, spill_dir=spill_dir)
    if rm.stream_note is not None:
        echo(rm.stream_note)
    return rm


def _settings(score: ScoreOptions, rm: Any) -> dict[str, Any]:
    """The settings a report records: those given, with --stream-layers on where --device-memory
    chose it (the rewards are the same either way; the report says how they were computed)."""
    record = score.record()
    if getattr(rm, "stream_note", None) is not None:
        record["stream_layers"] = True
    return record


def _paths(model: str | Path | Sequence[str | Path], sources: Sequence[ModelSource]) -> Path | list[Path]:
    return sources[0].path if isinstance(model, (str, Path)) else [s.path for s in sources[: len(model)]]


def _name(model: str | Path | Sequence[str | Path]) -> str | list[str]:
    return str(model) if isinstance(model, (str, Path)) else [str(m) for m in model]


def evaluate_pairs(
    model: str | Path | Sequence[str | Path],
    pairs_file: str | Path,
    *,
    merge: MergeOptions | None = None,
    progress: bool | None = False,
    score: ScoreOptions | None = None,
    spill_dir: Path | None = None,
    echo: Callable[[str], None] = lambda line: None,
    **load: Any,
) -> PairReport:
    """Pairwise accuracy of a reward model on a pair file, or the RewardBench 2 scores of a
    RewardBench 2 file (see `scoring.load_preferences`, `rewardbench2.score_rows`).

    Args:
        model: a reward model folder; or, with `merge`, the merge's inputs (reward model and
            domain models), merged in memory with no checkpoint written. Hugging Face model ids
            (`ORG/NAME[@REVISION]`) are read from the local cache; `sources` in the result says
            what was read for each.
        score: how the model is loaded and scored; or `load`, the same as keywords
            (`ScoreOptions.build`: device, dtype, quant, ...).
        spill_dir: where a layer-streamed pass spills hidden states (the results' folder).
        echo: where a one-line note goes (the stream chosen by --device-memory).
    """
    score = score if score is not None else ScoreOptions.build(**load)
    sources, merge = _resolve(model, merge)
    data = load_preferences(pairs_file)
    pairs, rb2_rows = data.pairs, data.rewardbench2
    with PeakRssSampler() as sampler:
        rm = _load(_paths(model, sources), merge, score, spill_dir, echo)
        if rb2_rows:
            texts = [rm.format_text(r.prompt, c) for r in rb2_rows for c in r.completions]
            origins: list[tuple[Any, str]] = [(r, which) for r in rb2_rows for _, _, which in row_texts(r)]
        else:
            texts = [rm.format_text(p.prompt, p.chosen) for p in pairs] + [
                rm.format_text(p.prompt, p.rejected) for p in pairs
            ]
            origins = [(p, "chosen") for p in pairs] + [(p, "rejected") for p in pairs]
        bar = ProgressBar(
            len(set(texts)),
            "scoring",
            enabled=progress,
            unit="texts" if rb2_rows else "pairs",
            per=1 if rb2_rows else 2,
        )
        rewards = _score(rm, texts, bar, pairs_file, origins)
    if rb2_rows:
        result = rewardbench2.score_rows(rb2_rows, rewardbench2.split_rewards(rb2_rows, rewards))
    else:
        result = pair_results(
            pairs, rewards[: len(pairs)], rewards[len(pairs) :], data.autoj_ties, score.section_weights
        )
    return PairReport(_provenance(model, sources, merge, score, sampler, Path(pairs_file), rm), result)


def _provenance(
    model: str | Path | Sequence[str | Path],
    sources: Sequence[Any],
    merge: MergeOptions | None,
    score: ScoreOptions,
    sampler: PeakRssSampler,
    data_file: Path,
    rm: Any = None,
    sections: bool = True,
) -> ScoredWith:
    """What a report was scored with: lazymerge, the model (and the in-memory merge), the
    identity of every input and of the data file (`lazymerge.provenance`), the scoring settings,
    and the peak memory it took."""
    from lazymerge.evaluation.datasets import resolve_data
    from lazymerge.provenance import identify_input

    merged = None
    if merge is not None:
        merged = {
            "alpha": merge.alphas[0] if merge.alphas else None,
            "weights": list(merge.weights) if merge.weights else None,
            "method": merge.method,
            "density": merge.density,
            "seed": merge.seed,
            "strict": merge.strict,
            "rm": merge.rm,
        }
    return ScoredWith(
        written_by=f"lazymerge {__version__}",
        model=_name(model),
        sources=[x.to_dict() for x in sources],
        identity=[identify_input(x.path).to_dict() for x in sources],
        data=resolve_data(data_file).to_dict(),
        settings=_settings(score, rm),
        peak_rss=sampler.peak.total,
        peak_gpu_memory=_gpu_peak(score.device),
        merged_in_memory=merged,
        computed=rm.scoring_stats.to_dict() if getattr(rm, "scoring_stats", None) is not None else None,
        conventions=_conventions(rm, score, sections),
    )


def _conventions(rm: Any, score: ScoreOptions, sections: bool) -> dict[str, str] | None:
    """What `rm` applied (`RewardModel.conventions`) and, for pairs, how section scores are
    weighted."""
    if rm is None or not hasattr(rm, "conventions"):
        return None
    from lazymerge.evaluation.sections import weights_note

    weights = {"section weights": weights_note(score.section_weights)} if sections else {}
    return {**rm.conventions(), **weights}


def evaluate_bon(
    model: str | Path | Sequence[str | Path],
    candidates_file: str | Path,
    ns: Sequence[int],
    *,
    merge: MergeOptions | None = None,
    progress: bool | None = False,
    score: ScoreOptions | None = None,
    spill_dir: Path | None = None,
    echo: Callable[[str], None] = lambda line: None,
    **load: Any,
) -> BonReport:
    """Best-of-N reranking accuracy with oracle pass@n and majority vote beside it (`model`,
    `merge`, `spill_dir` and `echo` as in `evaluate_pairs`)."""
    score = score if score is not None else ScoreOptions.build(**load)
    sources, merge = _resolve(model, merge)
    sets = load_candidates(candidates_file)
    with PeakRssSampler() as sampler:
        rm = _load(_paths(model, sources), merge, score, spill_dir, echo)
        texts = [rm.format_text(s.prompt, c) for s in sets for c in s.candidates]
        bar = ProgressBar(len(set(texts)), "scoring", enabled=progress, unit="texts")
        flat = _score(rm, texts, bar, candidates_file, [(s, w) for s in sets for _, _, w in row_texts(s)])
    rewards, pos = [], 0
    for s in sets:
        rewards.append(flat[pos : pos + len(s.candidates)])
        pos += len(s.candidates)
    return BonReport(
        _provenance(model, sources, merge, score, sampler, Path(candidates_file), rm, sections=False),
        n_prompts=len(sets),
        best_of_n=best_of_n(sets, rewards, ns),
        rewards=[{"id": s.id, "rewards": r} for s, r in zip(sets, rewards, strict=True)],
    )


def reported(
    out: Path | None,
    models: Sequence[str | Path],
    data_file: Path,
    force: bool,
    job: Callable[[], R],
) -> R:
    """`job()`'s result, written to `out` when given: the destination is reserved (locked and
    checked under the output rule, never an input) before any scoring, the report written
    atomically and recorded in its folder's manifest, so a later --force knows it as
    lazymerge's (and an edited copy as the user's)."""
    if out is None:
        return job()
    from lazymerge.evaluation.datasets import data_paths
    from lazymerge.io.hub_cache import input_paths
    from lazymerge.io.outputs import OutputFiles

    with OutputFiles([out], inputs=[*input_paths(models), *data_paths(data_file)], force=force) as files:
        result = job()
        files.write({out: report_bytes(result.to_dict())})
        return result


def report_bytes(doc: dict[str, Any]) -> bytes:
    """A report as strict JSON (a NaN is a defect upstream, never written)."""
    return (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode("utf-8")
