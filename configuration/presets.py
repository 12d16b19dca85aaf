"""Model presets: `tiny` (the embedded default, CPU-trainable) and `paper` (Mistral-7B-v0.3 + ViT-L/14)."""

from __future__ import annotations

from pathlib import Path

import yaml

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS = tuple(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))


def load_preset(name: str) -> dict:
    """The preset as a dict: `mistral_config` (dense Mistral fields), `moe_vlm` (MoE/vision fields), and for
    real-weight presets the default `mistral` checkpoint and `vision` open_clip `NAME:TAG`."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    return yaml.safe_load(path.read_text())
