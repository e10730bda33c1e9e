"""A merged reward model built in memory, straight from the inputs, with no checkpoint written.

`load_merged_reward_model(inputs, options)` plans the merge exactly as `lazymerge run` does (the
same plan, the same fp32 arithmetic, the same DogeRM recipe: reward head kept, `lm_head`
dropped, embeddings matched by token, appended tokens), then streams each merged tensor into an
empty transformers `*ForSequenceClassification` model: cast to the compute dtype and moved to
the device as it arrives, or quantized as it arrives with `quant`, so host memory holds the
finished model plus about one tensor, never a second copy. Its rewards equal those of
`lazymerge run` followed by `lazymerge eval` of the written folder (bit-identical in the same
dtype without quantization; the tests hold this).

The config and tokenizer files the plan would write beside the weights (a few MB) go to a
temporary folder for transformers to read, and are removed when the model is built.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazymerge._optional import require
from lazymerge.errors import IncompatibleInputsError, InputError, OptionError
from lazymerge.evaluation.layer_stream import (
    is_quantized_weight,
    quantizable,
    quantized_parameter,
    stream_plan,
)
from lazymerge.evaluation.rewards import (
    HeadLayout,
    RewardModel,
    bnb_config,
    check_device,
    compute_dtype,
    head_layout,
    quiet_transformers,
    refuse_remote_code,
    scorer,
)
from lazymerge.io.hf_folder import read_config
from lazymerge.io.reader import Checkpoint
from lazymerge.memory import aligned
from lazymerge.options import MergeOptions, read_paths
from lazymerge.score_options import ScoreOptions

if TYPE_CHECKING:
    from lazymerge.merge.plan import MergePlan


def load_merged_reward_model(
    inputs: Sequence[str | Path],
    options: MergeOptions,
    score: ScoreOptions | None = None,
    *,
    checkpoints: Sequence[Checkpoint] | None = None,
    into: RewardModel | None = None,
    spill_dir: Path | None = None,
    **load: Any,
) -> RewardModel:
    """Merge `inputs` (a reward model and domain models) in memory and load the result.

    Args:
        options: merge options describing exactly one output (one alpha or weight vector).
        score, load: how it is loaded and scored, as in `rewards.load_reward_model`.
        checkpoints: the inputs already opened (a resident sweep's, `resident.ResidentCheckpoint`),
            read instead of opening `inputs` again; left open.
        into: a model built by an earlier call for the same inputs and settings: its parameters
            are overwritten in place with this merge (no model is built), and it is returned.
            Not with `score.quant`: quantized layers are built anew from each merge.
        spill_dir: where a layer-streamed pass spills hidden states past --max-activations.

    Raises:
        OptionError for a sweep of several points; InputError when no input is a reward model;
        the merge's own errors (HeaderError, IncompatibleInputsError, ...).
    """
    from lazymerge.merge.api import open_inputs

    score = score if score is not None else ScoreOptions.build(**load)
    if options.alphas is not None and len(options.alphas) != 1:
        raise OptionError("an in-memory merge builds one model: give one --alpha or one --weights vector")
    options.check_inputs(len(inputs))
    check_device(score)
    if score.stream_layers and checkpoints is not None:
        raise OptionError("--stream-layers reads each layer from the files: not with resident inputs")
    opened = open_inputs(read_paths(inputs, options)) if checkpoints is None else list(checkpoints)
    streamed = False  # with --stream-layers the streamed model owns the checkpoints from there on
    note = None
    try:
        plan, rm_folder = _reward_plan(inputs, options, opened)
        if checkpoints is None:  # resident inputs: the sweep decided before reading them
            score, note = score.streaming_for(plan.parameters, f"{rm_folder} (merged)")
        if score.stream_layers:
            rm = _streamed_merge(plan, opened, score, rm_folder, spill_dir)
            streamed = True
            rm.stream_note = note
            return rm
        layout = head_layout(read_config(rm_folder), plan.tensors.keys(), str(rm_folder))
        if into is not None and score.quant is None:
            _fill(into.model, plan, opened, score, rm_folder, layout)
            return into
        model, tokenizer = _empty_model(plan, rm_folder, score, layout)
        _fill(model, plan, opened, score, rm_folder, layout)
    finally:
        if checkpoints is None and not streamed:
            for ckpt in opened:
                ckpt.close()
    model.eval()
    source = f"{rm_folder} (merged in memory)"
    return scorer(model, tokenizer, score, source, str(rm_folder), last_token=layout.openrlhf)


def _streamed_merge(
    plan: MergePlan,
    opened: Sequence[Checkpoint],
    score: ScoreOptions,
    rm_folder: Path,
    spill_dir: Path | None,
) -> RewardModel:
    """The merged reward model scored layer by layer (`layer_stream.stream_plan`): it owns the
    checkpoints from here on."""
    quiet_transformers()
    _, tokenizer = _config_and_tokenizer(require("transformers"), plan.companion_files, rm_folder)
    quantization = bnb_config(score.quant, score.double_quant) if score.quant is not None else None
    model = stream_plan(plan, opened, score, score.max_activations, spill_dir, quantization)
    return scorer(model, tokenizer, score, f"{rm_folder} (merged layer by layer)", str(rm_folder))


def _reward_plan(
    inputs: Sequence[str | Path], options: MergeOptions, checkpoints: Sequence[Checkpoint]
) -> tuple[MergePlan, Path]:
    """The merge's plan and the reward model's folder (its config and tokenizer files)."""
    from lazymerge.merge.plan import plan_merge

    plan = plan_merge(checkpoints, options, Path("in-memory"))
    if "reward model" not in plan.roles:
        raise InputError(
            f"{inputs[0]}: no input is a reward model (config.json architectures ending in "
            "ForSequenceClassification); an in-memory merge scores a merged reward model"
        )
    rm_input = Path(inputs[plan.roles.index("reward model")])
    rm_folder = rm_input if rm_input.is_dir() else rm_input.parent
    refuse_remote_code(rm_folder)
    return plan, rm_folder


def _empty_model(
    plan: MergePlan, rm_folder: Path, score: ScoreOptions, layout: HeadLayout
) -> tuple[Any, Any]:
    """The reward model with no weights yet (on the meta device; quantizable layers swapped in
    with `score.quant`; one label for OpenRLHF's head) and its tokenizer."""
    transformers = require("transformers")
    accelerate = require("accelerate")
    quiet_transformers()
    config, tokenizer = _config_and_tokenizer(transformers, plan.companion_files, rm_folder)
    if layout.openrlhf:
        config.num_labels = 1  # OpenRLHF's config names no labels; its head has one output
    with accelerate.init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForSequenceClassification.from_config(
            config, dtype=compute_dtype(score), trust_remote_code=False
        )
    if score.quant is not None:
        model = _quantizable(model, score.quant, score.double_quant)
    return model, tokenizer


def _fill(
    model: Any,
    plan: MergePlan,
    checkpoints: Sequence[Checkpoint],
    score: ScoreOptions,
    rm_folder: Path,
    layout: HeadLayout,
) -> None:
    """Stream every merged tensor of `plan` into `model`: into the empty places of a new model,
    or over the parameters of one already filled (copied in place, cast as `.to` casts); an
    OpenRLHF head into `score` (`HeadLayout.rename`)."""
    import torch

    from lazymerge.merge.engine import iter_merged_tensors

    compute, device, quant = compute_dtype(score), score.device, score.quant
    expected = dict(model.named_parameters())
    for merged, tensor in iter_merged_tensors(plan, checkpoints, destination=_in_place(expected, plan)):
        name = layout.rename(merged)
        if name not in expected:
            raise IncompatibleInputsError(
                f"{rm_folder}: merged tensor {name!r} has no place in {type(model).__name__}; "
                "the reward model's config does not describe its weights"
            )
        param = expected[name]
        if not param.is_meta:  # (only without quant: see `into`)
            if tensor.data_ptr() != param.data_ptr():  # else merged straight into it
                with torch.no_grad():
                    param.copy_(tensor.to(compute))  # the same cast as a new model's, into its memory
        else:
            _place(model, name, tensor.to(compute), device, quant)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise IncompatibleInputsError(
            f"{rm_folder}: the merge gives no tensor for {missing[0]!r}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    for buffer_name, buffer in model.named_buffers():
        if buffer.device.type != torch.device(device).type:
            module_name, _, leaf = buffer_name.rpartition(".")
            model.get_submodule(module_name).register_buffer(leaf, buffer.to(device), persistent=False)


def _in_place(params: dict[str, Any], plan: MergePlan) -> Callable[[str, int], memoryview | None]:
    """The merge's destination for each tensor: the bytes of a filled CPU parameter that holds
    the output dtype already (no cast to make), so the merge writes the model in place."""
    from lazymerge.io.dtypes import torch_dtype

    def destination(name: str, nbytes: int) -> memoryview | None:
        param = params.get(name)
        tp = plan.tensors.get(name)
        if (
            param is None
            or tp is None
            or param.is_meta
            or param.device.type != "cpu"
            or not param.is_contiguous()
            or param.dtype != torch_dtype(tp.dtype)
            or param.numel() * param.element_size() != nbytes
        ):
            return None
        import torch

        return memoryview(param.detach().view(-1).view(torch.uint8).numpy()).cast("B")

    return destination


def _config_and_tokenizer(transformers: Any, files: dict[str, bytes], rm_folder: Path) -> tuple[Any, Any]:
    """Load config and tokenizer from the files the plan would write beside the weights."""
    with tempfile.TemporaryDirectory(prefix="lazymerge-in-memory-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        if "config.json" not in files:
            raise InputError(
                f"{rm_folder}: no config.json; an in-memory merge needs the reward model's config"
            )
        try:
            config = transformers.AutoConfig.from_pretrained(tmp, trust_remote_code=False)
            tokenizer = transformers.AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(
                f"{rm_folder}: transformers cannot load its config or tokenizer: {first}"
            ) from None
    return config, tokenizer


def _quantizable(model: Any, quant: str, double_quant: bool) -> Any:
    """Swap the linear layers of an empty model for bitsandbytes ones (the reward head excepted)."""
    return quantizable(model, bnb_config(quant, double_quant))


def _place(model: Any, name: str, tensor: Any, device: str, quant: str | None) -> None:
    """Put one merged tensor into the empty model: moved to the device, or quantized there (as a
    layer-streamed pass quantizes it: `layer_stream.quantized_parameter`)."""
    import torch

    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    param: torch.nn.Parameter
    if is_quantized_weight(module, leaf, quant):
        assert quant is not None
        param = quantized_parameter(module, tensor, quant, device)
    else:
        param = torch.nn.Parameter(aligned(tensor.to(device)), requires_grad=False)
    module._parameters[leaf] = param


def load_merged_tokenizer(
    inputs: Sequence[str | Path],
    options: MergeOptions,
    score: ScoreOptions | None = None,
    **load: Any,
) -> RewardModel:
    """The merged reward model's tokenizer and text format, without its weights (`model` is
    None): what a sweep needs to format and tokenize every text once, before any point."""
    from lazymerge.merge.api import open_inputs
    from lazymerge.merge.plan import plan_merge

    score = score if score is not None else ScoreOptions.build(**load)
    transformers = require("transformers")
    checkpoints = open_inputs(read_paths(inputs, options))
    try:
        plan = plan_merge(checkpoints, options, Path("in-memory"))
    finally:
        for ckpt in checkpoints:
            ckpt.close()
    rm_input = (
        Path(inputs[plan.roles.index("reward model")]) if "reward model" in plan.roles else Path(inputs[0])
    )
    rm_folder = rm_input if rm_input.is_dir() else rm_input.parent
    refuse_remote_code(rm_folder)
    quiet_transformers()
    _, tokenizer = _config_and_tokenizer(transformers, plan.companion_files, rm_folder)
    return scorer(None, tokenizer, dataclasses.replace(score, device="cpu"), str(rm_folder), str(rm_folder))
