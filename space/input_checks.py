"""Checks of what a person gives the Space: an image file and a prompt. Each failure is an `InputError` whose
message says what was wrong and what to do; the app shows it in the UI (never a stack trace).

Pure Python + PIL, no Gradio, so the rules are testable on their own.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# Refuse above this many pixels: decoding a 100-MP image takes seconds and gigabytes for a model that looks at
# 64 × 64 (tiny) or 224 × 224 (paper) pixels.
MAX_PIXELS = 40_000_000
# Downscale to this longest side before the processor: its bicubic resize of a huge image is slow, and nothing
# above the vision tower's resolution survives it anyway.
MAX_SIDE = 1024
MAX_PROMPT_CHARS = 2000
# Refuse uploads above this many bytes (Gradio's `launch(max_file_size=...)`: the server stops reading the request
# there, answering 413; gradio_client and the page refuse a larger file before sending it). A 40-MP JPEG photo is
# 10-20 MB; anything larger is a file far beyond what the model looks at, or not an image at all.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
IMAGE_MARKER = "<image>"


class InputError(ValueError):
    """Bad input a person can fix; the message is shown as is."""


def megapixels(width: int, height: int) -> str:
    return f"{width}×{height} px ({width * height / 1e6:.1f} MP)"


def load_image(
    path: str | Path | None, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE
) -> tuple[Image.Image, str]:
    """Open an uploaded file as an RGB image no larger than `max_side`; returns `(image, note)` where `note` says
    what was changed ('' when nothing was).

    Raises `InputError` for no file, a file that is not an image, and an image above `max_pixels`.
    """
    if path is None or str(path) == "":
        raise InputError("No image: upload one (or pick an example below) before pressing Run.")
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            # PIL warns (and above twice its limit refuses) on huge images; the size check below says it better.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)  # reads the header only: the size is known before any pixel is decoded
    except Image.DecompressionBombError:
        raise InputError(
            f"{name} is far too large to decode; images up to {max_pixels / 1e6:.0f} MP are accepted"
        ) from None
    except (UnidentifiedImageError, OSError):
        raise InputError(
            f"{name} is not an image this app can read; upload a PNG, JPEG, WebP, GIF or BMP file"
        ) from None
    with opened:
        width, height = opened.size
        if width * height > max_pixels:
            raise InputError(
                f"The image is {megapixels(width, height)}; images up to {max_pixels / 1e6:.0f} MP are accepted. "
                "Downscale it and upload it again."
            )
        opened.draft(
            "RGB", (max_side, max_side)
        )  # JPEG: decode at a reduced scale directly (no-op otherwise)
        try:
            image = opened.convert("RGB")
        except (OSError, SyntaxError, ValueError):  # a truncated or corrupt file fails only when decoded
            raise InputError(f"{name} could not be decoded (a truncated or corrupt image?)") from None
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if image.size == (width, height):
        return image, ""
    return (
        image,
        f"The image was downscaled from {megapixels(width, height)} to {image.width}×{image.height} px.",
    )


def check_prompt(prompt: str | None) -> str:
    """The prompt as the model's text: stripped, with the image marker in front unless the person placed it.

    Raises `InputError` for an empty or overlong prompt and for more than one image marker (one image is given).
    """
    text = (prompt or "").strip()
    if not text:
        raise InputError("The prompt is empty: type a question or an instruction about the image.")
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(f"The prompt is {len(text)} characters long; keep it under {MAX_PROMPT_CHARS}.")
    markers = text.count(IMAGE_MARKER)
    if markers > 1:
        raise InputError(
            f"The prompt has {markers} '{IMAGE_MARKER}' markers but there is one image; keep at most one."
        )
    return text if markers else f"{IMAGE_MARKER}\n{text}"


__all__ = [
    "MAX_PIXELS",
    "MAX_PROMPT_CHARS",
    "MAX_SIDE",
    "MAX_UPLOAD_BYTES",
    "InputError",
    "check_prompt",
    "load_image",
]
