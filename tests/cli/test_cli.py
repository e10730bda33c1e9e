"""The command line: exit codes, one-line errors, nothing left behind, reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lazymerge.cli import main
from lazymerge.errors import OptionError
from lazymerge.options import parse_size
from tests.helpers.checkpoints import load_any, reference_merge


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazymerge", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def pair(save) -> tuple[Path, Path, dict, dict]:
    a = {"w": torch.randn(8, 4), "b": torch.randn(4)}
    b = {"w": torch.randn(8, 4), "b": torch.randn(4)}
    return save("a.safetensors", a), save("b.safetensors", b), a, b


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_run_default_output_and_report(tmp_path: Path, pair) -> None:
    pa, pb, a, b = pair
    result = run_cli("run", "a.safetensors", "b.safetensors", "--alpha", "0.3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "merged 2 tensors" in result.stdout and "peak resident memory" in result.stdout
    assert "anonymous" in result.stdout and "file-backed" in result.stdout
    assert result.stderr == ""  # no progress bar when not a terminal
    got = load_any(tmp_path / "merged.safetensors")
    want = reference_merge([a, b], [0.7, 0.3])
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_run_json_report(tmp_path: Path, pair) -> None:
    pa, pb, *_ = pair
    result = run_cli("run", str(pa), str(pb), "-o", str(tmp_path / "m.safetensors"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tensors"] == 2 and report["parameters"] == 36
    assert report["bytes_read"] == 2 * 36 * 4
    assert report["bytes_written"] == (tmp_path / "m.safetensors").stat().st_size
    for key in ("wall_s", "gb_per_s", "peak_rss_total", "peak_rss_anon", "peak_rss_file"):
        assert key in report


def test_quiet_prints_nothing(tmp_path: Path, pair) -> None:
    pa, pb, *_ = pair
    result = run_cli("run", str(pa), str(pb), "-o", str(tmp_path / "m.safetensors"), "-q")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


def test_folder_inputs_default_to_folder_output(tmp_path: Path, pair) -> None:
    pa, pb, *_ = pair
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    pa.rename(tmp_path / "A" / "model.safetensors")
    pb.rename(tmp_path / "B" / "model.safetensors")
    result = run_cli("run", "A", "B", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert listing(tmp_path / "merged") == ["README.md", "model.safetensors"]


@pytest.mark.parametrize(
    "change,fragment",
    [
        (lambda b: b.pop("b"), "lacks tensor 'b'"),
        (lambda b: b.update(extra=torch.ones(1)), "has tensor 'extra'"),
        (lambda b: b.update(w=torch.ones(4, 8)), "tensor 'w' has shape [4, 8], expected [8, 4]"),
        (lambda b: b.update(b=torch.ones(4, dtype=torch.int32)), "tensor 'b' is I32"),
    ],
    ids=["missing", "extra", "shape", "dtype"],
)
def test_incompatible_inputs_one_line_error(tmp_path: Path, save, change, fragment: str) -> None:
    a = {"w": torch.randn(8, 4), "b": torch.randn(4)}
    b = dict(a)
    change(b)
    pa, pb = save("a.safetensors", a), save("b.safetensors", b)
    before = listing(tmp_path)
    result = run_cli("run", str(pa), str(pb), "-o", str(tmp_path / "out.safetensors"))
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert fragment in result.stderr and str(pb) in result.stderr
    assert "Traceback" not in result.stderr
    assert listing(tmp_path) == before


def test_debug_shows_traceback(tmp_path: Path, pair) -> None:
    pa, _, *_ = pair
    result = run_cli("run", str(pa), str(tmp_path / "nope.safetensors"), "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "no such file" in result.stderr


def test_non_float_disagreement_leaves_nothing(tmp_path: Path, save) -> None:
    a = {"w": torch.randn(64), "ids": torch.arange(6)}
    b = {"w": torch.randn(64), "ids": torch.arange(6) + 1}
    pa, pb = save("a.safetensors", a), save("b.safetensors", b)
    before = listing(tmp_path)
    for out in ("out.safetensors", "outdir"):
        result = run_cli("run", str(pa), str(pb), "-o", str(tmp_path / out))
        assert result.returncode == 1 and "non-float tensor 'ids' (I64) differs" in result.stderr
        assert listing(tmp_path) == before  # no temporaries, no partial output


def test_usage_mistakes_exit_2(tmp_path: Path, pair) -> None:
    pa, pb, *_ = pair
    for args in (
        ["run", str(pa)],
        ["run", str(pa), str(pb), "--alpha", "0.2", "--weights", "0.5,0.5"],
        ["run", str(pa), str(pb), "--weights", "1"],
        ["run", str(pa), str(pb), "--max-memory", "lots"],
        ["run", str(pa), str(pb), "--weights", "a,b"],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)


def test_refuses_to_overwrite_input_even_with_force(tmp_path: Path, pair) -> None:
    pa, pb, *_ = pair
    before = pa.read_bytes()
    result = run_cli("run", str(pa), str(pb), "-o", str(pa), "--force")
    assert result.returncode == 1 and "never overwrites an input" in result.stderr
    assert pa.read_bytes() == before
    folder = tmp_path / "A"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(before)
    result = run_cli("run", str(folder), str(pb), "-o", str(folder), "--force")
    assert result.returncode == 1 and "never overwrites an input" in result.stderr


def test_existing_output_needs_force(tmp_path: Path, pair) -> None:
    pa, pb, a, b = pair
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    result = run_cli("run", str(pa), str(pb), "-o", str(out))
    assert result.returncode == 1 and "already exists; pass --force" in result.stderr
    # --force replaces only what lazymerge wrote: a user's file is never clobbered
    result = run_cli("run", str(pa), str(pb), "-o", str(out), "--force")
    assert result.returncode == 1 and "only outputs lazymerge wrote" in result.stderr
    assert out.read_bytes() == b"old"
    out.unlink()
    assert run_cli("run", str(pa), str(pb), "-o", str(out), "--alpha", "0.1", "-q").returncode == 0
    assert run_cli("run", str(pa), str(pb), "-o", str(out), "-q").returncode == 1
    result = run_cli("run", str(pa), str(pb), "-o", str(out), "--force", "-q")
    assert result.returncode == 0
    assert torch.equal(load_any(out)["w"], reference_merge([a, b], [0.5, 0.5])["w"])
    outdir = tmp_path / "folder"
    outdir.mkdir()
    (outdir / "stale.txt").write_text("x")
    assert run_cli("run", str(pa), str(pb), "-o", str(outdir)).returncode == 1
    assert run_cli("run", str(pa), str(pb), "-o", str(outdir), "--force", "-q").returncode == 1
    assert listing(outdir) == ["stale.txt"]
    (outdir / "stale.txt").unlink()
    outdir.rmdir()
    assert run_cli("run", str(pa), str(pb), "-o", str(outdir), "--alpha", "0.2", "-q").returncode == 0
    assert run_cli("run", str(pa), str(pb), "-o", str(outdir), "--force", "-q").returncode == 0
    assert listing(outdir) == ["README.md", "model.safetensors"]
    assert torch.equal(load_any(outdir)["w"], reference_merge([a, b], [0.5, 0.5])["w"])
    assert not [p for p in listing(tmp_path) if "lazymerge-tmp" in p or "lazymerge-lock" in p]


def test_bad_header_error_names_file(tmp_path: Path, pair) -> None:
    pa, pb, *_ = pair
    data = pb.read_bytes()
    pb.write_bytes(data[:-3])
    result = run_cli("run", str(pa), str(pb))
    assert result.returncode == 1 and str(pb) in result.stderr and "truncated" in result.stderr


def test_inspect(tmp_path: Path, pair) -> None:
    pa, *_ = pair
    result = run_cli("inspect", str(pa))
    assert result.returncode == 0
    assert "2 tensors in 1 file(s), 36 parameters" in result.stdout and "headers valid" in result.stdout
    doc = json.loads(run_cli("inspect", str(pa), "--json").stdout)
    assert {t["name"]: t["shape"] for t in doc["tensors"]} == {"w": [8, 4], "b": [4]}
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08" + b"\0" * 7 + b'{"x": 1}')
    result = run_cli("inspect", str(bad))
    assert result.returncode == 1 and "tensor 'x'" in result.stderr and str(bad) in result.stderr


def test_plan_reads_no_tensor_data(tmp_path: Path, pair, monkeypatch) -> None:
    pa, pb, *_ = pair
    from lazymerge.io.reader import Checkpoint

    def fail(*args, **kwargs):
        raise AssertionError("plan read tensor data")

    monkeypatch.setattr(Checkpoint, "read_into", fail)
    result = CliRunner().invoke(main, ["plan", str(pa), str(pb), "--alpha", "0.3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["weights"] == [0.7, 0.3] and doc["files"] == ["merged.safetensors"]
    assert [t["name"] for t in doc["tensors"]] == ["b", "w"]
    assert not (Path.cwd() / "merged.safetensors").exists()


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("256MiB") == 256 * 2**20
    assert parse_size("1000") == 1000
    for bad in ("0", "lots", "5XB", "1e3", "2PB"):
        with pytest.raises(OptionError):
            parse_size(bad)


def test_demo_runs_and_verifies(tmp_path: Path) -> None:
    result = run_cli("demo", "--dir", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["mismatched"] == [] and doc["verified_tensors"] == doc["tensors"] == 39
    assert doc["sweep"]["points"] == ["alpha=0", "alpha=0.25", "alpha=0.5", "alpha=0.75", "alpha=1"]
    assert (tmp_path / "dogerm" / "sweep" / "report.md").exists()
    assert "Writing model shards" not in result.stderr


def test_console_script_installed() -> None:
    from lazymerge import __version__

    exe = shutil.which("lazymerge")
    assert exe is not None, "pip install . should put a lazymerge command on PATH"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout


def test_progress_bar_on_a_terminal(tmp_path: Path, pair) -> None:
    import pty

    pa, pb, *_ = pair
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lazymerge", "run", str(pa), str(pb), "-o", str(tmp_path / "m.safetensors")],
        stdout=subprocess.PIPE,
        stderr=secondary,
        text=True,
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(primary)
    shown = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0
    assert "merging" in shown and "100%" in shown and "ETA" in shown and "/s" in shown
