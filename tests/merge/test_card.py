"""Model cards: every folder output gets a README.md in the Hub's form (YAML front matter, the
recipe, the command that makes it again), written with the rest of the output; an input's own
README.md is never copied, and --force never replaces a user's README."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from lazymerge.cli import main
from lazymerge.errors import OutputError
from lazymerge.io.writer import CARD_MARK, is_lazymerge_output
from lazymerge.merge.api import merge
from tests.helpers.checkpoints import load_any
from tests.helpers.models import BASE_WORDS, make_tokenizer, save_model


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    doc = yaml.safe_load(match.group(1))
    assert isinstance(doc, dict)
    return doc


def reproduce_args(card: str) -> list[str]:
    match = re.search(r"```sh\n(lazymerge run .*)\n```", card)
    assert match, card
    return shlex.split(match.group(1))[1:]


def rerun_elsewhere(card: str, output: Path) -> None:
    """Run the card's command with another output path."""
    args = reproduce_args(card)
    args[args.index("-o") + 1] = str(output)
    result = CliRunner().invoke(main, [*args, "-q"])
    assert result.exit_code == 0, result.output


@pytest.fixture
def dogerm(tmp_path: Path) -> tuple[Path, Path]:
    rm = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    sft = save_model(tmp_path / "sft", "llama", False, 2, make_tokenizer(BASE_WORDS, added=["[PAD]"]))
    (rm / "README.md").write_text("---\nlicense: mit\n---\n# The reward model's own card\n")
    (sft / "README.md").write_text("# The domain model's own card\n")
    return rm, sft


def test_reward_merge_card(tmp_path: Path, dogerm: tuple[Path, Path], monkeypatch) -> None:
    rm, sft = dogerm
    monkeypatch.chdir(tmp_path)  # a card names local paths relative to the working folder
    out = tmp_path / "out"
    report = merge([rm, sft], out, alpha=0.3)
    card = (out / "README.md").read_text()
    assert str(out / "README.md") in report.files
    assert front_matter(card) == {
        "base_model": ["rm", "sft"],
        "tags": ["merge", "lazymerge"],
        "library_name": "transformers",
    }
    assert "own card" not in card and card.rstrip().endswith(CARD_MARK)  # the inputs' cards are not copied
    for fact in (
        "Method: `linear`",
        "`rm`: reward model, weight 0.7",
        "`sft`: domain model, weight 0.3",
        "The output is the reward model",
        "`score.weight` (reward head, kept from the reward model)",
        "lm_head.weight of sft (language-model head)",
        "1 appended from domain models ('\\[PAD\\]')",
        "lazymerge 0.",
    ):
        assert fact in card, fact
    assert reproduce_args(card)[:6] == ["run", "rm", "sft", "-o", "out", "--weights"]
    rerun_elsewhere(card, tmp_path / "again")
    first, again = load_any(out), load_any(tmp_path / "again")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_file_inputs_folder_output_and_task_arithmetic(tmp_path: Path, save, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tensors = [{"w": torch.randn(6, 3), "n": torch.arange(3)} for _ in range(3)]
    a, b, base = (save(f"{n}.safetensors", t) for n, t in zip("abz", tensors, strict=True))
    out = tmp_path / "ta"
    merge([a, b], out, method="ties", base=base, weights=[0.6, 0.4], density=0.7)
    card = (out / "README.md").read_text()
    assert front_matter(card) == {"base_model": [a.name, b.name, base.name], "tags": ["merge", "lazymerge"]}
    assert "Method: `ties`, density 0.7" in card and f"`{base.name}`: base model, task vectors" in card
    assert f"`{a.name}`: input, weight 0.6" in card
    args = reproduce_args(card)
    assert args[args.index("--base") + 1] == base.name and args[args.index("--density") + 1] == "0.7"
    rerun_elsewhere(card, tmp_path / "again")
    assert torch.equal(load_any(out)["w"], load_any(tmp_path / "again")["w"])
    single = tmp_path / "one.safetensors"
    merge([a, b], single)
    assert not (tmp_path / "README.md").exists()  # a single-file output has no card


def test_sweep_outputs_each_get_their_own_card(
    tmp_path: Path, dogerm: tuple[Path, Path], monkeypatch
) -> None:
    rm, sft = dogerm
    monkeypatch.chdir(tmp_path)
    plan = CliRunner().invoke(main, ["plan", str(rm), str(sft), "--alpha", "0.2,0.6", "-o", "sw", "--json"])
    assert plan.exit_code == 0, plan.output
    assert {"alpha-0.2/README.md", "alpha-0.6/README.md"} <= set(json.loads(plan.output)["files"])
    merge([rm, sft], tmp_path / "sw", alpha=[0.2, 0.6])
    for alpha in (0.2, 0.6):
        card = (tmp_path / "sw" / f"alpha-{alpha:g}" / "README.md").read_text()
        assert f"domain model, weight {alpha:g}" in card
        args = reproduce_args(card)
        assert args[args.index("-o") + 1] == f"sw/alpha-{alpha:g}"
        assert args[args.index("--weights") + 1] == f"{1 - alpha!r},{alpha!r}"


def test_force_replaces_our_card_never_a_users(tmp_path: Path, dogerm: tuple[Path, Path]) -> None:
    rm, sft = dogerm
    out = tmp_path / "out"
    merge([rm, sft], out, alpha=0.3)
    assert is_lazymerge_output(out)
    merge([rm, sft], out, alpha=0.4, force=True)  # lazymerge's own card: replaced
    assert "domain model, weight 0.4" in (out / "README.md").read_text()
    (out / "README.md").write_text("# My notes on this merge\n")
    assert not is_lazymerge_output(out)
    with pytest.raises(OutputError, match="--force replaces only outputs lazymerge wrote"):
        merge([rm, sft], out, alpha=0.5, force=True)
    assert (out / "README.md").read_text() == "# My notes on this merge\n"
    # a user's card that merely mentions the mark somewhere is still the user's
    (out / "README.md").write_text(f"{CARD_MARK}\nthen my own text\n")
    with pytest.raises(OutputError, match="--force replaces only outputs lazymerge wrote"):
        merge([rm, sft], out, alpha=0.5, force=True)


def test_card_of_cached_ids_names_hub_ids_and_pins_commits(tmp_path: Path, monkeypatch) -> None:
    from tests.helpers.hub_cache import C1, cache_model, model_files

    cache = tmp_path / "cache"
    cache_model(cache, "org/a", model_files(1, readme="# org/a's card\n"), C1, ("main",))
    cache_model(cache, "org/b", model_files(2), C1, ("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    merge(["org/a", "org/b"], "out", weights=[0.25, 0.75])
    card = Path("out/README.md").read_text()
    assert front_matter(card)["base_model"] == ["org/a", "org/b"]
    assert "library_name" in front_matter(card)  # the snapshots hold config.json
    assert f"Hugging Face `org/a` at `main` (commit `{C1}`): input, weight 0.25" in card
    assert reproduce_args(card)[1:3] == [f"org/a@{C1}", f"org/b@{C1}"]
    assert "org/a's card" not in card
    rerun_elsewhere(card, tmp_path / "again")
    assert torch.equal(load_any(Path("out"))["w"], load_any(tmp_path / "again")["w"])
