"""The exceptions lazymerge raises for bad input and failed output.

Every message names the file (and tensor, where there is one), what was expected and what was
found, and the fix when there is one. The CLI turns any `LazyMergeError` into a one-line
`Error: ...` and exit status 1.
"""

from __future__ import annotations


class LazyMergeError(Exception):
    """Base class of every error lazymerge reports to users."""


class HeaderError(LazyMergeError):
    """A safetensors header or index is malformed."""


class HeaderTooShortError(HeaderError):
    """The file is shorter than the 8-byte length prefix, or than the header it announces."""


class HeaderTooLargeError(HeaderError):
    """The announced header length exceeds the size limit."""


class HeaderEncodingError(HeaderError):
    """The header is not valid UTF-8."""


class HeaderJsonError(HeaderError):
    """The header is not a JSON object (or nests too deeply, or repeats a key)."""


class HeaderEntryError(HeaderError):
    """A tensor entry or the metadata has the wrong fields or field types."""


class UnknownDtypeError(HeaderError):
    """A tensor's dtype is not one safetensors defines."""


class TensorSizeError(HeaderError):
    """A tensor's byte range does not match its shape times its dtype size."""


class OffsetError(HeaderError):
    """Tensor data offsets are not contiguous from 0."""


class DataLengthError(HeaderError):
    """The tensor data does not end exactly at the end of the file."""


class ShardIndexError(HeaderError):
    """A `*.safetensors.index.json` file is malformed or disagrees with its shards."""


class IntegrityError(LazyMergeError):
    """A file's data does not match the hash recorded when it was written."""


class NonFiniteError(LazyMergeError):
    """An input tensor holds NaN or Inf and --check-finite was given."""


class InputError(LazyMergeError):
    """An input path cannot be read or is not a checkpoint."""


class IncompatibleInputsError(LazyMergeError):
    """The inputs do not line up: missing tensors, shapes or dtypes that differ."""


class OutputError(LazyMergeError):
    """The output cannot be written where asked (exists, is an input, disk full, ...)."""


class MissingDependencyError(LazyMergeError):
    """An optional dependency is not installed."""
