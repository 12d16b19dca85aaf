"""FSDP on CPU processes: what `accelerate launch --config_file configuration/accelerate/fsdp_cpu.yaml` needs to shard.

accelerate 1.15 builds the FSDP plugin from the launcher's environment (`ACCELERATE_USE_FSDP=true`), but its
`AcceleratorState` attaches that plugin only to accelerator device types (CUDA, XPU, NPU, ...): on CPU processes
(`use_cpu: true`, the gloo backend) it silently keeps `DistributedType.MULTI_CPU`, and the Trainer then wraps the
model in plain DDP, so a "FSDP" run on CPU would really be data parallel. PyTorch's FSDP itself runs on CPU with
gloo, so `enable_fsdp_on_cpu` attaches the plugin the launcher asked for, and FSDP is what then trains: the one
place where this package steps into accelerate's state, so that the sharded code path (wrapping, the full state
dict save, the collectives in the forward) is exercised by CPU-only CI before the first GPU run.
"""

from __future__ import annotations

import os

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def fsdp_requested_on_cpu(accelerator) -> bool:
    """The launcher asked for FSDP (`ACCELERATE_USE_FSDP`) and accelerate dropped it because the processes are CPU
    processes (`MULTI_CPU`)."""
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    state = accelerator.state
    return (
        requested
        and state.distributed_type == DistributedType.MULTI_CPU
        and getattr(state, "fsdp_plugin", None) is None
    )


def enable_fsdp_on_cpu(accelerator) -> FullyShardedDataParallelPlugin:
    """Attach the launcher's FSDP plugin (read from the environment, as accelerate reads it) to the shared accelerator
    state, so that `accelerator.prepare` shards the model. Returns the plugin."""
    plugin = FullyShardedDataParallelPlugin()
    if plugin.sync_module_states or plugin.cpu_ram_efficient_loading:
        # accelerate's parameter initialisation for these moves modules to an accelerator device it looks up.
        raise ValueError(
            "FSDP on CPU processes: set fsdp_sync_module_states and fsdp_cpu_ram_efficient_loading to false in the "
            "accelerate config (configuration/accelerate/fsdp_cpu.yaml does): every process loads the whole "
            "checkpoint itself instead"
        )
    state = accelerator.state  # AcceleratorState: one shared state, so this is what every later lookup sees
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # Every later `AcceleratorState()` copies PartialState's fields over its own: set it there too, as accelerate does
    # when it attaches the plugin itself.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return plugin


__all__ = ["enable_fsdp_on_cpu", "fsdp_requested_on_cpu"]
