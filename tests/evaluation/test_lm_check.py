"""`lazymerge sweep --lm-check`: each point's merged backbone read as a language model through
its tied input embeddings, held against transformers' own causal-LM forward pass on the point's
written model (AutoModelForCausalLM ties lm_head to the embeddings), with the texts tokenized by
the tokenizer's own apply_chat_template; and the option's place in the sweep's resume identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lazymerge.errors import IncompatibleInputsError, OptionError
from lazymerge.score_options import ScoreOptions
from tests.helpers.evaluation import data, models
from tests.helpers.models import transformers


def _reference(folder: Path, pairs: list[dict]) -> tuple[list[float], list[float]]:
    """Mean log-likelihood of each response's tokens after the pair's common token prefix
    (kept >= 1 and below the shorter text's length), from transformers' causal-LM logits."""
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()  # tied
    tok = transformers.AutoTokenizer.from_pretrained(folder)

    def ids(prompt: str, response: str) -> list[int]:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        out = tok.apply_chat_template(messages, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def mean_ll(seq: list[int], start: int) -> float:
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([seq])).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        return sum(float(logp[k - 1, seq[k]]) for k in range(start, len(seq))) / (len(seq) - start)

    chosen, rejected = [], []
    for p in pairs:
        c, r = ids(p["prompt"], p["chosen"]), ids(p["prompt"], p["rejected"])
        common = next((k for k, (a, b) in enumerate(zip(c, r, strict=False)) if a != b), min(len(c), len(r)))
        start = max(1, min(common, len(c) - 1, len(r) - 1))
        chosen.append(mean_ll(c, start))
        rejected.append(mean_ll(r, start))
    return chosen, rejected


def test_lm_check_equals_transformers_causal_lm_on_each_written_point(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lazymerge.evaluation.report import markdown
    from lazymerge.evaluation.sweep import build_spec, read_results, run_sweep

    rm, sft = models(tmp_path, tie_word_embeddings=True)
    files = data(tmp_path)
    out = tmp_path / "sweep"
    spec = build_spec(
        [rm, sft], out, alpha="0,0.5,1", pair_files=[files["test"]], load={"lm_check": True}, write=True
    )
    summary = run_sweep(spec).format(out)
    pairs = [json.loads(line) for line in files["test"].read_text().splitlines()]
    doc = json.loads((out / "results.json").read_text())
    _, records, _ = read_results(out / "results.jsonl")
    assert set(records) == {"alpha=0", "alpha=0.5", "alpha=1"}
    for label, record in records.items():
        chosen, rejected = _reference(out / "models" / label.replace("=", "-"), pairs)
        assert record["lm_check"]["test"]["chosen"] == pytest.approx(chosen, rel=1e-4, abs=1e-5)
        assert record["lm_check"]["test"]["rejected"] == pytest.approx(rejected, rel=1e-4, abs=1e-5)
        right = sum(c > r for c, r in zip(chosen, rejected, strict=True))
        point = next(p for p in doc["points"] if p["label"] == label)
        lm = point["diagnostics"]["test"]["lm_check"]
        assert (lm["n"], lm["right"]) == (len(pairs), right)
        assert lm["accuracy"] == pytest.approx(right / len(pairs))
        assert lm["ci_low"] <= lm["accuracy"] <= lm["ci_high"]
        assert record["lm_check_s"] >= 0
    # the backbone moves with lambda: the points do not all read the same likelihoods
    assert records["alpha=0"]["lm_check"] != records["alpha=1"]["lm_check"]
    assert doc["scoring"]["lm_check"] is True
    report = (out / "report.md").read_text()
    assert report == markdown(doc) and "LM prefers chosen %" in report and "LM check (--lm-check)" in report
    chosen_point = next(p for p in doc["points"] if p["label"] == doc["chosen"]["label"])
    share = 100 * chosen_point["diagnostics"]["test"]["lm_check"]["accuracy"]
    assert f"likelihood prefers the chosen response in {share:.1f}% of {len(pairs)} pairs" in summary


def test_lm_check_enters_the_resume_identity_only_when_on(tmp_path: Path) -> None:
    from lazymerge.evaluation.sweep import build_spec, run_sweep

    assert "lm_check" not in ScoreOptions().record()  # sweeps made before the option keep theirs
    assert ScoreOptions(lm_check=True).record()["lm_check"] is True
    with pytest.raises(OptionError, match="--lm-check .* --stream-layers"):
        ScoreOptions(lm_check=True, stream_layers=True)
    rm, sft = models(tmp_path, tie_word_embeddings=True)
    files = data(tmp_path)
    out = tmp_path / "sweep"
    run_sweep(build_spec([rm, sft], out, alpha="0,1", pair_files=[files["test"]]))
    # results scored without --lm-check are not reused for a sweep with it
    with pytest.raises(OptionError, match="lm_check"):
        run_sweep(
            build_spec([rm, sft], out, alpha="0,1", pair_files=[files["test"]], load={"lm_check": True})
        )


def test_lm_check_refuses_untied_embeddings_in_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lazymerge.cli import main
    from lazymerge.evaluation.sweep import build_spec, run_sweep

    rm, sft = models(tmp_path)  # tie_word_embeddings false
    files = data(tmp_path)
    spec = build_spec(
        [rm, sft], tmp_path / "s", alpha="0", pair_files=[files["test"]], load={"lm_check": True}
    )
    with pytest.raises(IncompatibleInputsError, match="tie_word_embeddings false"):
        run_sweep(spec)
    args = [str(rm), str(sft), "--alpha", "0", "--pairs", str(files["test"]), "--lm-check"]
    result = CliRunner().invoke(main, ["sweep", *args, "-o", str(tmp_path / "cli")])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]  # after the sweep's progress lines
    assert last.startswith("Error: sweep point alpha=0: ") and "tie_word_embeddings false" in last
    assert (
        not (tmp_path / "cli" / "results.jsonl").exists()
        or "alpha=0" not in (tmp_path / "cli" / "results.jsonl").read_text()
    )  # no point recorded
    usage = CliRunner().invoke(main, ["eval", str(rm), "--pairs", str(files["test"]), "--lm-check"])
    assert usage.exit_code == 2 and "sweep" in usage.output
