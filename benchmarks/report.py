"""The benchmark's results as JSON (every sample, for re-analysis) and as a Markdown table (for the README).

Every ratio is shown with its 95% bootstrap interval over the rounds and the range of its per-round ratios, and every
targeted ratio says whether it met the issue's target, so the table shows exactly where a target is missed (and how
firmly) rather than only medians.
"""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from .cases import Comparison, Section
from .timing import Measurement, ratio


def machine_info(device: torch.device, dtype: torch.dtype) -> dict:
    """What the numbers came from: CPU model and cores, threads used, accelerator, library versions."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def target_met(value: float, target: tuple | None) -> bool | None:
    if target is None:
        return None
    op, bound = target
    if op == "<=":
        return value <= bound
    if op == ">=":
        return value >= bound
    if op == "within":
        return bound[0] <= value <= bound[1]
    raise ValueError(f"unknown target operator {op!r}")


def target_text(target: tuple | None, kind: str) -> str:
    if target is None:
        return ""
    op, bound = target
    what = "time" if kind == "time" else "speed"
    if op == "within":
        return f"{what} {bound[0]:g}-{bound[1]:g}x"
    return f"{what} {'≤' if op == '<=' else '≥'} {bound:g}x"


def comparison_result(comparison: Comparison, results: dict[str, Measurement]) -> dict:
    case, baseline = results[comparison.case], results[comparison.baseline]
    out = {
        "case": comparison.case,
        "baseline": comparison.baseline,
        "kind": comparison.kind,
        "target": list(comparison.target) if comparison.target else None,
    }
    if not (case.ok and baseline.ok):
        return {**out, "value": None, "met": None, "error": case.error or baseline.error or "no samples"}
    r = ratio(case, baseline, comparison.kind)
    return {
        **out,
        "value": r.value,
        "low": r.low,
        "high": r.high,
        "interval": list(r.interval) if r.interval else None,
        "met": target_met(r.value, comparison.target),
    }


def section_result(section: Section, results: dict[str, Measurement], peak_flops: float | None) -> dict:
    cases = {}
    for name, m in results.items():
        entry = {"times_s": m.times, "items": m.items, "error": m.error}
        if m.ok:
            entry.update(median_s=m.median, throughput=m.throughput)
            if m.flops:
                entry["gflops_per_s"] = m.flops / m.median / 1e9
                if peak_flops:
                    entry["mfu"] = m.flops / m.median / peak_flops
        entry["peak_mb"] = None if m.peak_bytes is None else m.peak_bytes / 2**20
        entry["host_syncs"] = m.host_syncs
        cases[name] = entry
    return {
        "title": section.title,
        "unit": section.unit,
        "info": section.info,
        "cases": cases,
        "comparisons": [comparison_result(c, results) for c in section.comparisons],
    }


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: ""}[met]


def _info_text(value) -> str:
    """An info value in a line: floats rounded, lists and dicts of them inline."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_info_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_info_text(v)}" for k, v in value.items())
    return str(value)


def _ratio_text(comp: dict) -> str:
    """`1.178 [1.12–1.24]`: the ratio and its 95% interval where the rounds gave one."""
    interval = comp.get("interval")
    return f"{comp['value']:.3f}" + (f" [{interval[0]:.2f}–{interval[1]:.2f}]" if interval else "")


def section_markdown(section: dict) -> list[str]:
    by_case = {c["case"]: c for c in section["comparisons"]}
    has_mfu = any("mfu" in c for c in section["cases"].values())
    has_gflops = any("gflops_per_s" in c for c in section["cases"].values())
    has_syncs = any(c.get("host_syncs") is not None for c in section["cases"].values())
    header = ["case", "median ms", f"{section['unit']}/s"]
    header += ["GFLOP/s"] * has_gflops + ["MFU"] * has_mfu + ["host syncs"] * has_syncs
    header += ["peak MB", "ratio [95% interval] (range)", "vs", "target", ""]
    lines = [f"#### {section['title']}", ""]
    lines += [f"- {key}: {_info_text(value)}" for key, value in section["info"].items()]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, case in section["cases"].items():
        comp = by_case.get(name)
        if case["error"]:
            row = [name, f"failed: {case['error']}"] + [""] * (len(header) - 2)
            lines.append("| " + " | ".join(row) + " |")
            continue
        row = [name, _num(case.get("median_s", 0) * 1e3, 1), _num(case.get("throughput"), 1)]
        row += [_num(case.get("gflops_per_s"), 1)] * has_gflops
        row += [_num(100 * case["mfu"], 1) + "%" if "mfu" in case else "–"] * has_mfu
        row += [str(case.get("host_syncs", "–"))] * has_syncs
        row.append(_num(case["peak_mb"], 0))
        if comp and comp.get("value") is not None:
            row += [
                f"{_ratio_text(comp)} ({comp['low']:.2f}–{comp['high']:.2f}) {comp['kind']}",
                comp["baseline"],
                target_text(comp["target"], comp["kind"]),
                _verdict(comp["met"]),
            ]
        else:
            row += ["", "", "", ""]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def to_markdown(report: dict) -> str:
    m = report["machine"]
    device = m["device"] + (f" ({m['gpu']})" if "gpu" in m else "")
    lines = [
        "### moe-vlm benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores (torch threads: {m['torch_threads']}); device {device}, "
        f"{m['dtype']}; torch {m['torch']}, transformers {m['transformers']}; {m['date']}.",
        f"Command: `{report['command']}` — {report['repeats_note']}; medians of interleaved rounds; "
        "ratio = median vs median, [95% interval] = its bootstrap interval over the rounds (a target inside it is "
        "neither clearly met nor clearly missed by this run), (range) = min–max of the per-round ratios.",
        "",
    ]
    for name, preset in report["presets"].items():
        kernel = preset["experts_kernel"]
        lines += [f"### preset `{name}` ({preset['description']})", ""]
        lines.append(
            f"Experts kernel: **{kernel['chosen']}** ({kernel['reason']}); MoE cases below use it unless "
            "their name says otherwise."
        )
        lines.append("")
        for section in preset["sections"]:
            lines += section_markdown(section)
        if "utilisation" in preset:
            from .reproduction import utilisation_markdown

            lines += utilisation_markdown(preset["utilisation"])
    lines += ["### Targets", "", "| preset | case | vs | ratio | target | |", "|---|---|---|---|---|---|"]
    for name, preset in report["presets"].items():
        for section in preset["sections"]:
            for comp in section["comparisons"]:
                if comp["target"] is None:
                    continue
                target = target_text(tuple(comp["target"]), comp["kind"])
                value = "failed" if comp["value"] is None else _ratio_text(comp)
                lines.append(
                    f"| {name} | {comp['case']} | {comp['baseline']} | {value} | {target} | {_verdict(comp['met'])} |"
                )
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `bench.json` and `bench.md` into `out_dir`; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "bench.json", out / "bench.md"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    md_path.write_text(to_markdown(report))
    return json_path, md_path
