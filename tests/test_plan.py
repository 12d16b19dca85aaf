"""`moe-vlm plan`: its parameter counts are the meta-device model's, its trainable counts the stage Trainer's own
freezing, its tiny-preset memory prediction is within 25 % of a measured CPU training step, bad flags exit 2 naming
the flag, and the paper answer for Stage 3 on 8 x 80 GB adds up."""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from trainer import plan as planning
from trainer.freezing import apply_trainable

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 0.25  # the issue's: predicted peak within 25 % of the measured one
ACTIVATION_TOLERANCE = 0.10  # ours, on the part of the peak the activation model predicts


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """`moe-vlm plan ARGS` in this process (the console script's `main`): exit status, stdout, stderr."""
    from moe_vlm_cli import main

    capsys.readouterr()
    status = main(["plan", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(scope="module")
def paper_plan():
    """The paper plan as `--json` gives it (every training stage, FSDP and ZeRO-3, 8 x 80 GB)."""
    return json.loads(json.dumps(planning.plan("paper", gpus=8, gpu_memory=planning.parse_memory("80GB"))))


# ----- (a) parameter counts ---------------------------------------------------------------------------------------------


def _expert_numel(model) -> int:
    """One expert's parameters in one MoE layer, from the stacked tensors' shapes."""
    block = next(iter(model.moe_blocks().values()))
    return sum(p.numel() for p in block.experts.parameters()) // model.config.num_experts


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_parameter_counts_are_the_meta_models(preset, paper_plan):
    model = planning.meta_model(preset)
    assert all(p.device.type == "meta" for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    counts = (
        paper_plan["parameters"] if preset == "paper" else planning.plan("tiny", stages=("2",))["parameters"]
    )
    assert counts["total"] == total
    # Active per token: total minus the one expert (of two) each MoE layer's token skips.
    assert counts["active"] == total - len(model.config.moe_layers) * _expert_numel(model)
    assert counts["active"] < counts["total"]
    if preset == "paper":  # Mistral-7B's decoder with a second expert per layer, ViT-L/14, connector
        assert 13.0e9 < total < 13.4e9 and 7.4e9 < counts["active"] < 7.7e9


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_trainable_counts_follow_the_stages_own_freezing(preset, paper_plan, tmp_path):
    """Each stage's trainable count equals the model after `trainer.freezing.apply_trainable` with the recipe's groups,
    on a model set to the recipe's router mode (the Trainer's path, written out here independently of it)."""
    result = paper_plan if preset == "paper" else planning.plan("tiny")
    recipe = "paper" if preset == "paper" else None
    assert [s["stage"] for s in result["stages"]] == list(planning.TRAINING_STAGES)
    for stage in result["stages"]:
        resolved = planning.stage_recipe(stage["stage"], recipe, {}).stage
        model = planning.meta_model(preset)
        if stage["stage"] == "dense":
            from trainer.dense import to_dense

            with torch.device("meta"):
                model = to_dense(model)
        if resolved.router_mode is not None:
            model.set_router_mode(resolved.router_mode)
        names = set(apply_trainable(model, resolved.trainable))
        expected = sum(p.numel() for n, p in model.named_parameters() if n in names)
        assert stage["trainable"] == expected, stage["stage"]
        assert stage["trainable_groups"] == list(resolved.trainable)
    by_stage = {s["stage"]: s["trainable"] for s in result["stages"]}
    assert 0 < by_stage["2.5"] < by_stage["2"] < by_stage["3"] < result["parameters"]["total"]


def test_lora_trains_exactly_the_adapters_peft_adds():
    """With --lora_r, trainable = PEFT's adapters (r x (in + out) per adapted linear; per expert for the stacked
    experts) plus the fully trained router copies, counted on the meta model."""
    result = planning.plan(
        "tiny", stages=("3",), lora={"lora_r": 4, "lora_targets": ["experts", "attention"]}
    )
    stage = result["stages"][0]
    model = planning.meta_model("tiny")
    config = model.config
    hidden, inter, experts = config.hidden_size, config.intermediate_size, config.num_experts
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    r = 4
    attention = r * ((hidden + hidden) + 2 * (hidden + kv) + (hidden + hidden))  # q, k, v, o
    stacked = experts * r * ((hidden + 2 * inter) + (inter + hidden))  # gate_up (H -> 2I), down (I -> H)
    router = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.0.mlp.gate.weight")
    )
    layers = config.num_hidden_layers
    assert stage["trainable"] == layers * (attention + stacked + router)
    assert stage["lora"]["r"] == r
    full = planning.plan("tiny", stages=("3",))["stages"][0]
    assert full["memory"]["fsdp"]["off"]["optimizer"] > 10 * stage["memory"]["fsdp"]["off"]["optimizer"]


# ----- (b) predicted against measured peak --------------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages, and their peak, seen at every operator: each storage an operator returns is
    counted once, from then until it is freed (a weakref finalizer on the storage). Views share their storage, so
    they cost nothing. What it does not see: memory a kernel allocates and frees inside itself, and the
    Python / torch runtime (which is why not RSS)."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()
        for tensor in existing:
            self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        self.peak = max(self.peak, self.live)
        return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from training_helpers import make_shapes

    from configuration.presets import load_preset

    size = load_preset("tiny")["moe_vlm"]["vision_config"]["vision_cfg"]["image_size"]
    return make_shapes(tmp_path_factory.mktemp("plan") / "shapes", image_size=size)


def _measure_stage(stage: str, shapes: Path, tmp_path: Path) -> dict:
    """Two real training steps (the stage Trainer, the tiny recipe's batch size, fp32 on CPU) on one batch of the
    Shapes world repeated, so both steps see the same shapes; the peak of live tensor bytes over them (the second
    step is the steady state: AdamW's states exist from the first) and the batch's shape."""
    from transformers import MistralConfig, MistralForCausalLM

    from configuration.presets import load_preset
    from configuration.tokenizer import build_processor
    from modeling_moe_vlm import MoeVlmForCausalLM
    from trainer.data import MoeVlmCollator
    from trainer.recipes import parse_recipe
    from trainer.stage_data import load_split
    from trainer.stages import STAGE_TRAINERS

    spec = load_preset("tiny")
    torch.manual_seed(0)
    dense = MistralForCausalLM(MistralConfig(**spec["mistral_config"]))
    model = MoeVlmForCausalLM.from_mistral(dense, **spec["moe_vlm"])
    processor = build_processor(model.config)
    overrides = {
        "dataset": shapes,
        "max_steps": 2,
        "save_strategy": "no",
        "report_to": "none",
        "routing_probe_split": "none",
        "logging_steps": 100,
        "disable_tqdm": "true",
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,
    }
    recipe = parse_recipe(
        stage, tmp_path / "out", overrides=[x for k, v in overrides.items() for x in (f"--{k}", str(v))]
    )
    args, training = recipe.stage, recipe.training
    training.remove_unused_columns = False
    batch_size = training.per_device_train_batch_size
    records = load_split(args, args.train_split, model.config.vision_config.image_size)
    records = records.select(list(range(batch_size)) * 2)  # the same batch twice
    collator = MoeVlmCollator(processor, max_length=args.max_length)
    batch = collator([records[i] for i in range(batch_size)])
    trainer = STAGE_TRAINERS[stage](
        model=model,
        args=training,
        stage_args=args,
        train_dataset=records,
        data_collator=collator,
        processing_class=processor,
    )
    tracker = LiveTensorBytes(*model.parameters(), *model.buffers())
    with tracker:
        trainer.train()
    assert trainer.state.global_step == 2
    image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum()) // batch_size
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    return {
        "peak": tracker.peak,
        "batch": batch_size,
        "image_tokens": image_tokens,
        "text_tokens": batch["input_ids"].shape[1] - image_tokens,
        "labelled_tokens": labelled / batch_size,
    }


@pytest.mark.parametrize("stage", ["3", "2"])
def test_tiny_predicted_peak_is_within_25_percent_of_a_measured_cpu_step(stage, shapes, tmp_path):
    measured = _measure_stage(stage, shapes, tmp_path)
    result = planning.plan(
        "tiny",
        stages=(stage,),
        gpus=1,
        shardings=("none",),
        text_tokens=measured["text_tokens"],
        labelled_tokens=measured["labelled_tokens"],
    )
    plan = result["stages"][0]
    assert plan["batch"] == measured["batch"] and plan["image_tokens"] == measured["image_tokens"]
    assert not plan["activation_checkpointing"]  # the tiny recipes: fp32, no checkpointing
    predicted = plan["memory"]["none"]["off"]
    ratio = predicted["total"] / measured["peak"]
    parts = {k: round(predicted[k] / 2**20, 2) for k in planning.MEMORY_PARTS}
    message = (
        f"Stage {stage}, tiny, fp32 CPU, batch {measured['batch']} x ({measured['image_tokens']} image + "
        f"{measured['text_tokens']} text tokens, {measured['labelled_tokens']:.2f} labelled): predicted peak "
        f"{predicted['total'] / 2**20:.2f} MiB (parts MiB {parts}, at {predicted['peak_at']}), measured peak of live "
        f"tensor bytes {measured['peak'] / 2**20:.2f} MiB over two Trainer steps: ratio {ratio:.3f}"
    )
    print(message)
    assert abs(ratio - 1) <= TOLERANCE, message
    # Weights, optimizer states and the batch are exact byte counts; what the step adds over them is the activation
    # model's (saved tensors, the loss transient, gradients at the peak). At the tiny size the LM head's loss transient
    # is most of it, so the saved activations alone could be off by ~100 % within 25 %: the modelled part is held to
    # 10 % (measured: within 2 % for both stages), which a layer model off by a third fails.
    exact = predicted["weights"] + predicted["optimizer"] + predicted["inputs"]
    modelled = predicted["activations"] + predicted["loss_transient"] + predicted["gradients"]
    share = modelled / (measured["peak"] - exact)
    assert abs(share - 1) <= ACTIVATION_TOLERANCE, f"{message}; modelled part / measured part {share:.3f}"


# ----- (c) bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--preset", "huge"], "--preset"),
        (["--gpu-memory", "80XB"], "--gpu-memory"),
        (["--gpus", "0"], "--gpus"),
        (["--gpus", "eight"], "--gpus"),
        (["--sharding", "zero2"], "--sharding"),
        (["--stage", "4"], "--stage"),
        (["--mfu", "1.5"], "--mfu"),
        (["--activation-checkpointing", "maybe"], "--activation-checkpointing"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_flag(args, flag, capsys):
    status, _, err = _cli(capsys, *args)
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and flag in lines[0] and lines[0].startswith("moe-vlm plan: error:"), err


def test_bad_lora_settings_are_refused_naming_the_field(capsys):
    status, _, err = _cli(
        capsys, "--preset", "tiny", "--stage", "3", "--lora_r", "4", "--lora_targets", "embeddings"
    )
    assert status == 2 and "lora_targets" in err and len(err.strip().splitlines()) == 1, err


def test_the_console_script_refuses_a_malformed_memory_size():
    """The installed command itself (a subprocess): exit 2, one line on stderr, no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "moe_vlm_cli", "plan", "--gpu-memory", "80XB"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "moe-vlm plan: error: --gpu-memory '80XB': give a size such as 80GB, 80GiB or 24000MB"
    ], done.stderr


def test_parse_memory_reads_gpu_sizes():
    assert planning.parse_memory("80GB") == planning.parse_memory("80 GiB") == 80 * 2**30
    assert planning.parse_memory("24000MB") == 24000 * 2**20
    assert planning.parse_memory("1.5TB") == int(1.5 * 2**40)


# ----- (d) the paper answer ----------------------------------------------------------------------------------------------


def test_paper_stage3_on_8x80gb_answers_and_adds_up(paper_plan, capsys):
    status, out, err = _cli(
        capsys,
        "--preset",
        "paper",
        "--stage",
        "3",
        "--gpus",
        "8",
        "--gpu-memory",
        "80GB",
        "--sharding",
        "fsdp",
    )
    assert status == 0, err
    verdicts = [line for line in out.splitlines() if "Stage 3 " in line and "FIT" in line]
    assert len(verdicts) == 1 and "FSDP" in verdicts[0]
    stage = next(s for s in paper_plan["stages"] if s["stage"] == "3")
    assert stage["activation_checkpointing"]  # the paper recipe's
    for sharding, estimates in stage["memory"].items():
        for estimate in estimates.values():
            parts = sum(estimate[k] for k in planning.MEMORY_PARTS)
            assert parts == pytest.approx(estimate["total"], rel=1e-12), (sharding, estimate)
            assert estimate["margin"] == pytest.approx(estimate["capacity"] - estimate["total"])
            assert estimate["fits"] == (estimate["total"] <= estimate["capacity"])
    chosen = stage["memory"]["fsdp"]["on"]
    gib = 2**30
    verdict = "FITS" if chosen["fits"] else "DOES NOT FIT"
    assert verdict in verdicts[0] and f"{chosen['total'] / gib:.1f} GiB per GPU" in verdicts[0]
    assert f"margin {chosen['margin'] / gib:.1f} GiB" in verdicts[0]
    # Checkpointing can only lower the peak; sharding over 8 GPUs holds an eighth of the weights.
    assert chosen["total"] <= stage["memory"]["fsdp"]["off"]["total"]
    total = paper_plan["parameters"]["total"]
    assert chosen["weights"] == pytest.approx(total * 4 / 8)
