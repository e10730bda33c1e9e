"""mergekit `slices` (layer stacks: passthrough frankenmerges and a merge per slice), the
`passthrough` method and `chat_template`, read from mergekit 0.1.5 YAML configs: each output
against an in-memory reference built here from safetensors' own reader (mergekit's rules: output
layer i from layer first + k of each source, embeddings from the first slice's sources, the rest
from the last slice's; t = k / (layers - 1) within a slice), transformers loading the output, the
refusals in one line; and, when LAZYMERGE_MERGEKIT names a mergekit 0.1.5 `mergekit-yaml` (bash
bench/setup_mergekit.sh), against mergekit's own output.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lazymerge.cli import main
from tests.helpers.checkpoints import load_any
from tests.helpers.mergekit import compare_outputs, needs_mergekit, run_mergekit
from tests.helpers.mergekit import llama_family as mergekit_family

models = pytest.importorskip("tests.helpers.models")
transformers = models.transformers

TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
OTHER_TEMPLATE = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def cli(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """Tiny fp32 four-layer Llama folders: a base and three fine-tunes a, b, c."""
    return mergekit_family(tmp_path_factory.mktemp("slices-family"), num_hidden_layers=4)


# --- the reference: mergekit's slice rules over tensors read with safetensors ---


def stack_reference(slices: list[list[tuple[dict[str, torch.Tensor], int]]], layers: int, combine) -> dict:
    """The output of a layer stack: `slices` as lists of (source tensors, first layer), each of
    `layers[s]` layers; `combine(s, t, tensors, name)` merges one tensor's sources (t the
    gradient position)."""
    first, last = slices[0], slices[-1]
    names = list(first[0][0])
    out = {}
    for name in names:
        if LAYER.match(name) is None and "embed" in name:
            out[name] = combine(0, 0.0, [src[name] for src, _ in first], name)
    index = 0
    for s, part in enumerate(slices):
        for k in range(layers[s]):
            t = k / (layers[s] - 1) if layers[s] > 1 else 1.0
            tails = [m.group(2) for n in names if (m := LAYER.match(n)) and int(m.group(1)) == part[0][1] + k]
            for tail in tails:
                found = [src[f"model.layers.{start + k}.{tail}"] for src, start in part]
                out[f"model.layers.{index}.{tail}"] = combine(s, t, found, f"model.layers.{index}.{tail}")
            index += 1
    for name in names:
        if LAYER.match(name) is None and "embed" not in name:
            out[name] = combine(len(slices) - 1, 0.0, [src[name] for src, _ in last], name)
    return out


def gradient(values: list[float], t: float) -> float:
    """mergekit's interpolation of a gradient's values at t."""
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    return (1 - (scaled - low)) * values[low] + (scaled - low) * values[high]


def slerp64(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation in float64 from a to b (linear when nearly colinear)."""
    x, y = a.double().ravel(), b.double().ravel()
    cos = float(torch.dot(x, y) / (x.norm() * y.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * a.double() + t * b.double()).float()
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s0, s1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return (s0 * a.double() + s1 * b.double()).float()


def write(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "merge.yml"
    config.write_text(text)
    return config


def frankenmerge_yaml(m: dict[str, Path]) -> str:
    """Layers 0-2 of a, then 1-3 of b, then layer 3 of c scaled by 0.5: seven layers."""
    return (
        "merge_method: passthrough\ndtype: float32\nslices:\n"
        f"  - sources: [{{model: {m['a']}, layer_range: [0, 3]}}]\n"
        f"  - sources: [{{model: {m['b']}, layer_range: [1, 4]}}]\n"
        f"  - sources: [{{model: {m['c']}, layer_range: [3, 4], parameters: {{scale: 0.5}}}}]\n"
    )


def linear_slices_yaml(m: dict[str, Path]) -> str:
    """Two slices of linear merges of a and b: per-source weights, then a slice gradient."""
    return (
        "merge_method: linear\ndtype: float32\nslices:\n"
        "  - sources:\n"
        f"      - {{model: {m['a']}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}\n"
        f"      - {{model: {m['b']}, layer_range: [0, 2], parameters: {{weight: 0.7}}}}\n"
        "  - sources:\n"
        f"      - {{model: {m['a']}, layer_range: [1, 4], parameters: {{weight: [0.2, 0.8]}}}}\n"
        f"      - {{model: {m['b']}, layer_range: [1, 4]}}\n"
        "    parameters: {weight: 0.5}\n"
    )


def slerp_slices_yaml(m: dict[str, Path]) -> str:
    """slerp of base with a over layers 0-1 (t 0.3), of base with b over 2-3 (t a gradient)."""
    return (
        f"merge_method: slerp\nbase_model: {m['base']}\ndtype: float32\nslices:\n"
        "  - sources:\n"
        f"      - {{model: {m['base']}, layer_range: [0, 2]}}\n"
        f"      - {{model: {m['a']}, layer_range: [0, 2]}}\n"
        "    parameters: {t: 0.3}\n"
        "  - sources:\n"
        f"      - {{model: {m['base']}, layer_range: [2, 4]}}\n"
        f"      - {{model: {m['b']}, layer_range: [2, 4]}}\n"
        "parameters: {t: [0.2, 0.6]}\n"
    )


def passthrough_reference(m: dict[str, Path]) -> dict[str, torch.Tensor]:
    a, b, c = (load_any(m[x]) for x in "abc")
    scales = [1.0, 1.0, 0.5]
    return stack_reference(
        [[(a, 0)], [(b, 1)], [(c, 3)]],
        [3, 3, 1],
        lambda s, t, xs, name: xs[0].clone() if scales[s] == 1 else (xs[0].double() * scales[s]).float(),
    )


def test_passthrough_frankenmerge_stacks_the_layers(tmp_path: Path, family) -> None:
    config = write(tmp_path, frankenmerge_yaml(family))
    result = cli("run", str(config), "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    got, want = load_any(tmp_path / "out"), passthrough_reference(family)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 7
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == 7
    assert torch.equal(model.model.layers[5].mlp.up_proj.weight, want["model.layers.5.mlp.up_proj.weight"])


def test_plan_shows_where_each_layer_comes_from(tmp_path: Path, family) -> None:
    result = cli("plan", str(write(tmp_path, frankenmerge_yaml(family))), "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "model.layers.4.mlp.up_proj.weight" in x)
    assert "from layer 2 of input 1" in line  # output layer 4 is b's layer 1 + 1
    assert "layer stack of 7 layers" in result.output


def test_linear_per_slice(tmp_path: Path, family) -> None:
    result = cli("run", str(write(tmp_path, linear_slices_yaml(family))), "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    a, b = load_any(family["a"]), load_any(family["b"])

    def combine(s: int, t: float, xs: list[torch.Tensor], name: str) -> torch.Tensor:
        w = [0.3, 0.7] if s == 0 else [gradient([0.2, 0.8], t), 0.5]
        w = [x / sum(w) for x in w]  # linear's normalize: true
        return (w[0] * xs[0].double() + w[1] * xs[1].double()).float()

    want = stack_reference([[(a, 0), (b, 0)], [(a, 1), (b, 1)]], [2, 3], combine)
    got = load_any(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        np.testing.assert_allclose(got[name].numpy(), tensor.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 5


def test_slerp_per_slice(tmp_path: Path, family) -> None:
    result = cli("run", str(write(tmp_path, slerp_slices_yaml(family))), "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    base, a, b = (load_any(family[x]) for x in ("base", "a", "b"))
    want = stack_reference(
        [[(base, 0), (a, 0)], [(base, 2), (b, 2)]],
        [2, 2],
        lambda s, t, xs, name: slerp64(xs[0], xs[1], 0.3 if s == 0 else gradient([0.2, 0.6], t)),
    )
    got = load_any(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        np.testing.assert_allclose(got[name].numpy(), tensor.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_passthrough_of_one_model(tmp_path: Path, family) -> None:
    """passthrough under models: the one model's tensors, scaled."""
    config = write(
        tmp_path,
        f"merge_method: passthrough\nmodels:\n  - model: {family['a']}\n    parameters: {{scale: 2.0}}\n",
    )
    result = cli("run", str(config), "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    got, a = load_any(tmp_path / "out"), load_any(family["a"])
    assert sorted(got) == sorted(a)
    for name, tensor in a.items():
        assert torch.equal(got[name], tensor * 2), name


# --- chat_template ---


def test_chat_template_written_as_transformers_saves_it(tmp_path: Path, family) -> None:
    config = write(tmp_path, frankenmerge_yaml(family) + f"chat_template: {json.dumps(TEMPLATE)}\n")
    result = cli("run", str(config), "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == TEMPLATE
    assert "chat_template" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "w3"}], tokenize=False)
    assert text == "<s>user: w3</s>"


def test_chat_template_auto_takes_the_most_common(tmp_path: Path, family) -> None:
    """Two of three models carry TEMPLATE (one in tokenizer_config.json, one as a .jinja file),
    one OTHER_TEMPLATE: auto writes TEMPLATE, stripped."""
    import shutil

    folders = {}
    for name, template, as_file in (
        ("a", OTHER_TEMPLATE, True),
        ("b", TEMPLATE + "\n", False),
        ("c", TEMPLATE, True),
    ):
        folders[name] = tmp_path / name
        shutil.copytree(family[name], folders[name])
        if as_file:
            (folders[name] / "chat_template.jinja").write_text(template)
        else:
            cfg = folders[name] / "tokenizer_config.json"
            cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "chat_template": template}))
    config = write(
        tmp_path,
        "merge_method: linear\nmodels:\n"
        + "".join(f"  - model: {folders[x]}\n    parameters: {{weight: 1.0}}\n" for x in "abc")
        + "chat_template: auto\n",
    )
    result = cli("run", str(config), "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == TEMPLATE


# --- refusals, each in one line naming the field ---

REFUSED = [
    (
        "both",
        "models: [{{model: {a}}}]\nslices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}]}}]\n",
        "slices",
    ),
    (
        "lengths",
        "slices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 3]}}]}}]\n",
        "differ in length",
    ),
    ("range", "slices: [{{sources: [{{model: {a}, layer_range: [2, 2]}}]}}]\n", "layer_range"),
    ("range-type", "slices: [{{sources: [{{model: {a}, layer_range: 3}}]}}]\n", "layer_range"),
    ("beyond", "slices: [{{sources: [{{model: {a}, layer_range: [2, 6]}}]}}]\n", "has no layer 4"),
    (
        "two-sources",
        "slices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]}}]\n",
        "exactly one model",
    ),
    (
        "residual",
        "slices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}], residual_weight: 0.5}}]\n",
        "residual_weight",
    ),
    (
        "twice",
        "slices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {a}, layer_range: [2, 4]}}]}}]\n",
        "listed twice",
    ),
    (
        "named-template",
        "slices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}]}}]\nchat_template: chatml\n",
        "chat_template",
    ),
    (
        "short-template",
        "slices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}]}}]\nchat_template: '{{{{x}}}}'\n",
        "chat_template",
    ),
    ("layer-range-in-models", "models: [{{model: {a}, layer_range: [0, 2]}}]\n", "models[0].layer_range"),
]


@pytest.mark.parametrize(("case", "body", "fragment"), REFUSED, ids=[c for c, _, _ in REFUSED])
def test_refused_in_one_line(tmp_path: Path, family, case: str, body: str, fragment: str) -> None:
    head = "merge_method: passthrough\n"
    config = write(tmp_path, head + body.format(a=family["a"], b=family["b"]))
    result = cli("run", str(config), "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 1, (case, result.output)
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], (case, result.output)
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_task_vectors_need_the_base_in_every_slice(tmp_path: Path, family) -> None:
    config = write(
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {family['base']}\nslices:\n"
        f"  - sources: [{{model: {family['a']}, layer_range: [0, 2]}}, {{model: {family['b']}, layer_range: [0, 2]}}]\n"
        "parameters: {weight: 0.5}\n",
    )
    result = cli("run", str(config), "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 1 and "slices[0].sources: base_model is not among them" in result.output


def test_chat_template_needs_a_folder_output(tmp_path: Path, family) -> None:
    config = write(tmp_path, frankenmerge_yaml(family) + f"chat_template: {json.dumps(TEMPLATE)}\n")
    result = cli("run", str(config), "-o", str(tmp_path / "out.safetensors"), "-q")
    assert result.exit_code != 0 and "chat_template" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.safetensors").exists()


# --- parity with the real mergekit 0.1.5 (optional) ---

PARITY = {"passthrough": frankenmerge_yaml, "linear": linear_slices_yaml, "slerp": slerp_slices_yaml}


@needs_mergekit
@pytest.mark.mergekit
@pytest.mark.parametrize("case", list(PARITY))
def test_matches_mergekit(tmp_path: Path, family, case: str) -> None:
    """The same slices config through mergekit 0.1.5 and lazymerge: the same tensors and layer
    count, every element within 8 fp32 steps of the output's magnitude (the passthrough stack
    bit for bit), and the same chat template file."""
    config = write(tmp_path, PARITY[case](family) + f"chat_template: {json.dumps(TEMPLATE)}\n")
    run_mergekit(config, tmp_path / "mk")
    result = cli("run", str(config), "-o", str(tmp_path / "lz"), "-q")
    assert result.exit_code == 0, result.output
    differing, total = compare_outputs(tmp_path / "mk", tmp_path / "lz", tmp_path / "lz", case, False)
    print(f"{case}: {differing} of {total} elements differ")
    if case == "passthrough":
        assert differing == 0
    layers = [
        json.loads((tmp_path / x / "config.json").read_text())["num_hidden_layers"] for x in ("mk", "lz")
    ]
    assert layers[0] == layers[1]
    assert (tmp_path / "mk" / "chat_template.jinja").read_text() == (
        tmp_path / "lz" / "chat_template.jinja"
    ).read_text()
    templates = [transformers.AutoTokenizer.from_pretrained(tmp_path / x).chat_template for x in ("mk", "lz")]
    assert templates[0] == templates[1] == TEMPLATE


def test_layer_types_follow_their_source_layers(tmp_path: Path) -> None:
    """A Qwen2 config lists a type per layer (sliding window from layer 2 on): a stack of layers
    2-3 then 0-1 lists sliding, sliding, full, full, and transformers loads it as such."""
    tok = models.make_tokenizer(models.BASE_WORDS, family="qwen2")
    extra = {"num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}
    a = models.save_model(tmp_path / "a", "qwen2", False, 1, tok, **extra)
    b = models.save_model(tmp_path / "b", "qwen2", False, 2, tok, **extra)
    source = json.loads((a / "config.json").read_text())["layer_types"]
    assert source == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    config = write(
        tmp_path,
        "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: {a}, layer_range: [2, 4]}}]\n"
        f"  - sources: [{{model: {b}, layer_range: [0, 2]}}]\n",
    )
    result = cli("run", str(config), "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["layer_types"] == source[2:] + source[:2]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.layer_types == source[2:] + source[:2]
    want = load_any(b)["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(model.model.layers[3].self_attn.q_proj.weight, want)
