"""Lazy, read-only access to safetensors checkpoints: one file, a sharded index, or a folder.

Opening a checkpoint reads headers only. Tensor bytes are fetched on demand with positional reads
(`os.preadv`) into caller-owned buffers: no file is memory-mapped, so resident memory never grows
with the size of the inputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

from lazymerge.errors import HeaderJsonError, InputError, ShardIndexError
from lazymerge.io.dtypes import TensorInfo
from lazymerge.io.header import Header, parse_header, read_header_length
from lazymerge.io.small_files import open_regular, read_small_file

INDEX_SUFFIX = ".safetensors.index.json"
BIN_INDEX_SUFFIX = ".bin.index.json"


def read_header_file(path: Path) -> Header:
    """Read and validate the header of one .safetensors file, touching no tensor data."""
    source = str(path)
    try:
        with os.fdopen(open_regular(path), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            length = read_header_length(prefix, size, source)
            raw = prefix + fh.read(length)
    except OSError as exc:
        raise InputError(f"{source}: cannot read ({exc.strerror or exc})") from None
    return parse_header(raw, size, source)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ShardIndexError(f"tensor or key {key!r} appears twice; the index is ambiguous")
        out[key] = value
    return out


def _read_index(index_path: Path) -> dict[str, str]:
    source = str(index_path)
    try:
        doc = json.loads(read_small_file(index_path).decode("utf-8"), object_pairs_hook=_unique_keys)
    except ShardIndexError as exc:
        raise ShardIndexError(f"{source}: {exc}") from None
    except OSError as exc:
        raise InputError(f"{source}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HeaderJsonError(f"{source}: index is not valid JSON ({exc})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ShardIndexError(f"{source}: index must hold a weight_map of tensor name -> shard file")
    if not weight_map:
        raise ShardIndexError(f"{source}: weight_map is empty; the index names no tensors")
    for name, shard in weight_map.items():
        if not shard or shard != Path(shard).name or shard in (".", ".."):
            raise ShardIndexError(
                f"{source}: tensor {name!r} points to shard {shard!r}; shards must be plain file "
                "names inside the index's folder"
            )
    return weight_map


def _index_suffix(path: Path) -> str | None:
    for suffix in (INDEX_SUFFIX, BIN_INDEX_SUFFIX):
        if path.name.endswith(suffix):
            return suffix
    return None


def resolve_checkpoint_files(path: Path) -> tuple[list[Path], Path | None]:
    """Return the shard files of a checkpoint path and its index file, if any.

    Accepts a .safetensors or PyTorch .bin file, a *.safetensors.index.json or
    *.bin.index.json file, or a model folder holding one of these; a folder's safetensors weights
    are preferred over its .bin weights, `model.*`/`pytorch_model.*` names over others.
    """
    if path.is_dir():
        for suffix, default in (
            (INDEX_SUFFIX, "model"),
            (".safetensors", "model"),
            (BIN_INDEX_SUFFIX, "pytorch_model"),
            (".bin", "pytorch_model"),
        ):
            found = sorted(
                p
                for p in path.glob("*" + suffix)
                if p.is_file() and (suffix != ".bin" or not p.name.startswith("training_args"))
            )
            if (path / (default + suffix)).is_file():
                found = [path / (default + suffix)]
            if len(found) > 1:
                if suffix in (".safetensors", ".bin"):
                    raise InputError(
                        f"{path}: folder holds {len(found)} {suffix} files but no index; pass one file"
                    )
                raise InputError(
                    f"{path}: holds several index files ({', '.join(p.name for p in found)}); pass the one to use"
                )
            if found:
                return resolve_checkpoint_files(found[0])
        raise InputError(f"{path}: folder holds no .safetensors or .bin weights and no index")
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if _index_suffix(path):
        return _index_shards(path), path
    return [path], None


def _index_shards(index_path: Path) -> list[Path]:
    weight_map = _read_index(index_path)
    return [index_path.parent / name for name in sorted(set(weight_map.values()))]


def _shard_entries(shard: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Every tensor of a shard (absolute offsets) and its metadata."""
    if shard.name.endswith(".bin"):
        from lazymerge.io.torch_bin import read_bin_tensors

        return read_bin_tensors(shard), {}
    header = read_header_file(shard)
    return list(header.tensors), header.metadata


def _add_entries(
    tensors: dict[str, TensorInfo],
    entries: list[TensorInfo],
    shard: Path,
    weight_map: dict[str, str] | None,
    index_path: Path | None,
) -> None:
    for info in entries:
        name = info.name
        if weight_map is not None and weight_map.get(name) != shard.name:
            raise ShardIndexError(
                f"{index_path}: shard {shard.name} holds tensor {name!r} but the "
                f"weight_map puts it in {weight_map.get(name)!r}"
            )
        if name in tensors:
            raise ShardIndexError(f"{shard}: tensor {name!r} also appears in {tensors[name].path.name}")
        tensors[name] = info if info.path == shard else replace(info, path=shard)


def pin_file(path: Path) -> tuple[int, os.stat_result]:
    """Open a data file before its header is read and record its identity.

    Reads then go through this descriptor, and `check_unchanged` compares the file with this
    identity, so a file replaced or rewritten while a merge runs stops it instead of being read
    at the old header's offsets. FIFOs, devices and folders are refused (opened non-blocking, so
    a FIFO cannot hang the run).
    """
    fd = open_regular(path)
    st = os.fstat(fd)
    if hasattr(os, "posix_fadvise"):
        # tensors are mostly read in file order: ask for a larger read-ahead window
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd, st


def check_unchanged(path: Path, fd: int, pinned: os.stat_result) -> None:
    """Raise InputError when `path` no longer is the file pinned as `fd`, or it changed."""
    now = os.fstat(fd)
    try:
        named = os.stat(path)
    except OSError:
        named = None
    same_name = named is not None and (named.st_dev, named.st_ino) == (pinned.st_dev, pinned.st_ino)
    if not same_name or (now.st_size, now.st_mtime_ns) != (pinned.st_size, pinned.st_mtime_ns):
        raise InputError(
            f"{path}: the file changed after its header was read (replaced, rewritten or removed); "
            "stopped. Inputs must not change while lazymerge reads them"
        )


class Checkpoint(Mapping[str, TensorInfo]):
    """A read-only mapping of tensor name to `TensorInfo` over one or more shard files.

    Example:
        >>> ckpt = Checkpoint.open("model.safetensors")      # doctest: +SKIP
        >>> ckpt["model.norm.weight"].shape                   # doctest: +SKIP
        (4096,)
    """

    def __init__(
        self,
        path: Path,
        tensors: dict[str, TensorInfo],
        metadata: dict[str, str],
        pinned: dict[Path, tuple[int, os.stat_result]] | None = None,
    ):
        self.path = path
        self._tensors = tensors
        self.metadata = metadata
        #: shard -> (descriptor opened before its header was read, identity at that moment)
        self._pinned = dict(pinned or {})
        self.bytes_read = 0

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """Read and validate every header of a checkpoint (no tensor data is read)."""
        root = Path(path)
        shards, index_path = resolve_checkpoint_files(root)
        weight_map = _read_index(index_path) if index_path is not None else None
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        pinned: dict[Path, tuple[int, os.stat_result]] = {}
        try:
            for shard in shards:
                if index_path is not None and not shard.exists():
                    raise ShardIndexError(f"{index_path}: names shard {shard.name}, which does not exist")
                pinned[shard] = pin_file(shard)
                entries, shard_metadata = _shard_entries(shard)
                check_unchanged(shard, *pinned[shard])
                metadata = metadata or shard_metadata
                _add_entries(tensors, entries, shard, weight_map, index_path)
        except BaseException:
            for fd, _ in pinned.values():
                os.close(fd)
            raise
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                for fd, _ in pinned.values():
                    os.close(fd)
                raise ShardIndexError(
                    f"{index_path}: weight_map names tensor {missing[0]!r} in "
                    f"{weight_map[missing[0]]}, which does not hold it"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
        return cls(root, tensors, metadata, pinned)

    @property
    def files(self) -> list[Path]:
        return sorted({info.path for info in self._tensors.values()})

    def __getitem__(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def read_into(self, info: TensorInfo, byte_start: int, buffer: memoryview) -> None:
        """Fill `buffer` with the tensor's bytes from `byte_start` on (relative to the tensor)."""
        if info.path not in self._pinned:
            raise InputError(f"{info.path}: is closed; open the checkpoint again to read it")
        fd, pinned = self._pinned[info.path]
        check_unchanged(info.path, fd, pinned)
        position = info.offset + byte_start
        view = buffer
        while len(view):
            try:
                got = os.preadv(fd, [view], position)
            except OSError as exc:
                raise InputError(
                    f"{info.path}: reading tensor {info.name!r} failed ({exc.strerror or exc})"
                ) from None
            if got == 0:
                raise InputError(
                    f"{info.path}: file ended while reading tensor {info.name!r}; it was "
                    "truncated or changed after its header was read"
                )
            view = view[got:]
            position += got
            self.bytes_read += got

    def close(self) -> None:
        for fd, _ in self._pinned.values():
            os.close(fd)
        self._pinned.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
