"""Hostile inputs, round two: nothing from a model folder runs, no user file is clobbered, one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.models import BASE_WORDS, make_tokenizer, save_model

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
