"""`lazymerge sweep --lm-check`: each point's merged backbone read as a language model, held
against transformers' own causal-LM forward pass, with the texts tokenized by the tokenizer's own
apply_chat_template:

- tied embeddings: AutoModelForCausalLM on the point's written model (it ties lm_head to the
  embeddings);
- untied (reward model and SFT models with their own lm_head, the SFT vocabulary reordered and
  grown by [PAD], a token only the reward model has): LlamaForCausalLM assembled here from the
  point's written backbone and a head built here from the SFT models' lm_head by token, and, at
  the SFT model's own weights, the SFT model itself;

and the settings' place in the sweep's resume identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lazymerge.errors import IncompatibleInputsError, OptionError
from lazymerge.score_options import ScoreOptions
from tests.helpers.evaluation import data, models, write_jsonl
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


def _pairs_with_an_rm_only_token(tmp_path: Path) -> Path:
    """data()'s test pairs, and two whose chosen response holds <rm_only> (a token no SFT
    model, so no LM head, has)."""
    rows = [json.loads(line) for line in data(tmp_path)["test"].read_text().splitlines()]
    rows += [
        {
            "prompt": "w3 w4",
            "chosen": "w11 <rm_only> w20",
            "rejected": "w29",
            "subset": "math-prm",
            "id": "x1",
        },
        {"prompt": "w3 w5", "chosen": "<rm_only> w12", "rejected": "w28 w7", "subset": "hep-go", "id": "x2"},
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def _chat_ids(tok, prompt: str, response: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _start(c: list[int], r: list[int]) -> int:
    common = next((k for k, (a, b) in enumerate(zip(c, r, strict=False)) if a != b), min(len(c), len(r)))
    return max(1, min(common, len(c) - 1, len(r) - 1))


def _head_by_token(folder: Path, sfts: list[Path], weights: list[float]) -> tuple[torch.Tensor, list[int]]:
    """The merged vocabulary's LM head, built here by token from the SFT models' tokenizers and
    lm_head.weight: each row the SFT rows of its token averaged with the SFT weights
    renormalised over the SFT models that have it (plainly where those weights are all 0); and
    the rows no SFT model has."""
    from safetensors.torch import load_file

    merged = transformers.AutoTokenizer.from_pretrained(folder).get_vocab()
    sources = [
        (transformers.AutoTokenizer.from_pretrained(s).get_vocab(), load_file(str(s / "model.safetensors")))
        for s in sfts
    ]
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    assert len(merged) == vocab_size
    head = torch.zeros(vocab_size, sources[0][1]["lm_head.weight"].shape[1], dtype=torch.float64)
    missing = []
    for token, row in merged.items():
        have = [
            (w, vocab[token], t["lm_head.weight"])
            for w, (vocab, t) in zip(weights, sources, strict=True)
            if token in vocab
        ]
        if not have:
            missing.append(row)
            continue
        total = sum(w for w, _, _ in have)
        for w, r, lm_head in have:
            head[row] += (w / total if total else 1 / len(have)) * lm_head[r].double()
    return head, missing


def _assembled_reference(
    folder: Path, head: torch.Tensor, missing: list[int], pairs: list[dict]
) -> tuple[list[float], list[float], int]:
    """LlamaForCausalLM from the point's written backbone (model.* of its safetensors) and
    `head`; the logits of `missing` rows left out of the softmax and their tokens not scored."""
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(folder)
    config.tie_word_embeddings = False
    lm = transformers.LlamaForCausalLM(config).eval()
    backbone = {
        k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k.startswith("model.")
    }
    lm.load_state_dict({**backbone, "lm_head.weight": head.float()}, strict=True)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    unscored = 0

    def mean_ll(seq: list[int], start: int) -> float:
        nonlocal unscored
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([seq])).logits[0].double()
        logits[:, missing] = float("-inf")
        logp = torch.log_softmax(logits, dim=-1)
        scored = [k for k in range(start, len(seq)) if seq[k] not in missing]
        unscored += len(seq) - start - len(scored)
        return sum(float(logp[k - 1, seq[k]]) for k in scored) / len(scored)

    chosen, rejected = [], []
    for p in pairs:
        c, r = _chat_ids(tok, p["prompt"], p["chosen"]), _chat_ids(tok, p["prompt"], p["rejected"])
        start = _start(c, r)
        chosen.append(mean_ll(c, start))
        rejected.append(mean_ll(r, start))
    return chosen, rejected, unscored


@pytest.mark.parametrize("domains", [1, 2])
def test_untied_lm_check_equals_an_assembled_llama_for_causal_lm(tmp_path: Path, domains: int) -> None:
    from lazymerge.evaluation.report import markdown
    from lazymerge.evaluation.sweep import build_spec, read_results, run_sweep

    rm, *sfts = models(tmp_path, domains=domains)  # untied; SFT vocabulary reordered, [PAD] appended
    pair_file = _pairs_with_an_rm_only_token(tmp_path)
    pairs = [json.loads(line) for line in pair_file.read_text().splitlines()]
    out = tmp_path / "sweep"
    grid = {"alpha": "0,0.5,1"} if domains == 1 else {"weight_vectors": ["0.5,0.3,0.2", "0,0.25,0.75"]}
    spec = build_spec([rm, *sfts], out, pair_files=[pair_file], load={"lm_check": True}, write=True, **grid)
    assert spec.lm_head is not None and spec.lm_head.holders == tuple(range(1, domains + 1))
    run_sweep(spec)
    _, records, _ = read_results(out / "results.jsonl")
    assert len(records) == 3
    for label, record in records.items():
        folder = out / "models" / label.replace("=", "-").replace(",", "_")
        head, missing = _head_by_token(folder, sfts, record["weights"][1:])
        assert len(missing) == 1  # <rm_only>; the appended [PAD] row is the SFT models' own
        chosen, rejected, unscored = _assembled_reference(folder, head, missing, pairs)
        lm = record["lm_check"]["pairs"]
        assert lm["chosen"] == pytest.approx(chosen, rel=1e-4, abs=1e-5)
        assert lm["rejected"] == pytest.approx(rejected, rel=1e-4, abs=1e-5)
        assert lm["unscored"] == unscored == 2
    # the backbone moves with the weights: the points do not all read the same likelihoods
    assert len({json.dumps(r["lm_check"]) for r in records.values()}) == 3
    doc = json.loads((out / "results.json").read_text())
    assert doc["lm_head"]["kind"] == "untied" and doc["lm_head"]["holders"] == list(range(1, domains + 1))
    assert all(str(s) in doc["lm_head"]["text"] for s in sfts)
    report = (out / "report.md").read_text()
    assert (
        report == markdown(doc)
        and doc["lm_head"]["text"] in report
        and "2 response tokens unscored" in report
    )


def test_untied_lm_check_at_the_sft_weights_equals_the_sft_model_itself(tmp_path: Path) -> None:
    """At alpha 1 the merged backbone and head are the SFT model's own (its vocabulary reordered
    and grown by [PAD]): the LM check equals the SFT model's causal-LM forward pass on the same
    texts tokenized by the SFT tokenizer."""
    from lazymerge.evaluation.sweep import build_spec, read_results, run_sweep

    rm, sft = models(tmp_path)
    files = data(tmp_path)
    out = tmp_path / "sweep"
    run_sweep(build_spec([rm, sft], out, alpha="0,1", pair_files=[files["test"]], load={"lm_check": True}))
    _, records, _ = read_results(out / "results.jsonl")
    lm = transformers.AutoModelForCausalLM.from_pretrained(sft).eval()
    assert lm.lm_head.weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr()  # untied
    rm_tok, sft_tok = (transformers.AutoTokenizer.from_pretrained(f) for f in (rm, sft))
    assert rm_tok.get_vocab() != {t: i for t, i in sft_tok.get_vocab().items() if t != "[PAD]"}  # reordered

    def mean_ll(seq: list[int], start: int) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=torch.tensor([seq])).logits[0].double(), dim=-1)
        return sum(float(logp[k - 1, seq[k]]) for k in range(start, len(seq))) / (len(seq) - start)

    chosen, rejected = [], []
    for p in (json.loads(line) for line in files["test"].read_text().splitlines()):
        texts = [
            rm_tok.apply_chat_template(
                [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": response}],
                tokenize=False,
            )
            for response in (p["chosen"], p["rejected"])
        ]
        c, r = (sft_tok(t, add_special_tokens=False).input_ids for t in texts)
        chosen.append(mean_ll(c, _start(c, r)))
        rejected.append(mean_ll(r, _start(c, r)))
    got = records["alpha=1"]["lm_check"]["test"]
    assert got["chosen"] == pytest.approx(chosen, rel=1e-4, abs=1e-5)
    assert got["rejected"] == pytest.approx(rejected, rel=1e-4, abs=1e-5)
    assert got["unscored"] == 0 and records["alpha=0"]["lm_check"]["test"]["chosen"] != got["chosen"]


def test_the_untied_head_enters_the_resume_identity(tmp_path: Path) -> None:
    from lazymerge.evaluation.sweep import build_spec, fingerprint, run_sweep

    rm, sft = models(tmp_path)
    files = data(tmp_path)
    out = tmp_path / "sweep"
    untied = build_spec([rm, sft], out, alpha="0,1", pair_files=[files["test"]], load={"lm_check": True})
    assert fingerprint(untied)["scoring"]["lm_head"] == {
        "kind": "untied",
        "tensor": "lm_head.weight",
        "holders": [1],
    }
    tied_models = models(tmp_path / "tied", tie_word_embeddings=True)
    tied = build_spec(tied_models, out, alpha="0,1", pair_files=[files["test"]], load={"lm_check": True})
    assert tied.lm_head is not None and tied.lm_head.kind == "tied"
    assert "lm_head" not in fingerprint(tied)["scoring"]  # the identity tied sweeps had before
    run_sweep(build_spec([rm, sft], out, alpha="0,1", pair_files=[files["test"]]))
    with pytest.raises(OptionError, match="lm_check"):  # scored without --lm-check: not reused
        run_sweep(untied)


def test_lm_check_refuses_inputs_without_an_lm_head_before_any_point(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from lazymerge.cli import main
    from lazymerge.evaluation.sweep import build_spec

    rm, sft = models(tmp_path)  # tie_word_embeddings false
    tensors = load_file(str(sft / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(sft / "model.safetensors"), metadata={"format": "pt"})
    files = data(tmp_path)
    with pytest.raises(IncompatibleInputsError, match="--lm-check needs an LM head"):
        build_spec([rm, sft], tmp_path / "s", alpha="0", pair_files=[files["test"]], load={"lm_check": True})
    args = [str(rm), str(sft), "--alpha", "0", "--pairs", str(files["test"]), "--lm-check"]
    result = CliRunner().invoke(main, ["sweep", *args, "-o", str(tmp_path / "cli")])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()  # refused before the sweep starts
    assert line.startswith(f"Error: {rm}: --lm-check needs an LM head")
    assert not (tmp_path / "cli").exists()
    usage = CliRunner().invoke(main, ["eval", str(rm), "--pairs", str(files["test"]), "--lm-check"])
    assert usage.exit_code == 2 and "sweep" in usage.output
