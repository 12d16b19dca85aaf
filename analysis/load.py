"""Expert load, routing entropy, collapse and routing purity per layer (paper section 3.2, Figure 7).

The paper's Stage 3 failure is *layer-level expert collapse*: in most layers the router sends (nearly)
all tokens to one expert whatever their modality, while a few layers (e.g. 29) keep a clean split,
image tokens to Expert 0 and text tokens to Expert 1. This module measures exactly that from the router
outputs of one forward pass over a probe set:

- ``choices``: (T,) int, the top-1 expert index of each token (or (T, 1));
- ``probs``:   (T, E) router softmax probabilities (optional: Stage 2 hard routing has none);
- ``is_image``: (T,) bool, the modality of each token (the image-placeholder mask).

Pass only real tokens (drop padding before calling). Per modality ("image", "text", "all") it reports
the hard dispatch fractions (share of tokens whose top-1 choice is each expert), the soft probability
mass (mean router probability per expert), the mean per-token routing entropy and the entropy of the
load distribution (both in nats, within [0, ln E]). Per layer it reports whether the layer collapsed
(one expert takes >= ``collapse_threshold`` of ALL tokens) and the routing purity: the share of image
tokens sent to the vision expert and of text tokens sent to the text expert (``modality_to_expert``,
default the paper's {"image": 0, "text": 1}).

Everything returned is JSON-serialisable; a quantity over zero tokens is None (null), never NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from configuration.contract import LOAD_GROUPS
from trainer.load_stats import group_stats

from ._arrays import to_labels, to_numpy

PAPER_MODALITY_TO_EXPERT = {"image": 0, "text": 1}


def expert_load(
    choices: Any,
    probs: Any = None,
    is_image: Any = None,
    num_experts: int | None = None,
    modality_to_expert: Mapping[str, int] | None = None,
    collapse_threshold: float = 0.99,
) -> dict:
    """Load, entropy, collapse and purity of one layer.

    choices: (T,) or (T, 1) top-1 expert index per token; probs: (T, E) router probabilities or None;
    is_image: (T,) bool (None = all text). ``num_experts`` defaults to probs.shape[1], else to
    max(choices) + 1 (pass it when an expert may receive no token).

    Returns dict(n_tokens, num_experts, image / text / all: dict(n_tokens, counts, dispatch, soft_mass,
    routing_entropy, load_entropy), max_entropy (= ln E), collapsed, dominant_expert, dominant_fraction,
    collapse_threshold, purity: dict(image_on_vision_expert, text_on_text_expert, overall, balanced,
    modality_to_expert)). ``overall`` is the share of all tokens on their modality's expert; ``balanced``
    averages the two modality shares, so a 90 % text probe cannot hide a failed image route.
    """
    ch = to_numpy(choices, dtype=None)
    if ch.ndim == 2 and ch.shape[1] == 1:
        ch = ch[:, 0]
    if ch.ndim != 1:
        raise ValueError(f"choices must be top-1 indices of shape (T,) or (T, 1), got {ch.shape}")
    if ch.size and not np.issubdtype(ch.dtype, np.integer):
        raise ValueError(f"choices must be integer expert indices, got dtype {ch.dtype}")
    ch = ch.astype(np.int64)
    t = ch.shape[0]

    pr = None
    if probs is not None:
        pr = to_numpy(probs)
        if pr.ndim != 2 or pr.shape[0] != t:
            raise ValueError(f"probs must be (T, E) with T = {t}, got {pr.shape}")
        if t and not np.allclose(pr.sum(axis=1), 1.0, atol=1e-3):
            raise ValueError("probs rows must sum to 1 (pass softmax probabilities, not logits)")

    img = np.zeros(t, dtype=bool) if is_image is None else to_labels(is_image, "is_image").astype(bool)
    if img.shape[0] != t:
        raise ValueError(f"is_image has {img.shape[0]} entries for {t} tokens")

    if num_experts is None:
        num_experts = pr.shape[1] if pr is not None else (int(ch.max()) + 1 if t else 1)
    num_experts = int(num_experts)
    if pr is not None and pr.shape[1] != num_experts:
        raise ValueError(f"probs has {pr.shape[1]} experts, num_experts = {num_experts}")
    if t and (ch.min() < 0 or ch.max() >= num_experts):
        raise ValueError(f"choices must lie in [0, {num_experts}), got [{ch.min()}, {ch.max()}]")

    mapping = dict(PAPER_MODALITY_TO_EXPERT if modality_to_expert is None else modality_to_expert)
    if set(mapping) != {"image", "text"}:
        raise ValueError(
            f"modality_to_expert needs exactly the keys 'image' and 'text', got {sorted(mapping)}"
        )

    report: dict[str, Any] = {"n_tokens": t, "num_experts": num_experts}
    report.update(group_stats(ch, pr, img, num_experts))
    report["max_entropy"] = float(np.log(num_experts))

    dispatch_all = report["all"]["dispatch"]
    if dispatch_all is None:
        report.update(collapsed=False, dominant_expert=None, dominant_fraction=None)
    else:
        dominant = int(np.argmax(dispatch_all))
        report.update(
            collapsed=bool(dispatch_all[dominant] >= collapse_threshold),
            dominant_expert=dominant,
            dominant_fraction=float(dispatch_all[dominant]),
        )
    report["collapse_threshold"] = float(collapse_threshold)

    on_image = ch[img] == mapping["image"]
    on_text = ch[~img] == mapping["text"]
    image_share = float(on_image.mean()) if on_image.size else None
    text_share = float(on_text.mean()) if on_text.size else None
    shares = [s for s in (image_share, text_share) if s is not None]
    report["purity"] = {
        "image_on_vision_expert": image_share,
        "text_on_text_expert": text_share,
        "overall": float((on_image.sum() + on_text.sum()) / t) if t else None,
        "balanced": float(np.mean(shares)) if shares else None,
        "modality_to_expert": mapping,
    }
    return report


def load_report(
    per_layer: Mapping[Any, Any],
    num_experts: int | None = None,
    modality_to_expert: Mapping[str, int] | None = None,
    collapse_threshold: float = 0.99,
) -> dict:
    """``expert_load`` for every layer, plus the collapse count.

    per_layer: {layer_index: {"choices": (T,), "probs": (T, E) or None, "is_image": (T,)}} (a tuple
    ``(choices, probs, is_image)`` works too). Returns dict(layers: {str(layer_index): expert_load(...)},
    in ascending layer order, n_layers, n_collapsed, collapsed_layers (ints), collapse_threshold,
    modality_to_expert). Layer keys are strings so the dict equals its own JSON round trip.
    """
    layers: dict[str, dict] = {}
    collapsed: list[int] = []
    for layer in sorted(per_layer, key=int):
        entry = per_layer[layer]
        if isinstance(entry, Mapping):
            choices, probs, is_image = entry["choices"], entry.get("probs"), entry.get("is_image")
        else:
            choices, probs, is_image = entry
        stats = expert_load(
            choices,
            probs,
            is_image,
            num_experts=num_experts,
            modality_to_expert=modality_to_expert,
            collapse_threshold=collapse_threshold,
        )
        layers[str(int(layer))] = stats
        if stats["collapsed"]:
            collapsed.append(int(layer))
    return {
        "layers": layers,
        "n_layers": len(layers),
        "n_collapsed": len(collapsed),
        "collapsed_layers": collapsed,
        "collapse_threshold": float(collapse_threshold),
        "modality_to_expert": dict(
            PAPER_MODALITY_TO_EXPERT if modality_to_expert is None else modality_to_expert
        ),
    }


__all__ = ["LOAD_GROUPS", "PAPER_MODALITY_TO_EXPERT", "expert_load", "load_report"]
