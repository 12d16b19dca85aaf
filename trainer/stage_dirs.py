"""Stage output directories: the completion marker (`moe_vlm_stage.json`, written last) and the checks that a stage
starts from a finished directory holding the right kind of model.

What makes a directory complete: a stage trains in place, under its final name (its checkpoints and logs live
there, so a killed run resumes in it), and the marker alone says it finished. The marker is removed when a run
starts and written last, atomically (`configuration.atomic.write_atomic`), after the model, the processor, the logs
and the recipe; every reader that needs a finished stage checks for it (`read_marker`, `check_start`, the
reproduction's and the ablations' skip rules, the Space's model picker), so a directory killed at any point is never
taken for a finished one.

Checkpoints are written atomically too (`stages.MoeVlmStageTrainer._save_checkpoint`): into
`CHECKPOINT_STAGING/checkpoint-N`, then renamed to `checkpoint-N`, so a `checkpoint-*` folder is always whole and
`--resume_from_checkpoint true` never picks a half-written one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from configuration.atomic import write_atomic
from configuration.contract import COMPLETION_MARKER

logger = logging.getLogger("moe_vlm.trainer")

# The stage each one normally starts from (the paper's order). Other orders are allowed with a warning, as long as
# the model is of the right kind (an ablation may skip Stage 2.5, or run Stage 3 on Stage 1).
PREVIOUS: dict[str, tuple[str, ...]] = {
    "0": ("pretrain",),
    "1": ("0",),
    "2": ("1",),
    "2.5": ("2",),
    "3": ("2.5", "2"),
    "dense": ("1",),
}
NEEDS_EXPERTS = ("2", "2.5", "3")
# Where a checkpoint is written before it is renamed to `checkpoint-N` beside it: outside transformers'
# `checkpoint-*` pattern (rotation, `get_last_checkpoint`), and skipped by a Hub upload of the folder (`_*`).
CHECKPOINT_STAGING = "_checkpoint-staging"


def _first_command(stage: str) -> str:
    previous = PREVIOUS[stage][-1]
    return f"moe-vlm train --stage {previous} --out DIR" + ("" if previous == "pretrain" else " --from ...")


def read_marker(directory: str | Path, for_stage: str) -> dict:
    """The completion marker of a finished stage directory; a clear error naming the directory otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} does not exist: Stage {for_stage} starts from a finished stage directory; run "
            f"`{_first_command(for_stage)}` first"
        )
    path = directory / COMPLETION_MARKER
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {COMPLETION_MARKER}: it is not a finished stage (an interrupted run, or not a stage "
            f"output); run `{_first_command(for_stage)}` first (or resume it with --resume_from_checkpoint true)"
        )
    return read_json(path)


def read_json(path: Path) -> dict:
    """A stage directory's JSON file (its marker, its `config.json`), refused naming the file when it does not parse
    (a copy cut short, a hand edit)."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}): the file is cut short or was edited; copy or write it again"
        ) from None


def write_marker(directory: str | Path, record: dict) -> Path:
    """Write the marker, atomically; call it last, after everything else the stage writes."""
    return write_atomic(Path(directory) / COMPLETION_MARKER, json.dumps(record, indent=2))


def clear_marker(directory: str | Path) -> None:
    """A re-run invalidates the directory until it finishes again."""
    (Path(directory) / COMPLETION_MARKER).unlink(missing_ok=True)


def discard_checkpoint(checkpoint: str | Path) -> None:
    """Delete a `checkpoint-N` folder without ever leaving part of it under its name: moved into
    `CHECKPOINT_STAGING` beside it first (one rename), deleted there. A kill during the deletion leaves the rest in
    the staging folder, which the next save or `remove_checkpoints` clears."""
    checkpoint = Path(checkpoint)
    trash = checkpoint.parent / CHECKPOINT_STAGING / f"discarded-{checkpoint.name}"
    trash.parent.mkdir(exist_ok=True)
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)
    if not any(trash.parent.iterdir()):
        trash.parent.rmdir()


def remove_checkpoints(directory: str | Path) -> None:
    """Delete the `checkpoint-*` folders of a finished run: they only serve to resume it, and would otherwise be
    published and analysed along with the stage (optimizer states are twice the model's size). Each goes whole
    (`discard_checkpoint`: a kill here leaves whole checkpoints to resume from), then the staging folder, with any
    checkpoint a kill left half-written in it."""
    for checkpoint in Path(directory).glob("checkpoint-*"):
        discard_checkpoint(checkpoint)
    shutil.rmtree(Path(directory) / CHECKPOINT_STAGING, ignore_errors=True)


def check_not_input(from_dir: str | Path | None, out: str | Path) -> None:
    """Refuse an `--out` that is the `--from` directory: each stage writes its own."""
    if from_dir is not None and Path(from_dir).resolve() == Path(out).resolve():
        raise ValueError(f"--out {out} is the --from directory: each stage writes its own directory")


def check_start(stage: str, from_dir: str | Path | None, out: str | Path) -> dict:
    """Check that `stage` can start from `from_dir` and write to `out`; returns the previous stage's marker.

    Refuses: no `--from`, a directory without the marker, writing over the input, and the wrong kind of model
    (not a MoeVlm checkpoint, no vision tower, or no experts for Stages 2, 2.5 and 3).
    """
    if from_dir is None:
        raise ValueError(f"Stage {stage} needs --from: the output directory of Stage {PREVIOUS[stage][0]}")
    check_not_input(from_dir, out)
    from_dir, out = Path(from_dir), Path(out)
    marker = read_marker(from_dir, stage)
    previous = str(marker.get("stage"))
    if stage == "0":
        if previous != "pretrain":
            raise ValueError(
                f"{from_dir} is a Stage {previous} output; Stage 0 starts from the pretraining output"
            )
        return marker
    if marker.get("adapter"):
        raise ValueError(
            f"{from_dir} holds a LoRA adapter, not a model: `moe-vlm merge --adapter {from_dir} --out DIR` writes "
            "the plain model to start from"
        )
    config_path = from_dir / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    what = f"{from_dir} (Stage {previous})"
    start_from = f"start from the output of Stage {' or '.join(PREVIOUS[stage])} (`{_first_command(stage)}`)"
    if config.get("model_type") != "moe_vlm":
        raise ValueError(
            f"{what} holds no MoeVlm model (model_type={config.get('model_type')!r}); Stage {stage} needs one: "
            f"{start_from}"
        )
    if config.get("vision_config") is None:
        raise ValueError(
            f"{what} is a text-only model (no vision tower); Stage {stage} trains on images: {start_from}"
        )
    if stage in NEEDS_EXPERTS and (not config.get("moe_layers") or config.get("num_experts", 1) < 2):
        raise ValueError(
            f"Stage {stage} trains experts and routers, but {what} is not an MoE model "
            f"(moe_layers={config.get('moe_layers')}, num_experts={config.get('num_experts')}): {start_from}"
        )
    if previous not in PREVIOUS[stage]:
        logger.warning(
            "Stage %s usually starts from Stage %s; %s is a Stage %s output",
            stage,
            " or ".join(PREVIOUS[stage]),
            from_dir,
            previous,
        )
    return marker


__all__ = [
    "CHECKPOINT_STAGING",
    "COMPLETION_MARKER",
    "PREVIOUS",
    "check_start",
    "clear_marker",
    "discard_checkpoint",
    "read_marker",
    "remove_checkpoints",
    "write_marker",
]
