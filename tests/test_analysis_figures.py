"""Every figure writer produces a non-empty PNG of the requested pixel size, drawing the numbers it was given."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.patches import Rectangle
from PIL import Image

from analysis import (
    load_report,
    plot_compositional_matrix,
    plot_expert_load,
    plot_similarity_matrix,
    plot_tsne,
)
from analysis.compositional import binding_score
from analysis.figures import plot_ablation_metric, plot_router_saturation, plot_routing_dynamics
from analysis.load import routing_dynamics
from analysis.saturation import router_saturation
from analysis.stats import diagonal_hits
from configuration.contract import LOAD_GROUPS


def assert_png(path, width, height):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (width, height)
        assert np.asarray(image.convert("L")).std() > 0  # not a blank canvas


def test_similarity_heatmap(tmp_path):
    m = np.eye(8) * 0.5 + np.random.default_rng(0).random((8, 8)) * 0.4
    path = plot_similarity_matrix(m, tmp_path / "sim.png", labels=[f"c{i}" for i in range(8)], dpi=80)
    assert path == str(tmp_path / "sim.png")
    assert_png(path, 7 * 80, 6 * 80)


def test_expert_load_bars(tmp_path):
    is_image = np.array([True] * 4 + [False] * 6)
    split = np.where(is_image, 0, 1)
    per_layer = {
        layer: {
            "choices": split if layer == 2 else np.zeros(10, dtype=int),
            "probs": None,
            "is_image": is_image,
        }
        for layer in range(4)
    }
    path = plot_expert_load(load_report(per_layer, num_experts=2), tmp_path / "sub" / "load.png", dpi=50)
    assert_png(path, 12 * 50, 8 * 50)


def test_tsne_two_panels(tmp_path):
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(40, 2))
    path = plot_tsne(
        embedding,
        np.arange(40) < 20,
        np.arange(40) % 4,
        tmp_path / "tsne.png",
        concept_names=["car", "apple", "dog", "cup"],
        figsize=(10, 5),
        dpi=60,
    )
    assert_png(path, 600, 300)


def test_compositional_heatmap(tmp_path):
    compounds = ["red_circle", "green_circle", "red_square", "green_square"]
    m = np.kron(np.eye(2), np.ones((2, 2))) + 0.1 * np.eye(4)
    path = plot_compositional_matrix(m, compounds, tmp_path / "comp.png", dpi=50)
    assert_png(path, 8 * 50, 7 * 50)


# ----- what is drawn is the data -------------------------------------------------------------------------------------
# A PNG of the right size that is not blank passes for a heatmap of zeros or bars stuck at 0.5 / 0.5. These tests
# catch the Figure each writer hands to `figures._save` and read the artists back: the imshow array, the bar
# heights, the scatter offsets and the line data must be the input's numbers.


@pytest.fixture
def drawn(monkeypatch):
    """The Figures the writers save, in order (each is still written, so the PNG path is exercised too)."""
    from analysis import figures

    figs, save = [], figures._save

    def capture(fig, path, dpi):
        figs.append(fig)
        return save(fig, path, dpi)

    monkeypatch.setattr(figures, "_save", capture)
    return figs


def points_of(collection) -> list[tuple[float, float]]:
    return [tuple(map(float, p)) for p in collection.get_offsets()]


def test_similarity_heatmap_draws_the_matrix_and_its_hits(tmp_path, drawn):
    rng = np.random.default_rng(1)
    m = rng.random((5, 5))
    m[[0, 3], [0, 3]] = 2.0  # rows 0 and 3 hit their diagonal; the others (almost surely) do not
    plot_similarity_matrix(m, tmp_path / "sim.png", dpi=40)
    ax = drawn[0].axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), m)
    hits = diagonal_hits(m)
    assert 0 < hits.sum() < 5  # both the frames and the crosses are exercised
    frames = [p.get_xy() for p in ax.patches if isinstance(p, Rectangle)]
    assert frames == [(i - 0.5, i - 0.5) for i in range(5) if hits[i]]
    crosses = [(float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in ax.lines]
    assert crosses == [(float(np.argmax(m[i])), float(i)) for i in range(5) if not hits[i]]
    assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for v in m.ravel()]


def test_expert_load_bars_are_each_layers_dispatch(tmp_path, drawn):
    is_image = np.array([True] * 4 + [False] * 6)
    per_layer = {  # layer k sends k + 1 of the 10 tokens to expert 1; layer 3 also collapses (all on expert 0)
        layer: {"choices": np.array([1] * (layer + 1) + [0] * (9 - layer)), "is_image": is_image}
        for layer in range(3)
    }
    per_layer[3] = {"choices": np.zeros(10, dtype=int), "is_image": is_image}
    report = load_report(per_layer, num_experts=2)
    plot_expert_load(report, tmp_path / "load.png", dpi=30)
    axes = drawn[0].axes
    assert len(axes) == len(LOAD_GROUPS)
    for ax, modality in zip(axes, LOAD_GROUPS):
        bars = [p for p in ax.patches if isinstance(p, Rectangle)]
        heights = np.array([b.get_height() for b in bars]).reshape(2, 4)  # (expert, layer): one bar call each
        expected = np.array([report["layers"][str(k)][modality]["dispatch"] for k in range(4)]).T
        np.testing.assert_allclose(heights, expected)
        np.testing.assert_allclose([b.get_y() for b in bars[4:]], expected[0])  # expert 1 stacked on expert 0
    marks = axes[-1].collections[0]
    assert [x for x, _ in points_of(marks)] == [3.0] == [float(k) for k in report["collapsed_layers"]]


def test_tsne_panels_place_each_point_by_modality_and_concept(tmp_path, drawn):
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(24, 2))
    modality = np.arange(24) < 12
    concept = np.arange(24) % 3
    plot_tsne(embedding, modality, concept, tmp_path / "tsne.png", figsize=(6, 3), dpi=40)
    left, right = drawn[0].axes[:2]
    row_of = {tuple(map(float, p)): i for i, p in enumerate(embedding)}

    def groups(ax):
        return sorted(sorted(row_of[p] for p in points_of(c)) for c in ax.collections)

    by_modality = [np.flatnonzero(modality == m).tolist() for m in (True, False)]
    by_both = [
        np.flatnonzero((modality == m) & (concept == c)).tolist() for m in (True, False) for c in range(3)
    ]
    assert groups(left) == sorted(by_modality)
    assert groups(right) == sorted(by_both)
    colour = {c: {tuple(s.get_facecolor()[0]) for s in right.collections if row_of[points_of(s)[0]] % 3 == c}
              for c in range(3)}  # fmt: skip
    assert all(len(v) == 1 for v in colour.values()) and len(set().union(*colour.values())) == 3


def test_compositional_heatmap_draws_the_matrix_and_its_binding_scores(tmp_path, drawn):
    compounds = ["red_circle", "green_circle", "red_square", "green_square"]
    m = np.kron(np.eye(2), np.ones((2, 2))) + np.diag([0.3, 0.1, 0.2, 0.4])
    m[0, 1] = 1.5  # one swap error: binding below 1
    plot_compositional_matrix(m, compounds, tmp_path / "comp.png", dpi=30)
    ax = drawn[0].axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), m)
    scores = binding_score(m, compounds)
    title = ax.get_title()
    assert (scores["attribute"]["fraction"], scores["object"]["fraction"]) == (0.75, 1.0)
    assert "colour 0.75, object 1.00, swap n/a" in title  # single-attribute compounds have no swap pairs


def dynamics_records(steps=(10, 20, 30)):
    """A routing log of two layers: layer "0" drifts to expert 0 and collapses at the last step, layer "1" stays
    split; each number is distinct so a line drawn from the wrong series, layer or modality is caught."""
    records = []
    for i, step in enumerate(steps):
        layers = {}
        for layer, base in (("0", 0.6 + 0.2 * i), ("1", 0.5 - 0.1 * i)):
            share = 1.0 if (layer == "0" and i == len(steps) - 1) else base
            layers[layer] = {}
            for k, group in enumerate(LOAD_GROUPS):
                d = share if group == "all" else share - 0.01 * (k + 1)  # "all" collapses exactly at 1.0
                layers[layer][group] = {
                    "dispatch": [d, 1 - d],
                    "prob": [0.9 * d, 1 - 0.9 * d],
                    "logit_gap": 3 * d + k,
                }
        records.append({"step": step, "stage": "3", "layers": layers})
    return records


def test_routing_dynamics_lines_are_the_logged_series(tmp_path, drawn):
    dyn = routing_dynamics(dynamics_records())
    plot_routing_dynamics(dyn, tmp_path / "dyn.png", figsize=(6, 4), dpi=30)
    axes = np.array(drawn[0].axes).reshape(len(LOAD_GROUPS), 3)
    for row, group in enumerate(LOAD_GROUPS):
        for col, name in enumerate(("dispatch0", "prob0", "logit_gap")):
            data = [line for line in axes[row, col].lines if len(line.get_xdata()) > 2]  # not the guide lines
            assert len(data) == 2
            for line, layer in zip(data, ("0", "1")):
                series = dyn["train"][layer][group]
                assert list(line.get_xdata()) == series["steps"] == [10, 20, 30]
                np.testing.assert_allclose(line.get_ydata(), series[name])
    first = dyn["collapse"]["train"]["0"]["hard"]["first_step"]
    assert first == 30 and dyn["collapse"]["train"]["1"]["hard"]["first_step"] is None
    all_row = LOAD_GROUPS.index("all")
    onset = axes[all_row, 0].collections
    assert len(onset) == 1 and points_of(onset[0]) == [(30.0, dyn["train"]["0"]["all"]["dispatch0"][-1])]


def test_router_saturation_lines_are_each_layers_settled_share(tmp_path, drawn):
    from test_analysis_saturation import records_from

    is_image = np.array([True, True, False, False])
    late = np.zeros((5, 4), dtype=int)
    late[-1, 2:] = 1  # layer "1": the text tokens flip at the last probe
    saturation = router_saturation(records_from({"0": np.zeros((5, 4), dtype=int), "1": late}, is_image))
    plot_router_saturation(saturation, tmp_path / "sat.png", dpi=30)
    axes = drawn[0].axes
    for ax, group in zip(axes, LOAD_GROUPS):
        data = ax.lines[1:]  # after the settled-level guide
        assert [list(line.get_xdata()) for line in data] == [saturation["steps"]] * 2
        for line, layer in zip(data, ("0", "1")):
            np.testing.assert_allclose(line.get_ydata(), saturation["layers"][layer][group]["settled_by"])
    assert list(axes[1].lines[2].get_ydata()) != list(axes[1].lines[1].get_ydata())  # the layers differ


def test_ablation_bars_whiskers_and_dots_are_the_summaries(tmp_path, drawn):
    points = [
        ("a", {"mean": 0.3, "low": 0.2, "high": 0.45, "values": {0: 0.25, 1: 0.35}}),
        ("none", None),
        ("c", {"mean": 0.7, "low": None, "high": None, "values": {0: 0.7}}),
    ]
    plot_ablation_metric(points, tmp_path / "abl.png", dpi=30)
    ax = drawn[0].axes[0]
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert [(round(b.get_x() + b.get_width() / 2, 6), b.get_height()) for b in bars] == [
        (0.0, 0.3),
        (2.0, 0.7),
    ]
    dots = [
        p
        for c in ax.collections
        if len(c.get_offsets()) and not hasattr(c, "get_segments")
        for p in points_of(c)
    ]
    assert sorted(dots) == [(0.0, 0.25), (0.0, 0.35), (2.0, 0.7)]
    whiskers = [s for c in ax.collections if hasattr(c, "get_segments") for s in c.get_segments()]
    assert [tuple(map(tuple, np.asarray(s).round(6))) for s in whiskers] == [((0.0, 0.2), (0.0, 0.45))]
