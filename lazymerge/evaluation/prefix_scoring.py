"""Score texts that share token prefixes, computing each shared prefix once.

The texts of a DogeRM evaluation share long prefixes: one system prompt inside the chat template
for every text, one prompt for a pair's two responses or for N candidates. `PrefixTreeScorer`
puts the texts' token ids in a prefix tree (over ids, never over strings, so a tokenizer merge at
a boundary can never differ from tokenizing the whole text), computes each node of the tree once
with the model's KV cache, and reads each text's reward from the hidden state of its last token:

- a node's tokens run with the keys and values of its ancestors as the cache: position ids
  continue from the prefix, attention covers prefix + node; nodes with different ancestors share a
  batch, each row's past left-padded to the longest past (so cache distances equal real distances
  and a sliding window masks what it masks for the whole text), its own tokens right-padded;
- the tree is walked level by level in waves: the children of as many batches as hold
  `HELD_BYTES` of keys and values are batched together (texts of different prompts share a
  batch, sorted by length, so little of it is padding), and a node's keys and values are freed
  once its children are scored, so memory holds about `HELD_BYTES` per level, never the whole
  tree's cache;
- the reward is the model's own head (`score`) on the final hidden state of the token transformers
  reads for the whole text: the rightmost token that is not the pad token (the first token when
  every token is one; the last token when the model has no pad id). Tokens after it cannot change
  it (causal attention) and are not computed.

`cache_path_refusal` names what the cache path cannot serve exactly (an architecture not checked
against transformers' own forward, an attention implementation other than sdpa or eager); such a
model is scored whole text by whole text (`rewards.RewardModel`), said once in the run's
`ScoringStats.fallback`.

Batches are sized in tokens (`token_batches`): sorted by length, a batch holds at most
`batch_tokens` new tokens (rows x longest new), at most `CONTEXT_PER_TOKEN` times that of
attention context (rows x (longest past + longest new)) and at most `batch_size` rows.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lazymerge.errors import InputError

#: Families whose sequence-classification forward the cache path reproduces (tests compare each
#: with transformers' forward of the whole text).
CACHE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
#: Attention implementations whose masks transformers builds from a 2D padding mask with a cache.
CACHE_ATTENTION = ("sdpa", "eager")
#: A shared node saving fewer tokens than this is recomputed in each child instead (a 1-token
#: node such as a shared first word would cost a batch step for almost nothing).
MIN_SAVED_TOKENS = 16
#: Attention context a batch may hold per token of its budget (`token_batches`): past keys are
#: cheap to attend to, but they take memory (the cache copies, the attention scores).
CONTEXT_PER_TOKEN = 4
#: Keys and values one batch may attend to, in bytes (the batch's cache holds every layer's):
#: caps the attention context below `CONTEXT_PER_TOKEN` x the budget for large models (at a 7B
#: shape in bf16 a token's keys and values take 0.5 MiB), never below the budget itself.
CONTEXT_BYTES = 2 * 2**30
#: Keys and values of computed nodes kept for their children, in bytes: the children of as many
#: batches as fit are scored together, so texts of different prompts share batches (and less of
#: a batch is padding) while memory stays bounded.
HELD_BYTES = 2**30
#: Tokens per batch when none is given, by device type: enough to keep the device's matmuls busy.
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}


def default_batch_tokens(device: str) -> int:
    return DEFAULT_BATCH_TOKENS.get(device.split(":")[0], DEFAULT_BATCH_TOKENS["cuda"])


@dataclass
class ScoringStats:
    """What one `score_encoded` call computed, for reports.

    `tokens_in_texts` counts every token of every distinct text; `ideal_tokens` the distinct
    tokens of their prefix tree up to each text's reward position (the least any scorer must
    compute); `tokens_computed` the real tokens run through the model; `padded_tokens` the
    positions run including padding (so `padded_tokens - tokens_computed` is padding waste).
    """

    path: str
    texts: int = 0
    tokens_in_texts: int = 0
    ideal_tokens: int = 0
    tokens_computed: int = 0
    padded_tokens: int = 0
    batches: int = 0
    batch_tokens: int = 0
    batch_size: int = 0
    #: Why the prefix cache was not used (None when it was, or was not asked for).
    fallback: str | None = None

    @property
    def padding_waste(self) -> float:
        """Share of the positions run that were padding."""
        return 1 - self.tokens_computed / self.padded_tokens if self.padded_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "padding_waste": round(self.padding_waste, 4)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ScoringStats:
        """The stats `to_dict` wrote (its derived `padding_waste` left out)."""
        return cls(**{k: v for k, v in doc.items() if k != "padding_waste"})

    def format(self) -> str:
        line = (
            f"scored {self.texts:,} texts by {self.path}: {self.tokens_computed:,} tokens computed of "
            f"{self.tokens_in_texts:,} in the texts (prefix tree: {self.ideal_tokens:,}), "
            f"{100 * self.padding_waste:.1f}% padding in {self.batches:,} batches"
        )
        return line + (f"; whole texts because {self.fallback}" if self.fallback else "")


def reward_length(ids: Sequence[int], pad_id: int | None) -> int:
    """How many leading tokens decide the reward: up to the token a sequence-classification model
    reads (transformers' `GenericForSequenceClassification`: the rightmost non-pad token, the
    first when all are pad, the last without a pad id)."""
    if pad_id is None:
        return len(ids)
    for k in range(len(ids) - 1, -1, -1):
        if ids[k] != pad_id:
            return k + 1
    return min(1, len(ids))


def distinct_prefix_tokens(sequences: Sequence[Sequence[int]]) -> int:
    """Nodes' tokens in the prefix tree of `sequences`: in sorted order each sequence adds what
    it does not share with the one before."""
    total = 0
    previous: tuple[int, ...] = ()
    for seq in sorted(tuple(s) for s in sequences):
        total += len(seq) - _common(previous, seq)
        previous = seq
    return total


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def token_batches(
    items: Sequence[tuple[int, int]], batch_tokens: int, batch_size: int, context_tokens: int | None = None
) -> list[list[int]]:
    """Indices of `items` ((new tokens, past tokens) each, in the order to batch them) in
    consecutive batches of at most `batch_size` rows, `batch_tokens` new tokens (rows x longest
    new) and `context_tokens` (default `CONTEXT_PER_TOKEN` x `batch_tokens`) tokens of attention
    context (rows x (longest past + longest new)); a row larger than the budget is a batch of
    its own.

    New tokens are what costs: every weight matrix multiplies them. A cached past only adds keys
    to attend to (at a 1.1B shape about 5% of a token's arithmetic for a past of 500), so it is
    bounded for memory, not counted as work."""
    context = context_tokens if context_tokens is not None else CONTEXT_PER_TOKEN * batch_tokens
    batches: list[list[int]] = []
    current: list[int] = []
    longest = past = 0
    for i, (new, old) in enumerate(items):
        grown_new, grown_past = max(longest, new), max(past, old)
        rows = len(current) + 1
        if current and (
            len(current) >= batch_size
            or rows * grown_new > batch_tokens
            or rows * (grown_new + grown_past) > context
        ):
            batches.append(current)
            current, grown_new, grown_past = [], new, old
        current.append(i)
        longest, past = grown_new, grown_past
    if current:
        batches.append(current)
    return batches


@dataclass(eq=False)
class PrefixNode:
    """Tokens `ids[start:end]` of the tree (`ids` is any sequence through this node), computed
    after its parent; `texts` end here (their reward is read at its last token)."""

    start: int
    end: int
    ids: Sequence[int]
    parent: PrefixNode | None = None
    children: list[PrefixNode] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    #: (layers, 2, kv heads, end - start, head dim): kept while its children are scored
    kv: Any = None

    def ancestors(self) -> list[PrefixNode]:
        """Computed nodes above this one, the root's child first."""
        out = []
        node = self.parent
        while node is not None and node.end > 0:
            out.append(node)
            node = node.parent
        return out[::-1]


def build_prefix_tree(
    sequences: Mapping[str, Sequence[int]], min_saved: int = MIN_SAVED_TOKENS
) -> PrefixNode:
    """The compressed prefix tree of `sequences` (text -> ids), nodes saving fewer than
    `min_saved` tokens folded into their children. Returns the root (no tokens)."""
    root = PrefixNode(0, 0, ())
    stack = [root]
    previous: Sequence[int] = ()
    for text, seq in sorted(sequences.items(), key=lambda item: (tuple(item[1]), item[0])):
        shared = _common(previous, seq)
        while stack[-1].end > shared:
            popped = stack.pop()
            if stack[-1].end < shared:  # the shared part ends inside `popped`: split it there
                middle = PrefixNode(stack[-1].end, shared, popped.ids, stack[-1], [popped])
                stack[-1].children[stack[-1].children.index(popped)] = middle
                popped.parent, popped.start = middle, shared
                stack.append(middle)
        if len(seq) == shared:  # the same ids as the text before
            stack[-1].texts.append(text)
        else:
            leaf = PrefixNode(shared, len(seq), seq, stack[-1], texts=[text])
            stack[-1].children.append(leaf)
            stack.append(leaf)
        previous = seq
    _fold_small(root, min_saved)
    return root


def _fold_small(root: PrefixNode, min_saved: int) -> None:
    """Give the children of each node that saves fewer than `min_saved` tokens to its parent
    (they compute its tokens themselves); the node stays only for the texts ending in it."""
    todo = list(root.children)
    while todo:
        node = todo.pop()
        uses = len(node.children) + (1 if node.texts else 0)
        if node.children and (node.end - node.start) * (uses - 1) < min_saved:
            parent = node.parent
            assert parent is not None
            for child in node.children:
                child.parent, child.start = parent, node.start
            siblings = parent.children
            place = siblings.index(node)
            siblings[place : place + 1] = ([node] if node.texts else []) + node.children
            todo.extend(node.children)
            node.children = []
        else:
            todo.extend(node.children)


def tree_tokens(root: PrefixNode) -> int:
    """Tokens the tree's nodes hold (what the scorer computes)."""
    total, todo = 0, list(root.children)
    while todo:
        node = todo.pop()
        total += node.end - node.start
        todo.extend(node.children)
    return total


def cache_path_refusal(model: Any) -> str | None:
    """Why `model` cannot be scored through the prefix cache exactly, or None when it can."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return f"the prefix cache needs transformers 5 (found {transformers.__version__})"
    from transformers.modeling_layers import GenericForSequenceClassification

    name = type(model).__name__
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if not isinstance(model, GenericForSequenceClassification) or family not in CACHE_FAMILIES:
        checked = ", ".join(CACHE_FAMILIES)
        return f"{name} is not an architecture the prefix cache is checked against ({checked})"
    if not getattr(config, "is_causal", True):
        return f"{name} is configured for bidirectional attention"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in CACHE_ATTENTION:
        return f"{name} uses {attention} attention (the prefix cache builds masks for {', '.join(CACHE_ATTENTION)})"
    return None


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values one token takes in the cache over all layers of `model`."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    import torch

    dtype = getattr(model, "dtype", None)  # transformers: the first floating parameter's dtype
    itemsize = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4
    return max(1, int(2 * config.num_hidden_layers * kv_heads * head_dim * itemsize))


@dataclass(frozen=True)
class Release:
    """A step of `NodeBatcher.schedule`: the children of `nodes` are all scored, so their keys
    and values may go."""

    nodes: list[PrefixNode]


class NodeBatcher:
    """Which nodes of a prefix tree run together, in which order, and when their keys and values
    may go: the one decision both the in-memory `PrefixTreeScorer` and the layer-streamed walk
    (`stream_prefix`) follow, so the two run the same batches and give the same rewards.

    Args:
        batch_tokens, batch_size: the batch budget (`token_batches`).
        kv_token_bytes: keys and values of one token over all layers (`kv_bytes_per_token`).
    """

    def __init__(self, batch_tokens: int, batch_size: int, kv_token_bytes: int) -> None:
        self.batch_tokens = batch_tokens
        self.batch_size = batch_size
        self.kv_token_bytes = kv_token_bytes
        self.context_tokens = max(
            batch_tokens, min(CONTEXT_PER_TOKEN * batch_tokens, CONTEXT_BYTES // kv_token_bytes)
        )

    @classmethod
    def for_model(cls, model: Any, batch_tokens: int, batch_size: int) -> NodeBatcher:
        return cls(batch_tokens, batch_size, kv_bytes_per_token(model))

    def batches(self, nodes: list[PrefixNode]) -> list[list[PrefixNode]]:
        """`nodes` in batches: longest first (ties: the longest past first), `token_batches`."""
        nodes = sorted(nodes, key=lambda n: (-(n.end - n.start), -n.start))
        items = [(n.end - n.start, n.start) for n in nodes]
        batches = token_batches(items, self.batch_tokens, self.batch_size, self.context_tokens)
        return [[nodes[i] for i in indices] for indices in batches]

    def schedule(self, nodes: list[PrefixNode]) -> Iterator[list[PrefixNode] | Release]:
        """Batches of `nodes` (their ancestors computed before), then their children: the
        children of as many batches as hold `HELD_BYTES` of keys and values together, so siblings
        of different parents share batches; a `Release` of each wave once its children are
        scored. Structural only (no result is needed), so a layer-streamed pass can replay it
        per layer."""
        batches = self.batches(nodes)
        i = 0
        while i < len(batches):
            wave: list[PrefixNode] = []
            held = 0
            while i < len(batches) and (not wave or held < HELD_BYTES):
                yield batches[i]
                wave += batches[i]
                held += sum(n.end - n.start for n in batches[i] if n.children) * self.kv_token_bytes
                i += 1
            children = [child for node in wave for child in node.children]
            if children:
                yield from self.schedule(children)
            yield Release(wave)


def prefix_tree(encoded: Mapping[str, Sequence[int]], pad_id: int | None, stats: ScoringStats) -> PrefixNode:
    """The prefix tree of `encoded` up to each text's reward position (`reward_length`), with
    `stats`' text and token counts filled in.

    Raises:
        InputError for a text of no tokens.
    """
    needed = {}
    for text, ids in encoded.items():
        if not ids:
            raise InputError(f"a text tokenizes to no tokens, which no reward model can score: {text!r}")
        needed[text] = ids[: reward_length(ids, pad_id)]
    stats.texts = len(encoded)
    stats.tokens_in_texts = sum(len(ids) for ids in encoded.values())
    stats.ideal_tokens = distinct_prefix_tokens(list(needed.values()))
    return build_prefix_tree(needed)


@dataclass
class NodeInputs:
    """One batch of nodes as a forward pass takes it: each row's tokens right-padded to `width`,
    its past left-padded to `past` (so cache distances equal real distances and a sliding window
    masks what it masks for the whole text), positions continuing from each row's prefix."""

    past: int
    lengths: list[int]
    ids: Any  # (rows, width) int64
    mask: Any  # (rows, past + width) int64
    positions: Any  # (rows, width) int64

    @property
    def width(self) -> int:
        return max(self.lengths)

    def count(self, stats: ScoringStats) -> None:
        """Add this batch to `stats`."""
        stats.batches += 1
        stats.tokens_computed += sum(self.lengths)
        stats.padded_tokens += len(self.lengths) * self.width


def node_inputs(batch: list[PrefixNode], pad_id: int | None) -> NodeInputs:
    import torch

    rows = len(batch)
    past = max(n.start for n in batch)
    lengths = [n.end - n.start for n in batch]
    width = max(lengths)
    ids = torch.full((rows, width), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((rows, past + width), dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.long)
    for r, node in enumerate(batch):
        ids[r, : lengths[r]] = torch.tensor(list(node.ids[node.start : node.end]), dtype=torch.long)
        mask[r, past - node.start : past + lengths[r]] = 1
        positions[r] = torch.arange(node.start, node.start + width)
    return NodeInputs(past, lengths, ids, mask, positions)


def gather_past(batch: list[PrefixNode], past: int, kv_of: Callable[[PrefixNode], Any]) -> Any:
    """Each row's ancestors' keys and values (`kv_of(node)`: (..., kv heads, tokens, head dim))
    in one tensor (..., rows, kv heads, past, head dim), left-padded with zeros (masked)."""
    import torch

    sample = next(kv_of(a) for n in batch for a in n.ancestors())
    *lead, heads, _, dim = sample.shape
    kv = torch.zeros((*lead, len(batch), heads, past, dim), dtype=sample.dtype, device=sample.device)
    for r, node in enumerate(batch):
        offset = past - node.start
        for ancestor in node.ancestors():
            size = ancestor.end - ancestor.start
            kv[..., r, :, offset : offset + size, :] = kv_of(ancestor)
            offset += size
    return kv


def node_kv(layer: Any, row: int, inputs: NodeInputs) -> Any:
    """A row's own keys and values in one cache layer after its pass: (2, kv heads, tokens, head dim)."""
    import torch

    span = slice(inputs.past, inputs.past + inputs.lengths[row])
    return torch.stack((layer.keys[row, :, span], layer.values[row, :, span]))


def read_rewards(
    model: Any, batch: list[PrefixNode], inputs: NodeInputs, hidden: Any
) -> list[tuple[str, float]]:
    """(text, reward) for the texts ending in `batch`'s nodes: the reward head on the final
    hidden state (normed: (rows, width, hidden)) of each such node's last token."""
    read = [(r, node) for r, node in enumerate(batch) if node.texts]
    if not read:
        return []
    last = hidden[[r for r, _ in read], [inputs.lengths[r] - 1 for r, _ in read]]
    rewards = model.score(last)[:, 0].float().cpu().tolist()
    return [(text, value) for (_, node), value in zip(read, rewards, strict=True) for text in node.texts]


class PrefixTreeScorer:
    """Rewards of encoded texts through the prefix tree (see the module's docstring).

    Args:
        model: a transformers `*ForSequenceClassification` model that `cache_path_refusal` accepts.
        device: where the model is; inputs go there.
        batch_tokens, batch_size: the batch budget (`token_batches`).
    """

    def __init__(self, model: Any, device: str, batch_tokens: int, batch_size: int) -> None:
        self.model = model
        self.device = device
        self.base = getattr(model, model.base_model_prefix)
        self.pad_id = model.config.get_text_config().pad_token_id
        params = inspect.signature(self.base.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.stats = ScoringStats("prefix tree", batch_tokens=batch_tokens, batch_size=batch_size)
        self.batcher = NodeBatcher.for_model(model, batch_tokens, batch_size)

    def score(self, encoded: dict[str, list[int]]) -> Iterator[list[tuple[str, float]]]:
        """Each batch's finished (text, reward) pairs, as they come; `stats` is filled in as it goes."""
        root = prefix_tree(encoded, self.pad_id, self.stats)
        for step in self.batcher.schedule(root.children):
            if isinstance(step, Release):
                for node in step.nodes:
                    node.kv = None
            else:
                yield self._run(step)

    def _run(self, batch: list[PrefixNode]) -> list[tuple[str, float]]:
        """One forward pass over `batch`'s nodes, each after its ancestors' cached keys and values."""
        import torch
        from transformers import DynamicCache

        inputs = node_inputs(batch, self.pad_id)
        cache = DynamicCache()
        if inputs.past:
            # (layers, 2, rows, kv heads, past, head dim)
            kv = gather_past(batch, inputs.past, lambda node: node.kv)
            cache = DynamicCache([(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])])
            del kv
        with torch.no_grad():
            out = self.base(
                input_ids=inputs.ids.to(self.device),
                attention_mask=inputs.mask.to(self.device),
                position_ids=inputs.positions.to(self.device),
                use_cache=True,
                **{self.cache_kwarg: cache},
            )
            layers: list[Any] = list(cache.layers)
            for r, node in enumerate(batch):
                if node.children:  # (layers, 2, kv heads, tokens, head dim)
                    node.kv = torch.stack([node_kv(layer, r, inputs) for layer in layers])
            finished = read_rewards(self.model, batch, inputs, out.last_hidden_state)
        del out, cache
        inputs.count(self.stats)
        return finished


def score_with_prefix_tree(
    model: Any,
    device: str,
    encoded: dict[str, list[int]],
    batch_tokens: int,
    batch_size: int,
    on_batch: Callable[[list[tuple[str, float]]], None],
) -> ScoringStats:
    """Score `encoded` through `PrefixTreeScorer`, handing each batch's rewards to `on_batch`."""
    scorer = PrefixTreeScorer(model, device, batch_tokens, batch_size)
    for finished in scorer.score(encoded):
        on_batch(finished)
    return scorer.stats
