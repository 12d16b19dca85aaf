"""One prompt format (issue #12, part 7): the processor's chat template is the Mistral `[INST]` format the collator
trained on, token for token; captioning, `route` and the Space build prompts through it; caption means leave BOS out
wherever left padding puts it."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import yaml
from conftest import tiny_config
from PIL import Image

from analysis.captioning import (
    CHAT_CAPTION_INSTRUCTION,
    RAW_CAPTION_PROMPT,
    caption_prompt,
    evaluation_prompt_formats,
    training_prompt_format,
)
from configuration.contract import COMPLETION_MARKER, RECIPE_FILE
from modeling_moe_vlm.processing_moe_vlm import MOE_VLM_CHAT_TEMPLATE
from trainer.data import IGNORE_INDEX, MoeVlmCollator

BOS, EOS, INST, INST_END, IMG, NEWLINE = 1, 2, 3, 4, 10, 781
N_IMG = 16  # the tiny config's placeholders per image


@pytest.fixture
def collator(processor):
    return MoeVlmCollator(processor)


def _enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def reference_conversation(tokenizer, turns: list[dict], n_image_tokens: int) -> tuple[list[int], list[int]]:
    """The Stage-3 ids and labels as the collator built them by hand before the chat template (git 16b5788): each
    text piece encoded on its own, special ids added around them, a newline after an image as the byte token."""
    ids, labels = [BOS], [IGNORE_INDEX]
    for turn in turns:
        value = turn["value"].strip()
        if turn["from"] == "human":
            piece = [INST]
            for i, part in enumerate(value.split("<image>")):
                if i > 0:
                    piece += [IMG] * n_image_tokens
                    if part.startswith("\n"):
                        piece, part = piece + [NEWLINE], part[1:]
                if part.strip():
                    piece += _enc(tokenizer, part)
            piece += [INST_END]
            ids, labels = ids + piece, labels + [IGNORE_INDEX] * len(piece)
        else:
            answer = _enc(tokenizer, value) + [EOS]
            ids, labels = ids + answer, labels + answer
    return ids, labels


def shapes_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    from trainer.data.shapes import conversation, random_scene

    rng = random.Random(seed)
    return [conversation(random_scene(rng), rng) for _ in range(n)]


# ----- the template is the training format, token for token -----------------------------------------------------------
def test_conversation_ids_and_labels_are_unchanged_token_for_token(collator, tokenizer, red_image):
    turns = [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"},
        {"from": "gpt", "value": "The circle is red."},
        {"from": "human", "value": "How many shapes are there?"},
        {"from": "gpt", "value": "There is one shape."},
    ]
    sample = collator.encode({"image": red_image, "conversations": turns})
    tokens = tokenizer.convert_ids_to_tokens(sample.input_ids)
    # Spelled out: BOS, [INST], the placeholders, the newline byte, "▁What" (a piece of its own), ... [/INST] "▁The".
    assert tokens[: 3 + N_IMG] == ["<s>", "[INST]"] + ["[IMG]"] * N_IMG + ["<0x0A>"]
    assert tokens[3 + N_IMG :] == (
        [
            "▁What",
            "▁colour",
            "▁is",
            "▁the",
            "▁circle",
            "?",
            "[/INST]",
            "▁The",
            "▁circle",
            "▁is",
            "▁red",
            ".",
            "</s>",
        ]
        + ["[INST]", "▁How", "▁many", "▁shapes", "▁are", "▁there", "?", "[/INST]"]
        + ["▁There", "▁is", "▁one", "▁shape", ".", "</s>"]
    )
    assert (sample.input_ids, sample.labels) == reference_conversation(tokenizer, turns, N_IMG)


def test_every_generated_shapes_conversation_encodes_as_before(collator, tokenizer, red_image):
    """300 Shapes instruct conversations (image before the question, one in ten after it, 2-4 turns)."""
    conversations = shapes_conversations(300)
    assert any(c[0]["value"].endswith("<image>") for c in conversations)  # both marker positions are covered
    for turns in conversations:
        sample = collator.encode({"image": red_image, "conversations": turns})
        assert (sample.input_ids, sample.labels) == reference_conversation(tokenizer, turns, N_IMG), turns


def test_caption_format_is_unchanged_and_the_raw_prompt_now_matches_it(
    collator, processor, tokenizer, red_image
):
    sample = collator.encode({"image": red_image, "caption": "A red circle."})
    assert sample.input_ids == [BOS] + [IMG] * N_IMG + [NEWLINE] + _enc(tokenizer, "A red circle.") + [EOS]
    assert sample.labels[: 2 + N_IMG] == [IGNORE_INDEX] * (2 + N_IMG)
    raw = processor(images=[red_image], text=["<image>\nA red circle."])["input_ids"][0].tolist()
    # The processor used to encode the whole string, giving "A" (no "▁") after the newline: not what was trained.
    assert tokenizer.convert_ids_to_tokens(raw[-5:]) == ["<0x0A>", "▁A", "▁red", "▁circle", "."]
    assert raw == sample.input_ids[:-1]
    assert (
        processor(images=[red_image], text=[RAW_CAPTION_PROMPT])["input_ids"][0].tolist()
        == (collator.prompt_ids({"image": red_image, "caption": "ignored"})[0])
    )


def test_collated_conversation_batch_keeps_pixel_values_in_record_order(collator, red_image):
    blue = Image.new("RGB", (32, 32), (20, 20, 220))
    records = [
        {"image": red_image, "conversations": shapes_conversations(1, seed=1)[0]},
        {"image": blue, "caption": "A blue square."},
        {
            "image": None,
            "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}],
        },
    ]
    batch = collator(records)
    expected = collator.processor.image_processor(images=[red_image, blue], return_tensors="pt")[
        "pixel_values"
    ]
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.allclose(batch["pixel_values"], expected)
    assert int(batch["modality_mask"].sum()) == 2 * N_IMG


# ----- the template in transformers' own API ------------------------------------------------------------------------
def test_template_saves_and_loads_with_the_processor(processor, tmp_path):
    from transformers import AutoProcessor

    from configuration import build_processor

    chat = build_processor(tiny_config(), tokenizer=processor.tokenizer, prompt_format="chat")
    chat.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == MOE_VLM_CHAT_TEMPLATE
    assert json.loads((tmp_path / "processor_config.json").read_text())["prompt_format"] == "chat"
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.chat_template == MOE_VLM_CHAT_TEMPLATE and loaded.prompt_format == "chat"
    assert processor.prompt_format == "raw"  # build_processor's default: captions until Stage 3
    with pytest.raises(ValueError, match="prompt_format"):
        build_processor(tiny_config(), tokenizer=processor.tokenizer, prompt_format="instruct")


def test_apply_chat_template_with_image_items(processor, tokenizer, red_image):
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image", "image": red_image}, {"type": "text", "text": "What is it?"}],
        },
        {"role": "assistant", "content": "A red circle."},
    ]
    text = processor.apply_chat_template(conversation)
    assert text == "<s>[INST] <image>\nWhat is it? [/INST] A red circle.</s>"
    out = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids = out["input_ids"][0].tolist()
    assert ids[:2] == [BOS, INST] and ids.count(BOS) == 1  # the template's BOS, not a second one
    assert ids.count(IMG) == N_IMG and out["pixel_values"].shape == (1, 3, 32, 32)
    answer = [i for i, m in zip(ids, out["assistant_masks"][0].tolist()) if m]
    assert answer == _enc(tokenizer, "A red circle.") + [EOS]
    # Rendering first and calling the processor gives the same ids (it adds no BOS to text that starts with one).
    assert processor(images=[red_image], text=[text])["input_ids"][0].tolist() == ids
    with pytest.raises(Exception, match="roles must be user or assistant"):
        processor.apply_chat_template([{"role": "system", "content": "Be brief."}])
    # Offsets stay (start, end) pairs in lists even with tensors asked for: the assistant mask walks them in Python.
    offsets = processor(images=[red_image], text=[text], return_offsets_mapping=True)["offset_mapping"]
    assert isinstance(offsets, list) and len(offsets[0]) == len(ids) and offsets[0][0] == (0, 3)


def test_generation_prompts_are_the_training_prefix(collator, processor, red_image):
    turns = shapes_conversations(1, seed=3)[0]
    full = collator.encode({"image": red_image, "conversations": turns}).input_ids
    prompt, _ = collator.prompt_ids({"image": red_image, "conversations": turns[:-1]})
    assert full[: len(prompt)] == prompt and prompt[-1] == INST_END
    # The captioning evaluation's chat prompt is a Stage-3 question about the image, as the collator writes it.
    from trainer.data.shapes import _Q_DESCRIBE

    assert CHAT_CAPTION_INSTRUCTION in _Q_DESCRIBE
    chat = processor(images=[red_image], text=[caption_prompt(processor, "chat")])["input_ids"][0].tolist()
    question = {
        "image": red_image,
        "conversations": [{"from": "human", "value": "<image>\nDescribe the image."}],
    }
    assert chat == collator.prompt_ids(question)[0]
    with pytest.raises(ValueError, match="prompt_format"):
        caption_prompt(processor, "instruct")


# ----- which format a stage is evaluated and routed in --------------------------------------------------------------
def test_training_prompt_format_reads_the_recipe_then_the_marker_then_the_processor(tmp_path, processor):
    def stage_dir(name, recipe=None, marker=None):
        d = tmp_path / name
        d.mkdir()
        if recipe is not None:
            (d / RECIPE_FILE).write_text(yaml.safe_dump(recipe))
        if marker is not None:
            (d / COMPLETION_MARKER).write_text(json.dumps(marker))
        return d

    assert (
        training_prompt_format(stage_dir("s3", {"stage": "3", "train_split": "instruct"}, {"stage": "3"}))
        == "chat"
    )
    assert (
        training_prompt_format(stage_dir("s2", {"stage": "2", "train_split": "train"}, {"stage": "3"}))
        == "raw"
    )
    assert (
        training_prompt_format(stage_dir("llava", {"stage": "3", "dataset": "llava", "train_split": "x"}))
        == "chat"
    )
    assert training_prompt_format(stage_dir("marker", marker={"stage": "3"})) == "chat"
    assert training_prompt_format(stage_dir("bare")) == "raw"
    processor.prompt_format = "chat"
    try:
        assert training_prompt_format("user/hub-model", processor) == "chat"  # a Hub id: the processor says
    finally:
        processor.prompt_format = "raw"
    assert evaluation_prompt_formats("chat") == ["raw", "chat"]
    assert evaluation_prompt_formats("raw") == ["raw"]
    assert evaluation_prompt_formats("raw", ["chat", "chat"]) == ["raw", "chat"]  # raw always, first
    with pytest.raises(ValueError, match="unknown prompt format"):
        evaluation_prompt_formats("raw", ["instruct"])


def test_route_sample_builds_the_chat_prompt(tiny_model, processor, red_image):
    from analysis.routing import build_prompt, route_sample

    text = "<image>\nWhat is it?"
    assert build_prompt(processor, text, "raw") == text
    assert build_prompt(processor, text, "chat") == "<s>[INST] <image>\nWhat is it? [/INST]"
    chat = route_sample(tiny_model, processor, red_image, text, prompt_format="chat")
    raw = route_sample(tiny_model, processor, red_image, text)
    assert chat["tokens"][:2] == ["<s>", "[INST]"] and chat["tokens"][-1] == "[/INST]"
    assert chat["prompt_format"] == "chat" and raw["prompt_format"] == "raw"
    assert raw["tokens"][0] == "<s>" and raw["tokens"][1] == "[IMG]" and "[INST]" not in raw["tokens"]
    assert sum(chat["is_image"]) == sum(raw["is_image"]) == N_IMG


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs a Java runtime")
def test_evaluate_reports_both_formats_for_stage_3(tmp_path, monkeypatch, tiny_model, processor):
    import analysis.run as run
    from trainer.data.shapes import random_scene, render_scene

    model_dir = tmp_path / "stage3"
    model_dir.mkdir()
    (model_dir / RECIPE_FILE).write_text(yaml.safe_dump({"stage": "3", "train_split": "instruct"}))
    rng = random.Random(0)
    rows = [
        {"id": f"t{i}", "image": render_scene(random_scene(rng), 32), "references": ["a shape", "one shape"]}
        for i in range(3)
    ]
    monkeypatch.setattr(run, "load_checkpoint", lambda *_: (tiny_model, processor))
    monkeypatch.setattr(run, "load_data", lambda *_: {"test": rows})
    result = run.evaluate(model_dir, tmp_path / "out", max_new_tokens=3, meteor=False)
    assert result["training_prompt_format"] == "chat" and result["prompt_format"] == "raw"
    assert list(result["by_prompt_format"]) == ["raw", "chat"]
    assert (
        result["prompt"] == RAW_CAPTION_PROMPT
        and result["metrics"] == result["by_prompt_format"]["raw"]["metrics"]
    )
    assert result["by_prompt_format"]["chat"]["prompt"] == "<s>[INST] <image>\nDescribe the image. [/INST]"
    assert result["by_prompt_format"]["chat"]["metrics"]["n_images"] == 3
    saved = json.loads((tmp_path / "out" / "captioning.json").read_text())
    assert saved["by_prompt_format"].keys() == {"raw", "chat"}
    captions = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert captions["t0"]["predictions"].keys() == {"raw", "chat"}
    assert captions["t0"]["prediction"] == captions["t0"]["predictions"]["raw"]


# ----- caption-token means leave BOS out wherever it sits -----------------------------------------------------------
def test_caption_token_mask_excludes_bos_and_padding_in_a_left_padded_batch(processor):
    from analysis.extract import caption_token_mask

    tokenizer = processor.tokenizer
    inputs = processor(text=["A red circle.", "A small red circle on the left."], padding_side="left")
    ids, attention = inputs["input_ids"], inputs["attention_mask"]  # (2, T)
    bos_col = int((ids[0] == BOS).nonzero())
    assert bos_col > 0  # left padding: row 0's BOS is mid-row, which `mask[:, 0] = False` used to miss
    mask = caption_token_mask(ids, attention, IMG, tokenizer)
    for row in range(2):
        kept = ids[row][mask[row]].tolist()
        assert kept == _enc(tokenizer, ["A red circle.", "A small red circle on the left."][row])
    assert not mask[0, : bos_col + 1].any()


def test_probe_textual_means_leave_bos_out_under_left_padding(tiny_model, processor, red_image):
    from analysis.extract import probe_states

    captions = ["A red circle.", "A small red circle on the left of a big blue square."]
    records = [{"image": red_image, "caption": c} for c in captions]
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"
    try:
        states = probe_states(tiny_model, processor, records, batch_size=2)
        inputs = processor(images=[red_image] * 2, text=["<image>"] * 2 + captions, return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = side
    with torch.no_grad():
        hidden = tiny_model(**inputs, output_hidden_states=True).hidden_states[-1]  # (4, T, D)
    for row, caption in enumerate(captions):
        ids = inputs["input_ids"][2 + row]
        n = len(_enc(processor.tokenizer, caption))
        expected = hidden[2 + row, -n:].mean(0)  # left padding: the caption's own tokens are the last n
        assert ids[-n - 1] == BOS
        assert torch.allclose(torch.from_numpy(states["textual"][-1, row]), expected, atol=1e-5)
