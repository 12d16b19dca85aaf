"""`moe-vlm train`: one stage of the protocol (pretraining, upcycling, Stages 1–3, the dense control).

    moe-vlm train --stage {pretrain,0,1,2,2.5,3,dense} --out DIR [--from DIR] [--recipe FILE|tiny|paper]
                  [--FIELD VALUE ...]

Any recipe field (StageArguments, PretrainArguments, TrainingArguments) can follow as `--field value`;
`--help-recipe` lists them. `accelerate launch -m trainer train ...` runs the same code on several processes.
"""

from __future__ import annotations

import argparse

# = recipes.STAGES, repeated so that `moe-vlm --help` does not import transformers.
STAGE_CHOICES = ("pretrain", "0", "1", "2", "2.5", "3", "dense")


class _PassThroughParser(argparse.ArgumentParser):
    """Keeps the arguments it does not know (`--learning_rate 1e-4`) in `overrides` for `HfArgumentParser`, which
    knows every recipe field, instead of rejecting them."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.overrides = extras
        return namespace, []


def _cmd_train(args) -> None:
    from .recipes import build_parser, parse_recipe
    from .run import run

    if args.help_recipe:
        build_parser().print_help()
        return
    if args.stage is None or args.out is None:
        raise ValueError("--stage and --out are required")
    recipe = parse_recipe(
        args.stage, args.out, from_dir=args.from_dir, recipe=args.recipe, overrides=args.overrides
    )
    out = run(recipe)
    if recipe.training.process_index == 0:
        print(f"stage {args.stage} -> {out}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="run one training stage (pretrain, 0 upcycle, 1 connector, 2 experts, 2.5 routers, 3 unified, dense)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Subparsers are built with the parent's parser class; this one must pass the recipe fields through.
    p.__class__ = _PassThroughParser
    p.add_argument("--stage", choices=STAGE_CHOICES, help="the stage to run")
    p.add_argument("--out", help="output directory of this stage")
    p.add_argument(
        "--from",
        dest="from_dir",
        default=None,
        help="the previous stage's output directory (Stage 0: the pretraining output)",
    )
    p.add_argument(
        "--recipe",
        default=None,
        help="recipe .yaml file, or `tiny` (default: configuration/recipes/<stage>.yaml) / `paper`",
    )
    p.add_argument(
        "--help-recipe", action="store_true", help="list every recipe field that can be overridden"
    )
    p.set_defaults(func=_cmd_train, overrides=[])
