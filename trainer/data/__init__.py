"""Data for moe-vlm: the Shapes world (the embedded default), COCO and LLaVA-Instruct loaders, the collator.

Every source yields ``datasets.Dataset`` splits in two shared schemas (caption and LLaVA ``instruct``)
plus the probe schemas, and :class:`MoeVlmCollator` turns records of either schema into model batches.
"""

from .coco import DEFAULT_COCO_CONCEPTS, load_coco_karpathy, sample_coco_concepts
from .collator import IGNORE_INDEX, EncodedSample, MoeVlmCollator
from .errors import DataError, LoadStats
from .images import check_image, load_image, to_rgb
from .llava import check_conversation, load_llava_instruct
from .shapes import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_SIZES,
    SHAPES,
    SIZES,
    build_shapes,
    generate_shapes,
    render_scene,
    shape_template,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DEFAULT_COCO_CONCEPTS",
    "DEFAULT_SIZES",
    "IGNORE_INDEX",
    "SHAPES",
    "SIZES",
    "DataError",
    "EncodedSample",
    "LoadStats",
    "MoeVlmCollator",
    "build_shapes",
    "check_conversation",
    "check_image",
    "generate_shapes",
    "load_coco_karpathy",
    "load_image",
    "load_llava_instruct",
    "render_scene",
    "sample_coco_concepts",
    "shape_template",
    "to_rgb",
]
