"""COCO from local files: Karpathy caption splits (Stages 1–2) and concept images for the probe.

* :func:`load_coco_karpathy` reads ``dataset_coco.json`` (Karpathy & Fei-Fei's split file:
  ``{"images": [{"filepath", "filename", "imgid", "split", "sentids", "cocoid", "sentences":
  [{"tokens", "raw", "imgid", "sentid"}]}], "dataset": "coco"}``) into the caption schema shared with
  Shapes: ``caption`` is the first sentence, ``references`` all of them, ``objects`` empty.
* :func:`sample_coco_concepts` reads the standard instances file (``images``/``annotations``/
  ``categories``) and samples N images per concept the way the paper builds its probe: images that show
  the concept, preferring those where it is the only category, then those where it covers the largest
  area; captions that name the concept come from a COCO captions file when one is given.

Images are referenced by path (``Image()`` feature, decoded on access); they are checked when loading
(``verify``, see :func:`trainer.data.images.check_image`), so a missing or corrupt file is reported
with its record id here rather than failing deep inside training.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .errors import DataError, LoadStats, check_on_error, check_text, handle, logger
from .images import Verify, check_image, check_verify

#: Eight concrete COCO categories (the paper's examples include "car" and "apple").
DEFAULT_COCO_CONCEPTS: tuple[str, ...] = (
    "car",
    "apple",
    "dog",
    "pizza",
    "bicycle",
    "banana",
    "clock",
    "airplane",
)

# Words that name a category in captions, beyond its name and plural.
_SYNONYMS = {
    "airplane": ("plane", "planes", "aeroplane", "jet", "jets", "aircraft", "airliner"),
    "bicycle": ("bike", "bikes", "cycle"),
    "car": ("automobile", "sedan"),
    "dog": ("puppy", "puppies", "pup"),
    "clock": ("clocks",),
    "motorcycle": ("motorbike", "motorbikes"),
    "tv": ("television",),
    "couch": ("sofa",),
}


def _caption_features():
    from datasets import Features, Image, List, Value

    s = Value("string")
    return Features(
        {
            "id": s,
            "image": Image(),
            "caption": s,
            "references": List(s),
            "objects": List({"shape": s, "colour": s, "size": s}),
        }
    )


def _concept_features():
    from datasets import Features, Image, Value

    s = Value("string")
    return Features({"id": s, "image": Image(), "caption": s, "concept": s})


def _read_json(path: str | os.PathLike, what: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} not found: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON in UTF-8 ({e})") from e


def _resolve(image_root: Path, *parts: str) -> Path:
    """``image_root/filepath/filename``, or ``image_root/filename`` when the root already is that folder."""
    full = image_root.joinpath(*[p for p in parts if p])
    if full.exists() or len(parts) < 2:
        return full
    flat = image_root / parts[-1]
    return flat if flat.exists() else full


def _checked(path: Path, rid: str, verify: Verify, stats: LoadStats) -> None:
    mode = check_image(path, rid, verify)
    if mode and mode != "RGB":
        stats.converted_modes[mode] += 1


def _sentences(value: object, rid: str) -> list[str]:
    """The non-empty ``raw`` texts of an entry's ``sentences``, or a DataError saying what is wrong."""
    if value is None:
        value = []
    if not isinstance(value, list):
        raise DataError(rid, f"bad field: 'sentences' must be a list of objects, got {type(value).__name__}")
    texts = []
    for k, sentence in enumerate(value):
        if not isinstance(sentence, Mapping):
            raise DataError(
                rid, f"bad field: sentence {k} must be an object with 'raw', got {sentence!r:.60}"
            )
        texts.append(check_text(sentence.get("raw", ""), rid, f"sentence {k} 'raw'").strip())
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(rid, "empty caption: no non-empty 'raw' sentence; fix the split file or skip it")
    return texts


def load_coco_karpathy(
    karpathy_json: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str | Sequence[str] = "train",
    on_error: str = "raise",
    *,
    verify: Verify = "open",
    return_stats: bool = False,
):
    """COCO captions of one Karpathy split as a ``datasets.Dataset`` in the caption schema.

    Args:
        karpathy_json: path to ``dataset_coco.json``.
        image_root: folder holding ``train2014/`` and ``val2014/`` (``filepath``), or the images directly.
        split: ``"train"``, ``"val"``, ``"test"``, ``"restval"`` or several (``("train", "restval")`` is
            the usual 113k training set).
        on_error: ``"raise"`` a :class:`DataError` naming the record, or ``"skip"`` it and log the count.
        verify: how much of each image to check now (``"none"``, ``"exists"``, ``"open"``, ``"full"``).
        return_stats: also return the :class:`LoadStats` (counts, skipped ids, non-RGB modes).
    """
    from datasets import Dataset

    check_on_error(on_error)
    check_verify(verify)
    splits = {split} if isinstance(split, str) else set(split)
    unknown = splits - {"train", "val", "test", "restval"}
    if unknown:
        raise ValueError(f"unknown Karpathy split(s) {sorted(unknown)}; use train, val, test or restval")
    data = _read_json(karpathy_json, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(
            f"{karpathy_json} is not a Karpathy split file (expected an object with an 'images' list)"
        )
    root = Path(image_root)
    stats = LoadStats(
        source=f"COCO Karpathy {'+'.join(sorted(splits))} ({karpathy_json})", file=str(karpathy_json)
    )
    rows: dict[str, list] = {"id": [], "image": [], "caption": [], "references": [], "objects": []}
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, Mapping):
            stats.n_records += 1
            handle(DataError(f"#{i}", "bad record: an 'images' entry must be an object"), on_error, stats)
            continue
        rid = next(
            (str(entry[k]) for k in ("cocoid", "imgid", "filename") if entry.get(k) is not None), f"#{i}"
        )
        split_name = entry.get("split")
        if isinstance(split_name, str) and split_name not in splits:
            continue
        stats.n_records += 1
        try:
            if not isinstance(split_name, str):
                raise DataError(
                    rid, f"bad field: 'split' must be one of train, val, test, restval, got {split_name!r}"
                )
            sentences = _sentences(entry.get("sentences"), rid)
            filename = entry.get("filename")
            if filename is None or filename == "":
                raise DataError(rid, "image missing: the entry has no 'filename'")
            filename = check_text(filename, rid, "'filename'")
            path = _resolve(root, check_text(entry.get("filepath") or "", rid, "'filepath'"), filename)
            _checked(path, rid, verify, stats)
        except DataError as e:
            handle(e, on_error, stats)
            continue
        rows["id"].append(rid)
        rows["image"].append(str(path))
        rows["caption"].append(sentences[0])
        rows["references"].append(sentences)
        rows["objects"].append([])
    stats.n_loaded = len(rows["id"])
    stats.log()
    ds = Dataset.from_dict(rows, features=_caption_features())
    return (ds, stats) if return_stats else ds


def _name_pattern(concept: str) -> re.Pattern:
    words = {concept, concept + "s", concept + "es", *_SYNONYMS.get(concept, ())}
    return re.compile(
        r"\b(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")\b", re.IGNORECASE
    )


def _captions_by_image(captions_json: str | os.PathLike | None) -> dict[int, list[str]]:
    if captions_json is None:
        return {}
    data = _read_json(captions_json, "COCO captions file")
    by_image: dict[int, list[str]] = defaultdict(list)
    for ann in data.get("annotations", []):
        text = (ann.get("caption") or "").strip()
        if text:
            by_image[ann["image_id"]].append(text)
    return by_image


def sample_coco_concepts(
    instances_json: str | os.PathLike,
    image_root: str | os.PathLike,
    concepts: Iterable[str] = DEFAULT_COCO_CONCEPTS,
    n: int = 50,
    seed: int = 0,
    *,
    captions_json: str | os.PathLike | None = None,
    on_error: str = "raise",
    verify: Verify = "open",
    return_stats: bool = False,
):
    """The concept probe from COCO: ``n`` images per concept, in the concept-probe schema.

    For each concept, candidate images are ranked in three tiers: the concept is the only annotated
    category; it covers the largest annotated area; it is present at all. Tiers are shuffled with
    ``seed`` and filled in order; no image serves two concepts. Each row's caption names the concept: one
    of the image's own captions that does, else one from another image of the concept that does (from
    ``captions_json``, e.g. ``captions_train2017.json``), else "A photo of a {concept}." (counted).

    With ``on_error="raise"`` a missing category, too few images or a bad image file raise
    :class:`DataError`; with ``"skip"`` bad images are replaced by the next candidate and shortfalls are
    logged.
    """
    from datasets import Dataset

    check_on_error(on_error)
    check_verify(verify)
    data = _read_json(instances_json, "COCO instances file")
    if not all(k in data for k in ("images", "annotations", "categories")):
        raise ValueError(
            f"{instances_json} is not a COCO instances file (needs images, annotations, categories)"
        )
    concepts = list(concepts)
    cat_by_name = {c["name"]: c["id"] for c in data["categories"]}
    missing = [c for c in concepts if c not in cat_by_name]
    if missing:
        raise DataError(
            None, f"unknown category: {missing} not in {instances_json}; known: {sorted(cat_by_name)}"
        )
    images = {im["id"]: im for im in data["images"]}
    area: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))  # image -> category -> area
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            area[ann["image_id"]][ann["category_id"]] += float(ann.get("area", 0.0))
    by_image = _captions_by_image(captions_json)

    root = Path(image_root)
    rng = random.Random(seed)
    stats = LoadStats(source=f"COCO concepts ({instances_json})", file=str(instances_json))
    rows: dict[str, list] = {"id": [], "image": [], "caption": [], "concept": []}
    used: set[int] = set()
    n_template = 0
    for concept in concepts:
        cid, pattern = cat_by_name[concept], _name_pattern(concept)
        tiers: list[list[int]] = [[], [], []]
        for img_id in sorted(area):
            cats = area[img_id]
            if cid not in cats or img_id not in images:
                continue
            tier = 0 if len(cats) == 1 else (1 if max(cats, key=cats.get) == cid else 2)
            tiers[tier].append(img_id)
        # Captions of any image of the concept that name it: the fallback when an image's own do not.
        naming = [
            c for img_id in sorted(sum(tiers, [])) for c in by_image.get(img_id, []) if pattern.search(c)
        ]
        taken = 0
        for tier in tiers:
            rng.shuffle(tier)
            for img_id in tier:
                if taken == n:
                    break
                if img_id in used:
                    continue
                rid = f"{concept}/{img_id}"
                stats.n_records += 1
                try:
                    path = _resolve(root, images[img_id]["file_name"])
                    _checked(path, rid, verify, stats)
                except DataError as e:
                    handle(e, on_error, stats)
                    continue
                own = [c for c in by_image.get(img_id, []) if pattern.search(c)]
                if own:
                    caption = rng.choice(own)
                elif naming:
                    caption = rng.choice(naming)
                else:
                    caption, n_template = (
                        f"A photo of {'an' if concept[0] in 'aeiou' else 'a'} {concept}.",
                        n_template + 1,
                    )
                used.add(img_id)
                rows["id"].append(f"concept-{concept}-{img_id}")
                rows["image"].append(str(path))
                rows["caption"].append(caption)
                rows["concept"].append(concept)
                taken += 1
        if taken < n:
            err = DataError(
                concept,
                f"too few images: found {taken} usable images of {concept!r}, need {n}; lower n",
                instances_json,
            )
            if on_error == "raise":
                raise err
            logger.warning("COCO concepts: %s", err)
    if n_template:
        logger.warning(
            "COCO concepts: %d rows use a template caption (no COCO caption names the concept)", n_template
        )
    stats.n_loaded = len(rows["id"])
    stats.log()
    ds = Dataset.from_dict(rows, features=_concept_features())
    return (ds, stats) if return_stats else ds


__all__ = ["DEFAULT_COCO_CONCEPTS", "load_coco_karpathy", "sample_coco_concepts"]
