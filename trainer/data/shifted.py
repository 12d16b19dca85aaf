"""A shifted Shapes world: the same vocabulary, rendered outside the training ranges (transfer ablation).

The ablation "routing learned on Shapes, measured on a shifted Shapes world" needs probe and test splits
whose *pixels* leave the training distribution while their *words* stay inside it: the analysis scores
captions against references, and the concept probe, the compositional probe and grounding compare colour,
shape and size names with the training vocabulary (``COLOURS``/``SHAPES``/``SIZES`` keys). So every table
below keeps the training key set and order, and moves only the values:

* :data:`SHIFTED_COLOURS`: each colour name is drawn as a dark, deep variant of its own hue (maroon for
  red, burnt orange, olive, forest green, teal, navy, plum, raspberry). Every value is at least 75 away
  in RGB from every training colour, so no training colour's pixels appear in the images (a lighter
  variant cannot get far enough from the bright training colours without running into the white
  background), yet each keeps its name's hue: its hue angle is nearest to that of the same-named training
  colour, so "red" still means the reddest object in the image.
* :data:`SHIFTED_BACKGROUNDS`: the training backgrounds are exact neutrals (R = G = B); the shifted ones
  are tinted (ivory, steel blue, brown-grey, blue-black: chroma 50–65) at about the same brightness, so
  "white", "light grey", "dark grey" and "black" keep their order of brightness and remain the nearest
  words for them. A background named "white" or "black" cannot move far from white or black and keep its
  name, so these sit 37–47 from their training values; every shifted colour stays at least 70 away from
  every shifted background, so objects remain clearly visible.
* :data:`SHIFTED_SIZES`: half-extents (fractions of the image side, like ``SIZES``) all outside the
  training range [0.14, 0.235], keeping the order small < medium < large: 0.09 and 0.115 (smaller than
  any training object) and 0.27 (larger than any). Two large objects cannot both fit at this size
  (:func:`trainer.data.shapes._place` needs 2.3 × 0.27 + 0.03 between centres), so ``random_scene``
  redraws the sizes of such a pair: two-object scenes pair a large object only with a small or medium
  one. Every other pair places within a few tries, so ``random_scene`` always terminates.

:func:`shifted_world` swaps these tables into :mod:`trainer.data.shapes` in place, so the unchanged
generator (:func:`~trainer.data.shapes.generate_shapes`) renders the shifted world;
:func:`build_shifted_shapes` caches the result on disk in the format that ``build_shapes`` writes, so
``analyze(model_dir, out_dir, data_dir=build_shifted_shapes())`` reads it like the training world.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from configuration.contract import cache_root

from . import shapes
from .errors import logger

#: Colour names of the training world, each drawn as a dark variant of its hue (see the module docstring).
SHIFTED_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (130, 0, 0),
    "orange": (170, 80, 0),
    "yellow": (160, 150, 0),
    "green": (0, 100, 20),
    "cyan": (0, 120, 130),
    "blue": (0, 20, 120),
    "purple": (80, 0, 110),
    "pink": (200, 60, 120),
}

#: Background names of the training world, tinted instead of neutral, brightness order kept.
SHIFTED_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 240, 200),
    "light grey": (150, 185, 215),
    "dark grey": (100, 70, 45),
    "black": (0, 30, 50),
}

#: Size names of the training world, with half-extents outside the training range [0.14, 0.235].
SHIFTED_SIZES: dict[str, float] = {"small": 0.09, "medium": 0.115, "large": 0.27}

# Bump when the shifted world's output changes for the same arguments: it is part of the cache key
# (with the Shapes generator's own version and the three tables).
SHIFTED_VERSION = 1

_TABLES = (
    (shapes.COLOURS, SHIFTED_COLOURS),
    (shapes.BACKGROUNDS, SHIFTED_BACKGROUNDS),
    (shapes.SIZES, SHIFTED_SIZES),
)


@contextmanager
def shifted_world() -> Iterator[None]:
    """Within the block, ``shapes.COLOURS``/``BACKGROUNDS``/``SIZES`` hold the shifted tables.

    The dicts are changed in place (``clear`` + ``update``), not rebound, so every module that imported
    them (``from .shapes import COLOURS``) sees the shifted values too; on exit, exception or not, each
    gets back its exact previous contents and key order. This changes process-wide state: do not render
    training-world images from another thread while a block is open.
    """
    saved = [dict(table) for table, _ in _TABLES]
    try:
        for table, shifted in _TABLES:
            table.clear()
            table.update(shifted)
        yield
    finally:
        for (table, _), old in zip(_TABLES, saved):
            table.clear()
            table.update(old)


def shifted_seed(seed: int) -> int:
    """The seed handed to ``generate_shapes`` for the shifted world of ``seed``.

    ``generate_shapes`` draws each split from ``random.Random(f"moe-vlm-shapes/{seed}/{split}")``, so the
    shifted world gets its own namespace by a stable 63-bit hash of ``"moe-vlm-shifted/{seed}"``: its
    scenes are not the training world's scenes re-coloured, and the same ``seed`` always gives the
    same shifted data (unlike ``hash()``, independent of the process).
    """
    digest = hashlib.sha256(f"moe-vlm-shifted/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def generate_shifted_shapes(
    seed: int = 0, image_size: int = 64, n_test: int = 200, n_probe: int = 25, n_compositional: int = 25
):
    """Generate the shifted world's splits in memory (no cache); see :func:`build_shifted_shapes`.

    The same ``DatasetDict`` as ``generate_shapes`` (every split, same features), rendered inside
    :func:`shifted_world` from the seed :func:`shifted_seed` derives. Only what a trained model is
    measured on is generated: ``train``, ``validation`` and ``instruct`` are present but empty.
    """
    with shifted_world():
        return shapes.generate_shapes(
            seed=shifted_seed(seed),
            image_size=image_size,
            n_train=0,
            n_val=0,
            n_test=n_test,
            n_instruct=0,
            n_probe=n_probe,
            n_compositional=n_compositional,
        )


def _params(seed: int, image_size: int, n_test: int, n_probe: int, n_compositional: int) -> dict:
    """The cache key's inputs, in JSON form (lists, not tuples) so they compare equal to a marker's."""
    params = {
        "world": "shifted",
        "version": SHIFTED_VERSION,
        "generator_version": shapes.GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "n_test": n_test,
        "n_probe": n_probe,
        "n_compositional": n_compositional,
        "colours": SHIFTED_COLOURS,
        "backgrounds": SHIFTED_BACKGROUNDS,
        "sizes": SHIFTED_SIZES,
    }
    return json.loads(json.dumps(params))


def build_shifted_shapes(
    seed: int = 0,
    image_size: int = 64,
    n_test: int = 200,
    n_probe: int = 25,
    n_compositional: int = 25,
    root: str | os.PathLike | None = None,
) -> Path:
    """The folder of the shifted world's ``DatasetDict`` (``save_to_disk`` format), generated once.

    Splits as ``build_shapes`` writes them: ``test`` (``n_test`` captioned images), ``concept_probe``
    (``len(SHAPES)`` × ``n_probe``), ``compositional_probe`` (``n_compositional`` colour pairs +
    ``n_compositional`` swap pairs), and empty ``train``/``validation``/``instruct``; load it with
    ``datasets.load_from_disk`` or pass it as ``analyze(..., data_dir=...)``.

    The folder is ``(root or cache_root()) / "shapes-shifted-<key>"``, the key hashing the arguments, the
    shifted tables and both generator versions, so a change to any of them builds a new folder. Like
    ``build_shapes`` it carries ``shapes.MARKER`` with the arguments; a folder without a matching marker
    is regenerated. The data and the marker are written to a temporary sibling that is then renamed into
    place, so the folder, once there, is complete.
    """
    params = _params(seed, image_size, n_test, n_probe, n_compositional)
    base = Path(root) if root is not None else cache_root()
    path = base / f"shapes-shifted-{shapes._cache_key(params)}"

    def done() -> bool:
        marker = shapes._read_marker(path)
        return marker is not None and marker.get("params") == params

    if done():
        logger.info("Shifted Shapes: reusing %s", path)
        return path
    if path.exists():
        logger.info("Shifted Shapes: %s is incomplete or was built with other arguments; regenerating", path)

    t0 = time.perf_counter()
    data = generate_shifted_shapes(
        seed=seed, image_size=image_size, n_test=n_test, n_probe=n_probe, n_compositional=n_compositional
    )
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # One shard per split: `save_to_disk` writes an empty split (train, validation, instruct) as zero
    # shards by default, which `load_from_disk` then fails to read; one empty shard reads back as 0 rows.
    data.save_to_disk(str(tmp), num_shards={split: 1 for split in data})
    counts = {k: len(v) for k, v in data.items()}
    seconds = round(time.perf_counter() - t0, 2)
    (tmp / shapes.MARKER).write_text(
        json.dumps({"params": params, "counts": counts, "seconds": seconds}, indent=1)
    )
    if done():  # another process (e.g. another rank) finished the same folder meanwhile: keep it intact
        shutil.rmtree(tmp, ignore_errors=True)
        return path
    shapes._remove_stale(path)
    try:
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if done():  # lost a race to another process that renamed its copy first
            return path
        raise
    logger.info("Shifted Shapes: generated %s in %.1f s at %s", counts, seconds, path)
    return path


__all__ = [
    "SHIFTED_BACKGROUNDS",
    "SHIFTED_COLOURS",
    "SHIFTED_SIZES",
    "build_shifted_shapes",
    "generate_shifted_shapes",
    "shifted_seed",
    "shifted_world",
]
