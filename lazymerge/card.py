"""The model card (`README.md`) of a folder output, in the Hugging Face Hub's form.

YAML front matter the Hub reads (`base_model`: the inputs' Hub ids or paths, `tags`, and
`library_name: transformers` for model folders with a config.json), then the recipe as the plan
has it (method, each input's role and weight, base model, density and seed, heads kept and
dropped, how embedding rows were matched and which tokens were appended), the lazymerge version
and the `lazymerge run` command that makes the same output again (Hub ids pinned to the snapshot's
commit). The card is one more file of the plan, written in the same transaction as the shards;
an input's own README.md is never copied.
"""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING

from lazymerge import __version__
from lazymerge.io.hub_cache import ModelSource
from lazymerge.io.writer import CARD_MARK, CARD_NAME
from lazymerge.options import DEFAULT_SHARD_SIZE, MergeOptions

if TYPE_CHECKING:
    from lazymerge.plan import MergePlan

__all__ = ["CARD_NAME", "model_cards"]


def _yaml_str(text: str) -> str:
    """A YAML double-quoted scalar (a JSON string is one; ASCII escapes keep it one line)."""
    return json.dumps(text, ensure_ascii=True)


def _weight(value: float) -> str:
    return repr(float(value))


def reproduce_command(plan: MergePlan, options: MergeOptions, variant: int) -> list[str]:
    """`lazymerge run` arguments that make output `variant` of `plan` again."""
    n = len(plan.roles) - (plan.base_index is not None)
    sources = list(plan.sources)
    destination = (
        plan.destination / plan.variant_names[variant] if plan.variant_names[variant] else plan.destination
    )
    args = ["lazymerge", "run", *(s.pinned for s in sources[:n]), "-o", str(destination)]
    args += ["--weights", ",".join(_weight(w) for w in plan.variants[variant][:n])]
    if plan.method != "linear":
        args += ["--method", plan.method]
    if plan.base_index is not None:
        args += ["--base", sources[plan.base_index].pinned]
    if plan.method in ("ties", "dare_linear", "dare_ties"):
        args += ["--density", _weight(plan.density)]
    if plan.method.startswith("dare"):
        args += ["--seed", str(plan.seed)]
    if options.dtype != "auto":
        args += ["--dtype", options.dtype]
    if options.shard_size != DEFAULT_SHARD_SIZE:
        args += ["--shard-size", str(options.shard_size)]
    if options.rm is not None:
        args += ["--rm", str(options.rm)]
    if options.strict:
        args.append("--strict")
    return args


def _input_line(source: ModelSource, role: str, weight: float, is_base: bool) -> str:
    where = (
        f"Hugging Face `{source.repo_id}` at `{source.revision}` (commit `{source.commit}`)"
        if source.from_hub_cache
        else f"`{source.given}`"
    )
    what = f"{role}, task vectors taken against it" if is_base else f"{role}, weight {weight:g}"
    return f"- {where}: {what}"


def model_card(plan: MergePlan, options: MergeOptions, variant: int) -> bytes:
    """The README.md of output `variant` (see the module docstring)."""
    sources = list(plan.sources)
    weights = plan.variants[variant]
    names = list(dict.fromkeys(s.name for s in sources))
    front = ["---", "base_model:", *(f"- {_yaml_str(n)}" for n in names), "tags:", "- merge", "- lazymerge"]
    if "config.json" in plan.companion_files:
        front.append("library_name: transformers")
    front.append("---")
    title = plan.variant_names[variant] or plan.destination.name or "merged model"
    lines = [
        *front,
        "",
        f"# {title}",
        "",
        f"A merge of {len(sources) - (plan.base_index is not None)} models made with lazymerge {__version__} "
        f"(method `{plan.method}`).",
        "",
        "## Recipe",
        "",
        f"Method: `{plan.method}`"
        + (f", density {plan.density:g}" if plan.method in ("ties", "dare_linear", "dare_ties") else "")
        + (f", seed {plan.seed}" if plan.method.startswith("dare") else "")
        + ".",
        "",
        "Inputs:",
        "",
        *(
            _input_line(s, plan.roles[i], weights[i], i == plan.base_index)
            for i, s in enumerate(sources)
            if i < len(plan.roles)
        ),
    ]
    if "reward model" in plan.roles:
        rm = sources[plan.roles.index("reward model")]
        lines += [
            "",
            f"The output is the reward model `{rm.name}` (DogeRM): backbones averaged with the weights.",
        ]
    kept = [t for t in plan.tensors.values() if t.note.startswith("reward head")]
    if kept:
        lines += ["", "Kept: " + ", ".join(f"`{t.name}` ({t.note})" for t in kept) + "."]
    if plan.dropped:
        lines += ["", "Dropped:", "", *(f"- {d}" for d in plan.dropped)]
    if plan.notes:
        lines += ["", "Notes:", "", *(f"- {n}" for n in plan.notes)]
    dtypes = sorted({t.dtype for t in plan.tensors.values()})
    lines += [
        "",
        f"{len(plan.tensors)} tensors, {plan.parameters:,} parameters, stored as {', '.join(dtypes)}.",
        "",
        "## Reproduce",
        "",
        "```sh",
        shlex.join(reproduce_command(plan, options, variant)),
        "```",
        "",
        CARD_MARK,
        "",
    ]
    return "\n".join(lines).encode("utf-8")


def model_cards(plan: MergePlan, options: MergeOptions) -> tuple[dict[str, bytes], ...]:
    """`{README.md: card}` for each output of a folder plan; nothing for a single-file output."""
    if plan.single_file:
        return tuple({} for _ in plan.variants)
    return tuple({CARD_NAME: model_card(plan, options, v)} for v in range(len(plan.variants)))
