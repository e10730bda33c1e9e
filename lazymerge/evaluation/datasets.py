"""Where evaluation data comes from: local files and Hugging Face datasets in the local cache.

A data name (`--pairs`, `--val-pairs`, `--candidates`, `lazymerge convert`) is:

- a local file: JSON Lines (one object per line, read a line at a time), a JSON list (a file
  not named `.jsonl` whose text starts with `[`, at most `MAX_JSON_LIST_BYTES`) or a parquet
  file (`.parquet`, needs pyarrow);
- else `ORG/NAME[@REVISION][:SPLIT]` or `ORG/NAME[@REVISION][:CONFIG:SPLIT]`: the parquet files
  of that split of a dataset in the local Hugging Face cache (`hf download ORG/NAME --repo-type
  dataset` fills it), found by huggingface_hub's own lookup and never downloaded. A local path of
  the same name always wins.

Splits are named by the Hub's parquet layout: `[CONFIG/]SPLIT-00000-of-00001.parquet`,
`data/SPLIT-*.parquet`, `SPLIT.parquet`, or `CONFIG/SPLIT/0000.parquet` (the Hub's converted
parquet); a file under `data/` or at the top belongs to the config `default`. Without a split the
dataset must hold exactly one (else the message lists them).

Every row is untrusted: a dict of JSON-like values, checked field by field by its reader
(`scoring`); parquet files are refused above `MAX_PARQUET_BYTES` of uncompressed data (from their
footer, before any row is read) and only the columns lazymerge reads are decoded.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.errors import EvalDataError, InputError, MissingDependencyError
from lazymerge.io.header import lone_surrogate
from lazymerge.io.small_files import describe_json, open_regular, parse_json, read_small_file

#: Longest line read from a JSON Lines file, in bytes (one RewardBench row is a few KB).
MAX_LINE_BYTES = 16 << 20
#: A JSON list is parsed whole; RewardBench's 2,985 pairs are about 10 MB.
MAX_JSON_LIST_BYTES = 1 << 30
#: Most uncompressed column data read from one parquet file (RewardBench: about 10 MB).
MAX_PARQUET_BYTES = 1 << 30
#: Most parquet files one split may have (the Hub shards at about 500 MB).
MAX_PARQUET_FILES = 1000
#: The columns any lazymerge data reader looks at; other columns are never decoded.
DATA_COLUMNS = (
    "id",
    "prompt",
    "chosen",
    "rejected",
    "subset",
    "num_correct",
    "total_completions",
    "scenario",
    "label",
    "response 1",
    "response 2",
    "candidates",
    "correct",
    "answer",
)
#: ORG/NAME[@REVISION][:CONFIG]:SPLIT; names use the Hub's repository characters.
_DATASET_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})"
    r"(?:@(?P<revision>[\w.][\w./-]{0,255}))?"
    r"(?::(?P<first>[\w.-]{1,128}))?(?::(?P<second>[\w.-]{1,128}))?"
)
_SHARD = re.compile(r"(?P<split>[\w.]+?)(?:-\d{5}-of-\d{5})?")
#: A row as read: (number counted from 1 over the whole source, where it is for messages, row).
Row = tuple[int, str, dict[str, Any]]


@dataclass(frozen=True)
class DatasetId:
    repo_id: str
    revision: str | None
    config: str | None
    split: str | None


def parse_dataset_id(text: str) -> DatasetId | None:
    """The parts of `ORG/NAME[@REVISION][:SPLIT]` or `...[:CONFIG:SPLIT]`, or None when `text`
    does not read as a dataset id (a local-looking name such as `data/pairs.jsonl`)."""
    match = _DATASET_ID.fullmatch(text)
    if match is None or text.endswith((".json", ".jsonl", ".parquet")):
        return None
    repo, revision = match.group("repo"), match.group("revision")
    if ".." in repo or "--" in repo or (revision is not None and ".." in revision.split("/")):
        return None
    first, second = match.group("first"), match.group("second")
    config, split = (first, second) if second is not None else (None, first)
    return DatasetId(repo, revision, config, split)


@dataclass(frozen=True)
class DataSource:
    """A data name and the files read for it.

    Attributes:
        given: the name as given (a path or a dataset id).
        files: the files read, in order (one for a local file; a split's parquet shards).
        repo_id, revision, commit, config, split: where a dataset's files came from (None for a
            local file).
    """

    given: str
    files: tuple[Path, ...]
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    config: str | None = None
    split: str | None = None

    @property
    def from_hub_cache(self) -> bool:
        return self.repo_id is not None

    def sha256(self) -> str:
        """The data's identity: a local file's SHA-256 (as results files always recorded it);
        for a dataset, the SHA-256 of its repository, commit, config, split and each file's
        name and SHA-256, so another split, revision or edited blob is another identity."""
        from lazymerge.provenance import sha256_file

        if self.repo_id is None:
            return sha256_file(self.files[0])
        digest = hashlib.sha256()
        digest.update(f"{self.repo_id}\0{self.commit}\0{self.config}\0{self.split}\n".encode())
        for path in self.files:
            digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
        return digest.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """What a report records of its data (`path` and `sha256`, as before, then the dataset's
        origin when it came from the cache)."""
        out: dict[str, Any] = {"path": self.given, "sha256": self.sha256()}
        if self.repo_id is not None:
            out.update(
                hub_id=self.repo_id,
                revision=self.revision,
                commit=self.commit,
                config=self.config,
                split=self.split,
                files=[str(f) for f in self.files],
            )
        return out


def resolve_data(given: DataSource | str | os.PathLike[str]) -> DataSource:
    """The files a data name stands for (see the module docstring).

    Raises:
        InputError when a dataset id is not in the cache (naming the `hf download` command),
        names no split it has, or has no parquet files; MissingDependencyError without
        huggingface_hub.
    """
    if isinstance(given, DataSource):
        return given
    text = os.fspath(given)
    path = Path(text)
    if path.exists() or path.is_symlink():
        return DataSource(text, (path,))
    parsed = parse_dataset_id(text)
    if parsed is None:
        return DataSource(text, (path,))
    from lazymerge.io.hub_cache import resolve_dataset

    snapshot = resolve_dataset(text, parsed.repo_id, parsed.revision)
    if snapshot.repo_id is None:  # huggingface_hub refused the name: read it as a path
        return DataSource(text, (path,))
    config, split, files = _split_files(text, snapshot.path, parsed)
    return DataSource(text, files, parsed.repo_id, snapshot.revision, snapshot.commit, config, split)


def absolute_data(given: str | os.PathLike[str]) -> Path:
    """A data name as it enters a sweep: a local path made absolute once (as model paths are);
    a dataset id kept as given (it names the cache, not the working folder)."""
    source = resolve_data(given)
    return Path(source.given) if source.from_hub_cache else Path(os.path.abspath(source.given))


def data_paths(given: str | os.PathLike[str]) -> list[Path]:
    """The files read for a data name (for the output rule: no output may be one of them)."""
    return list(resolve_data(given).files)


def _splits(snapshot: Path) -> dict[tuple[str, str], list[Path]]:
    """(config, split) -> its parquet files, sorted, from the Hub's parquet file layout."""
    found: dict[tuple[str, str], list[Path]] = {}
    count = 0
    for root, dirs, names in os.walk(snapshot):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.endswith(".parquet"):
                continue
            count += 1
            if count > MAX_PARQUET_FILES:
                raise InputError(f"{snapshot}: more than {MAX_PARQUET_FILES} parquet files")
            rel = Path(root, name).relative_to(snapshot)
            stem = rel.name.removesuffix(".parquet")
            folders = rel.parts[:-1]
            if stem.isdigit() and folders:  # CONFIG/SPLIT/0000.parquet (the Hub's conversion)
                split, folders = folders[-1], folders[:-1]
            else:
                match = _SHARD.fullmatch(stem)
                split = match.group("split") if match else stem
            config = folders[0] if folders and folders[0] != "data" else "default"
            found.setdefault((config, split), []).append(Path(root, name))
    return found


def _split_files(text: str, snapshot: Path, parsed: DatasetId) -> tuple[str, str, tuple[Path, ...]]:
    splits = _splits(snapshot)
    if not splits:
        raise InputError(f"{text}: the cached dataset ({snapshot}) holds no parquet files")
    choices = ", ".join(f"{c}:{s}" if c != "default" else s for c, s in sorted(splits))
    wanted = [
        key
        for key in sorted(splits)
        if (parsed.split is None or key[1] == parsed.split)
        and (parsed.config is None or key[0] == parsed.config)
    ]
    if len(wanted) > 1 and parsed.config is None and any(c == "default" for c, _ in wanted):
        wanted = [k for k in wanted if k[0] == "default"]
    if len(wanted) != 1:
        asked = "no split" if parsed.split is None else f"split {parsed.split!r}"
        what = "holds several splits" if not wanted or parsed.split is None else "is ambiguous"
        if parsed.split is not None and not wanted:
            what = "is not among its splits"
        raise InputError(
            f"{text}: {asked} {what}; name one as {parsed.repo_id}:SPLIT or "
            f"{parsed.repo_id}:CONFIG:SPLIT (it has {choices})"
        )
    config, split = wanted[0]
    return config, split, tuple(splits[wanted[0]])


def read_rows(source: DataSource | str | os.PathLike[str], error: type[EvalDataError]) -> list[Row]:
    """Every row of a data source, each a dict (see the module docstring for the formats).

    Raises:
        `error` naming the file and line (or row) for a row that is not an object or not text;
        InputError when a file cannot be read; MissingDependencyError for parquet without pyarrow.
    """
    source = resolve_data(source)
    rows: list[Row] = []
    for path in source.files:
        if path.suffix == ".parquet":
            found = _parquet_rows(path, error)
        elif path.suffix != ".jsonl" and _starts_json_list(path):
            found = _json_list_rows(path, error)
        else:
            found = ((n, f"{path}:{n}", r) for n, r in read_jsonl(path, error))
        # numbered over the whole source: a dataset's shards read as one file
        rows.extend((len(rows) + 1, where, row) for _, where, row in found)
    return rows


def _starts_json_list(path: Path) -> bool:
    try:
        with os.fdopen(open_regular(path), "rb") as fh:  # a FIFO must not hang the run
            return fh.read(1 << 12).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"["
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _json_list_rows(path: Path, error: type[EvalDataError]) -> Iterator[Row]:
    raw = read_small_file(path, MAX_JSON_LIST_BYTES)
    doc = parse_json(raw, str(path), error, limit=MAX_JSON_LIST_BYTES, bom=True)
    if not isinstance(doc, list):
        raise error(f"{path}: starts like a JSON list but is not one")
    for n, row in enumerate(doc, start=1):
        where = f"{path}: item {n}"
        if not isinstance(row, dict):
            raise error(f"{where}: is {describe_json(row)}, not a JSON object")
        if b"\\u" in raw:
            found = find_lone_surrogate(row)
            if found is not None:
                raise error(f"{where}: {surrogate_message(found)}")
        yield n, where, row


def _parquet_rows(path: Path, error: type[EvalDataError]) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError(
            f"{path}: reading parquet needs pyarrow: pip install 'lazymerge[eval]' (or pip install pyarrow)"
        ) from None
    fd = open_regular(path)  # InputError for a missing file, a FIFO, a folder
    with os.fdopen(fd, "rb") as fh:
        try:
            parquet = pq.ParquetFile(fh)
            meta = parquet.metadata
            columns = [c for c in DATA_COLUMNS if c in parquet.schema_arrow.names]
            size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            if size > MAX_PARQUET_BYTES:
                raise error(
                    f"{path}: {size:,} bytes of uncompressed data, more than the "
                    f"{MAX_PARQUET_BYTES >> 20} MiB limit for a data file"
                )
            n = 0
            for group in range(meta.num_row_groups):
                for row in parquet.read_row_group(group, columns=columns).to_pylist():
                    n += 1
                    yield n, f"{path}: row {n}", row
        except EvalDataError:
            raise
        except (OSError, ValueError, TypeError, ArithmeticError) as exc:  # pyarrow's ArrowException
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise error(f"{path}: not a readable parquet file ({first})") from None


def read_jsonl(path: Path, error: type[EvalDataError]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of every non-blank line, each a JSON object.

    Lines are read one at a time and at most `MAX_LINE_BYTES` long, so a hostile file costs
    memory for its rows, never for one giant line.

    Raises:
        `error` (naming the file and line) for a line that is too long, not UTF-8, not JSON, nests
        too deeply, repeats a key, is not an object or holds a lone surrogate (an unpaired
        `\\ud800` escape: not text); InputError when the file cannot be read.
    """
    rows = []
    try:
        with os.fdopen(open_regular(Path(path)), "rb") as fh:  # a FIFO must not hang the run
            number = 0
            while True:
                raw = fh.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    break
                number += 1
                row = _jsonl_row(raw, f"{path}:{number}", number == 1, error)
                if row is not None:
                    rows.append((number, row))
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return rows


def _jsonl_row(raw: bytes, where: str, first: bool, error: type[EvalDataError]) -> dict[str, Any] | None:
    """One JSON Lines line as an object, or None for a blank line."""
    if len(raw) > MAX_LINE_BYTES:
        raise error(
            f"{where}: line is longer than the {MAX_LINE_BYTES // (1 << 20)} MiB limit per line; "
            "JSON Lines rows are one object per line"
        )
    body = raw.removeprefix(b"\xef\xbb\xbf") if first else raw
    if not body.strip():
        return None
    row = parse_json(body, where, error, limit=MAX_LINE_BYTES, unit="row")
    if SURROGATE_ESCAPE.search(body) is not None:  # first: not text is worse than a wrong shape
        found = find_lone_surrogate(row)
        if found is not None:
            raise error(f"{where}: {surrogate_message(found)}")
    if not isinstance(row, dict):
        raise error(f"{where}: is {describe_json(row)}, not a JSON object")
    return row


#: A JSON escape that may spell a lone surrogate: only a line holding one is searched for it.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def find_lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate (as `\\udXXX`) in any string or key of a parsed JSON value, or
    None. Only an unpaired escape such as `"\\ud800"` makes one; it is not text (a tokenizer, a
    UTF-8 writer or a terminal fails on it), so a file holding one is refused where it is read."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = lone_surrogate(item)
            if found is not None:
                return found
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def surrogate_message(found: str) -> str:
    return f"holds a lone surrogate ({found}, an unpaired JSON escape), not text"
