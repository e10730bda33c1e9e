"""`lazymerge check`: everything a merge, eval or sweep would refuse later, found in seconds.

Headers, configs, tokenizer files and data files only; no tensor data is read, nothing from a
model folder is executed (chat templates are compared as text, tokenizers read as JSON). The
check is a list of named sections (`SECTIONS`), each a function of the `CheckContext` returning
its findings; a section that needs the opened inputs is skipped when they failed to open. A
finding is `ok` (a fact for the table), `warning` (merges, but may surprise) or `error` (the
merge, eval or sweep would be refused). With `--base`, the last section (`check_task_vectors`)
reads the tensors once, streaming, for the task vectors of the inputs against the base.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazymerge.errors import LazyMergeError
from lazymerge.merge import preflight
from lazymerge.merge.preflight import Finding, Level, from_error
from lazymerge.options import MergeOptions


@dataclass(frozen=True)
class CheckRequest:
    """What to check: the merge's inputs and options (as `run`/`plan` take them), its output, and
    the data files an eval or sweep would read."""

    inputs: tuple[str, ...]
    options: MergeOptions
    output: Path | None = None
    force: bool = False
    pairs: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()


@dataclass
class CheckContext:
    """The request, and what earlier sections opened for later ones."""

    request: CheckRequest
    models: list[Any] = field(default_factory=list)  # recipe.ModelInput, one per input
    rm_index: int | None = None


@dataclass(frozen=True)
class CheckReport:
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def format(self) -> str:
        return "\n".join(f.line() for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.errors,
            "findings": [f.to_dict() for f in self.findings],
        }


Section = Callable[[CheckContext], list[Finding]]


def check_inputs(ctx: CheckContext) -> list[Finding]:
    """Each input's headers (validated as `inspect` validates them), config and tokenizer."""
    from lazymerge.io.hub_cache import resolve_input
    from lazymerge.merge.api import open_inputs
    from lazymerge.merge.recipe import ModelInput

    out = []
    for given in ctx.request.inputs:
        try:
            (ckpt,) = open_inputs([resolve_input(given).path])
            model = ModelInput.open(ckpt)
        except LazyMergeError as exc:
            out.append(from_error("inputs", given, exc))
            continue
        ctx.models.append(model)
        out.append(Finding("inputs", given, "ok", _describe(model)))
    if len(ctx.models) != len(ctx.request.inputs):
        for model in ctx.models:
            model.checkpoint.close()
        ctx.models.clear()
    return out


def _describe(model: Any) -> str:
    config = model.config or {}
    dtypes = sorted({t.dtype for t in model.checkpoint.values()})
    facts = [
        f"{', '.join(map(str, config.get('architectures') or ['no architectures']))}",
        f"{config.get('num_hidden_layers', '?')} layers",
        f"hidden {config.get('hidden_size', '?')}",
        f"vocab {config.get('vocab_size', '?')}"
        + (f" ({len(model.vocab)} tokens)" if model.vocab is not None else " (no tokenizer)"),
        f"tied {bool(config.get('tie_word_embeddings', False))}",
        f"pad {config.get('pad_token_id')}",
        f"{len(model.checkpoint)} tensors {'/'.join(dtypes)}",
    ]
    return "; ".join(facts)


def check_heads(ctx: CheckContext) -> list[Finding]:
    """Which input is the reward model, its head, and heads lazymerge reads otherwise
    (`preflight.check_heads`)."""
    findings, ctx.rm_index = preflight.check_heads(ctx.models, ctx.request.options.rm)
    return findings


def check_tokenizers(ctx: CheckContext) -> list[Finding]:
    """Vocabularies and special tokens against the reward model's (or the first input's)."""
    return preflight.check_tokenizers(ctx.models, ctx.rm_index)


def check_templates(ctx: CheckContext) -> list[Finding]:
    """Chat templates compared as text (never rendered here)."""
    return preflight.check_templates(ctx.models, ctx.rm_index)


def check_plan(ctx: CheckContext) -> list[Finding]:
    """Every check `plan` and `run` apply (shapes, dtypes, vocabularies, the output rule), and
    the plan's predicted memory against this machine's."""
    import psutil

    from lazymerge.merge.api import prepare

    request = ctx.request
    try:
        checkpoints, plan = prepare(
            list(request.inputs), request.output, request.options, force=request.force, preflight=False
        )
    except LazyMergeError as exc:
        return [from_error("plan", "merge", exc)]
    for ckpt in checkpoints:
        ckpt.close()
    out = [
        Finding(
            "plan", str(plan.destination), "ok", f"{len(plan.tensors)} tensors, {plan.output_bytes:,} bytes"
        )
    ]
    out += [Finding("plan", "merge", "ok", note) for note in plan.notes]  # facts; surprises warned above
    predicted, memory = plan.predicted_peak_rss, psutil.virtual_memory()
    level: Level = "ok"
    if predicted > memory.total:
        level = "error"
    elif predicted > memory.available:
        level = "warning"
    out.append(
        Finding(
            "memory",
            "merge",
            level,
            f"predicted peak {predicted / 2**30:.2f} GiB; this machine has {memory.total / 2**30:.1f} GiB, "
            f"{memory.available / 2**30:.1f} GiB available"
            + ("; lower --max-memory" if level != "ok" else ""),
        )
    )
    return out


def check_data(ctx: CheckContext) -> list[Finding]:
    """Every pair and candidate file parsed, as eval, bon and sweep parse them."""
    from lazymerge.evaluation.scoring import load_candidates, load_preferences

    out = []
    for given in ctx.request.pairs:
        try:
            data = load_preferences(given)
        except LazyMergeError as exc:
            out.append(from_error("data", given, exc))
            continue
        what = (
            f"{len(data.rewardbench2)} RewardBench 2 rows"
            if data.rewardbench2
            else f"{len(data.pairs)} pairs"
        )
        out.append(Finding("data", given, "ok", what))
    for given in ctx.request.candidates:
        try:
            sets = load_candidates(given)
        except LazyMergeError as exc:
            out.append(from_error("data", given, exc))
            continue
        out.append(Finding("data", given, "ok", f"{len(sets)} candidate sets"))
    return out


def check_task_vectors(ctx: CheckContext) -> list[Finding]:
    """With `--base`: each input's delta from the base, relative to the base's norm, and the
    cosines between the deltas, per layer group (`diagnostics.task_vectors`: one streaming pass,
    the only section that reads tensor data). Nothing without a base."""
    from lazymerge.evaluation.diagnostics import task_vectors

    base = ctx.request.options.base
    if base is None:
        return []
    paths = [str(m.checkpoint.path) for m in ctx.models]
    try:
        report = task_vectors(paths, base)
    except LazyMergeError as exc:
        return [from_error("task vectors", str(base), exc)]
    out = [Finding("task vectors", str(base), "ok", _vectors_line(report.total, report.models))]
    out += [Finding("task vectors", g.group, "ok", _vectors_line(g, report.models)) for g in report.groups]
    if report.skipped:
        out.append(
            Finding(
                "task vectors",
                str(base),
                "warning",
                f"{len(report.skipped)} tensor(s) left out, e.g. {report.skipped[0]}",
            )
        )
    return out


def _vectors_line(group: Any, models: Sequence[str]) -> str:
    """`delta rm 0.16%, delta sft 0.24%, cos(rm, sft) 0.031` for one group of `task_vectors`."""
    names = [Path(m).name or m for m in models]
    cells = [
        f"delta {n} {'-' if r is None else f'{100 * r:.3g}%'}"
        for n, r in zip(names, group.relative_norms, strict=True)
    ]
    cells += [f"cos({names[i]}, {names[j]}) {'-' if c is None else f'{c:.3f}'}" for i, j, c in group.cosines]
    return f"{group.tensors} tensors: " + ", ".join(cells)


#: The check's sections, in order: (name, function, needs the opened inputs).
SECTIONS: tuple[tuple[str, Section, bool], ...] = (
    ("inputs", check_inputs, False),
    ("heads", check_heads, True),
    ("tokenizers", check_tokenizers, True),
    ("chat templates", check_templates, True),
    ("plan", check_plan, True),
    ("data", check_data, False),
    ("task vectors", check_task_vectors, True),
)


def run_check(request: CheckRequest, sections: Sequence[tuple[str, Section, bool]] = SECTIONS) -> CheckReport:
    """Run every section; a section needing the inputs is skipped when one failed to open."""
    ctx = CheckContext(request)
    findings: list[Finding] = []
    try:
        for _name, section, needs_inputs in sections:
            if needs_inputs and not ctx.models:
                continue
            findings.extend(section(ctx))
    finally:
        for model in ctx.models:
            model.checkpoint.close()
    return CheckReport(tuple(findings))
