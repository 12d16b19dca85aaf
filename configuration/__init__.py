"""Presets (tiny, paper), stage recipes, accelerate launch configs, and the helpers that turn them into models."""

from .presets import PRESETS, load_preset
from .tokenizer import build_processor, mistral_tokenizer

__all__ = ["PRESETS", "build_processor", "load_preset", "mistral_tokenizer"]
