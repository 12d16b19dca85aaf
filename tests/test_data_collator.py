"""MoeVlmCollator: exact labels for captions and multi-turn conversations, padding, text-only samples, images
of any mode, and a clear DataError for every bad record."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from PIL import Image

from trainer.data import IGNORE_INDEX, DataError, MoeVlmCollator, generate_shapes

torch.set_num_threads(1)

BOS, EOS, INST, INST_END, IMG, NEWLINE = 1, 2, 3, 4, 10, 781


@pytest.fixture(scope="module")
def processor64(tokenizer):
    """The real processor at the default Shapes resolution (64 px, 64 placeholders per image)."""
    from transformers import CLIPImageProcessor

    from modeling_moe_vlm import MoeVlmProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return MoeVlmProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=64)


@pytest.fixture(scope="module")
def collator(processor64):
    return MoeVlmCollator(processor64)


def _img(colour=(220, 40, 40), mode="RGB", size=(64, 64)):
    return Image.new("RGB", size, colour).convert(mode)


def _enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def _spans(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of supervised positions in one row of labels."""
    spans, cur = [], []
    for v in labels.tolist():
        if v != IGNORE_INDEX:
            cur.append(v)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def test_processor_contract(processor64):
    tok = processor64.tokenizer
    assert len(tok) == 32768 and tok.bos_token_id == BOS and tok.eos_token_id == EOS
    assert tok.convert_tokens_to_ids(["[INST]", "[/INST]", "[IMG]", "<0x0A>"]) == [
        INST,
        INST_END,
        IMG,
        NEWLINE,
    ]
    assert processor64.image_token_id == IMG and processor64.num_image_tokens == 64


def test_caption_sample_exact_ids_and_labels(collator, tokenizer):
    caption = "A small red circle on a black background."
    batch = collator([{"id": "c0", "image": _img(), "caption": caption}])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0]
    expected = [BOS] + [IMG] * 64 + [NEWLINE] + _enc(tokenizer, caption) + [EOS]
    assert ids == expected
    assert labels[:66].eq(IGNORE_INDEX).all()  # BOS, 64 placeholders, newline
    assert labels[66:].tolist() == ids[66:]  # caption and </s>
    assert tokenizer.decode(_spans(labels)[0], skip_special_tokens=True) == caption
    assert batch["modality_mask"].dtype == torch.bool and batch["modality_mask"][0].sum() == 64
    assert batch["modality_mask"][0, 1:65].all()
    assert batch["pixel_values"].shape == (1, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
    # The caption prompt is exactly what the processor makes of "<image>\n" (so inference matches training).
    prompt = collator.processor(images=[_img()], text="<image>\n")["input_ids"][0].tolist()
    assert prompt == expected[:66]


def test_padding_text_only_and_mixed_batches(processor64, tokenizer):
    collator = MoeVlmCollator(processor64, pad_to_multiple_of=8)
    records = [
        {"id": "a", "image": _img(), "caption": "A red circle."},
        {
            "id": "b",
            "image": None,
            "caption": "Text only, with a somewhat longer caption than the first one.",
        },
    ]
    batch = collator(records)
    B, T = batch["input_ids"].shape
    assert B == 2 and T % 8 == 0
    for key in ("input_ids", "attention_mask", "labels", "modality_mask"):
        assert batch[key].shape == (B, T)
    assert batch["pixel_values"].shape[0] == 1  # one image in the batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for b in range(B):
        n = int(batch["attention_mask"][b].sum())
        assert batch["attention_mask"][b, :n].eq(1).all() and batch["attention_mask"][b, n:].eq(0).all()
        assert batch["input_ids"][b, n:].eq(pad).all() and batch["labels"][b, n:].eq(IGNORE_INDEX).all()
    text_only = batch["input_ids"][1].tolist()
    caption = records[1]["caption"]
    assert text_only[: len(_enc(tokenizer, caption)) + 2] == [BOS] + _enc(tokenizer, caption) + [EOS]
    assert batch["labels"][1, 0] == IGNORE_INDEX and batch["labels"][1, 1] != IGNORE_INDEX
    assert not batch["modality_mask"][1].any()
    assert "pixel_values" not in collator([records[1]])


def test_multi_turn_conversation_labels_only_answers(collator, tokenizer):
    turns = [
        {"from": "human", "value": "<image>\nWhat colour is the square?"},
        {"from": "gpt", "value": "The square is red."},
        {"from": "human", "value": "How many shapes are there?"},
        {"from": "gpt", "value": "There are two shapes."},
    ]
    batch = collator([{"id": "conv", "image": _img(), "conversations": turns}])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0]
    a1, a2 = _enc(tokenizer, "The square is red."), _enc(tokenizer, "There are two shapes.")
    expected = (
        [BOS, INST] + [IMG] * 64 + [NEWLINE] + _enc(tokenizer, "What colour is the square?") + [INST_END] + a1 + [EOS]
        + [INST] + _enc(tokenizer, "How many shapes are there?") + [INST_END] + a2 + [EOS]
    )  # fmt: skip
    assert ids == expected
    assert _spans(labels) == [a1 + [EOS], a2 + [EOS]]
    assert int(labels.ne(IGNORE_INDEX).sum()) == len(a1) + len(a2) + 2
    assert batch["modality_mask"][0].sum() == 64


def test_text_only_conversation_and_image_after_question(collator, tokenizer):
    text_only = {
        "id": "t",
        "image": None,
        "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}],
    }
    after = {
        "id": "after",
        "image": _img(),
        "conversations": [
            {"from": "human", "value": "What is this?\n<image>"},
            {"from": "gpt", "value": "A red square."},
        ],
    }
    batch = collator([text_only, after])
    assert batch["pixel_values"].shape[0] == 1
    assert batch["input_ids"][0, :2].tolist() == [BOS, INST] and not batch["modality_mask"][0].any()
    row = batch["input_ids"][1].tolist()
    first_img = row.index(IMG)
    assert row[2:first_img] == _enc(tokenizer, "What is this?\n") and row[first_img + 64] == INST_END
    assert _spans(batch["labels"][1]) == [_enc(tokenizer, "A red square.") + [EOS]]


def test_shapes_records_of_both_schemas_collate(collator):
    data = generate_shapes(n_train=4, n_val=1, n_test=1, n_instruct=3, n_probe=1, n_compositional=1)
    mixed = [data["train"][0], data["instruct"][0], data["train"][1], data["instruct"][1]]
    batch = collator(mixed)
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert batch["modality_mask"].sum(1).tolist() == [64] * 4
    assert (batch["labels"].ne(IGNORE_INDEX) & batch["modality_mask"]).sum() == 0


def test_generation_batch_is_left_padded_prompt(collator):
    records = [
        {"id": "c", "image": _img(), "caption": "ignored"},
        {
            "id": "q",
            "image": _img(),
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": "Red."},
                {"from": "human", "value": "And the shape?"},
            ],
        },
    ]
    batch = collator.generation_batch(records)
    ids = batch["input_ids"]
    assert ids[:, -1].tolist() == [NEWLINE, INST_END]  # every prompt ends where the answer starts
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1, 0] == 1
    assert batch["modality_mask"].sum(1).tolist() == [64, 64] and batch["pixel_values"].shape[0] == 2


def test_truncation(processor64):
    long_caption = "A red circle. " * 30
    ok = MoeVlmCollator(processor64, max_length=80)(
        [{"id": "long", "image": _img(), "caption": long_caption}]
    )
    assert ok["input_ids"].shape[1] == 80 and ok["modality_mask"].sum() == 64
    record = {"id": "cut", "image": _img(), "caption": "A red circle."}
    full = MoeVlmCollator(processor64)
    ids = full.encode(record).input_ids
    last_image = max(i for i, t in enumerate(ids) if t == full.image_token_id)
    with pytest.raises(
        DataError,
        match=rf"record 'cut'.*truncation would cut the image: the sample has {len(ids)} tokens, its image "
        rf"placeholders end at position {last_image} and max_length is 40",
    ):
        MoeVlmCollator(processor64, max_length=40)([record])


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": "e1", "image": None, "caption": ""}, "empty caption"),
        ({"id": "e2", "image": None, "caption": "   "}, "empty caption"),
        (
            {
                "id": "m1",
                "image": _img(),
                "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi."}],
            },
            "marker count mismatch",
        ),
        (
            {
                "id": "m2",
                "image": None,
                "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hi."}],
            },
            "marker count mismatch",
        ),
        (
            {
                "id": "m3",
                "image": _img(),
                "conversations": [
                    {"from": "human", "value": "<image><image>\nHi"},
                    {"from": "gpt", "value": "Hi."},
                ],
            },
            "marker count mismatch",
        ),
        ({"id": "o1", "image": None, "conversations": [{"from": "gpt", "value": "Hi."}]}, "bad turn order"),
        ({"id": "o2", "image": None, "conversations": [{"from": "human", "value": "Hi"}]}, "unanswered turn"),
        (
            {
                "id": "o3",
                "image": None,
                "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}],
            },
            "empty turn",
        ),
        ({"id": "s1", "image": None, "caption": "a [IMG] forged placeholder"}, "special token in text"),
        ({"id": "x1", "image": b"not an image at all", "caption": "A red circle."}, "corrupt image"),
        (
            {"id": "x2", "image": "/nonexistent/dir/000000123.jpg", "caption": "A red circle."},
            "image file not found",
        ),
    ],
)
def test_bad_records_raise_naming_the_record(collator, record, message):
    with pytest.raises(DataError, match=rf"record '{record['id']}'.*{message}"):
        collator([record])


def test_non_rgb_images_are_converted_with_a_log(collator, caplog):
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(buf, format="JPEG")
    transparent = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    records = [
        {"id": "grey", "image": _img(mode="L"), "caption": "Grey."},
        {"id": "rgba", "image": transparent, "caption": "Transparent."},
        {"id": "cmyk", "image": buf.getvalue(), "caption": "Cmyk."},
        {"id": "pal", "image": _img(mode="P"), "caption": "Palette."},
    ]
    with caplog.at_level(logging.INFO, logger="moe_vlm.data"):
        batch = collator(records)
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    logged = caplog.text
    for rid, mode in (("grey", "L"), ("rgba", "RGBA"), ("cmyk", "CMYK"), ("pal", "P")):
        assert f"record {rid}: converted {mode} image to RGB" in logged
    # Transparent pixels become white, not black: all channels at the processor's maximum.
    white = collator.processor.image_processor(
        images=[Image.new("RGB", (64, 64), "white")], return_tensors="pt"
    )
    assert torch.allclose(batch["pixel_values"][1], white["pixel_values"][0], atol=1e-5)


def test_a_prompt_is_the_conversation_up_to_its_last_question(collator):
    question = [
        {"from": "human", "value": "<image>\nWhat colour is it?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And the shape?"},
    ]
    asked = collator.prompt_ids({"image": _img(), "conversations": question})[0]
    answered = collator.prompt_ids(
        {"image": _img(), "conversations": [*question, {"from": "gpt", "value": "A circle."}]}
    )
    assert asked == answered[0]
    shorter = collator.prompt_ids({"image": _img(), "conversations": question[:1]})[0]
    assert len(shorter) < len(asked)  # the last question was kept, not dropped


def test_an_unnamed_record_is_named_by_its_position(collator):
    with pytest.raises(DataError, match="record '#0'"):
        collator.prompt_ids({"conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]})
    with pytest.raises(DataError, match="record '#3'"):
        collator.prompt_ids({"conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]}, 3)


def test_truncation_keeps_the_image_only_when_its_last_placeholder_fits(processor64):
    record = {"id": "edge", "image": _img(), "caption": "A red circle and more words. " * 4}
    full = MoeVlmCollator(processor64)
    ids = full.encode(record).input_ids
    last_image = max(i for i, t in enumerate(ids) if t == full.image_token_id)
    kept = MoeVlmCollator(processor64, max_length=last_image + 1)([record])
    assert kept["modality_mask"].sum() == 64
    with pytest.raises(DataError, match="truncation would cut the image"):
        MoeVlmCollator(processor64, max_length=last_image)([record])


def test_a_caption_that_is_not_text_is_named_as_such(collator):
    with pytest.raises(DataError, match="bad field: 'caption' must be text, got int"):
        collator([{"id": "n", "image": _img(), "caption": 5}])
    with pytest.raises(DataError, match="not valid Unicode"):
        collator([{"id": "s", "image": _img(), "caption": "A red \ud800 circle."}])
    with pytest.raises(DataError, match="empty caption"):
        collator([{"id": "e", "image": _img(), "caption": None}])


def test_padding_uses_the_tokenizers_pad_token(processor64):
    import copy

    processor = copy.deepcopy(processor64)
    processor.tokenizer.pad_token = processor.tokenizer.eos_token
    pad = processor.tokenizer.pad_token_id
    assert pad not in (None, 0)
    batch = MoeVlmCollator(processor)(
        [
            {"image": _img(), "caption": "A red circle."},
            {"image": _img(), "caption": "A red circle and two stars."},
        ]
    )
    assert batch["input_ids"][0, -1] == pad and batch["attention_mask"][0, -1] == 0


def test_truncation_warns_only_when_no_answer_token_is_left(processor64, caplog):
    record = {"id": "w", "image": _img(), "caption": "A red circle."}
    prompt = 1 + 64 + len(MoeVlmCollator(processor64).newline_ids)  # <s>, the image, the newline
    with caplog.at_level(logging.WARNING, logger="moe_vlm.trainer"):
        MoeVlmCollator(processor64, max_length=prompt + 1)([record])
        assert "no answer token is left" not in caplog.text
        MoeVlmCollator(processor64, max_length=prompt)([record])
    assert "record w: after truncation to" in caplog.text and "no answer token is left" in caplog.text


def test_without_a_pad_token_padding_is_id_0_and_masked(processor64):
    """A tokenizer with no pad token (Mistral's own) pads with id 0 (``<unk>``), never a real token like BOS."""
    import copy

    processor = copy.deepcopy(processor64)
    processor.tokenizer.pad_token = None
    assert processor.tokenizer.pad_token_id is None
    batch = MoeVlmCollator(processor)(
        [
            {"image": _img(), "caption": "A red circle."},
            {"image": _img(), "caption": "A red circle and two stars."},
        ]
    )
    n = int(batch["attention_mask"][0].sum())
    assert n < batch["input_ids"].shape[1]
    assert batch["input_ids"][0, n:].eq(0).all()
    assert batch["attention_mask"][0, n:].eq(0).all() and batch["labels"][0, n:].eq(IGNORE_INDEX).all()


def test_a_bad_record_in_a_dataloader_worker_is_still_a_data_error(collator):
    """With `dataloader_num_workers` > 0 (the paper recipes use 4) the collator runs in a worker process; torch
    re-raises its error in the main process, and it must stay a DataError with the record's message (the command
    line prints a ValueError as one line), not become a RuntimeError carrying the worker's traceback."""
    from torch.utils.data import DataLoader

    records = [{"id": "good", "image": _img(), "caption": "A red circle."}, {"id": "bad", "image": _img()}]
    loader = DataLoader(records, batch_size=2, num_workers=1, collate_fn=collator)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    with pytest.raises(DataError) as in_process:
        collator(records)
    assert str(caught.value) == str(in_process.value) and "Traceback" not in str(caught.value)
    assert "'bad'" in str(caught.value)


def test_an_unnamed_record_encoded_alone_is_record_0(collator):
    with pytest.raises(DataError, match="record '#0'"):
        collator.encode({"image": _img()})


def test_a_caption_record_with_two_images_is_refused(collator):
    with pytest.raises(DataError, match="a caption record takes one image, got 2"):
        collator.encode({"id": "two", "image": [_img(), _img((40, 40, 220))], "caption": "A red circle."})
