"""What the Space shows about routing: read it from the model's outputs, then draw it.

`read_routing` is the only part that runs the model: one forward pass over the prompt *and* the generated answer
with `output_router_logits=True`, reading `router_logits` / `router_indices` / `modality_mask` from the output
dataclass (the model records them; nothing here hooks into modules). Under causal attention every token's routing
in that pass is the routing it had while the answer was generated, so one pass shows both.

Everything else is a pure function of the routing dict (the format of `analysis.routing.route_sample`, plus
`n_prompt`), so it works on any recorded routing and is testable without a model:

    {"tokens": [str], "is_image": [bool], "n_prompt": int,
     "layers": {layer_idx: {"choice": [int], "prob": [[float]], "counts": {"image": [n_e], "text": [n_e]}}}}

This module must not import the project's other packages: on a Hub Space only `space/` and `requirements.txt`
exist.
"""

from __future__ import annotations

import io

import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

# Expert colours, shared by the heatmap, the load chart and the token highlight (tab10's first hues; expert 0
# blue, expert 1 orange): one legend reads all three.
EXPERT_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
IMAGE_TOKEN_LABEL = "[IMG]"


# ----- reading the model's outputs ------------------------------------------------------------------------------
@torch.no_grad()
def read_routing(
    model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, tokens: list[str], n_prompt: int
):
    """Per-MoE-layer routing of one sequence (prompt + answer), read from the model's output dataclass.

    input_ids: (1, seq); pixel_values: (images, 3, S, S); tokens: the `seq` token strings; n_prompt: how many of
    them are the prompt (the rest is the generated answer).
    """
    # logits_to_keep=1: the 32k-vocabulary head is not needed for routing, only the decoder's router outputs.
    out = model(input_ids=input_ids, pixel_values=pixel_values, output_router_logits=True, logits_to_keep=1)
    is_image = out.modality_mask[0].cpu()  # (seq,)
    num_experts = model.config.num_experts
    layers = {}
    for layer_idx, logits, index in zip(model.config.moe_layers, out.router_logits, out.router_indices):
        choice = index[:, 0].cpu()  # (seq,) top-1 expert of each token (batch of one)
        layers[int(layer_idx)] = {
            "choice": choice.tolist(),
            "prob": logits.float().softmax(-1).cpu().tolist(),  # (seq, E) router probabilities
            "counts": {
                "image": torch.bincount(choice[is_image], minlength=num_experts).tolist(),
                "text": torch.bincount(choice[~is_image], minlength=num_experts).tolist(),
            },
        }
    return {
        "tokens": list(tokens),
        "is_image": is_image.tolist(),
        "n_prompt": int(n_prompt),
        "layers": layers,
    }


# ----- small helpers ----------------------------------------------------------------------------------------------
def num_experts_of(routing: dict) -> int:
    first = next(iter(routing["layers"].values()))
    return len(first["counts"]["image"])


def expert_label(expert: int) -> str:
    return f"expert {expert}"


def expert_colour_map(num_experts: int) -> dict[str, str]:
    """`{"expert 0": "#1f77b4", ...}`: the colour map of `gr.HighlightedText`, equal to the figures' colours."""
    return {expert_label(e): EXPERT_COLOURS[e % len(EXPERT_COLOURS)] for e in range(num_experts)}


def display_token(token: str) -> str:
    """A SentencePiece token as text: '▁' is a leading space, byte tokens like '<0x0A>' are their character."""
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        return chr(int(token[3:5], 16))
    return token.replace("▁", " ")


def tick_label(token: str) -> str:
    """A token as an axis label: visible whitespace, so a newline or a lone space still shows."""
    text = display_token(token)
    return text.replace("\n", "\\n").strip() or "␣"


def chosen_probability(layer: dict) -> list[float]:
    """The router probability of the expert each token was dispatched to (low under `hard` or inverted routing
    means the router would have chosen otherwise)."""
    return [probs[e] for probs, e in zip(layer["prob"], layer["choice"])]


def segments(routing: dict) -> list[tuple[str, int, int]]:
    """Contiguous spans of the sequence as `(name, start, stop)`: image placeholders, prompt text, answer."""
    n_prompt = routing.get("n_prompt", len(routing["tokens"]))
    kinds = [
        "image" if img else ("prompt" if i < n_prompt else "answer")
        for i, img in enumerate(routing["is_image"])
    ]
    spans, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            spans.append((kinds[start], start, i))
            start = i
    return spans


def figure_to_image(figure: Figure, dpi: int = 110) -> Image.Image:
    """Render a figure to a PIL image (no pyplot: its global state is not thread-safe, and Gradio runs handlers
    in threads)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


# ----- figures ------------------------------------------------------------------------------------------------------
def heatmap_figure(routing: dict, title: str = "") -> Figure:
    """Layer × token heatmaps: the expert each token went to (top) and the router probability of that expert
    (bottom). Image placeholders are one labelled span; text tokens are labelled one by one."""
    layer_ids = list(routing["layers"])
    num_experts = num_experts_of(routing)
    choice = [routing["layers"][i]["choice"] for i in layer_ids]  # (layers, seq)
    prob = [chosen_probability(routing["layers"][i]) for i in layer_ids]  # (layers, seq)
    n_tokens = len(routing["tokens"])

    width = min(28.0, max(9.0, 0.14 * n_tokens + 2.5))
    height = 2.4 + min(0.9 * len(layer_ids), 12.0)  # a 32-layer model stays on one screen
    figure = Figure(figsize=(width, height))
    top, bottom = figure.subplots(2, 1, sharex=True)
    colours = ListedColormap([EXPERT_COLOURS[e % len(EXPERT_COLOURS)] for e in range(num_experts)])
    experts = top.imshow(
        choice, cmap=colours, vmin=-0.5, vmax=num_experts - 0.5, aspect="auto", interpolation="nearest"
    )
    probability = bottom.imshow(
        prob, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest"
    )
    # Both panels get a colour bar (the top one is the expert legend), so their token columns line up.
    legend = figure.colorbar(experts, ax=top, fraction=0.02, pad=0.01, ticks=range(num_experts))
    legend.ax.set_yticklabels([expert_label(e) for e in range(num_experts)])
    legend.set_label("dispatched to")
    figure.colorbar(probability, ax=bottom, fraction=0.02, pad=0.01, label="probability")

    for axis, what in ((top, "chosen expert"), (bottom, "router p(chosen expert)")):
        axis.set_yticks(
            range(len(layer_ids)), [f"layer {i}" for i in layer_ids], fontsize=8 if len(layer_ids) > 8 else 10
        )
        axis.set_ylabel(what)
        for *_, stop in segments(routing)[:-1]:  # boundaries between image / prompt / answer
            axis.axvline(stop - 0.5, color="black", linewidth=1.5)
    for name, start, stop in segments(routing):
        if stop - start >= 3:  # a lone BOS token needs no heading
            label = f"{name} ({stop - start} tokens)" if name == "image" else name
            top.annotate(
                label,
                xy=((start + stop - 1) / 2, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=9,
            )

    # x ticks: every text token by name; the image placeholders once, at the middle of their span.
    ticks, labels = [], []
    for name, start, stop in segments(routing):
        if name == "image":
            ticks.append((start + stop - 1) / 2)
            labels.append(f"{IMAGE_TOKEN_LABEL} ×{stop - start}")
        else:
            ticks.extend(range(start, stop))
            labels.extend(tick_label(routing["tokens"][i]) for i in range(start, stop))
    bottom.set_xticks(ticks, labels, rotation=90, fontsize=7)
    bottom.set_xlabel("token, in sequence order (image placeholders, prompt text, generated answer)")
    figure.suptitle(title or "Routing per MoE layer and token", fontsize=12)
    return figure


def load_figure(routing: dict, title: str = "") -> Figure:
    """Per-layer expert load split by modality: for each MoE layer, one bar for the image tokens and one for the
    text tokens (prompt + answer), each stacked by the share of those tokens every expert took."""
    layer_ids = list(routing["layers"])
    num_experts = num_experts_of(routing)
    n_image = sum(routing["is_image"])
    n_text = len(routing["is_image"]) - n_image

    many = len(layer_ids) > 8  # a 32-layer model: compact labels, no numbers in the narrow bars
    figure = Figure(figsize=(min(24.0, max(6.0, 1.5 * len(layer_ids) + 2.5)), 4.2))
    axis = figure.subplots()
    positions, tick_labels = [], []
    for slot, layer_idx in enumerate(layer_ids):
        for offset, modality, hatch in ((-0.22, "image", "//"), (0.22, "text", "")):
            counts = routing["layers"][layer_idx]["counts"][modality]
            total = sum(counts)
            x, bottom = slot + offset, 0.0
            for expert, count in enumerate(counts):
                share = count / total if total else 0.0
                axis.bar(
                    x,
                    share,
                    width=0.4,
                    bottom=bottom,
                    color=EXPERT_COLOURS[expert % len(EXPERT_COLOURS)],
                    hatch=hatch,
                    edgecolor="white",
                    linewidth=0.5,
                )
                if share >= 0.08 and not many:  # label segments big enough to hold a number
                    axis.text(
                        x, bottom + share / 2, str(count), ha="center", va="center", fontsize=8, color="white"
                    )
                bottom += share
            positions.append(x)
            tick_labels.append(f"layer {layer_idx} {modality}" if many else f"{modality}\nlayer {layer_idx}")
    axis.set_xticks(positions, tick_labels, fontsize=7 if many else 8, rotation=90 if many else 0)
    axis.set_ylim(0, 1)
    axis.set_ylabel("share of the modality's tokens")
    axis.set_xlabel("MoE layer and modality" + ("" if many else " (numbers: tokens)"))
    axis.legend(
        handles=[
            Patch(color=EXPERT_COLOURS[e % len(EXPERT_COLOURS)], label=expert_label(e))
            for e in range(num_experts)
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title="expert",
        fontsize=8,
    )
    axis.set_title(
        title or f"Expert load by modality ({n_image} image tokens, {n_text} text tokens)", fontsize=11
    )
    return figure


def highlighted_tokens(routing: dict, layer_idx: int) -> list[tuple[str, str | None]]:
    """The prompt and answer tokens, each labelled with the expert it went to at `layer_idx`, for
    `gr.HighlightedText`; the image placeholders are one unlabelled summary, the answer starts after a marker."""
    layer = routing["layers"][layer_idx]
    items: list[tuple[str, str | None]] = []
    for name, start, stop in segments(routing):
        if name == "image":
            counts = [layer["choice"][start:stop].count(e) for e in range(num_experts_of(routing))]
            split = ", ".join(f"{n} → e{e}" for e, n in enumerate(counts))
            items.append((f"[image: {stop - start} tokens; {split}] ", None))
            continue
        if name == "answer":
            items.append(("  ⟶ answer: ", None))
        items.extend(
            (display_token(routing["tokens"][i]), expert_label(layer["choice"][i]))
            for i in range(start, stop)
        )
    return items


def nearest_layer(routing: dict, layer: float) -> int:
    """The MoE layer closest to a slider value (MoE layers need not be contiguous)."""
    return min(routing["layers"], key=lambda i: (abs(i - layer), i))


__all__ = [
    "EXPERT_COLOURS",
    "chosen_probability",
    "display_token",
    "expert_colour_map",
    "figure_to_image",
    "heatmap_figure",
    "highlighted_tokens",
    "load_figure",
    "nearest_layer",
    "read_routing",
    "segments",
]
