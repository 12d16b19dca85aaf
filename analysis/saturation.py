"""Router saturation: how soon does each token's expert stop changing during a stage?

The routing probe (`trainer.routing_stats.RoutingProbe`) routes the same held-out tokens in eval mode when a stage
starts and at every training log; `trainer.callbacks.ProbeChoicesCallback` writes each run's per-token choices to
`routing_probe_choices.jsonl`. From that sequence, per layer and token:

- the *settle step*: the first probed step from which the token's choice equals its final choice (the start step
  when it never changed);
- its *settle fraction*: (settle step - first step) / (last step - first step), 0 = settled from the start, 1 = still
  changing at the last probe;
- whether it *ever changed*, how many times it *flipped*, and whether its final expert differs from the one it
  started on (*moved*).

Aggregated per layer and token group (image, text, all tokens): means and shares, the share settled by each
probed step (a monotone curve, drawn by `figures.plot_router_saturation`) and the first step by which 90 % had
settled. A saturated router decides early and keeps its decision; one still exploring keeps flipping. Pure
functions over the records; reading the file is `read_probe_choices`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from configuration.contract import LOAD_GROUPS, PROBE_CHOICES_FILE

SETTLED_LEVEL = 0.9  # `step_settled_90`: the first probed step by which this share of the tokens had settled


def read_probe_choices(source: str | Path) -> list[dict]:
    """The records of a probe-choices log (a stage directory or the file), sorted by step."""
    path = Path(source)
    path = path / PROBE_CHOICES_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no probe choices at {path}")
    from trainer.routing_stats import (
        read_log_lines,  # the per-step logs' one reader (a torn last line dropped)
    )

    return sorted(read_log_lines(path), key=lambda r: r["step"])


def _choice_matrix(records: Sequence[Mapping], layer: str) -> np.ndarray:
    """(probes, tokens) chosen experts of `layer`; every record must hold the same tokens."""
    rows = [record["layers"][layer] for record in records]
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        steps = [record["step"] for record in records]
        raise ValueError(
            f"probe choices of layer {layer} hold different token counts {sorted(lengths)} across steps {steps}: "
            "the probe must route the same tokens at every step"
        )
    return np.asarray(rows, dtype=np.int64)


def token_settling(choices: np.ndarray, steps: Sequence[int]) -> dict[str, np.ndarray]:
    """Per token of `choices` (probes, tokens) probed at `steps`: settle_step, settle_fraction, changed, flips,
    moved (arrays of length tokens)."""
    steps = np.asarray(steps, dtype=float)
    differs_from_final = choices != choices[-1]  # (probes, tokens)
    # The last probe at which the choice still differed from the final one; the token settles at the next probe.
    last_differs = np.where(
        differs_from_final.any(0), len(steps) - 1 - np.argmax(differs_from_final[::-1], axis=0), -1
    )
    settle_index = last_differs + 1  # (tokens,), 0 when it never differed
    span = steps[-1] - steps[0]
    settle_step = steps[settle_index]
    flips = (np.diff(choices, axis=0) != 0).sum(0) if len(steps) > 1 else np.zeros(choices.shape[1], int)
    return {
        "settle_index": settle_index,
        "settle_step": settle_step,
        "settle_fraction": (settle_step - steps[0]) / span if span > 0 else np.zeros_like(settle_step),
        "changed": flips > 0,
        "flips": flips,
        "moved": choices[-1] != choices[0],
    }


def _group_summary(settling: Mapping[str, np.ndarray], keep: np.ndarray, steps: Sequence[int]) -> dict | None:
    n = int(keep.sum())
    if not n:
        return None
    settle_index = settling["settle_index"][keep]
    settled_by = [float(np.mean(settle_index <= i)) for i in range(len(steps))]
    reached = [i for i, share in enumerate(settled_by) if share >= SETTLED_LEVEL]
    return {
        "n_tokens": n,
        "mean_settle_step": float(settling["settle_step"][keep].mean()),
        "mean_settle_fraction": float(settling["settle_fraction"][keep].mean()),
        "changed_share": float(settling["changed"][keep].mean()),
        "moved_share": float(settling["moved"][keep].mean()),
        "mean_flips": float(settling["flips"][keep].mean()),
        # The last step at the latest: every token has settled there.
        "step_settled_90": int(steps[reached[0]]),
        "settled_by": settled_by,
    }


def router_saturation(records: Sequence[Mapping]) -> dict:
    """Router saturation from probe-choices records (`read_probe_choices`).

    Returns dict(source, n_probes, steps, first_step, last_step, settled_level, layers: {layer: {group: {n_tokens,
    mean_settle_step, mean_settle_fraction, changed_share, moved_share, mean_flips, step_settled_90, settled_by (share
    settled at each of `steps`)}}} for group in image / text / all (a group without tokens is left out),
    mean_settle_fraction and changed_share (means over layers, all tokens)). Fewer than two probes give
    {"skipped": why} instead of `layers`.
    """
    records = sorted(records, key=lambda r: r["step"])
    steps = [int(r["step"]) for r in records]
    out: dict = {
        "source": PROBE_CHOICES_FILE,
        "n_probes": len(records),
        "steps": steps,
        "first_step": steps[0] if steps else None,
        "last_step": steps[-1] if steps else None,
        "settled_level": SETTLED_LEVEL,
    }
    if len(records) < 2:
        return {**out, "skipped": f"{len(records)} probe run(s): saturation needs at least two"}
    is_image = np.asarray(records[-1]["is_image"], dtype=bool)
    groups = {"image": is_image, "text": ~is_image, "all": np.ones_like(is_image)}
    layers = {}
    for layer in sorted(records[-1]["layers"], key=int):
        choices = _choice_matrix(records, layer)
        if choices.shape[1] != len(is_image):
            raise ValueError(
                f"probe choices of layer {layer} have {choices.shape[1]} tokens but is_image has {len(is_image)}"
            )
        settling = token_settling(choices, steps)
        layers[layer] = {
            group: summary
            for group in LOAD_GROUPS
            if (summary := _group_summary(settling, groups[group], steps)) is not None
        }
    out["layers"] = layers
    out["mean_settle_fraction"] = float(np.mean([d["all"]["mean_settle_fraction"] for d in layers.values()]))
    out["changed_share"] = float(np.mean([d["all"]["changed_share"] for d in layers.values()]))
    return out


__all__ = ["SETTLED_LEVEL", "read_probe_choices", "router_saturation", "token_settling"]
