"""Commands that score reward models: eval, bon, sweep."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import click

from lazymerge.cli.flags import (
    TENSOR_WEIGHTS,
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
from lazymerge.errors import OptionError
from lazymerge.options import MergeOptions

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
@click.option("--alpha", help="One domain model: its weights, START:STOP:STEP or A,B,C (default 0:1:0.1).")
@click.option(
    "--grid",
    "grid_step",
    type=float,
    help="Several domain models: every weight vector on the simplex with this step.",
)
@click.option(
    "--weights",
    "weight_vectors",
    multiple=True,
    help="An explicit weight vector, one weight per input (repeatable).",
)
@click.option(
    "--pairs",
    "pair_files",
    multiple=True,
    type=_PATH,
    help="Test pairs (RewardBench, Auto-J or RewardBench 2 JSONL; repeatable).",
)
@click.option("--val-pairs", type=_PATH, help="Validation pairs: the point is chosen on them.")
@click.option(
    "--candidates",
    "candidate_files",
    multiple=True,
    type=_PATH,
    help="Best-of-N candidates (JSONL; repeatable).",
)
@click.option("--n", "ns", default="2,4,8,16", show_default=True, help="Best-of-N sizes.")
@together(*merge_flags("rm", "strict", "method", "base", "density", "seed", "max_memory"))
@click.option(
    "--tensor-weights",
    multiple=True,
    type=TENSOR_WEIGHTS,
    metavar="FILTER=W1,W2",
    help="Tensors whose name contains FILTER take these weights (one per input) at every point, as "
    "mergekit's filters do; first match wins (repeatable). E.g. embed_tokens=1,0 keeps the reward "
    "model's embeddings.",
)
@field_option(
    MergeOptions,
    "max_points",
    help="Most points the grid may have (a larger grid is a usage error, before any work).",
)
@click.option(
    "--write",
    is_flag=True,
    help="Also write each merged checkpoint under OUT/models/ and score it from disk.",
)
@click.option(
    "--restart", is_flag=True, help="Discard the results in OUT made with other inputs or settings."
)
@click.option(
    "--rehash",
    is_flag=True,
    help="Hash every weights file: record their SHA-256, or prove on resume that moved or touched weights hold the same data (reads all weights once).",
)
@click.option(
    "--resident",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Read the inputs into RAM once and rewrite one model per point (auto: when they fit); same rewards.",
)
@click.option("--json", "as_json", is_flag=True, help="Print results.json on stdout at the end.")
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="auto",
    help="Run each point as a task on a Ray cluster: auto (this machine's cluster) or ADDRESS (host:port).",
)
@click.option(
    "--ray-gpus",
    type=click.FloatRange(min=0, max=1024),
    help="GPUs per point on Ray (default: 1 with --device cuda, else 0).",
)
@click.option("--ray-cpus", type=click.FloatRange(min=0, max=1024), help="CPUs per point on Ray (default 1).")
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
    ray = _ray_flags(options.pop("ray_address"), options.pop("ray_gpus"), options.pop("ray_cpus"))
    if ray is not None and options["resident"] == "on":
        raise OptionError("--resident on: each Ray task builds its own point; use --resident auto or off")
    spec = build_spec(inputs, output, ns=n_values, load=score, **options)
    executor = None
    if ray is not None:
        from lazymerge.evaluation.ray_sweep import ray_executor

        executor = ray_executor(*ray)
    echo = (lambda line: None) if quiet or as_json else functools.partial(click.echo, err=True)
    run = run_sweep(spec, echo=echo, executor=executor)
    if as_json:
        print_json(run.report)
    elif not quiet:
        click.echo(run.format(output))


def _ray_flags(
    address: str | None, gpus: float | None, cpus: float | None
) -> tuple[str, float | None, float] | None:
    """(address, GPUs, CPUs per point) of `--ray`, or None; checked before any work."""
    for name, value in (("--ray-gpus", gpus), ("--ray-cpus", cpus)):
        if value is not None and not math.isfinite(value):
            raise OptionError(f"{name} {value}: not a finite number")
    if address is None:
        if gpus is not None or cpus is not None:
            raise OptionError("--ray-gpus and --ray-cpus need --ray")
        return None
    return address, gpus, 1.0 if cpus is None else cpus
