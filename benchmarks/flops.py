"""The peak FLOP/s of the device, for MFU. The model FLOPs of a step are `trainer.flops.step_flops` (one count for the
benchmark, `moe-vlm train --profile` and the utilisation table); the benchmark credits an MoE step with the FLOPs of
the dense model it replaces, so any extra time shows up as lower MFU, not as extra FLOPs."""

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


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for `dtype`, when known (bf16 on the GPUs above); None otherwise (CPU)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in CUDA_BF16_PEAK.items():
        if key in name:
            return value
    return None
