"""Scoring options: how a reward model is loaded and its texts scored, one frozen value.

`ScoreOptions` is to `eval`, `bon` and `sweep` what `MergeOptions` is to a merge: built and
checked once where options enter (the command line, the Python API's keywords), then passed
down whole. It decides the device and the compute dtype once (`compute_dtype`); the loaders,
the sweep's memory estimate, its resume identity and every report read them from here. Each
field's metadata carries its command-line help, from which the CLI declares its flags. Nothing
here imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field, fields
from typing import Any

from lazymerge.errors import OptionError
from lazymerge.options import cli_flag

#: FastChat conversations `--conversation` offers (`evaluation.fastchat_templates.CONVERSATIONS`,
#: whose names a test holds equal to these).
FASTCHAT_NAMES = (
    "tulu",
    "llama-2",
    "mistral",
    "zephyr",
    "vicuna_v1.1",
    "oasst_pythia",
    "openbmb",
    "Ziya",
    "pku-align",
    "raw",
)

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
BOS_CHOICES = ("auto", "single", "double")
TRUNCATION_SIDES = ("left", "right")
SECTION_WEIGHTS = ("file", "dataset")
QUANT_CHOICES = ("4bit", "8bit")
#: Bytes per parameter of each compute dtype (the sweep's memory estimate).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Meta's default LLaMA-2 system prompt, as DogeRM evaluated with it (`--system-prompt llama2`).
LLAMA2_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question "
    "does not make any sense, or is not factually coherent, explain why instead of answering something not "
    "correct. If you don't know the answer to a question, please don't share false information."
)


@dataclass(frozen=True)
class ChatTemplate:
    """A chosen chat template: its name (a built-in name or the file), text and SHA-256."""

    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def record(self) -> str:
        """What results and sweep fingerprints record: the name or file and the text's SHA-256."""
        return f"{self.name} (sha256 {self.sha256})"


def system_prompt_text(choice: str | None) -> str | None:
    """`none` -> no system prompt, `llama2` -> Meta's default LLaMA-2 prompt, else the text itself."""
    if choice is None or choice == "none":
        return None
    return LLAMA2_SYSTEM_PROMPT if choice == "llama2" else choice


@dataclass(frozen=True)
class ScoreOptions:
    """How a reward model is loaded and scored.

    Attributes:
        device: "cpu", "cuda" or "cuda:N".
        dtype: the compute dtype without quantization ("float32", "bfloat16", "float16").
        quant: None, "4bit" (bitsandbytes NF4, bf16 compute) or "8bit"; the reward head stays
            full precision.
        double_quant: 4-bit double quantization.
        max_length: longest input in tokens (see `truncation`).
        system_prompt: the system prompt's text, or None (`system_prompt_text` resolves the
            command line's none / llama2 / text).
        batch_size: texts per forward pass.
        chat_template: a template to format with instead of the tokenizer's.
        prefix_cache: compute prefixes shared by several texts once (`evaluation.prefix_scoring`).
        batch_tokens: most tokens in one batch (None: a default for the device).
        lm_check: with a sweep, each point's backbone read as a language model on the pair
            files (`evaluation.lm_check`); not with `stream_layers`.
        stream_layers: score with the weights streamed one decoder layer at a time
            (`evaluation.layer_stream`), whole texts (the prefix cache does not compose yet),
            quantized layer by layer with `quant`.
        max_activations: with `stream_layers`, bytes of hidden states kept in memory before
            they spill to a memory-mapped file (None: no limit).
        device_memory: bytes the model's weights may take on the device (host RAM on the CPU);
            a model larger than that is scored with `stream_layers` (`streaming_for`).

    Raises:
        OptionError (on construction) for a value that is wrong whatever the model.
    """

    device: str = field(
        default="cpu", metadata=cli_flag("cpu, cuda or cuda:N.", flags=("--device",), show_default=True)
    )
    dtype: str = field(
        default="float32",
        metadata=cli_flag(
            "The dtype the reward model computes in, without --quant (--dtype is the same option; in run "
            "and plan, --dtype is the output's dtype).",
            flags=("--compute-dtype", "--dtype"),
            choices=COMPUTE_DTYPES,
            show_default=True,
        ),
    )
    quant: str | None = field(
        default=None,
        metadata=cli_flag(
            "Load with bitsandbytes: 4bit = NF4 with bf16 compute (also on CPU); the reward head stays "
            "full precision.",
            flags=("--quant",),
            choices=QUANT_CHOICES,
        ),
    )
    double_quant: bool = field(
        default=False,
        metadata=cli_flag(
            "4-bit double quantization (saves about 0.4 bits per parameter).", flags=("--double-quant",)
        ),
    )
    max_length: int = field(
        default=2048,
        metadata=cli_flag(
            "Longest input in tokens; see --truncation for which end is cut.",
            flags=("--max-length",),
            min=1,
            show_default=True,
        ),
    )
    system_prompt: str | None = field(
        default=None,
        metadata=cli_flag(
            "none, llama2 (Meta's default LLaMA-2 system prompt, as DogeRM used) or the text itself.",
            flags=("--system-prompt",),
            cli_default="none",
            show_default=True,
        ),
    )
    batch_size: int = field(
        default=8,
        metadata=cli_flag(
            "Texts per forward pass (padded to the longest; more is faster and takes more memory).",
            flags=("--batch-size",),
            min=1,
            show_default=True,
        ),
    )
    chat_template: ChatTemplate | None = field(
        default=None,
        metadata=cli_flag(
            "llama2, chatml or FILE.jinja: format with this chat template instead of (or, without one, as) "
            "the tokenizer's; rendered in lazymerge's bounded sandbox.",
            flags=("--chat-template",),
        ),
    )

    prefix_cache: bool = field(
        default=True,
        metadata=cli_flag(
            "Compute each prefix shared by several texts (a system prompt, a pair's prompt, N candidates) "
            "once through the model's KV cache; --no-prefix-cache scores every text whole.",
            flags=("--prefix-cache/--no-prefix-cache",),
            show_default=True,
        ),
    )
    batch_tokens: int | None = field(
        default=None,
        metadata=cli_flag(
            "Most tokens (padding included) in one forward pass; texts are sorted by length and "
            "--batch-size caps the rows (default: a size for the device).",
            flags=("--batch-tokens",),
            min=1,
        ),
    )

    stream_layers: bool = field(
        default=False,
        metadata=cli_flag(
            "Stream the weights one decoder layer at a time (merged layer by layer for a merge): every "
            "text goes through a layer before the next is read, so memory holds two layers and the "
            "hidden states, never the model; the same rewards as in memory; whole texts.",
            flags=("--stream-layers",),
        ),
    )
    max_activations: int | None = field(
        default=None,
        metadata=cli_flag(
            "With --stream-layers: most bytes of hidden states kept in memory; the rest go to a "
            "memory-mapped temporary file, removed at the end (default: no limit).",
            flags=("--max-activations",),
            kind="size",
        ),
    )
    device_memory: int | None = field(
        default=None,
        metadata=cli_flag(
            "Most bytes the model's weights may take on the device (host RAM with --device cpu): a "
            "model larger than that is scored with --stream-layers, said in one line (default: no limit).",
            flags=("--device-memory",),
            kind="size",
        ),
    )

    conversation: str | None = field(
        default=None,
        metadata=cli_flag(
            "A FastChat conversation for a reward model whose tokenizer has no chat template, as "
            "RewardBench formats one (its default: tulu); a Llama or Gemma tokenizer's EOS is "
            "appended, as RewardBench's add_eos_token does.",
            flags=("--conversation",),
            choices=FASTCHAT_NAMES,
        ),
    )
    bos: str = field(
        default="auto",
        metadata=cli_flag(
            "auto: a chat template's text tokenized as apply_chat_template(tokenize=True) gives it "
            "(one BOS, as TRL trains); single: the tokenizer's special tokens, the first of two "
            "leading BOS dropped (RewardBench); double: the tokenizer's BOS before the template's "
            "(DogeRM's LLaMA-2 reward model).",
            flags=("--bos",),
            choices=BOS_CHOICES,
            show_default=True,
        ),
    )
    pad_as_eos: bool = field(
        default=False,
        metadata=cli_flag(
            "RewardBench's pad rule: a tokenizer without a pad token pads with EOS (so the reward is "
            "read at the last token that is not EOS); without it, a model without a pad id reads "
            "the last token.",
            flags=("--pad-as-eos",),
        ),
    )
    truncation: str = field(
        default="left",
        metadata=cli_flag(
            "Which end of a text longer than --max-length is cut: left keeps the response (and "
            "the leading BOS), right keeps the start (RewardBench 2).",
            flags=("--truncation",),
            choices=TRUNCATION_SIDES,
            show_default=True,
        ),
    )
    section_weights: str = field(
        default="file",
        metadata=cli_flag(
            "RewardBench section scores weighted by each subset's pairs in the file, or by "
            "RewardBench's fixed full-dataset counts (its leaderboard's sections).",
            flags=("--section-weights",),
            choices=SECTION_WEIGHTS,
            show_default=True,
        ),
    )
    lm_check: bool = field(
        default=False,
        metadata=cli_flag(
            "sweep only: also read each point's merged backbone as a language model (through the domain "
            "models' own lm_head, matched by token, or the tied input embeddings) and record, per pair "
            "file, how often the chosen response's mean token log-likelihood beats the rejected one's "
            "(whole texts, one forward pass per text).",
            flags=("--lm-check",),
        ),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d{1,3})?", self.device):
            raise OptionError(f"--device {self.device!r}: choose cpu, cuda or cuda:N")
        if self.dtype not in COMPUTE_DTYPES:
            raise OptionError(f"--compute-dtype {self.dtype!r}: choose {', '.join(COMPUTE_DTYPES)}")
        if self.quant is not None and self.quant not in QUANT_CHOICES:
            raise OptionError(f"--quant {self.quant!r}: choose {', '.join(QUANT_CHOICES)}")
        if self.batch_tokens is not None and (
            not isinstance(self.batch_tokens, int)
            or isinstance(self.batch_tokens, bool)
            or self.batch_tokens < 1
        ):
            raise OptionError(f"--batch-tokens {self.batch_tokens!r}: must be a positive integer")
        for name in ("max_length", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError(f"--{name.replace('_', '-')} {value!r}: must be a positive integer")
        self._check_streaming()
        self._check_conventions()
        if self.chat_template is not None and not isinstance(self.chat_template, ChatTemplate):
            raise OptionError("chat_template: give a ChatTemplate (see evaluation.chat_templates)")

    def _check_streaming(self) -> None:
        """What --stream-layers does not combine with, refused here, once."""
        for name in ("max_activations", "device_memory"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise OptionError(f"--{name.replace('_', '-')} {value!r}: must be a size of 0 bytes or more")
        if self.lm_check and self.stream_layers:
            raise OptionError(
                "--lm-check reads the backbone of a model in memory: it does not combine with --stream-layers"
            )
        if self.max_activations is not None and not self.stream_layers and self.device_memory is None:
            raise OptionError(
                "--max-activations limits --stream-layers' hidden states: give --stream-layers "
                "(or --device-memory) too"
            )

    def _check_conventions(self) -> None:
        """The RewardBench / TRL convention options, checked once."""
        for name, choices in (
            ("bos", BOS_CHOICES),
            ("truncation", TRUNCATION_SIDES),
            ("section_weights", SECTION_WEIGHTS),
        ):
            if getattr(self, name) not in choices:
                flag = "--" + name.replace("_", "-")
                raise OptionError(f"{flag} {getattr(self, name)!r}: choose {', '.join(choices)}")
        if self.conversation is not None and self.conversation not in FASTCHAT_NAMES:
            raise OptionError(f"--conversation {self.conversation!r}: choose {', '.join(FASTCHAT_NAMES)}")
        if self.conversation is not None and self.chat_template is not None:
            raise OptionError(
                f"--conversation {self.conversation} formats models without a chat template; "
                "--chat-template replaces every template: give one of them"
            )

    @classmethod
    def build(cls, **kwargs: Any) -> ScoreOptions:
        """Options from keyword arguments (the Python API's `**load`), unknown names refused."""
        unknown = set(kwargs) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown scoring option(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs)

    @property
    def compute_dtype(self) -> str:
        """The dtype the model computes in: bfloat16 under bitsandbytes, else `dtype`."""
        return "bfloat16" if self.quant is not None else self.dtype

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def model_bytes(self, parameters: int) -> int:
        """About how many bytes `parameters` weights take once loaded."""
        if self.quant == "4bit":
            return parameters // 2 + parameters // 16  # NF4 plus block scales and unquantized layers
        if self.quant == "8bit":
            return parameters + parameters // 16
        return parameters * DTYPE_BYTES[self.dtype]

    def streaming_for(self, parameters: int, label: str) -> tuple[ScoreOptions, str | None]:
        """These options for a model of `parameters` weights: with `stream_layers` switched on
        when the model does not fit `device_memory`, and the line that says so (None when
        nothing changes). The one place that decides it, for eval, bon and sweep.
        """
        need = self.model_bytes(parameters)
        if self.stream_layers or self.device_memory is None or need <= self.device_memory:
            return self, None
        from lazymerge.progress import format_bytes

        stored = f"--quant {self.quant}" if self.quant is not None else self.dtype
        return dataclasses.replace(self, stream_layers=True), (
            f"{label}: {parameters:,} weights take {format_bytes(need)} in {stored}, more than "
            f"--device-memory {format_bytes(self.device_memory)}: scoring layer by layer (--stream-layers)"
        )

    def record(self) -> dict[str, Any]:
        """The settings as JSON values (the chat template by name or file and SHA-256): what a
        report records and a sweep's resume identity compares."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if not self.stream_layers and self.device_memory is None:
            # the same rewards either way; left out when off so that results recorded before
            # the option existed keep their identity (a sweep resumes them)
            del out["stream_layers"], out["max_activations"]
        if self.device_memory is None:
            del out["device_memory"]
        if not self.lm_check:
            del out["lm_check"]  # off: the identity sweeps had before the option existed
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template.record()
        return out
