"""The conv vision tower (open_clip `ModifiedResNet`, the embedded default's) and the vision probe.

A ResNet's tokens are the cells of one stage's feature map; the config derives their count and width from the
stage, and a frozen tower must stay frozen in training mode too (BatchNorm statistics move otherwise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

RESNET = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
}


def resnet_config(make_config, **overrides):
    return make_config(vision_config=RESNET, max_position_embeddings=512, **overrides)


@pytest.mark.parametrize(
    ("layer", "tokens", "channels"),
    [(-2, 16, 8 * 16), (-3, 64, 8 * 8), (1, 256, 8 * 4), (0, 256, 8), (-1, 4, 8 * 32)],
)
def test_resnet_tokens_follow_the_feature_stage(make_config, layer, tokens, channels):
    from modeling_moe_vlm import MoeVlmForCausalLM

    config = resnet_config(make_config, vision_feature_layer=layer)
    assert config.num_image_tokens == tokens
    assert config.vision_config.feature_width(layer) == channels
    model = MoeVlmForCausalLM(config).eval()
    features = model.get_image_features(torch.randn(2, 3, 64, 64))
    assert tuple(features.last_hidden_state.shape) == (2, tokens, channels)
    assert tuple(features.pooler_output.shape) == (2, tokens, config.hidden_size)


def test_resnet_tokens_are_the_feature_map_cells_row_by_row(make_config):
    from modeling_moe_vlm import MoeVlmForCausalLM

    model = MoeVlmForCausalLM(resnet_config(make_config)).eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        visual = model.model.vision_tower.visual
        expected = visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels))))  # (1, C, 4, 4)
        tokens = model.model.vision_tower(pixels).last_hidden_state  # (1, 16, C)
    torch.testing.assert_close(tokens[0, 5], expected[0, :, 1, 1])  # row 1, column 1
    every = model.model.vision_tower(pixels, output_hidden_states=True)
    assert len(every.hidden_states) == 5
    torch.testing.assert_close(every.last_hidden_state, tokens)


def test_frozen_resnet_keeps_its_batchnorm_statistics_in_training(make_config):
    from modeling_moe_vlm import MoeVlmForCausalLM

    model = MoeVlmForCausalLM(resnet_config(make_config)).train()
    tower = model.model.vision_tower
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    model.get_image_features(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert not tower.training and model.model.layers[0].training
    for key, value in tower.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unfrozen_resnet_trains_normally(make_config):
    from modeling_moe_vlm import MoeVlmForCausalLM

    model = MoeVlmForCausalLM(resnet_config(make_config, freeze_vision_tower=False)).train()
    assert model.model.vision_tower.training


def test_resnet_round_trips_through_save_pretrained(make_config, tmp_path):
    from modeling_moe_vlm import MoeVlmForCausalLM

    torch.manual_seed(0)
    model = MoeVlmForCausalLM(resnet_config(make_config)).eval()
    model.save_pretrained(tmp_path)
    again, info = MoeVlmForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = torch.randn(1, 3, 64, 64)
    ids = torch.tensor([[1] + [10] * 16 + [1099, 2]])
    torch.testing.assert_close(
        again.eval()(input_ids=ids, pixel_values=pixels).logits,
        model(input_ids=ids, pixel_values=pixels).logits,
    )


@pytest.mark.parametrize(
    ("vision", "match"),
    [
        ({**RESNET, "vision_cfg": {**RESNET["vision_cfg"], "image_size": 48}}, "divisible by 32"),
        ({"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1]}}, "'width'"),
    ],
)
def test_bad_resnet_configs_name_the_field(make_config, vision, match):
    with pytest.raises(ValueError, match=match):
        make_config(vision_config=vision)


def test_feature_layer_out_of_range_for_a_resnet(make_config):
    with pytest.raises(ValueError, match="vision_feature_layer"):
        resnet_config(make_config, vision_feature_layer=5)


def test_embedded_default_is_a_resnet():
    from trainer.pretrain import preset_config

    config = preset_config("tiny")
    assert config.vision_config.is_resnet and config.num_image_tokens == 16


# ----- the vision probe ---------------------------------------------------------------------------------------------
def test_linear_probe_reads_separable_features_and_not_noise():
    from trainer.vision_probe import linear_probe

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    x = rng.normal(size=(400, 20))
    x[np.arange(400), labels] += 4.0  # the label is linearly readable
    assert linear_probe(x[:300], labels[:300].tolist(), x[300:], labels[300:].tolist()) > 0.95
    noise = rng.normal(size=(400, 20))
    assert linear_probe(noise[:300], labels[:300].tolist(), noise[300:], labels[300:].tolist()) < 0.45


def test_probe_images_are_fresh_and_reproducible():
    from trainer.vision_probe import probe_scenes

    fit, fit_images = probe_scenes(20, 0, "fit", 64)
    again, _ = probe_scenes(20, 0, "fit", 64)
    test, _ = probe_scenes(20, 0, "test", 64)
    assert fit == again and fit != test
    assert all(len(s.objects) == 1 for s in fit) and fit_images[0].size == (64, 64)


def test_vision_probe_on_an_untrained_clip_reports_every_field(make_config):
    import open_clip

    from configuration import build_processor
    from modeling_moe_vlm.modeling_moe_vlm import MoeVlmVisionTower
    from trainer.vision_probe import vision_probe

    config = resnet_config(make_config)
    torch.manual_seed(0)
    clip = open_clip.CLIP(
        64, config.vision_config.vision_cfg, {"context_length": 16, "width": 32, "heads": 2, "layers": 1}
    )
    tower = MoeVlmVisionTower(config)
    tower.visual = clip.visual
    processor = build_processor(config)
    result = vision_probe(
        clip, tower, processor.image_processor, open_clip.tokenizer.SimpleTokenizer(context_length=16), 64,
        n_fit=64, n_test=32,
    )  # fmt: skip
    assert set(result) >= {"shape_accuracy", "colour_accuracy", "zero_shot_shape_accuracy", "n_test"}
    assert all(
        0.0 <= result[k] <= 1.0 for k in ("shape_accuracy", "colour_accuracy", "zero_shot_shape_accuracy")
    )
    # colour is linearly readable even from random conv features; an untrained CLIP's zero-shot is near chance
    assert result["colour_accuracy"] > 2 / 8 and result["zero_shot_shape_accuracy"] < 0.5
