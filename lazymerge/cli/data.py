"""Commands that read or rewrite evaluation data: convert."""

from __future__ import annotations

from pathlib import Path

import click

from lazymerge.cli.group import command


@command("convert")
@click.argument("source")
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="The JSON Lines file to write."
)
@click.option(
    "--kind",
    type=click.Choice(["pairs", "rewardbench2", "candidates"]),
    default="pairs",
    show_default=True,
    help="pairs: preference pairs or RewardBench 2 rows, as the source holds; candidates: best-of-N sets.",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if lazymerge wrote it.")
def convert(source: str, output: Path, kind: str, force: bool) -> None:
    """Rewrite SOURCE (a JSON Lines, JSON or parquet file, or a Hugging Face dataset id in the
    local cache: ORG/NAME[@REVISION][:[CONFIG:]SPLIT]) as lazymerge's JSON Lines, every row
    checked as eval, bon and sweep check it."""
    from lazymerge.evaluation.convert import convert as run

    click.echo(run(source, output, kind, force).format(), err=True)
