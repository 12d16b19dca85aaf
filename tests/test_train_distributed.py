"""`accelerate launch` with two real CPU processes (gloo) trains a stage: checked by the ranks the processes
report, not the exit code (`--cpu --num_processes 2` would silently start one process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from training_helpers import make_shapes, make_stage0, marker, quick_args, routing_lines

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_run(tmp_path):
    shapes, stage0 = make_shapes(tmp_path / "shapes"), make_stage0(tmp_path / "stage0")
    out = tmp_path / "stage1"
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "trainer", "train", "--stage", "1", "--out", str(out), "--from", str(stage0),
        *quick_args(shapes, steps=2, logging_steps=1),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [json.loads(p.read_text()) for p in sorted((out / "processes").glob("rank-*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert len({r["pid"] for r in ranks}) == 2
    assert marker(out)["world_size"] == 2 and marker(out)["changed_params_check"]["ok"]
    # The routing statistics are summed over both processes: 1 step x 4 records x 2 processes x 16 image tokens.
    for line in routing_lines(out):
        assert all(layer["image"]["tokens"] == 4 * 2 * 16 for layer in line["layers"].values())
