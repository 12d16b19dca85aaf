"""PNG figures of the analyses, the ones the paper shows (Figures 3-8), for a person to look at.

Each writer takes the arrays or result dicts of the analysis modules, writes one PNG of exactly
``figsize * dpi`` pixels (constrained layout, no tight bounding box, so sizes are predictable for the
report and the Space), and returns the path written. Figures are built on ``matplotlib.figure.Figure``
with the Agg canvas directly: no pyplot, no global backend switch, nothing left open between calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from configuration.contract import LOAD_GROUPS

from ._arrays import to_labels, to_numpy
from .compositional import binding_score, parse_compound
from .load import routing_dynamics
from .stats import diagonal_hits


def _new_figure(figsize: tuple[float, float], dpi: int) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path, dpi: int) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return str(path)


def _heatmap(fig: Figure, ax, matrix: np.ndarray, row_labels, col_labels, annotate: bool | None):
    c_rows, c_cols = matrix.shape
    im = ax.imshow(matrix, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label="cosine similarity", shrink=0.85)
    ax.set_xticks(range(c_cols), labels=col_labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(c_rows), labels=row_labels)
    if annotate is None:
        annotate = max(c_rows, c_cols) <= 12
    if annotate:
        lo, hi = np.nanmin(matrix), np.nanmax(matrix)
        mid = (lo + hi) / 2
        for i in range(c_rows):
            for j in range(c_cols):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if matrix[i, j] > mid else "white")  # fmt: skip


def plot_similarity_matrix(
    matrix: Any,
    path: str | Path,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    mark_hits: bool = True,
    annotate: bool | None = None,
    figsize: tuple[float, float] = (7.0, 6.0),
    dpi: int = 100,
) -> str:
    """Heatmap of a (C, C) concept-modality matrix (Figures 3-4), rows visual, columns textual.

    With ``mark_hits``, diagonal cells that are their row's strict maximum get a red frame and, in rows
    that miss, the cell holding the row maximum gets a white cross; the title counts the hits.
    Values are printed in the cells when C <= 12 (``annotate`` overrides).
    """
    m = to_numpy(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {m.shape}")
    c = m.shape[0]
    labels = [str(i) for i in range(c)] if labels is None else [str(s) for s in labels]
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot()
    _heatmap(fig, ax, m, labels, labels, annotate)
    ax.set_xlabel("textual concept (captions)")
    ax.set_ylabel("visual concept (images)")
    heading = title or "Concept-modality similarity"
    if mark_hits:
        hits = diagonal_hits(m)
        for i in range(c):
            if hits[i]:
                ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
            else:
                j = int(np.nanargmax(m[i]))
                ax.plot(j, i, marker="x", color="white", markersize=10, markeredgewidth=2)
        heading += f"\n{int(hits.sum())}/{c} diagonal hits (red frame; x = row maximum elsewhere)"
    ax.set_title(heading)
    return _save(fig, path, dpi)


def plot_expert_load(
    report: Mapping,
    path: str | Path,
    quantity: str = "dispatch",
    expert_names: Sequence[str] | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (12.0, 8.0),
    dpi: int = 100,
) -> str:
    """Per-layer expert load as stacked bars, one panel per modality (image, text, all) (Figure 7).

    report: the dict of ``load.load_report`` (or its ``layers`` mapping). ``quantity`` "dispatch" plots
    hard top-1 fractions, "soft_mass" mean router probabilities. Collapsed layers are marked with a
    black triangle above the "all" bars; layers without tokens of a modality show no bar.
    """
    layers = report["layers"] if "layers" in report else report
    order = sorted(layers, key=int)
    if not order:
        raise ValueError("the report has no layers")
    num_experts = int(next(iter(layers.values()))["num_experts"])
    names = list(expert_names) if expert_names is not None else [f"expert {e}" for e in range(num_experts)]
    if expert_names is None and num_experts == 2:
        names = ["expert 0 (vision)", "expert 1 (text)"]
    colours = [f"C{e % 10}" for e in range(num_experts)]  # C0 blue, C1 orange as in the paper
    x = np.arange(len(order))

    fig = _new_figure(figsize, dpi)
    axes = fig.subplots(len(LOAD_GROUPS), 1, sharex=True)
    for ax, modality in zip(axes, LOAD_GROUPS):
        values = np.zeros((len(order), num_experts))
        for row, layer in enumerate(order):
            v = layers[layer][modality][quantity]
            if v is not None:
                values[row] = v
        bottom = np.zeros(len(order))
        for e in range(num_experts):
            ax.bar(x, values[:, e], bottom=bottom, color=colours[e], label=names[e], width=0.8)
            bottom += values[:, e]
        n_tokens = sum(int(layers[layer][modality]["n_tokens"]) for layer in order) // len(order)
        ax.set_ylabel(f"{modality} tokens\n(~{n_tokens}/layer)")
        ax.set_ylim(0, 1.12)
        ax.set_yticks([0, 0.5, 1.0])
        if modality == "all":
            collapsed = [row for row, layer in enumerate(order) if layers[layer]["collapsed"]]
            if collapsed:
                ax.scatter(x[collapsed], np.full(len(collapsed), 1.06), marker="v", color="black",
                           s=18, label="collapsed")  # fmt: skip
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9)
    axes[-1].set_xticks(x, labels=[str(layer) for layer in order])
    axes[-1].set_xlabel("layer")
    label = "top-1 dispatch fraction" if quantity == "dispatch" else "mean router probability"
    fig.suptitle(title or f"Expert load by layer ({label})")
    return _save(fig, path, dpi)


def _as_dynamics(source: Any) -> dict:
    """A `load.routing_dynamics` result from one (returned as is), routing-log records, a routing log file or a
    stage directory holding one."""
    if isinstance(source, Mapping) and "train" in source and "collapse" in source:
        return dict(source)
    from trainer.routing_stats import read_routing_log

    return routing_dynamics(read_routing_log(source))


def plot_routing_dynamics(
    source: Any,
    path: str | Path,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> str:
    """When does each layer collapse, and is it the router's decision? Routing over training steps, per layer.

    source: a stage directory, its `routing_stats.jsonl`, the log's records, or a `load.routing_dynamics` result.
    A grid of modality (rows: image, text, all tokens) x quantity (columns: hard top-1 dispatch to expert 0,
    soft load = mean router probability of expert 0, mean logit gap logit0 - logit1), one line per layer (colour).
    Solid lines are the training batches as routed (Gumbel noise, dropout); dashed lines the held-out probe in
    eval mode (the routers' own decisions), when the log has one. Dotted lines mark the collapse thresholds (hard
    dispatch 0.99 / 0.01, soft load 0.90 / 0.10) and, on the "all" row, a triangle marks the first step each layer
    was collapsed (hard in the dispatch column, soft in the soft-load column; filled: training, open: probe).
    """
    dyn = _as_dynamics(source)
    layers = list(dyn["train"]) or list(dyn["probe"])
    if not layers:
        raise ValueError("the routing log has no per-layer records")
    hard_t, soft_t = dyn["collapse_threshold"], dyn["soft_collapse_threshold"]
    columns = (
        ("dispatch0", "hard dispatch → expert 0", (hard_t, 1 - hard_t)),
        ("prob0", "soft load of expert 0", (soft_t, 1 - soft_t)),
        ("logit_gap", "mean logit gap (logit0 − logit1)", (0.0,)),
    )
    colours = colormaps["viridis"](np.linspace(0.0, 0.9, len(layers)))
    fig = _new_figure(figsize or (13.0, 8.5), dpi)
    axes = fig.subplots(len(LOAD_GROUPS), len(columns), sharex=True, squeeze=False)
    for row, modality in enumerate(LOAD_GROUPS):
        for col, (name, label, guides) in enumerate(columns):
            ax = axes[row][col]
            for value in guides:
                ax.axhline(value, color="grey", linestyle=":", linewidth=0.9)
            for k, layer in enumerate(layers):
                for source_name, style in (("train", "-"), ("probe", "--")):
                    series = dyn[source_name].get(layer, {}).get(modality)
                    if not series:
                        continue
                    y = np.array([np.nan if v is None else v for v in series[name]], dtype=float)
                    ax.plot(
                        series["steps"], y, style, color=colours[k], linewidth=1.4, marker=".", markersize=3
                    )
                    onset_kind = {"dispatch0": "hard", "prob0": "soft"}.get(name)
                    if modality == "all" and onset_kind:
                        first = dyn["collapse"][source_name][layer][onset_kind]["first_step"]
                        if first is not None:
                            at = series["steps"].index(first)
                            ax.scatter([first], [y[at]], marker="v", s=46, zorder=3, edgecolors=colours[k],
                                       facecolors=colours[k] if source_name == "train" else "none")  # fmt: skip
            if name != "logit_gap":
                ax.set_ylim(-0.03, 1.03)
            if row == 0:
                ax.set_title(label, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{modality} tokens")
            if row == len(LOAD_GROUPS) - 1:
                ax.set_xlabel("training step")
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=colours[k], linewidth=2, label=f"layer {layer}")
        for k, layer in enumerate(layers)
    ]
    handles += [Line2D([], [], color="black", linestyle="-", label="training batches (Gumbel, dropout)")]
    if any(dyn["probe"].values()):
        info = dyn.get("probe_info") or {}
        where = f"{info.get('n_samples', '?')} {info.get('split', '')} records".strip()
        handles += [Line2D([], [], color="black", linestyle="--", label=f"probe, eval mode ({where})")]
    handles += [Line2D([], [], color="black", marker="v", linestyle="none", label="first collapsed step")]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8)
    fig.suptitle(
        title
        or f"Routing dynamics per layer (collapse: hard dispatch ≥ {hard_t:.2f}, soft load ≥ {soft_t:.2f} of all tokens)"
    )
    return _save(fig, path, dpi)


def plot_tsne(
    embedding: Any,
    modality_labels: Any,
    concept_labels: Any,
    path: str | Path,
    concept_names: Mapping | Sequence | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (13.0, 6.0),
    dpi: int = 100,
) -> str:
    """Two t-SNE panels of the same (M, 2) points: coloured by modality (left), by concept (right).

    modality_labels, concept_labels: (M,) labels (bools, ints or strings; ``True`` is shown as "image").
    In the right panel the marker still tells the modality (circle vs triangle). ``concept_names``
    maps (or indexes) concept labels to display names.
    """
    e = to_numpy(embedding)
    mod = to_labels(modality_labels, "modality_labels")
    con = to_labels(concept_labels, "concept_labels")
    if e.ndim != 2 or e.shape[1] != 2 or not e.shape[0] == mod.shape[0] == con.shape[0]:
        raise ValueError(
            f"embedding (M, 2) and labels (M,) must match, got {e.shape}, {mod.shape}, {con.shape}"
        )
    if mod.dtype == bool:
        mod = np.where(mod, "image", "text")
    modalities = list(dict.fromkeys(mod.tolist()))
    concepts = list(dict.fromkeys(con.tolist()))

    def concept_name(c):
        if concept_names is None:
            return str(c)
        return str(concept_names[c])

    markers = ["o", "^", "s", "D", "P"]
    cmap = "tab10" if len(concepts) <= 10 else "tab20"
    fig = _new_figure(figsize, dpi)
    left, right = fig.subplots(1, 2)
    for k, m in enumerate(modalities):
        sel = mod == m
        left.scatter(
            e[sel, 0], e[sel, 1], s=14, alpha=0.75, color=f"C{k % 10}", marker=markers[k % 5], label=str(m)
        )
    colours = colormaps[cmap].colors
    for i, c in enumerate(concepts):
        for k, m in enumerate(modalities):
            sel = (con == c) & (mod == m)
            if sel.any():
                right.scatter(e[sel, 0], e[sel, 1], s=14, alpha=0.75, color=colours[i % len(colours)],
                              marker=markers[k % 5], label=concept_name(c) if k == 0 else None)  # fmt: skip
    left.set_title("coloured by modality")
    right.set_title("coloured by concept (marker = modality)")
    left.legend(fontsize=8, loc="best")
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or "t-SNE of hidden states")
    return _save(fig, path, dpi)


def plot_compositional_matrix(
    matrix: Any,
    compounds: Sequence,
    path: str | Path,
    title: str | None = None,
    annotate: bool | None = None,
    figsize: tuple[float, float] = (8.0, 7.0),
    dpi: int = 100,
) -> str:
    """Heatmap of a (K, K) colour x object matrix (Figure 8) with the binding scores in the title.

    Rows are images, columns text. White lines separate runs of compounds that share an object (order
    the compounds by object to get one block per object; a bright block without a bright diagonal is
    object dominance).
    """
    m = to_numpy(matrix)
    names = [
        c if isinstance(c, str) else "+".join(f"{a}_{b}" for a, b in parse_compound(c)) for c in compounds
    ]
    if m.shape != (len(names), len(names)):
        raise ValueError(f"matrix shape {m.shape} does not match {len(names)} compounds")
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot()
    _heatmap(fig, ax, m, names, names, annotate)
    objects = [tuple(o for _, o in parse_compound(c)) for c in compounds]
    for i in range(1, len(objects)):
        if objects[i] != objects[i - 1]:
            ax.axhline(i - 0.5, color="white", linewidth=1.5)
            ax.axvline(i - 0.5, color="white", linewidth=1.5)
    ax.set_xlabel("text of compound")
    ax.set_ylabel("images of compound")
    scores = binding_score(m, compounds)

    def fmt(block: str) -> str:
        f = scores[block]["fraction"]
        return "n/a" if f is None else f"{f:.2f}"

    ax.set_title(
        (title or "Compositional similarity")
        + f"\nbinding (text→image): colour {fmt('attribute')}, object {fmt('object')}, swap {fmt('swap')}"
    )
    return _save(fig, path, dpi)


# `analysis._EXPORTS["figures"]` must equal this list (tests/test_analysis_exports.py).
def plot_router_saturation(
    saturation: Mapping, path: str | Path, title: str | None = None, dpi: int = 100
) -> str:
    """How soon each token's expert stops changing: per token group (image, text, all tokens) the share of probe
    tokens already on their final expert for good, at each probed step, one line per layer
    (`saturation.router_saturation`'s `settled_by`); a dotted line marks the 90 % level."""
    layers = saturation.get("layers") or {}
    if not layers:
        raise ValueError(f"no saturation to draw: {saturation.get('skipped', 'no layers')}")
    steps = saturation["steps"]
    colours = colormaps["viridis"](np.linspace(0.0, 0.9, len(layers)))
    fig = _new_figure((12.0, 3.8), dpi)
    axes = fig.subplots(1, len(LOAD_GROUPS), sharey=True, squeeze=False)[0]
    for ax, group in zip(axes, LOAD_GROUPS):
        ax.axhline(saturation["settled_level"], color="grey", linestyle=":", linewidth=0.9)
        for k, (layer, per_group) in enumerate(layers.items()):
            summary = per_group.get(group)
            if summary:
                ax.plot(steps, summary["settled_by"], color=colours[k], marker=".", markersize=3,
                        label=f"layer {layer} (changed {summary['changed_share']:.0%})")  # fmt: skip
        ax.set_title(f"{group} tokens", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("share settled on final expert")
    fig.suptitle(title or "Router saturation: probe tokens settled on their final expert")
    return _save(fig, path, dpi)


def plot_ablation_metric(
    points: Sequence[tuple[str, Mapping | None]], path: str | Path, title: str = "", dpi: int = 120
) -> str:
    """One metric across ablation variants: per variant its seeds' values (dots), their mean (bar) and the 95 % t
    interval (whisker); `points` is `[(variant, summary)]` with summary `pipeline.seeds.interval` plus `values`
    ({seed: value}), None where the variant has no value."""
    fig = _new_figure((max(6.0, 0.75 * len(points) + 2), 3.6), dpi)
    ax = fig.add_subplot(1, 1, 1)
    for x, (_, summary) in enumerate(points):
        if not summary or summary.get("mean") is None:
            continue
        ax.bar(x, summary["mean"], width=0.6, color="#9ecae1", edgecolor="#3182bd")
        if summary.get("low") is not None:
            ax.errorbar(x, summary["mean"], yerr=[[summary["mean"] - summary["low"]], [summary["high"] - summary["mean"]]],
                        color="black", capsize=4)  # fmt: skip
        values = [v for v in (summary.get("values") or {}).values() if v is not None]
        ax.scatter([x] * len(values), values, color="#de2d26", s=14, zorder=3)
    ax.set_xticks(range(len(points)), [name for name, _ in points], rotation=35, ha="right")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path, dpi)


__all__ = [
    "plot_ablation_metric",
    "plot_compositional_matrix",
    "plot_expert_load",
    "plot_router_saturation",
    "plot_routing_dynamics",
    "plot_similarity_matrix",
    "plot_tsne",
]
