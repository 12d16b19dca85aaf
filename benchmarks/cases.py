"""The benchmark sections. Each builder makes its models and inputs once and returns the cases to interleave and
the comparisons (with the issue's targets) to report.

Sections, per preset: the MoE block alone (and the fast pair's router and experts apart) vs the dense MLP and the
naive compute-both block; the training step of the MoE model in every routing mode vs the dense model; generation
with and without router outputs; analysis throughput (the concept-matrix extraction); the Trainer loop vs a bare
PyTorch loop.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.flops import step_flops

from .naive import NaiveBothExpertsBlock
from .presets import BenchPreset, build_config, build_model, generation_prompt, training_batch
from .timing import Case, calibrate

ROUTER_MODES = ("hard", "gumbel", "softmax", "modality_aware")
# transformers' two CPU kernels and ours (`modeling_moe_vlm/experts_kernels.py`: in Python and compiled), all selected
# by name through the experts interface.
KERNELS = ("eager", "grouped_mm", "sorted_top1", "sorted_top1_cpp")
# the fastest pair on CPU at the tiny size: the compiled experts kernel and the compiled router
FAST_KERNEL, FAST_ROUTER = "sorted_top1_cpp", "fused_cpp"
LR = 1e-6  # small: the weights barely move, so every timed step does the same arithmetic


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    compile: bool = False  # also time torch.compile'd models (meant for CUDA)
    quick: bool = False  # smoke run: less work per case (fewer generated tokens, Trainer steps, records)

    @property
    def train_target(self) -> float:
        """MoE / dense training-step time: the issue allows 1.15 on CPU, 1.10 on a GPU."""
        return 1.10 if self.device.type == "cuda" else 1.15

    def batch_size(self, preset: BenchPreset) -> int:
        return preset.cuda_batch_size if self.device.type == "cuda" else preset.batch_size


@dataclass
class Comparison:
    """Report `case` against `baseline` as a time or speed ratio; `target` is `("<=", 1.15)`, `(">=", 0.9)`,
    `("within", (1.7, 2.3))` or None (shown for information)."""

    case: str
    baseline: str
    kind: str = "time"
    target: tuple | None = None


@dataclass
class Section:
    title: str
    cases: list[Case]
    comparisons: list[Comparison]
    info: dict = field(default_factory=dict)
    unit: str = "items"  # what `Case.items` counts, for the throughput column
    warmup: int = 1
    cleanup: list = field(default_factory=list)  # callables run once the section is measured
    # Timed rounds are the preset's, clamped to [min_repeats, max_repeats]: more where rounds are cheap and the
    # ratio is tight (the block), fewer where a round already holds several samples (self-timed loops).
    min_repeats: int | None = None
    max_repeats: int | None = None


# ----- helpers ---------------------------------------------------------------------------------------------------


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes a model keeps alive between steps: parameters, gradients, optimizer state."""
    params = list(model.parameters())
    total = _nbytes(params) + _nbytes(p.grad for p in params if p.grad is not None)
    if optimizer is not None:
        total += _nbytes(v for state in optimizer.state.values() for v in state.values())
    return total


def configure(model, mode: str | None = None, kernel: str | None = None) -> None:
    """Switch the router mode and experts kernel of a model shared by several cases."""
    if mode is not None:
        model.set_router_mode(mode)
    if kernel is not None and model.config._experts_implementation != kernel:
        model.set_experts_implementation(kernel)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _image_mask(preset: BenchPreset, batch_size: int, device) -> torch.Tensor:
    """(batch, seq_len) bool, True at the image placeholders of a `training_batch`."""
    n_image = build_config(preset).num_image_tokens
    mask = torch.zeros(batch_size, preset.seq_len, dtype=torch.bool, device=device)
    mask[:, 1 : 1 + n_image] = True
    return mask


# ----- the MoE block alone ---------------------------------------------------------------------------------------


def _grad_step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, *args):
    """Forward + backward of one block: gradients of the input and of every parameter (not accumulated, so no
    zeroing enters the timing)."""
    return _grads(module, x, module(x, *args), grad_out)


def _grads(module: nn.Module, x: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor):
    """The gradients `_grad_step` computes, of `out` (the block's output, however it was computed): of the input,
    then of every trainable parameter of `module`, in order (None where unused)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(out, [x, *params], grad_out, allow_unused=True)


def _arithmetic_floor(moe, dense, x: torch.Tensor, grad_out: torch.Tensor, mask: torch.Tensor) -> dict:
    """What a top-1 experts kernel built from aten calls pays at the least: `sorted_top1`'s SwiGLU forward +
    written-out backward with no dispatch (no router, no sort or gathers, no autograd), on the dense MLP's weights (all
    rows, one group) and on the two experts' weights (rows already grouped by the hard routing of `mask`). Against
    the dense MLP they show how much of an MoE block's cost is arithmetic and how much is dispatch. Name -> (the
    timed call, the module whose weights it uses)."""
    from modeling_moe_vlm.experts_kernels import grouped_swiglu_backward, grouped_swiglu_forward

    rows = x.detach().reshape(-1, x.size(-1))  # (T, H)
    grads = grad_out.reshape(-1, x.size(-1))  # (T, H)
    image = mask.reshape(-1)
    order = torch.cat([image.nonzero().flatten(), (~image).nonzero().flatten()])  # image rows, then text rows
    roles = moe.gate.config.modality_to_expert
    experts = [roles["image"], roles["text"]]  # the experts of the two groups, in that order
    counts = [int(image.sum()), int((~image).sum())]
    with torch.no_grad():
        dense_gate_up = torch.cat([dense.gate_proj.weight, dense.up_proj.weight])[None]  # (1, 2I, H)
        dense_down = dense.down_proj.weight[None]  # (1, H, I)
        moe_gate_up = moe.experts.gate_up_proj.detach()[experts]  # (2, 2I, H), in `counts` order
        moe_down = moe.experts.down_proj.detach()[experts]  # (2, H, I)
    sorted_rows, sorted_grads = rows[order].contiguous(), grads[order].contiguous()

    def step(xs, gys, counts_, gate_up, down):
        @torch.no_grad()
        def run():
            g, u, act, h, _ = grouped_swiglu_forward(xs, counts_, gate_up, down)
            return grouped_swiglu_backward(gys.clone(), counts_, xs, g, u, act, h, gate_up, down)

        return run

    return {
        "dense MLP arithmetic alone (backward written out)": (
            step(rows, grads, [rows.size(0)], dense_gate_up, dense_down),
            dense,
        ),
        "two experts' arithmetic alone (rows pre-grouped, no dispatch)": (
            step(sorted_rows, sorted_grads, counts, moe_gate_up, moe_down),
            moe,
        ),
    }


def block_halves(block: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, mask: torch.Tensor):
    """The MoE block in its two halves, each timed alone through its own module, so that the bench shows where a
    block's time goes on the machine it runs on: `router()` (the router's forward, then its backward from the gradient
    the experts send its weights, where they carry one) and `experts()` (the experts' forward + backward on one
    routing, drawn once here and held fixed). Between them they compute the block's gradients (tests/test_bench.py:
    the hidden states' gradient is the sum of theirs), so the block's time minus theirs is what joining them costs:
    autograd summing the hidden states' two gradients, and the memory traffic of one working set instead of two.
    Built in the routing mode and kernels the block's config holds now."""
    flat = x.detach().reshape(-1, x.size(-1)).requires_grad_(True)  # (T, H)
    grads = grad_out.reshape(-1, x.size(-1))  # (T, H)
    is_image = mask.reshape(-1)  # (T,)
    _, weights, index = block.gate(flat, is_image)  # one routing (T, 1) each, held fixed for the experts
    soft = weights.requires_grad  # the router's gradient flows through the weights (gumbel, softmax, ...)
    weights = weights.detach().requires_grad_(soft)
    experts_inputs = [flat, *([weights] if soft else []), *block.experts.parameters()]
    router_inputs = [flat, *(p for p in block.gate.parameters() if p.requires_grad)]

    def experts():
        return torch.autograd.grad(block.experts(flat, index, weights), experts_inputs, grads)

    into_weights = experts()[1] if soft else None  # (T, 1): what the experts send the router

    def router():
        _, routed, _ = block.gate(flat, is_image)
        if not soft:
            return None  # a router without gradient (hard, eval): its forward is all the block runs of it
        return torch.autograd.grad(routed, router_inputs, into_weights, allow_unused=True)

    return router, experts


def block_direct(block: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, mask: torch.Tensor):
    """The fast pair's block (`FAST_ROUTER` + `FAST_KERNEL`) with no modules: one call of each compiled kernel on the
    arguments the block's modules would pass them, prepared once here (`fused_route_arguments`), then the block's
    backward, as `_grad_step` computes it (tests/test_bench.py). Beside the block, it shows what the Python around the
    kernels costs (`MoeVlmRouter`, `fused_route`, transformers' experts dispatch, `_call_top1`); beside the halves,
    what joining the two kernels costs. Built in the routing mode the block's config holds now; for modes whose
    arguments hold no graph and no random draw (hard, gumbel and softmax without router dropout): a dropout mask or
    `modality_aware`'s learned term computed once would be reused by every call."""
    from modeling_moe_vlm.cpp_kernels import compiled
    from modeling_moe_vlm.router_kernels import fused_route_arguments

    flat = x.detach().reshape(-1, x.size(-1))  # (T, H), only to prepare the arguments
    is_image = mask.reshape(-1)  # (T,)
    weight, offset, drop, *rest = fused_route_arguments(block.gate, flat, is_image)
    if offset is not None or drop is not None:
        raise ValueError(
            f"block_direct times routing modes without dropout or a modality term; router_mode="
            f"{block.gate.config.router_mode!r}, router_dropout={block.gate.config.router_dropout}"
        )
    kernels = compiled()
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj

    def step():
        hidden = x.reshape(-1, x.size(-1))  # (T, H), in the graph as the block's reshape is
        _, weights, index = kernels.route_top1(hidden, weight, offset, drop, *rest)  # (T, 1) each
        out = kernels.sorted_top1(hidden, index, weights, gate_up, down).reshape(x.shape)
        return _grads(block, x, out, grad_out)  # as `_grad_step` takes them

    return step


def block_section(preset: BenchPreset, settings: Settings) -> Section:
    """The MoE block (router + experts) vs the dense SwiGLU MLP vs the naive compute-both-experts block, forward
    + backward on the hidden states of one training batch, for each experts kernel and two routing modes; and the
    fast pair's block as its two kernels called directly (`block_direct`) and in its two halves (`block_halves`),
    so the table shows where the block's time goes here: arithmetic, the router, joining, the modules' Python."""
    from transformers.models.mistral.modeling_mistral import MistralMLP

    from modeling_moe_vlm.modeling_moe_vlm import MoeVlmSparseMoeBlock

    device, dtype = settings.device, settings.dtype
    config = build_config(preset)
    batch_size = settings.batch_size(preset)
    torch.manual_seed(0)
    moe, dense = MoeVlmSparseMoeBlock(config), MistralMLP(config)
    with torch.no_grad():
        for p in [*moe.parameters(), *dense.parameters()]:
            p.normal_(0.0, config.initializer_range)
    moe, dense = moe.to(device, dtype).train(), dense.to(device, dtype).train()
    naive = NaiveBothExpertsBlock(moe)
    x = torch.randn(batch_size, preset.seq_len, config.hidden_size, device=device, dtype=dtype)
    x.requires_grad_(True)
    grad_out = torch.randn_like(x)
    mask = _image_mask(preset, batch_size, device)

    def setup(mode: str, kernel: str, router: str = "eager"):
        def before():
            config.router_mode = mode
            config._experts_implementation = kernel
            config.router_implementation = router

        return before

    # Small blocks take milliseconds: each sample is a group of `number` calls lasting >= 50 ms (the same
    # group size for every case, calibrated on the dense MLP).
    number = calibrate(lambda: _grad_step(dense, x, grad_out), device, 0.02 if settings.quick else 0.05)

    def repeated(module, *args):
        return lambda: [_grad_step(module, x, grad_out, *args) for _ in range(number)]

    tokens = batch_size * preset.seq_len * number
    resident = lambda: resident_bytes(moe)  # noqa: E731 - same for every MoE case
    cases = [Case("dense MLP", repeated(dense), items=tokens, resident=lambda: resident_bytes(dense))]
    cases.append(
        Case(
            "naive both experts (hard)",
            repeated(naive, mask),
            before=setup("hard", "eager"),
            items=tokens,
            resident=resident,
        )
    )
    comparisons = [Comparison("naive both experts (hard)", "dense MLP", target=("within", (1.7, 2.3)))]
    for name, (arithmetic, module) in _arithmetic_floor(moe, dense, x, grad_out, mask).items():
        holds = lambda m=module: resident_bytes(m)  # noqa: E731
        cases.append(
            Case(name, lambda f=arithmetic: [f() for _ in range(number)], items=tokens, resident=holds)
        )
        comparisons.append(Comparison(name, "dense MLP"))
    for mode in ("hard", "gumbel"):
        # every experts kernel with the eager router, then the compiled kernels together (the router compiled too:
        # `router_implementation="fused_cpp"`, modeling_moe_vlm/router_kernels.py)
        for kernel, router in [*((k, "eager") for k in KERNELS), (FAST_KERNEL, FAST_ROUTER)]:
            name = f"MoE block {mode} [{kernel}" + (f", router {router}]" if router != "eager" else "]")
            cases.append(
                Case(
                    name,
                    repeated(moe, mask),
                    before=setup(mode, kernel, router),
                    items=tokens,
                    resident=resident,
                )
            )
            comparisons.append(Comparison(name, "dense MLP", target=("<=", 1.10)))
        # the fast pair's two kernels called directly (`block_direct`): the block minus them is the modules' Python.
        # Built on the first timed call, after `before` has set the mode (a build error is then that case's error).
        direct = functools.cache(functools.partial(block_direct, moe, x, grad_out, mask))
        cases.append(
            Case(
                f"{mode}: the two kernels called directly (no modules)",
                lambda direct=direct: [direct()() for _ in range(number)],
                before=setup(mode, FAST_KERNEL, FAST_ROUTER),
                items=tokens,
                resident=resident,
            )
        )
        comparisons.append(Comparison(cases[-1].name, "dense MLP"))
        # the fast pair's block in its halves, each alone (`block_halves`): the direct call minus the two is the
        # joining. Built on the first timed call, as above.
        halves = functools.cache(functools.partial(block_halves, moe, x, grad_out, mask))
        for i, name in enumerate(
            (
                f"{mode}: the router alone ({FAST_ROUTER})",
                f"{mode}: the experts alone ({FAST_KERNEL}, routing held)",
            )
        ):
            cases.append(
                Case(
                    name,
                    lambda i=i, halves=halves: [halves()[i]() for _ in range(number)],
                    before=setup(mode, FAST_KERNEL, FAST_ROUTER),
                    items=tokens,
                    resident=resident,
                )
            )
            comparisons.append(Comparison(name, "dense MLP"))
    info = {
        "input": f"({batch_size}, {preset.seq_len}, {config.hidden_size}) hidden states, forward + backward, "
        f"{number} calls per sample",
        "image_tokens_per_sample": config.num_image_tokens,
    }
    return Section("MoE block vs dense MLP", cases, comparisons, info, unit="tokens", min_repeats=7)


# ----- training step ---------------------------------------------------------------------------------------------


def _train_step(model, optimizer, batch: dict) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _optimizer(model) -> torch.optim.Optimizer:
    """Fused AdamW over the trainable parameters, its state already allocated: a step then costs (and holds)
    what it does in a long run, and the first measured step is not the one that creates the state. Fused: on
    this CPU it steps the mid model's 160M parameters in 0.26 s where the default for-loop AdamW takes 1.6 s."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: only the state is created (and weight decay moves nothing visible)
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def train_section(preset: BenchPreset, settings: Settings, kernel: str) -> Section:
    """Forward + backward + AdamW step of the MoE model in each routing mode (experts kernel `kernel`; where the
    preset asks, `hard` with the other kernel too) vs the dense model of the same active size, on the same image +
    text batch; with `settings.compile`, both models compiled as well."""
    device, dtype = settings.device, settings.dtype
    batch_size = settings.batch_size(preset)
    batch = training_batch(preset, batch_size, device, dtype)
    dense = build_model(preset, dense=True, device=device, dtype=dtype).train()
    moe = build_model(preset, dense=False, device=device, dtype=dtype).train()
    dense_opt, moe_opt = _optimizer(dense), _optimizer(moe)
    flops = step_flops(dense, batch)
    tokens = batch["input_ids"].numel()

    def moe_case(name: str, mode: str, kernel_: str, model=moe) -> Case:
        return Case(
            name,
            lambda: _train_step(model, moe_opt, batch),
            before=lambda: configure(moe, mode, kernel_),
            items=tokens,
            flops=flops,
            resident=lambda: resident_bytes(moe, moe_opt),
        )

    cases = [
        Case(
            "dense",
            lambda: _train_step(dense, dense_opt, batch),
            items=tokens,
            flops=flops,
            resident=lambda: resident_bytes(dense, dense_opt),
        )
    ]
    comparisons = []
    for mode in ROUTER_MODES:
        cases.append(moe_case(f"MoE {mode} [{kernel}]", mode, kernel))
        comparisons.append(Comparison(cases[-1].name, "dense", target=("<=", settings.train_target)))
    if preset.step_kernel_check:  # the other experts kernels, at the level of a whole step
        for other in (k for k in KERNELS if k != kernel):
            cases.append(moe_case(f"MoE hard [{other}]", "hard", other))
            comparisons.append(Comparison(cases[-1].name, "dense"))
    warmup = 1
    if settings.compile:
        compiled_dense, compiled_moe = torch.compile(dense), torch.compile(moe)
        cases.append(
            Case(
                "dense compiled",
                lambda: _train_step(compiled_dense, dense_opt, batch),
                items=tokens,
                flops=flops,
                resident=lambda: resident_bytes(dense, dense_opt),
            )
        )
        cases.append(moe_case(f"MoE hard [{kernel}] compiled", "hard", kernel, model=compiled_moe))
        comparisons += [
            Comparison("dense compiled", "dense"),
            Comparison(cases[-1].name, "dense compiled", target=("<=", settings.train_target)),
        ]
        warmup = 2  # the first call compiles
    info = {
        "batch": f"{batch_size} x {preset.seq_len} tokens ({build_config(preset).num_image_tokens} image tokens "
        f"+ text per sample), labels on {int((batch['labels'][:, 1:] != -100).sum())} positions",
        "optimizer": f"AdamW (fused) lr={LR}",
        "model_flops_per_step": flops,
        "params_dense": sum(p.numel() for p in dense.parameters()),
        "params_moe": sum(p.numel() for p in moe.parameters()),
    }
    return Section(
        "Training step (forward + backward + optimizer)", cases, comparisons, info, "tokens", warmup
    )


# ----- generation ------------------------------------------------------------------------------------------------


def generation_section(preset: BenchPreset, settings: Settings, kernel: str) -> Section:
    """Greedy generation with the KV cache: dense, MoE, and MoE returning router outputs at every step."""
    device, dtype = settings.device, settings.dtype
    batch_size = settings.batch_size(preset)
    prompt = generation_prompt(preset, batch_size, device, dtype)
    dense = build_model(preset, dense=True, device=device, dtype=dtype).eval()
    moe = build_model(preset, dense=False, device=device, dtype=dtype).eval()
    configure(moe, kernel=kernel)
    n = preset.new_tokens // 2 if settings.quick else preset.new_tokens

    def generate(model, **extra):
        # min_new_tokens: never stop early at EOS, so every call generates the same number of tokens.
        return model.generate(
            **prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **extra
        )

    items = batch_size * n
    cases = [
        Case("dense", lambda: generate(dense), items=items, resident=lambda: resident_bytes(dense)),
        Case(f"MoE [{kernel}]", lambda: generate(moe), items=items, resident=lambda: resident_bytes(moe)),
        Case(
            f"MoE [{kernel}] + router outputs",
            lambda: generate(moe, output_router_logits=True),
            items=items,
            resident=lambda: resident_bytes(moe),
        ),
    ]
    comparisons = [
        Comparison(cases[2].name, cases[1].name, kind="speed", target=(">=", 0.9)),
        Comparison(cases[1].name, "dense", kind="speed"),
    ]
    info = {
        "prompt": f"{batch_size} prompts x {prompt['input_ids'].shape[1]} tokens (image + text)",
        "generated": f"{n} tokens per prompt, greedy, KV cache",
        "router_mode": moe.config.router_mode,
    }
    return Section("Generation (KV cache)", cases, comparisons, info, unit="tokens", max_repeats=5)


# ----- analysis throughput ---------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}


def probe_records(n_per_concept: int, image_size: int) -> list[dict]:
    """Balanced concept-probe records (image + caption + concept), a coloured disc per colour concept."""
    from PIL import Image, ImageDraw

    records = []
    for i in range(n_per_concept):
        for name, rgb in COLOURS.items():
            image = Image.new("RGB", (image_size, image_size), "white")
            r = image_size * (0.2 + 0.05 * (i % 4))
            c = image_size / 2
            ImageDraw.Draw(image).ellipse([c - r, c - r, c + r, c + r], fill=rgb)
            records.append({"image": image, "caption": f"A {name} circle.", "concept": name})
    return records


def concept_matrices_of(model, processor, records: list[dict], batch_size: int):
    """The analysis pipeline's concept-matrix extraction (as `analysis.run.concept_analysis` does it): probe
    states of every record, grouped per concept, one (C, C) visual-vs-textual cosine matrix per layer."""
    from analysis.extract import concept_labels, probe_states
    from analysis.similarity import concept_matrices, group_concepts

    states = probe_states(model, processor, records, batch_size=batch_size)
    names, labels = concept_labels(records, "concept")
    layers = range(states["visual"].shape[0])
    visual = [group_concepts(states["visual"][i], labels, len(names)).mean(1) for i in layers]
    textual = [group_concepts(states["textual"][i], labels, len(names)).mean(1) for i in layers]
    return concept_matrices(visual, textual)  # (L+1, C, C)


def analysis_section(preset: BenchPreset, settings: Settings, kernel: str) -> Section:
    """Images + captions per second through the concept-matrix extraction, MoE vs dense."""
    from configuration import build_processor

    n_per_concept = 2 if settings.quick else 4
    device, dtype = settings.device, settings.dtype
    processor = build_processor(build_config(preset))
    records = probe_records(n_per_concept, build_config(preset).vision_config.image_size)
    dense = build_model(preset, dense=True, device=device, dtype=dtype).eval()
    moe = build_model(preset, dense=False, device=device, dtype=dtype).eval()
    configure(moe, kernel=kernel)
    batch_size = len(records) // 2
    # The pipeline as it is, and as proposed: `probe_states` needs hidden states only, yet the model computes
    # logits over the 32k vocabulary at every position unless told `logits_to_keep=1`.
    proposed = build_model(preset, dense=False, device=device, dtype=dtype).eval()
    configure(proposed, kernel=kernel)
    proposed.forward = functools.partial(proposed.forward, logits_to_keep=1)
    models = {
        "dense": dense,
        f"MoE [{kernel}]": moe,
        f"MoE [{kernel}], logits_to_keep=1 (proposed)": proposed,
    }
    cases = [
        Case(
            name,
            lambda m=model: concept_matrices_of(m, processor, records, batch_size),
            items=len(records),
            resident=lambda m=model: resident_bytes(m),
        )
        for name, model in models.items()
    ]
    info = {
        "records": f"{len(records)} (image + caption) records, {len(COLOURS)} concepts, batches of {batch_size}",
        "pipeline": "analysis.extract.probe_states -> analysis.similarity.group_concepts / concept_matrices",
    }
    comparisons = [
        Comparison(cases[1].name, "dense", kind="speed"),
        Comparison(cases[2].name, cases[1].name, "speed"),
    ]
    return Section(
        "Analysis (concept-matrix extraction)", cases, comparisons, info, unit="records", max_repeats=5
    )


# ----- Trainer vs bare loop --------------------------------------------------------------------------------------


def _bare_loop(model, optimizer, batches: list[dict], max_grad_norm: float) -> list[float]:
    """The loop a person writes by hand; returns the seconds between consecutive step ends (so the first
    step's start-up is left out exactly as it is for the Trainers)."""
    import time

    from .timing import synchronize

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ends = []
    for batch in batches:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(batch["input_ids"].device)
        ends.append(time.perf_counter())
    return [b - a for a, b in zip(ends, ends[1:])]


def _quiet(trainer) -> None:
    """Drop the callbacks that print the end-of-training metrics (they would interleave with the report)."""
    from transformers import PrinterCallback, ProgressCallback

    for callback in list(trainer.callback_handler.callbacks):
        if isinstance(callback, (PrinterCallback, ProgressCallback)):
            trainer.remove_callback(callback)


def _stage_trainer(model, args, dataset, collator):
    """The project's Stage 3 Trainer (router + attention + experts train, straight-through Gumbel, router
    statistics every step): constructing it configures the model (freezing, routing) for all three cases."""
    from trainer.recipes import StageArguments
    from trainer.stages import UnifiedFinetuneTrainer

    return UnifiedFinetuneTrainer(
        model=model,
        args=args,
        stage_args=StageArguments(stage="3"),
        train_dataset=dataset,
        data_collator=collator,
    )


def trainer_section(preset: BenchPreset, settings: Settings, kernel: str) -> Section:
    """The project's stage Trainer and plain `transformers.Trainer` vs a bare PyTorch loop: same model, same
    trainable parameters, same batches, AdamW and clipping. Per-step seconds (between consecutive step ends), so
    the one-off start-up of `train()` is reported apart."""
    import tempfile
    import time

    from transformers import Trainer, TrainerCallback, TrainingArguments

    from .timing import synchronize

    device, dtype = settings.device, settings.dtype
    steps = 4 if settings.quick else 6
    batch = training_batch(preset, settings.batch_size(preset), device, dtype)
    moe = build_model(preset, dense=False, device=device, dtype=dtype).train()
    configure(moe, kernel=kernel)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.ends.append(time.perf_counter())

    clock = StepClock()
    out_dir = tempfile.TemporaryDirectory(prefix="moe-vlm-bench-")
    args = TrainingArguments(
        output_dir=out_dir.name,
        max_steps=steps,
        per_device_train_batch_size=1,  # one dataset item = one ready batch
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        optim="adamw_torch_fused",  # the bare loop's optimizer
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        use_cpu=device.type == "cpu",
        seed=0,
    )
    dataset, collator = [batch] * steps, lambda items: items[0]
    trainers, errors = {}, {}
    try:  # first: it sets the stage's freezing and routing on the model the other cases then share
        trainers["stage 3 Trainer (trainer.stages)"] = _stage_trainer(moe, args, dataset, collator)
    except Exception as error:  # the project's trainer may be missing or changed: report it, keep the rest
        errors["stage 3 Trainer (trainer.stages)"] = f"{type(error).__name__}: {error}"
    trainers["transformers.Trainer"] = Trainer(
        model=moe, args=args, train_dataset=dataset, data_collator=collator
    )
    bare_opt = _optimizer(moe)
    startup: dict[str, list[float]] = {name: [] for name in trainers}

    def trainer_steps(name: str) -> list[float]:
        if name in errors:
            raise RuntimeError(errors[name])
        clock.ends.clear()
        start = time.perf_counter()
        trainers[name].train()
        startup[name].append(time.perf_counter() - start - (clock.ends[-1] - clock.ends[0]))
        return [b - a for a, b in zip(clock.ends, clock.ends[1:])]

    for trainer in trainers.values():
        trainer.add_callback(clock)
        _quiet(trainer)
    resident = lambda: resident_bytes(moe, bare_opt)  # noqa: E731 - the same model for every case
    bare = "bare PyTorch loop"
    cases = [
        Case(
            bare, lambda: _bare_loop(moe, bare_opt, [batch] * steps, 1.0), resident=resident, self_timed=True
        )
    ]
    comparisons = []
    for name in [*trainers, *errors]:
        cases.append(Case(name, lambda n=name: trainer_steps(n), resident=resident, self_timed=True))
        comparisons.append(Comparison(name, bare, kind="speed", target=(">=", 0.9)))
    info = {
        "steps_per_round": steps,
        "per_step": "seconds between consecutive step ends: forward, backward, clipping, AdamW, zero_grad, and for "
        "the Trainers their data loading, callbacks and bookkeeping (the stage Trainer also records routing "
        "statistics every step)",
        "trainer_startup_s": startup,  # filled while the section runs: train() time outside the steps
        "router_mode": moe.config.router_mode,
        "trainable_params": sum(p.numel() for p in moe.parameters() if p.requires_grad),
    }
    section = Section(
        "Trainer vs bare loop (per step)", cases, comparisons, info, unit="steps", max_repeats=3
    )
    section.cleanup.append(out_dir.cleanup)
    return section
