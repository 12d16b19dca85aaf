"""The records a stage trains on: the Shapes world (the embedded default), COCO Karpathy captions, LLaVA-Instruct
conversations, or any saved `DatasetDict`. Every source yields the caption or instruct schema the
`MoeVlmCollator` reads."""

from __future__ import annotations

from pathlib import Path

from .recipes import StageArguments


def _require(value: str | None, name: str, dataset: str) -> str:
    if not value:
        raise ValueError(f"dataset {dataset!r} needs --{name}")
    return value


def load_split(stage_args: StageArguments, split: str, image_size: int):
    """`split` of the recipe's dataset as a `datasets.Dataset` (first `max_train_samples` records when set).

    `shapes`: generated once per (seed, image size) and cached (`shapes_dir` or the shared cache, which the analyses
    read too). `coco`: `coco_json` + `image_root`, the Karpathy `split`. `llava`: `llava_json` + `image_root` (one
    split). Otherwise a folder written by `DatasetDict.save_to_disk`.
    """
    name = stage_args.dataset
    if name == "shapes":
        from .data import build_shapes

        data = build_shapes(stage_args.shapes_dir, seed=stage_args.shapes_seed, image_size=image_size)
    elif name == "coco":
        from .data import load_coco_karpathy

        data = {
            split: load_coco_karpathy(
                _require(stage_args.coco_json, "coco_json", name),
                _require(stage_args.image_root, "image_root", name),
                split=split,
            )
        }
    elif name == "llava":
        from .data import load_llava_instruct

        records = load_llava_instruct(
            _require(stage_args.llava_json, "llava_json", name),
            _require(stage_args.image_root, "image_root", name),
        )
        data = {split: records}
    else:
        if not Path(name).is_dir():
            raise FileNotFoundError(
                f"dataset {name!r} is neither shapes, coco, llava nor a saved DatasetDict folder"
            )
        from datasets import Dataset, load_from_disk

        data = load_from_disk(name)
        data = {split: data} if isinstance(data, Dataset) else data
    if split not in data:
        raise ValueError(f"dataset {name!r} has no split {split!r} (it has {', '.join(data)})")
    records = data[split]
    if stage_args.max_train_samples is not None:
        records = records.select(range(min(stage_args.max_train_samples, len(records))))
    if len(records) == 0:
        raise ValueError(f"split {split!r} of dataset {name!r} is empty")
    return records


__all__ = ["load_split"]
