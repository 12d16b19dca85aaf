"""The VLM the way HF users reach VLMs: a saved folder's `auto_map` names `AutoModelForImageTextToText` beside
`AutoModelForCausalLM`, and in a fresh process outside the repo (offline, project hidden, remote code only)
`pipeline("image-text-to-text", model=folder, trust_remote_code=True)` captions an image and
`AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)` loads the model; both generate the
ids `model.generate` gives here on the same inputs."""

from __future__ import annotations

import json

import torch
from conftest import tiny_config
from test_hub_loading import HIDE_PROJECT, run_hidden

from modeling_moe_vlm import MoeVlmForCausalLM

PROMPT = "<image>\n"  # the captioning prompt the collator trains on: <s> <image> \n {caption}
MAX_NEW_TOKENS = 6

PIPELINE_SCRIPT = (
    HIDE_PROJECT
    + """
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, pipeline
folder, image_file, out_file = sys.argv[1:4]
prompt, max_new_tokens = sys.argv[5], int(sys.argv[6])
image = Image.open(image_file)
captioner = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
caption = captioner(images=image, text=prompt, max_new_tokens=max_new_tokens, return_full_text=False)
ids = captioner(images=image, text=prompt, max_new_tokens=max_new_tokens, return_tensors=True)
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
inputs = captioner.processor(images=[image], text=[prompt], return_tensors="pt")
with torch.no_grad():
    direct = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
torch.save({"caption": caption, "pipeline_ids": ids[0]["generated_token_ids"], "direct_ids": direct,
            "pipeline_class": type(captioner).__name__, "pipeline_model": type(captioner.model).__module__,
            "model_module": type(model).__module__, "model_class": type(model).__name__}, out_file)
"""
)


def test_pipeline_and_auto_class_caption_through_remote_code(tmp_path, processor, red_image):
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config(router_mode="softmax")).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    remote_class = "modeling_moe_vlm.MoeVlmForCausalLM"
    assert auto_map["AutoModelForImageTextToText"] == auto_map["AutoModelForCausalLM"] == remote_class
    inputs = processor(images=[red_image], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0]
    n_prompt = inputs["input_ids"].shape[1]
    assert expected.shape[0] == n_prompt + MAX_NEW_TOKENS

    red_image.save(tmp_path / "red.png")
    result = run_hidden(
        tmp_path,
        PIPELINE_SCRIPT,
        [folder, tmp_path / "red.png", tmp_path / "out.pt"],
        [PROMPT, MAX_NEW_TOKENS],
    )
    assert "is not supported for image-text-to-text" not in result.stderr  # the pipeline's model-type check
    got = torch.load(tmp_path / "out.pt")
    assert got["pipeline_class"] == "ImageTextToTextPipeline"
    for module in (got["pipeline_model"], got["model_module"]):
        assert module.startswith("transformers_modules.")  # really the remote copy, not this repo
    assert got["model_class"] == "MoeVlmForCausalLM"
    torch.testing.assert_close(got["pipeline_ids"], expected, rtol=0, atol=0)
    torch.testing.assert_close(got["direct_ids"][0], expected, rtol=0, atol=0)
    caption = got["caption"][0]["generated_text"]
    new_text = processor.tokenizer.decode(expected[n_prompt:], skip_special_tokens=True)
    assert caption.strip() == new_text.strip() and caption.strip()


def test_pipeline_in_process_takes_the_model_and_processor_objects(tiny_model, processor, red_image):
    """With the package imported the Auto registration is local: no remote code, no model-type complaint."""
    from transformers import AutoModelForImageTextToText, pipeline

    assert AutoModelForImageTextToText._model_mapping[type(tiny_model.config)] is MoeVlmForCausalLM
    captioner = pipeline("image-text-to-text", model=tiny_model, processor=processor)
    got = captioner(images=red_image, text=PROMPT, max_new_tokens=3, return_tensors=True)
    inputs = processor(images=[red_image], text=[PROMPT], return_tensors="pt")
    expected = tiny_model.generate(**inputs, max_new_tokens=3, do_sample=False)[0]
    assert torch.equal(got[0]["generated_token_ids"], expected)
