"""The model card (`README.md`) of a folder output, in the Hugging Face Hub's form.

YAML front matter the Hub reads (`base_model`: the inputs' Hub ids or paths, `tags`, and
`library_name: transformers` for model folders with a config.json), then the recipe as the plan
has it (method, each input's role and weight, base model, density and seed, heads kept and
dropped, how embedding rows were matched and which tokens were appended), the lazymerge version
and the `lazymerge run` command that makes the same output again (Hub ids pinned to the snapshot's
commit). The card is one more file of the plan, written in the same transaction as the shards;
an input's own README.md is never copied.

A card is written to be published, so it never shows a local absolute path (it would name the
user and their folders): inputs read from the Hugging Face cache appear as Hub ids, local paths
relative to the folder the command ran in, and a path outside that folder as its base name. Every
string that comes from the user or the inputs (paths, tensor names, tokens, folder names) is
escaped for markdown and HTML, so a name cannot add a heading, a link, raw HTML or a line, and
the Hub's extensions are broken in it too: no autolink (`https://`, `www.`, a bare domain, an
e-mail address) and no math (`$...$`). A name that is not UTF-8 text (a folder name's undecodable
bytes, a lone surrogate) is shown by escapes (`\\xff`), never written as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from lazymerge._version import __version__
from lazymerge.io.hub_cache import ModelSource
from lazymerge.io.writer import CARD_MARK, CARD_NAME
from lazymerge.merge.plan import MergePlan
from lazymerge.options import DEFAULT_SHARD_SIZE, MergeOptions

__all__ = ["CARD_NAME", "model_cards", "with_model_cards"]


_SURROGATES = re.compile("[\ud800-\udfff]")


def public_text(text: str) -> str:
    """`text` as UTF-8 text: the surrogates a file system's undecodable bytes become
    (surrogateescape) shown as `\\xNN`, any other lone surrogate as `\\udXXX`."""
    if text.isascii():
        return text

    def escape(match: re.Match[str]) -> str:
        code = ord(match.group(0))
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

    return _SURROGATES.sub(escape, text)


def _yaml_str(text: str) -> str:
    """A YAML double-quoted scalar (a JSON string is one; ASCII escapes keep it one line)."""
    return json.dumps(public_text(text), ensure_ascii=True)


#: Top-level domains a linkifier links bare (`evil.com`): linkify-it's defaults, and every
#: two-letter one.
_TLDS = "biz|com|edu|gov|net|org|pro|web|xxx|aero|asia|coop|info|museum|name|shop|[a-z]{2}"
#: Characters markdown (and the GitHub dialect the Hub renders) reads as syntax inside a line; an
#: underscore only where it can open or close emphasis (`lm_head` stays as it is); `$` (math);
#: and one character of whatever an autolinker would link: the colon of a scheme (`https:`,
#: `mailto:`), a `//`, the dot after `www` or before a top-level domain, the `@` of an address.
_MD_INLINE = re.compile(
    r"[\\`*\[\]|~$]|(?<![^\W_])_|_(?![^\W_])"
    r"|(?<=[A-Za-z0-9]):(?=[/\w])"
    r"|/(?=/)"
    r"|(?<=[Ww][Ww][Ww])\."
    rf"|\.(?=(?i:{_TLDS})(?![\w-]))"
    r"|(?<=[\w.+-])@(?=[\w-]+\.)"
)
#: What starts a block at the start of a line (or of a list item): a heading, quote, list, rule.
_MD_LEADING = re.compile(r"([#>+\-=])|\d+(?=[.)])")
#: Text shown as inline code as it is: nothing a code span or the Hub's renderer could misread.
_PLAIN = re.compile(r"[\w./@:=+-]+(?: [\w./@:=+-]+)*")


def md_text(text: str) -> str:
    """`text` as literal markdown inline text, one line: syntax characters escaped, HTML's `&<>`
    as entities, line breaks and other control characters shown as escapes (`\\n`), no autolink
    or math left (see `_MD_INLINE`); text that is not UTF-8 as `public_text` shows it."""
    text = _MD_INLINE.sub(lambda m: "\\" + m.group(0), public_text(text))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = "".join(ch if ch.isprintable() else "\\" + ascii(ch)[1:-1] for ch in text)
    body = text.lstrip(" ")
    indent = "&#32;" * (len(text) - len(body))  # (leading spaces would indent a code block)
    match = _MD_LEADING.match(body)
    if match is not None:
        cut = match.end() if match.group(1) is None else match.start()
        body = body[:cut] + "\\" + body[cut:]
    return indent + body


def md_code(text: str) -> str:
    """`text` as inline code when it holds only name characters (a code span cannot escape
    anything), else as escaped text (`md_text`)."""
    return f"`{text}`" if _PLAIN.fullmatch(text) else md_text(text)


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text`, so no line of it closes the block."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


class PublicNames:
    """How a card names local paths: relative to the working folder when inside it, else by base
    name; a path inside a Hugging Face snapshot by its Hub id (and the path within it).

    `scrub` applies the same to free text (the plan's dropped and notes lines), replacing every
    form of every input's path it holds. `shortened` says whether a name printed so far was cut
    to its base name (the card then says so, since its command no longer runs as it is).
    """

    def __init__(self, sources: Sequence[ModelSource], cwd: str | None = None) -> None:
        self.cwd = cwd if cwd is not None else os.getcwd()
        self.shortened = False
        #: absolute path text -> (its public name, whether that is a base name only)
        known: dict[str, tuple[str, bool]] = {}
        for source in sources:
            path = Path(source.path)
            forms = {str(path), os.path.abspath(path), os.path.realpath(path)}
            if source.repo_id is None and not path.is_dir():  # a file input: its folder appears too
                forms |= {os.path.dirname(form) for form in forms}
            for form in forms:
                known[form] = (source.repo_id, False) if source.repo_id is not None else self._relative(form)
        # longest first (a file before its folder); a relative path inside the folder is public
        # already, and "/" would match every path
        self.known = {
            k: v
            for k, v in sorted(known.items(), key=lambda kv: -len(kv[0]))
            if (os.path.isabs(k) or k.startswith("..")) and k.rstrip("/")
        }

    def _relative(self, path: str) -> tuple[str, bool]:
        for here, there in (
            (self.cwd, os.path.abspath(path)),
            (os.path.realpath(self.cwd), os.path.realpath(path)),
        ):
            if there == here:
                return ".", False
            if there.startswith(here.rstrip("/") + "/"):
                return os.path.relpath(there, here), False
        return os.path.basename(os.path.normpath(os.path.abspath(path))) or ".", True

    def path(self, path: str | os.PathLike[str]) -> str:
        """The public name of one path."""
        text = os.fspath(path)
        for known, (public, short) in self.known.items():
            stem = known.rstrip("/")
            if text == known or text.startswith(stem + "/"):
                self.shortened |= short
                return public + text[len(stem) :] if text != known else public
        if not os.path.isabs(text) and not text.startswith(".."):
            return text
        public, short = self._relative(text)
        self.shortened |= short
        return public

    def source(self, source: ModelSource) -> str:
        """An input's public name: its Hub id, else its path as given, made public."""
        return source.repo_id if source.repo_id is not None else self.path(source.given)

    def scrub(self, text: str) -> str:
        """`text` with every known input path (and any path inside one) replaced by its public name."""
        for known, (public, short) in self.known.items():
            # only whole path components: `/m/a` must not match inside `/m/ab`
            pattern = re.escape(known.rstrip("/")) + r"(?![^/\s,;:)'\"])"
            text, count = re.subn(pattern, public.replace("\\", "\\\\"), text)  # (a literal replacement)
            self.shortened |= short and count > 0
        return text


def _weight(value: float) -> str:
    return repr(float(value))


def _pinned(source: ModelSource, names: PublicNames) -> str:
    return source.pinned if source.repo_id is not None else names.path(source.given)


def reproduce_command(
    plan: MergePlan, options: MergeOptions, variant: int, names: PublicNames | None = None
) -> list[str]:
    """`lazymerge run` arguments that make output `variant` of `plan` again, with paths as the
    card shows them (`PublicNames`)."""
    names = names if names is not None else PublicNames(plan.sources)
    n = len(plan.roles) - (plan.base_index is not None)
    sources = list(plan.sources)
    destination = (
        plan.destination / plan.variant_names[variant] if plan.variant_names[variant] else plan.destination
    )
    args = ["lazymerge", "run", *(_pinned(s, names) for s in sources[:n]), "-o", names.path(destination)]
    args += ["--weights", ",".join(_weight(w) for w in plan.variants[variant][:n])]
    if plan.method != "linear":
        args += ["--method", plan.method]
    if plan.base_index is not None:
        args += ["--base", _pinned(sources[plan.base_index], names)]
    if plan.method in ("ties", "dare_linear", "dare_ties"):
        args += ["--density", _weight(plan.density)]
    if plan.method.startswith("dare"):
        args += ["--seed", str(plan.seed)]
    if options.dtype != "auto":
        args += ["--dtype", options.dtype]
    if options.shard_size != DEFAULT_SHARD_SIZE:
        args += ["--shard-size", str(options.shard_size)]
    if options.rm is not None:
        args += ["--rm", str(options.rm)]
    if options.strict:
        args.append("--strict")
    return args


def _input_line(source: ModelSource, role: str, weight: float, is_base: bool, names: PublicNames) -> str:
    where = (
        f"Hugging Face {md_code(source.repo_id)} at {md_code(source.revision or '')} "
        f"(commit {md_code(source.commit or '')})"
        if source.repo_id is not None
        else md_code(names.source(source))
    )
    what = f"{role}, task vectors taken against it" if is_base else f"{role}, weight {weight:g}"
    return f"- {where}: {what}"


def _provenance_lines(plan: MergePlan, names: PublicNames) -> list[str]:
    """What each input was, from the plan's identities (the record every shard's header carries
    as `lazymerge_provenance`): its weights files' SHA-256 where known, the digest of its tensor
    names, dtypes and shapes, and of its companion files."""
    lines = [
        'The SHA-256 of each input\'s weights (as its lazymerge header records it; "not recorded" '
        "for other files), of its tensor list, and of its config and tokenizer files:",
        "",
    ]
    for source, ident in zip(plan.sources, plan.identities, strict=True):
        record = ident.published(names.source(source))
        files = ", ".join(
            f"{md_code(n)} {md_code(h) if h else 'not recorded'}" for n, _, h in record["weights"]
        )
        companions = "".join(f"{n}\0{h}\n" for n, h in record["companions"].items())
        lines.append(
            f"- {md_code(record['name'])}: weights {files}; tensors {md_code(record['tensors'])}"
            + (
                f"; {len(record['companions'])} companion files {md_code(_sha256(companions))}"
                if companions
                else ""
            )
        )
    return lines


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model_card(plan: MergePlan, options: MergeOptions, variant: int) -> bytes:
    """The README.md of output `variant` (see the module docstring)."""
    names = PublicNames(list(plan.sources))
    title = plan.variant_names[variant] or plan.destination.name or "merged model"
    command = shlex.join(public_text(arg) for arg in reproduce_command(plan, options, variant, names))
    lines = [
        *_front_matter(plan, names),
        "",
        f"# {md_text(title)}",
        "",
        f"A merge of {len(plan.sources) - (plan.base_index is not None)} models made with lazymerge "
        f"{__version__} (method {md_code(plan.method)}).",
        "",
        *_recipe_lines(plan, plan.variants[variant], names),
    ]
    if plan.identities:
        lines += ["", "## Provenance", "", *_provenance_lines(plan, names)]
    lines += _reproduce_lines(plan, command, names)
    return public_text("\n".join(lines)).encode("utf-8")  # (public_text: nothing left unencodable)


def _front_matter(plan: MergePlan, names: PublicNames) -> list[str]:
    """The Hub's YAML header: the input models as `base_model`, tags, the library."""
    hub_names = list(dict.fromkeys(names.source(s) for s in plan.sources))
    front = [
        "---",
        "base_model:",
        *(f"- {_yaml_str(n)}" for n in hub_names),
        "tags:",
        "- merge",
        "- lazymerge",
    ]
    if "config.json" in plan.companion_files:
        front.append("library_name: transformers")
    return [*front, "---"]


def _recipe_lines(plan: MergePlan, weights: Sequence[float], names: PublicNames) -> list[str]:
    """The method and its parameters, each input with its role and weight, what the reward model
    kept and what was dropped, and the plan's notes."""
    sources = list(plan.sources)
    lines = [
        "## Recipe",
        "",
        f"Method: {md_code(plan.method)}"
        + (f", density {plan.density:g}" if plan.method in ("ties", "dare_linear", "dare_ties") else "")
        + (f", seed {plan.seed}" if plan.method.startswith("dare") else "")
        + ".",
        "",
        "Inputs:",
        "",
        *(
            _input_line(s, plan.roles[i], weights[i], i == plan.base_index, names)
            for i, s in enumerate(sources)
            if i < len(plan.roles)
        ),
    ]
    if "reward model" in plan.roles:
        rm = sources[plan.roles.index("reward model")]
        lines += [
            "",
            f"The output is the reward model {md_code(names.source(rm))} (DogeRM): backbones averaged "
            "with the weights.",
        ]
    kept = [t for t in plan.tensors.values() if t.note.startswith("reward head")]
    if kept:
        lines += ["", "Kept: " + ", ".join(f"{md_code(t.name)} ({md_text(t.note)})" for t in kept) + "."]
    if plan.dropped:
        lines += ["", "Dropped:", "", *(f"- {md_text(names.scrub(d))}" for d in plan.dropped)]
    if plan.notes:
        lines += ["", "Notes:", "", *(f"- {md_text(names.scrub(n))}" for n in plan.notes)]
    return lines


def _reproduce_lines(plan: MergePlan, command: str, names: PublicNames) -> list[str]:
    """The tensor count and dtypes, the command that makes this output again, and the mark."""
    dtypes = sorted({t.dtype for t in plan.tensors.values()})
    fence = _fence(command)
    shortened = ["Paths outside the folder the merge ran in are shown by their base names.", ""]
    return [
        "",
        f"{len(plan.tensors)} tensors, {plan.parameters:,} parameters, stored as {', '.join(dtypes)}.",
        "",
        "## Reproduce",
        "",
        *(shortened if names.shortened else []),
        f"{fence}sh",
        command,
        fence,
        "",
        CARD_MARK,
        "",
    ]


def with_model_cards(plan: MergePlan, options: MergeOptions) -> MergePlan:
    """`plan` with its model cards among the files it writes (`variant_files`)."""
    return dataclasses.replace(plan, variant_files=model_cards(plan, options))


def model_cards(plan: MergePlan, options: MergeOptions) -> tuple[dict[str, bytes], ...]:
    """`{README.md: card}` for each output of a folder plan; nothing for a single-file output."""
    if plan.single_file:
        return tuple({} for _ in plan.variants)
    return tuple({CARD_NAME: model_card(plan, options, v)} for v in range(len(plan.variants)))
