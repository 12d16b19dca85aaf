"""Router saturation on constructed probe choices: when each token settles, which tokens changed or moved, the
share settled by each step, and the figure that draws it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from analysis.figures import plot_router_saturation
from analysis.saturation import read_probe_choices, router_saturation, token_settling
from configuration.contract import PROBE_CHOICES_FILE

STEPS = [0, 10, 20, 30, 40]


def test_token_settling_on_a_constructed_history():
    # token 0: never changes; 1: flips once at step 10 and stays; 2: flips back and forth, settles at 40;
    # 3: leaves expert 0 and comes back (changed, not moved).
    choices = np.array(
        [
            [0, 0, 0, 0],
            [0, 1, 1, 1],
            [0, 1, 0, 1],
            [0, 1, 1, 0],
            [0, 1, 0, 0],
        ]
    )  # (probes, tokens)
    settling = token_settling(choices, STEPS)
    assert settling["settle_index"].tolist() == [0, 1, 4, 3]
    assert settling["settle_step"].tolist() == [0, 10, 40, 30]
    assert settling["settle_fraction"].tolist() == pytest.approx([0.0, 0.25, 1.0, 0.75])
    assert settling["changed"].tolist() == [False, True, True, True]
    assert settling["flips"].tolist() == [0, 1, 4, 2]
    assert settling["moved"].tolist() == [False, True, False, False]


def records_from(choices: dict[str, np.ndarray], is_image: np.ndarray, steps=STEPS) -> list[dict]:
    return [
        {
            "step": step,
            "stage": "3",
            "layers": {k: v[i].tolist() for k, v in choices.items()},
            "is_image": is_image.tolist(),
        }
        for i, step in enumerate(steps)
    ]


def test_router_saturation_per_layer_and_group():
    is_image = np.array([True, True, False, False])
    frozen = np.zeros((5, 4), dtype=int)  # layer 0: decided from the start
    late = np.zeros((5, 4), dtype=int)  # layer 1: the text tokens flip at the last probe
    late[-1, 2:] = 1
    records = records_from({"0": frozen, "1": late}, is_image)
    sat = router_saturation(list(reversed(records)))  # order does not matter: sorted by step
    assert sat["steps"] == STEPS and sat["n_probes"] == 5
    assert sat["layers"]["0"]["all"]["step_settled_90"] == 0
    assert sat["layers"]["0"]["all"]["changed_share"] == 0.0
    text = sat["layers"]["1"]["text"]
    assert (
        text["mean_settle_fraction"] == 1.0 and text["moved_share"] == 1.0 and text["step_settled_90"] == 40
    )
    assert text["settled_by"] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert sat["layers"]["1"]["image"]["changed_share"] == 0.0
    assert sat["layers"]["1"]["all"]["settled_by"] == [0.5, 0.5, 0.5, 0.5, 1.0]
    assert sat["mean_settle_fraction"] == pytest.approx((0.0 + 0.5) / 2)
    assert sat["changed_share"] == pytest.approx((0.0 + 0.5) / 2)


def test_saturation_needs_two_probes_and_the_same_tokens(tmp_path):
    is_image = np.array([True, False])
    one = records_from({"0": np.zeros((1, 2), dtype=int)}, is_image, steps=[0])
    assert "skipped" in router_saturation(one) and "layers" not in router_saturation(one)
    broken = records_from({"0": np.zeros((2, 2), dtype=int)}, is_image, steps=[0, 10])
    broken[1]["layers"]["0"] = [0, 0, 1]
    with pytest.raises(ValueError, match="different token counts"):
        router_saturation(broken)
    with pytest.raises(FileNotFoundError, match="no probe choices"):
        read_probe_choices(tmp_path)
    (tmp_path / PROBE_CHOICES_FILE).write_text("".join(json.dumps(r) + "\n" for r in reversed(one * 1)))
    assert read_probe_choices(tmp_path) == one


def test_saturation_figure_draws_the_input(tmp_path):
    is_image = np.array([True, True, False, False])
    rng = np.random.default_rng(0)
    early = records_from({"0": np.zeros((5, 4), dtype=int), "1": np.zeros((5, 4), dtype=int)}, is_image)
    noisy = records_from({"0": rng.integers(0, 2, (5, 4)), "1": rng.integers(0, 2, (5, 4))}, is_image)
    pixels = []
    for name, records in (("early", early), ("noisy", noisy)):
        path = plot_router_saturation(router_saturation(records), tmp_path / f"{name}.png", dpi=60)
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (12 * 60, int(3.8 * 60))
            pixels.append(np.asarray(image.convert("L"), dtype=float))
    assert np.abs(pixels[0] - pixels[1]).mean() > 0.1  # different histories draw different curves
    with pytest.raises(ValueError, match="no saturation to draw"):
        plot_router_saturation(router_saturation(early[:1]), tmp_path / "none.png")
