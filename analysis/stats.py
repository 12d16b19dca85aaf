"""Is the diagonal of a concept-modality matrix real? Three tests of one question.

The paper (section 3.1) counts the rows of the (C, C) matrix whose diagonal entry is the row maximum
(k of n = C) and runs a one-tailed binomial test against a per-row chance of 1/C: k = 6 of 8 gives
p ~ 8.52e-5. That test treats rows as independent trials and the matrix as exact; both are
approximations (the rows share the textual columns, and each concept mean comes from only N samples).
So two resampling companions work from the per-sample states instead:

- ``permutation_test`` (``scipy.stats.permutation_test``): shuffles which concept each *visual sample*
  belongs to, a null where images carry no concept information, and asks how often chance alone
  reaches the observed diagonal;
- ``bootstrap_ci`` (hand-written; see the comment inside for why not ``scipy.stats.bootstrap``):
  resamples samples within each concept to give confidence intervals for k and the mean diagonal
  margin, i.e. how much the result would move with a different draw of N images/captions.

Conventions used throughout:
- rows = visual concept i, columns = textual concept j (``similarity.concept_matrix``);
- a row is a *hit* when its diagonal entry is strictly greater than every other entry of the row; a tie
  for the maximum counts as no hit (conservative: a row of identical values is no evidence), NaN too;
- the *margin* of row i is ``M[i, i] - mean_{j != i} M[i, j]``; ``mean_margin`` averages it over rows.

All randomness comes from ``numpy.random.default_rng(seed)``; results are JSON-serialisable dicts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import binomtest
from scipy.stats import permutation_test as scipy_permutation_test

from ._arrays import l2_normalize, row_space_projection, to_numpy
from .similarity import cosine_matrix

TIE_RULE = "a row is a hit only if its diagonal entry is strictly greater than every off-diagonal entry; ties and NaN count as no hit"

# Bytes of float64 one resampling chunk may gather at once (keeps memory flat for large N and D).
_CHUNK_BYTES = 32 * 2**20


def _check_square(matrix: Any) -> np.ndarray:
    m = to_numpy(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ValueError(f"expected a square (C, C) matrix with C >= 2, got shape {m.shape}")
    return m


def diagonal_hits(matrix: Any) -> np.ndarray:
    """Per-row hit flags of a (..., C, C) matrix -> (..., C) bool (strict row maximum on the diagonal)."""
    m = to_numpy(matrix)
    c = m.shape[-1]
    diag = np.diagonal(m, axis1=-2, axis2=-1)  # (..., C)
    off = np.where(np.eye(c, dtype=bool), -np.inf, m)  # (..., C, C), diagonal masked out
    return diag > off.max(axis=-1)  # NaN compares False -> no hit


def diagonal_margins(matrix: Any) -> np.ndarray:
    """Per-row margin ``M[i, i] - mean_{j != i} M[i, j]`` of a (..., C, C) matrix -> (..., C)."""
    m = to_numpy(matrix)
    c = m.shape[-1]
    diag = np.diagonal(m, axis1=-2, axis2=-1)  # (..., C)
    return diag - (m.sum(axis=-1) - diag) / (c - 1)


def binomial_diagonal_test(matrix: Any, null_p: float | None = None) -> dict:
    """One-tailed binomial test of the diagonal (the paper's test).

    matrix: (C, C), rows = visual concepts, columns = textual concepts. Counts k = number of hit rows
    (see ``TIE_RULE``) out of n = C and tests H0 "each row's maximum falls on its diagonal with chance
    p0, independently" against "more often" with ``scipy.stats.binomtest(k, n, p0,
    alternative="greater")``. The null p0 is explicit: ``null_p``, default 1/C (a row's maximum equally
    likely in any column), and is returned with the result.

    Returns dict(test="binomial", k, n, null_p, p_value, alternative, hits (per-row bools), tie_rule,
    row_margins, mean_margin).
    """
    m = _check_square(matrix)
    hits = diagonal_hits(m)
    n = int(m.shape[0])
    k = int(hits.sum())
    null_p = 1.0 / n if null_p is None else float(null_p)
    if not 0.0 < null_p < 1.0:
        raise ValueError(f"null_p must lie in (0, 1), got {null_p}")
    margins = diagonal_margins(m)
    return {
        "test": "binomial",
        "k": k,
        "n": n,
        "null_p": null_p,
        "p_value": float(binomtest(k, n, null_p, alternative="greater").pvalue),
        "alternative": "greater",
        "hits": [bool(h) for h in hits],
        "tie_rule": TIE_RULE,
        "row_margins": [float(x) for x in margins],
        "mean_margin": float(margins.mean()),
    }


def _check_samples(visual_samples: Any, textual_samples: Any) -> tuple[np.ndarray, np.ndarray]:
    v = to_numpy(visual_samples)
    t = to_numpy(textual_samples)
    if v.ndim != 3 or t.ndim != 3:
        raise ValueError(f"samples must be (C, N, D); got visual {v.shape}, textual {t.shape}")
    if v.shape[0] != t.shape[0] or v.shape[2] != t.shape[2]:
        raise ValueError(f"visual {v.shape} and textual {t.shape} must share C and D")
    if v.shape[0] < 2:
        raise ValueError("need at least 2 concepts")
    return v, t


def _chunk(n_items: int, bytes_per_item: int) -> int:
    return max(1, min(n_items, _CHUNK_BYTES // max(1, bytes_per_item)))


def permutation_test(
    visual_samples: Any,
    textual_samples: Any,
    n_permutations: int = 1000,
    seed: int = 0,
    center: bool = False,
) -> dict:
    """Permutation test of the diagonal from per-sample states (``scipy.stats.permutation_test``).

    visual_samples: (C, N_v, D); textual_samples: (C, N_t, D) (N may differ between modalities).
    What is permuted: the concept labels of the C * N_v *visual samples* are shuffled (group sizes kept,
    each permutation drawn independently), the visual concept means recomputed, and the matrix rebuilt
    against the unchanged textual means. Under this null, images carry no information about which
    caption concept they belong to, while everything else (the modality gap, the textual geometry, the
    sample noise) is preserved.

    Both statistics are computed for every permutation: k (number of hit rows) and the mean diagonal
    margin. p-values are scipy's ``(1 + #{null >= observed}) / (1 + n_permutations)``, never 0, the
    smallest reachable value being ``1 / (1 + n_permutations)``; a null value within a relative 100
    machine epsilons of the observed one counts as reaching it (a permutation that reproduces the
    observed grouping, summed in another order). The margin is the finer statistic (k takes only C + 1
    values). When ``n_permutations`` is at least (C * N_v)! (C * N_v <= 6 for 1000 permutations),
    scipy runs the exact test over every ordering instead (no +1 in the p-value), and
    ``n_permutations`` reports that number.

    Returns dict(test="permutation", permuted, n_permutations, seed, center, observed_k, observed_margin,
    p_value_k, p_value_margin, null_k_counts (how often each k = 0..C occurred), null_k_mean,
    null_margin_mean, null_margin_std, n_concepts, n_visual_per_concept, n_textual_per_concept).
    """
    v, t = _check_samples(visual_samples, textual_samples)
    c, n_v, d = v.shape
    if n_permutations < 1:
        raise ValueError("n_permutations must be >= 1")
    t_means = t.mean(axis=1)  # (C, D)
    x = v.reshape(c * n_v, d)  # (C*N_v, D)
    if center:
        # Equal group sizes: the mean of visual concept means is the grand mean under every permutation.
        x = x - x.mean(axis=0)
        t_means = t_means - t_means.mean(axis=0)
    t_unit = l2_normalize(t_means)  # (C, D); its norm is fixed, only its direction enters the cosine
    basis = row_space_projection(x)  # work in the span of the visual samples (exact)
    if basis is not None:
        x, t_unit = x @ basis, t_unit @ basis  # (C*N_v, r), (C, r)

    def k_and_margin(order: np.ndarray, axis: int = -1) -> np.ndarray:
        """(..., C*N_v) sample indices, position p holding concept p // N_v -> (..., 2): k and the mean margin."""
        rows = x[order.reshape(*order.shape[:-1], c, n_v)]  # (..., C, N_v, r)
        m = l2_normalize(rows.sum(axis=-2)) @ t_unit.T  # (..., C, C); cosine is scale-free: sums = means
        return np.stack([diagonal_hits(m).sum(axis=-1), diagonal_margins(m).mean(axis=-1)], axis=-1)

    # One sample, the indices of the visual samples, whose *pairing* with the fixed concept labels scipy permutes
    # ("pairings" with one sample: the other one, the labels, stays put). Indices rather than states, so one
    # permutation moves C * N_v integers; and unlike C "independent" groups this allows N_v = 1.
    result = scipy_permutation_test(
        (np.arange(c * n_v),),
        k_and_margin,
        permutation_type="pairings",
        vectorized=True,
        n_resamples=n_permutations,
        batch=_chunk(n_permutations, x.size * 8),
        alternative="greater",
        rng=np.random.default_rng(seed),
    )
    obs_k, obs_margin = int(result.statistic[0]), float(result.statistic[1])
    null_k = result.null_distribution[:, 0].astype(np.int64)
    null_margin = result.null_distribution[:, 1]
    return {
        "test": "permutation",
        "permuted": "concept labels of the visual samples (textual means fixed)",
        "n_permutations": int(len(null_margin)),
        "seed": int(seed),
        "center": bool(center),
        "observed_k": obs_k,
        "observed_margin": obs_margin,
        "p_value_k": float(result.pvalue[0]),
        "p_value_margin": float(result.pvalue[1]),
        "null_k_counts": [int(x) for x in np.bincount(null_k, minlength=c + 1)],
        "null_k_mean": float(null_k.mean()),
        "null_margin_mean": float(null_margin.mean()),
        "null_margin_std": float(null_margin.std()),
        "n_concepts": int(c),
        "n_visual_per_concept": int(n_v),
        "n_textual_per_concept": int(t.shape[1]),
    }


def bootstrap_ci(
    visual_samples: Any,
    textual_samples: Any,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    center: bool = False,
) -> dict:
    """Percentile bootstrap confidence intervals for k and the mean diagonal margin.

    visual_samples: (C, N_v, D); textual_samples: (C, N_t, D). Each replicate draws N_v visual and N_t
    textual samples with replacement *within each concept* (independently per concept and modality),
    rebuilds the (C, C) matrix from the resampled means, and records k and the mean margin.

    A caveat the numbers make visible: a cosine of *means* is biased towards 0 by sampling noise (noise
    adds ~ D * sigma^2 / N to the squared norm of a mean but nothing to the cross terms), and a bootstrap
    replicate adds that noise once more. With noisy, high-dimensional states the replicates therefore
    sit below the observed margin, and when this bias exceeds the bootstrap spread the percentile
    interval excludes the observed value. ``margin_bias`` (replicate mean minus observed) says how large
    the effect is; ``margin_ci_basic`` is the basic (pivotal) interval ``[2 obs - high, 2 obs - low]``,
    which corrects for it and estimates the noise-free margin instead. Report ``margin_bias`` with
    either interval.

    Returns dict(test="bootstrap", resampled, method="percentile", n_boot, seed, ci, center, observed_k,
    observed_margin, k_ci [low, high] (integers: lower/higher order statistics), margin_ci [low, high]
    (percentile), margin_ci_basic [low, high], k_mean, margin_mean, margin_bias, margin_std,
    hit_rate_per_concept (share of replicates in which row i was a hit), n_concepts,
    n_visual_per_concept, n_textual_per_concept).
    """
    # Hand-written rather than `scipy.stats.bootstrap`. Speed is not the reason (measured side by side on the
    # shared 2-core CPU, C = 8, N = 50, 1000 replicates, the 2C index samples through scipy: scipy took 0.4-1.1x
    # the time at D = 128 and D = 4096, where the same SVD dominates both). The numbers are: scipy draws each
    # sample's indices for a whole batch in turn (sample-major), this draws replicate by replicate, so with the
    # same seed every interval moves (margin_ci [0.8267, 0.8570] -> [0.8276, 0.8578] at D = 128, seed 0). It
    # also has no integer k interval (lower / higher order statistics) or per-concept hit rates to give.
    v, t = _check_samples(visual_samples, textual_samples)
    c, n_v, _ = v.shape
    n_t = t.shape[1]
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    basis = row_space_projection(v, t)  # the span of all samples: dot products and norms are exact
    if basis is not None:
        v, t = v @ basis, t @ basis  # (C, N, r)

    observed = cosine_matrix(v.mean(axis=1), t.mean(axis=1), center=center)
    obs_k = int(diagonal_hits(observed).sum())
    obs_margin = float(diagonal_margins(observed).mean())

    rng = np.random.default_rng(seed)
    boot_hits = np.empty((n_boot, c), dtype=bool)
    boot_margin = np.empty(n_boot)
    concept = np.arange(c)[None, :, None]  # (1, C, 1) broadcasts against (b, C, N) indices
    step = _chunk(n_boot, (v.size + t.size) * 8)
    for start in range(0, n_boot, step):
        b = min(step, n_boot - start)
        idx_v = rng.integers(0, n_v, size=(b, c, n_v))
        idx_t = rng.integers(0, n_t, size=(b, c, n_t))
        vm = v[concept, idx_v].mean(axis=2)  # (b, C, r)
        tm = t[concept, idx_t].mean(axis=2)  # (b, C, r)
        m = cosine_matrix(vm, tm, center=center)  # (b, C, C)
        boot_hits[start : start + b] = diagonal_hits(m)
        boot_margin[start : start + b] = diagonal_margins(m).mean(axis=-1)

    boot_k = boot_hits.sum(axis=1)
    lo_q, hi_q = (1.0 - ci) / 2.0, 1.0 - (1.0 - ci) / 2.0
    margin_lo, margin_hi = float(np.quantile(boot_margin, lo_q)), float(np.quantile(boot_margin, hi_q))
    return {
        "test": "bootstrap",
        "resampled": "samples with replacement within each concept, visual and textual independently",
        "method": "percentile",
        "n_boot": int(n_boot),
        "seed": int(seed),
        "ci": float(ci),
        "center": bool(center),
        "observed_k": obs_k,
        "observed_margin": obs_margin,
        "k_ci": [
            int(np.quantile(boot_k, lo_q, method="lower")),
            int(np.quantile(boot_k, hi_q, method="higher")),
        ],
        "margin_ci": [margin_lo, margin_hi],
        "margin_ci_basic": [2 * obs_margin - margin_hi, 2 * obs_margin - margin_lo],
        "k_mean": float(boot_k.mean()),
        "margin_mean": float(boot_margin.mean()),
        "margin_bias": float(boot_margin.mean() - obs_margin),
        "margin_std": float(boot_margin.std()),
        "hit_rate_per_concept": [float(x) for x in boot_hits.mean(axis=0)],
        "n_concepts": int(c),
        "n_visual_per_concept": int(n_v),
        "n_textual_per_concept": int(n_t),
    }


def diagonal_tests(
    visual_samples: Any,
    textual_samples: Any,
    *,
    center: bool,
    n_permutations: int = 1000,
    n_boot: int = 1000,
    seed: int = 0,
    null_p: float | None = None,
) -> dict:
    """One concept matrix (``raw``: center False, the paper's; ``centred``: each modality's mean over concepts
    removed) and every test of its diagonal, from per-sample states.

    visual_samples: (C, N_v, D); textual_samples: (C, N_t, D). Runs ``binomial_diagonal_test`` (explicit null
    ``null_p``, default 1/C), ``permutation_test`` and ``bootstrap_ci`` with the same ``center``, and
    ``similarity.offset_decomposition`` of the matrix (how much of it is row + column offset).

    Returns dict(variant, center, matrix (C, C) list, k, n, k_over_n, k_over_n_ci (the bootstrap's k interval
    divided by n), mean_margin, margin_ci, binomial, permutation, bootstrap, offsets).
    """
    from .similarity import concept_matrix, offset_decomposition

    v, t = _check_samples(visual_samples, textual_samples)
    matrix = concept_matrix(v, t, center=center)  # (C, C)
    binomial = binomial_diagonal_test(matrix, null_p=null_p)
    permutation = permutation_test(v, t, n_permutations=n_permutations, seed=seed, center=center)
    boot = bootstrap_ci(v, t, n_boot=n_boot, seed=seed, center=center)
    n = binomial["n"]
    return {
        "variant": "centred" if center else "raw",
        "center": bool(center),
        "matrix": matrix.tolist(),
        "k": binomial["k"],
        "n": n,
        "k_over_n": binomial["k"] / n,
        "k_over_n_ci": [boot["k_ci"][0] / n, boot["k_ci"][1] / n],
        "mean_margin": binomial["mean_margin"],
        "margin_ci": boot["margin_ci"],
        "binomial": binomial,
        "permutation": permutation,
        "bootstrap": boot,
        "offsets": offset_decomposition(matrix),
    }


def proportion_test(successes: float, n: int, null_p: float = 0.5, ci: float = 0.95) -> dict:
    """A share of n trials against a chance level: one-tailed ``scipy.stats.binomtest`` (greater than
    ``null_p``) and its Wilson interval. Non-integer ``successes`` (ties counted as half a win) are rounded
    down, so a tie never counts for the claim.

    Returns dict(fraction, n, successes, null_p, p_value, alternative, ci, interval [low, high], method) with
    fraction/p_value/interval None when n = 0.
    """
    n = int(n)
    k = int(np.floor(successes))
    if n <= 0:
        return {"fraction": None, "n": 0, "successes": 0, "null_p": float(null_p), "p_value": None,
                "alternative": "greater", "ci": float(ci), "interval": None, "method": "wilson"}  # fmt: skip
    result = binomtest(k, n, null_p, alternative="greater")
    interval = binomtest(k, n, null_p).proportion_ci(confidence_level=ci, method="wilson")
    return {
        "fraction": float(successes) / n,
        "n": n,
        "successes": k,
        "null_p": float(null_p),
        "p_value": float(result.pvalue),
        "alternative": "greater",
        "ci": float(ci),
        "interval": [float(interval.low), float(interval.high)],
        "method": "wilson",
    }


def silhouette_interval(
    points: Any, labels: Any, metric: str = "cosine", n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> dict:
    """Silhouette score of a labelling with a bootstrap interval over points.

    points: (M, D); labels: (M,). The per-point silhouettes (``sklearn.metrics.silhouette_samples``) are
    computed once and their mean resampled (``scipy.stats.bootstrap``, percentile): the interval says how
    much the score moves with another draw of the points at this geometry (the clusters are not re-fitted
    per replicate, so it is a lower bound on the full variability). Its mean equals ``silhouette_score``.

    Returns dict(score, interval [low, high], ci, n_boot, n_points, metric, method, seed).
    """
    from scipy.stats import bootstrap
    from sklearn.metrics import silhouette_samples

    x = to_numpy(points)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"points must be (M, D) and labels (M,), got {x.shape} and {y.shape}")
    values = silhouette_samples(x, y, metric=metric)  # (M,)
    res = bootstrap(
        (values,), np.mean, n_resamples=n_boot, confidence_level=ci, method="percentile",
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    return {
        "score": float(values.mean()),
        "interval": [float(res.confidence_interval.low), float(res.confidence_interval.high)],
        "ci": float(ci),
        "n_boot": int(n_boot),
        "n_points": int(x.shape[0]),
        "metric": metric,
        "method": "percentile bootstrap of the mean per-point silhouette",
        "seed": int(seed),
    }


__all__ = [
    "TIE_RULE",
    "binomial_diagonal_test",
    "bootstrap_ci",
    "diagonal_hits",
    "diagonal_margins",
    "diagonal_tests",
    "permutation_test",
    "proportion_test",
    "silhouette_interval",
]
