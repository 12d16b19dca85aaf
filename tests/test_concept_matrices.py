"""Both concept matrices (raw, the paper's; centred) and their tests, on constructed states with known answers:
an offset-dominated world where every raw row peaks in the same column while the centred matrix has the diagonal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binomtest

from analysis import (
    MATRIX_VARIANTS,
    binomial_diagonal_test,
    concept_matrix,
    diagonal_tests,
    offset_decomposition,
    proportion_test,
    silhouette_interval,
)


def offset_world(c=8, n=20, d=32, seed=0):
    """(C, N, D) visual and textual samples sharing one prototype per concept, buried under offsets: a large
    common direction ``u`` in both modalities and a direction ``w`` along which text concept j sits at j/(C-1)
    while every image sits at 1 (a modality gap that grows with the caption concept)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    w = rng.normal(size=d)
    w -= (w @ u) * u
    w /= np.linalg.norm(w)
    proto = rng.normal(size=(c, d))
    proto -= np.outer(proto @ u, u) + np.outer(proto @ w, w)  # concepts live off the offset directions
    col = np.linspace(0.0, 1.0, c)
    visual = 20 * u + 60 * w + proto[:, None] + 0.5 * rng.normal(size=(c, n, d))
    textual = (20 + 8 * col)[:, None, None] * u + (60 * col)[:, None, None] * w + proto[:, None]
    textual = textual + 0.5 * rng.normal(size=(c, n, d))
    return visual, textual


def test_offset_dominated_matrix_has_no_raw_diagonal_but_a_centred_one():
    visual, textual = offset_world()
    raw = diagonal_tests(visual, textual, center=False, n_permutations=200, n_boot=200, seed=0)
    centred = diagonal_tests(visual, textual, center=True, n_permutations=200, n_boot=200, seed=0)
    # the raw matrix is (almost) all row + column offset: (almost) every row peaks in the same column
    assert raw["offsets"]["offset_share"] > 0.99
    assert raw["offsets"]["n_distinct_argmax"] <= 2
    assert raw["k"] <= 2 and raw["binomial"]["p_value"] > 0.05
    # remove each modality's mean and the diagonal is all there is
    assert centred["k"] == 8 and centred["binomial"]["p_value"] == pytest.approx(
        binomtest(8, 8, 1 / 8).pvalue
    )
    assert centred["offsets"]["offset_share"] < 0.2
    assert centred["permutation"]["p_value_k"] == pytest.approx(1 / 201)
    assert centred["k_over_n_ci"] == [1.0, 1.0] and centred["bootstrap"]["center"] is True
    assert [raw["variant"], centred["variant"]] == ["raw", "centred"] == list(MATRIX_VARIANTS)
    np.testing.assert_allclose(centred["matrix"], concept_matrix(visual, textual, center=True))
    assert json.loads(json.dumps(raw, allow_nan=False))["k"] == raw["k"]


def test_binomial_null_is_explicit():
    m = np.eye(4) + 0.1
    default = binomial_diagonal_test(m)
    assert default["null_p"] == 0.25 and default["p_value"] == pytest.approx(
        binomtest(4, 4, 0.25, "greater").pvalue
    )
    other = binomial_diagonal_test(m, null_p=0.5)
    assert other["null_p"] == 0.5 and other["p_value"] == pytest.approx(0.5**4)
    with pytest.raises(ValueError):
        binomial_diagonal_test(m, null_p=1.0)


def test_offset_decomposition_of_known_matrices():
    rows, cols = np.arange(5.0)[:, None], np.array([3.0, -1.0, 0.0, 2.0, 5.0])[None, :]
    additive = offset_decomposition(rows + cols)
    assert additive["offset_share"] == pytest.approx(1.0) and additive["residual_share"] == pytest.approx(0.0)
    assert additive["argmax_columns"] == [4] * 5 and additive["n_distinct_argmax"] == 1
    # a pure diagonal has equal row and column means: no offset at all, everything is residual
    diag = offset_decomposition(np.eye(5))
    assert diag["residual_share"] == pytest.approx(1.0)
    assert diag["row_share"] == pytest.approx(0.0) and diag["column_share"] == pytest.approx(0.0)
    assert diag["argmax_columns"] == list(range(5))
    assert offset_decomposition(np.ones((3, 3)))["offset_share"] == 0.0


def test_concept_analysis_writes_both_variants_at_every_layer():
    from analysis._arrays import jsonable
    from analysis.run import concept_analysis

    visual, textual = offset_world(c=4, n=5, d=16)
    labels = np.repeat(np.arange(4), 5)
    states = {  # (L+1, M, D): layer i's output at index i + 1
        "visual": np.stack([visual.reshape(20, 16)] * 3),
        "textual": np.stack([textual.reshape(20, 16)] * 3),
    }
    out = concept_analysis(states, labels, ["a", "b", "c", "d"], [0, 1], seed=0, n_perm=50)
    assert set(out) == {"raw", "centred"} and all(set(v) == {0, 1} for v in out.values())
    for variant, layers in out.items():
        for result in layers.values():
            assert result["variant"] == variant and result["binomial"]["null_p"] == 0.25
            assert {"permutation", "bootstrap", "offsets", "k_over_n_ci", "margin_ci"} <= set(result)
    assert json.loads(json.dumps(jsonable(out), allow_nan=False))["centred"]["1"]["n"] == 4


def test_proportion_test_and_silhouette_interval():
    result = proportion_test(7.5, 10, 0.5)
    assert result["successes"] == 7 and result["fraction"] == 0.75
    assert result["p_value"] == pytest.approx(binomtest(7, 10, 0.5, "greater").pvalue)
    low, high = result["interval"]
    assert low < 0.7 < high
    assert proportion_test(0, 0)["fraction"] is None

    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(size=(30, 5)) + 4, rng.normal(size=(30, 5)) - 4])
    labels = np.array([0] * 30 + [1] * 30)
    s = silhouette_interval(points, labels, metric="euclidean", n_boot=200)
    from sklearn.metrics import silhouette_score

    assert s["score"] == pytest.approx(silhouette_score(points, labels))
    assert s["interval"][0] <= s["score"] <= s["interval"][1]
    shuffled = silhouette_interval(points, rng.permutation(labels), metric="euclidean", n_boot=200)
    assert shuffled["interval"][1] < s["interval"][0]


def test_analyze_writes_both_matrices_grounding_dynamics_and_the_old_keys(processor, tmp_path):
    """`analyze` end to end on a tiny random checkpoint (with a routing log) and a tiny Shapes world: both variants
    at every layer, grounding, silhouette intervals, the centred figure, the routing dynamics and their figure, and
    the raw variant under the keys older readers use. One run serves all of these: it is the suite's slow part."""
    import torch
    from conftest import tiny_config
    from test_analysis_routing_dynamics import _write_log, routing_log

    from analysis.load import routing_dynamics
    from analysis.run import ROUTING_DYNAMICS_FIGURE, analyze, routing_dynamics_summary
    from configuration.contract import ANALYSIS_FILE
    from modeling_moe_vlm import MoeVlmForCausalLM
    from trainer.data import build_shapes

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    MoeVlmForCausalLM(tiny_config()).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    _write_log(model_dir, routing_log())
    build_shapes(
        tmp_path / "shapes", seed=0, image_size=32, n_train=4, n_val=4, n_test=12, n_instruct=2, n_probe=3,
        n_compositional=2,
    )  # fmt: skip
    result = analyze(
        model_dir, tmp_path / "out", data_dir=tmp_path / "shapes", n_samples=8, n_permutations=20,
        n_grounding=4, grounding_max_new_tokens=3, batch_size=8,
    )  # fmt: skip
    written = json.loads((tmp_path / "out" / ANALYSIS_FILE).read_text())
    assert written == result
    layers = [str(i) for i in range(tiny_config().num_hidden_layers)]
    for variant in MATRIX_VARIANTS:
        assert sorted(result["concept_matrices"][variant]) == layers
        for entry in result["concept_matrices"][variant].values():
            assert entry["binomial"]["null_p"] == 1 / 8 and entry["permutation"]["n_permutations"] == 20
            assert entry["center"] == (variant == "centred")
    raw = result["concept_matrices"]["raw"]
    assert all(result["binomial"][layer] == raw[layer]["binomial"] for layer in layers)
    assert all(result["concept_matrix"][layer]["matrix"] == raw[layer]["matrix"] for layer in layers)
    assert result["grounding"]["n"] == 4 and result["grounding"]["split"] == "test"
    low, high = result["tsne"]["silhouette_modality_hidden_interval"]
    assert low <= result["tsne"]["silhouette_modality_hidden"] <= high
    assert "concept_matrix_centred.png" in result["figures"]
    assert (
        ROUTING_DYNAMICS_FIGURE in result["figures"]
        and (tmp_path / "out" / ROUTING_DYNAMICS_FIGURE).is_file()
    )
    expected = routing_dynamics_summary(routing_dynamics(routing_log()))
    assert result["routing_dynamics"] == {
        "stage": "3",
        "figure": ROUTING_DYNAMICS_FIGURE,
        **json.loads(json.dumps(expected)),
    }
