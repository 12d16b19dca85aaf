"""Shared image loading and validation for every data source.

One place decides what counts as a usable image so that Shapes, COCO, LLaVA-Instruct and the collator
agree: a missing or undecodable file is a :class:`DataError` naming the record, and any non-RGB mode
(grayscale ``L``, ``LA``, ``RGBA``, ``CMYK``, palette ``P``, 16-bit ``I;16``...) is converted to RGB
with a logged note, transparent pixels composited onto white (dropping alpha would turn them black).

Sizes are checked from the header, before any pixel is decoded: an image above :data:`MAX_IMAGE_PIXELS`
(a decompression bomb: a few kB of PNG can claim 20000 x 20000 pixels, 1.2 GB once decoded) or with a
side under :data:`MIN_IMAGE_SIDE` (a 1 x 1 placeholder or tracking pixel: it decodes, but the processor
would stretch one colour over the whole crop, an image that says nothing about its caption) is a
:class:`DataError`, and so is an empty (zero-byte) file.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from typing import Literal

import numpy as np
from PIL import Image

from .errors import DataError, logger

Verify = Literal["none", "exists", "open", "full"]
VERIFY_LEVELS: tuple[str, ...] = ("none", "exists", "open", "full")

#: Largest image accepted, in pixels (width x height): 40 MP, like the Space's upload limit, far above any
#: COCO photo (640 x 480) and below PIL's own 89 MP warning, so PIL never has to warn about an image we keep.
MAX_IMAGE_PIXELS = 40_000_000
#: Smallest side accepted, in pixels: a 1 x 1 or 4 x 4 "image" carries no content a caption can describe.
MIN_IMAGE_SIDE = 8


def check_verify(verify: str) -> None:
    """Reject an unknown verification level early (a typo must not silently mean "check nothing")."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_LEVELS)}, got {verify!r}")


def _check_size(img: Image.Image, record_id: object, where: str) -> None:
    """Refuse a decompression bomb or a degenerate image from its header size (nothing decoded yet)."""
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            record_id,
            f"image too large: {width} x {height} pixels ({where}), above MAX_IMAGE_PIXELS = "
            f"{MAX_IMAGE_PIXELS:,} (a decompression bomb, or a scan to downscale first)",
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise DataError(
            record_id,
            f"image too small: {width} x {height} pixels ({where}); each side needs at least "
            f"MIN_IMAGE_SIDE = {MIN_IMAGE_SIDE} (a placeholder, not a picture); replace the file",
        )


def _open_header(fp, record_id: object, where: str) -> Image.Image:
    """``Image.open`` (header only) with every failure as a DataError, size checked."""
    try:
        with warnings.catch_warnings():
            # Our own cap is stricter than PIL's warning threshold: the size check below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as e:  # PIL's hard limit (2 x its warning threshold) fired first
        raise DataError(
            record_id, f"image too large: {where} ({e}); above MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS:,}"
        ) from e
    # UnidentifiedImageError, OSError, and the plugins' own errors (SyntaxError, struct.error, ValueError...)
    except Exception as e:
        raise DataError(record_id, f"corrupt image: cannot decode {where} ({e}); replace the file") from e
    try:
        _check_size(img, record_id, where)
    except DataError:
        img.close()  # the file PIL opened for the header
        raise
    return img


def _open(source: object, record_id: object) -> tuple[Image.Image, str]:
    """Open a path, raw bytes, a datasets ``{"bytes", "path"}`` dict or a PIL image (not yet decoded).

    Returns the image and how to name it in messages (the path, or ``"the image bytes"``); the header
    size is already checked (:func:`_check_size`)."""
    if isinstance(source, Image.Image):
        _check_size(source, record_id, "the image")
        return source, "the image"
    if isinstance(source, Mapping):  # datasets' Image(decode=False) form
        if source.get("bytes") is not None:
            source = source["bytes"]
        elif source.get("path"):
            source = source["path"]
        else:
            raise DataError(record_id, "image missing: the image entry has neither bytes nor a path")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise DataError(record_id, "empty image: the image bytes are empty (0 bytes); replace the image")
        return _open_header(io.BytesIO(source), record_id, "the image bytes"), "the image bytes"
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise DataError(record_id, f"image file not found: {path} (check image_root and the file name)")
        if os.path.getsize(path) == 0:
            raise DataError(
                record_id, f"empty image: {path} is 0 bytes (an interrupted copy?); replace the file"
            )
        return _open_header(path, record_id, path), path
    raise DataError(
        record_id, f"bad image value: expected a path, bytes or PIL image, got {type(source).__name__}"
    )


def check_image(source: object, record_id: object, verify: Verify = "open") -> str:
    """Validate an image without keeping it; returns its PIL mode (``""`` when not opened).

    ``verify``: ``"none"`` checks nothing, ``"exists"`` only that a file is there, ``"open"`` parses the
    header and runs PIL's ``verify()`` (cheap; catches garbage and broken PNGs), ``"full"`` decodes every
    pixel (also catches truncated JPEGs; costs a few ms per image).
    """
    if verify == "none":
        return ""
    if verify == "exists":
        if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
            raise DataError(
                record_id, f"image file not found: {os.fspath(source)} (check image_root and the file name)"
            )
        return ""
    img, where = _open(source, record_id)
    mode = img.mode
    if isinstance(source, Image.Image):
        return mode  # already decoded by the caller
    try:
        if verify == "full":
            img.load()
        else:
            img.verify()  # invalidates the object; it is only a check
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, struct.error...)
        raise DataError(record_id, f"corrupt image: cannot decode {where} ({e}); replace the file") from e
    finally:
        img.close()
    return mode


def to_rgb(img: Image.Image, record_id: object = None) -> Image.Image:
    """Return an RGB copy of ``img``; modes other than RGB are converted with a logged note."""
    if img.mode == "RGB":
        return img
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grayscale: PIL's convert("L") clips instead of scaling; scale to 0..255 ourselves.
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        arr = arr * (255.0 / hi) if hi > 255 else arr
        out = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L").convert("RGB")
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
    else:  # L, 1, P, CMYK, YCbCr, LAB, HSV
        try:
            out = img.convert("RGB")
        except (ValueError, OSError) as e:  # a mode PIL cannot convert to RGB
            raise DataError(
                record_id, f"unsupported image mode: cannot convert {mode} to RGB ({e}); save it as RGB"
            ) from e
    logger.info("record %s: converted %s image to RGB", record_id, mode)
    return out


def load_image(source: object, record_id: object) -> Image.Image:
    """Open, fully decode and convert to RGB; any failure is a DataError naming the record."""
    img, where = _open(source, record_id)
    try:
        img.load()
    except Exception as e:  # truncated data, bad checksums, PIL plugin errors of any type
        img.close()
        raise DataError(record_id, f"corrupt image: cannot decode {where} ({e}); replace the file") from e
    return to_rgb(img, record_id)


__all__ = [
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIDE",
    "VERIFY_LEVELS",
    "Verify",
    "check_image",
    "check_verify",
    "load_image",
    "to_rgb",
]
