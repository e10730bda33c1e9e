"""--tensor-weights: per-tensor weights by name (mergekit's filters) in merges and sweeps, against
an independent merge of the tensors read with safetensors' own reader; task arithmetic on
embeddings that every model holds at the same ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lazymerge import merge
from lazymerge.cli import main
from lazymerge.errors import OptionError
from lazymerge.options import MergeOptions, parse_tensor_weights
from tests.helpers.checkpoints import load_any
from tests.helpers.evaluation import SWEEP_TEMPLATE, write_jsonl
from tests.helpers.models import BASE_WORDS, make_tokenizer, save_model

EMBED = "model.embed_tokens.weight"


def _family(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A base causal LM, a reward model and an SFT model, one tokenizer for all three."""
    tok = make_tokenizer(BASE_WORDS)
    tok.chat_template = SWEEP_TEMPLATE
    base = save_model(tmp_path / "base", "llama", False, 1, tok)
    rm = save_model(tmp_path / "rm", "llama", True, 2, tok)
    sft = save_model(tmp_path / "sft", "llama", False, 3, tok)
    return rm, sft, base


def _task_arithmetic(rm: dict, sft: dict, base: dict, lam: float, kept: tuple[str, ...]) -> dict:
    """RM + lam * (SFT - base) in fp32 on every shared tensor; `kept` names the RM's own."""
    out = {}
    for name, t in rm.items():
        if name in sft and not any(k in name for k in kept):
            out[name] = base[name] + (t - base[name]) + lam * (sft[name] - base[name])
        else:
            out[name] = t
    return out


@pytest.mark.parametrize("kept", [(), ("embed_tokens",), ("embed_tokens", "layers.1.")])
def test_task_arithmetic_with_tensor_weights_equals_an_independent_merge(tmp_path: Path, kept) -> None:
    rm, sft, base = _family(tmp_path)
    rules = tuple((name, (1.0, 0.0)) for name in kept)
    out = tmp_path / "merged"
    options = MergeOptions(method="task_arithmetic", base=base, weights=(1.0, 0.4), tensor_weights=rules)
    merge([rm, sft], out, options)
    got = load_any(out)
    want = _task_arithmetic(load_any(rm), load_any(sft), load_any(base), 0.4, kept)
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    # the reward model's embeddings kept (base + 1 (RM - base), to fp32 rounding), or moved by
    # the SFT model's task vector: task arithmetic reaches an embedding every model holds alike
    moved = not torch.allclose(got[EMBED], load_any(rm)[EMBED], atol=1e-4)
    assert moved == ("embed_tokens" not in kept)


def test_first_matching_rule_wins_and_linear_rows_keep_the_reward_models(tmp_path: Path) -> None:
    rm, sft, _ = _family(tmp_path)
    rules = (("layers.0.mlp", (0.0, 1.0)), ("layers.0.", (1.0, 0.0)))
    merge([rm, sft], tmp_path / "m", MergeOptions(weights=(0.5, 0.5), tensor_weights=rules))
    got, a, b = load_any(tmp_path / "m"), load_any(rm), load_any(sft)
    up = "model.layers.0.mlp.up_proj.weight"
    q = "model.layers.0.self_attn.q_proj.weight"
    q1 = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(got[up], b[up]) and torch.equal(got[q], a[q])
    torch.testing.assert_close(got[q1], 0.5 * a[q1] + 0.5 * b[q1])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("embed_tokens", "expected FILTER=W1,W2"),
        ("=1,0", "expected FILTER=W1,W2"),
        ("embed_tokens=1,x", "weight 'x' is not a number"),
        ("embed_tokens=1,inf", "is not a finite number"),
    ],
)
def test_tensor_weights_mistakes(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_tensor_weights(text)


def test_tensor_weights_option_checks() -> None:
    rule = (("embed", (1.0, 0.0)),)
    with pytest.raises(OptionError, match="holds for one merge"):
        MergeOptions(alphas=(0.1, 0.2), tensor_weights=rule)
    with pytest.raises(OptionError, match="3 weights for 2 inputs"):
        MergeOptions(tensor_weights=(("embed", (1.0, 0.0, 0.0)),)).check_inputs(2)


@pytest.mark.slow
def test_sweep_with_tensor_weights_scores_the_written_merge(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lazymerge.evaluation.run import evaluate_pairs
    from lazymerge.evaluation.sweep import read_results

    rm, sft, base = _family(tmp_path)
    rows = [
        {"prompt": f"w{3 + i % 4}", "chosen": f"w{10 + i} w20", "rejected": f"w{30 - i}", "id": f"p{i}"}
        for i in range(6)
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "sweep"

    def sweep(*rule: str) -> object:
        args = ["sweep", str(rm), str(sft), "--method", "task_arithmetic", "--base", str(base)]
        args += ["--weights", "1,0.5", *rule, "--pairs", str(pairs), "-o", str(out), "-q"]
        return CliRunner().invoke(main, args)

    result = sweep("--tensor-weights", "embed_tokens=1,0")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "written"
    options = MergeOptions(
        method="task_arithmetic",
        base=base,
        weights=(1.0, 0.5),
        tensor_weights=(("embed_tokens", (1.0, 0.0)),),
    )
    merge([rm, sft], folder, options)
    written = evaluate_pairs(folder, pairs)
    header, records, _ = read_results(out / "results.jsonl")
    point = records["w=0.5"]["pairs"]["pairs"]
    assert point["chosen"] == pytest.approx([p["chosen_reward"] for p in written["pairs"]], rel=1e-5)
    assert point["rejected"] == pytest.approx([p["rejected_reward"] for p in written["pairs"]], rel=1e-5)
    assert header["fingerprint"]["merge"]["tensor_weights"] == [["embed_tokens", [1.0, 0.0]]]
    # the same rule is the same sweep: it resumes with nothing left to score
    same = sweep("--tensor-weights", "embed_tokens=1,0")
    assert same.exit_code == 0, same.output
    assert read_results(out / "results.jsonl")[1] == records
    # another rule is another sweep: refused on resume, not mixed in
    again = sweep("--tensor-weights", "embed=1,0")
    assert again.exit_code != 0 and "tensor_weights" in again.output
    bad = sweep("--tensor-weights", "embed_tokens")
    assert bad.exit_code == 2 and "expected FILTER=W1,W2" in bad.output
