"""lazymerge: memory-lean streaming merges of safetensors checkpoints."""

__version__ = "0.1.0"

from lazymerge.api import MergeReport, merge  # noqa: E402
from lazymerge.errors import LazyMergeError  # noqa: E402
from lazymerge.io.reader import Checkpoint, TensorInfo  # noqa: E402
from lazymerge.options import MergeOptions  # noqa: E402

__all__ = [
    "Checkpoint",
    "LazyMergeError",
    "MergeOptions",
    "MergeReport",
    "TensorInfo",
    "__version__",
    "merge",
]
