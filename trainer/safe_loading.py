"""Loading model weights safely: safetensors only unless the user opts in, and only weights that fit the config.

A pickle file (`.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`, `.pickle`) can run code when it is unpickled, so a checkpoint
folder holding model weights as a pickle is refused unless `--allow_pickle` is given; even then it is read through
`torch.load(weights_only=True)` (transformers' `load_state_dict`, with `weights_only=True` passed explicitly), which
unpickles tensors and plain containers only and refuses any other object. Without the flag, `from_pretrained` gets
`use_safetensors=True`, so transformers never falls back to a pickle either.

The Trainer's own resume files inside `checkpoint-N` (optimizer.pt, scheduler.pt, scaler.pt, rng_state*.pth) are
not model weights and are exempt: transformers' Trainer reads every one of them with `torch.load(...,
weights_only=True)` (trainer.py, `_load_rng_state` and `_load_optimizer_and_scheduler`). `training_args.bin` (which
`Trainer.save_model` writes next to the weights) is exempt too: the Trainer only writes it, nothing here reads it.

A config that does not describe the checkpoint's weights is refused too: transformers only warns about missing or
unexpected keys and initialises the missing ones at random, so a `vision_config` edited to another tower would train
on a random vision tower without a word. `from_pretrained_checked` loads with `output_loading_info=True` and refuses
any shape mismatch, and any missing or unexpected key of the vision tower or the connector, naming `vision_config`;
it reads the config on its own first, so that a field its config class refuses is reported with the file to fix.
"""

from __future__ import annotations

import fnmatch
import pickle
import re
from pathlib import Path

# The Space keeps its own copy (space/model_source.py: it runs without the project installed); a test holds them equal.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# The Trainer's resume state and its arguments (see the module docstring): pickles that are not model weights.
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "training_args.bin")
# Parameter-name parts of the modules `vision_config` describes: keys missing or unexpected there mean the config
# names another tower than the checkpoint holds.
VISION_KEY_PARTS = ("vision_tower", "connector")
ALLOW_PICKLE_HELP = (
    f"allow model weights stored as a pickle ({'/'.join(PICKLE_SUFFIXES)}; they can run code when loaded): read with "
    "torch.load(weights_only=True), which refuses anything but tensors. Default: safetensors only"
)


def pickle_files(path: str | Path) -> list[Path]:
    """The pickle weight files of a checkpoint folder (or the file itself), the Trainer's state files excepted."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    else:  # a Hub id: nothing on this machine to check
        files = []
    return [
        p
        for p in files
        if p.suffix.lower() in PICKLE_SUFFIXES
        and not any(fnmatch.fnmatch(p.name, pat) for pat in TRAINER_STATE_FILES)
    ]


def check_no_pickle(path: str | Path, allow_pickle: bool = False) -> list[Path]:
    """Refuse a checkpoint folder (or file) holding pickled model weights unless `allow_pickle`; returns the pickle
    files found (allowed). A path that is not on this machine (a Hub id) has nothing to check here:
    `use_safetensors=True` makes transformers refuse a pickle-only Hub repository itself."""
    found = pickle_files(path)
    if found and not allow_pickle:
        names = ", ".join(str(p) for p in found)
        raise ValueError(
            f"{names}: model weights stored as a pickle, which can run code when loaded; convert them to "
            "safetensors (`model.save_pretrained(folder)` saves safetensors), or pass --allow_pickle to read them "
            "with torch.load(weights_only=True)"
        )
    return found


def safetensors_only(allow_pickle: bool) -> bool | None:
    """`use_safetensors` for `from_pretrained`: True (never a pickle) unless pickles are allowed; then None
    (safetensors where the folder has them, else the pickle)."""
    return None if allow_pickle else True


def check_loading_info(info: dict, source: str | Path) -> None:
    """Refuse weights that do not fit the config: any shape mismatch, and any missing or unexpected key of the
    vision tower or the connector (the modules `vision_config` describes)."""
    mismatched = sorted(info.get("mismatched_keys") or ())
    vision = [
        (kind, key)
        for kind in ("missing_keys", "unexpected_keys")
        for key in sorted(info.get(kind) or ())
        if _is_vision(key)
    ]
    if not mismatched and not vision:
        return
    shown = [f"{key} (checkpoint {tuple(got)}, config {tuple(want)})" for key, got, want in mismatched[:3]]
    shown += [f"{key} ({kind.split('_')[0]})" for kind, key in vision[:3]]
    n = len(mismatched) + len(vision)
    field = "vision_config" if vision or any(_is_vision(k) for k, *_ in mismatched) else "the model config"
    raise ValueError(
        f"{source}: config.json does not match the checkpoint's weights ({n} parameters: {', '.join(shown)}"
        f"{', ...' if n > len(shown) else ''}); fix {field} in {Path(source) / 'config.json'} to describe the "
        "saved weights (or load the checkpoint that goes with it)"
    )


def _is_vision(key: str) -> bool:
    return any(part in key.split(".") for part in VISION_KEY_PARTS)


def from_pretrained_checked(model_class, source: str | Path, allow_pickle: bool = False, **kwargs):
    """`model_class.from_pretrained(source, **kwargs)` with the two refusals of this module: pickled weights unless
    `allow_pickle` (then `weights_only=True`), and weights that do not fit the config. Returns the model."""
    check_no_pickle(source, allow_pickle)
    check_config(source, trust_remote_code=kwargs.get("trust_remote_code", False))
    kwargs = {
        **kwargs,
        "use_safetensors": safetensors_only(allow_pickle),
        "weights_only": True,
        "output_loading_info": True,
        # Mismatched shapes are reported in the loading info and refused below, naming the field, instead of
        # transformers' RuntimeError.
        "ignore_mismatched_sizes": True,
    }
    from safetensors import SafetensorError

    try:
        model, info = model_class.from_pretrained(str(source), **kwargs)
    except pickle.UnpicklingError as error:
        raise _unpickling_refused(source, error) from error
    except SafetensorError as error:
        raise unreadable_safetensors(source, error) from error
    check_loading_info(info, source)
    return model


def unreadable_safetensors(source: str | Path, error: Exception) -> ValueError:
    """The error for weights safetensors cannot read (`SafetensorError`: an empty, cut-off or foreign file), naming
    the folder's safetensors files, since safetensors' own message names none."""
    source = Path(source)
    files = sorted(source.glob("*.safetensors")) if source.is_dir() else [source]
    names = ", ".join(str(f) for f in files) or str(source)
    return ValueError(
        f"{names}: cannot be read as safetensors ({error}): the file is truncated or not a safetensors file; "
        "copy or save it again"
    )


def looks_local(source: str | Path) -> bool:
    """Whether a model source that is not on this machine was meant as a local path rather than a Hub id
    (`ORG/NAME`, which never starts with `/`, `.` or `~` and has one slash at most)."""
    text = str(source)
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text


def check_config(source: str | Path, trust_remote_code: bool = False) -> None:
    """Read `source`'s config on its own first, so that a value its config class refuses (`num_experts_per_tok`
    above `num_experts`, `image_token_id` outside the vocabulary, `moe_layers` out of range: `MoeVlmConfig.
    check_moe_vlm`) is reported with the file to fix."""
    from transformers import AutoConfig

    if not Path(source).exists() and looks_local(source):
        raise FileNotFoundError(f"{source} does not exist (a model folder here, or a Hub id ORG/NAME)")
    where = Path(source) / "config.json" if Path(source).is_dir() else source
    try:
        AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    except OSError as error:  # transformers' message (not JSON, no such Hub repo, offline), on one line
        raise ValueError(f"{where}: {' '.join(str(error).split())}") from error


def load_pickled_weights(path: str | Path, allow_pickle: bool = False) -> dict:
    """A state dict from a pickle file (an open_clip `.pt`): refused unless `allow_pickle`, then read with
    `torch.load(weights_only=True)`."""
    import torch

    check_no_pickle(path, allow_pickle)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _unpickling_refused(path, error) from error


def _unpickling_refused(source, error: Exception) -> ValueError:
    # torch's message: how to load the file anyway, then the refused object ("Unsupported global: GLOBAL x.y").
    refused = re.search(r"Unsupported global: GLOBAL [\w.]+", str(error))
    return ValueError(
        f"{source}: the pickled weights hold objects other than tensors, which torch.load(weights_only=True) "
        f"refuses to unpickle (they could run code); use safetensors weights"
        + (f" ({refused.group(0)})" if refused else "")
    )


__all__ = [
    "ALLOW_PICKLE_HELP",
    "PICKLE_SUFFIXES",
    "TRAINER_STATE_FILES",
    "check_config",
    "check_loading_info",
    "check_no_pickle",
    "from_pretrained_checked",
    "load_pickled_weights",
    "pickle_files",
    "safetensors_only",
]
