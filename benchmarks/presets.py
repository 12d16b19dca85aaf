"""What the benchmark runs on: model sizes and batch shapes per preset, and the MoE / dense model pair.

`tiny` is the project's embedded default (`configuration/presets/tiny.yaml`). `mid` exists only here: a model
wide enough (hidden 1024, 8 layers, 512-token sequences) that matmuls, not Python overhead, dominate a step,
which is where an MoE should sit at the cost of the dense model it replaces. Both keep tiny's vision tower
(64 px, patch 8: 64 image tokens), so every batch is image + text.

The dense baseline is the same class with `moe_layers=[]`: same attention, embeddings, head and vision tower,
one MLP per layer, i.e. exactly the MoE model's active size (top-1 of 2 experts) minus the routers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from configuration import load_preset

# Ids that are never text: <unk>/pad 0, BOS 1, EOS 2, [INST] 3, [/INST] 4, ..., [IMG] 10. Random text ids are
# drawn above them so no accidental placeholder or special token enters a batch.
FIRST_TEXT_ID = 1000
NEWLINE_ID = 781  # "<0x0A>" in the Mistral v0.3 vocabulary: what the collator puts after the image


@dataclass(frozen=True)
class BenchPreset:
    """Model fields and the batch a preset is measured on.

    `seq_len` counts every token of a sample (BOS + image placeholders + newline + text); labels cover the
    text, as the caption stages train. `cuda_batch_size` is used on a GPU, where a CPU-sized batch would leave
    the device idle and MFU meaningless.
    """

    name: str
    config_fields: dict
    batch_size: int
    seq_len: int
    cuda_batch_size: int
    new_tokens: int  # tokens generated per prompt in the generation benchmark
    prompt_text: int  # text tokens after the image in a generation / analysis prompt
    step_kernel_check: bool = True  # also time a training step with the other experts kernel (costly at mid)


def _tiny_fields() -> dict:
    preset = load_preset("tiny")
    return {**preset["mistral_config"], **preset["moe_vlm"]}


def _mid_fields() -> dict:
    fields = _tiny_fields()
    fields.update(
        hidden_size=1024,
        intermediate_size=2816,  # a multiple of 8: grouped_mm needs 16-byte-aligned strides
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=1024,
    )
    return fields


PRESETS = {
    "tiny": lambda: BenchPreset(
        "tiny", _tiny_fields(), batch_size=4, seq_len=128, cuda_batch_size=32, new_tokens=32, prompt_text=8
    ),
    "mid": lambda: BenchPreset(
        "mid",
        _mid_fields(),
        batch_size=1,
        seq_len=512,
        cuda_batch_size=16,
        new_tokens=8,
        prompt_text=8,
        step_kernel_check=False,
    ),
}


def get_preset(name: str) -> BenchPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown benchmark preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def build_config(preset: BenchPreset, *, dense: bool = False, **overrides):
    """The preset's `MoeVlmConfig`; `dense=True` gives the same model with one MLP per layer."""
    from modeling_moe_vlm import MoeVlmConfig

    fields = {**preset.config_fields, **overrides}
    if dense:
        fields["moe_layers"] = []
    return MoeVlmConfig(**fields)


def build_model(preset: BenchPreset, *, dense: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised model (same seed for the MoE model and its dense baseline), on `device`."""
    from modeling_moe_vlm import MoeVlmForCausalLM

    torch.manual_seed(seed)
    model = MoeVlmForCausalLM(build_config(preset, dense=dense))
    return model.to(device=device, dtype=dtype)


def _image_prefix(config) -> torch.Tensor:
    """`<s> [IMG]*n \\n`: what the collator puts before a caption. (2 + n,) long."""
    return torch.tensor(
        [config.bos_token_id] + [config.image_token_id] * config.num_image_tokens + [NEWLINE_ID]
    )


def _sample(preset: BenchPreset, batch_size: int, n_text: int, device, dtype, seed: int) -> dict:
    """(batch, 2 + n_image + n_text) ids of image + random text, and random pixels for the images."""
    config = build_config(preset)
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(FIRST_TEXT_ID, config.vocab_size, (batch_size, n_text), generator=generator)
    input_ids = torch.cat([_image_prefix(config).expand(batch_size, -1), text], dim=1)
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)  # (batch, 3, S, S)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids, device=device),
        "pixel_values": pixel_values.to(device=device, dtype=dtype),
    }


def model_kernel(preset: BenchPreset) -> str:
    """The experts kernel the model picks by default for this preset (built on the meta device: no memory)."""
    from modeling_moe_vlm import MoeVlmForCausalLM

    with torch.device("meta"):
        return MoeVlmForCausalLM(build_config(preset)).config._experts_implementation


def training_batch(preset: BenchPreset, batch_size: int, device, dtype, seed: int = 0) -> dict:
    """One image + caption batch shaped like the collator's, `preset.seq_len` tokens per sample, labels on the
    text (random ids: the benchmark measures speed, not language)."""
    n_text = preset.seq_len - build_config(preset).num_image_tokens - 2
    if n_text < 1:
        raise ValueError(f"seq_len {preset.seq_len} leaves no room for text after the image tokens")
    batch = _sample(preset, batch_size, n_text, device, dtype, seed)
    labels = batch["input_ids"].clone()
    labels[:, :-n_text] = -100  # BOS, image placeholders and the newline are not predicted
    return {**batch, "labels": labels}


def generation_prompt(preset: BenchPreset, batch_size: int, device, dtype) -> dict:
    """`batch_size` equal-length prompts: one image + `preset.prompt_text` text tokens, no labels."""
    return _sample(preset, batch_size, preset.prompt_text, device, dtype, seed=1)
