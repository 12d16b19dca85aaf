"""t-SNE of hidden states and the silhouettes that turn the picture into numbers (Figures 5-6).

The paper reads its Stage 3 t-SNE as "clusters by modality, not by concept". A t-SNE picture alone is
easy to over-read (it exaggerates clusters and depends on perplexity and seed), so the claim is also
measured with silhouette scores for two labelings of the same points: modality (image vs text) and
concept. The silhouettes are computed on the high-dimensional hidden states (cosine distance, the
geometry the similarity matrices use; this is the number to trust) and, when an embedding is given,
on the 2-D t-SNE coordinates (euclidean; describes the picture only). The keys say which is which.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ._arrays import to_labels, to_numpy


def auto_perplexity(n_samples: int, default: float = 30.0) -> float:
    """Perplexity for ``n_samples`` points: ``default`` clamped to (n - 1) / 3, at least 1.

    A perplexity near n leaves t-SNE no neighbourhood structure to preserve (scikit-learn also requires
    perplexity < n); (n - 1) / 3 mirrors the 3 * perplexity neighbours its Barnes-Hut method uses.
    """
    return float(max(1.0, min(default, (n_samples - 1) / 3.0)))


def tsne_embed(
    hidden: Any,
    seed: int = 0,
    perplexity: float | None = None,
    pca_dims: int | None = 50,
    max_iter: int = 1000,
) -> np.ndarray:
    """2-D t-SNE coordinates of (M, D) hidden states -> (M, 2) float64.

    ``perplexity`` None picks ``auto_perplexity(M)``; a given value above it is clamped with a warning.
    ``pca_dims`` first reduces D by PCA (the usual t-SNE preprocessing; denoises and speeds the
    distances); None keeps all dimensions. Deterministic for a given seed.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = to_numpy(hidden)  # (M, D)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"hidden must be (M, D) with M >= 3, got shape {x.shape}")
    m = x.shape[0]
    limit = auto_perplexity(m, default=np.inf)
    if perplexity is None:
        perplexity = auto_perplexity(m)
    elif perplexity > limit:
        warnings.warn(f"perplexity {perplexity} too large for {m} points; using {limit}", stacklevel=2)
        perplexity = limit
    if pca_dims is not None and x.shape[1] > pca_dims and m > pca_dims:
        x = PCA(n_components=pca_dims, random_state=seed).fit_transform(x)  # (M, pca_dims)
    tsne = TSNE(
        n_components=2,
        perplexity=float(perplexity),
        init="pca",
        learning_rate="auto",
        max_iter=max_iter,
        random_state=seed,
    )
    return tsne.fit_transform(x).astype(np.float64)  # (M, 2)


def _silhouette(x: np.ndarray, labels: np.ndarray, metric: str, sample_size: int | None, seed: int):
    from sklearn.metrics import silhouette_score

    n_labels = np.unique(labels).size
    if not 2 <= n_labels <= x.shape[0] - 1:
        return None  # undefined: needs at least 2 clusters and one cluster with 2 points
    return float(silhouette_score(x, labels, metric=metric, sample_size=sample_size, random_state=seed))


def silhouettes(
    hidden: Any,
    modality_labels: Any,
    concept_labels: Any,
    embedding: Any = None,
    metric: str = "cosine",
    sample_size: int | None = None,
    seed: int = 0,
) -> dict:
    """Silhouette scores of the modality and the concept labeling.

    hidden: (M, D) hidden states; modality_labels, concept_labels: (M,) (any hashable labels, e.g. 0/1
    or "image"/"text"); embedding: optional (M, 2) t-SNE coordinates of the same points. Silhouettes lie
    in [-1, 1]: near 1 = tight, well separated clusters for that labeling, near 0 = no structure.

    Returns dict(silhouette_modality_hidden, silhouette_concept_hidden, metric_hidden=metric, and if an
    embedding is given silhouette_modality_tsne, silhouette_concept_tsne, metric_tsne="euclidean";
    n_points, n_modalities, n_concepts, sample_size, seed). A score is None when undefined (fewer than
    2 distinct labels, or as many labels as points).
    """
    x = to_numpy(hidden)
    if x.ndim != 2:
        raise ValueError(f"hidden must be (M, D), got shape {x.shape}")
    mod = to_labels(modality_labels, "modality_labels")
    con = to_labels(concept_labels, "concept_labels")
    if not x.shape[0] == mod.shape[0] == con.shape[0]:
        raise ValueError(f"{x.shape[0]} points but {mod.shape[0]} modality and {con.shape[0]} concept labels")
    out: dict[str, Any] = {
        "silhouette_modality_hidden": _silhouette(x, mod, metric, sample_size, seed),
        "silhouette_concept_hidden": _silhouette(x, con, metric, sample_size, seed),
        "metric_hidden": metric,
    }
    if embedding is not None:
        e = to_numpy(embedding)
        if e.shape != (x.shape[0], 2):
            raise ValueError(f"embedding must be ({x.shape[0]}, 2), got {e.shape}")
        out["silhouette_modality_tsne"] = _silhouette(e, mod, "euclidean", sample_size, seed)
        out["silhouette_concept_tsne"] = _silhouette(e, con, "euclidean", sample_size, seed)
        out["metric_tsne"] = "euclidean"
    out.update(
        n_points=int(x.shape[0]),
        n_modalities=int(np.unique(mod).size),
        n_concepts=int(np.unique(con).size),
        sample_size=sample_size,
        seed=int(seed),
    )
    return out


__all__ = ["auto_perplexity", "silhouettes", "tsne_embed"]
