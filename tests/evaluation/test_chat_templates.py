"""--chat-template: the built-in templates render the published formats, a template overrides or
supplies the tokenizer's, FILE templates are checked and sandboxed, and sweeps record them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lazymerge.errors import InputError
from lazymerge.evaluation.chat_templates import load_chat_template

transformers = pytest.importorskip("transformers")

from lazymerge.evaluation.rewards import load_reward_model  # noqa: E402
from tests.helpers.evaluation import reward_model, words, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lazymerge", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_llama2_override_matches_published_format(tmp_path: Path) -> None:
    folder = reward_model(tmp_path)  # its tokenizer has its own template
    rm = load_reward_model(folder, system_prompt="w9", chat_template=load_chat_template("llama2", True))
    text = rm.format_text("w5", "w6")
    # Llama-2 chat: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s>
    assert text == "<s>[INST] <<SYS>>\nw9\n<</SYS>>\n\nw5 [/INST] w6 </s>"
    # encoded as the tokenizer encodes that text (bos_token is the tokenizer's own "<s>")
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    assert rm.encode(text) == tok(text)["input_ids"] and rm.encode(text)[0] == tok.bos_token_id
    own = load_reward_model(folder, system_prompt="w9")
    assert own.format_text("w5", "w6") == "<s> w9 w1 w5 w2 w6 </s>"  # the tokenizer's template
    two_turns = load_chat_template("llama2")
    rendered = tok.apply_chat_template(
        [
            {"role": "user", "content": " a "},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ],
        tokenize=False,
        chat_template=two_turns.text,
    )
    assert rendered == "<s>[INST] a [/INST] b </s><s>[INST] c [/INST] d </s>"


def test_tokenizer_without_template_gets_chatml(tmp_path: Path) -> None:
    folder = reward_model(tmp_path, template=False)
    plain = load_reward_model(folder)
    assert plain.format_text("w5", "w6") == "User: w5\n\nAssistant: w6</s>"
    rm = load_reward_model(folder, chat_template=load_chat_template("chatml"))
    assert (
        rm.format_text("w5", "w6") == "<|im_start|>user\nw5<|im_end|>\n<|im_start|>assistant\nw6<|im_end|>\n"
    )


def test_file_template_in_eval_and_bon_recorded_with_sha256(tmp_path: Path) -> None:
    folder = reward_model(tmp_path, template=False)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}{{ eos_token }}")
    rm = load_reward_model(folder, chat_template=load_chat_template(str(template)))
    assert rm.format_text("w5", "w6") == "w5 w6 </s>"
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": words(3), "chosen": words(4), "rejected": words(5)}]
    )
    out = tmp_path / "r.json"
    proc = cli(
        "eval", str(folder), "--pairs", str(pairs), "--chat-template", str(template), "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    digest = hashlib.sha256(template.read_bytes()).hexdigest()
    assert json.loads(out.read_text())["settings"]["chat_template"] == f"{template} (sha256 {digest})"
    cands = write_jsonl(
        tmp_path / "c.jsonl", [{"prompt": "w3", "candidates": [words(4), words(5)], "correct": [True, False]}]
    )
    out = tmp_path / "b.json"
    proc = cli(
        "bon",
        str(folder),
        "--candidates",
        str(cands),
        "--n",
        "2",
        "--chat-template",
        "chatml",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    settings = json.loads(out.read_text())["settings"]  # bon records what it scored with, as eval does
    assert settings["chat_template"].startswith("chatml (sha256 ") and settings["dtype"] == "float32"


SANDBOX_ESCAPES = [
    # refused when read (underscore attributes)
    ("{{ cycler.__init__.__globals__ }}", "reads '__globals__'"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "reads '__subclasses__'"),
    ("{{ messages|attr('__class__') }}", "reads '__class__'"),
    ("{{ joiner['__init__'] }}", "reads '__init__'"),
    # names built at run time get past the reading; transformers' sandbox refuses them
    ("{% set n = '__cl' ~ 'ass__' %}{{ (messages|attr(n)).mro() }}", "SecurityError"),
]


@pytest.mark.parametrize("source,fragment", SANDBOX_ESCAPES)
def test_sandbox_escape_refused_before_anything_runs(tmp_path: Path, source: str, fragment: str) -> None:
    template = tmp_path / "evil.jinja"
    template.write_text(source)
    with pytest.raises(InputError, match=str(template)):
        load_chat_template(str(template))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "w3", "chosen": "w4", "rejected": "w5"}])
    out = tmp_path / "r.json"
    # the model folder does not exist: the template is refused before any model would be read
    proc = cli(
        "eval",
        str(tmp_path / "no-model"),
        "--pairs",
        str(pairs),
        "--chat-template",
        str(template),
        "--out",
        str(out),
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {template}") and fragment in lines[0]
    assert not out.exists()


def test_missing_malformed_and_bad_choice(tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "w3", "chosen": "w4", "rejected": "w5"}])
    model = str(tmp_path / "no-model")
    missing = tmp_path / "missing.jinja"
    proc = cli("eval", model, "--pairs", str(pairs), "--chat-template", str(missing))
    assert (
        proc.returncode == 1
        and proc.stderr.strip() == f"Error: {missing}: cannot open (No such file or directory)"
    )
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }}")
    proc = cli("eval", model, "--pairs", str(pairs), "--chat-template", str(broken))
    assert proc.returncode == 1 and proc.stderr.startswith(
        f"Error: {broken}: not a valid Jinja template (line 1"
    )
    assert len(proc.stderr.strip().splitlines()) == 1
    failing = tmp_path / "failing.jinja"
    failing.write_text("{{ raise_exception('no system messages') if messages[0]['role'] == 'system' }}x")
    assert load_chat_template(str(failing)).name == str(failing)
    with pytest.raises(InputError, match="no system messages"):
        load_chat_template(str(failing), with_system=True)
    huge = tmp_path / "huge.jinja"
    huge.write_bytes(b" " * (2 << 20))
    with pytest.raises(InputError, match="limit"):
        load_chat_template(str(huge))
    for command in (["eval", model, "--pairs", str(pairs)], ["bon", model, "--candidates", str(pairs)]):
        proc = cli(*command, "--chat-template", "mistral")
        assert proc.returncode == 2 and "choose llama2, chatml or a FILE.jinja" in proc.stderr


def test_sweep_resumed_with_another_template_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tests.helpers.evaluation import data, models

    rm, sft = models(tmp_path)
    files = data(tmp_path)
    out = tmp_path / "s"
    args = ["sweep", str(rm), str(sft), "--pairs", str(files["test"]), "--alpha", "0,1", "-o", str(out), "-q"]
    assert cli(*args, "--chat-template", "chatml").returncode == 0
    assert cli(*args, "--chat-template", "chatml").returncode == 0  # same sweep: resumes
    for other in (["--chat-template", "llama2"], []):
        proc = cli(*args, *other)
        assert proc.returncode == 2 and 'scoring.chat_template ("chatml (sha256' in proc.stderr, proc.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["scoring"]["chat_template"].startswith("chatml (sha256 ")
