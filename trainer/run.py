"""Run one stage from a resolved recipe: what `moe-vlm train` and `accelerate launch -m trainer train` both call.

Every training stage loads the previous stage's directory (model and processor, through the Auto classes), trains
with its stage Trainer, checks that exactly the trainable parameters changed, and writes a directory the next
stage (and `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`) loads: the model (safetensors,
remote code), the processor, `routing_stats.jsonl`, `recipe.yaml`, and the completion marker last.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor, set_seed

from configuration.cli_inputs import check_out_dir

from .callbacks import ProcessInfoCallback
from .data import MoeVlmCollator
from .dense import to_dense
from .freezing import changed_params_check, fingerprints
from .recipes import Recipe, StageArguments, write_resolved_recipe
from .safe_loading import from_pretrained_checked
from .stage_data import data_summary, load_split
from .stage_dirs import (
    COMPLETION_MARKER,
    check_not_input,
    check_start,
    clear_marker,
    remove_checkpoints,
    write_marker,
)
from .stages import STAGE_TRAINERS

logger = logging.getLogger("moe_vlm.trainer")


def run(recipe: Recipe, callbacks=()) -> Path:
    """Run `recipe.stage.stage`; returns its output directory. `callbacks` are added to the stage's Trainer(s).

    Refuses, before anything loads, an output directory that is not a folder or already holds a finished stage:
    training into it would replace that stage (a resumed run's folder has no marker yet, so it still resumes)."""
    # `--out` = `--from` first: its message says more than the finished-stage refusal that would also apply
    check_not_input(recipe.stage.model_name_or_path, recipe.training.output_dir)
    check_out_dir(recipe.training.output_dir, refuse_finished=True)
    stage = recipe.stage.stage
    if stage == "pretrain":
        from .pretrain import run_pretraining

        return run_pretraining(recipe, callbacks)
    if stage == "0":
        return run_upcycling(recipe)
    return run_training_stage(recipe, callbacks)


def run_upcycling(recipe: Recipe) -> Path:
    """Stage 0: `trainer.upcycle.init_model` on the pretrained dense Mistral and vision tower (`--from` the pretraining
    output), or on `--mistral` / `--vision` (paper scale: the preset's Hub weights)."""
    from .pretrain import CLIP_FILE, MISTRAL_DIR
    from .upcycle import init_model

    args, training = recipe.stage, recipe.training
    out = Path(training.output_dir)
    if training.process_index != 0:  # nothing to train: one process writes the directory
        return out
    started = time.perf_counter()
    mistral, vision = args.mistral, args.vision
    if args.model_name_or_path is not None:
        check_start("0", args.model_name_or_path, out)
        source = Path(args.model_name_or_path)
        mistral = mistral or str(source / MISTRAL_DIR)
        vision = vision or str(source / CLIP_FILE)
    elif args.preset == "tiny" and mistral is None:
        logger.warning(
            "Stage 0 without --from: the tiny Mistral and vision tower are random, so the frozen parts carry no "
            "signal; run `moe-vlm train --stage pretrain` first and pass its directory as --from"
        )
    out.mkdir(parents=True, exist_ok=True)
    clear_marker(out)
    write_resolved_recipe(recipe, out)
    init_model(
        out,
        preset=args.preset,
        mistral=mistral,
        vision=vision,
        seed=training.seed,
        allow_pickle=args.allow_pickle,
    )
    # init_model wrote its marker last; add where the weights came from and rewrite it (still the last write).
    marker = json.loads((out / COMPLETION_MARKER).read_text())
    marker.update({"from": args.model_name_or_path, "seconds": round(time.perf_counter() - started, 1)})
    write_marker(out, marker)
    return out


def load_model(args: StageArguments):
    """The previous stage's model: safetensors only unless `--allow_pickle`, refused when its config does not match
    its weights (`trainer.safe_loading`)."""
    kwargs = {"trust_remote_code": True, "dtype": getattr(torch, args.model_dtype)}
    if args.experts_implementation is not None:
        kwargs["experts_implementation"] = args.experts_implementation
    if args.router_implementation is not None:  # a config field: from_pretrained sets it on the loaded config
        kwargs["router_implementation"] = args.router_implementation
    return from_pretrained_checked(
        AutoModelForCausalLM, args.model_name_or_path, allow_pickle=args.allow_pickle, **kwargs
    )


def check_recipe_fits(args: StageArguments, config) -> None:
    """Refuse recipe values the loaded model cannot take, before anything is written: a router mode it does not
    know (or cannot route with its `num_experts_per_tok`)."""
    if args.router_mode is not None and config.moe_layers:
        config.check_router_mode(args.router_mode)


def _resume_argument(value: str | None):
    """`--resume_from_checkpoint true|last` resumes from the newest checkpoint in the output directory."""
    if value is None or str(value).lower() in ("", "false", "no", "none"):
        return None
    return True if str(value).lower() in ("true", "yes", "last") else value


def _logged_losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


def run_training_stage(recipe: Recipe, callbacks=()) -> Path:
    args, training = recipe.stage, recipe.training
    stage = args.stage
    out = Path(training.output_dir)
    check_start(stage, args.model_name_or_path, out)
    started = time.perf_counter()
    set_seed(training.seed)
    # Loaded and checked before the output directory is touched: a bad checkpoint or recipe writes nothing.
    model = load_model(args)
    check_recipe_fits(args, model.config)
    if training.process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        clear_marker(out)
    if stage == "dense":
        model = to_dense(model, args.dense_expert)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    trainer_class = STAGE_TRAINERS[stage]
    split = args.train_split  # the recipe's (StageArguments fills it from the embedded recipe when unset)
    with training.main_process_first(desc="training data"):
        dataset, data_stats = load_split(
            args, split, model.config.vision_config.image_size, return_stats=True, lazy_images=True
        )
    if split == "instruct" or args.dataset == "llava":
        # Instruction-tuned from here on: the saved processor says so, which is all a Hub copy (and the Space
        # hosted on the Hub) can see of how to prompt this model.
        processor.prompt_format = "chat"
    # The collator reads the raw columns (image, caption, conversations).
    training.remove_unused_columns = False

    process_info = ProcessInfoCallback()
    trainer = trainer_class(
        model=model,
        args=training,
        stage_args=args,
        train_dataset=dataset,
        data_collator=MoeVlmCollator(processor, max_length=args.max_length),
        processing_class=processor,
        callbacks=[process_info, *callbacks],
    )
    process_info.tokens_seen = trainer.tokens_seen
    # FSDP2 keeps every parameter under its own name (a DTensor shard, gathered by `fingerprints`); FSDP1 and ZeRO-3
    # flatten them into shared buffers, where the per-parameter check does not apply.
    flat = trainer.is_deepspeed_enabled or (trainer.is_fsdp_enabled and not trainer.accelerator.is_fsdp2)
    before = None if flat else fingerprints(model)
    result = trainer.train(resume_from_checkpoint=_resume_argument(training.resume_from_checkpoint))
    if flat:
        check = {"skipped": "parameters are flattened into shared buffers (FSDP1 / DeepSpeed ZeRO-3)"}
    else:
        check = changed_params_check(before, fingerprints(model), trainer.trainable_params)
        if not check["ok"]:
            logger.warning("Stage %s changed other parameters than its trainable set: %s", stage, check)
    trainer.save_model(str(out))
    trainer.save_state()  # trainer_state.json: the run's whole log history

    if trainer.is_world_process_zero():
        if not args.keep_checkpoints:
            remove_checkpoints(out)
        losses = _logged_losses(trainer.state.log_history)
        probe = getattr(trainer, "routing_probe", None)  # the dense control has no router to probe
        write_resolved_recipe(recipe, out)
        write_marker(
            out,
            {
                "stage": stage,
                "name": trainer_class.description,
                "from": args.model_name_or_path,
                "steps": trainer.state.global_step,
                "train_loss": result.training_loss,
                "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None,
                "seconds": round(time.perf_counter() - started, 1),
                "trainable": trainer.trainable_groups,
                "router_mode": model.config.router_mode if model.config.moe_layers else None,
                "train_split": split,
                # What was trained on: the routing probe may have held records out of the training split.
                "n_train_records": len(trainer.train_dataset),
                # COCO / LLaVA: records read, kept and skipped (on_error: skip), with the reasons.
                **({"data": data_summary(data_stats)} if data_stats is not None else {}),
                "world_size": training.world_size,
                "changed_params_check": check,
                # A LoRA run: the directory holds PEFT's adapter over `from`, not a model (`moe-vlm merge`).
                **({"adapter": trainer.adapter} if trainer.adapter is not None else {}),
                **({"routing_probe": probe.info()} if probe is not None else {}),
            },
        )
    return out


__all__ = ["check_recipe_fits", "load_model", "run", "run_training_stage", "run_upcycling"]
