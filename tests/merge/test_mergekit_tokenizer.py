"""mergekit's `tokenizer_source: base` (or a model) and `tokenizer: {source: ...}` sections: run
when every model shares the source's tokenizer files (the embeddings then line up by position and
the output keeps those files), refused in one line naming the field and the differing file when a
model's tokenizer differs (a position merge would mix different tokens' rows)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lazymerge.cli import main
from tests.helpers.checkpoints import load_any

models = pytest.importorskip("tests.helpers.models")
tokenizers = models.tokenizers


def cli(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def folders(tmp_path: Path, monkeypatch) -> Path:
    """Tiny Llama folders base, a, b sharing one tokenizer, and c whose tokenizer has the same
    size but two tokens swapped."""
    monkeypatch.chdir(tmp_path)
    tok = models.make_tokenizer(models.BASE_WORDS)
    for seed, name in enumerate(["base", "a", "b"]):
        models.save_model(tmp_path / name, "llama", False, seed, tok)
    words = list(models.BASE_WORDS)
    words[5], words[6] = words[6], words[5]
    models.save_model(tmp_path / "c", "llama", False, 3, models.make_tokenizer(words))
    return tmp_path


def config(source: str, second: str = "b", section: bool = False) -> str:
    text = (
        "merge_method: linear\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 0.6}\n"
        f"  - model: {second}\n    parameters: {{weight: 0.4}}\n  - model: base\n    parameters: {{weight: 0}}\n"
        "parameters: {normalize: false}\n"
    )
    return text + (f"tokenizer:\n  source: {source}\n" if section else f"tokenizer_source: {source}\n")


@pytest.mark.parametrize(("source", "section"), [("base", False), ("a", False), ("base", True)])
def test_shared_tokenizer_source_runs(folders: Path, source: str, section: bool) -> None:
    (folders / "m.yml").write_text(config(source, section=section))
    result = cli("run", "m.yml", "-o", "out", "-q")
    assert result.exit_code == 0, result.output
    assert "every model has its tokenizer files" in result.stderr
    flags = cli("run", "a", "b", "base", "--weights", "0.6,0.4,0", "-o", "flags", "-q")
    assert flags.exit_code == 0, flags.output
    got, want = load_any(folders / "out"), load_any(folders / "flags")
    assert sorted(got) == sorted(want)
    for name in got:
        assert torch.equal(got[name], want[name]), name
    origin = folders / source
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (folders / "out" / name).read_bytes() == (origin / name).read_bytes()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (config("base", second="c"), "tokenizer_source: 'base': "),
        (config("c", second="c"), "tokenizer_source: 'c': "),
        (config("base", second="c", section=True), "tokenizer.source: 'base': "),
    ],
    ids=["base", "model", "section"],
)
def test_differing_tokenizer_refused_in_one_line(folders: Path, text: str, fragment: str) -> None:
    (folders / "m.yml").write_text(text)
    result = cli("plan", "m.yml")
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and fragment in line, line
    assert "tokenizer.json differs from" in line, line
    assert not (folders / "merged").exists()


def test_both_tokenizer_fields_refused(folders: Path) -> None:
    (folders / "m.yml").write_text(config("base") + "tokenizer: {source: base}\n")
    result = cli("plan", "m.yml")
    assert (
        result.exit_code == 1 and "tokenizer: give tokenizer or tokenizer_source, not both" in result.stderr
    )


MERGEKIT = os.environ.get("LAZYMERGE_MERGEKIT", "")


@pytest.mark.mergekit
@pytest.mark.skipif(
    not (MERGEKIT and os.access(MERGEKIT, os.X_OK)),
    reason="set LAZYMERGE_MERGEKIT=/path/to/mergekit-yaml (bash bench/setup_mergekit.sh makes one)",
)
def test_tokenizer_source_base_matches_mergekit(folders: Path) -> None:
    """mergekit 0.1.5 with tokenizer_source: base over models sharing one tokenizer: the same
    vocabulary, and weights within a few fp32 steps (its embeddings go through its vocabulary
    permutation, here the identity)."""
    text = config("base").replace("merge_method: linear\n", "merge_method: linear\ndtype: float32\n")
    for name in ("base", "a", "b"):  # absolute paths: mergekit asks the Hub about relative names
        text = text.replace(f"model: {name}\n", f"model: {folders / name}\n")
    (folders / "m.yml").write_text(text)
    done = subprocess.run(
        [MERGEKIT, str(folders / "m.yml"), str(folders / "mk"), "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = cli("run", "m.yml", "-o", "lz", "-q")
    assert result.exit_code == 0, result.output
    mk, lz = load_any(folders / "mk"), load_any(folders / "lz")
    assert sorted(mk) == sorted(lz)
    for name in mk:
        scale = float(lz[name].abs().max()) + 1.0
        assert float((mk[name].double() - lz[name].double()).abs().max()) <= 8 * 2.0**-24 * scale, name
    vocab = [
        tokenizers.Tokenizer.from_file(str(folders / out / "tokenizer.json")).get_vocab()
        for out in ("mk", "lz")
    ]
    assert vocab[0] == vocab[1]
