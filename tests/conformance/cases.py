"""The conformance test classes: transformers' common model tests (from the sdist) applied to Mistral, Mixtral and
MoeVlm in each router mode. Collected by pytest only inside the conformance subprocess (see `runner.py`); the
project's own test run never imports it (its name does not match `test_*.py`).

Which of transformers' common suites run, and why:
- `ModelTesterMixin` (test_modeling_common.py): yes, the core suite (save/load, init, attention implementations,
  hidden states, gradient checkpointing, resizing embeddings, ...). Tests that need a GPU, flash-attention or
  `RUN_SLOW` skip themselves on this CPU machine and so never enter the calibrated list.
- `ConfigTester` (test_configuration_common.py) as `test_config`, as transformers' causal-LM tests run it.
- `TrainingTesterMixin` (test_training_mixin.py) `test_training_overfit`: a tiny model must overfit a fixed batch on
  CPU, a cheap end-to-end check that the loss actually trains the model.
- Not run: `GenerationTesterMixin` and `ExportTesterMixin` (their files are not in the sdist; see `sdist.STUBS`),
  `PipelineTesterMixin` (downloads tiny checkpoints and tokenizers from the Hub: offline here), the tensor/expert
  parallel and FSDP mixins (they import `tests/distributed_testing_utils.py`, not in the sdist, and need several
  processes/devices), `MemoryCleanupMixin` (accelerator memory) and test_executorch.py (torch.export/ExecuTorch).
- Not run either: `CausalLMModelTest`'s own tests (tests/causal_lm_tester.py, not in the sdist).
"""

from __future__ import annotations

import unittest

from transformers import AutoModel
from transformers.models.auto import modeling_auto
from transformers_tests.generation.test_utils import GenerationTesterMixin
from transformers_tests.test_configuration_common import ConfigTester
from transformers_tests.test_modeling_common import ModelTesterMixin
from transformers_tests.test_training_mixin import TrainingTesterMixin

from modeling_moe_vlm import ROUTER_MODES, MoeVlmConfig, MoeVlmModel

from . import moe_vlm_case
from .testers import MistralTester, MixtralTester, moe_vlm_tester

# An in-tree model is listed in transformers' static name mappings and in `AutoModel`, which `ModelTesterMixin` reads
# to decide e.g. which classes get `labels` (`_prepare_for_class`), which are bare base models (skipped by the
# training tests) and whether `test_torch_save_load` applies. Registering ours the way `modeling_auto.py` lists
# Mistral's keeps those tests meaning the same for it (the package registers its Auto classes, not AutoModel).
modeling_auto.MODEL_MAPPING_NAMES.setdefault(MoeVlmConfig.model_type, "MoeVlmModel")
modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(MoeVlmConfig.model_type, "MoeVlmForCausalLM")
AutoModel.register(MoeVlmConfig, MoeVlmModel, exist_ok=True)


class CommonTests(ModelTesterMixin, GenerationTesterMixin, TrainingTesterMixin):
    """The mixins every model class below runs; subclasses set `model_tester_class`."""

    model_tester_class = None
    # `test_can_init_all_missing_weights` guesses a model's age from a "# Copyright YYYY" header and skips models from
    # before 2023 unless this is set; our files carry no such header. Set for every class (Mistral and Mixtral are
    # from 2023 and run it anyway), so the test runs on all three.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = self.model_tester_class(self)
        self.all_model_classes = self.model_tester.all_model_classes
        self.config_tester = ConfigTester(self, config_class=self.model_tester.config_class, hidden_size=37)

    def test_config(self):
        self.config_tester.run_common_tests()


class MistralModelTest(CommonTests, unittest.TestCase):
    model_tester_class = MistralTester


class MixtralModelTest(CommonTests, unittest.TestCase):
    model_tester_class = MixtralTester


def _moe_vlm_test_case(mode: str) -> type:
    """The MoeVlm test case of one router mode (named by `moe_vlm_case`).

    Parameters that a router mode leaves unused by design get no gradient: the router in `hard` mode (routing follows
    the modality), the modality embedding outside `modality_aware`, and the frozen-by-default vision tower on
    text-only batches. transformers' own tests mark such models with `test_all_params_have_gradient = False` (as
    for its VLMs tested on text and its MoEs with unused experts); the rest of those tests still runs.
    """
    return type(
        moe_vlm_case(mode),
        (CommonTests, unittest.TestCase),
        {"model_tester_class": moe_vlm_tester(mode), "test_all_params_have_gradient": False},
    )


for _mode in ROUTER_MODES:
    globals()[moe_vlm_case(_mode)] = _moe_vlm_test_case(_mode)
