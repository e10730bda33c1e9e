"""Hostile inputs, round two: nothing from a model folder runs, no user file is clobbered, one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.models import BASE_WORDS, make_tokenizer, save_model

PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nclass Evil: pass\n"


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lazymerge", *args], capture_output=True, text=True, input=stdin, timeout=300
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


def pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": "w3", "chosen": "w4", "rejected": "w5", "subset": "s", "id": "a"}) + "\n"
    )
    return path


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_eval_never_runs_code_from_the_model_folder(tmp_path: Path, where: str) -> None:
    folder = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    marker = tmp_path / "marker"
    (folder / "evil.py").write_text(PAYLOAD.format(marker=str(marker)))
    data = json.loads((folder / where).read_text())
    key = "AutoTokenizer" if where == "tokenizer_config.json" else "AutoModelForSequenceClassification"
    data["auto_map"] = {key: ["evil.Evil", None] if key == "AutoTokenizer" else "evil.Evil"}
    (folder / where).write_text(json.dumps(data))
    # a script that answers every question with "y" must still not run the folder's code
    proc = cli("eval", str(folder), "--pairs", str(pairs_file(tmp_path)), stdin="y\n" * 20)
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert where in line and "auto_map" in line
    assert not marker.exists()
    assert "[y/N]" not in proc.stdout


def test_eval_out_never_clobbers_inputs_or_user_files(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    pairs = pairs_file(tmp_path)
    before = pairs.read_bytes()
    proc = cli("eval", str(folder), "--pairs", str(pairs), "--out", str(pairs), "--force")
    assert proc.returncode == 1 and "input" in one_line_error(proc)
    assert pairs.read_bytes() == before
    proc = cli("eval", str(folder), "--pairs", str(pairs), "--out", str(folder / "config.json"))
    assert proc.returncode == 1 and pairs.read_bytes() == before
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": 1}')
    for extra in ([], ["--force"]):
        proc = cli("eval", str(folder), "--pairs", str(pairs), "--out", str(mine), *extra)
        assert proc.returncode == 1, proc.stderr
        one_line_error(proc)
    assert mine.read_text() == '{"mine": 1}'
    # a missing folder is found before any scoring
    proc = cli("eval", str(folder), "--pairs", str(pairs), "--out", str(tmp_path / "no" / "r.json"))
    assert proc.returncode == 1 and "does not exist" in one_line_error(proc)
    report = tmp_path / "r.json"
    assert cli("eval", str(folder), "--pairs", str(pairs), "--out", str(report), "-q").returncode == 0
    assert cli("eval", str(folder), "--pairs", str(pairs), "--out", str(report), "-q").returncode == 1
    assert (
        cli("eval", str(folder), "--pairs", str(pairs), "--out", str(report), "-q", "--force").returncode == 0
    )
    assert json.loads(report.read_text())["n_pairs"] == 1
    assert not [p for p in tmp_path.iterdir() if "lazymerge-tmp" in p.name]


@pytest.mark.parametrize(
    "extra",
    [
        ["--batch-size", "0"],
        ["--max-length", "-5"],
        ["--device", "foo"],
        ["--device", "cuda:x"],
        ["--dtype", "int4"],
    ],
)
def test_eval_option_mistakes_exit_2_before_loading(tmp_path: Path, extra: list[str]) -> None:
    proc = cli("eval", str(tmp_path / "no-model"), "--pairs", str(tmp_path / "no-pairs"), *extra)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("ns", ["0", "2,-1", "x"])
def test_bon_n_mistakes_exit_2(tmp_path: Path, ns: str) -> None:
    proc = cli("bon", str(tmp_path / "m"), "--candidates", str(tmp_path / "c"), "--n", ns)
    assert proc.returncode == 2 and "--n" in proc.stderr


def _bin_folder(tmp_path: Path) -> tuple[Path, Path]:
    rm = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    sft = save_model(tmp_path / "sft_bin", "llama", False, 2, make_tokenizer(BASE_WORDS), safe=False)
    return rm, sft


def test_output_may_not_shadow_an_input_in_its_folder(tmp_path: Path) -> None:
    rm, sft = _bin_folder(tmp_path)
    for out in (sft / "model.safetensors", sft / "sub" / "x.safetensors", rm / "merged"):
        for command in ("run", "plan"):
            proc = cli(command, str(rm), str(sft), "-o", str(out))
            assert proc.returncode == 1, (command, out, proc.stderr)
            assert "model folder of input" in one_line_error(proc) or "holds input" in proc.stderr
    assert (
        sorted(p.name for p in sft.iterdir())
        == sorted(["config.json", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json"])
        or not (sft / "model.safetensors").exists()
    )


def test_plan_refuses_what_run_refuses(tmp_path: Path) -> None:
    rm, sft = _bin_folder(tmp_path)
    out = tmp_path / "user.safetensors"
    out.write_bytes(b"precious")
    assert cli("plan", str(rm), str(sft), "-o", str(out)).returncode == 1
    assert cli("plan", str(rm), str(sft), "-o", str(out), "--force").returncode == 1
    assert cli("plan", str(rm), str(sft), "-o", str(tmp_path / "missing" / "x")).returncode == 1
    assert out.read_bytes() == b"precious"


def test_second_run_into_a_locked_destination_fails_cleanly(tmp_path: Path) -> None:
    from lazymerge.io.writer import DestinationLock

    rm, sft = _bin_folder(tmp_path)
    out = tmp_path / "merged"
    lock = DestinationLock(out)  # another run holds the destination
    try:
        proc = cli("run", str(rm), str(sft), "-o", str(out))
        assert proc.returncode == 1 and "another lazymerge run" in one_line_error(proc)
        assert not out.exists()
    finally:
        lock.release()
    assert cli("run", str(rm), str(sft), "-o", str(out), "-q").returncode == 0
    assert not [p for p in tmp_path.iterdir() if "lazymerge-" in p.name]


def test_non_utf8_file_names_are_escaped_in_metadata(tmp_path: Path) -> None:
    import os

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    a = os.fsencode(str(tmp_path)) + b"/caf\xe9.safetensors"
    b = tmp_path / "b.safetensors"
    save_file({"w": torch.ones(4)}, a.decode("utf-8", "surrogateescape"))
    save_file({"w": torch.zeros(4)}, str(b))
    out = tmp_path / "out.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "lazymerge", "run", a, os.fsencode(str(b)), "-o", os.fsencode(str(out)), "-q"],
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr
    with safe_open(str(out), "pt") as fh:  # safetensors' own reader accepts the header
        assert fh.metadata()["lazymerge_inputs"] == "caf\\xe9.safetensors,b.safetensors"
        first = json.loads(fh.metadata()["lazymerge_provenance"])[0]
        assert first["name"] == "caf\\xe9.safetensors" and first["weights"][0][0] == "caf\\xe9.safetensors"
        assert torch.equal(fh.get_tensor("w"), torch.full((4,), 0.5))


def test_float16_overflow_is_caught_after_the_cast(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from lazymerge import merge
    from lazymerge.errors import NonFiniteError

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.full((8,), 60000.0)}, str(a))
    save_file({"w": torch.full((8,), 60000.0)}, str(b))
    # 0.9 * 60000 + 0.9 * 60000 = 108000 is finite in fp32 and Inf in float16
    with pytest.raises(NonFiniteError, match="overflow the output dtype F16"):
        merge([a, b], tmp_path / "o.safetensors", weights=[0.9, 0.9], dtype="float16", check_finite=True)
    assert not (tmp_path / "o.safetensors").exists()
    report = merge([a, b], tmp_path / "o.safetensors", weights=[0.9, 0.9], dtype="float16")
    assert len(report.warnings) == 1 and "overflow" in report.warnings[0]


def test_warnings_name_tensors_whatever_the_path(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from lazymerge import merge

    folder = tmp_path / "my tensor dir"
    folder.mkdir()
    a, b = folder / "a.safetensors", folder / "b.safetensors"
    save_file({"x": torch.tensor([float("nan"), 1.0]), "y": torch.tensor([float("inf"), 1.0])}, str(a))
    save_file({"x": torch.ones(2), "y": torch.ones(2)}, str(b))
    report = merge([a, b], tmp_path / "o.safetensors")
    assert len(report.warnings) == 2  # one per tensor, not swallowed by a path holding "tensor "


def test_sigterm_leaves_no_temporaries(tmp_path: Path) -> None:
    import signal

    import torch
    from safetensors.torch import save_file

    from tests.helpers.pause_at import finish, start_paused

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    big = {f"t{i}": torch.randn(1 << 20) for i in range(24)}
    save_file(big, str(a))
    save_file(big, str(b))
    out = tmp_path / "out"
    args = ["run", str(a), str(b), "-o", str(out), "--max-memory", "1MiB", "-q"]
    # parked in the shard writer (its second write): the merge is mid-way, temporaries on disk
    proc = start_paused("lazymerge.io.writer:StreamingShardWriter.write", args, call=2)
    assert [p for p in tmp_path.iterdir() if "lazymerge-tmp" in p.name]
    proc.send_signal(signal.SIGTERM)
    _, err = finish(proc)
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if "lazymerge-" in p.name]


@pytest.mark.parametrize("how", ["replaced", "rewritten", "removed"])
def test_input_changed_after_planning_stops_the_read(tmp_path: Path, how: str) -> None:
    import os

    import torch
    from safetensors.torch import save_file

    from lazymerge.errors import InputError
    from lazymerge.io.reader import Checkpoint

    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(16)}, str(path))
    ckpt = Checkpoint.open(path)
    info = ckpt["w"]
    buffer = memoryview(bytearray(info.nbytes))
    ckpt.read_into(info, 0, buffer)  # unchanged: reads
    if how == "replaced":
        other = tmp_path / "b.safetensors"
        save_file({"x": torch.zeros(1), "w": torch.full((16,), 4e17)}, str(other))
        os.replace(other, path)
    elif how == "rewritten":
        with open(path, "r+b") as fh:
            fh.seek(-4, os.SEEK_END)
            fh.write(b"\x00\x00\x80\x7f")
            fh.flush()
            os.utime(path, ns=(1, 1))
    else:
        path.unlink()
    with pytest.raises(InputError, match="changed after its header was read"):
        ckpt.read_into(info, 0, buffer)
    ckpt.close()


@pytest.mark.parametrize("kind", ["fifo", "folder-as-shard"])
def test_special_files_as_inputs_do_not_hang(tmp_path: Path, kind: str) -> None:
    import os

    target = tmp_path / "x.safetensors"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    other = tmp_path / "b.safetensors"
    other.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    proc = cli("run", str(target), str(other), "-o", str(tmp_path / "o.safetensors"))
    assert proc.returncode == 1
    one_line_error(proc)


def test_eval_refuses_a_model_without_a_reward_head(tmp_path: Path) -> None:
    causal = save_model(tmp_path / "lm", "llama", False, 1, make_tokenizer(BASE_WORDS))
    proc = cli("eval", str(causal), "--pairs", str(pairs_file(tmp_path)))
    assert proc.returncode == 1
    assert "not a reward model" in one_line_error(proc) and "score" in proc.stderr


def test_eval_broken_chat_template_is_one_line(tmp_path: Path) -> None:
    tok = make_tokenizer(BASE_WORDS)
    tok.chat_template = "{% for m in messages %}{{ m['content'] | nosuchfilter }}{% endfor %}"
    folder = save_model(tmp_path / "rm", "llama", True, 1, tok)
    proc = cli("eval", str(folder), "--pairs", str(pairs_file(tmp_path)))
    assert proc.returncode == 1 and "chat template failed" in one_line_error(proc)
    tok.chat_template = "{{ raise_exception('no assistant turns') }}"
    tok.save_pretrained(folder)
    proc = cli("eval", str(folder), "--pairs", str(pairs_file(tmp_path)))
    assert proc.returncode == 1 and "chat template failed" in one_line_error(proc)


def test_a_legal_255_byte_output_name_works(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(3)}, str(a))
    save_file({"w": torch.zeros(3)}, str(b))
    out = tmp_path / ("x" * 243 + ".safetensors")
    assert len(out.name.encode()) == 255
    for extra in ([], ["--force"]):
        proc = cli("run", str(a), str(b), "-o", str(out), "-q", *extra)
        assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_file(str(out))["w"], torch.full((3,), 0.5))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name, out.name])


@pytest.mark.parametrize(
    "args",
    [
        ["run"],
        ["run", "a", "b", "--dtype", "int8"],
        ["frobnicate"],
        ["eval", "m"],
        ["run", "a", "b", "--nope"],
    ],
)
def test_click_usage_errors_are_one_line_exit_2(args: list[str]) -> None:
    proc = cli(*args)
    assert proc.returncode == 2
    one_line_error(proc)


def test_sweep_longer_than_the_open_file_limit_is_refused(tmp_path: Path) -> None:
    import resource

    import torch
    from safetensors.torch import save_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(3)}, str(a))
    save_file({"w": torch.zeros(3)}, str(b))

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lazymerge",
            "run",
            str(a),
            str(b),
            "-o",
            str(tmp_path / "sw"),
            "--alpha",
            "0:1:0.01",
        ],
        capture_output=True,
        text=True,
        preexec_fn=low_limit,
    )
    assert proc.returncode == 1 and "open-file limit" in one_line_error(proc)
    assert not (tmp_path / "sw").exists() and not [p for p in tmp_path.iterdir() if "lazymerge-" in p.name]


def test_sweep_folder_follows_the_output_rule(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rm = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    sft = save_model(tmp_path / "sft", "llama", False, 2, make_tokenizer(BASE_WORDS))
    pairs = pairs_file(tmp_path)
    base = ["sweep", str(rm), str(sft), "--pairs", str(pairs), "--alpha", "0,1", "-q"]
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    proc = cli(*base, "-o", str(user))
    assert proc.returncode == 1 and "did not write" in one_line_error(proc)
    assert [p.name for p in user.iterdir()] == ["thesis.tex"]
    for inside in (rm, tmp_path):  # a sweep folder that is or holds an input
        proc = cli(*base, "-o", str(inside))
        assert proc.returncode == 1, proc.stderr
        one_line_error(proc)
    out = tmp_path / "sweep"
    assert cli(*base, "-o", str(out)).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png",
        "reliability.png",
        "report.md",
        "results.json",
        "results.jsonl",
    ]
    assert json.loads((out / "results.json").read_text())["written_by"].startswith("lazymerge")
    assert not [p for p in tmp_path.iterdir() if "lazymerge-" in p.name]


# --- found by a hostile review of the first fixes -------------------------------------------


def _two_files(tmp_path: Path) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(3)}, str(a))
    save_file({"w": torch.zeros(3)}, str(b))
    return a, b


def test_force_never_replaces_a_folder_holding_user_files(tmp_path: Path) -> None:
    a, b = _two_files(tmp_path)
    out = tmp_path / "out"
    assert cli("run", str(a), str(b), "-o", str(out), "-q").returncode == 0
    (out / "NOTES.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "keep.csv").write_text("1,2")
    proc = cli("run", str(a), str(b), "-o", str(out), "--force", "-q")
    assert proc.returncode == 1 and "only outputs lazymerge wrote" in one_line_error(proc)
    assert (out / "NOTES.txt").read_text() == "mine" and (out / "data" / "keep.csv").exists()


def test_output_beside_an_input_file_in_its_model_folder_is_refused(tmp_path: Path) -> None:
    rm, sft = _bin_folder(tmp_path)
    proc = cli(
        "run",
        str(rm / "model.safetensors"),
        str(sft / "pytorch_model.bin"),
        "-o",
        str(sft / "model.safetensors"),
    )
    assert proc.returncode == 1 and "model folder of input" in one_line_error(proc)
    assert not (sft / "model.safetensors").exists()


def test_force_never_replaces_a_folder_holding_links_to_inputs(tmp_path: Path) -> None:
    import os

    a, b = _two_files(tmp_path)
    out = tmp_path / "out"
    assert cli("run", str(a), str(b), "-o", str(out), "-q").returncode == 0
    os.link(a, out / "hard.safetensors")
    proc = cli("run", str(a), str(b), "-o", str(out), "--force", "-q")
    assert proc.returncode == 1
    one_line_error(proc)
    assert (out / "hard.safetensors").exists() and a.exists()


def test_destination_created_during_the_merge_is_not_clobbered(tmp_path: Path) -> None:
    from lazymerge.errors import OutputError
    from lazymerge.io.writer import OutputTransaction

    for single in (True, False):
        dest = tmp_path / ("late.safetensors" if single else "late")
        transaction = OutputTransaction(dest, single_file=single, force=False)
        if single:
            transaction.shard_path("late.safetensors").write_bytes(b"merged")
            dest.write_bytes(b"user")
        else:
            transaction.shard_path("model.safetensors").write_bytes(b"merged")
            dest.mkdir()
            (dest / "important.txt").write_text("user")
        with pytest.raises(OutputError, match="already exists|created while the merge ran"):
            transaction.commit()
        transaction.abort()
        assert (dest.read_bytes() == b"user") if single else (dest / "important.txt").read_text() == "user"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late", "late.safetensors"]


def test_lock_file_planted_as_a_symlink_is_refused(tmp_path: Path) -> None:
    a, b = _two_files(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / ".o.safetensors.lazymerge-lock").symlink_to(elsewhere / "created_by_lazymerge")
    proc = cli("run", str(a), str(b), "-o", str(tmp_path / "o.safetensors"))
    assert proc.returncode == 1
    one_line_error(proc)
    assert list(elsewhere.iterdir()) == []


def test_lock_taken_on_a_removed_file_is_retried(tmp_path: Path, monkeypatch) -> None:
    import fcntl

    from lazymerge.errors import OutputError
    from lazymerge.io.writer import DestinationLock

    dest = tmp_path / "out"
    real_flock = fcntl.flock
    state = {"first": True}

    def flock_after_the_holder_left(fd: int, op: int) -> None:
        if state["first"]:  # the previous holder releases (removes the file) just before we lock
            state["first"] = False
            (tmp_path / ".out.lazymerge-lock").unlink()
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_holder_left)
    first = DestinationLock(dest)  # locked a removed file, saw it, retried on the new one
    monkeypatch.setattr(fcntl, "flock", real_flock)
    with pytest.raises(OutputError, match="another lazymerge run"):
        DestinationLock(dest)
    first.release()
    DestinationLock(dest).release()


@pytest.mark.parametrize("alpha", ["0:1:1e-320", "0:1e308:1e-308"])
def test_overflowing_alpha_ranges_exit_2(tmp_path: Path, alpha: str) -> None:
    for command in ("run", "plan"):
        proc = cli(command, "a", "b", "--alpha", alpha, "-o", str(tmp_path / "x"))
        assert proc.returncode == 2 and "at most" in one_line_error(proc)


def test_huge_max_points_is_refused_at_once(tmp_path: Path) -> None:
    proc = cli("plan", "a", "b", "--alpha", "0:1:1e-9", "--max-points", "99999999999999999999")
    assert proc.returncode == 2
    one_line_error(proc)


def test_fifo_data_files_do_not_hang(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pairs.jsonl"
    os.mkfifo(fifo)
    folder = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    for args in (
        ["eval", str(folder), "--pairs", str(fifo)],
        ["bon", str(folder), "--candidates", str(fifo)],
    ):
        proc = cli(*args)
        assert proc.returncode == 1 and "not a regular file" in one_line_error(proc)


def test_force_never_replaces_json_that_merely_mentions_lazymerge(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    pairs = pairs_file(tmp_path)
    for content in (
        '["written_by", "lazymerge 0.1.0"]',
        '"notes about written_by"',
        '{"written_by": "me"}',
        '{"written_by": "lazymerge fan", "thesis": "precious"}',
        '{"written_by": "lazymerge 0.1.0", "accuracy": 1.0}',
    ):
        mine = tmp_path / "mine.json"
        mine.write_text(content)
        proc = cli("eval", str(folder), "--pairs", str(pairs), "--out", str(mine), "--force")
        assert proc.returncode == 1 and mine.read_text() == content


def test_force_replaces_a_report_lazymerge_wrote_but_not_once_it_is_edited(tmp_path: Path) -> None:
    """Reports are known by their folder's manifest (size and SHA-256), not by a mark inside."""
    folder = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    pairs = pairs_file(tmp_path)
    out = tmp_path / "r.json"
    args = ("eval", str(folder), "--pairs", str(pairs), "--out", str(out))
    assert cli(*args).returncode == 0
    assert cli(*args).returncode == 1  # exists: --force needed
    assert cli(*args, "--force").returncode == 0  # lazymerge's own, unchanged: replaced
    edited = out.read_text().replace('"accuracy"', '"accuracy_by_hand"', 1)
    out.write_text(edited)
    proc = cli(*args, "--force")
    assert proc.returncode == 1 and "replaces only files lazymerge wrote" in one_line_error(proc)
    assert out.read_text() == edited


def test_report_created_while_scoring_is_not_replaced(tmp_path: Path) -> None:
    from lazymerge.errors import OutputError
    from lazymerge.io.writer import write_report

    path = tmp_path / "r.json"
    path.write_text("user")
    with pytest.raises(OutputError, match="created while"):
        write_report(path, b"{}", replace=False)
    assert path.read_text() == "user" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_sweep_folder_inside_an_input_model_folder_is_refused_before_writing(tmp_path: Path) -> None:
    rm = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    sft = save_model(tmp_path / "sft", "llama", False, 2, make_tokenizer(BASE_WORDS))
    before = sorted(p.name for p in rm.iterdir())
    proc = cli(
        "sweep",
        str(rm),
        str(sft),
        "--pairs",
        str(pairs_file(tmp_path)),
        "--alpha",
        "0,1",
        "--write",
        "-o",
        str(rm / "sw"),
    )
    assert proc.returncode == 1 and "model folder of input" in one_line_error(proc)
    assert sorted(p.name for p in rm.iterdir()) == before


def test_error_messages_stay_on_one_line_with_newlines_in_names(tmp_path: Path) -> None:
    odd = tmp_path / "a\nb.safetensors"
    odd.write_bytes(b"\x00")
    proc = cli("inspect", str(odd))
    assert proc.returncode == 1
    assert "\\n" in one_line_error(proc)
