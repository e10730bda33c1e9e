"""`lazymerge diagnose`: the task vectors of models against their base (see `diagnostics`)."""

from __future__ import annotations

from pathlib import Path

import click

from lazymerge.cli.flags import print_json
from lazymerge.cli.group import command

_PATH = click.Path(path_type=Path)


@command("diagnose")
@click.argument("models", nargs=-1, required=True, type=_PATH)
@click.option("--base", required=True, type=_PATH, help="The model the others were fine-tuned from.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def diagnose(models: tuple[Path, ...], base: Path, as_json: bool) -> None:
    """Task vectors of MODELS (a reward model, domain models) against BASE: per layer group, the
    norm of each model's delta relative to the base's and the cosine between the deltas; one
    streaming pass over the inputs, one chunk of each tensor in memory at a time."""
    from lazymerge.evaluation.diagnostics import task_vectors

    report = task_vectors(models, base)
    if as_json:
        print_json(report.to_dict())
    else:
        click.echo(report.format())
