"""A result never belongs to other inputs: a resumed sweep refuses (or, with --rehash, proves
unchanged) inputs whose weights or companion files changed; results.jsonl is untrusted input,
checked line by line; paths are made absolute where they enter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lazymerge.errors import InputError, OptionError, OutputError
from lazymerge.evaluation.sweep import build_spec, read_results, run_sweep
from lazymerge.provenance import compare_inputs, identify_input
from tests.helpers.models import BASE_WORDS, make_tokenizer, save_model

pytest.importorskip("matplotlib")

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}w1 {{ m['content'] }} w2 "
    "{% else %}{{ m['content'] }} </s>{% endif %}{% endfor %}"
)


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def make_rm(folder: Path, seed: int) -> Path:
    tok = make_tokenizer(BASE_WORDS)
    tok.chat_template = TEMPLATE
    save_model(folder, "llama", True, seed, tok)
    special = folder / "special_tokens_map.json"
    if not special.exists():  # transformers 5 no longer writes it; many published models have one
        special.write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder


def make_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    rm = make_rm(tmp_path / "rm", 1)
    sft = save_model(tmp_path / "sft", "llama", False, 2, make_tokenizer(BASE_WORDS))
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": words(3, i + 4), "chosen": words(10 + i, 20), "rejected": words(30 - i), "id": f"p{i}"}
        for i in range(6)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rm, sft, pairs


def sweep(rm: Path, sft: Path, pairs: Path, out: Path, **kw):
    spec = build_spec([rm, sft], out, alpha="0,1", pair_files=[pairs], **kw)
    return run_sweep(spec)


@pytest.fixture
def swept(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    rm, sft, pairs = make_inputs(tmp_path)
    out = tmp_path / "s"
    run = sweep(rm, sft, pairs, out)
    assert run.scored == ["alpha=0", "alpha=1"]
    return rm, sft, pairs, out


def retrain(rm: Path) -> None:
    make_rm(rm, 99)  # same shapes, new weights, saved in place


def edit(name: str, change):
    def apply(rm: Path) -> None:
        path = rm / name
        change(path)

    return apply


def _copy_in_place(path: Path) -> None:
    copy = path.with_name("copy")
    copy.write_bytes(path.read_bytes())
    st = path.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` would: only the inode differs
    os.replace(copy, path)


def _json_edit(key: str, value):
    def change(path: Path) -> None:
        doc = json.loads(path.read_text()) if path.exists() else {}
        doc[key] = value
        path.write_text(json.dumps(doc))

    return change


CHANGES = [
    ("retrained weights", retrain, "model.safetensors changed"),
    (
        "chat_template.jinja edited",
        edit("chat_template.jinja", lambda p: p.write_text("{{ messages[0]['content'] }}")),
        "chat_template.jinja changed",
    ),
    (
        "special tokens map",
        edit("special_tokens_map.json", _json_edit("eos_token", "w5")),
        "special_tokens_map.json",
    ),
    (
        "tokenizer.json",
        edit("tokenizer.json", lambda p: p.write_text(p.read_text().replace('"w7"', '"w7x"'))),
        "tokenizer.json changed",
    ),
    (
        "tokenizer_config.json",
        edit("tokenizer_config.json", _json_edit("chat_template", "{{ 'x' }}")),
        "tokenizer_config.json changed",
    ),
    ("config.json", edit("config.json", _json_edit("pad_token_id", 0)), "config.json changed"),
    (
        "generation_config.json added",
        edit("generation_config.json", _json_edit("x", 1)),
        "generation_config.json appeared",
    ),
    (
        "companion removed",
        edit("special_tokens_map.json", lambda p: p.unlink()),
        "special_tokens_map.json was removed",
    ),
    ("weights touched", edit("model.safetensors", lambda p: os.utime(p, ns=(1, 1))), "mtime"),
    ("weights copied (new inode)", edit("model.safetensors", lambda p: _copy_in_place(p)), "inode"),
]


@pytest.mark.parametrize("what,change,fragment", CHANGES, ids=[c[0] for c in CHANGES])
def test_resumed_sweep_refuses_changed_inputs(swept, what, change, fragment) -> None:
    rm, sft, pairs, out = swept
    change(rm)
    with pytest.raises(OptionError, match="other inputs") as err:
        sweep(rm, sft, pairs, out)
    assert fragment in str(err.value) and "--restart" in str(err.value)
    _, done, _ = read_results(out / "results.jsonl")
    assert len(done) == 2  # nothing was discarded by the refusal


def test_retrained_model_rescored_with_restart_gives_its_own_rewards(swept) -> None:
    rm, sft, pairs, out = swept
    _, stale, _ = read_results(out / "results.jsonl")
    retrain(rm)
    run = sweep(rm, sft, pairs, out, restart=True)
    assert run.scored == ["alpha=0", "alpha=1"]
    _, fresh, _ = read_results(out / "results.jsonl")
    assert fresh["alpha=0"]["pairs"] != stale["alpha=0"]["pairs"]
    assert sweep(rm, sft, pairs, out).scored == []  # and it resumes as its own


def test_rehash_proves_touched_weights_unchanged(tmp_path: Path) -> None:
    rm, sft, pairs = make_inputs(tmp_path)
    out = tmp_path / "s"
    sweep(rm, sft, pairs, out, rehash=True)  # records every weights file's SHA-256
    os.utime(rm / "model.safetensors", ns=(5, 5))
    with pytest.raises(OptionError, match="mtime"):
        sweep(rm, sft, pairs, out)
    assert sweep(rm, sft, pairs, out, rehash=True).scored == []  # same bytes: resumed
    assert sweep(rm, sft, pairs, out).scored == []  # the new stat was recorded
    retrain(rm)
    with pytest.raises(OptionError, match="holds other data"):
        sweep(rm, sft, pairs, out, rehash=True)


def test_rehash_cannot_prove_what_was_never_hashed(swept) -> None:
    rm, sft, pairs, out = swept
    os.utime(rm / "model.safetensors", ns=(5, 5))
    with pytest.raises(OptionError, match="not hashed when these results began"):
        sweep(rm, sft, pairs, out, rehash=True)


def test_results_file_without_identity_is_refused(swept) -> None:
    rm, sft, pairs, out = swept
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    header = json.loads(lines[0])
    del header["identity"]  # as lazymerge 0.x wrote it
    results.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(OptionError, match="did not record the inputs' identity"):
        sweep(rm, sft, pairs, out)


def test_cli_refuses_retrained_model_exit_2(swept) -> None:
    rm, sft, pairs, out = swept
    retrain(rm)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lazymerge",
            "sweep",
            str(rm),
            str(sft),
            "--pairs",
            str(pairs),
            "--alpha",
            "0,1",
            "-o",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.safetensors changed" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_lazymerge_header_hash_is_a_claim_proved_only_by_rehash(tmp_path: Path) -> None:
    """A file lazymerge wrote records its data's SHA-256 in its header: a copy of it is proved the
    same data by --rehash (the bytes hashed against that record), never by the header alone."""
    from lazymerge import merge

    rm, sft, _ = make_inputs(tmp_path)
    merged = tmp_path / "merged"
    merge([rm, sft], merged)
    before = identify_input(merged)
    assert all(w.sha256 for w in before.weights)
    for w in before.weights:
        data = (merged / w.name).read_bytes()
        (merged / w.name).unlink()
        (merged / w.name).write_bytes(data)
    after = identify_input(merged)
    diffs, _ = compare_inputs([before], [after], rehash=False)
    assert diffs and all("--rehash proves" in d for d in diffs)
    diffs, _ = compare_inputs([before], [after], rehash=True)
    assert diffs == []


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["new-mtime", "mtime-restored"])
def test_data_edited_under_an_unchanged_header_is_refused(tmp_path: Path, restore_mtime: bool) -> None:
    """Tensor bytes rewritten in place leave a lazymerge header's recorded hash as it was: the
    resume refuses (the stat, ctime included, changed), and --rehash finds other data."""
    from lazymerge import merge

    rm, sft, _ = make_inputs(tmp_path)
    merged = tmp_path / "merged"
    merge([rm, sft], merged)
    before = identify_input(merged)
    shard = merged / before.weights[0].name
    st = shard.stat()
    with open(shard, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x7f")
    if restore_mtime:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = identify_input(merged)
    assert after.weights[0].sha256 == before.weights[0].sha256  # the header still claims the old data
    diffs, _ = compare_inputs([before], [after], rehash=False)
    assert len(diffs) == 1 and "changed (" in diffs[0] and ("ctime" in diffs[0]), diffs
    diffs, _ = compare_inputs([before], [after], rehash=True)
    assert len(diffs) == 1 and "holds other data" in diffs[0], diffs


# --- results.jsonl as untrusted input -----------------------------------------------------


def _point(results: Path) -> dict:
    return json.loads(results.read_text().splitlines()[1])


def _with(**changes):
    def make(point: dict) -> list[str]:
        p = dict(point)
        for k, v in changes.items():
            if v is KeyError:
                p.pop(k)
            else:
                p[k] = v
        return [json.dumps(p)]

    return make


def _pairs(fn):
    def make(point: dict) -> list[str]:
        p = json.loads(json.dumps(point))
        fn(p["pairs"]["pairs"])
        return [json.dumps(p)]

    return make


BAD_LINES = [
    ("missing label", _with(label=KeyError), "label must be a string"),
    ("label a number", _with(label=7), "label must be a string"),
    ("label huge", _with(label="x" * 5000), "label must be a string"),
    ("missing weights", _with(weights=KeyError), "weights must be 2 finite numbers"),
    ("weights strings", _with(weights=["a", "b"]), "weights must be 2 finite numbers"),
    ("missing pairs", _with(pairs=KeyError), "pairs must hold pairs"),
    ("pairs a string", _with(pairs="x"), "pairs must hold pairs"),
    ("short reward list", _pairs(lambda e: e["chosen"].pop()), "6 finite rewards"),
    ("reward a string", _pairs(lambda e: e["chosen"].__setitem__(0, "1.0")), "finite rewards"),
    ("reward a bool", _pairs(lambda e: e["rejected"].__setitem__(0, True)), "finite rewards"),
    ("baseline missing", _with(baseline=KeyError), "baseline must be true or false"),
    ("timing missing", _with(build_s=KeyError), "build_s must be a finite number"),
    ("extra evaluation", _with(best_of_n={"other": {"rewards": []}}), "best_of_n must hold nothing"),
    ("NaN reward", lambda p: [json.dumps(p).replace(str(p["pairs"]["pairs"]["chosen"][0]), "NaN", 1)], "NaN"),
    (
        "Infinity reward",
        lambda p: [json.dumps(p).replace(str(p["pairs"]["pairs"]["chosen"][0]), "-Infinity", 1)],
        "Infinity",
    ),
    ("deep nesting", lambda p: ["[" * 100000 + "]" * 100000], "nested too deeply"),
    ("a million empty lists", lambda p: ["[" + "[]," * 1_000_001 + "[]]"], "more than 1,000,000 lists"),
    ("not JSON", lambda p: ["{'record': 'point'"], "is not JSON"),
    ("not an object", lambda p: ["[1, 2]"], "not a lazymerge sweep record"),
    ("unknown record", lambda p: [json.dumps({"record": "spam"})], "not a lazymerge sweep record"),
    ("second header", lambda p: [json.dumps({"record": "sweep", "fingerprint": {}})], "a second header"),
    ("duplicate point", lambda p: [json.dumps(p)], "recorded twice (first on line 2)"),
    (
        "duplicate with other rewards",
        lambda p: [json.dumps({**p, "pairs": {"pairs": {"chosen": [0.0] * 6, "rejected": [1.0] * 6}}})],
        "recorded twice",
    ),
    (
        "identity not a list",
        lambda p: [json.dumps({"record": "identity", "identity": "x"})],
        "identity must be a list",
    ),
    (
        "identity malformed",
        lambda p: [json.dumps({"record": "identity", "identity": [{"path": 1}]})],
        "line 4: malformed input identity",
    ),
    (
        "weights not the label's",
        _with(weights=[-5.0, 6.0]),
        "but this sweep's point alpha=0 has weights [1.0, 0.0]",
    ),
    ("another point's weights", _with(weights=[0.0, 1.0]), "but this sweep's point alpha=0 has weights"),
    ("baseline flag flipped", _with(baseline=False), "(baseline False), but this sweep's point"),
    ("a 401-digit weight", _with(weights=[10**400, 0]), "an integer of 401 digits"),
    ("a 401-digit build time", _with(build_s=10**400), "an integer of 401 digits"),
    ("a 401-digit reward", _pairs(lambda e: e["chosen"].__setitem__(0, 10**400)), "an integer of 401 digits"),
]


@pytest.mark.parametrize("what,make,fragment", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_hostile_results_lines_are_refused_naming_file_and_line(swept, what, make, fragment) -> None:
    rm, sft, pairs, out = swept
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    extra = make(_point(results))
    replace = not what.startswith(("duplicate", "second header", "identity"))
    body = [lines[0], *extra, *lines[2:]] if replace else [*lines, *extra]
    results.write_text("\n".join(body) + "\n")
    with pytest.raises(InputError) as err:
        sweep(rm, sft, pairs, out)
    message = str(err.value)
    assert str(results) in message and "line " in message and fragment in message, message
    assert len(message) < 600 and "\n" not in message


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_results_file_linked_from_another_sweep_is_refused(tmp_path: Path, link: str) -> None:
    """Two sweep folders sharing one results.jsonl through a link would append under two locks."""
    rm, sft, pairs = make_inputs(tmp_path)
    sweep(rm, sft, pairs, tmp_path / "a")
    other = tmp_path / "b"
    other.mkdir()
    target = tmp_path / "a" / "results.jsonl"
    if link == "symlink":
        (other / "results.jsonl").symlink_to(target)
    else:
        os.link(target, other / "results.jsonl")
    before = target.read_bytes()
    for folder in (other, tmp_path / "a"):
        with pytest.raises(OutputError) as err:
            sweep(rm, sft, pairs, folder)
        assert "results.jsonl: is a " in str(err.value) and "link" in str(err.value)
        if link == "symlink":
            break  # the target itself is a plain file with one name: sweep a resumes as it should
    assert target.read_bytes() == before


def test_header_differences_never_repeat_huge_values(swept) -> None:
    rm, sft, pairs, out = swept
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    header = json.loads(lines[0])
    header["fingerprint"]["merge"]["method"] = "x" * 1_000_000
    header["fingerprint"]["scoring"]["device"] = [[["deep"]]] * 10000
    results.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(OptionError) as err:
        sweep(rm, sft, pairs, out)
    assert len(str(err.value)) < 800 and "(1000000 characters)" in str(err.value)


# --- paths resolved once ------------------------------------------------------------------


def test_paths_are_absolute_where_they_enter(tmp_path: Path, monkeypatch) -> None:
    from lazymerge.evaluation.ray_sweep import file_fingerprints

    rm, sft, pairs = make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    spec = build_spec([Path("rm"), Path("sft")], Path("s"), alpha="0,1", pair_files=[Path("pairs.jsonl")])
    assert all(p.is_absolute() for p in (*spec.inputs, spec.out, *(e.path for e in spec.pair_evals)))
    here = file_fingerprints(spec)
    monkeypatch.chdir("/")  # a Ray worker runs in another folder: it must see the same files
    assert file_fingerprints(spec) == here
    assert all(v is not None for v in here.values())


def test_eval_report_records_the_inputs_identity(tmp_path: Path) -> None:
    from lazymerge.evaluation.run import evaluate_pairs

    rm, _, pairs = make_inputs(tmp_path)
    first = evaluate_pairs(rm, pairs)
    assert first["identity"][0]["companions"]["tokenizer.json"]
    assert first["data"]["sha256"] and first["data"]["path"] == str(pairs)
    (rm / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    second = evaluate_pairs(rm, pairs)
    assert "chat_template.jinja" in second["identity"][0]["companions"]
    assert json.loads(json.dumps(first, allow_nan=False)) == first


# --- the same record in what a merge writes: header metadata and the model card ---------------


def test_merged_output_records_its_inputs_identity(tmp_path: Path, monkeypatch) -> None:
    """Every shard's header metadata carries each input's published identity (read back with
    safetensors' own reader, equal to `identify_input`'s record); a merge of a lazymerge output
    records that output's data SHA-256; the card shows the same digests and no local path."""
    from safetensors import safe_open

    from lazymerge.merge.api import merge
    from lazymerge.merge.plan import PROVENANCE_KEY
    from lazymerge.options import MergeOptions

    monkeypatch.chdir(tmp_path)
    rm, sft, _ = make_inputs(tmp_path)
    first = tmp_path / "first"
    merge([rm, sft], first, MergeOptions(alphas=(0.5,)))
    again = tmp_path / "again"
    merge([first, sft], again, MergeOptions(alphas=(0.25,), shard_size=40_000))
    shards = sorted(again.glob("*.safetensors"))
    assert len(shards) > 1
    records = set()
    for shard in shards:
        with safe_open(str(shard), "pt") as fh:
            records.add(fh.metadata()[PROVENANCE_KEY])
    assert len(records) == 1  # one record, in every shard
    recorded = json.loads(records.pop())
    want = [identify_input(first).published("first"), identify_input(sft).published("sft")]
    assert recorded == json.loads(json.dumps(want))
    sha = recorded[0]["weights"][0][2]
    assert isinstance(sha, str) and len(sha) == 64  # first's own header records its data hash
    assert recorded[1]["weights"][0][2] is None  # sft's file (written by transformers) does not
    card = (again / "README.md").read_text()
    assert f"`{sha}`" in card and f"`{recorded[1]['tensors']}`" in card
    assert str(tmp_path) not in card and str(tmp_path) not in json.dumps(recorded)


def test_card_provenance_changes_with_a_companion_file(tmp_path: Path, monkeypatch) -> None:
    from lazymerge.merge.api import merge
    from lazymerge.options import MergeOptions

    monkeypatch.chdir(tmp_path)
    rm, sft, _ = make_inputs(tmp_path)

    def provenance(out: Path) -> str:
        merge([rm, sft], out, MergeOptions(alphas=(0.5,)))
        card = (out / "README.md").read_text()
        return card[card.index("## Provenance") : card.index("## Reproduce")]

    before = provenance(tmp_path / "a")
    config = json.loads((sft / "tokenizer_config.json").read_text())
    (sft / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    after = provenance(tmp_path / "b")
    changed = [a for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and changed[0].startswith("- `sft`:")
