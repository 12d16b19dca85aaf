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


def load_split(
    stage_args: StageArguments,
    split: str,
    image_size: int,
    *,
    return_stats: bool = False,
    lazy_images: bool = False,
):
    """`split` of the recipe's dataset as a `datasets.Dataset` (first `max_train_samples` records when set).

    `shapes`: generated once per (seed, image size) and cached (`shapes_dir` or the shared cache, which the analyses
    read too). `coco`: `coco_json` + `image_root`, the Karpathy `split`. `llava`: `llava_json` + `image_root` (one
    split). Otherwise a folder written by `DatasetDict.save_to_disk`.

    COCO and LLaVA records are checked as they load (`verify`); a bad one raises a `DataError` naming the file and
    the record, or with `on_error: skip` is left out and counted. `return_stats`: also return what was read,
    skipped and why (`trainer.data.LoadStats`; None for Shapes and saved datasets, which are not re-checked).
    `lazy_images`: COCO / LLaVA images stay file references (`Image(decode=False)`) until the collator decodes them,
    so a file `verify` let through (a truncated JPEG under `open`) is a `DataError` naming the record there, not a
    PIL error raised inside `datasets` (which decodes an `Image()` column on access, without our size limits).
    """
    name = stage_args.dataset
    checks = {"on_error": stage_args.on_error, "verify": stage_args.verify, "return_stats": True}
    stats = None
    if name == "shapes":
        from .data import build_shapes

        data = build_shapes(stage_args.shapes_dir, seed=stage_args.shapes_seed, image_size=image_size)
    elif name == "coco":
        from .data import load_coco_karpathy

        records, stats = load_coco_karpathy(
            _require(stage_args.coco_json, "coco_json", name),
            _require(stage_args.image_root, "image_root", name),
            split=split,
            **checks,
        )
        data = {split: records}
    elif name == "llava":
        from .data import load_llava_instruct

        records, stats = load_llava_instruct(
            _require(stage_args.llava_json, "llava_json", name),
            _require(stage_args.image_root, "image_root", name),
            **checks,
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
    if lazy_images and stats is not None:
        from datasets import Image

        records = records.cast_column("image", Image(decode=False))
    if stage_args.max_train_samples is not None:
        records = records.select(range(min(stage_args.max_train_samples, len(records))))
    if len(records) == 0:
        skipped = f" ({stats.n_skipped} bad records skipped)" if stats is not None and stats.n_skipped else ""
        raise ValueError(f"split {split!r} of dataset {name!r} is empty{skipped}")
    return (records, stats) if return_stats else records


def data_summary(stats) -> dict | None:
    """What the completion marker records of a checked load (`LoadStats`): records read, kept, skipped, the reasons
    and the first skipped ids. None when nothing was checked (Shapes, saved datasets)."""
    if stats is None:
        return None
    return {
        "source": stats.file,
        "n_records": stats.n_records,
        "n_loaded": stats.n_loaded,
        "n_skipped": stats.n_skipped,
        "skip_reasons": dict(stats.skip_reasons),
        "skipped_ids": stats.skipped_ids[:20],
    }


__all__ = ["data_summary", "load_split"]
