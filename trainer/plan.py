"""`moe-vlm plan`: will a stage fit? Parameters, memory per GPU, FLOPs and step time of every training stage of a
preset, from the model built on the meta device (shapes, no weights: the 13 B-parameter paper model in about a
second) and the stage's own recipe, before any GPU is rented.

    moe-vlm plan --preset paper [--gpus 8 --gpu-memory 80GB --stage 3 --sharding fsdp|zero3|none
                 --lora_r R --lora_targets experts,attention --activation-checkpointing on|off
                 --mfu 0.4 --peak-tflops 989 --text-tokens T --labelled-tokens L --json]

What is counted, and from where (one source each):

* parameters: `numel` of the meta model (`MoeVlmForCausalLM.from_mistral` on the preset, as Stage 0 builds it);
  active per token: all of them but the experts a token skips (`num_experts - num_experts_per_tok` per MoE layer);
* trainable per stage: the stage Trainer's own `prepare_model` (routing, `trainer.freezing`, PEFT's LoRA) applied
  to the meta model, `requires_grad` counted;
* FLOPs: `trainer.flops.step_flops` on meta tensors of the recipe's batch shape;
* memory per GPU: the analytic model below, checked against a real CPU step of the tiny preset
  (`tests/test_plan.py`, live tensor bytes at every operator).

The memory model, in bytes per GPU at the peak of a steady-state training step (the optimizer states exist):

* weights: every parameter in the recipe's `model_dtype` (fp32: the paper recipes keep fp32 master weights under
  bf16 autocast), divided over the GPUs when sharded; ZeRO-3 stores bf16 weights (DeepSpeed's bf16 mode) and keeps
  fp32 masters of what trains among the optimizer states;
* gradients: fp32 for what trains, sharded. FSDP1 with `use_orig_params` (`fsdp.yaml`) gives a wrap unit's flat
  shard a gradient as a whole when any of its parameters trains (Stage 2: the whole decoder-layer unit), so its
  frozen neighbours cost gradient memory too (FSDP's docstring: mixing frozen and trainable parameters in a unit
  gives "higher than expected gradient memory usage"); ZeRO-3 keeps gradients of trainable parameters only (bf16 partition,
  plus an fp32 copy at the step);
* optimizer states: AdamW's two fp32 moments (torch's AdamW keeps them in the parameter's dtype) of what trains;
  ZeRO-3 adds the fp32 master copy (4 bytes) and the fp32 gradient copy (4 bytes) per trainable parameter;
* gathered weights (sharding only): the FSDP root unit (embeddings, LM head, vision tower, connector, final norm:
  not resharded between forward and backward) and two decoder-layer units (the current one and the one
  `BACKWARD_PRE` prefetches) in the compute dtype, plus one unit's unsharded gradient; ZeRO-3: the same live
  working set (its `stage3_max_live_parameters` in ds_zero3.json is 1e9, above it);
* activations: what autograd saves for the backward, per decoder layer and token (below), plus the loss's
  transient at the start of the backward (log-softmax output, its gradient and the gradient of the logits: three
  fp32 (labelled rows x vocabulary) tensors); with activation checkpointing, each layer's input instead, plus one
  layer recomputed.

The peak is the larger of two moments: the start of the backward (weights, optimizer states, gathered weights,
every saved activation, the loss transient, the gradients of what comes after the last layer) and the optimizer
step (weights, optimizer states, every gradient). The parts printed are those at the peak, so they add up to the
total. Not counted: the CUDA context and allocator fragmentation (about 1 GiB and a few per cent), the DataLoader's
pinned batches, NCCL buffers; so a margin under about 10 % is tight.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from .cli import STAGE_CHOICES

# torch, transformers and the model are imported by the functions that build something, so that a bad flag is
# refused in a blink (`run_command` checks the flags first).

# The stages that train (pretraining has its own two models; Stage 0 only builds one).
TRAINING_STAGES = tuple(s for s in STAGE_CHOICES if s not in ("pretrain", "0"))
SHARDINGS = ("fsdp", "zero3", "none")
SHARDING_NAMES = {
    "fsdp": "FSDP full shard (fsdp.yaml)",
    "zero3": "DeepSpeed ZeRO-3 (ds_zero3.json)",
    "none": "one process / DDP (replicated)",
}
# Text tokens per sample when the recipe sets no max_length: an assumption, stated in the output.
DEFAULT_TEXT_TOKENS = {"coco": 64, "llava": 512, "shapes": 64}
FALLBACK_TEXT_TOKENS = 512
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor cores (NVIDIA's datasheet, without sparsity)
GIB = 2**30
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(TB|TIB|T|GB|GIB|G|MB|MIB|M)\s*$", re.IGNORECASE)
_UNIT = {"T": 2**40, "G": 2**30, "M": 2**20}
_FP32 = 4


class PlanError(ValueError):
    """Bad `moe-vlm plan` input: printed as one line naming the flag."""


# ----- input ------------------------------------------------------------------------------------------------------------


def parse_memory(text: str) -> int:
    """`80GB` / `80GiB` / `141G` / `24000MB` -> bytes. GB is read as GiB (2**30): GPU makers' "80 GB" H100 holds
    80 GiB."""
    match = _MEMORY.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise PlanError(f"--gpu-memory {text!r}: give a size such as 80GB, 80GiB or 24000MB")
    return int(float(match.group(1)) * _UNIT[match.group(2)[0].upper()])


def _positive(flag: str, text, kind=int):
    """`text` as a positive `kind`, or a PlanError naming `flag`."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise PlanError(f"{flag} {text!r}: expected {'a whole' if kind is int else 'a'} number") from None
    if value <= 0:
        raise PlanError(f"{flag} {text!r}: must be > 0")
    return value


# ----- the model on the meta device ---------------------------------------------------------------------------------------


def meta_model(preset: str):
    """The preset's `MoeVlmForCausalLM` on the meta device, built as Stage 0 builds it (`from_mistral` on the
    preset's dense Mistral and vision tower config): every parameter with its shape, none with memory."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from configuration.presets import load_preset
    from modeling_moe_vlm import MoeVlmForCausalLM

    try:
        spec = load_preset(preset)
    except ValueError as error:
        raise PlanError(f"--preset: {error}") from None
    with torch.device("meta"):
        dense = MistralForCausalLM(MistralConfig(**spec["mistral_config"]))
        return MoeVlmForCausalLM.from_mistral(dense, **spec["moe_vlm"])


def parameter_counts(model) -> dict:
    """Total parameters, active per token (one expert of each MoE layer's `num_experts` for top-1: the experts a
    token skips are left out) and the experts a token skips."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    skipped = 0
    for block in model.moe_blocks().values():
        per_expert = sum(p.numel() for p in block.experts.parameters()) // config.num_experts
        skipped += per_expert * (config.num_experts - config.num_experts_per_tok)
    return {"total": total, "active": total - skipped, "skipped_experts": skipped}


def stage_recipe(stage: str, recipe: str | None, lora: dict):
    """The stage's resolved recipe (`trainer.recipes.parse_recipe`, the path `moe-vlm train` takes) with the LoRA
    flags as recipe fields. `use_cpu` only lets TrainingArguments accept bf16 on this machine; nothing runs."""
    from .recipes import parse_recipe

    overrides = ["--use_cpu", "true", "--report_to", "none"]
    for name, value in lora.items():
        if value is not None:
            overrides += [f"--{name}", ",".join(value) if isinstance(value, list) else str(value)]
    return parse_recipe(stage, "moe-vlm-plan", recipe=recipe, overrides=overrides)


def stage_model(preset: str, stage: str, stage_args):
    """The meta model as the stage trains it: the dense control's MLPs (`to_dense`), then the stage Trainer's own
    `prepare_model` (routing, trainable groups, LoRA). Returns (the model whose parameters train, their names, the
    LoRA record: r, alpha and the resolved targets, or None)."""
    import torch

    from .dense import to_dense
    from .stages import STAGE_TRAINERS

    model = meta_model(preset)
    with torch.device("meta"):
        if stage == "dense":
            model = to_dense(model, stage_args.dense_expert)
        _, names, adapter = STAGE_TRAINERS[stage].prepare_model(model, stage_args)
    return model, names, adapter


# ----- memory -------------------------------------------------------------------------------------------------------------


def _bytes(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype, device="meta").element_size()


@dataclass
class Workload:
    """What one GPU processes per micro-batch, and in which precision."""

    batch: int  # per device
    image_tokens: int  # per sample (one image each)
    text_tokens: int  # per sample, padded
    labelled_tokens: float  # per sample (a mean): the LM head's rows (the model computes logits at labelled positions only)
    storage_bytes: int  # model_dtype
    compute_bytes: int  # bf16/fp16 under mixed precision, else storage
    images: int  # per micro-batch

    @property
    def seq(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def rows(self) -> int:
        """Rows of the LM head in the micro-batch."""
        return round(self.batch * self.labelled_tokens)


def _layer_activation_elements(model, index: int, upstream: bool, parts: dict) -> tuple[float, float, bool]:
    """(elements per token in the activation dtype, elements per token in fp32, gradient flows out of the layer)
    that decoder layer `index` saves for the backward. `upstream`: a gradient flows into its input (something
    before it trains). Per saved tensor: a norm saves its fp32 input (and the per-token rsqrt) when its input needs
    a gradient; a linear saves its input when its weight trains; attention (SDPA, flash-style: no seq x seq term)
    saves q, k, v, its output and the log-sum-exp; the o projection its input; a SwiGLU expert (or MLP) saves its
    input, gate and up outputs, SiLU output and product, and an expert's output weighted by a routing weight that
    carries a gradient."""
    config = model.config
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = config.num_key_value_heads * head_dim
    layer = parts["layers"].get(index, {"attn": False, "mlp": False, "router": False})
    act = fp32 = 0.0
    # attention block
    if upstream or layer["attn"]:
        if upstream:
            fp32 += hidden + 1  # input_layernorm: fp32 input, rsqrt
        if layer["attn"]:
            act += hidden  # q/k/v input
        act += hidden + 2 * kv + hidden  # q and k after RoPE, v, SDPA output
        fp32 += heads  # log-sum-exp
        act += hidden if layer["attn"] else 0  # o_proj input
    mid = upstream or layer["attn"]
    is_moe = index in set(getattr(config, "moe_layers", None) or [])
    soft = is_moe and config.router_mode != "hard" and (mid or layer["router"])
    if mid or layer["mlp"] or (is_moe and layer["router"]):
        if mid:
            fp32 += hidden + 1  # post_attention_layernorm
        if is_moe:
            if layer["router"]:
                act += hidden  # router input
            act += hidden + 4 * inter  # dispatched input; gate/up output, SiLU output, product
            act += hidden if soft else 0  # expert output, weighted by a routing weight that has a gradient
        else:
            act += hidden + 4 * inter  # dense MLP
    out = mid or layer["mlp"] or soft
    return act, fp32, out


def activation_bytes(model, work: Workload, checkpointing: bool) -> dict:
    """Bytes autograd holds at the start of the backward: `saved` (per layer, rules in `_layer_activation_elements`;
    with checkpointing, each layer's input plus the largest layer recomputed), `outside` (connector input, final norm,
    LM head input), `loss` (the loss's transient: three fp32 labelled-rows x vocabulary tensors: log-softmax output,
    its gradient, the logits' gradient) and `inputs` (the batch)."""
    from .flops import _trainable_parts

    config = model.config
    parts = _trainable_parts(model)
    tokens, a = work.tokens, work.compute_bytes
    upstream = parts["embed"] or parts["vision"] or parts["connector"]
    per_layer = []
    for index in range(config.num_hidden_layers):
        act, fp32, upstream_out = _layer_activation_elements(model, index, upstream, parts)
        per_layer.append(tokens * (act * a + fp32 * _FP32))
        upstream = upstream or upstream_out
    if checkpointing:
        # Each checkpointed layer keeps its input (the residual stream, in the activation dtype); the backward
        # recomputes one layer at a time, which then holds its full saved set.
        saved = config.num_hidden_layers * tokens * config.hidden_size * a + max(per_layer, default=0)
    else:
        saved = sum(per_layer)
    rows = work.rows
    outside = 0.0
    if parts["connector"] or parts["vision"]:
        width = config.vision_config.feature_width(config.vision_feature_layer)
        outside += work.images * config.num_image_tokens * width * a  # connector input
    if upstream:
        outside += tokens * (config.hidden_size + 1) * _FP32  # final norm
    if parts["head"]:
        outside += rows * config.hidden_size * a  # LM head input
    loss = 3 * rows * config.vocab_size * _FP32
    size = config.vision_config.image_size if config.vision_config is not None else 0
    inputs = (
        work.images * 3 * size * size * _FP32 + 4 * tokens * 8
    )  # pixels; ids, mask, labels, modality (int64)
    return {"saved": saved, "outside": outside, "loss": loss, "inputs": inputs}


def _units(model) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """FSDP wrap units (`fsdp_transformer_layer_cls_to_wrap: MoeVlmDecoderLayer`): per decoder layer (numel, numel
    that trains), and the root unit (everything else)."""
    layers = []
    in_layers = set()
    for layer in model.model.layers:
        params = list(layer.parameters())
        in_layers |= {id(p) for p in params}
        layers.append((sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)))
    rest = [p for p in model.parameters() if id(p) not in in_layers]
    root = (sum(p.numel() for p in rest), sum(p.numel() for p in rest if p.requires_grad))
    return layers, root


# The parts of a `MemoryEstimate` that add up to its total.
MEMORY_PARTS = ("weights", "optimizer", "gathered", "gradients", "activations", "loss_transient", "inputs")


@dataclass
class MemoryEstimate:
    """Bytes per GPU at the peak of a steady-state step; the parts at the peak add up to `total`."""

    sharding: str
    activation_checkpointing: bool
    weights: float
    optimizer: float
    gathered: float  # FSDP / ZeRO-3 unsharded working set (0 without sharding)
    gradients: float  # at the peak
    activations: float  # saved for the backward, at the peak (0 when the peak is the optimizer step)
    loss_transient: float  # at the peak
    inputs: float
    total: float
    peak_at: str  # "backward start" | "optimizer step"
    gradients_all: float  # every gradient, after the backward
    capacity: float = 0.0
    fits: bool = False
    margin: float = 0.0


def memory_estimate(
    model, work: Workload, *, gpus: int, sharding: str, checkpointing: bool, mixed_precision: bool
) -> MemoryEstimate:
    """Bytes per GPU of one training step of `model` (its `requires_grad` says what trains) on `work`, under
    `sharding` over `gpus` (the model in this module's docstring)."""
    n = gpus if sharding != "none" else 1
    layers, root = _units(model)
    total = sum(u[0] for u in layers) + root[0]
    trainable = sum(u[1] for u in layers) + root[1]
    head = model.lm_head.weight.numel() if model.lm_head.weight.requires_grad else 0
    s, c = work.storage_bytes, work.compute_bytes
    if sharding == "zero3":
        # DeepSpeed holds the model in the compute dtype; under bf16 it keeps an fp32 master and an fp32 gradient
        # copy of the trainable partition for the step.
        master = _FP32 if c < _FP32 else 0
        weights = total * c / n
        optimizer = trainable * (2 * _FP32 + master) / n
        grads_all = trainable * (c + master) / n
        grads_head = head * c / n
    else:
        weights = total * s / n
        optimizer = trainable * 2 * s / n  # AdamW moments in the parameter's dtype
        if sharding == "fsdp":
            # use_orig_params: a flat shard has a gradient as a whole when any of its parameters trains.
            graded = sum(u[0] for u in layers if u[1]) + (root[0] if root[1] else 0)
            grads_all = graded * s / n
            grads_head = (root[0] if head else 0) * s / n
        else:
            grads_all = trainable * s
            grads_head = head * s
    gathered = 0.0
    if sharding != "none" and n > 1:
        biggest = max((u[0] for u in layers), default=0)
        biggest_graded = max((u[0] for u in layers if u[1]), default=0)
        gathered = (root[0] + 2 * biggest) * c + max(biggest_graded, root[0] if root[1] else 0) * c
    elif sharding == "none" and mixed_precision:
        # autocast keeps a bf16 copy of every weight it casts for a linear whose output needs a gradient
        gathered = sum(u[0] for u in layers) * c + model.lm_head.weight.numel() * c
    acts = activation_bytes(model, work, checkpointing)
    backward_start = acts["saved"] + acts["outside"] + acts["loss"] + grads_head
    if backward_start >= grads_all:
        peak_at, grads, activations, loss = (
            "backward start",
            grads_head,
            acts["saved"] + acts["outside"],
            acts["loss"],
        )
    else:
        peak_at, grads, activations, loss = "optimizer step", grads_all, 0.0, 0.0
    estimate = MemoryEstimate(
        sharding=sharding,
        activation_checkpointing=checkpointing,
        weights=weights,
        optimizer=optimizer,
        gathered=gathered,
        gradients=grads,
        activations=activations,
        loss_transient=loss,
        inputs=acts["inputs"],
        total=0.0,
        peak_at=peak_at,
        gradients_all=grads_all,
    )
    estimate.total = sum(getattr(estimate, name) for name in MEMORY_PARTS)
    return estimate


# ----- the plan -----------------------------------------------------------------------------------------------------------


@dataclass
class StagePlan:
    stage: str
    recipe: str
    trainable_groups: list[str]
    trainable: int
    lora: dict | None
    batch: int
    gradient_accumulation_steps: int
    seq: int
    image_tokens: int
    text_tokens: int
    labelled_tokens: float
    precision: str
    activation_checkpointing: bool  # the one the fits verdict uses
    flops_per_token: float
    step_flops: float  # per GPU, one optimizer step
    step_seconds: float
    memory: dict[str, dict] = field(default_factory=dict)  # sharding -> {"on": MemoryEstimate, "off": ...}


def _workload(model, recipe, text_tokens: int | None, labelled_tokens: int | None) -> Workload:
    args, training = recipe.stage, recipe.training
    config = model.config
    image = config.num_image_tokens if config.vision_config is not None else 0
    if text_tokens is None:
        text_tokens = (
            max(args.max_length - image, 1)
            if args.max_length
            else DEFAULT_TEXT_TOKENS.get(args.dataset, FALLBACK_TEXT_TOKENS)
        )
    labelled = text_tokens if labelled_tokens is None else labelled_tokens
    if labelled > text_tokens:
        raise PlanError(f"--labelled-tokens {labelled} exceeds the text tokens per sample ({text_tokens})")
    import torch

    storage = _bytes(getattr(torch, args.model_dtype))
    mixed = training.bf16 or training.fp16
    batch = training.per_device_train_batch_size
    return Workload(
        batch=batch,
        image_tokens=image,
        text_tokens=text_tokens,
        labelled_tokens=labelled,
        storage_bytes=storage,
        compute_bytes=2 if mixed else storage,
        images=batch if image else 0,
    )


@dataclass(frozen=True)
class PlanOptions:
    """What a plan is asked, one source for `plan` and `plan_stage` (their keyword arguments): the recipe (default:
    the preset's own), the hardware (`gpus` of `gpu_memory` bytes), the shardings to price, activation
    checkpointing (None: the recipe's), the LoRA flags (`lora_r`, `lora_alpha`, `lora_targets`), the tokens per
    sample (None: the recipe's), and the MFU and peak TFLOP/s the step time assumes."""

    recipe: str | None = None
    gpus: int = 8
    gpu_memory: int = 80 * GIB
    shardings: tuple[str, ...] = ("fsdp", "zero3")
    checkpointing: bool | None = None
    lora: dict | None = None
    text_tokens: int | None = None
    labelled_tokens: int | None = None
    mfu: float = 0.4
    peak_tflops: float = H100_BF16_DENSE_TFLOPS


def plan_stage(preset: str, stage: str, **options) -> StagePlan:
    """The plan of one stage: its trainable count on the meta model, memory per GPU under each sharding (with and
    without activation checkpointing; the verdict uses `checkpointing`, default the recipe's), FLOPs per token
    (`trainer.flops.step_flops`) and the step time at `mfu` of `peak_tflops`. `options`: `PlanOptions`' fields."""
    import torch

    from .flops import step_flops

    asked = PlanOptions(**options)
    recipe, gpus, gpu_memory, mfu = asked.recipe, asked.gpus, asked.gpu_memory, asked.mfu
    lora = asked.lora or {}
    resolved = stage_recipe(stage, recipe, lora)
    model, _, adapter = stage_model(preset, stage, resolved.stage)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    work = _workload(model, resolved, asked.text_tokens, asked.labelled_tokens)
    training = resolved.training
    chosen = training.activation_checkpointing if asked.checkpointing is None else asked.checkpointing
    mixed = bool(training.bf16 or training.fp16)
    batch = {"input_ids": torch.empty(work.batch, work.seq, dtype=torch.long, device="meta")}
    if work.images:
        size = model.config.vision_config.image_size
        batch["pixel_values"] = torch.empty(work.images, 3, size, size, device="meta")
    model.train()
    flops = step_flops(model, batch, rows=work.rows)
    step = flops * training.gradient_accumulation_steps
    memory = {}
    for sharding in asked.shardings:
        estimates = {}
        for key, on in (("on", True), ("off", False)):
            estimate = memory_estimate(
                model, work, gpus=gpus, sharding=sharding, checkpointing=on, mixed_precision=mixed
            )
            estimate.capacity = float(gpu_memory)
            estimate.fits = estimate.total <= gpu_memory
            estimate.margin = gpu_memory - estimate.total
            estimates[key] = estimate
        memory[sharding] = estimates
    lora_record = (
        None if adapter is None else {k: adapter[k] for k in ("r", "alpha", "targets", "fully_trained")}
    )
    return StagePlan(
        stage=stage,
        recipe=str(recipe or "tiny"),
        trainable_groups=list(resolved.stage.trainable),
        trainable=trainable,
        lora=lora_record,
        batch=work.batch,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        seq=work.seq,
        image_tokens=work.image_tokens,
        text_tokens=work.text_tokens,
        labelled_tokens=work.labelled_tokens,
        precision=("bf16" if training.bf16 else "fp16" if training.fp16 else resolved.stage.model_dtype)
        + (f" autocast, {resolved.stage.model_dtype} weights" if mixed else ""),
        activation_checkpointing=bool(chosen),
        flops_per_token=flops / work.tokens,
        step_flops=step,
        step_seconds=step / (mfu * asked.peak_tflops * 1e12),
        memory=memory,
    )


def plan(preset: str = "paper", *, stages: tuple[str, ...] | None = None, **options) -> dict:
    """The whole plan as a JSON-ready dict: the preset's parameter counts and one `StagePlan` per stage of `stages`
    (default: every training stage). `options`: `PlanOptions`' fields, checked here once for all stages."""
    asked = PlanOptions(**options)
    gpus, mfu, peak_tflops = asked.gpus, asked.mfu, asked.peak_tflops
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: must be >= 1")
    unknown = [s for s in asked.shardings if s not in SHARDINGS]
    if unknown:
        raise PlanError(f"--sharding {unknown[0]!r}: choose from {', '.join(SHARDINGS)}")
    stages = stages or TRAINING_STAGES
    bad = [s for s in stages if s not in TRAINING_STAGES]
    if bad:
        raise PlanError(f"--stage {bad[0]!r}: choose one of {', '.join(TRAINING_STAGES)}")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu {mfu}: a fraction in (0, 1]")
    recipe = asked.recipe if asked.recipe is not None else ("paper" if preset == "paper" else None)
    model = meta_model(preset)
    counts = parameter_counts(model)
    per_stage = {**asdict(asked), "recipe": recipe}
    plans = [plan_stage(preset, stage, **per_stage) for stage in stages]
    return {
        "preset": preset,
        "recipe": recipe or "tiny",
        "gpus": gpus,
        "gpu_memory_bytes": asked.gpu_memory,
        "mfu": mfu,
        "peak_tflops": peak_tflops,
        "parameters": counts,
        "stages": [asdict(p) for p in plans],
        "assumptions": assumptions(gpus, mfu, peak_tflops),
    }


def assumptions(gpus: int, mfu: float, peak_tflops: float) -> list[str]:
    """What the numbers take for granted, printed under the table (the module docstring has the whole model)."""
    return [
        "memory: steady-state step (AdamW states allocated), at the larger of the backward start and the optimizer step",
        "AdamW: 2 fp32 moments per trainable parameter; fp32 weights are the masters (FSDP), ZeRO-3 adds fp32 "
        "masters and an fp32 gradient copy to bf16 weights",
        "FSDP1 use_orig_params: a wrap unit with any trainable parameter has a gradient for the whole unit",
        "gathered: root unit + 2 decoder layers (BACKWARD_PRE prefetch) in bf16, + 1 unit's gradient",
        "activations: SDPA flash-style (no seq^2 term); every text token padded to the stated length; one image "
        "per sample; LM head rows = labelled tokens",
        "not counted: CUDA context, allocator fragmentation, NCCL buffers (keep ~10 % margin)",
        f"step time = model FLOPs (trainer.flops, no recompute) / ({mfu:g} MFU x {peak_tflops:g} TFLOP/s per GPU), "
        f"{gpus} GPU(s) in data parallel",
    ]


# ----- output -------------------------------------------------------------------------------------------------------------


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _count(value: float) -> str:
    for scale, suffix in ((1e9, " B"), (1e6, " M"), (1e3, " k")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return str(int(value))


def format_plan(result: dict) -> str:
    """The readable table `moe-vlm plan` prints."""
    counts = result["parameters"]
    capacity = result["gpu_memory_bytes"]
    lines = [
        f"moe-vlm plan: preset {result['preset']}, recipe {result['recipe']}, {result['gpus']} GPU(s) of "
        f"{_gib(capacity)} GiB",
        f"parameters: {counts['total']:,} total ({_count(counts['total'])}), {counts['active']:,} active per token "
        f"({_count(counts['active'])}: one expert per MoE layer; {_count(counts['skipped_experts'])} in the experts "
        "a token skips)",
        "",
    ]
    for stage in result["stages"]:
        ac = "on" if stage["activation_checkpointing"] else "off"
        lora = (
            f" (LoRA r={stage['lora']['r']} on {', '.join(stage['lora']['targets'])}; fully: "
            f"{', '.join(stage['lora']['fully_trained']) or 'none'})"
            if stage["lora"]
            else ""
        )
        lines += [
            f"Stage {stage['stage']}: trains {', '.join(stage['trainable_groups'])}{lora}: "
            f"{stage['trainable']:,} parameters ({_count(stage['trainable'])})",
            f"  per GPU: batch {stage['batch']} x {stage['seq']} tokens ({stage['image_tokens']} image + "
            f"{stage['text_tokens']} text, {stage['labelled_tokens']:g} labelled), {stage['precision']}, "
            f"gradient accumulation {stage['gradient_accumulation_steps']} (global batch "
            f"{stage['batch'] * stage['gradient_accumulation_steps'] * result['gpus']})",
            f"  FLOPs per token {stage['flops_per_token']:.3g}; step {stage['step_flops']:.3g} FLOPs per GPU -> "
            f"{stage['step_seconds']:.2f} s at {result['mfu']:g} MFU of {result['peak_tflops']:g} TFLOP/s",
        ]
        rows = [
            ("weights", "weights"),
            ("optimizer states", "optimizer"),
            ("gathered/cast weights", "gathered"),
            ("gradients (at peak)", "gradients"),
            ("activations (saved)", "activations"),
            ("loss transient", "loss_transient"),
            ("batch", "inputs"),
            ("total", "total"),
        ]
        header = "  {:<24}".format("GiB per GPU") + "".join(
            f"{name + ' AC ' + key:>18}" for name in stage["memory"] for key in ("on", "off")
        )
        lines.append(header)
        for label, key in rows:
            cells = "".join(
                f"{_gib(stage['memory'][name][k][key]):>18}"
                for name in stage["memory"]
                for k in ("on", "off")
            )
            lines.append(f"  {label:<24}{cells}")
        lines.append(
            "  {:<24}".format("peak at")
            + "".join(
                f"{stage['memory'][n][k]['peak_at']:>18}" for n in stage["memory"] for k in ("on", "off")
            )
        )
        for name, estimates in stage["memory"].items():
            chosen = estimates[ac]
            verdict = "FITS" if chosen["fits"] else "DOES NOT FIT"
            share = 100 * chosen["margin"] / capacity
            lines.append(
                f"  Stage {stage['stage']} {verdict} on {result['gpus']} x {_gib(capacity)} GiB under "
                f"{SHARDING_NAMES[name]}, activation checkpointing {ac}: {_gib(chosen['total'])} GiB per GPU, "
                f"margin {_gib(chosen['margin'])} GiB ({share:+.0f} %)"
            )
        lines.append("")
    lines += ["assumptions:"] + [f"  - {a}" for a in result["assumptions"]]
    return "\n".join(lines)


def run_command(args) -> None:
    """`moe-vlm plan`: check the flags (a `PlanError` names the bad one), plan, print the table or the JSON."""
    gpus = _positive("--gpus", args.gpus)
    memory = parse_memory(args.gpu_memory)
    mfu = _positive("--mfu", args.mfu, float)
    peak = _positive("--peak-tflops", args.peak_tflops, float)
    text = None if args.text_tokens is None else _positive("--text-tokens", args.text_tokens)
    labelled = (
        None if args.labelled_tokens is None else _positive("--labelled-tokens", args.labelled_tokens, float)
    )
    lora_r = None if args.lora_r is None else _positive("--lora_r", args.lora_r)
    lora_alpha = None if args.lora_alpha is None else _positive("--lora_alpha", args.lora_alpha, float)
    targets = [t for item in args.lora_targets or () for t in item.split(",") if t] or None
    checkpointing = None if args.activation_checkpointing is None else args.activation_checkpointing == "on"
    if args.activation_checkpointing not in (None, "on", "off"):
        raise PlanError(f"--activation-checkpointing {args.activation_checkpointing!r}: on or off")
    from configuration.presets import PRESETS

    if args.preset not in PRESETS:
        raise PlanError(f"--preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    shardings = tuple(s for item in args.sharding or ("fsdp,zero3",) for s in item.split(",") if s)
    result = plan(
        args.preset,
        stages=tuple(args.stage) if args.stage else None,
        recipe=args.recipe,
        gpus=gpus,
        gpu_memory=memory,
        shardings=shardings,
        checkpointing=checkpointing,
        lora={"lora_r": lora_r, "lora_alpha": lora_alpha, "lora_targets": targets},
        text_tokens=text,
        labelled_tokens=labelled,
        mfu=mfu,
        peak_tflops=peak,
    )
    print(json.dumps(result, indent=2) if args.json else format_plan(result))


__all__ = [
    "MEMORY_PARTS",
    "MemoryEstimate",
    "PlanError",
    "PlanOptions",
    "StagePlan",
    "Workload",
    "activation_bytes",
    "format_plan",
    "memory_estimate",
    "meta_model",
    "parameter_counts",
    "parse_memory",
    "plan",
    "plan_stage",
    "run_command",
    "stage_model",
    "stage_recipe",
]
