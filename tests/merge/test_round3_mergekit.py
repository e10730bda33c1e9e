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
        "line 4, column 26: a number of 400 characters, more than the 100",
        id="weight-beyond-float",
    ),
    pytest.param(
        TIES.replace("DENSITY", BIG),
        MergekitConfigError,
        "a number of 400 characters",
        id="density-beyond-float",
    ),
    pytest.param(
        SLERP + "parameters: {t: " + BIG + "}\n",
        MergekitConfigError,
        "line 6, column 17: a number of 400 characters",
        id="slerp-t-beyond-float",
    ),
    pytest.param(
        LINEAR.replace("{weight: 1}", "{weight: " + HUGE + "}", 1),
        MergekitConfigError,
        "a number of 5,000 characters",
        id="weight-beyond-int-conversion",
    ),
    # numbers longer than 100 characters are refused before PyYAML builds them: its base-60 form
    # costs time quadratic in the length (17 s for a 900 KB scalar before this check)
    pytest.param(
        LINEAR.replace("{weight: 1}", "{weight: " + ":".join(["59"] * 300_000) + "}", 1),
        MergekitConfigError,
        "line 4, column 26: a number of 899,999 characters, more than the 100",
        id="base-60-weight-of-900-KB",
    ),
    pytest.param(
        LINEAR.replace("{weight: 1}", "{weight: " + ":".join(["1"] * 51) + "}", 1),
        MergekitConfigError,
        "a number of 101 characters",
        id="base-60-weight-just-too-long",
    ),
    pytest.param(
        LINEAR.replace("{weight: 1}", "{weight: 0." + "0" * 98 + "1}", 1),
        MergekitConfigError,
        "a number of 101 characters",
        id="float-weight-just-too-long",
    ),
    pytest.param(
        LINEAR.replace("{weight: 1}", "{weight: !!float '" + "59:" * 300 + "59.5'}", 1),
        MergekitConfigError,
        "a number of 904 characters",
        id="base-60-float-beyond-float-range",
    ),
    pytest.param(
        LINEAR.replace("{weight: 1}", "{weight: 0x" + "f" * 200 + "}", 1),
        MergekitConfigError,
        "a number of 202 characters",
        id="long-hex-weight",
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


#: (number text, weight it reads as): numbers of up to 100 characters are read as before, the
#: base-60 form included; the same text one character longer is refused (test above), so the
#: refusal is by length, before the value is built.
SHORT_NUMBERS = [
    pytest.param(":".join(["1"] * 50), None, id="base-60-of-99-characters"),
    pytest.param("0." + "0" * 97 + "1", 1e-98, id="float-of-100-characters"),
    pytest.param("0.5", 0.5, id="plain"),
]


@pytest.mark.parametrize(("number", "weight"), SHORT_NUMBERS)
def test_numbers_up_to_100_characters_are_read(folder: Path, number: str, weight: float | None) -> None:
    path = folder / "merge.yml"
    path.write_text(LINEAR.replace("{weight: 1}", "{weight: " + number + "}", 1))
    if weight is None:  # 1:1:...:1 in base 60 is far beyond 1e6: read, then refused by value
        with pytest.raises(MergekitConfigError, match="is not a usable number"):
            read_mergekit_config(path)
    else:
        recipe = read_mergekit_config(path)
        assert recipe.options.weights is not None


def test_base_60_number_exits_1_in_one_line(folder: Path) -> None:
    (folder / "merge.yml").write_text(
        LINEAR.replace("{weight: 1}", "{weight: " + ":".join(["59"] * 300_000) + "}", 1)
    )
    result = CliRunner().invoke(main, ["plan", "merge.yml", "-o", "out.safetensors"])
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "unexpected" not in line
    assert line.startswith("Error: merge.yml: line 4, column 26: a number of 899,999 characters"), line
