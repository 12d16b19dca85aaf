"""The shifted Shapes world: tables outside the training ranges, in-place swap and restore, scenes that
still place, and a cached dataset the analysis reads like the training world's."""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
import random
from itertools import combinations

import numpy as np
import pytest
from datasets import load_from_disk

import trainer.data as data_pkg
from configuration.contract import CACHE_ENV
from trainer.data import shapes as shapes_mod
from trainer.data import shifted as shifted_mod
from trainer.data.shifted import (
    SHIFTED_BACKGROUNDS,
    SHIFTED_COLOURS,
    SHIFTED_SIZES,
    build_shifted_shapes,
    generate_shifted_shapes,
    shifted_seed,
    shifted_world,
)

# Snapshots of the training tables, taken at import (outside any shifted_world block).
TRAIN_COLOURS = dict(shapes_mod.COLOURS)
TRAIN_BACKGROUNDS = dict(shapes_mod.BACKGROUNDS)
TRAIN_SIZES = dict(shapes_mod.SIZES)

SMALL = dict(n_test=24, n_probe=2, n_compositional=3)
# The splits build_shapes writes (and analysis.run reads: test, concept_probe, compositional_probe).
SPLITS = ("train", "validation", "test", "instruct", "concept_probe", "compositional_probe")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_shifted_shapes(seed=0, root=tmp_path_factory.mktemp("shifted"), **SMALL)


def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360


def _hue_gap(a: float, b: float) -> float:
    return min(abs(a - b), 360 - abs(a - b))


def test_tables_keep_the_training_vocabulary():
    assert list(SHIFTED_COLOURS) == list(TRAIN_COLOURS)
    assert list(SHIFTED_BACKGROUNDS) == list(TRAIN_BACKGROUNDS)
    assert list(SHIFTED_SIZES) == list(TRAIN_SIZES)


def test_shifted_colours_are_far_from_every_training_colour_and_keep_their_hue():
    for name, rgb in SHIFTED_COLOURS.items():
        assert min(math.dist(rgb, t) for t in TRAIN_COLOURS.values()) >= 60, name
        # Still the named hue: nearer in hue angle to its own training colour than to any other.
        nearest = min(TRAIN_COLOURS, key=lambda t: _hue_gap(_hue(rgb), _hue(TRAIN_COLOURS[t])))
        assert nearest == name
        # Visible on every shifted background.
        assert min(math.dist(rgb, b) for b in SHIFTED_BACKGROUNDS.values()) >= 60, name
    assert min(math.dist(a, b) for a, b in combinations(SHIFTED_COLOURS.values(), 2)) >= 50


def test_shifted_backgrounds_are_tinted_where_training_ones_are_neutral():
    def chroma(rgb):
        return max(rgb) - min(rgb)

    assert all(chroma(rgb) == 0 for rgb in TRAIN_BACKGROUNDS.values())
    for name, rgb in SHIFTED_BACKGROUNDS.items():
        assert chroma(rgb) >= 40, name
        assert min(math.dist(rgb, t) for t in TRAIN_BACKGROUNDS.values()) >= 30, name

    # The names keep their order of brightness (white > light grey > dark grey > black).
    def by_brightness(table):
        return sorted(table, key=lambda n: sum(table[n]))

    assert by_brightness(SHIFTED_BACKGROUNDS) == by_brightness(TRAIN_BACKGROUNDS)


def test_shifted_sizes_are_outside_the_training_range_in_the_same_order():
    lo, hi = min(TRAIN_SIZES.values()), max(TRAIN_SIZES.values())
    assert (lo, hi) == (0.14, 0.235)
    assert all(not lo <= r <= hi for r in SHIFTED_SIZES.values()), SHIFTED_SIZES
    assert sorted(SHIFTED_SIZES, key=SHIFTED_SIZES.get) == sorted(TRAIN_SIZES, key=TRAIN_SIZES.get)


def _same(table, snapshot) -> bool:
    return list(table.items()) == list(snapshot.items())


def test_shifted_world_swaps_in_place_and_restores_exactly():
    tables = (shapes_mod.COLOURS, shapes_mod.BACKGROUNDS, shapes_mod.SIZES)
    with shifted_world():
        assert tuple(map(id, tables)) == tuple(
            map(id, (shapes_mod.COLOURS, shapes_mod.BACKGROUNDS, shapes_mod.SIZES))
        )
        assert _same(shapes_mod.COLOURS, SHIFTED_COLOURS)
        assert _same(shapes_mod.BACKGROUNDS, SHIFTED_BACKGROUNDS)
        assert _same(shapes_mod.SIZES, SHIFTED_SIZES)
        assert data_pkg.COLOURS is shapes_mod.COLOURS and _same(data_pkg.COLOURS, SHIFTED_COLOURS)
        with shifted_world():  # nesting restores the outer (shifted) state
            pass
        assert _same(shapes_mod.SIZES, SHIFTED_SIZES)
    assert _same(shapes_mod.COLOURS, TRAIN_COLOURS)
    assert _same(shapes_mod.BACKGROUNDS, TRAIN_BACKGROUNDS)
    assert _same(shapes_mod.SIZES, TRAIN_SIZES)
    assert (shapes_mod.COLOURS, shapes_mod.BACKGROUNDS, shapes_mod.SIZES) == tables


def test_shifted_world_restores_on_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with shifted_world():
            assert _same(shapes_mod.COLOURS, SHIFTED_COLOURS)
            raise RuntimeError("boom")
    assert _same(shapes_mod.COLOURS, TRAIN_COLOURS)
    assert _same(shapes_mod.BACKGROUNDS, TRAIN_BACKGROUNDS)
    assert _same(shapes_mod.SIZES, TRAIN_SIZES)
    # The shifted tables themselves are never modified by the swap.
    assert SHIFTED_COLOURS["red"] == (130, 0, 0) and SHIFTED_SIZES["large"] == 0.27


def test_random_scene_terminates_and_places_objects_under_the_shifted_world(monkeypatch):
    calls = 0
    place = shapes_mod._place

    def bounded(*args, **kwargs):  # a placement that never succeeds fails here instead of hanging
        nonlocal calls
        calls += 1
        if calls > 5000:
            raise AssertionError("random_scene keeps failing to place objects")
        return place(*args, **kwargs)

    monkeypatch.setattr(shapes_mod, "_place", bounded)
    seen_sizes = set()
    with shifted_world():
        for seed in range(50):
            rng = random.Random(f"shifted-test/{seed}")
            for n in (None, 1, 2):
                scene = shapes_mod.random_scene(rng, n)
                assert scene.background in SHIFTED_BACKGROUNDS
                for o in scene.objects:
                    r = SHIFTED_SIZES[o.size]
                    assert r <= o.cx <= 1 - r and r <= o.cy <= 1 - r  # inside the image
                    seen_sizes.add(o.size)
                if len(scene.objects) == 2:
                    a, b = scene.objects
                    assert (
                        math.dist((a.cx, a.cy), (b.cx, b.cy)) > SHIFTED_SIZES[a.size] + SHIFTED_SIZES[b.size]
                    )
    assert seen_sizes == set(SHIFTED_SIZES)


def test_shifted_seed_is_a_stable_distinct_namespace():
    assert shifted_seed(0) == shifted_seed(0)
    assert shifted_seed(0) != shifted_seed(1)
    assert shifted_seed(0) not in (0, 1)
    assert 0 <= shifted_seed(0) < 2**63
    # Stable across processes and versions (not Python's salted hash()).
    assert shifted_seed(0) == int.from_bytes(hashlib.sha256(b"moe-vlm-shifted/0").digest()[:8], "big") >> 1


def test_generation_leaves_the_training_world_untouched():
    data = generate_shifted_shapes(seed=0, n_test=2, n_probe=1, n_compositional=1)
    assert len(data["test"]) == 2
    assert _same(shapes_mod.COLOURS, TRAIN_COLOURS) and _same(shapes_mod.SIZES, TRAIN_SIZES)


def test_built_dataset_has_the_splits_and_format_the_analysis_reads(built):
    # analysis.run.load_data(data_dir, ...) is `datasets.load_from_disk(str(data_dir))`.
    data = load_from_disk(str(built))
    assert tuple(data) == SPLITS
    caption_f, instruct_f, concept_f, compositional_f = shapes_mod._features()
    features = {
        "train": caption_f,
        "validation": caption_f,
        "test": caption_f,
        "instruct": instruct_f,
        "concept_probe": concept_f,
        "compositional_probe": compositional_f,
    }
    assert {k: data[k].features for k in SPLITS} == features
    counts = {k: len(v) for k, v in data.items()}
    assert counts == {
        "train": 0,
        "validation": 0,
        "test": SMALL["n_test"],
        "instruct": 0,
        "concept_probe": len(shapes_mod.SHAPES) * SMALL["n_probe"],
        "compositional_probe": 4 * SMALL["n_compositional"],
    }
    assert set(data["concept_probe"]["concept"]) == set(shapes_mod.SHAPES)
    assert set(data["compositional_probe"]["kind"]) == {"single", "swap"}
    # The words stay in the training vocabulary.
    for objects in data["test"]["objects"]:
        for o in objects:
            assert (
                o["colour"] in TRAIN_COLOURS and o["size"] in TRAIN_SIZES and o["shape"] in shapes_mod.SHAPES
            )
    marker = json.loads((built / shapes_mod.MARKER).read_text())
    assert marker["counts"] == counts


def test_rendered_pixels_use_the_shifted_colours_not_the_training_ones(built):
    data = load_from_disk(str(built))
    images = [
        np.asarray(img.convert("RGB"), dtype=np.int32)
        for split in ("test", "concept_probe", "compositional_probe")
        for img in data[split]["image"]
    ]
    pixels = np.concatenate([a.reshape(-1, 3) for a in images])
    exact = {tuple(p) for p in np.unique(pixels, axis=0)}
    shifted_present = {n for n, rgb in SHIFTED_COLOURS.items() if rgb in exact}
    assert len(shifted_present) >= 6, shifted_present  # object interiors keep the exact colour value
    for a in images:  # corners are background, and every background is a shifted one
        for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert tuple(a[y, x]) in SHIFTED_BACKGROUNDS.values()
    training = np.array(list(TRAIN_COLOURS.values()) + list(TRAIN_BACKGROUNDS.values()))
    near_training = (np.linalg.norm(pixels[:, None, :] - training[None], axis=-1) <= 12).any(axis=1)
    assert near_training.mean() < 0.005  # a training-world image is all such pixels


def test_cache_is_reused_and_keyed_by_the_arguments(tmp_path, monkeypatch):
    calls = []
    generate = shifted_mod.generate_shifted_shapes

    def counting(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(shifted_mod, "generate_shifted_shapes", counting)
    args = dict(n_test=4, n_probe=1, n_compositional=1)
    first = build_shifted_shapes(seed=0, root=tmp_path, **args)
    marker = first / shapes_mod.MARKER
    mtime = marker.stat().st_mtime_ns
    assert build_shifted_shapes(seed=0, root=tmp_path, **args) == first
    assert len(calls) == 1 and marker.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary folder was renamed into place

    other = build_shifted_shapes(seed=1, root=tmp_path, **args)
    assert other != first and len(calls) == 2
    assert build_shifted_shapes(seed=0, root=tmp_path, n_test=5, n_probe=1, n_compositional=1) not in (
        first,
        other,
    )

    # An interrupted folder (no marker) is regenerated in place.
    marker.unlink()
    assert build_shifted_shapes(seed=0, root=tmp_path, **args) == first
    assert len(calls) == 4 and marker.exists()
    assert len(load_from_disk(str(first))["test"]) == 4


def test_default_root_is_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    path = build_shifted_shapes(seed=0, n_test=2, n_probe=1, n_compositional=1)
    assert path.parent == tmp_path / "cache" and path.name.startswith("shapes-shifted-")
