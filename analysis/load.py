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
load distribution (both in nats, within [0, ln E]). Per layer it reports whether the layer collapsed,
under two definitions reported side by side:

- hard (the paper's): one expert takes >= ``collapse_threshold`` (99 %) of ALL tokens' top-1 dispatch;
- soft (the authors' code measures load as the mean router probability): one expert's mean probability over
  ALL tokens is >= ``soft_collapse_threshold`` (90 %). A router can dispatch 98 % of tokens to one expert while
  its soft load is 60/40 (argmax on small logit gaps): hard-collapsed in effect, not soft-collapsed.

and the routing purity: the share of image tokens sent to the vision expert and of text tokens sent to the
text expert (``modality_to_expert``, default the paper's {"image": 0, "text": 1}).

``routing_dynamics`` reads the same quantities from a training routing log (one record per logging step) into
per-layer time series, with the first step each layer was collapsed under each definition.

Everything returned is JSON-serialisable; a quantity over zero tokens is None (null), never NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from configuration.contract import LOAD_GROUPS
from trainer.load_stats import group_stats

from ._arrays import to_labels, to_numpy

PAPER_MODALITY_TO_EXPERT = {"image": 0, "text": 1}
HARD_COLLAPSE_THRESHOLD = 0.99  # share of top-1 dispatch (the paper's definition)
SOFT_COLLAPSE_THRESHOLD = 0.90  # mean router probability (load as the authors' code measures it)


def collapse(dispatch: Sequence[float] | None, threshold: float) -> dict:
    """{collapsed, dominant_expert, fraction} of one load vector (per-expert shares of ALL tokens, summing to 1)
    against `threshold`; a load of no tokens (None) is not collapsed."""
    if dispatch is None:
        return {"collapsed": False, "dominant_expert": None, "fraction": None}
    dominant = int(np.argmax(dispatch))
    fraction = float(dispatch[dominant])
    return {"collapsed": bool(fraction >= threshold), "dominant_expert": dominant, "fraction": fraction}


def expert_load(
    choices: Any,
    probs: Any = None,
    is_image: Any = None,
    num_experts: int | None = None,
    modality_to_expert: Mapping[str, int] | None = None,
    collapse_threshold: float = HARD_COLLAPSE_THRESHOLD,
    soft_collapse_threshold: float = SOFT_COLLAPSE_THRESHOLD,
    logits: Any = None,
) -> dict:
    """Load, entropy, collapse and purity of one layer.

    choices: (T,) or (T, 1) top-1 expert index per token; probs: (T, E) router probabilities or None;
    is_image: (T,) bool (None = all text). ``num_experts`` defaults to probs.shape[1], else to
    max(choices) + 1 (pass it when an expert may receive no token).

    Returns dict(n_tokens, num_experts, image / text / all: dict(n_tokens, counts, dispatch, soft_mass,
    routing_entropy, load_entropy, logit_gap, logit_margin, agreement), max_entropy (= ln E), collapsed,
    dominant_expert, dominant_fraction, collapse_threshold (hard collapse: top-1 dispatch), collapsed_soft,
    soft_dominant_expert, soft_dominant_fraction, soft_collapse_threshold (soft collapse: mean router probability;
    False without probs), purity: dict(image_on_vision_expert, text_on_text_expert, overall, balanced,
    modality_to_expert)). ``overall`` is the share of all tokens on their modality's expert; ``balanced``
    averages the two modality shares, so a 90 % text probe cannot hide a failed image route. ``logits`` (T, E),
    optional, give the logit gap and margin (else they come from ``probs``: log-probability differences).
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

    lg = None
    if logits is not None:
        lg = to_numpy(logits)
        if lg.shape != (t, num_experts):
            raise ValueError(f"logits must be (T, E) = ({t}, {num_experts}), got {lg.shape}")

    report: dict[str, Any] = {"n_tokens": t, "num_experts": num_experts}
    report.update(group_stats(ch, pr, img, num_experts, logits=lg))
    report["max_entropy"] = float(np.log(num_experts))

    hard = collapse(report["all"]["dispatch"], collapse_threshold)
    soft = collapse(report["all"]["soft_mass"], soft_collapse_threshold)
    report.update(
        collapsed=hard["collapsed"],
        dominant_expert=hard["dominant_expert"],
        dominant_fraction=hard["fraction"],
        collapse_threshold=float(collapse_threshold),
        collapsed_soft=soft["collapsed"],
        soft_dominant_expert=soft["dominant_expert"],
        soft_dominant_fraction=soft["fraction"],
        soft_collapse_threshold=float(soft_collapse_threshold),
    )

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
    collapse_threshold: float = HARD_COLLAPSE_THRESHOLD,
    soft_collapse_threshold: float = SOFT_COLLAPSE_THRESHOLD,
) -> dict:
    """``expert_load`` for every layer, plus the collapse counts under both definitions.

    per_layer: {layer_index: {"choices": (T,), "probs": (T, E) or None, "is_image": (T,), "logits": (T, E),
    optional}} (a tuple ``(choices, probs, is_image)`` works too). Returns dict(layers: {str(layer_index):
    expert_load(...)}, in ascending layer order, n_layers, n_collapsed, collapsed_layers (ints; hard: top-1
    dispatch >= collapse_threshold), collapse_threshold, n_collapsed_soft, collapsed_layers_soft (mean router
    probability >= soft_collapse_threshold), soft_collapse_threshold, modality_to_expert). Layer keys are strings
    so the dict equals its own JSON round trip.
    """
    layers: dict[str, dict] = {}
    collapsed: list[int] = []
    collapsed_soft: list[int] = []
    for layer in sorted(per_layer, key=int):
        entry = per_layer[layer]
        logits = None
        if isinstance(entry, Mapping):
            choices, probs, is_image = entry["choices"], entry.get("probs"), entry.get("is_image")
            logits = entry.get("logits")
        else:
            choices, probs, is_image = entry
        stats = expert_load(
            choices,
            probs,
            is_image,
            num_experts=num_experts,
            modality_to_expert=modality_to_expert,
            collapse_threshold=collapse_threshold,
            soft_collapse_threshold=soft_collapse_threshold,
            logits=logits,
        )
        layers[str(int(layer))] = stats
        if stats["collapsed"]:
            collapsed.append(int(layer))
        if stats["collapsed_soft"]:
            collapsed_soft.append(int(layer))
    return {
        "layers": layers,
        "n_layers": len(layers),
        "n_collapsed": len(collapsed),
        "collapsed_layers": collapsed,
        "collapse_threshold": float(collapse_threshold),
        "n_collapsed_soft": len(collapsed_soft),
        "collapsed_layers_soft": collapsed_soft,
        "soft_collapse_threshold": float(soft_collapse_threshold),
        "modality_to_expert": dict(
            PAPER_MODALITY_TO_EXPERT if modality_to_expert is None else modality_to_expert
        ),
    }


# The per-modality series of a routing log record (`trainer.callbacks.RoutingStatsCallback`), per layer.
DYNAMICS_FIELDS = ("dispatch0", "prob0", "logit_gap", "logit_margin", "entropy", "agreement")


def _series(records: Sequence[Mapping], source: str) -> dict:
    """{layer: {modality: {"steps": [...], field: [...]}}} of one source ("train": the record's `layers`,
    "probe": its `probe.layers`); a field an older log lacks is None at that step."""
    out: dict[str, dict] = {}
    for record in records:
        layers = record.get("layers") if source == "train" else (record.get("probe") or {}).get("layers")
        for layer, per_modality in (layers or {}).items():
            for modality, stats in per_modality.items():
                series = out.setdefault(str(layer), {}).setdefault(
                    modality, {"steps": [], **{f: [] for f in DYNAMICS_FIELDS}}
                )
                series["steps"].append(int(record["step"]))
                series["dispatch0"].append(float(stats["dispatch"][0]))
                series["prob0"].append(float(stats["prob"][0]))
                for name in DYNAMICS_FIELDS[2:]:
                    value = stats.get(name)
                    series[name].append(None if value is None else float(value))
    return {layer: out[layer] for layer in sorted(out, key=int)}


def _onset(steps: Sequence[int], loads: Sequence[Sequence[float]], threshold: float) -> dict:
    """First logged step at which a load vector was collapsed, the expert it went to, and whether the last
    logged one still is."""
    flags = [collapse(load, threshold) for load in loads]
    first = next((i for i, f in enumerate(flags) if f["collapsed"]), None)
    return {
        "first_step": None if first is None else int(steps[first]),
        "expert": None if first is None else flags[first]["dominant_expert"],
        "at_end": bool(flags[-1]["collapsed"]) if flags else False,
        "n_collapsed_logs": sum(f["collapsed"] for f in flags),
    }


def routing_dynamics(
    records: Sequence[Mapping],
    collapse_threshold: float = HARD_COLLAPSE_THRESHOLD,
    soft_collapse_threshold: float = SOFT_COLLAPSE_THRESHOLD,
) -> dict:
    """Per-layer routing over training steps from routing-log records (read them with
    `trainer.routing_stats.read_routing_log`): when does each layer collapse, and is it the router's decision?

    Returns dict(steps, train: {layer: {modality: {steps, dispatch0, prob0, logit_gap, logit_margin, entropy,
    agreement}}} (the training batches, as routed with Gumbel noise and dropout), probe: the same for the
    eval-mode probe or {} when the log has none, probe_info, collapse: {source: {layer: {"hard": onset,
    "soft": onset}}} with onset = dict(first_step, expert, at_end, n_collapsed_logs) over the "all" tokens,
    hard = top-1 dispatch >= collapse_threshold, soft = mean router probability >= soft_collapse_threshold,
    collapse_threshold, soft_collapse_threshold). `dispatch0` / `prob0` are expert 0's (the vision expert's)
    share; with two experts, expert 1's is one minus it.
    """
    records = sorted(records, key=lambda r: r["step"])
    result: dict[str, Any] = {
        "steps": [int(r["step"]) for r in records],
        "train": _series(records, "train"),
        "probe": _series(records, "probe"),
        "probe_info": next(
            ({k: v for k, v in r["probe"].items() if k != "layers"} for r in records if r.get("probe")), None
        ),
        "collapse": {},
        "collapse_threshold": float(collapse_threshold),
        "soft_collapse_threshold": float(soft_collapse_threshold),
    }
    for source in ("train", "probe"):
        onsets = {}
        for layer in result[source]:
            steps, hard, soft = [], [], []
            for record in records:
                layers = (
                    record.get("layers") if source == "train" else (record.get("probe") or {}).get("layers")
                )
                stats = ((layers or {}).get(layer) or {}).get("all")
                if stats:
                    steps.append(int(record["step"]))
                    hard.append(stats["dispatch"])
                    soft.append(stats["prob"])
            onsets[layer] = {
                "hard": _onset(steps, hard, collapse_threshold),
                "soft": _onset(steps, soft, soft_collapse_threshold),
            }
        result["collapse"][source] = onsets
    return result


# `analysis._EXPORTS["load"]` must equal this list (tests/test_analysis_exports.py).
def collapse_definitions(load: dict | None) -> tuple[str, str]:
    """(hard, soft) collapse definitions in words, at the thresholds an analysis.json `load` block was computed with
    (this module's defaults when it does not say): the one wording the report and the model card share."""
    load = load or {}
    hard = float(load.get("collapse_threshold", HARD_COLLAPSE_THRESHOLD))
    soft = float(load.get("soft_collapse_threshold", SOFT_COLLAPSE_THRESHOLD))
    return (
        f"one expert takes ≥ {hard:.0%} of all tokens' top-1 dispatch",
        f"one expert's mean router probability over all tokens is ≥ {soft:.0%}",
    )


__all__ = [
    "DYNAMICS_FIELDS",
    "HARD_COLLAPSE_THRESHOLD",
    "collapse_definitions",
    "LOAD_GROUPS",
    "PAPER_MODALITY_TO_EXPERT",
    "SOFT_COLLAPSE_THRESHOLD",
    "collapse",
    "expert_load",
    "load_report",
    "routing_dynamics",
]
