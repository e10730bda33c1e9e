"""Model cards as a hostile user would make them (issue 19, part 8): input, output and tensor
names that carry markdown, raw HTML or line breaks, and local paths a published card must not
show (absolute paths, snapshot folders of the Hugging Face cache).

Every card, whatever its inputs, must keep its shape: front matter the Hub reads, exactly the
headings lazymerge writes, no raw HTML, no line added by a name, no local absolute path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save, save_file

from lazymerge.merge.api import prepare

RM_CONFIG = {"architectures": ["LlamaForSequenceClassification"], "model_type": "llama", "hidden_size": 2}
LM_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2}


def tensors(seed: int, head: str | None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(4, 2, generator=g), "model.norm.weight": torch.randn(2)}
    if head is not None:
        out[head] = torch.randn(1 if head.startswith("score") else 4, 2, generator=g)
    return out


def model_folder(folder: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def reward_pair(
    root: Path, rm_name: str = "rm", sft_name: str = "sft", head: str = "score.weight"
) -> list[Path]:
    """A reward model and a domain model whose lm_head the merge drops."""
    rm = model_folder(root / rm_name, RM_CONFIG, tensors(1, head))
    sft = model_folder(root / sft_name, LM_CONFIG, tensors(2, "lm_head.weight"))
    return [rm, sft]


def cached_model(cache: Path, repo_id: str, files: dict[str, bytes], commit: str) -> Path:
    """A Hugging Face cache snapshot: blobs by content hash, the snapshot's files symlinks to them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


COMMIT = "3" * 40


def hub_pair(root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    cache = root / "home" / "alice" / "hf-cache"
    cached_model(
        cache,
        "org/rm",
        {
            "model.safetensors": save(tensors(1, "score.weight")),
            "config.json": json.dumps(RM_CONFIG).encode(),
        },
        COMMIT,
    )
    cached_model(
        cache,
        "org/sft",
        {
            "model.safetensors": save(tensors(2, "lm_head.weight")),
            "config.json": json.dumps(LM_CONFIG).encode(),
        },
        COMMIT,
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return ["org/rm", "org/sft"]


def plain_files(root: Path, names: tuple[str, str]) -> list[Path]:
    paths = []
    for seed, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors(seed, None), str(path))
        paths.append(path)
    return paths


def with_base(root: Path) -> tuple[list, str, dict]:
    """Inputs in one folder outside the working folder, the base model in another; the base
    holds a tensor the inputs lack, which the card lists as dropped."""
    a, b = plain_files(root / "home" / "alice", ("a.safetensors", "b.safetensors"))
    base = root / "second" / "base.safetensors"
    base.parent.mkdir()
    save_file({**tensors(3, None), "extra.<b>x</b>": torch.zeros(1)}, str(base))
    return [a, b], "out", {"method": "task_arithmetic", "base": base}


Setup = Callable[[Path, pytest.MonkeyPatch], tuple[list, str, dict]]

#: (case, setup(root, monkeypatch) -> (inputs, output, merge options), fragments the card must
#: hold, fragments it must not; raw HTML is looked for by `check_shape`, outside the front
#: matter, where a name is a quoted YAML string, and the command's code block). The working folder is `root / "work"`; inputs outside it are
#: named by base name, inputs inside it relative to it.
CASES: list[tuple[str, Setup, list[str], list[str]]] = [
    (
        "newline-and-heading-in-input-name",
        lambda r, m: (reward_pair(r / "work", rm_name="rm\n## Pwned"), "out", {}),
        ["rm\\\\n## Pwned: reward model"],
        [],
    ),
    (
        "raw-html-in-input-name",
        lambda r, m: (reward_pair(r / "work", sft_name="<img src=x onerror=alert(1)>"), "out", {}),
        ["&lt;img src=x onerror=alert(1)&gt;: domain model"],
        [],
    ),
    (
        "markdown-link-in-input-name",
        lambda r, m: (reward_pair(r / "work", sft_name="[click](http:evil)"), "out", {}),
        ["\\[click\\](http\\:evil): domain model"],
        ["- [click]("],
    ),
    (
        "list-marker-starting-an-input-name",
        lambda r, m: (reward_pair(r / "work", sft_name="- [x] done"), "out", {}),
        ["\\- \\[x\\] done: domain model"],
        ["- - [x]"],
    ),
    (
        "backticks-in-input-name",
        lambda r, m: (reward_pair(r / "work", sft_name="a`b```c"), "out", {}),
        ["a\\`b\\`\\`\\`c: domain model", "````sh\n"],
        ["`a`b"],
    ),
    (
        "heading-in-output-name",
        lambda r, m: (reward_pair(r / "work"), "# <b>out", {}),
        ["# \\# &lt;b&gt;out\n"],
        [],
    ),
    (
        "html-in-reward-head-name",
        lambda r, m: (reward_pair(r / "work", head="score.<i>w</i>"), "out", {}),
        ["Kept: score.&lt;i&gt;w&lt;/i&gt; (reward head"],
        [],
    ),
    (
        "absolute-paths-outside-the-working-folder",
        lambda r, m: (reward_pair(r / "home" / "alice" / "models"), "out", {}),
        ['- "rm"\n- "sft"', "`rm`: reward model", "lm_head.weight of sft (language-model head)"],
        ["alice"],
    ),
    (
        "absolute-paths-inside-the-working-folder",
        lambda r, m: ([str(p.resolve()) for p in reward_pair(r / "work" / "models")], "out", {}),
        ["`models/rm`: reward model", "lm_head.weight of models/sft (language-model head)"],
        ["/work/models"],
    ),
    (
        "relative-paths-above-the-working-folder",
        lambda r, m: (["../home/alice/rm", "../home/alice/sft"], "out", {"_make": reward_pair}),
        ["`rm`: reward model", "lazymerge run rm sft"],
        ["alice", "../"],
    ),
    (
        "hub-snapshot-path-in-dropped-line",
        lambda r, m: (hub_pair(r, m), "out", {}),
        ["lm_head.weight of org/sft (language-model head)", f"org/rm@{COMMIT}"],
        ["alice", "snapshots", "models--"],
    ),
    (
        "autolinks-and-math-in-input-name",
        lambda r, m: (
            reward_pair(r / "work", sft_name="sft www.evil.example(1) https:x.com(a) $x^2$"),
            "out",
            {},
        ),
        ["sft www\\.evil.example(1) https\\:x\\.com(a) \\$x^2\\$: domain model"],
        ["sft www.evil.example(1) https:x.com(a) $x^2$: domain model"],
    ),
    (
        "url-and-address-in-input-name",
        lambda r, m: (
            reward_pair(r / "work", sft_name="a http:\u2044\u2044b (mail me@evil.org)"),
            "out",
            {},
        ),
        ["a http:\u2044\u2044b (mail me\\@evil\\.org): domain model"],
        ["(mail me@evil.org): domain model"],
    ),
    (
        "undecodable-bytes-in-input-name",
        lambda r, m: (reward_pair(r / "work", sft_name=os.fsdecode(b"sft\xff\xfe")), "out", {}),
        ["sft\\\\xff\\\\xfe: domain model", '- "sft\\\\xff\\\\xfe"', "lazymerge run rm 'sft\\xff\\xfe'"],
        ["\\udcff"],
    ),
    (
        "undecodable-bytes-in-output-name",
        lambda r, m: (reward_pair(r / "work"), os.fsdecode(b"out\xff"), {}),
        ["# out\\\\xff\n", "-o 'out\\xff'"],
        ["\\udcff"],
    ),
    (
        "base-model-path-and-tensor-name-in-dropped-line",
        lambda r, m: with_base(r),
        [
            "extra.&lt;b&gt;x&lt;/b&gt; of base.safetensors (base model, not averaged)",
            "--base base.safetensors",
        ],
        ["alice", "second"],
    ),
]


def card_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setup: Setup) -> str:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    inputs, output, options = setup(tmp_path, monkeypatch)
    make = options.pop("_make", None)
    if make is not None:
        make(tmp_path / "home" / "alice")
    checkpoints, plan = prepare(inputs, output, **options)
    for ckpt in checkpoints:
        ckpt.close()
    return plan.variant_files[0]["README.md"].decode()


def check_shape(card: str, root: Path) -> None:
    """What holds for every card: the Hub reads its front matter, its headings are lazymerge's,
    it has no raw HTML and no local absolute path."""
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:300]
    front = yaml.safe_load(match.group(1))
    assert front["tags"] == ["merge", "lazymerge"] and all(isinstance(n, str) for n in front["base_model"])
    body = card[match.end() :]
    fence = re.search(r"^(`{3,})sh\n(.*?)\n\1$", body, re.M | re.S)
    assert fence, body
    prose = body[: fence.start()] + body[fence.end() :]
    headings = [line for line in prose.splitlines() if line.startswith("#")]
    assert len(headings) == 4 and headings[1:] == ["## Recipe", "## Provenance", "## Reproduce"], headings
    assert "<" not in prose.replace("<!--", "", 1), prose  # (the card's mark is an HTML comment)
    assert str(root) not in card and str(root.resolve()) not in card


@pytest.mark.parametrize("case,setup,present,absent", CASES, ids=[c[0] for c in CASES])
def test_hostile_card(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    setup: Setup,
    present: list[str],
    absent: list[str],
) -> None:
    card = card_of(tmp_path, monkeypatch, setup)
    for fragment in present:
        assert fragment in card, (fragment, card)
    for fragment in absent:
        assert fragment not in card, (fragment, card)
    check_shape(card, tmp_path)


def test_reproduce_command_still_runs_from_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths keep the card's command runnable where the merge ran."""
    card = card_of(
        tmp_path, monkeypatch, lambda r, m: ([str(p) for p in reward_pair(r / "work" / "models")], "out", {})
    )
    command = re.search(r"```sh\n(.*)\n```", card)
    assert command, card
    args = shlex.split(command.group(1))
    assert args[2:6] == ["models/rm", "models/sft", "-o", "out"]
    assert all(Path(p).exists() for p in args[2:4])
    assert "base names" not in card  # nothing was shortened


#: (text, md_text, md_code): the escaping itself.
ESCAPES = [
    ("lm_head.weight", "lm_head.weight", "`lm_head.weight`"),
    ("_em_", "\\_em\\_", "`_em_`"),
    ("*b* <i>", "\\*b\\* &lt;i&gt;", "\\*b\\* &lt;i&gt;"),
    ("a\r\nb", "a\\\\r\\\\nb", "a\\\\r\\\\nb"),
    ("1. item", "1\\. item", "`1. item`"),
    ("> quote", "&gt; quote", "&gt; quote"),
    ("&lt;", "&amp;lt;", "&amp;lt;"),
    ("    code", "&#32;&#32;&#32;&#32;code", "&#32;&#32;&#32;&#32;code"),
    # the Hub's math and autolinks: one character of each escaped, so nothing renders
    ("$x^2$", "\\$x^2\\$", "\\$x^2\\$"),
    ("see https://evil.example/x", "see https\\:\\//evil.example/x", "`see https://evil.example/x`"),
    ("www.evil.example(1)", "www\\.evil.example(1)", "www\\.evil.example(1)"),
    ("WWW.Evil.Example", "WWW\\.Evil.Example", "`WWW.Evil.Example`"),
    ("https:x.com(a)", "https\\:x\\.com(a)", "https\\:x\\.com(a)"),
    ("mailto:a", "mailto\\:a", "`mailto:a`"),
    ("a@b.example", "a\\@b.example", "`a@b.example`"),
    ("evil.COM and x.io", "evil\\.COM and x\\.io", "`evil.COM and x.io`"),
    (
        "lm_head.weight: 0..3 of base.safetensors",
        "lm_head.weight: 0..3 of base.safetensors",
        "`lm_head.weight: 0..3 of base.safetensors`",
    ),
    ("org/rm@3333", "org/rm@3333", "`org/rm@3333`"),
    # names that are not UTF-8 text: undecodable bytes as \\xNN, other lone surrogates as \\udXXX
    ("sft\udcff", "sft\\\\xff", "sft\\\\xff"),
    ("w\ud800", "w\\\\ud800", "w\\\\ud800"),
]


@pytest.mark.parametrize("text,as_text,as_code", ESCAPES, ids=[repr(e[0]) for e in ESCAPES])
def test_escapes(text: str, as_text: str, as_code: str) -> None:
    from lazymerge.merge.card import md_code, md_text  # (imported here: each case fails alone without them)

    assert md_text(text) == as_text
    assert md_code(text) == as_code


def test_a_folder_name_that_is_not_utf8_is_escaped_in_the_card(tmp_path: Path) -> None:
    """An input folder named with byte 0xFF: the card is still UTF-8 (UnicodeEncodeError before)."""
    import shutil
    import subprocess
    import sys

    from tests.helpers.models import BASE_WORDS, make_tokenizer, save_model

    rm = save_model(tmp_path / "rm", "llama", True, 1, make_tokenizer(BASE_WORDS))
    sft = save_model(tmp_path / "sft", "llama", False, 2, make_tokenizer(BASE_WORDS))
    odd = os.fsencode(str(tmp_path)) + b"/sft\xff"
    shutil.move(str(sft), odd.decode("utf-8", "surrogateescape"))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lazymerge", "run", str(rm), odd, "--alpha", "0.5", "-o", str(out), "-q"],
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr
    card = (out / "README.md").read_bytes().decode("utf-8")  # valid UTF-8
    assert "sft\\xff" in card or "sft\\udcff" in card


def test_run_with_an_undecodable_folder_name_writes_a_utf8_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lazymerge run rm sft<0xFF>` ended in "unexpected UnicodeEncodeError" writing the card."""
    from click.testing import CliRunner

    from lazymerge.cli import main

    monkeypatch.chdir(tmp_path)
    rm, sft = reward_pair(tmp_path, sft_name=os.fsdecode(b"sft\xff"))
    result = CliRunner().invoke(main, ["run", "rm", os.fsdecode(b"sft\xff"), "-o", "out", "-q"])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_bytes().decode("utf-8")  # (strict: valid UTF-8)
    assert "sft\\\\xff: domain model" in card and "lazymerge run rm 'sft\\xff'" in card
    check_shape(card, tmp_path)
