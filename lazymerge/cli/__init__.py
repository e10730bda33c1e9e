"""The `lazymerge` command line: a thin shell over the library.

`group` holds the command group, its help and the error rule; `flags` generates the options from
`MergeOptions` and `ScoreOptions` and builds those values once; `merge`, `evaluate` and
`diagnose` hold the commands, each a few lines that build options, call the library and print.
"""

from __future__ import annotations

from lazymerge.cli import check, data, diagnose, evaluate, merge  # noqa: F401 (registers the commands)
from lazymerge.cli.group import COMMAND_HELP, main

__all__ = ["COMMAND_HELP", "main"]
