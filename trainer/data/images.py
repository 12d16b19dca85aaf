"""Shared image loading and validation for every data source.

One place decides what counts as a usable image so that Shapes, COCO, LLaVA-Instruct and the collator
agree: a missing or undecodable file is a :class:`DataError` naming the record, and any non-RGB mode
(grayscale ``L``, ``LA``, ``RGBA``, ``CMYK``, palette ``P``, 16-bit ``I;16``...) is converted to RGB
with a logged note, transparent pixels composited onto white (dropping alpha would turn them black).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError, logger

Verify = Literal["none", "exists", "open", "full"]


def _open(source: object, record_id: object) -> Image.Image:
    """Open a path, raw bytes, a datasets ``{"bytes", "path"}`` dict or a PIL image (not yet decoded)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, Mapping):  # datasets' Image(decode=False) form
        if source.get("bytes") is not None:
            source = source["bytes"]
        elif source.get("path"):
            source = source["path"]
        else:
            raise DataError(record_id, "image missing: the image entry has neither bytes nor a path")
    if isinstance(source, (bytes, bytearray)):
        try:
            return Image.open(io.BytesIO(source))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(record_id, f"corrupt image: the image bytes cannot be decoded ({e})") from e
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise DataError(record_id, f"image file not found: {path} (check image_root and the file name)")
        try:
            return Image.open(path)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(record_id, f"corrupt image: cannot decode {path} ({e}); replace the file") from e
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
    if isinstance(source, Image.Image):
        return source.mode  # already decoded by the caller
    where = source if isinstance(source, (str, os.PathLike)) else "bytes"
    img = _open(source, record_id)
    mode = img.mode
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
        out = img.convert("RGB")
    logger.info("record %s: converted %s image to RGB", record_id, mode)
    return out


def load_image(source: object, record_id: object) -> Image.Image:
    """Open, fully decode and convert to RGB; any failure is a DataError naming the record."""
    img = _open(source, record_id)
    try:
        img.load()
    except Exception as e:
        raise DataError(record_id, f"corrupt image: cannot decode it ({e}); replace the file") from e
    return to_rgb(img, record_id)


__all__ = ["Verify", "check_image", "load_image", "to_rgb"]
