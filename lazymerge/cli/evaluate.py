"""Commands that score reward models: eval, bon, sweep."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import click

from lazymerge.cli.flags import (
    field_option,
    in_memory_merge,
    in_memory_merge_options,
    merge_flags,
    parse_ns,
    print_json,
    score_options,
    score_value,
    together,
)
from lazymerge.cli.group import command
from lazymerge.options import MergeOptions
from lazymerge.sweep_options import SWEEP_FIELDS, SweepOptions

_OUT = click.option("--out", type=click.Path(path_type=Path), help="Write the results as JSON.")
_FORCE = click.option("--force", is_flag=True, help="Replace an existing --out report that lazymerge wrote.")
_MODELS = click.argument("model", nargs=-1, required=True, type=click.Path(path_type=Path))


@command("eval")
@_MODELS
@click.option(
    "--pairs",
    "pairs_file",
    type=click.Path(path_type=Path),
    required=True,
    help="JSON Lines pairs (RewardBench or Auto-J format), or RewardBench 2 rows (chosen/rejected lists).",
)
@_OUT
@_FORCE
@in_memory_merge_options
@score_options
def evaluate(
    model: tuple[Path, ...], pairs_file: Path, out: Path | None, force: bool, quiet: bool, **options: Any
) -> None:
    """Pairwise preference accuracy of the reward model MODEL (a model folder), or its
    RewardBench 2 scores on a RewardBench 2 file.

    With several MODEL folders (a reward model and domain models) and --alpha or --weights, the
    merged reward model is built in memory and scored; no checkpoint is written.
    """
    from lazymerge.evaluation.run import evaluate_pairs, reported

    score, merge = score_value(options), in_memory_merge(model, options)
    _sweep_only(score)
    job = functools.partial(
        evaluate_pairs, _model(model, merge), pairs_file, merge=merge, score=score, **_stream_io(out, quiet)
    )
    result = reported(out, model, pairs_file, force, lambda: job(progress=None if not quiet else False))
    _show(result, quiet)


@command("bon")
@_MODELS
@click.option(
    "--candidates",
    type=click.Path(path_type=Path),
    required=True,
    help="JSON Lines: prompt, candidates, and correct or answer.",
)
@click.option("--n", "ns", default="2,4,8,16", show_default=True, help="Comma-separated N values.")
@_OUT
@_FORCE
@in_memory_merge_options
@score_options
def bon(
    model: tuple[Path, ...],
    candidates: Path,
    ns: str,
    out: Path | None,
    force: bool,
    quiet: bool,
    **options: Any,
) -> None:
    """Best-of-N: pick the highest-reward candidate (ties to the earliest) for each N.

    Several MODEL folders with --alpha or --weights: the merged reward model, built in memory.
    """
    from lazymerge.evaluation.run import evaluate_bon, reported

    n_values, score, merge = parse_ns(ns), score_value(options), in_memory_merge(model, options)
    _sweep_only(score)
    job = functools.partial(
        evaluate_bon,
        _model(model, merge),
        candidates,
        n_values,
        merge=merge,
        score=score,
        **_stream_io(out, quiet),
    )
    result = reported(out, model, candidates, force, lambda: job(progress=None if not quiet else False))
    _show(result, quiet)


def _sweep_only(score: Any) -> None:
    if score.lm_check:
        raise click.UsageError(
            "--lm-check is a sweep diagnostic (per point, on pair files): give it to sweep"
        )


def _stream_io(out: Path | None, quiet: bool) -> dict[str, Any]:
    """A layer-streamed pass's spill folder (beside the report) and where its note goes."""
    echo = (lambda line: None) if quiet else functools.partial(click.echo, err=True)
    return {"spill_dir": out.absolute().parent if out is not None else None, "echo": echo}


def _show(result: Any, quiet: bool) -> None:
    """The report's table on stdout, and what the scorer computed on stderr (as progress is)."""
    if quiet:
        return
    for line in (result.scored_with.conventions_line(), result.scored_with.computed_line()):
        if line is not None:
            click.echo(line, err=True)
    click.echo(result.format())


def _model(models: tuple[Path, ...], merge: MergeOptions | None) -> Path | tuple[Path, ...]:
    """What is scored: the one MODEL, or (merged in memory) all of them."""
    return models if merge is not None else models[0]


_PATH = click.Path(path_type=Path)


@command("sweep")
@click.argument("inputs", nargs=-1, required=True, type=_PATH)
@click.option(
    "-o",
    "--output",
    type=_PATH,
    default=Path("sweep"),
    show_default=True,
    help="Folder for results.jsonl, report.md, results.json and the plots.",
)
@together(*(field_option(SweepOptions, n) for n in SWEEP_FIELDS[:6]))
@click.option("--n", "ns", default="2,4,8,16", show_default=True, help="Best-of-N sizes.")
@together(*merge_flags("rm", "strict", "method", "base", "density", "seed", "max_memory", "tensor_weights"))
@field_option(MergeOptions, "max_points", help="Most points the grid may have (more is a usage error).")
@together(*(field_option(SweepOptions, n) for n in SWEEP_FIELDS[6:]))
@click.option("--json", "as_json", is_flag=True, help="Print results.json on stdout at the end.")
@score_options
def sweep(
    inputs: tuple[Path, ...], output: Path, ns: str, as_json: bool, quiet: bool, **options: Any
) -> None:
    """Score merged reward models of RM and DOMAIN models over a grid, in memory, resumably.

    Each point is merged in memory (no checkpoint written unless --write), scored on every
    evaluation, and appended to OUT/results.jsonl; rerunning continues where a crash stopped.
    Writes report.md, results.json and plots into OUT.
    """
    from lazymerge.evaluation.sweep import build_spec, run_sweep

    n_values, score = parse_ns(ns), score_value(options)
    chosen = SweepOptions(**{name: options.pop(name) for name in SWEEP_FIELDS})
    spec = build_spec(inputs, output, ns=n_values, load=score, **chosen.spec_keywords(), **options)
    executor = None
    if chosen.ray is not None:
        from lazymerge.evaluation.ray_sweep import ray_executor

        executor = ray_executor(*chosen.ray)
    echo = (lambda line: None) if quiet or as_json else functools.partial(click.echo, err=True)
    run = run_sweep(spec, echo=echo, executor=executor)
    if as_json:
        print_json(run.report)
    elif not quiet:
        click.echo(run.format(output))
