"""Edges of the concept-similarity code (`analysis.similarity`) that `make mutation` found untested."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.similarity import (
    concept_matrices,
    cosine_matrix,
    group_concepts,
    masked_mean,
    offset_decomposition,
    pool_concepts,
)


def test_an_empty_mask_names_the_sample():
    hidden = np.ones((3, 2, 4))
    mask = np.array([[True, False], [False, False], [True, True]])
    with pytest.raises(ValueError, match=r"empty mask: \[1\]$"):
        masked_mean(hidden, mask)


@pytest.mark.parametrize("ids", [[0, 1, 2], [-1, 0, 1]])
def test_concept_ids_outside_the_concepts_are_refused(ids):
    with pytest.raises(ValueError, match=r"concept_ids must lie in \[0, 2\)"):
        pool_concepts(np.ones((3, 4)), ids, num_concepts=2)


def test_the_cosine_is_uncentred_by_default():
    rng = np.random.default_rng(0)
    v, t = rng.normal(size=(3, 5)) + 2.0, rng.normal(size=(3, 5)) + 2.0
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(cosine_matrix(v, t), unit(v) @ unit(t).T)
    assert not np.allclose(cosine_matrix(v, t), cosine_matrix(v, t, center=True))


def test_per_layer_samples_of_either_modality_are_pooled():
    rng = np.random.default_rng(1)
    v, t = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 6, 5))  # (L, C, N, D), N differs
    means = concept_matrices(v.mean(axis=2), t.mean(axis=2))
    np.testing.assert_allclose(concept_matrices(v, t), means)
    np.testing.assert_allclose(concept_matrices(v.mean(axis=2), t), means)


def test_offset_shares_of_a_small_matrix_and_of_a_constant_one():
    m = 0.01 * np.array([[3.0, 1.0, 0.0], [2.0, 2.0, 1.0], [0.0, 1.0, 4.0]])  # total sum of squares < 1
    d = offset_decomposition(m)
    assert d["residual_share"] > 0 and d["row_share"] > 0 and d["column_share"] > 0
    assert d["row_share"] + d["column_share"] + d["residual_share"] == pytest.approx(1.0)
    flat = offset_decomposition(np.full((3, 3), 0.5))
    assert (flat["row_share"], flat["column_share"], flat["residual_share"], flat["offset_share"]) == (
        0,
        0,
        0,
        0,
    )


def test_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match=r"hidden must be \(B, T, D\)"):
        masked_mean(np.ones((2, 3)), np.ones((2, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"mask \(B, T\)"):
        masked_mean(np.ones((2, 3, 4)), np.ones((2, 4), dtype=bool))
    with pytest.raises(ValueError, match="matching"):
        concept_matrices(np.ones((2, 3, 4)), np.ones((2, 3, 5)))
    with pytest.raises(ValueError, match="matching"):
        concept_matrices(np.ones((3, 4)), np.ones((3, 4)))
    for bad in (np.ones((2, 3)), np.ones((2, 2, 2))):
        with pytest.raises(ValueError, match="square"):
            offset_decomposition(bad)


def test_a_pure_row_offset_and_a_pure_column_offset():
    a = np.array([1.0, -2.0, 0.5])[:, None] * np.ones((1, 3))  # M[i, j] = a_i
    rows = offset_decomposition(a)
    assert (rows["row_share"], rows["column_share"]) == (pytest.approx(1.0), pytest.approx(0.0))
    cols = offset_decomposition(a.T)
    assert (cols["row_share"], cols["column_share"]) == (pytest.approx(0.0), pytest.approx(1.0))
    assert cols["offset_share"] == pytest.approx(1.0) and cols["residual_share"] == pytest.approx(0.0)


def test_group_concepts_takes_each_concepts_first_samples_in_order():
    hidden = np.arange(7, dtype=float)[:, None]  # sample i has state [i]
    ids = [1, 0, 1, 0, 2, 1, 2]
    grouped = group_concepts(hidden, ids, num_concepts=3)  # the smallest concept has 2 samples
    assert grouped[..., 0].tolist() == [[1, 3], [0, 2], [4, 6]]
    assert group_concepts(hidden, ids, 3, n_per_concept=1)[..., 0].tolist() == [[1], [0], [4]]
    with pytest.raises(ValueError, match=r"fewer than 3 samples: \[0, 2\]"):
        group_concepts(hidden, ids, 3, n_per_concept=3)
