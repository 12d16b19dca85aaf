"""Presets (tiny, paper), stage recipes, accelerate launch configs, and the helpers that turn them into models.

Names load lazily (PEP 562) so that the `moe-vlm` parser does not import transformers before a command runs."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "PRESETS": "presets",
    "load_preset": "presets",
    "build_processor": "tokenizer",
    "mistral_tokenizer": "tokenizer",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'configuration' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
