"""t-SNE silhouettes and CKA on inputs with known structure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis import auto_perplexity, expert_cka_matrix, linear_cka, silhouettes, tsne_embed, weight_distance


def modality_clusters(n_per=12, d=40, seed=0):
    """Points that cluster by modality (two far-apart centres), with concept labels that do not."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, d)) * 10
    modality = np.repeat([0, 1], 2 * n_per)  # (M,)
    concept = np.tile(np.repeat([0, 1], n_per), 2)  # concepts split evenly inside each modality
    hidden = centres[modality] + rng.normal(size=(4 * n_per, d))
    return hidden, modality, concept


def test_silhouette_high_for_the_clustering_label():
    hidden, modality, concept = modality_clusters()
    embedding = tsne_embed(hidden, seed=0, max_iter=250)
    assert embedding.shape == (hidden.shape[0], 2)
    s = silhouettes(hidden, modality, concept, embedding=embedding)
    assert s["silhouette_modality_hidden"] > 0.7
    assert s["silhouette_modality_tsne"] > 0.5  # t-SNE's 2-D clusters are looser than the hidden ones
    assert abs(s["silhouette_concept_hidden"]) < 0.2
    assert s["silhouette_concept_tsne"] < s["silhouette_modality_tsne"]
    assert s["metric_hidden"] == "cosine" and s["metric_tsne"] == "euclidean"
    json.dumps(s, allow_nan=False)


def test_tsne_small_inputs_and_undefined_silhouettes():
    assert auto_perplexity(1000) == 30.0 and auto_perplexity(10) == 3.0 and auto_perplexity(3) == 1.0
    hidden = np.random.default_rng(0).normal(size=(5, 3))
    with pytest.warns(UserWarning, match="perplexity"):
        out = tsne_embed(hidden, perplexity=30, max_iter=250)
    assert out.shape == (5, 2)
    s = silhouettes(hidden, np.zeros(5), np.arange(5))  # one modality; one point per concept
    assert s["silhouette_modality_hidden"] is None and s["silhouette_concept_hidden"] is None


def test_linear_cka_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 20))
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))  # orthogonal
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ q) == pytest.approx(1.0)
    assert linear_cka(x, 3.5 * x + 2.0) == pytest.approx(1.0)  # isotropic scale and shift
    assert linear_cka(x, rng.normal(size=(100, 30))) < 0.3
    # The Gram form (n < d) gives the same value as the feature form.
    wide = rng.normal(size=(10, 50))
    assert linear_cka(wide, wide @ np.linalg.qr(rng.normal(size=(50, 50)))[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="constant"):
        linear_cka(np.ones((5, 3)), x[:5])


def test_expert_cka_matrix_and_weight_distance():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(16, 8))
    experts = np.stack([w0, w0 * 2, rng.normal(size=(16, 8))])  # (E, n, d)
    cka = expert_cka_matrix(experts)
    assert cka.shape == (3, 3) and cka[0, 1] == pytest.approx(1.0) and cka[0, 2] < 0.6
    d = weight_distance(w0 * 1.1, w0)
    assert d["relative"] == pytest.approx(0.1) and d["cosine"] == pytest.approx(1.0)
    assert d["l2"] == pytest.approx(0.1 * np.linalg.norm(w0))
    assert weight_distance(w0, np.zeros_like(w0))["relative"] is None
