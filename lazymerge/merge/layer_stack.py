"""Layer stacks (a mergekit config's `slices`): the output's layers taken slice by slice from
the inputs' layers, planned from headers alone.

Output layer i of a stack is made from layer j of each of its slice's sources: tensor
`model.layers.i.mlp.up_proj.weight` of the output from `model.layers.j.mlp.up_proj.weight` of
each source (j = the source's first layer + i's place in the slice). As mergekit 0.1.5 plans it
(`MergePlanner.plan_module`): the tensors outside the layers that come before them (the
embeddings) are made from the first slice's sources, the others (final norm, heads) from the
last slice's, at gradient position t = 0; a layer's t is its place in its slice, k / (layers - 1)
(1 for a one-layer slice). Nothing is read but headers: the engine streams the sources' bytes as
for any merge.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from lazymerge.errors import IncompatibleInputsError
from lazymerge.io.dtypes import TensorInfo
from lazymerge.io.hf_folder import model_folder, output_companion_files, read_config
from lazymerge.io.reader import Checkpoint
from lazymerge.merge.tensor_plan import TensorPlan, check_same_tensor, first_mismatches, output_dtype
from lazymerge.options import LayerSlice, LayerStack

#: A decoder layer's tensors: `model.layers.N.` (Llama, Mistral, Qwen, Gemma, ... as mergekit's
#: architectures name them), N the layer's index.
LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")
#: The tensors outside the layers that come before them (mergekit's `pre_weights`): embeddings.
PRE_LAYER_PATTERN = re.compile(r"embed|(?:^|\.)(?:wte|wpe)\.")


@dataclass(frozen=True)
class SplitName:
    """A layer tensor's name around its layer index: `head` + index + `tail`."""

    head: str
    index: int
    tail: str

    def at(self, index: int) -> str:
        return f"{self.head}{index}{self.tail}"


def split_layer_name(name: str) -> SplitName | None:
    """`model.layers.3.mlp.up_proj.weight` -> ("model.layers.", 3, ".mlp.up_proj.weight"); None
    for a tensor outside the layers."""
    match = LAYER_PATTERN.search(name)
    if match is None:
        return None
    return SplitName(name[: match.start(1)], int(match.group(1)), name[match.end(1) :])


@dataclass(frozen=True)
class _Layers:
    """One checkpoint's tensors by layer: the tails of each layer's names, and the rest."""

    by_layer: dict[int, dict[str, str]]
    outside: tuple[str, ...]

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> _Layers:
        by_layer: dict[int, dict[str, str]] = {}
        outside = []
        for name in checkpoint:
            split = split_layer_name(name)
            if split is None:
                outside.append(name)
            else:
                by_layer.setdefault(split.index, {})[split.head + "\0" + split.tail] = name
        return cls(by_layer, tuple(outside))

    @property
    def count(self) -> int:
        return max(self.by_layer, default=-1) + 1


@dataclass(frozen=True)
class _Made:
    """One output tensor's making: its slice, that slice's sources, each source's tensor name
    and the gradient position."""

    slice_index: int
    sources: tuple[tuple[int, int], ...]
    names: tuple[str, ...]
    t: float


def stacked_tensor_plans(
    checkpoints: Sequence[Checkpoint], stack: LayerStack, dtype: str
) -> dict[str, TensorPlan]:
    """Every output tensor of `stack` with its sources (one slot per checkpoint, None outside
    its slice) and its own weights, density and parameters, in output order: the embeddings,
    the layers, then the tensors after them.

    Raises:
        IncompatibleInputsError naming the file when a source lacks a layer or a tensor, or the
        sources of one tensor differ in shape; LazyMergeError from the stack's parameters.
    """
    layers = [_Layers.of(c) for c in checkpoints]
    first, last = stack.slices[0], stack.slices[-1]
    # mergekit pairs the first slice's tensor list with the last slice's sources (zip: the
    # shorter of the two)
    last_sources = last.sources[: len(first.sources)]
    made: dict[str, _Made] = {}
    for name in layers[first.sources[0][0]].outside:
        if PRE_LAYER_PATTERN.search(name):
            made[name] = _Made(0, first.sources, (name,) * len(first.sources), 0.0)
    out_layer = 0
    for s, part in enumerate(stack.slices):
        for k in range(part.layers):
            t = k / (part.layers - 1) if part.layers > 1 else 1.0
            for out_name, names in _layer_names(checkpoints, layers, part, k, out_layer):
                made[out_name] = _Made(s, part.sources, names, t)
            out_layer += 1
    for name in layers[last_sources[0][0]].outside:
        if not PRE_LAYER_PATTERN.search(name):
            made[name] = _Made(len(stack.slices) - 1, last_sources, (name,) * len(last_sources), 0.0)
    return {name: _tensor(checkpoints, stack, name, m, dtype) for name, m in made.items()}


def _layer_names(
    checkpoints: Sequence[Checkpoint], layers: Sequence[_Layers], part: LayerSlice, k: int, out_layer: int
) -> list[tuple[str, tuple[str, ...]]]:
    """(output name, each source's name) of every tensor of output layer `out_layer`, the k-th of
    slice `part`.

    Raises:
        IncompatibleInputsError when a source has no such layer or its layer's tensors differ.
    """
    found = []
    for index, first_layer in part.sources:
        tensors = layers[index].by_layer.get(first_layer + k)
        if tensors is None:
            raise IncompatibleInputsError(
                f"{checkpoints[index].path}: has no layer {first_layer + k} (it has {layers[index].count}); "
                "the config's layer_range asks for it"
            )
        found.append(tensors)
    keys = found[0]
    for (index, first_layer), tensors in zip(part.sources[1:], found[1:], strict=True):
        if tensors.keys() != keys.keys():
            odd = sorted(keys[x] for x in keys.keys() - tensors.keys()) or sorted(
                tensors[x] for x in tensors.keys() - keys.keys()
            )
            raise IncompatibleInputsError(
                f"{checkpoints[index].path}: layer {first_layer + k} does not hold the tensors of layer "
                f"{part.sources[0][1] + k} of {checkpoints[part.sources[0][0]].path} ({first_mismatches(odd)})"
            )
    out = []
    for key, name in keys.items():
        split = split_layer_name(name)
        assert split is not None  # keys hold layer tensors only
        out.append((split.at(out_layer), tuple(t[key] for t in found)))
    return out


def _tensor(
    checkpoints: Sequence[Checkpoint], stack: LayerStack, out_name: str, made: _Made, dtype: str
) -> TensorPlan:
    """One output tensor made from tensor `made.names[k]` of each source k of its slice."""
    slots: list[TensorInfo | None] = [None] * len(checkpoints)
    first = made.sources[0][0]
    for (index, _), name in zip(made.sources, made.names, strict=True):
        if name not in checkpoints[index]:
            raise IncompatibleInputsError(
                f"{checkpoints[index].path}: lacks tensor {name!r} that {checkpoints[first].path} has"
            )
        info = checkpoints[index][name]
        check_same_tensor(
            out_name,
            checkpoints[first][made.names[0]],
            checkpoints[first].path,
            info,
            checkpoints[index].path,
        )
        slots[index] = info
    action, out_dtype = output_dtype(slots, dtype)
    shape = checkpoints[first][made.names[0]].shape
    note = f"slice {made.slice_index}"
    if made.names[0] != out_name:
        layers = [split_layer_name(n) for n in made.names]
        note += ": from " + ", ".join(
            f"layer {split.index} of input {index}"
            for (index, _), split in zip(made.sources, layers, strict=True)
            if split is not None
        )
    if action == "copy":
        return TensorPlan(out_name, out_dtype, shape, action, tuple(slots), note=note)
    values = stack.parameters.values(made.slice_index, out_name, made.names, made.t)
    return TensorPlan(
        out_name,
        out_dtype,
        shape,
        action,
        tuple(slots),
        note=note,
        weights=values.weights,
        density=values.density,
        params=values.params,
    )


def stacked_companion_files(
    checkpoints: Sequence[Checkpoint], donor: int, stack: LayerStack
) -> dict[str, bytes]:
    """The donor checkpoint's config and tokenizer files, its config.json with the stack's
    number of layers (`num_hidden_layers`, as mergekit sets it) and, where the config lists a
    type per layer (`layer_types`: Gemma 2/3, Qwen3), each output layer's type taken from its
    source layer (mergekit leaves the donor's list, which transformers then refuses)."""
    folder = model_folder(checkpoints[donor].path)
    files = output_companion_files(folder, [], None)
    config = read_config(folder) if "config.json" in files else None
    if config is None or "num_hidden_layers" not in config:
        return files
    config["num_hidden_layers"] = stack.layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = _layer_types(checkpoints, stack)
    files["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    return files


def _layer_types(checkpoints: Sequence[Checkpoint], stack: LayerStack) -> list[object]:
    """Each output layer's type: its first source's layer type in that source's config.

    Raises:
        IncompatibleInputsError when a source's config lists fewer layer types than it has layers.
    """
    types: list[object] = []
    for part in stack.slices:
        index, first_layer = part.sources[0]
        config = read_config(model_folder(checkpoints[index].path)) or {}
        listed = config.get("layer_types")
        if not isinstance(listed, list) or len(listed) < first_layer + part.layers:
            raise IncompatibleInputsError(
                f"{checkpoints[index].path}: its config.json lists no layer_types for layers "
                f"{first_layer}-{first_layer + part.layers - 1}, which the donor's config needs"
            )
        types.extend(listed[first_layer : first_layer + part.layers])
    return types
