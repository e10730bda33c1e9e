"""The `lazymerge` command group: its commands in the order of the job, each with a whole
one-line summary and examples, and one rule for errors.

Library errors (`LazyMergeError`) become one line `Error: ...` and exit status 1; usage mistakes
(`OptionError`, click's own) exit 2; Ctrl-C exits 130 and SIGTERM 143; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from lazymerge._version import __version__
from lazymerge.errors import LazyMergeError, OptionError

F = TypeVar("F", bound=Callable[..., Any])


class OptionUsageError(click.ClickException):
    """A wrong option value: one line `Error: ...`, exit status 2 (a usage mistake)."""

    exit_code = 2


#: Each command, in the order of the job: its one-line summary (the group's --help shows it
#: whole), then its examples, each `command  # what it shows`.
_COMMANDS: dict[str, str] = {
    "demo": """Build two small checkpoints, merge them streaming, verify, report.
lazymerge demo
lazymerge demo --dir /tmp/lazymerge-demo  # keep the files""",
    "check": """Find what a merge, eval or sweep would refuse, in seconds, before any work.
lazymerge check rm/ metamath/ --alpha 0.3 -o rm-math/  # before lazymerge run
lazymerge check rm/ metamath/ --pairs allenai/reward-bench:filtered  # before a sweep
lazymerge check merge.yml --json  # a mergekit recipe""",
    "run": """Merge two checkpoints, or a reward model with a domain model (DogeRM).
lazymerge run a.safetensors b.safetensors --alpha 0.3 -o merged.safetensors  # two files, 0.7/0.3
lazymerge run rm/ metamath/ --alpha 0.3 -o rm-math/  # DogeRM: reward model + domain model
lazymerge run merge.yml -o merged/  # a mergekit YAML recipe
lazymerge run base/ math/ code/ --method ties --base base/ --weights 0.5,0.5 -o ties/  # TIES against a base""",
    "plan": """Show a merge's tensors, files and memory from headers alone.
lazymerge plan rm/ metamath/ --alpha 0.3 -o rm-math/  # what run would do
lazymerge plan merge.yml --json  # the plan as JSON""",
    "verify": """Re-validate a checkpoint and recompute lazymerge's data hashes.
lazymerge verify merged/
lazymerge verify merged.safetensors --finite  # also scan for NaN and Inf""",
    "inspect": """List a checkpoint's tensors, validating every header.
lazymerge inspect model.safetensors
lazymerge inspect rm/ --json  # a model folder, as JSON""",
    "eval": """Pairwise or RewardBench 2 accuracy of a reward model, or of a merge.
lazymerge eval rm/ --pairs test.jsonl  # one reward model
lazymerge eval rm/ metamath/ --alpha 0.3 --pairs test.jsonl --out r.json  # merged in memory
lazymerge eval rm/ --pairs rb2.jsonl --device cuda --quant 4bit  # RewardBench 2, 4-bit""",
    "bon": """Best-of-N accuracy of a reward model (or an in-memory merge).
lazymerge bon rm/ --candidates gsm8k-16.jsonl --n 1,4,16
lazymerge bon rm/ metamath/ --alpha 0.3 --candidates gsm8k-16.jsonl --out bon.json  # merged in memory""",
    "diagnose": """Task vectors of models against their base: relative norms and cosines per layer group.
lazymerge diagnose rm/ metamath/ --base llama-2-7b/  # how far and how alike they moved
lazymerge diagnose rm/ math/ code/ --base base/ --json  # as JSON""",
    "convert": """Rewrite pairs, RewardBench 2 rows or candidates as lazymerge's JSON Lines.
lazymerge convert allenai/reward-bench:filtered -o rewardbench.jsonl  # a cached dataset
lazymerge convert trl-pairs.parquet -o pairs.jsonl  # TRL's preference format
lazymerge convert gsm8k-16.json --kind candidates -o gsm8k-16.jsonl  # best-of-N sets""",
    "sweep": """Score merged reward models over a lambda grid, lazily and resumably.
lazymerge sweep rm/ metamath/ --alpha 0:1:0.1 --pairs test.jsonl --val-pairs val.jsonl -o sweep/
lazymerge sweep rm/ math/ code/ --grid 0.25 --pairs test.jsonl -o grid/  # two domains
lazymerge sweep rm/ metamath/ --alpha 0:1:0.1 --pairs test.jsonl -o sweep/ --ray auto  # on a Ray cluster""",
}


def _summary_and_examples(text: str) -> tuple[str, list[tuple[str, str]]]:
    summary, *rows = text.splitlines()
    return summary, [(c.strip(), note.strip()) for c, _, note in (row.partition("  # ") for row in rows)]


#: Each command's (summary, [(example, what it shows)]).
COMMAND_HELP = {name: _summary_and_examples(text) for name, text in _COMMANDS.items()}


def command_help(name: str) -> dict[str, Any]:
    """`main.command` keywords for `name`: its full short help, and its examples as the epilog."""
    summary, examples = COMMAND_HELP[name]
    width = max(len(c) for c, _ in examples)
    lines = [f"  {c:<{width}}  # {note}" if note else f"  {c}" for c, note in examples]
    return {"name": name, "short_help": summary, "epilog": "\b\nExamples:\n" + "\n".join(lines)}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: temporaries removed, finished work kept."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


def one_line(message: object) -> str:
    """A message as one line: newlines (say, in a file name) shown as \\n."""
    return str(message).replace("\r", "\\r").replace("\n", "\\n")


def _as_click_error(exc: Exception) -> click.ClickException:
    """The one line (and exit status) an error becomes."""
    if isinstance(exc, OptionError):
        return OptionUsageError(one_line(exc))
    if isinstance(exc, LazyMergeError):
        return click.ClickException(one_line(exc))
    if isinstance(exc, MemoryError):
        return click.ClickException(
            "out of memory; lower --max-memory or --batch-size, or free memory (see lazymerge plan)"
        )
    if isinstance(exc, OSError):  # the environment: permissions, full disks, vanished files
        where = f"{exc.filename}: " if exc.filename else ""
        return click.ClickException(one_line(f"{where}{exc.strerror or exc}"))
    # a defect: still one line, the traceback behind --debug
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return click.ClickException(
        f"unexpected {type(exc).__name__}: {first} (a lazymerge defect; rerun with --debug and report it)"
    )


def reports_errors(fn: F) -> F:
    """Add --debug; turn OptionError into a one-line usage error (exit 2) and any other
    LazyMergeError into one line (exit 1); Ctrl-C exits 130, SIGTERM 143."""

    @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool, **kwargs: Any) -> Any:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if debug:
                raise
            raise _as_click_error(exc) from None
        except KeyboardInterrupt as exc:
            if debug:
                raise
            what = "terminated" if isinstance(exc, _Terminated) else "interrupted"
            click.echo(
                f"Error: {what}; temporaries removed, nothing half-written (finished sweep points are kept)",
                err=True,
            )
            sys.exit(143 if isinstance(exc, _Terminated) else 130)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


class _OneLineUsageGroup(click.Group):
    """click's own usage errors (a missing argument, a bad choice) as one line `Error: ...`,
    exit 2, like every other option mistake; `--help` is where the usage text lives."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """In the order of the job (`COMMAND_HELP`), not alphabetically."""
        return [name for name in COMMAND_HELP if name in self.commands]

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            if isinstance(exc, OptionUsageError):
                raise
            command = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
            raise OptionUsageError(f"{command}{exc.format_message()} (see --help)") from None


@click.group(cls=_OneLineUsageGroup)
@click.version_option(__version__, prog_name="lazymerge")
def main() -> None:
    """Merge model checkpoints tensor by tensor, streaming, in bounded memory."""


def command(name: str) -> Callable[[F], F]:
    """`main.command` for `name`, with its summary and examples, and the error rule applied."""

    def wrap(fn: F) -> F:
        return main.command(**command_help(name))(reports_errors(fn))  # type: ignore[return-value]

    return wrap
