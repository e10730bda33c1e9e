"""mergekit YAML configs read into lazymerge's inputs and `MergeOptions`.

`read_mergekit_config` turns a mergekit 0.1.5 config (`merge_method`, `models` with `model` and
`parameters` (scalars, gradients, filters), or `slices` of `sources` with `layer_range`,
`base_model`, `parameters`, `dtype`, `out_dtype`, `tokenizer_source` or `tokenizer`,
`chat_template`) into the inputs and options `lazymerge run A B --weights ...` would take,
applying mergekit's per-method defaults (`normalize: true` for linear and ties, `density: 1` for
the task-vector methods, ...) and its rules (a per-model parameter falls back to the slice's,
then the global one; the base model takes no weight). Slices become a `LayerStack` whose values
per tensor this module gives. It reads the config (and, for a tokenizer source or `chat_template:
auto`, the models' tokenizer files) and nothing else: the merge itself is lazymerge's.

Everything lazymerge cannot do the same way is refused with one line naming the field and the
nearest thing it can do (modules, LoRA references, mergekit's named chat templates, unknown
keys); where lazymerge's TIES, DARE and DELLA keep the papers' definitions and mergekit's depart
from them, the recipe carries one note saying so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lazymerge.errors import InputError, MergekitConfigError
from lazymerge.io.small_files import read_small_file
from lazymerge.methods import (
    BREADCRUMBS_GAMMA,
    DELLA_EPSILON,
    KARCHER_MAX_ITER,
    KARCHER_TOL,
    METHODS,
    RAM_EPSILON,
    RAMPLUS_ALPHA,
    RAMPLUS_R,
    RESCALE_L1,
    RESCALE_NONE,
)
from lazymerge.options import MIN_DENSITY, LayerSlice, LayerStack, MergeOptions, TensorValues

_T = TypeVar("_T")

#: Largest config file read: real mergekit configs are well under a kilobyte.
CONFIG_LIMIT = 1 << 20
#: Most YAML nodes a config may expand to, aliases counted at every use: a real config has a few
#: dozen; nested aliases ("billion laughs") expand 600 bytes into billions, which any walk of the
#: value (a message, a comparison) would then pay for.
MAX_YAML_NODES = 10_000
#: Deepest nesting of a config's YAML (real ones nest 4 levels).
MAX_YAML_DEPTH = 64
#: Longest integer or float scalar read, in characters: a weight or density needs a handful.
#: Longer ones are refused before PyYAML builds them: its base-60 form (`59:59:...`, YAML 1.1)
#: costs time quadratic in the length, 17 s for a 900 KB scalar, and a long one overflows.
MAX_NUMBER_CHARS = 100

#: The methods lazymerge runs from a config, and the mergekit methods it can only approximate.
SUPPORTED_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "slerp",
    "nearswap",
    "breadcrumbs",
    "breadcrumbs_ties",
    "sce",
    "model_stock",
    "ram",
    "nuslerp",
    "multislerp",
    "karcher",
    "della",
    "della_linear",
    "arcee_fusion",
    "ramplus_tl",
    "passthrough",
)
NEAREST_METHOD: dict[str, str] = {}

REQUIRED = object()
#: mergekit 0.1.5's parameters per method: (global-only ones with defaults, per-model ones).
_GLOBAL_PARAMETERS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0},
    "ties": {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0},
    "dare_linear": {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0},
    "dare_ties": {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0},
    "slerp": {"t": REQUIRED},
    "nearswap": {"t": REQUIRED},
    "breadcrumbs": {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0},
    "breadcrumbs_ties": {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0},
    "sce": {"int8_mask": False, "select_topk": 1.0},
    "model_stock": {"filter_wise": False},
    "ram": {"epsilon": RAM_EPSILON},
    "nuslerp": {"nuslerp_row_wise": False, "nuslerp_flatten": True},
    "multislerp": {"normalize_weights": True, "eps": 1e-8},
    "karcher": {"max_iter": KARCHER_MAX_ITER, "tol": KARCHER_TOL},
    "della": {"int8_mask": False, "normalize": True, "rescale": True, "lambda": 1.0},
    "della_linear": {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0},
    "arcee_fusion": {},
    "ramplus_tl": {"r": RAMPLUS_R, "alpha": RAMPLUS_ALPHA, "epsilon": RAM_EPSILON},
    "passthrough": {},
}
_MODEL_PARAMETERS: dict[str, dict[str, Any]] = {
    "linear": {"weight": REQUIRED},
    "slerp": {},
    "nearswap": {},
    **{
        m: {"weight": REQUIRED, "density": 1.0}
        for m in ("task_arithmetic", "ties", "dare_linear", "dare_ties")
    },
    **{
        m: {"weight": REQUIRED, "density": 1.0, "gamma": BREADCRUMBS_GAMMA}
        for m in ("breadcrumbs", "breadcrumbs_ties")
    },
    **{m: {"weight": REQUIRED, "density": 1.0, "epsilon": DELLA_EPSILON} for m in ("della", "della_linear")},
    **{m: {} for m in ("sce", "model_stock", "ram", "karcher", "arcee_fusion", "ramplus_tl")},
    "nuslerp": {"weight": REQUIRED},
    "multislerp": {"weight": REQUIRED},
    "passthrough": {"scale": 1.0},  # mergekit's is optional (None): the tensor unscaled
}
#: The methods that weigh nothing: lazymerge gives their inputs equal weights, which they ignore.
_UNWEIGHTED = ("sce", "model_stock", "ram", "ramplus_tl")
_BOOL_PARAMETERS = (
    "normalize",
    "rescale",
    "int8_mask",
    "filter_wise",
    "nuslerp_row_wise",
    "nuslerp_flatten",
    "normalize_weights",
)

_TOP_KEYS = (
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "slices",
    "chat_template",
)
_REFUSED_KEYS = {
    "modules": "lazymerge reads one module (a decoder's layers): give models, or slices",
}
#: Longest `layer_range` end read: real models have at most a few hundred layers.
MAX_LAYER = 100_000
#: Most slices, and most sources in one slice (real frankenmerges hold a few dozen slices).
MAX_SLICES = 1024
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


#: Most values in one gradient, and most filters in one parameter: real configs hold a handful,
#: and the plan evaluates each for every tensor.
MAX_GRADIENT = 256
MAX_FILTERS = 64


@dataclass(frozen=True)
class Gradient:
    """A parameter's list of values, interpolated over the layers (mergekit's gradient)."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class Filtered:
    """A parameter's filters: (part of a tensor name or None for any, value), the first that
    matches a tensor's name giving its value."""

    conditions: tuple[tuple[str | None, Any], ...]


@dataclass(frozen=True)
class MergekitRecipe:
    """What a mergekit config asks for, in lazymerge's terms.

    Attributes:
        config: the config file.
        inputs: the weighted models, in the config's order (the base model is `options.base`).
        options: the merge options (method, weights, base, density, dtype, plus the caller's).
        notes: one line each, for stderr: what lazymerge does differently from mergekit 0.1.5.
    """

    config: Path
    inputs: tuple[Path, ...]
    options: MergeOptions
    notes: tuple[str, ...] = ()


def describe(value: Any) -> str:
    """A short description of an untrusted config value for a message: scalars quoted and cut
    to 60 characters, integers of more than 30 digits by their size, structures by type and size
    (never `repr()`, which walks the whole value)."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() <= 100:
            return repr(value)
        try:
            return f"an integer of {len(str(abs(value)))} digits"
        except ValueError:  # beyond Python's int-to-text limit (4300 digits)
            return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:60]) + f"... ({len(value)} characters)"
    if isinstance(value, dict):
        return f"a mapping of {len(value)} key(s)"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item(s)"
    return f"a {type(value).__name__}"


def field_name(key: Any) -> str:
    """A config key as a field name in a message: itself when a short string, else described."""
    return key if isinstance(key, str) and len(key) <= 60 else describe(key)


def resolve_model(reference: str, config_dir: Path) -> Path:
    """The local path a config's model reference names.

    mergekit reads a relative path from the current folder; lazymerge does too, then tries the
    config's own folder. `MODEL+LORA` (a LoRA applied first) is refused.

    Raises:
        MergekitConfigError (a LoRA reference), InputError (nothing there).
    """
    if "+" in reference:
        raise MergekitConfigError(
            f"{describe(reference)} applies a LoRA adapter (MODEL+LORA); lazymerge merges full checkpoints: "
            "merge the adapter into its model first (peft's merge_and_unload) and give that folder"
        )
    path = Path(reference).expanduser()
    for candidate in (path, config_dir / path) if not path.is_absolute() else (path,):
        if candidate.exists():
            return candidate
    raise InputError(
        f"{describe(reference)}: no such file or folder (relative paths are read from the current folder, "
        f"then from {config_dir}); lazymerge reads local checkpoints only: download the model and "
        "give its folder"
    )


def read_mergekit_config(path: Path, **options: Any) -> MergekitRecipe:
    """Read a mergekit YAML config into inputs and merge options.

    Args:
        path: the .yml/.yaml file.
        options: further `MergeOptions` fields the config does not set (`seed`, `max_memory`,
            `shard_size`, `rm`, `strict`, `check_finite`, ...).

    Raises:
        MergekitConfigError naming the file and the field; InputError for an unreadable file or
        a model that is not there; OptionError for a wrong value among `options`.
    """
    path = Path(path)
    doc = _load_yaml(path)
    return _ConfigReader(path, doc).recipe(options)


def _load_yaml(path: Path) -> Any:
    raw = read_small_file(path, CONFIG_LIMIT)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MergekitConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise MergekitConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise MergekitConfigError(f"{path}: nests too deeply to be a mergekit config") from None
    except YamlSizeError as exc:
        raise MergekitConfigError(f"{path}: {exc}") from None
    except ValueError as exc:  # an integer of more than 4300 digits (Python's conversion limit)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MergekitConfigError(f"{path}: a value cannot be read ({first})") from None


class YamlSizeError(ValueError):
    """A YAML document expands to more nodes, or nests deeper, than a mergekit config can."""


def check_node_count(root: yaml.Node) -> None:
    """Count the nodes `root` expands to, each alias counted at every place it is used, and its
    depth, stopping at the first limit passed: the walk costs at most `MAX_YAML_NODES` steps
    whatever the aliases multiply to.

    Raises:
        YamlSizeError for too many nodes, too deep a nesting, or an alias that contains itself.
    """
    count = 0
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise YamlSizeError(
                f"expands to more than {MAX_YAML_NODES:,} YAML nodes (aliases counted at each use); "
                "a mergekit config has a few dozen"
            )
        if depth > MAX_YAML_DEPTH:
            raise YamlSizeError(f"nests deeper than {MAX_YAML_DEPTH} levels; a mergekit config nests 4")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))


class UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no types
    """PyYAML's SafeLoader (what `yaml.safe_load` uses: standard tags only, no Python objects),
    refusing a mapping that repeats a key, which `safe_load` would silently collapse to the last."""

    def construct_document(self, node: yaml.Node) -> Any:
        # before any Python value is built: every later walk of the value is then bounded too
        check_node_count(node)
        return super().construct_document(node)

    def construct_unique_mapping(self, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: construct_mapping refuses it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {describe(key)} appears twice", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[Any, Any] = self.construct_mapping(node, deep=True)
        return mapping

    def construct_short_int(self, node: yaml.ScalarNode) -> Any:
        check_number_length(node)
        return self.construct_yaml_int(node)

    def construct_short_float(self, node: yaml.ScalarNode) -> Any:
        check_number_length(node)
        return self.construct_yaml_float(node)


def check_number_length(node: yaml.ScalarNode) -> None:
    """Refuse an integer or float scalar longer than `MAX_NUMBER_CHARS` before it is built.

    Raises:
        YamlSizeError naming the scalar's line and column.
    """
    text = node.value
    if isinstance(text, str) and len(text) > MAX_NUMBER_CHARS:
        mark = node.start_mark
        raise YamlSizeError(
            f"line {mark.line + 1}, column {mark.column + 1}: a number of {len(text):,} characters, "
            f"more than the {MAX_NUMBER_CHARS} a mergekit value can need; not read"
        )


UniqueKeyLoader.add_constructor("tag:yaml.org,2002:map", UniqueKeyLoader.construct_unique_mapping)
UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_short_int)
UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", UniqueKeyLoader.construct_short_float)


class _ConfigReader:
    """One config document, checked field by field; every error names the file and the field."""

    def __init__(self, path: Path, doc: Any) -> None:
        self.path = path
        self.doc = doc
        self.notes: list[str] = []

    def fail(self, field: str, message: str) -> MergekitConfigError:
        return MergekitConfigError(f"{self.path}: {field}: {message}")

    def recipe(self, options: dict[str, Any]) -> MergekitRecipe:
        doc = self.doc
        if not isinstance(doc, dict):
            raise MergekitConfigError(
                f"{self.path}: not a mergekit config (expected a YAML mapping at the top)"
            )
        for key in doc:
            if key in _REFUSED_KEYS:
                raise self.fail(field_name(key), f"not supported; {_REFUSED_KEYS[key]}")
            if key not in _TOP_KEYS:
                raise self.fail(
                    field_name(key), f"unknown field; a mergekit config here holds {', '.join(_TOP_KEYS)}"
                )
        if "slices" in doc:
            return self.stacked_recipe(options)
        method = self.method()
        models = self.models()
        base_ref = doc.get("base_model")
        if base_ref is not None and not isinstance(base_ref, str):
            raise self.fail("base_model", "give the model as a path string")
        global_params = self.parameters(doc.get("parameters"), "parameters")
        self.check_parameter_names(method, global_params, models)
        base = self.model_path(base_ref, "base_model") if base_ref is not None else None
        paths = [self.model_path(ref, f"models[{i}].model") for i, (ref, _) in enumerate(models)]
        for i, p in enumerate(paths):
            if any(_same(p, q) for q in paths[:i]):
                raise self.fail(f"models[{i}].model", f"{p} is listed twice")
        dtype = self.dtype()
        self.tokenizer_source(paths, base)
        layout = _Layout(method, tuple(paths), base, global_params, tuple(models))
        resolved = self.resolve(layout, *evaluate_all(self, layout, "", 0.0, nominal=True))
        kwargs: dict[str, Any] = {
            "method": method,
            "weights": resolved.weights,
            "base": resolved.base,
            "dtype": dtype,
        }
        if resolved.density is not None:
            kwargs["density"] = resolved.density
        if layout.varies() or resolved.params:
            kwargs["tensor_parameters"] = ConfigTensorParameters(self.path, self.doc, layout, resolved.inputs)
        kwargs["chat_template"] = self.chat_template([*([base] if base is not None else []), *paths])
        return MergekitRecipe(
            self.path, resolved.inputs, MergeOptions(**kwargs, **options), tuple(dict.fromkeys(self.notes))
        )

    def resolve(
        self, layout: _Layout, global_params: dict[str, Any], models: list[tuple[str, dict[str, Any]]]
    ) -> _Resolved:
        """The inputs, weights, base, density and method parameters the config gives for one
        tensor, from its parameters already evaluated there (`evaluate_all`)."""
        method, paths, base = layout.method, list(layout.paths), layout.base
        shared = {
            name: global_params.get(name, default) for name, default in _GLOBAL_PARAMETERS[method].items()
        }
        for name, value in shared.items():
            if value is REQUIRED:
                raise self.fail(f"parameters.{name}", f"required by {method} (mergekit has no default)")
        if "int8_mask" in global_params:
            self.notes.append(
                "parameters.int8_mask ignored: a mergekit memory option with no effect on the result"
            )
        params: tuple[tuple[str, float], ...] = ()
        density: float | None = None
        if method in ("slerp", "nearswap", "arcee_fusion"):
            inputs, weights, base_path = self.slerp(paths, base, shared.get("t", 0.5), method)
        elif method in ("nuslerp", "multislerp", "karcher"):
            inputs, weights, base_path = self.spherical(method, paths, base, models, global_params, shared)
        elif method in _UNWEIGHTED:
            inputs, weights, base_path, density = self.unweighted(method, paths, base, models, shared)
            if method == "ramplus_tl":
                params = tuple(
                    (name, self.number(shared[name], f"parameters.{name}")) for name in ("r", "alpha")
                )
        elif method == "linear":
            inputs, weights, base_path = self.linear(paths, base, models, global_params, shared)
        elif method == "passthrough":
            inputs, weights, base_path = self.passthrough(paths, base, models, global_params)
        else:
            inputs, weights, base_path, density = self.task_vectors(
                method, paths, base, models, global_params, shared
            )
            if method.startswith("della"):
                spec = (paths, base, density)
                params = self.della_parameters(method, spec, models, global_params, shared)
        return _Resolved(tuple(inputs), weights, base_path, density, params)

    def della_parameters(
        self,
        method: str,
        spec: tuple[list[Path], Path | None, float | None],
        models: list[tuple[str, dict[str, Any]]],
        global_params: dict[str, Any],
        shared: dict[str, Any],
    ) -> tuple[tuple[str, float], ...]:
        """della's epsilon (one for every model), mergekit's rescale (to the L1 norm, or none)
        and, for della, lambda (della_linear folds it into the weights); `spec`: the config's
        model paths, its base and the density already resolved."""
        paths, base, density = spec
        epsilons = {
            self.per_model("epsilon", method, params, global_params, f"models[{i}]")
            for i, (path, (_, params)) in enumerate(zip(paths, models, strict=True))
            if base is None or not _same(path, base)
        }
        if len(epsilons) > 1:
            raise self.fail(
                "epsilon", "the models' epsilons differ; lazymerge uses one epsilon for all: give one"
            )
        epsilon = epsilons.pop() if epsilons else DELLA_EPSILON
        if density is not None and density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            raise self.fail(
                "epsilon",
                f"density {density:g} +/- epsilon {epsilon:g} leaves (0, 1) (mergekit refuses it too): "
                "choose a smaller epsilon",
            )
        rescale = RESCALE_L1 if self.flag(shared["rescale"], "parameters.rescale") else RESCALE_NONE
        params = [("epsilon", epsilon), ("rescale", rescale)]
        if method == "della":
            params.append(("scale", self.number(shared["lambda"], "parameters.lambda")))
        return tuple(params)

    # fields

    def method(self) -> str:
        method = self.doc.get("merge_method")
        if method is None:
            raise self.fail("merge_method", f"missing; choose from {', '.join(SUPPORTED_METHODS)}")
        if not isinstance(method, str):
            raise self.fail("merge_method", "expected a method name")
        if method not in SUPPORTED_METHODS:
            nearest = NEAREST_METHOD.get(method)
            hint = f"; nearest: {nearest}" if nearest else ""
            raise self.fail(
                "merge_method",
                f"{describe(method)} is not supported; lazymerge runs {', '.join(SUPPORTED_METHODS)}{hint}",
            )
        return method

    def models(self) -> list[tuple[str, dict[str, Any]]]:
        models = self.doc.get("models")
        if not isinstance(models, list) or not models:
            raise self.fail("models", "expected a list of models, each `- model: PATH`")
        out = []
        for i, entry in enumerate(models):
            field = f"models[{i}]"
            if not isinstance(entry, dict):
                raise self.fail(field, "expected a mapping with model: PATH (and parameters:)")
            for key in entry:
                if key == "layer_range":
                    raise self.fail(
                        f"{field}.layer_range",
                        "a layer range belongs to a slice's sources (slices: - sources: - model: PATH, "
                        "layer_range: [FIRST, END]); under models, each model is merged whole",
                    )
                if key not in ("model", "parameters"):
                    raise self.fail(
                        f"{field}.{field_name(key)}",
                        "unknown field; a model entry holds model and parameters",
                    )
            ref = entry.get("model")
            if not isinstance(ref, str) or not ref:
                raise self.fail(f"{field}.model", "give the model as a path string")
            out.append((ref, self.parameters(entry.get("parameters"), f"{field}.parameters")))
        return out

    def parameters(self, params: Any, field: str) -> dict[str, Any]:
        """A `parameters` mapping, each value a scalar, a `Gradient` or a `Filtered` list."""
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise self.fail(field, "expected a mapping of parameter names to values")
        return {name: self.setting(value, f"{field}.{field_name(name)}") for name, value in params.items()}

    def setting(self, value: Any, field: str) -> Any:
        """One parameter's setting as mergekit 0.1.5 reads it: a scalar, a gradient (a list of
        scalars), or filters (`{filter: NAME, value: V}` or a list of them, V a scalar or a
        gradient)."""
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
            conditions = value if isinstance(value, list) else [value]
            if len(conditions) > MAX_FILTERS:
                raise self.fail(field, f"{len(conditions)} filters; at most {MAX_FILTERS}")
            return Filtered(tuple(self.condition(c, f"{field}[{i}]") for i, c in enumerate(conditions)))
        if isinstance(value, list):
            return self.gradient(value, field)
        return value

    def gradient(self, value: list[Any], field: str) -> Gradient:
        if len(value) > MAX_GRADIENT:
            raise self.fail(field, f"a gradient of {len(value)} values; at most {MAX_GRADIENT}")
        for i, item in enumerate(value):
            if isinstance(item, (list, dict)) or item is None:
                raise self.fail(
                    f"{field}[{i}]", f"expected a number (or true/false) in a gradient, got {describe(item)}"
                )
        return Gradient(tuple(value))

    def condition(self, entry: Any, field: str) -> tuple[str | None, Any]:
        if not isinstance(entry, dict):
            raise self.fail(
                field, f"expected {{filter: NAME, value: V}} among filters, got {describe(entry)}"
            )
        for key in entry:
            if key not in ("filter", "value"):
                raise self.fail(
                    f"{field}.{field_name(key)}", "unknown field; a filter holds filter and value"
                )
        if "value" not in entry:
            raise self.fail(f"{field}.value", "missing (mergekit requires it)")
        name = entry.get("filter")
        if name is not None and not isinstance(name, str):
            raise self.fail(f"{field}.filter", f"expected part of a tensor name, got {describe(name)}")
        value = entry["value"]
        if isinstance(value, dict):
            raise self.fail(f"{field}.value", "expected a number or a gradient (filters do not nest)")
        return name, self.gradient(value, f"{field}.value") if isinstance(value, list) else value

    def check_parameter_names(
        self, method: str, global_params: dict[str, Any], models: list[tuple[str, dict[str, Any]]]
    ) -> None:
        shared, per_model = _GLOBAL_PARAMETERS[method], _MODEL_PARAMETERS[method]
        known = ", ".join([*shared, *per_model])
        for name in global_params:
            if name not in shared and name not in per_model:
                raise self.fail(
                    f"parameters.{field_name(name)}", f"not a parameter of {method}; it takes {known}"
                )
        for i, (_, params) in enumerate(models):
            for name in params:
                field = f"models[{i}].parameters.{field_name(name)}"
                if name in shared:
                    raise self.fail(
                        field, f"a global parameter of {method}: move it to the top-level parameters"
                    )
                if name not in per_model:
                    raise self.fail(field, f"not a parameter of {method}; it takes {known}")

    def model_path(self, ref: str, field: str) -> Path:
        try:
            return resolve_model(ref, self.path.parent)
        except MergekitConfigError as exc:
            raise self.fail(field, str(exc)) from None
        except InputError as exc:
            raise InputError(f"{self.path}: {field}: {exc}") from None

    def dtype(self) -> str:
        chosen = "auto"
        for field in ("dtype", "out_dtype"):  # out_dtype, when given, is the output's
            value = self.doc.get(field)
            if value is None:
                continue
            name = value.removeprefix("torch.") if isinstance(value, str) else ""
            if name not in _DTYPES:
                raise self.fail(
                    field,
                    f"{describe(value)} is not supported; choose {', '.join(_DTYPES)} (float64: use float32)",
                )
            chosen = _DTYPES[name]
        return chosen

    def tokenizer_source(self, paths: list[Path], base: Path | None) -> None:
        """`tokenizer_source` or `tokenizer: {source: ...}`: `union` with a reward model (its
        merge matches rows by token), or `base` or a model when every model shares that one's
        tokenizer files (the output keeps them, the embeddings merge by position)."""
        field, source = self.tokenizer_setting()
        if source is None:
            return
        if source == "union" and _has_reward_model(paths):
            self.notes.append(
                f"{field}: union: lazymerge matches embedding rows by token; the output "
                "vocabulary is the reward model's plus the tokens only a domain model has"
            )
            return
        if source != "union" and isinstance(source, str):
            if source != "base":
                origin = self.model_path(source, field)
            elif base is not None:
                origin = base
            else:
                raise self.fail(field, "'base' needs base_model: give it, or name a model")
            difference = _tokenizer_difference(origin, [*paths, *([base] if base is not None else [])])
            if difference is None:
                self.notes.append(
                    f"{field}: {describe(source)}: every model has its tokenizer files; the output keeps them"
                )
                return
            raise self.fail(
                field,
                f"{describe(source)}: {difference}; lazymerge merges embeddings by position only when the "
                "models share one tokenizer (by token only with a reward model: tokenizer_source: union)",
            )
        raise self.fail(
            field,
            f"{describe(source)} is not supported here; lazymerge merges embeddings by position when the models "
            "share one vocabulary (remove tokenizer_source) and by token only when a reward model is "
            "among them (tokenizer_source: union, or leave it out)",
        )

    def tokenizer_setting(self) -> tuple[str, Any]:
        """(the field that names the tokenizer's source, its value): `tokenizer_source`, or the
        `source` of a `tokenizer` section (whose `tokens` and `pad_to_multiple_of` are refused)."""
        section = self.doc.get("tokenizer")
        if section is None:
            return "tokenizer_source", self.doc.get("tokenizer_source")
        if "tokenizer_source" in self.doc:
            raise self.fail("tokenizer", "give tokenizer or tokenizer_source, not both")
        if not isinstance(section, dict):
            raise self.fail("tokenizer", "expected a mapping such as {source: base}")
        for key in section:
            if key != "source":
                raise self.fail(
                    f"tokenizer.{field_name(key)}",
                    "not supported; lazymerge keeps a tokenizer as it is (no tokens added or padded): remove it",
                )
        return "tokenizer.source", section.get("source")

    def chat_template(self, models: list[Path]) -> str | None:
        """`chat_template` as mergekit 0.1.5 resolves it: `auto` for the template most of the
        models (base model first) have, stripped (None when none has one), or a Jinja template
        (20 characters or more, with a `{`). Its named templates are refused: lazymerge does not
        ship mergekit's template files."""
        value = self.doc.get("chat_template")
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail("chat_template", f"expected auto or a Jinja template, got {describe(value)}")
        if value == "auto":
            return self.plurality_template(models)
        if "{" not in value or len(value) < 20:
            if len(value) < 256 and "\n" not in value and "{" not in value:
                raise self.fail(
                    "chat_template",
                    f"{describe(value)} names one of mergekit's own template files (alpaca, chatml, exaone, "
                    "llama3, mistral in 0.1.5), which lazymerge does not ship: give the template's Jinja "
                    "text, or auto",
                )
            raise self.fail(
                "chat_template",
                f"{describe(value)} is not a chat template (mergekit wants Jinja of 20 characters or more, with a {{)",
            )
        return value

    def plurality_template(self, models: list[Path]) -> str | None:
        """The chat template most `models` have (stripped; a tie goes to the first in `models`)."""
        from collections import Counter

        found = [t for t in (model_chat_template(m) for m in models) if t]
        if not found:
            self.notes.append(
                "chat_template: auto: no model has a chat template; the output keeps its files' own"
            )
            return None
        chosen = Counter(found).most_common(1)[0][0]
        self.notes.append(
            f"chat_template: auto: the template of {found.count(chosen)} of the {len(models)} models "
            "(a tie goes to the first listed, base model first; mergekit's order there is a set's)"
        )
        return chosen

    # parameter values

    def number(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise self.fail(field, f"expected a number, got {describe(value)}")
        try:
            number = float(value)  # YAML 1.1 reads 1e-3 as a string; mergekit accepts it as a number
        except (ValueError, OverflowError):  # OverflowError: an integer beyond a float's range
            raise self.fail(field, f"expected a number, got {describe(value)}") from None
        if not math.isfinite(number) or abs(number) > 1e6:
            raise self.fail(field, f"{describe(value)} is not a usable number")
        return number

    def flag(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, f"expected true or false, got {describe(value)}")
        return value

    def per_model(
        self, name: str, method: str, params: dict[str, Any], global_params: dict[str, Any], field: str
    ) -> float:
        """A per-model parameter: the model's own, else the global one, else mergekit's default."""
        if name in params:
            return self.number(params[name], f"{field}.parameters.{name}")
        if name in global_params:
            return self.number(global_params[name], f"parameters.{name}")
        default = _MODEL_PARAMETERS[method][name]
        if default is REQUIRED:
            raise self.fail(f"{field}.parameters.{name}", f"required by {method} (mergekit has no default)")
        return float(default)

    # methods

    def linear(
        self,
        paths: list[Path],
        base: Path | None,
        models: list[tuple[str, dict[str, Any]]],
        global_params: dict[str, Any],
        shared: dict[str, Any],
    ) -> tuple[list[Path], tuple[float, ...], None]:
        if base is not None and not any(_same(base, p) for p in paths):
            raise self.fail(
                "base_model",
                "linear has no base model (mergekit would add it as one more weighted input): "
                "list it under models with a weight, or remove base_model",
            )
        self.at_least_two(paths, "linear")
        weights = [
            self.per_model("weight", "linear", params, global_params, f"models[{i}]")
            for i, (_, params) in enumerate(models)
        ]
        if self.flag(shared["normalize"], "parameters.normalize"):
            total = sum(weights)
            if total == 0:
                raise self.fail("parameters.normalize", "the weights sum to 0 and cannot be normalised")
            weights = [w / total for w in weights]
        return paths, tuple(weights), None

    def slerp(
        self, paths: list[Path], base: Path | None, t: Any, method: str = "slerp"
    ) -> tuple[list[Path], tuple[float, ...], None]:
        """slerp and nearswap: base_model first, the other model second, t as its weight."""
        if base is None:
            goes = {"slerp": "interpolates from", "nearswap": "swaps in values near"}.get(
                method, "fuses into"
            )
            raise self.fail("base_model", f"{method} {goes} base_model and the other model: give it")
        others = [p for p in paths if not _same(p, base)]
        if len(others) != 1:
            raise self.fail(
                "models",
                f"{method} takes base_model and exactly one other model, got {len(others)} others; "
                "for more models use linear",
            )
        t_value = self.number(t, "parameters.t")
        return [base, others[0]], (1.0 - t_value, t_value), None

    def spherical(
        self,
        method: str,
        paths: list[Path],
        base: Path | None,
        models: list[tuple[str, dict[str, Any]]],
        global_params: dict[str, Any],
        shared: dict[str, Any],
    ) -> tuple[list[Path], tuple[float, ...], None]:
        """nuslerp, multislerp (weighted, no base) and karcher (every model, base included, equal)."""
        if method == "karcher":
            for name in ("max_iter", "tol"):
                if self.number(shared[name], f"parameters.{name}") != _GLOBAL_PARAMETERS["karcher"][name]:
                    raise self.fail(
                        f"parameters.{name}",
                        f"lazymerge's karcher uses mergekit's default ({_GLOBAL_PARAMETERS['karcher'][name]:g}) "
                        f"only; remove {name}",
                    )
            inputs = paths if base is None or any(_same(base, p) for p in paths) else [*paths, base]
            self.at_least_two(inputs, method)
            return inputs, tuple(1.0 / len(inputs) for _ in inputs), None
        if base is not None:
            raise self.fail(
                "base_model",
                f"lazymerge's {method} interpolates the models themselves, not task vectors from a base: "
                "remove base_model",
            )
        if method == "nuslerp":
            if self.flag(shared["nuslerp_row_wise"], "parameters.nuslerp_row_wise") or not self.flag(
                shared["nuslerp_flatten"], "parameters.nuslerp_flatten"
            ):
                raise self.fail(
                    "parameters.nuslerp_flatten",
                    "only the flattened form (nuslerp_flatten: true, nuslerp_row_wise: false) is supported",
                )
            if len(paths) != 2:
                raise self.fail("models", f"nuslerp takes exactly two models, got {len(paths)}")
        else:
            self.at_least_two(paths, method)
            if not self.flag(shared["normalize_weights"], "parameters.normalize_weights"):
                raise self.fail(
                    "parameters.normalize_weights", "lazymerge's multislerp always normalises the weights"
                )
            if self.number(shared["eps"], "parameters.eps") != 1e-8:
                raise self.fail(
                    "parameters.eps", "lazymerge's multislerp uses mergekit's default (1e-8) only"
                )
        weights = [
            self.per_model("weight", method, params, global_params, f"models[{i}]")
            for i, (_, params) in enumerate(models)
        ]
        if method == "multislerp" and sum(weights) == 0:
            raise self.fail("models", "the weights sum to 0 and cannot be normalised")
        return paths, tuple(weights), None

    def unweighted(
        self,
        method: str,
        paths: list[Path],
        base: Path | None,
        models: list[tuple[str, dict[str, Any]]],
        shared: dict[str, Any],
    ) -> tuple[list[Path], tuple[float, ...], Path, float | None]:
        """sce, model_stock and ram: task-vector methods that compute their own weights."""
        if base is None:
            raise self.fail("base_model", f"{method} merges task vectors (model - base): give base_model")
        inputs = [p for p in paths if not _same(p, base)]
        if len(inputs) < 2:
            raise self.fail(
                "models",
                f"{method} with {len(inputs)} model(s) besides the base: lazymerge needs two or more",
            )
        density = None
        if method == "sce":
            self.flag(shared["int8_mask"], "parameters.int8_mask")
            density = self.number(shared["select_topk"], "parameters.select_topk")
            if not MIN_DENSITY <= density <= 1:
                raise self.fail("parameters.select_topk", f"{density:g} is outside [{MIN_DENSITY:g}, 1]")
            self.notes.append(
                "sce: lazymerge elects the sign of the deltas' sum as the papers do and keeps no delta "
                "where that sum is exactly 0; mergekit 0.1.5 keeps the positive ones there"
            )
        elif method == "model_stock":
            if self.flag(shared["filter_wise"], "parameters.filter_wise"):
                raise self.fail(
                    "parameters.filter_wise",
                    "true is not supported; lazymerge's model_stock takes one cosine per tensor (false)",
                )
        elif self.number(shared["epsilon"], "parameters.epsilon") != RAM_EPSILON:
            raise self.fail(
                "parameters.epsilon",
                f"lazymerge's {method} counts deltas above {RAM_EPSILON:g} (mergekit's default) only; "
                "remove epsilon",
            )
        return inputs, tuple(1.0 / len(inputs) for _ in inputs), base, density

    def task_vectors(
        self,
        method: str,
        paths: list[Path],
        base: Path | None,
        models: list[tuple[str, dict[str, Any]]],
        global_params: dict[str, Any],
        shared: dict[str, Any],
    ) -> tuple[list[Path], tuple[float, ...], Path, float]:
        """The task-vector methods: the models besides the base, their weights (lambda and
        normalisation folded in where the method is linear in them) and the one density."""
        if base is None:
            raise self.fail("base_model", f"{method} merges task vectors (model - base): give base_model")
        inputs, weights, densities = self.task_vector_models(method, paths, base, models, global_params)
        if len(inputs) < 2:
            raise self.fail(
                "models",
                f"{method} with {len(inputs)} model(s) besides the base: lazymerge needs two; for one "
                "model, linear over base_model and the model with weights 1-w, w gives base + w (model - base)",
            )
        density = self.task_vector_density(method, densities, models, global_params)
        normalize = self.flag(shared["normalize"], "parameters.normalize")
        rescale = self.flag(shared["rescale"], "parameters.rescale")
        self.flag(shared["int8_mask"], "parameters.int8_mask")
        scale = self.number(shared["lambda"], "parameters.lambda")
        if method in ("task_arithmetic", "dare_linear", "breadcrumbs", "della_linear"):
            # base + lambda * sum_i w_i d_i / (sum_i w_i if normalize): the same weights, rescaled
            total = sum(weights)
            divisor = total if normalize and abs(total) >= 1e-8 else 1.0
            weights = [scale * w / divisor for w in weights]
        elif scale != 1 and method != "della":  # della takes lambda as its `scale`
            raise self.fail(
                "parameters.lambda",
                f"lazymerge's {method} has no lambda (its result is base + the merged task vector); remove it",
            )
        self.paper_note(method, normalize, rescale)
        return inputs, tuple(weights), base, density

    def task_vector_models(
        self,
        method: str,
        paths: list[Path],
        base: Path,
        models: list[tuple[str, dict[str, Any]]],
        global_params: dict[str, Any],
    ) -> tuple[list[Path], list[float], list[float]]:
        """(the models besides the base, each one's weight, each one's density); a base model
        listed among the models is skipped, with a note when it was given parameters."""
        inputs, weights, densities = [], [], []
        for i, (path, (_, params)) in enumerate(zip(paths, models, strict=True)):
            if _same(path, base):
                if params:
                    self.notes.append(
                        f"models[{i}] is the base model: its {', '.join(params)} not used (as in mergekit)"
                    )
                continue
            inputs.append(path)
            weights.append(self.per_model("weight", method, params, global_params, f"models[{i}]"))
            densities.append(self.per_model("density", method, params, global_params, f"models[{i}]"))
            if method.startswith("breadcrumbs"):
                gamma = self.per_model("gamma", method, params, global_params, f"models[{i}]")
                if gamma != BREADCRUMBS_GAMMA:
                    raise self.fail(
                        f"models[{i}].parameters.gamma",
                        f"lazymerge's breadcrumbs drops the top {BREADCRUMBS_GAMMA:g} (mergekit's default) "
                        "only; remove gamma",
                    )
        return inputs, weights, densities

    def task_vector_density(
        self,
        method: str,
        densities: list[float],
        models: list[tuple[str, dict[str, Any]]],
        global_params: dict[str, Any],
    ) -> float:
        """The one density of every model (1 for task_arithmetic, which has none)."""
        density = densities[0]
        if any(d != density for d in densities):
            raise self.fail(
                "density", "the models' densities differ; lazymerge uses one density for all: give one"
            )
        if method == "task_arithmetic":
            if any(("density" in p) for _, p in models) or "density" in global_params:
                self.notes.append("density has no effect on task_arithmetic (nor in mergekit)")
            return 1.0
        if not MIN_DENSITY <= density <= 1:
            raise self.fail("density", f"{density:g} is outside [{MIN_DENSITY:g}, 1]")
        return density

    def paper_note(self, method: str, normalize: bool, rescale: bool) -> None:
        """One line on where mergekit 0.1.5 computes this method differently from lazymerge."""
        differences = []
        if method.startswith("dare"):
            differences.append(
                "rescales each kept delta to its L1 norm" if rescale else "does not rescale the kept deltas"
            )
            differences.append("draws its drop masks from torch's generator")
        if method in ("ties", "breadcrumbs", "breadcrumbs_ties") and rescale:
            differences.append("rescales the trimmed deltas to their L1 norm")
        if method.startswith("della"):
            differences.append("draws its keep masks from torch's generator")
            differences.append("ranks equal magnitudes in no set order")
        if method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
            if not normalize:
                differences.append("does not divide by the agreeing weights (normalize: false)")
            differences.append("keeps positive deltas where the weighted sum is exactly 0")
        if method == "ties":
            differences.append("keeps floor(density x n) deltas, not round(density x n)")
        if not differences:
            return
        ours = {
            "dare_linear": "drops with probability 1 - density and rescales survivors by 1/density (DARE), "
            "masks from --seed",
            "dare_ties": "drops and rescales by 1/density (DARE), then elects signs on the weighted sum "
            "and divides by the agreeing weights (TIES)",
            "ties": "trims to the top density by magnitude, elects signs on the weighted sum and "
            "divides by the agreeing weights (TIES)",
            "breadcrumbs": "trims outliers and small deltas and adds the weighted deltas (Model Breadcrumbs)",
            "breadcrumbs_ties": "trims outliers and small deltas (Model Breadcrumbs), elects signs on the "
            "weighted sum and divides by the agreeing weights (TIES)",
            "della": "MagPrune masks from --seed, rescaled as the config says (mergekit's rescale), "
            "then signs elected on the weighted sum and the agreeing weights divided out (TIES)",
            "della_linear": "MagPrune masks from --seed, rescaled as the config says (mergekit's rescale)",
        }[method]
        self.notes.append(
            f"{method}: lazymerge keeps the papers' definition ({ours}); mergekit 0.1.5 "
            f"{'; '.join(differences)}"
        )

    def at_least_two(self, paths: list[Path], method: str) -> None:
        if len(paths) < 2:
            raise self.fail("models", f"{method} needs at least two models, got {len(paths)}")

    def passthrough(
        self,
        paths: list[Path],
        base: Path | None,
        models: list[tuple[str, dict[str, Any]]],
        global_params: dict[str, Any],
    ) -> tuple[list[Path], tuple[float, ...], None]:
        """passthrough: one model (one source per slice), its tensors times `scale` (default 1)."""
        if base is not None:
            raise self.fail(
                "base_model", "passthrough copies one model's tensors and has no base model: remove it"
            )
        if len(paths) != 1:
            raise self.fail(
                "models",
                f"passthrough takes exactly one model, got {len(paths)} (to stack layers of several, "
                "give each its own slice)",
            )
        scale = self.per_model("scale", "passthrough", models[0][1], global_params, "models[0]")
        return paths, (scale,), None

    # slices

    def stacked_recipe(self, options: dict[str, Any]) -> MergekitRecipe:
        """A config with `slices`: a layer stack over the slices' sources (`options.LayerStack`)."""
        if "models" in self.doc:
            raise self.fail("slices", "give models or slices, not both (mergekit refuses both too)")
        method = self.method()
        global_params = self.parameters(self.doc.get("parameters"), "parameters")
        base_ref = self.doc.get("base_model")
        if base_ref is not None and not isinstance(base_ref, str):
            raise self.fail("base_model", "give the model as a path string")
        base = self.model_path(base_ref, "base_model") if base_ref is not None else None
        parts = self.slices(method, base, global_params)
        if len(parts[-1].paths) > len(parts[0].paths):
            raise self.fail(
                f"slices[{len(parts) - 1}].sources",
                "the last slice has more sources than the first; the tensors after the layers (final "
                "norm, heads) come from the last slice's sources paired with the first's (mergekit "
                "drops the extra ones): give the two slices the same sources",
            )
        dtype = self.dtype()
        field, source = self.tokenizer_setting()
        if source == "union":
            raise self.fail(field, "union is not supported with slices: the models must share one tokenizer")
        needs_base = METHODS[method].needs_base
        weighted: list[Path] = []
        resolved_inputs = []
        for s, layout in enumerate(parts):
            found, models = evaluate_all(self, layout, "", 0.0, nominal=True)
            resolved = self.in_slice(s, self.resolve, layout, found, models)
            resolved_inputs.append(resolved.inputs)
            weighted.extend(p for p in resolved.inputs if not any(_same(p, q) for q in weighted))
        self.tokenizer_source([*weighted, *([base] if base is not None else [])], base)
        checkpoints = (*weighted, *([base] if needs_base and base is not None else []))
        stack = LayerStack(
            tuple(self.layer_slice(s, part, checkpoints, resolved_inputs[s]) for s, part in enumerate(parts)),
            ConfigSliceParameters(self.path, self.doc, tuple(parts), checkpoints),
        )
        kwargs: dict[str, Any] = {"method": method, "dtype": dtype, "layer_stack": stack}
        if needs_base:
            kwargs["base"] = base
        kwargs["chat_template"] = self.chat_template([*([base] if base is not None else []), *weighted])
        return MergekitRecipe(
            self.path, tuple(weighted), MergeOptions(**kwargs, **options), tuple(dict.fromkeys(self.notes))
        )

    def in_slice(self, s: int, call: Callable[..., _T], *args: Any) -> _T:
        """`call(*args)`, its errors saying that their `models[i]` are slice `s`'s sources."""
        try:
            return call(*args)
        except MergekitConfigError as exc:
            raise MergekitConfigError(
                f"{exc} (in slices[{s}]: models[i] is slices[{s}].sources[i])"
            ) from None

    def slices(self, method: str, base: Path | None, global_params: dict[str, Any]) -> list[_Layout]:
        """Each slice of `slices` as the layout of a merge of its sources (their layer ranges
        kept in `_Layout.ranges`), the config's parameters as the outer scope."""
        value = self.doc.get("slices")
        if not isinstance(value, list) or not value:
            raise self.fail(
                "slices", "expected a list of slices, each `- sources: [{model: PATH, layer_range: [A, B]}]`"
            )
        if len(value) > MAX_SLICES:
            raise self.fail("slices", f"{len(value)} slices; at most {MAX_SLICES}")
        return [self.one_slice(i, entry, method, base, global_params) for i, entry in enumerate(value)]

    def one_slice(
        self, i: int, entry: Any, method: str, base: Path | None, global_params: dict[str, Any]
    ) -> _Layout:
        field = f"slices[{i}]"
        if not isinstance(entry, dict):
            raise self.fail(field, "expected a mapping with sources: (and parameters:)")
        for key in entry:
            if key in ("residual_weight",):
                raise self.fail(
                    f"{field}.{key}", "not supported (mergekit 0.1.5 reads it and never uses it): remove it"
                )
            if key not in ("sources", "parameters", "base_model"):
                raise self.fail(
                    f"{field}.{field_name(key)}", "unknown field; a slice holds sources and parameters"
                )
        if "base_model" in entry:
            own = entry["base_model"]
            if (
                not isinstance(own, str)
                or base is None
                or not _same(self.model_path(own, f"{field}.base_model"), base)
            ):
                raise self.fail(
                    f"{field}.base_model",
                    "a base model per slice is not supported: give the one base_model at the top",
                )
        params = self.parameters(entry.get("parameters"), f"{field}.parameters")
        sources = self.slice_sources(field, entry.get("sources"))
        models = [(ref, p) for ref, _, p in sources]
        self.in_slice(i, self.check_parameter_names, method, {**global_params, **params}, models)
        paths = [self.model_path(ref, f"{field}.sources[{k}].model") for k, (ref, _, _) in enumerate(sources)]
        for k, p in enumerate(paths):
            if any(_same(p, q) for q in paths[:k]):
                raise self.fail(f"{field}.sources[{k}].model", f"{p} is listed twice in one slice")
        if base is not None and method != "passthrough" and not any(_same(p, base) for p in paths):
            raise self.fail(
                f"{field}.sources",
                "base_model is not among them: mergekit takes a slice's tensors from its sources only; "
                "list base_model there with the same number of layers",
            )
        lengths = {end - first for _, (first, end), _ in sources}
        if len(lengths) > 1:
            raise self.fail(
                f"{field}.sources", "the layer ranges differ in length (mergekit requires one length)"
            )
        ranges = tuple(r for _, r, _ in sources)
        return _Layout(
            method, tuple(paths), base, params, tuple(models), outer_params=global_params, ranges=ranges
        )

    def slice_sources(self, field: str, value: Any) -> list[tuple[str, tuple[int, int], dict[str, Any]]]:
        """A slice's sources: (model reference, (first layer, end), parameters) each."""
        if not isinstance(value, list) or not value:
            raise self.fail(f"{field}.sources", "expected a list of {model: PATH, layer_range: [A, B]}")
        if len(value) > MAX_SLICES:
            raise self.fail(f"{field}.sources", f"{len(value)} sources; at most {MAX_SLICES}")
        out = []
        for k, source in enumerate(value):
            where = f"{field}.sources[{k}]"
            if not isinstance(source, dict):
                raise self.fail(where, "expected a mapping with model: PATH and layer_range: [A, B]")
            for key in source:
                if key not in ("model", "layer_range", "parameters"):
                    raise self.fail(
                        f"{where}.{field_name(key)}",
                        "unknown field; a source holds model, layer_range and parameters",
                    )
            ref = source.get("model")
            if not isinstance(ref, str) or not ref:
                raise self.fail(f"{where}.model", "give the model as a path string")
            out.append(
                (
                    ref,
                    self.layer_range(source.get("layer_range"), f"{where}.layer_range"),
                    self.parameters(source.get("parameters"), f"{where}.parameters"),
                )
            )
        return out

    def layer_range(self, value: Any, field: str) -> tuple[int, int]:
        """[FIRST, END]: layers FIRST to END - 1 (mergekit's half-open range)."""
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise self.fail(field, f"expected [FIRST, END], two whole numbers, got {describe(value)}")
        first, end = value
        if not 0 <= first < end <= MAX_LAYER:
            raise self.fail(field, f"[{first}, {end}] is not a range of layers (0 <= FIRST < END)")
        return first, end

    def layer_slice(
        self, s: int, layout: _Layout, checkpoints: tuple[Path, ...], inputs: tuple[Path, ...]
    ) -> LayerSlice:
        """Slice `s` as the plan takes it: each source's checkpoint index and first layer; the
        slice's weighted inputs must keep the merge's order (slerp's base first)."""
        where = [next(i for i, c in enumerate(checkpoints) if _same(c, p)) for p in inputs]
        if where != sorted(where):
            raise self.fail(
                f"slices[{s}].sources",
                "lists the models in another order than the slices before it; lazymerge merges each "
                "tensor's inputs in one order: list them in the same order in every slice",
            )
        sources = []
        for k, (path, (first, _)) in enumerate(zip(layout.paths, layout.ranges, strict=True)):
            index = next((i for i, c in enumerate(checkpoints) if _same(c, path)), None)
            if index is None:  # defensive: every source is a weighted input or the base
                raise self.fail(f"slices[{s}].sources[{k}]", f"{layout.method} takes no tensor from it")
            sources.append((index, first))
        first, end = layout.ranges[0]
        return LayerSlice(tuple(sources), end - first)


@dataclass(frozen=True)
class _Layout:
    """What a config's recipe is made of before any tensor is named: the method, the model
    paths, the base, and the parameters' settings (global, then per model)."""

    method: str
    paths: tuple[Path, ...]
    base: Path | None
    global_params: dict[str, Any]
    models: tuple[tuple[str, dict[str, Any]], ...]
    #: For a slice: the config's own parameters, the scope below the slice's (`global_params`).
    outer_params: dict[str, Any] = dataclass_field(default_factory=dict)
    #: For a slice: each source's layer range (first, end).
    ranges: tuple[tuple[int, int], ...] = ()

    def varies(self) -> bool:
        """True when some parameter is a gradient or filtered (its value depends on the tensor)."""
        settings = [*self.global_params.values(), *(v for _, p in self.models for v in p.values())]
        return any(isinstance(v, (Gradient, Filtered)) for v in settings)


@dataclass(frozen=True)
class _Resolved:
    """One tensor's recipe: the weighted inputs, their weights, the base, density and parameters."""

    inputs: tuple[Path, ...]
    weights: tuple[float, ...]
    base: Path | None
    density: float | None
    params: tuple[tuple[str, float], ...]


def evaluate_setting(
    reader: _ConfigReader, setting: Any, param: str, field: str, tensor: str, t: float, nominal: bool = False
) -> Any:
    """A parameter's value at one tensor, as mergekit 0.1.5's `evaluate_setting` resolves it: the
    first filter that is absent, `*`, or part of the tensor's name gives the value (None when none
    matches: the next scope's value, then the default, applies); a gradient of numbers is
    interpolated linearly at t over its values, one of true/false picks value int(t (n - 1)).

    With `nominal` (the plan's summary weights, no tensor named), filters that do not match fall
    to their first value.
    """
    if isinstance(setting, Filtered):
        for i, (pattern, value) in enumerate(setting.conditions):
            if pattern is None or pattern == "*" or (tensor and pattern in tensor):
                return evaluate_setting(reader, value, param, f"{field}[{i}].value", tensor, t)
        if nominal and setting.conditions:
            return evaluate_setting(reader, setting.conditions[0][1], param, f"{field}[0].value", tensor, t)
        return None
    if not isinstance(setting, Gradient):
        return setting
    values = setting.values
    if not values:
        return None
    if param in _BOOL_PARAMETERS:
        return values[int(t * (len(values) - 1))]
    numbers = [reader.number(v, f"{field}[{i}]") for i, v in enumerate(values)]
    scaled = t * (len(numbers) - 1)
    low = int(scaled)
    high = min(len(numbers) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * numbers[low] + frac * numbers[high]


def evaluate_all(
    reader: _ConfigReader,
    layout: _Layout,
    tensor: str,
    t: float,
    nominal: bool = False,
    names: Sequence[str] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Every parameter evaluated at one tensor: (global values, per model (reference, values)),
    a parameter left out where its setting gives no value there. A slice's own parameters come
    before the config's (`outer_params`), each scope's filters tried in turn as mergekit does;
    a model's parameters are evaluated at its own tensor's name (`names`, one per model: a
    slice's sources take other layers), the shared ones at the output's."""
    found = {}
    for scope in (layout.outer_params, layout.global_params):
        for name, setting in scope.items():
            value = evaluate_setting(reader, setting, name, f"parameters.{name}", tensor, t, nominal)
            if value is not None:
                found[name] = value
    models = []
    for i, (ref, params) in enumerate(layout.models):
        values = {}
        own = tensor if names is None else names[i]
        for name, setting in params.items():
            field = f"models[{i}].parameters.{name}"
            value = evaluate_setting(reader, setting, name, field, own, t, nominal)
            if value is not None:
                values[name] = value
        models.append((ref, values))
    return found, models


@dataclass(frozen=True, eq=False)
class ConfigTensorParameters:
    """A config's per-tensor values (`options.TensorParameters`): its parameters evaluated at
    each tensor's name and layer, then the method's recipe made from them (normalisation,
    lambda and mergekit's defaults applied per tensor, as mergekit does). Recipes are kept by
    the evaluated values, so a model's tensors share a few."""

    path: Path
    doc: Any
    layout: _Layout
    inputs: tuple[Path, ...]
    cache: dict[Any, TensorValues] = dataclass_field(default_factory=dict, repr=False)

    def values(self, tensor: str, t: float) -> TensorValues:
        reader = _ConfigReader(self.path, self.doc)
        try:
            found, models = evaluate_all(reader, self.layout, tensor, t)
            key = (tuple(sorted(found.items())), tuple(tuple(sorted(p.items())) for _, p in models))
            cached = self.cache.get(key)
            if cached is None:
                resolved = reader.resolve(self.layout, found, models)
                cached = TensorValues(resolved.weights, resolved.density, resolved.params)
                self.cache[key] = cached
        except MergekitConfigError as exc:
            raise MergekitConfigError(
                f"{exc} (at tensor {describe(tensor)}, gradient position t = {t:g})"
            ) from None
        return cached


@dataclass(frozen=True, eq=False)
class ConfigSliceParameters:
    """A config's per-tensor values for a layer stack (`options.SliceParameters`): each slice's
    recipe (`_Layout` over its sources), evaluated at each output tensor and its sources' names,
    the weights placed at the merge's checkpoints (`checkpoints`: weighted inputs, then the base)."""

    path: Path
    doc: Any
    layouts: tuple[_Layout, ...]
    checkpoints: tuple[Path, ...]
    cache: dict[Any, TensorValues] = dataclass_field(default_factory=dict, repr=False)

    def values(self, slice_index: int, tensor: str, source_names: tuple[str, ...], t: float) -> TensorValues:
        reader = _ConfigReader(self.path, self.doc)
        layout = self.layouts[slice_index]
        try:
            found, models = evaluate_all(reader, layout, tensor, t, names=source_names)
            key = (
                slice_index,
                tuple(sorted(found.items())),
                tuple(tuple(sorted(p.items())) for _, p in models),
            )
            cached = self.cache.get(key)
            if cached is None:
                resolved = reader.in_slice(slice_index, reader.resolve, layout, found, models)
                weights = [0.0] * len(self.checkpoints)
                for path, weight in zip(resolved.inputs, resolved.weights, strict=True):
                    weights[next(i for i, c in enumerate(self.checkpoints) if _same(c, path))] = weight
                cached = TensorValues(tuple(weights), resolved.density, resolved.params)
                self.cache[key] = cached
        except MergekitConfigError as exc:
            raise MergekitConfigError(
                f"{exc} (at tensor {describe(tensor)}, gradient position t = {t:g})"
            ) from None
        return cached


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


#: The tokenizer files a tokenizer source must share with every model (what mergekit copies).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def _tokenizer_difference(origin: Path, paths: list[Path]) -> str | None:
    """None when every path's model folder holds the same tokenizer files, byte for byte, as
    `origin`'s; else what differs, for a message.

    Raises:
        InputError for a file that cannot be read or is over the size limit.
    """
    from lazymerge.io.hf_folder import MAX_JSON_BYTES, model_folder

    source = model_folder(origin)
    present = [n for n in TOKENIZER_FILES if source is not None and (source / n).is_file()]
    if source is None or not {"tokenizer.json", "tokenizer.model"} & set(present):
        return f"{origin} has no tokenizer files (tokenizer.json or tokenizer.model)"
    wanted = {n: read_small_file(source / n, MAX_JSON_BYTES) for n in present}
    for path in paths:
        folder = model_folder(path)
        if folder is None:
            return f"{path} has no tokenizer files"
        if _same(folder, source):
            continue
        for name in TOKENIZER_FILES:
            there = folder / name
            if (name in wanted) != there.is_file():
                missing = there if name in wanted else source / name
                return f"{missing} is missing (the other model folder has {name})"
            if name in wanted and read_small_file(there, MAX_JSON_BYTES) != wanted[name]:
                return f"{there} differs from {source / name}"
    return None


def model_chat_template(path: Path) -> str | None:
    """A model folder's chat template as transformers loads it (chat_template.jinja before the
    `chat_template` of tokenizer_config.json; of a list of named ones, the one named default),
    stripped as mergekit compares them; None when it has none.

    Raises:
        InputError for a file that cannot be read, is over the size limit or is not JSON.
    """
    import json

    from lazymerge.io.hf_folder import MAX_JSON_BYTES, model_folder

    folder = model_folder(path)
    if folder is None:
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return read_small_file(jinja, MAX_JSON_BYTES).decode("utf-8").strip() or None
        except UnicodeDecodeError:
            raise InputError(f"{jinja}: not UTF-8 text") from None
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        doc = json.loads(read_small_file(config, MAX_JSON_BYTES))
    except (ValueError, RecursionError):
        raise InputError(f"{config}: not valid JSON") from None
    template = doc.get("chat_template") if isinstance(doc, dict) else None
    if isinstance(template, list):
        named = {e.get("name"): e.get("template") for e in template if isinstance(e, dict)}
        template = named.get("default")
    return template.strip() or None if isinstance(template, str) else None


def _has_reward_model(paths: list[Path]) -> bool:
    """True when a model folder's config.json names a ForSequenceClassification architecture."""
    from lazymerge.io.hf_folder import model_folder, read_config

    for path in paths:
        config = read_config(model_folder(path)) or {}
        if any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
            return True
    return False
