"""Analyses of moe-vlm as pure functions over arrays, plus figures.

Inputs are plain arrays (numpy, or torch tensors on any device/dtype: converted to float64 numpy at the
boundary); outputs are numpy arrays or JSON-serialisable dicts. The model-running part (extracting
hidden states and router outputs) lives elsewhere and calls these.

- ``similarity``: concept-modality matrices (paper 2.3): ``concept_matrix``, ``concept_matrices``,
  ``pool_concepts``, ``group_concepts``, ``masked_mean``; how much of a matrix is row/column offset:
  ``offset_decomposition``
- ``stats``: is the diagonal real? ``binomial_diagonal_test`` (the paper's), ``permutation_test``,
  ``bootstrap_ci``, all three on one matrix variant: ``diagonal_tests``; ``proportion_test`` (a share
  against chance, Wilson interval), ``silhouette_interval``
- ``grounding``: do captions name the right shape and colour? ``score_caption``, ``grounding_accuracy``
- ``load``: expert load, routing entropy, collapse (hard and soft), purity per layer: ``expert_load``,
  ``load_report``, ``collapse``; routing over training steps from the routing log: ``routing_dynamics``
- ``tsne``: ``tsne_embed``, ``silhouettes``
- ``compositional``: colour x object binding: ``compositional_matrix``, ``binding_score``
- ``cka``: expert function analysis: ``linear_cka``, ``expert_cka_matrix``, ``weight_distance``
- ``captioning``: COCO caption metrics via pycocoevalcap (Java): ``caption_metrics``,
  ``CaptionEvaluator``
- ``figures``: PNG writers for the above

Names are imported lazily (PEP 562) so that ``import analysis.load`` does not pull in scikit-learn,
matplotlib or pycocoevalcap. ``_EXPORTS`` below is written out rather than derived: deriving it without
importing the modules would mean parsing their source at ``import analysis``; instead
``tests/test_analysis_exports.py`` checks that it equals each module's ``__all__``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "similarity": [
        "MATRIX_VARIANTS",
        "concept_matrices",
        "concept_matrix",
        "cosine_matrix",
        "group_concepts",
        "masked_mean",
        "offset_decomposition",
        "pool_concepts",
    ],
    "stats": [
        "TIE_RULE",
        "binomial_diagonal_test",
        "bootstrap_ci",
        "diagonal_hits",
        "diagonal_margins",
        "diagonal_tests",
        "permutation_test",
        "proportion_test",
        "silhouette_interval",
    ],
    "grounding": [
        "caption_grounding",
        "grounding_accuracy",
        "grounding_records",
        "mentioned",
        "score_caption",
        "shapes_vocabulary",
    ],
    "load": [
        "DYNAMICS_FIELDS",
        "HARD_COLLAPSE_THRESHOLD",
        "collapse_definitions",
        "LOAD_GROUPS",
        "PAPER_MODALITY_TO_EXPERT",
        "SOFT_COLLAPSE_THRESHOLD",
        "collapse",
        "expert_load",
        "load_report",
        "routing_dynamics",
    ],
    "tsne": ["auto_perplexity", "silhouettes", "tsne_embed"],
    "compositional": ["binding_score", "canonical_compound", "compositional_matrix", "parse_compound"],
    "cka": ["expert_cka_matrix", "linear_cka", "weight_distance"],
    "captioning": [
        "CHAT_CAPTION_INSTRUCTION",
        "METRICS",
        "PROMPT_FORMATS",
        "RAW_CAPTION_PROMPT",
        "CaptionEvaluator",
        "caption_metrics",
        "caption_prompt",
        "chat_prompt",
        "evaluation_prompt_formats",
        "training_prompt_format",
        "validate_captions",
    ],
    "figures": [
        "plot_ablation_metric",
        "plot_compositional_matrix",
        "plot_expert_load",
        "plot_router_saturation",
        "plot_routing_dynamics",
        "plot_similarity_matrix",
        "plot_tsne",
    ],
    "instruction": [
        "answer_slot",
        "instruction_accuracy",
        "instruction_prompt",
        "instruction_records",
        "question_kinds",
        "score_answers",
    ],
    "saturation": ["SETTLED_LEVEL", "read_probe_choices", "router_saturation", "token_settling"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
