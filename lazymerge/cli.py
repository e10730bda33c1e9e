"""The `lazymerge` command line: a thin shell over the library.

Library errors (`LazyMergeError`) become one line `Error: ...` and exit status 1; usage mistakes
exit 2 (click's convention); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import math
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from lazymerge._version import __version__
from lazymerge.errors import LazyMergeError, OptionError
from lazymerge.methods import METHODS
from lazymerge.options import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_MEMORY_TEXT,
    DEFAULT_MAX_POINTS,
    DEFAULT_SHARD_SIZE,
    MAX_POINTS,
    MergeOptions,
    parse_alpha,
    parse_size,
    parse_weights,
)

F = TypeVar("F", bound=Callable[..., Any])


class OptionUsageError(click.ClickException):
    """A wrong option value: one line `Error: ...`, exit status 2 (a usage mistake)."""

    exit_code = 2


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except OptionError as exc:
            self.fail(str(exc), param, ctx)


#: Each command's one-line summary (the group's --help shows it whole) and its examples.
COMMAND_HELP: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "demo": (
        "Build two small checkpoints, merge them streaming, verify, report.",
        [
            ("lazymerge demo", ""),
            ("lazymerge demo --dir /tmp/lazymerge-demo", "keep the files"),
        ],
    ),
    "run": (
        "Merge two checkpoints, or a reward model with a domain model (DogeRM).",
        [
            (
                "lazymerge run a.safetensors b.safetensors --alpha 0.3 -o merged.safetensors",
                "two files, 0.7/0.3",
            ),
            ("lazymerge run rm/ metamath/ --alpha 0.3 -o rm-math/", "DogeRM: reward model + domain model"),
            ("lazymerge run merge.yml -o merged/", "a mergekit YAML recipe"),
            (
                "lazymerge run base/ math/ code/ --method ties --base base/ --weights 0.5,0.5 -o ties/",
                "TIES against a base",
            ),
        ],
    ),
    "plan": (
        "Show a merge's tensors, files and memory from headers alone.",
        [
            ("lazymerge plan rm/ metamath/ --alpha 0.3 -o rm-math/", "what run would do"),
            ("lazymerge plan merge.yml --json", "the plan as JSON"),
        ],
    ),
    "verify": (
        "Re-validate a checkpoint and recompute lazymerge's data hashes.",
        [
            ("lazymerge verify merged/", ""),
            ("lazymerge verify merged.safetensors --finite", "also scan for NaN and Inf"),
        ],
    ),
    "inspect": (
        "List a checkpoint's tensors, validating every header.",
        [
            ("lazymerge inspect model.safetensors", ""),
            ("lazymerge inspect rm/ --json", "a model folder, as JSON"),
        ],
    ),
    "eval": (
        "Pairwise or RewardBench 2 accuracy of a reward model, or of a merge.",
        [
            ("lazymerge eval rm/ --pairs test.jsonl", "one reward model"),
            ("lazymerge eval rm/ metamath/ --alpha 0.3 --pairs test.jsonl --out r.json", "merged in memory"),
            ("lazymerge eval rm/ --pairs rb2.jsonl --device cuda --quant 4bit", "RewardBench 2, 4-bit"),
        ],
    ),
    "bon": (
        "Best-of-N accuracy of a reward model (or an in-memory merge).",
        [
            ("lazymerge bon rm/ --candidates gsm8k-16.jsonl --n 1,4,16", ""),
            (
                "lazymerge bon rm/ metamath/ --alpha 0.3 --candidates gsm8k-16.jsonl --out bon.json",
                "merged in memory",
            ),
        ],
    ),
    "sweep": (
        "Score merged reward models over a lambda grid, lazily and resumably.",
        [
            (
                "lazymerge sweep rm/ metamath/ --alpha 0:1:0.1 --pairs test.jsonl --val-pairs val.jsonl -o sweep/",
                "",
            ),
            ("lazymerge sweep rm/ math/ code/ --grid 0.25 --pairs test.jsonl -o grid/", "two domains"),
            (
                "lazymerge sweep rm/ metamath/ --alpha 0:1:0.1 --pairs test.jsonl -o sweep/ --ray auto",
                "on a Ray cluster",
            ),
        ],
    ),
}


def _command(name: str) -> dict[str, Any]:
    """`main.command` keywords for `name`: its full short help, and its examples as the epilog."""
    summary, examples = COMMAND_HELP[name]
    width = max(len(c) for c, _ in examples)
    lines = [f"  {c:<{width}}  # {note}" if note else f"  {c}" for c, note in examples]
    return {"name": name, "short_help": summary, "epilog": "\b\nExamples:\n" + "\n".join(lines)}


#: --method's help: every registered method, so --help is the reference.
METHOD_HELP = f"Merge method: {', '.join(METHODS)}."


#: The merge flags that run, plan, eval, bon and sweep share, each declared once here.
_MERGE_FLAGS: dict[str, dict[str, Any]] = {
    "method": {"decls": ("--method",), "default": "linear", "show_default": True, "help": METHOD_HELP},
    "base": {
        "decls": ("--base",),
        "type": click.Path(path_type=Path),
        "help": "Base model for task_arithmetic, ties, dare_linear, dare_ties.",
    },
    "density": {
        "decls": ("--density",),
        "type": float,
        "default": 0.5,
        "show_default": True,
        "help": "Fraction of each task vector kept (ties, dare_*).",
    },
    "seed": {
        "decls": ("--seed",),
        "type": int,
        "default": 0,
        "show_default": True,
        "help": "Seed of the DARE drop masks.",
    },
    "rm": {
        "decls": ("--rm", "rm"),
        "type": int,
        "help": "Index (from 0) of the reward model among the models; default: found from config.json.",
    },
    "strict": {
        "decls": ("--strict",),
        "is_flag": True,
        "help": "Refuse to match embedding rows by position when tokenizer files are missing.",
    },
    "max-memory": {
        "decls": ("--max-memory",),
        "type": SizeType(),
        "default": DEFAULT_MAX_MEMORY,
        "show_default": DEFAULT_MAX_MEMORY_TEXT,
        "help": "Working-memory budget for tensor data in flight (per merge).",
    },
}


def merge_flag(name: str) -> Callable[[F], F]:
    """The click option of one shared merge flag (`_MERGE_FLAGS`)."""
    spec = dict(_MERGE_FLAGS[name])
    return click.option(*spec.pop("decls"), **spec)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: temporaries removed, finished work kept."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


def _one_line(message: object) -> str:
    """A message as one line: newlines (say, in a file name) shown as \\n."""
    return str(message).replace("\r", "\\r").replace("\n", "\\n")


def reports_errors(fn: F) -> F:
    """Add --debug; turn OptionError into a one-line usage error (exit 2) and any other
    LazyMergeError into one line (exit 1); Ctrl-C exits 130, SIGTERM 143."""

    @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool, **kwargs: Any) -> Any:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except OptionError as exc:
            if debug:
                raise
            raise OptionUsageError(_one_line(exc)) from None
        except LazyMergeError as exc:
            if debug:
                raise
            raise click.ClickException(_one_line(exc)) from None
        except MemoryError:
            if debug:
                raise
            raise click.ClickException(
                "out of memory; lower --max-memory or --batch-size, or free memory (see lazymerge plan)"
            ) from None
        except OSError as exc:  # the environment: permissions, full disks, vanished files
            if debug:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(_one_line(f"{where}{exc.strerror or exc}")) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # a defect: still one line, the traceback behind --debug
            if debug:
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {first} (a lazymerge defect; rerun with --debug and report it)"
            ) from None
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


def merge_options(fn: F) -> F:
    options = [
        click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path)),
        click.option(
            "-o",
            "--output",
            type=click.Path(path_type=Path),
            help="Output .safetensors file or folder. Default: merged.safetensors (file inputs) or merged/ (folders).",
        ),
        click.option(
            "--alpha",
            help="Weight L of the second of two inputs: (1 - L) * A + L * B (with a reward model: the "
            "domain model's weight). Default 0.5. START:STOP:STEP or A,B,C sweeps, one output folder per value.",
        ),
        click.option(
            "--max-points",
            type=click.IntRange(min=1, max=MAX_POINTS),
            default=DEFAULT_MAX_POINTS,
            show_default=True,
            help="Most values one --alpha sweep may have.",
        ),
        merge_flag("base"),
        merge_flag("density"),
        merge_flag("seed"),
        click.option(
            "--check-finite",
            is_flag=True,
            help="Stop when an input's NaN or Inf reaches the output (default: warn).",
        ),
        click.option("--weights", help="Comma-separated weight per input, e.g. 0.5,0.3,0.2."),
        merge_flag("method"),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
            default="auto",
            show_default=True,
            help="Output dtype of float tensors (auto: the first input's).",
        ),
        click.option(
            "--shard-size",
            type=SizeType(),
            default=DEFAULT_SHARD_SIZE,
            show_default="5GB",
            help="Largest output shard (folder outputs).",
        ),
        merge_flag("rm"),
        merge_flag("strict"),
        merge_flag("max-memory"),
        click.option(
            "--direct-io/--buffered-io",
            default=True,
            show_default=True,
            help="Read inputs not already in the page cache and write the output with direct "
            "I/O (O_DIRECT), which spares the CPU the page-cache copies; --buffered-io goes "
            "through the page cache. Filesystems without O_DIRECT are always buffered.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def merge_options_value(
    alpha: str | None, weights: str | None, base: Path | None, **options: Any
) -> MergeOptions:
    """The frozen options value from `merge_options`' flags (OptionError on a wrong value)."""
    max_points = options["max_points"]
    return MergeOptions(
        alphas=parse_alpha(alpha, max_points) if alpha is not None else None,
        weights=parse_weights(weights) if weights is not None else None,
        base=base,
        **options,
    )


#: The flags a mergekit config sets itself (method, models, weights, density, dtype).
CONFIG_OWNED = ("alpha", "weights", "base", "method", "density", "dtype", "max_points")


def merge_request(inputs: tuple[Path, ...], options: dict[str, Any]) -> tuple[tuple[Path, ...], MergeOptions]:
    """(inputs, options) of `run` and `plan`: INPUTS and flags, or one mergekit config (.yml/.yaml)
    whose notes go to stderr."""
    configs = [p for p in inputs if p.name.lower().endswith((".yml", ".yaml"))]
    if not configs:
        return inputs, merge_options_value(**options)
    if len(inputs) != 1:
        raise OptionError(f"{configs[0]}: a mergekit config is the only input (its models are listed in it)")
    ctx = click.get_current_context()
    given = [
        name
        for name in CONFIG_OWNED
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
    ]
    if given:
        raise OptionError(
            f"--{given[0].replace('_', '-')}: {inputs[0]} sets the method, models, weights, density and "
            "dtype; edit the config instead"
        )
    from lazymerge.mergekit_config import read_mergekit_config

    recipe = read_mergekit_config(inputs[0], **{k: v for k, v in options.items() if k not in CONFIG_OWNED})
    for note in recipe.notes:
        click.echo(f"note: {_one_line(note)}", err=True)
    return recipe.inputs, recipe.options


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


@main.command(**_command("run"))
@merge_options
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no report.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@reports_errors
def run(
    inputs: tuple[Path, ...], output: Path | None, force: bool, quiet: bool, as_json: bool, **options: Any
) -> None:
    """Merge INPUTS (.safetensors/.bin files, index files or model folders) into one checkpoint.

    INPUTS may instead be one mergekit config (CONFIG.yml): its models, method and parameters.

    With a reward model among model-folder INPUTS (config.json architectures ending in
    ForSequenceClassification), follows DogeRM: backbone averaged, reward head kept, lm_head
    dropped, embeddings matched by token; the output is the reward model.
    """
    from lazymerge.api import merge

    inputs, value = merge_request(inputs, options)
    report = merge(inputs, output, value, force=force, progress=None if not quiet else False)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    elif not quiet:
        click.echo(report.format())


@main.command(**_command("plan"))
@merge_options
@click.option("--force", is_flag=True, help="Plan as if replacing an existing output (as run --force).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@reports_errors
def plan(inputs: tuple[Path, ...], output: Path | None, force: bool, as_json: bool, **options: Any) -> None:
    """Show what a merge would do, from headers alone (no tensor data is read).

    It applies every check `run` applies, so a plan is refused exactly when the run would be.
    """
    from lazymerge.api import prepare

    inputs, value = merge_request(inputs, options)
    checkpoints, merge_plan = prepare(inputs, output, value, force=force)
    for ckpt in checkpoints:
        ckpt.close()
    if as_json:
        # streamed: for 600,000 tensors the whole text and its pieces at once took 500 MB more
        for chunk in json.JSONEncoder(indent=2).iterencode(merge_plan.to_dict()):
            sys.stdout.write(chunk)
        sys.stdout.write("\n")
    else:
        click.echo(merge_plan.describe())
        click.echo(f"predicted peak resident memory about {merge_plan.predicted_peak_rss / 1e9:.2f} GB")


@main.command(**_command("inspect"))
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@reports_errors
def inspect(path: Path, as_json: bool) -> None:
    """List the tensors of a checkpoint, validating every header."""
    from lazymerge.inspect import inspect_checkpoint

    click.echo(inspect_checkpoint(path, as_json=as_json))


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", value):
        raise click.BadParameter(f"{value!r}: choose cpu, cuda or cuda:N")
    return value


def _check_chat_template(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from lazymerge.evaluation.chat_templates import valid_choice

    if value is not None and not valid_choice(value):
        raise click.BadParameter(f"{value!r}: choose llama2, chatml or a FILE.jinja")
    return value


def eval_options(fn: F) -> F:
    options = [
        click.option(
            "--device", default="cpu", show_default=True, callback=_check_device, help="cpu, cuda or cuda:N."
        ),
        click.option(
            "--compute-dtype",
            "--dtype",
            "dtype",
            type=click.Choice(["float32", "bfloat16", "float16"]),
            default="float32",
            show_default=True,
            help="The dtype the reward model computes in, without --quant (--dtype is the same "
            "option; in run and plan, --dtype is the output's dtype).",
        ),
        click.option(
            "--quant",
            type=click.Choice(["4bit", "8bit"]),
            help="Load with bitsandbytes: 4bit = NF4 with bf16 compute (also on CPU); the reward head stays full precision.",
        ),
        click.option(
            "--double-quant",
            is_flag=True,
            help="4-bit double quantization (saves about 0.4 bits per parameter).",
        ),
        click.option(
            "--max-length",
            type=click.IntRange(min=1),
            default=2048,
            show_default=True,
            help="Longest input in tokens; longer inputs lose tokens from the left.",
        ),
        click.option(
            "--system-prompt",
            default="none",
            show_default=True,
            help="none, llama2 (Meta's default LLaMA-2 system prompt, as DogeRM used) or the text itself.",
        ),
        click.option(
            "--chat-template",
            callback=_check_chat_template,
            help="llama2, chatml or FILE.jinja: format with this chat template instead of (or, without one, "
            "as) the tokenizer's; rendered in lazymerge's bounded sandbox.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="Texts per forward pass (padded to the longest; more is faster and takes more memory).",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress and no table."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _load_kwargs(
    device: str,
    dtype: str,
    quant: str | None,
    double_quant: bool,
    max_length: int,
    system_prompt: str,
    batch_size: int,
    chat_template: str | None,
) -> dict[str, Any]:
    from lazymerge.evaluation.chat_templates import load_chat_template
    from lazymerge.evaluation.rewards import system_prompt_text

    system = system_prompt_text(system_prompt)
    return {
        "device": device,
        "dtype": dtype,
        "quant": quant,
        "double_quant": double_quant,
        "max_length": max_length,
        "system_prompt": system,
        "batch_size": batch_size,
        # read and checked here, before any model or data is opened
        "chat_template": load_chat_template(chat_template, system is not None) if chat_template else None,
    }


LOAD_KEYS = (
    "device",
    "dtype",
    "quant",
    "double_quant",
    "max_length",
    "system_prompt",
    "batch_size",
    "chat_template",
)


def _split_eval_options(
    models: tuple[Path, ...], options: dict[str, Any]
) -> tuple[dict[str, Any], MergeOptions | None]:
    """(load settings, in-memory merge options or None) from eval's and bon's flags."""
    load = _load_kwargs(**{k: options.pop(k) for k in LOAD_KEYS})
    return load, _in_memory_merge(models, **options)


def _parse_ns(ns: str) -> list[int]:
    try:
        n_values = [int(n) for n in ns.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{ns!r} is not a comma-separated list of integers", param_hint="--n"
        ) from None
    if any(n < 1 or n > 100_000 for n in n_values):
        raise click.BadParameter(f"{ns!r}: every N must be from 1 to 100000", param_hint="--n")
    return sorted(set(n_values))


def _read_paths(models: Sequence[Path]) -> list[Path]:
    """What is read for each MODEL (a Hugging Face id: its snapshot in the local cache)."""
    from lazymerge.io.hub_cache import input_paths

    return input_paths(models)


def _scored_report(
    out: Path | None, inputs: Sequence[Path], force: bool, score: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Reserve the report destination (locked and checked under the output rule before any
    scoring), score, write the report atomically and record it in its folder's manifest, so a
    later --force knows it as lazymerge's (and an edited copy as the user's)."""
    if out is None:
        return score()
    from lazymerge.io.outputs import OutputFiles

    with OutputFiles([out], inputs=inputs, force=force) as files:
        result = score()
        files.write({out: _report_bytes(result)})
        return result


def _report_bytes(doc: dict[str, Any]) -> bytes:
    """A report as strict JSON (a NaN is a defect upstream, never written)."""
    return (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode("utf-8")


def in_memory_merge_options(fn: F) -> F:
    """Options of a merge built in memory when several MODEL folders are given."""
    options = [
        click.option("--alpha", help="With a reward model and one domain model: the domain model's weight."),
        click.option("--weights", help="One weight per MODEL, e.g. 0.6,0.3,0.1."),
        merge_flag("rm"),
        merge_flag("strict"),
        merge_flag("method"),
        merge_flag("base"),
        merge_flag("density"),
        merge_flag("seed"),
        merge_flag("max-memory"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _in_memory_merge(
    models: tuple[Path, ...], alpha: str | None, weights: str | None, **options: Any
) -> MergeOptions | None:
    """None for one MODEL (scored as it is); the merge's options for several (merged in memory)."""
    if len(models) == 1:
        if alpha is not None or weights is not None:
            raise OptionError(
                "--alpha and --weights merge several MODEL folders in memory; give the reward model and domain models"
            )
        return None
    value = MergeOptions(
        alphas=parse_alpha(alpha, 1) if alpha is not None else None,
        weights=parse_weights(weights) if weights is not None else None,
        **options,
    )
    value.check_inputs(len(models))
    return value


@main.command(**_command("eval"))
@click.argument("model", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--pairs",
    "pairs_file",
    type=click.Path(path_type=Path),
    required=True,
    help="JSON Lines pairs (RewardBench or Auto-J format), or RewardBench 2 rows (chosen/rejected lists).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Write the results (accuracy, subsets, sections, per-pair rewards) as JSON.",
)
@click.option("--force", is_flag=True, help="Replace an existing --out report that lazymerge wrote.")
@in_memory_merge_options
@eval_options
@reports_errors
def evaluate(
    model: tuple[Path, ...], pairs_file: Path, out: Path | None, force: bool, quiet: bool, **options: Any
) -> None:
    """Pairwise preference accuracy of the reward model MODEL (a model folder), or its
    RewardBench 2 scores on a RewardBench 2 file.

    With several MODEL folders (a reward model and domain models) and --alpha or --weights, the
    merged reward model is built in memory and scored; no checkpoint is written.
    """
    from lazymerge.evaluation.run import evaluate_pairs, format_pair_table

    load, merge_value = _split_eval_options(model, options)
    result = _scored_report(
        out,
        [*_read_paths(model), pairs_file],
        force,
        lambda: evaluate_pairs(
            model if merge_value is not None else model[0],
            pairs_file,
            merge=merge_value,
            progress=None if not quiet else False,
            **load,
        ),
    )
    if not quiet:
        click.echo(format_pair_table(result))


@main.command(**_command("bon"))
@click.argument("model", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--candidates",
    type=click.Path(path_type=Path),
    required=True,
    help="JSON Lines: prompt, candidates, and correct or answer.",
)
@click.option("--n", "ns", default="2,4,8,16", show_default=True, help="Comma-separated N values.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the results as JSON.")
@click.option("--force", is_flag=True, help="Replace an existing --out report that lazymerge wrote.")
@in_memory_merge_options
@eval_options
@reports_errors
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
    from lazymerge.evaluation.run import evaluate_bon, format_bon_table

    n_values = _parse_ns(ns)
    load, merge_value = _split_eval_options(model, options)
    result = _scored_report(
        out,
        [*_read_paths(model), candidates],
        force,
        lambda: evaluate_bon(
            model if merge_value is not None else model[0],
            candidates,
            n_values,
            merge=merge_value,
            progress=None if not quiet else False,
            **load,
        ),
    )
    if not quiet:
        click.echo(format_bon_table(result))


@main.command(**_command("sweep"))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
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
    type=click.Path(path_type=Path),
    help="Test pairs (RewardBench, Auto-J or RewardBench 2 JSONL; repeatable).",
)
@click.option(
    "--val-pairs", type=click.Path(path_type=Path), help="Validation pairs: the point is chosen on them."
)
@click.option(
    "--candidates",
    "candidate_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Best-of-N candidates (JSONL; repeatable).",
)
@click.option("--n", "ns", default="2,4,8,16", show_default=True, help="Best-of-N sizes.")
@merge_flag("rm")
@merge_flag("strict")
@merge_flag("method")
@merge_flag("base")
@merge_flag("density")
@merge_flag("seed")
@merge_flag("max-memory")
@click.option(
    "--max-points",
    type=click.IntRange(min=1, max=MAX_POINTS),
    default=DEFAULT_MAX_POINTS,
    show_default=True,
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
    help="Hash every weights file: record their SHA-256, or prove on resume that moved or touched "
    "weights hold the same data (reads all weights once).",
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
@eval_options
@reports_errors
def sweep(
    inputs: tuple[Path, ...],
    output: Path,
    alpha: str | None,
    grid_step: float | None,
    weight_vectors: tuple[str, ...],
    pair_files: tuple[Path, ...],
    val_pairs: Path | None,
    candidate_files: tuple[Path, ...],
    ns: str,
    write: bool,
    restart: bool,
    rehash: bool,
    as_json: bool,
    ray_address: str | None,
    ray_gpus: float | None,
    ray_cpus: float | None,
    quiet: bool,
    **options: Any,
) -> None:
    """Score merged reward models of RM and DOMAIN models over a grid, in memory, resumably.

    Each point is merged in memory (no checkpoint written unless --write), scored on every
    evaluation, and appended to OUT/results.jsonl; rerunning continues where a crash stopped.
    Writes report.md, results.json and plots into OUT.
    """
    from lazymerge.evaluation.sweep import build_spec, run_sweep

    n_values = _parse_ns(ns)
    load = _load_kwargs(**{k: options.pop(k) for k in LOAD_KEYS})
    spec = build_spec(
        inputs,
        output,
        alpha=alpha,
        grid_step=grid_step,
        weight_vectors=weight_vectors,
        pair_files=pair_files,
        val_pairs=val_pairs,
        candidate_files=candidate_files,
        ns=n_values,
        load=load,
        write=write,
        restart=restart,
        rehash=rehash,
        **options,
    )
    for name, value in (("--ray-gpus", ray_gpus), ("--ray-cpus", ray_cpus)):
        if value is not None and not math.isfinite(value):
            raise OptionError(f"{name} {value}: not a finite number")
    executor = None
    if ray_address is not None:
        from lazymerge.evaluation.ray_sweep import ray_executor

        executor = ray_executor(ray_address, ray_gpus, 1.0 if ray_cpus is None else ray_cpus)
    elif ray_gpus is not None or ray_cpus is not None:
        raise OptionError("--ray-gpus and --ray-cpus need --ray")
    run = run_sweep(
        spec,
        echo=(lambda line: None) if quiet or as_json else functools.partial(click.echo, err=True),
        executor=executor,
    )
    if as_json:
        click.echo(json.dumps(run.report, indent=2, allow_nan=False))
    elif not quiet:
        chosen = run.report["chosen"]
        click.echo(
            f"{len(run.scored)} point(s) scored, {len(run.skipped)} already done; report in {output / 'report.md'}"
        )
        click.echo(f"chosen point: {chosen['label']} (on {chosen['chosen_on']})")


@main.command(**_command("verify"))
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--finite", is_flag=True, help="Also check every floating-point tensor for NaN and Inf.")
@reports_errors
def verify(path: Path, finite: bool) -> None:
    """Validate headers, index and sizes, and recompute the data hashes lazymerge recorded."""
    from lazymerge.verify import verify_checkpoint

    click.echo(verify_checkpoint(path, finite=finite).format())


@main.command(**_command("demo"))
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path),
    help="Keep the demo files here instead of a temporary folder.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@reports_errors
def demo(workdir: Path | None, as_json: bool) -> None:
    """Build two small Llama-shaped checkpoints, merge them streaming, verify and report."""
    from lazymerge.demo import run_demo

    run_demo(workdir, as_json=as_json, echo=click.echo)


if __name__ == "__main__":
    main()
