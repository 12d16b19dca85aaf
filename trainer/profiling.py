"""`moe-vlm train --profile`: where a training step's time goes, and how much of this CPU (or GPU) it uses.

`StepProfiler` is a `TrainerCallback` (so every stage Trainer, the CLIP and LM pretrainers included, is profiled
without a line of its own). Per optimizer step it splits the wall time into

* data: fetching and collating the batch (from the end of the previous step's bookkeeping to `on_step_begin`);
* forward: the model's training forwards (forward hooks on the model; eval-mode forwards such as a routing probe
  are not counted here);
* backward: from each forward's end to the next forward or to `on_pre_optimizer_step` (gradient clipping included);
* optimizer: the optimizer step, the scheduler and zeroing the gradients (to `on_step_end`);
* bookkeeping: logging, evaluation and checkpointing after the step (`on_step_end` to the last `on_log` /
  `on_evaluate` / `on_save`): where a routing probe and the routing statistics run;

and credits it with its model FLOPs: `trainer.flops.step_flops` for a causal LM (the experts a token runs, the head
where labels are, backward by the trainable set), or for any other model (the CLIP pretrainer) the matmuls
`torch.utils.flop_counter` counts in one step, forward and backward (a dense model runs exactly what it needs).
The fp32 matmul rate is measured in the same process on the same threads when training starts, so "utilisation"
is model FLOP/s over what this machine reaches on large matmuls at that moment. The same matmul through oneDNN is
measured beside it, since torch's fp32 `mm` (MKL's sgemm) reaches half of it on some CPUs (README, Utilisation).

The first `warmup` steps (allocations, lazy initialisation) are recorded but left out of the summary.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from .flops import matmul_rate, step_flops

PROFILE_FILE = "profile.json"
PHASES = ("data", "forward", "backward", "optimizer", "bookkeeping")


def _sync(device) -> None:
    if device is not None and getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


class StepProfiler(TrainerCallback):
    """Per-step time split and model FLOPs of every `train()` it is attached to (one entry per Trainer run: the
    pretraining runs two, CLIP then LM). `runs` holds them; `write(path)` saves them as JSON."""

    def __init__(self, warmup: int = 1, rate_size: int = 1024):
        self.warmup = warmup
        self.rate_size = rate_size
        self.runs: list[dict] = []

    # ----- bookkeeping of one run -----
    def _now(self) -> float:
        _sync(self._device)
        return time.perf_counter()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._device = getattr(args, "device", None)
        self._steps: list[dict] = []
        self._current: dict | None = None
        self._mark = None  # end of the previous step's bookkeeping (or of start-up)
        self._fwd_start = self._fwd_end = None
        # A model without an analytic count (no decoder config: the CLIP pretrainer's): one step is counted instead
        self._needs_counter = not hasattr(getattr(model, "config", None), "num_hidden_layers")
        self._counter = None
        self._counted_flops: float | None = None
        on_cpu = self._device is None or self._device.type == "cpu"
        rate = matmul_rate(self.rate_size) if on_cpu else None
        self._run = {
            "name": Path(args.output_dir).name,
            "model": type(model).__name__,
            "threads": torch.get_num_threads(),
            "matmul_rate_flops": rate,
            # the same matmul through oneDNN: how far torch's fp32 rate is from what this CPU can do (flops.py)
            "onednn_matmul_rate_flops": matmul_rate(self.rate_size, backend="onednn") if on_cpu else None,
            "matmul_rate_size": self.rate_size,
            "batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
        }
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward),
        ]
        self._mark = self._now()

    def _before_forward(self, module, args, kwargs):
        if not module.training or self._current is None:
            return
        now = self._now()
        if self._fwd_end is not None:  # the previous micro-batch's backward ended here
            self._current["backward"] += now - self._fwd_end
            self._fwd_end = None
        self._fwd_start = now
        if not self._needs_counter and "input_ids" in kwargs:
            self._current["flops"] += step_flops(module, kwargs)

    def _after_forward(self, module, args, output):
        if not module.training or self._current is None or self._fwd_start is None:
            return
        self._fwd_end = self._now()
        self._current["forward"] += self._fwd_end - self._fwd_start
        self._fwd_start = None

    def on_step_begin(self, args, state, control, **kwargs):
        now = self._now()
        if self._steps and self._mark is not None:
            self._steps[-1]["bookkeeping"] = self._mark - self._steps[-1].pop("_end")
        self._current = {phase: 0.0 for phase in PHASES}
        self._current.update(step=state.global_step + 1, flops=0.0, data=now - self._mark)
        if self._needs_counter and len(self._steps) == self.warmup:
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._current is None:
            return
        now = self._now()
        if self._fwd_end is not None:
            self._current["backward"] += now - self._fwd_end
            self._fwd_end = None
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._current["flops"] = float(self._counter.get_total_flops())
            self._run["flops_counted_by"] = "torch.utils.flop_counter (one step)"
            self._counter = None
            self._counted_flops = self._current["flops"]
        self._pre_opt = now

    def on_step_end(self, args, state, control, **kwargs):
        if self._current is None:
            return
        now = self._now()
        self._current["optimizer"] = now - self._pre_opt
        if not self._current["flops"] and self._counted_flops is not None:
            self._current["flops"] = self._counted_flops  # same model, same batch shape
        self._current["_end"] = now
        self._steps.append(self._current)
        self._current = None
        self._mark = now

    def _event(self, args, state, control, **kwargs):
        if self._steps and "_end" in self._steps[-1]:
            self._mark = self._now()

    on_log = on_evaluate = on_save = _event

    def on_train_end(self, args, state, control, **kwargs):
        for hook in self._hooks:
            hook.remove()
        if self._steps and "_end" in self._steps[-1]:
            self._steps[-1]["bookkeeping"] = self._mark - self._steps[-1].pop("_end")
        self._run.setdefault("flops_counted_by", "trainer.flops.step_flops (analytic)")
        self._run["steps"] = self._steps
        self._run["summary"] = summarise(
            self._steps[self.warmup :] or self._steps, self._run["matmul_rate_flops"]
        )
        self.runs.append(self._run)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"runs": self.runs}, indent=1))
        return path


def summarise(steps: list[dict], rate: float | None) -> dict:
    """Medians per phase (seconds), the step's total, model GFLOP/s over the whole step and over its compute
    (forward + backward + optimizer), and both as a share of the measured matmul rate."""
    if not steps:
        return {}
    median = {phase: statistics.median(s[phase] for s in steps) for phase in PHASES}
    totals = [sum(s[phase] for phase in PHASES) for s in steps]
    flops = statistics.median(s["flops"] for s in steps)
    step = statistics.median(totals)
    compute = median["forward"] + median["backward"] + median["optimizer"]
    out = {
        "steps": len(steps),
        "seconds": median,
        "step_s": step,
        "flops_per_step": flops,
        "gflops_per_s": flops / step / 1e9 if step else None,
        "compute_gflops_per_s": flops / compute / 1e9 if compute else None,
    }
    if rate:
        out["utilisation"] = flops / step / rate if step else None
        out["compute_utilisation"] = flops / compute / rate if compute else None
    return out


def markdown_table(runs: list[dict]) -> str:
    """One row per profiled run: the time split (ms, medians), GFLOP/s and the share of the matmul rate; a footer
    with that rate and, where measured, the same matmul's rate through oneDNN."""
    header = (
        "| step | batch | data | forward | backward | optimizer | bookkeeping | step (ms) | GFLOP/s "
        "| of matmul rate | compute only |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for run in runs:
        s = run.get("summary") or {}
        if not s:
            continue
        ms = {k: f"{1e3 * v:.1f}" for k, v in s["seconds"].items()}
        share = s.get("utilisation")
        compute = s.get("compute_utilisation")
        rows.append(
            f"| {run['name']} | {run['batch_size']} | {ms['data']} | {ms['forward']} | {ms['backward']} "
            f"| {ms['optimizer']} | {ms['bookkeeping']} | {1e3 * s['step_s']:.1f} | {s['gflops_per_s']:.2f} "
            f"| {'–' if share is None else f'{100 * share:.1f} %'} "
            f"| {'–' if compute is None else f'{100 * compute:.1f} %'} |"
        )
    return header + "\n".join(rows) + "\n" + _rates_footer(runs)


def _rates_footer(runs: list[dict]) -> str:
    """The matmul rate the shares divide by, and oneDNN's for the same matmul where it was measured; empty where no
    rate was (a GPU run)."""
    rate = next((r["matmul_rate_flops"] for r in runs if r.get("matmul_rate_flops")), None)
    if not rate:
        return ""
    onednn = next((r["onednn_matmul_rate_flops"] for r in runs if r.get("onednn_matmul_rate_flops")), None)
    beside = (
        f"; the same matmul through oneDNN: {onednn / 1e9:.1f} GFLOP/s (torch's rate is {rate / onednn:.0%} of it)"
        if onednn
        else ""
    )
    return (
        f"\nfp32 matmul rate measured in the same process: {rate / 1e9:.1f} GFLOP/s "
        f"({runs[0]['matmul_rate_size']}² matmul, {runs[0]['threads']} thread(s)){beside}\n"
    )


__all__ = ["PHASES", "PROFILE_FILE", "StepProfiler", "markdown_table", "summarise"]
