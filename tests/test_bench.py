"""The benchmark (`moe-vlm bench`): its comparison block, timing, memory, FLOPs, report and a --quick smoke run.

No speed target is asserted: the machine is shared and noisy. What is checked is that the benchmark measures what
it says (the naive block computes the same function as the real one, rounds interleave, a failing case is
reported, allocations are seen) and that a quick run writes a complete report.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config

from benchmarks.naive import NaiveBothExpertsBlock
from benchmarks.report import target_met, to_markdown
from benchmarks.timing import Case, Measurement, _cpu_allocation_peak, measure, ratio

CPU = torch.device("cpu")


@pytest.mark.parametrize("mode", ["hard", "gumbel", "softmax", "modality_aware"])
@pytest.mark.parametrize("kernel", ["eager", "grouped_mm", "sorted_top1", "sorted_top1_cpp"])
def test_naive_block_computes_the_same_function_as_the_moe_block(mode, kernel):
    from modeling_moe_vlm.modeling_moe_vlm import MoeVlmSparseMoeBlock

    config = tiny_config(router_mode=mode)
    config._experts_implementation = kernel
    torch.manual_seed(0)
    block = MoeVlmSparseMoeBlock(config).eval()  # eval: Gumbel routing is the deterministic argmax
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.5)  # large enough that the two experts and both routes differ
    x = torch.randn(2, 6, config.hidden_size)
    mask = torch.tensor([[False, True, True, False, False, False]] * 2)
    expected, got = block(x, mask), NaiveBothExpertsBlock(block)(x, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # and the routing really mixes experts here, so the mask is exercised
    _, _, index = block.gate(x.reshape(-1, config.hidden_size), mask.reshape(-1))
    assert index.unique().numel() == 2


def _training_block(mode: str, kernel: str, router: str):
    """A tiny MoE block in training (the Gumbel noise is drawn, the router gets gradients) with weights large enough
    that both experts are chosen, and a (2, 6) batch: block, x, grad_out, mask."""
    from modeling_moe_vlm.modeling_moe_vlm import MoeVlmSparseMoeBlock

    config = tiny_config(router_mode=mode, router_implementation=router)
    config._experts_implementation = kernel
    torch.manual_seed(0)
    block = MoeVlmSparseMoeBlock(config).train()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(2, 6, config.hidden_size, requires_grad=True)
    grad_out, mask = torch.randn_like(x), torch.tensor([[False, True, True, False, False, False]] * 2)
    return block, x, grad_out, mask


@pytest.mark.parametrize(
    "mode, kernel, router",
    [
        ("hard", "grouped_mm", "eager"),
        ("gumbel", "sorted_top1", "eager"),
        ("gumbel", "sorted_top1_cpp", "fused_cpp"),
    ],
)
def test_block_halves_compute_the_blocks_gradients_between_them(mode, kernel, router):
    """The bench times the block's router and experts apart (`block_halves`) and reads the block minus the two as
    the cost of joining them: that holds only if the halves do the block's work, no more and no less."""
    from benchmarks.cases import _grad_step, block_halves

    block, x, grad_out, mask = _training_block(mode, kernel, router)
    config = block.gate.config
    torch.manual_seed(1)
    expected = dict(
        zip(["x", *(n for n, _ in block.named_parameters())], _grad_step(block, x, grad_out, mask))
    )
    torch.manual_seed(1)  # the halves' routing is the block's: the same noise
    router_half, experts_half = block_halves(block, x, grad_out, mask)
    experts = experts_half()
    torch.manual_seed(1)
    routed = router_half()
    soft = mode != "hard"
    # soft routing: the experts also return the gate weights' gradient, and the router runs a backward
    assert len(experts) == (4 if soft else 3) and (routed is not None) == soft
    # (T, H): the block's input gradient is the sum of the two
    hidden = experts[0] + (routed[0] if soft else 0)
    torch.testing.assert_close(hidden, expected["x"].reshape(-1, config.hidden_size))
    gate_up, down = experts[-2:]
    torch.testing.assert_close(gate_up, expected["experts.gate_up_proj"])
    torch.testing.assert_close(down, expected["experts.down_proj"])
    if soft:
        torch.testing.assert_close(routed[1], expected["gate.weight"])
    else:
        assert expected["gate.weight"] is None  # hard routing: the router has no gradient in the block either


@pytest.mark.parametrize("mode", ["hard", "gumbel"])
def test_block_direct_computes_the_blocks_gradients(mode):
    """The bench reads the block minus its two kernels called directly (`block_direct`) as the modules' Python: that
    holds only if the direct call does the block's work, gradient for gradient, on the same routing."""
    from benchmarks.cases import FAST_KERNEL, FAST_ROUTER, _grad_step, block_direct

    block, x, grad_out, mask = _training_block(mode, FAST_KERNEL, FAST_ROUTER)
    direct = block_direct(block, x, grad_out, mask)
    torch.manual_seed(1)
    expected = _grad_step(block, x, grad_out, mask)
    torch.manual_seed(1)  # the same Gumbel noise
    got = direct()
    assert len(got) == len(expected)
    for name, e, g in zip(["x", *(n for n, _ in block.named_parameters())], expected, got, strict=True):
        if e is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, e, msg=name)
    # the router's weight: a gradient in soft routing only
    assert (expected[1] is not None) == (mode == "gumbel")


def test_block_direct_refuses_arguments_it_would_reuse():
    from benchmarks.cases import FAST_KERNEL, FAST_ROUTER, block_direct

    block, x, grad_out, mask = _training_block("modality_aware", FAST_KERNEL, FAST_ROUTER)
    with pytest.raises(ValueError, match="modality_aware"):
        block_direct(block, x, grad_out, mask)


def test_measure_interleaves_rounds_and_reports_failures():
    calls = []
    cases = [
        Case("a", lambda: calls.append("a")),
        Case("b", lambda: calls.append("b")),
        Case("broken", lambda: 1 / 0),
    ]
    results = measure(cases, repeats=3, device=CPU, warmup=1, memory=False, settle=1)
    # warm-up round, then per round each case settles once and is timed once, alternating direction
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert len(results["a"].times) == len(results["b"].times) == 3
    assert results["broken"].error.startswith("ZeroDivisionError") and not results["broken"].ok


def test_self_timed_case_contributes_its_own_samples():
    case = Case("loop", lambda: [0.5, 0.25], self_timed=True)
    result = measure([case], repeats=2, device=CPU, memory=False)["loop"]
    assert result.times == [0.5, 0.25, 0.5, 0.25]


def test_ratio_kinds_and_per_round_range():
    slow, fast = Measurement("slow", [2.0, 4.0, 3.0]), Measurement("fast", [1.0, 1.0, 2.0])
    r = ratio(slow, fast)
    assert r.value == pytest.approx(3.0 / 1.0) and (r.low, r.high) == (pytest.approx(1.5), pytest.approx(4.0))
    s = ratio(slow, fast, kind="speed")
    assert s.value == pytest.approx(1 / 3) and s.high == pytest.approx(1 / 1.5)
    with pytest.raises(ValueError):
        ratio(slow, fast, kind="fastness")


def test_ratio_interval_brackets_the_ratio_and_narrows_with_less_noise():
    import random

    rng = random.Random(0)
    # what the machine's neighbours do, round by round; a case 1.2x the baseline in the same rounds: pairing cancels it
    load = [rng.uniform(0.5, 2.0) for _ in range(25)]
    base = [b * (1 + rng.gauss(0, 0.01)) for b in load]
    quiet = [1.2 * b * (1 + rng.gauss(0, 0.005)) for b in load]
    noisy = [1.2 * b * rng.choice([0.7, 1.0, 1.4]) for b in base]
    q = ratio(Measurement("q", quiet), Measurement("b", base))
    n = ratio(Measurement("n", noisy), Measurement("b", base))
    for r in (q, n):
        assert r.interval[0] <= r.value <= r.interval[1]
    assert q.interval[0] > 1.15 and q.interval[1] < 1.25  # a firm 1.2
    assert n.interval[1] - n.interval[0] > 5 * (q.interval[1] - q.interval[0])
    s = ratio(Measurement("q", quiet), Measurement("b", base), kind="speed")
    assert s.interval == pytest.approx((1 / q.interval[1], 1 / q.interval[0]))
    # a self-timed case's own samples (another count) are resampled independently; too few rounds: no interval
    assert ratio(Measurement("q", quiet[:10]), Measurement("b", base)).interval is not None
    assert ratio(Measurement("q", quiet[:2]), Measurement("b", base[:2])).interval is None


def test_cpu_peak_memory_sees_torch_allocations():
    mb = 2**20

    def allocate():
        a = torch.ones(4 * mb // 4)  # 4 MiB, freed before the next
        del a
        b = torch.ones(8 * mb // 4)  # 8 MiB, alive with c
        c = torch.ones(2 * mb // 4)
        return b.sum() + c.sum()

    peak = _cpu_allocation_peak(allocate)
    assert 10 * mb <= peak < 11 * mb  # b + c at once; a was already freed


def test_targets_and_markdown_flag_a_missed_target():
    assert target_met(1.1, ("<=", 1.15)) and not target_met(1.2, ("<=", 1.15))
    assert target_met(0.95, (">=", 0.9)) and not target_met(2.6, ("within", (1.7, 2.3)))
    assert target_met(1.0, None) is None
    section = {
        "title": "t",
        "unit": "tokens",
        "info": {},
        "cases": {
            "dense": {"median_s": 1.0, "throughput": 1.0, "peak_mb": 1.0, "error": None},
            "moe": {"median_s": 1.3, "throughput": 0.8, "peak_mb": 1.0, "error": None},
        },
        "comparisons": [
            {
                "case": "moe",
                "baseline": "dense",
                "kind": "time",
                "target": ["<=", 1.15],
                "value": 1.3,
                "low": 1.2,
                "high": 1.4,
                "met": False,
            }
        ],
    }
    report = {
        "machine": {
            "cpu": "x",
            "cpu_cores": 2,
            "torch_threads": 1,
            "device": "cpu",
            "dtype": "float32",
            "torch": "t",
            "transformers": "t",
            "date": "d",
        },
        "command": "moe-vlm bench",
        "repeats_note": "n",
        "presets": {
            "tiny": {
                "description": "d",
                "experts_kernel": {"chosen": "eager", "reason": "r"},
                "sections": [section],
            }
        },
    }
    markdown = to_markdown(report)
    assert "| moe | 1,300 |" in markdown and "**missed**" in markdown


def test_bad_arguments_are_one_line_errors(capsys):
    import moe_vlm_cli

    assert moe_vlm_cli.main(["bench", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
    assert moe_vlm_cli.main(["bench", "--quick", "--sections", "nonsense"]) == 2
    assert "unknown sections" in capsys.readouterr().err


def test_cli_kernel_choices_are_the_benchmarked_kernels():
    """`--kernel`'s choices are spelled out in benchmarks/cli.py (it does not import torch); they must stay the
    cases' KERNELS."""
    import argparse

    from benchmarks.cases import KERNELS
    from benchmarks.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (action,) = [a for a in parser._actions if a.dest == "kernel"]
    assert action.choices == ["model", "auto", *KERNELS]


def test_quick_run_writes_a_complete_report(tmp_path):
    from benchmarks.__main__ import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    markdown = (tmp_path / "bench.md").read_text()
    sections = report["presets"]["tiny"]["sections"]
    titles = [s["title"] for s in sections]
    assert len(titles) == 5 and any("Training step" in t for t in titles)
    ratios = [c for s in sections for c in s["comparisons"]]
    assert len(ratios) >= 12
    for comparison in ratios:
        value = comparison["value"]
        assert value is not None and math.isfinite(value) and value > 0, comparison
    for section in sections:
        for name, case in section["cases"].items():
            assert case["error"] is None, (name, case["error"])
            assert case["median_s"] > 0 and case["peak_mb"] > 0
            assert name in markdown
    assert report["presets"]["tiny"]["experts_kernel"]["chosen"] in ("eager", "grouped_mm")
    assert "### Targets" in markdown and report["machine"]["device"] == "cpu"


def test_auto_kernel_is_the_faster_block_and_only_it_and_the_fast_pair_are_held_to_the_target():
    from benchmarks.run import _only_chosen_kernel_has_targets, pick_kernel

    block = {
        "cases": {
            "dense MLP": {"median_s": 1.0},
            "MoE block hard [eager]": {"median_s": 1.5},
            "MoE block gumbel [eager]": {"median_s": 1.5},
            "MoE block hard [grouped_mm]": {"median_s": 1.2},
            "MoE block gumbel [grouped_mm]": {"median_s": 1.3},
        },
        "comparisons": [
            {"case": name, "target": ["<=", 1.1], "met": False}
            for name in (
                "MoE block hard [eager]",
                "MoE block hard [grouped_mm]",
                "MoE block hard [sorted_top1_cpp]",
                "MoE block hard [sorted_top1_cpp, router fused_cpp]",
            )
        ],
    }
    assert pick_kernel(block, "auto", "eager")["chosen"] == "grouped_mm"
    assert pick_kernel(block, "model", "eager") | {"reason": ""} == {
        "chosen": "eager",
        "faster": "grouped_mm",
        "reason": "",
        "block_s": {"eager": 3.0, "grouped_mm": 2.5},
    }
    assert pick_kernel(block, "eager", "grouped_mm")["chosen"] == "eager"
    _only_chosen_kernel_has_targets(block, "grouped_mm")
    eager, grouped, compiled, pair = block["comparisons"]
    assert eager["target"] is None and eager["met"] is None and grouped["target"] == ["<=", 1.1]
    # the pair written for the target keeps its verdict whatever the model runs; the compiled kernel alone does not
    assert compiled["target"] is None and pair["target"] == ["<=", 1.1]


def test_section_rounds_are_clamped_only_when_not_set_explicitly():
    from benchmarks.run import _clamp

    assert _clamp(3, 7, None) == 7 and _clamp(7, None, 5) == 5 and _clamp(4, 2, 6) == 4


def test_utilisation_markdown_reads_reports_without_onednn_rates():
    """A report written before the oneDNN rates were measured (or by a torch without oneDNN: None each) renders
    without their column or sentence."""
    from benchmarks.reproduction import utilisation_markdown

    row = {
        "name": "Stage 1",
        "batch": 16,
        "step_s": 0.1,
        "gflops_per_s": 50.0,
        "utilisation": 0.5,
        "compute_utilisation": 0.6,
        "seconds": dict.fromkeys(("data", "forward", "backward", "optimizer", "bookkeeping"), 0.02),
    }
    section = {
        "title": "Utilisation",
        "matmul_rate_flops": 1e11,
        "threads": 1,
        "steps_per_training_run": 12,
        "rows": [row],
    }
    for old in (
        section,
        {**section, "onednn_matmul_rate_flops": None},
        {**section, "onednn_matmul_rate_flops": {"1024²": None, "decoder": None}},
    ):
        table = "\n".join(utilisation_markdown(old))
        assert "| Stage 1 | 16 |" in table and "oneDNN" not in table
    table = "\n".join(utilisation_markdown({**section, "onednn_matmul_rate_flops": {"1024²": 2e11}}))
    assert "| 25.0 % |" in table and "torch's fp32 rate above is 50% of it" in table


def test_utilisation_section_profiles_every_reproduction_step(tmp_path, monkeypatch):
    """The short reproduction chain on a small generated world: one row per step, each row's share being its own
    FLOPs over its own time over the rate measured in the run, and the table shows them all."""
    from training_helpers import make_shapes

    from benchmarks.reproduction import utilisation_markdown, utilisation_section

    shapes = make_shapes(tmp_path / "shapes", image_size=64)
    section = utilisation_section(steps=3, dataset=str(shapes), n_inference=4, repeats=1, log=lambda _: None)
    names = [row["name"] for row in section["rows"]]
    assert names == [
        "CLIP pretraining",
        "LM pretraining",
        "Stage 1",
        "Stage 2",
        "Stage 3",
        "dense control",
        "concept-probe extraction",
        "caption generation (24 tokens)",
    ]
    rate = section["matmul_rate_flops"]
    for row in section["rows"]:
        assert row["flops_per_step"] > 0 and row["step_s"] > 0
        assert row["utilisation"] == pytest.approx(row["flops_per_step"] / row["step_s"] / rate)
    table = "\n".join(utilisation_markdown(section))
    assert all(f"| {name} |" in table for name in names) and f"{rate / 1e9:.1f} GFLOP/s" in table
    onednn = section["onednn_matmul_rate_flops"]
    assert set(onednn) == {"1024²", "decoder", "lm_head"}
    if onednn["1024²"]:  # a column of each step's share of the oneDNN rate, and the rates in the preamble
        first = section["rows"][0]
        assert "| compute only | of oneDNN rate |" in table
        assert f"{100 * first['gflops_per_s'] * 1e9 / onednn['1024²']:.1f} % |" in table
        assert f"1024² {onednn['1024²'] / 1e9:.1f}" in table
