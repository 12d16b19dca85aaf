"""Expert load per token group: the one definition that training-time routing logs and the analyses share.

For the tokens of each group in `LOAD_GROUPS` (image tokens, text tokens, all tokens): hard dispatch (the share of
tokens whose top-1 choice is each expert), soft mass (the mean router probability of each expert), the mean
per-token routing entropy and the entropy of the hard load (nats, within [0, ln E]), and three numbers that say
how decided the router itself is:

- `logit_gap`: the mean of logit[expert 0] - max(logit of the other experts) (with two experts logit0 - logit1),
  signed: > 0 leans to expert 0, the vision expert of the paper's roles;
- `logit_margin`: the mean of top-1 - top-2 logit (>= 0): how far the router is from a coin flip, whichever way;
- `agreement`: the share of tokens dispatched to the router's own argmax. Gumbel noise and router dropout can
  overturn a decision: at temperature 1 with two experts a token goes to the argmax with probability
  sigmoid(|gap|), so 0.5 means noise decides and 1.0 means the router does. 1 in eval mode, by construction.

Logit differences equal log-probability differences, so without the logits they come from the probabilities.
`trainer.routing_stats`
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


def logit_differences(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token, (logit of expert 0 - the best other expert's, top-1 - top-2), both (T,), from (T, E) logits
    (or log-probabilities: softmax keeps differences). Needs E >= 2."""
    others = scores[:, 1:].max(axis=1)  # (T,)
    top2 = np.sort(scores, axis=1)[:, -2:]  # (T, 2): second best, best
    return scores[:, 0] - others, top2[:, 1] - top2[:, 0]


def _log_probs(probs: np.ndarray) -> np.ndarray:
    # Floored at the smallest positive float64 so a saturated (one-hot) router gives a large, finite gap.
    return np.log(np.maximum(probs, np.finfo(np.float64).tiny))


def _stats(
    choices: np.ndarray, probs: np.ndarray | None, num_experts: int, logits: np.ndarray | None = None
) -> dict:
    n = int(choices.shape[0])
    if n == 0:
        return {
            "n_tokens": 0,
            "counts": [0] * num_experts,
            "dispatch": None,
            "soft_mass": None,
            "routing_entropy": None,
            "load_entropy": None,
            "logit_gap": None,
            "logit_margin": None,
            "agreement": None,
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
        "logit_gap": None,
        "logit_margin": None,
        "agreement": None,
    }
    if probs is not None:
        out["soft_mass"] = [float(x) for x in probs.mean(axis=0)]
        # Mean per-token entropy: how *uncertain* the router is, not how balanced the load is (a router
        # that is 50/50 on every token has ln 2 here even if argmax ties all break to one expert).
        out["routing_entropy"] = float(np.clip(_entropy(probs).mean(), 0.0, max_entropy))
    scores = logits if logits is not None else (None if probs is None else _log_probs(probs))
    if scores is not None:
        out["agreement"] = float((choices == scores.argmax(axis=1)).mean())
        if num_experts >= 2:
            gap, margin = logit_differences(scores)
            out["logit_gap"], out["logit_margin"] = float(gap.mean()), float(margin.mean())
    return out


def group_stats(
    choices: np.ndarray,
    probs: np.ndarray | None,
    is_image: np.ndarray,
    num_experts: int,
    logits: np.ndarray | None = None,
) -> dict[str, dict]:
    """`{group: {n_tokens, counts, dispatch, soft_mass, routing_entropy, load_entropy, logit_gap, logit_margin,
    agreement}}` for each of `LOAD_GROUPS`.

    choices: (T,) int64 top-1 expert per token; probs: (T, E) router probabilities or None (hard routing has
    none); is_image: (T,) bool; logits: (T, E) router logits, optional (else the logit numbers come from probs).
    """
    selections = {"image": is_image, "text": ~is_image, "all": np.ones_like(is_image)}
    return {
        group: _stats(
            choices[selections[group]],
            None if probs is None else probs[selections[group]],
            num_experts,
            None if logits is None else logits[selections[group]],
        )
        for group in LOAD_GROUPS
    }


__all__ = ["group_stats", "logit_differences"]
