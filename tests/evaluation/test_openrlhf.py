"""OpenRLHF reward models (`openrlhf/models/model.py`): a transformers backbone saved under
OpenRLHF's class name `RewardModel`, with a bias-free one-output head `value_head`, the reward
read at each text's last token (the last position of the attention mask, whatever its id).

A tiny one is built in tmp_path; lazymerge's rewards are held against an independent
computation written here from OpenRLHF's forward: transformers' backbone (`LlamaModel`) on a
right-padded batch with OpenRLHF's position ids, then the head at the last real token. Its pad
id is its EOS (OpenRLHF pads with the EOS) and every text ends with the EOS, so transformers'
own last-non-pad rule would read another token: the test checks that it would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lazymerge.cli import main
from lazymerge.errors import InputError
from lazymerge.evaluation.rewards import load_reward_model
from lazymerge.score_options import ScoreOptions
from tests.helpers.evaluation import models, reward_model, words

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAIRS = [(words(3, 4 + i % 3), words(10 + i, 20, 5 + i % 4)) for i in range(6)] + [(words(9), words(11))]


def openrlhf_folder(folder: Path, critic: bool = False) -> Path:
    """`folder` (a transformers reward model) as OpenRLHF saves one: `value_head.weight` beside
    the backbone, config.json naming OpenRLHF's class and no labels."""
    tensors = load_file(folder / "model.safetensors")
    tensors["value_head.weight"] = tensors.pop("score.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    for key in ("id2label", "label2id", "num_labels"):
        config.pop(key, None)
    config.update(architectures=["CriticModel" if critic else "RewardModel"], normalize_reward=False)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def openrlhf_rewards(folder: Path, batch: list[list[int]]) -> tuple[list[float], list[float]]:
    """OpenRLHF's rewards for token id lists, computed apart from lazymerge: the backbone's
    forward on a right-padded batch with position ids `cumsum(mask) - 1` (1 on padding), the
    head on every position, the value at the last position of each mask. Also what the head
    gives at the last token that is not the pad id (transformers' rule), to show it differs."""
    config = transformers.LlamaConfig.from_pretrained(folder)
    backbone = transformers.LlamaModel(config).eval()
    state = load_file(folder / "model.safetensors")
    backbone.load_state_dict(
        {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    )
    head = state["value_head.weight"]  # (1, hidden) fp32
    width = max(len(ids) for ids in batch)
    pad = config.pad_token_id
    ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq in batch])
    mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in batch])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        values = (hidden @ head.T).squeeze(-1)  # (rows, width)
    last = width - 1 - mask.fliplr().argmax(dim=1)
    rewards = values.gather(1, last[:, None]).squeeze(1).tolist()
    not_pad = [max(i for i, t in enumerate(seq) if t != pad) for seq in batch]
    before = [float(values[r, i]) for r, i in enumerate(not_pad)]
    return rewards, before


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["prefix-cache", "whole-texts"])
def test_scores_equal_openrlhf_at_the_last_token(tmp_path: Path, prefix_cache: bool) -> None:
    folder = openrlhf_folder(reward_model(tmp_path))
    rm = load_reward_model(folder, ScoreOptions(prefix_cache=prefix_cache, batch_size=4))
    texts = [rm.format_text(p, r) for p, r in PAIRS]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    batch = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        for p, r in PAIRS
    ]
    assert all(seq[-1] == tok.eos_token_id == rm.tokenizer.eos_token_id for seq in batch)
    assert [rm.encode(t) for t in texts] == batch
    expected, before_eos = openrlhf_rewards(folder, batch)
    got = rm.score_texts(texts)
    assert got == pytest.approx(expected, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(expected, before_eos, strict=True)) > 1e-3  # the rule matters
    assert len({round(v, 4) for v in got}) > 3  # texts carry signal
    assert "OpenRLHF's rule" in rm.conventions()["pad"]


def test_eval_cli_scores_an_openrlhf_model(tmp_path: Path) -> None:
    folder = openrlhf_folder(reward_model(tmp_path))
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": p, "chosen": r, "rejected": words(7)} for p, r in PAIRS]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", str(folder), "--pairs", str(pairs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    batch = [
        tok.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[side]}],
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        for row in rows
        for side in ("chosen", "rejected")
    ]
    expected, _ = openrlhf_rewards(folder, batch)
    scored = [entry[f"{side}_reward"] for entry in report["pairs"] for side in ("chosen", "rejected")]
    assert scored == pytest.approx(expected, abs=1e-5)


def test_a_critic_and_stream_layers_are_refused_in_one_line(tmp_path: Path) -> None:
    critic = openrlhf_folder(reward_model(tmp_path, "critic"), critic=True)
    with pytest.raises(InputError, match="OpenRLHF critic") as info:
        load_reward_model(critic)
    assert "\n" not in str(info.value)
    folder = openrlhf_folder(reward_model(tmp_path))
    with pytest.raises(InputError, match="--stream-layers does not read yet|without --stream-layers"):
        load_reward_model(folder, ScoreOptions(stream_layers=True))


def test_merged_with_rm_keeps_the_head_and_scores_as_in_memory(tmp_path: Path) -> None:
    from lazymerge.evaluation.in_memory import load_merged_reward_model
    from lazymerge.options import MergeOptions

    rm, sft = models(tmp_path)
    openrlhf_folder(rm)
    out = tmp_path / "merged"
    refused = CliRunner().invoke(main, ["run", str(rm), str(sft), "--alpha", "0.3", "-o", str(out)])
    assert refused.exit_code == 1 and not out.exists()
    assert "value_head.weight" in refused.output and "--rm 0" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    done = CliRunner().invoke(
        main, ["run", str(rm), str(sft), "--alpha", "0.3", "--rm", "0", "-o", str(out), "-q"]
    )
    assert done.exit_code == 0, done.output
    merged = load_file(out / "model.safetensors")
    assert torch.equal(merged["value_head.weight"], load_file(rm / "model.safetensors")["value_head.weight"])
    assert "score.weight" not in merged and not any(k.startswith("lm_head") for k in merged)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["RewardModel"]
    written = load_reward_model(out)
    in_memory = load_merged_reward_model([rm, sft], MergeOptions.build(alpha=0.3, rm=0))
    texts = [written.format_text(p, r) for p, r in PAIRS]
    scores = written.score_texts(texts)
    assert in_memory.score_texts(texts) == pytest.approx(scores, abs=1e-6)
    assert scores != pytest.approx(load_reward_model(rm).score_texts(texts), abs=1e-4)  # the merge moved them
