"""Small array helpers shared by the analysis modules.

The analyses take plain arrays so that the model-running code (which holds torch tensors, possibly
bf16 on a GPU) and tests (numpy) can call them alike. Everything is converted to float64 numpy once,
at the boundary, so the statistics do not depend on the dtype the model ran in.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor on any device/dtype, or nested lists) as a numpy array.

    Torch is never imported here: a tensor is recognised by its ``detach`` method. Floating tensors are
    upcast to float32 on the CPU first (numpy has no bfloat16), then cast to ``dtype`` (None keeps it).
    """
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach()
        if x.is_floating_point():
            x = x.float()
        x = x.cpu().numpy()
    arr = np.asarray(x)
    return arr if dtype is None else arr.astype(dtype, copy=False)


def to_labels(x: Any, name: str) -> np.ndarray:
    """Return a 1-D integer (or bool) label array; raise a ValueError naming ``name`` otherwise."""
    arr = to_numpy(x, dtype=None)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Unit-normalise along ``axis``; an all-zero vector stays zero (its cosines are then 0)."""
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


def row_space_projection(*blocks: np.ndarray) -> np.ndarray | None:
    """An orthonormal basis ``V`` (D, r) of the row space of the stacked ``blocks`` (each (M_i, D)).

    Dot products and norms of any linear combination of those rows are the same before and after
    ``x @ V``, so resampling tests can work in r = rank <= sum(M_i) dimensions instead of D. Returns
    None when that would not reduce the width (r >= D), so callers keep the original arrays.
    """
    stacked = np.concatenate([b.reshape(-1, b.shape[-1]) for b in blocks], axis=0)  # (M, D)
    m, d = stacked.shape
    if m >= d:
        return None
    # Economy SVD of (M, D) with M < D: the right singular vectors span the row space.
    _, s, vt = np.linalg.svd(stacked, full_matrices=False)
    keep = s > s.max(initial=0.0) * max(m, d) * np.finfo(np.float64).eps
    return vt[keep].T  # (D, r)


def jsonable(value: Any) -> Any:
    """`value` with numpy arrays and scalars as plain Python, dict keys as strings and non-finite floats as None:
    what `json.dumps(..., allow_nan=False)` writes, so a result file is strict JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
