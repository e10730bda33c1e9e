"""Merge options: one frozen value, parsed and checked once, where options enter.

The command line builds a `MergeOptions` from its flags and turns `OptionError` into a usage
error (exit 2); the Python API accepts one (or keyword arguments that build one). Layers below
receive the value and never re-check it. Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lazymerge.errors import OptionError
from lazymerge.io.dtypes import OUTPUT_DTYPE_CHOICES

if TYPE_CHECKING:
    from lazymerge.io.hub_cache import ModelSource

#: Default working-memory budget for tensor data in flight (see docs/memory-and-io.md).
#: 160 MiB keeps a merge's peak resident memory near 0.4 GB (interpreter and torch included)
#: with chunks of about 8M elements, large enough that direct reads keep the disk busy.
DEFAULT_MAX_MEMORY = 160 * 2**20
DEFAULT_MAX_MEMORY_TEXT = "160MiB"
DEFAULT_SHARD_SIZE = 5 * 10**9
#: Elements per block of elementwise arithmetic (4 MB of fp32 per input: cache-sized).
DEFAULT_BLOCK_ELEMS = 1 << 20
#: Most outputs one sweep may write (each keeps an open file and a buffer); `max_points` raises it
#: up to `MAX_POINTS`.
DEFAULT_MAX_POINTS = 101
MAX_POINTS = 100_000
#: Smallest DARE/TIES density: 1 / density rescales the kept deltas, and below this it overflows.
MIN_DENSITY = 1e-6

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
#: Largest size accepted anywhere (1 PB): larger values are typing mistakes, and bigger numbers
#: would overflow the 64-bit arithmetic below.
_MAX_SIZE = 10**15


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '256MiB' -> 268_435_456, '1000' -> 1000.

    Raises:
        OptionError for anything else, zero, or more than 1 PB.
    """
    match = re.fullmatch(r"\s*(\d{1,16}(?:\.\d{1,16})?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise OptionError(f"{text!r} is not a size such as 5GB, 500MB or 256MiB")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise OptionError(f"{text!r} must be more than 0 bytes")
    if value > _MAX_SIZE:
        raise OptionError(f"{text!r} is more than 1 PB")
    return value


def _finite(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise OptionError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise OptionError(f"{what} {text!r} is not a finite number")
    return value


def sweep_length(start: float, stop: float, step: float) -> int:
    """Number of values START, START+STEP, ... up to STOP included, without building them."""
    steps = (stop - start) / step
    if not math.isfinite(steps) or steps > 1e12:
        return 10**12  # more than any sweep may have: refused by the caller's cap
    nearest = round(steps)
    # 1 / 0.1 is 9.999999999999998 in floats: a STOP within rounding of a step is included
    return int(nearest if abs(steps - nearest) <= 1e-9 * max(1.0, steps) else math.floor(steps)) + 1


def parse_alpha(text: str, max_points: int = DEFAULT_MAX_POINTS) -> tuple[float, ...]:
    max_points = min(max_points, MAX_POINTS)
    return _parse_alpha(text, max_points)


def _parse_alpha(text: str, max_points: int) -> tuple[float, ...]:
    """'0.3' -> (0.3,); '0:1:0.25' -> (0.0, 0.25, 0.5, 0.75, 1.0) (STOP included); '0.1,0.3' -> a list.

    Raises:
        OptionError for a non-number, a non-finite value, an empty or backwards range, or more
        than `max_points` values (checked before any list is built).
    """
    if "," in text:
        values = tuple(_finite(p.strip(), "alpha") for p in text.split(","))
        if len(values) > max_points:
            raise OptionError(
                f"{len(values)} alpha values; at most {max_points} (raise it with --max-points)"
            )
        return values
    parts = text.split(":")
    if len(parts) == 1:
        return (_finite(parts[0], "alpha"),)
    if len(parts) != 3:
        raise OptionError(f"{text!r} is not a number, a list A,B,C or START:STOP:STEP")
    start, stop, step = (_finite(p, "alpha") for p in parts)
    if step <= 0 or stop < start:
        raise OptionError(f"{text!r}: a sweep is START:STOP:STEP with STEP > 0 and STOP >= START")
    count = sweep_length(start, stop, step)
    if count > max_points:
        raise OptionError(f"{text!r} gives {count} values; at most {max_points} (raise it with --max-points)")
    values = tuple(round(start + k * step, 10) for k in range(count))
    if len({f"{v:g}" for v in values}) != len(values):
        raise OptionError(f"{text!r}: values closer than 6 significant digits would share an output folder")
    return values


def parse_weights(text: str) -> tuple[float, ...]:
    """'0.5,0.3,0.2' -> (0.5, 0.3, 0.2); every weight a finite number."""
    return tuple(_finite(part.strip(), "weight") for part in text.split(","))


#: Most --tensor-weights rules (a recipe holds a handful; mergekit's filters likewise).
MAX_TENSOR_RULES = 64


def parse_tensor_weights(text: str) -> tuple[str, tuple[float, ...]]:
    """'embed_tokens=1,0' -> ("embed_tokens", (1.0, 0.0)): tensors whose name contains the
    filter take these weights (one per input), as a mergekit filter gives a parameter's value.

    Raises:
        OptionError for a missing '=', an empty filter or a weight that is not a finite number.
    """
    name, sep, weights = text.partition("=")
    if not sep or not name.strip() or not weights.strip():
        raise OptionError(f"--tensor-weights {text!r}: expected FILTER=W1,W2,... (e.g. embed_tokens=1,0)")
    return name.strip(), parse_weights(weights)


@dataclass(frozen=True)
class NamedTensorWeights:
    """`TensorParameters` from `MergeOptions.tensor_weights`: the first rule whose filter is part
    of a tensor's name gives its weights; other tensors take `default` (the merge's own)."""

    rules: tuple[tuple[str, tuple[float, ...]], ...]
    default: tuple[float, ...]

    def values(self, tensor: str, t: float) -> TensorValues:
        for name, weights in self.rules:
            if name in tensor:
                return TensorValues(weights, None)
        return TensorValues(self.default, None)


def cli_flag(help: str, **more: Any) -> dict[str, Any]:
    """A field's command-line metadata: its help, and how the CLI declares it (`flags`, `kind`,
    `choices`, `min`/`max`, `show_default`); the CLI generates its options from these."""
    return {"help": help, **more}


@dataclass(frozen=True)
class TensorValues:
    """The merge values of one tensor, where they vary across a model's tensors (mergekit's
    gradients and filters).

    Attributes:
        weights: one weight per weighted input (input order, the base model excluded).
        density: the fraction of each task vector kept (None: the plan's, for methods without one).
        params: further method parameters by name (della's epsilon and lambda), as keyword
            arguments of the method.
    """

    weights: tuple[float, ...]
    density: float | None
    params: tuple[tuple[str, float], ...] = ()


class TensorParameters(Protocol):
    """Per-tensor merge values (a mergekit config's gradients and filters), asked once per tensor
    by the plan, which records the answer in the tensor's plan."""

    def values(self, tensor: str, t: float) -> TensorValues:
        """The values of `tensor`, at `t` in [0, 1] its layer's place among the layers (mergekit's
        gradient position: 0 outside the layers).

        Raises:
            LazyMergeError naming the config, its field and the tensor.
        """
        ...


@dataclass(frozen=True)
class LayerSlice:
    """One slice of a layer stack (a mergekit config's `slices`): `layers` consecutive output
    layers, the k-th made from layer `first + k` of each source.

    Attributes:
        sources: (index of the source among the merge's checkpoints, the base model last; the
            first layer it gives), in the config's order.
        layers: how many layers the slice gives.
    """

    sources: tuple[tuple[int, int], ...]
    layers: int


class SliceParameters(Protocol):
    """Per-tensor merge values of a layer stack, asked once per output tensor by the plan."""

    def values(self, slice_index: int, tensor: str, source_names: tuple[str, ...], t: float) -> TensorValues:
        """The values of output `tensor`, made in slice `slice_index` from the sources' tensors
        `source_names` (one per slice source) at gradient position `t`; the weights are one per
        checkpoint of the merge (the base model included), 0 for the base and for checkpoints
        outside the slice.

        Raises:
            LazyMergeError naming the config, its field and the tensor.
        """
        ...


@dataclass(frozen=True)
class LayerStack:
    """Output layers taken slice by slice from the inputs' layers (mergekit's `slices`): a
    passthrough stack (one source per slice) or a merge per slice; the tensors outside the
    layers come from the first slice's sources (embeddings) and the last slice's (the rest)."""

    slices: tuple[LayerSlice, ...]
    parameters: SliceParameters

    @property
    def layers(self) -> int:
        """The output's number of layers."""
        return sum(s.layers for s in self.slices)


@dataclass(frozen=True)
class MergeOptions:
    """Everything a merge can be asked to do besides its inputs and output.

    Attributes:
        weights: one weight per input (input order); or
        alphas: for two inputs, the weight L of the second (with a reward model: the domain
            model's weight); one value merges once, several values sweep (one folder each).
            Neither: 0.5 for two inputs, equal weights otherwise.
        method: merge method name (see `lazymerge.methods`).
        dtype: "auto" (the first input's dtype per tensor), "float32", "float16" or "bfloat16".
        shard_size: largest data bytes per output shard (folder outputs).
        max_memory: working-memory budget in bytes for tensor data in flight.
        rm: index of the reward model among the inputs (default: found from config.json).
        strict: refuse to match embedding rows by position when tokenizer files are missing.
        base: base model for task-vector methods.
        density: fraction of each task vector kept (ties, dare_*).
        seed: seed of the DARE drop masks.
        check_finite: stop on NaN or Inf in a merged tensor instead of warning.
        chunk_elems: elements per chunk (default: the most `max_memory` allows).
        block_elems: elements per block of elementwise arithmetic.
        max_points: most outputs one sweep may write.
        direct_io: read inputs and write outputs with direct I/O (O_DIRECT) where the filesystem
            allows it, bypassing the page cache (inputs already cached are read from the cache).
        tensor_parameters: per-tensor weights, density and method parameters (a mergekit
            config's gradients and filters); None: `weights` and `density` for every tensor.
        tensor_weights: (filter, weights) rules, first match wins: a tensor whose name contains
            the filter takes these weights (one per input) instead of the merge's, as mergekit's
            filters do (`embed_tokens=1,0` keeps the first input's embeddings); one output only.
        layer_stack: the output's layers taken from the inputs' layers slice by slice (a
            mergekit config's `slices`); None: every input's tensors merged name by name.
        chat_template: the Jinja chat template written into the output's tokenizer files (a
            mergekit config's `chat_template`, resolved); None: the copied files' own.

    Raises:
        OptionError (on construction) for any value that is wrong whatever the inputs.
    """

    weights: tuple[float, ...] | None = None
    alphas: tuple[float, ...] | None = None
    method: str = field(default="linear", metadata=cli_flag("Merge method: {methods}.", show_default=True))
    dtype: str = field(
        default="auto",
        metadata=cli_flag(
            "Output dtype of float tensors (auto: the first input's).",
            choices=("auto", *OUTPUT_DTYPE_CHOICES),
            show_default=True,
        ),
    )
    shard_size: int = field(
        default=DEFAULT_SHARD_SIZE,
        metadata=cli_flag("Largest output shard (folder outputs).", kind="size", show_default="5GB"),
    )
    max_memory: int = field(
        default=DEFAULT_MAX_MEMORY,
        metadata=cli_flag(
            "Working-memory budget for tensor data in flight (per merge).",
            kind="size",
            show_default=DEFAULT_MAX_MEMORY_TEXT,
        ),
    )
    rm: int | None = field(
        default=None,
        metadata=cli_flag(
            "Index (from 0) of the reward model among the models; default: found from config.json."
        ),
    )
    strict: bool = field(
        default=False,
        metadata=cli_flag("Refuse to match embedding rows by position when tokenizer files are missing."),
    )
    base: Path | None = field(
        default=None, metadata=cli_flag("Base model of the task-vector methods ({base_methods}).")
    )
    density: float = field(
        default=0.5,
        metadata=cli_flag("Fraction of each task vector kept ({density_methods}).", show_default=True),
    )
    seed: int = field(default=0, metadata=cli_flag("Seed of the DARE drop masks.", show_default=True))
    check_finite: bool = field(
        default=False,
        metadata=cli_flag("Stop when an input's NaN or Inf reaches the output (default: warn)."),
    )
    chunk_elems: int | None = None
    block_elems: int = DEFAULT_BLOCK_ELEMS
    max_points: int = field(
        default=DEFAULT_MAX_POINTS,
        metadata=cli_flag(
            "Most values one --alpha sweep may have.", min=1, max=MAX_POINTS, show_default=True
        ),
    )
    direct_io: bool = field(
        default=True,
        metadata=cli_flag(
            "Read inputs not already in the page cache and write the output with direct I/O (O_DIRECT), "
            "which spares the CPU the page-cache copies; --buffered-io goes through the page cache. "
            "Filesystems without O_DIRECT are always buffered.",
            flags=("--direct-io/--buffered-io",),
            show_default=True,
        ),
    )
    tensor_parameters: TensorParameters | None = None
    tensor_weights: tuple[tuple[str, tuple[float, ...]], ...] = field(
        default=(),
        metadata=cli_flag(
            "Tensors whose name contains FILTER take these weights (one per input) at every point, as "
            "mergekit's filters do; first match wins (repeatable). E.g. embed_tokens=1,0 keeps the reward "
            "model's embeddings.",
            kind="tensor_weights",
            metavar="FILTER=W1,W2",
        ),
    )
    layer_stack: LayerStack | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        from lazymerge.methods import METHODS as METHOD_SPECS

        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if self.alphas is not None:
            object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        if self.base is not None:
            object.__setattr__(self, "base", Path(self.base))
        if self.weights is not None and self.alphas is not None:
            raise OptionError("give --alpha or --weights, not both")
        for name, values in (("--weights", self.weights), ("--alpha", self.alphas)):
            if values is not None:
                bad = [v for v in values if not math.isfinite(v)]
                if bad:
                    raise OptionError(f"{name}: {bad[0]} is not a finite number")
                if sum(abs(v) for v in values) > 1e6:
                    raise OptionError(f"{name}: weights as large as {max(values, key=abs):g} are not a merge")
        if self.alphas is not None:
            if not self.alphas:
                raise OptionError("--alpha: the sweep is empty")
            if len(self.alphas) > self.max_points:
                raise OptionError(
                    f"--alpha: {len(self.alphas)} values; at most {self.max_points} (raise it with --max-points)"
                )
            if len({f"{a:g}" for a in self.alphas}) != len(self.alphas):
                raise OptionError("--alpha: two values print alike and would share an output folder")
        spec = METHOD_SPECS.get(self.method)
        if spec is None:
            raise OptionError(
                f"--method {self.method!r}: unknown merge method; choose from {', '.join(METHOD_SPECS)}"
            )
        if spec.needs_base and self.base is None:
            raise OptionError(
                f"--method {self.method} merges task vectors (input - base): give the base model with --base"
            )
        if self.base is not None and not spec.needs_base:
            users = ", ".join(m for m, s in METHOD_SPECS.items() if s.needs_base)
            raise OptionError(f"--base is used by task-vector methods ({users}), not by {self.method}")
        if not (math.isfinite(self.density) and MIN_DENSITY <= self.density <= 1):
            raise OptionError(f"--density {self.density}: must be in [{MIN_DENSITY:g}, 1]")
        if isinstance(self.max_points, int) and self.max_points > MAX_POINTS:
            raise OptionError(f"--max-points {self.max_points}: at most {MAX_POINTS}")
        if self.dtype != "auto" and self.dtype not in OUTPUT_DTYPE_CHOICES:
            raise OptionError(f"--dtype {self.dtype!r}: choose auto, {', '.join(OUTPUT_DTYPE_CHOICES)}")
        for name in ("shard_size", "max_memory", "block_elems", "max_points"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise OptionError(f"--{name.replace('_', '-')} {value!r}: must be a positive integer")
        if self.chunk_elems is not None and self.chunk_elems <= 0:
            raise OptionError(f"chunk_elems {self.chunk_elems}: must be positive")
        if self.rm is not None and self.rm < 0:
            raise OptionError(f"--rm {self.rm}: an input index counts from 0")
        if not 0 <= self.seed < 2**63:
            raise OptionError(f"--seed {self.seed}: must be in [0, 2^63)")
        if self.tensor_parameters is not None and self.alphas is not None:
            raise OptionError("per-tensor parameters (a mergekit config's) cannot be swept with --alpha")
        self._check_tensor_weights()
        self._check_layer_stack()

    def _check_layer_stack(self) -> None:
        if self.layer_stack is not None and (
            self.alphas is not None or self.tensor_weights or self.tensor_parameters is not None
        ):
            raise OptionError("a layer stack (a mergekit config's slices) gives its own values: no --alpha")

    def _check_tensor_weights(self) -> None:
        rules = tuple((str(f), tuple(float(w) for w in ws)) for f, ws in self.tensor_weights)
        object.__setattr__(self, "tensor_weights", rules)
        if not rules:
            return
        if len(rules) > MAX_TENSOR_RULES:
            raise OptionError(f"--tensor-weights: {len(rules)} rules; at most {MAX_TENSOR_RULES}")
        for name, weights in rules:
            if not name or not all(math.isfinite(w) for w in weights) or sum(map(abs, weights)) > 1e6:
                raise OptionError(f"--tensor-weights {name}: needs a filter and finite weights")
        if self.tensor_parameters is not None:
            raise OptionError("--tensor-weights: a mergekit config gives per-tensor values already")
        if self.is_sweep:
            raise OptionError("--tensor-weights holds for one merge; sweep with lazymerge sweep")

    @classmethod
    def build(cls, **kwargs: Any) -> MergeOptions:
        """Options from keyword arguments; `alpha` (one value or a sequence) means `alphas`."""
        alpha = kwargs.pop("alpha", None)
        if alpha is not None:
            kwargs["alphas"] = tuple(alpha) if isinstance(alpha, Sequence) else (alpha,)
        unknown = set(kwargs) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown merge option(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs)

    @property
    def is_sweep(self) -> bool:
        return self.alphas is not None and len(self.alphas) > 1

    def check_inputs(self, count: int) -> None:
        """The checks that need the number of inputs (base excluded).

        Raises:
            OptionError
        """
        from lazymerge.methods import METHODS as METHOD_SPECS

        arity = METHOD_SPECS[self.method].arity
        if count < (1 if self.layer_stack is not None or arity == 1 else 2):
            raise OptionError("a merge needs at least two inputs")
        if self.weights is not None and len(self.weights) != count:
            raise OptionError(
                f"--weights has {len(self.weights)} values for {count} inputs; give one per input"
            )
        if self.alphas is not None and count != 2:
            raise OptionError(f"--alpha needs exactly two inputs, got {count}; use --weights")
        if arity is not None and count != arity and self.layer_stack is None:  # a stack's: per slice
            raise OptionError(f"--method {self.method} takes exactly {arity} inputs, got {count}")
        if self.rm is not None and self.rm >= count:
            raise OptionError(f"--rm {self.rm}: there are only {count} inputs (counted from 0)")
        for name, weights in self.tensor_weights:
            if len(weights) != count:
                raise OptionError(
                    f"--tensor-weights {name}: {len(weights)} weights for {count} inputs; give one per input"
                )

    def per_tensor(self, default: tuple[float, ...]) -> TensorParameters | None:
        """What varies per tensor: a mergekit config's values, or the --tensor-weights rules
        over `default` (the one output's weights); None when nothing does."""
        if self.tensor_weights:
            return NamedTensorWeights(self.tensor_weights, default)
        return self.tensor_parameters

    def check_destination_kind(self, destination: Path) -> None:
        """A sweep writes one folder per value, so its output cannot be a .safetensors file."""
        if self.is_sweep and destination.name.endswith(".safetensors"):
            raise OptionError(f"{destination}: a sweep writes one folder per alpha; give a folder as output")

    def weight_vectors(self, count: int, rm_index: int | None) -> list[tuple[float, ...]]:
        """One weight vector per output, in input order.

        With a reward model among two inputs, alpha is the domain model's weight whatever the
        input order; otherwise it is the weight of the second input.
        """
        if self.weights is not None:
            return [self.weights]
        if self.alphas is None:
            if count != 2:
                return [tuple([1.0 / count] * count)]
            alphas: tuple[float, ...] = (0.5,)
        else:
            alphas = self.alphas
        domain = 1 - rm_index if rm_index is not None else 1
        return [tuple(a if i == domain else 1.0 - a for i in range(2)) for a in alphas]

    def variant_names(self) -> tuple[str, ...]:
        """The sub-folder of each output: `alpha-<L>` for a sweep, "" for one output."""
        if not self.is_sweep:
            return ("",)
        assert self.alphas is not None
        return tuple(f"alpha-{a:g}" for a in self.alphas)


def read_paths(inputs: Sequence[str | os.PathLike[str]], options: MergeOptions) -> list[Path]:
    """What a merge of `inputs` reads: the inputs, then the base model when there is one."""
    return [Path(p) for p in inputs] + ([options.base] if options.base is not None else [])


@dataclass(frozen=True)
class MergeRequest:
    """A merge's inputs and options, resolved once where they enter: Hugging Face ids replaced
    by their snapshots in the local cache (the base model's too), and the input count checked
    against the options.

    Attributes:
        inputs: the paths read for each input, in order (base excluded).
        options: the options, `base` the path read for it.
        sources: how each input (then the base, last) was named and what is read for it.
    """

    inputs: tuple[Path, ...]
    options: MergeOptions
    sources: tuple[ModelSource, ...] = ()

    @classmethod
    def resolve(cls, inputs: Sequence[str | os.PathLike[str]], options: MergeOptions) -> MergeRequest:
        """Raises OptionError for a count the options refuse; InputError for a model id missing
        from the cache."""
        import dataclasses

        from lazymerge.io.hub_cache import resolve_inputs

        options.check_inputs(len(inputs))
        sources = resolve_inputs([*inputs, *([options.base] if options.base is not None else [])])
        if options.base is not None:
            options = dataclasses.replace(options, base=sources[-1].path)
        return cls(tuple(s.path for s in sources[: len(inputs)]), options, tuple(sources))

    @property
    def paths(self) -> list[Path]:
        """Every path read: the inputs, then the base model."""
        return read_paths(self.inputs, self.options)
