"""Do the experts compute different functions? Linear CKA and weight distances.

The review of modality-aware routing asks for an "expert function analysis": whether the experts that
specialise on a modality really compute different functions, measured with CKA (Kornblith et al.,
2019). Two uses here:

- representations: feed the same N tokens through expert 0 and expert 1 (or one expert before and after
  a stage) and compare the (N, H) outputs with ``linear_cka``: 1 = the same function up to a rotation
  and scale, near 0 = unrelated;
- weights: ``weight_distance`` measures how far a stage moved an expert from its starting point (e.g.
  the upcycled dense MLP), and ``expert_cka_matrix`` compares the experts' weight matrices pairwise
  (rows are output units, which correspond across experts upcycled from one MLP).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import to_numpy


def linear_cka(x: Any, y: Any) -> float:
    """Linear centred kernel alignment between two representations of the same n examples.

    x: (n, d1), y: (n, d2). CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred
    Xc, Yc (Kornblith et al. 2019, eq. for linear HSIC). In [0, 1]; 1 for identical inputs and invariant
    to orthogonal transforms and isotropic scaling of either side (not to arbitrary invertible maps).
    Computed through whichever of the feature-space or the (n, n) Gram form is smaller.
    A constant representation (zero variance) has no defined CKA: ValueError.
    """
    a = to_numpy(x)
    b = to_numpy(y)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"x and y must be (n, d1) and (n, d2) with the same n, got {a.shape} and {b.shape}")
    if a.shape[0] < 2:
        raise ValueError("need at least 2 examples")
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    n = a.shape[0]
    if n < a.shape[1] + b.shape[1]:
        ka, kb = a @ a.T, b @ b.T  # (n, n) Gram matrices; <Ka, Kb>_F = ||A^T B||_F^2
        cross, norm_a, norm_b = np.vdot(ka, kb), np.linalg.norm(ka), np.linalg.norm(kb)
    else:
        cross = np.linalg.norm(b.T @ a) ** 2
        norm_a, norm_b = np.linalg.norm(a.T @ a), np.linalg.norm(b.T @ b)
    if norm_a == 0 or norm_b == 0:
        raise ValueError("CKA is undefined for a constant representation (zero variance after centring)")
    return float(np.clip(cross / (norm_a * norm_b), 0.0, 1.0))


def expert_cka_matrix(weights: Any) -> np.ndarray:
    """Pairwise linear CKA of E experts' weight matrices: weights (E, n, d) -> (E, E).

    Each expert's (n, d) matrix is treated as n examples (output units) with d features, e.g. a
    transformers ``gate_up_proj`` (E, 2I, H) or ``down_proj`` (E, H, I) parameter.
    """
    w = to_numpy(weights)
    if w.ndim != 3:
        raise ValueError(f"weights must be (E, n, d), got {w.shape}")
    e = w.shape[0]
    out = np.eye(e)
    for i in range(e):
        for j in range(i + 1, e):
            out[i, j] = out[j, i] = linear_cka(w[i], w[j])
    return out


def weight_distance(w: Any, w0: Any) -> dict:
    """How far ``w`` moved from ``w0`` (same shape, any dtype/device).

    Returns dict(l2 = ||w - w0||_F, relative = l2 / ||w0||_F (None if w0 is all zero), norm = ||w||_F,
    norm0 = ||w0||_F, cosine = <w, w0> / (||w|| ||w0||) (None if either is zero), n_elements).
    """
    a = to_numpy(w)
    b = to_numpy(w0)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    l2 = float(np.linalg.norm((a - b).ravel()))
    norm, norm0 = float(np.linalg.norm(a.ravel())), float(np.linalg.norm(b.ravel()))
    return {
        "l2": l2,
        "relative": l2 / norm0 if norm0 > 0 else None,
        "norm": norm,
        "norm0": norm0,
        "cosine": float(np.vdot(a, b) / (norm * norm0)) if norm > 0 and norm0 > 0 else None,
        "n_elements": int(a.size),
    }


__all__ = ["expert_cka_matrix", "linear_cka", "weight_distance"]
