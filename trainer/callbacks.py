"""Trainer callbacks: the routing log file, the Gumbel temperature schedule, a compact progress display and the
per-process record of a distributed run."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from configuration.atomic import write_atomic
from configuration.contract import PROBE_CHOICES_FILE, ROUTING_LOG_FILE

from .routing_stats import PREFIX, PROBE_PREFIX, read_log_lines, unflatten


def _keep_lines_up_to(path: Path, step: int) -> None:
    """Resume rule of the per-step logs: a fresh run (step 0) starts a fresh file; a resumed one keeps the lines up
    to its checkpoint's step and drops later ones (the interrupted run logged them after the checkpoint, and they
    will be logged again), and a torn last line (`read_log_lines`). Rewritten atomically: a kill during the rewrite
    leaves the old file."""
    if not path.exists():
        return
    kept = [record for record in read_log_lines(path) if record["step"] <= step] if step > 0 else []
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))


class RoutingStatsCallback(TrainerCallback):
    """Appends one JSON line per logging step to `<output_dir>/routing_stats.jsonl` (main process only):
    `{"step": .., "stage": .., "layers": {"0": {"image": {"dispatch": [..], "prob": [..], "entropy": ..,
    "logit_gap": .., "logit_margin": .., "agreement": .., "tokens": ..}, "text": {..}, "all": {..}}},
    "probe": {"split": .., "n_samples": .., "mode": .., "layers": {same shape}}}`.

    `layers` are the training batches since the last log (with the Gumbel noise and dropout they were routed with);
    `probe`, present when the stage has a routing probe, is the fixed held-out batch routed in eval mode at this
    step. Fields (definitions in `trainer.load_stats`): `dispatch` hard top-1 share per expert, `prob` mean router
    probability per expert (soft load), `entropy` mean per-token routing entropy (nats), `logit_gap` mean of
    logit0 - logit1, `logit_margin` mean top-1 - top-2 logit, `agreement` share dispatched to the router's argmax.

    It reads the routing keys the stage Trainer's `log()` put into the log (already averaged since the last log and
    reduced across processes), so TensorBoard and other `report_to` targets see exactly the same numbers.
    """

    def __init__(self, stage: str, probe_info: dict | None = None):
        self.stage = stage
        self.probe_info = probe_info

    def path(self, args) -> Path:
        return Path(args.output_dir) / ROUTING_LOG_FILE

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            _keep_lines_up_to(self.path(args), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        layers = unflatten(logs)
        if not layers:
            return
        record = {"step": state.global_step, "stage": self.stage, "layers": layers}
        probe = unflatten(logs, PROBE_PREFIX)
        if probe:
            record["probe"] = {**(self.probe_info or {}), "layers": probe}
        path = self.path(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class ProbeChoicesCallback(TrainerCallback):
    """Appends, per run of the routing probe, every probe token's chosen expert per layer to
    `<output_dir>/routing_probe_choices.jsonl` (main process only): `{"step": .., "stage": .., "layers": {"0":
    [expert per token], ..}, "is_image": [bool per token]}` (`RoutingProbe.run`'s `choices`).

    The probe runs at each training log (the stage Trainer's `log()`), and once more when a fresh run starts
    (`run_probe`, step 0: the routing the stage starts from, before any update), so `analysis.saturation` can say
    when each token's expert stopped changing. Probing at every log stands in for routing saved checkpoints: the
    same held-out tokens, in eval mode, at a finer cadence than checkpoints are kept. A resumed run keeps the lines up
    to its checkpoint, as the routing log does.
    """

    def __init__(self, stage: str, probe, run_probe):
        self.stage, self.probe, self.run_probe = stage, probe, run_probe

    def path(self, args) -> Path:
        return Path(args.output_dir) / PROBE_CHOICES_FILE

    def _write(self, args, state) -> None:
        choices = self.probe.take_choices()  # taken on every process, written by the main one
        if choices is None or not state.is_world_process_zero:
            return
        path = self.path(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": state.global_step, "stage": self.stage, **choices}) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            _keep_lines_up_to(self.path(args), state.global_step)
        if state.global_step == 0:  # every process runs it: the forward may be collective (FSDP)
            self.run_probe()
            self._write(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._write(args, state)


class GumbelTauCallback(TrainerCallback):
    """Anneals the Gumbel-softmax temperature linearly from `start` to `end` over the run (Stage 2.5, as in the
    authors' code), by setting `model.config.gumbel_tau` before each step. Computed from the global step, so a
    resumed run continues the schedule where it stopped."""

    def __init__(self, start: float, end: float):
        if start <= 0 or end <= 0:
            raise ValueError(f"Gumbel temperatures must be > 0, got start={start}, end={end}")
        self.start, self.end = float(start), float(end)

    def tau_at(self, step: int, max_steps: int) -> float:
        fraction = min(step / max(max_steps - 1, 1), 1.0)
        return self.start + (self.end - self.start) * fraction

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.config.gumbel_tau = self.tau_at(state.global_step, state.max_steps)


def compact_logs(logs: dict) -> dict:
    """A log dict for the console: the routing keys folded into one short field, `routing: 'L0 i→0:1.00 t→1:1.00 |
    L1 …'` (per layer: the expert most image / text tokens went to, and the share it got), and the probe's keys
    likewise into `routing_probe`."""
    shown = {k: v for k, v in logs.items() if not k.startswith((PREFIX + "/", PROBE_PREFIX + "/"))}
    for prefix in (PREFIX, PROBE_PREFIX):  # the training batches, then the eval-mode probe
        layers = unflatten(logs, prefix)
        if layers:
            shown[prefix] = " | ".join(
                f"L{layer} "
                + " ".join(
                    f"{modality[0]}→{max(range(len(s['dispatch'])), key=s['dispatch'].__getitem__)}:"
                    f"{max(s['dispatch']):.2f}"
                    for modality, s in per_modality.items()
                    if modality != "all"
                )
                for layer, per_modality in layers.items()
            )
    return shown


class CompactProgressCallback(ProgressCallback):
    """The Trainer's progress bar, printing routing as one field per log line instead of dozens of keys."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=compact_logs(logs or {}), **kwargs)


class CompactPrinterCallback(PrinterCallback):
    """The Trainer's printer (used when progress bars are off), with the same compact routing field."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=compact_logs(logs or {}), **kwargs)


class ProcessInfoCallback(TrainerCallback):
    """Each process writes `<output_dir>/processes/rank-<r>.json` (rank, world size, backend, device) when
    training starts: the record that a distributed run really ran as that many processes, and, under FSDP2, that its
    parameters really were sharded (`sharded_parameters`: how many are DTensor shards, `local_numel` / `full_numel`:
    the elements this process holds of the model's total). When training ends, `tokens_seen` is added: the tokens this
    process trained on by modality (`tokens_seen`, a dict the stage Trainer keeps, set by `run`), so a test can see
    what each process's shard of the data really held."""

    def __init__(self):
        self.tokens_seen: dict | None = None
        self.info: dict = {}

    def path(self, args) -> Path:
        return Path(args.output_dir) / "processes" / f"rank-{args.process_index}.json"

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.path(args).parent.mkdir(parents=True, exist_ok=True)
        self.info = {
            "rank": args.process_index,
            "local_rank": args.local_process_index,
            "world_size": args.world_size,
            "backend": args.ddp_backend or _backend(),
            "device": str(args.device),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **(_sharding(model) if model is not None else {}),
        }
        self.path(args).write_text(json.dumps(self.info, indent=1))

    def on_train_end(self, args, state, control, **kwargs):
        if self.tokens_seen is not None:
            self.path(args).write_text(json.dumps({**self.info, "tokens_seen": self.tokens_seen}, indent=1))


def _sharding(model) -> dict:
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    shards = [p for p in params if isinstance(p, DTensor)]
    return {
        "sharded_parameters": len(shards),
        "n_parameters": len(params),
        "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
        "full_numel": sum(p.numel() for p in params),
    }


def _backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


__all__ = [
    "CompactPrinterCallback",
    "CompactProgressCallback",
    "GumbelTauCallback",
    "ProbeChoicesCallback",
    "ProcessInfoCallback",
    "RoutingStatsCallback",
    "compact_logs",
]
