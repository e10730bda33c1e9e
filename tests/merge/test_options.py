"""Options are checked once, where they enter: every mistake exits 2 with one line, before any
input is opened; the memory the plan predicts is the memory the engine allocates."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lazymerge.errors import OptionError
from lazymerge.merge.api import prepare
from lazymerge.merge.plan import buffer_sizes
from lazymerge.merge.workspace import Workspace
from lazymerge.options import MergeOptions, parse_alpha
from tests.helpers.models import BASE_WORDS, make_tokenizer, save_model


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazymerge", *args], capture_output=True, text=True, cwd=cwd)


# (extra arguments after two inputs that do not exist, fragment of the one-line message)
OPTION_MISTAKES = [
    (["--alpha", "nan"], "not a finite number"),
    (["--alpha", "inf"], "not a finite number"),
    (["--alpha", "0.2", "--weights", "0.5,0.5"], "not both"),
    (["--weights", "nan,1"], "not a finite number"),
    (["--weights", "1e999,1"], "not a finite number"),
    (["--weights", "1e300,1"], "not a merge"),
    (["--weights", "1"], "1 values for 2 inputs"),
    (["--weights", "a,b"], "is not a number"),
    (["--alpha", "0:1:1e-9"], "at most 101"),
    (["--alpha", "1:0:0.1"], "STOP >= START"),
    (["--alpha", "0:1:0"], "STEP > 0"),
    (["--alpha", "0.1,0.1000001"], "print alike"),
    (["--alpha", "0:1:0.5", "-o", "out.safetensors"], "one folder per alpha"),
    (["--method", "average"], "unknown merge method"),
    (["--method", "ties"], "give the base model with --base"),
    (["--base", "x"], "--base is used by task-vector methods"),
    (["--method", "ties", "--base", "x", "--density", "0"], "--density"),
    (["--method", "ties", "--base", "x", "--density", "nan"], "--density"),
    (["--rm", "-1"], "counts from 0"),
    (["--rm", "2"], "only 2 inputs"),
    (["--seed", "-1"], "--seed"),
    (["--max-memory", "lots"], "not a size"),
    (["--max-memory", "0"], "more than 0 bytes"),
    (["--shard-size", "99999999PB"], "not a size"),
    (["--max-points", "0"], "--max-points"),
    (["--dtype", "int8"], "--dtype"),
]


@pytest.mark.parametrize("extra,fragment", OPTION_MISTAKES, ids=[" ".join(e) for e, _ in OPTION_MISTAKES])
def test_option_mistakes_exit_2_with_one_line_before_opening_inputs(
    tmp_path: Path, extra: list[str], fragment: str
) -> None:
    # the inputs do not exist: an option mistake must be found before any input is opened
    for command in ("run", "plan"):
        proc = cli(command, "missing-a", "missing-b", *extra, cwd=tmp_path)
        assert proc.returncode == 2, (command, extra, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("Error: ") and fragment in proc.stderr, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_three_inputs_with_alpha_exit_2(tmp_path: Path) -> None:
    proc = cli("run", "a", "b", "c", "--alpha", "0.3", cwd=tmp_path)
    assert proc.returncode == 2 and "--alpha needs exactly two inputs" in proc.stderr


def test_alpha_ranges_are_counted_before_they_are_built() -> None:
    assert parse_alpha("0:1:0.05") == tuple(round(0.05 * k, 10) for k in range(21))
    assert parse_alpha("0.1, 0.3") == (0.1, 0.3)
    with pytest.raises(OptionError, match="1000000001 values"):
        parse_alpha("0:1:1e-9")  # would be a billion floats if built
    assert len(parse_alpha("0:1:0.001", max_points=1001)) == 1001


def test_python_api_raises_option_error() -> None:
    with pytest.raises(OptionError, match="not a finite number"):
        MergeOptions(alphas=(float("nan"),))
    with pytest.raises(TypeError, match="unknown merge option"):
        MergeOptions.build(alpah=0.3)
    assert MergeOptions.build(alpha=[0.1, 0.2]).alphas == (0.1, 0.2)


def test_cli_does_not_import_torch() -> None:
    code = "import sys, lazymerge.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    rm = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    sft = save_model(tmp_path / "sft", "llama", False, 2, make_tokenizer(BASE_WORDS, added=["[PAD]"]))
    return rm, sft


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_memory": 1 << 30},
        {"max_memory": 20_000},
        {"max_memory": 3000, "alpha": [0.0, 0.5, 1.0]},
        {"max_memory": 50_000, "dtype": "bfloat16", "block_elems": 64},
        {"max_memory": 4096, "method": "dare_ties", "base": "rm"},
    ],
)
def test_predicted_working_memory_is_what_the_engine_allocates(tmp_path: Path, kwargs: dict) -> None:
    rm, sft = _folders(tmp_path)
    if "base" in kwargs:
        kwargs = {**kwargs, "base": rm}
    checkpoints, plan = prepare([rm, sft], tmp_path / "out", **kwargs)
    for ckpt in checkpoints:
        ckpt.close()
    sizes = buffer_sizes(plan)
    workspace = Workspace(sizes, threading.Event())
    # the engine's buffers, byte for byte, plus the method's own per-block temporaries
    assert workspace.allocated_bytes() + sizes.scratch_bytes == plan.working_memory
    assert all(t.dtype == torch.float32 and t.numel() == sizes.fp32_elems for t in workspace.fp32)
    # within budget whenever the budget holds one row of the embedding per buffer
    row_bytes = (
        max(t.row_elems for t in plan.tensors.values()) * sizes.buffer_elems // max(sizes.buffer_elems, 1)
    )
    if kwargs["max_memory"] >= 1000 * row_bytes:
        assert plan.working_memory <= kwargs["max_memory"]
