"""The command line explains itself: every command has a whole one-line summary in the group's
help, two to four examples that parse as written, and every option a help text."""

from __future__ import annotations

import shlex

import click
import pytest
from click.testing import CliRunner

from lazymerge.cli import COMMAND_HELP, main
from lazymerge.methods import METHODS


def test_the_group_help_cuts_no_summary() -> None:
    out = CliRunner().invoke(main, ["--help"]).output
    assert "..." not in out.split("Commands:")[1]
    for name, (summary, _) in COMMAND_HELP.items():
        assert f"{name} " in out and summary in " ".join(out.split()), name
    assert set(COMMAND_HELP) == set(main.commands)


@pytest.mark.parametrize("name", sorted(COMMAND_HELP))
def test_every_command_has_examples_that_parse(name: str) -> None:
    command = main.commands[name]
    _, examples = COMMAND_HELP[name]
    assert 2 <= len(examples) <= 4
    help_text = CliRunner().invoke(main, [name, "--help"]).output
    assert "Examples:" in help_text
    for line, _ in examples:
        argv = shlex.split(line)
        assert argv[:2] == ["lazymerge", name] and line in help_text
        with command.make_context(name, argv[2:], resilient_parsing=False) as ctx:
            assert ctx.params  # parsed as written: every flag exists and every value fits its type


@pytest.mark.parametrize("name", sorted(COMMAND_HELP))
def test_every_option_has_help(name: str) -> None:
    missing = [p.opts[0] for p in main.commands[name].params if isinstance(p, click.Option) and not p.help]
    assert not missing, f"{name}: {missing}"


def test_method_help_names_every_registered_method() -> None:
    for name in ("run", "eval", "sweep"):
        text = " ".join(CliRunner().invoke(main, [name, "--help"]).output.split())
        assert all(m in text for m in METHODS), name


def test_eval_compute_dtype_is_the_old_dtype(tmp_path) -> None:
    """`eval --compute-dtype` names what eval's `--dtype` always meant; both set one setting."""
    import json

    pytest.importorskip("transformers")
    from tests.helpers.models import BASE_WORDS, make_tokenizer, save_model

    rm = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "w3 w4", "chosen": "w5 w6", "rejected": "w7"}) + "\n")
    for flag in ("--compute-dtype", "--dtype"):
        out = tmp_path / f"{flag.strip('-')}.json"
        result = CliRunner().invoke(
            main, ["eval", str(rm), "--pairs", str(pairs), flag, "bfloat16", "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["settings"]["dtype"] == "bfloat16"


def test_eval_prefix_cache_and_batch_tokens_flags(tmp_path) -> None:
    """`--no-prefix-cache` and `--batch-tokens` reach the scorer and the report's settings; the
    rewards agree with the default (prefix cache on) to fp32 rounding."""
    import json

    pytest.importorskip("transformers")
    from tests.helpers.models import BASE_WORDS, make_tokenizer, save_model

    rm = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    pairs = tmp_path / "p.jsonl"
    rows = [
        {"prompt": " ".join(f"w{3 + i % 9}" for i in range(20)), "chosen": "w5 w6", "rejected": "w7 w8 w9"},
        {"prompt": " ".join(f"w{11 - i % 7}" for i in range(20)), "chosen": "w9", "rejected": "w4"},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = []
    for extra in ([], ["--no-prefix-cache", "--batch-tokens", "64"]):
        out = tmp_path / f"r{len(docs)}.json"
        result = CliRunner().invoke(
            main, ["eval", str(rm), "--pairs", str(pairs), "--out", str(out), "-q", *extra]
        )
        assert result.exit_code == 0, result.output
        docs.append(json.loads(out.read_text()))
    assert docs[0]["settings"]["prefix_cache"] is True and docs[0]["settings"]["batch_tokens"] is None
    assert docs[1]["settings"]["prefix_cache"] is False and docs[1]["settings"]["batch_tokens"] == 64
    # what was computed: whole texts compute every token of the 4 texts; the prefix tree computes
    # its distinct tokens only (each pair's prompt once), counted here from the tokenizer itself
    from transformers import AutoTokenizer

    from lazymerge.evaluation.rewards import load_reward_model

    tok, fmt = AutoTokenizer.from_pretrained(rm), load_reward_model(rm).format_text
    ids = [
        tok(t)["input_ids"] for t in {fmt(r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")}
    ]
    cached, whole_stats = docs[0]["computed"], docs[1]["computed"]
    assert whole_stats["path"] == "whole texts" and whole_stats["fallback"] is None
    assert whole_stats["texts"] == cached["texts"] == 4
    assert whole_stats["tokens_in_texts"] == whole_stats["tokens_computed"] == sum(map(len, ids))
    # the ideal: distinct prefixes up to the token the reward is read at (the last non-pad one)
    pad = json.loads((rm / "config.json").read_text())["pad_token_id"]
    ends = [max(i for i, t in enumerate(seq) if t != pad) + 1 for seq in ids]
    prefixes = {tuple(seq[:n]) for seq, end in zip(ids, ends, strict=True) for n in range(1, end + 1)}
    assert cached["path"] == "prefix tree"
    assert cached["ideal_tokens"] == whole_stats["ideal_tokens"] == len(prefixes)
    # the 20-word prompts are computed once per pair; nodes saving under 16 tokens are not split off
    assert len(prefixes) <= cached["tokens_computed"] < sum(ends) - 15
    shown = CliRunner().invoke(main, ["eval", str(rm), "--pairs", str(pairs)])
    computed, total = cached["tokens_computed"], sum(map(len, ids))
    assert (
        f"{computed:,} tokens computed of {total:,} in the texts (prefix tree: {len(prefixes):,})"
        in shown.output
    )
    with_cache, whole = docs[0]["pairs"], docs[1]["pairs"]
    values = [p[k] for p in whole for k in ("chosen_reward", "rejected_reward")]
    assert len(set(values)) > 1  # the texts carry signal
    for a, b in zip(with_cache, whole, strict=True):
        for k in ("chosen_reward", "rejected_reward"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k]))
    bad = CliRunner().invoke(main, ["eval", str(rm), "--pairs", str(pairs), "--batch-tokens", "0"])
    assert bad.exit_code == 2 and "--batch-tokens" in bad.output
