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
from .shifted import (
    SHIFTED_BACKGROUNDS,
    SHIFTED_COLOURS,
    SHIFTED_SIZES,
    build_shifted_shapes,
    generate_shifted_shapes,
    shifted_world,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DEFAULT_COCO_CONCEPTS",
    "DEFAULT_SIZES",
    "IGNORE_INDEX",
    "SHAPES",
    "SHIFTED_BACKGROUNDS",
    "SHIFTED_COLOURS",
    "SHIFTED_SIZES",
    "SIZES",
    "DataError",
    "EncodedSample",
    "LoadStats",
    "MoeVlmCollator",
    "build_shapes",
    "build_shifted_shapes",
    "check_conversation",
    "check_image",
    "generate_shapes",
    "generate_shifted_shapes",
    "load_coco_karpathy",
    "load_image",
    "load_llava_instruct",
    "render_scene",
    "sample_coco_concepts",
    "shape_template",
    "shifted_world",
    "to_rgb",
]
