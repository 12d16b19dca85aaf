"""Per-layer, per-modality routing statistics accumulated over training steps.

A stage Trainer feeds every training micro-batch's router outputs to a `RoutingAccumulator` (from `compute_loss`,
so statistics travel in the model outputs, never in globals); at each logging step the Trainer reduces the sums
across processes and logs their averages as flat keys (`routing/layer0/image/expert0_dispatch`), which the
`RoutingStatsCallback` also appends, nested, to `routing_stats.jsonl`.

The per-layer numbers come from `trainer.load_stats.group_stats` (the definitions the analyses use too): hard dispatch
fractions (share of tokens whose chosen expert is e), soft probability mass (mean router probability of e) and the
mean per-token routing entropy (nats), for image tokens, text tokens and all tokens; padding is excluded. Averages
over the steps since the last log are token-weighted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from configuration.contract import LOAD_GROUPS

from .load_stats import group_stats

PREFIX = "routing"


class RoutingAccumulator:
    """Sums of per-expert dispatch counts, probability mass and entropy, per MoE layer and modality.

    Stored as one float64 tensor (layers, modalities, 2 * experts + 2): [counts..., prob sums..., entropy sum,
    tokens], so one all-reduce sums it across processes.
    """

    def __init__(self, layers: Sequence[int], num_experts: int):
        self.layers = list(layers)
        self.num_experts = num_experts
        self.sums = torch.zeros(len(self.layers), len(LOAD_GROUPS), 2 * num_experts + 2, dtype=torch.float64)

    def reset(self) -> None:
        self.sums.zero_()

    @torch.no_grad()
    def update(
        self,
        router_logits: Sequence[torch.Tensor],
        router_indices: Sequence[torch.Tensor],
        modality_mask: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> None:
        """Add one batch. `router_logits[i]` (batch*seq, E) and `router_indices[i]` (batch*seq, k) of MoE layer
        `layers[i]`; `modality_mask` (batch, seq) True at image tokens; `attention_mask` (batch, seq), 0 at
        padding."""
        if len(router_logits) != len(self.layers):
            raise ValueError(
                f"got router outputs of {len(router_logits)} layers, expected {len(self.layers)}"
            )
        valid = (
            modality_mask.new_ones(modality_mask.shape) if attention_mask is None else attention_mask.bool()
        )
        valid = valid.reshape(-1).cpu()  # (tokens,)
        is_image = modality_mask.reshape(-1).cpu()[valid]
        E = self.num_experts
        for i, (logits, index) in enumerate(zip(router_logits, router_indices)):
            probs = logits.detach().float().softmax(dim=-1).cpu()[valid]  # (valid tokens, E)
            choices = index.detach().cpu()[valid][:, 0]  # top-1: the dispatched expert
            report = group_stats(choices.long().numpy(), probs.double().numpy(), is_image.numpy(), E)
            for m, modality in enumerate(LOAD_GROUPS):
                stats = report[modality]
                n = stats["n_tokens"]
                if not n:
                    continue
                row = self.sums[i, m]
                row[:E] += torch.tensor(stats["counts"], dtype=torch.float64)
                row[E : 2 * E] += n * torch.tensor(stats["soft_mass"], dtype=torch.float64)
                row[2 * E] += n * stats["routing_entropy"]
                row[2 * E + 1] += n

    def summary(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """Token-weighted averages since the last reset, nested as routing_stats.jsonl stores them:
        {"0": {"image": {"dispatch": [..], "prob": [..], "entropy": .., "tokens": ..}, "text": .., "all": ..}}.
        A modality with no token is left out. `reduce` sums the raw tensor across processes first."""
        sums = reduce(self.sums) if reduce is not None else self.sums
        E = self.num_experts
        layers = {}
        for i, layer in enumerate(self.layers):
            per_modality = {}
            for m, modality in enumerate(LOAD_GROUPS):
                row = sums[i, m].tolist()
                n = row[2 * E + 1]
                if n > 0:
                    per_modality[modality] = {
                        "dispatch": [c / n for c in row[:E]],
                        "prob": [p / n for p in row[E : 2 * E]],
                        "entropy": row[2 * E] / n,
                        "tokens": int(n),
                    }
            layers[str(layer)] = per_modality
        return layers


def flatten(layers: dict) -> dict[str, float]:
    """Nested summary -> flat scalar log keys (`routing/layer0/image/expert1_prob`) for the Trainer's log."""
    flat = {}
    for layer, per_modality in layers.items():
        for modality, stats in per_modality.items():
            key = f"{PREFIX}/layer{layer}/{modality}"
            for e, (d, p) in enumerate(zip(stats["dispatch"], stats["prob"])):
                flat[f"{key}/expert{e}_dispatch"] = d
                flat[f"{key}/expert{e}_prob"] = p
            flat[f"{key}/entropy"] = stats["entropy"]
            flat[f"{key}/tokens"] = stats["tokens"]
    return flat


def unflatten(logs: dict) -> dict:
    """The inverse of `flatten` over the routing keys of a log dict (other keys are ignored)."""
    layers: dict[str, dict] = {}
    for key, value in logs.items():
        parts = key.split("/")
        if len(parts) != 4 or parts[0] != PREFIX or not parts[1].startswith("layer"):
            continue
        stats = layers.setdefault(parts[1][len("layer") :], {}).setdefault(parts[2], {})
        name = parts[3]
        if name in ("entropy", "tokens"):
            stats[name] = int(value) if name == "tokens" else value
        else:
            expert, kind = name.removeprefix("expert").split("_")
            stats.setdefault(kind, {})[int(expert)] = value
    for per_modality in layers.values():
        for stats in per_modality.values():
            for kind in ("dispatch", "prob"):
                by_expert = stats.get(kind, {})
                stats[kind] = [by_expert[e] for e in sorted(by_expert)]
    return {k: layers[k] for k in sorted(layers, key=int)}


__all__ = ["PREFIX", "RoutingAccumulator", "flatten", "unflatten"]
