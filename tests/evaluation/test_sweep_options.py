"""SweepOptions: the sweep's own flags as one frozen value, checked on construction, its help
in field metadata (the CLI's flags are generated from it)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from lazymerge.errors import OptionError
from lazymerge.evaluation.sweep import build_spec
from lazymerge.sweep_options import SWEEP_FIELDS, SweepOptions


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resident": "sometimes"}, "--resident sometimes: choose one of auto, on, off"),
        ({"ray_address": "auto", "ray_gpus": float("inf")}, "--ray-gpus inf: not a finite number"),
        ({"ray_address": "auto", "ray_cpus": 2000.0}, "--ray-cpus 2000.0: not a number from 0 to 1024"),
        ({"ray_gpus": 1.0}, "--ray-gpus and --ray-cpus need --ray"),
        ({"ray_address": "auto", "resident": "on"}, "each Ray task builds its own point"),
        ({"resident": "on", "write": True}, "--write scores each point from its written folder"),
    ],
)
def test_wrong_values_are_option_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        SweepOptions(**kwargs)


def test_ray_and_the_spec_keywords() -> None:
    assert SweepOptions().ray is None
    assert SweepOptions(ray_address="auto").ray == ("auto", None, 1.0)
    assert SweepOptions(ray_address="10.0.0.1:6379", ray_gpus=0.5, ray_cpus=2).ray == (
        "10.0.0.1:6379",
        0.5,
        2,
    )
    keywords = SweepOptions(alpha="0:1:0.5", write=True).spec_keywords()
    assert not any(k.startswith("ray") for k in keywords) and keywords["alpha"] == "0:1:0.5"
    # every keyword is one build_spec takes: the CLI passes them straight through
    assert set(keywords) <= set(inspect.signature(build_spec).parameters)


def test_every_field_has_help() -> None:
    fields = {f.name: f for f in dataclasses.fields(SweepOptions)}
    assert tuple(fields) == SWEEP_FIELDS
    assert all(f.metadata.get("help") for f in fields.values())
