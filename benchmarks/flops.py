"""Model FLOPs of a training step, and the peak FLOP/s of the device, for GFLOP/s and MFU.

Counted the PaLM way (model FLOPs, not hardware FLOPs): 6 x active parameters x tokens for every matmul that
trains, plus 12 x layers x hidden x seq per token for attention scores, plus the LM head on labelled positions
only (the model computes logits nowhere else), plus the frozen vision tower's forward (2 x its parameters per
patch). The active parameters are the dense model's, so an MoE step is credited with exactly the work of the
dense model it replaces: any extra time shows up as lower MFU, not as extra FLOPs.
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (no sparsity), by a substring of `torch.cuda.get_device_name()`.
CUDA_BF16_PEAK = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_step_flops(dense_model, batch: dict) -> float:
    """FLOPs of one forward + backward of `dense_model` (a `moe_layers=[]` MoeVlmForCausalLM) on `batch`."""
    config = dense_model.config
    batch_size, seq = batch["input_ids"].shape
    tokens = batch_size * seq
    decoder = _numel(dense_model.model.layers)  # attention + one MLP per layer (+ norms, negligible)
    flops = 6 * decoder * tokens
    flops += 12 * config.num_hidden_layers * config.hidden_size * seq * tokens  # attention scores and mix
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    flops += 6 * config.hidden_size * config.vocab_size * labelled  # LM head where labels need it
    images = batch["pixel_values"].shape[0]
    n_image = config.num_image_tokens
    flops += 6 * _numel(dense_model.model.connector) * images * n_image
    flops += 2 * _numel(dense_model.model.vision_tower) * images * (n_image + 1)  # frozen: forward only
    return float(flops)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for `dtype`, when known (bf16 on the GPUs above); None otherwise (CPU)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in CUDA_BF16_PEAK.items():
        if key in name:
            return value
    return None
