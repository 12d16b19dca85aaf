"""Bad data through the real paths: `load_split` (the COCO and LLaVA loaders as `moe-vlm train` calls them), the
`MoeVlmCollator`, and the `moe-vlm train` command itself.

Hypothesis writes random LLaVA-style and COCO-style files (fields missing or of the wrong type; captions and turns
with image markers, special tokens, lone surrogates, far longer than the context; images valid in many modes,
truncated, zero bytes, random bytes, bit-flipped, 1 x 1, or with a header claiming 20000 x 20000 pixels) and checks
that every outcome is a clean batch of tensors or a `DataError` naming the record (and, from a loader, the file),
never another exception; and that no unusable image ever reaches a batch.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer.data import DataError, MoeVlmCollator
from trainer.data.images import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, VERIFY_LEVELS
from trainer.recipes import StageArguments
from trainer.stage_data import load_split

torch.set_num_threads(1)

# The tiny processor makes 16 placeholders per image: 48 tokens leave room for a short answer, so long captions are
# truncated and a marker after a long question falls beyond the cut.
MAX_LENGTH = 48
EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ----- images ---------------------------------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A valid 8 x 8 PNG whose IHDR claims `width` x `height` (CRC recomputed): a decompression bomb's header, in
    70 bytes; decoding it would need width * height * 3 bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature, length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over type + data
    return bytes(data)


def encoded(size: tuple[int, int], mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).convert(mode).save(buf, fmt)
    return buf.getvalue()


MODES = {
    "PNG": ("RGB", "L", "LA", "RGBA", "P", "I;16", "1"),
    "JPEG": ("RGB", "L", "CMYK"),
    "TIFF": ("RGB", "CMYK", "LAB", "F", "I"),
}
# Kinds of image file no batch may ever contain, whatever `verify` let through at load time.
UNUSABLE = {"zero", "random", "tiny", "bomb", "over_cap", "missing"}


BAD_KINDS = ("truncated", "zero", "random", "tiny", "bomb", "over_cap", "flipped", "missing")


@st.composite
def image_payloads(draw, good: bool | None = None) -> tuple[str, bytes | None]:
    """(kind, file bytes or None for a file that is not there); `good`: a valid file, or one of `BAD_KINDS`."""
    good = draw(st.booleans()) if good is None else good
    kind = "valid" if good else draw(st.sampled_from(BAD_KINDS))
    fmt = draw(st.sampled_from(sorted(MODES)))
    low, high = (1, MIN_IMAGE_SIDE - 1) if kind == "tiny" else (MIN_IMAGE_SIDE, 40)
    size = (draw(st.integers(low, high)), draw(st.integers(low, high)))
    data = encoded(size, draw(st.sampled_from(MODES[fmt])), fmt)
    if kind == "truncated":
        data = data[: draw(st.integers(1, len(data) - 1))]
    elif kind == "flipped":
        flipped = bytearray(data)
        flipped[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        data = bytes(flipped)
    elif kind == "zero":
        data = b""
    elif kind == "random":
        data = draw(st.binary(min_size=1, max_size=300))
    elif kind == "bomb":
        data = png_claiming(20000, 20000)  # 400 MP: PIL's own hard limit fires first
    elif kind == "over_cap":
        side = int(MAX_IMAGE_PIXELS**0.5) + 100  # above our cap, below PIL's warning: only our check stops it
        data = png_claiming(side, side)
    elif kind == "missing":
        data = None
    return kind, data


# ----- text and fields ------------------------------------------------------------------------------------------------

MISSING = object()  # the field is left out of the record
LONG = "a red circle on a grey field " * 12  # ~100 tokens: far past MAX_LENGTH
# Clean text: any letters, digits, punctuation, symbols and combining marks, but no brackets (no special token).
clean_texts = st.one_of(
    st.sampled_from(["A red circle.", "Two blue squares on white.", LONG]),
    st.text(
        st.characters(categories=["L", "N", "P", "Zs", "So", "Mn"], exclude_characters="<>[]"), max_size=20
    ).map(lambda t: t + " ok"),
)
BAD_PIECES = ["<image>", "[INST]", "[/INST]", "[IMG]", "<s>", "</s>", "", "   "]
bad_texts = st.one_of(
    st.tuples(clean_texts, st.sampled_from(BAD_PIECES), clean_texts).map("".join),
    st.sampled_from(["", "   ", "\n"]),
    st.text(st.characters(categories=["Cs", "Cc"]), min_size=1, max_size=3),  # lone surrogates, control bytes
)
present_junk = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
junk = st.one_of(st.none(), present_junk)  # a value of the wrong type


def record(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if v is not MISSING}


LLAVA_FAULTS = (None, None, None, "id", "image_field", "image_file", "conversations", "role", "value", "text",
                "marker_late", "marker_in_answer", "unanswered")  # fmt: skip


@st.composite
def llava_record(draw, i: int, images: dict) -> dict:
    """One LLaVA-Instruct record: clean, or with one fault (a field of the wrong type or missing, a bad image file,
    bad text in a turn, a misplaced image marker)."""
    fault = draw(st.sampled_from(LLAVA_FAULTS))
    has_image = fault in ("image_field", "image_file", "marker_late") or draw(st.booleans())
    turns = [
        {"from": draw(st.sampled_from(("human", "user") if t % 2 == 0 else ("gpt", "assistant"))),
         "value": draw(clean_texts)}
        for t in range(2 * draw(st.integers(1, 2)))
    ]  # fmt: skip
    fields = {
        "id": draw(st.one_of(st.text(min_size=1, max_size=8), st.integers(0, 99))),
        "conversations": turns,
    }
    if has_image:
        kind, data = draw(image_payloads(good=fault != "image_file"))
        name = f"{i}-{kind}.{draw(st.sampled_from(['png', 'jpg']))}"
        images[name] = data
        fields["image"] = name
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
    t = draw(st.integers(0, len(turns) - 1))
    if fault == "id":
        fields["id"] = draw(st.one_of(st.floats(allow_nan=False), st.lists(st.integers(), max_size=2)))
    elif fault == "image_field":
        fields["image"] = draw(present_junk)
    elif fault == "conversations":
        fields["conversations"] = draw(st.one_of(junk, clean_texts, st.just([]), st.just(MISSING)))
    elif fault == "role":
        turns[t]["from"] = draw(st.one_of(st.sampled_from(["system", "gpt", "human", ""]), junk))
    elif fault == "value":
        turns[t]["value"] = draw(st.one_of(junk, st.just(MISSING)))
        turns[t] = record(turns[t])
    elif fault == "text":
        turns[t]["value"] = draw(bad_texts)
    elif fault == "marker_late":
        turns[0]["value"] = LONG + turns[0]["value"].replace("<image>\n", "") + "\n<image>"
    elif fault == "marker_in_answer":
        turns[1]["value"] += " <image>"
    elif fault == "unanswered":
        turns.pop()
    return record(fields)


@st.composite
def llava_files(draw):
    """(records, {file name: image payload}) of a LLaVA-Instruct json file."""
    images: dict = {}
    records = [draw(llava_record(i, images)) for i in range(draw(st.integers(1, 4)))]
    return records, images


COCO_FAULTS = (
    None,
    None,
    None,
    "cocoid",
    "filepath",
    "filename",
    "split",
    "sentences",
    "raw",
    "text",
    "image_file",
)


@st.composite
def coco_entry(draw, i: int, images: dict) -> dict:
    """One Karpathy `images` entry: clean, or with one fault."""
    fault = draw(st.sampled_from(COCO_FAULTS))
    kind, data = draw(image_payloads(good=fault != "image_file"))
    name = f"{i}-{kind}.jpg"
    images[name] = data
    sentences = [{"raw": draw(clean_texts), "tokens": []} for _ in range(draw(st.integers(1, 3)))]
    entry = {"cocoid": i, "filepath": "train2014", "filename": name, "split": "train", "sentences": sentences}
    missing_or_junk = st.one_of(junk, st.just(MISSING))
    if fault in ("cocoid", "filepath", "filename", "split", "sentences"):
        entry[fault] = draw(missing_or_junk)
    elif fault == "raw":
        sentences[0] = record({"raw": draw(missing_or_junk), "tokens": []})
    elif fault == "text":
        sentences[0]["raw"] = draw(bad_texts)
    return record(entry)


@st.composite
def coco_files(draw):
    """(Karpathy split file, {file name: image payload}) under image_root/train2014."""
    images: dict = {}
    entries = [draw(coco_entry(i, images)) for i in range(draw(st.integers(1, 4)))]
    return {"images": entries, "dataset": "coco"}, images


# ----- the property ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collator(tokenizer):
    from conftest import tiny_config

    from configuration import build_processor

    return MoeVlmCollator(build_processor(tiny_config(), tokenizer=tokenizer), max_length=MAX_LENGTH)


def check_batch(batch: dict, rows: list[dict], collator: MoeVlmCollator) -> None:
    """A clean batch: tensors of matching shapes, the image placeholders of every image kept, no unusable image."""
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
    n, length = batch["input_ids"].shape
    assert n == len(rows) and length <= MAX_LENGTH
    assert (
        batch["labels"].shape == batch["attention_mask"].shape == batch["modality_mask"].shape == (n, length)
    )
    with_image = [row.get("image") is not None for row in rows]
    per_row = batch["modality_mask"].sum(1).tolist()
    assert per_row == [collator.num_image_tokens * has for has in with_image]
    assert batch.get("pixel_values", torch.zeros(0)).shape[0] == sum(with_image)
    for row in rows:
        if row.get("image") is not None:
            assert Path(row["image"]["path"]).name.split("-")[1].split(".")[0] not in UNUSABLE, row["id"]


def through_training_path(dataset: str, data: object, images: dict, verify: str, collator) -> list[str]:
    """Write the files, load them as `moe-vlm train` does under both policies, collate what loads. Returns the
    outcomes (for the statistics)."""
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / ("train2014" if dataset == "coco" else "images")
        root.mkdir()
        for name, payload in images.items():
            if payload is not None:
                (root / name).write_bytes(payload)
        json_path = Path(tmp) / f"{dataset}.json"
        json_path.write_text(json.dumps(data))  # ensure_ascii: lone surrogates are written as \ud800 escapes
        paths = {"coco_json": str(json_path)} if dataset == "coco" else {"llava_json": str(json_path)}
        image_root = root.parent if dataset == "coco" else root
        for on_error in ("raise", "skip"):
            args = StageArguments(
                stage="1",
                dataset=dataset,
                image_root=str(image_root),
                on_error=on_error,
                verify=verify,
                **paths,
            )
            try:
                rows, stats = load_split(args, "train", 32, return_stats=True, lazy_images=True)
            except DataError as error:
                assert on_error == "raise", f"skip raised {error}"
                assert str(error).startswith(f"{json_path}: record "), str(error)
                outcomes.append("load: DataError")
                continue
            except (
                ValueError
            ) as error:  # every record was skipped or none is in the split: a dataset-level error
                assert type(error) is ValueError and "is empty" in str(error), repr(error)
                outcomes.append("load: empty")
                continue
            assert stats.n_loaded + stats.n_skipped == stats.n_records == len(rows) + stats.n_skipped
            rows = list(rows)
            try:
                batch = collator(rows)
            except DataError as error:
                assert error.record_id in {row["id"] for row in rows}, str(error)
                outcomes.append("collate: DataError")
                continue
            check_batch(batch, rows, collator)
            outcomes.append("batch")
    return outcomes


@EXAMPLES
@given(files=llava_files(), verify=st.sampled_from(VERIFY_LEVELS))
def test_random_llava_files_give_a_batch_or_a_data_error(collator, files, verify):
    records, images = files
    for outcome in through_training_path("llava", records, images, verify, collator):
        event(outcome)


@EXAMPLES
@given(files=coco_files(), verify=st.sampled_from(VERIFY_LEVELS))
def test_random_coco_files_give_a_batch_or_a_data_error(collator, files, verify):
    data, images = files
    for outcome in through_training_path("coco", data, images, verify, collator):
        event(outcome)


@st.composite
def raw_records(draw):
    """A record as a user might hand the collator: image as bytes, junk or none; caption or turns."""
    kind, data = draw(image_payloads(good=draw(st.sampled_from([True, True, False]))))
    image = draw(st.one_of(st.just(data), st.just(data), st.none(), junk, st.just(MISSING)))
    fields = {"id": draw(st.one_of(st.text(max_size=6), st.just(MISSING))), "image": image}
    if draw(st.booleans()):
        fields["caption"] = draw(st.one_of(clean_texts, clean_texts, bad_texts, junk, st.just(MISSING)))
    else:
        turns = draw(llava_record(0, {})).get("conversations")
        fields["conversations"] = turns
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        value = first.get("value")
        if isinstance(image, bytes) and isinstance(value, str) and "<image>" not in value:
            first["value"] = "<image>\n" + value
    return kind, record(fields)


@EXAMPLES
@given(batch=st.lists(raw_records(), min_size=1, max_size=2))
def test_random_records_through_the_collator(collator, batch):
    kinds, records = zip(*batch, strict=True)
    try:
        out = collator(list(records))
    except DataError as error:
        assert "record" in str(error)
        event("DataError")
        return
    event("batch")
    assert all(isinstance(v, torch.Tensor) for v in out.values())
    for kind, rec in batch:
        assert not (isinstance(rec.get("image"), bytes) and kind in UNUSABLE), rec.get("id")


# ----- each bad input, by name ----------------------------------------------------------------------------------------

GOOD_TURNS = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red circle."}]
BAD_IMAGES = {  # file bytes -> the problem the error names
    "zero-byte": (b"", "empty image"),
    "truncated": (encoded((32, 32), "RGB", "PNG")[:60], "corrupt image"),
    "random-bytes": (bytes(range(256)) * 2, "corrupt image"),
    "1x1": (encoded((1, 1), "RGB", "PNG"), "image too small: 1 x 1"),
    "bomb-20000x20000": (png_claiming(20000, 20000), "image too large"),
    "over-cap-7000x7000": (png_claiming(7000, 7000), "image too large: 7000 x 7000"),
}
BAD_LLAVA = {  # record -> problem
    "image-int": ({"image": 7, "conversations": GOOD_TURNS}, "bad field: 'image'"),
    "image-missing-file": ({"image": "nope.png", "conversations": GOOD_TURNS}, "image file not found"),
    "conversations-str": ({"conversations": "hello"}, "empty conversation"),
    "conversations-missing": ({}, "empty conversation"),
    "turn-not-object": ({"conversations": ["hi", "there"]}, "bad turn"),
    "value-int": ({"conversations": [{"from": "human", "value": 3}, GOOD_TURNS[1]]}, "bad field: turn 0"),
    "value-surrogate": (
        {"conversations": [{"from": "human", "value": "hi \ud800"}, GOOD_TURNS[1]]},
        "invalid text",
    ),
    "from-list": ({"conversations": [{"from": ["human"], "value": "hi"}, GOOD_TURNS[1]]}, "bad turn order"),
    "id-list": ({"id": ["a"], "conversations": GOOD_TURNS[:0]}, "bad field: 'id'"),
}


def write_llava(tmp: Path, rec: dict, image: bytes | None = None) -> StageArguments:
    root = tmp / "images"
    root.mkdir(exist_ok=True)
    if image is not None:
        (root / "bad.png").write_bytes(image)
        rec = {"image": "bad.png", "conversations": GOOD_TURNS, **rec}
    json_path = tmp / "llava.json"
    json_path.write_text(json.dumps([{"id": "bad", **rec}]))
    return StageArguments(stage="1", dataset="llava", llava_json=str(json_path), image_root=str(root))


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_each_bad_image_is_named_with_its_file_and_record(tmp_path, case):
    data, problem = BAD_IMAGES[case]
    args = write_llava(tmp_path, {}, data)
    with pytest.raises(DataError) as caught:
        load_split(args, "train", 32)
    assert str(caught.value).startswith(f"{args.llava_json}: record 'bad': {problem}"), str(caught.value)
    args.on_error = "skip"
    with pytest.raises(ValueError, match=r"is empty \(1 bad records skipped\)"):
        load_split(args, "train", 32)


@pytest.mark.parametrize("case", sorted(BAD_LLAVA))
def test_each_mistyped_llava_field_is_named(tmp_path, case):
    rec, problem = BAD_LLAVA[case]
    args = write_llava(tmp_path, rec)
    rid = rec.get("id", "bad")
    with pytest.raises(DataError) as caught:
        load_split(args, "train", 32)
    assert str(caught.value).startswith(f"{args.llava_json}: record {str(rid)!r}: {problem}"), str(
        caught.value
    )


BAD_COCO = {
    "entry-not-object": ("just a string", "#0", "bad record"),
    "split-int": ({"cocoid": 1, "split": 3}, "1", "bad field: 'split'"),
    "split-list": ({"cocoid": 1, "split": ["train"]}, "1", "bad field: 'split'"),
    "sentences-str": ({"cocoid": 1, "sentences": "A cat."}, "1", "bad field: 'sentences'"),
    "raw-int": ({"cocoid": 1, "sentences": [{"raw": 5}]}, "1", "bad field: sentence 0 'raw'"),
    "raw-empty": ({"cocoid": 1, "sentences": [{"raw": "  "}]}, "1", "empty caption"),
    "filename-missing": ({"cocoid": 1, "filename": None}, "1", "image missing"),
    "filename-list": ({"cocoid": 1, "filename": ["a.jpg"]}, "1", "bad field: 'filename'"),
}


@pytest.mark.parametrize("case", sorted(BAD_COCO))
def test_each_mistyped_coco_field_is_named(tmp_path, case):
    entry, rid, problem = BAD_COCO[case]
    (tmp_path / "train2014").mkdir()
    (tmp_path / "train2014" / "a.jpg").write_bytes(encoded((32, 32), "RGB", "JPEG"))
    if isinstance(entry, dict):
        good = {
            "filepath": "train2014",
            "filename": "a.jpg",
            "split": "train",
            "sentences": [{"raw": "A cat."}],
        }
        entry = {**good, **entry}
    json_path = tmp_path / "dataset_coco.json"
    json_path.write_text(json.dumps({"images": [entry]}))
    args = StageArguments(stage="1", dataset="coco", coco_json=str(json_path), image_root=str(tmp_path))
    with pytest.raises(DataError) as caught:
        load_split(args, "train", 32)
    assert str(caught.value).startswith(f"{json_path}: record {rid!r}: {problem}"), str(caught.value)


def test_captions_longer_than_the_context(collator):
    """A caption far past `max_length` is truncated after the image: all placeholders kept, the first caption tokens
    still supervised; a conversation whose marker comes after a long question refuses instead (the cut would drop the
    image)."""
    image = Image.new("RGB", (32, 32), "red")
    long_caption = "A red circle on a grey field. " * 40
    batch = collator([{"id": "long", "image": image, "caption": long_caption}])
    assert batch["input_ids"].shape == (1, MAX_LENGTH)
    assert batch["modality_mask"].sum() == collator.num_image_tokens
    assert (
        batch["labels"] != -100
    ).sum() == MAX_LENGTH - collator.num_image_tokens - 2  # minus BOS and newline
    late = [{"from": "human", "value": long_caption + "\n<image>"}, {"from": "gpt", "value": "Yes."}]
    with pytest.raises(DataError, match=r"record 'late'.*truncation would cut the image"):
        collator([{"id": "late", "image": image, "conversations": late}])
    with pytest.raises(DataError, match=r"record 'int'.*bad field: 'caption' must be text, got int"):
        collator([{"id": "int", "image": image, "caption": 42}])


# ----- through `moe-vlm train` ----------------------------------------------------------------------------------------


def test_train_command_names_the_bad_record_or_skips_it(tmp_path, capsys, caplog):
    """`moe-vlm train` on a LLaVA-format file with one truncated image: by default it stops with one line naming the
    file, the record and the problem (exit status 2, no traceback); with `--on_error skip` it trains on the rest and
    the completion marker counts the skipped record."""
    from training_helpers import make_stage0, marker, quick_args

    from moe_vlm_cli import main

    root = tmp_path / "images"
    root.mkdir()
    records = []
    for i in range(8):
        Image.new("RGB", (32, 32), ("red", "blue")[i % 2]).save(root / f"{i}.png")
        turns = [
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": ("Red.", "Blue.")[i % 2]},
        ]
        records.append({"id": f"good-{i}", "image": f"{i}.png", "conversations": turns})
    (root / "bad.png").write_bytes(encoded((32, 32), "RGB", "PNG")[:60])
    records.insert(3, {"id": "bad-1", "image": "bad.png", "conversations": records[0]["conversations"]})
    json_path = tmp_path / "llava.json"
    json_path.write_text(json.dumps(records))
    stage0 = make_stage0(tmp_path / "stage0")
    fields = quick_args(
        "llava", steps=2, llava_json=json_path, image_root=root, routing_probe_split="none", logging_steps=1
    )
    argv = ["train", "--stage", "1", "--from", str(stage0), "--out", str(tmp_path / "out"), *fields]

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"moe-vlm train: error: {json_path}: record 'bad-1': corrupt image" in err.splitlines()[-1]

    with caplog.at_level(logging.WARNING, logger="moe_vlm.data"):
        assert main([*argv, "--on_error", "skip"]) == 0
    assert "skipped 1 of 9 records" in caplog.text and "bad-1" in caplog.text
    data = marker(tmp_path / "out")["data"]
    assert data["n_skipped"] == 1 and data["skipped_ids"] == ["bad-1"] and data["n_loaded"] == 8
    assert data["source"] == str(json_path) and data["skip_reasons"] == {"corrupt image": 1}
