"""How much a layer's routing says about the modality: the mutual information I(expert; modality) between the expert a
token is dispatched to and whether it is an image or a text token, normalised by H(modality), with a label-shuffle
null (the modality labels permuted across tokens, routing kept).

Normalised MI is 1 when the expert determines the modality (the Stage 2 roles, or any relabelling of them) and 0 when
routing is independent of it (a coin flip, or every token to one expert). Unlike purity it needs no assignment of
roles to experts, and unlike the per-modality load it is one number per layer that the review's question reads
directly: does the routing still carry modality information after Stage 3? scikit-learn computes the MI from the
contingency table; the shuffle only rebuilds that table.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.stats import entropy
from sklearn.metrics import mutual_info_score


def _contingency(is_image: np.ndarray, choices: np.ndarray, num_experts: int) -> np.ndarray:
    """(2, E) token counts: rows text / image, columns the dispatched expert."""
    return np.bincount(is_image.astype(int) * num_experts + choices, minlength=2 * num_experts).reshape(
        2, num_experts
    )


def routing_information(
    is_image: np.ndarray, choices: np.ndarray, num_experts: int, *, n_shuffles: int = 200, seed: int = 0
) -> dict:
    """One layer: `is_image` (T,) bool and `choices` (T,) expert ids of the same tokens. Returns MI in nats, H(modality),
    the normalised MI, and the shuffle null's mean and 95th percentile of the normalised MI with the permutation
    p-value (add-one)."""
    is_image, choices = np.asarray(is_image, bool), np.asarray(choices, int)
    h_modality = float(entropy(np.bincount(is_image.astype(int), minlength=2)))
    if h_modality == 0.0:  # one modality only: nothing to be informative about
        return {
            "mi": 0.0,
            "h_modality": 0.0,
            "normalised": None,
            "null_mean": None,
            "null_q95": None,
            "p_value": None,
        }
    mi = float(mutual_info_score(None, None, contingency=_contingency(is_image, choices, num_experts)))
    rng = np.random.default_rng(seed)
    null = np.array(
        [
            mutual_info_score(
                None, None, contingency=_contingency(rng.permutation(is_image), choices, num_experts)
            )
            for _ in range(n_shuffles)
        ]
    )
    return {
        "mi": mi,
        "h_modality": h_modality,
        "normalised": mi / h_modality,
        "null_mean": float(null.mean() / h_modality),
        "null_q95": float(np.quantile(null, 0.95) / h_modality),
        "p_value": float((1 + (null >= mi).sum()) / (1 + n_shuffles)),
        "n_tokens": int(is_image.size),
        "n_shuffles": n_shuffles,
    }


def routing_information_report(
    per_layer: Mapping[int, Mapping[str, np.ndarray]],
    num_experts: int,
    *,
    n_shuffles: int = 200,
    seed: int = 0,
) -> dict:
    """Every MoE layer of `analysis.extract.routing_arrays`-shaped input (`{layer: {"choices", "is_image"}}`): the
    per-layer results, keyed by layer, and their mean normalised MI."""
    layers = {
        int(layer): routing_information(
            d["is_image"], d["choices"], num_experts, n_shuffles=n_shuffles, seed=seed + int(layer)
        )
        for layer, d in per_layer.items()
    }
    values = [r["normalised"] for r in layers.values() if r["normalised"] is not None]
    return {"layers": layers, "mean_normalised": float(np.mean(values)) if values else None}
