"""Generation equals the full forward: for every router mode, single and batched (left-padded), with an image, the
per-step logits of greedy generation equal those of one forward over the finished sequence (atol 1e-4), with the KV
cache, without it, and with an explicit modality mask. This is the check that caught transformers 5.24's cache
rename: cached generation drifted from step 2 while every uncached forward stayed right."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from modeling_moe_vlm import ROUTER_MODES, MoeVlmForCausalLM

NEW_TOKENS = 6
PROMPTS = ("<image>\nA red circle.", "<image>\nTwo small blue stars on a grey square, side by side.")


@pytest.fixture(scope="module")
def model():
    """A tiny model whose experts and routers differ enough that routing changes the logits."""
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        for block in model.moe_blocks().values():
            block.experts.gate_up_proj[0].add_(0.05 * torch.randn_like(block.experts.gate_up_proj[0]))
            block.experts.down_proj[0].add_(0.05 * torch.randn_like(block.experts.down_proj[0]))
            block.gate.weight.normal_(std=1.0)
    return model


def _generate_and_reference(model, processor, image, prompts, **generate_kwargs):
    inputs = processor(
        images=[image] * len(prompts), text=list(prompts), return_tensors="pt", padding_side="left"
    )
    out = model.generate(
        **inputs,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,  # no early stop: every row has NEW_TOKENS real tokens
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **generate_kwargs,
    )
    batch, prompt_len = inputs["input_ids"].shape
    attention_mask = torch.cat(
        [inputs["attention_mask"], torch.ones(batch, NEW_TOKENS, dtype=torch.long)], dim=1
    )
    with torch.no_grad():
        full = model(
            input_ids=out.sequences,
            pixel_values=inputs["pixel_values"],
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp_min(
                0
            ),  # as generate derives them under left padding
        ).logits  # (batch, prompt + new, vocab)
    steps = torch.stack(out.logits, dim=1)  # (batch, new, vocab): raw logits of each generated position
    return steps, full[:, prompt_len - 1 : prompt_len - 1 + NEW_TOKENS], out.sequences[:, prompt_len:]


@pytest.mark.parametrize("mode", ROUTER_MODES)
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched-left-padded"])
@pytest.mark.parametrize("variant", ["cache", "no-cache", "explicit-modality-mask"])
def test_generation_logits_equal_the_full_forward(model, processor, red_image, mode, batched, variant):
    model.set_router_mode(mode)
    prompts = PROMPTS if batched else PROMPTS[:1]
    kwargs = {"use_cache": variant != "no-cache"}
    if variant == "explicit-modality-mask":
        encoded = processor(images=[red_image] * len(prompts), text=list(prompts), padding_side="left")
        kwargs["modality_mask"] = encoded["input_ids"] == model.config.image_token_id
    steps, reference, new_tokens = _generate_and_reference(model, processor, red_image, prompts, **kwargs)
    torch.testing.assert_close(steps, reference, atol=1e-4, rtol=0)
    assert not (new_tokens == model.config.image_token_id).any()  # generated tokens are text


def test_routing_changes_generation(model, processor, red_image):
    """The equality above is not vacuous: routing reaches the logits (hard and inverted routing disagree)."""
    model.set_router_mode("hard")
    steps, _, _ = _generate_and_reference(model, processor, red_image, PROMPTS[:1])
    model.set_invert_routing(True)
    try:
        inverted, _, _ = _generate_and_reference(model, processor, red_image, PROMPTS[:1])
    finally:
        model.set_invert_routing(False)
    assert (steps - inverted).abs().max() > 1e-2
