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


class SubByteDtypeError(HeaderError):
    """A tensor's dtype packs values below a byte (F4, F6_*), which lazymerge does not read."""


class TensorSizeError(HeaderError):
    """A tensor's byte range does not match its shape times its dtype size."""


class OffsetError(HeaderError):
    """Tensor data offsets are not contiguous from 0."""


class DataLengthError(HeaderError):
    """The tensor data does not end exactly at the end of the file."""


class TooManyTensorsError(HeaderError):
    """A file or checkpoint lists more tensors than lazymerge reads per input (`header.MAX_TENSORS`)."""


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


class OptionError(LazyMergeError):
    """An option value is wrong whatever the inputs (the command line exits 2)."""


class BinArchiveError(HeaderError):
    """A PyTorch `.bin` archive (the zip format of `torch.save`) is malformed."""


class BinNotZipError(BinArchiveError, InputError):
    """A `.bin` file is not a zip archive: a legacy (pre-zip) `torch.save` file, or no checkpoint."""


class BinZipError(BinArchiveError):
    """The zip structure of a `.bin` archive is damaged: truncated, a bad central directory or
    local header, a CRC mismatch, duplicate or stray records."""


class BinLimitError(BinArchiveError):
    """A `.bin` archive exceeds a limit that bounds memory (central directory size, data.pkl size,
    pickle opcodes, tensors); refused before the limit is reached."""


class BinFormatError(BinArchiveError):
    """A `.bin` archive's `version` or `byteorder` record is missing or not one lazymerge reads."""


class UnsafePickleError(BinArchiveError):
    """A `.bin` pickle references something other than tensors and their storages."""


class BinPickleError(BinArchiveError):
    """A `.bin` archive's data.pkl is not a valid pickle, or not a flat state dict of named tensors."""


class BinTensorError(BinArchiveError):
    """A `.bin` tensor's shape, strides or storage offset are not non-negative integers, overflow
    64 bits, or are not contiguous."""


class BinStorageError(BinArchiveError):
    """A `.bin` tensor's storage record is missing, compressed, of the wrong size, used with two
    dtypes, or does not hold the tensor's bytes."""


class TokenizerFileError(InputError):
    """A tokenizer file (tokenizer.json, tokenizer_config.json, added_tokens.json, tokenizer.model)
    is malformed: wrong types, negative or duplicate ids, not UTF-8 JSON."""


class ConfigFileError(InputError):
    """A model folder's config.json is malformed or a field lazymerge uses has the wrong type."""


class VocabularyMismatchError(IncompatibleInputsError):
    """A model folder's tokenizer ids or config vocab_size disagree with its embedding's rows."""


class MergekitConfigError(InputError):
    """A mergekit YAML config is malformed or asks for something lazymerge does not do."""


class EvalDataError(InputError):
    """An evaluation data file (JSON Lines) is malformed."""


class PairFileError(EvalDataError):
    """A pair file (RewardBench or Auto-J rows) is malformed or holds no pair to score."""


class CandidateFileError(EvalDataError):
    """A best-of-N candidate file is malformed or holds no prompt."""


class TemplateLimitError(InputError):
    """A chat template passed a limit on rendering (steps, time, output or value size, recursion
    depth), per render or over all renders of one run."""


class NonFiniteRewardError(LazyMergeError):
    """A reward model gave a NaN or infinite reward. Carries the model, the value, and the text
    (and its index among the texts scored) that got it, so the caller can name the text's
    source (`at`)."""

    def __init__(
        self, model: str, value: float, text: str, index: int | None = None, where: str = ""
    ) -> None:
        self.model, self.value, self.text, self.index, self.where = model, value, text, index, where
        super().__init__(
            f"{model}: the reward model gives {value} (not a finite number) for "
            + (where or "a text")
            + "; scoring stopped (look for NaN or inf in its weights: lazymerge verify --finite)"
        )

    def __reduce__(self) -> tuple[type[NonFiniteRewardError], tuple[str, float, str, int | None, str]]:
        # pickled with its fields, so a Ray worker's error arrives as itself, message and all
        return (NonFiniteRewardError, (self.model, self.value, self.text, self.index, self.where))

    def at(self, where: str) -> NonFiniteRewardError:
        """The same error naming the text's source (`FILE:LINE (...)`)."""
        return NonFiniteRewardError(self.model, self.value, self.text, self.index, where)
