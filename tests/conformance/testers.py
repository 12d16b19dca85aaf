"""Model testers for the conformance suite, in the style of transformers' `CausalLMModelTester` / `MistralModelTester`.

transformers' per-model testers live in `tests/models/`, which the sdist does not ship, so these are our own: a tiny
config (vocabulary 99, hidden 32, 2 layers, 4 heads, 2 KV heads) and `prepare_config_and_inputs_for_common()`
returning `(config, {"input_ids", "attention_mask"})`, as `ModelTesterMixin` expects. `intermediate_size` is 40, not
upstream's 37: the `grouped_mm` experts kernel needs 16-byte-aligned strides, and the same value is used for every
model so that calibration and the real run see the same shapes.

Imported only inside the conformance subprocess (it needs `transformers_tests` on the path).
"""

from __future__ import annotations

import torch
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    MixtralConfig,
    MixtralForCausalLM,
    MixtralModel,
)
from transformers_tests.test_modeling_common import ids_tensor

from modeling_moe_vlm import MoeVlmConfig, MoeVlmForCausalLM, MoeVlmModel


class CausalLMTester:
    """Shared tiny decoder set-up; subclasses name their classes and add their own config fields in `extra_config`."""

    config_class = None
    base_model_class = None
    causal_lm_class = None

    def __init__(self, parent, batch_size=13, seq_length=7, is_training=True, use_input_mask=True):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_key_value_heads = 2
        # Passed explicitly, as transformers' CausalLMModelTester does: MixtralConfig leaves it None otherwise.
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.intermediate_size = 40  # a multiple of 8: grouped_mm needs 16-byte-aligned strides
        self.hidden_act = "silu"
        self.max_position_embeddings = 512
        self.initializer_range = 0.02
        self.pad_token_id = 0
        self.bos_token_id = 1
        self.eos_token_id = 2

    @property
    def all_model_classes(self) -> tuple:
        return (self.base_model_class, self.causal_lm_class)

    def extra_config(self) -> dict:
        """Model-specific config fields (experts, routing)."""
        return {}

    def get_config(self):
        return self.config_class(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            **self.extra_config(),
        )

    def make_input_ids(self) -> torch.Tensor:
        return ids_tensor([self.batch_size, self.seq_length], self.vocab_size)

    def prepare_config_and_inputs_for_common(self):
        input_ids = self.make_input_ids()
        attention_mask = torch.tril(torch.ones_like(input_ids)) if self.use_input_mask else None
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class MistralTester(CausalLMTester):
    config_class = MistralConfig
    base_model_class = MistralModel
    causal_lm_class = MistralForCausalLM


class MixtralTester(CausalLMTester):
    """2 experts, top-2, router jitter 0.1: the set-up of transformers' own MixtralModelTester."""

    config_class = MixtralConfig
    base_model_class = MixtralModel
    causal_lm_class = MixtralForCausalLM

    def extra_config(self) -> dict:
        return {"num_local_experts": 2, "num_experts_per_tok": 2, "router_jitter_noise": 0.1}


class MoeVlmTester(CausalLMTester):
    """The text-only model (`vision_config=None`): every decoder layer an MoE of 2 experts, routed by `router_mode`.

    `image_token_id` is the last id of the vocabulary and the random inputs never contain it, as transformers'
    LLaVA testers do: a placeholder without `pixel_values` is (rightly) an error for the model.
    """

    config_class = MoeVlmConfig
    base_model_class = MoeVlmModel
    causal_lm_class = MoeVlmForCausalLM
    router_mode = "hard"

    def extra_config(self) -> dict:
        return {
            "vision_config": None,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "moe_layers": list(range(self.num_hidden_layers)),
            "router_mode": self.router_mode,
            "image_token_id": self.vocab_size - 1,
        }

    def make_input_ids(self) -> torch.Tensor:
        return ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1)


def moe_vlm_tester(mode: str) -> type[MoeVlmTester]:
    """A `MoeVlmTester` subclass fixed to one router mode."""
    name = "MoeVlm" + "".join(part.title() for part in mode.split("_")) + "Tester"
    return type(name, (MoeVlmTester,), {"router_mode": mode})
