"""The output rule, the locks and the transactions behind every file lazymerge writes.

Merged models, eval and sweep reports, converted data (tools/) and benchmark results (bench/)
all pass through here, under one rule:

1. Never an input: not a path an input resolves to (symlinks, hard links), not inside an input's
   model folder or Hugging Face cache folder (`check_against_inputs`).
2. Never an existing path without `--force`.
3. `--force` replaces only what lazymerge wrote (`is_lazymerge_file`, `is_lazymerge_output`):
   a safetensors file whose header carries lazymerge's metadata, a model card ending with
   `CARD_MARK`, or any file listed in its folder's manifest (`MANIFEST_NAME`) with its current
   size and SHA-256: reports (eval, bon), converted data and bench results. A mark inside a
   file (a report's `written_by`) is not enough, since anyone can write one; a file edited since
   it was written is no longer lazymerge's, and `--force` leaves it alone.
4. Atomic: a temporary in the destination folder, fsync, rename; a failed write leaves nothing.

Locks (`DestinationLock`) are files beside the destination's real path, so every alias of one
destination (a symlinked folder, a symlinked parent, a bind mount: the same device and inode of
the folder, and the same name) shares one lock. Temporaries are named
`.NAME.lazymerge-tmp-PID-XXXXXXXX`; those of a process that no longer runs are lazymerge's own
leftovers and are removed (`remove_stale_temporaries`, `remove_stale_temporaries_in`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lazymerge.errors import OutputError
from lazymerge.io.hf_folder import COMPANION_FILES
from lazymerge.io.hub_cache import hub_repo_folder

TEMP_MARK = ".lazymerge-tmp-"
#: The index of a sharded output, as Hugging Face names it.
INDEX_NAME = "model.safetensors.index.json"


def os_error_message(path: Path, doing: str, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return (
            f"{path}: disk full while {doing}; nothing was left at the destination. Free space on "
            f"{path.parent} or choose another output folder (`lazymerge plan` shows the bytes needed)"
        )
    return f"{path}: {doing} failed ({exc.strerror or exc})"


def _rename_noreplace(source: Path, target: Path) -> None:
    """Rename `source` to `target`, failing with FileExistsError when `target` exists (Linux's
    renameat2 RENAME_NOREPLACE, so no check-then-rename race; a hard link elsewhere for files)."""
    import ctypes
    import errno as errno_mod

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno_mod.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(target))
        if err not in (errno_mod.ENOSYS, errno_mod.EINVAL):
            raise OSError(err, os.strerror(err), str(target))
    if source.is_dir():
        if target.exists() or target.is_symlink():
            raise FileExistsError(errno_mod.EEXIST, "File exists", str(target))
        os.rename(source, target)
    else:
        os.link(source, target)  # fails if target exists
        os.unlink(source)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: Longest destination name used as is in the names of its temporaries and lock (file names
#: are limited to 255 bytes, and those names add up to about 40).
_SIDE_NAME_BYTES = 180


def side_name(destination: Path) -> str:
    """The destination's name as used in its temporaries' and lock's names: itself, or for a
    long name a prefix plus a hash of the whole, so a legal 255-byte output name still works."""
    raw = os.fsencode(destination.name)
    if len(raw) <= _SIDE_NAME_BYTES:
        return destination.name
    return os.fsdecode(raw[:120]) + "~" + hashlib.sha256(raw).hexdigest()[:16]


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # beyond any pid the kernel hands out
        return False
    return True


def temporary_name(destination: Path) -> str:
    """A fresh name for a temporary of `destination`, in its folder: the writer's pid in it says
    whose it is, so a later run can tell a dead writer's leftovers from a live one's."""
    return f".{side_name(destination)}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


#: `temporary_name`'s shape (and `.NAME.lazymerge-tmp-old-XXXXXXXX`, the old output a folder
#: commit moves aside): group 1 the destination's side name, group 2 the pid or "old".
_TEMPORARY = re.compile(r"\.(.+)" + re.escape(TEMP_MARK) + r"(\d{1,10}|old)-[0-9a-f]{8}")


def is_stale_temporary(path: Path) -> bool:
    """True for a temporary lazymerge made (its name has `temporary_name`'s shape) whose writer
    no longer runs; a live writer's temporaries, and anything else, are not stale."""
    match = _TEMPORARY.fullmatch(path.name)
    if match is None:
        return False
    owner = match.group(2)
    return not (owner.isdigit() and (int(owner) == os.getpid() or _pid_alive(int(owner))))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(destination: Path) -> list[Path]:
    """Remove temporaries that an interrupted write into `destination` left beside it.

    A temporary is stale when the process that made it no longer runs (its pid is in the name);
    those of a run still going are left alone.
    """
    prefix = f".{side_name(destination)}{TEMP_MARK}"
    removed = []
    for path in destination.parent.glob(glob_escape(prefix) + "*"):
        if is_stale_temporary(path):
            _remove(path)
            removed.append(path)
    return removed


def remove_stale_temporaries_in(folder: Path) -> list[Path]:
    """Remove every stale lazymerge temporary directly in `folder`, whatever it was for (a report
    write killed half-way leaves `.report.md.lazymerge-tmp-PID-XXXXXXXX`), so that a resumed run
    does not take them for somebody else's files. Returns what was removed.

    Raises:
        OutputError when the folder cannot be listed.
    """
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise OutputError(os_error_message(folder, "listing", exc)) from None
    removed = []
    for path in entries:
        if is_stale_temporary(path):
            _remove(path)
            removed.append(path)
    return removed


LOCK_MARK = ".lazymerge-lock"


def lock_path(destination: Path) -> Path:
    """The lock file of `destination`: beside its real path, so `out`, `./link-to-out` and
    `linked-parent/out` name one file, in one folder (one device and inode), and two runs through
    different aliases share one lock. The last component is followed only when it is a symlink to
    a folder (a sweep's): a symlink anywhere else is never written through (the output rule
    refuses it), and its lock stays beside it rather than in the folder it points into."""
    if destination.is_symlink() and destination.is_dir():
        resolved = real(destination)
    else:
        resolved = real(destination.parent) / destination.name
    return resolved.parent / f".{side_name(resolved)}{LOCK_MARK}"


class DestinationLock:
    """An exclusive lock on one destination, held while a merge writes it.

    A lock file beside the destination, locked with `flock`: the kernel drops the lock when
    the process dies, so a killed run never blocks the next one. The holder removes the file
    when it is done; a run that locked a file removed meanwhile sees that the path no longer
    names its file and tries again, so two runs never both hold the lock. The file is opened
    without following symlinks, and it lies beside the destination's real path (`lock_path`), so
    every alias of one destination takes the same lock.
    """

    def __init__(self, destination: Path):
        import fcntl

        if not destination.parent.is_dir():
            raise OutputError(f"{destination}: folder {destination.parent} does not exist")
        self.path = lock_path(destination)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        self.fd: int | None = None
        for _ in range(100):
            try:
                fd = os.open(self.path, flags, 0o644)
            except OSError as exc:
                raise OutputError(os_error_message(self.path, "creating the lock file", exc)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise OutputError(
                    f"{destination}: another lazymerge run is writing this destination; wait for it or "
                    "choose another output"
                ) from None
            try:
                named = os.stat(self.path, follow_symlinks=False)
            except OSError:
                named = None
            held = os.fstat(fd)
            if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                self.fd = fd
                return
            os.close(fd)  # the previous holder removed this file after we opened it: again
        raise OutputError(f"{self.path}: cannot take the destination lock (it keeps changing)")

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def _written_by_lazymerge(path: Path) -> bool:
    """True when `path` is a regular safetensors file whose header lazymerge wrote."""
    from lazymerge.errors import LazyMergeError
    from lazymerge.io.reader import read_header_file

    if path.is_symlink() or not path.is_file():
        return False
    try:
        return "lazymerge_version" in read_header_file(path).metadata
    except LazyMergeError:
        return False


#: Files lazymerge writes beside the weights of a folder output.
_FOLDER_FILES = frozenset({INDEX_NAME, *COMPANION_FILES})
#: The model card of a folder output; it is lazymerge's own only when it carries `CARD_MARK`.
CARD_NAME = "README.md"
CARD_MARK = "<!-- model card written by lazymerge; lazymerge run --force may replace it -->"
#: A model card larger than this is not one lazymerge wrote.
_MAX_CARD_BYTES = 1 << 20


def _is_lazymerge_card(path: Path) -> bool:
    """A README.md lazymerge wrote: a regular file, small, ending with lazymerge's mark."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_CARD_BYTES:
            return False
        return path.read_bytes().rstrip().endswith(CARD_MARK.encode())
    except OSError:
        return False


def _lazymerge_folder(folder: Path, depth: int) -> bool:
    """Every entry is what lazymerge writes: its shards, the index, companion files and its own
    model card (a user's README.md is not), and (for a sweep, one level down) folders of the same."""
    shards = 0
    for entry in folder.iterdir():
        if entry.is_symlink():
            return False
        if entry.is_dir():
            if depth == 0 or not _lazymerge_folder(entry, depth - 1):
                return False
            shards += 1
        elif entry.name.endswith(".safetensors"):
            if not _written_by_lazymerge(entry):
                return False
            shards += 1
        elif entry.name == CARD_NAME:
            if not _is_lazymerge_card(entry):
                return False
        elif entry.name not in _FOLDER_FILES or not entry.is_file():
            return False
    return shards > 0


def is_lazymerge_output(path: Path) -> bool:
    """True for a file or folder lazymerge wrote: a .safetensors file with lazymerge's header
    metadata, or a folder holding nothing but lazymerge's shards, index and companion files
    (one folder down for sweeps). Symlinks and anything else make it not one."""
    if path.is_symlink():
        return False
    if path.is_file():
        return path.name.endswith(".safetensors") and _written_by_lazymerge(path)
    if not path.is_dir():
        return False
    try:
        return _lazymerge_folder(path, depth=1)
    except OSError:
        return False


def real(path: Path) -> Path:
    """The path with symlinks resolved as far as they go (a symlink loop is not an error here)."""
    return Path(os.path.realpath(path))


def check_against_inputs(destination: Path, inputs: Sequence[Path], files: Sequence[Path] = ()) -> None:
    """The output rule for inputs: a destination is never an input nor a file an input resolves
    to (symlinks, hard links), never holds one, and never lies inside an input's model folder
    (a folder given as input or holding an index, or the folder of an input file beside a
    config.json), where a new file would change what that folder loads as, nor inside the
    Hugging Face cache folder of an input read from the cache (its snapshots and blobs).

    Raises:
        OutputError
    """
    dest = real(destination)
    try:
        dest_stat: os.stat_result | None = os.stat(dest)
    except OSError:
        dest_stat = None
    given = [Path(p) for p in inputs]
    _refuse_input_paths(destination, dest, dest_stat, [*given, *files])
    for source in given:
        _refuse_inside_input_folders(destination, dest, source)
    if dest_stat is not None and os.path.isdir(dest):
        _refuse_held_inputs(destination, dest, [*given, *files])


def _refuse_input_paths(
    destination: Path, dest: Path, dest_stat: os.stat_result | None, paths: list[Path]
) -> None:
    """`dest` (`destination` resolved) is none of `paths` resolved, nor the same file (a hard
    link), nor a folder above one."""
    for path in (real(p) for p in paths):
        same = False
        if dest_stat is not None:
            try:
                same = os.path.samestat(os.stat(path), dest_stat)
            except OSError:
                same = False
        if path == dest or dest in path.parents or same:
            raise OutputError(
                f"{destination}: is or holds input {path}; lazymerge never overwrites an input, "
                "choose another output path"
            )


def _refuse_inside_input_folders(destination: Path, dest: Path, source: Path) -> None:
    """`dest` lies neither inside the Hugging Face cache folder of input `source` nor inside its
    model folder."""
    candidates = (hub_repo_folder(Path(os.path.abspath(source))), hub_repo_folder(real(source)))
    for repo in {r for r in candidates if r is not None}:
        if real(repo) == dest or real(repo) in dest.parents:
            raise OutputError(
                f"{destination}: lies inside the Hugging Face cache folder {repo} of input {source}; "
                "lazymerge never writes into the cache. Choose an output outside it"
            )
    folder = source if source.is_dir() else source.parent
    model_folder = (
        source.is_dir() or source.name.endswith(".index.json") or (folder / "config.json").is_file()
    )
    if model_folder and real(folder) in dest.parents:
        raise OutputError(
            f"{destination}: lies inside the model folder of input {source}; it would change "
            "what that folder loads as. Choose an output outside it"
        )


def _refuse_held_inputs(destination: Path, dest: Path, paths: list[Path]) -> None:
    """The folder `dest` holds no file or folder that is one of `paths` (by device and inode)."""
    inodes = set()
    for path in paths:
        try:
            st = os.stat(path)
            inodes.add((st.st_dev, st.st_ino))
        except OSError:
            continue
    for root, dirs, names in os.walk(dest):
        for name in names + dirs:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in inodes:
                raise OutputError(
                    f"{destination}: holds {os.path.join(root, name)}, which is an input; "
                    "choose another output path"
                )


def check_destination(destination: Path, single_file: bool, force: bool) -> None:
    """The output rule for existing paths: never replaced without `force`, and `force` replaces
    only what lazymerge itself wrote, of the same kind (file or folder).

    Raises:
        OutputError
    """
    if not (destination.exists() or destination.is_symlink()):
        return
    if not force:
        raise OutputError(f"{destination}: already exists; pass --force to replace it")
    if single_file and destination.is_dir():
        raise OutputError(f"{destination}: is a folder; cannot replace it with a file")
    if not single_file and not destination.is_dir():
        raise OutputError(f"{destination}: is a file; cannot replace it with a folder")
    if not is_lazymerge_output(destination):
        raise OutputError(
            f"{destination}: --force replaces only outputs lazymerge wrote, and this is not one; "
            "remove it yourself or choose another output"
        )


class OutputTransaction:
    """A destination that appears complete or not at all.

    For a single-file destination, shards are written to a temporary file beside it and renamed
    with `os.replace`. For a folder destination, everything is written into a temporary folder
    beside it, which is renamed into place at `commit`. `abort` removes every temporary.
    """

    def __init__(self, destination: Path, single_file: bool, force: bool):
        self.destination = destination
        self.single_file = single_file
        #: needed again at commit, when the destination is checked a second time
        self.force = force
        parent = destination.parent
        if not parent.is_dir():
            raise OutputError(f"{destination}: folder {parent} does not exist")
        self._lock = DestinationLock(destination)
        try:
            check_destination(destination, single_file, force)
            remove_stale_temporaries(destination)
            self.temp = parent / temporary_name(destination)
            if not single_file:
                try:
                    self.temp.mkdir(mode=0o755)
                    os.chmod(self.temp, 0o755)
                except OSError as exc:
                    raise OutputError(os_error_message(self.temp, "creating", exc)) from None
        except BaseException:
            self._lock.release()
            raise
        self._done = False

    def shard_path(self, filename: str) -> Path:
        """Where a file of the output goes while pending; "sub/name" creates the sub-folder."""
        if self.single_file:
            return self.temp
        path = self.temp / filename
        if path.parent != self.temp:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        return path

    def write_small(self, filename: str, data: bytes) -> None:
        """Write a small file (the index) into the pending folder, fsynced."""
        path = self.shard_path(filename)
        try:
            with open(path, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(path, 0o644)
        except OSError as exc:
            raise OutputError(os_error_message(path, "writing", exc)) from None

    def commit(self) -> None:
        """Move the finished output into place, checking the destination again first (someone
        may have created it while the merge ran). SIGINT and SIGTERM wait until the move is
        done, so an interrupted commit never leaves the old output half-removed."""
        import signal

        blocked = {signal.SIGINT, signal.SIGTERM}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self._commit()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _commit(self) -> None:
        parent = self.destination.parent
        check_destination(self.destination, self.single_file, self.force)
        try:
            if self.single_file:
                os.chmod(self.temp, 0o644)
                if self.force:
                    os.replace(self.temp, self.destination)
                else:
                    _rename_noreplace(self.temp, self.destination)
            else:
                _fsync_dir(self.temp)
                if self.destination.exists():
                    trash = parent / f".{side_name(self.destination)}{TEMP_MARK}old-{uuid.uuid4().hex[:8]}"
                    os.rename(self.destination, trash)
                    os.rename(self.temp, self.destination)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    _rename_noreplace(self.temp, self.destination)
        except FileExistsError:
            raise OutputError(
                f"{self.destination}: was created while the merge ran; pass --force to replace it"
            ) from None
        except OSError as exc:
            raise OutputError(
                f"{self.destination}: cannot move output into place ({exc.strerror or exc})"
            ) from None
        _fsync_dir(parent)
        self._done = True
        self._lock.release()

    def abort(self) -> None:
        if self._done:
            return
        if self.single_file:
            try:
                os.unlink(self.temp)
            except FileNotFoundError:
                pass
        else:
            shutil.rmtree(self.temp, ignore_errors=True)
        self._done = True
        self._lock.release()


#: In every folder lazymerge writes small files into (reports, converted data, bench results):
#: the name, size and SHA-256 of each file it wrote there. Markdown, PNG and JSON Lines have no
#: room for a mark, and a mark inside a file survives a user's edit of it; a size and hash do not.
MANIFEST_NAME = ".lazymerge-outputs.json"
_MANIFEST_KIND = "lazymerge output manifest"
_MAX_MANIFEST_BYTES = 4 << 20


def _file_entry(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest's entries: {} when there is none, None when the file is not a manifest
    lazymerge wrote (then nothing in the folder counts as lazymerge's, and it is not replaced)."""
    path = folder / MANIFEST_NAME
    try:
        if not (path.exists() or path.is_symlink()):
            return {}
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_MANIFEST_BYTES:
            return None
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if (
        not isinstance(doc, dict)
        or doc.get("kind") != _MANIFEST_KIND
        or not isinstance(doc.get("files"), dict)
    ):
        return None
    return {
        name: entry
        for name, entry in doc["files"].items()
        if isinstance(entry, dict)
        and type(entry.get("size")) is int
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
    }


def _listed_in_manifest(path: Path) -> bool:
    """`path` is in its folder's manifest with the size and SHA-256 it has now."""
    entry = (_read_manifest(path.parent) or {}).get(path.name)
    if entry is None:
        return False
    try:
        if os.stat(path).st_size != entry["size"]:
            return False
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return False
    expected: object = entry["sha256"]
    return digest.hexdigest() == expected


def is_lazymerge_file(path: Path) -> bool:
    """True for a regular file lazymerge wrote and nobody changed since: a safetensors file with
    lazymerge's header metadata, a model card ending with `CARD_MARK`, a JSON report whose
    `written_by` names lazymerge, or a file listed in its folder's manifest with its current size
    and SHA-256. Symlinks, folders and anything else are not."""
    if path.is_symlink() or not path.is_file():
        return False
    if path.name.endswith(".safetensors"):
        return _written_by_lazymerge(path)
    if path.name == CARD_NAME and _is_lazymerge_card(path):
        return True
    return _listed_in_manifest(path)


def _is_bookkeeping(name: str) -> bool:
    """Names lazymerge keeps for itself: a folder's manifest, lock files, temporaries."""
    return name == MANIFEST_NAME or name.endswith(LOCK_MARK) or _TEMPORARY.fullmatch(name) is not None


def check_file_destination(path: Path, inputs: Sequence[Path], force: bool) -> None:
    """The output rule for one file (a report, converted data, a bench result): never an input (a
    file an input resolves to, or inside an input's model folder), the folder must exist, an
    existing file is replaced only with `force` and only when lazymerge wrote it
    (`is_lazymerge_file`).

    Raises:
        OutputError
    """
    check_against_inputs(path, inputs)
    if not path.parent.is_dir():
        raise OutputError(f"{path}: folder {path.parent} does not exist")
    if _is_bookkeeping(path.name):
        raise OutputError(f"{path}: lazymerge keeps this name for its own bookkeeping; choose another name")
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink():
        raise OutputError(f"{path}: is a folder; cannot replace it with a file")
    if not force:
        raise OutputError(f"{path}: already exists; pass --force to replace it")
    if not is_lazymerge_file(path):
        raise OutputError(
            f"{path}: --force replaces only files lazymerge wrote (listed in {MANIFEST_NAME} beside "
            "them with their current size and SHA-256, or carrying lazymerge's mark), and this is "
            "not one; remove it yourself or choose another output"
        )


def check_report_destination(path: Path, inputs: Sequence[Path], force: bool) -> None:
    """The output rule for reports (`check_file_destination`).

    Raises:
        OutputError
    """
    check_file_destination(path, inputs, force)


def _write_temporary(path: Path, data: bytes) -> Path:
    """`data` in a fresh temporary beside `path`, fsynced, mode 0644; nothing left on failure."""
    temp = path.parent / temporary_name(path)
    try:
        with open(temp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temp, 0o644)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise OutputError(os_error_message(path, "writing", exc)) from None
    return temp


def _move_into_place(temp: Path, path: Path, replace: bool) -> None:
    """Rename a finished temporary to `path`; without `replace` an existing path is never
    replaced (no check-then-rename race). The temporary is removed on failure."""
    try:
        if replace:
            os.replace(temp, path)
        else:
            _rename_noreplace(temp, path)
    except FileExistsError:
        temp.unlink(missing_ok=True)
        raise OutputError(f"{path}: was created while lazymerge worked; pass --force to replace it") from None
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise OutputError(os_error_message(path, "writing", exc)) from None


def write_report(path: Path, data: bytes, replace: bool = True) -> None:
    """Write a small file atomically: a temporary beside it, fsync, rename. With `replace`
    False an existing file (say, one a user created meanwhile) is never replaced. The caller has
    checked the destination (`check_file_destination`) or owns its folder (a sweep's).

    Raises:
        OutputError
    """
    _move_into_place(_write_temporary(path, data), path, replace)
    _fsync_dir(path.parent)


class _FolderLock:
    """A short exclusive `flock` on a folder itself (its inode, whatever path names it), held
    while its manifest is read and rewritten; waits for another writer rather than failing."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.fd = -1

    def __enter__(self) -> _FolderLock:
        import fcntl

        try:
            self.fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as exc:
            if self.fd >= 0:
                os.close(self.fd)
            raise OutputError(os_error_message(self.folder, "locking", exc)) from None
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _record(folder: Path, entries: Mapping[str, dict[str, Any]]) -> None:
    """Add `entries` to the folder's manifest. Entries of removed files stay: one that no file
    matches is harmless, and pruning could drop a concurrent writer's entry before its move.

    Raises:
        OutputError when the manifest is not lazymerge's or cannot be written.
    """
    with _FolderLock(folder):
        files = _read_manifest(folder)
        if files is None:
            raise OutputError(
                f"{folder / MANIFEST_NAME}: is not a manifest lazymerge wrote; remove it or choose another folder"
            )
        files.update(entries)
        doc = {
            "kind": _MANIFEST_KIND,
            "about": "files lazymerge wrote in this folder; --force replaces a file only while it "
            "has the size and SHA-256 given here",
            "files": dict(sorted(files.items())),
        }
        write_report(folder / MANIFEST_NAME, (json.dumps(doc, indent=1) + "\n").encode())


class OutputFiles:
    """Small files (reports, converted data, benchmark results) written under the output rule:
    reserved before the work that produces them, written atomically at its end.

    Reserving locks every destination (`DestinationLock`) and checks it
    (`check_file_destination`), so a run that would be refused is refused before it spends any
    time. `write` checks each again (someone may have created it meanwhile), writes every
    temporary (fsynced) before moving any, so a full disk leaves nothing, records each file in
    its folder's manifest and moves them into place. A file is atomic; the set is "all or nothing"
    up to the moves, which cannot run out of space.

    Example:
        with OutputFiles([out], inputs=[source], force=args.force) as files:
            rows = convert(source)
            files.write({out: encode(rows)})

    Raises:
        OutputError
    """

    def __init__(
        self,
        paths: Iterable[Path],
        inputs: Sequence[Path] = (),
        force: bool = False,
        make_folders: bool = False,
    ):
        self.paths = [Path(p) for p in paths]
        self.inputs = [Path(p) for p in inputs]
        self.force = force
        self._locks: list[DestinationLock] = []
        seen: dict[Path, Path] = {}
        for path in self.paths:
            if real(path) in seen:
                raise OutputError(f"{path}: named twice as an output (also as {seen[real(path)]})")
            seen[real(path)] = path
        try:
            for path in self.paths:
                if make_folders and not path.parent.is_dir():
                    try:
                        path.parent.mkdir(parents=True, exist_ok=True)
                    except OSError as exc:
                        raise OutputError(os_error_message(path.parent, "creating", exc)) from None
                self._locks.append(DestinationLock(path))
                check_file_destination(path, self.inputs, force)
        except BaseException:
            self.release()
            raise

    def write(self, contents: Mapping[Path, bytes]) -> None:
        """Write the given reserved files (a subset of them is fine).

        Raises:
            OutputError
        """
        unknown = [str(p) for p in contents if Path(p) not in self.paths]
        if unknown:
            raise ValueError(f"not reserved: {', '.join(unknown)}")  # a defect of the caller
        todo = [p for p in self.paths if p in contents]
        temps: dict[Path, Path] = {}
        try:
            for path in todo:
                check_file_destination(path, self.inputs, self.force)
                temps[path] = _write_temporary(path, contents[path])
            # recorded before the move: a kill in between leaves an entry whose hash no file has
            # (harmless), never a file of lazymerge's that --force would not recognise
            folders: dict[Path, dict[str, dict[str, Any]]] = {}
            for path in todo:
                folders.setdefault(path.parent, {})[path.name] = _file_entry(contents[path])
            for folder, entries in folders.items():
                try:
                    _record(folder, entries)
                except OutputError as exc:  # name what the user asked for, not only the manifest
                    names = ", ".join(str(folder / name) for name in entries)
                    raise OutputError(f"{names}: not written, the folder's manifest failed: {exc}") from None
            for path in todo:
                _move_into_place(temps.pop(path), path, self.force)
        finally:
            for temp in temps.values():
                temp.unlink(missing_ok=True)
        for folder in {p.parent for p in todo}:
            _fsync_dir(folder)

    def release(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks = []

    def __enter__(self) -> OutputFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
