"""Hostile and broken inputs, interrupted runs and full disks: nothing lost, nothing half-written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lazymerge import Checkpoint, merge
from lazymerge.errors import IntegrityError, NonFiniteError, OutputError, ShardIndexError
from lazymerge.verify import verify_checkpoint
from tests.helpers.checkpoints import load_any, reference_merge
from tests.helpers.pause_at import finish, start_paused


def digest_tree(*paths: Path) -> dict[str, str]:
    out = {}
    for root in paths:
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "lazymerge-tmp" in p.name)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazymerge", *args], capture_output=True, text=True)


@pytest.fixture
def pair(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    a = {f"t{i}": torch.randn(256, 64, generator=g) for i in range(4)}
    b = {f"t{i}": torch.randn(256, 64, generator=g) for i in range(4)}
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    return pa, pb, a, b


def test_verify_sound_and_corrupt_outputs(tmp_path: Path, pair) -> None:
    pa, pb, a, b = pair
    out = tmp_path / "out"
    merge([pa, pb], out, shard_size=100_000)
    report = verify_checkpoint(out)
    assert report.shards >= 2 and report.hashes_checked == report.shards and not report.unhashed
    result = run_cli("verify", str(out), "--finite")
    assert (
        result.returncode == 0 and "data hash(es) match" in result.stdout and "hold no NaN" in result.stdout
    )
    assert verify_checkpoint(pa).unhashed == ["a.safetensors"]  # written by safetensors, no hash recorded
    shard = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="differs from"):
        verify_checkpoint(out)
    result = run_cli("verify", str(out))
    assert result.returncode == 1 and str(shard) in result.stderr
    shard.write_bytes(bytes(data[:-5]))
    assert run_cli("verify", str(out)).returncode == 1


def test_nan_inputs_warn_or_stop(tmp_path: Path, pair) -> None:
    pa, pb, a, b = pair
    a["t2"][3, 7] = float("nan")
    save_file(a, str(pa))
    before = digest_tree(pa, pb)
    report = merge([pa, pb], tmp_path / "o.safetensors")
    assert (
        len(report.warnings) == 1
        and "'t2' holds NaN or Inf" in report.warnings[0]
        and str(pa) in report.warnings[0]
    )
    result = run_cli("run", str(pa), str(pb), "-o", str(tmp_path / "o2.safetensors"), "-q")
    assert result.returncode == 0 and "warning:" in result.stderr and "'t2'" in result.stderr
    with pytest.raises(NonFiniteError, match="'t2' holds NaN"):
        merge([pa, pb], tmp_path / "o3.safetensors", check_finite=True)
    assert not (tmp_path / "o3.safetensors").exists() and not leftovers(tmp_path)
    with pytest.raises(NonFiniteError):
        verify_checkpoint(tmp_path / "o.safetensors", finite=True)
    assert digest_tree(pa, pb) == before


def test_index_with_duplicate_or_doubled_tensor(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "s2.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}}')
    with pytest.raises(ShardIndexError, match="appears twice"):
        Checkpoint.open(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(ShardIndexError):
        Checkpoint.open(tmp_path)


def test_disk_full_by_injection(tmp_path: Path, pair, monkeypatch) -> None:
    pa, pb, *_ = pair
    before = digest_tree(pa, pb)
    import lazymerge.io.writer as writer

    real_write, real_pwrite = os.write, os.pwrite
    budget = [150_000]

    def spend(data) -> None:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget[0] -= memoryview(data).nbytes

    def full_disk(fd: int, data) -> int:
        spend(data)
        return real_write(fd, data)

    def full_disk_at(fd: int, data, position: int) -> int:
        spend(data)
        return real_pwrite(fd, data, position)

    # buffered writes go through os.write, direct ones (and the tail) through os.pwrite
    monkeypatch.setattr(writer.os, "write", full_disk)
    monkeypatch.setattr(writer.os, "pwrite", full_disk_at)
    for direct_io in (True, False):
        for out in (tmp_path / "o.safetensors", tmp_path / "outdir"):
            budget[0] = 150_000
            # the writer thread or the hash thread (writing a shard's hash) meets it first
            with pytest.raises(OutputError, match="disk full while (writing|finishing)"):
                merge([pa, pb], out, shard_size=100_000, direct_io=direct_io, max_memory=2**20)
            assert not out.exists() and not leftovers(tmp_path)
    assert digest_tree(pa, pb) == before


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_disk_full_on_a_small_filesystem(tmp_path: Path, pair, monkeypatch) -> None:
    pa, pb, *_ = pair
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "160k"):
        pytest.skip("needs root and tmpfs to mount a size-limited filesystem")
    try:
        before = digest_tree(pa, pb)
        with pytest.raises(OutputError, match="needs .* free"):  # the free-space check, before any write
            merge([pa, pb], small / "o.safetensors")
        from lazymerge.merge import api

        monkeypatch.setattr(api, "check_free_space", lambda *a: None)
        with pytest.raises(OutputError, match="disk full"):  # the kernel's own ENOSPC
            merge([pa, pb], small / "o.safetensors")
        assert list(small.iterdir()) == []
        assert digest_tree(pa, pb) == before
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


MANY_CHUNKS = "--max-memory", "2KiB"  # thousands of chunks: the main thread has work left at the pause

#: (pause point, its call number, after the call?): mid-way through the first shard's data, and
#: with the first shard finished (hashed, fsynced) while the second is being written
PAUSES = {
    "mid-shard": ("lazymerge.io.writer:StreamingShardWriter.write", 3, False),
    "between-shards": ("lazymerge.io.writer:StreamingShardWriter.finish", 1, True),
}


@pytest.mark.parametrize("pause", sorted(PAUSES))
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["KILL", "INT", "TERM"])
def test_interrupted_merge_leaves_nothing_partial(tmp_path: Path, sig: int, pause: str) -> None:
    """The merge is stopped inside the shard writer (tests/helpers/pause_at.py), so the signal
    always lands mid-write, with temporaries on disk, whatever the machine's load."""
    g = torch.Generator().manual_seed(1)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a = {f"t{i}": torch.randn(512, 512, generator=g) for i in range(6)}
    b = {f"t{i}": torch.randn(512, 512, generator=g) for i in range(6)}
    save_file(a, str(pa))
    save_file(b, str(pb))
    before = digest_tree(pa, pb)
    out = tmp_path / "merged"
    target, call, after = PAUSES[pause]
    args = ["run", str(pa), str(pb), "-o", str(out), "-q", "--shard-size", "2MB", *MANY_CHUNKS]
    proc = start_paused(target, args, call=call, after=after, stdout=subprocess.PIPE)
    assert leftovers(tmp_path) and not out.exists()  # parked mid-write: temporaries, no destination
    proc.send_signal(sig)
    _, err = finish(proc)
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert leftovers(tmp_path)  # SIGKILL leaves temporaries, never a destination
    else:
        code, word = (130, "interrupted") if sig == signal.SIGINT else (143, "terminated")
        assert proc.returncode == code and word in err and "Traceback" not in err, err
        assert not leftovers(tmp_path)  # Ctrl-C and SIGTERM clean up at once
    # a rerun removes the temporaries a killed run left behind, and succeeds
    result = run_cli("run", str(pa), str(pb), "-o", str(out), "-q", "--shard-size", "2MB")
    assert result.returncode == 0, result.stderr
    assert not leftovers(tmp_path)
    got, want = load_any(out), reference_merge([a, b], [0.5, 0.5])
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert digest_tree(pa, pb) == before


def test_a_pause_point_never_reached_fails_loudly(tmp_path: Path, pair) -> None:
    """The launcher's contract: a run that ends before its pause point fails the test (with the
    run's stderr), so an interrupt test can never pass by signalling a finished run."""
    pa, pb, *_ = pair
    args = ["run", str(pa), str(pb), "-o", str(tmp_path / "o"), "-q"]
    with pytest.raises(AssertionError, match="never reached call 100000 .*exit 0"):
        start_paused("lazymerge.io.writer:StreamingShardWriter.write", args, call=100_000)


def test_shard_writer_close_races_finish(tmp_path: Path) -> None:
    """The engine's write thread closes every writer it opened on an error while the hash thread
    may be finishing one: close waits for finish and is idempotent (no double close, no EBADF)."""
    import threading

    from lazymerge.io.writer import OutputTensor, StreamingShardWriter, plan_layout

    shard = plan_layout([OutputTensor("w", "F32", (4,))], {}, "s.safetensors", 1 << 20).shards[0]
    for i in range(200):
        w = StreamingShardWriter(tmp_path / f"{i}.safetensors", shard)
        w.write(memoryview(bytes(16)))
        errors: dict[str, list[BaseException]] = {"finish": [], "close": []}

        def run(name: str, step, errors=errors) -> None:
            try:
                step()
            except BaseException as exc:  # noqa: BLE001 - collected for the assertions below
                errors[name].append(exc)

        steps = (("finish", w.finish), ("close", w.close), ("close", w.close))
        threads = [threading.Thread(target=run, args=step) for step in steps]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors["close"], errors["close"]  # never a double close
        if errors["finish"]:  # a close that came first: finish says so, as an OutputError
            assert all(isinstance(e, OutputError) for e in errors["finish"]), errors["finish"]
        else:
            assert load_any(tmp_path / f"{i}.safetensors")["w"].tolist() == [0.0] * 4
