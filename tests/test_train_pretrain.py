"""Pretraining of the embedded default's frozen parts, and Stage 0 on its output (a few steps on tiny data)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import make_shapes, marker, quick_args, train

from trainer.pretrain import CLIP_FILE, MISTRAL_DIR


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    shapes = make_shapes(root / "shapes", image_size=64)  # the tiny preset's 64 px tower
    overrides = [
        *quick_args(shapes, logging_steps=2),
        *("--clip_max_steps", "2", "--clip_batch_size", "8", "--clip_learning_rate", "1e-3"),
        *("--lm_max_steps", "6", "--lm_batch_size", "4", "--lm_block_size", "32", "--eval_samples", "8"),
    ]
    return root, train("pretrain", root / "pretrain", None, overrides)


def test_pretraining_writes_a_clip_tower_a_dense_mistral_and_its_numbers(pretrained):
    _, out = pretrained
    info = marker(out)
    assert info["stage"] == "pretrain" and info["clip"]["steps"] == 2 and info["lm"]["steps"] == 6
    retrieval = info["clip"]["retrieval"]
    for key in ("image_to_text_top1", "text_to_image_top1", "image_to_text_top5", "chance_top1"):
        assert 0.0 <= retrieval[key] <= 1.0
    assert retrieval["n_pairs"] == 8
    lm = info["lm"]
    assert (
        lm["validation_perplexity"] < lm["validation_perplexity_before"]
    )  # 6 steps already beat random init
    assert (out / CLIP_FILE).is_file() and (out / MISTRAL_DIR / "config.json").is_file()
    assert (out / MISTRAL_DIR / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def stage0(pretrained):
    root, pretrain_dir = pretrained
    return train("0", root / "stage0", pretrain_dir, [])


def test_stage0_upcycles_the_pretrained_parts(pretrained, stage0):
    from transformers import AutoModelForCausalLM, MistralForCausalLM

    _, pretrain_dir = pretrained
    info = marker(stage0)
    assert info["stage"] == "0" and info["from"] == str(pretrain_dir)
    model = AutoModelForCausalLM.from_pretrained(stage0, trust_remote_code=True)
    clip = load_file(str(pretrain_dir / CLIP_FILE))
    tower = model.model.vision_tower.visual.state_dict()
    assert all(torch.equal(tower[k], clip["visual." + k]) for k in tower)
    dense = MistralForCausalLM.from_pretrained(pretrain_dir / MISTRAL_DIR)
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    experts = model.model.layers[0].mlp.experts
    assert torch.equal(experts.down_proj[0], dense.model.layers[0].mlp.down_proj.weight)
    assert torch.equal(experts.down_proj[0], experts.down_proj[1])  # identical copies until Stage 2


def test_stage0_refuses_a_directory_that_is_not_a_pretraining_output(stage0, tmp_path):
    assert (stage0 / "recipe.yaml").is_file()
    with pytest.raises(ValueError, match="Stage 0 starts from the pretraining output"):
        train("0", tmp_path / "again", stage0, [])
