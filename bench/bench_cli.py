"""What every bench shares at its edge: one-line usage errors (exit 2), one-line failures (exit 1)
and its results files reserved under lazymerge's output rule before any work is done.

The rule (`lazymerge.io.outputs`): never an input, never an existing file without --force,
--force replaces only files lazymerge wrote (a bench's results are recorded in the manifest of
their folder), every file written atomically. A bench that would be refused is refused at once,
not after minutes of measuring.
"""

from __future__ import annotations

import argparse
import atexit
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from lazymerge.io.outputs import OutputFiles

# lazymerge is imported where it is used: compare.py's disk probes are bare processes

FORCE_HELP = "replace results files that a bench (lazymerge) wrote before; never anybody else's"


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo), for the machine line beside every figure."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes in one line with exit status 2, as lazymerge's own commands report them."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"Error: {message} (see {self.prog} --help)\n")


def fail(message: object) -> NoReturn:
    """One line naming what went wrong, exit status 1."""
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(1)


def reserve_results(paths: Sequence[Path], force: bool, inputs: Sequence[Path] = ()) -> OutputFiles:
    """Lock and check the results files now (creating their folders); write them with
    `.write({path: bytes})` when the bench is done and `.release()` after. A refusal ends the
    bench with one line and exit status 1."""
    from lazymerge.errors import LazyMergeError
    from lazymerge.io.outputs import OutputFiles

    try:
        reserved = OutputFiles(paths, inputs=inputs, force=force, make_folders=True)
    except LazyMergeError as exc:
        fail(exc)
    atexit.register(reserved.release)  # a bench that fails half-way leaves no lock files
    return reserved


def write_results(reserved: OutputFiles, contents: dict[Path, bytes]) -> None:
    """Write reserved results atomically; a failure (a full disk) ends with one line, leaving none."""
    from lazymerge.errors import LazyMergeError

    try:
        reserved.write(contents)
    except LazyMergeError as exc:
        fail(exc)
    finally:
        reserved.release()
