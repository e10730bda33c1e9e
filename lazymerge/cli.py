"""The `lazymerge` command line: a thin shell over the library.

Library errors (`LazyMergeError`) become one line `Error: ...` and exit status 1; usage mistakes
exit 2 (click's convention); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from lazymerge import __version__
from lazymerge.errors import LazyMergeError
from lazymerge.plan import DEFAULT_MAX_MEMORY, DEFAULT_SHARD_SIZE

F = TypeVar("F", bound=Callable[..., Any])

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '256MiB' -> 268_435_456, '1000' -> 1000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"{text!r} is not a size such as 5GB, 500MB or 256MiB")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"{text!r} must be more than 0 bytes")
    return value


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def parse_alpha(text: str) -> float | list[float]:
    """'0.3' -> 0.3; '0:1:0.25' -> [0.0, 0.25, 0.5, 0.75, 1.0] (STOP included)."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{text!r} is not a number or START:STOP:STEP") from None
    if len(values) == 1:
        return values[0]
    if len(values) != 3 or values[2] <= 0 or values[1] < values[0]:
        raise ValueError(f"{text!r}: a sweep is START:STOP:STEP with STEP > 0 and STOP >= START")
    start, stop, step = values
    count = int(round((stop - start) / step)) + 1
    sweep = [round(start + k * step, 10) for k in range(count)]
    return [a for a in sweep if a <= stop + 1e-9]


class AlphaType(click.ParamType):
    name = "alpha"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float | list[float]:
        if isinstance(value, (float, list)):
            return value
        try:
            return parse_alpha(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of numbers", param_hint="--weights"
        ) from None


def reports_errors(fn: F) -> F:
    """Add --debug; turn LazyMergeError into click's one-line error (exit 1)."""

    @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LazyMergeError as exc:
            if debug:
                raise
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("Error: interrupted; nothing was written to the destination", err=True)
            sys.exit(130)

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
            type=AlphaType(),
            help="Weight L of the second of two inputs: (1 - L) * A + L * B (with a reward model: the "
            "domain model's weight). Default 0.5. START:STOP:STEP sweeps, one output folder per value.",
        ),
        click.option(
            "--base",
            type=click.Path(path_type=Path),
            help="Base model for task_arithmetic, ties, dare_linear, dare_ties.",
        ),
        click.option(
            "--density",
            type=float,
            default=0.5,
            show_default=True,
            help="Fraction of each task vector kept (ties, dare_*).",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the DARE drop masks."),
        click.option(
            "--check-finite",
            is_flag=True,
            help="Stop when an input's NaN or Inf reaches the output (default: warn).",
        ),
        click.option("--weights", help="Comma-separated weight per input, e.g. 0.5,0.3,0.2."),
        click.option("--method", default="linear", show_default=True, help="Merge method."),
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
        click.option(
            "--rm",
            "rm",
            type=int,
            help="Index (from 0) of the reward model among INPUTS; default: found from config.json.",
        ),
        click.option(
            "--strict",
            is_flag=True,
            help="Refuse to match embedding rows by position when tokenizer files are missing.",
        ),
        click.option(
            "--max-memory",
            type=SizeType(),
            default=DEFAULT_MAX_MEMORY,
            show_default="256MiB",
            help="Working-memory budget for tensor data in flight.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _check_weights(
    inputs: tuple[Path, ...], alpha: float | list[float] | None, weights: list[float] | None
) -> None:
    if alpha is not None and weights is not None:
        raise click.UsageError("give --alpha or --weights, not both")
    if weights is not None and len(weights) != len(inputs):
        raise click.UsageError(f"--weights has {len(weights)} values for {len(inputs)} inputs")
    if alpha is not None and len(inputs) != 2:
        raise click.UsageError(f"--alpha needs exactly two inputs, got {len(inputs)}; use --weights")
    if len(inputs) < 2:
        raise click.UsageError("a merge needs at least two inputs")


@click.group()
@click.version_option(__version__, prog_name="lazymerge")
def main() -> None:
    """Merge model checkpoints tensor by tensor, streaming, in bounded memory."""


def _merge_kwargs(
    inputs: tuple[Path, ...], alpha: float | list[float] | None, weights: str | None, **options: Any
) -> dict[str, Any]:
    weight_list = _parse_weights(weights)
    _check_weights(inputs, alpha, weight_list)
    return {"weights": weight_list, "alpha": alpha, **options}


@main.command()
@merge_options
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no report.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@reports_errors
def run(
    inputs: tuple[Path, ...], output: Path | None, force: bool, quiet: bool, as_json: bool, **options: Any
) -> None:
    """Merge INPUTS (.safetensors/.bin files, index files or model folders) into one checkpoint.

    With a reward model among model-folder INPUTS (config.json architectures ending in
    ForSequenceClassification), follows DogeRM: backbone averaged, reward head kept, lm_head
    dropped, embeddings matched by token; the output is the reward model.
    """
    from lazymerge.api import merge

    kwargs = _merge_kwargs(inputs, **options)
    report = merge(inputs, output, force=force, progress=None if not quiet else False, **kwargs)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        click.echo(report.format())


#: Resident memory of the interpreter with torch imported, added to plan's memory prediction
#: (about 230 MB measured on the reference machine; rounded up).
BASELINE_RSS = 300 * 10**6


@main.command()
@merge_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@reports_errors
def plan(inputs: tuple[Path, ...], output: Path | None, as_json: bool, **options: Any) -> None:
    """Show what a merge would do, from headers alone (no tensor data is read)."""
    from lazymerge.api import prepare

    checkpoints, merge_plan, destination = prepare(inputs, output, **_merge_kwargs(inputs, **options))
    for ckpt in checkpoints:
        ckpt.close()
    rows = {n: t.shape[0] for n, t in merge_plan.tensors.items() if t.action == "rows"}
    if as_json:
        doc = {
            "output": str(destination),
            "method": merge_plan.method,
            "inputs": list(merge_plan.inputs),
            "roles": list(merge_plan.roles),
            "weights": list(merge_plan.weights),
            "files": [s.filename for s in merge_plan.layout.shards]
            + list(merge_plan.extra_files if destination.suffix != ".safetensors" else []),
            "tensors": [
                {
                    "name": t.name,
                    "action": t.action,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "chunks": merge_plan.chunks(t),
                    "note": t.note,
                }
                for s in merge_plan.layout.shards
                for t in (merge_plan.tensors[x.name] for x in s.tensors)
            ],
            "dropped": list(merge_plan.dropped),
            "notes": list(merge_plan.notes),
            "vocab_size": next(iter(rows.values()), None),
            "input_bytes": merge_plan.input_bytes,
            "output_bytes": merge_plan.output_bytes,
            "working_memory": merge_plan.working_memory,
            "predicted_peak_rss": merge_plan.working_memory + BASELINE_RSS,
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"output {destination}")
        click.echo(merge_plan.describe())
        click.echo(
            f"predicted peak resident memory about {(merge_plan.working_memory + BASELINE_RSS) / 1e9:.2f} GB"
        )


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@reports_errors
def inspect(path: Path, as_json: bool) -> None:
    """List the tensors of a checkpoint, validating every header."""
    from lazymerge.inspect import inspect_checkpoint

    click.echo(inspect_checkpoint(path, as_json=as_json))


def eval_options(fn: F) -> F:
    options = [
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "bfloat16", "float16"]),
            default="float32",
            show_default=True,
            help="Compute dtype without --quant.",
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
            type=int,
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
        click.option("--batch-size", type=int, default=8, show_default=True),
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
) -> dict[str, Any]:
    from lazymerge.evaluation.rewards import system_prompt_text

    return {
        "device": device,
        "dtype": dtype,
        "quant": quant,
        "double_quant": double_quant,
        "max_length": max_length,
        "system_prompt": system_prompt_text(system_prompt),
        "batch_size": batch_size,
    }


def _write_json(path: Path | None, doc: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(doc, indent=2) + "\n")


@main.command(name="eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--pairs",
    "pairs_file",
    type=click.Path(path_type=Path),
    required=True,
    help="JSON Lines pairs (RewardBench or Auto-J format).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Write the results (accuracy, subsets, sections, per-pair rewards) as JSON.",
)
@eval_options
@reports_errors
def evaluate(model: Path, pairs_file: Path, out: Path | None, quiet: bool, **load: Any) -> None:
    """Pairwise preference accuracy of the reward model MODEL (a model folder)."""
    from lazymerge.evaluation.run import evaluate_pairs, format_pair_table

    result = evaluate_pairs(model, pairs_file, progress=None if not quiet else False, **_load_kwargs(**load))
    _write_json(out, result)
    if not quiet:
        click.echo(format_pair_table(result))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--candidates",
    type=click.Path(path_type=Path),
    required=True,
    help="JSON Lines: prompt, candidates, and correct or answer.",
)
@click.option("--n", "ns", default="2,4,8,16", show_default=True, help="Comma-separated N values.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the results as JSON.")
@eval_options
@reports_errors
def bon(model: Path, candidates: Path, ns: str, out: Path | None, quiet: bool, **load: Any) -> None:
    """Best-of-N: pick the highest-reward candidate (ties to the earliest) for each N."""
    from lazymerge.evaluation.run import evaluate_bon, format_bon_table

    try:
        n_values = [int(n) for n in ns.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{ns!r} is not a comma-separated list of integers", param_hint="--n"
        ) from None
    result = evaluate_bon(
        model, candidates, n_values, progress=None if not quiet else False, **_load_kwargs(**load)
    )
    _write_json(out, result)
    if not quiet:
        click.echo(format_bon_table(result))


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--alpha",
    "alphas",
    type=AlphaType(),
    default="0:1:0.1",
    show_default=True,
    help="START:STOP:STEP or one value.",
)
@click.option("--pairs", "pairs_file", type=click.Path(path_type=Path), required=True, help="Test pairs.")
@click.option(
    "--val-pairs",
    type=click.Path(path_type=Path),
    help="Validation pairs: choose lambda on them, report test accuracy there.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("sweep"),
    show_default=True,
    help="Folder for results.json, accuracy.png and kept models.",
)
@click.option("--keep", is_flag=True, help="Keep each merged model (a 7B model is 13.5 GB per value).")
@click.option(
    "--max-memory",
    type=SizeType(),
    default=DEFAULT_MAX_MEMORY,
    show_default="256MiB",
    help="Working-memory budget of each merge.",
)
@eval_options
@reports_errors
def sweep(
    inputs: tuple[Path, ...],
    alphas: float | list[float],
    pairs_file: Path,
    val_pairs: Path | None,
    output: Path,
    keep: bool,
    max_memory: int,
    quiet: bool,
    **load: Any,
) -> None:
    """Merge RM and SFT for each lambda, evaluate, plot accuracy against lambda."""
    from lazymerge.evaluation.run import format_sweep_table, run_sweep

    if len(inputs) != 2:
        raise click.UsageError(f"sweep takes a reward model and one domain model, got {len(inputs)} inputs")
    values = alphas if isinstance(alphas, list) else [alphas]
    result = run_sweep(
        inputs,
        values,
        pairs_file,
        output,
        val_pairs=val_pairs,
        keep=keep,
        merge_options={"max_memory": max_memory},
        progress=None if not quiet else False,
        **_load_kwargs(**load),
    )
    if not quiet:
        click.echo(format_sweep_table(result))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--finite", is_flag=True, help="Also check every floating-point tensor for NaN and Inf.")
@reports_errors
def verify(path: Path, finite: bool) -> None:
    """Validate headers, index and sizes, and recompute the data hashes lazymerge recorded."""
    from lazymerge.verify import verify_checkpoint

    click.echo(verify_checkpoint(path, finite=finite).format())


@main.command()
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
