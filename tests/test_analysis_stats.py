"""Concept matrices and the diagonal tests on constructed inputs with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from analysis import (
    binomial_diagonal_test,
    bootstrap_ci,
    concept_matrices,
    concept_matrix,
    diagonal_hits,
    group_concepts,
    masked_mean,
    permutation_test,
    pool_concepts,
)


def aligned_samples(c=8, n=20, d=32, noise=1.0, seed=0):
    """Visual and textual samples that share one prototype per concept: (C, N, D) each."""
    rng = np.random.default_rng(seed)
    proto = rng.normal(size=(c, d)) * 3.0
    visual = proto[:, None] + noise * rng.normal(size=(c, n, d))
    textual = proto[:, None] + noise * rng.normal(size=(c, n, d))
    return visual, textual


def matrix_with_hits(hit_rows, c=8):
    """A (C, C) matrix whose diagonal is the strict row maximum exactly in ``hit_rows``."""
    m = np.full((c, c), 0.1)
    for i in range(c):
        if i in hit_rows:
            m[i, i] = 0.9
        else:
            m[i, (i + 1) % c] = 0.9  # the maximum sits off the diagonal
    return m


def test_concept_matrix_is_cosine_rows_visual_cols_textual():
    v = np.array([[1.0, 0.0], [0.0, 2.0]])
    t = np.array([[0.0, 3.0], [1.0, 1.0]])
    m = concept_matrix(v, t)
    expected = np.array([[0.0, 1 / np.sqrt(2)], [1.0, 1 / np.sqrt(2)]])
    np.testing.assert_allclose(m, expected, atol=1e-12)
    # (C, N, D) samples are mean-pooled first; torch bf16 input is accepted.
    samples = np.stack([v, v], axis=1)  # (C, 2, D)
    np.testing.assert_allclose(
        concept_matrix(samples, torch.tensor(t, dtype=torch.bfloat16)), expected, atol=1e-12
    )


def test_concept_matrices_match_per_layer_calls():
    rng = np.random.default_rng(1)
    v, t = rng.normal(size=(3, 5, 7)), rng.normal(size=(3, 5, 7))  # (L, C, D)
    batched = concept_matrices(v, t)
    assert batched.shape == (3, 5, 5)
    for layer in range(3):
        np.testing.assert_allclose(batched[layer], concept_matrix(v[layer], t[layer]))
        np.testing.assert_allclose(
            concept_matrices(v, t, center=True)[layer], concept_matrix(v[layer], t[layer], center=True)
        )


def test_pooling_helpers():
    hidden = np.arange(12, dtype=float).reshape(6, 2)  # (M, D)
    ids = np.array([0, 1, 0, 1, 2, 2])
    np.testing.assert_allclose(pool_concepts(hidden, ids, 3), [[2, 3], [4, 5], [9, 10]])
    grouped = group_concepts(hidden, ids, 3)  # (C, N, D), first N per concept in order
    assert grouped.shape == (3, 2, 2)
    np.testing.assert_allclose(grouped[1], [[2, 3], [6, 7]])
    with pytest.raises(ValueError, match="without any sample"):
        pool_concepts(hidden, ids, 4)
    tokens = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2)  # (B, T, D)
    mask = np.array([[True, False, True], [False, True, False]])
    np.testing.assert_allclose(masked_mean(tokens, mask), [[2, 3], [8, 9]])
    with pytest.raises(ValueError, match="empty mask"):
        masked_mean(tokens, np.zeros((2, 3), dtype=bool))


def test_binomial_known_diagonal_matches_scipy():
    m = matrix_with_hits({0, 1, 2, 3, 4, 5})
    result = binomial_diagonal_test(m)
    assert result["k"] == 6 and result["n"] == 8 and result["null_p"] == 1 / 8
    assert result["hits"] == [True] * 6 + [False] * 2
    assert result["p_value"] == pytest.approx(binomtest(6, 8, 1 / 8, alternative="greater").pvalue)
    # The paper: k = 6 of n = 8 gives p ~ 8.52e-5.
    assert result["p_value"] == pytest.approx(8.52e-5, rel=1e-3)
    json.dumps(result, allow_nan=False)


def test_ties_count_as_no_hit():
    m = np.eye(4)
    m[0, 1] = 1.0  # row 0: diagonal ties with an off-diagonal entry
    assert diagonal_hits(m).tolist() == [False, True, True, True]
    assert binomial_diagonal_test(np.ones((4, 4)))["k"] == 0


def test_permutation_small_p_when_aligned_large_when_random():
    visual, textual = aligned_samples()
    aligned = permutation_test(visual, textual, n_permutations=500, seed=0)
    assert aligned["observed_k"] == 8
    assert aligned["p_value_k"] == pytest.approx(1 / 501)  # no permutation reaches it
    assert aligned["p_value_margin"] == pytest.approx(1 / 501)
    assert sum(aligned["null_k_counts"]) == 500
    json.dumps(aligned, allow_nan=False)

    rng = np.random.default_rng(3)
    random = permutation_test(rng.normal(size=(8, 20, 32)), rng.normal(size=(8, 20, 32)), 500, seed=0)
    assert random["p_value_margin"] > 0.05 and random["p_value_k"] > 0.05
    # Seeded: the same call gives the same result.
    assert permutation_test(visual, textual, n_permutations=50, seed=7) == permutation_test(
        visual, textual, n_permutations=50, seed=7
    )


def test_permutation_high_dimension_uses_exact_projection():
    # D > C * N: the row-space projection must not change the observed statistics.
    visual, textual = aligned_samples(c=4, n=5, d=200, noise=2.0)
    result = permutation_test(visual, textual, n_permutations=20, seed=0)
    direct = binomial_diagonal_test(concept_matrix(visual, textual))
    assert result["observed_k"] == direct["k"]
    assert result["observed_margin"] == pytest.approx(direct["mean_margin"], abs=1e-10)


def test_bootstrap_ci_contains_observed():
    visual, textual = aligned_samples(noise=0.5)
    result = bootstrap_ci(visual, textual, n_boot=300, seed=0)
    assert result["k_ci"][0] <= result["observed_k"] <= result["k_ci"][1]
    assert result["margin_ci"][0] <= result["observed_margin"] <= result["margin_ci"][1]
    assert result["margin_ci_basic"][0] <= result["observed_margin"] <= result["margin_ci_basic"][1]
    assert result["observed_margin"] == pytest.approx(
        binomial_diagonal_test(concept_matrix(visual, textual))["mean_margin"]
    )
    assert len(result["hit_rate_per_concept"]) == 8
    json.dumps(result, allow_nan=False)


def test_bootstrap_reports_its_downward_bias_on_noisy_means():
    # Resampling adds noise to each mean, which shrinks cosines: documented, and visible as margin_bias.
    visual, textual = aligned_samples(n=10, d=256, noise=3.0, seed=2)
    result = bootstrap_ci(visual, textual, n_boot=200, seed=0)
    assert result["margin_bias"] < 0
    assert result["margin_ci_basic"][0] > result["margin_ci"][0]


# ----- scipy.stats.permutation_test gives the numbers of the hand-written loop it replaced ---------------------------


def _hand_written_permutation_test(visual, textual, n_permutations, seed, center=False, chunk=None):
    """The loop `permutation_test` ran before it used scipy (kept here only, as the reference): observed and null
    (k, mean margin) and the p-values ``(1 + #{null >= observed}) / (1 + n)``."""
    from analysis._arrays import l2_normalize, row_space_projection
    from analysis.stats import diagonal_margins

    c, n_v, d = visual.shape
    t_means = textual.mean(axis=1)
    x = visual.reshape(c * n_v, d)
    if center:
        x, t_means = x - x.mean(axis=0), t_means - t_means.mean(axis=0)
    t_unit = l2_normalize(t_means)
    basis = row_space_projection(x)
    if basis is not None:
        x, t_unit = x @ basis, t_unit @ basis

    def sims(rows):
        return l2_normalize(rows.reshape(rows.shape[0], c, n_v, -1).sum(axis=2)) @ t_unit.T

    observed = sims(x[None])[0]
    obs_k, obs_margin = int(diagonal_hits(observed).sum()), float(diagonal_margins(observed).mean())
    rng = np.random.default_rng(seed)
    null_k, null_margin = [], []
    step = chunk or n_permutations
    for start in range(0, n_permutations, step):
        p = min(step, n_permutations - start)
        m = sims(x[rng.permuted(np.broadcast_to(np.arange(c * n_v), (p, c * n_v)), axis=1)])
        null_k.append(diagonal_hits(m).sum(axis=-1))
        null_margin.append(diagonal_margins(m).mean(axis=-1))
    null_k, null_margin = np.concatenate(null_k), np.concatenate(null_margin)
    tol = 1e-12 * max(1.0, abs(obs_margin))
    return {
        "observed_k": obs_k,
        "observed_margin": obs_margin,
        "p_value_k": float((1 + np.sum(null_k >= obs_k)) / (1 + n_permutations)),
        "p_value_margin": float((1 + np.sum(null_margin >= obs_margin - tol)) / (1 + n_permutations)),
        "null_k_counts": [int(x) for x in np.bincount(null_k, minlength=c + 1)],
        "null_k_mean": float(null_k.mean()),
        "null_margin_mean": float(null_margin.mean()),
        "null_margin_std": float(null_margin.std()),
    }


def _weakly_aligned(seed=4):
    rng = np.random.default_rng(seed)
    proto = rng.normal(size=(5, 16)) * 0.3
    return proto[:, None] + rng.normal(size=(5, 6, 16)), proto[:, None] + rng.normal(size=(5, 9, 16))


PERMUTATION_CASES = {
    "aligned": (lambda: aligned_samples(noise=4.0, seed=1), {}),
    "random": (lambda: tuple(np.random.default_rng(3).normal(size=(2, 8, 20, 32))), {}),
    "weak, N_t != N_v": (_weakly_aligned, {}),
    "weak, centred": (_weakly_aligned, {"center": True}),
    "projected (D > C N)": (lambda: aligned_samples(c=4, n=5, d=200, noise=2.0), {}),
    "one visual sample per concept": (lambda: aligned_samples(c=8, n=1, d=8, noise=2.0), {}),
}


@pytest.mark.parametrize("case", PERMUTATION_CASES)
@pytest.mark.parametrize("seed", [0, 7])
def test_scipy_permutation_test_equals_the_hand_written_loop(case, seed, monkeypatch):
    make, kwargs = PERMUTATION_CASES[case]
    visual, textual = make()
    result = permutation_test(visual, textual, n_permutations=300, seed=seed, **kwargs)
    expected = _hand_written_permutation_test(visual, textual, 300, seed, **kwargs)
    assert {key: result[key] for key in expected} == expected  # exactly: same draws, same sums
    # Chunked (the memory budget splits the permutations into batches): still the same numbers.
    monkeypatch.setattr("analysis.stats._CHUNK_BYTES", 4096 * 8)
    chunked = permutation_test(visual, textual, n_permutations=300, seed=seed, **kwargs)
    assert chunked == result


def test_permutation_test_pinned_numbers():
    # Computed with the hand-written implementation before the switch to scipy (seed 0, 200 permutations).
    visual, textual = np.random.default_rng(3).normal(size=(2, 8, 20, 32))
    result = permutation_test(visual, textual, n_permutations=200, seed=0)
    assert result["observed_k"] == 0 and result["null_k_counts"] == [76, 78, 36, 9, 1, 0, 0, 0, 0]
    assert result["p_value_k"] == 1.0 and result["p_value_margin"] == 168 / 201
    assert result["observed_margin"] == pytest.approx(-0.06136702157729165, rel=1e-12)
    assert result["null_margin_mean"] == pytest.approx(0.0013862966025206553, rel=1e-9)
    assert result["null_margin_std"] == pytest.approx(0.06525941105997071, rel=1e-12)


def test_permutation_test_is_exact_when_permutations_cover_every_ordering():
    # C = 2, N_v = 3: only 6! = 720 orderings of the visual samples; scipy then enumerates them (no +1 in the p-value).
    visual, textual = aligned_samples(c=2, n=3, d=4, noise=0.5)
    result = permutation_test(visual, textual, n_permutations=1000, seed=0)
    assert result["n_permutations"] == 720 and sum(result["null_k_counts"]) == 720
    # Each relabelling comes up 3! 3! = 36 times; the observed one among them, so p >= 36 / 720.
    assert result["p_value_margin"] >= 36 / 720
