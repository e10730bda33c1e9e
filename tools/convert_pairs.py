"""Convert RewardBench, RewardBench 2, Auto-J (and TRL) files to lazymerge's JSON Lines.

    python tools/convert_pairs.py rewardbench filtered.parquet -o rewardbench.jsonl
    python tools/convert_pairs.py autoj testdata_pairwise.jsonl -o autoj.jsonl
    python tools/convert_pairs.py rewardbench2 test-00000-of-00001.parquet -o rewardbench2.jsonl

Kept for old scripts: it is `lazymerge convert SOURCE -o OUTPUT` (one implementation,
`lazymerge.evaluation.convert`), which detects the format itself and also reads cached Hugging
Face datasets; `rewardbench2` refuses a source that holds pairs. The output is written atomically
and never over the source; an existing OUTPUT is replaced only with --force, and only when
lazymerge wrote it (see `lazymerge.io.outputs`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazymerge.errors import LazyMergeError  # noqa: E402
from lazymerge.evaluation.convert import convert  # noqa: E402

#: The old formats, and the kind `lazymerge convert` reads each as.
FORMATS = {"rewardbench": "pairs", "autoj": "pairs", "rewardbench2": "rewardbench2"}


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes in one line with exit status 2, as lazymerge's own commands report them."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"Error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=sorted(FORMATS))
    parser.add_argument("source")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if lazymerge wrote it")
    args = parser.parse_args(argv)
    try:
        done = convert(args.source, args.output, FORMATS[args.format], args.force)
    except LazyMergeError as exc:
        print(f"Error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 1
    except OSError as exc:  # the source vanished or cannot be read
        print(f"Error: {args.source}: cannot read ({exc.strerror or exc})", file=sys.stderr)
        return 1
    print(done.format(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
