"""Routing dynamics: the per-step routing log (training batches and the eval-mode probe), collapse under both
definitions, and the routing-dynamics figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from training_helpers import make_shapes, make_stage0, quick_args, routing_lines, train, weights
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from analysis.figures import plot_routing_dynamics
from analysis.load import expert_load, load_report, routing_dynamics
from analysis.saturation import read_probe_choices, router_saturation
from configuration.contract import COMPLETION_MARKER, LOAD_GROUPS, PROBE_CHOICES_FILE, ROUTING_LOG_FILE
from trainer.callbacks import compact_logs
from trainer.load_stats import group_stats
from trainer.routing_stats import (
    PROBE_PREFIX,
    SCALAR_STATS,
    RoutingAccumulator,
    flatten,
    read_log_lines,
    unflatten,
)

# ----- statistics on constructed router outputs ----------------------------------------------------------------------


def test_logit_gap_margin_and_agreement_on_constructed_logits():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.5], [-1.0, 1.0]])
    choices = np.array([0, 0, 0, 1])  # token 1 went against its router (noise)
    is_image = np.array([True, True, False, False])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    stats = group_stats(choices, probs, is_image, 2, logits=logits)
    assert stats["image"]["logit_gap"] == pytest.approx((2.0 - 1.0) / 2)
    assert stats["image"]["logit_margin"] == pytest.approx((2.0 + 1.0) / 2)
    assert stats["image"]["agreement"] == pytest.approx(0.5)
    assert stats["text"]["logit_gap"] == pytest.approx((2.5 - 2.0) / 2)
    assert stats["all"]["agreement"] == pytest.approx(0.75)
    # Without the logits the same numbers come from the probabilities (log-probability differences).
    from_probs = group_stats(choices, probs, is_image, 2)
    for group in LOAD_GROUPS:
        for name in ("logit_gap", "logit_margin", "agreement"):
            assert from_probs[group][name] == pytest.approx(stats[group][name])


def test_accumulator_logs_the_new_scalars_and_round_trips_the_flat_keys():
    acc = RoutingAccumulator([0, 3], 2)
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.0]])  # (tokens, E)
    index = torch.tensor([[0], [0], [1]])
    mask = torch.tensor([[True, False, False]])
    acc.update([logits, logits], [index, index], mask, torch.ones(1, 3))
    summary = acc.summary()
    text = summary["3"]["text"]
    assert text["logit_gap"] == pytest.approx((-2.0 + 0.5) / 2)
    assert text["logit_margin"] == pytest.approx((2.0 + 0.5) / 2)
    assert text["agreement"] == 0.0 and text["tokens"] == 2
    assert set(SCALAR_STATS) <= set(text)
    assert unflatten(flatten(summary)) == summary
    probe = flatten(summary, PROBE_PREFIX)
    assert unflatten(probe) == {} and unflatten(probe, PROBE_PREFIX) == summary
    shown = compact_logs({"loss": 1.0, **flatten(summary), **probe})
    assert set(shown) == {"loss", "routing", PROBE_PREFIX}


# ----- collapse under both definitions --------------------------------------------------------------------------


def test_hard_and_soft_collapse_are_reported_separately():
    t = 200
    is_image = np.arange(t) < 60
    # Layer 0: argmax on small gaps, 99.5 % of tokens to expert 0 while the soft load is 60/40 (the layer 3).
    choices = np.zeros(t, dtype=int)
    choices[0] = 1
    p0 = np.where(np.arange(t) == 0, 0.4, 0.6)
    soft_only_hard = np.stack([p0, 1 - p0], 1)
    # Layer 1: a confident router, 95 % mean probability on expert 1, but only 96 % of tokens dispatched there.
    choices1 = np.ones(t, dtype=int)
    choices1[:8] = 0
    confident = np.tile([0.05, 0.95], (t, 1))
    confident[:8] = [0.51, 0.49]
    confident[8:] = [0.035, 0.965]
    # Layer 2: the clean modality split, neither.
    split = np.where(is_image, 0, 1)
    r0 = expert_load(choices, soft_only_hard, is_image)
    assert r0["collapsed"] and r0["dominant_fraction"] == pytest.approx(0.995)
    assert not r0["collapsed_soft"] and r0["soft_dominant_fraction"] == pytest.approx(0.599, abs=1e-3)
    r1 = expert_load(choices1, confident, is_image)
    assert not r1["collapsed"] and r1["collapsed_soft"] and r1["soft_dominant_expert"] == 1
    assert r1["soft_collapse_threshold"] == 0.9 and r1["collapse_threshold"] == 0.99
    report = load_report(
        {
            0: (choices, soft_only_hard, is_image),
            1: (choices1, confident, is_image),
            2: (split, np.eye(2)[split], is_image),
        }
    )
    assert report["collapsed_layers"] == [0] and report["n_collapsed"] == 1
    assert report["collapsed_layers_soft"] == [1] and report["n_collapsed_soft"] == 1
    # Without probabilities (hard routing) nothing is soft-collapsed; a stricter soft threshold un-collapses layer 1.
    assert not expert_load(np.zeros(5, dtype=int), None, None, num_experts=2)["collapsed_soft"]
    assert not expert_load(choices1, confident, is_image, soft_collapse_threshold=0.97)["collapsed_soft"]
    json.dumps(report, allow_nan=False)


def _stats(d0: float, p0: float, gap: float, tokens: int = 100, agreement: float = 0.7) -> dict:
    """One group's record in the routing log (the shape `trainer.routing_stats` writes)."""
    return {
        "dispatch": [d0, 1 - d0],
        "prob": [p0, 1 - p0],
        "entropy": 0.5,
        "logit_gap": gap,
        "logit_margin": abs(gap),
        "agreement": agreement,
        "tokens": tokens,
    }


def constructed_log(with_probe: bool = True) -> list[dict]:
    """Two layers over four logging steps: layer 0 hard-collapses onto expert 0 at step 20 with a 60/40 soft load;
    layer 1 soft-collapses onto expert 1 at step 30 (and so hard at step 40)."""
    records = []
    layer0 = [(0.7, 0.55, 0.2), (0.995, 0.6, 0.4), (0.99, 0.61, 0.45), (0.999, 0.62, 0.5)]
    layer1 = [(0.5, 0.5, 0.0), (0.2, 0.2, -1.0), (0.05, 0.08, -2.5), (0.0, 0.02, -4.0)]
    for i, step in enumerate((10, 20, 30, 40)):
        layers = {
            str(layer): {m: _stats(*values[i]) for m in LOAD_GROUPS}
            for layer, values in ((0, layer0), (1, layer1))
        }
        record = {"step": step, "stage": "3", "layers": layers}
        if with_probe:
            probe = {
                str(layer): {m: _stats(*(values[i][0] ** 3, *values[i][1:])) for m in LOAD_GROUPS}
                for layer, values in ((0, layer0), (1, layer1))
            }
            record["probe"] = {"split": "validation", "n_samples": 8, "mode": "eval", "layers": probe}
        records.append(record)
    return records


def test_routing_dynamics_finds_when_each_layer_collapses():
    dyn = routing_dynamics(constructed_log()[::-1])  # any order in, sorted by step
    assert dyn["steps"] == [10, 20, 30, 40]
    assert dyn["train"]["0"]["image"]["dispatch0"] == [0.7, 0.995, 0.99, 0.999]
    assert dyn["train"]["1"]["all"]["logit_gap"] == [0.0, -1.0, -2.5, -4.0]
    onset = dyn["collapse"]["train"]
    assert onset["0"]["hard"] == {"first_step": 20, "expert": 0, "at_end": True, "n_collapsed_logs": 3}
    assert onset["0"]["soft"]["first_step"] is None and not onset["0"]["soft"]["at_end"]
    assert onset["1"]["soft"]["first_step"] == 30 and onset["1"]["soft"]["expert"] == 1
    assert onset["1"]["hard"]["first_step"] == 40
    assert dyn["probe_info"] == {"split": "validation", "n_samples": 8, "mode": "eval"}
    assert dyn["collapse"]["probe"]["0"]["hard"]["first_step"] == 40  # 0.995³ < 0.99 < 0.999³
    json.dumps(dyn, allow_nan=False)


# ----- the figure -----------------------------------------------------------------------------------------------------


def test_routing_dynamics_figure_from_a_stage_directory_and_from_records(tmp_path):
    stage = tmp_path / "stage3"
    stage.mkdir()
    (stage / ROUTING_LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in constructed_log()))
    out = plot_routing_dynamics(stage, tmp_path / "dyn.png", dpi=50)
    with Image.open(out) as image:
        assert image.size == (13 * 50, int(8.5 * 50))
    # An older log: no probe, no logit fields; the records themselves are accepted too.
    old = constructed_log(with_probe=False)
    for record in old:
        for per_modality in record["layers"].values():
            for stats in per_modality.values():
                for name in ("logit_gap", "logit_margin", "agreement"):
                    stats.pop(name)
    path = plot_routing_dynamics(old, tmp_path / "old.png", figsize=(6, 4), dpi=40)
    with Image.open(path) as image:
        assert image.size == (240, 160)
    with pytest.raises(ValueError, match="no per-layer records"):
        plot_routing_dynamics([{"step": 1, "layers": {}}], tmp_path / "none.png")


# ----- a tiny Stage 3 run ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Shapes data and a Stage 0 model passed off as a Stage 2 output (Stage 3 starts from one; what Stages 1-2
    would have trained does not matter to the routing log)."""
    root = tmp_path_factory.mktemp("dynamics")
    shapes = make_shapes(root / "shapes")
    stage2 = make_stage0(root / "stage0")
    marker = json.loads((stage2 / COMPLETION_MARKER).read_text())
    (stage2 / COMPLETION_MARKER).write_text(json.dumps({**marker, "stage": "2"}))
    return root, shapes, stage2


def test_stage3_logs_training_and_probe_routing_at_every_logging_step(start):
    root, shapes, stage2 = start
    out = train(
        "3",
        root / "s3",
        stage2,
        quick_args(shapes, steps=3, logging_steps=1, router_learning_rate=5e-3, learning_rate=1e-4),
    )
    lines = routing_lines(out)
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert line["probe"]["split"] == "validation" and line["probe"]["n_samples"] == 8
        for source in (line["layers"], line["probe"]["layers"]):
            assert set(source) == {"0", "1"}
            for layer in source.values():
                assert set(layer) == set(LOAD_GROUPS)
                for stats in layer.values():
                    assert sum(stats["dispatch"]) == pytest.approx(1.0) and sum(
                        stats["prob"]
                    ) == pytest.approx(1.0)
                    assert 0.0 <= stats["entropy"] <= math.log(2) + 1e-9
                    assert stats["logit_margin"] >= abs(stats["logit_gap"]) - 1e-9
                    assert 0.0 <= stats["agreement"] <= 1.0
        for layer in line["probe"]["layers"].values():
            assert layer["all"]["agreement"] == 1.0  # eval mode: the dispatch is the router's argmax
    # The probe is a fixed batch: its token count is the same at every step.
    assert len({line["probe"]["layers"]["0"]["all"]["tokens"] for line in lines}) == 1
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "router/learning_rate" in entry]
    assert len(steps) == 3
    for entry in steps:
        assert entry["router/learning_rate"] / entry["learning_rate"] == pytest.approx(50.0)
    dyn = routing_dynamics(lines)
    assert set(dyn["train"]) == set(dyn["probe"]) == {"0", "1"}
    assert plot_routing_dynamics(out, root / "fig.png").endswith("fig.png")
    # The per-token probe choices: once before any update (step 0), then at every log, the same tokens each time,
    # and at each logged step the same dispatch as the probe's summary in the routing log.
    choices = read_probe_choices(out)
    assert [c["step"] for c in choices] == [0, 1, 2, 3] and {c["stage"] for c in choices} == {"3"}
    n_tokens = lines[0]["probe"]["layers"]["0"]["all"]["tokens"]
    for record in choices:
        assert len(record["is_image"]) == n_tokens and set(record["layers"]) == {"0", "1"}
        assert all(len(chosen) == n_tokens and set(chosen) <= {0, 1} for chosen in record["layers"].values())
    for record, line in zip(choices[1:], lines):
        for layer, chosen in record["layers"].items():
            dispatch = line["probe"]["layers"][layer]["all"]["dispatch"]
            assert np.mean(chosen) == pytest.approx(dispatch[1])
            image = np.asarray(chosen)[np.asarray(record["is_image"])]
            assert np.mean(image) == pytest.approx(line["probe"]["layers"][layer]["image"]["dispatch"][1])
    saturation = router_saturation(choices)
    assert saturation["steps"] == [0, 1, 2, 3] and set(saturation["layers"]) == {"0", "1"}


class _Killed(RuntimeError):
    """Stands for the training process being killed."""


class _KillAtTheStep2Save(TrainerCallback):
    """Killed as checkpoint-2 is saved: the logs hold rows 1-2, the checkpoint's own; nothing is logged past it."""

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise _Killed


class _KillAfterStep3WasLogged(TrainerCallback):
    """Killed as step 4 begins: the logs hold row 3, logged after checkpoint-2, which the resumed run logs again."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise _Killed


def _kill_and_resume_args(shapes) -> list[str]:
    return quick_args(
        shapes, steps=4, save_strategy="steps", save_steps=2, logging_steps=1, router_learning_rate=5e-3
    )


def _logged_steps(directory, name: str) -> list[int]:
    """The steps of a per-step log, in file order (a duplicated row shows; `read_probe_choices` sorts)."""
    return [record["step"] for record in read_log_lines(directory / name)]


@pytest.fixture(scope="module")
def uninterrupted(start):
    root, shapes, stage2 = start
    return train("3", root / "whole", stage2, _kill_and_resume_args(shapes))


@pytest.mark.parametrize(
    "kill, logged_at_kill",
    [(_KillAtTheStep2Save, [1, 2]), (_KillAfterStep3WasLogged, [1, 2, 3])],
    ids=["at-the-save", "after-a-row-past-the-checkpoint"],
)
def test_a_killed_run_resumes_to_the_same_weights_and_logs_each_row_once(
    start, uninterrupted, kill, logged_at_kill
):
    """Stage 3 (fused AdamW with the router param group) killed at its step-2 checkpoint, or one logged step past it,
    and resumed from checkpoint-2 ends with the uninterrupted run's weights, and its routing log and probe choices:
    each step once, in order. Killed past the checkpoint, the rows logged after it are in the files when the resumed
    run starts; it must drop them (`_keep_lines_up_to`) and log them again, not append a second copy."""
    root, shapes, stage2 = start
    overrides = _kill_and_resume_args(shapes)
    out = root / f"killed-{kill.__name__}"
    with pytest.raises(_Killed):
        train("3", out, stage2, overrides, callbacks=[kill()])
    assert Path(get_last_checkpoint(str(out))).name == "checkpoint-2"
    assert _logged_steps(out, ROUTING_LOG_FILE) == logged_at_kill
    assert _logged_steps(out, PROBE_CHOICES_FILE) == [0, *logged_at_kill]
    state = torch.load(out / "checkpoint-2" / "optimizer.pt", map_location="cpu", weights_only=True)
    assert [g.get("name") for g in state["param_groups"]][-1] == "router"
    resumed = train("3", out, stage2, [*overrides, "--resume_from_checkpoint", "true"])
    a, b = weights(uninterrupted), weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert _logged_steps(resumed, ROUTING_LOG_FILE) == [1, 2, 3, 4]
    assert _logged_steps(resumed, PROBE_CHOICES_FILE) == [0, 1, 2, 3, 4]
    assert routing_lines(resumed) == routing_lines(uninterrupted)
    assert read_log_lines(resumed / PROBE_CHOICES_FILE) == read_log_lines(uninterrupted / PROBE_CHOICES_FILE)


def test_probe_on_the_train_split_is_held_out_of_training(start, tiny_model, processor, tmp_path):
    from datasets import load_from_disk
    from transformers import TrainingArguments

    from trainer.data import MoeVlmCollator
    from trainer.recipes import StageArguments
    from trainer.stages import UnifiedFinetuneTrainer

    _, shapes, _ = start
    instruct = load_from_disk(str(shapes))["instruct"]
    stage_args = StageArguments(
        stage="3", dataset=str(shapes), routing_probe_split="instruct", routing_probe_samples=6
    )
    trainer = UnifiedFinetuneTrainer(
        model=tiny_model,
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        stage_args=stage_args,
        train_dataset=instruct,
        data_collator=MoeVlmCollator(processor),
    )
    probe = trainer.routing_probe
    assert probe.info()["n_samples"] == 6 and len(trainer.train_dataset) == len(instruct) - 6
    trained = {json.dumps(r["conversations"]) for r in trainer.train_dataset}
    held = {json.dumps(instruct[i]["conversations"]) for i in range(len(instruct) - 6, len(instruct))}
    assert not trained & held
    summary = probe.run(tiny_model)
    assert tiny_model.training is False  # put back in the mode it was in (the fixture's eval)
    assert summary["0"]["all"]["agreement"] == 1.0
    with pytest.raises(ValueError, match="none would be left"):
        UnifiedFinetuneTrainer(
            model=tiny_model,
            args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
            stage_args=StageArguments(stage="3", routing_probe_split="instruct", routing_probe_samples=100),
            train_dataset=instruct,
            data_collator=MoeVlmCollator(processor),
        )
