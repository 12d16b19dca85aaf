"""Expert load per token group: the one definition that training-time routing logs and the analyses share.

For the tokens of each group in `LOAD_GROUPS` (image tokens, text tokens, all tokens): hard dispatch (the share of
tokens whose top-1 choice is each expert), soft mass (the mean router probability of each expert), the mean
per-token routing entropy and the entropy of the hard load (nats, within [0, ln E]). `trainer.routing_stats`
accumulates these over training steps; `analysis.load.expert_load` adds collapse and purity on top. It lives in the
trainer package (below analysis) so that data flows one way: configuration -> trainer -> analysis.

Inputs are numpy arrays of real tokens only (drop padding first). A quantity over zero tokens is None, never NaN.
"""

from __future__ import annotations

import numpy as np

from configuration.contract import LOAD_GROUPS


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats with 0 log 0 = 0."""
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(axis=axis)


def _stats(choices: np.ndarray, probs: np.ndarray | None, num_experts: int) -> dict:
    n = int(choices.shape[0])
    if n == 0:
        return {
            "n_tokens": 0,
            "counts": [0] * num_experts,
            "dispatch": None,
            "soft_mass": None,
            "routing_entropy": None,
            "load_entropy": None,
        }
    counts = np.bincount(choices, minlength=num_experts)  # (E,)
    dispatch = counts / n
    max_entropy = float(np.log(num_experts))
    out = {
        "n_tokens": n,
        "counts": [int(x) for x in counts],
        "dispatch": [float(x) for x in dispatch],
        "soft_mass": None,
        "routing_entropy": None,
        # Entropy of the hard load: 0 when one expert takes everything, ln E when perfectly balanced.
        "load_entropy": float(np.clip(_entropy(dispatch), 0.0, max_entropy)),
    }
    if probs is not None:
        out["soft_mass"] = [float(x) for x in probs.mean(axis=0)]
        # Mean per-token entropy: how *uncertain* the router is, not how balanced the load is (a router
        # that is 50/50 on every token has ln 2 here even if argmax ties all break to one expert).
        out["routing_entropy"] = float(np.clip(_entropy(probs).mean(), 0.0, max_entropy))
    return out


def group_stats(
    choices: np.ndarray, probs: np.ndarray | None, is_image: np.ndarray, num_experts: int
) -> dict[str, dict]:
    """`{group: {n_tokens, counts, dispatch, soft_mass, routing_entropy, load_entropy}}` for each of `LOAD_GROUPS`.

    choices: (T,) int64 top-1 expert per token; probs: (T, E) router probabilities or None (hard routing has
    none); is_image: (T,) bool.
    """
    selections = {"image": is_image, "text": ~is_image, "all": np.ones_like(is_image)}
    return {
        group: _stats(
            choices[selections[group]], None if probs is None else probs[selections[group]], num_experts
        )
        for group in LOAD_GROUPS
    }


__all__ = ["group_stats"]
