"""LLaVA-Instruct-150K (Stage 3) from local files, and the conversation checks the collator shares.

A record of ``llava_instruct_150k.json`` (a JSON list; ``.jsonl`` works too)::

    {"id": "000000033471", "image": "000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus in the image is white and red."}, ...]}

``image`` is a file name under the COCO ``train2017`` folder; records without ``image`` are text-only.
The result has the ``instruct`` schema shared with Shapes; ``"user"``/``"assistant"`` roles are
normalised to ``"human"``/``"gpt"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import DataError, LoadStats, check_on_error, check_text, handle
from .images import Verify, check_image, check_verify

IMAGE_MARKER = "<image>"
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")


def check_conversation(
    turns: object, n_images: int, record_id: object, marker: str = IMAGE_MARKER, *, needs_answer: bool = True
) -> None:
    """Raise :class:`DataError` unless ``turns`` is a usable conversation for ``n_images`` images.

    Turns alternate human/gpt starting with human, none is empty, markers appear only in human turns and
    their count equals the number of images. ``needs_answer``: the last turn must be an answer
    (training); otherwise a question (a generation prompt).
    """
    if not isinstance(turns, Sequence) or isinstance(turns, str) or not turns:
        raise DataError(record_id, "empty conversation: 'conversations' must be a non-empty list of turns")
    markers = 0
    for t, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise DataError(record_id, f"bad turn: turn {t} is not an object with 'from' and 'value'")
        role, value = turn.get("from"), turn.get("value")
        expected = HUMAN_ROLES if t % 2 == 0 else GPT_ROLES
        if not isinstance(role, str) or role not in expected:
            raise DataError(
                record_id,
                f"bad turn order: turn {t} is from {role!r}, expected {expected[0]!r} (turns alternate human/gpt)",
            )
        if value is None or not check_text(value, record_id, f"turn {t} ({role}) 'value'").strip():
            raise DataError(record_id, f"empty turn: turn {t} ({role}) has no text")
        if role in GPT_ROLES and marker in value:
            raise DataError(record_id, f"image marker in answer: turn {t} ({role}) contains {marker!r}")
        markers += value.count(marker)
    if markers != n_images:
        raise DataError(
            record_id,
            f"image marker count mismatch: {markers} {marker!r} marker(s) in the conversation but {n_images} "
            f"image(s); put exactly one marker per image in the human turns",
        )
    ends_with_answer = len(turns) % 2 == 0
    if needs_answer and not ends_with_answer:
        raise DataError(
            record_id, "unanswered turn: the conversation ends with a human turn; training needs an answer"
        )
    if not needs_answer and ends_with_answer:
        raise DataError(record_id, "no open question: a generation prompt must end with a human turn")


def _read_records(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"LLaVA-Instruct file not found: {path}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from e
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records (LLaVA-Instruct format)")
    return data


def _features():
    from datasets import Features, Image, List, Value

    s = Value("string")
    return Features({"id": s, "image": Image(), "conversations": List({"from": s, "value": s})})


def load_llava_instruct(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    on_error: str = "raise",
    *,
    verify: Verify = "open",
    return_stats: bool = False,
):
    """LLaVA-Instruct records as a ``datasets.Dataset`` in the ``instruct`` schema.

    Args:
        json_path: ``llava_instruct_150k.json`` (or any file of records in that format, ``.jsonl`` too).
        image_root: the folder the ``image`` names are relative to (COCO ``train2017``).
        on_error: ``"raise"`` a :class:`DataError` naming the record, or ``"skip"`` it and log the count.
        verify: how much of each image to check now (``"none"``, ``"exists"``, ``"open"``, ``"full"``).
        return_stats: also return the :class:`LoadStats`.
    """
    from datasets import Dataset

    check_on_error(on_error)
    check_verify(verify)
    root = Path(image_root)
    records = _read_records(Path(json_path))
    stats = LoadStats(source=f"LLaVA-Instruct ({json_path})", file=str(json_path), n_records=len(records))
    rows: dict[str, list] = {"id": [], "image": [], "conversations": []}
    for i, rec in enumerate(records):
        has_id = isinstance(rec, Mapping) and rec.get("id") is not None
        rid = str(rec["id"]) if has_id else f"#{i}"
        try:
            if not isinstance(rec, Mapping):
                raise DataError(rid, "bad record: expected an object with 'id', 'image', 'conversations'")
            if has_id and not isinstance(rec["id"], (str, int)):
                raise DataError(rid, f"bad field: 'id' must be a string, got {type(rec['id']).__name__}")
            name = rec.get("image")
            path = None
            if name is not None and name != "":  # absent: a text-only record
                path = root / check_text(name, rid, "'image' (a file name under image_root)")
                mode = check_image(path, rid, verify)
                if mode and mode != "RGB":
                    stats.converted_modes[mode] += 1
            turns = rec.get("conversations")
            check_conversation(turns, 1 if path else 0, rid)
        except DataError as e:
            handle(e, on_error, stats)
            continue
        rows["id"].append(rid)
        rows["image"].append(str(path) if path else None)
        rows["conversations"].append(
            [{"from": "human" if t["from"] in HUMAN_ROLES else "gpt", "value": t["value"]} for t in turns]
        )
    stats.n_loaded = len(rows["id"])
    stats.log()
    ds = Dataset.from_dict(rows, features=_features())
    return (ds, stats) if return_stats else ds


__all__ = ["GPT_ROLES", "HUMAN_ROLES", "IMAGE_MARKER", "check_conversation", "load_llava_instruct"]
