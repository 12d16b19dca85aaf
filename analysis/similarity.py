"""Concept-modality comparison matrices (paper section 2.3).

For each of C concepts we have hidden states of N images and N captions at some layer. The paper
mean-pools the visual states of concept i into one vector, the textual states of concept j into another,
and compares them by cosine similarity. The resulting (C, C) matrix has rows = visual concept i and
columns = textual concept j; a bright diagonal means a caption's representation is closest to the
images of the same concept, i.e. the two modalities share a concept space (Figure 3), and its loss
after Stage 3 is the paper's evidence of collapse (Figure 4).

Inputs are plain arrays (numpy or torch, any dtype); the model-running code pools tokens per sample
(``masked_mean``), groups samples per concept (``pool_concepts`` / ``group_concepts``), and calls
``concept_matrix`` / ``concept_matrices``. Outputs are float64 numpy arrays.

Raw cosines between image and text states are dominated by row and column offsets (the modality gap and
a direction every state shares): in the tiny testbed every row peaked in the same column, so k could never
exceed 1. ``offset_decomposition`` measures that, and the ``centred`` variant (``center=True``: each
modality's mean over concepts removed) is reported beside the paper's ``raw`` one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import l2_normalize, to_labels, to_numpy


def masked_mean(hidden: Any, mask: Any) -> np.ndarray:
    """Mean of token states per sample over the positions where ``mask`` is true.

    hidden: (B, T, D) token states; mask: (B, T) bool (e.g. the image-placeholder mask for visual
    states, the caption tokens for textual ones). Returns (B, D). A sample with no selected token is an
    error: silently returning zeros would put a fake vector into a concept mean.
    """
    h = to_numpy(hidden)  # (B, T, D)
    m = to_numpy(mask, dtype=bool)  # (B, T)
    if h.ndim != 3 or m.shape != h.shape[:2]:
        raise ValueError(f"hidden must be (B, T, D) and mask (B, T); got {h.shape} and {m.shape}")
    counts = m.sum(axis=1)  # (B,)
    if (counts == 0).any():
        raise ValueError(f"samples with an empty mask: {np.flatnonzero(counts == 0).tolist()}")
    return np.einsum("btd,bt->bd", h, m.astype(np.float64)) / counts[:, None]


def _check_concept_ids(concept_ids: Any, m: int, num_concepts: int) -> np.ndarray:
    ids = to_labels(concept_ids, "concept_ids").astype(np.int64)
    if ids.shape[0] != m:
        raise ValueError(f"concept_ids has {ids.shape[0]} entries for {m} rows of hidden")
    if ids.size and (ids.min() < 0 or ids.max() >= num_concepts):
        raise ValueError(f"concept_ids must lie in [0, {num_concepts}), got [{ids.min()}, {ids.max()}]")
    missing = np.setdiff1d(np.arange(num_concepts), ids)
    if missing.size:
        raise ValueError(f"concepts without any sample: {missing.tolist()}")
    return ids


def pool_concepts(hidden: Any, concept_ids: Any, num_concepts: int) -> np.ndarray:
    """Mean vector per concept.

    hidden: (M, D) one vector per sample (or per token); concept_ids: (M,) ints in [0, C).
    Returns (C, D), row c = mean of the rows labelled c. Every concept needs at least one row.
    """
    h = to_numpy(hidden)  # (M, D)
    if h.ndim != 2:
        raise ValueError(f"hidden must be (M, D), got shape {h.shape}")
    ids = _check_concept_ids(concept_ids, h.shape[0], num_concepts)
    sums = np.zeros((num_concepts, h.shape[1]))
    np.add.at(sums, ids, h)  # (C, D)
    return sums / np.bincount(ids, minlength=num_concepts)[:, None]


def group_concepts(
    hidden: Any, concept_ids: Any, num_concepts: int, n_per_concept: int | None = None
) -> np.ndarray:
    """Stack samples per concept into the (C, N, D) layout the resampling tests take.

    Takes the first ``n_per_concept`` samples of each concept in their given order (default: the size
    of the smallest concept), so the result is deterministic; a concept with fewer samples raises.
    """
    h = to_numpy(hidden)  # (M, D)
    if h.ndim != 2:
        raise ValueError(f"hidden must be (M, D), got shape {h.shape}")
    ids = _check_concept_ids(concept_ids, h.shape[0], num_concepts)
    counts = np.bincount(ids, minlength=num_concepts)
    n = int(counts.min()) if n_per_concept is None else int(n_per_concept)
    short = np.flatnonzero(counts < n)
    if short.size:
        raise ValueError(f"concepts with fewer than {n} samples: {short.tolist()}")
    order = np.argsort(ids, kind="stable")  # samples grouped by concept, original order within
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    take = order[starts[:, None] + np.arange(n)[None, :]]  # (C, N)
    return h[take]  # (C, N, D)


def _concept_means(x: Any, name: str) -> np.ndarray:
    arr = to_numpy(x)
    if arr.ndim == 3:  # (C, N, D) samples -> (C, D) means
        arr = arr.mean(axis=1)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (C, D) means or (C, N, D) samples, got shape {arr.shape}")
    return arr


def cosine_matrix(visual_means: np.ndarray, textual_means: np.ndarray, center: bool = False) -> np.ndarray:
    """Cosine similarity of (..., C, D) visual means against (..., C, D) textual means -> (..., C, C).

    ``center`` subtracts, per modality, the mean over concepts before the cosine. LLM hidden states
    share a large common direction (and a per-modality offset), which pushes every cosine towards the
    same value; centring keeps only what distinguishes concepts. The paper's matrices are uncentred
    (the default).
    """
    v, t = visual_means, textual_means
    if center:
        v = v - v.mean(axis=-2, keepdims=True)
        t = t - t.mean(axis=-2, keepdims=True)
    return l2_normalize(v) @ np.swapaxes(l2_normalize(t), -1, -2)


def concept_matrix(visual: Any, textual: Any, center: bool = False) -> np.ndarray:
    """The concept-modality comparison matrix at one layer.

    visual, textual: (C, D) concept means, or (C, N, D) samples (mean-pooled over N here; N may differ
    between the two). Returns (C, C) float64 with entry [i, j] = cos(visual mean of concept i, textual
    mean of concept j): rows = visual, columns = textual. See ``cosine_matrix`` for ``center``.
    """
    v = _concept_means(visual, "visual")  # (C, D)
    t = _concept_means(textual, "textual")  # (C, D)
    if v.shape != t.shape:
        raise ValueError(f"visual {v.shape} and textual {t.shape} means must have the same (C, D)")
    return cosine_matrix(v, t, center=center)


def concept_matrices(visual_by_layer: Any, textual_by_layer: Any, center: bool = False) -> np.ndarray:
    """``concept_matrix`` for every layer at once.

    visual_by_layer, textual_by_layer: (L, C, D) means or (L, C, N, D) samples. Returns (L, C, C).
    """
    v = to_numpy(visual_by_layer)
    t = to_numpy(textual_by_layer)
    if v.ndim == 4:
        v = v.mean(axis=2)  # (L, C, D)
    if t.ndim == 4:
        t = t.mean(axis=2)
    if v.ndim != 3 or v.shape != t.shape:
        raise ValueError(f"expected matching (L, C, D) or (L, C, N, D) inputs, got {v.shape} and {t.shape}")
    return cosine_matrix(v, t, center=center)


#: The two variants of the concept matrix analyse writes: the paper's (``raw``) and with each modality's mean
#: over concepts removed before the cosine (``centred``). Keys of ``analysis.json["concept_matrices"]``.
MATRIX_VARIANTS = ("raw", "centred")


def offset_decomposition(matrix: Any) -> dict:
    """How much of a (C, C) matrix is a row offset plus a column offset (a two-way additive model).

    ``M[i, j] = mu + a_i + b_j + e_ij`` with ``a`` the row means and ``b`` the column means minus the grand
    mean ``mu`` (the least-squares fit of the additive model, as in a two-way ANOVA without replication).
    A matrix whose rows all peak in the same column because one caption concept sits closest to *every*
    image (the modality gap, a common direction of the hidden states) is almost all ``b``: its
    ``offset_share`` (the share of the sum of squares about ``mu`` that ``a`` + ``b`` explain) is near 1,
    and only the residual ``e`` can carry a concept diagonal. Hand-written: it is four means, and statsmodels'
    ANOVA would need a long-format table for the same numbers.

    Returns dict(offset_share, row_share, column_share, residual_share (the three shares sum to 1; 0 when
    the matrix is constant), argmax_columns (each row's maximising column), n_distinct_argmax).
    """
    m = to_numpy(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square (C, C) matrix, got shape {m.shape}")
    mu = m.mean()
    rows = m.mean(axis=1, keepdims=True) - mu  # (C, 1)
    cols = m.mean(axis=0, keepdims=True) - mu  # (1, C)
    residual = m - mu - rows - cols  # (C, C)
    total = float(((m - mu) ** 2).sum())
    c = m.shape[0]
    shares = (
        (
            float(c * (rows**2).sum()) / total,
            float(c * (cols**2).sum()) / total,
            float((residual**2).sum()) / total,
        )
        if total > 0
        else (0.0, 0.0, 0.0)
    )
    argmax = np.argmax(m, axis=1)
    return {
        "offset_share": shares[0] + shares[1],
        "row_share": shares[0],
        "column_share": shares[1],
        "residual_share": shares[2],
        "argmax_columns": [int(j) for j in argmax],
        "n_distinct_argmax": int(np.unique(argmax).size),
    }


__all__ = [
    "MATRIX_VARIANTS",
    "concept_matrices",
    "concept_matrix",
    "cosine_matrix",
    "group_concepts",
    "masked_mean",
    "offset_decomposition",
    "pool_concepts",
]
