"""A tiny Llama built with transformers, merged by lazymerge, loads and runs like an in-memory merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lazymerge import merge
from tests.helpers.checkpoints import reference_merge

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_llama_loads_and_matches_in_memory_merge(tmp_path: Path, dtype: torch.dtype) -> None:
    a, b = tiny_llama(1).to(dtype), tiny_llama(2).to(dtype)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    out = tmp_path / "merged"
    merge([tmp_path / "a", tmp_path / "b"], out, alpha=0.3, shard_size=20_000, max_memory=4096)
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()

    loaded, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True, dtype=dtype)
    assert not any(info.values()), info

    expected = tiny_llama(3).to(dtype)
    sd = reference_merge([a.state_dict(), b.state_dict()], [0.7, 0.3])
    expected.load_state_dict(sd)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, sd[name]), name
    ids = torch.tensor([[1, 5, 9, 33, 64, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
