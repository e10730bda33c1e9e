"""The methods added from mergekit 0.1.5's registry (nearswap, ram, breadcrumbs, breadcrumbs_ties,
sce, model_stock): each against a float64 numpy reference written here from its definition, on
tiny tensors and on a tiny Llama folder, from flags and from a mergekit YAML config; elementwise
ones under any chunking; and, when LAZYMERGE_MERGEKIT names a mergekit 0.1.5 `mergekit-yaml`
(bash bench/setup_mergekit.sh), against mergekit's own output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lazymerge.cli import main
from lazymerge.merge.api import merge
from lazymerge.methods import METHODS
from lazymerge.options import MergeOptions
from tests.helpers.checkpoints import load_any
from tests.helpers.mergekit import compare_outputs, needs_mergekit, run_mergekit
from tests.helpers.mergekit import llama_family as mergekit_family
from tests.helpers.references import np64

GAMMA, EPSILON = 0.01, 1e-5


def cli(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


# --- float64 references, from the papers' and mergekit's definitions ---


def nearswap_ref(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0.0, 1.0)
    return w * b + (1 - w) * a


def ram_ref(base: np.ndarray, xs: list[np.ndarray]) -> np.ndarray:
    deltas = [x - base for x in xs]
    kept = [np.abs(d) > EPSILON for d in deltas]
    count = np.maximum(1, sum(k.astype(np.int64) for k in kept))
    return base + sum(np.where(k, d, 0.0) for d, k in zip(deltas, kept, strict=True)) / count


def breadcrumbs_mask(d: np.ndarray, density: float) -> np.ndarray:
    """Keep ranks [bottom, bottom + keep) of |d| ascending (ties by position): the largest
    gamma * n are outliers, the smallest are too small."""
    n = d.size
    if density >= 1:
        return np.ones(d.shape, dtype=bool)
    keep = int(density * n)
    bottom = max(0, n - keep - int(GAMMA * n))
    ranks = np.empty(n, dtype=np.int64)
    ranks[np.argsort(np.abs(d).ravel(), kind="stable")] = np.arange(n)
    return ((ranks >= bottom) & (ranks < bottom + keep)).reshape(d.shape)


def elect(deltas: list[np.ndarray], weights: list[float], sign_of: list[np.ndarray]) -> np.ndarray:
    """Disjoint mean: sum of w_i d_i over the deltas whose sign is that of sum(sign_of), divided
    by the sum of their w_i (0 where none agrees)."""
    sign = np.sign(sum(sign_of))
    total = np.zeros_like(deltas[0])
    norm = np.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        agree = (np.sign(d) == sign) & (d != 0)
        total += np.where(agree, w * d, 0.0)
        norm += np.where(agree, w, 0.0)
    return np.divide(total, norm, out=np.zeros_like(total), where=norm != 0)


def breadcrumbs_ref(base, xs, weights, density, ties: bool) -> np.ndarray:
    deltas = [np.where(breadcrumbs_mask(x - base, density), x - base, 0.0) for x in xs]
    if ties:
        return base + elect(deltas, weights, [w * d for w, d in zip(weights, deltas, strict=True)])
    return base + sum(w * d for w, d in zip(weights, deltas, strict=True))


def sce_ref(base: np.ndarray, xs: list[np.ndarray], density: float) -> np.ndarray:
    deltas = [x - base for x in xs]
    if density < 1:
        var = np.var(np.stack(deltas), axis=0)
        k = int(np.count_nonzero(var) * density)
        top = np.zeros(var.size, dtype=bool)
        top[np.argsort(-var.ravel(), kind="stable")[:k]] = True
        deltas = [np.where(top.reshape(var.shape), d, 0.0) for d in deltas]
    energy = np.array([np.mean(d**2) for d in deltas])
    shares = energy / energy.sum() if energy.sum() >= 1e-6 else np.full(len(deltas), 1 / len(deltas))
    sign = np.sign(sum(deltas))
    total = np.zeros_like(base)
    norm = np.zeros_like(base)
    for s, d in zip(shares, deltas, strict=True):
        agree = (np.sign(d) == sign) & (d != 0)
        total += np.where(agree, s * d, 0.0)
        norm += np.where(agree, s, 0.0)
    return base + total / np.maximum(norm, 1e-6)


def model_stock_ref(base: np.ndarray, xs: list[np.ndarray]) -> np.ndarray:
    deltas = [(x - base).ravel() for x in xs]
    k = len(deltas)
    cosines = [
        np.dot(deltas[i], deltas[j]) / max(np.linalg.norm(deltas[i]) * np.linalg.norm(deltas[j]), 1e-6)
        for i in range(k)
        for j in range(i + 1, k)
    ]
    cos = float(np.mean(cosines))
    t = k * cos / (1 + (k - 1) * cos)
    return t * np.mean(np.stack(xs), axis=0) + (1 - t) * base


def nuslerp_ref(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    cos = np.clip(
        np.dot(v0.ravel(), v1.ravel()) / (max(np.linalg.norm(v0), 1e-7) * max(np.linalg.norm(v1), 1e-7)),
        -1,
        1,
    )
    if 1 - cos**2 <= 1e-16:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)


def multislerp_ref(xs: list[np.ndarray], weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / (n + 1e-8) for x, n in zip(xs, norms, strict=True)]
    mean = sum(wi * u for wi, u in zip(w, units, strict=True))
    mean = mean / np.linalg.norm(mean)
    tangent = sum(wi * (u - np.vdot(u, mean) * mean) for wi, u in zip(w, units, strict=True))
    angle = np.linalg.norm(tangent) + 1e-8
    result = mean * np.cos(angle) + tangent * np.sin(angle) / angle
    return result * sum(n * wi for n, wi in zip(norms, w, strict=True))


def log_map(m: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The tangent vector at m (unit) pointing to u (unit), of length the angle between them."""
    dot = float(np.clip(np.vdot(m, u), -1, 1))
    theta = np.arccos(dot)
    return np.zeros_like(m) if theta < 1e-15 else theta / np.sin(theta) * (u - dot * m)


def karcher_ref(xs: list[np.ndarray], weights) -> np.ndarray:
    """The weighted Karcher mean of the directions, iterated to convergence (not 10 steps), times
    the weighted mean norm."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    units = [x / np.linalg.norm(x) for x in xs]
    m = sum(wi * u for wi, u in zip(w, units, strict=True))
    m /= np.linalg.norm(m)
    for _ in range(200):
        g = sum(wi * log_map(m, u) for wi, u in zip(w, units, strict=True))
        step = np.linalg.norm(g)
        if step < 1e-14:
            break
        m = np.cos(step) * m + np.sin(step) * g / step
        m /= np.linalg.norm(m)
    return m * sum(wi * np.linalg.norm(x) for wi, x in zip(w, xs, strict=True))


def reference(method: str, base: np.ndarray, xs: list[np.ndarray], weights, density) -> np.ndarray:
    if method == "nuslerp":
        return nuslerp_ref(xs[0], xs[1], weights[1] / (weights[0] + weights[1]))
    if method == "multislerp":
        return multislerp_ref(xs, weights)
    if method == "karcher":
        return karcher_ref(xs, weights)
    if method == "nearswap":
        return nearswap_ref(xs[0], xs[1], weights[1])
    if method == "ram":
        return ram_ref(base, xs)
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        return breadcrumbs_ref(base, xs, weights, density, ties=method == "breadcrumbs_ties")
    if method == "sce":
        return sce_ref(base, xs, density)
    assert method == "model_stock"
    return model_stock_ref(base, xs)


# --- tiny tensors ---


def family(seed: int) -> dict[str, torch.Tensor]:
    """Base, three fine-tunes (deltas of 0.1 with a shared component, so cosines are positive)
    with some elements unchanged (zero deltas: RAM's counts and the masks' ties)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (33, 17), "v": (257,), "s": ()}
    out = {}
    for name, shape in shapes.items():
        base = torch.randn(shape, generator=g)
        shared = torch.randn(shape, generator=g)
        out[f"base.{name}"] = base
        for i in range(3):
            delta = 0.1 * (shared + torch.randn(shape, generator=g))
            delta = torch.where(torch.rand(shape, generator=g) < 0.2, 0.0, delta)
            out[f"x{i}.{name}"] = base + delta
    return out


@pytest.fixture
def quartet(save):
    t = family(7)
    names = ("w", "v", "s")
    paths = {
        who: save(f"{who}.safetensors", {n: t[f"{who}.{n}"] for n in names})
        for who in ("base", "x0", "x1", "x2")
    }
    return paths, {who: {n: t[f"{who}.{n}"] for n in names} for who in paths}


# (method, extra flags, weights, density, inputs besides the base)
CASES = {
    "nearswap": ([], (0.95, 0.05), None, 2),
    "ram": ([], None, None, 3),
    "breadcrumbs": (["--density", "0.7"], (0.6, 0.4), 0.7, 2),
    "breadcrumbs-dense": (["--density", "1"], (0.6, 0.4), 1.0, 2),
    "breadcrumbs_ties": (["--density", "0.6"], (0.5, 0.3, 0.2), 0.6, 3),
    "sce": (["--density", "0.5"], None, 0.5, 3),
    "sce-all": (["--density", "1"], None, 1.0, 2),
    "model_stock": ([], None, None, 3),
    "nuslerp": ([], (0.3, 0.7), None, 2),
    "multislerp": ([], (0.5, 0.3, 0.2), None, 3),
    "karcher": ([], None, None, 3),
}
#: Methods without a base model; nearswap's first input is mergekit's base.
NO_BASE = ("nearswap", "nuslerp", "multislerp", "karcher")


@pytest.mark.parametrize("case", list(CASES))
def test_method_matches_float64_reference(tmp_path: Path, quartet, case: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    method = case.split("-")[0]
    flags, weights, density, count = CASES[case]
    paths, values = quartet
    inputs = [paths[f"x{i}"] for i in range(count)]
    if method == "nearswap":  # the first input is mergekit's base, t the second's weight
        inputs = [paths["base"], paths["x0"]]
        args = ["--alpha", str(weights[1])]
    elif method in NO_BASE:
        args = ["--weights", ",".join(map(str, weights))] if weights is not None else []
    else:
        args = ["--base", str(paths["base"]), *flags]
        if weights is not None:
            args += ["--weights", ",".join(map(str, weights))]
    result = cli("run", *map(str, inputs), "--method", method, *args, "-o", "out.safetensors", "-q")
    assert result.exit_code == 0, result.output
    got = load_any(tmp_path / "out.safetensors")
    assert sorted(got) == ["s", "v", "w"]
    for name, out in got.items():
        base = np64(values["base"][name])
        if method == "nearswap":
            xs = [base, np64(values["x0"][name])]
        else:
            xs = [np64(values[f"x{i}"][name]) for i in range(count)]
        want = reference(method, base, xs, weights or [1 / count] * count, density)
        assert out.dtype == torch.float32 and out.shape == values["base"][name].shape
        if method == "karcher":  # stops at a step below 1e-5 rad: that far from the converged mean
            error = np.linalg.norm(np64(out) - want)
            assert error <= 2e-5 * np.linalg.norm(want), f"{case} {name}: {error:.3g}"
        else:
            np.testing.assert_allclose(np64(out), want, rtol=2e-6, atol=2e-7, err_msg=f"{case} {name}")
        if name == "w" and method not in (
            "model_stock",
            *NO_BASE[1:],
        ):  # the formula changed something, and not everything
            changed = np.abs(want - base) > 0
            assert 0 < changed.sum() < changed.size or method in ("ram", "sce-all"), case


def test_masks_keep_what_they_say(quartet) -> None:
    """breadcrumbs keeps int(density n) deltas and drops the largest int(gamma n); sce keeps the
    int(density x varying) elements of largest variance."""
    _, values = quartet
    base = values["base"]["w"].reshape(-1)
    x0, x1 = (values[k]["w"].reshape(-1) for k in ("x0", "x1"))
    n = base.numel()
    out = METHODS["breadcrumbs"].fn([x0.clone(), x1.clone()], [1.0, 0.0], base=base.clone(), density=0.5)
    delta = x0 - base
    kept = (out - base) != 0
    assert int(kept.sum()) == int(0.5 * n)
    largest = torch.argsort(delta.abs(), descending=True)[: int(GAMMA * n)]
    assert not bool(kept[largest].any())  # the outliers are gone
    small = ~kept
    small[largest] = False
    assert float(delta[kept].abs().min()) >= float(delta[small].abs().max())  # and the smallest
    out = METHODS["sce"].fn([x0.clone(), x1.clone()], [0.5, 0.5], base=base.clone(), density=0.25)
    varying = int(((x0 - base) != (x1 - base)).sum())
    assert int(((out - base) != 0).sum()) <= int(0.25 * varying)


@pytest.mark.parametrize("method", ["nearswap", "ram"])
def test_elementwise_methods_stream_in_any_chunking(tmp_path: Path, quartet, method: str) -> None:
    """nearswap and ram stream (no whole tensor held): chunks of 7 elements give the same bytes."""
    paths, _ = quartet
    if method == "nearswap":
        inputs, extra = [paths["base"], paths["x0"]], {"alphas": (0.05,)}
    else:
        inputs, extra = [paths["x0"], paths["x1"], paths["x2"]], {"base": paths["base"]}
    assert METHODS[method].elementwise
    outs = []
    for chunk in (None, 7):
        out = tmp_path / f"{method}-{chunk}.safetensors"
        merge(inputs, out, MergeOptions(method=method, chunk_elems=chunk, block_elems=5, **extra))
        outs.append(load_any(out))
    for name in outs[0]:
        assert torch.equal(outs[0][name], outs[1][name]), name


# --- mergekit YAML ---

YAML = {
    "nearswap": "merge_method: nearswap\nbase_model: base.safetensors\nmodels:\n  - model: base.safetensors\n"
    "  - model: x0.safetensors\nparameters: {t: 0.05}\n",
    "ram": "merge_method: ram\nbase_model: base.safetensors\nmodels:\n"
    "  - model: x0.safetensors\n  - model: x1.safetensors\n  - model: x2.safetensors\n",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: base.safetensors\nmodels:\n"
    "  - model: x0.safetensors\n    parameters: {weight: 3}\n  - model: x1.safetensors\n    parameters: {weight: 1}\n"
    "parameters: {density: 0.7, normalize: true, lambda: 0.8}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: base.safetensors\nmodels:\n"
    "  - model: x0.safetensors\n    parameters: {weight: 0.5, density: 0.6}\n"
    "  - model: x1.safetensors\n    parameters: {weight: 0.5, density: 0.6}\nparameters: {normalize: true}\n",
    "sce": "merge_method: sce\nbase_model: base.safetensors\nmodels:\n"
    "  - model: x0.safetensors\n  - model: x1.safetensors\n  - model: x2.safetensors\nparameters: {select_topk: 0.5}\n",
    "model_stock": "merge_method: model_stock\nbase_model: base.safetensors\nmodels:\n"
    "  - model: x0.safetensors\n  - model: x1.safetensors\n  - model: x2.safetensors\n",
    "nuslerp": "merge_method: nuslerp\nmodels:\n  - model: x0.safetensors\n    parameters: {weight: 0.3}\n"
    "  - model: x1.safetensors\n    parameters: {weight: 0.7}\n",
    "multislerp": "merge_method: multislerp\nmodels:\n  - model: x0.safetensors\n    parameters: {weight: 5}\n"
    "  - model: x1.safetensors\n    parameters: {weight: 3}\n  - model: x2.safetensors\n    parameters: {weight: 2}\n",
    "karcher": "merge_method: karcher\nmodels:\n  - model: x0.safetensors\n  - model: x1.safetensors\n"
    "  - model: x2.safetensors\n",
}
# what each config means: (weights of the models besides the base, density)
MEANING = {
    "nearswap": ((0.95, 0.05), None),
    "ram": (None, None),
    "breadcrumbs": ((0.6, 0.2), 0.7),  # normalize: 3/4, 1/4; lambda 0.8
    "breadcrumbs_ties": ((0.5, 0.5), 0.6),
    "sce": (None, 0.5),
    "model_stock": (None, None),
    "nuslerp": ((0.3, 0.7), None),
    "multislerp": ((5, 3, 2), None),
    "karcher": (None, None),
}


@pytest.mark.parametrize("method", list(YAML))
def test_mergekit_yaml_runs_the_method(tmp_path: Path, quartet, method: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    paths, values = quartet
    (tmp_path / "merge.yml").write_text(YAML[method])
    planned = cli("plan", "merge.yml", "--json")
    assert planned.exit_code == 0, planned.output
    assert f'"method": "{method}"' in planned.stdout
    result = cli("run", "merge.yml", "-o", "out.safetensors", "-q")
    assert result.exit_code == 0, result.output
    got = load_any(tmp_path / "out.safetensors")
    weights, density = MEANING[method]
    count = len(weights) if weights is not None else 3
    for name, out in got.items():
        base = np64(values["base"][name])
        if method == "nearswap":
            xs = [base, np64(values["x0"][name])]
        else:
            xs = [np64(values[f"x{i}"][name]) for i in range(count)]
        want = reference(method, base, xs, weights or [1 / count] * count, density)
        if method == "karcher":
            assert np.linalg.norm(np64(out) - want) <= 2e-5 * np.linalg.norm(want), name
        else:
            np.testing.assert_allclose(np64(out), want, rtol=2e-6, atol=2e-7, err_msg=f"{method} {name}")


REFUSED = {
    "gamma": (YAML["breadcrumbs"].replace("density: 0.7,", "density: 0.7, gamma: 0.05,"), "gamma"),
    "epsilon": (YAML["ram"] + "parameters: {epsilon: 0.001}\n", "parameters.epsilon"),
    "filter_wise": (YAML["model_stock"] + "parameters: {filter_wise: true}\n", "parameters.filter_wise"),
    "nearswap-t": (YAML["nearswap"].replace("parameters: {t: 0.05}\n", ""), "parameters.t: required"),
    "sce-weight": (
        YAML["sce"].replace(
            "  - model: x0.safetensors\n", "  - model: x0.safetensors\n    parameters: {weight: 1}\n"
        ),
        "models[0].parameters.weight: not a parameter of sce",
    ),
    "ram-one": (
        "merge_method: ram\nbase_model: base.safetensors\nmodels:\n  - model: x0.safetensors\n",
        "models: ram with 1 model(s) besides the base",
    ),
    "breadcrumbs_ties-lambda": (
        YAML["breadcrumbs_ties"].replace("{normalize: true}", "{lambda: 2}"),
        "lambda",
    ),
    "passthrough": (YAML["ram"].replace("ram", "passthrough"), "base_model: passthrough copies one model's"),
    "nuslerp-base": (
        YAML["nuslerp"].replace("models:", "base_model: base.safetensors\nmodels:"),
        "base_model",
    ),
    "nuslerp-rows": (YAML["nuslerp"] + "parameters: {nuslerp_row_wise: true}\n", "nuslerp_flatten"),
    "karcher-iter": (YAML["karcher"] + "parameters: {max_iter: 50}\n", "parameters.max_iter"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_parameters_refused_in_one_line(tmp_path: Path, quartet, case: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    text, fragment = REFUSED[case]
    (tmp_path / "merge.yml").write_text(text)
    result = cli("plan", "merge.yml")
    assert result.exit_code == 1, result.output
    assert fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_tiny_llama_merge_from_flags_and_yaml(tmp_path: Path, monkeypatch) -> None:
    """A tiny Llama folder: breadcrumbs_ties from flags and from YAML give the same bytes, equal
    to the float64 reference per tensor, and the output keeps config and tokenizer."""
    models = pytest.importorskip("tests.helpers.models")
    monkeypatch.chdir(tmp_path)
    tok = models.make_tokenizer(models.BASE_WORDS)
    for seed, name in enumerate(["base", "a", "b"]):
        models.save_model(tmp_path / name, "llama", False, seed, tok)
    flags = cli(
        "run", "a", "b", "--method", "breadcrumbs_ties", "--base", "base", "--weights", "0.5,0.5",
        "--density", "0.5", "-o", "flags", "-q",
    )  # fmt: skip
    assert flags.exit_code == 0, flags.output
    (tmp_path / "m.yml").write_text(
        "merge_method: breadcrumbs_ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
        "  - model: b\n    parameters: {weight: 1}\nparameters: {density: 0.5, normalize: true}\n"
    )
    yml = cli("run", "m.yml", "-o", "yaml", "-q")
    assert yml.exit_code == 0, yml.output
    got, again = load_any(tmp_path / "flags"), load_any(tmp_path / "yaml")
    inputs = {n: load_any(tmp_path / n) for n in ("base", "a", "b")}
    assert (tmp_path / "yaml" / "config.json").exists() and (tmp_path / "yaml" / "tokenizer.json").exists()
    for name, out in got.items():
        assert torch.equal(out, again[name]), name
        base = np64(inputs["base"][name])
        want = breadcrumbs_ref(base, [np64(inputs["a"][name]), np64(inputs["b"][name])], [1, 1], 0.5, True)
        np.testing.assert_allclose(np64(out), want, rtol=2e-6, atol=2e-7, err_msg=name)


# --- parity with the real mergekit 0.1.5 (optional) ---


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    """Tiny fp32 Llama folders: a base and three fine-tunes (`tests.helpers.mergekit.llama_family`)."""
    return mergekit_family(tmp_path_factory.mktemp("llama-family"))


def parity_yaml(method: str, m: dict[str, Path]) -> str:
    """Absolute paths: mergekit's model card asks the Hub about any relative name found locally."""
    a, b, c, base = m["a"], m["b"], m["c"], m["base"]
    head = f"merge_method: {method}\nbase_model: {base}\ndtype: float32\nmodels:\n"
    if method == "nearswap":
        return head + f"  - model: {base}\n  - model: {a}\nparameters: {{t: 0.01}}\n"
    if method in ("nuslerp", "multislerp"):
        return f"merge_method: {method}\ndtype: float32\nmodels:\n" + (
            f"  - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.7}}\n"
        )
    if method == "karcher":
        return f"merge_method: karcher\ndtype: float32\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n"
    if method.startswith("breadcrumbs"):
        return head + (
            f"  - model: {a}\n    parameters: {{weight: 0.6}}\n  - model: {b}\n    parameters: {{weight: 0.4}}\n"
            "parameters: {density: 0.5, normalize: true}\n"
        )
    body = head + f"  - model: {a}\n  - model: {b}\n  - model: {c}\n"
    return body + ("parameters: {select_topk: 0.5}\n" if method == "sce" else "")


PARITY = (
    "nearswap",
    "ram",
    "breadcrumbs",
    "breadcrumbs_ties",
    "sce",
    "model_stock",
    "nuslerp",
    "multislerp",
    "karcher",
)


@needs_mergekit
@pytest.mark.mergekit
@pytest.mark.parametrize("method", PARITY)
def test_matches_mergekit(tmp_path: Path, llama_family, method: str) -> None:
    """lazymerge against mergekit 0.1.5 on the same fp32 config (21,152 elements).

    Measured: nearswap, ram and breadcrumbs_ties identical. sce: 2,060 elements differ in the last
    bits (each input's mean squared delta summed in float64, block by block, so that a tensor's
    chunks give the same weights; mergekit takes one fp32 mean). breadcrumbs: 1,578 elements differ
    in the last bits (lazymerge folds normalize into the weights, w_i / sum w; mergekit divides
    the sum by sum w after adding). model_stock: 8,326 differ in the last bits (its cosines and t
    in float64 here, fp32 there); nuslerp 11,242, multislerp 13,849 and karcher 15,360 likewise
    (norms, dot products and angles in float64 here; multislerp and karcher from the inputs'
    Gram matrix, so that chunks give the same bits). Every difference is within a few fp32 steps
    of the inputs' magnitude, and every mask keeps the same elements."""
    config = tmp_path / "merge.yml"
    config.write_text(parity_yaml(method, llama_family))
    run_mergekit(config, tmp_path / "mk")
    result = cli("run", str(config), "-o", str(tmp_path / "lz"), "-q")
    assert result.exit_code == 0, result.output
    # the masks agree: an element mergekit left at the base, lazymerge left at the base too
    differing, total = compare_outputs(tmp_path / "mk", tmp_path / "lz", llama_family["base"], method, True)
    if method in ("nearswap", "ram", "breadcrumbs_ties"):
        assert differing == 0
    print(f"{method}: {differing} of {total} elements differ")


# --- bounded-memory statistics: exact top-k magnitude over chunks ---


@pytest.mark.parametrize("ties", [False, True])
def test_streamed_topk_threshold_equals_the_sort(ties: bool) -> None:
    """Two histogram passes over chunks of 1,000 give the k-th largest |x| bit for bit as the sort
    does, and the streamed mask is the stable sort's (ties: values rounded to bf16, so many equal
    magnitudes; and zeros, infinities and NaN)."""
    from lazymerge.magnitude_select import TopKMask, kth_largest_magnitude

    g = torch.Generator().manual_seed(5)
    x = torch.randn(20_011, generator=g) * torch.logspace(-30, 30, 20_011)
    if ties:
        x = x.bfloat16().float()
        x[::97] = 0.0
        x[5], x[6], x[7] = float("inf"), float("-inf"), float("nan")
    magnitudes = x.abs()
    order = torch.sort(magnitudes, descending=True, stable=True)
    chunks = lambda: iter(x.split(1000))  # noqa: E731
    for k in (1, 2, 3, 17, 1000, 10_005, 19_999, 20_011):
        found = kth_largest_magnitude(chunks, k)
        want = order.values[k - 1]
        assert torch.equal(torch.tensor(found.value).float().view(torch.int32), want.view(torch.int32)) or (
            want.isnan() and np.isnan(found.value)
        ), k
        mask = TopKMask(found)
        got = torch.cat([mask(c) for c in x.split(1000)])
        expected = torch.zeros(x.numel(), dtype=torch.bool)
        expected[order.indices[:k]] = True
        assert torch.equal(got, expected), k


def test_streamed_trim_gives_ties_bytes() -> None:
    """TIES with the threshold from the chunked passes equals the whole-tensor `ties` bit for bit."""
    from lazymerge.magnitude_select import TopKMask, kth_largest_magnitude
    from lazymerge.methods import _sign_consensus_merge

    t = family(11)
    base, xs = t["base.w"].reshape(-1), [t[f"x{i}.w"].reshape(-1) for i in range(3)]
    weights, density = [0.5, 0.3, 0.2], 0.4
    whole = METHODS["ties"].fn([x.clone() for x in xs], weights, base=base.clone(), density=density)
    deltas = [x - base for x in xs]
    k = int(round(density * base.numel()))
    trimmed = []
    for d in deltas:
        mask = TopKMask(kth_largest_magnitude(lambda d=d: iter(d.split(64)), k))
        trimmed.append(torch.cat([c * mask(c) for c in d.split(64)]))
    streamed = base + _sign_consensus_merge(trimmed, weights)
    assert torch.equal(whole, streamed)
