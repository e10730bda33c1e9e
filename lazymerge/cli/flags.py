"""The command line's options, generated from the option values' own fields.

`MergeOptions` and `ScoreOptions` carry each flag's help (and its kind, choices and bounds) in
their field metadata; `field_option` turns one field into a click option, so a flag is declared
once, where its value is checked. The values are built here, once per command (`merge_value`,
`score_value`, `merge_request`), and the layers below receive them whole.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from lazymerge.cli.group import one_line
from lazymerge.errors import OptionError
from lazymerge.methods import METHODS
from lazymerge.options import MergeOptions, parse_alpha, parse_size, parse_tensor_weights, parse_weights
from lazymerge.score_options import ScoreOptions, system_prompt_text

F = TypeVar("F", bound=Callable[..., Any])


class ParsedType(click.ParamType):  # type: ignore[type-arg]  # generic only from click 8.2
    """A flag's text parsed once, here, by the library's own parser (`OptionError` -> a usage
    error naming the flag)."""

    def __init__(self, name: str, parse: Callable[[str], Any]):
        self.name, self._parse = name, parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except OptionError as exc:
            self.fail(str(exc), param, ctx)


SIZE = ParsedType("size", parse_size)
#: --tensor-weights FILTER=W1,W2,...: (filter, weights).
TENSOR_WEIGHTS = ParsedType("filter=weights", parse_tensor_weights)


class MethodChoice(click.Choice):  # type: ignore[type-arg]
    """The registered merge methods; a wrong name says so, listing them."""

    def __init__(self) -> None:
        super().__init__(list(METHODS))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value not in METHODS:
            self.fail(f"{value!r}: unknown merge method; choose from {', '.join(METHODS)}", param, ctx)
        return value


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        ScoreOptions(device=value)
    except OptionError:
        raise click.BadParameter(f"{value!r}: choose cpu, cuda or cuda:N") from None
    return value


def _check_chat_template(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from lazymerge.evaluation.chat_templates import valid_choice

    if value is not None and not valid_choice(value):
        raise click.BadParameter(f"{value!r}: choose llama2, chatml or a FILE.jinja")
    return value


#: Checks a flag's text gets where click parses it, before anything else runs.
_CALLBACKS: dict[str, Callable[..., Any]] = {"device": _check_device, "chat_template": _check_chat_template}


def _click_type(f: dataclasses.Field[Any], meta: dict[str, Any]) -> dict[str, Any]:
    kind = str(f.type)
    if meta.get("kind") == "size":
        return {"type": SIZE}
    if meta.get("kind") == "tensor_weights":
        return {"type": TENSOR_WEIGHTS, "multiple": True, "metavar": meta["metavar"]}
    if kind.startswith("tuple[Path"):
        return {"type": click.Path(path_type=Path), "multiple": True}
    if kind.startswith("tuple[str"):
        return {"multiple": True}
    if "flag_value" in meta:
        return {"is_flag": False, "flag_value": meta["flag_value"]}
    if f.name == "method":
        return {"type": MethodChoice()}
    if "choices" in meta:
        return {"type": click.Choice(list(meta["choices"]))}
    if kind.startswith("bool"):
        return {} if "/" in meta.get("flags", ("",))[0] else {"is_flag": True}
    if kind.startswith("int"):
        bounded = "min" in meta or "max" in meta
        return {"type": click.IntRange(min=meta.get("min"), max=meta.get("max")) if bounded else int}
    if kind.startswith("float"):
        bounded = "min" in meta or "max" in meta
        return {"type": click.FloatRange(min=meta.get("min"), max=meta.get("max")) if bounded else float}
    if kind.startswith("Path"):
        return {"type": click.Path(path_type=Path)}
    return {}


def field_option(cls: type, name: str, **overrides: Any) -> Callable[[F], F]:
    """The click option of field `name` of `cls` (`MergeOptions`, `ScoreOptions`), from its
    metadata: flags (default `--field-name`), help, type, default and bounds."""
    f = next(x for x in dataclasses.fields(cls) if x.name == name)
    meta = dict(f.metadata)
    spec: dict[str, Any] = {
        "help": meta["help"].format(
            methods=", ".join(METHODS),
            base_methods=", ".join(m for m, spec in METHODS.items() if spec.needs_base),
            density_methods=", ".join(m for m, spec in METHODS.items() if spec.uses_density),
        ),
        "default": meta.get("cli_default", f.default),
        **_click_type(f, meta),
    }
    if "show_default" in meta:
        spec["show_default"] = meta["show_default"]
    if name in _CALLBACKS:
        spec["callback"] = _CALLBACKS[name]
    spec.update(overrides)
    flags = meta.get("flags", (f"--{name.replace('_', '-')}",))
    return click.option(*flags, name, **spec)


def apply(fn: F, decorators: Sequence[Callable[[Any], Any]]) -> F:
    """`fn` with `decorators` applied, the first one outermost (listed as in --help)."""
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def together(*decorators: Callable[[Any], Any]) -> Callable[[F], F]:
    """One decorator applying `decorators` (the first outermost)."""
    return lambda fn: apply(fn, decorators)


def merge_flags(*names: str) -> list[Callable[[F], F]]:
    return [field_option(MergeOptions, n) for n in names]


def merge_options(fn: F) -> F:
    """INPUTS, -o and every merge flag of `run` and `plan`."""
    return apply(
        fn,
        [
            click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path)),
            click.option(
                "-o",
                "--output",
                type=click.Path(path_type=Path),
                help="Output .safetensors file or folder. Default: merged.safetensors (file inputs) or "
                "merged/ (folders).",
            ),
            click.option(
                "--alpha",
                help="Weight L of the second of two inputs: (1 - L) * A + L * B (with a reward model: the "
                "domain model's weight). Default 0.5. START:STOP:STEP or A,B,C sweeps, one output folder "
                "per value.",
            ),
            click.option("--weights", help="Comma-separated weight per input, e.g. 0.5,0.3,0.2."),
            *merge_flags("max_points", "method", "base", "density", "seed", "check_finite", "dtype"),
            *merge_flags("shard_size", "rm", "strict", "max_memory", "direct_io"),
        ],
    )


def in_memory_merge_options(fn: F) -> F:
    """Options of a merge built in memory when several MODEL folders are given (eval, bon)."""
    return apply(
        fn,
        [
            click.option(
                "--alpha", help="With a reward model and one domain model: the domain model's weight."
            ),
            click.option("--weights", help="One weight per MODEL, e.g. 0.6,0.3,0.1."),
            *merge_flags("rm", "strict", "method", "base", "density", "seed", "max_memory"),
        ],
    )


SCORE_FIELDS = tuple(f.name for f in dataclasses.fields(ScoreOptions))


def score_options(fn: F) -> F:
    """Every `ScoreOptions` flag, and -q."""
    quiet = click.option("-q", "--quiet", is_flag=True, help="No progress and no table.")
    return apply(fn, [*(field_option(ScoreOptions, n) for n in SCORE_FIELDS), quiet])


def score_value(options: dict[str, Any]) -> ScoreOptions:
    """The scoring options from their flags (popped from `options`), the system prompt resolved
    and the chat template read and checked before any model or data is opened."""
    from lazymerge.evaluation.chat_templates import load_chat_template

    flags = {name: options.pop(name) for name in SCORE_FIELDS}
    system = system_prompt_text(flags.pop("system_prompt"))
    template = flags.pop("chat_template")
    chosen = load_chat_template(template, system is not None) if template else None
    return ScoreOptions(**flags, system_prompt=system, chat_template=chosen)


def merge_value(alpha: str | None, weights: str | None, **options: Any) -> MergeOptions:
    """The frozen merge options from their flags (OptionError on a wrong value)."""
    return MergeOptions(
        alphas=parse_alpha(alpha, options.get("max_points", 1)) if alpha is not None else None,
        weights=parse_weights(weights) if weights is not None else None,
        **options,
    )


#: The flags a mergekit config sets itself (method, models, weights, density, dtype).
CONFIG_OWNED = ("alpha", "weights", "base", "method", "density", "dtype", "max_points")


def merge_request(inputs: tuple[Path, ...], options: dict[str, Any]) -> tuple[tuple[Path, ...], MergeOptions]:
    """(inputs, options) of `run` and `plan`: INPUTS and flags, or one mergekit config (.yml/.yaml)
    whose notes go to stderr."""
    configs = [p for p in inputs if p.name.lower().endswith((".yml", ".yaml"))]
    if not configs:
        return inputs, merge_value(**options)
    if len(inputs) != 1:
        raise OptionError(f"{configs[0]}: a mergekit config is the only input (its models are listed in it)")
    ctx = click.get_current_context()
    given = [
        n
        for n in CONFIG_OWNED
        if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)
    ]
    if given:
        raise OptionError(
            f"--{given[0].replace('_', '-')}: {inputs[0]} sets the method, models, weights, density and "
            "dtype; edit the config instead"
        )
    from lazymerge.mergekit_config import read_mergekit_config

    recipe = read_mergekit_config(inputs[0], **{k: v for k, v in options.items() if k not in CONFIG_OWNED})
    for note in recipe.notes:
        click.echo(f"note: {one_line(note)}", err=True)
    return recipe.inputs, recipe.options


def in_memory_merge(models: tuple[Path, ...], options: dict[str, Any]) -> MergeOptions | None:
    """None for one MODEL (scored as it is); the merge's options for several (merged in memory)."""
    if len(models) == 1:
        if options["alpha"] is not None or options["weights"] is not None:
            raise OptionError(
                "--alpha and --weights merge several MODEL folders in memory; give the reward model and domain models"
            )
        return None
    value = merge_value(**options)
    value.check_inputs(len(models))
    return value


def parse_ns(ns: str) -> list[int]:
    try:
        n_values = [int(n) for n in ns.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{ns!r} is not a comma-separated list of integers", param_hint="--n"
        ) from None
    if any(n < 1 or n > 100_000 for n in n_values):
        raise click.BadParameter(f"{ns!r}: every N must be from 1 to 100000", param_hint="--n")
    return sorted(set(n_values))


def print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, allow_nan=False))
