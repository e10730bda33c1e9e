"""Parity with mergekit 0.1.5 beyond Llama: the methods of its registry run from the same config
by mergekit and by lazymerge on tiny Qwen2- and Gemma 2-shaped fp32 folders (optional: needs
LAZYMERGE_MERGEKIT=/path/to/mergekit-yaml, made by bash bench/setup_mergekit.sh).

DELLA's draws are fixed on both sides (mergekit's torch.bernoulli(p) replaced by p > 0.5, lazymerge's
draws by 0.5), so its masks are comparable. Every difference must stay within a few fp32 steps of
the weights' magnitude, and where mergekit's mask leaves an element at the base lazymerge's does too.

Measured (21,280 elements each, Qwen2 / Gemma 2): identical: nearswap, ram, ramplus_tl,
breadcrumbs_ties, della, arcee_fusion; last-bit differences: linear 4,395 / 4,405,
task_arithmetic 5,472 / 5,478, slerp 5,535 / 8,523, breadcrumbs 1,446 / 1,388, sce 751 / 645 (its
mean squares summed in float64 block by block, so that chunks give the same weights), nuslerp
11,825 / 11,252, multislerp 12,968 / 15,733, karcher 14,259 / 13,995 (both from the inputs' float64
Gram matrix), della_linear 2,707 / 2,659, model_stock 7,357 / 8,503.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lazymerge.cli import main
from tests.helpers.checkpoints import load_any
from tests.helpers.mergekit import compare_outputs, needs_mergekit, run_mergekit

models = pytest.importorskip("tests.helpers.models")
transformers = models.transformers

pytestmark = [pytest.mark.mergekit, needs_mergekit]
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> dict[str, Path]:
    """A base and three fine-tunes (base + 0.01 noise) of one family, fp32 folders."""
    from safetensors.torch import save_file

    config_name, causal_name, extra = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    tok = models.make_tokenizer(models.BASE_WORDS)
    config = getattr(transformers, config_name)(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=64,
        pad_token_id=2,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(0)
    model = getattr(transformers, causal_name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = {"base": root / "base"}
    model.save_pretrained(out["base"])
    tok.save_pretrained(out["base"])
    base = load_any(out["base"])
    for seed, name in enumerate(["a", "b", "c"], start=1):
        g = torch.Generator().manual_seed(seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(tuned, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        out[name] = root / name
    return out


def recipe(method: str, m: dict[str, Path]) -> str:
    a, b, c, base = m["a"], m["b"], m["c"], m["base"]
    head = f"merge_method: {method}\nbase_model: {base}\ndtype: float32\nmodels:\n"
    two = (
        f"  - model: {a}\n    parameters: {{weight: 0.6}}\n  - model: {b}\n    parameters: {{weight: 0.4}}\n"
    )
    three = f"  - model: {a}\n  - model: {b}\n  - model: {c}\n"
    if method == "linear":
        return f"merge_method: linear\ndtype: float32\nmodels:\n{two}"
    if method in ("slerp", "nearswap"):
        t = 0.3 if method == "slerp" else 0.01
        return head + f"  - model: {base}\n  - model: {a}\nparameters: {{t: {t}}}\n"
    if method == "arcee_fusion":
        return head + f"  - model: {base}\n  - model: {a}\n"
    if method in ("nuslerp", "multislerp"):
        return f"merge_method: {method}\ndtype: float32\nmodels:\n{two}"
    if method == "karcher":
        return f"merge_method: karcher\ndtype: float32\nmodels:\n{three}"
    if method == "task_arithmetic":
        return head + two
    if method.startswith("breadcrumbs"):
        return head + two + "parameters: {density: 0.5, normalize: true}\n"
    if method.startswith("della"):
        return head + two + "parameters: {density: 0.5, epsilon: 0.2, lambda: 0.9}\n"
    return head + three + ("parameters: {select_topk: 0.5}\n" if method == "sce" else "")


METHODS = (
    "linear",
    "task_arithmetic",
    "slerp",
    "nearswap",
    "ram",
    "ramplus_tl",
    "breadcrumbs",
    "breadcrumbs_ties",
    "sce",
    "model_stock",
    "nuslerp",
    "multislerp",
    "karcher",
    "della",
    "della_linear",
    "arcee_fusion",
)


#: The methods that drop deltas (elements left at the base): the rest only round differently, and
#: an element can round to the base's value on one side only (model_stock did, in 2 tensors).
MASKING = (
    "ram",
    "ramplus_tl",
    "breadcrumbs",
    "breadcrumbs_ties",
    "sce",
    "della",
    "della_linear",
    "arcee_fusion",
)


@pytest.mark.parametrize("method", METHODS)
def test_matches_mergekit(tmp_path: Path, family: dict[str, Path], method: str, monkeypatch) -> None:
    config = tmp_path / "merge.yml"
    config.write_text(recipe(method, family))
    run_mergekit(config, tmp_path / "mk", fixed_draws=True)
    # the module itself: as a dotted path, `lazymerge.merge` is the package's `merge` function
    engine = importlib.import_module("lazymerge.merge.engine")
    monkeypatch.setattr(engine, "position_uniform", lambda key, start, count: torch.full((count,), 0.5))
    result = CliRunner().invoke(main, ["run", str(config), "-o", str(tmp_path / "lz"), "-q"])
    assert result.exit_code == 0, result.output
    # where mergekit's mask drops a delta, lazymerge's drops it too
    differing, total = compare_outputs(
        tmp_path / "mk", tmp_path / "lz", family["base"], method, method in MASKING
    )
    print(f"{family['base'].parent.name} {method}: {differing} of {total} elements differ", file=sys.stderr)
