"""Per-layer, per-modality routing statistics accumulated over training steps.

A stage Trainer feeds every training micro-batch's router outputs to a `RoutingAccumulator` (from `compute_loss`,
so statistics travel in the model outputs, never in globals); at each logging step the Trainer reduces the sums
across processes and logs their averages as flat keys (`routing/layer0/image/expert0_dispatch`), which the
`RoutingStatsCallback` also appends, nested, to `routing_stats.jsonl`.

The per-layer numbers come from `trainer.load_stats.group_stats` (the definitions the analyses use too): hard dispatch
fractions (share of tokens whose chosen expert is e), soft probability mass (mean router probability of e), the
mean per-token routing entropy (nats), the mean logit gap (logit of expert 0 minus the other's), the mean top-1 -
top-2 margin and the agreement of the dispatch with the router's own argmax, for image tokens, text tokens and all
tokens; padding is excluded. Averages over the steps since the last log are token-weighted.

A `RoutingProbe` routes a fixed held-out batch in eval mode (no Gumbel noise, no dropout) at each logging step; its
numbers are logged under `routing_probe/...` and stored under `"probe"` in the routing log: training-batch routing
says what was dispatched, the probe says what the routers themselves decide.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from configuration.contract import LOAD_GROUPS, ROUTING_LOG_FILE

from .load_stats import group_stats

logger = logging.getLogger("moe_vlm.trainer")

PREFIX = "routing"
PROBE_PREFIX = "routing_probe"
# Per-token scalars averaged per layer and modality, beside the per-expert `dispatch` and `prob`.
SCALAR_STATS = ("entropy", "logit_gap", "logit_margin", "agreement")
# group_stats' name of each scalar.
_GROUP_STAT = {
    "entropy": "routing_entropy",
    "logit_gap": "logit_gap",
    "logit_margin": "logit_margin",
    "agreement": "agreement",
}


class RoutingAccumulator:
    """Sums of per-expert dispatch counts and probability mass and of the per-token scalars (`SCALAR_STATS`), per
    MoE layer and modality.

    Stored as one float64 tensor (layers, modalities, 2 * experts + len(SCALAR_STATS) + 1): [counts..., prob
    sums..., scalar sums..., tokens], so one all-reduce sums it across processes.
    """

    def __init__(self, layers: Sequence[int], num_experts: int):
        self.layers = list(layers)
        self.num_experts = num_experts
        width = 2 * num_experts + len(SCALAR_STATS) + 1
        self.sums = torch.zeros(len(self.layers), len(LOAD_GROUPS), width, dtype=torch.float64)

    @property
    def n_tokens(self) -> float:
        """Tokens summed since the last reset (the "all" group of the first layer), on this process."""
        return float(self.sums[0, LOAD_GROUPS.index("all"), -1]) if self.layers else 0.0

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
            logits = logits.detach().double().cpu()[valid]  # (valid tokens, E)
            probs = logits.softmax(dim=-1)
            choices = index.detach().cpu()[valid][:, 0]  # top-1: the dispatched expert
            report = group_stats(
                choices.long().numpy(), probs.numpy(), is_image.numpy(), E, logits=logits.numpy()
            )
            for m, modality in enumerate(LOAD_GROUPS):
                stats = report[modality]
                n = stats["n_tokens"]
                if not n:
                    continue
                row = self.sums[i, m]
                row[:E] += torch.tensor(stats["counts"], dtype=torch.float64)
                row[E : 2 * E] += n * torch.tensor(stats["soft_mass"], dtype=torch.float64)
                for k, name in enumerate(SCALAR_STATS):
                    value = stats[_GROUP_STAT[name]]
                    row[2 * E + k] += n * (0.0 if value is None else value)  # None: one expert, no gap
                row[-1] += n

    def summary(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """Token-weighted averages since the last reset, nested as routing_stats.jsonl stores them:
        {"0": {"image": {"dispatch": [..], "prob": [..], "entropy": .., "logit_gap": .., "logit_margin": ..,
        "agreement": .., "tokens": ..}, "text": .., "all": ..}}. A modality with no token is left out. `reduce`
        sums the raw tensor across processes first."""
        sums = reduce(self.sums) if reduce is not None else self.sums
        E = self.num_experts
        layers = {}
        for i, layer in enumerate(self.layers):
            per_modality = {}
            for m, modality in enumerate(LOAD_GROUPS):
                row = sums[i, m].tolist()
                n = row[-1]
                if n > 0:
                    stats = {"dispatch": [c / n for c in row[:E]], "prob": [p / n for p in row[E : 2 * E]]}
                    stats.update({name: row[2 * E + k] / n for k, name in enumerate(SCALAR_STATS)})
                    stats["tokens"] = int(n)
                    per_modality[modality] = stats
            layers[str(layer)] = per_modality
        return layers


class RoutingProbe:
    """A fixed batch of held-out records, collated once, routed in eval mode at each logging step.

    Eval mode turns the Gumbel sample into the argmax and router dropout off, so the probe's dispatch is the
    routers' own decision; comparing it with the training-batch dispatch shows how much the noise decides. Every
    process runs the whole probe (a few dozen records) and gets the same numbers: no collective beyond the
    model's own (FSDP gathers its shards in the forward, so every rank must run it). `batch_size` bounds memory.
    """

    def __init__(
        self, records, collator, layers: Sequence[int], num_experts: int, batch_size: int, split: str
    ):
        self.n_samples = len(records)
        self.split = split
        self.layers, self.num_experts = list(layers), num_experts
        # Collated now, once: the batches are then fixed, and collating later would not touch the training RNG.
        rows = [records[i] for i in range(self.n_samples)]
        self.batches = [collator(rows[i : i + batch_size]) for i in range(0, self.n_samples, batch_size)]
        self.choices: dict | None = None  # the last run's per-token choices, until taken

    def info(self) -> dict:
        return {
            "split": self.split,
            "n_samples": self.n_samples,
            "mode": "eval (no Gumbel noise, no dropout)",
        }

    @torch.no_grad()
    def run(self, model, prepare: Callable[[dict], dict] = lambda batch: batch) -> dict:
        """The probe's routing summary (as `RoutingAccumulator.summary`). `prepare` moves a batch to the model's
        device (the Trainer's `_prepare_inputs`). The model is put back in the mode it was in.

        Also keeps every valid probe token's chosen expert in `self.choices` until `take_choices()` (the
        `ProbeChoicesCallback` writes them): `{"layers": {"<layer>": [expert per token]}, "is_image": [bool per
        token]}`, tokens in batch order, padding left out, the same tokens at every run (the batches are fixed)."""
        accumulator = RoutingAccumulator(self.layers, self.num_experts)
        chosen: dict[str, list[int]] = {str(layer): [] for layer in self.layers}
        is_image: list[bool] = []
        was_training = model.training
        model.eval()
        try:
            for batch in self.batches:
                inputs = prepare({k: v for k, v in batch.items() if k != "labels"})
                # One position of LM-head logits: only the router outputs are wanted.
                out = model(**inputs, output_router_logits=True, logits_to_keep=1)
                mask = inputs.get("attention_mask")
                accumulator.update(out.router_logits, out.router_indices, out.modality_mask, mask)
                valid = (
                    (torch.ones_like(out.modality_mask) if mask is None else mask.bool()).reshape(-1).cpu()
                )
                is_image += out.modality_mask.reshape(-1).cpu()[valid].tolist()
                for layer, index in zip(self.layers, out.router_indices):
                    chosen[str(layer)] += index.detach().cpu()[valid][:, 0].tolist()  # top-1: the dispatch
        finally:
            model.train(was_training)
        self.choices = {"layers": chosen, "is_image": is_image}
        return accumulator.summary()

    def take_choices(self) -> dict | None:
        """The per-token choices of the last `run` (None if none since the last take), then forgets them."""
        choices, self.choices = self.choices, None
        return choices


def flatten(layers: dict, prefix: str = PREFIX) -> dict[str, float]:
    """Nested summary -> flat scalar log keys (`routing/layer0/image/expert1_prob`) for the Trainer's log."""
    flat = {}
    for layer, per_modality in layers.items():
        for modality, stats in per_modality.items():
            key = f"{prefix}/layer{layer}/{modality}"
            for e, (d, p) in enumerate(zip(stats["dispatch"], stats["prob"])):
                flat[f"{key}/expert{e}_dispatch"] = d
                flat[f"{key}/expert{e}_prob"] = p
            for name in (*SCALAR_STATS, "tokens"):
                if name in stats:
                    flat[f"{key}/{name}"] = stats[name]
    return flat


def unflatten(logs: dict, prefix: str = PREFIX) -> dict:
    """The inverse of `flatten` over the keys of a log dict under `prefix` (other keys are ignored)."""
    layers: dict[str, dict] = {}
    for key, value in logs.items():
        parts = key.split("/")
        if len(parts) != 4 or parts[0] != prefix or not parts[1].startswith("layer"):
            continue
        stats = layers.setdefault(parts[1][len("layer") :], {}).setdefault(parts[2], {})
        name = parts[3]
        if name.startswith("expert") and "_" in name:
            expert, kind = name.removeprefix("expert").split("_")
            stats.setdefault(kind, {})[int(expert)] = value
        else:
            stats[name] = int(value) if name == "tokens" else value
    for per_modality in layers.values():
        for stats in per_modality.values():
            for kind in ("dispatch", "prob"):
                by_expert = stats.get(kind, {})
                stats[kind] = [by_expert[e] for e in sorted(by_expert)]
    return {k: layers[k] for k in sorted(layers, key=int)}


def read_log_lines(path: Path) -> list[dict]:
    """The records of a per-step JSON-lines log. A last line that does not parse is dropped: a process killed while
    appending it leaves it torn, and its step is after the last checkpoint (a log line is written before the
    checkpoint of its step), so the resumed run writes it again. A line before the last that does not parse is
    damage no kill explains: a ValueError naming the file and the line."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning(
                    "%s: dropped its torn last line %d (an interrupted write): %s", path, number, error
                )
                break
            raise ValueError(
                f"{path}, line {number}: not a JSON record ({error}); only the last line can be torn by a kill. "
                "Delete the file's lines from there (or the file) to resume"
            ) from None
    return records


def read_routing_log(source: str | Path | Sequence[Mapping]) -> list[dict]:
    """The records of a routing log, sorted by step: from a stage directory, a `routing_stats.jsonl` path, or
    records already read (returned sorted). The format is the one `trainer.callbacks.RoutingStatsCallback` writes
    (`hub.stats.read_routing_log` also checks every field, for publishing)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / ROUTING_LOG_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no routing log at {path}")
        records = read_log_lines(path)
    else:
        records = [dict(r) for r in source]
    return sorted(records, key=lambda r: r["step"])


__all__ = [
    "PREFIX",
    "PROBE_PREFIX",
    "SCALAR_STATS",
    "RoutingAccumulator",
    "RoutingProbe",
    "flatten",
    "read_log_lines",
    "read_routing_log",
    "unflatten",
]
