"""`lazymerge demo`: the main job on small generated models, no downloads.

1. Streaming merge: builds two Llama-shaped bf16 checkpoints (the second sharded with an index),
   merges them with alpha 0.3 under a small memory budget so large tensors go through in chunks,
   checks every output tensor against an in-memory merge done with safetensors' own reader, and
   prints the report.
2. DogeRM lazy sweep: builds a tiny Llama reward model and a domain SFT model (random weights,
   a word-level tokenizer with a chat template; the SFT vocabulary grows a `[PAD]` token as
   MetaMath-7B's does), maths-style preference pairs and best-of-N candidates, then sweeps lambda
   over 0, 0.25, ..., 1 with every merged model built in memory, and writes the report. The
   weights are random: the curve shows the machinery, not DogeRM's effect.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lazymerge.merge.api import MergeReport

#: Small Llama-like shapes: about 21M parameters, 42 MB per bf16 checkpoint.
DEMO_SHAPES = {"hidden": 512, "intermediate": 1376, "layers": 4, "vocab": 8000}


def llama_shapes(
    hidden: int, intermediate: int, layers: int, vocab: int, kv_hidden: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama causal LM as Hugging Face stores it."""
    kv = kv_hidden or hidden
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (intermediate, hidden),
                p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def build_checkpoint(folder: Path, seed: int, shards: int = 1) -> Path:
    """Write a random bf16 Llama-shaped checkpoint with safetensors' own writer; return its path."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(**DEMO_SHAPES)
    tensors = {
        name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for name, shape in shapes.items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        path = folder / "model.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def run_demo(workdir: Path | None = None, as_json: bool = False, echo: Callable[[str], None] = print) -> None:
    """Run both parts of the demo (see the module) in `workdir`, or a temporary folder removed
    afterwards; print what happens, or (`as_json`) one JSON document at the end.

    Raises:
        LazyMergeError when the streaming merge differs from the in-memory one.
    """
    with tempfile.TemporaryDirectory(prefix="lazymerge-demo-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        report, tensors, mismatched = _streaming_merge(root, as_json, echo)
        if not as_json:
            echo(report.format())
            echo(
                f"verified: {tensors - len(mismatched)} of {tensors} tensors equal an in-memory merge "
                "read with safetensors' own loader"
            )
            echo("")
            echo(
                "DogeRM lazy sweep on a tiny reward model and domain model (RANDOM weights: the numbers show"
            )
            echo(
                "the machinery, not DogeRM's effect; see docs/mini-dogerm.md for a run on real pretrained weights)"
            )
        sweep = run_dogerm_sweep(root / "dogerm", echo=(lambda line: None) if as_json else echo)
        sweep_report = root / "dogerm" / "sweep" / "report.md"
        if as_json:
            doc = {
                **report.to_dict(),
                "verified_tensors": tensors - len(mismatched),
                "mismatched": mismatched,
                "sweep": {
                    "report": str(sweep_report),
                    "points": [p["label"] for p in sweep["points"]],
                    "chosen": sweep["chosen"],
                },
            }
            echo(json.dumps(doc, indent=2))
        else:
            _echo_sweep(sweep, sweep_report, echo)


#: The demo merge's weight of the second checkpoint.
DEMO_ALPHA = 0.3


def _streaming_merge(
    root: Path, as_json: bool, echo: Callable[[str], None]
) -> tuple[MergeReport, int, list[str]]:
    """Part 1: two generated checkpoints merged under a small memory budget, checked against an
    in-memory merge. Returns the report, the tensors compared and those that differ (none)."""
    from lazymerge.errors import LazyMergeError
    from lazymerge.merge.api import merge

    reward = build_checkpoint(root / "reward-model", seed=1)
    domain = build_checkpoint(root / "domain-sft", seed=2, shards=3)
    out = root / "merged"
    if not as_json:
        echo(f"built {reward} and {domain} (sharded); merging with alpha {DEMO_ALPHA} into {out}")
    report = merge(
        [reward, domain],
        out,
        alpha=DEMO_ALPHA,
        max_memory=4 * 2**20,
        shard_size=30 * 10**6,
        force=True,
        progress=None,
    )
    tensors, mismatched = _compare_in_memory(reward, domain, report.files, DEMO_ALPHA)
    if mismatched:
        raise LazyMergeError(f"{out}: tensor {mismatched[0]!r} differs from the in-memory merge")
    return report, tensors, mismatched


def _compare_in_memory(reward: Path, domain: Path, files: list[str], alpha: float) -> tuple[int, list[str]]:
    """The merged `files` against `(1 - alpha) * reward + alpha * domain` computed in memory
    from safetensors' own loader: (tensors compared, names of those that differ)."""
    from safetensors.torch import load_file

    from lazymerge.io.reader import Checkpoint

    a = load_file(str(reward))
    b: dict[str, torch.Tensor] = {}
    with Checkpoint.open(domain) as ckpt:
        shards = ckpt.files
    for shard in shards:
        b.update(load_file(str(shard)))
    merged: dict[str, torch.Tensor] = {}
    for name in files:
        if name.endswith(".safetensors"):
            merged.update(load_file(name))
    mismatched = [
        n
        for n in a
        if not torch.equal(merged[n], ((1 - alpha) * a[n].float() + alpha * b[n].float()).to(a[n].dtype))
    ]
    return len(a), mismatched


def _echo_sweep(sweep: dict[str, Any], report: Path, echo: Callable[[str], None]) -> None:
    """Part 2's summary: maths-pair accuracy per lambda, the lambda chosen, the report's file."""
    for point in sweep["points"]:
        o = point["pairs"]["maths"]["overall"]
        echo(
            f"  {point['label']:10s} maths pairs {100 * o['accuracy']:5.1f}% "
            f"[{100 * o['ci_low']:.1f}, {100 * o['ci_high']:.1f}]"
        )
    echo(f"chosen: {sweep['chosen']['label']} (on {sweep['chosen']['chosen_on']})")
    echo(f"report: {report} (kept only with --dir)")


#: The demo's vocabulary: numbers 0..199 and a few words, plus the tokenizer's special tokens.
DEMO_WORDS = ["<unk>", "<s>", "</s>", "What", "is", "+", "*", "?", "The", "answer", "User:", "Assistant:"] + [
    str(i) for i in range(200)
]
DEMO_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }} "
    "{% else %}Assistant: {{ m['content'] }} </s>{% endif %}{% endfor %}"
)


def _demo_tokenizer(words: list[str], added: list[str]) -> object:
    import tokenizers

    from lazymerge._optional import require

    transformers = require("transformers")
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if added:
        fast.add_special_tokens({"additional_special_tokens": added})
    fast.chat_template = DEMO_TEMPLATE
    return fast


def build_dogerm_models(root: Path) -> tuple[Path, Path]:
    """A tiny Llama reward model and a domain SFT model with one more token, random weights."""
    from lazymerge._optional import require
    from lazymerge.evaluation.rewards import quiet_transformers

    transformers = require("transformers")
    quiet_transformers()
    folders = []
    for name, reward, seed, added in (("reward-model", True, 11, []), ("maths-sft", False, 12, ["[PAD]"])):
        tok = _demo_tokenizer(DEMO_WORDS, added)
        config = transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),  # type: ignore[arg-type]
            max_position_embeddings=128,
            pad_token_id=2,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        if reward:
            config.num_labels = 1
            model = transformers.LlamaForSequenceClassification(config)
        else:
            model = transformers.LlamaForCausalLM(config)
        folder = root / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)  # type: ignore[attr-defined]
        folders.append(folder)
    return folders[0], folders[1]


def write_demo_data(root: Path) -> tuple[Path, Path]:
    """Maths-style preference pairs (correct vs off-by-some answer) and best-of-4 candidates."""
    import random

    rng = random.Random(0)
    pairs, candidates = [], []
    for i in range(48):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        right = a + b
        wrong = right + rng.choice([-10, -2, -1, 1, 2, 10])
        subset = "math-prm" if i % 2 == 0 else "hep-python"
        pairs.append(
            {
                "prompt": f"What is {a} + {b} ?",
                "chosen": f"The answer is {right}",
                "rejected": f"The answer is {wrong}",
                "subset": subset,
                "id": f"p{i}",
            }
        )
    for i in range(12):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        answers = [a + b + d for d in rng.sample([0, 1, -1, 2, 10], 4)]
        candidates.append(
            {
                "prompt": f"What is {a} + {b} ?",
                "candidates": [f"The answer is {x}" for x in answers],
                "answer": a + b,
                "id": f"q{i}",
            }
        )
    pair_file, cand_file = root / "maths.jsonl", root / "candidates.jsonl"
    pair_file.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    cand_file.write_text("".join(json.dumps(r) + "\n" for r in candidates))
    return pair_file, cand_file


def run_dogerm_sweep(root: Path, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the tiny DogeRM pair and its data under `root`, sweep lambda in memory, report."""
    from lazymerge.evaluation.sweep import build_spec, run_sweep

    root.mkdir(parents=True, exist_ok=True)
    rm, sft = build_dogerm_models(root)
    pairs, candidates = write_demo_data(root)
    spec = build_spec(
        [rm, sft],
        root / "sweep",
        alpha="0:1:0.25",
        pair_files=[pairs],
        candidate_files=[candidates],
        ns=[2, 4],
        load={"dtype": "float32", "batch_size": 16},
        restart=True,
        max_memory=4 * 2**20,
    )
    return run_sweep(spec, echo=echo).report
