"""Run the lazymerge command line with one function made to stop at a known point.

    python tests/helpers/pause_at.py TARGET READY_FD [--call N] [--after] -- LAZYMERGE_ARGS...

TARGET is `module:attribute.path` (say `lazymerge.io.writer:StreamingShardWriter.write`). On its
N-th call (counted over all threads; 1 by default), before the call runs, or after it returned
with --after, the calling thread writes one line to the inherited file descriptor READY_FD and
then parks: it waits until a signal reaches the process (Python's wakeup fd) and then goes on.
The test waits for that line, so its signal lands while the run is exactly where the test wants
it (temporaries open, N points recorded...), however busy the machine is. Nothing in lazymerge
knows of this file: the patch is made here, before the command line starts.

A park in the main thread raises the signal's exception (KeyboardInterrupt, SIGTERM's) from the
patched function; a park in another thread resumes only after the signal has been received, so
the main thread runs the handler at its next bytecode, before it can do more work.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import importlib
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any


def _resolve(target: str) -> tuple[Any, str]:
    module_name, _, attr_path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    getattr(owner, name)  # fails here, loudly, when the target was renamed
    return owner, name


LAUNCHER = Path(__file__).resolve()


def start_paused(
    target: str, args: list[str], call: int = 1, after: bool = False, **popen: Any
) -> subprocess.Popen[str]:
    """Start `lazymerge ARGS` under this launcher and return once it is parked at `target`.

    Raises AssertionError (with the command's stderr) when the command ended without reaching
    its N-th call of `target`: a test that cannot stop the run where it wants fails, it never
    signals a run that already finished.
    """
    ready_r, ready_w = os.pipe()
    command = [sys.executable, str(LAUNCHER), target, str(ready_w), "--call", str(call)]
    command += ["--after"] if after else []
    popen.setdefault("stderr", subprocess.PIPE)
    try:
        proc = subprocess.Popen([*command, "--", *args], pass_fds=[ready_w], text=True, **popen)
    finally:
        os.close(ready_w)
    try:
        # waiting for readiness, not for a moment: 10 minutes only so a hung start cannot hang CI
        readable, _, _ = select.select([ready_r], [], [], 600)
        line = os.read(ready_r, 4096) if readable else b""
    finally:
        os.close(ready_r)
    if not line.startswith(b"paused"):
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"never reached call {call} of {target} (exit {proc.returncode}): {err}")
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[str | None, str]:
    """Wait for a signalled run to end and return its (stdout, stderr).

    Raises AssertionError with every thread's stack (faulthandler, on SIGUSR1) when the run is
    still alive `timeout` seconds after its signal: a hang is a defect to show, not to wait out.
    """
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"still running {timeout:g} s after its signal; its threads:\n{err}") from None
    return out, err


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit("usage: pause_at.py TARGET READY_FD [--call N] [--after] -- LAZYMERGE_ARGS...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="pause_at.py")
    parser.add_argument("target")
    parser.add_argument("ready_fd", type=int)
    parser.add_argument("--call", type=int, default=1)
    parser.add_argument("--after", action="store_true")
    opts = parser.parse_args(argv[:split])

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `finish` asks for the stacks of a hang
    # every signal with a Python handler (SIGINT, and SIGTERM once the command installs its own)
    # writes a byte here from the C handler, after it marked the signal as received
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

    owner, name = _resolve(opts.target)
    original = getattr(owner, name)
    lock = threading.Lock()
    calls = [0]

    def park() -> None:
        os.write(opts.ready_fd, f"paused {threading.current_thread().name}\n".encode())
        os.close(opts.ready_fd)
        select.select([wake_r], [], [])  # no timeout: only a signal ends the wait

    @functools.wraps(original)
    def patched(*args: Any, **kwargs: Any) -> Any:
        with lock:
            calls[0] += 1
            here = calls[0] == opts.call
        if here and not opts.after:
            park()
        result = original(*args, **kwargs)
        if here and opts.after:
            park()
        return result

    setattr(owner, name, patched)
    sys.argv = ["lazymerge", *argv[split + 1 :]]
    runpy.run_module("lazymerge", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    # the repository root first, as `python -m lazymerge` run from it would have it
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    main(sys.argv[1:])
