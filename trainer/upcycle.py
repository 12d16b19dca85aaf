"""Stage 0 (`moe-vlm init`, or `moe-vlm train --stage 0`): write an upcycled, ready-to-train model directory (the
authors' code calls it `create_moe_model`)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MistralConfig, MistralForCausalLM

from configuration.presets import load_preset
from configuration.tokenizer import build_processor
from modeling_moe_vlm import MoeVlmForCausalLM

from .safe_loading import from_pretrained_checked, load_pickled_weights
from .stage_dirs import clear_marker, write_marker


def load_vision_state(path: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A vision tower state dict from an open_clip checkpoint file (a whole CLIP's `visual.*` keys or bare); a
    pickle (open_clip's `.pt`) only with `allow_pickle` (`trainer.safe_loading`)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = load_pickled_weights(path, allow_pickle)
        state = state.get("state_dict", state)
    visual = {k.removeprefix("module.")[len("visual.") :]: v for k, v in state.items() if "visual." in k}
    return visual or state


# Checkpoint suffixes a `--vision` file has (open_clip's `.pt`, or safetensors): such a value is a path, not a name.
VISION_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def check_open_clip_name(vision: str) -> str:
    """`vision`, a `--vision` value that is no file, as an open_clip `NAME[:TAG]` (or an `hf-hub:` id); refused,
    naming `--vision`, when it looks like a path or names no open_clip model (open_clip's own error lists all of
    them after a traceback)."""
    import open_clip

    name = vision.partition(":")[0]
    if vision.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models():
        return vision
    if "/" in vision or Path(vision).suffix in VISION_FILE_SUFFIXES:
        raise FileNotFoundError(f"--vision {vision}: no such file (give an open_clip checkpoint file)")
    raise ValueError(
        f"--vision {vision}: neither a file nor an open_clip model name; give a checkpoint file or NAME:TAG, e.g. "
        "ViT-L-14:openai (`open_clip.list_pretrained()` lists them)"
    )


def init_model(
    out: str | Path,
    preset: str = "tiny",
    mistral: str | MistralForCausalLM | None = None,
    vision=None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    **overrides,
) -> Path:
    """Build the dense Mistral (random for `tiny` unless `mistral` is given), upcycle it with
    `MoeVlmForCausalLM.from_mistral`, save model + processor to `out`, and write the completion marker last.

    `vision`: open_clip `NAME:TAG`, a checkpoint file path, an open_clip model, or None (the preset's default:
    random inline tower for `tiny`, `ViT-L-14:openai` for `paper`). Weights files are read as safetensors only unless
    `allow_pickle` (`trainer.safe_loading`)."""
    spec = load_preset(preset)
    out = Path(out)
    vision = vision if vision is not None else spec.get("vision")
    if isinstance(vision, (str, Path)) and not Path(vision).is_file():
        vision = check_open_clip_name(str(vision))  # before the dense model loads: a bad name costs nothing
    mistral = mistral if mistral is not None else spec.get("mistral")
    torch.manual_seed(seed)
    if mistral is None:
        dense = MistralForCausalLM(MistralConfig(**spec["mistral_config"]))
    elif isinstance(mistral, (str, Path)):
        dense = from_pretrained_checked(
            MistralForCausalLM, mistral, allow_pickle=allow_pickle, dtype=dtype or torch.float32
        )
    else:
        dense = mistral
    fields = {**spec["moe_vlm"], **overrides}
    if isinstance(vision, (str, Path)) and Path(vision).is_file():
        vision = load_vision_state(str(vision), allow_pickle)
    elif isinstance(vision, str):
        fields.pop("vision_config", None)  # from_mistral describes the named open_clip tower itself
    model = MoeVlmForCausalLM.from_mistral(dense, vision=vision, seed=seed, dtype=dtype, **fields)
    processor = build_processor(model.config)
    out.mkdir(parents=True, exist_ok=True)
    clear_marker(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    marker = {
        "stage": "0",
        "name": "upcycle",
        "preset": preset,
        "seed": seed,
        "mistral": mistral if isinstance(mistral, str) else None,
        "vision": vision if isinstance(vision, str) else ("checkpoint" if vision is not None else None),
    }
    write_marker(out, marker)
    return out
