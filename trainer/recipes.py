"""Stage recipes: YAML files of `StageArguments`, `PretrainArguments` and `TrainingArguments` fields, parsed with
`HfArgumentParser`; any field can be overridden on the command line (`--learning_rate 1e-4`).

`configuration/recipes/<stage>.yaml` holds the embedded default's (tiny preset, CPU) recipes,
`configuration/recipes/paper/<stage>.yaml` the paper-scale ones (`--recipe paper`); `--recipe FILE` reads any file,
including the `recipe.yaml` a finished stage wrote.

The recipe files are the one place a stage's settings live (what trains, how it routes, which split, the step
counts and learning rates): the dataclasses below declare the fields, their types and help, and defaults only
where a value means "not set" or "off". A field a stage chooses but a recipe leaves unset (`trainable`,
`router_mode`, `train_split`; every `PretrainArguments` field) takes the embedded recipe's value.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import yaml
from transformers import HfArgumentParser, TrainingArguments

from configuration.contract import RECIPE_FILE

from .safe_loading import ALLOW_PICKLE_HELP

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

STAGES = ("pretrain", "0", "1", "2", "2.5", "3", "dense")
RECIPE_DIR = files("configuration") / "recipes"  # package data, wherever the package is installed


def recipe_stem(stage: str) -> str:
    """File stem of a stage's recipe: `pretrain`, `stage0` … `stage2_5`, `stage3`, `dense`."""
    check_stage(stage)
    return stage if stage in ("pretrain", "dense") else "stage" + stage.replace(".", "_")


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    return stage


@dataclass
class StageArguments:
    """What a stage trains on and how it routes. `trainable`, `router_mode` and `train_split`, left unset, take the
    values of the stage's embedded recipe (`configuration/recipes/<stage>.yaml`: the paper's protocol)."""

    stage: str = field(default="1", metadata={"help": f"training stage, one of {', '.join(STAGES)}"})
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "previous stage's output directory (`--from`); Stage 0: the pretraining output (or none)"
        },
    )
    preset: str = field(
        default="tiny", metadata={"help": "model preset of Stage 0 and pretraining: tiny | paper"}
    )
    mistral: str | None = field(
        default=None, metadata={"help": "Stage 0: dense Mistral path or Hub id (default: from `--from`)"}
    )
    vision: str | None = field(
        default=None,
        metadata={"help": "Stage 0: open_clip NAME:TAG or CLIP checkpoint file (default: from `--from`)"},
    )
    allow_pickle: bool = field(
        default=False,
        metadata={"help": ALLOW_PICKLE_HELP},
    )
    dataset: str = field(
        default="shapes",
        metadata={
            "help": "shapes (generated, cached) | coco (Karpathy json + image_root) | llava (json + image_root) | "
            "a saved DatasetDict folder"
        },
    )
    train_split: str | None = field(
        default=None,
        metadata={
            "help": "split to train on (default: the stage's embedded recipe: `train` captions; Stage 3: `instruct` "
            "conversations)"
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N records"})
    max_length: int | None = field(default=None, metadata={"help": "truncate samples to this many tokens"})
    shapes_dir: str | None = field(
        default=None,
        metadata={"help": "where the Shapes world is generated/cached (default: the shared cache)"},
    )
    shapes_seed: int = field(default=0, metadata={"help": "seed of the generated Shapes world"})
    coco_json: str | None = field(
        default=None, metadata={"help": "COCO Karpathy split file (dataset_coco.json)"}
    )
    llava_json: str | None = field(default=None, metadata={"help": "llava_instruct_150k.json"})
    image_root: str | None = field(
        default=None, metadata={"help": "folder the COCO / LLaVA image paths start from"}
    )
    on_error: str = field(
        default="raise",
        metadata={
            "help": "a bad COCO / LLaVA record (missing, corrupt, empty, oversized image; empty caption; malformed "
            "conversation or field): raise (stop, naming the file and record) | skip (leave it out, count it in "
            "the log and the completion marker's `data` entry)"
        },
    )
    verify: str = field(
        default="open",
        metadata={
            "help": "how much of each COCO / LLaVA image is checked before training: none | exists | open (header "
            "and structure, cheap) | full (decode every pixel: also catches truncated JPEGs, so with on_error: skip no "
            "bad image can stop the run later)"
        },
    )
    trainable: list[str] | None = field(
        default=None,
        metadata={
            "help": "parameter groups to train: connector, experts, router, attention, mlp, norms, embeddings, "
            "lm_head, vision_tower (default: the stage's embedded recipe)"
        },
    )
    router_mode: str | None = field(
        default=None,
        metadata={"help": "hard | gumbel | softmax | modality_aware (default: the stage's embedded recipe)"},
    )
    keep_hard_routing: bool = field(
        default=False,
        metadata={
            "help": "Stage 3: keep Stage 2's hard routing, whatever router_mode says (the paper's future work 1)"
        },
    )
    gumbel_tau: float | None = field(
        default=None,
        metadata={"help": "Gumbel-softmax temperature (start of the schedule when gumbel_tau_end)"},
    )
    gumbel_tau_end: float | None = field(
        default=None, metadata={"help": "anneal the temperature linearly to this value over the run"}
    )
    router_aux_loss_coef: float = field(
        default=0.0, metadata={"help": "Switch load-balancing loss coefficient (0: none, as in the paper)"}
    )
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "router z-loss coefficient"})
    router_specialisation_loss_coef: float = field(
        default=0.0,
        metadata={
            "help": "penalise the router for leaving the Stage 2 expert roles (the paper's future work 2)"
        },
    )
    router_modality_aux_loss_coef: float = field(
        default=0.0,
        metadata={
            "help": "Switch load-balancing loss within each modality (image, text), averaged (0: none)"
        },
    )
    router_entropy_loss_coef: float = field(
        default=0.0,
        metadata={
            "help": "coefficient of a floor on each layer's routing entropy (never reads the modality; 0: none)"
        },
    )
    router_entropy_floor: float | None = field(
        default=None,
        metadata={"help": "that floor, a fraction of log(num_experts) (unset: the model's, 0.5 by default)"},
    )
    router_bias_update_rate: float = field(
        default=0.0,
        metadata={
            "help": "auxiliary-loss-free balancing (DeepSeek-V3): move a per-expert bias on the routing logits "
            "by this much after every optimizer step, against the observed load (0: no bias)"
        },
    )
    router_dropout: float | None = field(
        default=None,
        metadata={
            "help": "dropout probability in the routers during training, where the model config's "
            "router_dropout_on says (default `logits`, the authors' placement); unset: the model's value (0 unless "
            "its config says otherwise; the authors' Stage 3: 0.1)"
        },
    )
    router_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "learning rate of the router parameters, an optimizer param group of their own that follows "
            "the same schedule (unset: the stage's learning_rate)"
        },
    )
    routing_probe_split: str | None = field(
        default=None,
        metadata={
            "help": "split of the stage's dataset whose first routing_probe_samples records are routed in eval "
            "mode (no Gumbel noise, no dropout) at every logging step and logged beside the training-batch "
            "routing: whether decisions are the router's own. The train split itself: its last records are held "
            "out of training for it (so with `llava`, which has one split, always). Unset or `none`: no probe"
        },
    )
    routing_probe_samples: int = field(
        default=32, metadata={"help": "records in the routing probe (a few dozen: it runs at every log)"}
    )
    dense_expert: int = field(
        default=0, metadata={"help": "dense control: the expert whose weights become the MLP"}
    )
    experts_implementation: str | None = field(
        default=None,
        metadata={
            "help": "expert kernel: eager | grouped_mm | batched_mm | sorted_top1 | sorted_top1_cpp (ours: top-1, CPU; "
            "_cpp compiles on first use) "
            "(default: transformers')"
        },
    )
    router_implementation: str | None = field(
        default=None,
        metadata={
            "help": "router kernel: eager | fused_cpp (ours: the same router compiled, CPU, built on first use) "
            "(default: the model's, eager)"
        },
    )
    keep_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "keep the checkpoint-* folders once the stage has finished (they serve to resume it)"
        },
    )
    lora_r: int | None = field(
        default=None,
        metadata={
            "help": "train PEFT LoRA adapters of this rank instead of the full weights (unset: no LoRA); the "
            "stage directory then holds the adapter, `moe-vlm merge` folds it into a plain model"
        },
    )
    lora_alpha: float | None = field(
        default=None,
        metadata={"help": "LoRA scaling numerator (update = alpha / r * B A; unset: 2 * lora_r)"},
    )
    lora_targets: list[str] | None = field(
        default=None,
        metadata={
            "help": "groups of the stage's trainable set that get adapters: experts (target_parameters on the "
            "stacked gate_up_proj / down_proj), attention, connector (target_modules); the rest of the trainable "
            "set trains fully (default: experts and attention, where the stage trains them)"
        },
    )
    model_dtype: str = field(
        default="float32", metadata={"help": "dtype the model is loaded in (mixed precision: set bf16 too)"}
    )

    def __post_init__(self):
        from .data.errors import check_on_error
        from .data.images import check_verify
        from .lora import check_lora_fields

        check_stage(self.stage)
        check_on_error(self.on_error)
        check_verify(self.verify)
        if self.router_learning_rate is not None and self.router_learning_rate <= 0:
            raise ValueError(f"router_learning_rate must be > 0, got {self.router_learning_rate}")
        if self.router_dropout is not None and not 0 <= self.router_dropout < 1:
            raise ValueError(f"router_dropout must be in [0, 1), got {self.router_dropout}")
        # `--routing_probe_split none` on the command line: no probe.
        if str(self.routing_probe_split).lower() in ("", "none", "null"):
            self.routing_probe_split = None
        if self.routing_probe_samples < 1:
            raise ValueError(f"routing_probe_samples must be >= 1, got {self.routing_probe_samples}")
        if self.lora_targets:  # `--lora_targets experts,attention` or `experts attention`
            self.lora_targets = [t for item in self.lora_targets for t in str(item).split(",") if t]
        check_lora_fields(self.lora_r, self.lora_alpha, self.lora_targets)
        embedded = embedded_recipe(self.stage)
        for name in STAGE_CHOSEN_FIELDS:
            if not getattr(self, name) and name in embedded:  # unset (or empty, as `x or default` treated it)
                setattr(self, name, embedded[name])


# The StageArguments fields each stage's recipe chooses (a stage Trainer reads them; `None` means "the recipe's").
STAGE_CHOSEN_FIELDS = ("trainable", "router_mode", "train_split")


@dataclass
class PretrainArguments:
    """Pretraining of the embedded default's frozen parts: a tiny open_clip CLIP (contrastive, `ClipLoss`) and the
    tiny dense Mistral (causal LM), both on Shapes. Other TrainingArguments are shared by the two runs. Every field
    left unset takes the value of `configuration/recipes/pretrain.yaml`, where they all are."""

    # HfArgumentParser lists these fields under this heading in `--help-recipe`.
    _argument_group_name = (
        "pretraining (None: the value in configuration/recipes/pretrain.yaml; "
        "`--stage pretrain --help-recipe` shows them)"
    )

    clip_max_steps: int | None = field(default=None, metadata={"help": "CLIP optimiser steps"})
    clip_batch_size: int | None = field(
        default=None, metadata={"help": "CLIP image-caption pairs per step and process"}
    )
    clip_learning_rate: float | None = field(default=None, metadata={"help": "CLIP learning rate"})
    clip_text_width: int | None = field(default=None, metadata={"help": "width of CLIP's text tower"})
    clip_text_layers: int | None = field(default=None, metadata={"help": "blocks of CLIP's text tower"})
    clip_text_heads: int | None = field(
        default=None, metadata={"help": "attention heads of CLIP's text tower"}
    )
    clip_context_length: int | None = field(default=None, metadata={"help": "CLIP text tokens"})
    clip_fresh_images: bool | None = field(
        default=None,
        metadata={
            "help": "train CLIP on scenes rendered fresh for every pair (True) or on the Shapes train split (False)"
        },
    )
    clip_concept_grid: bool | None = field(
        default=None,
        metadata={
            "help": "with fresh images: every block of 64 pairs is the whole 8 colours x 8 shapes grid, captioned by "
            "colour and shape only, so no in-batch negative shares a caption and neither concept can be skipped"
        },
    )
    clip_two_object_share: float | None = field(
        default=None,
        metadata={"help": "with the concept grid: share of scenes with a second, random object (named too)"},
    )
    lm_max_steps: int | None = field(default=None, metadata={"help": "dense Mistral optimiser steps"})
    lm_batch_size: int | None = field(
        default=None, metadata={"help": "packed text blocks per step and process"}
    )
    lm_block_size: int | None = field(default=None, metadata={"help": "tokens per packed text block"})
    lm_learning_rate: float | None = field(default=None, metadata={"help": "dense Mistral learning rate"})
    eval_samples: int | None = field(
        default=None, metadata={"help": "held-out pairs / texts for retrieval accuracy and perplexity"}
    )
    evaluate: bool | None = field(
        default=None,
        metadata={
            "help": "measure retrieval, the vision probe and perplexity (False: train only, for timing and smoke "
            "runs; the marker then holds no measurements, and the report's vision-probe invariant fails saying so)"
        },
    )

    def __post_init__(self):
        embedded = embedded_recipe("pretrain")
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None:
                if f.name not in embedded:
                    raise ValueError(
                        f"the embedded pretraining recipe {recipe_path('pretrain')} must set {f.name}"
                    )
                setattr(self, f.name, embedded[f.name])
        for name in ("clip_max_steps", "clip_batch_size", "lm_max_steps", "lm_batch_size", "lm_block_size"):
            if getattr(self, name) < 1:  # each run's own budget: TrainingArguments' max_steps does not apply
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


ARGUMENT_CLASSES = (StageArguments, PretrainArguments, TrainingArguments)


class Recipe(NamedTuple):
    stage: StageArguments
    pretrain: PretrainArguments
    training: TrainingArguments
    # The TrainingArguments fields the recipe file or the command line set, as given (before TrainingArguments'
    # own post-processing): what `recipe.yaml` records besides the stage fields.
    given: dict | None = None


def recipe_path(stage: str, recipe: str | None = None) -> Path | Traversable:
    """`recipe` is a file, or a recipe set name: `tiny` (default: configuration/recipes/) or `paper` (a package
    resource: `importlib.resources`, so installed packages find it too)."""
    if recipe is not None and Path(recipe).suffix in (".yaml", ".yml"):
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        return path
    if recipe not in (None, "tiny", "paper"):
        raise ValueError(f"--recipe must be a .yaml file, `tiny` or `paper`, got {recipe!r}")
    folder = RECIPE_DIR / "paper" if recipe == "paper" else RECIPE_DIR
    path = folder / f"{recipe_stem(stage)}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"there is no {recipe or 'tiny'} recipe for stage {stage} ({path})")
    return path


def field_names(*classes: type) -> set[str]:
    """The fields a recipe may set: of `classes` (default: all of `ARGUMENT_CLASSES`)."""
    return {f.name for cls in classes or ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}


def load_recipe_file(path: Path | Traversable) -> dict:
    """A recipe file's fields, refused with the file named when it is not YAML, is empty (a recipe file replaces the
    embedded recipe whole, so an empty one would train on the dataclasses' defaults, not on any recipe), is not a
    mapping, or names a field no argument class has."""
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ValueError(
            f"recipe {path} is not valid YAML{at} ({getattr(error, 'problem', None) or error}): fix the file"
        ) from None
    if values is None:
        raise ValueError(
            f"recipe {path} is empty: a recipe file replaces the embedded recipe whole, so give its fields (copy "
            f"{RECIPE_DIR}/<stage>.yaml and edit it), or drop --recipe to train on the embedded one"
        )
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path} must be a mapping of field: value")
    unknown = sorted(set(values) - field_names())
    if unknown:
        raise ValueError(
            f"recipe {path}: unknown field(s) {unknown}; fields are StageArguments, PretrainArguments and "
            "TrainingArguments names (see `moe-vlm train --help-recipe`)"
        )
    return values


def check_known_overrides(unknown: list[str], parser: HfArgumentParser) -> None:
    """Refuse command-line words no recipe field takes, naming them (and the field meant, when one is close)."""
    if not unknown:
        return
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    named = []
    for word in unknown:
        close = difflib.get_close_matches(word, options, n=1) if word.startswith("--") else []
        named.append(f"{word} (did you mean {close[0]}?)" if close else word)
    raise ValueError(
        f"unknown recipe field(s) or stray value(s): {', '.join(named)}; `moe-vlm train --stage STAGE "
        "--help-recipe` lists the fields"
    )


@cache
def _embedded_recipe(stage: str) -> dict:
    return load_recipe_file(recipe_path(stage))


def embedded_recipe(stage: str) -> dict:
    """The embedded default's recipe of `stage` (`configuration/recipes/<stage>.yaml`), as a fresh dict."""
    return copy.deepcopy(_embedded_recipe(stage))


def build_parser(stage: str | None = None, recipe: str | None = None) -> HfArgumentParser:
    """The parser of every recipe field; with `stage`, its defaults are that stage's recipe (what `--help` shows)."""
    # No prefix matching: a misspelt or shortened field (`--learning_rat`) is an unknown field, not another one.
    parser = HfArgumentParser(ARGUMENT_CLASSES, allow_abbrev=False)
    if stage is not None:
        parser.set_defaults(**load_recipe_file(recipe_path(stage, recipe)))
    return parser


def parse_recipe(
    stage: str,
    out: str | Path,
    from_dir: str | Path | None = None,
    recipe: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Recipe:
    """Resolve a stage's arguments: the recipe file, then `--from`/`--out`, then the command-line overrides."""
    check_stage(stage)
    path = recipe_path(stage, recipe)
    values = load_recipe_file(path)
    if str(values.get("stage", stage)) != stage:
        raise ValueError(f"recipe {path} is for stage {values['stage']}, not stage {stage}")
    values.update(stage=stage, output_dir=str(out))
    if from_dir is not None:
        values["model_name_or_path"] = str(from_dir)
    parser = build_parser()
    # Each field's value when neither the recipe nor the command line gives it, as argparse returns it.
    declared = vars(parser.parse_known_args(args=[])[0])
    parser.set_defaults(**values)
    raw, unknown = parser.parse_known_args(args=list(overrides))
    check_known_overrides(unknown, parser)
    stage_args, pretrain_args, training_args = parser.parse_args_into_dataclasses(args=list(overrides))
    if stage_args.stage != stage:
        raise ValueError(f"--stage {stage} was given, but the overrides set stage {stage_args.stage}")
    check_step_budget(training_args)
    training_fields = field_names(TrainingArguments)
    given = {
        key: value
        for key, value in vars(raw).items()
        if key in training_fields and (key in values or value != declared.get(key))
    }
    return Recipe(stage_args, pretrain_args, training_args, given)


def check_step_budget(training: TrainingArguments) -> None:
    """Refuse a budget of no steps, or one transformers would read as another: it takes any `max_steps` <= 0 as
    "train `num_train_epochs` epochs" (so `--max_steps -5` would train the recipe's epochs), and with no epochs
    either it trains nothing yet the stage would be saved and marked finished."""
    if training.max_steps == 0 or training.max_steps < -1:
        raise ValueError(
            f"max_steps must be >= 1, or -1 to train num_train_epochs epochs; got {training.max_steps}"
        )
    if training.max_steps == -1 and not training.num_train_epochs > 0:
        raise ValueError(
            f"num_train_epochs must be > 0 when max_steps is -1 (no step budget); got {training.num_train_epochs}"
        )


def resolved_recipe(recipe: Recipe) -> dict:
    """The fields to rerun a stage (`--recipe <out>/recipe.yaml`): every stage field, the pretraining fields for
    pretraining, and the TrainingArguments the recipe and the command line set (the rest keep their defaults)."""
    values = dataclasses.asdict(recipe.stage)
    if recipe.stage.stage == "pretrain":
        values.update(dataclasses.asdict(recipe.pretrain))
    given = dict(recipe.given or {})
    given.pop("resume_from_checkpoint", None)  # how this run started, not part of the recipe
    return {**values, **given, "output_dir": recipe.training.output_dir}


def write_resolved_recipe(recipe: Recipe, out: Path) -> Path:
    path = Path(out) / RECIPE_FILE
    path.write_text(yaml.safe_dump(resolved_recipe(recipe), sort_keys=False))
    return path


__all__ = [
    "ARGUMENT_CLASSES",
    "RECIPE_DIR",
    "STAGE_CHOSEN_FIELDS",
    "STAGES",
    "PretrainArguments",
    "Recipe",
    "StageArguments",
    "build_parser",
    "embedded_recipe",
    "parse_recipe",
    "recipe_path",
    "recipe_stem",
    "resolved_recipe",
    "write_resolved_recipe",
]
