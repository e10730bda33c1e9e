"""Bounded forms of the SLERP family (slerp, multislerp, karcher: one pass of the inputs' float64
Gram matrix), of breadcrumbs and breadcrumbs_ties (two histogram passes for both cuts of each
delta's ascending ranking), of SCE (two histogram passes over the per-element variances, one of
float64 mean squares), of ramplus_tl (one pass of overlap counts) and of della (chunks of whole
slabs, no statistics pass): a tensor larger than a chunk merged in passes gives the whole-tensor
merge's bits, the cuts are an ascending stable sort's, and resident memory stays within the
budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lazymerge import merge
from lazymerge.merge.api import prepare
from tests.helpers.checkpoints import load_any
from tests.helpers.rss import SLACK, merge_rss

SHAPES = {"big": (640, 512), "odd": (200_003,), "small": (7,)}
#: method -> (inputs besides the base, needs a base, passes over a tensor larger than a chunk,
#: budget that cuts "big" into several chunks, elements per arithmetic block in the chunked run)
CASES = {
    "slerp": (2, False, 2, 8 * 2**20, 200_000),
    "multislerp": (3, False, 2, 8 * 2**20, 200_000),
    "karcher": (3, False, 2, 8 * 2**20, 200_000),
    "breadcrumbs": (3, True, 3, 8 * 2**20, 3001),
    "breadcrumbs_ties": (3, True, 3, 8 * 2**20, 3001),
    "sce": (3, True, 4, 16 * 2**20, 200_000),
    "ramplus_tl": (3, True, 2, 8 * 2**20, 3001),
}
WHOLE = 1 << 30


def _save_inputs(tmp_path: Path, count: int) -> tuple[Path, list[Path], dict, list[dict]]:
    """base and `count` inputs on a grid of 1/8 (every fp32 delta exact; many equal magnitudes and
    variances, so the cuts fall inside runs of equal values); input i strays further from the
    base the larger i, so no two are nearly parallel."""
    g = torch.Generator().manual_seed(13)

    def grid(t: torch.Tensor) -> torch.Tensor:
        return (t * 8).round() / 8

    base = {k: grid(torch.randn(s, generator=g)) for k, s in SHAPES.items()}
    inputs = [
        {k: v + grid((0.4 + i) * torch.randn(v.shape, generator=g)) for k, v in base.items()}
        for i in range(count)
    ]
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, tensors in enumerate(inputs):
        paths.append(tmp_path / f"x{i}.safetensors")
        save_file(tensors, str(paths[-1]))
    return tmp_path / "base.safetensors", paths, base, inputs


def _options(method: str, base: Path) -> dict:
    _, needs_base, *_ = CASES[method]
    options: dict = {"method": method}
    if needs_base:
        options.update(base=base, density=0.3)
    if method == "multislerp":
        options["weights"] = [0.5, 0.3, 0.2]
    return options


@pytest.mark.parametrize("method", list(CASES))
def test_chunked_equals_whole_tensor_bit_for_bit(tmp_path: Path, method: str) -> None:
    count, _, passes, budget, block = CASES[method]
    pbase, paths, base, inputs = _save_inputs(tmp_path, count)
    options = _options(method, pbase)
    planned = {**options, **({"base": str(pbase)} if "base" in options else {})}
    _, plan = prepare(
        paths, tmp_path / "planned.safetensors", max_memory=budget, block_elems=block, **planned
    )
    big = plan.tensors["big"]
    assert plan.passes(big) == passes and plan.chunks(big) > 2, (plan.passes(big), plan.chunks(big))
    assert plan.passes(plan.tensors["small"]) == 1
    assert plan.working_memory <= budget and plan.memory_notes() == []
    assert f" chunk(s) in {passes} passes" in plan.describe()
    _, whole = prepare(paths, tmp_path / "planned.safetensors", max_memory=WHOLE, **planned)
    assert whole.passes(whole.tensors["big"]) == 1  # the whole-tensor function, one chunk
    runs = {}
    for memory in (WHOLE, budget):
        out = tmp_path / f"out-{memory}.safetensors"
        merge(paths, out, max_memory=memory, block_elems=block if memory == budget else 1 << 20, **options)
        runs[memory] = load_any(out)
    for name in SHAPES:
        assert torch.equal(runs[budget][name], runs[WHOLE][name]), name
        assert not torch.equal(runs[WHOLE][name], base[name]), name  # the merge did something
    # the comparison means something: a cut falls inside a run of equal values, so the chunks
    # must take the same ones among them as the whole tensor's stable sort does
    if method.startswith("breadcrumbs"):
        delta = (inputs[0]["big"] - base["big"]).abs().reshape(-1)
        ordered = torch.sort(delta, stable=True).values
        n = delta.numel()
        bottom = n - int(0.3 * n) - int(0.01 * n)
        assert (
            ordered[bottom - 1] == ordered[bottom]
            and ordered[bottom + int(0.3 * n)] == ordered[bottom + int(0.3 * n) - 1]
        )
    if method == "sce":
        deltas = torch.stack([x["big"] - base["big"] for x in inputs]).reshape(count, -1)
        var = deltas.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * 0.3)
        ordered = torch.sort(var, descending=True).values
        assert ordered[k - 1] == ordered[k]
    if method == "ramplus_tl":  # some elements changed by one input alone: their scale matters
        changed = sum(((x["big"] - base["big"]).abs() > 1e-5).int() for x in inputs)
        assert int((changed == 1).sum()) > 0 and int((changed > 1).sum()) > 0


def test_slerp_sweep_chunked_equals_whole(tmp_path: Path) -> None:
    """Several outputs: each has its own interpolation from the same statistics pass."""
    _, paths, _, _ = _save_inputs(tmp_path, 2)
    runs = {}
    for memory in (WHOLE, 8 * 2**20):
        out = tmp_path / f"sweep-{memory}"
        merge(paths, out, method="slerp", alpha=[0.2, 0.7], max_memory=memory, block_elems=200_000)
        runs[memory] = {d.name: load_any(d) for d in sorted(out.iterdir()) if d.is_dir()}
    assert len(runs[WHOLE]) == 2 and runs[WHOLE].keys() == runs[8 * 2**20].keys()
    for folder, tensors in runs[WHOLE].items():
        for name, value in tensors.items():
            assert torch.equal(value, runs[8 * 2**20][folder][name]), (folder, name)
    first, second = runs[WHOLE].values()
    assert not torch.equal(first["big"], second["big"])


@pytest.mark.parametrize("rank", [0, 1, 2, 17, 1000, 10_005, 19_999, 20_010, 20_011])
def test_ascending_top_is_the_stable_sorts(rank: int) -> None:
    """`AscendingTop` over chunks of 1,000: the elements an ascending stable sort (numpy's, a
    reference lazymerge does not use) ranks at `rank` or above, equal magnitudes at the cut taken
    from the last; on values rounded to bf16 (many equal magnitudes), zeros and infinities."""
    from lazymerge.methods import AscendingTop

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(20_011, generator=g) * torch.logspace(-20, 20, 20_011)).bfloat16().float()
    x[::97] = 0.0
    x[5], x[6] = float("inf"), float("-inf")
    top = AscendingTop(x.numel(), rank)
    for pass_no in (0, 1):
        for chunk in x.split(1000):
            top.observe(pass_no, chunk)
        top.end_pass(pass_no)
    masker = top.masker()
    got = torch.cat([masker(c) for c in x.split(1000)]).numpy()
    ranks = np.empty(x.numel(), dtype=np.int64)
    ranks[np.argsort(np.abs(x.numpy()), kind="stable")] = np.arange(x.numel())
    np.testing.assert_array_equal(got, ranks >= rank)
    if rank in (1, 2, 17):  # the cut splits the run of zeros: which of them it takes matters
        ordered = np.sort(np.abs(x.numpy()))
        assert ordered[rank - 1] == ordered[rank] == 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RssAnon")
@pytest.mark.parametrize(
    ("method", "budget"),
    [("karcher", 8 * 2**20), ("breadcrumbs_ties", 8 * 2**20), ("sce", 16 * 2**20)],
)
def test_resident_memory_within_budget(tmp_path: Path, method: str, budget: int) -> None:
    """One per family: 32 MiB fp32 tensors, two to four times the budget (the whole-tensor form
    would hold an fp32 copy per input and its scratch: over 100 MiB); the passes stay within the
    budget plus the interpreter's noise, and file-backed memory does not grow."""
    g = torch.Generator().manual_seed(2)
    count = 3 if method == "karcher" else 2
    names = [f"x{i}" for i in range(count)] + ["base"]
    paths = {n: tmp_path / f"{n}.safetensors" for n in names}
    small = {n: tmp_path / f"small-{n}.safetensors" for n in names}
    for name in names:
        save_file({"w": torch.randn(4096, 2048, generator=g)}, str(paths[name]))
        save_file({"w": torch.randn(64, 64, generator=g)}, str(small[name]))
    inputs = [paths[n] for n in names[:count]]
    kw: dict = {"method": method, "max_memory": budget}
    extra, warm_extra = {}, {}
    if method != "karcher":
        kw["density"] = 0.3
        extra, warm_extra = {"base": str(paths["base"])}, {"base": str(small["base"])}
    _, plan = prepare(inputs, tmp_path / "planned.safetensors", **kw, **extra)
    assert plan.passes(plan.tensors["w"]) == CASES[method][2] and plan.working_memory <= budget
    warm = [small[n] for n in names[:count]]
    growth = merge_rss(inputs, warm, tmp_path / "out.safetensors", {**kw, **extra}, {**kw, **warm_extra})[
        "growth"
    ]
    assert growth["anon"] <= budget + SLACK, f"anonymous RSS grew by {growth['anon'] / 2**20:.1f} MiB"
    assert growth["file"] + growth["shmem"] <= 4 * 2**20, growth


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_in_whole_slabs_equals_whole_tensor_bit_for_bit(tmp_path: Path, method: str) -> None:
    """della ranks within each slab along dimension 0 (dimension 1 of it, as mergekit ranks):
    chunks of whole slabs need no statistics pass, and give the whole tensor's bits (the same
    draws by position, the same ranks: values on a grid of 1/8, so equal magnitudes rank by
    position)."""
    g = torch.Generator().manual_seed(21)
    shapes = {"big": (640, 512), "cube": (40, 30, 64), "vector": (2_003,)}
    base = {k: (torch.randn(s, generator=g) * 8).round() / 8 for k, s in shapes.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"x{i}.safetensors")
        save_file(
            {k: v + (torch.randn(v.shape, generator=g) * 4).round() / 8 for k, v in base.items()},
            str(paths[-1]),
        )
    budget, block = 2 * 2**20, 3000
    options = {"method": method, "density": 0.4, "weights": [0.6, 0.4], "seed": 3}
    _, plan = prepare(
        paths,
        tmp_path / "planned.safetensors",
        base=str(tmp_path / "base.safetensors"),
        max_memory=budget,
        block_elems=block,
        **options,
    )
    for name, slab in (("big", 512), ("cube", 30 * 64)):
        tp = plan.tensors[name]
        assert plan.passes(tp) == 1 and plan.chunks(tp) > 2 and not plan.held_whole(tp), name
        assert plan.chunk_len(tp) % slab == 0, name
        assert (
            f"{name} {list(tp.shape)} F32/F32/F32 -> F32, {plan.chunks(tp)} chunk(s) in 1 pass, of whole {slab}-element slabs"
            in plan.describe()
        )
    assert plan.working_memory <= budget and plan.memory_notes() == []
    runs = {}
    for memory in (WHOLE, budget):
        out = tmp_path / f"out-{memory}.safetensors"
        merge(
            paths,
            out,
            base=tmp_path / "base.safetensors",
            max_memory=memory,
            block_elems=block if memory == budget else 1 << 20,
            **options,
        )
        runs[memory] = load_any(out)
    for name in shapes:
        assert torch.equal(runs[budget][name], runs[WHOLE][name]), name
        changed = runs[WHOLE][name] != base[name]
        assert 0 < int(changed.sum()) < changed.numel(), name  # MagPrune dropped some deltas, not all


@pytest.mark.parametrize(("rescale", "held"), [("true", True), ("false", False)])
def test_della_l1_rescale_is_held_whole_and_the_plan_says_why(
    tmp_path: Path, rescale: str, held: bool
) -> None:
    """mergekit's `rescale: true` scales each delta to its whole-tensor L1 norm (an fp32 sum over
    the tensor, which the parity test matches bit for bit): such a tensor is held whole, and
    `plan` says so; `rescale: false` streams in whole slabs."""
    import json

    from click.testing import CliRunner

    from lazymerge.cli import main

    g = torch.Generator().manual_seed(4)
    base = torch.randn(640, 512, generator=g)
    save_file({"w": base}, str(tmp_path / "base.safetensors"))
    for name in ("a", "b"):
        save_file(
            {"w": base + 0.1 * torch.randn(base.shape, generator=g)}, str(tmp_path / f"{name}.safetensors")
        )
    config = tmp_path / "merge.yml"
    config.write_text(
        "merge_method: della\nbase_model: base.safetensors\nmodels:\n"
        "  - model: a.safetensors\n    parameters: {weight: 0.5}\n  - model: b.safetensors\n    parameters: {weight: 0.5}\n"
        f"parameters: {{density: 0.5, epsilon: 0.1, rescale: {rescale}}}\n"
    )
    result = CliRunner().invoke(
        main, ["plan", str(config), "-o", str(tmp_path / "out"), "--max-memory", "2MiB", "--json"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    (row,) = plan["tensors"]
    assert row["held_whole"] is held and row["passes"] == 1
    assert row["chunks"] == 1 if held else row["chunks"] > 2
    if held:
        (note,) = plan["memory_notes"]
        assert (
            "della cannot bound them (mergekit's rescale to each delta's L1 norm sums the whole tensor"
            in note
        )
    else:
        assert plan["memory_notes"] == [] and plan["working_memory"] <= 2 * 2**20
