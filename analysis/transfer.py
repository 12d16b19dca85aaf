"""Transfer: the routing a model learned on one world, measured on another it was never trained on.

The ablation question "does a learned routing pattern transfer?" is answered by running the same routing
measurements `analyze` makes on the training world's test split (`run.routing_report`: expert load and collapse,
purity towards the Stage 2 roles, the crossover test, I(expert; modality)) on a different dataset's test split: the
shifted Shapes world (`trainer.data.shifted`: colours, backgrounds and sizes outside the training ranges) or a COCO
DatasetDict when one is present. Shapes-format data adds grounding (do captions still name the shape and colour?),
and held-out questions rendered in the shifted world add instruction accuracy. What is not Shapes-format (COCO) keeps
the routing measurements and says why the rest was skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from configuration.atomic import write_atomic
from configuration.contract import TRANSFER_FILE


def analyze_transfer(
    model_dir: str | Path,
    out_dir: str | Path,
    data_dir: str | Path,
    *,
    name: str,
    seed: int = 0,
    n_samples: int = 100,
    n_grounding: int = 48,
    grounding_max_new_tokens: int = 16,
    instruction_records: Sequence | None = None,
    batch_size: int = 16,
) -> dict:
    """The routing of `model_dir` on `data_dir`'s test split (a saved DatasetDict), written to
    `out_dir/transfer.json` and returned: {name, data, model, seed, samples, load, crossover, routing_information,
    grounding, instruction (when `instruction_records` are given: `instruction.instruction_accuracy`), seconds}.
    A dense model has no routing to transfer: ValueError."""
    from datasets import load_from_disk

    from trainer.data import MoeVlmCollator

    from ._arrays import jsonable
    from .instruction import instruction_accuracy
    from .run import first_rows, load_checkpoint, routing_report, split_grounding

    started = time.time()
    torch.manual_seed(seed)
    model, processor = load_checkpoint(model_dir)
    if not model.config.moe_layers:
        raise ValueError(f"{model_dir} is a dense model: it has no routing to measure on {data_dir}")
    data = load_from_disk(str(data_dir))
    if "test" not in data:
        raise ValueError(f"transfer data {data_dir} has no `test` split (it has {sorted(data)})")
    rows = first_rows(data["test"], n_samples)
    result = {
        "name": name,
        "data": str(data_dir),
        "model": str(model_dir),
        "seed": seed,
        "samples": {"split": "test", "n": len(rows)},
        **routing_report(model, MoeVlmCollator(processor), rows, seed, batch_size),
        "grounding": split_grounding(
            model, processor, data, n_grounding, grounding_max_new_tokens, batch_size
        ),
    }
    if instruction_records:
        result["instruction"] = instruction_accuracy(
            model, processor, instruction_records, batch_size=batch_size
        )
    result["seconds"] = time.time() - started
    result = jsonable(result)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / TRANSFER_FILE, json.dumps(result, indent=1))
    return result


__all__ = ["analyze_transfer"]
