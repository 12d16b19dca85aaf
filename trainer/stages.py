"""One `transformers.Trainer` subclass per training stage of the paper (section 2.2).

What a stage trains (parameter groups, see `freezing.py`), how it routes and which split it reads are its recipe's
(`configuration/recipes/<stage>.yaml`, read into `StageArguments`: one place for a stage's settings); constructing
a stage Trainer configures the model accordingly (freezing, router mode, Gumbel temperature, router-loss
coefficients, router dropout). A stage class adds only what the recipe cannot say: its hooks. The shared base
overrides only `compute_loss` (to request the router outputs, accumulate routing statistics and scale the loss
explicitly), `log` (to add the statistics, reduced across processes, as TRL adds its metrics, and the eval-mode
routing probe's) and `create_optimizer` (to give the routers a learning rate of their own when the recipe sets one),
plus two reliability hooks: `_save_checkpoint` writes each checkpoint under a staging name and renames it (a kill never
leaves a half-written `checkpoint-N`), and `training_step` / `_get_grad_norm` stop the stage on a non-finite loss or
gradient, naming the step and the layer (`trainer.divergence`).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from modeling_moe_vlm.configuration_moe_vlm import ROUTER_LOSSES

from .bias_balancing import ExpertBiasBalancer, ExpertBiasCallback
from .callbacks import (
    CompactPrinterCallback,
    CompactProgressCallback,
    GumbelTauCallback,
    ProbeChoicesCallback,
    RoutingStatsCallback,
)
from .divergence import diagnose, non_finite
from .freezing import apply_trainable
from .recipes import StageArguments
from .routing_stats import PROBE_PREFIX, RoutingAccumulator, RoutingProbe, flatten
from .sharding import enable_fsdp_on_cpu, fsdp_requested_on_cpu
from .stage_dirs import CHECKPOINT_STAGING, discard_checkpoint

# A router parameter's name, wherever a wrapper (FSDP, activation checkpointing) inserts a prefix: `...mlp.gate.weight`
# (`freezing.PARAMETER_GROUPS["router"]` anchors the plain model's names; a dense `mlp.gate_proj` does not match).
ROUTER_PARAMETER = re.compile(r"(^|\.)mlp\.gate\.")
# The router losses' coefficients (recipe fields copied onto the model's config) and the unweighted terms the model
# returns with its router outputs (averaged between logging steps): the model's own list.
ROUTER_LOSS_COEFS = tuple(ROUTER_LOSSES)
ROUTER_LOSS_TERMS = tuple(ROUTER_LOSSES.values())


class MoeVlmStageTrainer(Trainer):
    """Shared machinery of the MoE VLM stages. Subclasses set `stage` and `description`."""

    stage: ClassVar[str]
    description: ClassVar[str]
    # compute_loss divides by the gradient-accumulation steps itself (the router losses are per-batch means while
    # the LM loss is normalised over the whole accumulated batch), so the Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, *, stage_args: StageArguments | None = None, **kwargs):
        stage_args = stage_args or StageArguments(stage=self.stage)  # the stage's embedded recipe fills it
        if stage_args.stage != self.stage:
            raise ValueError(f"{type(self).__name__} runs stage {self.stage}, not stage {stage_args.stage}")
        if not stage_args.trainable:
            raise ValueError(f"stage {self.stage}: the recipe names no trainable parameter group")
        self.stage_args = stage_args
        self._staging_checkpoint = False  # set while `_save_checkpoint` writes under the staging folder
        self._step_batches: list = []  # the current optimizer step's micro-batches (`training_step`)
        # The tokens this process trained on, by modality (not reduced): the rank record says what each process saw.
        self.tokens_seen = {"image": 0, "text": 0}
        self.trainable_groups = list(stage_args.trainable)
        wrapped, self.trainable_params, self.adapter = self.prepare_model(model, stage_args)
        if self.adapter is not None:
            self.lora_base = model
            model = wrapped
        self.is_moe = bool(getattr(model.config, "moe_layers", None))
        self.routing = (
            RoutingAccumulator(model.config.moe_layers, model.config.num_experts) if self.is_moe else None
        )
        self._router_losses: dict[str, list[float]] = defaultdict(list)
        self.routing_probe = (
            self.build_routing_probe(model, args, stage_args, kwargs) if self.is_moe else None
        )
        probe_info = self.routing_probe.info() if self.routing_probe is not None else None
        callbacks = list(kwargs.pop("callbacks", None) or [])
        callbacks += [RoutingStatsCallback(self.stage, probe_info)] if self.is_moe else []
        if self.routing_probe is not None:
            callbacks.append(
                ProbeChoicesCallback(
                    self.stage,
                    self.routing_probe,
                    lambda: self.routing_probe.run(self.model, self._prepare_inputs),
                )
            )
        rate = stage_args.router_bias_update_rate
        self.bias_balancer = None
        if rate and self.is_moe:
            self.bias_balancer = ExpertBiasBalancer(model.config.moe_layers, model.config.num_experts, rate)
            callbacks.append(ExpertBiasCallback(self.bias_balancer, self._sum_across_processes))
        callbacks += self.stage_callbacks(model, stage_args)
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        for plain, compact in (
            (ProgressCallback, CompactProgressCallback),
            (PrinterCallback, CompactPrinterCallback),
        ):
            if self.pop_callback(plain) is not None:
                self.add_callback(compact)

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; on CPU processes launched with an FSDP config, with the FSDP plugin accelerate
        dropped there (`trainer.sharding`), so the run shards instead of silently falling back to DDP."""
        super().create_accelerator_and_postprocess()
        if fsdp_requested_on_cpu(self.accelerator):
            enable_fsdp_on_cpu(self.accelerator)
            self.is_fsdp_enabled = True

    # ----- stage configuration ----------------------------------------------------------------------------------
    @classmethod
    def prepare_model(cls, model, stage_args: StageArguments) -> tuple:
        """Everything the stage does to `model` before training: its routing (`configure_model`), its trainable set
        (`trainer.freezing`) and, with `--lora_r`, PEFT's adapters (`model` is edited in place: its parameter names
        then say base_layer / lora_A / modules_to_save). Returns (the model to train: `model` or its `PeftModel`,
        the trainable parameter names, the marker's `adapter` record or None). A class method, so that `moe-vlm plan`
        applies exactly this to a meta-device model and counts what the stage trains."""
        cls.configure_model(model, stage_args)
        groups = list(stage_args.trainable)
        trainable = apply_trainable(model, groups)
        if stage_args.lora_r is None:
            return model, trainable, None
        from .lora import apply_lora

        return apply_lora(model, groups, stage_args)

    @classmethod
    def router_mode(cls, stage_args: StageArguments) -> str | None:
        return stage_args.router_mode  # None (the dense control): the model has no router to set

    @classmethod
    def configure_model(cls, model, stage_args: StageArguments) -> None:
        """Set the routing of this stage on the model's config (saved with the checkpoint)."""
        mode = cls.router_mode(stage_args)
        if mode is not None:
            model.set_router_mode(mode)
        if stage_args.gumbel_tau is not None:
            model.config.gumbel_tau = stage_args.gumbel_tau
        if stage_args.router_dropout is not None:
            model.config.router_dropout = stage_args.router_dropout
        cls.check_model_supports(model, stage_args)
        for name in ROUTER_LOSS_COEFS:
            setattr(model.config, name, getattr(stage_args, name))
        if stage_args.router_entropy_floor is not None:
            model.config.router_entropy_floor = stage_args.router_entropy_floor
        if hasattr(model, "set_router_bias_update_rate"):
            model.set_router_bias_update_rate(stage_args.router_bias_update_rate)
        model.config.check_moe_vlm()

    @staticmethod
    def check_model_supports(model, stage_args: StageArguments) -> None:
        """A checkpoint runs the modeling code saved beside it (remote code): one saved before a router loss or the
        expert bias existed would take the field and silently ignore it. Refuse instead, naming the fix."""
        requested = [n for n in (*ROUTER_LOSS_COEFS, "router_bias_update_rate") if getattr(stage_args, n)]
        if stage_args.router_entropy_floor is not None:
            requested.append("router_entropy_floor")
        missing = [n for n in requested if not hasattr(type(model.config), n)]
        if missing:
            raise ValueError(
                f"the recipe sets {missing}, but the model's code ({type(model).__module__}, saved with the "
                "checkpoint) predates them and would ignore them: train from a checkpoint written by this version "
                "(rerun its stage), or copy this package's modeling_moe_vlm/*.py into the checkpoint folder"
            )

    def stage_callbacks(self, model, stage_args: StageArguments) -> list:
        if stage_args.gumbel_tau_end is None:
            return []
        if model.config.router_mode not in ("gumbel", "modality_aware"):
            raise ValueError(
                f"gumbel_tau_end anneals the Gumbel temperature, but stage {self.stage} routes "
                f"{model.config.router_mode!r}"
            )
        return [GumbelTauCallback(model.config.gumbel_tau, stage_args.gumbel_tau_end)]

    def build_routing_probe(
        self, model, args, stage_args: StageArguments, kwargs: dict
    ) -> RoutingProbe | None:
        """The recipe's routing probe: the first `routing_probe_samples` records of `routing_probe_split`, or, when
        that is the split being trained on, its last records, which are then taken out of `kwargs["train_dataset"]`
        (held out). None when the recipe names no probe split."""
        split = stage_args.routing_probe_split
        if split is None:
            return None
        collator, dataset = kwargs.get("data_collator"), kwargs.get("train_dataset")
        if collator is None or dataset is None:
            raise ValueError("a routing probe needs the Trainer's data_collator and train_dataset")
        n = stage_args.routing_probe_samples
        # LLaVA-Instruct has one split: `load_split` hands its records out under any name, so held out it must be.
        if split == stage_args.train_split or stage_args.dataset == "llava":
            if len(dataset) <= n:
                raise ValueError(
                    f"the routing probe holds out {n} of the {len(dataset)} training records: none would be left"
                )
            records = dataset.select(range(len(dataset) - n, len(dataset)))
            kwargs["train_dataset"] = dataset.select(range(len(dataset) - n))
        else:
            from .stage_data import load_split

            records = load_split(stage_args, split, model.config.vision_config.image_size)
            records = records.select(range(min(n, len(records))))
        batch_size = args.per_device_eval_batch_size if args is not None else 8
        return RoutingProbe(
            records, collator, model.config.moe_layers, model.config.num_experts, batch_size, split
        )

    @property
    def router_losses_in_loss(self) -> bool:
        return any(getattr(self.model.config, name) for name in ROUTER_LOSS_COEFS)

    # ----- optimizer --------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """The Trainer's optimizer (its decay / no-decay groups, optimizer class and kwargs, e.g. fused AdamW),
        with the router parameters moved into groups of their own at `router_learning_rate` when the recipe sets
        one. The groups are split right after construction, before any step, so there is no state to move; the
        layout is deterministic, so a checkpoint's optimizer state loads back on resume, and the learning-rate
        scheduler (created afterwards) scales every group's own base rate by the same schedule."""
        had_optimizer = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        router_lr = self.stage_args.router_learning_rate
        if router_lr is None or had_optimizer:
            return optimizer
        opt_model = self.model if model is None else model
        router = {id(p) for n, p in opt_model.named_parameters() if ROUTER_PARAMETER.search(n)}
        inner = getattr(optimizer, "optimizer", optimizer)  # an accelerate / bitsandbytes wrapper's optimizer
        rest, routers = [], []
        for group in inner.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            kept = [p for p in group["params"] if id(p) not in router]
            moved = [p for p in group["params"] if id(p) in router]
            rest += [{**options, "params": kept}] if kept else []
            routers += [{**options, "params": moved, "lr": router_lr, "name": "router"}] if moved else []
        if not routers:
            raise ValueError(
                "router_learning_rate is set, but no trainable router parameter is in the optimizer (is `router` "
                "among the stage's trainable groups, and does the router mode train it?)"
            )
        # Router groups last: the Trainer logs the first group's rate as `learning_rate`.
        inner.param_groups = rest + routers
        return optimizer

    def router_learning_rate_at(self, learning_rate: float) -> float:
        """The routers' rate at the step the Trainer logged `learning_rate` for (the first group's rate used at that
        step, read before the scheduler stepped): the schedule multiplies every group's base rate by one factor."""
        groups = self.optimizer.param_groups
        routers = [g for g in groups if g.get("name") == "router"]
        base = groups[0].get("initial_lr", groups[0]["lr"])
        return float(learning_rate) * routers[0].get("initial_lr", routers[0]["lr"]) / base if base else 0.0

    # ----- loss -------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        track = self.is_moe and model.training
        if model.training:
            self.count_tokens(inputs)
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch, output_router_logits=track)
        if track:
            self.routing.update(
                outputs.router_logits,
                outputs.router_indices,
                outputs.modality_mask,
                inputs.get("attention_mask"),
            )
            if self.bias_balancer is not None:
                self.bias_balancer.observe(outputs.router_indices, inputs.get("attention_mask"))
            for name in ROUTER_LOSS_TERMS:
                if getattr(outputs, name, None) is not None:
                    self._router_losses[name].append(float(getattr(outputs, name).detach()))
        loss = self.scale_loss(outputs, num_items_in_batch) if model.training else outputs.loss
        return (loss, outputs) if return_outputs else loss

    def count_tokens(self, inputs: dict) -> None:
        """Add a training batch's non-padding tokens to `tokens_seen`: image placeholders and text (a batch given as
        embeddings has no ids to count)."""
        if inputs.get("input_ids") is None:
            return
        valid = inputs["attention_mask"].bool() if inputs.get("attention_mask") is not None else None
        image = inputs["input_ids"] == self.model.config.image_token_id
        valid = torch.ones_like(image) if valid is None else valid
        self.tokens_seen["image"] += int((image & valid).sum())
        self.tokens_seen["text"] += int((~image & valid).sum())

    def scale_loss(self, outputs, num_items_in_batch) -> torch.Tensor:
        """The LM loss over the accumulated (and, across processes, the global) batch plus the weighted router
        losses (per-batch means), each scaled for gradient accumulation and data parallelism."""
        steps = self.current_gradient_accumulation_steps
        aux = outputs.aux_loss if self.router_losses_in_loss else None
        lm = outputs.loss if aux is None else outputs.loss - aux
        if num_items_in_batch is None:  # a per-batch mean
            lm = lm / steps
        elif self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's tokens and DDP averages gradients over processes.
            lm = lm * self.accelerator.num_processes
        return lm if aux is None else lm + aux / steps

    # ----- divergence -------------------------------------------------------------------------------------------
    def _diverged(self, cause: str, step: int, **kwargs):
        return diagnose(
            self.model, stage=self.stage, step=step, cause=cause, output_dir=self.args.output_dir, **kwargs
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step (forward, backward), then: a non-finite loss stops the stage (`trainer.divergence`),
        before the optimizer step. One process only: with several, each sees its own loss, and stopping one would
        leave the others waiting in a collective; the gradient norm (`_get_grad_norm`, reduced across processes)
        stops them all alike. The step's micro-batches are kept (references to batches the Trainer already holds)
        until the optimizer step, for `_recompute_gradients`."""
        self._step_batches.append((inputs, num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes == 1 and not torch.isfinite(loss).all():

            def forward():
                return model(**self._prepare_inputs(inputs))

            step = self.state.global_step + 1
            raise self._diverged(f"the loss is {float(loss)}", step, forward=forward)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The gradient norm the Trainer computes every optimizer step (for clipping and the log); a non-finite one
        stops the stage before the optimizer applies it, naming the parameters (`trainer.divergence`). Clipping by
        a non-finite norm has already made every gradient non-finite by then, so they are computed again on the
        step's batches, unclipped, to see which ones were (`_recompute_gradients`)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        batches, self._step_batches = self._step_batches, []
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            step = self.state.global_step + 1
            raise self._diverged(
                f"the gradient norm is {float(grad_norm)}",
                step,
                gradients=lambda: self._recompute_gradients(batches),
            )
        return grad_norm

    def _recompute_gradients(self, batches) -> bool:
        """Forward and backward again on the failed step's micro-batches, without clipping, so that the gradients
        say which parameters went non-finite; False (nothing recomputed) with several processes, where a backward
        is collective and the other processes may be elsewhere."""
        if self.accelerator.num_processes != 1:
            return False
        self.model.zero_grad(set_to_none=True)
        for inputs, num_items_in_batch in batches:
            loss = self.compute_loss(
                self.model, self._prepare_inputs(inputs), num_items_in_batch=num_items_in_batch
            )
            loss.backward()
        return True

    # ----- checkpoints ------------------------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, CHECKPOINT_STAGING) if self._staging_checkpoint else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written whole or not at all under its final name: transformers writes
        `checkpoint-N` in place (model, optimizer, scheduler, RNG states, `trainer_state.json` last) and
        `get_last_checkpoint` takes the highest-numbered folder, so a kill during a save would leave a half-written
        folder that `--resume_from_checkpoint true` then fails on (or loads). Here the Trainer writes it into
        `<output_dir>/CHECKPOINT_STAGING/checkpoint-N` (`_get_output_dir` points there while it saves), and the main
        process renames it to `<output_dir>/checkpoint-N` once every process has written its part.

        Then the parts of the Trainer's save that look at the real folder are redone there: the best checkpoint's
        path (the Trainer saw the staging folder) and the rotation (`save_total_limit`, each deleted checkpoint moved
        out of its name first: `_rotate_checkpoints_whole`). The weights are checked
        first: a non-finite one stops the stage without writing the checkpoint (`trainer.divergence`)."""
        found = non_finite(self.model.named_parameters(), getattr(self.model.config, "num_experts", None))
        if found:
            step = self.state.global_step
            raise self._diverged("a weight is non-finite after the update", step, applied=True)
        run_dir = self._get_output_dir(trial)
        staging_root = os.path.join(run_dir, CHECKPOINT_STAGING)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # a save a kill interrupted
        self.accelerator.wait_for_everyone()
        self._staging_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_checkpoint = False
        self.accelerator.wait_for_everyone()  # every process's shards and RNG state are in `staged`
        if self.args.push_to_hub:
            self._finish_current_push()  # an upload of `staged` may still be reading it
        best = self.state.best_model_checkpoint
        if best is not None and os.path.dirname(os.path.normpath(best)) == os.path.normpath(staging_root):
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(os.path.normpath(best)))
        if self.args.should_save:
            if best != self.state.best_model_checkpoint:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
            # An earlier save of this step (a rerun over old checkpoints): replace it.
            if os.path.isdir(final):
                os.replace(final, os.path.join(staging_root, f"{name}.old"))
            os.replace(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            self._rotate_checkpoints_whole(run_dir)
        self.accelerator.wait_for_everyone()  # no process goes on before `checkpoint-N` exists

    def _rotate_checkpoints_whole(self, run_dir: str) -> None:
        """transformers' `rotate_checkpoints` rule (keep `save_total_limit` checkpoints, always the newest and the
        best, delete the oldest others; its own ordering), deleting each checkpoint whole (`discard_checkpoint`): its
        `shutil.rmtree` in place would leave a kill a half-deleted `checkpoint-N` to resume from."""
        limit = self.args.save_total_limit
        checkpoints = sort_checkpoints(run_dir, use_mtime=True)
        if limit is None or limit <= 0 or len(checkpoints) <= limit:
            return
        best = self.state.best_model_checkpoint
        protected = {checkpoints[-1], *([str(Path(best))] if best is not None else [])}
        doomed = [c for c in checkpoints if c not in protected]
        for checkpoint in doomed[: len(checkpoints) - max(limit, len(protected))]:
            discard_checkpoint(checkpoint)

    # ----- logging ----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.routing is not None:
            # Every process calls log() at the same steps: the reductions below are collective.
            summary = self.routing.summary(reduce=self._sum_across_processes)
            self.routing.reset()
            logs.update(flatten(summary))
            # A training log (routing seen since the last one, on every process alike after the reduction): route the
            # probe too, on every process (the forward may be collective). Evaluation and end-of-run logs skip it.
            if self.routing_probe is not None and any(summary.values()):
                logs.update(flatten(self.routing_probe.run(self.model, self._prepare_inputs), PROBE_PREFIX))
            if "learning_rate" in logs and self.stage_args.router_learning_rate is not None:
                logs["router/learning_rate"] = self.router_learning_rate_at(logs["learning_rate"])
            for name, values in self._router_losses.items():
                mean = self._sum_across_processes(
                    torch.tensor([sum(values), len(values)], dtype=torch.float64)
                )
                if mean[1] > 0:
                    logs[f"router/{name}"] = float(mean[0] / mean[1])
            self._router_losses.clear()
            if self.model.config.router_mode in ("gumbel", "modality_aware"):
                logs["gumbel_tau"] = float(self.model.config.gumbel_tau)
        super().log(logs, start_time)

    def _sum_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum").cpu()


class ConnectorAlignmentTrainer(MoeVlmStageTrainer):
    stage = "1"
    description = "cross-modality alignment on captions: the connector (the paper); the tiny recipe adds the LLM's attention"


class ModalityExpertsTrainer(MoeVlmStageTrainer):
    stage = "2"
    description = (
        "modality-specific experts: hard routing (image -> expert 0, text -> expert 1), experts train"
    )


class RouterWarmupTrainer(MoeVlmStageTrainer):
    stage = "2.5"
    description = (
        "router warm-up (optional): only the routers train, Gumbel routing with an annealed temperature"
    )


class UnifiedFinetuneTrainer(MoeVlmStageTrainer):
    stage = "3"
    description = (
        "unified fine-tuning: router, attention and experts train, straight-through Gumbel, instructions"
    )

    @classmethod
    def router_mode(cls, stage_args: StageArguments) -> str | None:
        return "hard" if stage_args.keep_hard_routing else super().router_mode(stage_args)


class DenseControlTrainer(MoeVlmStageTrainer):
    stage = "dense"
    description = "dense control: the Stage 1 model with its dense MLPs, trained on Stage 2's data and budget"


STAGE_TRAINERS: dict[str, type[MoeVlmStageTrainer]] = {
    cls.stage: cls
    for cls in (
        ConnectorAlignmentTrainer,
        ModalityExpertsTrainer,
        RouterWarmupTrainer,
        UnifiedFinetuneTrainer,
        DenseControlTrainer,
    )
}

__all__ = [
    "STAGE_TRAINERS",
    "ConnectorAlignmentTrainer",
    "DenseControlTrainer",
    "ModalityExpertsTrainer",
    "MoeVlmStageTrainer",
    "RouterWarmupTrainer",
    "UnifiedFinetuneTrainer",
]
