"""The pre-flight command: check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from lazymerge.cli.flags import merge_options, merge_request, print_json
from lazymerge.cli.group import command, one_line


@command("check")
@merge_options
@click.option(
    "--pairs",
    "pair_files",
    multiple=True,
    help="A pair file or dataset id eval or sweep will read (repeatable).",
)
@click.option(
    "--candidates",
    "candidate_files",
    multiple=True,
    help="A best-of-N file bon or sweep will read (repeatable).",
)
@click.option("--force", is_flag=True, help="Check as if replacing an existing output (as run --force).")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check(
    inputs: tuple[Path, ...],
    output: Path | None,
    pair_files: tuple[str, ...],
    candidate_files: tuple[str, ...],
    force: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Find in seconds what run, plan, eval or sweep would refuse: headers, shapes, heads,
    tokenizers, chat templates, the output, predicted memory and data files (no tensor data
    read, nothing executed). With --base, one more section: the task vectors of the inputs
    against the base per layer group (one streaming pass over the tensors). One line per
    finding; exit 1 when any is an error."""
    from lazymerge.check import CheckRequest, run_check

    inputs, value = merge_request(inputs, options)
    request = CheckRequest(tuple(map(str, inputs)), value, output, force, pair_files, candidate_files)
    report = run_check(request)
    if as_json:
        print_json(report.to_dict())
    else:
        click.echo(report.format())
    if report.errors:
        first = report.errors[0]
        raise click.ClickException(one_line(f"{first.subject}: {first.message}"))
