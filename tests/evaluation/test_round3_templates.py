"""Bounded chat templates (issue 19, part 2): every template, a --chat-template file, a built-in
or the model folder's, renders under a step, time, output and value-size limit, per render and
per run, and a hostile one is refused in one line naming its file; honest templates render
exactly what transformers' apply_chat_template renders.

No test depends on timing: the step limit is lowered (and the time limit raised) so that only
the step budget can fire, and the time limit is tested with a clock that advances per reading.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lazymerge.errors import InputError
from lazymerge.evaluation.chat_templates import load_chat_template

transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from lazymerge.cli import main  # noqa: E402
from lazymerge.evaluation.rewards import load_reward_model  # noqa: E402
from tests.helpers.evaluation import reward_model, words, write_jsonl  # noqa: E402
from tests.helpers.models import (  # noqa: E402
    BASE_WORDS,  # noqa: E402
    make_tokenizer,
    save_model,
)

try:  # absent before the bounded renderer: the tests then run against whatever renders instead
    from lazymerge.evaluation import template_sandbox
except ImportError:  # pragma: no cover
    template_sandbox = None  # type: ignore[assignment]

TemplateLimitError = getattr(__import__("lazymerge.errors", fromlist=["x"]), "TemplateLimitError", InputError)


@pytest.fixture(autouse=True)
def only_the_step_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """20,000 steps per render and no time limit to speak of: a hanging template stops after
    20,000 steps whatever the machine's speed, with the steps named."""
    if template_sandbox is not None:
        monkeypatch.setattr(template_sandbox, "RENDER_STEPS", 20_000)
        monkeypatch.setattr(template_sandbox, "RENDER_SECONDS", 1e9)
        monkeypatch.setattr(template_sandbox, "RUN_SECONDS", 1e9)


# (template, error class, message fragment); each would hang or build gigabytes unbounded
HOSTILE = [
    pytest.param(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        TemplateLimitError,
        "steps allowed per render",
        id="nested-range-writing-nothing",
    ),
    pytest.param(
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        TemplateLimitError,
        "steps allowed per render",
        id="nested-range-writing",
    ),
    pytest.param(
        "{{ 'x' * 10**10 }}",
        TemplateLimitError,
        "'*' would build a value of about 10,000,000,000",
        id="10-GB-string",
    ),
    pytest.param(
        "{{ ('x' * 10**6) * 10**6 }}",
        TemplateLimitError,
        "about 1,000,000,000,000 characters",
        id="string-times-string",
    ),
    pytest.param(
        "{{ ([1] * 100000) * 100000 }}", TemplateLimitError, "'*' would build", id="list-times-count"
    ),
    pytest.param(
        "{{ 10 ** (10 ** 10) }}", TemplateLimitError, "integer of more than 4300 digits", id="exponent-bomb"
    ),
    pytest.param(
        "{{ 2 ** 100000 }}", TemplateLimitError, "integer of more than 4300 digits", id="large-power"
    ),
    pytest.param(
        "{{ 'x' | center(10**10) }}", TemplateLimitError, "the center filter would build", id="center-filter"
    ),
    pytest.param("{{ 'x'.ljust(10**10) }}", TemplateLimitError, "str.ljust() would build", id="ljust-method"),
    pytest.param("{{ '1'.zfill(10**10) }}", TemplateLimitError, "str.zfill() would build", id="zfill-method"),
    pytest.param(
        "{{ ('\t' * 100000).expandtabs(100000) }}",
        TemplateLimitError,
        "str.expandtabs()",
        id="expandtabs-method",
    ),
    pytest.param(
        "{{ (range(10000)|list)|join('x' * 1000000) }}",
        TemplateLimitError,
        "the join filter would build",
        id="join-filter",
    ),
    pytest.param(
        "{{ range(1000)|map('string')|join('x' * 100000) }}",
        TemplateLimitError,
        "the join filter would build",
        id="join-of-generator",
    ),
    pytest.param(
        "{{ '%10000000000s'|format('x') }}", TemplateLimitError, "the format filter", id="format-width"
    ),
    pytest.param(
        "{{ '%*s'|format(10**10, 'x') }}", TemplateLimitError, "the format filter", id="format-star-width"
    ),
    pytest.param("{{ '%10000000000d' % 1 }}", TemplateLimitError, "'%' would build", id="percent-operator"),
    pytest.param(
        "{{ '{:>10000000000}'.format('x') }}", TemplateLimitError, "str.format() would build", id="str-format"
    ),
    pytest.param(
        "{{ '{a:>10000000000}'.format_map({'a': 'x'}) }}",
        TemplateLimitError,
        "str.format_map()",
        id="format-map",
    ),
    pytest.param(
        "{{ ('\\n' * 100000)|indent(100000) }}",
        TemplateLimitError,
        "the indent filter would build",
        id="indent-filter",
    ),
    pytest.param(
        "{{ ('x' * 100000)|replace('x', 'y' * 100000) }}",
        TemplateLimitError,
        "the replace filter",
        id="replace-filter",
    ),
    pytest.param(
        "{{ ('x' * 1000).translate({120: 'y' * 1000000}) }}",
        TemplateLimitError,
        "str.translate()",
        id="translate",
    ),
    pytest.param(
        "{{ ('a ' * 100000)|wordwrap(1, wrapstring='z' * 1000) }}",
        TemplateLimitError,
        "the wordwrap filter",
        id="wordwrap",
    ),
    pytest.param(
        "{{ (range(1000)|list)|tojson(indent=10**8) }}",
        TemplateLimitError,
        "the tojson filter",
        id="tojson-indent",
    ),
    pytest.param(
        "{{ strftime_now('%1000000000Y') }}",
        TemplateLimitError,
        "strftime_now() would build",
        id="strftime-width",
    ),
    pytest.param("{{ lipsum(10**7) }}", TemplateLimitError, "lipsum() would build", id="lipsum-count"),
    pytest.param("{{ [1]|batch(10**9, 'x')|list }}", TemplateLimitError, "the batch filter", id="batch-fill"),
    pytest.param("{{ [1]|slice(10**8)|list }}", TemplateLimitError, "the slice filter", id="slice-count"),
    pytest.param(
        "{{ range(2000)|map('string')|map('list')|list|sum(start=[]) }}",
        TemplateLimitError,
        "the sum filter",
        id="sum-of-lists",
    ),
    pytest.param(
        "{{ dict.fromkeys(range(100000), 'x' * 100000)|string }}",
        TemplateLimitError,
        "fromkeys()",
        id="fromkeys",
    ),
    pytest.param(
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
        TemplateLimitError,
        "nests calls more than 64",
        id="macro-recursion",
    ),
    pytest.param(
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        TemplateLimitError,
        "steps allowed per render",
        id="macro-branching",
    ),
    pytest.param(
        "{% for x in range(100000) recursive %}{% if loop.depth == 1 %}{{ loop(range(100000)) }}{% endif %}{% endfor %}",
        TemplateLimitError,
        "steps allowed per render",
        id="recursive-loop",
    ),
    pytest.param(
        "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}"
        "{% for x in ns.s %}{% endfor %}",
        TemplateLimitError,
        "'+' would build",
        id="growing-list",
    ),
    pytest.param(
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        TemplateLimitError,
        "'~' would build",
        id="concat-doubling",
    ),
    pytest.param(
        "{% set x %}{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}{% endset %}",
        TemplateLimitError,
        "writes more than",
        id="set-block-output",
    ),
    # nested too deeply for Python to compile jinja's code, or for jinja's parser
    pytest.param(
        "{% for a in [1] %}" * 25 + "x" + "{% endfor %}" * 25,
        TemplateLimitError,
        "nests too deeply to compile",
        id="25-nested-for",
    ),
    pytest.param(
        "{% if true %}" * 200 + "x" + "{% endif %}" * 200,
        TemplateLimitError,
        "nests too deeply to compile",
        id="200-nested-if",
    ),
    pytest.param(
        "{% if true %}" * 5000 + "x" + "{% endif %}" * 5000,
        TemplateLimitError,
        "nests too deeply to compile",
        id="5000-nested-if",
    ),
    pytest.param(
        "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}",
        TemplateLimitError,
        "nests too deeply to compile",
        id="deep-parentheses",
    ),
    pytest.param(
        "{{ 'a'" + "|lower" * 5000 + " }}",
        TemplateLimitError,
        "nests too deeply to compile",
        id="filter-chain",
    ),
    pytest.param(
        "{{ 1" + "+1" * 20000 + " }}", TemplateLimitError, "nests too deeply to compile", id="plus-chain"
    ),
    # one filter call on a long value: charged steps by its size before it runs
    pytest.param(
        "{{ ('<a>' * 300000)|striptags }}",
        TemplateLimitError,
        "the striptags filter takes more than the 20,000 steps",
        id="striptags-long",
    ),
    pytest.param(
        "{{ ('ab ' * 300000)|wordwrap(10) }}",
        TemplateLimitError,
        "the wordwrap filter takes more",
        id="wordwrap-long",
    ),
    pytest.param(
        "{{ ('a.b ' * 100000)|urlize }}", TemplateLimitError, "the urlize filter takes more", id="urlize-long"
    ),
    pytest.param(
        "{{ ('x' * 300000)|list|sort|length }}", TemplateLimitError, "takes more than", id="sort-long"
    ),
    # values each within the allowance, piling up
    pytest.param(
        "".join(f"{{% set a{i} = 'x' * 1000000 %}}" for i in range(2000)),
        TemplateLimitError,
        "characters allowed per render (16 x its output allowance",
        id="2000-big-sets",
    ),
    pytest.param(
        "{% set big = 'x' * 1000000 %}" + "".join(f"{{% set a{i} = big[1:] %}}" for i in range(2000)),
        TemplateLimitError,
        "a slice brings",
        id="2000-big-slices",
    ),
]


@pytest.mark.parametrize(("text", "error", "fragment"), HOSTILE)
def test_hostile_template_file_refused_in_one_line(
    tmp_path: Path, text: str, error: type, fragment: str
) -> None:
    path = tmp_path / "evil.jinja"
    path.write_text(text)
    with pytest.raises(error) as info:
        load_chat_template(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: chat template refused: ") and fragment in message, message
    assert "\n" not in message and len(message) < 400


@pytest.mark.parametrize(
    "text",
    [
        "a <b>c</b> &amp; <!-- x --> d  e",
        "<<a>b>",
        "<!-- a <b> -->c<d",
        "x<y",
        "<!-- open",
        "a<!---->b",
        " \n<p>\t&lt;x&gt;</p> ",
    ],
)
def test_striptags_is_markupsafes(text: str) -> None:
    """lazymerge's linear striptags against markupsafe's own (jinja's filter)."""
    from markupsafe import Markup

    assert template_sandbox.striptags(text) == Markup(text).striptags()


def test_a_filter_over_a_long_string_is_charged_by_its_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """One filter call over a long string costs a step per 1,024 characters read, so the step
    limit bounds a filter's time as it bounds loops (jinja's striptags took 7.6 s in one step)."""
    monkeypatch.setattr(template_sandbox, "RENDER_STEPS", 500)
    bounded = template_sandbox.BoundedTemplate("{{ text | striptags }}{{ text | lower }}", "t.jinja")
    short = bounded.render(template_sandbox.RenderBudget(), {"text": "<b>x</b>" * 10})
    assert short == "x" * 10 + "<b>x</b>" * 10
    with pytest.raises(TemplateLimitError, match="steps allowed per render"):
        bounded.render(template_sandbox.RenderBudget(), {"text": "<>" * 300_000})


def model_with_template(tmp_path: Path, where: str, text: str) -> Path:
    folder = reward_model(tmp_path, template=False)
    if where == "chat_template.jinja":
        (folder / where).write_text(text)
    else:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = text
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# (file of the model folder holding the template, template, message fragment)
FOLDER_CASES = [
    pytest.param("chat_template.jinja", "{{ 'x' * 10**10 }}", "'*' would build", id="jinja-file-10-GB"),
    pytest.param(
        "chat_template.jinja",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "steps allowed per render",
        id="jinja-file-hang",
    ),
    pytest.param(
        "tokenizer_config.json", "{{ 10 ** (10 ** 10) }}", "4300 digits", id="tokenizer-config-power"
    ),
    pytest.param(
        "tokenizer_config.json",
        "{{ 'x' | center(10**10) }}",
        "the center filter",
        id="tokenizer-config-center",
    ),
]


@pytest.mark.parametrize(("where", "text", "fragment"), FOLDER_CASES)
def test_model_folder_template_refused_by_eval(tmp_path: Path, where: str, text: str, fragment: str) -> None:
    folder = model_with_template(tmp_path, where, text)
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": words(3), "chosen": words(4), "rejected": words(5)}]
    )
    result = CliRunner().invoke(main, ["eval", str(folder), "--pairs", str(pairs)])
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert line.startswith(f"Error: {folder / where}: chat template refused: ") and fragment in line, line
    assert "\n" not in line


def test_per_run_budget_refuses_a_template_just_under_the_render_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5,000 steps a render fit the render's 20,000; the run's 50,000 run out at the 10th text."""
    monkeypatch.setattr(template_sandbox, "RUN_STEPS", 50_000)
    folder = model_with_template(
        tmp_path, "chat_template.jinja", "{% for i in range(5000) %}{% endfor %}{{ messages[0]['content'] }}"
    )
    rm = load_reward_model(folder)
    for i in range(9):
        assert rm.format_text(words(3), words(i)) == words(3)
    with pytest.raises(TemplateLimitError, match="the rest of the limit on all renders of one run"):
        rm.format_text(words(3), words(4))


def test_per_run_output_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(template_sandbox, "RUN_OUTPUT", 50_000)
    folder = model_with_template(tmp_path, "chat_template.jinja", "{{ 'y' * 20000 }}")
    rm = load_reward_model(folder)
    rm.format_text("a", "b")
    rm.format_text("a", "c")
    with pytest.raises(TemplateLimitError, match="all renders of one run"):
        rm.format_text("a", "d")


def test_time_limit_with_a_clock_that_advances(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The time limit fires inside a loop that writes nothing (read at every step)."""
    ticks = iter(range(10**9))
    monkeypatch.setattr(template_sandbox, "_clock", lambda: float(next(ticks)))
    monkeypatch.setattr(template_sandbox, "RENDER_SECONDS", 100.0)
    path = tmp_path / "slow.jinja"
    path.write_text("{% for i in range(1000) %}{% endfor %}")
    with pytest.raises(TemplateLimitError, match="takes more than the 100 s allowed per render"):
        load_chat_template(str(path))


def test_striptags_as_markupsafe() -> None:
    """lazymerge's linear striptags gives markupsafe's result, also where a cut joins a comment."""
    from markupsafe import Markup

    samples = [
        "Main &raquo;\t<em>About</em>",
        "<!-- a <b> -->x<p>y</p>  z",
        "<!<!-- -->-- q -->r",
        "a<!-->b-->c<!--",
        "<<a>b>c<d",
        "x <!--a--><!--b-->  &amp;&lt;&#65; <br/>",
        "",
    ]
    alphabet = "<!->a &;"
    samples += ["".join(alphabet[(i * 7 + j * j) % len(alphabet)] for j in range(i % 23)) for i in range(400)]
    for text in samples:
        assert template_sandbox.striptags(text) == Markup(text).striptags(), text


def test_allocation_peak_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a small allowance the 2,000 big sets stop after a few, their total recorded in the run's budget."""
    monkeypatch.setattr(template_sandbox, "RENDER_ALLOCATION", 100_000)
    monkeypatch.setattr(template_sandbox, "ALLOCATION_PER_INPUT", 0)
    text = "".join(f"{{% set a{i} = 'x' * 30000 %}}" for i in range(2000))
    budget = template_sandbox.RenderBudget()
    with pytest.raises(TemplateLimitError, match="more than the 100,000 characters allowed per render"):
        template_sandbox.BoundedTemplate(text, "many.jinja").render(budget, {"messages": []})
    assert 90_000 < budget.allocated <= 130_000 and budget.steps < 10


def test_real_templates_within_depth_and_allocation() -> None:
    for text in (QWEN_STYLE, LLAMA2_STYLE, CHATML_STYLE):
        budget = template_sandbox.RenderBudget()
        messages = [
            {"role": "user", "content": "a" * 100_000},
            {"role": "assistant", "content": "b" * 100_000},
        ]
        template_sandbox.BoundedTemplate(text, "real.jinja").render(
            budget, {"messages": messages, "bos_token": "<s>", "eos_token": "</s>"}
        )
        assert 0 < budget.allocated < 20 * 200_000


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_model_folder_template_nested_too_deeply(tmp_path: Path, where: str) -> None:
    folder = model_with_template(tmp_path, where, "{% for a in [1] %}" * 25 + "x" + "{% endfor %}" * 25)
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": words(3), "chosen": words(4), "rejected": words(5)}]
    )
    result = CliRunner().invoke(main, ["eval", str(folder), "--pairs", str(pairs)])
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert line.startswith(f"Error: {folder / where}: chat template refused: it nests too deeply"), line
    assert "\n" not in line and "defect" not in line


def test_limits_on_the_command_line_exit_1(tmp_path: Path) -> None:
    folder = reward_model(tmp_path, template=False)
    path = tmp_path / "evil.jinja"
    path.write_text("{{ '%*s'|format(10**10, 'x') }}")
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": words(3), "chosen": words(4), "rejected": words(5)}]
    )
    result = CliRunner().invoke(
        main, ["eval", str(folder), "--pairs", str(pairs), "--chat-template", str(path)]
    )
    assert result.exit_code == 1 and result.output.startswith(f"Error: {path}: chat template refused: ")


# templates like the published ones, rendered by transformers and by lazymerge's sandbox
QWEN_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    "{%- if tools %}{{ tools | tojson(indent=2) }}{%- endif %}{{ '' if eos_token is defined else 'no eos' }}"
)
LLAMA2_STYLE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CHATML_STYLE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("template", [QWEN_STYLE, LLAMA2_STYLE, CHATML_STYLE, "llama2", "chatml"])
@pytest.mark.parametrize("system", [None, "w9 w8"])
def test_same_text_and_tokens_as_apply_chat_template(
    tmp_path: Path, family: str, template: str, system: str | None
) -> None:
    tok = make_tokenizer([*BASE_WORDS, "<|im_start|>", "<|im_end|>"], family=family)
    chosen = template if template in ("llama2", "chatml") else None
    if chosen is None:
        tok.chat_template = template
    folder = save_model(tmp_path / "rm", family, True, 1, tok)
    rm = load_reward_model(
        folder,
        system_prompt=system,
        chat_template=load_chat_template(chosen, system is not None) if chosen else None,
    )
    saved = rm.tokenizer  # what the old code rendered and tokenized with: apply_chat_template
    for prompt, response in ((words(3, 4), words(5)), (" " + words(6) + " ", words(7, 8) + "\n")):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        text = rm.format_text(prompt, response)
        reference = saved.apply_chat_template(
            messages, tokenize=False, **({"chat_template": rm.chat_template.text} if chosen else {})
        )
        assert text == reference
        assert rm.encode(text) == saved(reference, add_special_tokens=True)["input_ids"][-rm.max_length :]
