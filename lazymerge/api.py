"""The Python API: `merge(inputs, output, weights=...)` returns a `MergeReport`."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lazymerge.errors import LazyMergeError, OutputError
from lazymerge.io.hf_folder import output_companion_files
from lazymerge.io.reader import Checkpoint
from lazymerge.io.writer import OutputTransaction
from lazymerge.memory import PeakRssSampler
from lazymerge.methods import METHODS
from lazymerge.plan import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_SHARD_SIZE,
    MergePlan,
    assemble_plan,
    attach_base,
    plain_tensor_plans,
    validate_options,
)
from lazymerge.progress import ProgressBar, format_bytes
from lazymerge.recipe import ModelInput, find_reward_model, plan_reward_merge

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class MergeReport:
    """What a merge did: counts, bytes, time and peak resident memory (bytes)."""

    output: str
    files: list[str]
    tensors: int
    parameters: int
    bytes_read: int
    bytes_written: int
    wall_s: float
    peak_rss_total: int
    peak_rss_anon: int | None
    peak_rss_file: int | None
    #: One line per tensor whose merge met NaN or Inf.
    warnings: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        """Bytes read plus bytes written, in GB (10^9) per second of wall time."""
        return (self.bytes_read + self.bytes_written) / 1e9 / max(self.wall_s, 1e-9)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "gb_per_s": round(self.gb_per_s, 4)}

    def format(self) -> str:
        def mem(n: int | None) -> str:
            return "n/a" if n is None else format_bytes(n)

        return "\n".join(
            [
                f"merged {self.tensors} tensors ({self.parameters:,} parameters) into {self.output}",
                f"  read {format_bytes(self.bytes_read)}, wrote {format_bytes(self.bytes_written)} "
                f"in {len(self.files)} file(s)",
                f"  wall time {self.wall_s:.2f} s, {self.gb_per_s:.2f} GB/s (read + write)",
                f"  peak resident memory {mem(self.peak_rss_total)} total, {mem(self.peak_rss_anon)} "
                f"anonymous, {mem(self.peak_rss_file)} file-backed",
            ]
        )


def resolve_weights(
    count: int, alpha: float | None = None, weights: Sequence[float] | None = None
) -> list[float]:
    """Per-input weights from `alpha` (weight of the second of two inputs) or an explicit list."""
    if alpha is not None and weights is not None:
        raise LazyMergeError("give --alpha or --weights, not both")
    if weights is not None:
        if len(weights) != count:
            raise LazyMergeError(f"{len(weights)} weights given for {count} inputs; give one per input")
        return [float(w) for w in weights]
    if count != 2:
        if alpha is not None:
            raise LazyMergeError(f"--alpha needs exactly two inputs, got {count}; use --weights")
        return [1.0 / count] * count
    a = 0.5 if alpha is None else float(alpha)
    return [1.0 - a, a]


def default_output(inputs: Sequence[PathLike]) -> Path:
    """`merged.safetensors` for file inputs, `merged` (a folder) when any input is a folder."""
    if any(Path(p).is_dir() for p in inputs):
        return Path("merged")
    return Path("merged.safetensors")


def open_inputs(inputs: Sequence[PathLike]) -> list[Checkpoint]:
    return [Checkpoint.open(p) for p in inputs]


def _input_paths(ckpt: Checkpoint) -> list[Path]:
    paths = [ckpt.path, *ckpt.files]
    return [p.resolve() for p in paths]


def check_output(destination: Path, checkpoints: Sequence[Checkpoint]) -> None:
    """Refuse a destination that is, or would contain or replace, any input file."""
    dest = destination.resolve()
    for ckpt in checkpoints:
        for path in _input_paths(ckpt):
            if path == dest or dest in path.parents:
                raise OutputError(
                    f"{destination}: is or holds input {path}; lazymerge never overwrites an input, "
                    "choose another output path"
                )


def check_free_space(destination: Path, needed: int) -> None:
    free = shutil.disk_usage(destination.parent).free
    if free < needed:
        raise OutputError(
            f"{destination}: needs {format_bytes(needed)} of disk but {destination.parent} has "
            f"{format_bytes(free)} free; free space or choose another output folder"
        )


def prepare(
    inputs: Sequence[PathLike],
    output: PathLike | None = None,
    *,
    weights: Sequence[float] | None = None,
    alpha: float | Sequence[float] | None = None,
    dtype: str = "auto",
    method: str = "linear",
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_memory: int = DEFAULT_MAX_MEMORY,
    rm: int | None = None,
    strict: bool = False,
    base: PathLike | None = None,
    density: float = 0.5,
    seed: int = 0,
    check_finite: bool = False,
) -> tuple[list[Checkpoint], MergePlan, Path]:
    """Open the inputs (headers, configs, tokenizers) and plan the merge.

    With a reward model among the inputs (see `lazymerge.recipe`), `alpha` is the weight of the
    domain model whatever the input order; `weights` always follow the input order. A sequence of
    alphas plans a sweep: one output folder per value, every input read once.

    Returns:
        (checkpoints, plan, destination); the base model, if any, is the last checkpoint.
    """
    if len(inputs) < 2:
        raise LazyMergeError("a merge needs at least two inputs")
    spec = METHODS.get(method)
    if spec is None:
        raise LazyMergeError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    if spec.needs_base and base is None:
        raise LazyMergeError(
            f"--method {method} merges task vectors (input - base): give the base model with --base"
        )
    if base is not None and not spec.needs_base:
        raise LazyMergeError(
            f"--base is used by task-vector methods ({', '.join(m for m, s in METHODS.items() if s.needs_base)}), not by {method}"
        )
    if spec.arity is not None and len(inputs) != spec.arity:
        raise LazyMergeError(f"--method {method} takes exactly {spec.arity} inputs, got {len(inputs)}")
    if spec.uses_density and not 0 < density <= 1:
        raise LazyMergeError(f"--density {density}: must be in (0, 1]")
    alphas: list[float | None] = list(alpha) if isinstance(alpha, Sequence) else [alpha]
    if not alphas:
        raise LazyMergeError("the alpha sweep is empty")
    destination = Path(output) if output is not None else default_output(inputs)
    sweep = len(alphas) > 1
    if sweep and destination.name.endswith(".safetensors"):
        raise LazyMergeError(f"{destination}: a sweep writes one folder per alpha; give a folder as output")
    n = len(inputs)
    checkpoints = open_inputs([*inputs, *([base] if base is not None else [])])
    try:
        models = [ModelInput.open(c) for c in checkpoints[:n]]
        rm_index = find_reward_model(models, rm)
        variants = []
        for a in alphas:
            resolved = resolve_weights(n, a, weights)
            if rm_index is not None and a is not None and n == 2:
                resolved = [1.0 - a if i == rm_index else a for i in range(2)]
            validate_options(n, resolved, method, dtype, max_memory, shard_size)
            variants.append(resolved + ([0.0] if base is not None else []))
        single = destination.name if destination.name.endswith(".safetensors") else None
        extra: dict[str, Any]
        if rm_index is None:
            tensors = plain_tensor_plans(checkpoints[:n], variants[0][:n], dtype)
            extra = {"extra_files": output_companion_files(models[0].folder, [], None)}
        else:
            recipe = plan_reward_merge(models, variants[0][:n], rm_index, dtype=dtype, strict=strict)
            tensors = recipe.tensors
            extra = {
                "extra_files": recipe.extra_files,
                "dropped": recipe.dropped,
                "notes": recipe.notes,
                "roles": recipe.roles,
            }
        if base is not None:
            tensors, unused = attach_base(tensors, checkpoints[n])
            extra["dropped"] = (*extra.get("dropped", ()), *unused)
            roles = extra.get("roles") or ("input",) * n
            extra["roles"] = (*roles, "base model")
            extra["base_index"] = n
        plan = assemble_plan(
            checkpoints,
            variants,
            tensors,
            method=method,
            single_file=single,
            shard_size=shard_size,
            max_memory=max_memory,
            variant_names=[f"alpha-{a:g}" for a in alphas] if sweep else [""],  # type: ignore[str-format]
            density=density,
            seed=seed,
            check_finite=check_finite,
            **extra,
        )
    except BaseException:
        for ckpt in checkpoints:
            ckpt.close()
        raise
    return checkpoints, plan, destination


def merge(
    inputs: Sequence[PathLike],
    output: PathLike | None = None,
    *,
    weights: Sequence[float] | None = None,
    alpha: float | Sequence[float] | None = None,
    dtype: str = "auto",
    method: str = "linear",
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_memory: int = DEFAULT_MAX_MEMORY,
    force: bool = False,
    progress: bool | None = False,
    rm: int | None = None,
    strict: bool = False,
    base: PathLike | None = None,
    density: float = 0.5,
    seed: int = 0,
    check_finite: bool = False,
) -> MergeReport:
    """Merge checkpoints tensor by tensor into `output`, streaming, in bounded memory.

    Args:
        inputs: .safetensors files, *.safetensors.index.json files or folders holding either.
        output: a path ending in .safetensors for one file, else a folder of Hugging Face-style
            shards. Default: merged.safetensors (file inputs) or merged/ (folder inputs).
        weights: one weight per input; or
        alpha: for two inputs, the weight L of the second: (1 - L) * A + L * B (with a reward
            model: the domain model's weight). Default 0.5. A sequence of values is a sweep:
            one output folder `alpha-<L>` per value, every input read once.
        dtype: "auto" (first input's dtype per tensor), "float32", "float16" or "bfloat16".
        method: merge method name ("linear").
        shard_size: largest data bytes per output shard (folder outputs).
        max_memory: working-memory budget in bytes for tensor data in flight.
        force: replace an existing output.
        rm: index of the reward model among the inputs (default: found from config.json).
        strict: refuse to match embedding rows by position when tokenizer files are missing.
        base: base model for task-vector methods (task_arithmetic, ties, dare_linear, dare_ties).
        density: fraction of each task vector kept by ties and dare_* methods.
        seed: seed of the dare_* drop masks (the same result whatever the chunking).
        check_finite: stop with NonFiniteError when an input's NaN or Inf reaches the output;
            by default the merge goes on and the report lists a warning per tensor.
        progress: show a progress bar on stderr (None: only on a terminal).

    Returns:
        A `MergeReport`.

    Raises:
        LazyMergeError (HeaderError, IncompatibleInputsError, OutputError, ...).

    Example:
        >>> merge(["rm.safetensors", "sft.safetensors"], "out.safetensors", alpha=0.3)  # doctest: +SKIP
    """
    from lazymerge.engine import execute_plan

    start = time.perf_counter()
    checkpoints, plan, destination = prepare(
        inputs,
        output,
        weights=weights,
        alpha=alpha,
        dtype=dtype,
        method=method,
        shard_size=shard_size,
        max_memory=max_memory,
        rm=rm,
        strict=strict,
        base=base,
        density=density,
        seed=seed,
        check_finite=check_finite,
    )
    warnings: list[str] = []
    try:
        check_output(destination, checkpoints)
        transaction = OutputTransaction(
            destination, single_file=destination.name.endswith(".safetensors"), force=force
        )
        try:
            check_free_space(destination, plan.output_bytes)
            bar = ProgressBar(plan.input_bytes, enabled=progress)
            with PeakRssSampler() as sampler:
                written = execute_plan(
                    plan, checkpoints, transaction, on_progress=bar.update, warnings=warnings
                )
                if not transaction.single_file:
                    for folder in plan.variant_names:
                        for name, data in plan.extra_files.items():
                            transaction.write_small(f"{folder}/{name}" if folder else name, data)
                            written += len(data)
                transaction.commit()
            bar.close()
        except BaseException:
            transaction.abort()
            raise
    finally:
        for ckpt in checkpoints:
            ckpt.close()
    peak = sampler.peak
    files = (
        [str(destination)]
        if destination.name.endswith(".safetensors")
        else [str(destination / v / s.filename) for v in plan.variant_names for s in plan.layout.shards]
    )
    return MergeReport(
        output=str(destination),
        files=files,
        tensors=len(plan.tensors),
        parameters=plan.parameters,
        bytes_read=sum(c.bytes_read for c in checkpoints),
        bytes_written=written,
        wall_s=time.perf_counter() - start,
        peak_rss_total=peak.total,
        peak_rss_anon=peak.anon,
        peak_rss_file=peak.file,
        warnings=warnings,
    )
