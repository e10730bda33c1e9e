"""Hugging Face model ids as inputs, from a fake Hugging Face cache built in tmp_path: blobs,
snapshot symlinks and refs laid out as `hf download` lays them out, found through
huggingface_hub's own lookup; never downloaded, never written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lazymerge.cli import main
from lazymerge.errors import InputError, OutputError
from lazymerge.io.hub_cache import hub_repo_folder, parse_hub_id, resolve_input
from lazymerge.merge.api import merge
from tests.helpers.checkpoints import load_any
from tests.helpers.hub_cache import C1, C2, cache_model, model_files, weights


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache with org/a (main -> C1, dev -> C2) and org/b (main -> C1), HF_HUB_CACHE pointing at it."""
    cache = tmp_path / "hf-cache"
    cache_model(cache, "org/a", model_files(1), C1, ("main",))
    cache_model(cache, "org/a", model_files(2), C2, ("dev",))
    cache_model(cache, "org/b", model_files(3), C1, ("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def snapshot(cache: Path, repo_id: str, commit: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def blob_state(cache: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(cache)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(cache.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_id_parsing() -> None:
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/Llama-3.1-8B@v1.0") == ("org/Llama-3.1-8B", "v1.0")
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_an_id in (
        "name",
        "./org/name",
        "/org/name",
        "a/b/c",
        "org/x.safetensors",
        "org/name@../../etc",
        "o/a--b",
    ):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_ids_and_revisions_resolve_to_snapshots(hub: Path) -> None:
    main_src = resolve_input("org/a")
    assert main_src.path == snapshot(hub, "org/a", C1)
    assert (main_src.repo_id, main_src.revision, main_src.commit) == ("org/a", "main", C1)
    branch = resolve_input("org/a@dev")
    assert branch.path == snapshot(hub, "org/a", C2) and branch.commit == C2
    by_commit = resolve_input(f"org/a@{C2}")
    assert by_commit.path == snapshot(hub, "org/a", C2) and by_commit.revision == C2
    assert hub_repo_folder(by_commit.path / "model.safetensors") == hub / "models--org--a"


def test_missing_id_names_the_download_command(hub: Path) -> None:
    with pytest.raises(
        InputError, match=r"org/missing: no such file or folder.*run `hf download org/missing` first"
    ):
        resolve_input("org/missing")
    with pytest.raises(InputError, match=r"`hf download org/a --revision nope`"):
        resolve_input("org/a@nope")
    env = {**os.environ, "HF_HUB_CACHE": str(hub)}
    result = subprocess.run(
        [sys.executable, "-m", "lazymerge", "inspect", "org/missing"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "hf download org/missing" in result.stderr, result.stderr


def test_hf_home_is_honoured(hub: Path, tmp_path: Path) -> None:
    home = tmp_path / "hf-home"
    cache_model(home / "hub", "org/c", model_files(4), C1, ("main",))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env["HF_HOME"] = str(home)
    result = subprocess.run(
        [sys.executable, "-m", "lazymerge", "inspect", "org/c"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert f"read org/c: Hugging Face cache, org/c at main (commit {C1})" in result.stdout


def test_a_local_folder_of_the_same_name_wins(hub: Path) -> None:
    local = Path("org/a")
    local.mkdir(parents=True)
    save_file(weights(9), str(local / "model.safetensors"))
    source = resolve_input("org/a")
    assert source.path == local and not source.from_hub_cache
    report = merge(["org/a", "org/b"], "out.safetensors")
    assert [s["hub_id"] for s in report.sources] == [None, "org/b"]
    got = load_any(Path("out.safetensors"))
    assert torch.equal(got["w"], 0.5 * weights(9)["w"] + 0.5 * weights(3)["w"])


def test_merge_of_cached_ids_equals_merge_of_snapshot_folders(hub: Path) -> None:
    before = blob_state(hub)
    report = merge(["org/a", "org/b@main"], "by-id", alpha=0.3)
    merge([snapshot(hub, "org/a", C1), snapshot(hub, "org/b", C1)], "by-path", alpha=0.3)
    by_id, by_path = load_any(Path("by-id")), load_any(Path("by-path"))
    assert by_id.keys() == by_path.keys() == weights(1).keys()
    assert all(torch.equal(by_id[k], by_path[k]) for k in by_id)
    assert torch.equal(by_id["w"], 0.7 * weights(1)["w"] + 0.3 * weights(3)["w"])
    assert blob_state(hub) == before  # blobs read, never written
    assert [s["hub_id"] for s in report.sources] == ["org/a", "org/b"]
    assert report.sources[0]["path"] == str(snapshot(hub, "org/a", C1))
    assert f"input org/a: Hugging Face cache, org/a at main (commit {C1})" in report.format()


def test_cli_run_plan_and_verify_take_ids(hub: Path) -> None:
    result = CliRunner().invoke(main, ["run", "org/a@dev", "org/b", "-o", "m.safetensors", "--json"])
    assert result.exit_code == 0, result.output
    sources = json.loads(result.output)["sources"]
    assert [(s["given"], s["commit"]) for s in sources] == [("org/a@dev", C2), ("org/b", C1)]
    planned = CliRunner().invoke(main, ["plan", "org/a", "org/b", "-o", "p.safetensors"])
    assert planned.exit_code == 0, planned.output
    assert f"from org/a: Hugging Face cache, org/a at main (commit {C1}), snapshot" in planned.output
    verified = CliRunner().invoke(main, ["verify", "org/b"])
    assert verified.exit_code == 0 and "read org/b: Hugging Face cache" in verified.output
    base = CliRunner().invoke(
        main,
        [
            "run",
            "org/a",
            "org/b",
            "--method",
            "task_arithmetic",
            "--base",
            "org/a@dev",
            "-o",
            "t.safetensors",
        ],
    )
    assert base.exit_code == 0, base.output
    got = load_any(Path("t.safetensors"))
    want = (
        weights(2)["w"]
        + 0.5 * (weights(1)["w"] - weights(2)["w"])
        + 0.5 * (weights(3)["w"] - weights(2)["w"])
    )
    assert torch.allclose(got["w"], want, atol=1e-6)


def test_outputs_into_the_cache_are_refused(hub: Path) -> None:
    before = blob_state(hub)
    snap = snapshot(hub, "org/a", C1)
    repo = hub / "models--org--a"
    blob = (snap / "model.safetensors").resolve()
    for destination, force in [
        (snap / "merged", False),
        (snap, True),
        (snap / "model.safetensors", True),
        (repo / "blobs" / "new.safetensors", False),
        (repo / "merged", False),
        (blob, True),
    ]:
        with pytest.raises(OutputError, match="input|cache"):
            merge(["org/a", "org/b"], destination, force=force)
    assert blob_state(hub) == before
    blobs = {hashlib.sha256(d).hexdigest() for seed in (1, 2) for d in model_files(seed).values()}
    assert {p.name for p in (repo / "blobs").iterdir()} == blobs  # nothing added


def test_eval_reads_a_cached_reward_model_and_says_so(hub: Path, tmp_path: Path) -> None:
    from lazymerge.evaluation.run import evaluate_pairs
    from tests.helpers.evaluation import reward_model, words, write_jsonl
    from tests.helpers.models import assert_carries_signal, scored_texts

    folder = reward_model(tmp_path)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    cache_model(hub, "org/rm", files, C1, ("main",))
    rows = [
        {"prompt": words(3), "chosen": words(5 + i), "rejected": words(9 + i), "id": f"p{i}"}
        for i in range(3)
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    by_id = evaluate_pairs("org/rm", pairs)
    by_path = evaluate_pairs(folder, pairs)
    assert_carries_signal(folder, *scored_texts(pairs, by_path))
    assert [p["chosen_reward"] for p in by_id["pairs"]] == [p["chosen_reward"] for p in by_path["pairs"]]
    assert by_id["sources"] == [
        {
            "given": "org/rm",
            "path": str(snapshot(hub, "org/rm", C1)),
            "hub_id": "org/rm",
            "revision": "main",
            "commit": C1,
        }
    ]
    result = CliRunner().invoke(main, ["eval", "org/rm", "--pairs", str(pairs), "--out", "r.json"])
    assert result.exit_code == 0, result.output
    assert json.loads(Path("r.json").read_text())["sources"][0]["hub_id"] == "org/rm"
    refused = CliRunner().invoke(
        main, ["eval", "org/rm", "--pairs", str(pairs), "--out", str(snapshot(hub, "org/rm", C1) / "r.json")]
    )
    assert refused.exit_code == 1 and "cache" in refused.output


def test_sweep_spec_reads_ids_from_the_cache(hub: Path, tmp_path: Path) -> None:
    from lazymerge.evaluation.sweep import build_spec
    from tests.helpers.evaluation import write_jsonl

    rm_files = model_files(5)
    rm_files["config.json"] = json.dumps({"architectures": ["LlamaForSequenceClassification"]}).encode()
    cache_model(hub, "org/rm", rm_files, C1, ("main",))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    spec = build_spec(["org/b", "org/rm"], Path("sweep"), pair_files=[pairs])
    assert spec.inputs == (snapshot(hub, "org/b", C1), snapshot(hub, "org/rm", C1))
    assert spec.rm_index == 1 and spec.domain_names == ("org/b",)
    assert [s.repo_id for s in spec.sources] == ["org/b", "org/rm"]
