"""Layer-streamed scoring through the shared-prefix cache: the prefix tree walked once per layer.

A prefix node's keys and values are per layer: the node computed at layer L serves its children
at layer L, and nothing at layer L+1 needs them. So a layer-streamed pass (`layer_stream`) can
share prefixes as the in-memory `prefix_scoring.PrefixTreeScorer` does, layer by layer:

1. the tree and its batches are those of the in-memory path (`prefix_scoring.prefix_tree`,
   `NodeBatcher.schedule`: the same nodes in the same batches, order, padding, positions and
   masks), fixed once before any weight is read;
2. the embedding runs over every batch of nodes; each batch's hidden states (rows, width,
   hidden) stay in the pass's `ActivationStore`, spilled past --max-activations as the
   whole-text pass's are;
3. for each decoder layer the schedule is replayed: each batch runs that layer with its rows'
   ancestors' keys and values of that layer as the cache (kept from when those ancestors ran this
   layer, as the in-memory cache keeps them), a node's own keys and values are kept while it has
   children to serve, and dropped at the schedule's `Release` of its wave (so a layer holds at
   most what the in-memory path holds of that layer); nothing is kept from one layer to the next
   but the hidden states;
4. the final norm and the reward head on the batches that hold texts, read as the in-memory path
   reads them (`prefix_scoring.read_rewards`).

Every layer computes what the in-memory path's forward computes for that layer: the same cache
layout (`DynamicCache` from each row's left-padded past), the same mask function and sizes, the
same rotary embedding; so the rewards are bit-identical to the in-memory prefix path in the same
dtype on the same device. `StreamedPrefixWalk.held_kv_bytes` predicts the keys and values one
layer holds (`layer_stream.predict_stream` counts them).

Nothing above `prefix_scoring` is imported here: `layer_stream` builds the walk when the prefix
cache is on and `prefix_scoring.cache_path_refusal` accepts the model, and else scores whole
texts, saying why in `ScoringStats.fallback`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from lazymerge.evaluation.prefix_scoring import (
    NodeBatcher,
    NodeInputs,
    PrefixNode,
    Release,
    ScoringStats,
    gather_past,
    node_inputs,
    node_kv,
    prefix_tree,
    read_rewards,
)

if TYPE_CHECKING:
    import torch

#: `ScoringStats.path` of a layer-streamed pass through the prefix tree.
STREAM_PREFIX_PATH = "layer-streamed prefix tree"


class StreamedLayers(Protocol):
    """What the walk needs of a layer-streamed model (`layer_stream.LayerStreamedModel`): the
    skeleton with the current group's weights in place, where it computes, and its masks."""

    model: Any
    base: Any
    config: Any
    device: str
    pad_id: int | None
    compute: torch.dtype

    def mask_function(self, i: int) -> Callable[..., Any]: ...


class ActivationSlots(Protocol):
    """Hidden states of each batch between groups (`layer_stream.ActivationStore`)."""

    def put(self, k: int, hidden: torch.Tensor) -> None: ...

    def get(self, k: int) -> torch.Tensor: ...


class StreamedPrefixWalk:
    """The prefix tree of `encoded` scored layer by layer on `streamed` (see the module's
    docstring); `stats` is what the in-memory prefix path reports, under `STREAM_PREFIX_PATH`.

    Raises:
        InputError for a text of no tokens.
    """

    def __init__(
        self,
        streamed: StreamedLayers,
        encoded: Mapping[str, Sequence[int]],
        batch_tokens: int,
        batch_size: int,
    ) -> None:
        self.streamed = streamed
        self.stats = ScoringStats(STREAM_PREFIX_PATH, batch_tokens=batch_tokens, batch_size=batch_size)
        root = prefix_tree(encoded, streamed.pad_id, self.stats)
        batcher = NodeBatcher.for_model(streamed.model, batch_tokens, batch_size)
        self.batches: list[list[PrefixNode]] = []
        #: The schedule: a batch's index in `batches`, or a wave's release.
        self.steps: list[int | Release] = []
        for step in batcher.schedule(root.children):
            if isinstance(step, Release):
                self.steps.append(step)
            else:
                self.steps.append(len(self.batches))
                self.batches.append(step)
        self.inputs = [node_inputs(batch, streamed.pad_id) for batch in self.batches]
        for inputs in self.inputs:
            inputs.count(self.stats)
        config = streamed.config.get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        #: Bytes of one token's keys and values in one layer, in the compute dtype.
        self.layer_token_bytes = 2 * kv_heads * head_dim * streamed.compute.itemsize
        #: Most bytes of nodes' keys and values held at once within a layer, as measured.
        self.peak_held_bytes = 0

    def shapes(self) -> list[tuple[int, int, int]]:
        """(rows, width, hidden) of each batch's hidden states, for the `ActivationStore`."""
        hidden = self.streamed.config.get_text_config().hidden_size
        return [(len(i.lengths), i.width, hidden) for i in self.inputs]

    def held_kv_bytes(self) -> int:
        """Most bytes of keys and values alive at once within one layer: the nodes' held for
        their children, and the running batch's cache (its gathered past, the cache's copy of
        it, and past and new together once the layer has run)."""
        held = peak = 0
        for step in self.steps:
            if isinstance(step, Release):
                held -= sum(n.end - n.start for n in step.nodes if n.children) * self.layer_token_bytes
                continue
            batch, inputs = self.batches[step], self.inputs[step]
            cache = len(batch) * (3 * inputs.past + inputs.width) * self.layer_token_bytes
            own = sum(n.end - n.start for n in batch if n.children) * self.layer_token_bytes
            peak = max(peak, held + cache + own)
            held += own
        return peak

    def run_group(
        self, index: int, groups: int, store: ActivationSlots, take: Callable[[list[tuple[str, float]]], None]
    ) -> None:
        """Every batch through group `index` of `groups` (embedding, a decoder layer, the head)."""
        streamed = self.streamed
        if index == 0:
            embed = streamed.base.embed_tokens
            for k, inputs in enumerate(self.inputs):
                store.put(k, embed(inputs.ids.to(streamed.device)).to("cpu"))
        elif index == groups - 1:
            for k, (batch, inputs) in enumerate(zip(self.batches, self.inputs, strict=True)):
                if any(node.texts for node in batch):
                    normed = streamed.base.norm(store.get(k).to(streamed.device))
                    take(read_rewards(streamed.model, batch, inputs, normed))
        else:
            self._layer(index - 1, store)

    def _layer(self, i: int, store: ActivationSlots) -> None:
        """Decoder layer `i` over every batch in the schedule's order, each node's keys and values
        of this layer held from its pass to its wave's release."""
        held: dict[PrefixNode, torch.Tensor] = {}
        size = 0
        for step in self.steps:
            if isinstance(step, Release):
                for node in step.nodes:
                    kv = held.pop(node, None)
                    size -= 0 if kv is None else kv.numel() * kv.element_size()
                continue
            batch, inputs = self.batches[step], self.inputs[step]
            out, cache = self._forward(i, batch, inputs, store.get(step), held)
            for r, node in enumerate(batch):
                if node.children:  # (2, kv heads, tokens, head dim)
                    held[node] = node_kv(cache.layers[i], r, inputs)
                    size += held[node].numel() * held[node].element_size()
            self.peak_held_bytes = max(self.peak_held_bytes, size)
            del cache
            store.put(step, out.to("cpu"))

    def _forward(
        self,
        i: int,
        batch: list[PrefixNode],
        inputs: NodeInputs,
        hidden: torch.Tensor,
        held: Mapping[PrefixNode, torch.Tensor],
    ) -> tuple[torch.Tensor, Any]:
        """Layer `i` over one batch, with the cache, mask and rotary embedding the in-memory
        forward gives that layer; the output and the cache (holding past and new keys)."""
        from transformers import DynamicCache

        streamed = self.streamed
        hidden = hidden.to(streamed.device)
        positions = inputs.positions.to(streamed.device)
        sizing: dict[str, int] = {}
        cache = DynamicCache()
        if inputs.past:
            # (2, rows, kv heads, past, head dim) in layer i only: the mask is sized against it
            kv = gather_past(batch, inputs.past, held.__getitem__)
            cache = DynamicCache([(None, None)] * i + [(kv[0], kv[1])])
            sizing["layer_idx"] = i
            del kv
        mask = streamed.mask_function(i)(
            config=streamed.config,
            inputs_embeds=hidden,
            attention_mask=inputs.mask.to(streamed.device),
            cache=cache,
            position_ids=positions,
            **sizing,
        )
        embeddings = streamed.base.rotary_emb(hidden, position_ids=positions)
        out: torch.Tensor = streamed.base.layers[i](
            hidden,
            attention_mask=mask,
            position_embeddings=embeddings,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        return out, cache
