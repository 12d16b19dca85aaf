"""The shipped DeepSpeed ZeRO-3 config (`configuration/accelerate/ds_zero3.json`): DeepSpeed's own validation accepts
it once the Trainer has filled its `auto` values, and ZeRO-3 trains a step of the tiny model with it on two CPU
processes (gloo) under `torchrun` and `deepspeed.initialize`. Not through `accelerate launch`: accelerate 1.15 turns
DeepSpeed off on CPU processes (`AcceleratorState` enables it only `and not cpu`), so the Trainer path with
`deepspeed_zero3.yaml` needs a GPU (README "Sharded training")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DS_CONFIG = REPO / "configuration" / "accelerate" / "ds_zero3.json"


def filled_config(per_device_batch: int = 2, world_size: int = 1) -> dict:
    """ds_zero3.json with its `auto` values filled the way the Trainer fills them (transformers'
    `HfTrainerDeepSpeedConfig`, from the training arguments and the tiny model's hidden size), fp32 on CPU."""
    from conftest import tiny_config
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from modeling_moe_vlm import MoeVlmForCausalLM

    args = TrainingArguments(
        output_dir=os.devnull, per_device_train_batch_size=per_device_batch, use_cpu=True, report_to="none"
    )
    config = HfTrainerDeepSpeedConfig(json.loads(DS_CONFIG.read_text()))
    config.trainer_config_process(args)
    config.trainer_config_finalize(args, MoeVlmForCausalLM(tiny_config()), num_training_steps=4)
    config.config["train_batch_size"] = per_device_batch * world_size
    return config.config


def test_deepspeed_validates_the_shipped_zero3_config():
    from deepspeed.runtime.config import DeepSpeedConfig

    config = filled_config()
    assert "auto" not in json.dumps(config)
    validated = DeepSpeedConfig(config)
    assert validated.zero_optimization_stage == 3
    assert validated.zero_config.gather_16bit_weights_on_model_save  # what the final save_model needs
    # The validation is real: a misspelt ZeRO key is refused.
    config["zero_optimization"]["stage3_prefetch_bukcet_size"] = 1
    with pytest.raises(Exception, match="stage3_prefetch_bukcet_size"):
        DeepSpeedConfig(config)


def test_zero3_trains_a_step_on_two_cpu_processes(tmp_path):
    from test_train_distributed import _free_port

    command = [
        str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
        __file__, str(tmp_path),
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
    }
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank-*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        # ZeRO-3 partitions every parameter above stage3_param_persistence_threshold (10 x hidden, as the Trainer
        # fills it): here those hold almost all the elements; the small ones (norms, biases) stay whole.
        assert r["zero_stage"] == 3 and r["partitioned"] > 0, r
        assert r["partitioned_numel"] > 0.95 * r["numel"], r
        assert r["changed"] > 0 and r["loss"] == ranks[0]["loss"], r


def _worker(out: Path) -> None:
    """One torchrun process: ZeRO-3 on the tiny model with the filled shipped config, one step on a text batch."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from conftest import tiny_config

    from modeling_moe_vlm import MoeVlmForCausalLM
    from trainer.sharding import end_distributed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config())
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        config=filled_config(world_size=dist.get_world_size()),
    )
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params[1]):
        before = params[1].detach().clone()
    ids = torch.full((2, 8), 20)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    with deepspeed.zero.GatheredParameters(params[1]):
        changed = int(not torch.equal(before, params[1].detach()))
    record = {
        "rank": dist.get_rank(),
        "zero_stage": engine.zero_optimization_stage(),
        "n_parameters": len(params),
        # A partitioned parameter's local view is empty; `ds_numel` is its full size.
        "partitioned": sum(p.numel() == 0 for p in params),
        "partitioned_numel": sum(p.ds_numel for p in params if p.numel() == 0),
        "numel": sum(p.ds_numel for p in params),
        "changed": changed,
        "loss": float(loss.detach()),
    }
    (out / f"rank-{record['rank']}.json").write_text(json.dumps(record))
    # Without a teardown, rank 1 once aborted at exit after writing its record (torch 2.15.0, gloo's threads).
    engine.destroy()
    del engine, model, params
    end_distributed()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
