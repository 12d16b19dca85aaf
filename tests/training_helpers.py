"""What the training tests share: a small Shapes world, an upcycled Stage 0 of conftest's tiny config, the
command-line overrides of a short CPU run, and readers for what a finished stage directory holds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import tiny_config
from safetensors.torch import load_file

from trainer.recipes import parse_recipe
from trainer.stage_dirs import COMPLETION_MARKER


def make_shapes(path: Path, image_size: int = 32):
    """A Shapes world small enough for a few training steps."""
    from trainer.data import build_shapes

    build_shapes(
        path,
        image_size=image_size,
        n_train=48,
        n_val=8,
        n_test=4,
        n_instruct=24,
        n_probe=1,
        n_compositional=1,
    )
    return path


def make_stage0(path: Path) -> Path:
    """A Stage 0 directory (upcycled: identical experts) of conftest's tiny config, written by `init_model`."""
    from transformers import MistralConfig, MistralForCausalLM

    from trainer.upcycle import init_model

    cfg = tiny_config()
    dense_fields = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    dense = MistralConfig(
        **{k: getattr(cfg, k) for k in dense_fields},
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        sliding_window=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    vision = {"embed_dim": cfg.vision_config.embed_dim, "vision_cfg": cfg.vision_config.vision_cfg}
    return init_model(path, preset="tiny", mistral=MistralForCausalLM(dense), vision_config=vision)


def quick_args(shapes: Path, steps: int = 4, **fields) -> list[str]:
    """Command-line overrides for a short, quiet CPU run."""
    values = {
        "dataset": shapes,
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "save_strategy": "no",
        "warmup_steps": 0,
        "disable_tqdm": "true",
        "report_to": "none",
        "use_cpu": "true",
        **fields,
    }
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def train(stage: str, out: Path, from_dir: Path | None, overrides: list[str], callbacks=()) -> Path:
    from trainer.run import run

    return run(parse_recipe(stage, out, from_dir=from_dir, overrides=overrides), callbacks=callbacks)


def marker(directory: Path) -> dict:
    return json.loads((directory / COMPLETION_MARKER).read_text())


def routing_lines(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "routing_stats.jsonl").read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))
