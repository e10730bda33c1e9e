"""Load a reward model with transformers and score texts, one reward per text.

Input formatting (`format_text`):
- with a chat template chosen with `--chat-template` (`chat_templates`), or else one in the
  tokenizer: messages [system (optional), user = prompt, assistant = response] rendered by the
  template, no generation prompt;
- without one and with `--conversation NAME`: the FastChat conversation RewardBench would use
  (`fastchat_templates`), with its default system message unless `--system-prompt` gives one;
- else a documented plain format: "{system}\\n\\n" (when given), then
  "User: {prompt}\\n\\nAssistant: {response}", then the tokenizer's EOS token.
The text becomes token ids by `token_rules.TokenRule` (`--bos`, `--truncation`, `--max-length`):
by default a template's text is tokenized as `apply_chat_template(tokenize=True)` does (one BOS,
as TRL trains), `--bos double` adds the tokenizer's BOS before the template's (what DogeRM's
LLaMA-2 reward model saw in training), and a text longer than `max_length` loses tokens from
the left after its BOS, so the response and its end are kept.

Padding: `--pad-as-eos` applies RewardBench's rule (`rewardbench_pad_id`); a model left without a
pad id reads the last token of every text, and its whole texts are scored one at a time.

Rewards: each distinct text is scored once. With `prefix_cache` (the default) texts sharing token
prefixes (a system prompt, a prompt shared by a pair or by N candidates) compute each shared
prefix once with the model's KV cache (`prefix_scoring`); models the cache path cannot serve
exactly, and `prefix_cache=False`, score whole texts in batches sorted by length and padded on the
right with the model's pad token, so real tokens keep positions 0..n-1 and the classification
head reads the same last non-padding token as an unpadded forward pass. A layer-streamed model
(`layer_stream`) takes the same two paths in the same batches, layer by layer (`stream_prefix`). Either way batches hold
at most `batch_tokens` tokens and `batch_size` sequences, and the reward is the model's own
sequence-classification logit. What a run computed is in `RewardModel.scoring_stats`; which
conventions applied, in `RewardModel.conventions()`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazymerge._optional import require
from lazymerge.errors import (
    InputError,
    NonFiniteRewardError,
    OptionError,
    TemplateLimitError,
)
from lazymerge.evaluation.conversations import Prompt, prompt_turns
from lazymerge.evaluation.layer_stream import LayerStreamedModel, stream_folder, whole_text_batches
from lazymerge.evaluation.prefix_scoring import (
    ScoringStats,
    cache_path_refusal,
    default_batch_tokens,
    distinct_prefix_tokens,
    reward_length,
    score_with_prefix_tree,
)
from lazymerge.evaluation.template_sandbox import BoundedTemplate, RenderBudget
from lazymerge.evaluation.token_rules import TokenRule
from lazymerge.memory import aligned
from lazymerge.score_options import LLAMA2_SYSTEM_PROMPT, ChatTemplate, ScoreOptions, system_prompt_text

__all__ = ["LLAMA2_SYSTEM_PROMPT", "RewardModel", "load_reward_model", "system_prompt_text"]

REMOTE_CODE_FILES = (
    "config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def refuse_remote_code(folder: Path) -> None:
    """Refuse a folder whose configs ask transformers to import code shipped with the model.

    `auto_map` in any of these files names classes in the folder's own `.py` files; lazymerge never
    runs them, so such a model is refused before transformers sees it.

    Raises:
        InputError naming the file.
    """
    for name in REMOTE_CODE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InputError(f"{path}: cannot read as JSON ({type(exc).__name__}: {exc})") from None
        if isinstance(data, dict) and "auto_map" in data:
            raise InputError(
                f"{path}: the model asks to run Python code shipped in its folder (auto_map); "
                "lazymerge never runs code from a model folder: use a model transformers supports natively"
            )


def bnb_config(quant: str, double_quant: bool) -> Any:
    """transformers' BitsAndBytesConfig for `--quant`: 4bit is NF4 with bf16 compute; the reward
    head (`score`) stays in full precision either way."""
    transformers = require("transformers")
    require("bitsandbytes")
    import torch

    if quant == "4bit":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=double_quant,
            llm_int8_skip_modules=["score"],
        )
    if quant == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["score"])
    raise OptionError(f"--quant {quant!r}: choose 4bit or 8bit")


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and load reports: they would mix with lazymerge's
    output (its tables, `--json`, one-line errors)."""
    transformers = require("transformers")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@dataclass
class RewardModel:
    model: Any
    tokenizer: Any
    device: str
    max_length: int = 2048
    system_prompt: str | None = None
    batch_size: int = 8
    #: The model folder, named in error messages.
    source: str = ""
    #: A template chosen with --chat-template, used instead of the tokenizer's.
    chat_template: ChatTemplate | None = None
    #: The folder whose tokenizer files (and chat template) this is, for messages.
    folder: str = ""
    #: What every render of this model's texts has used: one run's cumulative template budget.
    template_budget: RenderBudget = field(default_factory=RenderBudget)
    #: Compute prefixes shared by several texts once (`prefix_scoring`), where the model allows.
    prefix_cache: bool = True
    #: Most tokens in a batch (rows x longest row); None: `prefix_scoring.default_batch_tokens`.
    batch_tokens: int | None = None
    #: What the last `score_encoded` call computed (tokens, padding, the path and why).
    scoring_stats: ScoringStats | None = field(default=None, repr=False)
    #: Why the model is scored layer by layer although --stream-layers was not given (it did
    #: not fit --device-memory: `ScoreOptions.streaming_for`), for the command line to say.
    stream_note: str | None = field(default=None, repr=False)
    #: How texts become token ids and which conventions apply (`ScoreOptions` defaults).
    bos: str = "auto"
    truncation: str = "left"
    conversation: str | None = None
    #: What `apply_pad_rule` did, for `conventions()`.
    pad_note: str = ""
    _compiled: BoundedTemplate | None = field(default=None, repr=False)
    _rule: TokenRule | None = field(default=None, repr=False)

    @property
    def templated(self) -> bool:
        """Whether texts are rendered from a chat template (chosen, or the tokenizer's)."""
        return self.chat_template is not None or bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def fastchat(self) -> Any:
        """The FastChat conversation formatting this model's texts, or None."""
        if self.conversation is None or self.templated:
            return None
        from lazymerge.evaluation.fastchat_templates import CONVERSATIONS

        return CONVERSATIONS[self.conversation]

    def token_rule(self) -> TokenRule:
        if self._rule is None:
            self._rule = TokenRule(
                self.tokenizer,
                self.bos,
                self.truncation,
                self.max_length,
                self.templated,
                append_eos=self.fastchat is not None and honours_add_eos(self.tokenizer),
            )
        return self._rule

    def conventions(self) -> dict[str, str]:
        """Which formatting, BOS, pad and truncation conventions applied, in words."""
        if self.chat_template is not None:
            fmt = f"chat template {self.chat_template.name}"
        elif self.templated:
            fmt = "the tokenizer's chat template"
        elif self.fastchat is not None:
            eos = "EOS appended" if honours_add_eos(self.tokenizer) else "no EOS appended"
            fmt = f"FastChat conversation {self.conversation} ({eos}, as RewardBench)"
        else:
            fmt = "plain format (no chat template)"
        bos = {
            "auto": "auto: "
            + (
                "template text tokenized as apply_chat_template(tokenize=True)"
                if self.templated
                else "the tokenizer's special tokens"
            ),
            "single": "single: the tokenizer's special tokens, the first of two leading BOS dropped",
            "double": "double: the tokenizer's special tokens before the text's own",
        }[self.bos]
        side = "left, keeping the leading BOS" if self.truncation == "left" else "right"
        return {
            "format": fmt,
            "bos": bos,
            "pad": self.pad_note,
            "truncation": f"{side} (at most {self.max_length} tokens)",
        }

    def format_text(self, prompt: Prompt, response: str) -> str:
        """The text scored for `response` to `prompt` (one user message, or a conversation's
        turns: `conversations.Prompt`), in the model's format (see the module's docstring)."""
        turns = prompt_turns(prompt)
        if self.templated:
            return self._render_template(turns, response)
        conversation = self.fastchat
        if conversation is not None:
            from lazymerge.evaluation.fastchat_templates import render

            return render(conversation, [c for _, c in turns] + [response], self.system_prompt)
        head = f"{self.system_prompt}\n\n" if self.system_prompt is not None else ""
        said = "".join(f"{'User' if r == 'user' else 'Assistant'}: {c}\n\n" for r, c in turns)
        return f"{head}{said}Assistant: {response}{self.tokenizer.eos_token or ''}"

    def _render_template(self, turns: list[tuple[str, str]], response: str) -> str:
        """The chat template's text for the turns and the answer, as apply_chat_template renders
        it (metered: `template_sandbox`)."""
        messages = [{"role": r, "content": c} for r, c in turns] + [
            {"role": "assistant", "content": response}
        ]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        # what apply_chat_template gives a template: the messages, no tools or documents,
        # no generation prompt, and the tokenizer's named special tokens as strings
        variables: dict[str, Any] = {
            **dict(getattr(self.tokenizer, "special_tokens_map", None) or {}),
            "messages": messages,
            "tools": None,
            "documents": None,
            "add_generation_prompt": False,
        }
        template = self.bounded_template()
        try:
            return template.render(self.template_budget, variables)
        except TemplateLimitError:
            raise
        except Exception as exc:  # jinja2's TemplateError and SecurityError, and whatever the template raises
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(
                f"{template.name}: the chat template failed ({type(exc).__name__}: {first})"
                + ("" if self.chat_template is not None else f"; fix the chat template of {self.source}")
            ) from None

    def bounded_template(self) -> BoundedTemplate:
        """The chat template in use (the chosen one, else the tokenizer's), compiled once for
        metered rendering (`template_sandbox`), named by its file in messages."""
        if self._compiled is not None:
            return self._compiled
        from lazymerge.evaluation.chat_templates import compile_template, model_template_file

        if self.chat_template is not None:
            text, name = self.chat_template.text, self.chat_template.name
        else:
            name = model_template_file(Path(self.folder)) if self.folder else self.source
            text = self.tokenizer.chat_template
            if isinstance(text, dict):  # several named templates: transformers uses "default"
                if "default" not in text:
                    raise InputError(
                        f"{name}: the tokenizer has several chat templates and none named default; "
                        "choose one with --chat-template"
                    )
                text = text["default"]
            if not isinstance(text, str):
                raise InputError(f"{name}: the tokenizer's chat template is not text")
        self._compiled = compile_template(text, name)
        return self._compiled

    def encode(self, text: str) -> list[int]:
        """`text`'s token ids under `--bos` and `--truncation` (`token_rules`)."""
        return self.token_rule().encode(text)

    def encode_all(self, texts: Sequence[str]) -> dict[str, list[int]]:
        """Token ids of each distinct text (a sweep encodes once and scores many models)."""
        return {t: self.encode(t) for t in sorted(set(texts))}

    def score_encoded(
        self, encoded: dict[str, list[int]], progress: Callable[[int], None] = lambda n: None
    ) -> dict[str, float]:
        """One reward per distinct text from its token ids (through the prefix cache when
        `prefix_cache` is on and `prefix_scoring.cache_path_refusal` accepts the model); what
        was computed is left in `scoring_stats`.

        Raises:
            NonFiniteRewardError carrying the text whose reward is NaN or infinite.
        """
        budget = self.batch_tokens or default_batch_tokens(self.device)
        rewards: dict[str, float] = {}

        def take(finished: list[tuple[str, float]]) -> None:
            for text, value in finished:
                if not math.isfinite(value):
                    # a NaN would compare false with everything and score as a wrong pair, silently
                    raise NonFiniteRewardError(self.source, value, text)
                rewards[text] = value
            progress(len(finished))

        if isinstance(self.model, LayerStreamedModel):
            # the stream walks the same prefix tree layer by layer, or falls back as below
            self.model.score_encoded(encoded, budget, self.batch_size, take, self.prefix_cache)
            self.scoring_stats = self.model.scoring_stats
            return rewards
        refusal = cache_path_refusal(self.model) if self.prefix_cache else None
        if self.prefix_cache and refusal is None:
            self.scoring_stats = score_with_prefix_tree(
                self.model, self.device, encoded, budget, self.batch_size, take
            )
        else:
            self.scoring_stats = self._score_whole(encoded, budget, take)
            self.scoring_stats.fallback = refusal
        return rewards

    def _score_whole(
        self, encoded: dict[str, list[int]], budget: int, take: Callable[[list[tuple[str, float]]], None]
    ) -> ScoringStats:
        """Every text computed whole, in padded batches sorted by length."""
        import torch

        pad = self.model.config.pad_token_id
        # without a pad id transformers' head cannot find each row's last token in a padded batch;
        # a model whose head lazymerge can apply itself is batched anyway, the last real token read
        # from the lengths (the filler id is masked out, so it is never attended to)
        own_head = pad is None and reads_own_head(self.model)
        batch_pad = pad if pad is not None or not own_head else 0
        rows = self.batch_size if batch_pad is not None else 1  # else only unpadded passes are exact
        stats = ScoringStats("whole texts", batch_tokens=budget, batch_size=rows)
        stats.texts = len(encoded)
        stats.tokens_in_texts = sum(len(ids) for ids in encoded.values())
        stats.ideal_tokens = distinct_prefix_tokens(
            [ids[: reward_length(ids, pad)] for ids in encoded.values()]
        )
        # the batches a layer-streamed pass makes too (`layer_stream`), so the two agree
        for group in whole_text_batches(encoded, batch_pad, budget, self.batch_size):
            width = max(len(encoded[t]) for t in group)
            ids = torch.full((len(group), width), batch_pad if batch_pad is not None else 0, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, text in enumerate(group):
                seq = encoded[text]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            with torch.no_grad():
                if own_head:
                    base = getattr(self.model, self.model.base_model_prefix)
                    hidden = base(
                        input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                    ).last_hidden_state
                    last = torch.tensor([len(encoded[t]) - 1 for t in group], device=hidden.device)
                    logits = self.model.score(hidden[torch.arange(len(group), device=hidden.device), last])
                else:
                    logits = self.model(
                        input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                    ).logits
            stats.batches += 1
            stats.tokens_computed += sum(len(encoded[t]) for t in group)
            stats.padded_tokens += len(group) * width
            take(list(zip(group, logits[:, 0].float().cpu().tolist(), strict=True)))
        return stats

    def score_texts(
        self, texts: Sequence[str], progress: Callable[[int], None] = lambda n: None
    ) -> list[float]:
        """One reward per text; equal texts always get equal rewards.

        Raises:
            NonFiniteRewardError with the index of the first text that got a NaN or inf reward.
        """
        try:
            rewards = self.score_encoded(self.encode_all(texts), progress)
        except NonFiniteRewardError as exc:
            raise NonFiniteRewardError(exc.model, exc.value, exc.text, list(texts).index(exc.text)) from None
        return [rewards[t] for t in texts]


#: Tokenizer classes for which RewardBench's `tokenizer.add_eos_token = True` appends the EOS under
#: the transformers it pins (4.51: Llama, Code Llama and Gemma tokenizers, slow and fast); other
#: tokenizers ignore the attribute there.
ADD_EOS_TOKENIZERS = ("LlamaTokenizer", "CodeLlamaTokenizer", "GemmaTokenizer")


def honours_add_eos(tokenizer: Any) -> bool:
    """Whether RewardBench's FastChat path gives this tokenizer's texts a final EOS."""
    return type(tokenizer).__name__.removesuffix("Fast") in ADD_EOS_TOKENIZERS


def rewardbench_pad_id(model_pad: int | None, tokenizer: Any) -> int | None:
    """RewardBench's pad id (`run_rm.py`, `run_v2.py`): a tokenizer without a pad token pads with
    its EOS, which becomes the model's pad id; a model config without a pad id takes the
    tokenizer's."""
    if tokenizer.pad_token_id is None:
        return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model_pad
    return model_pad if model_pad is not None else tokenizer.pad_token_id


def apply_pad_rule(model: Any, tokenizer: Any, pad_as_eos: bool, last_token: bool = False) -> str:
    """Set the pad id the scorers read (`--pad-as-eos`; none with `last_token`, OpenRLHF's rule:
    each reward at its text's last token whatever its id); what applies, in words."""
    if model is None:
        return "not scored here"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if last_token:
        config.pad_token_id = model.config.pad_token_id = None
        if isinstance(model, LayerStreamedModel):
            model.pad_id = None
        return "OpenRLHF's rule: each reward read at its text's last token, whatever its id" + (
            " (--pad-as-eos does not apply)" if pad_as_eos else ""
        )
    own = config.pad_token_id
    pad = rewardbench_pad_id(own, tokenizer) if pad_as_eos else own
    if pad != own:
        config.pad_token_id = model.config.pad_token_id = pad
        if isinstance(model, LayerStreamedModel):
            model.pad_id = pad
        why = "the tokenizer has no pad token" if tokenizer.pad_token_id is None else "the model has none"
        return (
            f"pad id {pad} (--pad-as-eos, RewardBench's rule: {why}); rewards read at the last non-pad token"
        )
    if pad is None:
        batches = "batched, the padding masked" if reads_own_head(model) else "one per batch"
        return f"no pad id: rewards read at each text's last token (whole texts {batches})"
    return f"pad id {pad}" + (
        " (the model's own; --pad-as-eos keeps it)" if pad_as_eos else " (the model's own)"
    )


def compute_dtype(score: ScoreOptions) -> Any:
    """The torch dtype `score` computes in (its `compute_dtype`)."""
    from lazymerge.io.dtypes import OUTPUT_DTYPE_CHOICES, torch_dtype

    return torch_dtype(OUTPUT_DTYPE_CHOICES[score.compute_dtype])


def check_device(score: ScoreOptions) -> None:
    """InputError when `score.device` is a GPU that torch cannot see."""
    import torch

    if score.on_gpu and not torch.cuda.is_available():
        raise InputError(
            f"--device {score.device}: no CUDA GPU is visible to torch (torch {torch.__version__})"
        )


def scorer(
    model: Any, tokenizer: Any, score: ScoreOptions, source: str, folder: str, *, last_token: bool = False
) -> RewardModel:
    """The `RewardModel` of a loaded model and tokenizer, scoring as `score` says (`last_token`:
    OpenRLHF's reading rule, `apply_pad_rule`)."""
    pad_note = apply_pad_rule(model, tokenizer, score.pad_as_eos, last_token)
    return RewardModel(
        model,
        tokenizer,
        score.device,
        score.max_length,
        score.system_prompt,
        score.batch_size,
        source,
        score.chat_template,
        folder,
        prefix_cache=score.prefix_cache,
        batch_tokens=score.batch_tokens,
        bos=score.bos,
        truncation=score.truncation,
        conversation=score.conversation,
        pad_note=pad_note,
    )


@dataclass(frozen=True)
class HeadLayout:
    """How a folder's reward head is stored and read: transformers' `score` at the last non-pad
    token, or OpenRLHF's (`recipe.openrlhf_head`): a one-output head, under `value_head` or
    `score`, read at each text's last token (`openrlhf/models/model.py`: the last position of the
    attention mask)."""

    openrlhf: bool = False
    #: The head's tensor name in the weights.
    tensor: str = "score.weight"

    def rename(self, name: str) -> str:
        """The transformers parameter a tensor of these weights fills."""
        return "score" + name.removeprefix("value_head") if name.startswith("value_head.") else name

    def load_kwargs(self) -> dict[str, Any]:
        """What `from_pretrained` needs for these weights: one label, the head renamed."""
        if not self.openrlhf:
            return {}
        mapping = {r"^value_head\.": "score."} if self.tensor.startswith("value_head.") else None
        return {"num_labels": 1, **({"key_mapping": mapping} if mapping else {})}


def head_layout(config: dict[str, Any] | None, names: Collection[str], label: str) -> HeadLayout:
    """The reward head's layout for a model's config.json and tensor names.

    Raises:
        InputError for an OpenRLHF critic (a value per token, not a reward).
    """
    from lazymerge.merge.recipe import openrlhf_head

    head = openrlhf_head(config, names)
    if head is None:
        return HeadLayout()
    if head.kind == "critic":
        raise InputError(
            f"{label}: holds {head.tensor} of an OpenRLHF critic (CriticModel): a value per token, not a "
            "reward; give OpenRLHF's reward model (RewardModel) instead"
        )
    return HeadLayout(True, head.tensor)


def folder_head_layout(folder: Path) -> HeadLayout:
    """`head_layout` of a model folder, from its config.json and its headers (no tensor read)."""
    from lazymerge.io.hf_folder import read_config
    from lazymerge.io.reader import Checkpoint

    checkpoint = Checkpoint.open(folder)
    try:
        return head_layout(read_config(folder), checkpoint.keys(), str(folder))
    finally:
        checkpoint.close()


def load_reward_model(
    path: str | Path, score: ScoreOptions | None = None, *, spill_dir: Path | None = None, **load: Any
) -> RewardModel:
    """Load a sequence-classification reward model from a local folder.

    Args:
        score: how it is loaded and scored (device, compute dtype, quantization, ...); or
        load: the same as keyword arguments (`ScoreOptions.build`).
        spill_dir: where a layer-streamed pass spills hidden states past --max-activations
            (beside the results; default the system's temporary folder).

    Raises:
        MissingDependencyError when transformers, accelerate or bitsandbytes are missing.
    """
    score = score if score is not None else ScoreOptions.build(**load)
    transformers = require("transformers")

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a model folder (no config.json)")
    refuse_remote_code(folder)
    check_device(score)
    score, note = _fit_device(folder, score)
    if score.stream_layers:
        model = _streamed_reward_model(folder, score, spill_dir)
        model.stream_note = note
        return model
    layout = folder_head_layout(folder)
    model, tokenizer = _from_pretrained(transformers, folder, score, layout)
    if score.quant is None:
        model = model.to(score.device)
        own_aligned_memory(model)
    model.eval()
    return scorer(model, tokenizer, score, str(folder), str(folder), last_token=layout.openrlhf)


def reads_own_head(model: Any) -> bool:
    """Whether `model` is transformers' generic sequence classifier (a base model under
    `base_model_prefix` and a `score` head on its last hidden states), whose reward lazymerge
    can read at any token itself."""
    try:
        from transformers.modeling_layers import GenericForSequenceClassification
    except ImportError:  # transformers before 5
        return False
    return isinstance(model, GenericForSequenceClassification) and hasattr(model, "score")


def own_aligned_memory(model: Any) -> int:
    """Copy each CPU parameter and buffer of `model` whose data is not `CPU_ALIGNMENT`-aligned
    into torch's own memory, and return how many were copied.

    transformers maps safetensors weights straight from the file, at offsets the file's header
    decides, and the CPU's matmul kernels round differently for data off a 64-byte boundary: the
    same weights loaded from a written merge and built in memory gave fp32 rewards 4e-9 apart.
    Aligned, a model's rewards depend on its weights only, however they were loaded."""
    copied = 0
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for tensor in table.values():
                if tensor is not None and aligned(tensor) is not tensor:
                    tensor.data = aligned(tensor.data)
                    copied += 1
    return copied


def _from_pretrained(
    transformers: Any, folder: Path, score: ScoreOptions, layout: HeadLayout
) -> tuple[Any, Any]:
    """transformers' model and tokenizer from `folder` (quantized as `score` says, its head as
    `layout` stores it), checked to hold a trained reward head."""
    kwargs: dict[str, Any] = layout.load_kwargs()
    if score.quant is not None:
        require("accelerate")
        kwargs.update(
            quantization_config=bnb_config(score.quant, score.double_quant), device_map={"": score.device}
        )
    quiet_transformers()
    # trust_remote_code=False: transformers never imports a folder's .py files nor asks on stdin
    try:
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=compute_dtype(score), trust_remote_code=False, output_loading_info=True, **kwargs
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{folder}: transformers cannot load this model: {first}") from None
    missing = [k for k in info.get("missing_keys", ()) if k.split(".")[0] in ("score", "classifier")]
    if missing or getattr(model.config, "num_labels", 1) != 1:
        raise InputError(
            f"{folder}: not a reward model: "
            + (
                f"its weights have no reward head ({missing[0]})"
                if missing
                else f"num_labels is {model.config.num_labels}, not 1"
            )
            + "; scoring it would use a randomly initialised head. Give a ...ForSequenceClassification "
            "reward model, or merge one in with lazymerge run (--rm N names the reward model among its inputs)"
        )
    return model, tokenizer


def _fit_device(folder: Path, score: ScoreOptions) -> tuple[ScoreOptions, str | None]:
    """`score` for this folder's weights under --device-memory (`ScoreOptions.streaming_for`),
    counted from the headers alone."""
    if score.device_memory is None or score.stream_layers:
        return score, None
    from lazymerge.io.reader import Checkpoint

    checkpoint = Checkpoint.open(folder)
    try:
        parameters = sum(info.numel for info in checkpoint.values())
    finally:
        checkpoint.close()
    return score.streaming_for(parameters, str(folder))


def _streamed_reward_model(folder: Path, score: ScoreOptions, spill_dir: Path | None = None) -> RewardModel:
    """`load_reward_model` with --stream-layers: the folder's weights read a layer at a time."""
    transformers = require("transformers")
    quiet_transformers()
    quantization = bnb_config(score.quant, score.double_quant) if score.quant is not None else None
    model = stream_folder(folder, score, score.max_activations, spill_dir, quantization)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        model.close()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{folder}: transformers cannot load this model's tokenizer: {first}") from None
    return scorer(model, tokenizer, score, str(folder), str(folder))
