"""Lazy sweeps: score merged reward models that exist only in memory, resumably.

`run_sweep(spec)` takes a reward model, domain models, a grid of weight vectors and evaluations
(pair files, candidate files for best-of-N, validation pairs). For each point it builds the
merged reward model in memory (`in_memory.load_merged_reward_model`), scores every text of
every evaluation in one pass, and appends the point to `OUT/results.jsonl`, fsynced before the
next point starts. The reward model alone (every domain weight 0) is scored once as the
baseline. Running the same sweep again skips finished points; a sweep whose inputs, data or
settings differ from the file's refuses to mix (`restart` starts over). At the end the report
(`report.md`, `results.json`, plots) is made from the records (`sweep_report`).

Texts are formatted and tokenized once for the whole sweep: every point shares the output
tokenizer, which the plan fixes whatever the weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazymerge._version import __version__
from lazymerge.errors import (
    IncompatibleInputsError,
    InputError,
    LazyMergeError,
    NonFiniteRewardError,
    OptionError,
    OutputError,
)
from lazymerge.evaluation.datasets import absolute_data
from lazymerge.evaluation.diagnostics import TASK_VECTORS_FILE
from lazymerge.evaluation.lm_check import LmHead, choose_lm_head, lm_record_problem, point_likelihoods
from lazymerge.evaluation.prefix_scoring import ScoringStats
from lazymerge.evaluation.rewardbench2 import Rb2Row
from lazymerge.evaluation.scoring import CandidateSet, Pair, load_candidates, load_preferences, text_source
from lazymerge.io.hub_cache import ModelSource, resolve_input, resolve_inputs
from lazymerge.io.writer import DestinationLock, check_against_inputs
from lazymerge.options import MergeOptions, parse_alpha, read_paths
from lazymerge.progress import format_bytes, format_duration
from lazymerge.provenance import (
    InputIdentity,
    absolute,
    compare_inputs,
    identify_inputs,
    identity_from_dict,
)
from lazymerge.score_options import ScoreOptions
from lazymerge.sweep_options import SweepOptions

if TYPE_CHECKING:
    from lazymerge.merge.plan import MergePlan

RESULTS = "results.jsonl"
#: Files a sweep writes into its folder (besides kept models under models/).
SWEEP_FILES = (
    RESULTS,
    "results.json",
    "report.md",
    "accuracy.png",
    "best_of_n.png",
    "grid.png",
    "reliability.png",
    TASK_VECTORS_FILE,
)


@dataclass(frozen=True)
class SweepPoint:
    """One weight vector over the inputs (input order), and its name in reports."""

    label: str
    weights: tuple[float, ...]
    baseline: bool = False


@dataclass(frozen=True)
class PairEvaluation:
    """A pair file: its pairs, or (a RewardBench 2 file) its rows and no pairs."""

    name: str
    path: Path
    pairs: tuple[Pair, ...]
    autoj_ties: int
    validation: bool = False
    rewardbench2: tuple[Rb2Row, ...] = ()


@dataclass(frozen=True)
class BestOfNEvaluation:
    name: str
    path: Path
    sets: tuple[CandidateSet, ...]
    ns: tuple[int, ...]


@dataclass(frozen=True)
class SweepSpec:
    """Everything a sweep is asked to do."""

    inputs: tuple[Path, ...]
    out: Path
    points: tuple[SweepPoint, ...]
    merge: MergeOptions
    load: ScoreOptions
    pair_evals: tuple[PairEvaluation, ...] = ()
    bon_evals: tuple[BestOfNEvaluation, ...] = ()
    write: bool = False
    restart: bool = False
    #: hash every weights file (record their SHA-256, or prove on resume they did not change)
    rehash: bool = False
    domain_names: tuple[str, ...] = ()
    rm_index: int = 0
    #: Each input (base model last) as named and as read (a local path or a cache snapshot).
    sources: tuple[ModelSource, ...] = ()
    #: `--resident`: auto, on or off (`resident.decide`); the rewards are the same either way
    resident: str = "auto"
    #: with `--lm-check`: the head that reads each point's backbone (`lm_check.choose_lm_head`)
    lm_head: LmHead | None = None


@dataclass
class SweepRun:
    """What a sweep did this time, for the command line."""

    scored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def format(self, out: Path) -> str:
        """What `lazymerge sweep` prints at the end: the points done, the report, the choice."""
        chosen = self.report["chosen"]
        lines = [
            f"{len(self.scored)} point(s) scored, {len(self.skipped)} already done; report in {out / 'report.md'}",
            f"chosen point: {chosen['label']} (on {chosen['chosen_on']})",
        ]
        point = next((p for p in self.report.get("points", []) if p["label"] == chosen["label"]), None)
        for name, d in (point or {}).get("diagnostics", {}).items():
            if point is not None and "lm_check" in d:
                lines.append(
                    f"  {name}: the backbone's likelihood prefers the chosen response in "
                    f"{100 * d['lm_check']['accuracy']:.1f}% of {d['lm_check']['n']} pairs, the reward in "
                    f"{100 * point['pairs'][name]['overall']['accuracy']:.1f}% (--lm-check)"
                )
        return "\n".join(lines)


# --- the grid -----------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:g}"


def alpha_points(alphas: Sequence[float], rm_index: int) -> list[SweepPoint]:
    """One domain model: weight `alpha` for it, 1 - alpha for the reward model."""
    domain = 1 - rm_index
    return [
        SweepPoint(f"alpha={_fmt(a)}", tuple(a if i == domain else 1.0 - a for i in range(2)), a == 0)
        for a in alphas
    ]


def simplex_points(step: float, n_inputs: int, rm_index: int, max_points: int) -> list[SweepPoint]:
    """Every vector of domain-model weights in multiples of `step` summing to at most 1 (the
    reward model takes the rest)."""
    if not (math.isfinite(step) and 0 < step <= 1):
        raise OptionError(f"--grid {step}: a step in (0, 1]")
    k = round(1 / step)
    if abs(k * step - 1) > 1e-9:
        raise OptionError(f"--grid {step}: 1 must be a whole number of steps (0.1, 0.05, 0.25, ...)")
    domains = n_inputs - 1
    count = math.comb(k + domains, domains)
    if count > max_points:
        raise OptionError(
            f"--grid {step} gives {count} points; at most {max_points} (raise it with --max-points)"
        )
    points = []
    for combo in itertools.product(range(k + 1), repeat=domains):
        if sum(combo) > k:
            continue
        domain_weights = [c / k for c in combo]
        weights = []
        it = iter(domain_weights)
        for i in range(n_inputs):
            weights.append(round(1 - sum(domain_weights), 12) if i == rm_index else next(it))
        label = "w=" + ",".join(_fmt(w) for w in domain_weights)
        points.append(SweepPoint(label, tuple(weights), sum(combo) == 0))
    return points


def weight_points(vectors: Sequence[Sequence[float]], rm_index: int) -> list[SweepPoint]:
    """Explicit weight vectors (one weight per input, input order)."""
    points = []
    for v in vectors:
        domain = [w for i, w in enumerate(v) if i != rm_index]
        points.append(
            SweepPoint("w=" + ",".join(_fmt(w) for w in domain), tuple(v), all(w == 0 for w in domain))
        )
    labels = [p.label for p in points]
    if len(set(labels)) != len(labels):
        raise OptionError("--weights: two vectors give the same domain weights")
    return points


def baseline_point(n_inputs: int, rm_index: int, single_domain: bool) -> SweepPoint:
    weights = tuple(1.0 if i == rm_index else 0.0 for i in range(n_inputs))
    label = "alpha=0" if single_domain else "w=" + ",".join("0" for _ in range(n_inputs - 1))
    return SweepPoint(label, weights, True)


# --- evaluations --------------------------------------------------------------------------


def load_evaluations(
    pairs: Sequence[Path], val_pairs: Path | None, candidates: Sequence[Path], ns: Sequence[int]
) -> tuple[tuple[PairEvaluation, ...], tuple[BestOfNEvaluation, ...]]:
    """Read every data file once (strictly typed: see `scoring`), names unique by file stem."""
    names: set[str] = set()

    def name_of(path: Path) -> str:
        base = path.name.removesuffix(".jsonl").removesuffix(".json")
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.add(name)
        return name

    pair_evals = []
    for path, validation in [*((p, False) for p in pairs), *([(val_pairs, True)] if val_pairs else [])]:
        loaded = load_preferences(path)
        pair_evals.append(
            PairEvaluation(
                name_of(path), Path(path), loaded.pairs, loaded.autoj_ties, validation, loaded.rewardbench2
            )
        )
    bon_evals = []
    for path in candidates:
        sets = tuple(load_candidates(path))
        usable = [n for n in ns if any(len(s.candidates) >= n for s in sets)]
        if not usable:
            raise InputError(
                f"{path}: no prompt has {min(ns)} or more candidates for --n {','.join(map(str, ns))}"
            )
        bon_evals.append(BestOfNEvaluation(name_of(path), Path(path), sets, tuple(ns)))
    return tuple(pair_evals), tuple(bon_evals)


# --- the results file ---------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    """A data file's SHA-256, or a cached dataset's identity (`datasets.DataSource.sha256`)."""
    from lazymerge.evaluation.datasets import resolve_data

    return resolve_data(path).sha256()


def _input_paths(spec: SweepSpec) -> list[Path]:
    """The model inputs a sweep's results depend on: its inputs, then the base model if any."""
    return read_paths(spec.inputs, spec.merge)


def input_identities(spec: SweepSpec, hash_weights: bool = False) -> list[InputIdentity]:
    """Each model input's identity now (see `lazymerge.provenance`)."""
    return identify_inputs(_input_paths(spec), hash_weights)


#: Merge options that change no merged weight (memory and I/O only), left out of the fingerprint.
_MERGE_IO_OPTIONS = frozenset(
    {
        "weights",
        "alphas",
        "shard_size",
        "max_memory",
        "chunk_elems",
        "block_elems",
        "max_points",
        "direct_io",
        "base",
    }
)


def fingerprint(spec: SweepSpec) -> dict[str, Any]:
    """The data and settings results depend on (the model inputs' identity is kept beside it,
    see `input_identities`): a results file made under another fingerprint is not mixed in."""
    m = spec.merge
    return {
        "inputs": [str(p) for p in spec.inputs],
        "base": str(m.base) if m.base is not None else None,
        "pairs": [
            f"{e.name}:{'val' if e.validation else 'test'}#{_sha256_file(e.path)[:32]}"
            for e in spec.pair_evals
        ],
        "candidates": [
            f"{e.name}:{','.join(map(str, e.ns))}#{_sha256_file(e.path)[:32]}" for e in spec.bon_evals
        ],
        "merge": {
            f.name: _json_value(getattr(m, f.name))
            for f in dataclasses.fields(m)
            # (no --tensor-weights: left out, so sweeps made before the option resume)
            if f.name not in _MERGE_IO_OPTIONS and not (f.name == "tensor_weights" and not m.tensor_weights)
        },
        # the device kind, not its number: a resumed sweep may run on another GPU; an untied
        # --lm-check head (tied: the identity sweeps had before untied heads)
        "scoring": {
            **spec.load.record(),
            "device": spec.load.device.split(":")[0],
            **({"lm_head": spec.lm_head.record()} if spec.lm_head and spec.lm_head.kind != "tied" else {}),
        },
    }


def _json_value(value: Any) -> Any:
    """A setting as its results file holds it (tuples as lists, paths as text), so that the
    fingerprint of a resumed sweep compares equal to the one read back."""
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    return str(value) if isinstance(value, Path) else value


#: Largest results file read back (a point's record is about 20 bytes per text scored).
MAX_RESULTS_BYTES = 256 << 20
#: Longest integer a results line may hold (sizes, times and counts are under 20 digits).
_MAX_INT_DIGITS = 30
#: Most lists and objects in one line: a point holds one list per candidate set or RewardBench 2
#: row and a few more (GSM8K best-of-16: 1,319 sets; RewardBench 2: 1,865 rows).
_MAX_CONTAINERS = 1_000_000
#: Longest point label (labels are made from the weights: a few dozen characters).
_MAX_LABEL = 1000
_RECORDS = ("sweep", "point", "identity")


def _strict_json(line: bytes, where: str) -> Any:
    def no_constant(name: str) -> Any:
        raise InputError(f"{where}: holds {name}, which is not a number results may hold")

    def small_int(digits: str) -> int:
        if len(digits) > _MAX_INT_DIGITS:
            raise InputError(f"{where}: holds an integer of {len(digits):,} digits; not a sweep record")
        return int(digits)

    try:
        return json.loads(line, parse_constant=no_constant, parse_int=small_int)
    except RecursionError:
        raise InputError(f"{where}: nested too deeply; this is not a lazymerge sweep file") from None
    except ValueError:
        raise InputError(f"{where}: is not JSON; this is not a lazymerge sweep file") from None


@dataclass
class ResultsFile:
    """A sweep's results file as read back: its header, the input identity it records, its points."""

    header: dict[str, Any] | None
    identity: list[Any] | None
    points: dict[str, dict[str, Any]]
    #: line number of each point, for messages
    lines: dict[str, int]
    complete: int
    #: line number of the identity record in force (the header's, or a later `identity` line)
    identity_line: int = 1


def _complete_lines(path: Path) -> bytes:
    """The file's complete lines (a last line without its newline is a run killed while
    appending), within the size limit."""
    try:
        if path.stat().st_size > MAX_RESULTS_BYTES:
            raise InputError(
                f"{path}: over {format_bytes(MAX_RESULTS_BYTES)}; not a results file of this sweep"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return raw[: raw.rfind(b"\n") + 1]


def _parse_record(path: Path, line: bytes, number: int) -> tuple[dict[str, Any], str]:
    """One line as a sweep record and its kind; the header first and only first."""
    where = f"{path}: line {number}"
    # (a line of empty lists parses to about 28 times its size: count containers first)
    if line.count(b"[") + line.count(b"{") > _MAX_CONTAINERS:
        raise InputError(
            f"{where}: holds more than {_MAX_CONTAINERS:,} lists and objects; not a sweep record"
        )
    record = _strict_json(line, where)
    kind = record.get("record") if isinstance(record, dict) else None
    if not isinstance(record, dict) or kind not in _RECORDS:
        raise InputError(
            f"{where}: not a lazymerge sweep record (an object whose record is {', '.join(_RECORDS)})"
        )
    if (number == 1) != (kind == "sweep"):
        raise InputError(
            f"{path}: not a lazymerge sweep results file (no header line)"
            if number == 1
            else f"{where}: a second header line"
        )
    if kind == "sweep" and not isinstance(record.get("fingerprint"), dict):
        raise InputError(f"{where}: the header has no fingerprint object")
    return record, kind


def _add_point(out: ResultsFile, record: dict[str, Any], where: str, number: int) -> None:
    label = record.get("label")
    if not isinstance(label, str) or not 0 < len(label) <= _MAX_LABEL:
        raise InputError(f"{where}: a point's label must be a string of 1 to {_MAX_LABEL} characters")
    if label in out.points:
        raise InputError(
            f"{where}: point {label[:100]} is recorded twice (first on line {out.lines[label]}); "
            "results must not be mixed: use --restart"
        )
    out.points[label], out.lines[label] = record, number


def read_results_file(path: Path) -> ResultsFile:
    """Read a results file (untrusted: every line checked for what it is and how it nests; the
    points' shapes are checked against a sweep by `check_points`).

    A last line without its newline (a run killed while appending) is not a finished point. A
    point recorded twice is refused.

    Raises:
        InputError naming the file and line.
    """
    if not path.exists():
        return ResultsFile(None, None, {}, {}, 0)
    complete = _complete_lines(path)
    out = ResultsFile(None, None, {}, {}, len(complete))
    for number, line in enumerate(complete.splitlines(), start=1):
        record, kind = _parse_record(path, line, number)
        if kind not in ("sweep", "identity"):
            _add_point(out, record, f"{path}: line {number}", number)
            continue
        if kind == "sweep":
            out.header = record
        identity = record.get("identity")
        if identity is not None and not isinstance(identity, list):
            raise InputError(f"{path}: line {number}: identity must be a list")
        out.identity, out.identity_line = identity, number
    return out


def read_results(path: Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]], int]:
    """(header, finished points by label, byte length of the complete lines); see `read_results_file`."""
    results = read_results_file(path)
    return results.header, results.points, results.complete


def _finite_list(value: Any, length: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _point_problem(spec: SweepSpec, record: dict[str, Any]) -> str | None:
    """What is wrong with a point's record for this sweep, or None."""
    weights = record.get("weights")
    if not _finite_list(weights, len(spec.inputs)):
        return f"weights must be {len(spec.inputs)} finite numbers"
    if not isinstance(record.get("baseline"), bool):
        return "baseline must be true or false"
    pairs = {e.name: len(e.pairs) for e in spec.pair_evals if not e.rewardbench2}
    got = record.get("pairs")
    if not isinstance(got, dict) or set(got) != set(pairs):
        return f"pairs must hold {', '.join(sorted(pairs)) or 'nothing'}"
    for name, n in pairs.items():
        entry = got[name]
        if not isinstance(entry, dict) or not all(
            _finite_list(entry.get(k), n) for k in ("chosen", "rejected")
        ):
            return f"pairs {name[:100]}: chosen and rejected must be {n} finite rewards each"
    nested = [
        ("best_of_n", {b.name: [len(s.candidates) for s in b.sets] for b in spec.bon_evals}),
        (
            "rewardbench2",
            {e.name: [len(r.completions) for r in e.rewardbench2] for e in spec.pair_evals if e.rewardbench2},
        ),
    ]
    for key, shapes in nested:
        got = record.get(key, {} if not shapes else None)
        if not isinstance(got, dict) or set(got) != set(shapes):
            return f"{key} must hold {', '.join(sorted(shapes)) or 'nothing'}"
        for name, lengths in shapes.items():
            rows = got[name].get("rewards") if isinstance(got[name], dict) else None
            if not (
                isinstance(rows, list)
                and len(rows) == len(lengths)
                and all(_finite_list(r, n) for r, n in zip(rows, lengths, strict=True))
            ):
                return f"{key} {name[:100]}: rewards must be {len(lengths)} lists of finite rewards, one per prompt"
    if spec.load.lm_check and (problem := lm_record_problem(record.get("lm_check"), pairs)):
        return problem
    for key in ("build_s", "score_s"):
        if not _finite_list([record.get(key)], 1):
            return f"{key} must be a finite number"
    return None


def check_points(spec: SweepSpec, path: Path, results: ResultsFile) -> None:
    """Every recorded point has the shape this sweep gives a point: its weights, and one finite
    reward per text of every evaluation.

    Raises:
        InputError naming the file, line and what is wrong.
    """
    grid = {p.label: p for p in spec.points}
    for label, record in results.points.items():
        problem = _point_problem(spec, record)
        point = grid.get(label)
        if problem is None and point is not None:
            if record["weights"] != list(point.weights) or record["baseline"] != point.baseline:
                problem = (
                    f"weights {_describe(record['weights'])} (baseline {record['baseline']}), but this sweep's "
                    f"point {label[:100]} has weights {_describe(list(point.weights))} (baseline {point.baseline})"
                )
        if problem is not None:
            raise InputError(f"{path}: line {results.lines[label]} (point {label[:100]}): {problem}")


def _describe(value: Any) -> str:
    """A value from a results file for a message: short values as they are, others by type and size."""
    if isinstance(value, str) and len(value) > 60:
        return f"{json.dumps(value[:60])}... ({len(value)} characters)"
    scalar = (str, int, float, bool, type(None))
    short_list = (
        isinstance(value, list)
        and len(value) <= 16
        and all(isinstance(v, scalar) and not (isinstance(v, str) and len(v) > 40) for v in value)
    )
    text = json.dumps(value) if isinstance(value, scalar) or short_list else None
    if text is not None and len(text) <= 80:
        return text
    size = len(value) if isinstance(value, (list, dict)) else 0
    return f"a {type(value).__name__} of {size} items" if size else f"a {type(value).__name__}"


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{str(key)[:100]} ({_describe(a)} then, {_describe(b)} now)")
    return out


def _refuse(results: Path, what: str, diffs: list[str]) -> OptionError:
    return OptionError(
        f"{results}: made with {what}: {'; '.join(diffs[:3])}"
        + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        + "; use another folder, or --restart to discard those results"
    )


def _append(path: Path, record: dict[str, Any]) -> None:
    line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
    try:
        with open(path, "ab") as fh:
            start = fh.tell()
            try:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            except OSError:
                fh.truncate(start)  # no partial line, and no empty results file, is left behind
                raise
    except OSError as exc:
        if path.exists() and path.stat().st_size == 0:
            path.unlink()
        raise OutputError(f"{path}: cannot append a finished point ({exc.strerror or exc})") from None


def _header(spec: SweepSpec, fp: dict[str, Any]) -> dict[str, Any]:
    identity = [i.to_dict() for i in input_identities(spec, hash_weights=spec.rehash)]
    return {
        "record": "sweep",
        "written_by": f"lazymerge {__version__}",
        "fingerprint": fp,
        "identity": identity,
    }


def _check_identity(spec: SweepSpec, results: Path, recorded: list[Any] | None, line: int = 1) -> None:
    """Refuse to resume when an input changed since its results were scored; with `rehash`,
    prove by content the weights are the same and record their identity now."""
    if recorded is None:
        raise OptionError(
            f"{results}: made by an earlier lazymerge that did not record the inputs' identity, so these "
            "results cannot be checked against the models now; use another folder, or --restart to rescore"
        )
    old = [identity_from_dict(doc, f"{results}: line {line}") for doc in recorded]
    diffs, now = compare_inputs(old, input_identities(spec), spec.rehash)
    if diffs:
        raise _refuse(results, "other inputs", diffs)
    if [i.to_dict() for i in now] != recorded:  # same content, new stat (copied, touched): remember it
        _append(results, {"record": "identity", "identity": [i.to_dict() for i in now]})


def _refuse_linked(path: Path) -> None:
    """Refuse a sweep file that is a link (symbolic or hard) or not a regular file."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        what = (
            "a symbolic link"
            if stat.S_ISLNK(st.st_mode)
            else "not a regular file"
            if not stat.S_ISREG(st.st_mode)
            else "a hard link"
        )
        raise OutputError(
            f"{path}: is {what}; a sweep keeps its own files (another sweep could write it under "
            "another lock): remove it, or choose another sweep folder"
        )


def _prepare_folder(spec: SweepSpec, fp: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Create or reuse the sweep folder; return the points already finished."""
    out = spec.out
    from lazymerge.evaluation.datasets import data_paths

    data = [*(e.path for e in spec.pair_evals), *(e.path for e in spec.bon_evals)]
    sources = [*spec.inputs, *(f for d in data for f in data_paths(d))]
    if spec.merge.base is not None:
        sources.append(spec.merge.base)
    check_against_inputs(out, sources)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file; a sweep writes a folder")
    results = out / RESULTS
    if out.is_dir():
        from lazymerge.io.outputs import remove_stale_temporaries_in

        # a report write killed half-way leaves its temporary: lazymerge's own, not foreign
        remove_stale_temporaries_in(out)
        foreign = [p.name for p in out.iterdir() if p.name not in (*SWEEP_FILES, "models")]
        if foreign or (any(out.iterdir()) and not results.exists()):
            raise OutputError(
                f"{out}: holds files a lazymerge sweep did not write ({', '.join(foreign[:3]) or 'no ' + RESULTS}); "
                "choose another sweep folder"
            )
        for name in SWEEP_FILES:
            # the folder's lock guards its own files only: one linked from elsewhere (a symlink,
            # or a hard link) could be appended to by another sweep under another lock
            _refuse_linked(out / name)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create ({exc.strerror or exc})") from None
    if spec.restart:
        for name in SWEEP_FILES:
            (out / name).unlink(missing_ok=True)
    found = read_results_file(results)
    if found.header is None:
        for name in SWEEP_FILES:
            (out / name).unlink(missing_ok=True)
        _append(results, _header(spec, fp))
        return {}
    if found.header.get("fingerprint") != fp:
        raise _refuse(results, "other data or settings", _differences(found.header["fingerprint"], fp))
    check_points(spec, results, found)
    if results.stat().st_size != found.complete:  # a point cut off by a kill: drop its partial line
        with open(results, "r+b") as fh:
            fh.truncate(found.complete)
            os.fsync(fh.fileno())
    _check_identity(spec, results, found.identity, found.identity_line)
    return found.points


# --- scoring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedTexts:
    """Every text of every evaluation, formatted and tokenized once for the whole sweep."""

    encoded: dict[str, list[int]]
    #: per pair evaluation: (chosen texts, rejected texts), pair order
    pair_texts: dict[str, tuple[list[str], list[str]]]
    #: per best-of-N evaluation: the candidates' texts, prompt by prompt
    bon_texts: dict[str, list[list[str]]]
    #: per RewardBench 2 evaluation: each row's completions' texts (chosen first)
    rb2_texts: dict[str, list[list[str]]] = field(default_factory=dict)


def prepare_texts(spec: SweepSpec, formatter: Any) -> PreparedTexts:
    """Format with the output tokenizer's chat template and tokenize, once."""
    pair_texts = {
        e.name: (
            [formatter.format_text(p.prompt, p.chosen) for p in e.pairs],
            [formatter.format_text(p.prompt, p.rejected) for p in e.pairs],
        )
        for e in spec.pair_evals
        if not e.rewardbench2
    }
    rb2_texts = {
        e.name: [[formatter.format_text(r.prompt, c) for c in r.completions] for r in e.rewardbench2]
        for e in spec.pair_evals
        if e.rewardbench2
    }
    bon_texts = {
        b.name: [[formatter.format_text(s.prompt, c) for c in s.candidates] for s in b.sets]
        for b in spec.bon_evals
    }
    every = [t for chosen, rejected in pair_texts.values() for t in (*chosen, *rejected)]
    every += [t for sets in (*bon_texts.values(), *rb2_texts.values()) for texts in sets for t in texts]
    return PreparedTexts(formatter.encode_all(every), pair_texts, bon_texts, rb2_texts)


@dataclass
class ResidentState:
    """A resident sweep's inputs in memory (`resident.ResidentCheckpoint`) and the model the
    first point built, which each later point overwrites."""

    checkpoints: list[Any]
    model: Any = None
    #: seconds the inputs took to read into memory, recorded with the first point built
    read_s: float = 0.0


def _build_point_model(
    spec: SweepSpec, point: SweepPoint, resident: ResidentState | None
) -> tuple[Any, int, bool]:
    """The point's merged reward model: written and loaded (`--write`), formed in place from the
    resident inputs, or built in memory from the files; with the bytes written and whether this
    was the resident model's first build."""
    from lazymerge.evaluation.in_memory import load_merged_reward_model
    from lazymerge.evaluation.rewards import load_reward_model

    options = point_options(spec.merge, point)
    if spec.write:
        from lazymerge.merge.api import merge

        folder = spec.out / "models" / _slug(point.label)
        written = merge(spec.inputs, folder, options, force=folder.exists()).bytes_written
        return load_reward_model(folder, spec.load, spill_dir=spec.out), written, False
    if resident is not None:
        first_built = resident.model is None
        resident.model = load_merged_reward_model(
            spec.inputs, options, spec.load, checkpoints=resident.checkpoints, into=resident.model
        )
        return resident.model, 0, first_built
    return load_merged_reward_model(spec.inputs, options, spec.load, spill_dir=spec.out), 0, False


def _score_point_texts(spec: SweepSpec, rm: Any, texts: PreparedTexts, point: SweepPoint) -> dict[str, float]:
    try:
        rewards: dict[str, float] = rm.score_encoded(texts.encoded)
        return rewards
    except NonFiniteRewardError as exc:
        # named by the data file and line it came from, and the point that scored it
        rows: list[tuple[Path, Sequence[Pair | Rb2Row | CandidateSet]]]
        rows = [(e.path, e.pairs or e.rewardbench2) for e in spec.pair_evals]
        rows += [(b.path, b.sets) for b in spec.bon_evals]
        where = text_source(rows, exc.text, rm.format_text) or "a text"
        raise exc.at(f"{where} at sweep point {point.label}") from None


def _rewards_by_file(texts: PreparedTexts, rewards: dict[str, float]) -> dict[str, Any]:
    """A point's rewards laid out as results.jsonl records them, per evaluation file."""
    out: dict[str, Any] = {
        "pairs": {
            name: {"chosen": [rewards[t] for t in chosen], "rejected": [rewards[t] for t in rejected]}
            for name, (chosen, rejected) in texts.pair_texts.items()
        },
        "best_of_n": {
            name: {"rewards": [[rewards[t] for t in candidates] for candidates in sets]}
            for name, sets in texts.bon_texts.items()
        },
    }
    if texts.rb2_texts:
        out["rewardbench2"] = {
            name: {"rewards": [[rewards[t] for t in completions] for completions in rows]}
            for name, rows in texts.rb2_texts.items()
        }
    return out


def score_point(
    spec: SweepSpec, texts: PreparedTexts, point: SweepPoint, resident: ResidentState | None = None
) -> dict[str, Any]:
    """Build one point's merged reward model (in memory, from `resident` inputs when given, or
    written and loaded with `--write`), score every prepared text, and return the point's record
    for results.jsonl. Runs in the sweep's own process, or in a Ray worker (`ray_sweep`)."""
    from lazymerge.memory import PeakRssSampler

    _gpu_reset(spec.load.device)
    t0 = time.monotonic()
    with PeakRssSampler() as sampler:
        rm, written, first_built = _build_point_model(spec, point, resident)
        t1 = time.monotonic()
        rewards = _score_point_texts(spec, rm, texts, point)
        t2 = time.monotonic()
        computed = rm.scoring_stats.to_dict() if rm.scoring_stats is not None else None
        stream = _stream_record(rm, texts)
        lm = _lm_record(spec, rm, texts, point) if spec.lm_head is not None else None
        t3 = time.monotonic()
        del rm
    peak_gpu = _gpu_peak(spec.load.device)
    _gpu_reset(spec.load.device)
    return {
        "record": "point",
        "label": point.label,
        "weights": list(point.weights),
        "baseline": point.baseline,
        **_rewards_by_file(texts, rewards),
        "resident": resident is not None,
        **({"resident_read_s": round(resident.read_s, 3)} if resident is not None and first_built else {}),
        "computed": computed,
        "build_s": round(t1 - t0, 3),
        "score_s": round(t2 - t1, 3),
        "bytes_written": written,
        "peak_rss": sampler.peak.total,
        "peak_rss_anon": sampler.peak.anon,
        "peak_rss_file": sampler.peak.file,
        "peak_gpu_memory": peak_gpu,
        **({"stream": stream} if stream is not None else {}),
        **({"lm_check": lm, "lm_check_s": round(t3 - t2, 3)} if lm is not None else {}),
    }


def _lm_record(spec: SweepSpec, rm: Any, texts: PreparedTexts, point: SweepPoint) -> dict[str, Any]:
    """--lm-check: per pair file, the mean token log-likelihood of each chosen and rejected
    response under the point's backbone and `spec.lm_head` (`lm_check.point_likelihoods`)."""
    from lazymerge.evaluation.layer_stream import LayerStreamedModel
    from lazymerge.merge.api import open_inputs
    from lazymerge.merge.plan import plan_merge

    assert spec.lm_head is not None
    if isinstance(rm.model, LayerStreamedModel):
        raise IncompatibleInputsError(
            f"sweep point {point.label}: --lm-check reads a model in memory; this one is scored layer by "
            "layer (it did not fit --device-memory): leave out --lm-check or raise --device-memory"
        )
    pairs = {
        name: [(texts.encoded[c], texts.encoded[r]) for c, r in zip(chosen, rejected, strict=True)]
        for name, (chosen, rejected) in texts.pair_texts.items()
    }
    options = point_options(spec.merge, point)
    # an untied head is read from the files (a resident sweep holds the merged tensors only)
    checkpoints = open_inputs(read_paths(spec.inputs, options)) if spec.lm_head.kind == "untied" else []
    try:
        plan = plan_merge(checkpoints, options, Path("in-memory")) if checkpoints else None
        return point_likelihoods(
            spec.lm_head, rm.model, rm.device, plan, checkpoints, pairs, f"sweep point {point.label}"
        )
    finally:
        for ckpt in checkpoints:
            ckpt.close()


def _stream_record(rm: Any, texts: PreparedTexts) -> dict[str, Any] | None:
    """A layer-streamed point's pass (bytes, seconds) and its prediction, to set beside the
    point's measured peaks; None for a model in memory."""
    from lazymerge.evaluation.layer_stream import LayerStreamedModel, predict_stream
    from lazymerge.evaluation.prefix_scoring import default_batch_tokens

    model = rm.model
    if not isinstance(model, LayerStreamedModel) or model.stream_stats is None:
        return None
    budget = rm.batch_tokens or default_batch_tokens(rm.device)
    prediction = predict_stream(model, texts.encoded, budget, rm.batch_size)
    return {**model.stream_stats.to_dict(), "prediction": prediction.to_dict()}


def _stream_prediction(spec: SweepSpec, plan: MergePlan, texts: PreparedTexts) -> str:
    """The first point's layer-streamed prediction, in one line (no weight is read)."""
    from lazymerge.evaluation.layer_stream import predict_stream, stream_plan
    from lazymerge.evaluation.prefix_scoring import default_batch_tokens
    from lazymerge.merge.api import open_inputs

    score = spec.load
    checkpoints = open_inputs(read_paths(spec.inputs, spec.merge))
    model = stream_plan(plan, checkpoints, score, score.max_activations, spec.out)
    try:
        budget = score.batch_tokens or default_batch_tokens(score.device)
        return predict_stream(model, texts.encoded, budget, score.batch_size).format()
    finally:
        model.close()


#: Runs the points still to do: (spec, prepared texts, points, append a finished record, echo).
Executor = Callable[
    [SweepSpec, PreparedTexts, list[SweepPoint], Callable[[dict[str, Any]], None], Callable[[str], None]],
    None,
]


def local_executor(
    spec: SweepSpec,
    texts: PreparedTexts,
    todo: list[SweepPoint],
    finished: Callable[[dict[str, Any]], None],
    echo: Callable[[str], None],
) -> None:
    """One point after another in this process, with the inputs resident in memory when
    `spec.resident` allows (`resident.decide`)."""
    state = _resident_state(spec, todo, echo) if todo else None
    try:
        started = time.monotonic()
        for number, point in enumerate(todo, start=1):
            record = score_point(spec, texts, point, state)
            finished(record)
            if number == 1 and record["computed"] is not None:  # the same texts every point
                echo("  " + ScoringStats.from_dict(record["computed"]).format())
            eta = (time.monotonic() - started) / number * (len(todo) - number)
            echo(
                f"[{number}/{len(todo)}] {point.label}: build {record['build_s']:.1f} s, "
                f"score {record['score_s']:.1f} s; ETA {format_duration(eta)}"
            )
    finally:
        if state is not None:
            state.model = None
            for ckpt in state.checkpoints:
                ckpt.close()


def _resident_state(
    spec: SweepSpec, todo: list[SweepPoint], echo: Callable[[str], None]
) -> ResidentState | None:
    """Read the tensors every point to do merges into memory, when `spec.resident` says so."""
    import psutil

    from lazymerge.evaluation import resident
    from lazymerge.merge.api import open_inputs
    from lazymerge.merge.plan import plan_merge

    if spec.resident == "off":
        echo(resident.decide("off", 0, 0, 0).line)
        return None
    checkpoints = open_inputs(read_paths(spec.inputs, spec.merge))
    try:
        first = plan_merge(checkpoints, point_options(spec.merge, todo[0]), Path("in-memory"))
        # one plan at a time (a plan holds the tokenizer files' bytes), every tensor any point reads
        plans = (plan_merge(checkpoints, point_options(spec.merge, p), Path("in-memory")) for p in todo[1:])
        sources = resident.plan_sources(itertools.chain([first], plans), len(checkpoints))
        input_bytes = sum(info.nbytes for infos in sources for info in infos)
        model_bytes = 0 if spec.load.on_gpu else spec.load.model_bytes(first.parameters)
        why_not = (
            "--write scores each point from its written folder"
            if spec.write
            else "--stream-layers reads each layer from the files"
            if spec.load.stream_layers
            else None
        )
        decision = resident.decide(
            spec.resident, input_bytes, model_bytes, psutil.virtual_memory().available, why_not
        )
        echo(decision.line)
        if not decision.resident:
            return None
        t0 = time.monotonic()
        held = resident.open_resident(checkpoints, sources)
        checkpoints = []  # taken over by the resident ones
        read_s = time.monotonic() - t0
        echo(f"  read {format_bytes(input_bytes)} of inputs into memory in {read_s:.1f} s")
        return ResidentState(list(held), read_s=read_s)
    finally:
        for ckpt in checkpoints:
            ckpt.close()


def _plan_point(spec: SweepSpec, options: MergeOptions) -> MergePlan:
    """The merge plan of one point, from headers alone; refused unless it merges a reward model."""
    from lazymerge.merge.api import open_inputs
    from lazymerge.merge.plan import plan_merge

    checkpoints = open_inputs(read_paths(spec.inputs, options))
    try:
        plan = plan_merge(checkpoints, options, Path("in-memory"))
    finally:
        for ckpt in checkpoints:
            ckpt.close()
    if "reward model" not in plan.roles:
        raise InputError(f"{spec.inputs[0]}: no input is a reward model; a sweep scores merged reward models")
    return plan


def _data_line(spec: SweepSpec, points: int, skipped: int) -> str:
    n_pairs = sum(len(e.pairs) for e in spec.pair_evals)
    n_rb2 = sum(len(e.rewardbench2) for e in spec.pair_evals)
    n_sets = sum(len(b.sets) for b in spec.bon_evals)
    return (
        f"sweep: {points} points ({skipped} already done), {n_pairs} pairs"
        + (f" and {n_rb2} RewardBench 2 prompts" if n_rb2 else "")
        + f" in {len(spec.pair_evals)} file(s), {n_sets} candidate sets in {len(spec.bon_evals)} file(s)"
    )


def _run_todo(
    spec: SweepSpec,
    texts: PreparedTexts,
    todo: list[SweepPoint],
    run: SweepRun,
    echo: Callable[[str], None],
    executor: Executor | None,
) -> LazyMergeError | None:
    """Run the points still to do, each finished record appended as it comes; the failure, if
    some points failed (the finished ones are kept and reported)."""

    def finished(record: dict[str, Any]) -> None:
        _append(spec.out / RESULTS, record)
        run.scored.append(record["label"])

    try:
        (executor or local_executor)(spec, texts, todo, finished, echo)
    except LazyMergeError as exc:
        return exc
    return None


def run_sweep(
    spec: SweepSpec, echo: Callable[[str], None] = lambda line: None, executor: Executor | None = None
) -> SweepRun:
    """Score every point of `spec` not already in its results file, then write the report.

    Args:
        executor: how the points still to do are run (default: here, one after another; see
            `ray_sweep` for a Ray cluster). Each finished record is appended and fsynced
            before the next one.

    Raises:
        OptionError when the results file belongs to another sweep; the merge's and the
        evaluation's own errors.
    """
    from lazymerge.evaluation.in_memory import load_merged_tokenizer
    from lazymerge.evaluation.report import sweep_report

    if not spec.pair_evals and not spec.bon_evals:
        raise OptionError("a sweep needs something to score: --pairs, --val-pairs or --candidates")
    lock = DestinationLock(spec.out)
    try:
        done = _prepare_folder(spec, fingerprint(spec))
        points = list(spec.points)
        if not any(p.baseline for p in points):
            points.insert(0, baseline_point(len(spec.inputs), spec.rm_index, len(spec.inputs) == 2))
        todo = [p for p in points if p.label not in done]
        run = SweepRun(skipped=[p.label for p in points if p.label in done])
        first = point_options(spec.merge, points[0])
        plan = _plan_point(spec, first)
        # the fingerprint keeps the options as given; the points run with the stream if chosen
        load, note = spec.load.streaming_for(plan.parameters, f"{spec.inputs[spec.rm_index]} (merged)")
        spec = dataclasses.replace(spec, load=load)
        if spec.write:
            (spec.out / "models").mkdir(exist_ok=True)
        echo(_data_line(spec, len(points), len(run.skipped)))
        if note is not None:
            echo(f"  {note}")
        if not spec.load.stream_layers:
            echo(_memory_line(spec, plan, len(todo)))
        texts = prepare_texts(spec, load_merged_tokenizer(spec.inputs, first, spec.load))
        tokens = sum(len(v) for v in texts.encoded.values())
        echo(f"  {len(texts.encoded)} distinct texts, {tokens} tokens (tokenized once)")
        if spec.load.stream_layers and todo:
            echo(f"  per point: {_stream_prediction(spec, plan, texts)}")
        failure = _run_todo(spec, texts, todo, run, echo, executor)
        _, records, _ = read_results(spec.out / RESULTS)
        if any(r["baseline"] for r in records.values()):
            run.report = sweep_report(spec, [records[p.label] for p in points if p.label in records])
        if failure is not None:
            raise failure
        return run
    finally:
        lock.release()


def _memory_line(spec: SweepSpec, plan: MergePlan, todo: int) -> str:
    """What a point built in memory takes, and what --write writes."""
    model_bytes = spec.load.model_bytes(plan.parameters)
    on_gpu = spec.load.on_gpu
    host = (0 if on_gpu else model_bytes) + plan.working_memory + 500 * 10**6
    return (
        f"  per point: about {format_bytes(host)} host RAM"
        + (f", {format_bytes(model_bytes)} GPU memory" if on_gpu else "")
        + f"; model files written: {format_bytes(plan.output_bytes * todo) if spec.write else '0 B (in memory)'}"
    )


def point_options(base: MergeOptions, point: SweepPoint) -> MergeOptions:
    """The sweep's merge options with this point's weight vector."""
    return dataclasses.replace(base, weights=point.weights, alphas=None)


def _slug(label: str) -> str:
    return label.replace("=", "-").replace(",", "_")


def _gpu_reset(device: str) -> None:
    """Free the last point's model on the GPU and start this point's peak from zero, so that each
    point's `peak_gpu_memory` is its own."""
    if not device.startswith("cuda"):
        return
    import gc

    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def _check_sweep_flags(
    n_inputs: int, alpha: str | None, grid_step: float | None, weight_vectors: Sequence[str], has_data: bool
) -> None:
    """The sweep's own option rules, before anything is read (OptionError, exit 2)."""
    chosen = [
        name
        for name, given in (("--alpha", alpha), ("--grid", grid_step), ("--weights", weight_vectors))
        if given
    ]
    if len(chosen) > 1:
        raise OptionError(f"give one of --alpha, --grid and --weights, not {' and '.join(chosen)}")
    if n_inputs < 2:
        raise OptionError("a sweep needs a reward model and at least one domain model")
    if alpha is not None and n_inputs != 2:
        raise OptionError(f"--alpha is for one domain model; with {n_inputs - 1} use --grid or --weights")
    if not chosen and n_inputs != 2:
        raise OptionError(f"{n_inputs - 1} domain models: give --grid STEP or --weights")
    if not has_data:
        raise OptionError("a sweep needs something to score: --pairs, --val-pairs or --candidates")


def _parse_weight_vectors(
    weight_vectors: Sequence[str], n_inputs: int, max_points: int
) -> list[tuple[float, ...]]:
    from lazymerge.options import parse_weights

    vectors = [parse_weights(v) for v in weight_vectors]
    for v in vectors:
        if len(v) != n_inputs:
            raise OptionError(f"--weights {','.join(map(_fmt, v))}: {len(v)} weights for {n_inputs} inputs")
    if len(vectors) > max_points:
        raise OptionError(
            f"{len(vectors)} --weights vectors; at most {max_points} (raise it with --max-points)"
        )
    return vectors


def _resolve_sources(inputs: Sequence[Path], options: MergeOptions) -> tuple[list[Any], MergeOptions]:
    """Hugging Face ids as their snapshots in the local cache, local paths made absolute here,
    once, so Ray workers, reports and the results file's identity all see the paths checked
    here; the base model (when given) appended last."""
    sources = [dataclasses.replace(s, path=absolute(s.path)) for s in resolve_inputs(inputs)]
    if options.base is not None:
        base = resolve_input(options.base)
        base = dataclasses.replace(base, path=absolute(base.path))
        options = dataclasses.replace(options, base=base.path)
        sources.append(base)
    return sources, options


def _reward_model_and_lm_head(
    inputs: Sequence[Path], rm: int | None, lm_check: bool
) -> tuple[int, LmHead | None]:
    """The reward model's index among the inputs, and (with `--lm-check`) the LM head its
    backbone is read through, both from headers and configs."""
    from lazymerge.merge.api import open_inputs
    from lazymerge.merge.preflight import preflight
    from lazymerge.merge.recipe import ModelInput

    checkpoints = open_inputs(list(inputs))
    try:
        opened = [ModelInput.open(c) for c in checkpoints]
        # `lazymerge check`'s refusals, in its words, before any data is read or model built
        rm_index, _ = preflight(opened, rm)
        lm_head = choose_lm_head(opened, rm_index) if lm_check and rm_index is not None else None
    finally:
        for ckpt in checkpoints:
            ckpt.close()
    if rm_index is None:
        raise InputError(
            f"{inputs[0]}: no input is a reward model (config.json architectures ending in "
            "ForSequenceClassification; or give --rm N)"
        )
    return rm_index, lm_head


def _absolute_files(
    pair_files: Sequence[Path], val_pairs: Path | None, candidate_files: Sequence[Path]
) -> tuple[list[Path], Path | None, list[Path]]:
    """The data files made absolute (dataset ids resolved in the cache), once, as the inputs are."""
    val = absolute_data(val_pairs) if val_pairs is not None else None
    return [absolute_data(p) for p in pair_files], val, [absolute_data(p) for p in candidate_files]


def _grid_points(
    alphas: Sequence[float] | None,
    step: float | None,
    vectors: list[tuple[float, ...]],
    n: int,
    rm_index: int,
    max_points: int,
) -> list[SweepPoint]:
    """The sweep's points: alphas of one domain model, the simplex grid, or explicit vectors."""
    if alphas is not None:
        return alpha_points(alphas, rm_index)
    if step is not None:
        return simplex_points(step, n, rm_index, max_points)
    return weight_points(vectors, rm_index)


def build_spec(
    inputs: Sequence[Path],
    out: Path,
    *,
    alpha: str | None = None,
    grid_step: float | None = None,
    weight_vectors: Sequence[str] = (),
    pair_files: Sequence[Path] = (),
    val_pairs: Path | None = None,
    candidate_files: Sequence[Path] = (),
    ns: Sequence[int] = (2, 4, 8, 16),
    load: ScoreOptions | dict[str, Any] | None = None,
    write: bool = False,
    restart: bool = False,
    rehash: bool = False,
    resident: str = "auto",
    **merge: Any,
) -> SweepSpec:
    """Check the sweep's options, find the reward model, build the grid and read the data;
    OptionError for option mistakes, found before any model is loaded."""
    max_points = merge.get("max_points", 101)
    has_data = bool(pair_files or candidate_files or val_pairs is not None)
    _check_sweep_flags(len(inputs), alpha, grid_step, weight_vectors, has_data)
    SweepOptions(resident=resident, write=write)  # the sweep's own rules on these two
    one_domain = len(inputs) == 2 and not (grid_step or weight_vectors)
    alphas = parse_alpha(alpha or "0:1:0.1", max_points) if one_domain else None
    vectors = _parse_weight_vectors(weight_vectors, len(inputs), max_points)
    options = MergeOptions(**merge)  # checks method, density, memory, ...
    options.check_inputs(len(inputs))
    sources, options = _resolve_sources(inputs, options)
    pairs, val, candidates = _absolute_files(pair_files, val_pairs, candidate_files)
    inputs = [s.path for s in sources[: len(inputs)]]
    score = load if isinstance(load, ScoreOptions) else ScoreOptions.build(**(load or {}))
    rm_index, lm_head = _reward_model_and_lm_head(inputs, options.rm, score.lm_check)
    rm_source = sources[rm_index]
    points = _grid_points(alphas, grid_step, vectors, len(inputs), rm_index, max_points)
    pair_evals, bon_evals = load_evaluations(pairs, val, candidates, ns)
    if resident == "on" and score.stream_layers:
        raise OptionError("--resident on: --stream-layers reads each layer from the files; use one of them")
    return SweepSpec(
        inputs=tuple(Path(p) for p in inputs),
        out=absolute(out),
        points=tuple(points),
        merge=options,
        load=score,
        pair_evals=pair_evals,
        bon_evals=bon_evals,
        write=write,
        restart=restart,
        rehash=rehash,
        resident=resident,
        domain_names=tuple(
            s.repo_id or Path(s.given).name for s in sources[: len(inputs)] if s is not rm_source
        ),
        rm_index=rm_index,
        sources=tuple(sources),
        lm_head=lm_head,
    )
