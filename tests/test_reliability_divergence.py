"""Divergence (issue 15, item 2): a non-finite loss, gradient or weight stops a stage with a message naming the step
and the layer (router or expert) that went non-finite, keeps the last good checkpoint, writes no completion marker,
and `moe-vlm train` exits non-zero with one line, no traceback.

Each case is a tiny Stage 3 run (from the upcycled Stage 0, save_steps 1) in which a test-only callback breaks the
model at the start of step 3: a router weight, an expert's weights, a gradient, an activation; the CLI case needs no
hook at all (a learning rate so large that the first update overflows the next forward)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import make_shapes, make_stage0, quick_args, train
from transformers import TrainerCallback

from configuration.contract import COMPLETION_MARKER
from trainer.divergence import TrainingDivergedError, non_finite, part_of

REPO = Path(__file__).resolve().parent.parent
BROKEN_AT = 3  # the step whose start the callbacks break the model at: checkpoint-2 is the last good one


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("divergence")
    return make_shapes(root / "shapes"), make_stage0(root / "stage0"), root


def stage3_args(shapes, steps: int = 5, **fields) -> list[str]:
    return quick_args(shapes, steps=steps, save_strategy="steps", save_steps=1, logging_steps=1, **fields)


class BreakAtStep(TrainerCallback):
    """Calls `breaks(model)` when step `BROKEN_AT` begins (`state.global_step` counts the steps done)."""

    def __init__(self, breaks):
        self.breaks = breaks

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == BROKEN_AT - 1:
            self.breaks(model)


def diverge(chain, name: str, breaks) -> tuple[str, Path]:
    shapes, stage0, root = chain
    out = root / name
    with pytest.raises(TrainingDivergedError) as caught:
        train("3", out, stage0, stage3_args(shapes), callbacks=[BreakAtStep(breaks)])
    return str(caught.value), out


def assert_last_good_checkpoint_kept(out: Path) -> None:
    assert not (out / COMPLETION_MARKER).exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{BROKEN_AT - 1}"]
    weights = load_file(str(out / f"checkpoint-{BROKEN_AT - 1}" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_nan_router_weight_stops_the_stage_naming_the_step_and_the_router(chain):
    def nan_router(model):
        with torch.no_grad():
            model.model.layers[1].mlp.gate.weight[0, 3] = math.nan

    message, out = diverge(chain, "router", nan_router)
    assert f"diverged at step {BROKEN_AT}: the loss is nan" in message
    assert "non-finite weights in layer 1 router (model.layers.1.mlp.gate.weight: 1 of 128 values)" in message
    assert "layer 0" not in message  # only the broken layer is named
    assert f"{out / f'checkpoint-{BROKEN_AT - 1}'}" in message and "no completion marker" in message
    assert_last_good_checkpoint_kept(out)


def test_an_infinite_expert_is_named_by_layer_and_expert(chain):
    def inf_expert(model):
        with torch.no_grad():
            model.model.layers[0].mlp.experts.down_proj[1].fill_(math.inf)

    message, out = diverge(chain, "expert", inf_expert)
    assert f"diverged at step {BROKEN_AT}" in message
    assert "non-finite weights in layer 0 expert 1 (model.layers.0.mlp.experts.down_proj" in message
    assert "expert 0" not in message
    assert_last_good_checkpoint_kept(out)


def test_a_non_finite_gradient_with_a_finite_loss_names_the_parameters(chain):
    def nan_gradient(model):
        model.model.layers[0].mlp.gate.weight.register_hook(lambda grad: torch.full_like(grad, math.nan))

    message, out = diverge(chain, "gradient", nan_gradient)
    assert f"diverged at step {BROKEN_AT}: the gradient norm is nan" in message
    assert "the weights are finite; non-finite gradients in layer 0 router" in message
    assert_last_good_checkpoint_kept(out)


def test_a_non_finite_activation_is_traced_to_the_first_module_that_produced_it(chain):
    def inf_experts_output(model):
        model.model.layers[1].mlp.experts.register_forward_hook(
            lambda module, args, output: output * math.inf
        )

    message, out = diverge(chain, "activation", inf_experts_output)
    assert f"diverged at step {BROKEN_AT}: the loss is nan" in message
    assert "the first non-finite activation is the output of layer 1 experts" in message
    assert_last_good_checkpoint_kept(out)


def test_an_update_that_overflows_the_weights_is_caught_before_its_checkpoint(chain):
    """A learning rate of 1e39 is infinite in float32: the first update makes the attention and expert weights
    non-finite (the routers have their own rate); the check before the save stops the stage without writing it."""
    shapes, stage0, root = chain
    out = root / "update"
    with pytest.raises(TrainingDivergedError) as caught:
        train(
            "3", out, stage0, stage3_args(shapes, steps=3, learning_rate=1e39, lr_scheduler_type="constant")
        )
    message = str(caught.value)
    assert "diverged at step 1: a weight is non-finite after the update; non-finite weights in" in message
    assert "layer 0 attention" in message and "layer 1 expert 0" in message and "router" not in message
    assert "Its checkpoint was not written; no checkpoint had been saved yet" in message
    assert not list(out.glob("checkpoint-*")) and not (out / COMPLETION_MARKER).exists()


def test_parts_are_named_in_model_terms():
    assert part_of("model.layers.3.mlp.gate.weight") == "layer 3 router"
    assert part_of("_fsdp_wrapped_module.model.layers.0.self_attn.q_proj.weight") == "layer 0 attention"
    assert part_of("model.layers.2.mlp") == "layer 2 mlp"  # a module holding router and experts
    assert part_of("lm_head.weight") == "lm_head"
    stacked = torch.zeros(2, 4, 3)
    stacked[1, 0, 0] = math.inf
    assert non_finite([("model.layers.1.mlp.experts.gate_up_proj", stacked)], num_experts=2) == [
        ("layer 1 expert 1", "model.layers.1.mlp.experts.gate_up_proj", 1, 24)
    ]
    # A finite tensor whose norm overflows is not reported.
    assert non_finite([("lm_head.weight", torch.full((4,), 3e38))]) == []


def test_the_train_command_exits_non_zero_with_one_line_and_no_traceback(chain):
    """No test hook: a learning rate of 1e37 makes the first update overflow the next forward (step 2)."""
    shapes, stage0, root = chain
    out = root / "cli"
    argv = ["train", "--stage", "3", "--out", str(out), "--from", str(stage0)]
    argv += stage3_args(shapes, steps=4, learning_rate=1e37, lr_scheduler_type="constant")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "moe_vlm_cli", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("moe-vlm train: error:")]
    assert len(error) == 1 and "Stage 3 diverged at step 2" in error[0], result.stderr[-3000:]
    assert "checkpoint-1" in error[0]
    assert not (out / COMPLETION_MARKER).exists() and (out / "checkpoint-1" / "trainer_state.json").is_file()
