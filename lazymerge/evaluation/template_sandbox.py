"""Chat templates rendered under limits: steps, time, output size, value size, recursion depth.

A chat template is untrusted code (a `--chat-template` file, or the one a model folder ships).
jinja2's `ImmutableSandboxedEnvironment` keeps it from Python's internals, but not from running
for ever (`{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}`) or
from building a 10 GB string in one operation (`{{ 'x' * 10**10 }}`, `{{ 10 ** 10 ** 10 }}`,
`{{ 'x' | center(10**10) }}`). `BoundedTemplate` renders in such a sandbox, configured as
transformers configures its own (`transformers.utils.chat_template_utils`: trim_blocks,
lstrip_blocks, loop controls, the `{% generation %}` block, `raise_exception`, `tojson`,
`strftime_now`, `dict`, `namespace`), so the text is the one `apply_chat_template` renders; and
one meter sees every operation that can loop or grow a value:

- every loop iteration (each `{% for %}` iterates through a counting wrapper, inserted into the
  template's syntax tree before it is compiled), call (functions, macros, methods, `loop()`),
  filter and intercepted operator (`*`, `**`, `+`, `%`) is one step; a render may take
  `RENDER_STEPS` and `RENDER_SECONDS` (checked at every step, so a loop that prints nothing
  stops too);
- the operations whose result can be much larger than their operands (repetition, powers,
  padding widths, `format`, `join`, `replace`, `indent`, `tojson(indent=...)`, ...) are sized
  *before* they run from their arguments (`_FILTER_BOUNDS`, `_METHOD_BOUNDS`); every other
  result is sized after: no value may exceed the render's output allowance, no integer
  `INT_DIGITS` digits;
- every piece of output, also into `{% set %}` blocks and macro bodies, is counted against the
  render's output allowance: `RENDER_OUTPUT` characters plus `OUTPUT_PER_INPUT` times the
  characters of the conversation it is given (a real template writes each message once);
- every value the meter sizes after it is built (the result of a call, filter, operator, `~` or
  slice) is also added up: a render may allocate `RENDER_ALLOCATION` plus `ALLOCATION_PER_INPUT`
  x the conversation's characters in all (16 x its output allowance), so values each within the allowance cannot pile up to gigabytes
  (`{% set a1 = 'x' * 1000000 %}{% set a2 = ... %}` ...);
- a filter whose work grows with its input is charged steps by the input's size before it runs
  (`_FILTER_WORK`: one step per character for the slow ones, `wordwrap` and `urlize`, one per
  256 for the rest), so the step limit stops one filter call on a long value too; `striptags`
  is lazymerge's own linear one (markupsafe's is quadratic);
- macro calls nest at most `RENDER_DEPTH` deep; the template's syntax tree (blocks in blocks,
  operands of operands) at most `TEMPLATE_DEPTH` deep, checked before it is compiled (Python
  cannot compile jinja's code for deeper ones), and a template too deep even for jinja's parser
  is refused too.

A `RenderBudget` adds every render of one run (all texts of an eval or a sweep) and bounds the
totals too (`RUN_STEPS`, `RUN_SECONDS`, `RUN_OUTPUT`), so a template just under the per-render
limits cannot take hours over a data set. A limit passed raises `TemplateLimitError` naming the
template and the limit. Real templates take a few hundred steps and well under a millisecond.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# jinja2 comes with torch; `chat_templates` imports this module only when it checks or compiles
# a template, so choosing one on the command line loads no jinja2
import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, generate_lorem_ipsum

from lazymerge.errors import TemplateLimitError

#: Steps (loop iterations, calls, filters, operators) one render may take.
RENDER_STEPS = 1_000_000
#: Seconds one render may take.
RENDER_SECONDS = 2.0
#: Characters one render may write (and the largest value it may build), beyond
#: `OUTPUT_PER_INPUT` x the characters of the conversation and special tokens it is given.
RENDER_OUTPUT = 1 << 20
OUTPUT_PER_INPUT = 4
#: Deepest nesting of calls (macros calling macros, recursive loops).
RENDER_DEPTH = 64
#: Characters all the values one render builds may add up to, beyond `ALLOCATION_PER_INPUT` x
#: the characters of the conversation: 16 x the output allowance (a real template builds each
#: message's text a few times over, `a + b + c` once per `+`).
RENDER_ALLOCATION = 16 * RENDER_OUTPUT
ALLOCATION_PER_INPUT = 16 * OUTPUT_PER_INPUT
#: Deepest nesting of a template's syntax tree (blocks, operands, filters): real templates nest
#: fewer than 25 levels; CPython compiles at most 20 nested loops and 100 indentation levels.
TEMPLATE_DEPTH = 48
#: Largest integer a template may build, in decimal digits (Python's own int-to-text limit).
INT_DIGITS = 4300
#: Totals over all renders of one run (an eval, or a sweep's texts).
RUN_STEPS = 200_000_000
RUN_SECONDS = 120.0
RUN_OUTPUT = 256 << 20

# the clock every time limit reads (a test replaces it to run deterministically)
_clock: Callable[[], float] = time.monotonic


class _Stop(Exception):
    """A limit passed inside a render; `BoundedTemplate.render` turns it into TemplateLimitError."""


# --- sizes ----------------------------------------------------------------------------------


def _size(value: Any, cap: int) -> int:
    """About how many characters `value` prints as, shared references counted at each use,
    stopping as soon as the count passes `cap` (so it costs O(cap) at most, cycles included)."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() * 3 // 10 + 1
        elif isinstance(item, float):
            total += 24
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(item)
            stack.extend(item)
        elif isinstance(item, range):
            total += 8 * len(item)
        else:
            attrs = _namespace_attrs(item)
            if attrs is not None:
                stack.append(attrs)
            else:
                total += 16
        if total > cap:
            return total
    return total


def _namespace_attrs(value: Any) -> dict[str, Any] | None:
    if isinstance(value, Namespace):
        return dict(value._Namespace__attrs)
    return None


def _int(value: Any) -> int:
    """`value` as a count or width for a size estimate (0 when it is none)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, str):  # indent's width may be a string
        return len(value)
    return 0


def _text(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0


_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")


def _printf_bound(fmt: str, args: Any, cap: int) -> int:
    """Upper bound of `fmt % args`: its text, each conversion's width and precision, and the
    largest argument once per conversion (a mapping key may be used many times)."""
    values = (
        list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    )
    ints = iter([v for v in values if isinstance(v, int)])
    largest = max((_size(v, cap) for v in values), default=0)
    total = len(fmt)
    for width, precision, _ in _PRINTF.findall(fmt):
        for number in (width, precision):
            total += _int(next(ints, 0)) if number == "*" else int(number or 0)
        total += largest
    return total


def _format_bound(fmt: str, args: tuple[Any, ...], kwargs: dict[str, Any], cap: int) -> int:
    """Upper bound of `fmt.format(*args, **kwargs)`: its text, every number in each field's spec
    (a nested `{}` width counts as the largest integer argument), and the largest argument once
    per field."""
    values = [*args, *kwargs.values()]
    largest = max((_size(v, cap) for v in values), default=0)
    widest = max((_int(v) for v in values if isinstance(v, int)), default=0)
    total = len(fmt)
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return total  # the call itself will fail
    for _, name, spec, _ in fields:
        if name is None:
            continue
        total += largest + sum(int(n) for n in re.findall(r"\d+", spec or ""))
        if "{" in (spec or ""):
            total += widest
    return total


def _json_bound(value: Any, indent: Any, cap: int) -> int:
    """Upper bound of json.dumps(value, indent=indent): 6 characters per character (\\uXXXX
    escapes) plus, with an indent, a newline and depth x indent per element."""
    base = 6 * _size(value, cap)
    step = _int(indent)
    if not step:
        return base
    total, stack = base, [(value, 1)]
    while stack and total <= cap:
        item, depth = stack.pop()
        children = (
            list(item.values())
            if isinstance(item, dict)
            else list(item)
            if isinstance(item, (list, tuple))
            else []
        )
        total += len(children) * (1 + depth * step)
        stack.extend((child, depth + 1) for child in children)
    return total


# Filters whose result can be much larger than their arguments, each with an upper bound of
# its result's size from the arguments bound to its signature (`value` is the filtered value).
# Every other filter writes at most a small multiple of what it reads and is sized after.
_FILTER_BOUNDS: dict[str, Callable[[dict[str, Any], int], int]] = {
    "center": lambda a, cap: max(_size(a["value"], cap), _int(a.get("width", 80))),
    "indent": lambda a, cap: (
        _text(a.get("s"))
        + (a["s"].count("\n") + 1 if isinstance(a.get("s"), str) else 1) * _int(a.get("width", 4))
    ),
    "format": lambda a, cap: (
        _printf_bound(a["value"], tuple(a.get("args", ())) or a.get("kwargs", {}), cap)
        if isinstance(a.get("value"), str)
        else 0
    ),
    "join": lambda a, cap: (
        _size(list(a["value"]), cap) + len(a["value"]) * _size(a.get("d", ""), cap)
        if isinstance(a.get("value"), Sized)
        else 0
    ),
    "replace": lambda a, cap: _replace_bound(a.get("s"), a.get("old"), a.get("new"), a.get("count")),
    "wordwrap": lambda a, cap: (
        _text(a.get("s"))
        + (
            (a["s"].count(" ") + a["s"].count("\n") + len(a["s"]) // max(_int(a.get("width", 79)), 1) + 1)
            * len(a.get("wrapstring") or "\n")
            if isinstance(a.get("s"), str)
            else 0
        )
    ),
    "tojson": lambda a, cap: _json_bound(a.get("x"), a.get("indent"), cap),
    "urlize": lambda a, cap: (
        _text(a.get("value"))
        * (4 + _size(a.get("target"), cap) + _size(a.get("rel"), cap) + _size(a.get("extra_schemes"), cap))
    ),
    "slice": lambda a, cap: _size(a.get("value"), cap) + 8 * _int(a.get("slices", 0)),
    "batch": lambda a, cap: (
        _size(a.get("value"), cap)
        + (8 * _int(a.get("linecount", 0)) if a.get("fill_with") is not None else 0)
    ),
    "sum": lambda a, cap: _sum_bound(a.get("iterable"), a.get("start", 0), cap),
}


def _replace_bound(s: Any, old: Any, new: Any, count: Any) -> int:
    if not isinstance(s, str) or not isinstance(new, str):
        return _text(s)
    hits = s.count(old) if isinstance(old, str) and old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * len(new)


def _sum_bound(items: Any, start: Any, cap: int) -> int:
    """Summing sequences copies the growing result at every item: n items cost n x the total."""
    if isinstance(start, (int, float)) or not isinstance(items, Sized):
        return 0
    return (len(items) + 1) * (_size(items, cap) + _size(start, cap))


# Methods of str reachable from a template whose result can be much larger than the string.
_METHOD_BOUNDS: dict[str, Callable[[str, tuple[Any, ...], dict[str, Any], int], int]] = {
    "center": lambda s, a, k, cap: max(len(s), _int(a[0] if a else k.get("width"))),
    "ljust": lambda s, a, k, cap: max(len(s), _int(a[0] if a else k.get("width"))),
    "rjust": lambda s, a, k, cap: max(len(s), _int(a[0] if a else k.get("width"))),
    "zfill": lambda s, a, k, cap: max(len(s), _int(a[0] if a else k.get("width"))),
    "expandtabs": lambda s, a, k, cap: len(s) + s.count("\t") * _int(a[0] if a else k.get("tabsize", 8)),
    "replace": lambda s, a, k, cap: _replace_bound(
        s,
        a[0] if a else k.get("old"),
        a[1] if len(a) > 1 else k.get("new"),
        a[2] if len(a) > 2 else k.get("count"),
    ),
    "join": lambda s, a, k, cap: (
        (_size(a[0], cap) + len(a[0]) * len(s)) if a and isinstance(a[0], Sized) else 0
    ),
    "format": lambda s, a, k, cap: _format_bound(s, a, k, cap),
    "format_map": lambda s, a, k, cap: _format_bound(
        s, (), dict(a[0]) if a and isinstance(a[0], dict) else {}, cap
    ),
    "translate": lambda s, a, k, cap: len(s) * max(1, _size(a[0] if a else None, cap)),
    "__mod__": lambda s, a, k, cap: _printf_bound(s, a[0] if a else (), cap),
}


# Filters whose work grows with the size of the filtered value, each with the steps it is
# charged from that value before it runs (`_size` characters, so lists count their items): one
# step is about a microsecond of work, as a loop iteration is. Every other filter is charged
# one step per `_WORK_PER_STEP` characters (they run at C speed).
_WORK_PER_STEP = 256


def _per(chars: int) -> Callable[[Any, int], int]:
    return lambda value, cap: _size(value, cap) // chars


def _striptags_work(value: Any, cap: int) -> int:
    # one Python-level iteration per tag or comment, one regex callback per entity
    if isinstance(value, str):
        return len(value) // _WORK_PER_STEP + value.count("<") + value.count("&")
    return _size(value, cap) // _WORK_PER_STEP


_FILTER_WORK: dict[str, Callable[[Any, int], int]] = {
    "striptags": _striptags_work,
    "wordwrap": _per(1),  # textwrap: ~2 us a character
    "urlize": _per(1),  # a regex per word: ~1.5 us a character
    "sort": _per(2),  # a key per item, n log n
    "dictsort": _per(2),
    "unique": _per(4),
    "groupby": _per(4),
    "min": _per(4),
    "max": _per(4),
    "batch": _per(4),
    "slice": _per(4),
    "join": _per(8),
    "pprint": _per(8),
    "title": _per(8),
    "list": _per(16),
}


def striptags(value: Any) -> str:
    """markupsafe's `Markup(value).striptags()` in linear time (markupsafe's copies the rest of
    the text at every tag): comments `<!-- -->` removed, then tags `<...>`, whitespace collapsed
    to single spaces, HTML entities unescaped."""
    import html

    if hasattr(value, "__html__"):
        value = value.__html__()
    text = _strip_tags(_strip_comments(str(value)))
    return html.unescape(" ".join(text.split()))


def _strip_comments(text: str) -> str:
    """Remove every first `<!--` with the first `-->` after it, again and again, as markupsafe
    does: a removal may join a `<!--` across the cut (`<!<!-- -->--`), which is looked for in
    the last three characters kept and the next three, so the scan stays linear."""
    kept: list[str] = []  # the text kept so far, in pieces (none empty)
    pos = 0
    while True:
        tail = _last(kept, 3)
        window = tail + text[pos : pos + 3]
        at = window.find("<!--")
        if 0 <= at < len(tail):  # a comment start across the cut
            close = (tail + text[pos : pos + 6]).find("-->", at)
            end = pos + close + 3 - len(tail) if close != -1 else _find_end(text, pos)
            if end == -1:
                break
            _drop(kept, len(tail) - at)
            pos = end
            continue
        start = text.find("<!--", pos)
        if start == -1:
            break
        close = text.find("-->", start)
        if close == -1:
            break
        if start > pos:
            kept.append(text[pos:start])
        pos = close + 3
    if pos < len(text):
        kept.append(text[pos:])
    return "".join(kept)


def _find_end(text: str, pos: int) -> int:
    close = text.find("-->", pos)
    return close + 3 if close != -1 else -1


def _last(pieces: list[str], n: int) -> str:
    tail = ""
    for piece in reversed(pieces):
        tail = piece[-(n - len(tail)) :] + tail
        if len(tail) >= n:
            break
    return tail


def _drop(pieces: list[str], n: int) -> None:
    while n > 0:
        piece = pieces.pop()
        if len(piece) > n:
            pieces.append(piece[:-n])
            return
        n -= len(piece)


def _strip_tags(text: str) -> str:
    # a removal cannot join a new `<` (the text before the first `<` holds none)
    kept: list[str] = []
    pos = 0
    while (start := text.find("<", pos)) != -1:
        close = text.find(">", start)
        if close == -1:
            break
        kept.append(text[pos:start])
        pos = close + 1
    kept.append(text[pos:])
    return "".join(kept)


# --- the meter -------------------------------------------------------------------------------


@dataclass
class RenderBudget:
    """What every render of one run (one eval or sweep) has used together; its owner formats
    all the run's texts with one budget (`RewardModel.template_budget`)."""

    steps: int = 0
    seconds: float = 0.0
    output: int = 0
    inputs: int = 0
    renders: int = 0
    allocated: int = 0


class _Meter:
    """The counters of one render, with its limits (the per-render ones, or what is left of
    the run's when less)."""

    def __init__(self, budget: RenderBudget, input_size: int) -> None:
        self.start = _clock()
        self.steps = 0
        self.output = 0
        self.depth = 0
        self.allocated = 0
        self.max_allocation = RENDER_ALLOCATION + ALLOCATION_PER_INPUT * input_size
        run_steps = RUN_STEPS - budget.steps
        run_seconds = RUN_SECONDS - budget.seconds
        run_output = RUN_OUTPUT + OUTPUT_PER_INPUT * (budget.inputs + input_size) - budget.output
        render_output = RENDER_OUTPUT + OUTPUT_PER_INPUT * input_size
        self.max_steps, self.steps_what = _tighter(
            RENDER_STEPS, f"the {RENDER_STEPS:,} steps allowed per render", run_steps, f"{RUN_STEPS:,} steps"
        )
        seconds, self.time_what = _tighter(
            RENDER_SECONDS, f"the {RENDER_SECONDS:g} s allowed per render", run_seconds, f"{RUN_SECONDS:g} s"
        )
        self.deadline = self.start + seconds
        self.max_output, self.output_what = _tighter(
            render_output,
            f"the {render_output:,} characters allowed per render ({RENDER_OUTPUT:,} plus {OUTPUT_PER_INPUT} per "
            "character of the conversation)",
            run_output,
            f"{RUN_OUTPUT:,} characters plus {OUTPUT_PER_INPUT} per character of the conversations",
        )

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            raise _Stop(f"it takes more than {self.steps_what} (loops, calls, filters and operators)")
        if _clock() > self.deadline:
            raise _Stop(f"it takes more than {self.time_what}")

    def charge(self, steps: int, what: str) -> None:
        """Count `steps` more for work about to run in one operation (a filter on a long value)."""
        if steps > 0:
            self.steps += steps
            if self.steps > self.max_steps:
                raise _Stop(
                    f"{what} takes more than {self.steps_what} (it is charged by the size of its input)"
                )

    def expect(self, size: int, what: str) -> None:
        """Refuse an operation whose result would be larger than the output allowance."""
        if size > self.max_output:
            raise _Stop(f"{what} would build a value of about {size:,} characters, over {self.output_what}")

    def check(self, value: Any, what: str, built: bool = True) -> Any:
        """Refuse a value larger than the output allowance, or an integer of too many digits;
        a value the operation `built` (not an argument passed on) adds to the allocation total."""
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > INT_DIGITS * 3.33:
            raise _Stop(f"{what} builds an integer of more than {INT_DIGITS} digits")
        if not isinstance(value, (int, float, bool)) and value is not None:
            size = _size(value, self.max_output)
            self.expect(size, what)
            if built:
                self.allocated += size
                if self.allocated > self.max_allocation:
                    raise _Stop(
                        f"{what} brings the values it has built to more than the {self.max_allocation:,} "
                        "characters allowed per render (16 x its output allowance, every value built counted)"
                    )
        return value

    def emit(self, value: Any) -> str:
        text = str(value)
        self.output += len(text)
        if self.output > self.max_output:
            raise _Stop(f"it writes more than {self.output_what}")
        return text


def _tighter(render: Any, render_what: str, run: Any, run_what: str) -> tuple[Any, str]:
    if run < render:
        return max(run, 0), f"the rest of the limit on all renders of one run ({run_what})"
    return render, render_what


# --- the environment -------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    # transformers' `{% generation %}` marks assistant text for its masks; the text is the
    # block's own, which is all lazymerge needs
    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


class _TemplateNamespace(Namespace):
    # like transformers': names starting with an underscore could shadow Python internals
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace.check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace.check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template may not store {name[:40]!r} (an underscore name) on a namespace"
            )


class _TemplateDict:
    # `dict(...)` and `dict.fromkeys(...)` without the type object itself
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: Any) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter: plain json.dumps (jinja's own escapes HTML characters)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """An ImmutableSandboxedEnvironment configured as transformers' chat-template one, with
    every operation that can loop or grow a value metered by the `meter` of the render in
    progress (see the module)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    meter: _Meter | None = None

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
        )
        self.filters["tojson"] = _tojson
        self.filters["striptags"] = striptags
        self.filters = {name: self.bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = self.strftime_now
        self.globals["dict"] = _TemplateDict()
        self.globals["namespace"] = _TemplateNamespace
        self.globals["lipsum"] = self.lipsum

    def active(self) -> _Meter:
        if self.meter is None:
            raise _Stop("it was rendered outside a metered render")
        return self.meter

    # loops and output, through the syntax tree (see `BoundedTemplate`)
    def lazymerge_iterate(self, iterable: Any) -> Iterator[Any]:
        meter = self.active()
        for item in iterable:
            meter.step()
            yield item

    def lazymerge_emit(self, value: Any) -> str:
        return self.active().emit(value)

    def lazymerge_slice(self, obj: Any, start: Any, stop: Any, step: Any) -> Any:
        # what jinja's code does (`obj[a:b]`), errors included; a step, the result counted as built
        meter = self.active()
        meter.step()
        return meter.check(obj[start:stop:step], "a slice")

    def lazymerge_concat(self, *parts: Any) -> str:
        meter = self.active()
        meter.expect(sum(_size(p, meter.max_output) for p in parts), "'~'")
        return str(meter.check("".join(str(p) for p in parts), "'~'"))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
        if getattr(__obj, "__self__", None) is __self and __obj.__name__.startswith("lazymerge_"):
            # the meter's own hooks (`_instrument`) meter themselves; jinja adds its loop and
            # block variables to calls made inside them, which only `Context.call` takes
            kwargs.pop("_loop_vars", None)
            kwargs.pop("_block_vars", None)
            return __obj(*args, **kwargs)
        meter = __self.active()
        meter.step()
        if isinstance(__obj, LoopContext) and args:
            # `loop(children)` of a recursive loop iterates outside the `{% for %}` it came from
            args = (__self.lazymerge_iterate(args[0]), *args[1:])
        name = getattr(__obj, "__name__", type(__obj).__name__)
        for arg in (*args, *kwargs.values()):
            meter.check(arg, f"an argument of {name}()", built=False)
        meter.depth += 1
        if meter.depth > RENDER_DEPTH:
            raise _Stop(f"it nests calls more than {RENDER_DEPTH} deep (recursion)")
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            meter.depth -= 1
        return meter.check(result, f"{name}()")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        meter = self.active()
        meter.step()
        what = f"'{operator}'"
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left) > 1 and (left.bit_length() - 1) * right > INT_DIGITS * 3.33:
                raise _Stop(f"{what} builds an integer of more than {INT_DIGITS} digits")
        elif operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(count, int) and not isinstance(seq, (int, float)) and isinstance(seq, Sized):
                    meter.expect(_size(seq, meter.max_output) * max(count, 0), what)
        elif operator == "%" and isinstance(left, str):
            meter.expect(_printf_bound(left, right, meter.max_output), what)
        return meter.check(super().call_binop(context, operator, left, right), what)

    def getattr(self, obj: Any, attribute: str) -> Any:
        return self.bounded_method(obj, attribute, super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(argument, slice):  # `x[slice(...)]`? (`x[a:b]` is `lazymerge_slice`)
            meter = self.active()
            meter.step()
            return meter.check(super().getitem(obj, argument), "a slice")
        return self.bounded_method(obj, argument, super().getitem(obj, argument))

    def bounded_method(self, obj: Any, name: Any, value: Any) -> Any:
        """A str method that can outgrow its string, sized before it runs."""
        if (
            not isinstance(obj, str)
            or not isinstance(name, str)
            or name not in _METHOD_BOUNDS
            or not callable(value)
        ):
            return value
        bound = _METHOD_BOUNDS[name]

        def method(*args: Any, **kwargs: Any) -> Any:
            meter = self.active()
            args = tuple(
                list(a) if isinstance(a, Iterable) and not isinstance(a, (Sized, str)) else a for a in args
            )
            meter.expect(bound(obj, args, kwargs, meter.max_output), f"str.{name}()")
            return value(*args, **kwargs)

        method.__name__ = f"str.{name}"
        return method

    def bounded_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        bound = _FILTER_BOUNDS.get(name)
        work = _FILTER_WORK.get(name, _per(_WORK_PER_STEP))
        # jinja passes the context, eval context or environment first to some filters; the
        # signature of those made with jinja's async_variant omits it (it follows __wrapped__)
        lead = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
        signature = inspect.signature(func)
        first = next(iter(signature.parameters), "")
        offset = 0 if first in ("context", "eval_ctx", "environment") else lead

        @functools.wraps(func)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            meter = self.active()
            meter.step()
            if len(args) > lead and isinstance(args[lead], Iterator):
                # a generator (from map, select, slice, ...): listed here, each item a step,
                # so no filter iterates without the meter
                args = (*args[:lead], list(self.lazymerge_iterate(args[lead])), *args[lead + 1 :])
            if len(args) > lead:
                meter.charge(work(args[lead], meter.max_output), f"the {name} filter")
            if bound is not None:
                try:
                    arguments = signature.bind(*args[offset:], **kwargs).arguments
                except TypeError:
                    arguments = None  # the filter itself reports the wrong arguments
                if arguments is not None:
                    meter.expect(bound(arguments, meter.max_output), f"the {name} filter")
            return meter.check(func(*args, **kwargs), f"the {name} filter")

        return bounded

    def strftime_now(self, format: Any) -> str:  # noqa: A002 (transformers' name)
        # glibc pads `%Y` to any width written in the format (`%999999999Y`)
        if isinstance(format, str):
            widths = sum(int(n) for n in re.findall(r"%[-_0^#]*(\d+)", format))
            self.active().expect(16 * len(format) + widths, "strftime_now()")
        return datetime.now().strftime(format)

    def lipsum(self, n: Any = 5, html: Any = True, min: Any = 20, max: Any = 100) -> Any:  # noqa: A002 (jinja's names)
        self.active().expect(_int(n) * (_int(max) + 1) * 16, "lipsum()")
        return generate_lorem_ipsum(n, html, min, max)


def _instrument(tree: Any) -> Any:
    """Route the template's loops, output and `~` through the environment's meter: every
    `{% for %}` iterates `lazymerge_iterate(...)`, every output piece (text included, so a loop
    writing into a `{% set %}` block is counted) passes `lazymerge_emit`, every `a ~ b` is
    `lazymerge_concat(a, b)`, every slice `x[a:b:c]` is `lazymerge_slice(x, a, b, c)`. The calls go through the sandbox's `call` like any other."""

    def hook(name: str, *args: Any) -> Any:
        return nodes.Call(nodes.EnvironmentAttribute(name), list(args), [], None, None)

    def visit(node: Any) -> Any:
        for field in node.fields:
            value = getattr(node, field)
            if isinstance(value, nodes.Node):
                setattr(node, field, visit(value))
            elif isinstance(value, list):
                setattr(node, field, [visit(v) if isinstance(v, nodes.Node) else v for v in value])
        if isinstance(node, nodes.For):
            node.iter = hook("lazymerge_iterate", node.iter)
        elif isinstance(node, nodes.Output):
            node.nodes = [
                hook(
                    "lazymerge_emit",
                    nodes.Const(child.data) if isinstance(child, nodes.TemplateData) else child,
                )
                for child in node.nodes
            ]
        elif isinstance(node, nodes.Concat):
            return hook("lazymerge_concat", *node.nodes)
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
            # jinja compiles `x[a:b]` to a plain Python slice, past the sandbox's getitem
            bounds = [node.arg.start, node.arg.stop, node.arg.step]
            return hook(
                "lazymerge_slice", node.node, *(nodes.Const(None) if b is None else b for b in bounds)
            )
        return node

    return visit(tree)


def _too_deep(name: str, why: str) -> TemplateLimitError:
    return TemplateLimitError(f"{name}: chat template refused: it nests too deeply to compile ({why})")


def _parse(environment: Any, text: str, name: str) -> Any:
    """`environment.parse(text)`, refused when jinja's (recursive) parser runs out of stack or
    memory, or the tree nests deeper than `TEMPLATE_DEPTH` (measured without recursion)."""
    try:
        tree = environment.parse(text)
    except RecursionError:
        raise _too_deep(name, "jinja's parser ran out of stack") from None
    except MemoryError:
        raise _too_deep(name, "jinja's parser ran out of memory") from None
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > TEMPLATE_DEPTH:
            raise _too_deep(
                name,
                f"line {node.lineno} is more than {TEMPLATE_DEPTH} levels of blocks, operators and filters deep",
            )
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())
    return tree


def parse_template(text: str, name: str = "the chat template") -> Any:
    """The syntax tree of `text` as the bounded environment parses it (transformers' syntax:
    loop controls, `{% generation %}`), for inspecting a template without running it.

    Raises:
        jinja2.TemplateSyntaxError for a template that does not parse; TemplateLimitError
        naming `name` for one nested too deeply (`TEMPLATE_DEPTH`).
    """
    return _parse(_BoundedEnvironment(), text, name)


class BoundedTemplate:
    """A chat template compiled for metered rendering.

    Args:
        text: the template's Jinja source.
        name: what messages call it (its file, or the built-in's name).

    Raises:
        jinja2.TemplateSyntaxError for a template that does not parse; TemplateLimitError naming
        `name` for one nested too deeply to compile.
    """

    def __init__(self, text: str, name: str) -> None:
        self.name = name
        self.environment = _BoundedEnvironment()
        tree = _instrument(_parse(self.environment, text, name))
        try:
            self.template = self.environment.from_string(tree)
        except SyntaxError as exc:  # IndentationError too: Python's limits on jinja's code
            raise _too_deep(name, f"Python: {exc.msg}") from None
        except RecursionError:
            raise _too_deep(name, "jinja's compiler ran out of stack") from None
        except MemoryError:
            raise _too_deep(name, "jinja's compiler ran out of memory") from None

    def render(self, budget: RenderBudget, variables: dict[str, Any]) -> str:
        """Render with `variables` (messages, special tokens, ...), charging `budget`.

        Raises:
            TemplateLimitError naming the template and the limit passed; whatever the template
            raises itself (jinja2's TemplateError, SecurityError, ...).
        """
        input_size = _size(variables, 1 << 62)
        meter = _Meter(budget, input_size)
        self.environment.meter = meter
        try:
            text = self.template.render(**variables)
        except _Stop as exc:
            raise TemplateLimitError(f"{self.name}: chat template refused: {exc}") from None
        except RecursionError:
            raise TemplateLimitError(f"{self.name}: chat template refused: it recurses without end") from None
        except MemoryError:
            raise TemplateLimitError(f"{self.name}: chat template refused: it ran out of memory") from None
        finally:
            self.environment.meter = None
            budget.steps += meter.steps
            budget.seconds += _clock() - meter.start
            budget.output += meter.output
            budget.inputs += input_size
            budget.renders += 1
            budget.allocated += meter.allocated
        return text
