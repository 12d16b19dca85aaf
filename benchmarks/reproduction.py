"""The `utilisation` section: every step of the reproduction, run short through the commands the reproduction runs,
with its model FLOP/s against the fp32 matmul rate measured in the same process.

Training steps (CLIP pretraining, LM pretraining, Stages 1, 2, 3, the dense control) run as `moe-vlm train --profile`
with their own recipes (batch sizes, trainable sets, routing, data), only fewer steps, chained as `moe-vlm reproduce`
chains them, in a temporary folder; pretraining runs with `--evaluate false` (its held-out measurements are not a
training step). The two inference steps of the analyses, on the Stage 2 model: the concept-probe extraction
(`analysis.extract.probe_states`, one forward of images + captions, hidden states of every layer) and caption
generation (`analysis.extract.generate_captions`, greedy, KV cache), each credited with its analytic forward FLOPs.

Speed does not depend on what the weights learned (top-1 routing runs one expert per token whichever it is), so the
short chain measures the steps the full reproduction runs. `trainer.profiling` says how each phase is timed.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from pipeline.reproduce import PRETRAIN, TRAINING_STEPS

from .timing import Case, measure

# (name, stage, from) in the reproduction's order: its pretraining, then its own chain of training steps.
CHAIN = ((PRETRAIN, "pretrain", None), *TRAINING_STEPS)
LABELS = {
    "clip_run": "CLIP pretraining",
    "lm_run": "LM pretraining",
    "stage1": "Stage 1",
    "stage2": "Stage 2",
    "stage3": "Stage 3",
    "dense": "dense control",
}


def _train(out: Path, stage: str, source: Path | None, steps: int, dataset: str | None) -> dict:
    from moe_vlm_cli import main

    argv = ["train", "--stage", stage, "--out", str(out), "--disable_tqdm", "true", "--save_strategy", "no"]
    if source is not None:
        argv += ["--from", str(source)]
    if stage == "pretrain":
        argv += ["--clip_max_steps", str(steps), "--lm_max_steps", str(steps), "--evaluate", "false"]
    elif stage != "0":
        argv += ["--max_steps", str(steps), "--logging_steps", str(max(1, steps // 3))]
    if dataset is not None:
        argv += ["--dataset", dataset]
    if stage != "0":
        argv.append("--profile")
    if main(argv) != 0:
        raise RuntimeError(f"`moe-vlm {' '.join(argv)}` failed (see the message above)")
    profile = out / "profile.json"
    return json.loads(profile.read_text()) if profile.is_file() else {"runs": []}


def _timed(name: str, run, repeats: int) -> float:
    """Median seconds of `repeats` calls after one untimed warm-up (`benchmarks.timing.measure`)."""
    measured = measure([Case(name, run)], repeats, torch.device("cpu"), warmup=1, memory=False)[name]
    if not measured.ok:
        raise RuntimeError(f"{name}: {measured.error}")
    return measured.median


def _inference_rows(model_dir: Path, dataset: str | None, rate: float, n: int, repeats: int) -> list[dict]:
    """Concept-probe extraction and caption generation on `model_dir`, as the analyses run them."""
    from analysis.captioning import caption_prompt
    from analysis.extract import generate_captions, probe_states
    from analysis.run import load_checkpoint, load_data
    from trainer.flops import generation_flops, step_flops

    model, processor = load_checkpoint(model_dir)
    data = load_data(dataset, 0, model.config.vision_config.image_size)
    probe = [data["concept_probe"][i] for i in range(min(n, len(data["concept_probe"])))]
    test = [data["test"][i] for i in range(min(n, len(data["test"])))]
    rows = []

    # probe_states' batch: the images (each `<image>` alone) then the captions, padded together; logits_to_keep=1
    images = [r["image"].convert("RGB") for r in probe]
    texts = ["<image>"] * len(probe) + [r["caption"] for r in probe]
    batch = processor(images=images, text=texts, return_tensors="pt")
    flops = step_flops(model, dict(batch), backward=False, rows=len(texts))
    name = "concept-probe extraction"
    seconds = _timed(name, lambda: probe_states(model, processor, probe, batch_size=len(probe)), repeats)
    rows.append(_row(name, len(probe), seconds, flops, rate))

    new_tokens = 24
    text = caption_prompt(processor, "raw")  # what generate_captions prompts with by default
    prompt = processor(images=[r["image"].convert("RGB") for r in test], text=[text] * len(test))
    flops = generation_flops(model, dict(prompt), new_tokens)

    def generate():
        # min_new_tokens: every call generates the same number of tokens (the FLOPs count assumes it)
        model.generation_config.min_new_tokens = new_tokens
        try:
            generate_captions(model, processor, test, max_new_tokens=new_tokens, batch_size=len(test))
        finally:
            model.generation_config.min_new_tokens = None

    name = f"caption generation ({new_tokens} tokens)"
    seconds = _timed(name, generate, repeats)
    rows.append(_row(name, len(test), seconds, flops, rate))
    return rows


def _row(name: str, batch: int, seconds: float, flops: float, rate: float | None) -> dict:
    return {
        "name": name,
        "batch": batch,
        "step_s": seconds,
        "flops_per_step": flops,
        "gflops_per_s": flops / seconds / 1e9,
        "utilisation": flops / seconds / rate if rate else None,
    }


def utilisation_section(
    steps: int = 12, *, dataset: str | None = None, n_inference: int = 16, repeats: int = 3, log=print
) -> dict:
    """Profile every step of the reproduction (see the module docstring); returns the section for the report."""
    from configuration import load_preset
    from trainer.flops import matmul_rate

    rows = []
    rate = matmul_rate()
    # What the tiny model's own matmuls can reach: a Stage 1 batch's rows (16 x ~40 tokens) through the MLP's
    # up-projection (hidden x intermediate), and through the LM head (hidden x vocabulary) on ~240 labelled rows.
    lm = load_preset("tiny")["mistral_config"]
    shapes = {
        "decoder": (640, lm["hidden_size"], lm["intermediate_size"]),
        "lm_head": (240, lm["hidden_size"], lm["vocab_size"]),
    }
    shape_rates = {name: matmul_rate(shape=shape) for name, shape in shapes.items()}
    # The same products through oneDNN: how far torch's fp32 rate (MKL's sgemm) is from what this CPU can do
    onednn = {"1024²": matmul_rate(backend="onednn")}
    onednn.update({name: matmul_rate(shape=shape, backend="onednn") for name, shape in shapes.items()})
    with tempfile.TemporaryDirectory(prefix="moe-vlm-utilisation-") as tmp:
        work = Path(tmp)
        for name, stage, source in CHAIN:
            start = time.perf_counter()
            profile = _train(work / name, stage, work / source if source else None, steps, dataset)
            for run in profile["runs"]:
                summary = run["summary"]
                rows.append(
                    {
                        "name": LABELS.get(run["name"], run["name"]),
                        "batch": run["batch_size"],
                        "seconds": summary["seconds"],
                        "steps": summary["steps"],
                        **{k: summary.get(k) for k in ("step_s", "flops_per_step", "gflops_per_s")},
                        "compute_gflops_per_s": summary.get("compute_gflops_per_s"),
                        # against this section's one rate, so every row divides by the same number
                        "utilisation": summary["flops_per_step"] / summary["step_s"] / rate,
                        "compute_utilisation": summary["compute_gflops_per_s"] * 1e9 / rate,
                        "matmul_rate_at_start": run.get("matmul_rate_flops"),
                    }
                )
            log(f"[utilisation] {name}: {time.perf_counter() - start:.1f} s")
        rows += _inference_rows(work / "stage2", dataset, rate, n_inference, repeats)
    return {
        "title": "Utilisation per reproduction step",
        "matmul_rate_flops": rate,
        "matmul_rate_at_model_shapes": {
            name: {"shape": list(shapes[name]), "flops": value} for name, value in shape_rates.items()
        },
        "onednn_matmul_rate_flops": onednn,  # None each where this torch has no oneDNN
        "threads": torch.get_num_threads(),
        "steps_per_training_run": steps,
        "rows": rows,
    }


def utilisation_markdown(section: dict) -> list[str]:
    """The section as Markdown: the rates it divides by (torch's, and oneDNN's where measured), then one row per step
    with its time split and its shares of them. Renders reports written before the oneDNN rates were measured."""
    rate = section["matmul_rate_flops"]
    # the oneDNN rates that were measured (none in older reports, or where this torch has no oneDNN)
    onednn_rates = {k: v for k, v in (section.get("onednn_matmul_rate_flops") or {}).items() if v}
    onednn = onednn_rates.get("1024²")  # a column where it was measured
    lines = [
        f"#### {section['title']}",
        "",
        f"fp32 matmul rate measured in the same run: **{rate / 1e9:.1f} GFLOP/s** (1024² matmul, "
        f"{section['threads']} thread(s)); at the tiny model's own shapes: "
        + ", ".join(
            f"{name} {'×'.join(map(str, at['shape']))} {at['flops'] / 1e9:.1f} GFLOP/s ({at['flops'] / rate:.0%})"
            for name, at in section.get("matmul_rate_at_model_shapes", {}).items()
        )
        + ". "
        + _onednn_sentence(onednn_rates, rate)
        + f"Training steps: medians over {section['steps_per_training_run'] - 1} "
        "steps of a short run of each recipe (first step left out); time per step in ms.",
        "",
        "| step | batch | data | forward | backward | optimizer | bookkeeping | step | model GFLOP/s "
        "| of matmul rate | compute only |" + " of oneDNN rate |" * bool(onednn),
        "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * bool(onednn),
    ]
    for row in section["rows"]:
        share = f"{100 * row['utilisation']:.1f} %" if row.get("utilisation") is not None else "–"
        if "seconds" in row:
            ms = {k: f"{1e3 * v:.1f}" for k, v in row["seconds"].items()}
            split = [ms["data"], ms["forward"], ms["backward"], ms["optimizer"], ms["bookkeeping"]]
            compute = f"{100 * row['compute_utilisation']:.1f} %"
        else:  # inference: one call per batch
            split, compute = ["", "(forward only)", "", "", ""], share
        lines.append(
            f"| {row['name']} | {row['batch']} | "
            + " | ".join(split)
            + f" | {1e3 * row['step_s']:.1f} | {row['gflops_per_s']:.1f} | {share} | {compute} |"
            + (f" {100 * row['gflops_per_s'] * 1e9 / onednn:.1f} % |" if onednn else "")
        )
    return lines + [""]


def _onednn_sentence(onednn: dict[str, float], rate: float) -> str:
    """The measured oneDNN reference rates (`matmul_rate(backend="onednn")`, by shape name) as one sentence of the
    table's preamble, or nothing where there are none."""
    if not onednn:
        return ""
    square = onednn.get("1024²")
    rates = ", ".join(f"{name} {value / 1e9:.1f}" for name, value in onednn.items())
    share = f": torch's fp32 rate above is {rate / square:.0%} of it" if square else ""
    return (
        f"The same matmuls through oneDNN (`torch.ops.mkldnn._linear_pointwise`; torch's fp32 `mm` runs MKL's "
        f"sgemm instead): {rates} GFLOP/s{share}. "
    )


__all__ = ["CHAIN", "utilisation_markdown", "utilisation_section"]
