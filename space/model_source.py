"""Which model the Space shows, and what to tell the person about it.

In order: the explicit argument (`moe-vlm demo --model`), the `MODEL_ID` environment variable (a local directory or
a Hub id), the first id under `models:` in this folder's `README.md` front matter (what `moe-vlm publish --space`
writes: the published Space's model, which the Hub also links to the Space), the most-trained stage the
reproduction wrote under `runs/reproduce/` (Stage 3 first), and last an untrained tiny model built on the spot (only
possible inside the repository, where `trainer` is importable; the UI says it is untrained).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import metadata_load  # parses a card's YAML front matter locally

MARKER = "moe_vlm_stage.json"  # a finished stage directory's completion marker, written last
SPACE_CARD = Path(__file__).resolve().parent / "README.md"  # the Space's card; its `models:` names the model
REPRODUCE_DIR = Path(__file__).resolve().parent.parent / "runs" / "reproduce"
# Most-trained first: the routing a visitor should see is the one the full protocol produced.
STAGE_PREFERENCE = ("3", "2.5", "2", "1", "0")
UNTRAINED_STAGES = ("0",)  # Stage 0 is upcycling: experts are copies, routers are fresh
INSTRUCTION_STAGES = ("3",)  # trained on [INST] conversations: prompts go through the chat template
PROMPT_FORMATS = ("raw", "chat")
PROMPT_FORMAT_ENV = "PROMPT_FORMAT"  # set to raw or chat to override the choice below

# Weights saved with pickle (`torch.save`: .bin, .pt, .pth, .ckpt) run code of the file's choosing when loaded, so a
# model directory holding one is refused unless the person says they trust it (`--allow-pickle`, or this variable
# set to 1); the Space loads safetensors only (`use_safetensors=True`), which cannot carry code. The project's own
# loaders apply the same rule (trainer/); the Space keeps this copy because a Hub Space runs without the project
# installed (as with `MARKER`).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ALLOW_PICKLE_ENV = "ALLOW_PICKLE_WEIGHTS"
# Pickles that `from_pretrained` never opens: the Trainer writes its arguments beside every model it saves.
UNREAD_PICKLES = ("training_args.bin",)


@dataclass(frozen=True)
class ModelChoice:
    """`source`: a local directory or Hub id for `from_pretrained`; `origin`: where the choice came from;
    `stage`: the completion marker of a local stage directory (None for Hub ids); `untrained`: say so in the UI."""

    source: str
    origin: str
    stage: dict | None = None
    untrained: bool = False

    def describe(self) -> str:
        """One Markdown paragraph for the top of the page."""
        where = f"`{self.source}` ({self.origin})"
        if self.stage is not None:
            name = self.stage.get("name")
            where += f", Stage {self.stage.get('stage')}" + (f" ({name})" if name else "")
        if self.untrained:
            where += (
                ". **This model is untrained** (random or freshly upcycled routers): its routing and its text show"
                " what the machinery does, not what training teaches. Run `make reproduce`, or set `MODEL_ID` to"
                " a trained model."
            )
        return "Model: " + where


def choose_prompt_format(choice: ModelChoice, processor) -> tuple[str, str]:
    """`(format, why)`: how the Space turns a person's prompt into the model's text. `chat` (the processor's chat
    template, `<s>[INST] ... [/INST]`) for an instruction-tuned model, `raw` (the text as it is) otherwise.

    In order: `$PROMPT_FORMAT`; a local stage directory's completion marker (Stage 3 -> chat, other stages -> raw);
    the processor's saved `prompt_format` (what a Hub copy carries); `raw`. `chat` needs a chat template: without
    one the Space falls back to `raw` and says so.
    """
    requested = os.environ.get(PROMPT_FORMAT_ENV, "").strip().lower()
    if requested:
        if requested not in PROMPT_FORMATS:
            raise ValueError(f"{PROMPT_FORMAT_ENV}={requested!r}: choose one of {', '.join(PROMPT_FORMATS)}")
        fmt, why = requested, f"${PROMPT_FORMAT_ENV}"
    elif choice.stage is not None:
        stage = str(choice.stage.get("stage"))
        fmt, why = ("chat" if stage in INSTRUCTION_STAGES else "raw"), f"Stage {stage}'s training format"
    elif getattr(processor, "prompt_format", None) in PROMPT_FORMATS:
        fmt, why = processor.prompt_format, "the processor's prompt_format"
    else:
        fmt, why = "raw", "no stage marker or prompt_format: the caption format"
    if fmt == "chat" and getattr(processor, "chat_template", None) is None:
        return "raw", "the processor has no chat template"
    return fmt, why


class PickleRefused(ValueError):
    """A model directory holds pickled files and the person did not allow them; the message says what to do."""


def allow_pickle_from_env() -> bool:
    """Whether `$ALLOW_PICKLE_WEIGHTS` allows pickled weights: 1/true/yes allow, unset/0/false/no do not."""
    value = os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"{ALLOW_PICKLE_ENV}={value!r}: set it to 1 to allow pickled weights, or leave it unset")


def pickle_files(directory: Path) -> list[str]:
    """The pickled files in `directory` that loading could open: its top level, which is what `from_pretrained`
    reads, less `UNREAD_PICKLES`."""
    return sorted(
        path.name
        for path in Path(directory).iterdir()
        if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES and path.name not in UNREAD_PICKLES
    )


def refuse_pickles(choice: ModelChoice, allow_pickle: bool) -> None:
    """Raise `PickleRefused` when `choice` is a local directory holding pickled files and `allow_pickle` is False.
    (A Hub id cannot be listed offline; `use_safetensors=True` keeps its pickles unread.)"""
    directory = Path(choice.source).expanduser()
    if allow_pickle or not directory.is_dir():
        return
    found = pickle_files(directory)
    if found:
        raise PickleRefused(
            f"{directory} holds pickled files ({', '.join(found)}): loading pickle can run any code the file "
            "carries, so the Space loads safetensors weights only. Save the model with save_pretrained (it writes "
            f"model.safetensors) and remove them, or, if you trust this checkpoint, pass --allow-pickle or set "
            f"{ALLOW_PICKLE_ENV}=1."
        )


def read_marker(directory: Path) -> dict | None:
    path = directory / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def is_moe_directory(directory: Path) -> bool:
    """A finished MoeVlm stage directory with experts (the dense control and the pretraining output have none)."""
    config_path = directory / "config.json"
    if read_marker(directory) is None or not config_path.is_file():
        return False
    config = json.loads(config_path.read_text())
    return config.get("model_type") == "moe_vlm" and bool(config.get("moe_layers"))


def find_reproduced_model(root: Path | None = None) -> Path | None:
    """The most-trained finished MoE stage directory under `root` (default: `REPRODUCE_DIR`; Stage 3, else 2.5, 2,
    1, 0), or None."""
    root = REPRODUCE_DIR if root is None else root
    if not root.is_dir():
        return None
    found = [d for d in root.iterdir() if d.is_dir() and is_moe_directory(d)]

    def rank(directory: Path) -> tuple[int, float]:
        stage = str(read_marker(directory).get("stage"))
        order = STAGE_PREFERENCE.index(stage) if stage in STAGE_PREFERENCE else len(STAGE_PREFERENCE)
        return order, -(directory / MARKER).stat().st_mtime  # the newest among equals

    return min(found, key=rank, default=None)


def looks_like_path(source: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else (or an existing path) is meant as a local directory."""
    return (
        Path(source).exists() or source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
    )


def choose_local(source: str, origin: str) -> ModelChoice:
    directory = Path(source).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist (from {origin})")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json: not a saved model directory (from {origin})"
        )
    stage = read_marker(directory)
    untrained = stage is not None and str(stage.get("stage")) in UNTRAINED_STAGES
    return ModelChoice(str(directory), origin, stage, untrained)


def build_untrained_model() -> ModelChoice:
    """An untrained tiny model in a temporary directory (removed at exit). Needs the repository's
    `trainer` package: on a Hub Space, set `MODEL_ID` instead."""
    try:
        from trainer.upcycle import init_model  # the repository only; lazily: rarely needed
    except ImportError:
        raise FileNotFoundError(
            "no model to show: set the MODEL_ID environment variable (a Hub id such as USER/NAME, or a local "
            "model directory); outside the moe-vlm repository no model can be built on the spot"
        ) from None
    directory = Path(tempfile.mkdtemp(prefix="moe-vlm-space-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    init_model(directory, preset="tiny")
    return ModelChoice(
        str(directory),
        "built on the spot: no model found under runs/reproduce/",
        read_marker(directory),
        True,
    )


def model_from_card(card: Path | None = None) -> str | None:
    """The first `models:` entry of the Space card's front matter (default: `SPACE_CARD`), or None. The repository's
    own `space/README.md` names none; `moe-vlm publish --space USER/NAME --model USER/MODEL` stages it with one."""
    card = SPACE_CARD if card is None else card
    if not card.is_file():
        return None
    models = (metadata_load(card) or {}).get("models") or []
    models = [models] if isinstance(models, str) else models
    return models[0] if models and isinstance(models[0], str) and models[0].strip() else None


def choose_model(model_id_or_path: str | None = None) -> ModelChoice:
    """Resolve what to load (see the module docstring for the order)."""
    candidates = (
        (model_id_or_path, "--model"),
        (os.environ.get("MODEL_ID"), "MODEL_ID"),
        (model_from_card(), "the Space card's models:"),
    )
    for source, origin in candidates:
        if source:
            return (
                choose_local(source, origin)
                if looks_like_path(source)
                else ModelChoice(source, f"Hub, {origin}")
            )
    reproduced = find_reproduced_model()
    if reproduced is not None:
        return choose_local(str(reproduced), "the reproduction's latest stage")
    return build_untrained_model()


__all__ = [
    "ALLOW_PICKLE_ENV",
    "PICKLE_SUFFIXES",
    "ModelChoice",
    "PickleRefused",
    "allow_pickle_from_env",
    "choose_model",
    "choose_prompt_format",
    "find_reproduced_model",
    "model_from_card",
    "refuse_pickles",
]
