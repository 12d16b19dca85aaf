"""Example inputs: a few Shapes-world images (the world the tiny models are trained on) with a prompt each.

The PNGs live in `space/examples/` so a Hub Space has them without the project installed. When one is missing
(a fresh checkout before they were rendered) it is drawn with the project's own renderer,
`trainer.data.shapes.render_scene`, imported lazily; without that package the missing examples are left out.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
IMAGE_SIZE = 192  # big enough to look at in the UI; the processor resizes to the tower's resolution anyway

# file name -> (background, objects as (shape, colour, size, cx, cy), prompt)
EXAMPLES: dict[str, tuple[str, tuple[tuple[str, str, str, float, float], ...], str]] = {
    "red_circle.png": ("white", (("circle", "red", "large", 0.5, 0.5),), "Describe the image."),
    "blue_square_yellow_triangle.png": (
        "light grey",
        (("square", "blue", "medium", 0.3, 0.35), ("triangle", "yellow", "medium", 0.7, 0.65)),
        "What colour is the triangle?",
    ),
    "green_star.png": ("black", (("star", "green", "large", 0.5, 0.5),), "What shape is in the picture?"),
    "pink_heart_cyan_diamond.png": (
        "dark grey",
        (("heart", "pink", "small", 0.25, 0.7), ("diamond", "cyan", "large", 0.65, 0.3)),
        "How many objects are there?",
    ),
}


def render_example(name: str, directory: Path) -> Path:
    """Draw example `name` into `directory` with the Shapes renderer (ImportError outside the repository)."""
    from trainer.data.shapes import Scene, ShapeObject, render_scene

    background, objects, _ = EXAMPLES[name]
    scene = Scene(tuple(ShapeObject(*spec) for spec in objects), background)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    render_scene(scene, IMAGE_SIZE).save(path)
    return path


def example_inputs(directory: Path = EXAMPLES_DIR) -> list[list[str]]:
    """`[[image_path, prompt], ...]` for `gr.Examples`, rendering missing images when the renderer is available
    (into a temporary directory when `directory` is read-only, as in an installed package)."""
    rows = []
    for name, (_, _, prompt) in EXAMPLES.items():
        path = directory / name
        if not path.is_file():
            try:
                path = render_example(name, directory)
            except ImportError:
                continue
            except OSError:
                path = render_example(name, Path(tempfile.gettempdir()) / "moe-vlm-space-examples")
        rows.append([str(path), prompt])
    return rows


__all__ = ["EXAMPLES", "EXAMPLES_DIR", "example_inputs", "render_example"]
