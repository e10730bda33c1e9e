"""A sweep's own options: the grid, the data it scores, how it resumes and where it runs.

`SweepOptions` is to `sweep` what `ScoreOptions` is to scoring: one frozen value, built and
checked once where options enter, each field's command-line help in its metadata (from which
the CLI declares the flags). The merge's options (`MergeOptions`) and the scoring's
(`ScoreOptions`) stay their own values; the grid's values are parsed against the inputs by
`evaluation.sweep.build_spec`. Nothing here imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lazymerge.errors import OptionError
from lazymerge.options import cli_flag

#: `--resident`: auto (when the inputs fit), on, off (`evaluation.resident.decide`).
RESIDENT_CHOICES = ("auto", "on", "off")
#: The bound on --ray-gpus and --ray-cpus (per point).
MAX_RAY_RESOURCES = 1024.0


@dataclass(frozen=True)
class SweepOptions:
    """What a sweep scores and how.

    Attributes:
        alpha, grid_step, weight_vectors: the grid (one of them; the default for one domain
            model is alpha 0:1:0.1).
        pair_files, val_pairs, candidate_files: the evaluations.
        write, restart, rehash, resident: how each point is built, and how results are reused.
        ray_address, ray_gpus, ray_cpus: each point a Ray task (`ray_executor`).

    Raises:
        OptionError (on construction) for a value that is wrong whatever the inputs.
    """

    alpha: str | None = field(
        default=None,
        metadata=cli_flag("One domain model: its weights, START:STOP:STEP or A,B,C (default 0:1:0.1)."),
    )
    grid_step: float | None = field(
        default=None,
        metadata=cli_flag(
            "Several domain models: every weight vector on the simplex with this step.", flags=("--grid",)
        ),
    )
    weight_vectors: tuple[str, ...] = field(
        default=(),
        metadata=cli_flag(
            "An explicit weight vector, one weight per input (repeatable).", flags=("--weights",)
        ),
    )
    pair_files: tuple[Path, ...] = field(
        default=(),
        metadata=cli_flag(
            "Test pairs (RewardBench, Auto-J or RewardBench 2 JSONL; repeatable).", flags=("--pairs",)
        ),
    )
    val_pairs: Path | None = field(
        default=None, metadata=cli_flag("Validation pairs: the point is chosen on them.")
    )
    candidate_files: tuple[Path, ...] = field(
        default=(), metadata=cli_flag("Best-of-N candidates (JSONL; repeatable).", flags=("--candidates",))
    )
    write: bool = field(
        default=False,
        metadata=cli_flag("Also write each merged checkpoint under OUT/models/ and score it from disk."),
    )
    restart: bool = field(
        default=False, metadata=cli_flag("Discard the results in OUT made with other inputs or settings.")
    )
    rehash: bool = field(
        default=False,
        metadata=cli_flag(
            "Hash every weights file: record their SHA-256, or prove on resume that moved or touched weights "
            "hold the same data (reads all weights once)."
        ),
    )
    resident: str = field(
        default="auto",
        metadata=cli_flag(
            "Read the inputs into RAM once and rewrite one model per point (auto: when they fit); same rewards.",
            choices=RESIDENT_CHOICES,
            show_default=True,
        ),
    )
    ray_address: str | None = field(
        default=None,
        metadata=cli_flag(
            "Run each point as a task on a Ray cluster: auto (this machine's cluster) or ADDRESS (host:port).",
            flags=("--ray",),
            flag_value="auto",
        ),
    )
    ray_gpus: float | None = field(
        default=None,
        metadata=cli_flag(
            "GPUs per point on Ray (default: 1 with --device cuda, else 0).", min=0.0, max=MAX_RAY_RESOURCES
        ),
    )
    ray_cpus: float | None = field(
        default=None, metadata=cli_flag("CPUs per point on Ray (default 1).", min=0.0, max=MAX_RAY_RESOURCES)
    )

    def __post_init__(self) -> None:
        if self.resident not in RESIDENT_CHOICES:
            raise OptionError(f"--resident {self.resident}: choose one of {', '.join(RESIDENT_CHOICES)}")
        for name, value in (("--ray-gpus", self.ray_gpus), ("--ray-cpus", self.ray_cpus)):
            if value is not None and not math.isfinite(value):
                raise OptionError(f"{name} {value}: not a finite number")
            if value is not None and not 0 <= value <= MAX_RAY_RESOURCES:
                raise OptionError(f"{name} {value}: not a number from 0 to {MAX_RAY_RESOURCES:g}")
        if self.ray_address is None and (self.ray_gpus is not None or self.ray_cpus is not None):
            raise OptionError("--ray-gpus and --ray-cpus need --ray")
        if self.ray_address is not None and self.resident == "on":
            raise OptionError("--resident on: each Ray task builds its own point; use --resident auto or off")
        if self.resident == "on" and self.write:
            raise OptionError(
                "--resident on: --write scores each point from its written folder; use one of them"
            )

    @property
    def ray(self) -> tuple[str, float | None, float] | None:
        """(address, GPUs, CPUs per point) of `--ray`, or None."""
        if self.ray_address is None:
            return None
        return self.ray_address, self.ray_gpus, 1.0 if self.ray_cpus is None else self.ray_cpus

    def spec_keywords(self) -> dict[str, Any]:
        """The keywords of `evaluation.sweep.build_spec` (everything but where the points run)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("ray_")}


SWEEP_FIELDS = tuple(f.name for f in fields(SweepOptions))
