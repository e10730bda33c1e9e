"""Chat templates chosen on the command line (`--chat-template llama2|chatml|FILE.jinja`).

A chosen template overrides the reward model's own (or supplies one to a tokenizer without one).
Every template, chosen, built-in or the model folder's, is rendered by `template_sandbox`: a
jinja2 `ImmutableSandboxedEnvironment` configured as transformers' `apply_chat_template` one (the
same text comes out; the tests compare), which refuses attribute access to Python internals, with
every render bounded in steps, time and output (per render and per run). A FILE is untrusted:
before anything is loaded it is read with a size limit, parsed, refused when it reads any
underscore attribute or item (`__class__`, `__globals__`, `_private`, also through the `attr`
filter; the sandbox would refuse most of them only when rendered), and rendered once on a test
conversation, so a template that fails, trips the sandbox or passes a limit is reported before a
model is read.

The two built-in templates are written from the published formats:
- `llama2`: Meta's Llama-2 chat format (`chat_completion` in Meta's llama repository): every user
  turn is `<s>[INST] {user} [/INST]`, every answer ` {answer} </s>`, contents stripped of outer
  whitespace; a system message goes into the first user turn as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n`.
  So one exchange with a system prompt reads
  `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`.
- `chatml`: OpenAI's ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lazymerge.errors import InputError, TemplateLimitError
from lazymerge.io.small_files import read_small_file
from lazymerge.score_options import ChatTemplate

__all__ = ["ChatTemplate", "load_chat_template", "valid_choice"]

if TYPE_CHECKING:  # the sandbox loads jinja2: imported where a template is checked or compiled
    from lazymerge.evaluation.template_sandbox import BoundedTemplate

LLAMA2 = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -%}"
    "{%- set chat = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_text = '' -%}"
    "{%- set chat = messages -%}"
    "{%- endif -%}"
    "{%- for message in chat -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('llama2 chat template: roles must alternate user/assistant after an optional system message') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- bos_token + '[INST] ' + (((system_text if loop.first else '') + message['content']) | trim) + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' + (message['content'] | trim) + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

BUILTIN = {"llama2": LLAMA2, "chatml": CHATML}
#: Largest template file read (real chat templates are a few KB).
TEMPLATE_FILE_LIMIT = 1 << 20


def valid_choice(value: str) -> bool:
    """llama2, chatml or a path ending in .jinja (checked before any file is opened)."""
    return value in BUILTIN or value.endswith(".jinja")


def load_chat_template(value: str, with_system: bool = False) -> ChatTemplate:
    """The built-in template `value`, or the template file `value`, checked (see the module).

    Args:
        with_system: render the test conversation with a system message (as `--system-prompt`
            will).

    Raises:
        InputError naming the file: missing, too large, not UTF-8, not Jinja, reading an
        underscore attribute, or failing (or tripping the sandbox) on the test conversation.
    """
    if value in BUILTIN:
        template = ChatTemplate(value, BUILTIN[value])
    else:
        raw = read_small_file(Path(value), TEMPLATE_FILE_LIMIT)
        try:
            text = raw.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{value}: not valid UTF-8 (byte {exc.start}); a chat template is Jinja text"
            ) from None
        if not text.strip():
            raise InputError(f"{value}: empty; a chat template is Jinja text")
        template = ChatTemplate(value, text)
        refuse_private_access(template)
    probe_render(template, with_system)
    return template


def refuse_private_access(template: ChatTemplate) -> None:
    """Refuse a template that reads an attribute or item whose name starts with an underscore.

    Raises:
        InputError naming the file and line; also for a Jinja syntax error. TemplateLimitError
        naming the file for a template nested too deeply to parse or compile.
    """
    import jinja2
    from jinja2 import nodes

    from lazymerge.evaluation.template_sandbox import parse_template

    try:
        tree = parse_template(template.text, template.name)
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(
            f"{template.name}: not a valid Jinja template (line {exc.lineno}: {exc.message})"
        ) from None
    except (SyntaxError, RecursionError, MemoryError) as exc:  # parse_template refuses these itself
        raise _too_deep(template.name, exc) from None
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        name: object = None
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args:
            first = node.args[0]
            name = first.value if isinstance(first, nodes.Const) else None
        if isinstance(name, str) and name.startswith("_"):
            raise InputError(
                f"{template.name}: line {node.lineno} reads {name!r}; chat templates may not touch underscore "
                "attributes (Python internals), and lazymerge renders them only in its sandbox"
            )


def compile_template(text: str, name: str) -> BoundedTemplate:
    """`text` compiled for bounded rendering (`template_sandbox`); `name` is its file.

    Raises:
        InputError naming the file for a Jinja syntax error; TemplateLimitError naming it for a
        template nested too deeply to parse or compile.
    """
    import jinja2

    from lazymerge.evaluation.template_sandbox import BoundedTemplate

    try:
        return BoundedTemplate(text, name)
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(
            f"{name}: the chat template failed: not a valid Jinja template (line {exc.lineno}: {exc.message})"
        ) from None
    except (SyntaxError, RecursionError, MemoryError) as exc:  # BoundedTemplate refuses these itself
        raise _too_deep(name, exc) from None


def _too_deep(name: str, exc: BaseException) -> TemplateLimitError:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return TemplateLimitError(
        f"{name}: chat template refused: it nests too deeply to compile ({type(exc).__name__}: {first})"
    )


#: Where a model folder's chat template comes from, in transformers' order of preference.
MODEL_TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json", "chat_template.json")


def model_template_file(folder: Path) -> str:
    """The file of `folder` that holds its tokenizer's chat template, for messages:
    chat_template.jinja when present (transformers prefers it), else tokenizer_config.json."""
    for name in MODEL_TEMPLATE_FILES:
        if (folder / name).is_file():
            return str(folder / name)
    return str(folder / "tokenizer_config.json")


def probe_render(template: ChatTemplate, with_system: bool) -> str:
    """Render a test conversation in the bounded sandbox (see `template_sandbox`).

    Raises:
        InputError naming the template when rendering fails or is refused by the sandbox;
        TemplateLimitError when it passes a limit.
    """
    from lazymerge.evaluation.template_sandbox import RenderBudget

    messages = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    if with_system:
        messages.insert(0, {"role": "system", "content": "w0"})
    compiled = compile_template(template.text, template.name)
    variables = {
        "messages": messages,
        "tools": None,
        "documents": None,
        "add_generation_prompt": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
    }
    try:
        rendered = compiled.render(RenderBudget(), variables)
    except TemplateLimitError:
        raise
    except Exception as exc:  # jinja2's TemplateError and SecurityError, and whatever the template raises
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"{template.name}: the chat template fails on a test conversation ({type(exc).__name__}: {first})"
        ) from None
    if not rendered:
        raise InputError(f"{template.name}: the chat template renders nothing for a test conversation")
    return str(rendered)
