"""The MoeVlm model package: everything a Hub repo ships for `trust_remote_code`, and nothing else.

Importing it registers the config, model and processor with the Auto classes (in this process) and marks them
for `save_pretrained` to write `auto_map` and copy these files, so a saved folder loads anywhere with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`, `AutoModelForImageTextToText` likewise, or
`pipeline("image-text-to-text", model=folder, trust_remote_code=True)`.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from .configuration_moe_vlm import CONNECTOR_TYPES, ROUTER_MODES, MoeVlmConfig, MoeVlmVisionConfig
from .modeling_moe_vlm import (
    MoeVlmCausalLMOutputWithPast,
    MoeVlmForCausalLM,
    MoeVlmModel,
    MoeVlmModelOutputWithPast,
    MoeVlmSparseMoeBlock,
    router_losses,
)
from .processing_moe_vlm import MoeVlmProcessor

AutoConfig.register(MoeVlmConfig.model_type, MoeVlmConfig, exist_ok=True)
AutoModelForCausalLM.register(MoeVlmConfig, MoeVlmForCausalLM, exist_ok=True)
AutoModelForImageTextToText.register(MoeVlmConfig, MoeVlmForCausalLM, exist_ok=True)
AutoProcessor.register(MoeVlmConfig, MoeVlmProcessor, exist_ok=True)
MoeVlmConfig.register_for_auto_class()
# One Auto class per class here; the config carries the AutoModelForImageTextToText entry of `auto_map` itself
# (`configuration_moe_vlm.IMAGE_TEXT_TO_TEXT_AUTO_MAP`), so remote code loads the folder through either.
MoeVlmForCausalLM.register_for_auto_class("AutoModelForCausalLM")
MoeVlmProcessor.register_for_auto_class()

__all__ = [
    "CONNECTOR_TYPES",
    "ROUTER_MODES",
    "MoeVlmCausalLMOutputWithPast",
    "MoeVlmConfig",
    "MoeVlmForCausalLM",
    "MoeVlmModel",
    "MoeVlmModelOutputWithPast",
    "MoeVlmProcessor",
    "MoeVlmSparseMoeBlock",
    "MoeVlmVisionConfig",
    "router_losses",
]
