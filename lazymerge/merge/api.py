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
from lazymerge.io.reader import Checkpoint, resolve_checkpoint_files
from lazymerge.io.writer import OutputTransaction, check_against_inputs, check_destination
from lazymerge.memory import PeakRssSampler
from lazymerge.merge.card import with_model_cards
from lazymerge.merge.plan import MergePlan, default_output, is_single_file, plan_merge
from lazymerge.merge.preflight import preflight as run_preflight
from lazymerge.merge.recipe import ModelInput
from lazymerge.options import MergeOptions, MergeRequest
from lazymerge.progress import ProgressBar, format_bytes

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
    #: Each input as named and what was read for it (see `lazymerge.io.hub_cache.ModelSource`).
    sources: list[dict[str, Any]] = field(default_factory=list)

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
                *(
                    f"  input {s['given']}: Hugging Face cache, {s['hub_id']} at {s['revision']} "
                    f"(commit {s['commit']}), snapshot {s['path']}"
                    for s in self.sources
                    if s["hub_id"] is not None
                ),
            ]
        )


def open_inputs(inputs: Sequence[PathLike]) -> list[Checkpoint]:
    """Open every input (headers only); on failure the ones already opened are closed."""
    opened: list[Checkpoint] = []
    try:
        for path in inputs:
            opened.append(Checkpoint.open(path))
    except BaseException:
        for ckpt in opened:
            ckpt.close()
        raise
    return opened


def ensure_open_files(needed: int) -> None:
    """Raise the soft open-file limit when a merge needs more descriptors than it allows.

    Raises:
        OptionError when even the hard limit is too low (a sweep of too many values).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 64  # the interpreter, torch and the progress bar hold some
    if soft == resource.RLIM_INFINITY or want <= soft:
        return
    if hard == resource.RLIM_INFINITY or want <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return
    raise LazyMergeError(
        f"this run keeps about {needed} files open (input shards, plus one output shard per value of a "
        f"sweep) but the open-file limit is {hard}; raise it (ulimit -n) or sweep fewer values"
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
    options: MergeOptions | None = None,
    *,
    force: bool = False,
    preflight: bool = True,
    **kwargs: Any,
) -> tuple[list[Checkpoint], MergePlan]:
    """Open the inputs (headers, configs, tokenizers), check them as `lazymerge check` does
    (`merge.preflight`), plan the merge and check its output.

    `plan` and `run` share this, so a plan is refused exactly when the run would be.

    Args:
        inputs: paths, or Hugging Face model ids read from the local cache (`ORG/NAME[@REVISION]`,
            see `lazymerge.io.hub_cache`); a local path of the same name wins.
        options: the merge options; or keyword arguments that build them (see `MergeOptions`;
            `alpha` may be one value or a sequence).

    Returns:
        (checkpoints, plan); the base model, if any, is the last checkpoint.

    Raises:
        The first blocking problem `lazymerge check` names, in its words, before any tensor is
        planned; with `preflight=False` (the check itself) only the plan's own refusals.
    """
    options = options if options is not None else MergeOptions.build(**kwargs)
    options.check_inputs(len(inputs))
    if output is not None:
        options.check_destination_kind(Path(output))  # a usage mistake: before any input is looked up
    request = MergeRequest.resolve(inputs, options)
    options, sources, paths = request.options, list(request.sources), request.paths
    destination = Path(output) if output is not None else default_output(list(request.inputs))
    options.check_destination_kind(destination)
    # the output rule first: an existing or misplaced output is refused before a header is
    # read (headers of a large model take seconds; an index names the shard files without them)
    files = [f for p in paths for f in resolve_checkpoint_files(p)[0]]
    check_against_inputs(destination, paths, files)
    if not destination.parent.is_dir():
        raise OutputError(f"{destination}: folder {destination.parent} does not exist")
    check_destination(destination, is_single_file(destination), force)
    checkpoints = open_inputs(paths)
    try:
        if preflight:
            run_preflight([ModelInput.open(c) for c in checkpoints[: len(request.inputs)]], options.rm)
        plan = with_model_cards(plan_merge(checkpoints, options, destination, sources=sources), options)
        ensure_open_files(sum(len(c.files) for c in checkpoints) + 2 * len(plan.variants))
    except BaseException:
        for ckpt in checkpoints:
            ckpt.close()
        raise
    return checkpoints, plan


def merge(
    inputs: Sequence[PathLike],
    output: PathLike | None = None,
    options: MergeOptions | None = None,
    *,
    force: bool = False,
    progress: bool | None = False,
    **kwargs: Any,
) -> MergeReport:
    """Merge checkpoints tensor by tensor into `output`, streaming, in bounded memory.

    Args:
        inputs: .safetensors or .bin files, index files or folders holding either, or Hugging
            Face model ids (`ORG/NAME[@REVISION]`) found in the local cache.
        output: a path ending in .safetensors for one file, else a folder of Hugging Face-style
            shards. Default: merged.safetensors (file inputs) or merged/ (folder inputs).
        options: a `MergeOptions`; or keyword arguments that build one (`weights`, `alpha` (one
            value or a sequence for a sweep: one output folder `alpha-<L>` per value, every
            input read once), `method`, `dtype`, `shard_size`, `max_memory`, `rm`, `strict`,
            `base`, `density`, `seed`, `check_finite`, ...).
        force: replace an existing output that lazymerge wrote.
        progress: show a progress bar on stderr (None: only on a terminal).

    Returns:
        A `MergeReport`.

    Raises:
        OptionError for wrong options; other LazyMergeError kinds (HeaderError,
        IncompatibleInputsError, OutputError, ...) for inputs and outputs.

    Example:
        >>> merge(["rm.safetensors", "sft.safetensors"], "out.safetensors", alpha=0.3)  # doctest: +SKIP
    """
    start = time.perf_counter()
    checkpoints, plan = prepare(inputs, output, options, force=force, **kwargs)
    try:
        written, warnings, peak = _execute(plan, checkpoints, force, progress)
    finally:
        for ckpt in checkpoints:
            ckpt.close()
    return MergeReport(
        output=str(plan.destination),
        files=[str(p) for p in plan.output_paths()],
        tensors=len(plan.tensors),
        parameters=plan.parameters,
        bytes_read=sum(c.bytes_read for c in checkpoints),
        bytes_written=written,
        wall_s=time.perf_counter() - start,
        peak_rss_total=peak.total,
        peak_rss_anon=peak.anon,
        peak_rss_file=peak.file,
        warnings=warnings,
        sources=[s.to_dict() for s in plan.sources],
    )


def _execute(
    plan: MergePlan, checkpoints: Sequence[Checkpoint], force: bool, progress: bool | None
) -> tuple[int, list[str], Any]:
    """Run `plan` into its output transaction, committed only when every file is complete:
    (bytes written, warnings, peak resident memory)."""
    from lazymerge.merge.engine import MergePipeline

    transaction = OutputTransaction(plan.destination, single_file=plan.single_file, force=force)
    try:
        check_free_space(plan.destination, plan.output_bytes)
        bar = ProgressBar(plan.input_bytes, enabled=progress)
        with PeakRssSampler() as sampler:
            pipeline = MergePipeline(plan, list(checkpoints), transaction, on_progress=bar.update)
            written = pipeline.run()
            transaction.commit()
        bar.close()
    except BaseException:
        transaction.abort()
        raise
    return written, list(pipeline.warnings), sampler.peak
