"""lazymerge: memory-lean streaming merges of safetensors checkpoints."""

from lazymerge._version import __version__
from lazymerge.errors import LazyMergeError
from lazymerge.io.reader import Checkpoint, TensorInfo
from lazymerge.merge.api import MergeReport, merge
from lazymerge.options import MergeOptions

__all__ = [
    "Checkpoint",
    "LazyMergeError",
    "MergeOptions",
    "MergeReport",
    "TensorInfo",
    "__version__",
    "merge",
]
