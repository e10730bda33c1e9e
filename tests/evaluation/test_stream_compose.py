"""Layer-streamed scoring where it meets the rest: chosen by --device-memory when the model does
not fit (said in one line), spilling beside the results, and in sweeps (one pass per point, the
prediction before the first point and the measured pass in each point's record), with the
in-memory model's rewards to the bit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lazymerge.cli import main
from lazymerge.errors import OptionError
from lazymerge.evaluation import layer_stream
from lazymerge.evaluation.in_memory import load_merged_reward_model
from lazymerge.evaluation.layer_stream import LayerStreamedModel
from lazymerge.evaluation.rewards import load_reward_model
from lazymerge.evaluation.sweep import build_spec, read_results, run_sweep
from lazymerge.options import MergeOptions
from lazymerge.score_options import ScoreOptions
from tests.helpers.evaluation import data, models
from tests.helpers.models import assert_carries_signal

MERGE = MergeOptions(alphas=(0.4,))


def parameters_of(folder: Path) -> int:
    """The folder's weight count as safetensors' own reader gives it."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += f.get_tensor(name).numel()
    return total


@pytest.fixture
def spills(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders the layer-streamed passes made their spill files in."""
    made: list[Path] = []
    original = layer_stream.ActivationStore._open_file

    def record(self: layer_stream.ActivationStore, spill_dir: Path, nbytes: int) -> None:
        made.append(Path(spill_dir))
        original(self, spill_dir, nbytes)

    monkeypatch.setattr(layer_stream.ActivationStore, "_open_file", record)
    return made


def test_device_memory_streams_a_folder_that_does_not_fit(tmp_path: Path) -> None:
    rm, _ = models(tmp_path)
    fp32 = parameters_of(rm) * 4
    texts = [f"w1 w{i} w2 w{i + 3} w{i % 4 + 5} </s>" for i in range(3, 15)]
    want = load_reward_model(rm, prefix_cache=False).score_texts(texts)
    assert_carries_signal(rm, texts, want)

    fits = load_reward_model(rm, prefix_cache=False, device_memory=fp32)
    assert not isinstance(fits.model, LayerStreamedModel) and fits.stream_note is None
    over = load_reward_model(rm, prefix_cache=False, device_memory=fp32 - 1)
    assert isinstance(over.model, LayerStreamedModel)
    assert over.stream_note is not None and "\n" not in over.stream_note
    assert f"{parameters_of(rm):,} weights" in over.stream_note and "--device-memory" in over.stream_note
    assert over.score_texts(texts) == want  # bit-identical


def test_device_memory_streams_a_merge_that_does_not_fit(tmp_path: Path) -> None:
    rm, sft = models(tmp_path)
    score = ScoreOptions(prefix_cache=False, dtype="bfloat16")
    whole = load_merged_reward_model([rm, sft], MERGE, score)
    texts = [whole.format_text(f"w{i} w{i + 1}", f"w{i + 2} [PAD] w{i % 5 + 3}") for i in range(3, 15)]
    want = whole.score_texts(texts)
    merged_bytes = sum(p.numel() for p in whole.model.parameters()) * 2
    for budget, streams in ((merged_bytes, False), (merged_bytes - 1, True)):
        scorer = load_merged_reward_model(
            [rm, sft], MERGE, ScoreOptions(prefix_cache=False, dtype="bfloat16", device_memory=budget)
        )
        assert isinstance(scorer.model, LayerStreamedModel) is streams
        assert (scorer.stream_note is not None) is streams
        assert scorer.score_texts(texts) == want


def test_device_memory_options() -> None:
    with pytest.raises(OptionError, match="--device-memory -1"):
        ScoreOptions(device_memory=-1)
    ScoreOptions(device_memory=10, max_activations=0)  # --max-activations for a stream it may choose
    quantized, note = ScoreOptions(quant="4bit", device_memory=561).streaming_for(1000, "m")
    assert quantized.stream_layers and quantized.quant == "4bit"  # 1000 // 2 + 1000 // 16 = 562 bytes
    assert note is not None and note.startswith("m: 1,000 weights take 562 B in --quant 4bit")
    assert ScoreOptions(quant="4bit", device_memory=562).streaming_for(1000, "m")[1] is None
    assert ScoreOptions(device_memory=10).record()["device_memory"] == 10
    assert "device_memory" not in ScoreOptions().record()  # old sweeps keep their identity


def test_eval_says_it_streams_and_spills_beside_the_report(tmp_path: Path, spills: list[Path]) -> None:
    rm, sft = models(tmp_path)
    pairs = data(tmp_path)["test"]
    docs, outputs = [], []
    for extra in (
        ["--no-prefix-cache"],
        ["--no-prefix-cache", "--device-memory", "1KB", "--max-activations", "1B"],
    ):
        out = tmp_path / f"results{len(docs)}" / "report.json"
        out.parent.mkdir()
        args = ["eval", str(rm), str(sft), "--alpha", "0.4", "--pairs", str(pairs), "--out", str(out)]
        result = CliRunner().invoke(main, [*args, *extra])
        assert result.exit_code == 0, result.output
        docs.append(json.loads(out.read_text()))
        outputs.append(result.output)
    assert docs[0]["pairs"] == docs[1]["pairs"]
    assert "--device-memory 1.00 KB: scoring layer by layer (--stream-layers)" in outputs[1]
    assert "--device-memory" not in outputs[0]
    assert docs[1]["settings"]["stream_layers"] is True and docs[1]["settings"]["device_memory"] == 1000
    assert spills == [tmp_path / "results1"]  # beside the report, not in /tmp
    assert [p.name for p in (tmp_path / "results1").iterdir() if p.name.startswith(".lazymerge-act")] == []


def sweep(tmp_path: Path, name: str, lines: list[str], **load: object) -> dict:
    files = data(tmp_path)
    inputs = [tmp_path / "rm", tmp_path / "sft0"]
    if not inputs[0].exists():
        models(tmp_path)
    spec = build_spec(
        inputs,
        tmp_path / name,
        alpha="0.5,1",
        pair_files=[files["test"]],
        candidate_files=[files["cands"]],
        ns=[2, 4],
        load={"prefix_cache": False, **load},
    )
    run_sweep(spec, echo=lines.append)
    _, records, _ = read_results(tmp_path / name / "results.jsonl")
    return records


def test_streamed_sweep_equals_the_in_memory_sweep(tmp_path: Path, spills: list[Path]) -> None:
    whole_lines: list[str] = []
    whole = sweep(tmp_path, "whole", whole_lines)
    lines: list[str] = []
    streamed = sweep(tmp_path, "streamed", lines, stream_layers=True, max_activations=0)
    assert sorted(streamed) == ["alpha=0", "alpha=0.5", "alpha=1"]
    for label, record in streamed.items():
        assert (record["pairs"], record["best_of_n"]) == (whole[label]["pairs"], whole[label]["best_of_n"])
        assert "stream" not in whole[label]
        stream = record["stream"]
        assert stream["spilled_activation_bytes"] > 0 and stream["resident_activation_bytes"] == 0
        assert stream["spilled_activation_bytes"] == stream["prediction"]["spill_bytes"]
        assert 0 < stream["peak_weight_bytes"] <= stream["prediction"]["weights_peak"]
        assert stream["peak_weight_groups"] == 2 and stream["groups"] == 2 + 2  # embedding, 2 layers, head
        assert record["peak_rss"] > 0 and stream["prediction"]["host_peak"] > 0
    predicted = [line for line in lines if "layer-streamed:" in line]
    assert len(predicted) == 1 and "predicted peak host RAM" in predicted[0]
    assert not any("per point: about" in line for line in lines)  # the in-memory model's line
    assert any("per point: about" in line for line in whole_lines)
    assert spills == [tmp_path / "streamed"] * 3  # one pass per point, beside results.jsonl


def test_sweep_streams_when_the_merge_does_not_fit(tmp_path: Path) -> None:
    lines: list[str] = []
    records = sweep(tmp_path, "auto", lines, device_memory=1000)
    assert all("stream" in r for r in records.values())
    notes = [line for line in lines if "--device-memory" in line]
    assert len(notes) == 1 and "scoring layer by layer" in notes[0]
    header, _, _ = read_results(tmp_path / "auto" / "results.jsonl")
    assert header is not None and header["fingerprint"]["scoring"]["device_memory"] == 1000
    lines.clear()
    sweep(tmp_path, "auto", lines, device_memory=1000)  # resumed under the same identity: nothing to do
    assert not any("layer-streamed:" in line for line in lines)


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_layer_by_layer_equals_the_quantized_model(tmp_path: Path, quant: str) -> None:
    """--quant with --stream-layers: each layer quantized as it arrives (bitsandbytes' CPU
    backend), the rewards those of the whole model quantized in memory, to the bit."""
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU kernels need rows of at least one 64-element block
    rm, sft = models(tmp_path, hidden_size=64, intermediate_size=128)
    score = ScoreOptions(quant=quant, double_quant=quant == "4bit", prefix_cache=False)
    whole = load_merged_reward_model([rm, sft], MERGE, score)
    texts = [whole.format_text(f"w{i} w{i + 1}", f"w{i + 2} [PAD] w{i % 5 + 3}") for i in range(3, 15)]
    want = whole.score_texts(texts)
    assert_carries_signal(whole.tokenizer, texts, want)
    streamed = load_merged_reward_model([rm, sft], MERGE, dataclasses.replace(score, stream_layers=True))
    model = streamed.model
    assert isinstance(model, LayerStreamedModel)
    assert streamed.score_texts(texts) == want
    layer = model.base.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == layer_stream.QUANT_LAYERS[quant]
    assert type(model.model.score).__name__ == "Linear"  # the reward head stays full precision
    assert all(p.is_meta for p in model.model.parameters()) and model.ledger.live_bytes == 0
    assert all(getattr(getattr(m, "state", None), "CB", None) is None for m in model.model.modules())
    # the quantized layers are smaller than the bf16 ones the stream would hold unquantized
    plain = LayerStreamedModel(model.config, model.source, ScoreOptions(dtype="bfloat16"))
    assert model.groups[1].nbytes < plain.groups[1].nbytes
