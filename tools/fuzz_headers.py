"""Longer fuzzing of the safetensors header parser (opt-in; CI runs a few hundred cases in seconds).

    python tools/fuzz_headers.py --examples 200000

Feeds arbitrary bytes and mutated valid headers to `lazymerge.io.header.parse_header` and fails
on any outcome other than a parsed header or a `HeaderError`: another exception, a hang (each case
gets a deadline) or a parse that does not cover the file exactly.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lazymerge.errors import HeaderError  # noqa: E402
from lazymerge.io.header import parse_header  # noqa: E402


def valid_file() -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
        "c": {"dtype": "I64", "shape": [], "data_offsets": [32, 40]},
    }
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + bytes(40)


def check(raw: bytes) -> None:
    try:
        header = parse_header(raw, len(raw), "fuzz")
    except HeaderError:
        return
    assert sum(e.nbytes for e in header.tensors) == len(raw) - header.data_start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=100_000)
    args = parser.parse_args()
    config = settings(
        max_examples=args.examples, deadline=2000, suppress_health_check=list(HealthCheck), database=None
    )
    seed = valid_file()

    @config
    @given(st.binary(max_size=4096))
    def arbitrary(raw: bytes) -> None:
        check(raw)

    @config
    @given(
        st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), min_size=1, max_size=8),
        st.integers(0, len(seed)),
    )
    def mutated(edits: list[tuple[int, int]], cut: int) -> None:
        raw = bytearray(seed)
        for pos, value in edits:
            raw[pos] = value
        check(bytes(raw[: max(cut, 1)] if cut < 8 else raw))

    for test in (arbitrary, mutated):
        test()
        print(f"{test.__name__}: {args.examples} examples, every one parsed or raised HeaderError")


if __name__ == "__main__":
    main()
