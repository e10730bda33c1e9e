"""`lazymerge check`: a table of incompatible or surprising input pairs, each mapped to the
finding it must produce, from tiny real transformers checkpoints in tmp_path; and the CLI's
one-line error and exit status. The check's verdicts are held against what `plan` (the
reference: the merge's own checks) and the scorers' loaders do with the same inputs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lazymerge.check import SECTIONS, CheckRequest, run_check
from lazymerge.cli import main
from lazymerge.errors import LazyMergeError
from lazymerge.options import MergeOptions
from tests.helpers.evaluation import models, write_jsonl


def request(inputs: list[Path], out: Path, **kw: object) -> CheckRequest:
    return CheckRequest(tuple(map(str, inputs)), MergeOptions.build(alpha=0.5), out, **kw)  # type: ignore[arg-type]


def plan_error(inputs: list[Path], out: Path) -> str | None:
    """What `lazymerge plan` says of the same merge (None when it plans)."""
    result = CliRunner().invoke(main, ["plan", *map(str, inputs), "--alpha", "0.5", "-o", str(out)])
    return None if result.exit_code == 0 else result.output.strip()


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _rename_tensor(folder: Path, old: str, new: str) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors[new] = tensors.pop(old)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def wider_domain(tmp: Path, rm: Path, sft: Path) -> list[Path]:
    (wide,) = models(tmp / "wide", hidden_size=48)[1:]
    return [rm, wide]


def deeper_domain(tmp: Path, rm: Path, sft: Path) -> list[Path]:
    (deep,) = models(tmp / "deep", num_hidden_layers=3)[1:]
    return [rm, deep]


def openrlhf_reward_model(tmp: Path, rm: Path, sft: Path) -> list[Path]:
    """OpenRLHF saves its reward head as value_head.weight under its own class name."""
    _rename_tensor(rm, "score.weight", "value_head.weight")
    _edit_config(rm, architectures=["LlamaRewardModel"])
    return [rm, sft]


def two_reward_models(tmp: Path, rm: Path, sft: Path) -> list[Path]:
    other = tmp / "rm2"
    shutil.copytree(rm, other)
    return [rm, other]


def broken_header(tmp: Path, rm: Path, sft: Path) -> list[Path]:
    path = sft / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return [rm, sft]


#: (name, how the inputs are made, the section, level and message fragment expected)
CASES: list[tuple[str, Callable[[Path, Path, Path], list[Path]], str, str, str]] = [
    ("hidden-size", wider_domain, "plan", "error", "hidden_size 48 (reward model: 32)"),
    ("layer-count", deeper_domain, "plan", "error", "num_hidden_layers 3 (reward model: 2)"),
    (
        "openrlhf-value-head",
        openrlhf_reward_model,
        "heads",
        "error",
        "value_head.weight, OpenRLHF's reward head",
    ),
    ("two-reward-models", two_reward_models, "heads", "error", "pass --rm N"),
    ("truncated-header", broken_header, "inputs", "error", "model.safetensors"),
]


@pytest.mark.parametrize("name,make,section,level,fragment", CASES, ids=[c[0] for c in CASES])
def test_incompatible_inputs_are_found(
    tmp_path: Path,
    name: str,
    make: Callable[[Path, Path, Path], list[Path]],
    section: str,
    level: str,
    fragment: str,
) -> None:
    rm, sft = models(tmp_path)
    inputs = make(tmp_path, rm, sft)
    out = tmp_path / "merged"
    report = run_check(request(inputs, out))
    matching = [
        f for f in report.findings if f.section == section and f.level == level and fragment in f.message
    ]
    assert matching, report.format()
    assert all("\n" not in f.message for f in report.findings)
    assert not out.exists()


def test_the_check_refuses_what_plan_refuses(tmp_path: Path) -> None:
    """Each merge-level error of the table is one `plan` also refuses (plan is the reference)."""
    for name, make, _, _, _ in CASES:
        root = tmp_path / name
        rm, sft = models(root)
        inputs = make(root, rm, sft)
        errors = run_check(request(inputs, root / "merged")).errors
        refused = plan_error(inputs, root / "merged")
        assert errors, name
        assert refused is not None, name


def test_a_compatible_pair_passes_with_its_warnings(tmp_path: Path) -> None:
    rm, sft = models(tmp_path)  # the SFT vocabulary is reordered and grown by [PAD], no template
    report = run_check(request([rm, sft], tmp_path / "merged"))
    assert report.errors == [], report.format()
    warnings = " | ".join(f.message for f in report.warnings)
    assert "tokens not in" in warnings and "'[PAD]'" in warnings
    assert "other ids than in" in warnings
    assert "chat template differs from" in warnings and "(none here)" in warnings
    assert plan_error([rm, sft], tmp_path / "merged") is None
    memory = [f for f in report.findings if f.section == "memory"]
    assert len(memory) == 1 and "predicted peak" in memory[0].message
    assert [s[0] for s in SECTIONS][:2] == ["inputs", "heads"]


def test_an_existing_output_and_bad_data_are_found(tmp_path: Path) -> None:
    rm, sft = models(tmp_path)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": 1}]
    )
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    report = run_check(request([rm, sft], out, pairs=(str(bad), str(good))))
    data = {f.subject: f for f in report.findings if f.section == "data"}
    assert data[str(bad)].level == "error" and ":2:" in data[str(bad)].message
    assert data[str(good)].level == "ok" and data[str(good)].message == "1 pairs"
    with pytest.raises(LazyMergeError) as info:
        from lazymerge.evaluation.scoring import load_preferences

        load_preferences(bad)
    assert data[str(bad)].message in str(info.value)  # the same words eval would use
    plan = [f for f in report.errors if f.section == "plan"]
    assert plan and plan_error([rm, sft], out) is not None
    assert (out / "keep.txt").read_text() == "user file"


def test_cli_exit_status_and_one_line_error(tmp_path: Path) -> None:
    rm, sft = models(tmp_path)
    ok = CliRunner().invoke(main, ["check", str(rm), str(sft), "--alpha", "0.3", "-o", str(tmp_path / "m")])
    assert ok.exit_code == 0, ok.output
    assert "memory" in ok.output and "warning" in ok.output
    openrlhf_reward_model(tmp_path, rm, sft)
    bad = CliRunner().invoke(main, ["check", str(rm), str(sft), "-o", str(tmp_path / "m")])
    assert bad.exit_code == 1
    last = bad.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "value_head.weight" in last and "--rm 0" in last
    as_json = CliRunner().invoke(main, ["check", str(rm), str(sft), "-o", str(tmp_path / "m"), "--json"])
    assert as_json.exit_code == 1 and '"ok": false' in as_json.output


def test_plan_run_and_sweep_refuse_first_with_the_checks_line(tmp_path: Path) -> None:
    """The check's blocking finding stops plan, run and sweep before any work, in the same
    words: nothing is planned, written or created."""
    rm, sft = models(tmp_path)
    openrlhf_reward_model(tmp_path, rm, sft)
    first = run_check(request([rm, sft], tmp_path / "m")).errors[0]
    line = f"Error: {first.subject}: {first.message}"
    assert "value_head.weight" in line and "--rm 0" in line
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w3", "chosen": "w5", "rejected": "w6"}])
    commands = {
        "plan": ["plan", str(rm), str(sft), "--alpha", "0.5", "-o", str(tmp_path / "m")],
        "run": ["run", str(rm), str(sft), "--alpha", "0.5", "-o", str(tmp_path / "m")],
        "sweep": [
            "sweep",
            str(rm),
            str(sft),
            "--alpha",
            "0,0.5",
            "--pairs",
            str(pairs),
            "-o",
            str(tmp_path / "s"),
        ],
    }
    for name, args in commands.items():
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, (name, result.output)
        assert result.output.strip().splitlines() == [line], name
    assert not (tmp_path / "m").exists() and not (tmp_path / "s").exists()
    fresh, fresh_sft = models(tmp_path / "fresh")
    two = two_reward_models(tmp_path / "fresh", fresh, fresh_sft)  # the merge's own refusal: the same words
    (finding,) = [f for f in run_check(request(two, tmp_path / "m")).errors if f.section == "heads"]
    refused = CliRunner().invoke(
        main, ["sweep", *map(str, two), "--pairs", str(pairs), "-o", str(tmp_path / "s")]
    )
    assert refused.exit_code == 1 and finding.message in refused.output
