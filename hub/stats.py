"""`routing_stats.json`: the per-stage, per-layer, per-modality expert load logged during training, condensed.

Each trained stage directory holds the `routing_stats.jsonl` its Trainer appended at every logging step
(`trainer.callbacks.RoutingStatsCallback`), one JSON object per line:
`{"step": 10, "stage": "2", "layers": {"0": {"image": {"dispatch": [..E], "prob": [..E], "entropy": .., "tokens": ..},
"text": {..}, "all": {..}}}}` (`tokens` is optional; a modality without tokens in the interval is left out).

A published model came from a chain of stages (Stage 3 from 2.5 from 2 ...): each stage's completion marker
(`moe_vlm_stage.json`) records the directory it started from under `"from"`. `routing_stats` follows that chain back
as far as the directories still exist and, per stage, keeps the last logged values and their mean over the run
(token-weighted when the lines carry `tokens`, as each line is already an average over its logging interval).
Pure file reading: no model, no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from configuration.contract import COMPLETION_MARKER, LOAD_GROUPS
from configuration.contract import ROUTING_LOG_FILE as ROUTING_LOG

VECTOR_FIELDS = ("dispatch", "prob")  # per expert
SCALAR_FIELDS = ("entropy",)
FORMAT = "moe-vlm routing_stats v1"


def read_marker(directory: str | Path) -> dict:
    """The completion marker of a stage directory; FileNotFoundError naming it when absent (unfinished stage)."""
    path = Path(directory) / COMPLETION_MARKER
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {COMPLETION_MARKER}: not a finished stage directory (an interrupted run, or not a "
            "`moe-vlm init` / `moe-vlm train` output)"
        )
    return json.loads(path.read_text())


def stage_chain(model_dir: str | Path) -> list[tuple[Path, dict]]:
    """[(directory, marker), ...] oldest stage first, ending with `model_dir`, following each marker's `"from"`.

    The walk stops at a stage without `"from"` or whose `"from"` directory no longer exists (or holds no marker,
    e.g. a Hub id): the chain is what can be read here, not an error. A cycle raises ValueError."""
    chain: list[tuple[Path, dict]] = []
    seen: set[Path] = set()
    directory: Path | None = Path(model_dir)
    while directory is not None:
        resolved = directory.resolve()
        if resolved in seen:
            raise ValueError(f"stage markers form a cycle at {directory}")
        seen.add(resolved)
        marker = read_marker(directory)
        chain.append((directory, marker))
        directory = _previous_stage_dir(marker.get("from"), directory)
    return chain[::-1]


def _previous_stage_dir(previous, directory: Path) -> Path | None:
    """The finished stage directory a marker's `"from"` names, or None. A relative `"from"` was relative to where
    training ran: try it from here, then from each ancestor of the current stage directory."""
    if not isinstance(previous, str) or not previous:
        return None
    path = Path(previous)
    candidates = [path] if path.is_absolute() else [path, *(a / path for a in directory.resolve().parents)]
    return next((c for c in candidates if (c / COMPLETION_MARKER).is_file()), None)


def read_routing_log(path: str | Path) -> list[dict]:
    """The records of one `routing_stats.jsonl`, checked; ValueError naming file and line for a malformed one."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{where}: expected an object with an integer 'step'")
        layers = record.get("layers")
        if not isinstance(layers, dict):
            raise ValueError(f"{where}: expected 'layers' to be an object keyed by layer index")
        for layer, per_modality in layers.items():
            if not str(layer).isdigit() or not isinstance(per_modality, dict):
                raise ValueError(f"{where}: layer {layer!r} must be an index mapping to per-modality stats")
            for modality, stats in per_modality.items():
                missing = [f for f in (*VECTOR_FIELDS, *SCALAR_FIELDS) if f not in (stats or {})]
                if modality not in LOAD_GROUPS or missing:
                    raise ValueError(
                        f"{where}: layer {layer} modality {modality!r} must be one of {LOAD_GROUPS} with fields "
                        f"{VECTOR_FIELDS + SCALAR_FIELDS} (missing {missing})"
                    )
        records.append(record)
    return records


def _weighted_mean(entries: list[dict]) -> dict:
    """Mean of each field over logging intervals, weighted by `tokens` when every entry has it."""
    weights = [e["tokens"] for e in entries] if all("tokens" in e for e in entries) else [1] * len(entries)
    total = sum(weights) or 1
    mean = {
        field: [
            sum(w * e[field][i] for w, e in zip(weights, entries)) / total
            for i in range(len(entries[0][field]))
        ]
        for field in VECTOR_FIELDS
    }
    mean.update(
        {field: sum(w * e[field] for w, e in zip(weights, entries)) / total for field in SCALAR_FIELDS}
    )
    if all("tokens" in e for e in entries):
        mean["tokens"] = sum(weights)
    return mean


def summarise_log(records: Iterable[dict]) -> dict:
    """{layer: {modality: {"last": {...}, "mean": {...}, "n_logs": int, "last_step": int}}} over one stage's log.

    `last` is the latest logged interval that saw tokens of that modality; `mean` averages every such interval
    (fields `dispatch`, `prob` per expert, `entropy` in nats, `tokens` summed when logged)."""
    by_layer: dict[str, dict[str, list[tuple[int, dict]]]] = {}
    for record in sorted(records, key=lambda r: r["step"]):
        for layer, per_modality in record["layers"].items():
            for modality, stats in per_modality.items():
                by_layer.setdefault(str(layer), {}).setdefault(modality, []).append((record["step"], stats))
    summary = {}
    for layer in sorted(by_layer, key=int):
        summary[layer] = {}
        for modality in (m for m in LOAD_GROUPS if m in by_layer[layer]):
            steps = by_layer[layer][modality]
            entries = [stats for _, stats in steps]
            summary[layer][modality] = {
                "last": entries[-1],
                "mean": _weighted_mean(entries),
                "n_logs": len(entries),
                "last_step": steps[-1][0],
            }
    return summary


def _stage_key(marker: dict, directory: Path, taken: dict) -> str:
    key = str(marker.get("stage", directory.name))
    return key if key not in taken else f"{key}@{directory.name}"


def routing_stats(model_dir: str | Path) -> dict:
    """The `routing_stats.json` of a model directory: every stage of its chain (oldest first), with its marker's
    description and, when it logged routing, the per-layer summary of `summarise_log`. Directories are recorded
    by name only: a published file must not carry the publisher's local paths."""
    stages: dict[str, dict] = {}
    for directory, marker in stage_chain(model_dir):
        log = directory / ROUTING_LOG
        records = read_routing_log(log) if log.is_file() else []
        entry = {
            "stage": str(marker.get("stage")),
            "name": marker.get("name"),
            "directory": directory.name,
            "router_mode": marker.get("router_mode"),
            "steps": marker.get("steps"),
            "n_logs": len(records),
            "layers": summarise_log(records),
        }
        if records:
            entry["first_step"], entry["last_step"] = records[0]["step"], max(r["step"] for r in records)
        stages[_stage_key(marker, directory, stages)] = entry
    return {
        "format": FORMAT,
        "description": (
            "Per stage (oldest first), per MoE layer, per modality (image tokens, text tokens, all): the share of "
            "tokens dispatched to each expert (`dispatch`), the mean router probability of each expert (`prob`) "
            "and the mean routing entropy in nats, as logged during training; `last` = the last logging interval, "
            "`mean` = the run's mean (token-weighted)."
        ),
        "stages": stages,
    }


def as_load_layers(layers: dict, which: str = "last", collapse_threshold: float = 0.99) -> dict:
    """A stage's summary in the shape of `analysis.load.load_report(...)["layers"]`, so the analysis figure code
    (`analysis.figures.plot_expert_load`) draws training-time load exactly as it draws probe-time load."""
    out = {}
    for layer, per_modality in layers.items():
        if not per_modality:
            continue
        num_experts = len(next(iter(per_modality.values()))[which]["dispatch"])
        entry: dict = {"num_experts": num_experts}
        for modality in LOAD_GROUPS:
            stats = per_modality.get(modality, {}).get(which)
            entry[modality] = {
                "dispatch": stats["dispatch"] if stats else None,
                "soft_mass": stats["prob"] if stats else None,
                "n_tokens": int(stats.get("tokens", 0)) if stats else 0,
            }
        dispatch_all = entry["all"]["dispatch"]
        entry["collapsed"] = bool(dispatch_all and max(dispatch_all) >= collapse_threshold)
        out[layer] = entry
    return out


def write_routing_figures(stats: dict, out_dir: str | Path) -> list[str]:
    """One PNG per stage that logged routing: its last logged expert load per layer and modality. Returns the
    file names written into `out_dir`."""
    from analysis.figures import plot_expert_load

    out_dir = Path(out_dir)
    names = []
    for key, stage in stats["stages"].items():
        layers = as_load_layers(stage["layers"])
        if not layers:
            continue
        name = f"routing_stage{key.replace('.', '_').replace('@', '_')}.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_expert_load(
            layers,
            out_dir / name,
            title=f"Stage {stage['stage']} ({stage['name'] or 'training'}): expert load at step {stage['last_step']}",
        )
        names.append(name)
    return names


__all__ = [
    "COMPLETION_MARKER",
    "ROUTING_LOG",
    "as_load_layers",
    "read_marker",
    "read_routing_log",
    "routing_stats",
    "stage_chain",
    "summarise_log",
    "write_routing_figures",
]
