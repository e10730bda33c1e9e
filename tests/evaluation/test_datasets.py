"""Evaluation data from TRL's preference formats, JSON lists, parquet files and a fake Hugging
Face datasets cache in tmp_path (parquet written by pyarrow, laid out as `hf download
--repo-type dataset` lays it out; never downloaded)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from lazymerge.errors import CandidateFileError, InputError, PairFileError
from lazymerge.evaluation.datasets import parse_dataset_id, resolve_data
from lazymerge.evaluation.scoring import load_candidates, load_pairs, load_preferences
from tests.helpers.hub_cache import C1, C2, cache_model

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def trl_extract_prompt(example: dict[str, Sequence[Any]]) -> dict[str, Sequence[Any]]:
    """TRL's `extract_prompt` (trl/data_utils.py, huggingface/trl), written again from its
    published source: the longest common prefix of chosen and rejected (characters, or
    messages), less one space that ends it."""
    chosen, rejected = example["chosen"], example["rejected"]
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return {"prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


#: TRL's four preference shapes (its docs' "Dataset formats" table), each row with a
#: different answer so a shifted split shows.
IMPLICIT_TEXT = [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "Two plus two is four", "rejected": "Two plus two is five"},
]
IMPLICIT_CONVERSATION = [
    {
        "chosen": [user("What color is the sky?"), assistant("It is blue.")],
        "rejected": [user("What color is the sky?"), assistant("It is green.")],
    },
    {
        "chosen": [user("2+2?"), assistant("4")],
        "rejected": [user("2+2?"), assistant("5")],
    },
]
EXPLICIT_CONVERSATION = [
    {
        "prompt": [user("What color is the sky?")],
        "chosen": [assistant("It is blue.")],
        "rejected": [assistant("It is green.")],
    }
]


def expected_pairs(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) as TRL splits them, messages reduced to their content."""
    out = []
    for row in rows:
        split = row if "prompt" in row else trl_extract_prompt(row)
        texts = []
        for part in (split["prompt"], split["chosen"], split["rejected"]):
            if isinstance(part, str):
                texts.append(part)
            else:
                assert len(part) == 1, "a test row must reduce to one message"
                texts.append(part[0]["content"])
        out.append((texts[0], texts[1], texts[2]))
    return out


@pytest.mark.parametrize(
    "rows",
    [IMPLICIT_TEXT, IMPLICIT_CONVERSATION, EXPLICIT_CONVERSATION],
    ids=["implicit-text", "implicit-conversation", "explicit-conversation"],
)
def test_trl_rows_split_as_trl_splits_them(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    path = write_jsonl(tmp_path / "trl.jsonl", rows)
    data = load_preferences(path)
    assert data.rewardbench2 == ()  # lists of messages are not RewardBench 2 rows
    assert [(p.prompt, p.chosen, p.rejected) for p in data.pairs] == expected_pairs(rows)
    assert [p.line for p in data.pairs] == list(range(1, len(rows) + 1))


def test_trl_implicit_text_keeps_the_answers_leading_space(tmp_path: Path) -> None:
    (pair,), _ = load_pairs(write_jsonl(tmp_path / "t.jsonl", IMPLICIT_TEXT[:1]))
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The sky is", " blue.", " green.")


def test_rewardbench2_rows_are_still_rewardbench2(tmp_path: Path) -> None:
    row = {
        "id": "1",
        "prompt": "q",
        "chosen": ["a"],
        "rejected": ["b", "c", "d"],
        "num_correct": 1,
        "total_completions": 4,
        "subset": "Math",
    }
    data = load_preferences(write_jsonl(tmp_path / "rb2.jsonl", [row]))
    assert data.pairs == () and len(data.rewardbench2) == 1


BAD_CONVERSATIONS: list[tuple[str, dict[str, Any], str]] = [
    (
        "prompt-ends-with-assistant",
        {
            "chosen": [user("a"), assistant("b"), assistant("d")],
            "rejected": [user("a"), assistant("b"), assistant("e")],
        },
        'the prompt is 2 message(s) with roles ["user", "assistant"]',
    ),
    (
        "system",
        {
            "chosen": [{"role": "system", "content": "s"}, user("a"), assistant("b")],
            "rejected": [{"role": "system", "content": "s"}, user("a"), assistant("c")],
        },
        "--system-prompt",
    ),
    (
        "two-answers",
        {"prompt": [user("a")], "chosen": [assistant("b"), assistant("c")], "rejected": [assistant("d")]},
        "the chosen answer is 2 message(s)",
    ),
    (
        "content-list",
        {
            "chosen": [user("a"), {"role": "assistant", "content": [{"type": "text"}]}],
            "rejected": [user("a")],
        },
        "chosen[1].content must be a string, found a JSON array",
    ),
    (
        "role-missing",
        {"chosen": [user("a"), {"content": "x"}], "rejected": [user("a"), assistant("y")]},
        "chosen[1] must be a message with a string role",
    ),
    ("equal-texts", {"chosen": "same", "rejected": "same"}, "equal or one begins with the other"),
    ("prefix-texts", {"chosen": "abc", "rejected": "abcd"}, "equal or one begins with the other"),
]


@pytest.mark.parametrize("name,row,fragment", BAD_CONVERSATIONS, ids=[b[0] for b in BAD_CONVERSATIONS])
def test_unusable_trl_rows_are_refused_naming_the_line(
    tmp_path: Path, name: str, row: dict[str, Any], fragment: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [IMPLICIT_CONVERSATION[0], row])
    with pytest.raises(PairFileError) as info:
        load_preferences(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and "\n" not in message
    assert fragment in message


def test_json_list_and_parquet_read_as_json_lines(tmp_path: Path) -> None:
    rows = [
        {"id": 7, "prompt": "p1", "chosen": "a", "rejected": "b", "subset": "math-prm"},
        {"id": 8, "prompt": "p2", "chosen": "c", "rejected": "d", "subset": "hep-go"},
    ]
    jsonl = load_pairs(write_jsonl(tmp_path / "r.jsonl", rows))
    listed = tmp_path / "r.json"
    listed.write_text(json.dumps(rows))
    parquet = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert load_pairs(listed) == jsonl
    assert load_pairs(parquet) == jsonl


def test_parquet_conversations_and_candidates(tmp_path: Path) -> None:
    conv = tmp_path / "conv.parquet"
    pq.write_table(pa.Table.from_pylist(IMPLICIT_CONVERSATION), conv)
    pairs, _ = load_pairs(conv)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == expected_pairs(IMPLICIT_CONVERSATION)
    cands = tmp_path / "bon.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"prompt": "q", "candidates": ["The answer is 3", "The answer is 4"], "answer": "4"}]
        ),
        cands,
    )
    (s,) = load_candidates(cands)
    assert s.correct == [False, True]


def test_a_broken_parquet_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(PairFileError, match=r"bad\.parquet: not a readable parquet file") as info:
        load_pairs(bad)
    assert "\n" not in str(info.value)
    typed = tmp_path / "typed.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": 1, "rejected": "r"}]), typed)
    with pytest.raises(
        PairFileError, match=r"typed\.parquet: row 1: field 'chosen' must be a string, found 1"
    ):
        load_pairs(typed)


# --- the Hugging Face datasets cache ------------------------------------------------------


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return bytes(sink.getvalue().to_pybytes())


RB_FILTERED = [
    {"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "subset": "math-prm", "id": i}
    for i in range(5)
]
RB_RAW = [{"prompt": "raw", "chosen": "x", "rejected": "y", "subset": "alpacaeval-easy", "id": 99}]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """org/rb: splits filtered (two shards) and raw at main (C1), filtered edited at dev (C2);
    org/cfg: configs default and extra, each with a test split."""
    cache = tmp_path / "hf-cache"
    files = {
        "data/filtered-00000-of-00002.parquet": parquet_bytes(RB_FILTERED[:3]),
        "data/filtered-00001-of-00002.parquet": parquet_bytes(RB_FILTERED[3:]),
        "data/raw-00000-of-00001.parquet": parquet_bytes(RB_RAW),
        "README.md": b"---\nlicense: odc-by\n---\n",
    }
    cache_model(cache, "org/rb", files, C1, ("main",), kind="datasets")
    edited = dict(files)
    edited["data/filtered-00001-of-00002.parquet"] = parquet_bytes(RB_FILTERED[3:4])
    cache_model(cache, "org/rb", edited, C2, ("dev",), kind="datasets")
    cache_model(
        cache,
        "org/cfg",
        {
            "data/test-00000-of-00001.parquet": parquet_bytes(RB_FILTERED[:1]),
            "extra/test-00000-of-00001.parquet": parquet_bytes(RB_RAW),
        },
        C1,
        ("main",),
        kind="datasets",
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def test_dataset_id_parsing() -> None:
    assert parse_dataset_id("allenai/reward-bench") is not None
    parsed = parse_dataset_id("allenai/reward-bench@v1:filtered")
    assert parsed is not None and (parsed.repo_id, parsed.revision, parsed.config, parsed.split) == (
        "allenai/reward-bench",
        "v1",
        None,
        "filtered",
    )
    parsed = parse_dataset_id("org/cfg:extra:test")
    assert parsed is not None and (parsed.config, parsed.split) == ("extra", "test")
    for not_an_id in ("pairs.jsonl", "data/pairs.jsonl", "./org/name", "/org/name", "org/../x", "a/b/c"):
        assert parse_dataset_id(not_an_id) is None, not_an_id


def test_a_cached_split_reads_as_its_rows_across_shards(hub: Path) -> None:
    pairs, _ = load_pairs("org/rb:filtered")
    assert [(p.id, p.prompt, p.chosen, p.rejected, p.subset) for p in pairs] == [
        (str(r["id"]), r["prompt"], r["chosen"], r["rejected"], r["subset"]) for r in RB_FILTERED
    ]
    assert [p.line for p in pairs] == [1, 2, 3, 4, 5]  # numbered over the split, not per shard
    raw, _ = load_pairs("org/rb:raw")
    assert [p.id for p in raw] == ["99"]
    dev, _ = load_pairs("org/rb@dev:filtered")
    assert len(dev) == 4


def test_the_source_records_where_its_rows_came_from(hub: Path) -> None:
    main = resolve_data("org/rb:filtered")
    record = main.to_dict()
    assert record["hub_id"] == "org/rb" and record["commit"] == C1 and record["split"] == "filtered"
    assert [Path(f).name for f in record["files"]] == [
        "filtered-00000-of-00002.parquet",
        "filtered-00001-of-00002.parquet",
    ]
    # another split, another revision with an edited shard: other identities
    others = {resolve_data("org/rb:raw").sha256(), resolve_data("org/rb@dev:filtered").sha256()}
    assert main.sha256() not in others and len(others) == 2
    assert resolve_data("org/rb:filtered").sha256() == main.sha256()


def test_split_and_config_choice(hub: Path) -> None:
    with pytest.raises(InputError, match=r"org/rb: no split holds several splits.*it has filtered, raw"):
        load_pairs("org/rb")
    with pytest.raises(InputError, match=r"split 'test' is not among its splits"):
        load_pairs("org/rb:test")
    (row,), _ = load_pairs("org/cfg:test")  # the default config wins over others
    assert row.prompt == "q0"
    (row,), _ = load_pairs("org/cfg:extra:test")
    assert row.prompt == "raw"


def test_a_dataset_missing_from_the_cache_names_the_download(hub: Path) -> None:
    with pytest.raises(InputError) as info:
        load_pairs("org/absent:test")
    message = str(info.value)
    assert "hf download org/absent --repo-type dataset" in message and "\n" not in message
    with pytest.raises(InputError, match="hf download org/rb --repo-type dataset --revision nope"):
        load_candidates("org/rb@nope:filtered")


def test_a_local_path_wins_over_a_dataset_id(hub: Path) -> None:
    local = Path("org")
    local.mkdir()
    write_jsonl(local / "rb", [{"prompt": "local", "chosen": "a", "rejected": "b"}])
    (row,), _ = load_pairs("org/rb")
    assert row.prompt == "local"


def test_candidates_from_the_cache(hub: Path) -> None:
    cache_model(
        hub,
        "org/bon",
        {
            "test.parquet": parquet_bytes(
                [{"prompt": "q", "candidates": ["1", "2"], "correct": [False, True]}]
            )
        },
        C1,
        ("main",),
        kind="datasets",
    )
    (s,) = load_candidates("org/bon")
    assert s.correct == [False, True]
    with pytest.raises(CandidateFileError, match="needs prompt and a non-empty candidates list"):
        load_candidates("org/rb:filtered")


# --- lazymerge convert --------------------------------------------------------------------


def convert_cli(*args: str) -> Any:
    from click.testing import CliRunner

    from lazymerge.cli import main

    return CliRunner().invoke(main, ["convert", *args])


def test_convert_a_cached_split_and_trl_conversations(hub: Path, tmp_path: Path) -> None:
    out = tmp_path / "rb.jsonl"
    result = convert_cli("org/rb:filtered", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "wrote 5 pairs" in result.output
    assert load_pairs(out) == load_pairs("org/rb:filtered")
    source = write_jsonl(tmp_path / "trl.jsonl", IMPLICIT_CONVERSATION)
    converted = tmp_path / "trl-pairs.jsonl"
    assert convert_cli(str(source), "-o", str(converted)).exit_code == 0
    rows = [json.loads(line) for line in converted.read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == expected_pairs(IMPLICIT_CONVERSATION)
    assert load_pairs(converted) == load_pairs(source)


def test_convert_follows_the_output_rule(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "src.jsonl", IMPLICIT_TEXT)
    before = source.read_bytes()
    out = tmp_path / "out.jsonl"
    assert convert_cli(str(source), "-o", str(out)).exit_code == 0
    first = out.read_bytes()
    again = convert_cli(str(source), "-o", str(out))
    assert again.exit_code == 1 and "--force" in again.output and len(again.output.strip().splitlines()) == 1
    assert convert_cli(str(source), "-o", str(out), "--force").exit_code == 0 and out.read_bytes() == first
    user_file = tmp_path / "mine.jsonl"
    user_file.write_text("mine\n")
    refused = convert_cli(str(source), "-o", str(user_file), "--force")
    assert refused.exit_code == 1 and user_file.read_text() == "mine\n"  # not lazymerge's: kept
    onto_source = convert_cli(str(source), "-o", str(source), "--force")
    assert onto_source.exit_code == 1 and source.read_bytes() == before
    bad = write_jsonl(tmp_path / "bad.jsonl", [IMPLICIT_TEXT[0], {"chosen": 1, "rejected": "x"}])
    failed = convert_cli(str(bad), "-o", str(tmp_path / "never.jsonl"))
    assert failed.exit_code == 1 and f"{bad}:2:" in failed.output and not (tmp_path / "never.jsonl").exists()
    usage = convert_cli(str(source), "-o", str(tmp_path / "x.jsonl"), "--kind", "nope")
    assert usage.exit_code == 2


def test_convert_candidates_and_rewardbench2_kind(tmp_path: Path) -> None:
    listed = tmp_path / "bon.json"
    listed.write_text(json.dumps([{"prompt": "q", "candidates": ["The answer is 3", "4"], "answer": 4}]))
    out = tmp_path / "bon.jsonl"
    assert convert_cli(str(listed), "--kind", "candidates", "-o", str(out)).exit_code == 0
    assert load_candidates(out) == load_candidates(listed)
    pairs = write_jsonl(tmp_path / "p.jsonl", IMPLICIT_TEXT)
    refused = convert_cli(str(pairs), "--kind", "rewardbench2", "-o", str(tmp_path / "rb2.jsonl"))
    assert refused.exit_code == 1 and "holds preference pairs, not RewardBench 2 rows" in refused.output


# --- a dataset's identity where results are kept and reused --------------------------------


def _scorable_dataset(hub: Path) -> None:
    from tests.helpers.evaluation import words

    rows = [
        {"prompt": words(1, 2), "chosen": words(3, i + 4), "rejected": words(5, i + 6), "id": i}
        for i in range(3)
    ]
    files = {"data/test-00000-of-00001.parquet": parquet_bytes(rows)}
    cache_model(hub, "org/scored", files, C1, ("main",), kind="datasets")
    other = {"data/test-00000-of-00001.parquet": parquet_bytes(rows[:2])}
    cache_model(hub, "org/scored", other, C2, ("dev",), kind="datasets")


def test_eval_records_the_dataset_and_matches_its_local_copy(hub: Path, tmp_path: Path) -> None:
    from lazymerge.evaluation.run import evaluate_pairs
    from tests.helpers.evaluation import reward_model

    _scorable_dataset(hub)
    rm = reward_model(tmp_path)
    cached = evaluate_pairs(rm, "org/scored:test").to_dict()
    data = cached["data"]
    assert data["hub_id"] == "org/scored" and data["commit"] == C1 and data["split"] == "test"
    local = tmp_path / "local.jsonl"
    pairs, _ = load_pairs("org/scored:test")
    write_jsonl(
        local, [{"id": p.id, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    )
    assert evaluate_pairs(rm, local)["pairs"] == cached["pairs"]


def test_the_sweep_identity_follows_the_dataset_revision(hub: Path, tmp_path: Path) -> None:
    from lazymerge.evaluation.sweep import build_spec, fingerprint
    from tests.helpers.evaluation import models

    _scorable_dataset(hub)
    rm, sft = models(tmp_path)
    main = fingerprint(build_spec([rm, sft], tmp_path / "s", alpha="0.5", pair_files=["org/scored:test"]))
    dev = fingerprint(build_spec([rm, sft], tmp_path / "s", alpha="0.5", pair_files=["org/scored@dev:test"]))
    assert main["pairs"] != dev["pairs"]
    assert main["pairs"][0].endswith(resolve_data("org/scored:test").sha256()[:32])


# --- one JSON parser for data rows, JSON lists and model-folder files ------------------------

#: (id, one malformed JSON value as bytes, the message every reader gives after the place it names)
MALFORMED_JSON: list[tuple[str, bytes, str]] = [
    ("not-utf8", b'{"prompt": "\xff"}', "not valid UTF-8 (byte "),
    ("not-json", b"{prompt", "not valid JSON (Expecting property name enclosed in double quotes"),
    ("deep", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nests too deeply"),
    ("repeated-key", b'{"prompt": "a", "prompt": "b"}', 'key "prompt" appears twice in one object'),
]


@pytest.mark.parametrize("name,raw,fragment", MALFORMED_JSON, ids=[m[0] for m in MALFORMED_JSON])
def test_rows_lists_and_configs_refuse_bad_json_alike(
    tmp_path: Path, name: str, raw: bytes, fragment: str
) -> None:
    from lazymerge.errors import ConfigFileError
    from lazymerge.io.hf_folder import read_config

    lines = tmp_path / "pairs.jsonl"
    lines.write_bytes(json.dumps(IMPLICIT_TEXT[0]).encode() + b"\n" + raw + b"\n")
    listed = tmp_path / "pairs.json"
    listed.write_bytes(b"[" + raw + b"]")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(raw)
    refusals: list[tuple[str, Any]] = [
        (f"{lines}:2: ", lambda: load_pairs(lines)),
        (f"{listed}: ", lambda: load_pairs(listed)),
        (f"{folder / 'config.json'}: ", lambda: read_config(folder)),
    ]
    for where, read in refusals:
        with pytest.raises((PairFileError, ConfigFileError)) as info:
            read()
        message = str(info.value)
        assert message.startswith(where + fragment), message
        assert "\n" not in message and len(message) < 400
