"""Commands that merge or read checkpoints: demo, run, plan, verify, inspect."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from lazymerge.cli.flags import merge_options, merge_request, print_json
from lazymerge.cli.group import command


@command("demo")
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path),
    help="Keep the demo files here instead of a temporary folder.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def demo(workdir: Path | None, as_json: bool) -> None:
    """Build two small Llama-shaped checkpoints, merge them streaming, verify and report."""
    from lazymerge.demo import run_demo

    run_demo(workdir, as_json=as_json, echo=click.echo)


@command("run")
@merge_options
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no report.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def run(
    inputs: tuple[Path, ...], output: Path | None, force: bool, quiet: bool, as_json: bool, **options: Any
) -> None:
    """Merge INPUTS (.safetensors/.bin files, index files or model folders) into one checkpoint.

    INPUTS may instead be one mergekit config (CONFIG.yml): its models, method and parameters.

    With a reward model among model-folder INPUTS (config.json architectures ending in
    ForSequenceClassification), follows DogeRM: backbone averaged, reward head kept, lm_head
    dropped, embeddings matched by token; the output is the reward model.
    """
    from lazymerge.merge.api import merge

    inputs, value = merge_request(inputs, options)
    report = merge(inputs, output, value, force=force, progress=None if not quiet else False)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        print_json(report.to_dict())
    elif not quiet:
        click.echo(report.format())


@command("plan")
@merge_options
@click.option("--force", is_flag=True, help="Plan as if replacing an existing output (as run --force).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(inputs: tuple[Path, ...], output: Path | None, force: bool, as_json: bool, **options: Any) -> None:
    """Show what a merge would do, from headers alone (no tensor data is read).

    It applies every check `run` applies, so a plan is refused exactly when the run would be.
    """
    from lazymerge.merge.api import prepare

    inputs, value = merge_request(inputs, options)
    checkpoints, merge_plan = prepare(inputs, output, value, force=force)
    for ckpt in checkpoints:
        ckpt.close()
    if not as_json:
        click.echo(merge_plan.describe())
        click.echo(f"predicted peak resident memory about {merge_plan.predicted_peak_rss / 1e9:.2f} GB")
        return
    # streamed: for 600,000 tensors the whole text and its pieces at once took 500 MB more
    for chunk in json.JSONEncoder(indent=2).iterencode(merge_plan.to_dict()):
        sys.stdout.write(chunk)
    sys.stdout.write("\n")


@command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--finite", is_flag=True, help="Also check every floating-point tensor for NaN and Inf.")
def verify(path: Path, finite: bool) -> None:
    """Validate headers, index and sizes, and recompute the data hashes lazymerge recorded."""
    from lazymerge.verify import verify_checkpoint

    click.echo(verify_checkpoint(path, finite=finite).format())


@command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(path: Path, as_json: bool) -> None:
    """List the tensors of a checkpoint, validating every header."""
    from lazymerge.inspect import inspect_checkpoint

    click.echo(inspect_checkpoint(path, as_json=as_json))
