"""`moe-vlm analyze` and `moe-vlm evaluate`: every analysis of the paper on one checkpoint, written as
`analysis.json` / `captioning.json` (numbers keyed by layer, each with what it was computed on) plus figures.

Model running lives in `extract.py`, statistics in the pure modules; this file only wires them and records
provenance (probe set, N, seed, router mode).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from configuration.atomic import write_atomic
from configuration.cli_inputs import check_out_dir
from configuration.contract import ANALYSIS_FILE, CAPTIONING_FILE, PROBE_CHOICES_FILE, ROUTING_LOG_FILE
from trainer.routing_stats import read_routing_log

from . import figures
from ._arrays import jsonable
from .captioning import (
    CaptionEvaluator,
    caption_metrics,
    caption_prompt,
    evaluation_prompt_formats,
    training_prompt_format,
)
from .cka import linear_cka, weight_distance
from .compositional import binding_score, canonical_compound, compositional_matrix
from .extract import (
    concept_labels,
    crossover_test,
    expert_outputs,
    expert_weights,
    generate_captions,
    probe_states,
    routing_arrays,
)
from .grounding import caption_grounding
from .information import routing_information_report
from .instruction import instruction_accuracy, instruction_records
from .load import DYNAMICS_FIELDS, load_report, routing_dynamics
from .saturation import read_probe_choices, router_saturation
from .similarity import MATRIX_VARIANTS, group_concepts
from .stats import diagonal_tests, silhouette_interval
from .tsne import silhouettes, tsne_embed


def load_checkpoint(model_dir: str | Path, allow_pickle: bool = False):
    """Model (eval mode) + processor of a stage directory or Hub id, through the Auto classes: safetensors weights
    only unless `allow_pickle`, and refused when the config does not match the weights (`trainer.safe_loading`)."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    from trainer.safe_loading import from_pretrained_checked

    path = Path(model_dir)
    if not (path / "config.json").is_file() and path.exists():
        raise FileNotFoundError(
            f"{model_dir} has no config.json: not a model directory (run `moe-vlm train` first)"
        )
    model = from_pretrained_checked(
        AutoModelForCausalLM, model_dir, allow_pickle=allow_pickle, trust_remote_code=True
    ).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=True)
    return model, processor


def load_data(data_dir: str | Path | None, seed: int, image_size: int):
    """The probe/test splits: a saved DatasetDict (`--data`), else the Shapes world (generated once, cached)."""
    if data_dir is not None:
        from datasets import load_from_disk

        return load_from_disk(str(data_dir))
    from trainer.data import build_shapes

    return build_shapes(seed=seed, image_size=image_size)


def first_rows(split, limit: int | None) -> list:
    """The first `limit` records of a dataset split (all of them when None) as a list of dicts."""
    n = len(split) if limit is None else min(limit, len(split))
    return [split[i] for i in range(n)]


def concept_analysis(
    states: dict, labels: np.ndarray, names: list[str], layers: list[int], seed: int, n_perm: int
) -> dict:
    """Both concept-modality matrices (``raw``, the paper's; ``centred``, each modality's mean over concepts
    removed) and the three tests of each diagonal (binomial with null 1/C, permutation, bootstrap), per layer.

    Returns {variant: {layer: ``stats.diagonal_tests`` dict}} for every variant of ``MATRIX_VARIANTS``.
    """
    out = {variant: {} for variant in MATRIX_VARIANTS}
    for layer in layers:
        visual = group_concepts(states["visual"][layer + 1], labels, len(names))  # (C, N, D)
        textual = group_concepts(states["textual"][layer + 1], labels, len(names))
        for variant in MATRIX_VARIANTS:
            out[variant][layer] = diagonal_tests(
                visual,
                textual,
                center=variant == "centred",
                n_permutations=n_perm,
                n_boot=n_perm,
                seed=seed,
                null_p=1.0 / len(names),
            )
    return out


def compositional_analysis(states: dict, records: list, layers: list[int]):
    # Images of one compound are pooled whatever order its objects were listed in (a Shapes world can hold both).
    canonical = [{"compound": canonical_compound(r["compound"])} for r in records]
    names, labels = concept_labels(canonical, "compound")
    out = {}
    for layer in layers:
        visual = np.stack([states["visual"][layer + 1][labels == k].mean(0) for k in range(len(names))])
        textual = np.stack([states["textual"][layer + 1][labels == k].mean(0) for k in range(len(names))])
        matrix = compositional_matrix(visual, textual, names)
        out[layer] = {"matrix": matrix, "binding": binding_score(matrix, names)}
    return names, out


def expert_similarity(model, collator, records: list, init_model=None) -> dict:
    """Linear CKA between the experts' outputs on the same tokens, and each expert's weight distance from the
    shared upcycled initialisation (`init_model`, e.g. the Stage-0 checkpoint) when given."""
    outputs = expert_outputs(model, collator, records)
    init = expert_weights(init_model) if init_model is not None else None
    result = {}
    for layer, outs in outputs.items():
        entry = {"cka_experts_0_1": linear_cka(outs[0], outs[1]), "n_tokens": int(outs.shape[1])}
        if init is not None and layer in init:
            weights = expert_weights(model)[layer]
            entry["weight_distance"] = {
                f"expert{e}": {
                    name: weight_distance(weights[name][e], init[layer][name][0])
                    for name in ("gate_up_proj", "down_proj")
                }
                for e in range(outs.shape[0])
            }
        result[layer] = entry
    return result


ROUTING_DYNAMICS_FIGURE = "routing_dynamics.png"


def routing_dynamics_summary(dynamics: dict) -> dict:
    """The compact, JSON-sized part of a `load.routing_dynamics` result that analysis.json keeps (the full time
    series stay in the routing log and the figure).

    Returns dict(source (the log's file name), n_logs, first_step, last_step, probe (the probe's split / n_samples /
    mode, or None), collapse_threshold, soft_collapse_threshold, collapse (as `routing_dynamics`: {source: {layer:
    {"hard": onset, "soft": onset}}}, onset = first_step, expert, at_end, n_collapsed_logs), final: {source: {layer:
    {modality: {step, dispatch0, prob0, logit_gap, logit_margin, entropy, agreement}}}} (each series' last logged
    value), layers: {layer: {train_hard_first_step, train_soft_first_step, probe_hard_first_step,
    probe_soft_first_step, train_agreement, probe_logit_gap, probe_dispatch0}} (the "all" tokens; None where the
    log lacks it)). `source` is "train" (the training batches as routed) or "probe" (the held-out eval-mode probe).
    """
    final = {
        source: {
            layer: {
                modality: {"step": series["steps"][-1], **{f: series[f][-1] for f in DYNAMICS_FIELDS}}
                for modality, series in per_modality.items()
                if series["steps"]
            }
            for layer, per_modality in dynamics[source].items()
        }
        for source in ("train", "probe")
    }

    def at(source: str, layer: str, field: str):
        return ((final[source].get(layer) or {}).get("all") or {}).get(field)

    def onset(source: str, layer: str, kind: str):
        return ((dynamics["collapse"].get(source) or {}).get(layer) or {}).get(kind, {}).get("first_step")

    layers = sorted(set(dynamics["train"]) | set(dynamics["probe"]), key=int)
    steps = dynamics["steps"]
    return {
        "source": ROUTING_LOG_FILE,
        "n_logs": len(steps),
        "first_step": steps[0] if steps else None,
        "last_step": steps[-1] if steps else None,
        "probe": dynamics["probe_info"],
        "collapse_threshold": dynamics["collapse_threshold"],
        "soft_collapse_threshold": dynamics["soft_collapse_threshold"],
        "collapse": dynamics["collapse"],
        "final": final,
        "layers": {
            layer: {
                "train_hard_first_step": onset("train", layer, "hard"),
                "train_soft_first_step": onset("train", layer, "soft"),
                "probe_hard_first_step": onset("probe", layer, "hard"),
                "probe_soft_first_step": onset("probe", layer, "soft"),
                # Training batches: how often the dispatch followed the router's argmax (Gumbel noise and dropout
                # can overturn it). The probe's is 1 by construction (eval mode), so its gap says how decided it is.
                "train_agreement": at("train", layer, "agreement"),
                "probe_logit_gap": at("probe", layer, "logit_gap"),
                "probe_dispatch0": at("probe", layer, "dispatch0"),
            }
            for layer in layers
        },
    }


def analyze_routing_log(model_dir: str | Path, out_dir: str | Path) -> tuple[dict | None, str | None]:
    """Routing over training from `model_dir`'s routing log, when it has one: (`routing_dynamics_summary` plus
    `stage` and `figure`, the file name of the routing-dynamics figure written to `out_dir`; that name again), or
    (None, None) without a log (a dense model, a Hub id). A log without per-layer records gives
    ({..., "skipped": why}, None)."""
    path = Path(model_dir) / ROUTING_LOG_FILE
    if not path.is_file():
        return None, None
    records = read_routing_log(path)
    if not any(r.get("layers") for r in records):
        return {"source": ROUTING_LOG_FILE, "n_logs": len(records), "skipped": "no per-layer records"}, None
    dynamics = routing_dynamics(records)
    stage = next((r.get("stage") for r in records if r.get("stage") is not None), None)
    title = f"Routing over training{f', Stage {stage}' if stage is not None else ''}"
    figure = Path(
        figures.plot_routing_dynamics(dynamics, Path(out_dir) / ROUTING_DYNAMICS_FIGURE, title=title)
    ).name
    return {"stage": stage, "figure": figure, **routing_dynamics_summary(dynamics)}, figure


def split_grounding(model, processor, data, n: int, max_new_tokens: int, batch_size: int = 16) -> dict:
    """`grounding.caption_grounding` on the first `n` single-object records of `data["test"]`, saying which split."""
    grounding = caption_grounding(
        model, processor, data["test"], n=n, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return {"split": "test", **grounding}


def routing_report(model, collator, rows: list, seed: int = 0, batch_size: int = 16) -> dict:
    """How an MoE model routes `rows` (caption records): `load` (per-layer expert load, collapse under both
    definitions, purity towards the Stage 2 roles: `load.load_report`), `crossover` (the loss increase when every
    token's routing is inverted, on the first half of the rows, at least 16) and `routing_information` (I(expert;
    modality) per layer with a label-shuffle null). The part of `analyze` that also measures routing on data the
    model was not trained on (`analysis.transfer`)."""
    routing = routing_arrays(model, collator, rows, batch_size)
    per_layer = {
        layer: {"choices": r["choices"], "probs": r["probs"], "is_image": routing["is_image"]}
        for layer, r in routing["layers"].items()
    }
    modality_to_expert = {
        "image": model.config.modality_to_expert["image"],
        "text": model.config.modality_to_expert["text"],
    }
    return {
        "load": load_report(
            per_layer, num_experts=model.config.num_experts, modality_to_expert=modality_to_expert
        ),
        "crossover": crossover_test(model, collator, rows[: max(16, len(rows) // 2)], batch_size),
        "routing_information": routing_information_report(per_layer, model.config.num_experts, seed=seed),
    }


ROUTER_SATURATION_FIGURE = "router_saturation.png"


def analyze_router_saturation(model_dir: str | Path, out_dir: str | Path) -> tuple[dict | None, str | None]:
    """How soon each probe token's expert stopped changing over `model_dir`'s stage (`saturation.router_saturation`
    of its probe-choices log, without the per-step curves, which the figure draws), and the figure's file name; (None,
    None) when the stage has no such log (no routing probe, a dense model, a Hub id, a stage trained before it
    existed)."""
    path = Path(model_dir) / PROBE_CHOICES_FILE
    if not path.is_file():
        return None, None
    saturation = router_saturation(read_probe_choices(path))
    if "skipped" in saturation:
        return saturation, None
    figure = Path(figures.plot_router_saturation(saturation, Path(out_dir) / ROUTER_SATURATION_FIGURE)).name
    compact = {
        **saturation,
        "figure": figure,
        "layers": {
            layer: {
                group: {k: v for k, v in d.items() if k != "settled_by"} for group, d in per_group.items()
            }
            for layer, per_group in saturation["layers"].items()
        },
    }
    return compact, figure


def analyze(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    init_dir: str | Path | None = None,
    seed: int = 0,
    n_probe: int | None = None,
    n_samples: int = 200,
    n_permutations: int = 1000,
    tsne_layer: int | None = None,
    batch_size: int = 16,
    n_grounding: int = 64,
    grounding_max_new_tokens: int = 16,
    n_instruction: int = 16,
    allow_pickle: bool = False,
) -> dict:
    """Run every analysis on `model_dir`; write `analysis.json` and PNG figures to `out_dir`; return the dict.

    `analysis.json["concept_matrices"]` holds both matrix variants (`raw`, `centred`) with their tests at every
    layer; the older top-level `concept_matrix` / `binomial` / `permutation` / `bootstrap` keys repeat the
    `raw` variant (the paper's) for existing readers. `grounding`: captions of the first `n_grounding`
    single-object test images scored for naming the right shape and colour (`analysis.grounding`).
    `routing_dynamics` (when `model_dir` has a routing log): when each layer collapsed during training, under both
    definitions, and the last logged routing (`routing_dynamics_summary`), with the figure `routing_dynamics.png`.
    `instruction`: `n_instruction` held-out Shapes questions per kind (scenes from their own seed stream, never
    trained on) answered in the chat format and scored by slot (`analysis.instruction`), when the data is the Shapes
    world (its test split has `objects`); 0 leaves it out. `router_saturation` (when `model_dir` has a probe-choices
    log): how soon each probe token's expert stopped changing over the stage (`analyze_router_saturation`), with
    the figure `router_saturation.png`."""
    from trainer.data import MoeVlmCollator

    started = time.time()
    torch.manual_seed(seed)
    out_dir = check_out_dir(out_dir)
    model, processor = load_checkpoint(model_dir, allow_pickle)
    data = load_data(data_dir, seed, model.config.vision_config.image_size)
    out_dir.mkdir(parents=True, exist_ok=True)  # once the model and data load: a bad one leaves no folder
    collator = MoeVlmCollator(processor)
    layers = list(range(model.config.num_hidden_layers))
    is_moe = bool(model.config.moe_layers)

    probe = data["concept_probe"]
    names, labels = concept_labels(probe, "concept")
    if n_probe is not None:  # keep the first n_probe records of each concept
        keep = np.concatenate([np.flatnonzero(labels == c)[:n_probe] for c in range(len(names))])
        probe, labels = probe.select(keep.tolist()), labels[keep]
    probe_rows = first_rows(probe, None)
    states = probe_states(model, processor, probe_rows, batch_size, desc="concept probe")
    concepts = concept_analysis(states, labels, names, layers, seed, n_permutations)

    tsne_layer = layers[-1] if tsne_layer is None else tsne_layer
    points = np.concatenate([states["visual"][tsne_layer + 1], states["textual"][tsne_layer + 1]])  # (2M, D)
    modality = np.array(["image"] * len(labels) + ["text"] * len(labels))
    concept = np.concatenate([labels, labels])
    embedding = tsne_embed(points, seed=seed)
    tsne = {"layer": tsne_layer, **silhouettes(points, modality, concept, embedding=embedding, seed=seed)}
    # Intervals, so "clusters by modality" can be compared across models (pipeline.report needs them).
    tsne["silhouette_modality_hidden_interval"] = silhouette_interval(points, modality, seed=seed)["interval"]
    tsne["silhouette_concept_hidden_interval"] = silhouette_interval(points, concept, seed=seed)["interval"]

    comp_rows = first_rows(data["compositional_probe"], None)
    comp_states = probe_states(model, processor, comp_rows, batch_size, desc="compositional probe")
    compounds, compositional = compositional_analysis(comp_states, comp_rows, layers)

    test_rows = first_rows(data["test"], n_samples)
    result = {
        "model": str(model_dir),
        "router_mode": model.config.router_mode,
        "moe_layers": list(model.config.moe_layers),
        "seed": seed,
        "probe": {"set": "concept_probe", "concepts": names, "n_per_concept": int(np.bincount(labels).min())},
        "compositional_probe": {"compounds": compounds, "n": len(comp_rows)},
        "samples": {"split": "test", "n": len(test_rows)},
        "concept_matrices": concepts,
        # The raw variant again under the keys readers had before both variants existed (hub.card, analysis.cli).
        "concept_matrix": {layer: {"matrix": v["matrix"]} for layer, v in concepts["raw"].items()},
        "binomial": {layer: v["binomial"] for layer, v in concepts["raw"].items()},
        "permutation": {layer: v["permutation"] for layer, v in concepts["raw"].items()},
        "bootstrap": {layer: v["bootstrap"] for layer, v in concepts["raw"].items()},
        "tsne": tsne,
        "compositional": compositional,
        "grounding": split_grounding(
            model, processor, data, n_grounding, grounding_max_new_tokens, batch_size
        ),
    }
    if n_instruction and "objects" in data["test"].column_names:
        questions = instruction_records(seed, n_instruction, model.config.vision_config.image_size)
        result["instruction"] = instruction_accuracy(model, processor, questions, batch_size=batch_size)
    if is_moe:
        result.update(routing_report(model, collator, test_rows, seed, batch_size))
        init_model = load_checkpoint(init_dir, allow_pickle)[0] if init_dir is not None else None
        result["expert_similarity"] = expert_similarity(model, collator, test_rows[:64], init_model)

    result["figures"] = _figures(result, states, embedding, modality, concept, names, out_dir)
    dynamics, dynamics_figure = analyze_routing_log(model_dir, out_dir)
    if dynamics is not None:
        result["routing_dynamics"] = dynamics
    if dynamics_figure is not None:
        result["figures"].append(dynamics_figure)
    saturation, saturation_figure = analyze_router_saturation(model_dir, out_dir)
    if saturation is not None:
        result["router_saturation"] = saturation
    if saturation_figure is not None:
        result["figures"].append(saturation_figure)
    result["seconds"] = time.time() - started
    result = jsonable(result)
    write_atomic(out_dir / ANALYSIS_FILE, json.dumps(result, indent=1))  # last: its presence means done
    return result


def _figures(result, states, embedding, modality, concept, names, out_dir: Path) -> list[str]:
    last = max(result["concept_matrix"])
    paths = [
        figures.plot_similarity_matrix(
            result["concept_matrix"][last]["matrix"],
            out_dir / "concept_matrix.png",
            labels=names,
            title=f"Concept-modality similarity, layer {last} (k={result['binomial'][last]['k']}/"
            f"{result['binomial'][last]['n']}, p={result['binomial'][last]['p_value']:.2g})",
        ),
        figures.plot_similarity_matrix(
            result["concept_matrices"]["centred"][last]["matrix"],
            out_dir / "concept_matrix_centred.png",
            labels=names,
            title=f"Centred concept-modality similarity, layer {last} "
            f"(k={result['concept_matrices']['centred'][last]['k']}/"
            f"{result['concept_matrices']['centred'][last]['n']}, "
            f"p={result['concept_matrices']['centred'][last]['binomial']['p_value']:.2g})",
        ),
        figures.plot_tsne(
            embedding,
            modality,
            concept,
            out_dir / "tsne.png",
            concept_names=names,
            title=f"t-SNE of hidden states, layer {result['tsne']['layer']}",
        ),
        figures.plot_compositional_matrix(
            *_readable_compounds(
                result["compositional"][last]["matrix"], result["compositional_probe"]["compounds"]
            ),
            out_dir / "compositional_matrix.png",
            title=f"Colour x object binding, layer {last} (single-object compounds)",
        ),
    ]
    if "load" in result:
        paths.append(
            figures.plot_expert_load(
                result["load"], out_dir / "expert_load.png", title="Expert load by layer"
            )
        )
    return [Path(p).name for p in paths]


def _readable_compounds(matrix, compounds: list[str], limit: int = 16):
    """The single-object compounds (colour pairs such as red_circle / green_circle), at most `limit` of them, so the
    figure stays legible; the binding scores in analysis.json use every compound."""
    keep = [i for i, name in enumerate(compounds) if "+" not in name][:limit]
    matrix = np.asarray(matrix)
    return matrix[np.ix_(keep, keep)], [compounds[i] for i in keep]


def evaluate(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    n_samples: int = 100,
    prompt_formats: list[str] | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    meteor: bool = True,
    allow_pickle: bool = False,
) -> dict:
    """Greedy captions on the test split and COCO caption metrics, per prompt format; writes `captioning.json` and
    `captions.json`.

    `prompt_formats`: `raw` (the caption prompt) and/or `chat` (the chat template, Stage 3's training format); by
    default the stage's own training format (`training_prompt_format`: its recipe), and `raw` always.

    `captioning.json`: the top-level `prompt` and `metrics` are the `raw` format's (every stage is compared on
    them); `prompt_format` says so (`"raw"`); `training_prompt_format` is the stage's own; `by_prompt_format` holds
    `{format: {"prompt": text, "metrics": {...}}}` for every format evaluated, `raw` included. `captions.json`:
    `{id: {"prediction": raw caption, "references": [...], "predictions": {format: caption}}}`.
    """
    started = time.time()
    out_dir = check_out_dir(out_dir)
    model, processor = load_checkpoint(model_dir, allow_pickle)
    data = load_data(data_dir, seed, model.config.vision_config.image_size)
    out_dir.mkdir(parents=True, exist_ok=True)  # once the model and data load: a bad one leaves no folder
    rows = first_rows(data["test"], n_samples)
    own_format = training_prompt_format(model_dir, processor)
    formats = evaluation_prompt_formats(own_format, prompt_formats)
    references = {str(r["id"]): list(r["references"]) for r in rows}
    predictions, by_format = {}, {}
    with CaptionEvaluator(meteor=meteor) as evaluator:  # one METEOR JVM for every format
        for fmt in formats:
            prompt = caption_prompt(processor, fmt)
            predictions[fmt] = generate_captions(model, processor, rows, prompt, max_new_tokens, batch_size)
            metrics = caption_metrics(predictions[fmt], references, evaluator=evaluator)
            by_format[fmt] = {"prompt": prompt, "metrics": metrics}
    result = jsonable(
        {
            "model": str(model_dir),
            "split": "test",
            "n": len(rows),
            "prompt_format": "raw",
            "prompt": by_format["raw"]["prompt"],
            "training_prompt_format": own_format,
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
            "seed": seed,
            "metrics": by_format["raw"]["metrics"],
            "by_prompt_format": by_format,
            "seconds": time.time() - started,
        }
    )
    write_atomic(
        out_dir / "captions.json",
        json.dumps(
            {
                i: {
                    "prediction": predictions["raw"][i],
                    "references": references[i],
                    "predictions": {fmt: predictions[fmt][i] for fmt in formats},
                }
                for i in references
            },
            indent=1,
        ),
    )
    write_atomic(out_dir / CAPTIONING_FILE, json.dumps(result, indent=1))  # last: its presence means done
    return result
