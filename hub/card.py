"""The model card (`README.md`) of a published moe-vlm checkpoint, built with `huggingface_hub.ModelCard`.

Metadata (`ModelCardData`): library, pipeline tag, base models, datasets, tags, license, and the measured numbers in
`model-index` form (`EvalResult`): COCO caption metrics from `captioning.json` and, from `analysis.json`, the paper's
binomial test of the concept-modality diagonal, the number of collapsed layers under both definitions (hard: top-1
dispatch, the paper's; soft: mean router probability, the authors' code's) and the crossover loss increase.
The body shows how to load the model with `trust_remote_code=True`, the stages it came from, its training-time
routing per layer and modality, the routing figures, and the files of the repository.

Everything here is pure: dicts in, a `ModelCard` out (no network; `ModelCard.validate` is the Hub's business).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from analysis.load import collapse_definitions

PAPER = "Expert Collapse and Compositional Failure in Simple Multimodal MoE (Ticinovic & Han)"
PIPELINE_TAG = "image-text-to-text"
BASE_TAGS = ("moe", "mixture-of-experts", "vision-language", "multimodal", "expert-collapse", "custom_code")
# Hub dataset ids of the loaders' sources; the Shapes world is generated on the spot and has none.
DATASET_IDS = {"llava": "liuhaotian/LLaVA-Instruct-150K"}
# captioning.json "metrics" keys (COCO names, as `analysis.captioning` writes them) -> (model-index type, display name).
CAPTION_METRICS = {
    "Bleu_4": ("bleu", "BLEU-4"),
    "METEOR": ("meteor", "METEOR"),
    "ROUGE_L": ("rouge", "ROUGE-L"),
    "CIDEr": ("cider", "CIDEr"),
}
_CAPTION_ALIASES = {"BLEU-4": "Bleu_4", "BLEU_4": "Bleu_4", "ROUGE-L": "ROUGE_L"}
# What the numbers were measured on when the JSON does not say: the generated Shapes world's splits.
EVAL_DATASET = "shapes-world"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(value) -> bool:
    """`owner/name` that is not a path on this machine (a stage's `"from"` may be either)."""
    return isinstance(value, str) and bool(_HUB_ID.match(value)) and not Path(value).exists()


def open_clip_hub_id(spec: str) -> str | None:
    """The Hub repository of an open_clip `NAME:TAG` (e.g. `ViT-L-14:openai` -> `timm/vit_large_patch14_clip_224
    .openai`), from open_clip's own registry; None when it has no Hub copy or the spec is not `NAME:TAG`."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        return None
    import open_clip

    name, tag = spec.split(":")
    hub = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub")
    return (hub.strip("/") or None) if hub else None


def base_models(markers: Sequence[dict]) -> list[str]:
    """Hub ids the weights derive from: the dense Mistral and CLIP tower named in the Stage-0 marker, and a Hub
    model a later stage started from (`"from"`). Local paths are left out: they mean nothing on the Hub."""
    found: list[str] = []
    for marker in markers:
        candidates = [marker.get("mistral"), open_clip_hub_id(marker.get("vision"))]
        if marker is markers[0]:  # only the oldest readable stage can have started from a Hub model
            candidates.append(marker.get("from"))
        found += [c for c in candidates if looks_like_hub_id(c) and c not in found]
    return found


def datasets_from_recipes(recipes: Sequence[dict]) -> list[str]:
    """Hub dataset ids of the data the stages trained on (`dataset` field of each resolved recipe)."""
    ids = [DATASET_IDS.get(str(r.get("dataset"))) for r in recipes]
    return list(dict.fromkeys(i for i in ids if i))


def _caption_metrics(captioning: dict) -> dict[str, float]:
    """{COCO name: value x 100} from a captioning.json: its `metrics.scaled` block (the paper's table convention),
    else raw values x 100, also accepting `BLEU-4`-style keys."""
    metrics = captioning.get("metrics", captioning)
    scaled = metrics.get("scaled") or {}
    out = {}
    for key in CAPTION_METRICS:
        aliases = [key, *(a for a, k in _CAPTION_ALIASES.items() if k == key)]
        if scaled.get(key) is not None:
            out[key] = float(scaled[key])
            continue
        raw = next((metrics[a] for a in aliases if metrics.get(a) is not None), None)
        if raw is not None:
            out[key] = 100.0 * float(raw)
    return out


def _last_layer(block: dict | None) -> tuple[str, dict] | None:
    if not block:
        return None
    layer = max(block, key=int)
    return layer, block[layer]


def eval_results(analysis: dict | None, captioning: dict | None) -> list[EvalResult]:
    """The measured numbers as `model-index` entries. Caption metrics on the evaluation split; the binomial test
    (k of n concepts whose visual row peaks on its own textual column, and its one-tailed p) at the last layer;
    the collapsed-layer counts (hard and soft, `collapse_definitions`) and the crossover loss increase on the probe
    samples."""
    results: list[EvalResult] = []
    if captioning:
        split = str(captioning.get("split", "test"))
        n = captioning.get("n")
        for key, value in _caption_metrics(captioning).items():
            metric_type, name = CAPTION_METRICS[key]
            results.append(
                EvalResult(
                    task_type="image-to-text",
                    task_name="Image captioning",
                    dataset_type=str(captioning.get("data") or EVAL_DATASET),
                    dataset_name=f"moe-vlm evaluation split ({split}" + (f", n={n})" if n else ")"),
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=f"{name} (x100)",
                    metric_value=round(value, 4),
                )
            )
    if analysis:
        probe = analysis.get("probe", {})
        probe_name = (
            f"concept probe ({probe.get('set', 'concept_probe')}, {probe.get('n_per_concept', '?')}/concept)"
        )

        def add(metric_type: str, name: str, value, config: str | None = None) -> None:
            if value is None:  # analysis.json writes a non-finite number as null: nothing to report
                return
            results.append(
                EvalResult(
                    task_type=PIPELINE_TAG,
                    task_name="Expert specialisation and collapse",
                    dataset_type=EVAL_DATASET,
                    dataset_name=probe_name,
                    metric_type=metric_type,
                    metric_name=name,
                    metric_value=value,
                    metric_config=config,
                )
            )

        last = _last_layer(analysis.get("binomial"))
        if last is not None:
            layer, b = last
            add("binomial_k", f"diagonal hits k of n={b['n']} (layer {layer})", b.get("k"), f"layer{layer}")
            add("p_value", f"binomial p-value (layer {layer})", b.get("p_value"), f"layer{layer}")
        load = analysis.get("load") or {}
        hard, soft = collapse_definitions(load)
        of = f"collapsed layers of {load.get('n_layers')}"
        add("collapsed_layers", f"{of} (hard: {hard})", load.get("n_collapsed"), "hard")
        add("collapsed_layers_soft", f"{of} (soft: {soft})", load.get("n_collapsed_soft"), "soft")
        crossover = (analysis.get("crossover") or {}).get("increase_pct")
        add(
            "crossover_loss_increase",
            "crossover loss increase (%)",
            None if crossover is None else round(crossover, 4),
        )
    return results


def card_data(
    repo_id: str,
    *,
    markers: Sequence[dict],
    analysis: dict | None = None,
    captioning: dict | None = None,
    base_model: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    license: str = "apache-2.0",
) -> ModelCardData:
    """The card's YAML metadata. `base_model` None: derived from the stage markers; `datasets`: Hub dataset ids
    (`datasets_from_recipes` derives them from the stages' recipes)."""
    stage = str(markers[-1].get("stage", "unknown")) if markers else "unknown"
    results = eval_results(analysis, captioning)
    bases = list(base_model) if base_model is not None else base_models(markers)
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        license=license,
        language=["en"],
        base_model=bases or None,
        datasets=list(datasets or []) or None,
        tags=[*BASE_TAGS, f"stage-{stage.replace('.', '_')}"],
        # model_name only names the model-index entry; without results it would be a stray metadata key.
        model_name=repo_id.split("/")[-1] if results else None,
        eval_results=results or None,
    )


# ----- the body ----------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _loading_section(repo_id: str, config: dict) -> str:
    version = config.get("transformers_version", "5")
    image_marker = "<image>"
    return f"""## Load it

```python
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
image = Image.open("picture.png").convert("RGB")
inputs = processor(images=[image], text=["{image_marker}\\nA red circle."], return_tensors="pt")
out = model(**inputs, output_router_logits=True)
out.router_indices  # one (tokens, 1) tensor per MoE layer: the expert each token went to
```

Or caption an image the way other VLMs are reached (`AutoModelForImageTextToText` loads it too):

```python
from transformers import pipeline

captioner = pipeline("image-text-to-text", model="{repo_id}", trust_remote_code=True)
captioner(images=image, text="{image_marker}\\n", max_new_tokens=20, return_full_text=False)[0]["generated_text"]
```

The model code ships in this repository (`modeling_moe_vlm.py`, `configuration_moe_vlm.py`,
`processing_moe_vlm.py`), hence `trust_remote_code=True`. It needs `transformers>={version}` and open_clip for the
vision tower: `pip install "transformers>={version}" open_clip_torch` (the package installs as `open_clip_torch` and
imports as `open_clip`). `model.set_router_mode("hard" | "gumbel" | "softmax" | "modality_aware")` switches the
routing in place; `model.set_invert_routing(True)` sends every token to the other expert.
"""


def _architecture_section(config: dict) -> str:
    vision = config.get("vision_config") or {}
    vision_name = vision.get("model_name") or "an inline open_clip ViT"
    moe_layers = config.get("moe_layers")
    return (
        "## The model\n\n"
        f"A Mistral-shaped decoder ({config.get('num_hidden_layers')} layers, hidden size {config.get('hidden_size')}, "
        f"vocabulary {config.get('vocab_size')}) whose FFN in layers {moe_layers} is a Mixture of "
        f"{config.get('num_experts')} experts behind a top-{config.get('num_experts_per_tok')} linear router, a frozen "
        f"CLIP vision tower ({vision_name}) and a {config.get('connector_type')} connector; routing mode "
        f"`{config.get('router_mode')}`. It is the testbed of *{PAPER}*: expert 0 is meant for image tokens, "
        "expert 1 for text tokens.\n"
    )


_MARKER_COLUMNS = (("stage", "stage"), ("name", "what trained"), ("steps", "steps"), ("train_loss", "train loss"),
                   ("router_mode", "router mode"), ("train_split", "data split"), ("seconds", "seconds"))  # fmt: skip


def _stages_section(markers: Sequence[dict]) -> str:
    lines = [
        "## Where it came from",
        "",
        f"This checkpoint is the output of Stage {markers[-1].get('stage')} ({markers[-1].get('name', '')}). "
        "The stages behind it, oldest first:",
        "",
        "| " + " | ".join(title for _, title in _MARKER_COLUMNS) + " |",
        "|" + " --- |" * len(_MARKER_COLUMNS),
    ]
    for marker in markers:
        lines.append("| " + " | ".join(_fmt(marker.get(key)) for key, _ in _MARKER_COLUMNS) + " |")
    trainable = markers[-1].get("trainable")
    if trainable:
        lines += ["", f"Trained in the last stage: {', '.join(map(str, trainable))}."]
    return "\n".join(lines) + "\n"


# What a figure shows, by file stem, where its name alone does not say (`analysis.run.analyze` writes these).
FIGURE_CAPTIONS = {
    "routing_dynamics": "Routing over the training steps of this stage, per layer (colour) and token group (rows): "
    "hard dispatch to expert 0, soft load of expert 0 (mean router probability) and the mean logit gap "
    "(logit0 - logit1). Solid: the training batches as routed (Gumbel noise, router dropout); dashed: a fixed "
    "held-out probe routed in eval mode (the routers' own decisions). Dotted lines: the collapse thresholds; "
    "triangles: the first step each layer was collapsed.",
}


def _routing_section(routing: dict, figures: Sequence[str]) -> str:
    lines = ["## Routing", ""]
    logged = [(key, s) for key, s in routing.get("stages", {}).items() if s.get("layers")]
    if logged:
        key, stage = logged[-1]
        lines += [
            f"Expert load logged during training of Stage {stage['stage']} (last logged step {stage.get('last_step')};"
            " share of tokens dispatched to each expert, and mean routing entropy in nats). `routing_stats.json` has"
            " every stage, the last values and the run means.",
            "",
            "| layer | image → e0 | image → e1 | text → e0 | text → e1 | entropy (all) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for layer, per_modality in stage["layers"].items():
            cells = []
            for modality in ("image", "text"):
                dispatch = per_modality.get(modality, {}).get("last", {}).get("dispatch") or [None, None]
                cells += [_fmt(dispatch[0]), _fmt(dispatch[1] if len(dispatch) > 1 else None)]
            entropy = per_modality.get("all", {}).get("last", {}).get("entropy")
            lines.append(f"| {layer} | " + " | ".join(cells) + f" | {_fmt(entropy)} |")
    else:
        lines.append(
            "No training-time routing was logged for this checkpoint (`routing_stats.json` lists its stages)."
        )
    if figures:
        lines.append("")
        for path in figures:
            lines += [f"![{Path(path).stem}]({path})", ""]
            caption = FIGURE_CAPTIONS.get(Path(path).stem)
            if caption:
                lines += [f"*{caption}*", ""]
    return "\n".join(lines) + "\n"


def _collapse_text(analysis: dict | None) -> str:
    """Which layers collapsed on the probe samples, under both definitions, and what each means."""
    load = (analysis or {}).get("load") or {}
    hard, soft = collapse_definitions(load)
    text = (
        f"Collapse is reported under two definitions: *hard* (the paper's), {hard}; *soft* (load as the authors' "
        f"code measures it), {soft}. A router that sends nearly every token to one expert on small logit gaps is "
        "hard-collapsed while its soft load stays near even, so the two can disagree."
    )
    if load.get("n_collapsed") is not None:
        n = load.get("n_layers")
        layers = load.get("collapsed_layers")
        text += f" This checkpoint: hard {load['n_collapsed']}/{n}" + (
            f" (layers {layers})" if layers else ""
        )
        if load.get("n_collapsed_soft") is not None:
            soft_layers = load.get("collapsed_layers_soft")
            text += f", soft {load['n_collapsed_soft']}/{n}" + (
                f" (layers {soft_layers})" if soft_layers else ""
            )
        text += "."
    return text


def _evaluation_section(results: Sequence[EvalResult], analysis: dict | None = None) -> str:
    if not results:
        return (
            "## Evaluation\n\nNo `analysis.json` or `captioning.json` was published with this checkpoint.\n"
        )
    lines = ["## Evaluation", "", "| task | data | metric | value |", "| --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.task_name} | {r.dataset_name} | {r.metric_name} | {_fmt(r.metric_value, 4)} |")
    lines += [
        "",
        "Caption metrics are COCO's (pycocoevalcap, PTB tokenizer), multiplied by 100 as in the paper's table. The "
        "binomial test counts the concepts whose visual representation is most similar to its own textual one "
        "(k of n) against chance 1/n. "
        + _collapse_text(analysis)
        + " `analysis.json` and `captioning.json` carry every number with what it was computed on.",
    ]
    return "\n".join(lines) + "\n"


def _files_section(files: Sequence[str]) -> str:
    return "## Files\n\n" + "\n".join(f"- `{name}`" for name in sorted(files)) + "\n"


def build_card(
    repo_id: str,
    *,
    markers: Sequence[dict],
    config: dict,
    routing: dict,
    analysis: dict | None = None,
    captioning: dict | None = None,
    figures: Sequence[str] = (),
    files: Sequence[str] = (),
    base_model: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """The whole card: metadata + body. `markers` oldest stage first (as `hub.stats.stage_chain` gives them, with
    local paths already removed), `config` the model's config.json, `routing` the routing_stats.json dict,
    `figures` repository paths of PNGs, `files` every repository path (the card lists them)."""
    data = card_data(
        repo_id,
        markers=markers,
        analysis=analysis,
        captioning=captioning,
        base_model=base_model,
        datasets=datasets,
        license=license,
    )
    name = repo_id.split("/")[-1]
    stage = markers[-1].get("stage") if markers else "?"
    body = "\n".join(
        [
            f"# {name}",
            "",
            f"A two-expert multimodal Mixture-of-Experts vision-language model, Stage {stage} of the moe-vlm "
            f"reproduction of *{PAPER}*, published with its per-layer routing statistics so you can see which "
            "expert image and text tokens go to.",
            "",
            _loading_section(repo_id, config),
            _architecture_section(config),
            _stages_section(markers) if markers else "",
            _routing_section(routing, figures),
            _evaluation_section(data.eval_results or [], analysis),
            _files_section(files),
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


__all__ = [
    "BASE_TAGS",
    "PIPELINE_TAG",
    "base_models",
    "build_card",
    "card_data",
    "datasets_from_recipes",
    "eval_results",
    "looks_like_hub_id",
    "open_clip_hub_id",
]
