"""Plan a merge from headers alone: what happens to each tensor and where its bytes go.

The plan is a plain value: it can be printed (`lazymerge plan`), tested without tensor data, and
handed to the engine, which only follows it. Two kinds of merge are planned here:

- plain: every input holds the same tensors; each is merged across all inputs;
- reward model + domain models (DogeRM): decided in `lazymerge.merge.recipe`, which says per tensor
  which inputs contribute (heads kept or dropped) and how embedding rows line up by token.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazymerge._version import __version__
from lazymerge.errors import IncompatibleInputsError, OptionError
from lazymerge.io.dtypes import TensorInfo, itemsize
from lazymerge.io.hf_folder import output_companion_files, with_chat_template
from lazymerge.io.hub_cache import ModelSource
from lazymerge.io.reader import Checkpoint
from lazymerge.io.writer import OutputLayout, OutputTensor, plan_layout
from lazymerge.merge.layer_stack import LAYER_PATTERN, stacked_companion_files, stacked_tensor_plans
from lazymerge.merge.recipe import ModelInput, find_reward_model, plan_reward_merge
from lazymerge.merge.tensor_plan import TensorPlan, check_same_tensor, first_mismatches, output_dtype
from lazymerge.merge.workspace import (
    BASELINE_RSS,
    SPAN_SLACK,
    BufferSizes,
    block_len,
    direct_io_bytes,
    direct_io_fits,
    size_chunks,
    staging_bytes,
)
from lazymerge.methods import DELLA_EPSILON, METHODS, WHOLE_TENSOR_REASONS, MergeMethod
from lazymerge.options import LayerStack, MergeOptions, TensorParameters
from lazymerge.provenance import InputIdentity, identify_checkpoint

#: Header metadata key of the inputs' identities (JSON: `InputIdentity.published` of each input).
PROVENANCE_KEY = "lazymerge_provenance"


@dataclass(frozen=True, eq=False)
class MergePlan:
    """Everything a merge will do, decided from headers, configs and tokenizers alone.

    The single source of truth for what a run produces: which files (per output of a sweep:
    shards, index, companion files), which tensors in each, how many bytes, how much working
    memory. The engine executes it; the report reads from it.
    """

    inputs: tuple[str, ...]
    #: Role of each input ("reward model", "domain model", "base model" or "input").
    roles: tuple[str, ...]
    method: str
    tensors: dict[str, TensorPlan]
    #: One weight vector per output (input order, 0 for a base model); several for a sweep.
    variants: tuple[tuple[float, ...], ...]
    #: Sub-folder of each output ("" for a single output).
    variant_names: tuple[str, ...]
    #: The file layout of each output (they differ only in header metadata).
    layouts: tuple[OutputLayout, ...]
    destination: Path
    #: True when the output is one .safetensors file (no index, no companion files).
    single_file: bool
    #: Elements per chunk, the same for every tensor; tensors up to this size go whole.
    chunk_elems: int
    #: Elements per block of elementwise arithmetic.
    block_elems: int
    #: Largest bytes per element of each input and of the output, over all tensors.
    input_itemsizes: tuple[int, ...]
    output_itemsize: int
    #: Input tensors left out of the output, with the reason.
    dropped: tuple[str, ...] = ()
    #: Small files written beside the weights of each output (config, tokenizer), name -> bytes.
    companion_files: dict[str, bytes] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    #: Index of the base model among the inputs (task-vector methods), weight 0.
    base_index: int | None = None
    density: float = 1.0
    seed: int = 0
    #: Stop on NaN or Inf in a merged tensor instead of warning.
    check_finite: bool = False
    #: Read and write with direct I/O where the filesystem allows it (see `lazymerge.merge.workspace`),
    #: through a staging buffer of this many bytes per output.
    direct_io: bool = False
    staging_bytes: int = 0
    #: How the user named each input (base model last) and what was read for it: a local path
    #: or a snapshot of the Hugging Face cache.
    sources: tuple[ModelSource, ...] = ()
    #: Files of one output each, beside its companion files (its model card, README.md).
    variant_files: tuple[dict[str, bytes], ...] = ()
    #: What each input was (`provenance`): weights files, tensors, companion files; recorded in
    #: every shard's header metadata (`PROVENANCE_KEY`) and in the model card.
    identities: tuple[InputIdentity, ...] = ()

    @property
    def method_spec(self) -> MergeMethod:
        return METHODS[self.method]

    @property
    def input_bytes(self) -> int:
        return sum(s.nbytes for t in self.tensors.values() for _, s in t.present())

    def output_files(self) -> list[tuple[str, int]]:
        """(path relative to the destination, bytes) of every file the merge writes, in order;
        a single-file output is one entry: its own name."""
        if self.single_file:
            return [(self.destination.name, self.layouts[0].total_bytes)]
        files: list[tuple[str, int]] = []
        for v, (folder, layout) in enumerate(zip(self.variant_names, self.layouts, strict=True)):
            prefix = f"{folder}/" if folder else ""
            files.extend((prefix + s.filename, s.file_bytes) for s in layout.shards)
            if layout.index is not None:
                files.append((prefix + layout.index_name, len(layout.index)))
            files.extend((prefix + name, len(data)) for name, data in self.companion_files.items())
            if self.variant_files:
                files.extend((prefix + name, len(data)) for name, data in self.variant_files[v].items())
        return files

    def output_paths(self) -> list[Path]:
        if self.single_file:
            return [self.destination]
        return [self.destination / name for name, _ in self.output_files()]

    @property
    def output_bytes(self) -> int:
        return sum(size for _, size in self.output_files())

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def working_memory(self) -> int:
        """Bytes of the engine's buffers (see `lazymerge.merge.workspace`): at most the budget, unless
        a method needs whole tensors larger than the budget allows."""
        return buffer_sizes(self).total

    @property
    def buffer_elems(self) -> int:
        """Elements per reusable buffer: the longest chunk of any tensor."""
        return max([1, *(min(self.chunk_len(t), max(t.numel, 1)) for t in self.tensors.values())])

    def bounded(self, tensor: TensorPlan) -> bool:
        """Whether this tensor is merged by its method's bounded form (`MergeMethod.bounded`): a
        merged tensor larger than a chunk, with parameters the form bounds, and chunks and blocks
        that hold the form's whole units (statistics blocks, della's slabs)."""
        form = self.method_spec.bounded
        if tensor.action != "merge" or form is None or tensor.numel <= self.chunk_elems:
            return False
        if not form.applies(dict(tensor.params)):
            return False
        if form.unit is not None:
            return form.unit(tensor.shape) <= self.chunk_elems
        return min(self.chunk_elems, self.block_elems) >= form.align

    def block_unit(self, tensor: TensorPlan) -> int:
        """Elements that every chunk and arithmetic block of this tensor holds whole (1: any)."""
        form = self.method_spec.bounded
        if form is None or not self.bounded(tensor):
            return 1
        return form.unit(tensor.shape) if form.unit is not None else form.align

    def passes(self, tensor: TensorPlan) -> int:
        """Passes over this tensor's chunks: a bounded method's statistics passes and its apply
        pass for a merged tensor larger than a chunk, else one."""
        bounded = self.method_spec.bounded
        return bounded.passes + 1 if bounded is not None and self.bounded(tensor) else 1

    def whole(self, tensor: TensorPlan) -> bool:
        """Whether this tensor is merged whole: a merged tensor of a method that is not
        elementwise and not bounded for it (a bounded method's tensor that fits one chunk)."""
        return tensor.action == "merge" and not self.method_spec.elementwise and not self.bounded(tensor)

    def held_whole(self, tensor: TensorPlan) -> bool:
        """Whether this tensor is held whole though larger than a chunk: the one case where the
        working memory is not bounded by the budget (a method with no bounded form)."""
        return self.whole(tensor) and tensor.numel > self.chunk_elems

    def _passes_text(self, tensor: TensorPlan) -> str:
        if self.passes(tensor) > 1:
            return f" in {self.passes(tensor)} passes"
        if self.bounded(tensor):
            return f" in 1 pass, of whole {self.block_unit(tensor)}-element slabs"
        return ", held whole" if self.held_whole(tensor) else ""

    def memory_notes(self) -> list[str]:
        """Where this plan's working memory is not bounded by the budget, and why."""
        whole = [t for t in self.tensors.values() if self.held_whole(t)]
        if not whole:
            return []
        bounded = self.method_spec.bounded
        largest = max(whole, key=lambda t: t.numel)
        reason = (
            unbounded_reason(self.method_spec)
            if bounded is None or bounded.unit is not None or not bounded.applies(dict(largest.params))
            else f"its chunks are smaller than the {bounded.align}-element blocks its statistics sum"
        )
        return [
            f"{len(whole)} tensor(s) larger than a chunk are held whole ({largest.name} "
            f"{list(largest.shape)} the largest): {self.method} cannot bound them ({reason}); "
            "the working memory below includes them"
        ]

    def chunk_len(self, tensor: TensorPlan) -> int:
        """Elements per chunk of this tensor: whole rows for "rows" tensors, the whole tensor
        for methods that are not elementwise and have no bounded form."""
        if self.whole(tensor):
            return max(1, tensor.numel)
        if self.bounded(tensor):
            return self.chunk_elems // self.block_unit(tensor) * self.block_unit(tensor)
        unit = tensor.row_elems
        return max(unit, self.chunk_elems // unit * unit)

    def chunks(self, tensor: TensorPlan) -> int:
        return math.ceil(tensor.numel / self.chunk_len(tensor))

    @property
    def predicted_peak_rss(self) -> int:
        return self.working_memory + BASELINE_RSS

    def to_dict(self) -> dict[str, Any]:
        """The plan as `lazymerge plan --json` prints it."""
        rows = [t.shape[0] for t in self.tensors.values() if t.action == "rows"]
        return {
            "output": str(self.destination),
            "method": self.method,
            "inputs": list(self.inputs),
            "sources": [s.to_dict() for s in self.sources],
            "roles": list(self.roles),
            "weights": [list(v) for v in self.variants] if len(self.variants) > 1 else list(self.variants[0]),
            "files": [name for name, _ in self.output_files()],
            "tensors": [
                {
                    "name": t.name,
                    "action": t.action,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "chunks": self.chunks(t),
                    "passes": self.passes(t),
                    "held_whole": self.held_whole(t),
                    "note": t.note,
                    **({"weights": list(t.weights)} if t.weights is not None else {}),
                    **({"density": t.density} if t.density is not None else {}),
                    **({"params": dict(t.params)} if t.params else {}),
                }
                for s in self.layouts[0].shards
                for t in (self.tensors[x.name] for x in s.tensors)
            ],
            "dropped": list(self.dropped),
            "notes": list(self.notes),
            "vocab_size": rows[0] if rows else None,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "working_memory": self.working_memory,
            "memory_notes": self.memory_notes(),
            "predicted_peak_rss": self.predicted_peak_rss,
            "io": "direct" if self.direct_io else "buffered",
        }

    def describe(self) -> str:
        lines = [f"output {self.destination}", f"method {self.method}"]
        for i, name in enumerate(self.inputs):
            weights = "/".join(f"{v[i]:g}" for v in self.variants)
            lines.append(f"  input {i}: {name} ({self.roles[i]}), weight {weights}")
            if i < len(self.sources) and self.sources[i].from_hub_cache:
                lines.append(f"    from {self.sources[i].describe()}")
        layout = self.layouts[0]
        for shard in layout.shards:
            lines.append(f"{shard.filename}: {len(shard.tensors)} tensors, {shard.file_bytes} bytes")
            for t in shard.tensors:
                tp = self.tensors[t.name]
                srcs = "/".join(s.dtype if s is not None else "-" for s in tp.sources)
                what = {"merge": "average", "copy": "copy", "rows": "rows"}[tp.action]
                note = f"  [{tp.note}]" if tp.note else ""
                if tp.values_text():
                    note += f"  ({tp.values_text()})"
                lines.append(
                    f"  {what:7s} {tp.name} {list(tp.shape)} {srcs} -> {tp.dtype}, "
                    f"{self.chunks(tp)} chunk(s){self._passes_text(tp)}{note}"
                )
        lines.extend(f"  dropped {d}" for d in self.dropped)
        if layout.index is not None:
            lines.append(f"  will write index {layout.index_name}")
        lines.extend(f"  will write file {name}" for name in self.companion_files)
        if self.variant_files:
            lines.extend(f"  will write file {name} (model card)" for name in self.variant_files[0])
        if len(self.variant_names) > 1:
            lines.append(
                f"  the same files in each of {len(self.variant_names)} folders: {', '.join(self.variant_names)}"
            )
        lines.extend(f"note: {n}" for n in (*self.notes, *self.memory_notes()))
        lines.append(
            f"{len(self.tensors)} tensors, {self.parameters} parameters; reads {self.input_bytes} bytes, "
            f"writes {self.output_bytes} bytes in {len(self.output_files())} file(s); "
            f"working memory about {self.working_memory} bytes"
        )
        if self.direct_io:
            lines.append(
                "I/O: direct (O_DIRECT) where the filesystem allows it, inputs already in the page "
                f"cache read from it; outputs staged in {self.staging_bytes} bytes per output"
            )
        else:
            lines.append("I/O: buffered (through the page cache)")
        return "\n".join(lines)


def buffer_sizes(plan: MergePlan) -> BufferSizes:
    """The buffers `plan` needs: what `Workspace` allocates and `working_memory` predicts."""
    elems = plan.buffer_elems
    method = plan.method_spec
    fp32 = min(
        elems,
        max(
            [1]
            + [
                block_len(t, not plan.whole(t), plan.chunk_len(t), plan.block_elems, plan.block_unit(t))
                for t in plan.tensors.values()
                if t.action != "copy"
            ]
        ),
    )
    multipass = any(plan.passes(t) > 1 for t in plan.tensors.values())
    stats = stats_bytes(method, len(plan.inputs)) if multipass else 0
    return BufferSizes(
        buffer_elems=elems,
        input_itemsizes=plan.input_itemsizes,
        output_itemsize=plan.output_itemsize,
        outputs=len(plan.variants),
        fp32_elems=fp32,
        scratch_per_elem=method.scratch_bytes,
        staging_per_output=plan.staging_bytes,
        span_slack=SPAN_SLACK if plan.direct_io else 0,
        stats_bytes=stats,
    )


def unbounded_reason(method: MergeMethod) -> str:
    """Why `method` holds whole tensors."""
    return WHOLE_TENSOR_REASONS.get(method.name, "it needs whole-tensor statistics")


def stats_bytes(method: MergeMethod, inputs: int) -> int:
    """Bytes of one tensor's statistics for a bounded method (0 without a bounded form), with
    one more input's worth for the temporaries of an update (a histogram's bincount)."""
    return 0 if method.bounded is None else method.bounded.bytes_per_input * (inputs + 1)


def check_compatible(checkpoints: Sequence[Checkpoint]) -> None:
    """Every input must hold the same tensor names with the same shapes.

    Raises:
        IncompatibleInputsError naming the file and the first mismatching tensors.
    """
    first = checkpoints[0]
    for other in checkpoints[1:]:
        missing = sorted(set(first) - set(other))
        if missing:
            raise IncompatibleInputsError(
                f"{other.path}: lacks tensor {first_mismatches(missing)} that {first.path} has"
            )
        extra = sorted(set(other) - set(first))
        if extra:
            raise IncompatibleInputsError(
                f"{other.path}: has tensor {first_mismatches(extra)} that {first.path} lacks"
            )
        for name in first:
            check_same_tensor(name, first[name], first.path, other[name], other.path)


def plain_tensor_plans(checkpoints: Sequence[Checkpoint], dtype: str) -> dict[str, TensorPlan]:
    """Every tensor merged across every input (the inputs must hold the same tensors)."""
    check_compatible(checkpoints)
    plans = {}
    for name, first in checkpoints[0].items():
        sources = tuple(c[name] for c in checkpoints)
        action, out_dtype = output_dtype(sources, dtype)
        plans[name] = TensorPlan(name, out_dtype, first.shape, action, sources)
    return plans


def attach_base(tensors: dict[str, TensorPlan], base: Checkpoint) -> tuple[dict[str, TensorPlan], list[str]]:
    """Add a base model (weight 0) as the last source of every averaged tensor.

    Task-vector methods merge x_i - base; tensors that are copied or matched by rows do not use it.

    Returns:
        (tensor plans with one more source each, base tensors left unused)

    Raises:
        IncompatibleInputsError when the base lacks an averaged tensor or its shape differs.
    """
    out = {}
    for name, tp in tensors.items():
        src: TensorInfo | None = None
        if tp.action == "rows" and name in base and _same_rows(tp, base[name]):
            # every input holds every token at the same id as the base's shape: a plain tensor,
            # so task-vector methods apply to it as to any other (rows matched by token are
            # averaged, with no base)
            tp = dataclasses.replace(
                tp, action="merge", row_maps=None, note=tp.note + "; same ids everywhere"
            )
        if tp.action == "merge":
            if name not in base:
                raise IncompatibleInputsError(
                    f"{base.path}: base model lacks tensor {name!r} that the inputs average"
                )
            first = next(s for s in tp.sources if s is not None)
            check_same_tensor(name, first, first.path, base[name], base.path)
            src = base[name]
        row_maps = None if tp.row_maps is None else (*tp.row_maps, None)
        weights = None if tp.weights is None else (*tp.weights, 0.0)
        out[name] = dataclasses.replace(tp, sources=(*tp.sources, src), row_maps=row_maps, weights=weights)
    unused = sorted(n for n in base if n not in out or out[n].action != "merge")
    return out, [f"{n} of {base.path} (base model, not averaged)" for n in unused]


def _same_rows(tp: TensorPlan, base: TensorInfo) -> bool:
    """Whether an embedding matched by token maps every output row to the same row of every
    input, and the base has the output's shape."""
    import numpy as np

    if tp.row_maps is None or base.shape != tp.shape:
        return False
    ids = np.arange(tp.shape[0])
    return all(m is None or np.array_equal(m, ids) for m in tp.row_maps)


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """Each layer tensor's gradient position t, as mergekit 0.1.5 computes it without slices:
    index / (layers - 1) over the model's layers (1 for a one-layer model); the tensors outside
    the layers (embeddings, final norm, heads) are absent (mergekit evaluates them at t = 0)."""
    found = {name: int(m.group(1)) for name in names if (m := LAYER_PATTERN.search(name))}
    layers = max(found.values(), default=-1) + 1
    return {name: index / (layers - 1) if layers > 1 else 1.0 for name, index in found.items()}


def tensor_values(tensors: dict[str, TensorPlan], parameters: TensorParameters) -> dict[str, TensorPlan]:
    """Every merged tensor with its own weights, density and method parameters, asked of
    `parameters` (a mergekit config's gradients and filters) at the tensor's name and layer."""
    positions = layer_positions(list(tensors))
    out = {}
    for name, tp in tensors.items():
        if tp.action == "copy":
            out[name] = tp
            continue
        values = parameters.values(name, positions.get(name, 0.0))
        out[name] = dataclasses.replace(
            tp, weights=values.weights, density=values.density, params=values.params
        )
    return out


def default_output(inputs: Sequence[str | os.PathLike[str]]) -> Path:
    """`merged.safetensors` for file inputs, `merged` (a folder) when any input is a folder."""
    if any(Path(p).is_dir() for p in inputs):
        return Path("merged")
    return Path("merged.safetensors")


def is_single_file(destination: Path) -> bool:
    """Whether an output is one .safetensors file (else a folder of shards and companion files);
    the output checks and the plan both ask here."""
    return destination.name.endswith(".safetensors")


def plan_merge(
    checkpoints: Sequence[Checkpoint],
    options: MergeOptions,
    destination: Path,
    sources: Sequence[ModelSource] | None = None,
) -> MergePlan:
    """Plan a merge of opened inputs: the recipe, the weights of every output, the files and
    the memory. The base model, when `options.base` is set, is the last checkpoint.

    Args:
        sources: how each checkpoint was named (see `lazymerge.io.hub_cache`); default: by its path.

    Raises:
        OptionError for options that do not fit these inputs; IncompatibleInputsError when the
        inputs do not line up; HeaderError and its kin from configs and tokenizers.
    """
    n = len(checkpoints) - (options.base is not None)
    options.check_inputs(n)
    options.check_destination_kind(destination)
    single_file = is_single_file(destination)
    if options.layer_stack is not None:
        recipe = _stacked_recipe(checkpoints, options, options.layer_stack)
    else:
        recipe = _weighted_recipe(checkpoints, n, options)
    companions = {} if single_file else dict(recipe.extra_files)
    notes = recipe.notes
    if options.chat_template is not None:
        companions, note = _chat_template_files(companions, options.chat_template, destination, single_file)
        notes = (*notes, note)
    tensors, variants = recipe.tensors, recipe.variants
    memory = _memory(tensors, options, len(checkpoints), len(variants))
    identities = tuple(identify_checkpoint(c) for c in checkpoints)
    layouts = _layouts(tensors, checkpoints, identities, variants, options, destination, single_file)
    if sources is None:
        sources = [ModelSource(str(c.path), c.path) for c in checkpoints]
    return MergePlan(
        inputs=tuple(str(c.path) for c in checkpoints),
        roles=recipe.roles,
        method=options.method,
        tensors=tensors,
        variants=tuple(tuple(float(w) for w in v) for v in variants),
        variant_names=options.variant_names(),
        layouts=tuple(layouts),
        destination=destination,
        single_file=single_file,
        dropped=recipe.dropped,
        companion_files=companions,
        notes=notes,
        base_index=recipe.base_index,
        density=options.density,
        seed=options.seed,
        check_finite=options.check_finite,
        sources=tuple(sources),
        identities=identities,
        **memory,
    )


@dataclass(frozen=True)
class _Recipe:
    """What the recipe decides: each output tensor's plan, the companion files, the dropped
    tensors, the notes, each input's role, the reward model's index (None: a plain merge), the
    weights of each output and the base model's index."""

    tensors: dict[str, TensorPlan]
    extra_files: Any
    dropped: tuple[str, ...]
    notes: tuple[str, ...]
    roles: tuple[str, ...]
    rm_index: int | None
    variants: list[tuple[float, ...]] = field(default_factory=list)
    base_index: int | None = None


def _recipe(checkpoints: Sequence[Checkpoint], options: MergeOptions) -> _Recipe:
    """A plain merge, or DogeRM's when an input is a reward model (`recipe.plan_reward_merge`)."""
    models = [ModelInput.open(c) for c in checkpoints]
    rm_index = find_reward_model(models, options.rm)
    if rm_index is None:
        tensors = plain_tensor_plans(checkpoints, options.dtype)
        companions = output_companion_files(models[0].folder, [], None)
        return _Recipe(tensors, companions, (), (), ("input",) * len(checkpoints), None)
    recipe = plan_reward_merge(models, rm_index, dtype=options.dtype, strict=options.strict)
    return _Recipe(recipe.tensors, recipe.extra_files, recipe.dropped, recipe.notes, recipe.roles, rm_index)


def _weighted_recipe(checkpoints: Sequence[Checkpoint], n: int, options: MergeOptions) -> _Recipe:
    """The recipe of `n` inputs merged name by name: the weights of each output, each tensor's
    own values where they vary (`tensor_values`), and the base model (the last checkpoint, after
    the `n` inputs) attached with weight 0."""
    recipe = _recipe(checkpoints[:n], options)
    tensors, dropped, roles, notes = recipe.tensors, recipe.dropped, recipe.roles, recipe.notes
    variants = options.weight_vectors(n, recipe.rm_index)
    per_tensor = options.per_tensor(variants[0])
    if per_tensor is not None:
        tensors = tensor_values(tensors, per_tensor)
        source = (
            "--tensor-weights" if options.tensor_weights else "the config's parameters, gradients and filters"
        )
        notes = (*notes, f"values per tensor ({source}): see each tensor")
    elif options.method.startswith("della"):
        notes = (
            *notes,
            f"{options.method}: each row's deltas kept with probability density -/+ {DELLA_EPSILON:g} by "
            "magnitude rank (MagPrune), the kept ones rescaled by 1/p (the paper; a mergekit config's "
            "rescale gives mergekit's L1 rescale)",
        )
    base_index = None
    if options.base is not None:
        tensors, unused = attach_base(tensors, checkpoints[n])
        dropped = (*dropped, *unused)
        roles = (*roles, "base model")
        variants = [(*v, 0.0) for v in variants]
        base_index = n
    return dataclasses.replace(
        recipe,
        tensors=tensors,
        dropped=dropped,
        notes=notes,
        roles=roles,
        variants=variants,
        base_index=base_index,
    )


def _stacked_recipe(checkpoints: Sequence[Checkpoint], options: MergeOptions, stack: LayerStack) -> _Recipe:
    """The recipe of a layer stack (`layer_stack`): each output tensor from its slice's sources,
    with its own values; the config and tokenizer files of the base model, else of the first
    slice's first source, config.json holding the stack's layer count."""
    tensors = stacked_tensor_plans(checkpoints, stack, options.dtype)
    base_index = len(checkpoints) - 1 if options.base is not None else None
    donor = base_index if base_index is not None else stack.slices[0].sources[0][0]
    companions = stacked_companion_files(checkpoints, donor, stack)
    roles = tuple("base model" if i == base_index else "input" for i in range(len(checkpoints)))
    used = [
        {s.name for t in tensors.values() if (s := t.sources[i]) is not None} for i in range(len(checkpoints))
    ]
    dropped = tuple(
        f"{len(c) - len(names)} tensor(s) of {c.path} (layers outside the slices)"
        for c, names in zip(checkpoints, used, strict=True)
        if len(c) > len(names)
    )
    nominal = next((t.weights for t in tensors.values() if t.weights is not None), None)
    variants = [nominal if nominal is not None else tuple(0.0 for _ in checkpoints)]
    layers = [f"{p.layers} from input(s) {'/'.join(str(i) for i, _ in p.sources)}" for p in stack.slices]
    notes = (
        f"layer stack of {stack.layers} layers: {', '.join(layers)}; values per tensor (the config's "
        "slices and parameters): see each tensor",
    )
    return _Recipe(tensors, companions, dropped, notes, roles, None, variants, base_index)


def _chat_template_files(
    companions: dict[str, bytes], template: str, destination: Path, single_file: bool
) -> tuple[dict[str, bytes], str]:
    """The companion files with `template` as the output's chat template (mergekit's
    `chat_template`), and a note saying where it went.

    Raises:
        OptionError for a single-file output, which has no tokenizer files to hold it.
    """
    if single_file:
        raise OptionError(
            f"{destination}: chat_template: a single .safetensors file holds no tokenizer files; "
            "give a folder as output"
        )
    if not {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} & set(companions):
        return (
            companions,
            "chat_template: the output has no tokenizer files, so no chat template is written (as mergekit)",
        )
    files = with_chat_template(companions, template)
    return (
        files,
        "chat_template: written to chat_template.jinja (tokenizer_config.json keeps none), as mergekit's save does",
    )


def _memory(
    tensors: dict[str, TensorPlan], options: MergeOptions, inputs: int, variants: int
) -> dict[str, Any]:
    """The plan's chunk and block sizes, itemsizes and direct-I/O staging (`MergePlan` fields),
    sized to `options.max_memory` by the memory model (`size_chunks`)."""
    input_itemsizes = tuple(
        max((s.itemsize for t in tensors.values() if (s := t.sources[i]) is not None), default=1)
        for i in range(inputs)
    )
    output_itemsize = max((itemsize(t.dtype) for t in tensors.values()), default=1)
    direct_io = options.direct_io and direct_io_fits(options.max_memory, inputs, variants)
    staging = staging_bytes(options.max_memory, variants) if direct_io else 0
    chunk_elems, block_elems = size_chunks(
        options.max_memory,
        max((t.numel for t in tensors.values()), default=1),
        input_itemsizes,
        output_itemsize,
        variants,
        METHODS[options.method].scratch_bytes,
        options.block_elems,
        (direct_io_bytes(inputs, variants, staging) if direct_io else 0)
        + stats_bytes(METHODS[options.method], inputs),
    )
    return {
        "chunk_elems": options.chunk_elems if options.chunk_elems is not None else chunk_elems,
        "block_elems": block_elems,
        "input_itemsizes": input_itemsizes,
        "output_itemsize": output_itemsize,
        "direct_io": direct_io,
        "staging_bytes": staging,
    }


def _layouts(
    tensors: dict[str, TensorPlan],
    checkpoints: Sequence[Checkpoint],
    identities: Sequence[Any],
    variants: Sequence[Sequence[float]],
    options: MergeOptions,
    destination: Path,
    single_file: bool,
) -> list[Any]:
    """Each output's file layout, its header metadata naming lazymerge, the method, the
    weights, the inputs and their identity (`lazymerge_provenance`)."""
    outputs = [OutputTensor(t.name, t.dtype, t.shape) for t in tensors.values()]
    provenance = json.dumps(
        [ident.published(metadata_name(c.path)) for ident, c in zip(identities, checkpoints, strict=True)],
        separators=(",", ":"),
    )
    layouts = []
    for weights in variants:
        metadata = {
            "format": "pt",
            "lazymerge_version": __version__,
            "lazymerge_method": options.method,
            "lazymerge_weights": ",".join(repr(float(w)) for w in weights),
            "lazymerge_inputs": ",".join(metadata_name(c.path) for c in checkpoints),
            PROVENANCE_KEY: provenance,
        }
        layouts.append(
            plan_layout(outputs, metadata, destination.name if single_file else None, options.shard_size)
        )
    return layouts


def metadata_name(path: Path) -> str:
    """A file name as valid UTF-8 for header metadata: undecodable bytes become `\\xNN` escapes."""
    return path.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
