"""The model: routing modes, upcycling, outputs, losses, generation, PEFT, bad input (tiny config, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import MistralConfig, MistralForCausalLM

from modeling_moe_vlm import MoeVlmConfig, MoeVlmForCausalLM, router_losses


def _inputs(processor, image, texts=("<image>\nA red circle.",)):
    images = [image] * sum(t.count("<image>") for t in texts)
    return processor(images=images or None, text=list(texts), return_tensors="pt")


def _perturb_experts(model, scale=0.05):
    """Make expert 0 differ from expert 1 (they are identical after upcycling)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for block in model.moe_blocks().values():
            block.experts.gate_up_proj[0].add_(scale * torch.randn_like(block.experts.gate_up_proj[0]))
            block.experts.down_proj[0].add_(scale * torch.randn_like(block.experts.down_proj[0]))


def _dense_and_upcycled(**overrides):
    torch.manual_seed(0)
    cfg = tiny_config()
    dense_fields = {k: getattr(cfg, k) for k in MistralConfig().to_dict() if hasattr(cfg, k)}
    for key in ("model_type", "architectures", "transformers_version", "dtype"):
        dense_fields.pop(key, None)
    dense = MistralForCausalLM(MistralConfig(**dense_fields)).eval()
    moe_fields = {
        "vision_config": cfg.vision_config.to_dict(),
        **overrides,
    }
    moe = MoeVlmForCausalLM.from_mistral(dense, seed=3, **moe_fields).eval()
    return dense, moe


def test_forward_shapes_and_router_outputs(tiny_model, processor, red_image):
    inputs = _inputs(processor, red_image, ("<image>\nA red circle.", "<image>\nTwo blue stars on grey."))
    out = tiny_model(**inputs, output_router_logits=True)
    batch, seq = inputs["input_ids"].shape
    assert out.logits.shape == (batch, seq, 32768)
    assert len(out.router_logits) == len(out.router_indices) == len(tiny_model.config.moe_layers)
    assert out.router_logits[0].shape == (batch * seq, 2)
    assert out.router_indices[0].shape == (batch * seq, 1)
    assert out.modality_mask.sum() == 2 * 16
    # not requested -> not returned
    assert tiny_model(**inputs).router_logits is None


def test_hard_routing_is_exact(tiny_model, processor, red_image):
    out = tiny_model(**_inputs(processor, red_image), output_router_logits=True)
    is_image = out.modality_mask.reshape(-1)
    for index in out.router_indices:
        assert torch.equal(index[:, 0], torch.where(is_image, 0, 1))


def test_hard_routing_follows_modality_to_expert(processor, red_image):
    model = MoeVlmForCausalLM(tiny_config(modality_to_expert={"image": 1, "text": 0})).eval()
    out = model(**_inputs(processor, red_image), output_router_logits=True)
    is_image = out.modality_mask.reshape(-1)
    assert torch.equal(out.router_indices[0][:, 0], torch.where(is_image, 1, 0))


@pytest.mark.parametrize("mode", ["gumbel", "softmax", "modality_aware"])
def test_learned_modes_give_the_router_a_gradient(tiny_model, processor, red_image, mode):
    tiny_model.set_router_mode(mode)
    tiny_model.train()
    inputs = _inputs(processor, red_image)
    labels = inputs["input_ids"].clone()
    labels[:, :18] = -100
    tiny_model(**inputs, labels=labels).loss.backward()
    for block in tiny_model.moe_blocks().values():
        assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0
    if mode == "modality_aware":
        assert tiny_model.model.layers[0].mlp.gate.modality_embedding.weight.grad.abs().sum() > 0
    # the frozen vision tower gets no gradient
    assert all(p.grad is None for p in tiny_model.model.vision_tower.parameters())


def test_hard_mode_router_gets_no_gradient(tiny_model, processor, red_image):
    tiny_model.train()
    inputs = _inputs(processor, red_image)
    tiny_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(b.gate.weight.grad is None for b in tiny_model.moe_blocks().values())


def test_gumbel_training_samples_but_eval_is_deterministic(tiny_model, processor, red_image):
    tiny_model.set_router_mode("gumbel")
    inputs = _inputs(processor, red_image)
    first = tiny_model(**inputs, output_router_logits=True).router_indices[0]
    again = tiny_model(**inputs, output_router_logits=True).router_indices[0]
    assert torch.equal(first, again)
    logits = tiny_model(**inputs, output_router_logits=True).router_logits[0]
    assert torch.equal(first[:, 0], logits.argmax(-1))


def test_mode_switch_keeps_weights(tiny_model, processor, red_image):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    inputs = _inputs(processor, red_image)
    routes = {}
    for mode in ("hard", "gumbel", "softmax", "modality_aware"):
        tiny_model.set_router_mode(mode)
        routes[mode] = tiny_model(**inputs, output_router_logits=True).router_indices[0]
    assert tiny_model.config.router_mode == "modality_aware"
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert not torch.equal(routes["hard"], routes["softmax"])  # a random router does not route by modality
    with pytest.raises(ValueError, match="router_mode"):
        tiny_model.set_router_mode("top2")


def test_upcycled_experts_identical_and_reproduce_dense_logits(tokenizer):
    dense, moe = _dense_and_upcycled()
    for block in moe.moe_blocks().values():
        assert torch.equal(block.experts.gate_up_proj[0], block.experts.gate_up_proj[1])
        assert torch.equal(block.experts.down_proj[0], block.experts.down_proj[1])
    ids = torch.tensor([tokenizer.encode("A red circle and a blue square.")])
    expected = dense(input_ids=ids).logits
    for mode in ("hard", "gumbel"):  # all tokens on one expert with gate 1
        moe.set_router_mode(mode)
        torch.testing.assert_close(moe(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_train_mode_gumbel_is_straight_through_gate_one_and_dense_logits(tokenizer):
    """Stage 3's straight-through routing: in training a token's expert output is multiplied by a gate whose *value*
    is exactly 1 (the hard sample), the soft Gumbel probabilities only carrying the gradient. With identical upcycled
    experts that makes the train-mode MoE reproduce the dense model's logits whatever expert the noise picks; a soft
    gate (`hard=False`) would scale each block's output by a probability < 1 and break both checks."""
    dense, moe = _dense_and_upcycled()
    moe.set_router_mode("gumbel")
    moe.train()
    gates = []
    hooks = [
        block.gate.register_forward_hook(lambda _m, _i, out: gates.append(out[1].detach()))
        for block in moe.moe_blocks().values()
    ]
    ids = torch.tensor([tokenizer.encode("A red circle and a blue square.")])
    torch.manual_seed(5)
    try:
        out = moe(input_ids=ids, output_router_logits=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(gates) == len(moe.config.moe_layers) and len(out.router_indices) == len(gates)
    for gate, index in zip(gates, out.router_indices):
        assert gate.shape == index.shape == (ids.shape[1], 1)
        assert torch.equal(gate, torch.ones_like(gate))  # exactly 1.0, not a soft probability
    chosen = torch.cat([index[:, 0] for index in out.router_indices])
    noiseless = torch.cat([logits.argmax(-1) for logits in out.router_logits])
    assert not torch.equal(chosen, noiseless)  # the noise did pick: this is the sampled (training) path
    torch.testing.assert_close(out.logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_upcycling_copies_a_given_vision_tower():
    import open_clip

    cfg = tiny_config()
    vision = cfg.vision_config
    tower = open_clip.model._build_vision_tower(vision.embed_dim, vision.vision_cfg)
    dense, _ = _dense_and_upcycled()
    moe = MoeVlmForCausalLM.from_mistral(dense, vision=tower, vision_config=vision.to_dict())
    for key, value in tower.state_dict().items():
        assert torch.equal(moe.model.vision_tower.visual.state_dict()[key], value)
    assert not any(p.requires_grad for p in moe.model.vision_tower.parameters())


def test_experts_implementations_agree(tiny_model, processor, red_image):
    _perturb_experts(tiny_model)
    tiny_model.set_router_mode("softmax")
    inputs = _inputs(processor, red_image)
    results = {}
    for impl in ("eager", "grouped_mm", "batched_mm", "sorted_top1", "sorted_top1_cpp"):
        tiny_model.set_experts_implementation(impl)
        results[impl] = tiny_model(**inputs).logits
    for impl in ("grouped_mm", "batched_mm", "sorted_top1", "sorted_top1_cpp"):
        torch.testing.assert_close(results["eager"], results[impl], rtol=1e-4, atol=1e-4)


def test_sdpa_and_eager_attention_agree(processor, red_image):
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config()).eval()
    inputs = _inputs(processor, red_image)
    model.set_attn_implementation("sdpa")
    sdpa = model(**inputs).logits
    model.set_attn_implementation("eager")
    torch.testing.assert_close(model(**inputs).logits, sdpa, rtol=1e-4, atol=1e-4)


def test_padding_does_not_change_outputs_or_router_losses(tiny_model, processor, red_image):
    tiny_model.set_router_mode("softmax")
    single = _inputs(processor, red_image)
    n = single["input_ids"].shape[1]
    padded = {
        "input_ids": torch.nn.functional.pad(single["input_ids"], (0, 5), value=0),
        "attention_mask": torch.nn.functional.pad(single["attention_mask"], (0, 5), value=0),
        "pixel_values": single["pixel_values"],
    }
    a = tiny_model(**single, labels=single["input_ids"], output_router_logits=True)
    b = tiny_model(**padded, labels=padded["input_ids"], output_router_logits=True)
    torch.testing.assert_close(a.logits[0], b.logits[0, :n], rtol=1e-4, atol=1e-4)
    for key in ("load_balancing_loss", "z_loss", "specialisation_loss"):
        torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=1e-5, atol=1e-5)


def test_load_balancing_matches_transformers(tiny_model, processor, red_image):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    tiny_model.set_router_mode("softmax")
    inputs = _inputs(processor, red_image, ("<image>\nA red circle.", "<image>\nTwo stars."))
    out = tiny_model(**inputs, labels=inputs["input_ids"], output_router_logits=True)
    assert tiny_model(**inputs, output_router_logits=True).load_balancing_loss is None  # not while generating
    expected = load_balancing_loss_func(out.router_logits, 2, 1, inputs["attention_mask"])
    torch.testing.assert_close(out.load_balancing_loss, expected, rtol=1e-5, atol=1e-6)
    # z-loss and specialisation loss from their definitions
    logits = torch.stack(out.router_logits).float()  # (layers, tokens, E)
    valid = inputs["attention_mask"].reshape(-1).bool()
    z = (torch.logsumexp(logits, -1) ** 2)[:, valid].mean()
    torch.testing.assert_close(out.z_loss, z, rtol=1e-5, atol=1e-6)
    target = torch.where(out.modality_mask.reshape(-1), 0, 1)
    ce = torch.stack([torch.nn.functional.cross_entropy(lg[valid], target[valid]) for lg in logits]).mean()
    torch.testing.assert_close(out.specialisation_loss, ce, rtol=1e-5, atol=1e-6)


def test_aux_losses_enter_the_loss_only_with_positive_coefficients(processor, red_image):
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config(router_mode="softmax")).eval()
    inputs = _inputs(processor, red_image)
    plain = model(**inputs, labels=inputs["input_ids"])
    assert plain.aux_loss is None  # nothing requested, no coefficient: no router losses computed at all
    model.config.router_aux_loss_coef = 0.5
    model.config.router_z_loss_coef = 0.1
    weighted = model(**inputs, labels=inputs["input_ids"])
    expected = plain.loss + 0.5 * weighted.load_balancing_loss + 0.1 * weighted.z_loss
    torch.testing.assert_close(weighted.loss, expected)


def test_training_loss_uses_label_positions_only(tiny_model, processor, red_image):
    inputs = _inputs(processor, red_image)
    labels = inputs["input_ids"].clone()
    labels[:, :18] = -100
    full = tiny_model(**inputs, labels=labels).loss  # eval: full logits + transformers' loss
    tiny_model.train()
    sparse = tiny_model(**inputs, labels=labels)
    assert sparse.logits is None
    torch.testing.assert_close(sparse.loss, full, rtol=1e-5, atol=1e-5)


def test_invert_routing_changes_output_and_is_per_layer(tiny_model, processor, red_image):
    _perturb_experts(tiny_model)
    inputs = _inputs(processor, red_image)
    normal = tiny_model(**inputs, output_router_logits=True)
    tiny_model.set_invert_routing(True)
    inverted = tiny_model(**inputs, output_router_logits=True)
    assert not torch.allclose(normal.logits, inverted.logits)
    for a, b in zip(normal.router_indices, inverted.router_indices):
        assert torch.equal(b, 1 - a)
    tiny_model.set_invert_routing(True, layers=[1])
    one = tiny_model(**inputs, output_router_logits=True)
    assert torch.equal(one.router_indices[0], normal.router_indices[0])
    assert torch.equal(one.router_indices[1], 1 - normal.router_indices[1])
    tiny_model.set_invert_routing(False)
    torch.testing.assert_close(tiny_model(**inputs).logits, normal.logits)
    with pytest.raises(ValueError, match="not MoE layers"):
        tiny_model.set_invert_routing(True, layers=[7])


def test_generate_with_an_image_uses_the_cache(tiny_model, processor, red_image):
    inputs = _inputs(processor, red_image, ("<image>\nA",))
    out = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 6)
    assert not (out[0, inputs["input_ids"].shape[1] :] == 10).any()  # never generates the image placeholder
    no_cache = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out, no_cache)


def test_dense_control_has_no_moe_layers(processor, red_image):
    model = MoeVlmForCausalLM(tiny_config(moe_layers=[])).eval()
    assert model.moe_blocks() == {}
    out = model(**_inputs(processor, red_image), output_router_logits=True)
    assert out.logits.shape[-1] == 32768 and not out.router_logits


def test_lora_on_stacked_experts_round_trip(tiny_model, processor, red_image):
    from peft import LoraConfig, get_peft_model

    inputs = _inputs(processor, red_image)
    config = LoraConfig(
        r=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    )
    peft_model = get_peft_model(tiny_model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model.train()
    for _ in range(2):
        peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(**inputs).logits
    merged = peft_model.merge_and_unload()
    assert type(merged) is MoeVlmForCausalLM
    torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=1e-4, atol=1e-4)


def test_bad_inputs_give_clear_errors(tiny_model, processor, red_image):
    with pytest.raises(ValueError, match="1 image\\(s\\) but 2"):
        processor(images=[red_image], text=["<image> and <image>"])
    with pytest.raises(ValueError, match="not an image"):
        processor(images=["cat.png"], text=["<image>"])
    with pytest.raises(ValueError, match="shape"):
        processor(images=[torch.zeros(5, 7, 7, 2)], text=["<image>"])
    # grayscale / RGBA / CMYK / huge images are converted and resized
    from PIL import Image

    for image in (
        red_image.convert("L"),
        red_image.convert("RGBA"),
        red_image.convert("CMYK"),
        red_image.resize((900, 300)),
    ):
        assert processor(images=[image], text=["<image>"])["pixel_values"].shape == (1, 3, 32, 32)
    inputs = _inputs(processor, red_image)
    with pytest.raises(ValueError, match="pixel_values must be"):
        tiny_model(input_ids=inputs["input_ids"], pixel_values=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="do not match"):
        tiny_model(input_ids=inputs["input_ids"], pixel_values=torch.zeros(2, 3, 32, 32))
    # Longer than max_position_embeddings is Mistral's behaviour, not an error (rope scaling extends the context):
    assert tiny_model(input_ids=torch.ones(1, 300, dtype=torch.long)).logits.shape == (1, 300, 32768)
    with pytest.raises(ValueError, match="max_length"):
        processor(images=[red_image], text=["<image>"], max_length=8)
    assert Image  # imported for the conversions above


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"router_mode": "top2"}, "router_mode"),
        ({"num_experts_per_tok": 3}, "num_experts_per_tok"),
        ({"num_experts_per_tok": 2, "router_mode": "gumbel"}, "routes top-1"),
        ({"moe_layers": [5]}, "moe_layers"),
        ({"modality_to_expert": {"image": 0, "text": 2}}, "modality_to_expert"),
        ({"connector_type": "qformer"}, "connector_type"),
        ({"image_token_id": 40000}, "image_token_id"),
        ({"num_image_tokens": 10}, "num_image_tokens"),
        ({"vision_feature_layer": 5}, "vision_feature_layer"),
        ({"gumbel_tau": 0}, "gumbel_tau"),
        ({"num_experts": "2"}, "num_experts"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_round_trip():
    cfg = tiny_config(router_mode="gumbel", moe_layers=[1], connector_type="mlp2x_gelu")
    again = MoeVlmConfig.from_dict(cfg.to_dict())
    assert again.moe_layers == [1] and again.router_mode == "gumbel"
    assert again.vision_config.num_patches == 16 and again.num_image_tokens == 16


def test_router_losses_ignore_padding():
    cfg = tiny_config()
    logits = (torch.randn(6, 2),)
    index = (logits[0].argmax(-1, keepdim=True),)
    modality = torch.tensor([[True, False, False], [True, False, False]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with_pad = router_losses(logits, index, modality, mask, cfg)
    keep = mask.reshape(-1).bool()
    without = router_losses(
        (logits[0][keep],), (index[0][keep],), modality.reshape(1, -1)[:, keep], None, cfg
    )
    for key in with_pad:
        torch.testing.assert_close(with_pad[key], without[key])


def test_open_clip_private_vision_builder_still_exists():
    """`MoeVlmVisionTower` builds `CLIP.visual` with open_clip's private `open_clip.model._build_vision_tower`
    (open_clip 3.3 has no public builder of the tower alone; `open_clip.CLIP(...)` would also build a text tower).
    If a release renames it, this names what broke and where to look."""
    import inspect

    import open_clip

    builder = getattr(open_clip.model, "_build_vision_tower", None)
    assert builder is not None, (
        f"open_clip {open_clip.__version__} removed model._build_vision_tower: MoeVlmVisionTower "
        "(modeling_moe_vlm.py) must build the vision tower another way"
    )
    assert list(inspect.signature(builder).parameters)[:3] == ["embed_dim", "vision_cfg", "quick_gelu"]


def test_from_pretrained_is_transparent_and_keeps_the_tower_frozen(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    model, info = MoeVlmForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if "vision_tower" not in n)


def test_every_weight_is_initialised_from_the_meta_device():
    """`from_pretrained(None, state_dict={})` materialises every weight from the meta device and initialises it with
    `_init_weights` alone: no weight (vision tower included) may stay uninitialised or differ from `__init__`'s."""
    from unittest import mock

    from transformers import PreTrainedModel, set_seed

    original = PreTrainedModel._initialize_weights

    def seeded(*args, **kwargs):  # transformers' own test does this: the same seed before every module's init
        set_seed(42)
        original(*args, **kwargs)

    cfg = tiny_config()
    with mock.patch.object(PreTrainedModel, "_initialize_weights", seeded):
        from_init = MoeVlmForCausalLM(cfg)
        from_meta = MoeVlmForCausalLM.from_pretrained(None, config=cfg, state_dict={})
    expected, got = from_init.state_dict(), from_meta.state_dict()
    assert sorted(expected) == sorted(got)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert different == []


def test_experts_implementation_can_be_set_after_a_plain_mistral_was_built():
    """transformers 5.24 caches the experts-implementation check on the first class it sees: a MistralModel built
    first must not make MoeVlm refuse `experts_implementation=`."""
    from transformers import MistralModel

    MistralModel(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=100))  # fmt: skip
    model = MoeVlmForCausalLM(tiny_config())
    model.set_experts_implementation("eager")
    assert model.config._experts_implementation == "eager"


def test_get_image_features_follows_the_transformers_contract(tiny_model, processor, red_image):
    """transformers 5.x's image-features output, as LLaVA's: the connector output in `pooler_output` (what replaces
    the placeholders), the tower's patch tokens in `last_hidden_state`, the tower's hidden states (embeddings + one per
    block) and attentions (one per block) on request, a tuple with `return_dict=False`."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pixel_values = processor(images=[red_image, red_image], text=["<image>", "<image>"])["pixel_values"]
    blocks, hidden = tiny_model.config.vision_config.num_layers, tiny_model.config.hidden_size
    with torch.no_grad():
        out = tiny_model.get_image_features(pixel_values, output_hidden_states=True, output_attentions=True)
        plain = tiny_model.get_image_features(pixel_values)
        as_tuple = tiny_model.get_image_features(pixel_values, return_dict=False)
    assert isinstance(out, BaseModelOutputWithPooling) and isinstance(as_tuple, tuple)
    assert out.pooler_output.shape == (2, 16, hidden) and out.last_hidden_state.shape == (2, 16, 64)
    assert len(out.hidden_states) == blocks + 1 and out.hidden_states[0].shape == (2, 17, 64)  # CLS included
    assert len(out.attentions) == blocks and out.attentions[0].shape == (
        2,
        2,
        17,
        17,
    )  # (images, heads, L, L)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 2, 17))
    # the selected block (penultimate) is the one the connector reads, with or without the extra outputs
    torch.testing.assert_close(out.hidden_states[-2][:, 1:], out.last_hidden_state)
    torch.testing.assert_close(plain.pooler_output, out.pooler_output)
    assert plain.hidden_states is None and plain.attentions is None


def test_rope_scaling_extends_the_context_past_max_position_embeddings():
    """A sequence longer than `max_position_embeddings` runs (as on Mistral), and linear rope scaling changes it."""
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config()).eval()
    scaled = MoeVlmForCausalLM(
        tiny_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    ).eval()
    scaled.load_state_dict(model.state_dict())
    input_ids = torch.randint(11, 32768, (1, 300))  # > max_position_embeddings = 256, no image placeholder
    with torch.no_grad():
        plain, longer = model(input_ids=input_ids).logits, scaled(input_ids=input_ids).logits
    assert torch.isfinite(longer).all() and longer.shape == (1, 300, 32768)
    assert (plain - longer).abs().max() > 1e-3


def test_forward_asks_the_tower_for_its_patch_tokens_only(tiny_model, processor, red_image):
    """The placeholder merge needs the connector's output alone: with `config.output_hidden_states` on, the decoder's
    hidden states are returned, but the tower is not run for its own (every block, with hooks)."""
    from unittest import mock

    tower = tiny_model.model.vision_tower
    tiny_model.config.output_hidden_states = True
    with mock.patch.object(tower, "forward", wraps=tower.forward) as spy, torch.no_grad():
        out = tiny_model(**_inputs(processor, red_image))
    assert spy.call_args.kwargs == {"output_hidden_states": False, "output_attentions": False}
    assert len(out.hidden_states) == tiny_model.config.num_hidden_layers + 1
