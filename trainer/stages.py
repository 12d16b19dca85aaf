"""One `transformers.Trainer` subclass per training stage of the paper (section 2.2).

What a stage trains (parameter groups, see `freezing.py`), how it routes and which split it reads are its recipe's
(`configuration/recipes/<stage>.yaml`, read into `StageArguments`: one place for a stage's settings); constructing
a stage Trainer configures the model accordingly (freezing, router mode, Gumbel temperature, router-loss
coefficients). A stage class adds only what the recipe cannot say: its hooks. The shared base overrides only
`compute_loss` (to request the router outputs, accumulate routing statistics and scale the loss explicitly) and
`log` (to add the statistics, reduced across processes, as TRL adds its metrics).
"""

from __future__ import annotations

from collections import defaultdict
from typing import ClassVar

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer

from .callbacks import (
    CompactPrinterCallback,
    CompactProgressCallback,
    GumbelTauCallback,
    RoutingStatsCallback,
)
from .freezing import apply_trainable
from .recipes import StageArguments
from .routing_stats import RoutingAccumulator, flatten

ROUTER_LOSS_COEFS = ("router_aux_loss_coef", "router_z_loss_coef", "router_specialisation_loss_coef")
# Unweighted router losses the model returns with its router outputs, averaged between logging steps.
ROUTER_LOSS_TERMS = ("load_balancing_loss", "z_loss", "specialisation_loss")


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
        self.configure_model(model, stage_args)
        self.trainable_groups = list(stage_args.trainable)
        self.trainable_params = apply_trainable(model, self.trainable_groups)
        self.is_moe = bool(getattr(model.config, "moe_layers", None))
        self.routing = (
            RoutingAccumulator(model.config.moe_layers, model.config.num_experts) if self.is_moe else None
        )
        self._router_losses: dict[str, list[float]] = defaultdict(list)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        callbacks += [RoutingStatsCallback(self.stage)] if self.is_moe else []
        callbacks += self.stage_callbacks(model, stage_args)
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        for plain, compact in (
            (ProgressCallback, CompactProgressCallback),
            (PrinterCallback, CompactPrinterCallback),
        ):
            if self.pop_callback(plain) is not None:
                self.add_callback(compact)

    # ----- stage configuration ----------------------------------------------------------------------------------
    def router_mode(self, stage_args: StageArguments) -> str | None:
        return stage_args.router_mode  # None (the dense control): the model has no router to set

    def configure_model(self, model, stage_args: StageArguments) -> None:
        """Set the routing of this stage on the model's config (saved with the checkpoint)."""
        mode = self.router_mode(stage_args)
        if mode is not None:
            model.set_router_mode(mode)
        if stage_args.gumbel_tau is not None:
            model.config.gumbel_tau = stage_args.gumbel_tau
        for name in ROUTER_LOSS_COEFS:
            setattr(model.config, name, getattr(stage_args, name))
        model.config.check_moe_vlm()

    def stage_callbacks(self, model, stage_args: StageArguments) -> list:
        if stage_args.gumbel_tau_end is None:
            return []
        if model.config.router_mode not in ("gumbel", "modality_aware"):
            raise ValueError(
                f"gumbel_tau_end anneals the Gumbel temperature, but stage {self.stage} routes "
                f"{model.config.router_mode!r}"
            )
        return [GumbelTauCallback(model.config.gumbel_tau, stage_args.gumbel_tau_end)]

    @property
    def router_losses_in_loss(self) -> bool:
        return any(getattr(self.model.config, name) for name in ROUTER_LOSS_COEFS)

    # ----- loss -------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        track = self.is_moe and model.training
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch, output_router_logits=track)
        if track:
            self.routing.update(
                outputs.router_logits,
                outputs.router_indices,
                outputs.modality_mask,
                inputs.get("attention_mask"),
            )
            for name in ROUTER_LOSS_TERMS:
                if getattr(outputs, name, None) is not None:
                    self._router_losses[name].append(float(getattr(outputs, name).detach()))
        loss = self.scale_loss(outputs, num_items_in_batch) if model.training else outputs.loss
        return (loss, outputs) if return_outputs else loss

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

    # ----- logging ----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.routing is not None:
            # Every process calls log() at the same steps: the reductions below are collective.
            summary = self.routing.summary(reduce=self._sum_across_processes)
            self.routing.reset()
            logs.update(flatten(summary))
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
    description = (
        "cross-modality alignment: only the connector trains (vision tower and LLM frozen), captions"
    )


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

    def router_mode(self, stage_args: StageArguments) -> str | None:
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
