"""Interleaved, repeated timing and peak memory of benchmark cases.

The machine is shared and noisy, so cases compared with each other are run round-robin (A, B, C, A, B, C, ...):
a burst of load from elsewhere hits every case alike, and the median of each case and the ratio of medians
are what get reported, with the spread of the per-round ratios so noise is visible rather than hidden.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` around one call. On CPU neither `tracemalloc` (it sees
only Python's allocator, not torch's) nor `resource.ru_maxrss` (a process-wide high-water mark that cannot be
reset, so it cannot tell cases in one process apart) measures a case; instead the torch profiler records every
tensor allocation and free of one call, and the peak of their running sum is added to the bytes the case holds
before the call (parameters, gradients, optimizer state: `Case.resident`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    """One thing to time.

    run: one measured call. When `self_timed`, it returns the list of seconds it measured itself (e.g. the
        per-step times inside a training loop) and those are the samples; otherwise the call's wall time is.
    before: untimed set-up before every call (e.g. switch the router mode of a model shared by several cases).
    items: work per call (tokens, samples), for throughput = items / median seconds.
    flops: model FLOPs per call (for GFLOP/s and MFU), when known.
    resident: bytes the case keeps alive between calls (CPU peak memory = this + the call's allocation peak).
    """

    name: str
    run: Callable[[], object]
    before: Callable[[], None] | None = None
    items: float = 1.0
    flops: float | None = None
    resident: Callable[[], int] | None = None
    self_timed: bool = False


@dataclass
class Measurement:
    name: str
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    host_syncs: int | None = None  # CUDA only: synchronising calls counted in one call
    items: float = 1.0
    flops: float | None = None
    error: str | None = None  # the case failed (e.g. torch.compile on an unsupported op): why

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def throughput(self) -> float:
        """Items per second."""
        return self.items / self.median

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(run: Callable[[], object], device: torch.device, min_seconds: float) -> int:
    """How many back-to-back calls of `run` take at least `min_seconds`: a millisecond-scale call is timed in
    such groups, so one sample is not dominated by timer resolution and scheduler jitter."""
    run()  # warm
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    once = max(time.perf_counter() - start, 1e-6)
    return max(1, math.ceil(min_seconds / once))


def _call(case: Case, device: torch.device) -> list[float]:
    if case.before is not None:
        case.before()
    synchronize(device)
    start = time.perf_counter()
    result = case.run()
    synchronize(device)
    elapsed = time.perf_counter() - start
    return list(result) if case.self_timed else [elapsed]


def _count_host_syncs(run: Callable[[], object]) -> int:
    """Run once with CUDA's sync debug mode on and count the synchronisations it reports."""
    import warnings

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def _cpu_allocation_peak(run: Callable[[], object]) -> int:
    """Peak of the running sum of tensor allocations (+) and frees (-) during one call, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def probe(case: Case, device: torch.device, measurement: Measurement) -> None:
    """One untimed call that fills `measurement.peak_bytes` (and `host_syncs` on CUDA)."""
    if case.before is not None:
        case.before()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        case.run()
        synchronize(device)
        measurement.peak_bytes = int(torch.cuda.max_memory_allocated(device))
        measurement.host_syncs = _count_host_syncs(case.run)
    else:
        resident = case.resident() if case.resident is not None else 0
        measurement.peak_bytes = resident + _cpu_allocation_peak(case.run)


def measure(
    cases: list[Case],
    repeats: int,
    device: torch.device,
    warmup: int = 1,
    memory: bool = True,
    settle: int = 0,
) -> dict[str, Measurement]:
    """Time `cases` round-robin, alternating direction (A B C, C B A, A B C, ...: a slow drift of the machine's
    load cancels out, and each case follows a different neighbour in alternate rounds).

    `warmup` untimed rounds come first; the last one also measures peak memory, so the profiler's overhead
    never enters a timing and one-time work (optimizer state, compilation) is done by then. Then `repeats` timed
    rounds, in which a case first makes `settle` untimed calls: the timed call then follows a call of the same
    case and does not pay for memory the previous case's model left behind (glibc hands freed memory back and
    the next model page-faults it in again: ~5-10% of a short CPU step). Self-timed cases skip this: they drop
    their first step themselves. A case that raises is recorded with its error and dropped.
    """
    results = {case.name: Measurement(case.name, items=case.items, flops=case.flops) for case in cases}
    live = list(cases)

    def attempt(case: Case, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as error:  # one failing case must not lose the others' numbers
            results[case.name].error = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            live.remove(case)

    for round_index in range(warmup):
        for case in list(live):
            if memory and round_index == warmup - 1:
                attempt(case, lambda c=case: probe(c, device, results[c.name]))
            else:
                attempt(case, lambda c=case: _call(c, device))
    for round_index in range(repeats):
        for case in live[:: -1 if round_index % 2 else 1]:
            for _ in range(0 if case.self_timed else settle):
                attempt(case, lambda c=case: _call(c, device))
            if case in live:
                attempt(case, lambda c=case: results[c.name].times.extend(_call(c, device)))
    return results


@dataclass
class Ratio:
    """`case` vs `baseline`: time ratio (case / baseline seconds) or speed ratio (baseline / case seconds),
    whichever the target is written in, with the range of the per-round ratios (rounds paired by index)."""

    case: str
    baseline: str
    value: float
    low: float
    high: float
    kind: str  # "time" | "speed"
    interval: tuple[float, float] | None = None  # 95% bootstrap interval of `value` over the rounds


def ratio(case: Measurement, baseline: Measurement, kind: str = "time") -> Ratio:
    if kind not in ("time", "speed"):
        raise ValueError(f"kind must be 'time' or 'speed', got {kind!r}")
    value = case.median / baseline.median
    paired = [a / b for a, b in zip(case.times, baseline.times)] or [value]
    interval = ratio_interval(case.times, baseline.times)
    if kind == "speed":
        value, paired = 1.0 / value, [1.0 / p for p in paired]
        interval = (1.0 / interval[1], 1.0 / interval[0]) if interval else None
    return Ratio(case.name, baseline.name, value, min(paired), max(paired), kind, interval)


def ratio_interval(case_times: list[float], baseline_times: list[float], level: float = 0.95):
    """The `level` bootstrap interval of median(case) / median(baseline) (scipy.stats.bootstrap, percentile, 2,000
    resamples, a fixed seed so a report is reproducible from its samples), resampling rounds as pairs where the two
    were timed in the same rounds (equal counts) and independently otherwise (a self-timed case's own samples). How
    far a noisy machine leaves the ratio undetermined: a target inside the interval is neither clearly met nor
    clearly missed by this run. None with fewer than 3 samples a side or where the bootstrap gives no finite bound."""
    import numpy as np
    from scipy.stats import bootstrap

    if min(len(case_times), len(baseline_times)) < 3:
        return None

    def median_ratio(a, b, axis=-1):
        return np.median(a, axis=axis) / np.median(b, axis=axis)

    result = bootstrap(
        (np.asarray(case_times), np.asarray(baseline_times)),
        median_ratio,
        paired=len(case_times) == len(baseline_times),
        vectorized=True,
        confidence_level=level,
        n_resamples=2000,
        method="percentile",
        rng=np.random.default_rng(0),
    )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None
