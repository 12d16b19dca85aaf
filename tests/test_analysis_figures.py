"""Every figure writer produces a non-empty PNG of the requested pixel size."""

from __future__ import annotations

import numpy as np
from PIL import Image

from analysis import (
    load_report,
    plot_compositional_matrix,
    plot_expert_load,
    plot_similarity_matrix,
    plot_tsne,
)


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
