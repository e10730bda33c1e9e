"""Whole-tensor methods in bounded memory: a tensor larger than a chunk is merged in statistics
passes then an apply pass (`MergePlan.passes`), with the same bits as the whole-tensor merge, a
float64 reference's masks, and working memory within --max-memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lazymerge import merge
from lazymerge.merge.api import prepare
from tests.helpers.checkpoints import load_any
from tests.helpers.references import np64, reference
from tests.helpers.rss import SLACK, merge_rss

#: Budget small enough that the 256 x 512 tensor is cut into several chunks (beside the 2.5 MiB of
#: histograms TIES's statistics take for three inputs).
TINY = 4 * 2**20
#: Elements per arithmetic block in the chunked runs: several blocks per chunk, the last partial.
BLOCK = 3001


def _inputs(tmp_path: Path, quantised: bool) -> tuple[Path, Path, Path, dict, dict, dict]:
    """base, a, b: fp32 inputs; `quantised`: values on a grid of 1/8 (many equal magnitudes,
    every fp32 difference exact)."""
    g = torch.Generator().manual_seed(5)
    shapes = {"big": (256, 512), "odd": (100_003,), "small": (7,)}

    def one() -> dict[str, torch.Tensor]:
        out = {}
        for name, shape in shapes.items():
            t = torch.randn(shape, generator=g)
            out[name] = (t * 8).round() / 8 if quantised else t
        return out

    base, a, b = one(), one(), one()
    paths = []
    for name, tensors in (("base", base), ("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.safetensors")
        save_file(tensors, str(paths[-1]))
    return paths[0], paths[1], paths[2], base, a, b


def _plan(tmp_path: Path, paths: list[Path], **options: object):
    """(checkpoints, plan) of merging `paths` (the base model given as an option)."""
    return prepare(paths, tmp_path / "planned.safetensors", **options)


def test_ties_chunked_equals_whole_tensor_bit_for_bit(tmp_path: Path) -> None:
    pbase, pa, pb, base, a, b = _inputs(tmp_path, quantised=False)
    _, plan = _plan(tmp_path, [pa, pb], method="ties", base=str(pbase), density=0.3, max_memory=TINY)
    big, small = plan.tensors["big"], plan.tensors["small"]
    assert plan.passes(big) == 3 and plan.chunks(big) > 2, (plan.passes(big), plan.chunks(big))
    assert plan.passes(small) == 1
    assert plan.working_memory <= TINY
    runs = {}
    for budget in (1 << 30, TINY):
        out = tmp_path / f"out-{budget}.safetensors"
        block = BLOCK if budget == TINY else 1 << 20
        merge(
            [pa, pb],
            out,
            weights=[0.6, 0.4],
            method="ties",
            base=pbase,
            density=0.3,
            max_memory=budget,
            block_elems=block,
        )
        runs[budget] = load_any(out)
    for name in runs[TINY]:
        assert torch.equal(runs[TINY][name], runs[1 << 30][name]), name
    # the comparison means something: the k-th largest |delta| of each input is unique (no choice
    # among equal magnitudes), and the trim drops elements of the big tensor
    for x in (a, b):
        mags = (x["big"] - base["big"]).abs().reshape(-1)
        k = int(round(0.3 * mags.numel()))
        kth = torch.sort(mags, descending=True).values[k - 1]
        assert int((mags == kth).sum()) == 1
    want = reference("ties", base, [a, b], [0.6, 0.4], density=0.3)
    for name, value in want.items():
        np.testing.assert_allclose(np64(runs[TINY][name]), value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("density", [1e-6, 0.25, 0.5, 1.0])
def test_ties_chunked_takes_equal_magnitudes_by_position(tmp_path: Path, density: float) -> None:
    """Many equal magnitudes at the threshold: the chunked trim keeps the first by position, the
    float64 reference's stable sort (its masks would differ by whole elements otherwise)."""
    pbase, pa, pb, base, a, b = _inputs(tmp_path, quantised=True)
    out = tmp_path / "out.safetensors"
    merge(
        [pa, pb],
        out,
        weights=[0.5, 0.5],
        method="ties",
        base=pbase,
        density=density,
        max_memory=TINY,
        block_elems=BLOCK,
    )
    got = load_any(out)
    want = reference("ties", base, [a, b], [0.5, 0.5], density=density)
    for name, value in want.items():
        np.testing.assert_allclose(np64(got[name]), value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_ties_sweep_chunked_equals_whole(tmp_path: Path) -> None:
    """Several outputs (a sweep over alpha): each output's apply pass has its own masks."""
    pbase, pa, pb, *_ = _inputs(tmp_path, quantised=True)
    runs = {}
    for budget in (1 << 30, TINY):
        out = tmp_path / f"sweep-{budget}"
        merge([pa, pb], out, alpha=[0.2, 0.7], method="ties", base=pbase, density=0.4, max_memory=budget)
        runs[budget] = {d.name: load_any(d) for d in sorted(out.iterdir()) if d.is_dir()}
    assert len(runs[TINY]) == 2 and runs[TINY].keys() == runs[1 << 30].keys()
    for folder, tensors in runs[TINY].items():
        for name, value in tensors.items():
            assert torch.equal(value, runs[1 << 30][folder][name]), (folder, name)


def test_in_memory_merge_runs_the_statistics_passes(tmp_path: Path) -> None:
    """`iter_merged_tensors` (the evaluation's in-memory build) gives the written output's bits."""
    from lazymerge.merge.engine import iter_merged_tensors

    pbase, pa, pb, *_ = _inputs(tmp_path, quantised=True)
    options = dict(method="ties", base=str(pbase), density=0.4, max_memory=TINY, weights=(0.5, 0.5))
    checkpoints, plan = _plan(tmp_path, [pa, pb], **options)
    assert plan.passes(plan.tensors["big"]) == 3
    got = {name: t.clone() for name, t in iter_merged_tensors(plan, checkpoints)}
    out = tmp_path / "out.safetensors"
    merge([pa, pb], out, weights=[0.5, 0.5], method="ties", base=pbase, density=0.4, max_memory=TINY)
    written = load_any(out)
    assert got.keys() == written.keys()
    for name, value in written.items():
        assert torch.equal(got[name], value), name


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RssAnon")
def test_ties_resident_memory_within_budget(tmp_path: Path) -> None:
    """A 16 MiB fp32 tensor per input, twice the budget: the whole-tensor TIES would hold three
    fp32 copies and 32 bytes of scratch per element (about 112 MiB); the chunked one stays
    within the budget plus the interpreter's noise (the same slack as tests/merge/test_memory.py)."""
    budget = 8 * 2**20
    g = torch.Generator().manual_seed(1)
    names = ("a", "b", "base", "small_a", "small_b", "small_base")
    paths = [tmp_path / f"{n}.safetensors" for n in names]
    for path in paths[:3]:
        save_file({"w": torch.randn(2048, 2048, generator=g)}, str(path))
    for path in paths[3:]:
        save_file({"w": torch.randn(64, 64, generator=g)}, str(path))
    _, plan = _plan(tmp_path, paths[:2], method="ties", base=str(paths[2]), density=0.3, max_memory=budget)
    assert plan.passes(plan.tensors["w"]) == 3 and plan.working_memory <= budget
    kw = {"method": "ties", "density": 0.3, "max_memory": budget}
    growth = merge_rss(
        paths[:2],
        paths[3:5],
        tmp_path / "out.safetensors",
        {**kw, "base": str(paths[2])},
        {**kw, "base": str(paths[5])},
    )["growth"]
    assert growth["anon"] <= budget + SLACK, f"anonymous RSS grew by {growth['anon'] / 2**20:.1f} MiB"
    assert growth["file"] + growth["shmem"] <= 4 * 2**20, growth


def test_plan_shows_passes_and_what_is_held_whole(tmp_path: Path) -> None:
    pbase, pa, pb, *_ = _inputs(tmp_path, quantised=True)
    _, ties = _plan(tmp_path, [pa, pb], method="ties", base=str(pbase), density=0.3, max_memory=TINY)
    text = ties.describe()
    assert "big [256, 512] F32/F32/F32 -> F32, " in text and " chunk(s) in 3 passes" in text
    rows = {t["name"]: t for t in ties.to_dict()["tensors"]}
    assert rows["big"]["passes"] == 3 and not rows["big"]["held_whole"]
    assert ties.memory_notes() == [] and ties.working_memory <= TINY
    # arcee_fusion has no bounded form: its larger tensors are held whole, and the plan says so and why
    _, fusion = _plan(tmp_path, [pa, pb], method="arcee_fusion", max_memory=TINY)
    rows = {t["name"]: t for t in fusion.to_dict()["tensors"]}
    assert rows["big"] == {**rows["big"], "passes": 1, "held_whole": True, "chunks": 1}
    assert rows["small"]["held_whole"] is False
    (note,) = fusion.memory_notes()
    assert note.startswith("2 tensor(s) larger than a chunk are held whole (big [256, 512] the largest)")
    assert "arcee_fusion cannot bound them (row softmaxes and whole-tensor quantiles" in note
    assert f"note: {note}" in fusion.describe()
    assert fusion.working_memory > TINY


def test_model_stock_chunked_equals_whole_tensor_bit_for_bit(tmp_path: Path) -> None:
    """One statistics pass of float64 dot products, summed in the whole tensor's blocks."""
    g = torch.Generator().manual_seed(9)
    base = {"big": torch.randn(640, 512, generator=g), "small": torch.randn(9, generator=g)}
    paths = [tmp_path / "base.safetensors"]
    save_file(base, str(paths[0]))
    for i in range(3):
        paths.append(tmp_path / f"x{i}.safetensors")
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(paths[-1]))
    budget = 12 * 2**20  # beside 2.5 MiB of float64 blocks, one per input and one more
    _, plan = _plan(tmp_path, paths[1:], method="model_stock", base=str(paths[0]), max_memory=budget)
    big = plan.tensors["big"]
    assert plan.passes(big) == 2 and plan.chunks(big) > 2 and plan.chunk_len(big) % (1 << 16) == 0
    assert plan.working_memory <= budget and plan.memory_notes() == []
    runs = {}
    for memory in (1 << 30, budget):
        out = tmp_path / f"out-{memory}.safetensors"
        merge(paths[1:], out, method="model_stock", base=paths[0], max_memory=memory)
        runs[memory] = load_any(out)
    for name in base:
        assert torch.equal(runs[budget][name], runs[1 << 30][name]), name
    # chunks too small for whole statistics blocks: held whole, and the plan says why
    _, small = _plan(tmp_path, paths[1:], method="model_stock", base=str(paths[0]), max_memory=2**20)
    assert small.passes(small.tensors["big"]) == 1
    (note,) = small.memory_notes()
    assert "smaller than the 65536-element blocks" in note


def test_nuslerp_sweep_chunked_equals_whole_tensor_bit_for_bit(tmp_path: Path) -> None:
    """nuslerp (no base): the inputs' norms and dot product in one statistics pass; per output
    its own interpolation from the same statistics."""
    g = torch.Generator().manual_seed(4)
    paths = []
    first = {"big": torch.randn(640, 512, generator=g), "small": torch.randn(9, generator=g)}
    for i in range(2):
        paths.append(tmp_path / f"x{i}.safetensors")
        save_file(
            {k: v + 0.5 * i * torch.randn(v.shape, generator=g) for k, v in first.items()}, str(paths[-1])
        )
    budget = 8 * 2**20
    _, plan = prepare(paths, tmp_path / "planned", method="nuslerp", max_memory=budget, alpha=[0.3, 0.8])
    assert plan.passes(plan.tensors["big"]) == 2 and plan.chunks(plan.tensors["big"]) > 2
    assert plan.working_memory <= budget
    runs = {}
    for memory in (1 << 30, budget):
        out = tmp_path / f"out-{memory}"
        merge(paths, out, method="nuslerp", alpha=[0.3, 0.8], max_memory=memory)
        runs[memory] = {d.name: load_any(d) for d in sorted(out.iterdir()) if d.is_dir()}
    assert len(runs[budget]) == 2
    for folder, tensors in runs[budget].items():
        for name, value in tensors.items():
            assert torch.equal(value, runs[1 << 30][folder][name]), (folder, name)


def test_layer_streamed_merge_runs_the_statistics_passes(tmp_path: Path) -> None:
    """`layer_stream.MergedWeights` (the stream's merge on request) gives a multi-pass tensor the
    same bits as the written output, read back with safetensors."""
    from safetensors.torch import load_file

    from lazymerge.evaluation.layer_stream import MergedWeights

    pbase, pa, pb, *_ = _inputs(tmp_path, quantised=True)
    options = {"method": "ties", "base": str(pbase), "density": 0.3, "max_memory": TINY}
    checkpoints, plan = _plan(tmp_path, [pa, pb], **options)
    assert plan.passes(plan.tensors["big"]) == 3
    weights = MergedWeights(plan, checkpoints)
    try:
        streamed = dict(weights.read(["big", "odd", "small"]))
    finally:
        weights.close()
    out = tmp_path / "written.safetensors"
    merge([pa, pb], out, **options)
    written = load_file(str(out))
    for name, tensor in written.items():
        assert torch.equal(streamed[name], tensor), name
