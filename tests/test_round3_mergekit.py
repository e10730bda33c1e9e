"""Hostile mergekit configs (issue 19, part 2): aliases that expand a 600-byte file into billions
of nodes, self-referencing aliases, deep nesting, integers beyond a float's range or Python's
4300-digit conversion limit, and long strings are refused in one short line naming the file
and the field, before any value is walked or printed whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lazymerge.cli import main
from lazymerge.errors import MergekitConfigError
from lazymerge.mergekit_config import read_mergekit_config


def laughs(levels: int) -> str:
    """A flow list of nested aliases, each level nine of the one before: about 9**levels strings
    once expanded, in a few hundred bytes (the anchors are defined inside the value itself, so
    the rest of the config is valid)."""
    items = ['&l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    items += [f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


# 7 levels: 4.8 million strings expanded (b4b761f's message repr()s them: tens of MB, not an
# out-of-memory kill, so the old code fails these tests instead of the machine)
BOMB = laughs(7)
LINEAR = "merge_method: linear\nmodels:\n  - model: a.safetensors\n    parameters: {weight: 1}\n  - model: b.safetensors\n    parameters: {weight: 1}\n"
SLERP = "merge_method: slerp\nbase_model: a.safetensors\nmodels:\n  - model: a.safetensors\n  - model: b.safetensors\n"
TIES = "merge_method: ties\nbase_model: a.safetensors\nmodels:\n  - model: a.safetensors\n  - model: b.safetensors\n    parameters: {weight: 1, density: DENSITY}\n  - model: c.safetensors\n    parameters: {weight: 1, density: 0.5}\n"
BIG = "9" * 400  # beyond a float's range: float() raises OverflowError
HUGE = "9" * 5000  # beyond Python's 4300-digit int conversion limit: int() raises ValueError
LONG = "x" * 10_000

# (config text, error class, message fragment)
HOSTILE = [
    pytest.param(LINEAR + f"dtype: {BOMB}\n", MergekitConfigError, "YAML nodes", id="laughs-in-dtype"),
    pytest.param(
        LINEAR + f"out_dtype: {BOMB}\n", MergekitConfigError, "YAML nodes", id="laughs-in-out-dtype"
    ),
    pytest.param(
        LINEAR + f"tokenizer_source: {BOMB}\n",
        MergekitConfigError,
        "YAML nodes",
        id="laughs-in-tokenizer-source",
    ),
    pytest.param(
        LINEAR.replace("{weight: 1}", "{weight: " + BIG + "}", 1),
        MergekitConfigError,
        "models[0].parameters.weight: expected a number, got an integer of 400 digits",
        id="weight-beyond-float",
    ),
    pytest.param(
        TIES.replace("DENSITY", BIG),
        MergekitConfigError,
        "an integer of 400 digits",
        id="density-beyond-float",
    ),
    pytest.param(
        SLERP + "parameters: {t: " + BIG + "}\n",
        MergekitConfigError,
        "parameters.t",
        id="slerp-t-beyond-float",
    ),
    pytest.param(
        LINEAR.replace("{weight: 1}", "{weight: " + HUGE + "}", 1),
        MergekitConfigError,
        "a value cannot be read",
        id="weight-beyond-int-conversion",
    ),
    pytest.param(
        LINEAR.replace("linear", LONG, 1),
        MergekitConfigError,
        "(10000 characters) is not supported",
        id="long-method",
    ),
    pytest.param(
        LINEAR + f"dtype: {LONG}\n",
        MergekitConfigError,
        "(10000 characters) is not supported",
        id="long-dtype",
    ),
    pytest.param(
        LINEAR + f"? {LONG}\n: 1\n", MergekitConfigError, "(10000 characters): unknown field", id="long-key"
    ),
    pytest.param(
        LINEAR.replace("{weight: 1}", "\n      weight: 1\n      ? " + LONG + "\n      : 2", 1),
        MergekitConfigError,
        "(10000 characters): not a parameter of linear",
        id="long-parameter-name",
    ),
]


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("a", "b", "c"):
        save_file({"w": torch.ones(2)}, str(tmp_path / f"{name}.safetensors"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("text", "error", "fragment"), HOSTILE)
def test_hostile_config_refused_in_one_short_line(
    folder: Path, text: str, error: type, fragment: str
) -> None:
    path = folder / "merge.yml"
    path.write_text(text)
    with pytest.raises(error) as info:
        read_mergekit_config(path)
    message = str(info.value)
    assert fragment in message
    assert message.startswith(f"{path}: ")
    assert "\n" not in message and len(message) < 600


def test_laughs_exit_1_on_the_command_line(folder: Path) -> None:
    (folder / "merge.yml").write_text(LINEAR + f"dtype: {BOMB}\n")
    result = CliRunner().invoke(main, ["plan", "merge.yml", "-o", "out.safetensors"])
    assert result.exit_code == 1, result.output
    assert "merge.yml: expands to more than" in result.output
    assert len(result.output) < 600
