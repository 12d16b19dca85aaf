"""The stage-directory contract: the names every package agrees on, in one dependency-free module.

A stage's output directory holds a `save_pretrained` model, the resolved recipe, the routing log its Trainer
appended, and the completion marker, written last; analyses write their JSON beside their figures; `publish` condenses
the routing log into a summary. Training writes these names, the analyses, the report and the Hub upload read them.
The Space must run on a Hub Space without this project installed, so it keeps its own copy of the one name it needs
(`space/model_source.py`); a test checks that copy equals the name here.

Nothing here imports from the project or a third-party package: any module may import it at no cost.
"""

from __future__ import annotations

import os
from pathlib import Path

# A finished stage directory's completion marker, written last: a directory without it is not a finished stage.
COMPLETION_MARKER = "moe_vlm_stage.json"
# The resolved recipe `moe-vlm train` writes next to the model.
RECIPE_FILE = "recipe.yaml"
# One JSON line per logging step: per-layer, per-group expert load during training (trainer.callbacks writes it).
ROUTING_LOG_FILE = "routing_stats.jsonl"
# One JSON line per probe run (Stage start and each logging step): every held-out probe token's chosen expert per
# layer, so router saturation (how soon each token's expert stops changing) can be measured (trainer.callbacks).
PROBE_CHOICES_FILE = "routing_probe_choices.jsonl"
# The condensed routing log of a stage chain that `moe-vlm publish` puts in the Hub repo (hub.stats builds it).
ROUTING_SUMMARY_FILE = "routing_stats.json"
# A LoRA stage (`--lora_r`) saves PEFT's adapter in its directory instead of the whole model: these two files
# (PEFT's own names), which `moe-vlm merge` folds into a plain model; the completion marker's `adapter` entry says so.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# What `moe-vlm analyze` and `moe-vlm evaluate` write.
ANALYSIS_FILE = "analysis.json"
CAPTIONING_FILE = "captioning.json"
# What `analysis.transfer` writes: the routing measured on a world the model was not trained on.
TRANSFER_FILE = "transfer.json"
# What the reproduction writes at the top of its run directory.
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"

# The token modalities, one word each everywhere: configs (`modality_to_expert`), analyses, logs and cards.
MODALITIES = ("image", "text")
# The groups expert load is reported over: each modality and all tokens together (routing logs, analysis.json).
LOAD_GROUPS = (*MODALITIES, "all")

# Where generated data, the tokenizer copy and pretrained testbeds are cached; `$MOE_VLM_CACHE` overrides.
CACHE_ENV = "MOE_VLM_CACHE"


def cache_root() -> Path:
    """`$MOE_VLM_CACHE` if set, else `~/.cache/moe_vlm`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moe_vlm")


__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "ANALYSIS_FILE",
    "CACHE_ENV",
    "CAPTIONING_FILE",
    "COMPLETION_MARKER",
    "LOAD_GROUPS",
    "MODALITIES",
    "PROBE_CHOICES_FILE",
    "RECIPE_FILE",
    "REPORT_HTML",
    "REPORT_JSON",
    "ROUTING_LOG_FILE",
    "ROUTING_SUMMARY_FILE",
    "TRANSFER_FILE",
    "cache_root",
]
