"""Score texts with a reward model whose weights stream through memory one decoder layer at a time.

Scoring is one forward pass over many texts, so the texts can go through layer L together
before layer L+1 is needed: each layer's weights are then read (or merged) once per pass and
their cost is shared by every text. `LayerStreamedModel` does exactly that:

1. the embedding's tensor is read (merged by the DogeRM recipe, rows by token, when the source is
   a merge) and applied to every batch; the hidden states of every text stay in host memory
   (`ActivationStore`), past `max_activations` bytes in a memory-mapped file;
2. for each decoder layer: its tensors are read, or merged by the streaming engine straight from
   the inputs (`MergedWeights`), put into that layer of a model skeleton built on the meta device
   from the config (transformers' own decoder-layer module, rotary embedding and mask functions,
   so the arithmetic is the whole model's), run over every batch, and released;
3. the final norm and the reward head, on every position as transformers' forward does, and the
   reward read at each text's last real token (`prefix_scoring.reward_length`'s rule).

A reader thread prepares the next group of weights while the current one computes; a semaphore
holds the weights alive at once to two groups (the one computing and the one being read), which
`WeightLedger` measures from the tensors' own lifetimes.

Batches are those of the in-memory whole-text path (`whole_text_batches`: sorted by length,
padded on the right, `token_batches` over the same budget), so the rewards are bit-identical to
`RewardModel.score_encoded` without the prefix cache, in the same dtype on the same device (the
tests hold this for Llama, Mistral and Qwen2 in fp32 and bf16). `predict_stream` gives the
memory this takes before any weight is read.

Nothing above this module is imported here: the loaders in `rewards` and `in_memory` check a
folder (remote code, reward head) and wrap a `LayerStreamedModel` into their `RewardModel`.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import queue
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lazymerge._optional import require
from lazymerge.errors import IncompatibleInputsError, InputError, OptionError
from lazymerge.evaluation.prefix_scoring import (
    ScoringStats,
    cache_path_refusal,
    distinct_prefix_tokens,
    reward_length,
    token_batches,
)
from lazymerge.evaluation.stream_prefix import StreamedPrefixWalk
from lazymerge.memory import aligned
from lazymerge.score_options import ScoreOptions

if TYPE_CHECKING:
    import torch

    from lazymerge.io.reader import Checkpoint
    from lazymerge.merge.plan import MergePlan
    from lazymerge.options import MergeOptions

#: Families whose base model's forward `LayerStreamedModel` reproduces layer by layer (the tests
#: compare each with transformers' own forward), and the mask each layer takes: "full" (causal),
#: "window" (sliding window when the config sets one) or "layer_types" (per the config's list).
STREAM_FAMILIES = {"llama": "full", "mistral": "window", "qwen2": "layer_types"}
#: Groups of weights alive at once: the one computing and the one the reader thread prepares.
WEIGHT_SLOTS = 2
#: Resident memory of the interpreter with torch and transformers imported, added to the
#: predicted peak (`workspace.BASELINE_RSS` is torch alone; transformers adds about 150 MB).
STREAM_BASELINE_RSS = 450 * 10**6


def compute_torch_dtype(score: ScoreOptions) -> torch.dtype:
    """The torch dtype `score` computes in."""
    import torch

    return getattr(torch, score.compute_dtype)  # type: ignore[no-any-return]


#: The bitsandbytes layers `replace_with_bnb_linear` puts in, by --quant.
QUANT_LAYERS = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}


def quantizable(model: Any, quantization_config: Any) -> Any:
    """An empty model with its linear layers swapped for bitsandbytes ones, the reward head
    excepted (transformers' own swap, as its loader makes it)."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    return replace_with_bnb_linear(
        model, modules_to_not_convert=["score"], quantization_config=quantization_config
    )


def quantized_parameter(module: Any, tensor: torch.Tensor, quant: str, device: str) -> torch.nn.Parameter:
    """`tensor` (in the compute dtype) quantized on `device` as the weight of the empty
    bitsandbytes layer `module`, whose meta weight carries the settings (block size, NF4, double
    quantization, storage) that transformers' own loader reuses; `.to()` quantizes."""
    import bitsandbytes as bnb

    settings = {k: v for k, v in module.weight.__dict__.items() if k != "SCB"}
    if quant == "4bit":
        return bnb.nn.Params4bit(tensor, requires_grad=False, **settings).to(device)  # type: ignore[attr-defined,misc]
    return bnb.nn.Int8Params(tensor, requires_grad=False, **settings).to(device)  # type: ignore[attr-defined,misc]


def is_quantized_weight(module: Any, leaf: str, quant: str | None) -> bool:
    """Whether `module.leaf` is quantized under `quant` (a bitsandbytes layer's weight)."""
    return quant is not None and leaf == "weight" and type(module).__name__ == QUANT_LAYERS[quant]


def whole_text_batches(
    encoded: Mapping[str, Sequence[int]], pad_id: int | None, batch_tokens: int, batch_size: int
) -> list[list[str]]:
    """The texts of each batch of the whole-text path: sorted longest first (ties by text), at
    most `batch_tokens` padded tokens and `batch_size` rows a batch; one text a batch without a
    pad id, since only unpadded passes are then exact."""
    rows = batch_size if pad_id is not None else 1
    order = sorted(encoded, key=lambda t: (-len(encoded[t]), t))
    return [
        [order[i] for i in indices]
        for indices in token_batches([(len(encoded[t]), 0) for t in order], batch_tokens, rows)
    ]


class WeightSource(Protocol):
    """Where a streamed model's tensors come from: names known up front, tensors on request."""

    #: What the weights are, for messages (a folder, or the merge's reward model).
    label: str

    def names(self) -> list[str]: ...

    def read(self, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]: ...

    def close(self) -> None: ...


class FolderWeights:
    """The tensors of one model folder (safetensors or `.bin`), read tensor by tensor."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.label = str(checkpoint.path)
        #: Seconds spent reading tensor bytes.
        self.read_seconds = 0.0

    def names(self) -> list[str]:
        return list(self.checkpoint)

    def read(self, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each tensor in its stored dtype (the caller casts, as transformers' loader does)."""
        import torch

        from lazymerge.io.dtypes import torch_dtype

        for name in names:
            info = self.checkpoint[name]
            # a bytearray, as the engine's in-memory merge uses: torch's own allocations here
            # left the process larger across passes
            data = bytearray(info.nbytes)
            started = time.perf_counter()
            self.checkpoint.read_into(info, 0, memoryview(data))
            self.read_seconds += time.perf_counter() - started
            if info.numel:
                yield name, torch.frombuffer(data, dtype=torch_dtype(info.dtype)).view(info.shape)
            else:
                yield name, torch.empty(info.shape, dtype=torch_dtype(info.dtype))

    def close(self) -> None:
        self.checkpoint.close()


class MergedWeights:
    """Tensors of one output of a merge plan, merged on request from the inputs: the same reads
    and arithmetic as `engine.iter_merged_tensors` (so the same bytes as a written output), for
    any subset of the tensors, in any order."""

    def __init__(self, plan: MergePlan, checkpoints: Sequence[Checkpoint], variant: int = 0) -> None:
        from lazymerge.merge.plan import buffer_sizes
        from lazymerge.merge.workspace import Workspace

        if not 0 <= variant < len(plan.variants):
            raise IndexError(f"plan has {len(plan.variants)} outputs, not {variant + 1}")
        # through the page cache, one output: as iter_merged_tensors reads for a sweep point
        self.plan = dataclasses.replace(
            plan, variants=(plan.variants[variant],), variant_names=("",), direct_io=False, staging_bytes=0
        )
        self.checkpoints = list(checkpoints)
        rm = plan.roles.index("reward model") if "reward model" in plan.roles else 0
        self.label = f"{plan.inputs[rm]} (merged)"
        # one input set and no output buffers: chunks are merged straight into each tensor
        self.workspace = Workspace(buffer_sizes(self.plan), threading.Event(), input_sets=1, output_sets=0)
        self.buffers = self.workspace.take(self.workspace.free_inputs)
        self._warned: set[str] = set()
        #: Seconds spent reading input bytes (the arithmetic is the rest of a read's time).
        self.read_seconds = 0.0

    def names(self) -> list[str]:
        return list(self.plan.tensors)

    def working_bytes(self) -> int:
        """Bytes of the merge's reusable buffers (one input set and the fp32 blocks)."""
        return self.workspace.allocated_bytes() + sum(len(b) for b in self.buffers)

    def _warn(self, tensor: str, message: str) -> None:
        if tensor not in self._warned:
            self._warned.add(tensor)
            import warnings

            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def read(self, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each tensor merged whole, in the plan's output dtype."""
        import torch

        from lazymerge.io.dtypes import itemsize, torch_dtype
        from lazymerge.merge.engine import _Chunk, merge_chunk, merge_tensor, read_chunk

        for name in names:
            tp = self.plan.tensors[name]
            size = itemsize(tp.dtype)
            data = bytearray(tp.numel * size)  # (numel,) in the output dtype, as iter_merged_tensors
            raw = memoryview(data)
            step = self.plan.chunk_len(tp)
            if self.plan.passes(tp) > 1:
                # statistics passes first (ties, model_stock, nuslerp): the engine's own loop; their
                # reads count as the merge's time
                merge_tensor(
                    self.plan, self.checkpoints, tp, self.buffers, self.workspace.fp32, raw, self._warn
                )
            else:
                for start in range(0, tp.numel, step):
                    count = min(step, tp.numel - start)
                    chunk = _Chunk(tp, start, count, 0, False)
                    started = time.perf_counter()
                    views = read_chunk(self.checkpoints, chunk, self.buffers)
                    self.read_seconds += time.perf_counter() - started
                    out = [raw[start * size : (start + count) * size]]
                    merge_chunk(self.plan, chunk, views, out, self.workspace.fp32, self._warn)
            if tp.numel:
                yield name, torch.frombuffer(data, dtype=torch_dtype(tp.dtype)).view(tp.shape)
            else:
                yield name, torch.empty(tp.shape, dtype=torch_dtype(tp.dtype))

    def close(self) -> None:
        for checkpoint in self.checkpoints:
            checkpoint.close()


@dataclass(frozen=True)
class WeightGroup:
    """Tensors loaded and released together: the embedding, one decoder layer, or the head
    (final norm and reward head). `names` are the checkpoint's names, `leaves` the matching
    names inside `module`."""

    label: str
    module: Any
    names: tuple[str, ...]
    leaves: tuple[str, ...]
    nbytes: int


class WeightLedger:
    """Bytes of streamed weights alive at once, measured from the tensors' lifetimes: each
    parameter is counted when made and uncounted when the last reference to it goes (a leak
    shows here, where bookkeeping would not)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.live_groups: dict[str, int] = {}
        self.peak_groups = 0

    def track(self, group: str, param: torch.Tensor) -> None:
        nbytes = param.numel() * param.element_size()
        with self._lock:
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self.live_groups[group] = self.live_groups.get(group, 0) + 1
            self.peak_groups = max(self.peak_groups, len(self.live_groups))
        weakref.finalize(param, self._untrack, group, nbytes)

    def _untrack(self, group: str, nbytes: int) -> None:
        with self._lock:
            self.live_bytes -= nbytes
            self.live_groups[group] -= 1
            if not self.live_groups[group]:
                del self.live_groups[group]


class ActivationStore:
    """The hidden states of every batch between layers: in host memory up to `max_bytes`, the
    rest in one memory-mapped file in `spill_dir`.

    The file is unlinked as soon as it is mapped, so nothing is left behind whatever ends the
    run (an exception, Ctrl-C, even a kill); its pages are file-backed, so the kernel writes
    them back and drops them under memory pressure instead of swapping.
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, ...]],
        dtype: torch.dtype,
        max_bytes: int | None,
        spill_dir: Path,
        plan_only: bool = False,
    ) -> None:
        """`plan_only`: split the bytes between memory and file without making the file (the
        prediction's split is then the run's)."""
        self.dtype = dtype
        self.shapes = list(shapes)
        itemsize = dtype.itemsize
        sizes = [itemsize * _prod(s) for s in self.shapes]
        self.offsets: list[int | None] = []  # None: in memory
        resident = spilled = 0
        for size in sizes:
            if max_bytes is None or resident + size <= max_bytes:
                self.offsets.append(None)
                resident += size
            else:
                self.offsets.append(spilled)
                spilled += size
        self.resident_bytes, self.spilled_bytes = resident, spilled
        self.spill_path: Path | None = None
        self._map: mmap.mmap | None = None
        self._slots: list[Any] = [None] * len(self.shapes)
        if spilled and not plan_only:
            self._open_file(spill_dir, spilled)

    def _open_file(self, spill_dir: Path, nbytes: int) -> None:
        try:
            fd, name = tempfile.mkstemp(prefix=".lazymerge-activations-", suffix=".tmp", dir=spill_dir)
        except OSError as exc:
            raise InputError(
                f"{spill_dir}: cannot create the activations' spill file ({exc.strerror}); "
                "raise --max-activations or free the folder"
            ) from None
        self.spill_path = Path(name)
        try:
            os.ftruncate(fd, nbytes)
            self._map = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        except OSError as exc:
            raise InputError(
                f"{spill_dir}: cannot size the activations' spill file to {nbytes:,} bytes ({exc.strerror})"
            ) from None
        finally:
            os.close(fd)
            os.unlink(name)  # the mapping keeps the data; the name goes at once

    def put(self, k: int, hidden: torch.Tensor) -> None:
        """Keep batch `k`'s hidden states (a host tensor of its shape and the store's dtype)."""
        offset = self.offsets[k]
        if offset is None:
            self._slots[k] = hidden
        else:
            self._view(k, offset).copy_(hidden)

    def get(self, k: int) -> torch.Tensor:
        """Batch `k`'s hidden states (a view of the file when spilled: drop it after use)."""
        offset = self.offsets[k]
        return self._slots[k] if offset is None else self._view(k, offset)

    def _view(self, k: int, offset: int) -> torch.Tensor:
        import torch

        assert self._map is not None
        count = _prod(self.shapes[k])
        flat = torch.frombuffer(
            self._map, dtype=torch.uint8, count=count * self.dtype.itemsize, offset=offset
        )
        return flat.view(self.dtype).view(self.shapes[k])

    def close(self) -> None:
        self._slots = [None] * len(self.shapes)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still referenced (an exception's traceback): unmapped with it
            self._map = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


@dataclass
class _Batch:
    """One batch of the whole-text path: its texts, ids padded on the right, the 2D mask,
    positions 0..width-1, and the position each row's reward is read at."""

    texts: list[str]
    ids: Any  # (rows, width) int64
    mask: Any  # (rows, width) int64
    positions: Any  # (1, width) int64
    last: Any  # (rows,) int32, or -1 without a pad id


def _make_batch(texts: list[str], encoded: Mapping[str, Sequence[int]], pad_id: int | None) -> _Batch:
    import torch

    width = max(len(encoded[t]) for t in texts)
    ids = torch.full((len(texts), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for row, text in enumerate(texts):
        seq = encoded[text]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    if pad_id is None:
        last: Any = -1
    else:
        # transformers' own rule (GenericForSequenceClassification): the rightmost non-pad
        # token, position 0 when every token is pad (`reward_length` - 1)
        indices = torch.arange(width, dtype=torch.int32)
        last = (indices * (ids != pad_id).to(torch.int32)).argmax(-1)
    return _Batch(texts, ids, mask, torch.arange(width).unsqueeze(0), last)


@dataclass
class GroupTiming:
    """Seconds one group of weights took: reading and merging them (the reader thread),
    waiting for them, and computing every batch through them (the calling thread)."""

    label: str
    read_s: float = 0.0
    merge_s: float = 0.0
    wait_s: float = 0.0
    compute_s: float = 0.0


@dataclass
class StreamStats:
    """What one streamed pass did: per group timings, activation bytes kept and spilled, and the
    peak of streamed weights alive at once (`WeightLedger`)."""

    timings: list[GroupTiming] = dataclasses.field(default_factory=list)
    resident_activation_bytes: int = 0
    spilled_activation_bytes: int = 0
    peak_weight_bytes: int = 0
    peak_weight_groups: int = 0
    #: Most bytes of prefix nodes' keys and values held at once within a layer (the prefix path).
    peak_prefix_kv_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The pass's bytes and its seconds summed over the groups (a sweep point's record)."""
        return {
            "groups": len(self.timings),
            **{
                key: round(sum(getattr(t, key) for t in self.timings), 3)
                for key in ("read_s", "merge_s", "wait_s", "compute_s")
            },
            "resident_activation_bytes": self.resident_activation_bytes,
            "spilled_activation_bytes": self.spilled_activation_bytes,
            "peak_weight_bytes": self.peak_weight_bytes,
            "peak_weight_groups": self.peak_weight_groups,
            "peak_prefix_kv_bytes": self.peak_prefix_kv_bytes,
        }


class _Prefetcher:
    """Loads groups of weights in a thread, in order, at most `WEIGHT_SLOTS` alive at once: a
    slot is taken before a group is read and given back when its compute has released it."""

    def __init__(
        self, load: Callable[[WeightGroup, GroupTiming], dict[str, Any]], groups: Sequence[WeightGroup]
    ):
        self.load, self.groups = load, list(groups)
        self.slots = threading.Semaphore(WEIGHT_SLOTS)
        self.ready: queue.Queue[Any] = queue.Queue()
        self.stop = threading.Event()
        self.timings = [GroupTiming(g.label) for g in self.groups]
        self.thread = threading.Thread(target=self._run, name="lazymerge-layer-read", daemon=True)

    def _run(self) -> None:
        try:
            for group, timing in zip(self.groups, self.timings, strict=True):
                self.slots.acquire()
                if self.stop.is_set():
                    return
                self.ready.put(self.load(group, timing))
        except BaseException as exc:  # handed to the calling thread, which raises it
            self.ready.put(exc)

    def take(self) -> dict[str, Any]:
        """The next group's parameters (name -> Parameter), or the reader's error."""
        item = self.ready.get()
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]

    def release(self) -> None:
        """One group's weights are gone: the reader may prepare another."""
        self.slots.release()

    def __enter__(self) -> _Prefetcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for _ in range(WEIGHT_SLOTS):
            self.slots.release()
        self.thread.join()  # at most the group being read is finished first
        while not self.ready.empty():
            self.ready.get_nowait()


class LayerStreamedModel:
    """A `*ForSequenceClassification` reward model scored with its weights streamed a group at a
    time from `source` (see the module's docstring); it never holds the whole model.

    Args:
        config: the reward model's transformers config (num_labels 1).
        source: where the tensors come from (`FolderWeights`, `MergedWeights`); owned: closed
            by `close`.
        score: device and compute dtype (quantization is refused by the loaders).
        max_activations: bytes of hidden states kept in host memory; the rest spill to a file
            in `spill_dir` (default: the system's temporary folder). None: no limit.
        strict: refuse source tensors the model has no place for (a merge's outputs must all
            land); a folder's extra tensors are ignored, as transformers' loader ignores them.
        quantization: with `score.quant`, the bitsandbytes config (`rewards.bnb_config`): the
            skeleton gets bitsandbytes layers and each layer's weights are quantized as they
            arrive, as the in-memory model quantizes them.

    Raises:
        InputError for an architecture the stream does not reproduce; IncompatibleInputsError
        when the source's tensors and the config disagree.
    """

    def __init__(
        self,
        config: Any,
        source: WeightSource,
        score: ScoreOptions,
        max_activations: int | None = None,
        spill_dir: Path | None = None,
        strict: bool = True,
        quantization: Any = None,
    ) -> None:
        transformers = require("transformers")
        accelerate = require("accelerate")
        self.source, self.score_options, self.device = source, score, score.device
        self.max_activations = max_activations
        self.spill_dir = spill_dir if spill_dir is not None else Path(tempfile.gettempdir())
        self.compute = compute_torch_dtype(score)
        family = getattr(config, "model_type", None)
        if family not in STREAM_FAMILIES:
            raise InputError(
                f"{source.label}: --stream-layers reproduces {', '.join(STREAM_FAMILIES)} reward models, "
                f"not {family!r}; score it without --stream-layers"
            )
        # parameters on the meta device, buffers (the rotary inverse frequencies) real, as the
        # in-memory model builds them
        with accelerate.init_empty_weights(include_buffers=False):
            self.model = transformers.AutoModelForSequenceClassification.from_config(
                config, dtype=self.compute, trust_remote_code=False
            )
        self.quant = score.quant
        if self.quant is not None:
            require("bitsandbytes")
            self.model = quantizable(self.model, quantization)
        self.model.eval()
        self.config = self.model.config
        self.base = getattr(self.model, self.model.base_model_prefix)
        self.base.rotary_emb.to(self.device)
        self.pad_id = self.config.get_text_config().pad_token_id
        # transformers' forward takes use_cache from the config: its cache (empty before each
        # layer) is recreated for each layer, so masks and attention see what the model's see
        self.use_cache = bool(getattr(self.config, "use_cache", False))
        self._meta = dict(self.model.named_parameters())
        self.groups = self._groups(strict)
        self.ledger = WeightLedger()
        #: Called with (layer index, skeleton) once a layer's weights are in place (tests).
        self.on_layer: Callable[[int, Any], None] | None = None
        self.scoring_stats: ScoringStats | None = None
        self.stream_stats: StreamStats | None = None
        weakref.finalize(self, source.close)

    def close(self) -> None:
        self.source.close()

    def _groups(self, strict: bool) -> list[WeightGroup]:
        """Embedding, each decoder layer, then the head, every parameter in exactly one."""
        prefix = self.model.base_model_prefix
        layers = len(self.base.layers)
        owners = [f"{prefix}.embed_tokens."] + [f"{prefix}.layers.{i}." for i in range(layers)]
        labels = ["embedding"] + [f"layer {i}" for i in range(layers)] + ["head"]
        members: list[list[str]] = [[] for _ in labels]
        for name in self._meta:
            place = next((k for k, start in enumerate(owners) if name.startswith(start)), len(owners))
            members[place].append(name)
        available = set(self.source.names())
        missing = [n for n in self._meta if n not in available]
        if missing:
            raise IncompatibleInputsError(
                f"{self.source.label}: no tensor {missing[0]!r} for {type(self.model).__name__}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        extra = sorted(available - set(self._meta))
        if strict and extra:
            raise IncompatibleInputsError(
                f"{self.source.label}: tensor {extra[0]!r} has no place in {type(self.model).__name__}; "
                "the reward model's config does not describe its weights"
            )
        return [
            WeightGroup(label, self.model, tuple(names), tuple(names), sum(self._bytes(n) for n in names))
            for label, names in zip(labels, members, strict=True)
        ]

    def _bytes(self, name: str) -> int:
        """Bytes tensor `name` takes loaded: the compute dtype's, or quantized (`model_bytes`'
        rule for a bitsandbytes weight)."""
        module_name, _, leaf = name.rpartition(".")
        numel = self._meta[name].numel()
        if is_quantized_weight(self.model.get_submodule(module_name), leaf, self.quant):
            return self.score_options.model_bytes(numel)
        return int(numel * self.compute.itemsize)

    def _load(self, group: WeightGroup, timing: GroupTiming) -> dict[str, Any]:
        """(reader thread) The group's tensors as parameters in the compute dtype on the device."""
        import torch

        params: dict[str, Any] = {}
        read_before = getattr(self.source, "read_seconds", 0.0)
        start = time.perf_counter()
        for name, tensor in self.source.read(group.names):
            want = tuple(self._meta[name].shape)
            if tuple(tensor.shape) != want:
                raise IncompatibleInputsError(
                    f"{self.source.label}: tensor {name!r} has shape {tuple(tensor.shape)}, the config "
                    f"gives {want}"
                )
            # the in-memory model's cast: the tensor as stored (or merged), then the compute dtype
            module_name, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            if is_quantized_weight(module, leaf, self.quant):
                assert self.quant is not None
                param = quantized_parameter(module, tensor.to(self.compute), self.quant, self.device)
            else:
                param = torch.nn.Parameter(
                    aligned(tensor.to(device=self.device, dtype=self.compute)), requires_grad=False
                )
            self.ledger.track(group.label, param)
            params[name] = param
        # the source counts its reads; the rest is arithmetic (a merge's, and the casts)
        timing.read_s = getattr(self.source, "read_seconds", 0.0) - read_before
        timing.merge_s = time.perf_counter() - start - timing.read_s
        return params

    def _install(self, params: Mapping[str, Any]) -> None:
        for name, param in params.items():
            module_name, _, leaf = name.rpartition(".")
            self.model.get_submodule(module_name)._parameters[leaf] = param

    def _release(self, group: WeightGroup) -> None:
        """Put the meta parameters back: the group's real ones lose their last reference (an
        8-bit layer's forward moves its int8 weights and scales into the layer's state: dropped
        too)."""
        self._install({name: self._meta[name] for name in group.names})
        for name in group.names:
            state = getattr(self.model.get_submodule(name.rpartition(".")[0]), "state", None)
            if state is not None and hasattr(state, "CB"):
                state.CB = state.SCB = None

    def score_encoded(
        self,
        encoded: Mapping[str, Sequence[int]],
        batch_tokens: int,
        batch_size: int,
        on_batch: Callable[[list[tuple[str, float]]], None] = lambda finished: None,
        prefix_cache: bool | None = None,
    ) -> dict[str, float]:
        """One reward per distinct text from its token ids: through the prefix tree's batches
        (`stream_prefix`) when `prefix_cache` (default: the score options') is on and
        `prefix_scoring.cache_path_refusal` accepts the model, else in the whole-text path's
        batches; each batch's (text, reward) pairs go to `on_batch` as the head computes them,
        and what was done is left in `scoring_stats` and `stream_stats`.

        Raises:
            InputError for a text of no tokens, or a spill file that cannot be made.
        """
        import torch

        walk, shapes, stats, run = self._pass(encoded, batch_tokens, batch_size, prefix_cache)
        rewards: dict[str, float] = {}

        def take(finished: list[tuple[str, float]]) -> None:
            rewards.update(finished)
            on_batch(finished)

        self.ledger = WeightLedger()  # this pass's peak
        stream = StreamStats()
        with (
            torch.no_grad(),
            ActivationStore(shapes, self.compute, self.max_activations, self.spill_dir) as store,
            _Prefetcher(self._load, self.groups) as weights,
        ):
            stream.resident_activation_bytes = store.resident_bytes
            stream.spilled_activation_bytes = store.spilled_bytes
            for index, (group, timing) in enumerate(zip(self.groups, weights.timings, strict=True)):
                waited = time.perf_counter()
                params = weights.take()
                timing.wait_s = time.perf_counter() - waited
                self._install(params)
                del params  # the model holds them now, and only the model
                started = time.perf_counter()
                try:
                    if self.on_layer is not None and 0 < index < len(self.groups) - 1:
                        self.on_layer(index - 1, self.model)
                    run(index, store=store, take=take)
                finally:
                    self._release(group)
                    weights.release()
                timing.compute_s = time.perf_counter() - started
        stream.timings = weights.timings
        stream.peak_weight_bytes, stream.peak_weight_groups = self.ledger.peak_bytes, self.ledger.peak_groups
        stream.peak_prefix_kv_bytes = walk.peak_held_bytes if walk is not None else 0
        self.scoring_stats, self.stream_stats = stats, stream
        return rewards

    def prefix_walk(
        self,
        encoded: Mapping[str, Sequence[int]],
        batch_tokens: int,
        batch_size: int,
        prefix_cache: bool | None = None,
    ) -> tuple[StreamedPrefixWalk | None, str | None]:
        """The prefix-tree walk of `encoded` when the prefix cache (`prefix_cache`, default: the
        score options') is on and the in-memory cache path would serve this model; else None and
        why not (`cache_path_refusal`'s reason, None when the cache was not asked for)."""
        if not (self.score_options.prefix_cache if prefix_cache is None else prefix_cache):
            return None, None
        refusal = cache_path_refusal(self.model)
        if refusal is not None:
            return None, refusal
        return StreamedPrefixWalk(self, encoded, batch_tokens, batch_size), None

    def _pass(
        self,
        encoded: Mapping[str, Sequence[int]],
        batch_tokens: int,
        batch_size: int,
        prefix_cache: bool | None,
    ) -> tuple[StreamedPrefixWalk | None, list[tuple[int, int, int]], ScoringStats, Callable[..., None]]:
        """The pass's prefix walk (None: whole texts), each batch's hidden-state shape, its
        stats, and what runs a group over every batch (`run(index, store=, take=)`)."""
        walk, fallback = self.prefix_walk(encoded, batch_tokens, batch_size, prefix_cache)
        if walk is not None:
            return walk, walk.shapes(), walk.stats, functools.partial(walk.run_group, groups=len(self.groups))
        batches, stats = self._batches(encoded, batch_tokens, batch_size)
        stats.fallback = fallback
        hidden = self.config.get_text_config().hidden_size
        shapes = [(*b.ids.shape, hidden) for b in batches]
        return None, shapes, stats, functools.partial(self._run_group, batches=batches)

    def _batches(
        self, encoded: Mapping[str, Sequence[int]], batch_tokens: int, batch_size: int
    ) -> tuple[list[_Batch], ScoringStats]:
        """The whole-text path's batches of `encoded`, and the stats it would report."""
        for text, ids in encoded.items():
            if not ids:
                raise InputError(f"a text tokenizes to no tokens, which no reward model can score: {text!r}")
        groups = whole_text_batches(encoded, self.pad_id, batch_tokens, batch_size)
        rows = batch_size if self.pad_id is not None else 1
        stats = ScoringStats("layer-streamed whole texts", batch_tokens=batch_tokens, batch_size=rows)
        stats.texts = len(encoded)
        stats.tokens_in_texts = sum(len(ids) for ids in encoded.values())
        stats.ideal_tokens = distinct_prefix_tokens(
            [ids[: reward_length(ids, self.pad_id)] for ids in encoded.values()]
        )
        batches = [_make_batch(texts, encoded, self.pad_id) for texts in groups]
        stats.batches = len(batches)
        stats.tokens_computed = stats.tokens_in_texts
        stats.padded_tokens = sum(b.ids.numel() for b in batches)
        return batches, stats

    def _run_group(
        self,
        index: int,
        batches: Sequence[_Batch],
        store: ActivationStore,
        take: Callable[[list[tuple[str, float]]], None],
    ) -> None:
        """Every batch through group `index` (embedding, a decoder layer, or the head)."""
        if index == 0:
            embed = self.base.embed_tokens
            for k, batch in enumerate(batches):
                store.put(k, embed(batch.ids.to(self.device)).to("cpu"))
        elif index == len(self.groups) - 1:
            for k, batch in enumerate(batches):
                take(self._head(batch, store.get(k)))
        else:
            for k, batch in enumerate(batches):
                out = self._layer(index - 1, batch, store.get(k))
                store.put(k, out.to("cpu"))

    def _layer(self, i: int, batch: _Batch, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer `i` over one batch, with the mask and rotary embedding the base model's
        forward gives that layer."""
        from transformers import DynamicCache

        hidden = hidden.to(self.device)
        positions = batch.positions.to(self.device)
        cache = DynamicCache(config=self.config) if self.use_cache else None
        mask = self.mask_function(i)(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=batch.mask.to(self.device),
            cache=cache,
            position_ids=positions,
        )
        embeddings = self.base.rotary_emb(hidden, position_ids=positions)
        out: torch.Tensor = self.base.layers[i](
            hidden,
            attention_mask=mask,
            position_embeddings=embeddings,
            position_ids=positions,
            cache=cache,
            use_cache=self.use_cache,
        )
        return out

    def mask_function(self, i: int) -> Callable[..., Any]:
        """The mask function the family's base model uses for layer `i`."""
        from transformers import masking_utils

        kind = STREAM_FAMILIES[self.config.model_type]
        if kind == "window":
            sliding = getattr(self.config, "sliding_window", None) is not None
        elif kind == "layer_types":
            sliding = self.config.layer_types[i] == "sliding_attention"
        else:
            sliding = False
        if sliding:
            return masking_utils.create_sliding_window_causal_mask  # type: ignore[no-any-return]
        return masking_utils.create_causal_mask  # type: ignore[no-any-return]

    def _head(self, batch: _Batch, hidden: torch.Tensor) -> list[tuple[str, float]]:
        """Final norm and reward head on every position (as transformers' forward applies
        them), read at each row's last real token."""
        import torch

        normed = self.base.norm(hidden.to(self.device))
        logits = self.model.score(normed)  # (rows, width, 1)
        last = batch.last.to(self.device) if isinstance(batch.last, torch.Tensor) else batch.last
        pooled = logits[torch.arange(len(batch.texts), device=logits.device), last]
        return list(zip(batch.texts, pooled[:, 0].float().cpu().tolist(), strict=True))


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class StreamPrediction:
    """What a layer-streamed pass will hold, from the config and the texts' lengths alone.

    Weights are counted per group in the compute dtype; `weights_peak` is the largest pair of
    consecutive groups (`WEIGHT_SLOTS`: the one computing and the one read ahead), which
    `WeightLedger` measures in the run. Activations are every batch's hidden states (the store's
    own split into memory and spill, `ActivationStore`); a batch's working memory (its layer's
    temporaries: projections, MLP, attention scores) is an estimate.
    """

    device: str
    layers: int
    layer_bytes: int
    embedding_bytes: int
    head_bytes: int
    weights_peak: int
    activation_bytes: int
    resident_activation_bytes: int
    spill_bytes: int
    batch_bytes: int
    merge_bytes: int
    #: Keys and values one layer holds through the prefix tree (`StreamedPrefixWalk.held_kv_bytes`).
    prefix_kv_bytes: int = 0

    @property
    def host_peak(self) -> int:
        """Predicted peak host RAM: the interpreter, the activations kept in memory, the merge's
        buffers, and on the CPU the weights and one batch's working memory too."""
        on_host = (
            self.weights_peak + self.batch_bytes + self.prefix_kv_bytes
            if self.device == "cpu"
            else self.layer_bytes
        )
        return STREAM_BASELINE_RSS + self.resident_activation_bytes + self.merge_bytes + on_host

    @property
    def device_peak(self) -> int | None:
        """Predicted peak device memory (None on the CPU): two groups of weights and one batch."""
        return None if self.device == "cpu" else self.weights_peak + self.batch_bytes + self.prefix_kv_bytes

    def to_dict(self) -> dict[str, Any]:
        """Every field and the two predicted peaks, as JSON values."""
        return {**dataclasses.asdict(self), "host_peak": self.host_peak, "device_peak": self.device_peak}

    def format(self) -> str:
        line = (
            f"layer-streamed: {self.layers} layers of {_fmt_bytes(self.layer_bytes)} (embedding "
            f"{_fmt_bytes(self.embedding_bytes)}, head {_fmt_bytes(self.head_bytes)}), at most "
            f"{_fmt_bytes(self.weights_peak)} of weights at once; activations {_fmt_bytes(self.activation_bytes)} "
            f"({_fmt_bytes(self.spill_bytes)} spilled to disk); predicted peak host RAM {_fmt_bytes(self.host_peak)}"
        )
        device = self.device_peak
        return line + (f", {self.device} memory {_fmt_bytes(device)}" if device is not None else "")


def predict_stream(
    model: LayerStreamedModel,
    encoded: Mapping[str, Sequence[int]],
    batch_tokens: int,
    batch_size: int,
    prefix_cache: bool | None = None,
) -> StreamPrediction:
    """What `model.score_encoded(encoded, batch_tokens, batch_size, prefix_cache=prefix_cache)`
    will hold (no weight read)."""
    config = model.config.get_text_config()
    walk, _ = model.prefix_walk(encoded, batch_tokens, batch_size, prefix_cache)
    if walk is not None:
        shapes = walk.shapes()
    else:
        batches = whole_text_batches(encoded, model.pad_id, batch_tokens, batch_size)
        shapes = [(len(b), max(len(encoded[t]) for t in b), config.hidden_size) for b in batches]
    store = ActivationStore(shapes, model.compute, model.max_activations, Path(os.devnull), plan_only=True)
    sizes = [g.nbytes for g in model.groups]
    itemsize = model.compute.itemsize
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 4 * config.hidden_size + 2 * kv * head_dim + 3 * config.intermediate_size
    batch = max((r * w * per_token * itemsize + r * heads * w * w * 4 for r, w, _ in shapes), default=0)
    merge = model.source.working_bytes() if isinstance(model.source, MergedWeights) else 0
    return StreamPrediction(
        device=model.device.split(":")[0],
        layers=len(sizes) - 2,
        layer_bytes=max(sizes[1:-1], default=0),
        embedding_bytes=sizes[0],
        head_bytes=sizes[-1],
        weights_peak=max((a + b for a, b in zip(sizes, sizes[1:], strict=False)), default=sum(sizes)),
        activation_bytes=store.resident_bytes + store.spilled_bytes,
        resident_activation_bytes=store.resident_bytes,
        spill_bytes=store.spilled_bytes,
        batch_bytes=batch,
        merge_bytes=merge,
        prefix_kv_bytes=walk.held_kv_bytes() if walk is not None else 0,
    )


def _load_config(folder: Path, label: str) -> Any:
    """The transformers config in `folder` (never running code from it), as a one-line error."""
    transformers = require("transformers")
    try:
        return transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{label}: transformers cannot load its config: {first}") from None


#: Why an OpenRLHF reward model is not layer-streamed.
STREAM_OPENRLHF = (
    "is an OpenRLHF reward model, whose head --stream-layers does not read yet; score it without "
    "--stream-layers"
)


def _check_reward_config(config: Any, label: str, names: Collection[str]) -> None:
    from lazymerge.merge.recipe import openrlhf_head

    if openrlhf_head({"architectures": getattr(config, "architectures", None)}, names) is not None:
        raise InputError(f"{label}: {STREAM_OPENRLHF}")
    if getattr(config, "num_labels", 1) != 1:
        raise InputError(
            f"{label}: not a reward model: num_labels is {config.num_labels}, not 1; give a "
            "...ForSequenceClassification reward model, or merge one in with lazymerge run"
        )


def stream_folder(
    folder: str | Path,
    score: ScoreOptions,
    max_activations: int | None = None,
    spill_dir: Path | None = None,
    quantization: Any = None,
) -> LayerStreamedModel:
    """A reward model folder scored layer by layer, its tensors read as each layer is needed.

    The caller checks the folder's configs for remote code (`rewards.refuse_remote_code`);
    transformers is asked never to run it either way.

    Raises:
        InputError for a folder that is not a reward model; HeaderError and its kin for its files.
    """
    from lazymerge.io.reader import Checkpoint

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a model folder (no config.json)")
    config = _load_config(folder, str(folder))
    checkpoint = Checkpoint.open(folder)
    source = FolderWeights(checkpoint)
    try:
        # the weights first, as `rewards.load_reward_model` checks: a causal LM is named as one
        if "score.weight" not in checkpoint and "value_head.weight" not in checkpoint:
            raise InputError(
                f"{folder}: not a reward model: its weights have no reward head (score.weight); scoring "
                "it would use a randomly initialised head. Give a ...ForSequenceClassification reward "
                "model, or merge one in with lazymerge run"
            )
        _check_reward_config(config, str(folder), checkpoint.keys())
        return LayerStreamedModel(config, source, score, max_activations, spill_dir, False, quantization)
    except BaseException:
        source.close()
        raise


def stream_plan(
    plan: MergePlan,
    checkpoints: Sequence[Checkpoint],
    score: ScoreOptions,
    max_activations: int | None = None,
    spill_dir: Path | None = None,
    quantization: Any = None,
) -> LayerStreamedModel:
    """The merged reward model of `plan`'s first output, scored layer by layer: each layer's
    tensors merged from `checkpoints` (owned from here on) when that layer is needed
    (quantized as they arrive with `score.quant` and its `quantization` config).

    Raises:
        InputError when no input is a reward model or its config cannot be read.
    """
    source = MergedWeights(plan, checkpoints)
    try:
        if "reward model" not in plan.roles or "config.json" not in plan.companion_files:
            raise InputError(
                f"{plan.inputs[0]}: no input is a reward model with a config.json; a layer-streamed merge "
                "scores a merged reward model"
            )
        with tempfile.TemporaryDirectory(prefix="lazymerge-stream-") as tmp:
            (Path(tmp) / "config.json").write_bytes(plan.companion_files["config.json"])
            config = _load_config(Path(tmp), source.label)
        _check_reward_config(config, source.label, plan.tensors.keys())
        return LayerStreamedModel(config, source, score, max_activations, spill_dir, True, quantization)
    except BaseException:
        source.close()
        raise


def stream_merge(
    inputs: Sequence[str | Path],
    options: MergeOptions,
    score: ScoreOptions,
    max_activations: int | None = None,
    spill_dir: Path | None = None,
) -> LayerStreamedModel:
    """Plan the merge of `inputs` as `lazymerge run` would (one alpha or weight vector) and
    stream its merged reward model (`stream_plan`).

    Raises:
        OptionError for several points; the merge's own errors.
    """
    from lazymerge.merge.api import open_inputs
    from lazymerge.merge.plan import plan_merge
    from lazymerge.options import read_paths

    if options.alphas is not None and len(options.alphas) != 1:
        raise OptionError("a layer-streamed merge scores one model: give one --alpha or one --weights vector")
    options.check_inputs(len(inputs))
    checkpoints = open_inputs(read_paths(inputs, options))
    try:
        plan = plan_merge(checkpoints, options, Path("in-memory"))
    except BaseException:
        for checkpoint in checkpoints:
            checkpoint.close()
        raise
    return stream_plan(plan, checkpoints, score, max_activations, spill_dir)
