"""Hugging Face model ids as inputs, found in the local Hugging Face cache (never downloaded).

Wherever lazymerge takes a model folder or checkpoint, `ORG/NAME` or `ORG/NAME@REVISION` names the
snapshot of that model in the cache `huggingface-cli download` / `hf download` fills
(`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`): the snapshot of
`refs/main`, or of the given branch or tag (`refs/REVISION`) or commit. The lookup is
huggingface_hub's own (`snapshot_download(local_files_only=True)`), so the cache layout is its
business; it never touches the network. A local path of the same name always wins.

The snapshot's files are symlinks to the cache's blobs; lazymerge reads them as files and the
output rules (`writer.check_against_inputs`) keep every output out of the cached model's folder.
`resolve_input` is the one place an input name becomes a path; huggingface_hub is imported only
when a name is looked up in the cache.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.errors import InputError, MissingDependencyError

#: ORG/NAME[@REVISION], with the Hub's repository name characters; a revision is a branch, tag
#: or commit name (letters, digits, `_.-/`, no `..`, so it cannot leave the cache's refs folder).
_HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w.][\w./-]{0,255}))?"
)
#: Names that are checkpoint files, not model ids, when they do not exist.
_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".jsonl", ".pt", ".pth", ".index.json")
DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class ModelSource:
    """An input as the user named it and what lazymerge reads for it.

    Attributes:
        given: the name as given (a path, `ORG/NAME` or `ORG/NAME@REVISION`).
        path: the file or folder read.
        repo_id: `ORG/NAME` when the input came from the Hugging Face cache, else None.
        revision: the revision asked for (`main` by default), None for local paths.
        commit: the snapshot's commit, None for local paths.
    """

    given: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    @property
    def from_hub_cache(self) -> bool:
        return self.repo_id is not None

    @property
    def name(self) -> str:
        """How a model card's `base_model` names it: the Hub id, else the path as given."""
        return self.repo_id if self.repo_id is not None else self.given

    @property
    def pinned(self) -> str:
        """A name that reads the same files again: `ORG/NAME@COMMIT` for the cache, else the path."""
        return f"{self.repo_id}@{self.commit}" if self.repo_id is not None else self.given

    def describe(self) -> str:
        if self.repo_id is None:
            return f"{self.given}: local path {self.path}"
        return (
            f"{self.given}: Hugging Face cache, {self.repo_id} at {self.revision} (commit {self.commit}), "
            f"snapshot {self.path}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "given": self.given,
            "path": str(self.path),
            "hub_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
        }


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(ORG/NAME, REVISION or None) when `text` reads as a model id, else None."""
    match = _HUB_ID.fullmatch(text)
    if match is None or text.endswith(_FILE_SUFFIXES):
        return None
    repo, revision = match.group("repo"), match.group("revision")
    if ".." in repo or "--" in repo or (revision is not None and ".." in revision.split("/")):
        return None
    return repo, revision


def hub_cache_dir() -> str:
    """The Hugging Face cache folder: `HF_HUB_CACHE` as set now, else huggingface_hub's own
    choice (made from `HF_HOME` and friends when it was imported)."""
    from huggingface_hub import constants

    override = os.environ.get("HF_HUB_CACHE")
    if override:
        return os.path.expandvars(os.path.expanduser(override))
    return str(constants.HF_HUB_CACHE)


def download_hint(repo_id: str, revision: str | None, repo_type: str = "model") -> str:
    """The command that puts a model (or, with `repo_type="dataset"`, a dataset) in the cache."""
    args = ["hf", "download", repo_id]
    if repo_type != "model":
        args += ["--repo-type", repo_type]
    if revision is not None and revision != DEFAULT_REVISION:
        args += ["--revision", revision]
    return shlex.join(args)


def resolve_input(given: str | os.PathLike[str]) -> ModelSource:
    """The file or folder an input name stands for: a local path when one exists by that name,
    else, for `ORG/NAME[@REVISION]`, its snapshot in the Hugging Face cache. Anything else is
    returned as a path (later reads report it missing).

    Raises:
        InputError when a model id is in no local path and not in the cache (the message names
        the `hf download` command to run); MissingDependencyError without huggingface_hub.
    """
    text = os.fspath(given)
    path = Path(text)
    if path.exists() or path.is_symlink():
        return ModelSource(text, path)
    parsed = parse_hub_id(text)
    if parsed is None:
        return ModelSource(text, path)
    repo_id, revision = parsed
    return _from_cache(text, repo_id, revision or DEFAULT_REVISION)


def _from_cache(text: str, repo_id: str, revision: str, repo_type: str = "model") -> ModelSource:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError
    except ImportError:
        raise MissingDependencyError(
            f"{text}: no such file or folder; reading it as a Hugging Face model id needs huggingface_hub "
            "(pip install huggingface_hub)"
        ) from None
    cache = hub_cache_dir()
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache, local_files_only=True, repo_type=repo_type
        )
    except HFValidationError:
        return ModelSource(text, Path(text))
    except IncompleteSnapshotError:
        raise InputError(
            f"{text}: the Hugging Face cache ({cache}) holds only part of {repo_id} at {revision}; "
            f"lazymerge never downloads: run `{download_hint(repo_id, revision, repo_type)}` to finish it"
        ) from None
    except LocalEntryNotFoundError:
        raise InputError(
            f"{text}: no such file or folder, and the Hugging Face cache ({cache}) holds no snapshot of "
            f"{'the dataset ' if repo_type == 'dataset' else ''}{repo_id} at revision {revision}; "
            f"lazymerge never downloads: run `{download_hint(repo_id, revision, repo_type)}` first"
        ) from None
    snapshot = Path(folder)
    return ModelSource(text, snapshot, repo_id, revision, snapshot.name)


def resolve_dataset(text: str, repo_id: str, revision: str | None) -> ModelSource:
    """The snapshot of the dataset `repo_id` (at `revision`, else `main`) in the Hugging Face
    cache, looked up as `resolve_input` looks up models (huggingface_hub's own lookup,
    `repo_type="dataset"`, never a download); `text` is the name as given, for messages.

    Raises:
        InputError when the cache holds no (or only part of a) snapshot, naming the
        `hf download REPO --repo-type dataset` command; MissingDependencyError without
        huggingface_hub.
    """
    return _from_cache(text, repo_id, revision or DEFAULT_REVISION, "dataset")


def resolve_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[ModelSource]:
    """`resolve_input` of each input, in order."""
    return [resolve_input(i) for i in inputs]


def input_paths(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The paths read for `inputs` (see `resolve_input`)."""
    return [s.path for s in resolve_inputs(inputs)]


def hub_repo_folder(path: Path) -> Path | None:
    """The cache folder of one model (`.../models--ORG--NAME`) when `path` is a snapshot or lies
    in one (`models--ORG--NAME/snapshots/COMMIT/...`), else None. Pure path logic: no import,
    no file read."""
    parts = path.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            return Path(*parts[:i])
    return None


def missing_target_message(link: Path) -> str:
    """Why a symlink that points nowhere holds no data, and the fix. In a Hugging Face snapshot
    every file is a symlink to a blob; a missing blob is a download that was interrupted or a
    blob removed from the cache, and downloading that snapshot again restores it."""
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    repo = hub_repo_folder(Path(os.path.abspath(link)))
    if repo is None:
        return f"{link}: is a symlink to {target}, which does not exist"
    repo_id = "/".join(repo.name.split("--")[1:])
    snapshot = Path(os.path.abspath(link)).relative_to(repo).parts[1]
    return (
        f"{link}: points to {target}, a blob missing from the Hugging Face cache (an interrupted "
        f"download, or the blob was removed); download the snapshot again: "
        f"`{download_hint(repo_id, snapshot)}`"
    )
