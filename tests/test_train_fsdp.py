"""Sharded training that runs: Stages 2 and 3 on the tiny preset under FSDP2 with two real CPU processes (gloo),
launched by `accelerate launch --config_file configuration/accelerate/fsdp_cpu.yaml` (the CPU twin of the shipped
`fsdp.yaml`), against a single-process run with the same global batch; the saved full state dict loads with a plain
`from_pretrained`. The twin may differ from `fsdp.yaml` only in the keys `CPU_ONLY_KEYS` names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train_distributed import _free_port
from training_helpers import make_shapes, make_stage0, marker, quick_args, routing_lines, train

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = REPO / "configuration" / "accelerate"
FSDP_CPU = ACCELERATE / "fsdp_cpu.yaml"
# Where the CPU twin may differ from fsdp.yaml, and why (each checked by running it; README "Sharded training"):
CPU_ONLY_KEYS = {
    "num_processes": "2 CPU processes in CI instead of 8 GPUs",
    "mixed_precision": "fp32: bf16 matmuls run ~100x slower on these CPUs",
    "use_cpu": "CPU processes, gloo backend",
    # accelerate's FSDP1 wrapper on CPU fails: "Inconsistent compute device and `device_id`: cpu vs cpu:0".
    "fsdp_config.fsdp_version": "FSDP2 (fully_shard): FSDP1 does not run on CPU processes",
    "fsdp_config.fsdp_reshard_after_forward": "FSDP2 spells FULL_SHARD as true",
    # accelerate builds their parameter-init function on an accelerator device it looks up ("no available devices").
    "fsdp_config.fsdp_sync_module_states": "needs an accelerator device; every process loads the checkpoint",
    "fsdp_config.fsdp_cpu_ram_efficient_loading": "needs fsdp_sync_module_states",
}
# Per-step loss of 2 processes x 2 records vs 1 process x 4 records (the same records per step): the measured
# maximum difference is ~1e-6 (float32 sums in another order); 1e-4 leaves two orders of magnitude of margin and
# still fails on any change of the batch (one record's loss moves the mean by ~1e-2).
LOSS_TOLERANCE = 1e-4
# The saved weights after 3 AdamW steps against the single-process run's: the measured maximum difference is ~1e-6.
WEIGHT_TOLERANCE = 1e-4
# PYTHONFAULTHANDLER: a rank killed by a signal (a gloo abort at teardown) prints every thread's Python stack, which
# the assertion's stderr tail shows.
ENV = {
    **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "PYTHONFAULTHANDLER": "1",
}  # fmt: skip
STEPS = 3


def flat_keys(tree: dict, prefix: str = "") -> dict:
    """`{"fsdp_config.fsdp_version": 1, ...}`: a nested accelerate config as dotted keys."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(shipped: Path, twin: Path) -> dict[str, tuple]:
    """The keys where two accelerate configs differ: `{key: (shipped value, twin value)}` (absent: None)."""
    a, b = (flat_keys(yaml.safe_load(p.read_text())) for p in (shipped, twin))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def test_cpu_twin_differs_from_fsdp_yaml_only_where_the_cpu_requires():
    diff = config_diff(ACCELERATE / "fsdp.yaml", FSDP_CPU)
    unexpected = sorted(set(diff) - set(CPU_ONLY_KEYS))
    assert not unexpected, (
        f"fsdp_cpu.yaml differs from fsdp.yaml beyond the CPU's needs: { {k: diff[k] for k in unexpected} }"
    )
    assert set(diff) == set(CPU_ONLY_KEYS), (
        f"allowed differences that are not differences: {set(CPU_ONLY_KEYS) - set(diff)}"
    )
    # The README shows the same diff.
    readme = (REPO / "README.md").read_text()
    for key, (shipped, twin) in diff.items():
        assert f"| `{key}` | `{shipped}` | `{twin}` |" in readme, key


# `accelerate launch` options: the FSDP CPU twin, and plain DDP on two CPU processes (as test_train_distributed.py).
FSDP_LAUNCH = ["--config_file", str(FSDP_CPU)]
DDP_LAUNCH = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]  # fmt: skip


def launch(
    launcher: list[str], stage: str, out: Path, from_dir: Path, overrides: list[str], timeout: int = 240
):
    """`accelerate launch <launcher> -m trainer train ...`, two processes, under a timeout: a hang fails the test
    (`subprocess.TimeoutExpired`) instead of the suite."""
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", *launcher,
        "--main_process_port", str(_free_port()),
        "-m", "trainer", "train", "--stage", stage, "--out", str(out), "--from", str(from_dir), *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def ranks(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "processes").glob("rank-*.json"))]


def check_two_sharded_ranks(out: Path) -> None:
    """Two gloo processes really ran, each holding about half of every parameter (FSDP2 shards, not DDP copies)."""
    found = ranks(out)
    assert sorted(r["rank"] for r in found) == [0, 1] and len({r["pid"] for r in found}) == 2
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in found)
    for r in found:
        assert r["sharded_parameters"] == r["n_parameters"] > 0, r
        assert r["local_numel"] < 0.6 * r["full_numel"], r
    assert sum(r["local_numel"] for r in found) >= found[0]["full_numel"]


def losses(out: Path) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Shapes data and a Stage 1 model (one in-process step) that Stage 2 starts from."""
    work = tmp_path_factory.mktemp("fsdp")
    shapes = make_shapes(work / "shapes")
    stage1 = train("1", work / "stage1", make_stage0(work / "stage0"), quick_args(shapes, steps=1))
    return work, shapes, stage1


def run_both(work: Path, stage: str, from_dir: Path, overrides: list[str]) -> tuple[Path, Path]:
    """The stage under FSDP (2 processes x 2 records) and in one process (4 records): the same global batch, and the
    same records per step (accelerate hands consecutive per-process batches of the one seeded permutation to the
    processes in turn, so step k's 4 records are the single run's step k records)."""
    sharded, single = work / f"fsdp{stage}", work / f"single{stage}"
    launch(FSDP_LAUNCH, stage, sharded, from_dir, quick_args(work / "shapes", steps=STEPS, logging_steps=1,
                                                          per_device_train_batch_size=2) + overrides)  # fmt: skip
    train(stage, single, from_dir, quick_args(work / "shapes", steps=STEPS, logging_steps=1) + overrides)
    return sharded, single


def check_matches_single_process(sharded: Path, single: Path, processor) -> dict:
    """Loss curves equal within LOSS_TOLERANCE; the saved full state dict loads with a plain from_pretrained and
    equals the single-process run's weights, so the logits agree too."""
    from modeling_moe_vlm import MoeVlmForCausalLM

    a, b = losses(sharded), losses(single)
    assert len(a) == len(b) == STEPS
    loss_gap = max(abs(x - y) for x, y in zip(a, b))
    assert loss_gap < LOSS_TOLERANCE, (a, b)
    models = [MoeVlmForCausalLM.from_pretrained(d).eval() for d in (sharded, single)]
    weights = [dict(m.named_parameters()) for m in models]
    assert weights[0].keys() == weights[1].keys()
    weight_gap = max(float((weights[0][k] - weights[1][k]).detach().abs().max()) for k in weights[0])
    assert weight_gap < WEIGHT_TOLERANCE
    from PIL import Image

    inputs = processor(
        images=[Image.new("RGB", (32, 32), "red")], text=["<image>\nA red circle."], return_tensors="pt"
    )
    with torch.no_grad():
        logits = [m(**inputs).logits for m in models]
    assert torch.allclose(logits[0], logits[1], atol=1e-3)
    check = marker(sharded)["changed_params_check"]
    assert check["ok"] and check["n_changed"] == check["n_trainable"] > 0, check
    assert marker(sharded)["world_size"] == 2
    return {"loss_gap": loss_gap, "weight_gap": weight_gap, "losses": a}


def test_stage2_under_fsdp_matches_one_process(start, processor):
    work, _, stage1 = start
    sharded, single = run_both(work, "2", stage1, [])
    check_two_sharded_ranks(sharded)
    figures = check_matches_single_process(sharded, single, processor)
    print("stage 2", figures)
    # Routing statistics summed over both processes equal the single run's (the same records).
    for x, y in zip(routing_lines(sharded), routing_lines(single)):
        assert {k: v["image"]["tokens"] for k, v in x["layers"].items()} == {
            k: v["image"]["tokens"] for k, v in y["layers"].items()
        }


def test_stage3_under_fsdp_matches_one_process(start, processor):
    work, _, stage1 = start
    stage2 = work / "single2"
    if not stage2.exists():
        train("2", stage2, stage1, quick_args(work / "shapes", steps=1))
    # Softmax top-1 routing: router, attention and experts all train, without Gumbel noise. The recipe's Gumbel noise
    # is drawn from each process's RNG, so 2 processes and 1 draw different noise and their losses differ by design.
    sharded, single = run_both(work, "3", stage2, ["--router_mode", "softmax"])
    check_two_sharded_ranks(sharded)
    figures = check_matches_single_process(sharded, single, processor)
    print("stage 3", figures)
    assert marker(sharded)["routing_probe"]["n_samples"] > 0


def text_only_on_rank_1(shapes: Path, out: Path, n: int = 16) -> Path:
    """A saved stage dataset whose records come in pairs, two with their image then two without: read in order
    (`--train_sampling_strategy sequential`) in batches of 2 by 2 processes, rank 0 gets every captioned image and
    rank 1 only text (accelerate hands out consecutive batches to the processes in turn). Checked on the ranks'
    records, not assumed."""
    from datasets import DatasetDict, load_from_disk

    train = load_from_disk(str(shapes))["train"].select(range(n))
    train = train.map(
        lambda record, i: {"image": record["image"] if (i // 2) % 2 == 0 else None}, with_indices=True
    )
    DatasetDict({"train": train}).save_to_disk(str(out))
    return out


@pytest.mark.parametrize(
    "launcher, stage",
    [(FSDP_LAUNCH, "2"), (DDP_LAUNCH, "2"), (FSDP_LAUNCH, "1")],
    ids=["fsdp-stage2", "ddp-stage2", "fsdp-stage1"],
)
def test_a_rank_without_image_tokens_finishes(start, launcher, stage):
    """pytorch#158719: when one rank's batches hold no image token, the vision expert gets no gradient there (Stage 2;
    in Stage 1 the trainable connector is not even run there); the run must finish (within the timeout), not hang in
    a collective waiting for that gradient."""
    work, shapes, stage1 = start
    name = ("fsdp" if launcher is FSDP_LAUNCH else "ddp") + stage
    data = text_only_on_rank_1(shapes, work / f"text_only_rank1_{name}")
    out = work / f"no_image_{name}"
    from_dir = stage1 if stage == "2" else work / "stage0"
    overrides = ["--train_sampling_strategy", "sequential"]
    args = quick_args(data, steps=STEPS, logging_steps=1, per_device_train_batch_size=2) + overrides
    launch(launcher, stage, out, from_dir, args, timeout=150)
    seen = {r["rank"]: r["tokens_seen"] for r in ranks(out)}
    assert seen[1]["image"] == 0 and seen[1]["text"] > 0, seen  # rank 1 really trained on text alone
    assert seen[0]["image"] == STEPS * 2 * 16, seen  # 2 records x 16 image tokens per step on rank 0
    assert marker(out)["steps"] == STEPS and marker(out)["changed_params_check"]["ok"]
    if launcher is FSDP_LAUNCH:
        check_two_sharded_ranks(out)
