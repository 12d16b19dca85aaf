"""Shared fixtures: one tiny-config factory used everywhere (transformers' habit), CPU, offline."""

from __future__ import annotations

import offline_env

offline_env.apply()  # before torch, transformers and the rest are imported

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def no_cpp_compiler(monkeypatch):
    """The compiled kernels' build fails as it does without g++ or ninja (`cpp_kernels.compiled` raises); after the
    test the next use builds (or loads the cached build) for real."""
    import subprocess

    import torch.utils.cpp_extension

    from modeling_moe_vlm import cpp_kernels

    def no_compiler(*args, **kwargs):
        raise subprocess.CalledProcessError(1, ["ninja", "-v"])

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", no_compiler)
    cpp_kernels.compiled.cache_clear()
    yield
    cpp_kernels.compiled.cache_clear()


def tiny_config(**overrides):
    """A MoeVlmConfig small enough for a unit test: 2 layers, hidden 64, a 32 px ViT with patch 8 (16 image tokens),
    the real 32,768-token Mistral vocabulary (so the real tokenizer and `[IMG]` id 10 apply)."""
    from modeling_moe_vlm import MoeVlmConfig

    fields = dict(
        vocab_size=32768,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=None,
        pad_token_id=0,
        vision_config={
            "embed_dim": 64,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        },
    )
    fields.update(overrides)
    return MoeVlmConfig(**fields)


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture
def tiny_model():
    from modeling_moe_vlm import MoeVlmForCausalLM

    torch.manual_seed(0)
    return MoeVlmForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="session")
def tokenizer():
    from configuration import mistral_tokenizer

    return mistral_tokenizer()


@pytest.fixture
def processor(tokenizer):
    from configuration import build_processor

    return build_processor(tiny_config(), tokenizer=tokenizer)


@pytest.fixture
def red_image():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse([8, 8, 24, 24], fill=(220, 30, 30))
    return image


# ----- what the training tests build once per module (helpers in training_helpers.py) ---------------------------------
@pytest.fixture(scope="module")
def workdir(request, tmp_path_factory):
    """A folder per test module for what its module-scoped fixtures build."""
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="module")
def shapes(workdir):
    """A Shapes world small enough for a few training steps (`training_helpers.make_shapes`)."""
    from training_helpers import make_shapes

    return make_shapes(workdir / "shapes")


@pytest.fixture(scope="module")
def stage0(workdir):
    """An upcycled Stage 0 directory of `tiny_config` (`training_helpers.make_stage0`)."""
    from training_helpers import make_stage0

    return make_stage0(workdir / "stage0")
