"""LoRA for any training stage: PEFT adapters on the groups of the stage's trainable set that `--lora_targets`
names, full training of the rest of it.

`trainer.freezing` stays the one source of what a stage trains: an adapter goes only on a group the stage trains
(Stage 2: `experts`; Stage 3: `experts` and `attention`), and every other trainable group (the router, tiny; Stage 1's
connector, randomly initialised at Stage 0, where a low-rank update of a random matrix would only limit it) trains
fully, as PEFT's `modules_to_save`. The stacked experts (`mlp.experts.gate_up_proj` (E, 2I, H), `down_proj`
(E, H, I)) are 3-D parameters, not `nn.Linear`s: PEFT adapts them with `target_parameters` (one rank-r update per
expert); attention and the connector are `nn.Linear`s (`target_modules`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from configuration.contract import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, COMPLETION_MARKER

from .freezing import PARAMETER_GROUPS, group_of, trainable_names

# The groups an adapter can go on, and what it adapts there.
LORA_TARGETS = ("experts", "attention", "connector")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
ATTENTION_MODULES = r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"
CONNECTOR_MODULES = r"model\.connector\.linear_\d"


def check_lora_fields(r: int | None, alpha: float | None, targets: list[str] | None) -> None:
    """Refuse a LoRA setting that cannot run, naming the field: called by `StageArguments.__post_init__`."""
    if r is None:
        if alpha is not None or targets:
            raise ValueError(
                "lora_alpha / lora_targets are set but lora_r is not: set --lora_r to train adapters"
            )
        return
    if r < 1:
        raise ValueError(f"lora_r must be >= 1, got {r}")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0, got {alpha}")
    unknown = [t for t in targets or () if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"lora_targets: unknown target(s) {unknown}; choose from {', '.join(LORA_TARGETS)}")


def lora_targets(trainable: list[str], targets: list[str] | None) -> list[str]:
    """The adapted groups: `targets` (default: `experts` and `attention`), each of which the stage must train."""
    targets = list(targets) if targets else [t for t in ("experts", "attention") if t in trainable]
    untrained = [t for t in targets if t not in trainable]
    if untrained:
        raise ValueError(
            f"lora_targets {untrained} are not trained by this stage (trainable: {trainable}): an adapter goes "
            "only on a group the stage trains"
        )
    if not targets:
        raise ValueError(
            f"lora_targets: this stage trains {trainable}, none of which takes an adapter by default; "
            f"name one of {', '.join(LORA_TARGETS)} or drop --lora_r"
        )
    return targets


def _module_of(name: str) -> str:
    """The module a trainable parameter's group makes whole: `model.layers.3.mlp.gate`, `model.connector`."""
    return PARAMETER_GROUPS[group_of(name)].match(name).group(0).rstrip(".")


def lora_config(model: nn.Module, trainable: list[str], r: int, alpha: float | None, targets: list[str]):
    """PEFT's `LoraConfig` for a stage training `trainable` (group names) with adapters on `targets`."""
    from peft import LoraConfig

    modules = ([ATTENTION_MODULES] if "attention" in targets else []) + (
        [CONNECTOR_MODULES] if "connector" in targets else []
    )
    full = sorted({_module_of(n) for n in trainable_names(model, trainable) if group_of(n) not in targets})
    return LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=0.0,
        # A regex string matches whole module names; an empty list would be refused by PEFT.
        target_modules="|".join(f"(?:{m})" for m in modules) if modules else None,
        target_parameters=list(EXPERT_PARAMETERS) if "experts" in targets else None,
        # Whole names, not patterns: PEFT matches them as name suffixes when wrapping, but by substring when it
        # saves the adapter, so a regex here would train the router and then leave it out of the saved adapter.
        modules_to_save=full or None,
    )


def apply_lora(model: nn.Module, trainable: list[str], stage_args) -> tuple[nn.Module, list[str], dict]:
    """Wrap `model` (its trainable set already applied) in a `PeftModel`. Returns it, the names (on `model`, which
    PEFT edits in place) of the parameters that train (adapters and the fully trained copies), and the marker's
    `adapter` record."""
    from peft import get_peft_model

    targets = lora_targets(trainable, stage_args.lora_targets)
    config = lora_config(model, trainable, stage_args.lora_r, stage_args.lora_alpha, targets)
    plain = set(trainable_names(model, trainable))
    full = {_module_of(n) for n in plain if group_of(n) not in targets}
    peft_model = get_peft_model(model, config)
    names = []
    for name, param in model.named_parameters():
        # A fully trained copy's parameter trains where its plain twin would (a bypassed router's does not).
        train = "lora_" in name or name.replace(".modules_to_save.default.", ".") in plain - {
            n for n in plain if group_of(n) in targets
        }
        param.requires_grad_(train)
        if train:
            names.append(name)
    record = {
        "r": config.r,
        "alpha": config.lora_alpha,
        "targets": targets,
        "fully_trained": sorted({group_of(m + ".") for m in full}),
        "base": stage_args.model_name_or_path,
        "n_adapter_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
    }
    return peft_model, sorted(names), record


def merge_adapter(adapter_dir: str | Path, out: str | Path) -> Path:
    """`moe-vlm merge`: the LoRA stage directory `adapter_dir` folded into a plain `MoeVlmForCausalLM` in `out`
    (`merge_and_unload` on its base, the `--from` directory its adapter config names), with the processor and a
    completion marker (the stage's, `merged_from` added, `adapter` moved to `merged_adapter`), written last, so
    `from_pretrained`, the next stage and `moe-vlm analyze` take it as a stage directory."""
    from peft import PeftModel
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoProcessor

    from configuration.cli_inputs import check_out_dir

    from .safe_loading import from_pretrained_checked, unreadable_safetensors
    from .stage_dirs import clear_marker, read_json, write_marker

    adapter_dir, out = Path(adapter_dir), Path(out)
    if not (adapter_dir / ADAPTER_CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"--adapter {adapter_dir}: no {ADAPTER_CONFIG_FILE} (not a LoRA stage directory)"
        )
    if out.resolve() == adapter_dir.resolve():
        raise ValueError(f"--out {out} is the --adapter directory: write the merged model elsewhere")
    if not (adapter_dir / COMPLETION_MARKER).is_file():
        raise FileNotFoundError(
            f"--adapter {adapter_dir}: no {COMPLETION_MARKER}, the LoRA stage did not finish"
        )
    check_out_dir(out, refuse_finished=True)
    marker = read_json(adapter_dir / COMPLETION_MARKER)
    adapter_config = read_json(adapter_dir / ADAPTER_CONFIG_FILE)
    if not isinstance(adapter_config, dict):
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG_FILE} is not PEFT's adapter config (a JSON object)")
    base = adapter_config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(
            f"{adapter_dir}: the adapter's base model {base!r} (the stage's --from directory) is not a directory"
        )
    model = from_pretrained_checked(AutoModelForCausalLM, base, trust_remote_code=True)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except SafetensorError as error:
        raise unreadable_safetensors(adapter_dir / ADAPTER_WEIGHTS_FILE, error) from error
    out.mkdir(parents=True, exist_ok=True)
    clear_marker(out)
    merged.save_pretrained(out)
    AutoProcessor.from_pretrained(adapter_dir, trust_remote_code=True).save_pretrained(out)
    marker["merged_adapter"] = marker.pop("adapter", None)
    marker["merged_from"] = str(adapter_dir)
    write_marker(out, marker)
    return out


__all__ = [
    "LORA_TARGETS",
    "apply_lora",
    "check_lora_fields",
    "merge_adapter",
    "lora_config",
    "lora_targets",
]
