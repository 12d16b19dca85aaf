"""The model-running analyses on tiny models with known answers: identical experts give CKA 1 and a 0% crossover,
a forced collapse is detected, hard routing is pure, probe states have the documented layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from modeling_moe_vlm import MoeVlmForCausalLM


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from trainer.data import build_shapes

    return build_shapes(
        tmp_path_factory.mktemp("shapes"),
        seed=0,
        image_size=32,
        n_train=8,
        n_val=4,
        n_test=12,
        n_instruct=4,
        n_probe=3,
        n_compositional=2,
    )


@pytest.fixture
def collator(processor):
    from trainer.data import MoeVlmCollator

    return MoeVlmCollator(processor)


def _upcycled_model():
    """A tiny model whose two experts are identical (as after upcycling)."""
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        for block in model.moe_blocks().values():
            block.experts.gate_up_proj[1].copy_(block.experts.gate_up_proj[0])
            block.experts.down_proj[1].copy_(block.experts.down_proj[0])
    return model


def test_probe_states_layout(tiny_model, processor, shapes):
    from analysis.extract import probe_states

    rows = [shapes["concept_probe"][i] for i in range(5)]
    states = probe_states(tiny_model, processor, rows, batch_size=2)
    assert states["visual"].shape == (3, 5, 64) and states["textual"].shape == (3, 5, 64)
    # layer-0 input = embeddings: the image part of the first record equals the connector output mean
    inputs = processor(images=[rows[0]["image"].convert("RGB")], text=["<image>"], return_tensors="pt")
    with torch.no_grad():
        features = tiny_model.model.get_image_features(inputs["pixel_values"]).pooler_output[0].mean(0)
    np.testing.assert_allclose(states["visual"][0, 0], features.numpy(), rtol=1e-4, atol=1e-5)


def test_identical_experts_give_cka_one_and_no_crossover(processor, collator, shapes):
    from analysis.extract import crossover_test
    from analysis.run import expert_similarity

    model = _upcycled_model()
    rows = [shapes["test"][i] for i in range(6)]
    similarity = expert_similarity(model, collator, rows, init_model=model)
    for entry in similarity.values():
        assert entry["cka_experts_0_1"] == pytest.approx(1.0, abs=1e-6)
        assert entry["weight_distance"]["expert1"]["down_proj"]["l2"] == pytest.approx(0.0)
    cross = crossover_test(model, collator, rows, batch_size=3)
    assert cross["increase_pct"] == pytest.approx(0.0, abs=1e-4)
    assert not any(b.gate.invert for b in model.moe_blocks().values())  # restored


def test_crossover_sees_different_experts(processor, collator, shapes):
    from analysis.extract import crossover_test

    model = _upcycled_model()
    with torch.no_grad():  # break expert 0 badly: image tokens routed there in hard mode, text to expert 1
        for block in model.moe_blocks().values():
            block.experts.down_proj[1].mul_(50.0)
    cross = crossover_test(model, collator, [shapes["test"][i] for i in range(6)], batch_size=3)
    assert cross["increase_pct"] != pytest.approx(0.0, abs=1e-3)
    assert set(cross["per_layer"]) == set(model.config.moe_layers)


def test_forced_collapse_and_hard_purity(tiny_model, processor, collator, shapes):
    from analysis.extract import routing_arrays
    from analysis.load import load_report

    rows = [shapes["test"][i] for i in range(6)]
    hard = routing_arrays(tiny_model, collator, rows, batch_size=3)
    report = load_report(
        {k: {**v, "is_image": hard["is_image"]} for k, v in hard["layers"].items()}, num_experts=2
    )
    assert all(layer["purity"]["overall"] == 1.0 for layer in report["layers"].values())

    tiny_model.set_router_mode("modality_aware")
    with torch.no_grad():  # every token, whatever its modality, strongly prefers expert 1
        for block in tiny_model.moe_blocks().values():
            block.gate.weight.zero_()
            block.gate.modality_embedding.weight.fill_(1.0)
            block.gate.modality_proj.weight.copy_(
                torch.tensor([[-5.0], [5.0]]).expand_as(block.gate.modality_proj.weight)
            )
    forced = routing_arrays(tiny_model, collator, rows, batch_size=3)
    report = load_report(
        {k: {**v, "is_image": forced["is_image"]} for k, v in forced["layers"].items()}, num_experts=2
    )
    assert report["n_collapsed"] == len(tiny_model.config.moe_layers)
    assert all(layer["dominant_expert"] == 1 for layer in report["layers"].values())
