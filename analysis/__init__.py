"""Analyses of moe-vlm as pure functions over arrays, plus figures.

Inputs are plain arrays (numpy, or torch tensors on any device/dtype: converted to float64 numpy at the
boundary); outputs are numpy arrays or JSON-serialisable dicts. The model-running part (extracting
hidden states and router outputs) lives elsewhere and calls these.

- ``similarity``: concept-modality matrices (paper 2.3): ``concept_matrix``, ``concept_matrices``,
  ``pool_concepts``, ``group_concepts``, ``masked_mean``
- ``stats``: is the diagonal real? ``binomial_diagonal_test`` (the paper's), ``permutation_test``,
  ``bootstrap_ci``
- ``load``: expert load, routing entropy, collapse, purity per layer: ``expert_load``, ``load_report``
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
        "concept_matrices",
        "concept_matrix",
        "cosine_matrix",
        "group_concepts",
        "masked_mean",
        "pool_concepts",
    ],
    "stats": [
        "TIE_RULE",
        "binomial_diagonal_test",
        "bootstrap_ci",
        "diagonal_hits",
        "diagonal_margins",
        "permutation_test",
    ],
    "load": ["LOAD_GROUPS", "PAPER_MODALITY_TO_EXPERT", "expert_load", "load_report"],
    "tsne": ["auto_perplexity", "silhouettes", "tsne_embed"],
    "compositional": ["binding_score", "compositional_matrix", "parse_compound"],
    "cka": ["expert_cka_matrix", "linear_cka", "weight_distance"],
    "captioning": ["METRICS", "CaptionEvaluator", "caption_metrics", "validate_captions"],
    "figures": ["plot_compositional_matrix", "plot_expert_load", "plot_similarity_matrix", "plot_tsne"],
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
