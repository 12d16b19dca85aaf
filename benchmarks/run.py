"""Run the benchmark sections of each preset in one process and write the report.

Per preset the MoE block goes first: its forward + backward with each experts kernel shows which kernel is faster
at that size on that device (DESIGN.md: it depends on both). The later sections use the model's own default kernel
(`--kernel model`, what users run), the faster one (`--kernel auto`) or a named one.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import cases as C
from .flops import peak_flops
from .presets import get_preset, model_kernel
from .report import machine_info, section_result, write_report
from .timing import measure

SECTIONS = {
    "block": lambda preset, settings, kernel: C.block_section(preset, settings),
    "train": C.train_section,
    "generation": C.generation_section,
    "analysis": C.analysis_section,
    "trainer": C.trainer_section,
    "utilisation": None,  # not a side-by-side comparison: benchmarks.reproduction, run apart below
}
# mid: the analysis and Trainer comparisons say nothing new at a bigger size and would cost minutes on a CPU.
PRESET_SECTIONS = {
    "tiny": ("block", "train", "generation", "analysis", "trainer", "utilisation"),
    "mid": ("block", "train", "generation"),
}
DEFAULT_REPEATS = {"tiny": 7, "mid": 3}
# Untimed calls before each timed one (see `timing.measure`): worth it where a call is short enough for the
# page faults after a model switch to show; at mid a step allocates (and faults in) far more anyway.
SETTLE = {"tiny": 1, "mid": 0}
DESCRIPTIONS = {
    "tiny": "configuration/presets/tiny.yaml: hidden 128, 4 layers, 32k vocabulary, 64 image tokens",
    "mid": "hidden 1024, intermediate 2816, 8 layers, 16 heads (8 kv), 32k vocabulary, 64 image tokens",
}


def pick_kernel(block: dict, requested: str, model_default: str) -> dict:
    """The experts kernel the later sections use, and which kernel the block benchmark found faster (hard +
    gumbel medians, forward + backward). `requested`: `model` (the model's own default: what users run),
    `auto` (the faster one here; on a noisy machine one unlucky round can flip it) or a kernel name."""
    totals = {}
    for kernel in C.KERNELS:
        medians = [
            case["median_s"]
            for name, case in block["cases"].items()
            if name.endswith(f"[{kernel}]") and "median_s" in case
        ]
        if medians:
            totals[kernel] = sum(medians)
    faster = min(totals, key=totals.get) if totals else None
    shown = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in totals.items()) or "not measured"
    if requested == "model":
        chosen, why = model_default, "the model's default"
    elif requested == "auto":
        chosen, why = (
            faster or model_default,
            "the faster one here" if faster else "not measured: the model's",
        )
    else:
        chosen, why = requested, "set with --kernel"
    reason = f"{why}; faster MoE block here (hard + gumbel): {faster or '–'} ({shown})"
    return {"chosen": chosen, "faster": faster, "reason": reason, "block_s": totals}


def _clamp(value: int, low: int | None, high: int | None) -> int:
    if low is not None:
        value = max(value, low)
    if high is not None:
        value = min(value, high)
    return value


def _only_chosen_kernel_has_targets(block: dict, chosen: str) -> None:
    """The block target applies to the kernel the model will run and to the fastest pair (`C.FAST_KERNEL` with
    `C.FAST_ROUTER`: the kernels written to meet it, #13), so the Targets table judges both; the other kernels'
    ratios stay, for information, without a verdict."""
    judged = (f"[{chosen}]", f"[{C.FAST_KERNEL}, router {C.FAST_ROUTER}]")
    for comparison in block["comparisons"]:
        if comparison["case"].startswith("MoE block") and not comparison["case"].endswith(judged):
            comparison["target"] = comparison["met"] = None


def run_benchmarks(
    presets: list[str],
    out_dir: str | Path,
    *,
    repeats: int | None = None,
    device: str = "cpu",
    kernel: str = "model",
    compile: bool | None = None,
    quick: bool = False,
    sections: list[str] | None = None,
    command: str = "moe-vlm bench",
    log=print,
) -> dict:
    """Measure every requested section of every preset; write `bench.json` + `bench.md` to `out_dir`."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    if kernel not in ("model", "auto", *C.KERNELS):
        raise ValueError(f"--kernel must be model, auto or one of {C.KERNELS}, got {kernel!r}")
    unknown = set(sections or ()) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {sorted(SECTIONS)}")
    # bf16 only on a GPU: this CPU runs bf16 matmuls ~100x slower than fp32 (DESIGN.md).
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    settings = C.Settings(dev, dtype, compile=dev.type == "cuda" if compile is None else compile, quick=quick)
    peak = peak_flops(dev, dtype)
    report = {
        "machine": machine_info(dev, dtype),
        "command": command,
        "repeats_note": ", ".join(
            f"{p}: {repeats or DEFAULT_REPEATS.get(p, 3)} timed rounds after 1 warm-up" for p in presets
        )
        + ("" if repeats else " (the block: at least 7; generation, analysis: at most 5; Trainer loops: 3)"),
        "peak_flops": peak,
        "presets": {},
    }
    for name in presets:
        preset = get_preset(name)
        rounds = repeats or DEFAULT_REPEATS.get(name, 3)
        entry = {"description": DESCRIPTIONS.get(name, name), "sections": []}
        model_default = model_kernel(preset)
        chosen = kernel if kernel in C.KERNELS else model_default
        for key in PRESET_SECTIONS.get(name, tuple(SECTIONS)):
            if sections and key not in sections:
                continue
            start = time.perf_counter()
            if key == "utilisation":
                from .reproduction import utilisation_section

                if quick and not sections:  # a smoke run: the short reproduction chain takes minutes
                    continue
                entry["utilisation"] = utilisation_section(steps=6 if quick else 12, log=log)
                log(f"[{name}] {key}: {time.perf_counter() - start:.1f} s")
                continue
            section = SECTIONS[key](preset, settings, chosen)
            results = measure(
                section.cases,
                rounds if repeats else _clamp(rounds, section.min_repeats, section.max_repeats),
                dev,
                warmup=section.warmup,
                settle=SETTLE.get(name, 0),
            )
            summary = section_result(section, results, peak)
            entry["sections"].append(summary)
            for cleanup in section.cleanup:
                cleanup()
            del section, results
            C.release()
            if key == "block":
                entry["experts_kernel"] = pick_kernel(summary, kernel, model_default)
                chosen = entry["experts_kernel"]["chosen"]
                _only_chosen_kernel_has_targets(summary, chosen)
            log(f"[{name}] {key}: {time.perf_counter() - start:.1f} s")
        entry.setdefault("experts_kernel", pick_kernel({"cases": {}}, kernel, model_default))
        report["presets"][name] = entry
    write_report(report, out_dir)
    return report
