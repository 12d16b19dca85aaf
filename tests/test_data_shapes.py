"""The Shapes world: determinism, disjoint splits, cache reuse, pixels that show what captions say, probes."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from trainer.data import shapes as shapes_mod
from trainer.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    MARKER,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    build_shapes,
    conversation,
    generate_shapes,
    render_scene,
    shape_template,
)

SMALL = dict(n_train=120, n_val=30, n_test=30, n_instruct=40, n_probe=6, n_compositional=8)
SPLITS = ("train", "validation", "test", "instruct", "concept_probe", "compositional_probe")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build_shapes(tmp_path_factory.mktemp("shapes") / "small", seed=0, **SMALL)


def _png(ds) -> list[bytes]:
    from datasets import Image as ImageFeature

    return [r["bytes"] for r in ds.cast_column("image", ImageFeature(decode=False))["image"]]


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int32)  # (H, W, 3)


def _near(arr: np.ndarray, rgb, tol: float = 12.0) -> np.ndarray:
    return np.linalg.norm(arr - np.array(rgb), axis=-1) <= tol  # (H, W) bool


def _background(arr: np.ndarray) -> str:
    corners = [tuple(arr[y, x]) for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1))]
    return min(
        BACKGROUNDS, key=lambda b: min(np.linalg.norm(np.subtract(c, BACKGROUNDS[b])) for c in corners)
    )


def _object_mask(arr: np.ndarray, colour: str) -> np.ndarray:
    """Pixels closer to ``colour`` than to the background (half of each anti-aliased edge included)."""
    bg = np.array(BACKGROUNDS[_background(arr)])
    d_obj = np.linalg.norm(arr - np.array(COLOURS[colour]), axis=-1)
    d_bg = np.linalg.norm(arr - bg, axis=-1)
    return (d_obj < d_bg) & (d_obj < 90)


def _classify(mask: np.ndarray, resolution: int = 32) -> str:
    """The shape whose template best overlaps the mask cropped to its box (IoU)."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    img = Image.fromarray(crop.astype(np.uint8) * 255).resize((resolution, resolution), Image.Resampling.BOX)
    m = np.asarray(img) >= 128

    def iou(t):
        return (m & t).sum() / max((m | t).sum(), 1)

    return max(SHAPES, key=lambda s: iou(shape_template(s, resolution)))


def _colour_in(text: str) -> str:
    found = [c for c in COLOURS if re.search(rf"\b{c}\b", text.lower())]
    assert len(found) == 1, text
    return found[0]


def test_world_constants():
    assert len(SHAPES) >= 8 and len(set(SHAPES)) == len(SHAPES)
    assert len(COLOURS) >= 6
    dists = [np.linalg.norm(np.subtract(a, b)) for a, b in combinations(COLOURS.values(), 2)]
    assert min(dists) > 80, "object colours must be far apart in RGB"
    for bg in BACKGROUNDS.values():
        assert min(np.linalg.norm(np.subtract(bg, c)) for c in COLOURS.values()) > 80


def test_splits_and_schemas(small):
    assert set(small) == set(SPLITS)
    assert {k: len(small[k]) for k in SPLITS} == {
        "train": 120,
        "validation": 30,
        "test": 30,
        "instruct": 40,
        "concept_probe": len(SHAPES) * 6,
        "compositional_probe": 4 * 8,
    }
    for split in SPLITS:
        assert type(small[split].features["image"]).__name__ == "Image"
    row = small["train"][0]
    assert set(row) == {"id", "image", "caption", "references", "objects"}
    assert row["image"].size == (64, 64) and row["image"].mode == "RGB"
    for r in small["validation"]:
        assert len(set(r["references"])) >= 3 and r["caption"] in r["references"]
        assert 1 <= len(r["objects"]) <= 2
        for o in r["objects"]:
            assert o["shape"] in SHAPES and o["colour"] in COLOURS and o["size"] in SIZES
    assert len(set(small["train"]["id"])) == 120


def test_deterministic_from_seed():
    sizes = dict(n_train=10, n_val=3, n_test=3, n_instruct=4, n_probe=1, n_compositional=2)
    a, b, c = (
        generate_shapes(seed=3, **sizes),
        generate_shapes(seed=3, **sizes),
        generate_shapes(seed=4, **sizes),
    )
    for split in SPLITS:
        assert _png(a[split]) == _png(b[split])
        assert a[split].remove_columns("image").to_list() == b[split].remove_columns("image").to_list()
    assert _png(a["train"]) != _png(c["train"])
    # The evaluation splits and probes do not change when the training set grows.
    bigger = generate_shapes(seed=3, **{**sizes, "n_train": 20})
    assert _png(bigger["test"]) == _png(a["test"]) and _png(bigger["concept_probe"]) == _png(
        a["concept_probe"]
    )


def test_no_image_shared_between_splits(small):
    seen: dict[str, str] = {}
    for split in SPLITS:
        for rid, png in zip(small[split]["id"], _png(small[split])):
            key = hashlib.sha256(Image.open(io.BytesIO(png)).tobytes()).hexdigest()
            assert key not in seen, f"{split}/{rid} repeats {seen.get(key)}"
            seen[key] = f"{split}/{rid}"


def test_cache_is_reused_and_incomplete_cache_regenerated(tmp_path, monkeypatch):
    sizes = dict(n_train=8, n_val=2, n_test=2, n_instruct=2, n_probe=1, n_compositional=1)
    out = tmp_path / "cache"
    first = build_shapes(out, **sizes)
    assert json.loads((out / MARKER).read_text())["counts"]["train"] == 8

    calls = []
    real = shapes_mod.generate_shapes

    def counting(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(shapes_mod, "generate_shapes", counting)
    again = build_shapes(out, **sizes)
    assert calls == [] and again["train"]["caption"] == first["train"]["caption"]

    (out / MARKER).unlink()  # an interrupted generation: data written, marker missing
    build_shapes(out, **sizes)
    assert len(calls) == 1 and (out / MARKER).exists()

    build_shapes(out, **{**sizes, "n_train": 9})  # other arguments in the same folder: regenerated
    assert len(calls) == 2 and len(build_shapes(out, **{**sizes, "n_train": 9})["train"]) == 9

    other = tmp_path / "not-a-cache"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a Shapes cache"):
        build_shapes(other, **sizes)

    monkeypatch.setenv("MOE_VLM_CACHE", str(tmp_path / "root"))
    build_shapes(**sizes)
    (made,) = (tmp_path / "root").iterdir()
    assert made.name.startswith("shapes-") and (made / MARKER).exists()


def test_pixels_contain_the_named_colours(small):
    for r in list(small["train"]) + list(small["test"]):
        arr = _pixels(r["image"])
        named = {o["colour"] for o in r["objects"]}
        for colour in COLOURS:
            count = int(_near(arr, COLOURS[colour]).sum())
            if colour in named:
                assert count >= 40, f"{r['id']}: only {count} {colour} pixels"
            else:
                assert count <= 3, f"{r['id']}: {count} {colour} pixels but the objects are {r['objects']}"


def test_shapes_are_distinguishable(small):
    rows = list(small["concept_probe"]) + [r for r in small["train"] if len(r["objects"]) == 1]
    wrong = []
    for r in rows:
        shape = r["concept"] if "concept" in r else r["objects"][0]["shape"]
        colour = _colour_in(r["caption"])
        got = _classify(_object_mask(_pixels(r["image"]), colour))
        if got != shape:
            wrong.append((r["id"], shape, got))
    assert not wrong, wrong
    # Independent checks of the geometry: filled fraction of the bounding box.
    for shape, lo, hi in (
        ("square", 0.97, 1.0),
        ("circle", 0.74, 0.83),
        ("diamond", 0.45, 0.56),
        ("cross", 0.5, 0.62),
    ):
        scene = Scene((ShapeObject(shape, "red", "large", 0.5, 0.5),), "black")
        mask = _object_mask(_pixels(render_scene(scene, 224)), "red")
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        assert lo <= fill <= hi, (shape, fill)


def test_caption_variety(small):
    words = sorted(
        [*SHAPES, *(s + "s" for s in SHAPES), "crosses", *COLOURS, *SIZES, *BACKGROUNDS],
        key=len,
        reverse=True,
    )
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b")
    regions = re.compile(r"\b(top left|top right|bottom left|bottom right|top|bottom|left|right|centre)\b")
    refs = [c for r in small["train"] for c in r["references"]]
    skeletons = {regions.sub("<pos>", pattern.sub("<w>", c.lower())) for c in refs}
    skeletons = {re.sub(r"\ban?\b", "a", s) for s in skeletons}
    assert len(skeletons) >= 15, sorted(skeletons)
    assert any(
        re.search(r"\b(circles|squares|triangles|stars|hexagons|crosses|hearts|diamonds)\b", c) for c in refs
    )
    assert len(set(small["train"]["caption"])) > 0.8 * len(small["train"])


def test_instruct_conversations(small):
    kinds = set()
    for r in small["instruct"]:
        turns = r["conversations"]
        assert len(turns) >= 4 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].count("<image>") == 1
        assert sum(t["value"].count("<image>") for t in turns) == 1
        for t in turns[::2]:
            q = t["value"].replace("<image>", "").strip()
            kinds.add(q.split()[0].lower())
    assert {"what", "how", "is", "describe"} <= kinds or len(kinds) >= 6, kinds


def test_conversation_answers_are_correct():
    scene = Scene(
        (ShapeObject("square", "red", "small", 0.2, 0.2), ShapeObject("star", "blue", "large", 0.7, 0.7)),
        "white",
    )
    rng = random.Random(0)
    answers: dict[str, str] = {}
    for _ in range(60):
        turns = conversation(scene, rng, 4, 4)
        for q, a in zip(turns[::2], turns[1::2]):
            answers[q["value"].replace("<image>", "").strip()] = a["value"]
    assert answers.get("What colour is the square?") in ("The square is red.", "It is red.")
    assert answers.get("How many shapes are there?") == "There are two shapes."
    for q, a in answers.items():
        m = re.match(r"(?:Is there|Can you see|Does the image contain) an? (\w+) (\w+)\?", q)
        if m:
            present = (m.group(1), m.group(2)) in {("red", "square"), ("blue", "star")}
            assert a.startswith("Yes") == present, (q, a)
        if q.startswith("Where is the red square"):
            assert "top left" in a
        if q == "What colour is the background?":
            assert a == "The background is white."


def test_concept_probe(small):
    probe = small["concept_probe"]
    assert sorted(set(probe["concept"])) == sorted(SHAPES)
    for shape in SHAPES:
        assert probe["concept"].count(shape) == 6
    for r in probe:
        assert re.search(rf"\b{r['concept']}\b", r["caption"]), r
        arr = _pixels(r["image"])
        colour = _colour_in(r["caption"])
        assert _near(arr, COLOURS[colour]).sum() >= 40
        assert sum(_near(arr, rgb).sum() > 3 for rgb in COLOURS.values()) == 1  # exactly one object colour


def test_compositional_probe(small):
    probe = list(small["compositional_probe"])
    pairs: dict[str, list[dict]] = {}
    for r in probe:
        pairs.setdefault(r["pair"], []).append(r)
    assert len(pairs) == 16 and all(len(v) == 2 for v in pairs.values())
    assert sum(r["kind"] == "single" for r in probe) == 16 and sum(r["kind"] == "swap" for r in probe) == 16
    for a, b in pairs.values():
        assert a["kind"] == b["kind"]
        pa, pb = _pixels(a["image"]), _pixels(b["image"])
        bg = np.array(BACKGROUNDS[_background(pa)])
        fg_a, fg_b = np.abs(pa - bg).sum(-1) > 0, np.abs(pb - bg).sum(-1) > 0
        assert (fg_a == fg_b).all(), "members of a pair must have the same geometry and background"
        if a["kind"] == "single":
            (ca, sa), (cb, sb) = a["compound"].split("_"), b["compound"].split("_")
            assert sa == sb and ca != cb

            def skeleton(caption, colour):
                return re.sub(r"\ban?\b", "a", caption.replace(colour, "<c>"))

            assert skeleton(a["caption"], ca) == skeleton(b["caption"], cb)  # only the colour word differs
            assert _near(pa, COLOURS[ca]).sum() >= 40 and _near(pb, COLOURS[cb]).sum() >= 40
            assert _near(pa, COLOURS[cb]).sum() <= 3
        else:
            (c1, s1), (c2, s2) = (x.split("_") for x in a["compound"].split("+"))
            assert b["compound"] == f"{c2}_{s1}+{c1}_{s2}" and s1 != s2 and c1 != c2
            # Where A shows colour c1, B shows c2, and vice versa: the colours are swapped, nothing else.
            # (exact colour values: fully covered pixels, the same in both images)
            assert (_near(pa, COLOURS[c1], 0.5) == _near(pb, COLOURS[c2], 0.5)).all()
            assert (_near(pa, COLOURS[c2], 0.5) == _near(pb, COLOURS[c1], 0.5)).all()
            assert _near(pa, COLOURS[c1]).sum() >= 40


def test_works_at_224_pixels():
    data = generate_shapes(
        image_size=224, n_train=4, n_val=1, n_test=1, n_instruct=1, n_probe=1, n_compositional=1
    )
    r = data["train"][0]
    assert r["image"].size == (224, 224)
    for o in r["objects"]:
        assert _near(_pixels(r["image"]), COLOURS[o["colour"]]).sum() >= 300
