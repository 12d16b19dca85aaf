"""Shapes: a procedurally generated image–text world, the embedded default data set.

The paper trains on COCO captions and LLaVA-Instruct-150K and probes 8 concepts; none of that can be
downloaded here, so this module builds a world where the same questions have answers:

* 8 object concepts (``SHAPES``) × 8 colours (``COLOURS``), with size, position, background and 1–2
  objects per image, drawn with PIL (4× supersampled, box-downsampled: clean edges, exact interiors);
* captions from many templates (attribute order, phrasing, singular/plural), 5 distinct references per
  image so a model cannot succeed by memorising one string and CIDEr-style scores have references;
* multi-turn instruction conversations in LLaVA-Instruct's format (the Stage-3 analogue);
* the concept probe (8 concepts × N single-object images, captions naming the concept) and the
  compositional probe (colour pairs that differ only in colour; two-object scenes with swapped colours);
* splits whose images are pairwise distinct (pixel hashes are checked across every split and probe).

Everything is deterministic from ``seed``: each split draws from its own random stream, in a fixed order
(probes, test, validation, train, instruct), so the probes and the test set do not change when the
training set grows. :func:`build_shapes` caches the result with ``save_to_disk`` and reloads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from configuration.contract import cache_root

from .errors import logger

# ----------------------------------------------------------------------------------------------------
# The world: concepts, attributes and their names
# ----------------------------------------------------------------------------------------------------

#: Object concepts. The concept probe uses all of them (8, as in the paper).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "heart", "diamond")

#: Object colours, saturated and far apart in RGB (min pairwise distance > 80) and far from every
#: background, so that "count pixels near the colour" is a reliable check.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 130, 20),
    "yellow": (245, 230, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 220),
    "purple": (140, 60, 200),
    "pink": (245, 120, 190),
}

#: Neutral backgrounds (named in some captions and answers).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light grey": (190, 190, 190),
    "dark grey": (70, 70, 70),
    "black": (20, 20, 20),
}

#: Object half-extent as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.14, "medium": 0.185, "large": 0.235}

_PLURALS = {"cross": "crosses"}

# Bump when the generator's output changes: it is part of the cache key.
GENERATOR_VERSION = 1


def plural(shape: str) -> str:
    return _PLURALS.get(shape, shape + "s")


def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` in a unit box centred at 0 (image y axis points down); None for a circle."""

    def ring(n: int, radii: Sequence[float], start_deg: float) -> list[tuple[float, float]]:
        return [
            (radii[i % len(radii)] * math.cos(math.radians(start_deg + 360 * i / n)),
             radii[i % len(radii)] * math.sin(math.radians(start_deg + 360 * i / n)))
            for i in range(n)
        ]  # fmt: skip

    if shape == "circle":
        return None
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(0.0, -0.95), (0.95, 0.75), (-0.95, 0.75)]
    if shape == "star":
        return ring(10, (1.0, 0.42), -90)
    if shape == "hexagon":
        return ring(6, (1.0,), 0)
    if shape == "cross":
        w = 0.32
        return [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    if shape == "heart":
        ts = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        x, y = x - (x.max() + x.min()) / 2, y - (y.max() + y.min()) / 2
        s = max(x.max() - x.min(), y.max() - y.min()) / 2
        return list(zip((x / s).tolist(), (y / s).tolist()))
    if shape == "diamond":
        return [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}


@dataclass(frozen=True)
class ShapeObject:
    """One object: concept, colour, size name, centre (fractions of the image side)."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def region(self) -> str:
        """Named region of the centre on a 3×3 grid ("top left", "centre", "bottom"...)."""
        row = "top" if self.cy < 1 / 3 else ("bottom" if self.cy > 2 / 3 else "")
        col = "left" if self.cx < 1 / 3 else ("right" if self.cx > 2 / 3 else "")
        return f"{row} {col}".strip() or "centre"

    @property
    def where(self) -> str:
        """The region as a phrase: "in the top left", "at the top", "on the left", "in the centre"."""
        r = self.region
        if " " in r or r == "centre":
            return f"in the {r}"
        return f"at the {r}" if r in ("top", "bottom") else f"on the {r}"

    def record(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size}


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    poly = _POLYGONS[shape]
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in poly], fill=fill)


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``image_size``² pixels.

    Drawn at 4× (2× from 128 px up) and box-downsampled, so edges are anti-aliased while object
    interiors keep the exact colour value.
    """
    ss = 4 if image_size < 128 else 2
    side = image_size * ss
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o.shape, o.cx * side, o.cy * side, o.radius * side, COLOURS[o.colour])
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def shape_template(shape: str, resolution: int = 32) -> np.ndarray:
    """Boolean mask (resolution, resolution) of ``shape`` cropped to its bounding box.

    Used to check rendered images: crop a detected object to its box, resize, compare with each template.
    """
    big = resolution * 8
    img = Image.new("L", (big, big), 0)
    _draw(ImageDraw.Draw(img), shape, big / 2, big / 2, big / 2 - 1, 255)
    img = img.crop(img.getbbox()).resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(img) >= 128


# ----------------------------------------------------------------------------------------------------
# Language: captions, descriptions, instruction conversations
# ----------------------------------------------------------------------------------------------------


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "?", "!")) else ".")


def concept_caption(objects: Sequence[tuple[str, str]]) -> str:
    """Objects named by colour and shape only, e.g. [("orange", "circle"), ("blue", "star")] -> "An orange circle
    and a blue star." (the tiny CLIP's pretraining captions and its zero-shot prompts: one wording for both)."""
    return _sentence(" and ".join(_a(f"{colour} {shape}") for colour, shape in objects))


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where ``a`` is relative to ``b``."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


Template = Callable[..., str]

# One object `o` on background `bg`. Several phrasings and attribute orders.
_SINGLE: list[Template] = [
    lambda o, bg: _a(f"{o.size} {o.colour} {o.shape}"),
    lambda o, bg: f"{_a(f'{o.colour} {o.shape}')} on {_a(bg)} background",
    lambda o, bg: f"there is {_a(f'{o.colour} {o.shape}')} {o.where}",
    lambda o, bg: f"{_a(o.shape)} that is {o.colour}",
    lambda o, bg: f"one {o.size} {o.colour} {o.shape} {o.where}",
    lambda o, bg: f"an image of {_a(f'{o.colour} {o.shape}')}",
    lambda o, bg: f"{_a(f'{o.size} {o.shape}')} coloured {o.colour}",
    lambda o, bg: f"a single {o.colour} {o.shape} against {_a(bg)} background",
    lambda o, bg: f"the picture shows {_a(f'{o.size} {o.colour} {o.shape}')}",
    lambda o, bg: f"{o.where}, there is {_a(f'{o.colour} {o.shape}')}",
    lambda o, bg: f"{_a(f'{o.colour} {o.shape}')}, {o.size}, {o.where}",
]

# Two objects `a`, `b` on background `bg` (any combination of shapes and colours).
_PAIR: list[Template] = [
    lambda a, b, bg: f"{_a(f'{a.colour} {a.shape}')} and {_a(f'{b.colour} {b.shape}')}",
    lambda a, b, bg: f"two shapes: {_a(f'{a.colour} {a.shape}')} and {_a(f'{b.colour} {b.shape}')}",
    lambda a, b, bg: f"{_a(f'{a.colour} {a.shape}')} {_relation(a, b)} {_a(f'{b.colour} {b.shape}')}",
    lambda a, b, bg: (
        f"{_a(f'{a.colour} {a.shape}')} and {_a(f'{b.colour} {b.shape}')} on {_a(bg)} background"
    ),
    lambda a, b, bg: (
        f"there are two shapes, {_a(f'{a.size} {a.colour} {a.shape}')} and {_a(f'{b.size} {b.colour} {b.shape}')}"
    ),
    lambda a, b, bg: (
        f"the image shows {_a(f'{a.colour} {a.shape}')} {a.where} and {_a(f'{b.colour} {b.shape}')} {b.where}"
    ),
    lambda a, b, bg: f"{_a(f'{b.colour} {b.shape}')} and {_a(f'{a.colour} {a.shape}')}",
    lambda a, b, bg: f"{_a(a.shape)} that is {a.colour} and {_a(b.shape)} that is {b.colour}",
]

# Two objects with the same shape and colour: the generic templates would read "a red circle and a red circle".
_TWIN: list[Template] = [
    lambda a, b, bg: f"two {a.colour} {plural(a.shape)}",
    lambda a, b, bg: f"a pair of {a.colour} {plural(a.shape)}",
    lambda a, b, bg: f"two {plural(a.shape)}, both {a.colour}",
    lambda a, b, bg: f"there are two {a.colour} {plural(a.shape)}",
    lambda a, b, bg: f"two {a.colour} {plural(a.shape)} on {_a(bg)} background",
    lambda a, b, bg: f"an image of two {a.colour} {plural(a.shape)}",
]

# Extra phrasings (plural forms) for the same shape in two colours, or one colour on two shapes.
_SAME_SHAPE: list[Template] = [
    lambda a, b, bg: f"two {plural(a.shape)}, one {a.colour} and one {b.colour}",
    lambda a, b, bg: f"{_a(a.colour)} and {_a(b.colour)} {a.shape}",
]
_SAME_COLOUR: list[Template] = [
    lambda a, b, bg: f"{_a(a.shape)} and {_a(b.shape)}, both {a.colour}",
    lambda a, b, bg: f"two {a.colour} shapes: {_a(a.shape)} and {_a(b.shape)}",
]


def caption_templates(scene: Scene) -> list[Template]:
    """The templates that describe ``scene`` correctly (each takes the objects and the background)."""
    if len(scene.objects) == 1:
        return _SINGLE
    a, b = scene.objects
    if a.shape == b.shape and a.colour == b.colour:
        return _TWIN
    if a.shape == b.shape:
        return _PAIR + _SAME_SHAPE
    if a.colour == b.colour:
        return _PAIR + _SAME_COLOUR
    return _PAIR


def apply_template(template: Template, scene: Scene) -> str:
    return _sentence(template(*scene.objects, scene.background))


def captions(scene: Scene, rng: random.Random, k: int = 5) -> list[str]:
    """``k`` distinct captions of ``scene`` from ``k`` different templates, in random order."""
    templates = caption_templates(scene)
    out: list[str] = []
    for t in rng.sample(templates, len(templates)):
        c = apply_template(t, scene)
        if c not in out:
            out.append(c)
        if len(out) == k:
            return out
    raise ValueError(f"only {len(out)} distinct captions for {scene}; lower n_references")


def describe(scene: Scene) -> str:
    """A longer, complete description (the answer to "Describe the image.")."""
    objs = [f"{_a(f'{o.size} {o.colour} {o.shape}')} {o.where}" for o in scene.objects]
    if len(objs) == 1:
        return _sentence(f"the image shows {objs[0]} on {_a(scene.background)} background")
    return _sentence(f"there are two shapes on {_a(scene.background)} background: {objs[0]} and {objs[1]}")


_Q_COLOUR = ("What colour is the {s}?", "Which colour is the {s}?", "What is the colour of the {s}?")
_Q_SHAPE = ("What shape is the {c} object?", "Which shape is {c}?", "What is the {c} shape?")
_Q_COUNT = (
    "How many shapes are there?",
    "How many objects are in the image?",
    "Count the shapes in the picture.",
)
_Q_EXISTS = ("Is there {a}?", "Can you see {a}?", "Does the image contain {a}?")
_Q_WHERE = ("Where is the {c} {s}?", "In which part of the image is the {c} {s}?")
_Q_SIZE = ("How big is the {s}?", "What size is the {s}?")
_Q_BACKGROUND = ("What colour is the background?", "What is the background colour?")
_Q_DESCRIBE = ("Describe the image.", "What is in this picture?", "Give a short description of the image.")


def _qa_colour(scene: Scene, rng: random.Random):
    unique = [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]
    if not unique:  # two objects of the same shape
        a, b = scene.objects
        q = f"What colours are the {plural(a.shape)}?"
        if a.colour == b.colour:
            return q, f"Both {plural(a.shape)} are {a.colour}."
        return q, f"One {a.shape} is {a.colour} and the other is {b.colour}."
    o = rng.choice(unique)
    ans = rng.choice((f"The {o.shape} is {o.colour}.", f"It is {o.colour}."))
    return rng.choice(_Q_COLOUR).format(s=o.shape), ans


def _qa_shape(scene: Scene, rng: random.Random):
    unique = [o for o in scene.objects if sum(p.colour == o.colour for p in scene.objects) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    ans = rng.choice((f"The {o.colour} object is {_a(o.shape)}.", f"It is {_a(o.shape)}."))
    return rng.choice(_Q_SHAPE).format(c=o.colour), ans


def _qa_count(scene: Scene, rng: random.Random):
    n = len(scene.objects)
    ans = "There is one shape." if n == 1 else f"There are {('zero', 'one', 'two', 'three')[n]} shapes."
    return rng.choice(_Q_COUNT), ans


def _qa_exists(scene: Scene, rng: random.Random):
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        c, s = rng.choice(sorted(present))
        return rng.choice(_Q_EXISTS).format(a=_a(f"{c} {s}")), f"Yes, there is {_a(f'{c} {s}')}."
    # Hard negatives: the same shape in another colour, or the same colour on another shape.
    o = rng.choice(scene.objects)
    if rng.random() < 0.5:
        c, s = rng.choice([c for c in COLOURS if (c, o.shape) not in present]), o.shape
    else:
        c, s = o.colour, rng.choice([s for s in SHAPES if (o.colour, s) not in present])
    return rng.choice(_Q_EXISTS).format(a=_a(f"{c} {s}")), f"No, there is no {c} {s}."


def _qa_where(scene: Scene, rng: random.Random):
    unique = [
        o
        for o in scene.objects
        if sum((p.colour, p.shape) == (o.colour, o.shape) for p in scene.objects) == 1
    ]
    if not unique:
        return None
    o = rng.choice(unique)
    ans = rng.choice((f"It is {o.where}.", f"The {o.colour} {o.shape} is {o.where}."))
    return rng.choice(_Q_WHERE).format(c=o.colour, s=o.shape), ans


def _qa_size(scene: Scene, rng: random.Random):
    unique = [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return rng.choice(_Q_SIZE).format(s=o.shape), rng.choice(
        (f"The {o.shape} is {o.size}.", f"It is {o.size}.")
    )


def _qa_background(scene: Scene, rng: random.Random):
    return rng.choice(_Q_BACKGROUND), f"The background is {scene.background}."


def _qa_describe(scene: Scene, rng: random.Random):
    return rng.choice(_Q_DESCRIBE), describe(scene)


_QUESTION_KINDS = {
    "colour": _qa_colour,
    "shape": _qa_shape,
    "count": _qa_count,
    "exists": _qa_exists,
    "where": _qa_where,
    "size": _qa_size,
    "background": _qa_background,
    "describe": _qa_describe,
}


def conversation(
    scene: Scene, rng: random.Random, min_turns: int = 2, max_turns: int = 4
) -> list[dict[str, str]]:
    """A multi-turn LLaVA-Instruct conversation about ``scene``.

    Questions of different kinds (colour, shape, count, existence with hard negatives, position, size,
    background, description), each answered correctly for the scene. The first human turn carries the
    single ``<image>`` marker, before the question (as in most LLaVA records) or, one time in ten, after it.
    """
    kinds = list(_QUESTION_KINDS)
    rng.shuffle(kinds)
    turns: list[dict[str, str]] = []
    n = rng.randint(min_turns, max_turns)
    for kind in kinds:
        qa = _QUESTION_KINDS[kind](scene, rng)
        if qa is None:
            continue
        q, a = qa
        if not turns:
            q = f"{q}\n<image>" if rng.random() < 0.1 else f"<image>\n{q}"
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        if len(turns) == 2 * n:
            break
    return turns


# ----------------------------------------------------------------------------------------------------
# Sampling scenes
# ----------------------------------------------------------------------------------------------------


def _place(rng: random.Random, sizes: Sequence[str], tries: int = 200) -> list[tuple[float, float]] | None:
    """Centres for objects of ``sizes`` that stay inside the image and do not overlap."""
    margin = 0.03
    for _ in range(tries):
        centres = [
            (
                rng.uniform(SIZES[s] + margin, 1 - SIZES[s] - margin),
                rng.uniform(SIZES[s] + margin, 1 - SIZES[s] - margin),
            )
            for s in sizes
        ]
        ok = all(
            math.dist(centres[i], centres[j]) > 1.15 * (SIZES[sizes[i]] + SIZES[sizes[j]]) + margin
            for i in range(len(sizes))
            for j in range(i)
        )
        if ok:
            return centres
    return None


def random_scene(
    rng: random.Random,
    n_objects: int | None = None,
    shapes: Sequence[str] | None = None,
    colours: Sequence[str] | None = None,
) -> Scene:
    """A random scene; ``shapes``/``colours`` fix the objects' attributes when given."""
    n = n_objects if n_objects is not None else rng.choice((1, 2))
    while True:
        sizes = [rng.choice(list(SIZES)) for _ in range(n)]
        centres = _place(rng, sizes)
        if centres is not None:
            break
    objs = tuple(
        ShapeObject(
            shape=shapes[i] if shapes else rng.choice(SHAPES),
            colour=colours[i] if colours else rng.choice(list(COLOURS)),
            size=sizes[i],
            cx=round(cx, 4),
            cy=round(cy, 4),
        )
        for i, (cx, cy) in enumerate(centres)
    )
    return Scene(objs, rng.choice(list(BACKGROUNDS)))


# ----------------------------------------------------------------------------------------------------
# Splits and probes
# ----------------------------------------------------------------------------------------------------


class _Renderer:
    """Renders scenes to PNG bytes and refuses any image already used by an earlier record."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.seen: set[bytes] = set()

    def new(self, scene: Scene) -> bytes | None:
        img = render_scene(scene, self.image_size)
        key = hashlib.blake2b(img.tobytes(), digest_size=16).digest()
        if key in self.seen:
            return None
        self.seen.add(key)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


def _image(png: bytes) -> dict:
    return {"bytes": png, "path": None}


def _caption_split(name: str, n: int, rng: random.Random, render: _Renderer, k_refs: int) -> dict[str, list]:
    rows: dict[str, list] = {"id": [], "image": [], "caption": [], "references": [], "objects": []}
    while len(rows["id"]) < n:
        scene = random_scene(rng)
        png = render.new(scene)
        if png is None:
            continue
        refs = captions(scene, rng, k_refs)
        rows["id"].append(f"{name}-{len(rows['id']):06d}")
        rows["image"].append(_image(png))
        rows["caption"].append(refs[0])
        rows["references"].append(refs)
        rows["objects"].append([o.record() for o in scene.objects])
    return rows


def _instruct_split(n: int, rng: random.Random, render: _Renderer) -> dict[str, list]:
    rows: dict[str, list] = {"id": [], "image": [], "conversations": []}
    while len(rows["id"]) < n:
        scene = random_scene(rng)
        png = render.new(scene)
        if png is None:
            continue
        rows["id"].append(f"instruct-{len(rows['id']):06d}")
        rows["image"].append(_image(png))
        rows["conversations"].append(conversation(scene, rng))
    return rows


def _concept_probe(n: int, rng: random.Random, render: _Renderer) -> dict[str, list]:
    """8 concepts × n single-object images (random colour, size, position, background)."""
    rows: dict[str, list] = {"id": [], "image": [], "caption": [], "concept": []}
    for shape in SHAPES:
        i = 0
        while i < n:
            scene = random_scene(rng, 1, shapes=[shape])
            png = render.new(scene)
            if png is None:
                continue
            rows["id"].append(f"concept-{shape}-{i:04d}")
            rows["image"].append(_image(png))
            rows["caption"].append(apply_template(rng.choice(_SINGLE), scene))
            rows["concept"].append(shape)
            i += 1
    return rows


def _compositional_probe(n_pairs: int, rng: random.Random, render: _Renderer) -> dict[str, list]:
    """Colour pairs ("single": same object, only the colour differs) and swap pairs ("swap": two objects
    whose colours are exchanged, same shapes, sizes, positions and background). Both members of a pair
    share a caption template, so their captions also differ only in the colour words."""
    rows: dict[str, list] = {k: [] for k in ("id", "image", "caption", "compound", "kind", "pair")}

    def add(pair: str, kind: str, members: list[tuple[Scene, bytes]], template: Template) -> None:
        for tag, (scene, png) in zip("ab", members):
            rows["id"].append(f"{pair}-{tag}")
            rows["image"].append(_image(png))
            rows["caption"].append(apply_template(template, scene))
            rows["compound"].append("+".join(f"{o.colour}_{o.shape}" for o in scene.objects))
            rows["kind"].append(kind)
            rows["pair"].append(pair)

    for p in range(n_pairs):  # colour pairs: cycle through the shapes so each concept is covered
        shape = SHAPES[p % len(SHAPES)]
        while True:
            c1, c2 = rng.sample(list(COLOURS), 2)
            a = random_scene(rng, 1, shapes=[shape], colours=[c1])
            b = Scene(
                (ShapeObject(shape, c2, a.objects[0].size, a.objects[0].cx, a.objects[0].cy),), a.background
            )
            pa, pb = render.new(a), render.new(b)
            if pa and pb:
                break
        add(f"single-{p:04d}", "single", [(a, pa), (b, pb)], rng.choice(_SINGLE))

    for p in range(n_pairs):  # swap pairs: two different shapes, two different colours, colours swapped
        while True:
            s1, s2 = rng.sample(SHAPES, 2)
            c1, c2 = rng.sample(list(COLOURS), 2)
            a = random_scene(rng, 2, shapes=[s1, s2], colours=[c1, c2])
            o1, o2 = a.objects
            b = Scene(
                (ShapeObject(s1, c2, o1.size, o1.cx, o1.cy), ShapeObject(s2, c1, o2.size, o2.cx, o2.cy)),
                a.background,
            )
            pa, pb = render.new(a), render.new(b)
            if pa and pb:
                break
        add(f"swap-{p:04d}", "swap", [(a, pa), (b, pb)], rng.choice(_PAIR))
    return rows


def _features():
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    s = Value("string")
    caption = Features(
        {
            "id": s,
            "image": ImageFeature(),
            "caption": s,
            "references": List(s),
            "objects": List({"shape": s, "colour": s, "size": s}),
        }
    )
    instruct = Features({"id": s, "image": ImageFeature(), "conversations": List({"from": s, "value": s})})
    concept = Features({"id": s, "image": ImageFeature(), "caption": s, "concept": s})
    compositional = Features(
        {"id": s, "image": ImageFeature(), "caption": s, "compound": s, "kind": s, "pair": s}
    )
    return caption, instruct, concept, compositional


#: Default sizes: a useful tiny training run on a 2-core CPU, generated in a few seconds.
DEFAULT_SIZES = {
    "n_train": 4000,
    "n_val": 500,
    "n_test": 500,
    "n_instruct": 1500,
    "n_probe": 50,
    "n_compositional": 50,
}


def generate_shapes(
    *,
    seed: int = 0,
    image_size: int = 64,
    n_train: int = DEFAULT_SIZES["n_train"],
    n_val: int = DEFAULT_SIZES["n_val"],
    n_test: int = DEFAULT_SIZES["n_test"],
    n_instruct: int = DEFAULT_SIZES["n_instruct"],
    n_probe: int = DEFAULT_SIZES["n_probe"],
    n_compositional: int = DEFAULT_SIZES["n_compositional"],
    n_references: int = 5,
):
    """Generate every Shapes split in memory (no cache); see :func:`build_shapes` for the arguments."""
    from datasets import Dataset, DatasetDict

    if n_references < 3:
        raise ValueError("n_references must be at least 3 (CIDEr-style evaluation needs several references)")
    caption_f, instruct_f, concept_f, compositional_f = _features()
    render = _Renderer(image_size)

    def stream(split: str) -> random.Random:
        return random.Random(f"moe-vlm-shapes/{seed}/{split}")

    # Fixed order: the probes and the evaluation splits do not depend on the training sizes.
    concept = _concept_probe(n_probe, stream("concept_probe"), render)
    compositional = _compositional_probe(n_compositional, stream("compositional_probe"), render)
    test = _caption_split("test", n_test, stream("test"), render, n_references)
    val = _caption_split("validation", n_val, stream("validation"), render, n_references)
    train = _caption_split("train", n_train, stream("train"), render, n_references)
    instruct = _instruct_split(n_instruct, stream("instruct"), render)
    return DatasetDict(
        {
            "train": Dataset.from_dict(train, features=caption_f),
            "validation": Dataset.from_dict(val, features=caption_f),
            "test": Dataset.from_dict(test, features=caption_f),
            "instruct": Dataset.from_dict(instruct, features=instruct_f),
            "concept_probe": Dataset.from_dict(concept, features=concept_f),
            "compositional_probe": Dataset.from_dict(compositional, features=compositional_f),
        }
    )


# ----------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------

MARKER = "shapes_complete.json"


def _cache_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _remove_stale(path: Path) -> None:
    """Remove an incomplete or outdated cache, but never a folder that is not one of ours."""
    if not path.exists():
        return
    ours = (path / MARKER).exists() or (path / "dataset_dict.json").exists() or not any(path.iterdir())
    if not ours:
        raise ValueError(f"{path} exists and is not a Shapes cache; choose another out_dir")
    shutil.rmtree(path)


def build_shapes(
    out_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    image_size: int = 64,
    n_train: int = DEFAULT_SIZES["n_train"],
    n_val: int = DEFAULT_SIZES["n_val"],
    n_test: int = DEFAULT_SIZES["n_test"],
    n_instruct: int = DEFAULT_SIZES["n_instruct"],
    n_probe: int = DEFAULT_SIZES["n_probe"],
    n_compositional: int = DEFAULT_SIZES["n_compositional"],
    n_references: int = 5,
    force: bool = False,
):
    """Return the Shapes ``DatasetDict``, generating it once and reloading it from disk afterwards.

    Splits: ``train``/``validation``/``test`` (captions, ``n_references`` references each),
    ``instruct`` (LLaVA-format conversations), ``concept_probe`` (``len(SHAPES)`` × ``n_probe``) and
    ``compositional_probe`` (``n_compositional`` colour pairs + ``n_compositional`` swap pairs).
    No image appears twice across all of them.

    ``out_dir`` defaults to ``configuration.contract.cache_root() / "shapes-<hash of the arguments>"``. The data are
    written to a temporary sibling, moved into place, and the completion marker is written last: a
    folder without the marker (an interrupted run) or with other arguments is regenerated. ``force``
    regenerates anyway.
    """
    from datasets import load_from_disk

    params = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "n_instruct": n_instruct,
        "n_probe": n_probe,
        "n_compositional": n_compositional,
        "n_references": n_references,
    }
    path = Path(out_dir) if out_dir is not None else cache_root() / f"shapes-{_cache_key(params)}"
    marker = _read_marker(path)
    if not force and marker is not None and marker.get("params") == params:
        logger.info("Shapes: reusing %s", path)
        return load_from_disk(str(path))
    if path.exists():
        logger.info("Shapes: %s is incomplete or was built with other arguments; regenerating", path)

    t0 = time.perf_counter()
    data = generate_shapes(**{k: v for k, v in params.items() if k != "version"})
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    data.save_to_disk(str(tmp))
    done = _read_marker(path)
    if not force and done is not None and done.get("params") == params:
        # Another process (e.g. another rank) finished the same cache meanwhile: use it, keep it intact.
        shutil.rmtree(tmp, ignore_errors=True)
        return load_from_disk(str(path))
    _remove_stale(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
    seconds = time.perf_counter() - t0
    counts = {k: len(v) for k, v in data.items()}
    (path / MARKER).write_text(
        json.dumps({"params": params, "counts": counts, "seconds": round(seconds, 2)}, indent=1)
    )
    logger.info("Shapes: generated %s in %.1f s at %s", counts, seconds, path)
    return load_from_disk(str(path))


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DEFAULT_SIZES",
    "SHAPES",
    "SIZES",
    "Scene",
    "ShapeObject",
    "build_shapes",
    "caption_templates",
    "captions",
    "concept_caption",
    "conversation",
    "describe",
    "generate_shapes",
    "random_scene",
    "render_scene",
    "shape_template",
]
