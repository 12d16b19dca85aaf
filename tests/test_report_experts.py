"""The per-expert changed-parameters check: a layer's experts share one stacked tensor, so only a per-slice
comparison shows an expert that never trained (Stage 2's last-layer image expert)."""

from __future__ import annotations

import numpy as np

from pipeline.report import unchanged_experts


def _checkpoint(rng, layers=2, experts=2):
    out = {}
    for layer in range(layers):
        for name in ("gate_up_proj", "down_proj"):
            out[f"model.layers.{layer}.mlp.experts.{name}"] = rng.normal(size=(experts, 4, 3))
        out[f"model.layers.{layer}.mlp.gate.weight"] = rng.normal(size=(experts, 3))
    return out


def test_an_expert_that_never_trained_is_named():
    rng = np.random.default_rng(0)
    before = _checkpoint(rng)
    after = {k: v.copy() for k, v in before.items()}
    for name in ("gate_up_proj", "down_proj"):
        after[f"model.layers.0.mlp.experts.{name}"] += 1.0  # layer 0: both experts move
        after[f"model.layers.1.mlp.experts.{name}"][1] += 1.0  # layer 1: only expert 1 moves
    assert unchanged_experts(before, after) == ["layer 1 expert 0"]


def test_an_expert_changed_in_one_tensor_only_counts_as_changed():
    rng = np.random.default_rng(1)
    before = _checkpoint(rng, layers=1)
    after = {k: v.copy() for k, v in before.items()}
    after["model.layers.0.mlp.experts.down_proj"][0] += 1.0
    assert unchanged_experts(before, after) == ["layer 0 expert 1"]
    assert unchanged_experts(before, before) == ["layer 0 expert 0", "layer 0 expert 1"]
