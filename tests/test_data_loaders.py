"""COCO (Karpathy captions, instances for concept sampling) and LLaVA-Instruct loaders, on small fixtures written
here in the exact real formats, through the same collator; every bad input raises or is counted and logged."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from trainer.data import (
    IGNORE_INDEX,
    DataError,
    MoeVlmCollator,
    load_coco_karpathy,
    load_llava_instruct,
    sample_coco_concepts,
)
from trainer.data.shapes import Scene, ShapeObject, render_scene

torch.set_num_threads(1)


def _photo(
    path: Path, colour: str = "red", shape: str = "circle", mode: str = "RGB", fmt: str = "JPEG"
) -> None:
    """A small 'photo' (a rendered Shapes scene) saved in the given mode and format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = render_scene(Scene((ShapeObject(shape, colour, "large", 0.5, 0.5),), "white"), 48)
    img.convert(mode).save(path, format=fmt)


def _sentence(raw: str, imgid: int, sentid: int) -> dict:
    tokens = raw.lower().rstrip(".").split()
    return {"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid}


@pytest.fixture
def coco(tmp_path):
    """A COCO 2014 tree with a Karpathy `dataset_coco.json` (real keys) holding good and bad entries."""
    root = tmp_path / "coco"
    specs = [  # (cocoid, folder, split, sentences, how the file is written)
        (
            391895,
            "val2014",
            "train",
            ["A man riding a red bike.", "A cyclist on a road.", "Someone rides a bicycle."],
            "rgb",
        ),
        (
            522418,
            "train2014",
            "train",
            ["A woman cutting a pizza.", "Pizza on a table.", "A person slicing food."],
            "rgb",
        ),
        (184613, "train2014", "restval", ["A dog on a couch.", "A puppy resting.", "A brown dog."], "rgb"),
        (
            318219,
            "val2014",
            "val",
            ["A red car parked.", "A car on a street.", "A vehicle by the curb."],
            "rgb",
        ),
        (554625, "val2014", "test", ["Apples in a bowl.", "Green apples.", "A bowl of fruit."], "rgb"),
        (100001, "train2014", "train", ["A grey photo of a clock.", "A clock tower.", "An old clock."], "L"),
        (100002, "train2014", "train", ["A CMYK print of a banana.", "A banana.", "Yellow fruit."], "CMYK"),
        (100003, "train2014", "train", ["A missing image.", "Nothing here.", "Gone."], "missing"),
        (100004, "train2014", "train", ["A corrupt image.", "Broken bytes.", "Garbage."], "corrupt"),
        (100005, "train2014", "train", ["", "   "], "rgb"),
    ]
    images = []
    sentid = 0
    for imgid, (cocoid, folder, split, sents, how) in enumerate(specs):
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        path = root / folder / filename
        if how in ("rgb", "L", "CMYK"):
            _photo(path, mode={"rgb": "RGB"}.get(how, how))
        elif how == "corrupt":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
        sentences = [_sentence(s, imgid, sentid + k) for k, s in enumerate(sents)]
        images.append(
            {
                "filepath": folder,
                "sentids": [s["sentid"] for s in sentences],
                "filename": filename,
                "imgid": imgid,
                "split": split,
                "sentences": sentences,
                "cocoid": cocoid,
            }
        )
        sentid += len(sents)
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return karpathy, root


@pytest.fixture
def instances(tmp_path):
    """`instances_train2017.json` + `captions_train2017.json` (standard keys) and the images they name."""
    root = tmp_path / "train2017"
    categories = [
        {"supercategory": "vehicle", "id": 3, "name": "car"},
        {"supercategory": "food", "id": 53, "name": "apple"},
        {"supercategory": "animal", "id": 18, "name": "dog"},
    ]
    # image id -> [(category id, area)]: singles, dominant and minor appearances, one missing file.
    layout = {
        1: [(3, 900.0)],
        2: [(3, 800.0)],
        3: [(3, 300.0), (18, 50.0)],
        4: [(18, 900.0), (3, 20.0)],
        5: [(53, 400.0)],
        6: [(53, 500.0), (53, 100.0)],
        7: [(53, 300.0), (3, 20.0)],
        8: [(18, 700.0)],
        9: [(18, 600.0)],
        10: [(53, 450.0)],
    }
    missing = {10}
    imgs, anns = [], []
    for img_id, objs in layout.items():
        name = f"{img_id:012d}.jpg"
        imgs.append(
            {
                "license": 1,
                "file_name": name,
                "coco_url": "",
                "height": 48,
                "width": 48,
                "date_captured": "",
                "id": img_id,
            }
        )
        if img_id not in missing:
            _photo(root / name, colour=random.Random(img_id).choice(["red", "green", "blue"]))
        for cat, area in objs:
            anns.append(
                {"segmentation": [[0, 0, 10, 0, 10, 10]], "area": area, "iscrowd": 0, "image_id": img_id,
                 "bbox": [0.0, 0.0, 10.0, 10.0], "category_id": cat, "id": len(anns) + 1}
            )  # fmt: skip
    inst = tmp_path / "instances_train2017.json"
    inst.write_text(
        json.dumps(
            {"info": {}, "licenses": [], "images": imgs, "annotations": anns, "categories": categories}
        )
    )
    caps = {
        1: ["A red car on the road.", "A vehicle parked outside."],
        2: ["Parked outside a house."],  # names no car: the row takes another image's car caption
        5: ["An apple on a table."],
        6: ["Two apples in a bowl."],
        8: ["A dog running.", "A happy puppy."],
        9: ["A puppy in the grass."],
    }
    cap_anns = [
        {"image_id": i, "id": 1000 + k, "caption": c} for i, cs in caps.items() for k, c in enumerate(cs)
    ]
    cap_file = tmp_path / "captions_train2017.json"
    cap_file.write_text(json.dumps({"info": {}, "licenses": [], "images": imgs, "annotations": cap_anns}))
    return inst, cap_file, root


@pytest.fixture
def llava(tmp_path):
    """`llava_instruct_150k.json`-style records: good ones and one of each kind of bad record."""
    root = tmp_path / "train2017"
    for i in (33471, 52846, 334872):
        _photo(root / f"{i:012d}.jpg", colour="blue", shape="square")
    _photo(root / "000000000777.png", mode="RGBA", fmt="PNG")
    good = [
        {
            "id": "000000033471",
            "image": "000000033471.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "The back of the bus features an advertisement."},
            ],
        },
        {
            "id": "000000052846",
            "image": "000000052846.jpg",
            "conversations": [
                {"from": "human", "value": "Is the cat sitting on the keyboard?\n<image>"},
                {"from": "gpt", "value": "Yes, the cat is sitting on the keyboard."},
            ],
        },
        {
            "id": "text-0",
            "conversations": [
                {"from": "human", "value": "Name a colour."},
                {"from": "gpt", "value": "Blue."},
            ],
        },
        {
            "id": "rgba-1",
            "image": "000000000777.png",
            "conversations": [
                {"from": "user", "value": "<image>\nDescribe it."},
                {"from": "assistant", "value": "A red circle."},
            ],
        },
    ]
    bad = [
        {"id": "two-markers", "image": "000000334872.jpg",
         "conversations": [{"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Same."}]},
        {"id": "no-marker", "image": "000000334872.jpg",
         "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A square."}]},
        {"id": "marker-no-image",
         "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]},
        {"id": "missing-file", "image": "000000999999.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]},
        {"id": "empty-answer", "image": "000000334872.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": " "}]},
    ]  # fmt: skip
    return good, bad, root, tmp_path


def _write(tmp: Path, records: list, name: str = "llava_instruct_150k.json") -> Path:
    path = tmp / name
    path.write_text(json.dumps(records))
    return path


# ------------------------------------------------------------------------------------------------- COCO captions


def test_karpathy_split_loads_in_caption_schema(coco, processor, caplog):
    karpathy, root = coco
    with pytest.raises(DataError, match=r"record '100003'.*image file not found"):
        load_coco_karpathy(karpathy, root, "train")
    with caplog.at_level(logging.INFO, logger="moe_vlm.data"):
        ds, stats = load_coco_karpathy(karpathy, root, "train", on_error="skip", return_stats=True)
    assert ds["id"] == ["391895", "522418", "100001", "100002"]
    assert stats.n_skipped == 3 and stats.skipped_ids == ["100003", "100004", "100005"]
    assert "skipped 3 of 7 records" in caplog.text and "100003" in caplog.text
    assert dict(stats.converted_modes) == {"L": 1, "CMYK": 1} and "not RGB" in caplog.text
    row = ds[0]
    assert (
        row["caption"] == "A man riding a red bike." and len(row["references"]) == 3 and row["objects"] == []
    )
    assert row["image"].size == (48, 48)  # val2014 image of a "train" Karpathy entry: filepath is honoured

    assert load_coco_karpathy(karpathy, root, "val")["id"] == ["318219"]
    assert "184613" in load_coco_karpathy(karpathy, root, ("train", "restval"), on_error="skip")["id"]
    assert load_coco_karpathy(karpathy, root / "val2014", "test")["id"] == [
        "554625"
    ]  # root = the folder itself

    with caplog.at_level(logging.INFO, logger="moe_vlm.data"):
        batch = MoeVlmCollator(processor)(list(ds))  # grayscale and CMYK images included
    assert "converted L image to RGB" in caplog.text and "converted CMYK image to RGB" in caplog.text
    n = processor.num_image_tokens
    assert batch["pixel_values"].shape[0] == 4 and batch["modality_mask"].sum(1).tolist() == [n] * 4
    assert (batch["labels"].ne(IGNORE_INDEX) & batch["modality_mask"]).sum() == 0


@pytest.mark.parametrize(
    "cocoid, message",
    [("100003", "image file not found"), ("100004", "corrupt image"), ("100005", "empty caption")],
)
def test_karpathy_bad_entries_name_the_record(coco, tmp_path, cocoid, message):
    karpathy, root = coco
    data = json.loads(karpathy.read_text())
    data["images"] = [im for im in data["images"] if str(im["cocoid"]) in (cocoid, "391895")]
    only = tmp_path / "one.json"
    only.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"record '{cocoid}'.*{message}"):
        load_coco_karpathy(only, root, "train")


def test_truncated_jpeg_is_caught_by_full_verification(coco, tmp_path):
    karpathy, root = coco
    data = json.loads(karpathy.read_text())
    data["images"] = [im for im in data["images"] if im["cocoid"] == 391895]
    one = tmp_path / "truncated.json"
    one.write_text(json.dumps(data))
    image = root / "val2014" / "COCO_val2014_000000391895.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) - 150])  # header intact, the last pixels cut off
    assert len(load_coco_karpathy(one, root, "train", verify="open")) == 1  # the header check cannot see it
    with pytest.raises(DataError, match=r"record '391895'.*corrupt image"):
        load_coco_karpathy(one, root, "train", verify="full")


# ------------------------------------------------------------------------------------------------- COCO concepts


def test_sample_coco_concepts(instances, processor):
    inst, caps, root = instances
    ds = sample_coco_concepts(
        inst, root, concepts=("car", "apple", "dog"), n=2, captions_json=caps, on_error="skip"
    )
    assert ds.column_names == ["id", "image", "caption", "concept"]
    assert ds["concept"] == ["car", "car", "apple", "apple", "dog", "dog"]
    images_used = [i.split("-")[-1] for i in ds["id"]]
    assert len(set(images_used)) == len(images_used)  # no image serves two concepts
    by_concept = {
        c: {int(i.split("-")[-1]) for i in ds["id"] if f"-{c}-" in i} for c in ("car", "apple", "dog")
    }
    assert by_concept["car"] == {1, 2}  # the single-category images come first
    assert by_concept["apple"] == {5, 6}  # 6 has two apples only: still single-category
    assert by_concept["dog"] == {8, 9}
    words = {"car": ("car", "vehicle"), "apple": ("apple",), "dog": ("dog", "puppy")}
    for r in ds:
        assert any(w in r["caption"].lower() for w in words[r["concept"]]), r["caption"]
    row2 = ds[1] if ds["id"][1].endswith("-2") else ds[0]
    assert "car" in row2["caption"].lower()  # image 2's own caption does not name it: borrowed from image 1
    batch = MoeVlmCollator(processor)(
        [{"id": r["id"], "image": r["image"], "caption": r["caption"]} for r in ds]
    )
    assert batch["pixel_values"].shape[0] == 6


def test_sample_coco_concepts_bad_inputs(instances, caplog):
    inst, caps, root = instances
    # After the single-category images, the image where cars cover the largest area (3, not 4 or 7);
    # no captions file: template captions, counted in a warning.
    with caplog.at_level(logging.WARNING, logger="moe_vlm.data"):
        ds = sample_coco_concepts(inst, root, concepts=("car",), n=3)
    assert {int(i.split("-")[-1]) for i in ds["id"]} == {1, 2, 3}
    assert ds["caption"][0] == "A photo of a car." and "template caption" in caplog.text
    with pytest.raises(DataError, match="unknown category"):
        sample_coco_concepts(inst, root, concepts=("unicorn",), n=1)
    with pytest.raises(DataError, match=r"record 'apple/10'.*image file not found"):
        sample_coco_concepts(inst, root, concepts=("apple",), n=3, seed=1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moe_vlm.data"):
        ds, stats = sample_coco_concepts(
            inst, root, concepts=("apple",), n=3, seed=1, on_error="skip", return_stats=True
        )
    assert len(ds) == 3 and stats.skipped_ids == ["apple/10"] and "apple/10" in caplog.text
    with pytest.raises(DataError, match="too few images"):
        sample_coco_concepts(inst, root, concepts=("dog",), n=5)


# ------------------------------------------------------------------------------------------------- LLaVA-Instruct


def test_llava_instruct_loads_and_collates(llava, processor, caplog):
    good, _, root, tmp = llava
    with caplog.at_level(logging.INFO, logger="moe_vlm.data"):
        ds = load_llava_instruct(_write(tmp, good), root)
    assert ds["id"] == ["000000033471", "000000052846", "text-0", "rgba-1"]
    assert ds[2]["image"] is None and ds[0]["image"].size == (48, 48)
    assert [t["from"] for t in ds[3]["conversations"]] == ["human", "gpt"]  # user/assistant normalised
    assert "RGBA: 1" in caplog.text
    batch = MoeVlmCollator(processor)(list(ds))
    n = processor.num_image_tokens
    assert batch["pixel_values"].shape[0] == 3 and batch["modality_mask"].sum(1).tolist() == [n, n, 0, n]
    tok = processor.tokenizer
    answers = [t["value"] for t in good[0]["conversations"][1::2]]
    labelled = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert labelled == sum((tok.encode(a, add_special_tokens=False) + [2] for a in answers), [])
    jsonl = tmp / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in good))
    assert load_llava_instruct(jsonl, root)["id"] == ds["id"]


@pytest.mark.parametrize(
    "rid, message",
    [
        ("two-markers", "marker count mismatch"),
        ("no-marker", "marker count mismatch"),
        ("marker-no-image", "marker count mismatch"),
        ("missing-file", "image file not found"),
        ("empty-answer", "empty turn"),
    ],
)
def test_llava_bad_records_raise_naming_the_record(llava, rid, message):
    good, bad, root, tmp = llava
    path = _write(tmp, good[:1] + [r for r in bad if r["id"] == rid], f"{rid}.json")
    with pytest.raises(DataError, match=rf"record '{rid}'.*{message}"):
        load_llava_instruct(path, root)


def test_llava_skip_counts_and_logs(llava, caplog):
    good, bad, root, tmp = llava
    with caplog.at_level(logging.WARNING, logger="moe_vlm.data"):
        ds, stats = load_llava_instruct(_write(tmp, good + bad), root, on_error="skip", return_stats=True)
    assert len(ds) == len(good) and stats.n_skipped == len(bad) == 5
    assert stats.skipped_ids == [r["id"] for r in bad]
    assert stats.skip_reasons["image marker count mismatch"] == 3
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped 5 of 9 records" in warning.getMessage() and "two-markers" in warning.getMessage()
    with pytest.raises(ValueError, match="on_error"):
        load_llava_instruct(_write(tmp, good), root, on_error="ignore")
