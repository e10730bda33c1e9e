"""What a result depends on: one record of its inputs, checked wherever results are reused.

A score depends on the weights, the files beside them that decide the tokens (config, tokenizer,
chat template), the data scored and the settings. `identify_input` records, for one model input:

- every weights file's size, mtime and inode (a `stat`: free, always), and the SHA-256 of its
  tensor data when lazymerge wrote it (the value its header carries) or when asked to hash;
- a digest of every tensor's name, dtype, shape and offset (from the headers);
- the SHA-256 of every companion file present (`hf_folder.COMPANION_FILES` and the index).

The sweep keeps this record in its results file and compares it on every resume
(`compare_inputs`); `eval`/`bon --out` reports carry it; Ray's workers compare the parts that
do not depend on which machine holds the files (`portable`).

Costs: the check is a few `stat` calls plus reading the headers and companion files (well under
a second for a 7B folder). Hashing reads every weights byte once (`hash_weights`): for a 7B
model in bf16 (13.5 GB) about as long as reading it from the disk, 5-15 s on an NVMe SSD.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lazymerge.errors import InputError
from lazymerge.io.hf_folder import COMPANION_FILES
from lazymerge.io.reader import Checkpoint
from lazymerge.io.small_files import open_regular

#: Key of the SHA-256 of a shard's tensor data in the headers lazymerge writes.
DATA_HASH_KEY = "lazymerge_data_sha256"
_HASH_BLOCK = 8 << 20


@dataclass(frozen=True)
class WeightsFile:
    """One weights file of an input, as `stat` saw it, and its data's SHA-256 when known."""

    name: str
    size: int
    mtime_ns: int
    inode: int
    #: SHA-256 of the tensor data (safetensors: the bytes after the header; other formats: the
    #: whole file); None when neither lazymerge's header carries it nor it was hashed.
    sha256: str | None = None
    #: The inode's change time: any write moves it, and no user call can set it back (an edit
    #: that restores the mtime still changes it).
    ctime_ns: int = 0

    def same_stat(self, other: WeightsFile) -> bool:
        return (self.size, self.mtime_ns, self.inode, self.ctime_ns) == (
            other.size,
            other.mtime_ns,
            other.inode,
            other.ctime_ns,
        )


@dataclass(frozen=True)
class InputIdentity:
    """A model input: where it was read, its weights files, tensors and companion files."""

    path: str
    weights: tuple[WeightsFile, ...]
    #: SHA-256 over every tensor's name, dtype, shape, file and offset
    tensors: str
    #: companion file name -> SHA-256 of its bytes (only files present)
    companions: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "weights": [asdict(w) for w in self.weights],
            "tensors": self.tensors,
            "companions": dict(sorted(self.companions.items())),
        }

    def published(self, name: str) -> dict[str, Any]:
        """What a merged output records of this input (its header metadata, its card): `name`
        in place of the path (no local path is published), no inode, no mtime."""
        return {
            "name": name,
            "weights": [[_utf8(w.name), w.size, w.sha256] for w in self.weights],
            "tensors": self.tensors,
            "companions": {_utf8(n): h for n, h in sorted(self.companions.items())},
        }

    def portable(self) -> dict[str, Any]:
        """What another machine with the same files sees too (no inode, no mtime)."""
        return {
            "path": self.path,
            "weights": [(w.name, w.size, w.sha256) for w in self.weights],
            "tensors": self.tensors,
            "companions": dict(sorted(self.companions.items())),
        }


def _utf8(name: str) -> str:
    """A file name as valid UTF-8 (undecodable bytes as `\\xNN` escapes), for what is published."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def absolute(path: str | os.PathLike[str]) -> Path:
    """A path as it enters lazymerge, made absolute once (not resolving symlinks: a cache
    snapshot stays a snapshot path), so every later reader sees the path that was checked."""
    return Path(os.path.abspath(path))


def sha256_file(path: Path, start: int = 0) -> str:
    """SHA-256 of a regular file's bytes from `start` on.

    Raises:
        InputError naming the file when it cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with os.fdopen(open_regular(path), "rb") as fh:
            fh.seek(start)
            for block in iter(lambda: fh.read(_HASH_BLOCK), b""):
                digest.update(block)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def _recorded_hash(metadata: dict[str, str]) -> str | None:
    """The data hash a lazymerge header carries, when well formed."""
    recorded = metadata.get(DATA_HASH_KEY)
    valid = (
        isinstance(recorded, str) and len(recorded) == 64 and all(c in "0123456789abcdef" for c in recorded)
    )
    return recorded if valid else None


def _data_start(path: Path) -> tuple[int, str | None]:
    """(offset of the tensor data, the data hash lazymerge's header carries) of a weights file."""
    if not path.name.endswith(".safetensors"):
        return 0, None
    from lazymerge.io.reader import read_header_file

    header = read_header_file(path)
    return header.data_start, _recorded_hash(header.metadata)


def _companion_files(folder: Path) -> list[Path]:
    names = set(COMPANION_FILES)
    names.update(p.name for p in folder.glob("*.index.json"))
    return [folder / n for n in sorted(names) if (folder / n).is_file()]


def identify_input(path: Path, hash_weights: bool = False) -> InputIdentity:
    """The identity of one model input (a file, an index or a model folder).

    Args:
        hash_weights: also compute the SHA-256 of every weights file whose header does not
            carry it (reads all the weights once).

    Raises:
        InputError (and the header errors) naming the file that cannot be read.
    """
    with Checkpoint.open(path) as ckpt:
        return identify_checkpoint(ckpt, hash_weights)


def identify_checkpoint(ckpt: Checkpoint, hash_weights: bool = False) -> InputIdentity:
    """`identify_input` of an input already open (its headers are not read again)."""
    path = Path(ckpt.path)
    digest = hashlib.sha256()
    files = ckpt.files
    for name in sorted(ckpt):
        info = ckpt[name]
        digest.update(
            f"{name}\0{info.dtype}\0{info.shape}\0{info.path.name}\0{info.offset}\0{info.nbytes}\n".encode(
                "utf-8", "surrogateescape"
            )
        )
    weights = []
    for file in files:
        st = ckpt.stat_when_opened(file)  # the file that was read, not whatever is there now
        try:
            st = st or os.stat(file)
        except OSError as exc:
            raise InputError(f"{file}: cannot read ({exc.strerror or exc})") from None
        if file in ckpt.shards:
            start, metadata = ckpt.shards[file]
            recorded = _recorded_hash(metadata)
        else:
            start, recorded = _data_start(file)
        sha = recorded if recorded is not None or not hash_weights else sha256_file(file, start)
        weights.append(WeightsFile(file.name, st.st_size, st.st_mtime_ns, st.st_ino, sha, st.st_ctime_ns))
    folder = path if path.is_dir() else path.parent
    companions: dict[str, str] = {}
    if path.is_dir() or path.name.endswith(".index.json") or (folder / "config.json").is_file():
        companions = {f.name: sha256_file(f) for f in _companion_files(folder)}
    return InputIdentity(str(path), tuple(weights), digest.hexdigest(), companions)


def identity_from_dict(doc: Any, where: str) -> InputIdentity:
    """An `InputIdentity` read back from a results file (untrusted: every field checked).

    Raises:
        InputError naming `where` when the record is malformed.
    """

    def bad(what: str) -> InputError:
        return InputError(f"{where}: malformed input identity ({what})")

    if not isinstance(doc, dict):
        raise bad("not an object")
    path, tensors, weights, companions = (doc.get(k) for k in ("path", "tensors", "weights", "companions"))
    if not isinstance(path, str) or not isinstance(tensors, str):
        raise bad("path and tensors must be strings")
    if not isinstance(weights, list) or not isinstance(companions, dict):
        raise bad("weights must be a list and companions an object")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in companions.items()):
        raise bad("companions must map names to digests")
    files = []
    for w in weights:
        if not isinstance(w, dict):
            raise bad("a weights file is not an object")
        name, sha = w.get("name"), w.get("sha256")
        numbers: list[Any] = [w.get(k) for k in ("size", "mtime_ns", "inode", "ctime_ns")]
        if not isinstance(name, str) or not (sha is None or isinstance(sha, str)):
            raise bad("a weights file's name or sha256")
        if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 64 for n in numbers):
            raise bad(f"weights file {name[:100]}: size, mtime_ns, inode and ctime_ns must be integers")
        size, mtime_ns, inode, ctime_ns = numbers
        files.append(WeightsFile(name, size, mtime_ns, inode, sha, ctime_ns))
    return InputIdentity(path, tuple(files), tensors, dict(companions))


def compare_inputs(
    old: Sequence[InputIdentity],
    new: Sequence[InputIdentity],
    rehash: bool,
    hash_file: Callable[[Path], str] | None = None,
) -> tuple[list[str], list[InputIdentity]]:
    """What differs between the inputs a result was made from and the inputs now.

    Without `rehash` a weights file whose size, mtime or inode changed counts as changed. With
    `rehash` every weights file is hashed and compared with the SHA-256 recorded then; a file
    never hashed then cannot be proved the same and counts as changed.

    Returns:
        (differences, one line each; the identities now, with the hashes computed).
    """
    hash_file = hash_file or (lambda p: sha256_file(p, _data_start(p)[0]))
    diffs: list[str] = []
    if len(old) != len(new):
        return [f"{len(old)} inputs then, {len(new)} now"], list(new)
    updated = []
    for then, now in zip(old, new, strict=True):
        if then.path != now.path:
            diffs.append(f"input {then.path} then, {now.path} now")
            updated.append(now)
            continue
        updated.append(_compare_input(then, now, rehash, hash_file, diffs))
    return diffs, updated


def _compare_input(
    then: InputIdentity,
    now: InputIdentity,
    rehash: bool,
    hash_file: Callable[[Path], str],
    diffs: list[str],
) -> InputIdentity:
    """One input at the same path then and now (see `compare_inputs`): its differences appended
    to `diffs`, its identity now returned with the hashes computed."""
    where = now.path
    if then.tensors != now.tensors:
        diffs.append(f"{where}: its tensors' names, dtypes, shapes or offsets changed")
    for name in sorted(set(then.companions) | set(now.companions)):
        a, b = then.companions.get(name), now.companions.get(name)
        if a != b:
            change = "appeared" if a is None else "was removed" if b is None else "changed"
            diffs.append(f"{where}: {name} {change}")
    before = {w.name: w for w in then.weights}
    files = []
    folder = Path(now.path) if Path(now.path).is_dir() else Path(now.path).parent
    for w in now.weights:
        prior = before.get(w.name)
        if prior is None:
            diffs.append(f"{where}: weights file {w.name} is new")
            files.append(w)
        else:
            files.append(_compare_weights(where, prior, w, folder, rehash, hash_file, diffs))
    for name in sorted(set(before) - {w.name for w in now.weights}):
        diffs.append(f"{where}: weights file {name} was removed")
    return InputIdentity(now.path, tuple(files), now.tensors, now.companions)


def _compare_weights(
    where: str,
    prior: WeightsFile,
    w: WeightsFile,
    folder: Path,
    rehash: bool,
    hash_file: Callable[[Path], str],
    diffs: list[str],
) -> WeightsFile:
    """One weights file of input `where` (in `folder`), then (`prior`) and now (`w`): its
    difference appended to `diffs`, the file now returned with its hash (computed with `rehash`,
    else the one recorded)."""
    # a header's recorded hash is a claim about the bytes, not a proof: bytes edited in
    # place leave the header as it was. Only the same stat, or the bytes hashed, count.
    if rehash:
        sha: str | None = hash_file(folder / w.name)
    else:
        sha = prior.sha256 if prior.sha256 is not None else w.sha256
    w = WeightsFile(w.name, w.size, w.mtime_ns, w.inode, sha, w.ctime_ns)
    if rehash and prior.sha256 is not None:
        if prior.sha256 != sha:
            diffs.append(f"{where}: weights file {w.name} holds other data (SHA-256 differs)")
    elif rehash:
        diffs.append(
            f"{where}: weights file {w.name} was not hashed when these results began, so --rehash "
            "cannot prove it unchanged"
        )
    elif not prior.same_stat(w):
        what = [
            label
            for label, a, b in (
                ("size", prior.size, w.size),
                ("mtime", prior.mtime_ns, w.mtime_ns),
                ("inode", prior.inode, w.inode),
                ("ctime", prior.ctime_ns, w.ctime_ns),
            )
            if a != b
        ]
        diffs.append(
            f"{where}: weights file {w.name} changed ({', '.join(what)}); --rehash proves by "
            "content whether it holds the same data"
        )
    return w


def identify_inputs(paths: Sequence[Path], hash_weights: bool = False) -> list[InputIdentity]:
    """`identify_input` for each path, the first failure raised as it is."""
    return [identify_input(Path(p), hash_weights) for p in paths]
