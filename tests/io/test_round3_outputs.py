"""One output rule for every writer (issue 19, part 4): tools/convert_pairs.py, every bench that
writes results, mini_dogerm's --results, reports and sweeps. Never an input, never an existing
file without --force, --force replaces only what lazymerge wrote, atomic; locks shared by every
alias of a destination; a killed report write's temporary cleaned when a sweep resumes.

Each case is one row of a table. Benches run as subprocesses with arguments that reach their
output check at once (`--reuse` of an empty folder: nothing to measure), mini_dogerm and
convert_pairs in-process where a failure is injected. No case depends on timing."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH, TOOLS = ROOT / "bench", ROOT / "tools"
USER = b"the user's own notes\n"
#: Above PID_MAX_LIMIT (2**22): no process has it, now or later.
DEAD_PID = 4194305


def script(path: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, cwd=cwd)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), text
    assert "Traceback" not in text
    return lines[0]


def load(path: Path) -> ModuleType:
    """A tool or bench as a module of its own (their folders are not packages)."""
    spec = importlib.util.spec_from_file_location(f"round3_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pairs(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad", "id": "a"}) + "\n")
    return path


def no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if "lazymerge-tmp" in p.name or "lazymerge-lock" in p.name]


# --- every writer: an existing file of the user's, with and without --force -----------------


def _convert_pairs(tmp_path: Path, dest: Path) -> list[str]:
    return [str(TOOLS / "convert_pairs.py"), "rewardbench", str(pairs(tmp_path)), "-o", str(dest)]


def _empty(tmp_path: Path) -> str:
    (tmp_path / "reuse").mkdir(exist_ok=True)
    return str(tmp_path / "reuse")


def _compare(tmp_path: Path, dest: Path) -> list[str]:
    return [str(BENCH / "compare.py"), "--reuse", _empty(tmp_path), "--json", str(dest)]


def _merge_memory(tmp_path: Path, dest: Path) -> list[str]:
    return [str(BENCH / "merge_memory.py"), "--reuse", _empty(tmp_path), "--save", str(dest)]


def _sweep(tmp_path: Path, dest: Path) -> list[str]:
    return [str(BENCH / "sweep.py"), "--reuse", _empty(tmp_path), "--save", str(dest)]


def _laptops(tmp_path: Path, dest: Path) -> list[str]:
    compare = tmp_path / "compare-7b.json"
    compare.write_bytes((BENCH / "results" / "compare-7b.json").read_bytes())
    return [str(BENCH / "laptops.py"), "--compare", str(compare), "--out", str(dest)]


# (writer, the user's file it is pointed at, its command line)
WRITERS: list[tuple[str, str, Callable[[Path, Path], list[str]]]] = [
    ("convert_pairs", "converted.jsonl", _convert_pairs),
    ("compare", "compare-1b.json", _compare),
    ("merge_memory", "merge-1b.json", _merge_memory),
    ("sweep", "sweep-1b.json", _sweep),
    ("laptops", "laptops.md", _laptops),
]


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
@pytest.mark.parametrize("writer,name,command", WRITERS, ids=[w[0] for w in WRITERS])
def test_writer_never_replaces_a_users_file(
    tmp_path: Path, writer: str, name: str, command, force: bool
) -> None:
    dest = tmp_path / name
    dest.write_bytes(USER)
    argv = command(tmp_path, dest) + (["--force"] if force else [])
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc.stderr)
    assert str(dest) in line and ("replaces only files lazymerge wrote" if force else "pass --force") in line
    assert dest.read_bytes() == USER and no_leftovers(tmp_path) == []


@pytest.fixture()
def mini_dogerm(tmp_path: Path, monkeypatch) -> ModuleType:
    """bench/mini_dogerm.py with its stages replaced by a fake sweep folder: the --results rule is
    what is tested, not the minutes of training."""
    pytest.importorskip("torch")
    module = load(BENCH / "mini_dogerm.py")

    def run(self, val_only: bool = False, variant: str | None = None) -> dict:
        sweep = self.work / "sweep-fake" / "sweep"
        sweep.mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "results.json", "accuracy.png"):
            (sweep / name).write_bytes(f"new {name}\n".encode())
        return {
            "headline": {},
            "likelihood_check": {},
            "stage_seconds_total": 0.0,
            "peak_rss_this_run": {},
            "sweep_folder": str(sweep),
        }

    monkeypatch.setattr(module.Pipeline, "run", run)
    return module


def dogerm(module: ModuleType, tmp_path: Path, *extra: str) -> int:
    work, results = tmp_path / "work", tmp_path / "results"
    return module.main(["--tiny", "--work", str(work), "--results", str(results), *extra])


@pytest.mark.parametrize("name", ["report.md", "summary.json"])
@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_mini_dogerm_results_never_replace_a_users_file(mini_dogerm, tmp_path, capsys, name, force) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / name).write_bytes(USER)
    assert dogerm(mini_dogerm, tmp_path, *(["--force"] if force else [])) == 1
    assert str(results / name) in one_line(capsys.readouterr().err)
    assert [p.name for p in results.iterdir()] == [name] and (results / name).read_bytes() == USER
    assert not (tmp_path / "work").exists()  # refused before any stage ran


def test_mini_dogerm_force_replaces_its_own_results(mini_dogerm, tmp_path, capsys) -> None:
    results = tmp_path / "results"
    assert dogerm(mini_dogerm, tmp_path) == 0
    assert (results / "report.md").read_bytes() == b"new report.md\n"
    (results / "notes.md").write_bytes(USER)  # the user's own file beside the results
    assert dogerm(mini_dogerm, tmp_path) == 1  # the results exist: --force needed
    assert "pass --force" in one_line(capsys.readouterr().err)
    assert dogerm(mini_dogerm, tmp_path, "--force") == 0
    assert (results / "notes.md").read_bytes() == USER
    (results / "report.md").write_bytes(b"edited by the user\n")  # no longer what lazymerge wrote
    assert dogerm(mini_dogerm, tmp_path, "--force") == 1
    assert (results / "report.md").read_bytes() == b"edited by the user\n"


def test_mini_dogerm_results_inside_work_are_refused(mini_dogerm, tmp_path, capsys) -> None:
    work = tmp_path / "work"
    assert mini_dogerm.main(["--tiny", "--work", str(work), "--results", str(work / "out")]) == 1
    assert "inside the --work folder" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("threads", ["0", "-1", "x", "99999"])
def test_mini_dogerm_threads_is_a_one_line_usage_error(mini_dogerm, tmp_path, capsys, threads) -> None:
    with pytest.raises(SystemExit) as exc:
        mini_dogerm.main(["--tiny", "--work", str(tmp_path / "w"), "--threads", threads])
    assert exc.value.code == 2 and "--threads" in one_line(capsys.readouterr().err)


# --- never an input ---------------------------------------------------------------------------


def _same(source: Path) -> Path:
    return source


def _symlink(source: Path) -> Path:
    link = source.with_name("link.jsonl")
    link.symlink_to(source)
    return link


def _hardlink(source: Path) -> Path:
    link = source.with_name("hard.jsonl")
    os.link(source, link)
    return link


# (how the output names the source, with --force or not)
SOURCE_ALIASES = [
    ("source", _same, False),
    ("source-force", _same, True),
    ("symlink-force", _symlink, True),
    ("hardlink-force", _hardlink, True),
]


@pytest.mark.parametrize("how,alias,force", SOURCE_ALIASES, ids=[a[0] for a in SOURCE_ALIASES])
def test_convert_pairs_never_writes_its_source(tmp_path: Path, how, alias, force: bool) -> None:
    source = pairs(tmp_path)
    before = source.read_bytes()
    dest = alias(source)
    proc = script(
        TOOLS / "convert_pairs.py", "rewardbench", str(source), "-o", str(dest), *(["--force"] * force)
    )
    assert proc.returncode == 1 and "input" in one_line(proc.stderr)
    assert source.read_bytes() == before


def test_laptops_never_writes_its_compare_file(tmp_path: Path) -> None:
    compare = tmp_path / "compare-7b.json"
    compare.write_bytes((BENCH / "results" / "compare-7b.json").read_bytes())
    before = compare.read_bytes()
    proc = script(BENCH / "laptops.py", "--compare", str(compare), "--out", str(compare), "--force")
    assert proc.returncode == 1 and "input" in one_line(proc.stderr)
    assert compare.read_bytes() == before


def test_convert_pairs_force_replaces_its_own_output(tmp_path: Path) -> None:
    dest = tmp_path / "out.jsonl"
    tool = TOOLS / "convert_pairs.py"
    assert script(tool, "rewardbench", str(pairs(tmp_path)), "-o", str(dest)).returncode == 0
    first = dest.read_bytes()
    again = script(tool, "rewardbench", str(pairs(tmp_path)), "-o", str(dest))
    assert again.returncode == 1 and "pass --force" in one_line(again.stderr)
    assert script(tool, "rewardbench", str(pairs(tmp_path)), "-o", str(dest), "--force").returncode == 0
    assert dest.read_bytes() == first and no_leftovers(tmp_path) == []


# --- a failed write leaves nothing --------------------------------------------------------------


def _disk_full(*args, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _rename_fails(*args, **kw):
    raise OSError(errno.EIO, os.strerror(errno.EIO))


# (what fails: fsync, the disk full when data is flushed; or the final rename)
FAILURES = [("disk-full-at-fsync", "fsync", _disk_full), ("rename-fails", "replace", _rename_fails)]


@pytest.mark.parametrize("what,name,fail", FAILURES, ids=[f[0] for f in FAILURES])
def test_convert_pairs_failed_write_leaves_nothing(tmp_path, monkeypatch, capsys, what, name, fail) -> None:
    tool = load(TOOLS / "convert_pairs.py")
    source, dest = pairs(tmp_path), tmp_path / "out.jsonl"
    assert tool.main(["rewardbench", str(source), "-o", str(dest)]) == 0
    own = dest.read_bytes()
    monkeypatch.setattr(os, name, fail)
    if name == "replace":  # without --force the no-replace rename is used: fail it as well
        import lazymerge.io.outputs as outputs

        monkeypatch.setattr(outputs, "_rename_noreplace", fail)
    fresh = tmp_path / "fresh.jsonl"
    assert tool.main(["rewardbench", str(source), "-o", str(fresh)]) == 1
    assert tool.main(["rewardbench", str(source), "-o", str(dest), "--force"]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(fresh) in err
    assert not fresh.exists() and dest.read_bytes() == own  # nothing new, the old output whole
    assert no_leftovers(tmp_path) == []


def test_mini_dogerm_failed_results_write_leaves_nothing(mini_dogerm, tmp_path, monkeypatch, capsys) -> None:
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(os, "fsync", _disk_full)
    assert dogerm(mini_dogerm, tmp_path) == 1
    monkeypatch.undo()
    assert "disk full" in one_line(capsys.readouterr().err)
    assert list(results.iterdir()) == []


def test_bench_results_failed_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        bench_cli = load(BENCH / "bench_cli.py")
    finally:
        sys.path.remove(str(BENCH))
    targets = [tmp_path / "compare-1b.json", tmp_path / "compare-1b.md", tmp_path / "rss-1b.png"]
    reserved = bench_cli.reserve_results(targets, force=False)
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(SystemExit) as exc:
        bench_cli.write_results(reserved, {t: b"x" * 100 for t in targets})
    assert exc.value.code == 1
    assert list(tmp_path.iterdir()) == []


# --- locks: every alias of one destination takes the same lock ------------------------------


def _folder_symlink(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "s").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "s")
    return tmp_path / "s", tmp_path / "link"


def _parent_symlink(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    return tmp_path / "real" / "out.json", tmp_path / "alias" / "out.json"


def _symlink_elsewhere(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "runs" / "sweep").mkdir(parents=True)
    (tmp_path / "shortcuts").mkdir()
    (tmp_path / "shortcuts" / "latest").symlink_to(tmp_path / "runs" / "sweep")
    return tmp_path / "runs" / "sweep", tmp_path / "shortcuts" / "latest"


def _symlink_chain(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "s").mkdir()
    (tmp_path / "one").symlink_to("s")
    (tmp_path / "two").symlink_to("one")
    return tmp_path / "two", tmp_path / "s"


# (how the second run names the first one's destination); a symlinked parent folder shared the
# lock already (the lock file was reached through it), a symlink to the destination did not
ALIASES = [
    ("folder-symlink", _folder_symlink),
    ("symlink-in-another-folder", _symlink_elsewhere),
    ("symlink-chain", _symlink_chain),
]


@pytest.mark.parametrize("kind,make", ALIASES, ids=[a[0] for a in ALIASES])
def test_aliases_of_one_destination_share_one_lock(tmp_path: Path, kind, make) -> None:
    from lazymerge.errors import OutputError
    from lazymerge.io.writer import DestinationLock

    first, alias = make(tmp_path)
    lock = DestinationLock(first)
    try:
        with pytest.raises(OutputError, match="another lazymerge run"):
            DestinationLock(alias)
    finally:
        lock.release()
    DestinationLock(alias).release()


def test_convert_pairs_through_an_alias_waits_for_the_lock(tmp_path: Path) -> None:
    from lazymerge.io.writer import DestinationLock

    real_out, alias_out = _parent_symlink(tmp_path)
    lock = DestinationLock(real_out)
    try:
        proc = script(TOOLS / "convert_pairs.py", "rewardbench", str(pairs(tmp_path)), "-o", str(alias_out))
    finally:
        lock.release()
    assert proc.returncode == 1 and "another lazymerge run" in one_line(proc.stderr)
    assert not real_out.exists()


# --- stale temporaries ---------------------------------------------------------------------------


# (name planted in a sweep folder, removed as lazymerge's stale temporary?)
TEMPORARIES = [
    (f".report.md.lazymerge-tmp-{DEAD_PID}-0123abcd", True),
    (f".results.json.lazymerge-tmp-{DEAD_PID}-89abcdef", True),
    (f".accuracy.png.lazymerge-tmp-{os.getppid()}-0123abcd", False),  # its writer still runs
    (".report.md.lazymerge-tmp-someone-0123abcd", False),  # not lazymerge's shape
    ("report.md.lazymerge-tmp-1-0123abcd", False),  # no leading dot: not a temporary's name
]


@pytest.mark.parametrize("name,stale", TEMPORARIES, ids=[t[0] for t in TEMPORARIES])
def test_only_lazymerge_stale_temporaries_are_removed(tmp_path: Path, name: str, stale: bool) -> None:
    from lazymerge.io import outputs

    (tmp_path / name).write_bytes(b"half a report")
    (tmp_path / "keep.txt").write_bytes(USER)
    removed = outputs.remove_stale_temporaries_in(tmp_path)
    assert [p.name for p in removed] == ([name] if stale else [])
    assert (tmp_path / name).exists() is not stale and (tmp_path / "keep.txt").read_bytes() == USER


def _sweep_inputs(tmp_path: Path) -> list[str]:
    from tests.helpers.models import BASE_WORDS, make_tokenizer, save_model

    tok = make_tokenizer(BASE_WORDS)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} </s>{% endfor %}"
    rm = save_model(tmp_path / "rm", "llama", True, 1, tok)
    sft = save_model(tmp_path / "sft", "llama", False, 2, tok)
    rows = [
        {"prompt": "w3", "chosen": f"w{4 + i}", "rejected": f"w{20 + i}", "id": f"p{i}"} for i in range(4)
    ]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["sweep", str(rm), str(sft), "--pairs", str(data), "--alpha", "0,1", "-q"]


def lazymerge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazymerge", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_sweep_resumes_over_a_killed_report_writes_temporary(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    args = _sweep_inputs(tmp_path)
    out = tmp_path / "s"
    assert lazymerge(*args, "-o", str(out)).returncode == 0
    planted = out / f".report.md.lazymerge-tmp-{DEAD_PID}-0123abcd"
    planted.write_bytes(b"# half a rep")  # what a SIGKILL during write_report leaves
    proc = lazymerge(*args, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert not planted.exists() and (out / "report.md").is_file()


@pytest.mark.slow
def test_sweep_through_a_symlink_takes_the_real_folders_lock(tmp_path: Path) -> None:
    from lazymerge.io.writer import DestinationLock

    args = _sweep_inputs(tmp_path)
    out, link = tmp_path / "s", tmp_path / "link"
    out.mkdir()
    link.symlink_to(out)
    lock = DestinationLock(out)  # a sweep into s is running
    try:
        proc = lazymerge(*args, "-o", str(link))
    finally:
        lock.release()
    assert proc.returncode == 1 and "another lazymerge run" in proc.stderr
    assert not (out / "results.jsonl").exists()


# --- convert_pairs: bad input and usage mistakes in one line ------------------------------------


# (format, the source's bytes, fragment of the one-line error)
BAD_SOURCES = [
    ("rewardbench", None, "cannot open"),  # no such file
    ("rewardbench", b"{not json\n", "pairs.jsonl:1"),
    ("rewardbench", b'{"prompt": "\xff"}\n', "UTF-8"),
    ("rewardbench", b"[1, 2]", "pairs.jsonl:1: is a JSON array, not a JSON object"),
    ("rewardbench", b"[{]", "pairs.jsonl:1: not valid JSON"),
    (
        "rewardbench",
        b'{"prompt": 1, "chosen": "a", "rejected": "b"}\n',
        "field 'prompt' must be a string, found 1",
    ),
    ("rewardbench2", b'{"id": 1}\n', "pairs.jsonl"),
    ("autoj", b'{"scenario": "x"}\n', "pairs.jsonl"),
    # a lone surrogate (an unpaired JSON escape) is not text: the output's UTF-8 cannot hold it
    (
        "rewardbench",
        b'{"prompt": "\\ud800 p", "chosen": "a", "rejected": "b"}\n',
        "pairs.jsonl:1: holds a lone surrogate (\\ud800",
    ),
    (
        "rewardbench",
        b'[{"prompt": "p", "chosen": "a\\udfff", "rejected": "b"}]',
        "pairs.jsonl:1: holds a lone surrogate (\\udfff",
    ),
    (
        "rewardbench",
        b'[{"prompt": "p", "chosen": "a", "rejected": "b", "\\udabc": 1}]',
        "pairs.jsonl:1: holds a lone surrogate",
    ),
    ("rewardbench2", b'{"id": "x", "prompt": "\\ud800"}\n', "pairs.jsonl:1: holds a lone surrogate"),
    ("autoj", b'{"scenario": "x", "prompt": ["\\ud800"]}\n', "pairs.jsonl:1: holds a lone surrogate"),
]


@pytest.mark.parametrize("fmt,raw,fragment", BAD_SOURCES, ids=[f"{b[0]}-{b[2]}" for b in BAD_SOURCES])
def test_convert_pairs_bad_source_is_one_line(
    tmp_path: Path, fmt: str, raw: bytes | None, fragment: str
) -> None:
    source = tmp_path / "pairs.jsonl"
    if raw is not None:
        source.write_bytes(raw)
    proc = script(TOOLS / "convert_pairs.py", fmt, str(source), "-o", str(tmp_path / "out.jsonl"))
    assert proc.returncode == 1 and fragment in one_line(proc.stderr)
    assert not (tmp_path / "out.jsonl").exists() and no_leftovers(tmp_path) == []


# (the script, its arguments, fragment of the one-line usage error)
USAGE_MISTAKES = [
    (TOOLS / "convert_pairs.py", ["rewardbench", "x.jsonl"], "-o/--output"),
    (TOOLS / "convert_pairs.py", ["parquet", "x", "-o", "y"], "invalid choice"),
    (BENCH / "compare.py", ["--size", "3b"], "invalid choice"),
    (BENCH / "laptops.py", ["--bogus"], "unrecognized arguments"),
    # bench/sweep.py checks every value before it writes two 1B-shaped models (it wrote them first)
    (BENCH / "sweep.py", ["--pairs", "0"], "argument --pairs: 0 is not from 1 to 100,000"),
    (BENCH / "sweep.py", ["--pairs", "-1"], "argument --pairs: -1 is not from 1"),
    (BENCH / "sweep.py", ["--pairs", "many"], "argument --pairs: 'many' is not an integer"),
    (BENCH / "sweep.py", ["--tokens", "1"], "argument --tokens: 1 is not from 2 to 100,000"),
    (BENCH / "sweep.py", ["--tokens", "10" * 20], "argument --tokens:"),
    (BENCH / "sweep.py", ["--alpha", "0:1:0"], "argument --alpha: '0:1:0': a sweep is START:STOP:STEP"),
    (BENCH / "sweep.py", ["--alpha", "inf"], "argument --alpha: alpha 'inf' is not a finite number"),
    (BENCH / "sweep.py", ["--alpha", "0:1:1e-9"], "argument --alpha: '0:1:1e-9' gives"),
    (BENCH / "sweep.py", ["--max-memory", "0"], "argument --max-memory: '0' must be more than 0 bytes"),
    (BENCH / "sweep.py", ["--max-memory", "lots"], "argument --max-memory: 'lots' is not a size"),
    (BENCH / "sweep.py", ["--device", "gpu"], "argument --device: 'gpu': choose cpu, cuda or cuda:N"),
    (BENCH / "sweep.py", ["--dtype", "int8"], "argument --dtype: invalid choice"),
    (BENCH / "sweep.py", ["--dir", "no-such-folder"], "argument --dir: no-such-folder is not a folder"),
    (BENCH / "sweep.py", ["--reuse", "no-such-folder"], "argument --reuse: no-such-folder is not a folder"),
]


@pytest.mark.parametrize(
    "path,args,fragment", USAGE_MISTAKES, ids=[f"{u[0].stem}-{u[2]}" for u in USAGE_MISTAKES]
)
def test_script_usage_mistakes_are_one_line(
    tmp_path: Path, path: Path, args: list[str], fragment: str
) -> None:
    proc = script(path, *args, cwd=tmp_path)
    assert proc.returncode == 2 and fragment in one_line(proc.stderr)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_lone_surrogates_in_data_are_one_line(tmp_path: Path, suffix: str) -> None:
    """A `\\ud800` escape without its pair is not text: the pair reader and convert_pairs refuse
    it in one line naming the file (a tokenizer's TypeError and a traceback before)."""
    row = '{"prompt": "w3 \\ud800", "chosen": "w4", "rejected": "w5", "subset": "x", "id": 1}'
    source = tmp_path / f"pairs{suffix}"
    source.write_text(f"[{row}]\n" if suffix == ".json" else row + "\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_pairs.py"),
            "rewardbench",
            str(source),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    lines = proc.stderr.strip().splitlines()
    assert (
        proc.returncode == 1 and len(lines) == 1 and "lone surrogate" in lines[0] and str(source) in lines[0]
    )
    assert not out.exists()
    if suffix == ".jsonl":
        from lazymerge.errors import PairFileError
        from lazymerge.evaluation.scoring import load_preferences

        with pytest.raises(PairFileError, match=r"pairs.jsonl:1: holds a lone surrogate"):
            load_preferences(source)


#: (reader, file text, fragment): every reader of JSON Lines refuses a lone surrogate at its line
#: (the tokenizer failed on it: `eval` and `sweep` ended in "unexpected TypeError").
SURROGATE_ROWS = [
    (
        "pairs",
        '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "\\ud800 p", "chosen": "a", "rejected": "b"}\n',
        "x.jsonl:2: holds a lone surrogate (\\ud800, an unpaired JSON escape), not text",
    ),
    (
        "pairs",
        '{"prompt": "p", "chosen": "a\\udc00", "rejected": "b"}\n',
        "x.jsonl:1: holds a lone surrogate (\\udc00",
    ),
    (
        "preferences",
        '{"id": "1", "prompt": "\\uDBFF", "chosen": ["a"], "rejected": ["b"], "num_correct": 1, "total_completions": 2, "subset": "Math"}\n',
        "x.jsonl:1: holds a lone surrogate (\\udbff",
    ),
    (
        "candidates",
        '{"prompt": "p", "candidates": ["\\ud834"], "answer": "1"}\n',
        "x.jsonl:1: holds a lone surrogate (\\ud834",
    ),
]


@pytest.mark.parametrize(
    "reader,text,fragment", SURROGATE_ROWS, ids=[f"{r[0]}-{i}" for i, r in enumerate(SURROGATE_ROWS)]
)
def test_jsonl_readers_refuse_lone_surrogates(tmp_path: Path, reader: str, text: str, fragment: str) -> None:
    from lazymerge.errors import EvalDataError
    from lazymerge.evaluation import scoring

    path = tmp_path / "x.jsonl"
    path.write_text(text)
    read = {
        "pairs": scoring.load_pairs,
        "preferences": scoring.load_preferences,
        "candidates": scoring.load_candidates,
    }[reader]
    with pytest.raises(EvalDataError) as info:
        read(path)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


#: (case, escaped text, what it reads as): escapes that are text are read as before.
SURROGATE_LOOKALIKES = [
    ("pair-of-surrogates", "\\ud83d\\ude00", "\U0001f600"),
    ("escaped-backslash", "\\\\ud800", "\\ud800"),
    ("non-surrogate-escape", "\\u00e9\\ud7ff\\ue000", "\u00e9\ud7ff\ue000"),
]


@pytest.mark.parametrize("case,escaped,text", SURROGATE_LOOKALIKES, ids=[c[0] for c in SURROGATE_LOOKALIKES])
def test_jsonl_text_escapes_still_read(tmp_path: Path, case: str, escaped: str, text: str) -> None:
    from lazymerge.evaluation import scoring

    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "' + escaped + '", "chosen": "a", "rejected": "b"}\n')
    pairs, _ = scoring.load_pairs(path)
    assert pairs[0].prompt == text


def test_eval_with_a_lone_surrogate_exits_1_in_one_line(tmp_path: Path) -> None:
    """`lazymerge eval` refuses the pairs file before any model is loaded."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}\n')
    proc = lazymerge("eval", str(tmp_path / "no-such-model"), "--pairs", str(path), "-q")
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc.stderr)
    assert "unexpected" not in line
    assert "p.jsonl:1: holds a lone surrogate (\\ud800, an unpaired JSON escape), not text" in line, line
