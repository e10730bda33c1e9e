"""`lazymerge demo`: the whole streaming merge on small generated checkpoints, no downloads.

Builds two Llama-shaped bf16 checkpoints (the second sharded with an index), merges them with
alpha 0.3 under a small memory budget so large tensors go through in chunks, checks every output
tensor against an in-memory merge done with safetensors' own reader, and prints the report.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

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
    from safetensors.torch import load_file

    from lazymerge.api import merge
    from lazymerge.io.reader import Checkpoint

    with tempfile.TemporaryDirectory(prefix="lazymerge-demo-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        reward = build_checkpoint(root / "reward-model", seed=1)
        domain = build_checkpoint(root / "domain-sft", seed=2, shards=3)
        out = root / "merged"
        alpha = 0.3
        if not as_json:
            echo(f"built {reward} and {domain} (sharded); merging with alpha {alpha} into {out}")
        report = merge(
            [reward, domain],
            out,
            alpha=alpha,
            max_memory=4 * 2**20,
            shard_size=30 * 10**6,
            force=True,
            progress=None,
        )

        a = load_file(str(reward))
        b: dict[str, torch.Tensor] = {}
        for shard in Checkpoint.open(domain).files:
            b.update(load_file(str(shard)))
        merged: dict[str, torch.Tensor] = {}
        for name in report.files:
            if name.endswith(".safetensors"):
                merged.update(load_file(name))
        mismatched = [
            n
            for n in a
            if not torch.equal(merged[n], ((1 - alpha) * a[n].float() + alpha * b[n].float()).to(a[n].dtype))
        ]
        if as_json:
            echo(
                json.dumps(
                    {
                        **report.to_dict(),
                        "verified_tensors": len(a) - len(mismatched),
                        "mismatched": mismatched,
                    },
                    indent=2,
                )
            )
        else:
            echo(report.format())
            echo(
                f"verified: {len(a) - len(mismatched)} of {len(a)} tensors equal an in-memory merge "
                "read with safetensors' own loader"
            )
        if mismatched:
            from lazymerge.errors import LazyMergeError

            raise LazyMergeError(f"{out}: tensor {mismatched[0]!r} differs from the in-memory merge")
