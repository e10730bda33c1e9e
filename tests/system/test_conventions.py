"""Scores under RewardBench's and TRL's conventions: FastChat conversations, --bos, --pad-as-eos,
--truncation and --section-weights.

The references are written here from the published sources, never from lazymerge's code:
FastChat's `Conversation.get_prompt` (fschat 0.2.36, as RewardBench freezes it) for the expected
texts; transformers' own `apply_chat_template(tokenize=True)` for TRL's token ids; RewardBench's
`run_rm.py` pad rule, tokenizer truncation and its masking of the first of two leading BOS tokens,
run through transformers' forward pass; RewardBench's `calculate_scores_per_section` with its
`EXAMPLE_COUNTS` for section scores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lazymerge.errors import OptionError
from lazymerge.evaluation.fastchat_templates import CONVERSATIONS, render
from lazymerge.evaluation.sections import rewardbench_sections
from lazymerge.score_options import FASTCHAT_NAMES, ScoreOptions

ROOT = Path(__file__).resolve().parents[2]
P, R, S = "w3 w4", "w5 w6", "w7"

#: (conversation, system or None, the text FastChat's get_prompt gives for [user P, assistant R])
FASTCHAT_TEXTS = [
    ("tulu", None, "<|user|>\nw3 w4\n<|assistant|>\nw5 w6\n"),
    ("llama-2", None, "[INST] w3 w4 [/INST] w5 w6 </s><s>"),
    ("llama-2", S, "[INST] <<SYS>>\nw7\n<</SYS>>\n\nw3 w4 [/INST] w5 w6 </s><s>"),
    ("mistral", None, "[INST] w3 w4 [/INST] w5 w6</s>"),
    ("mistral", S, "[INST] w7\nw3 w4 [/INST] w5 w6</s>"),
    # chatml style: the system template filled with the empty message is "<|system|>\n", not
    # empty, so get_prompt writes it and its separator
    ("zephyr", None, "<|system|>\n</s>\n<|user|>\nw3 w4</s>\n<|assistant|>\nw5 w6</s>\n"),
    ("zephyr", S, "<|system|>\nw7</s>\n<|user|>\nw3 w4</s>\n<|assistant|>\nw5 w6</s>\n"),
    (
        "vicuna_v1.1",
        None,
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: w3 w4 ASSISTANT: w5 w6</s>",
    ),
    ("oasst_pythia", None, "<|prompter|>w3 w4<|endoftext|><|assistant|>w5 w6<|endoftext|>"),
    ("openbmb", None, "User: w3 w4\n\nAssistant: w5 w6\n\n"),
    ("Ziya", None, "\n\nHuman: w3 w4\n\nAssistant: w5 w6\n\n"),
    ("pku-align", None, "BEGINNING OF CONVERSATION: USER: w3 w4 ASSISTANT: w5 w6 "),
    ("raw", None, "w3 w4w5 w6"),
]


@pytest.mark.parametrize(("name", "system", "expected"), FASTCHAT_TEXTS)
def test_fastchat_conversation_renders_the_documented_text(
    name: str, system: str | None, expected: str
) -> None:
    assert render(CONVERSATIONS[name], [P, R], system) == expected


def test_every_offered_conversation_is_defined_and_tested() -> None:
    assert tuple(CONVERSATIONS) == FASTCHAT_NAMES
    assert {name for name, _, _ in FASTCHAT_TEXTS} == set(FASTCHAT_NAMES)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"bos": "triple"}, "--bos 'triple': choose auto, single, double"),
        ({"truncation": "middle"}, "--truncation 'middle': choose left, right"),
        ({"section_weights": "rewardbench"}, "--section-weights 'rewardbench': choose file, dataset"),
        ({"conversation": "alpaca"}, "--conversation 'alpaca': choose tulu"),
    ],
)
def test_convention_options_checked_once(kwargs: dict, fragment: str) -> None:
    with pytest.raises(OptionError, match=fragment.replace("(", r"\(")):
        ScoreOptions(**kwargs)


# --- section weights ------------------------------------------------------------------------

#: RewardBench's EXAMPLE_COUNTS and SUBSET_MAPPING (rewardbench/constants.py), copied as data.
RB_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100,
    "refusals-offensive": 100, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "xstest-should-refuse": 250, "xstest-should-respond": 154, "donotanswer": 136,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}  # fmt: skip
RB_MAPPING = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}  # fmt: skip


def rewardbench_per_section(metrics: dict[str, float]) -> dict[str, float]:
    """RewardBench's calculate_scores_per_section (without its rounding to 2 decimals of 100x)."""
    out = {}
    for section, subsets in RB_MAPPING.items():
        total = sum(RB_COUNTS[s] for s in subsets if s in metrics)
        if total:
            out[section] = sum(RB_COUNTS[s] * metrics[s] for s in subsets if s in metrics) / total
    return out


PARTIAL = {  # subset: (accuracy, pairs in the file): a file holding a few pairs of some subsets
    "mt-bench-hard": (0.5, 10),
    "llmbar-natural": (0.8, 5),
    "llmbar-adver-manual": (0.25, 4),
    "alpacaeval-easy": (1.0, 3),
    "refusals-dangerous": (0.4, 5),
    "donotanswer": (0.9, 10),
    "math-prm": (0.6, 5),
    "hep-go": (0.5, 2),
    "hep-rust": (1.0, 1),
}


def test_dataset_weights_are_rewardbench_section_scores() -> None:
    subsets = {k: {"accuracy": a, "n": n} for k, (a, n) in PARTIAL.items()}
    got = rewardbench_sections(subsets, "dataset")
    want = rewardbench_per_section({k: a for k, (a, _) in PARTIAL.items()})
    assert got is not None and set(got) == {*want, "mean"}
    for section, value in want.items():
        assert got[section] == pytest.approx(value, abs=1e-12)
    assert got["mean"] == pytest.approx(sum(want.values()) / len(want))
    # file weights: pooled pairs of the file (Chat Hard 7.5/19 correct pairs), another number
    pooled = rewardbench_sections(subsets, "file")
    assert pooled is not None
    assert pooled["Chat Hard"] == pytest.approx((5 + 4 + 1) / 19)
    assert pooled["Chat Hard"] != pytest.approx(got["Chat Hard"])
    assert pooled["Reasoning"] == pytest.approx(0.5 * 0.6 + 0.5 * (0.5 + 1.0) / 2)


# --- token ids and rewards ------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

from lazymerge.evaluation.rewards import honours_add_eos, load_reward_model  # noqa: E402
from lazymerge.evaluation.run import evaluate_pairs  # noqa: E402
from tests.helpers.models import BASE_WORDS, make_tokenizer, save_model  # noqa: E402

#: A template that writes bos_token itself, as Llama-2-chat's and Llama-3's do.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %} w1 {{ m['content'] }} w2"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)


def bos_tokenizer(template: str | None = BOS_TEMPLATE) -> transformers.PreTrainedTokenizerFast:
    """A Llama-like tokenizer whose special tokens are a BOS before every text."""
    tok = make_tokenizer(BASE_WORDS)
    tok.backend_tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BASE_WORDS.index("<s>"))]
    )
    if template is not None:
        tok.chat_template = template
    return tok


def rm_folder(tmp_path: Path, template: str | None = BOS_TEMPLATE, pad: bool = True) -> Path:
    extra = {} if pad else {"pad_token_id": None}
    return save_model(tmp_path / "rm", "llama", True, 3, bos_tokenizer(template), **extra)


def messages(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


ROWS = [  # texts of 6 to 12 tokens: a max length between them truncates some
    {
        "prompt": f"w{3 + i % 4} w{10 + i}",
        "chosen": " ".join(f"w{20 + (i + k) % 9}" for k in range(1 + i % 4)),
        "rejected": " ".join(f"w{30 - (i + k) % 5}" for k in range(1 + (i + 2) % 5)),
        "id": f"p{i}",
        "subset": "mt-bench-hard",
    }
    for i in range(6)
]


def pairs_file(tmp_path: Path, rows: list[dict] = ROWS) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bos_auto_gives_apply_chat_template_ids_single_and_double(tmp_path: Path) -> None:
    folder = rm_folder(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    bos = tok.bos_token_id
    for prompt, response in [(P, R), ("w9", "w10 w11 w12")]:
        trl = tok.apply_chat_template(messages(prompt, response), tokenize=True, return_dict=True)[
            "input_ids"
        ]
        text = tok.apply_chat_template(messages(prompt, response), tokenize=False)
        with_specials = tok(text)["input_ids"]
        assert trl[0] == bos and trl[1] != bos and with_specials[:2] == [bos, bos]
        got = {}
        for rule in ("auto", "single", "double"):
            rm = load_reward_model(folder, ScoreOptions(bos=rule))
            got[rule] = rm.encode(rm.format_text(prompt, response))
        assert got["auto"] == trl
        assert got["double"] == with_specials
        assert got["single"] == with_specials[1:]


def test_plain_format_gets_the_tokenizers_bos_under_every_rule(tmp_path: Path) -> None:
    folder = rm_folder(tmp_path, template=None)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    for rule in ("auto", "single", "double"):
        rm = load_reward_model(folder, ScoreOptions(bos=rule))
        text = rm.format_text(P, R)
        assert rm.encode(text) == tok(text)["input_ids"] and rm.encode(text)[0] == tok.bos_token_id


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_matches_the_tokenizers_own_and_keeps_bos(tmp_path: Path, side: str) -> None:
    folder = rm_folder(tmp_path, template=None)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.truncation_side = side
    long = " ".join(f"w{i}" for i in range(3, 30))
    for max_length in (3, 8, 20, 60):
        rm = load_reward_model(folder, ScoreOptions(truncation=side, max_length=max_length))
        text = rm.format_text("w3", long)
        want = tok(text, truncation=True, max_length=max_length)["input_ids"]
        assert rm.encode(text) == want
        assert want[0] == tok.bos_token_id


def test_left_truncation_keeps_a_templates_bos(tmp_path: Path) -> None:
    folder = rm_folder(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    long = " ".join(f"w{i}" for i in range(3, 30))
    full = tok.apply_chat_template(messages("w3", long), tokenize=True, return_dict=True)["input_ids"]
    rm = load_reward_model(folder, ScoreOptions(max_length=10))
    ids = rm.encode(rm.format_text("w3", long))
    assert ids == [tok.bos_token_id, *full[-9:]]
    right = load_reward_model(folder, ScoreOptions(max_length=10, truncation="right"))
    assert right.encode(right.format_text("w3", long)) == full[:10]


def rewardbench_reference(folder: Path, texts: list[str], max_length: int) -> list[float]:
    """RewardBench's run_rm.py on `texts` (rendered with tokenize=False): left truncation, the
    pad rule (tokenizer without pad -> model and tokenizer pad with EOS; a model config without
    a pad id takes the tokenizer's), padded batches, the first of two leading BOS masked."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, attn_implementation="eager"
    )
    model.eval()
    tok.truncation_side = "left"
    if tok.pad_token_id is None:
        model.config.pad_token_id = tok.eos_token_id
        tok.pad_token_id = tok.eos_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    inputs = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    bos = tok.bos_token_id
    double = (inputs["input_ids"][:, 0] == bos) & (inputs["input_ids"][:, 1] == bos)
    inputs["attention_mask"][double, 0] = 0
    with torch.no_grad():
        return model(**inputs).logits[:, 0].tolist()


#: A template that does not write bos_token (ChatML-like): RewardBench's tokenizer adds the only BOS.
NO_BOS_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}w1 {{ m['content'] }} w2 "
    "{% else %}{{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)


def rewardbench_texts(case: str, tok: transformers.PreTrainedTokenizerBase) -> list[str]:
    """The texts RewardBench scores: apply_chat_template(tokenize=False) with a template, else
    FastChat's tulu text (get_prompt's add_new_line_single style, written out here)."""
    if case == "tulu":
        return [
            f"<|user|>\n{r['prompt']}\n<|assistant|>\n{r[k]}\n" for k in ("chosen", "rejected") for r in ROWS
        ]
    return [
        tok.apply_chat_template(messages(r["prompt"], r[k]), tokenize=False)
        for k in ("chosen", "rejected")
        for r in ROWS
    ]


CASES = {"bos-template": BOS_TEMPLATE, "no-bos-template": NO_BOS_TEMPLATE, "tulu": None}


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_rewardbench_flag_set_reproduces_its_rewards(tmp_path: Path, case: str, prefix_cache: bool) -> None:
    folder = rm_folder(tmp_path, template=CASES[case], pad=False)
    data = pairs_file(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = rewardbench_texts(case, tok)
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    max_length = sorted(lengths)[len(lengths) // 2]  # about half the texts are truncated
    assert min(lengths) < max_length < max(lengths)
    want = rewardbench_reference(folder, texts, max_length)
    conversation = "tulu" if case == "tulu" else None
    score = ScoreOptions(
        bos="single",
        pad_as_eos=True,
        max_length=max_length,
        prefix_cache=prefix_cache,
        conversation=conversation,
    )
    report = evaluate_pairs(folder, data, score=score)
    got = [p["chosen_reward"] for p in report["pairs"]] + [p["rejected_reward"] for p in report["pairs"]]
    assert len(set(round(x, 4) for x in want)) > 3  # the rewards differ: the comparison can fail
    assert got == pytest.approx(want, abs=1e-4)
    assert "pad id 2 (--pad-as-eos" in report["conventions"]["pad"]
    # without the flags lazymerge scores as TRL tokenizes and reads the last token: other rewards
    default = evaluate_pairs(folder, data, score=ScoreOptions(max_length=max_length))
    other = [p["chosen_reward"] for p in default["pairs"]] + [p["rejected_reward"] for p in default["pairs"]]
    assert other != pytest.approx(want, abs=1e-4)
    assert default["conventions"]["pad"].startswith("no pad id")


def test_layer_streamed_scoring_follows_the_pad_rule(tmp_path: Path) -> None:
    folder = rm_folder(tmp_path, pad=False)
    data = pairs_file(tmp_path)
    score = ScoreOptions(bos="single", pad_as_eos=True, max_length=9)
    whole = evaluate_pairs(folder, data, score=score)
    streamed = evaluate_pairs(folder, data, score=ScoreOptions(**{**score.record(), "stream_layers": True}))
    for a, b in zip(whole["pairs"], streamed["pairs"], strict=True):
        assert b["chosen_reward"] == pytest.approx(a["chosen_reward"], abs=1e-5)
        assert b["rejected_reward"] == pytest.approx(a["rejected_reward"], abs=1e-5)
    assert streamed["conventions"]["pad"] == whole["conventions"]["pad"]


def test_default_rewards_are_a_forward_pass_on_trl_ids(tmp_path: Path) -> None:
    folder = rm_folder(tmp_path, pad=False)
    data = pairs_file(tmp_path)
    report = evaluate_pairs(folder, data, score=ScoreOptions(batch_size=4))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    for row, entry in zip(ROWS, report["pairs"], strict=True):
        for key in ("chosen", "rejected"):
            ids = tok.apply_chat_template(messages(row["prompt"], row[key]), tokenize=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]  # fmt: skip
            with torch.no_grad():
                want = float(model(input_ids=ids).logits[0, 0])
            assert entry[f"{key}_reward"] == pytest.approx(want, abs=1e-5)
    assert report["settings"]["bos"] == "auto" and report["conventions"]["bos"].startswith(
        "auto: template text"
    )


def test_conversation_formats_a_template_less_model(tmp_path: Path) -> None:
    folder = rm_folder(tmp_path, template=None)
    rm = load_reward_model(folder, ScoreOptions(conversation="tulu"))
    text = rm.format_text(P, R)
    assert text == "<|user|>\nw3 w4\n<|assistant|>\nw5 w6\n"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert not honours_add_eos(tok)  # a generic fast tokenizer: RewardBench's add_eos_token is ignored
    assert rm.encode(text) == tok(text)["input_ids"]
    assert "FastChat conversation tulu (no EOS appended" in rm.conventions()["format"]
    llama_like = type("LlamaTokenizerFast", (), {})()
    assert honours_add_eos(llama_like)
    # a model with a chat template keeps it: RewardBench uses the conversation only without one
    templated = load_reward_model(rm_folder(tmp_path / "t"), ScoreOptions(conversation="tulu"))
    assert templated.format_text(P, R).startswith("<s> w1 w3 w4 w2")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lazymerge", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_cli_names_the_conventions_once_and_records_them(tmp_path: Path) -> None:
    folder = rm_folder(tmp_path, pad=False)
    data = pairs_file(tmp_path)
    out = tmp_path / "r.json"
    flags = ["--bos", "double", "--pad-as-eos", "--truncation", "right", "--section-weights", "dataset"]
    proc = cli("eval", str(folder), "--pairs", str(data), *flags, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("conventions:")]
    assert len(lines) == 1
    assert "bos double" in lines[0] and "pad pad id 2 (--pad-as-eos" in lines[0]
    assert "section weights dataset" in lines[0]
    doc = json.loads(out.read_text())
    assert {k: doc["settings"][k] for k in ("bos", "pad_as_eos", "truncation", "section_weights")} == {
        "bos": "double",
        "pad_as_eos": True,
        "truncation": "right",
        "section_weights": "dataset",
    }
    assert doc["conventions"]["truncation"].startswith("right")
    for bad, fragment in [
        (["--bos", "triple"], "'triple' is not one of"),
        (["--conversation", "tulu", "--chat-template", "chatml"], "give one of them"),
    ]:
        proc = cli("eval", str(folder), "--pairs", str(data), *bad)
        assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, (
            proc.stderr
        )


def test_sweep_resumed_with_another_bos_rule_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tests.helpers.evaluation import data, models

    rm, sft = models(tmp_path)
    files = data(tmp_path)
    out = tmp_path / "s"
    args = ["sweep", str(rm), str(sft), "--pairs", str(files["test"]), "--alpha", "0,1", "-o", str(out), "-q"]
    assert cli(*args, "--bos", "double").returncode == 0
    proc = cli(*args)
    assert proc.returncode == 2 and "scoring.bos" in proc.stderr, proc.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["scoring"]["bos"] == "double" and doc["scoring"]["section_weights"] == "file"
    assert "Sections weighted by file" in (out / "report.md").read_text()
