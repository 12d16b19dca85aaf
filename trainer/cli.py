"""`moe-vlm train`: one stage of the protocol (pretraining, upcycling, Stages 1–3, the dense control), and
`moe-vlm merge`: a LoRA stage's adapter folded into a plain model, `moe-vlm plan`: parameters, memory per GPU and
step time of each stage from the meta-device model (`trainer.plan`), and
`moe-vlm init`: Stage 0 alone, an upcycled model from a dense Mistral (random tiny, a path or a Hub id).

    moe-vlm train --stage {pretrain,0,1,2,2.5,3,dense} --out DIR [--from DIR] [--recipe FILE|tiny|paper]
                  [--profile] [--FIELD VALUE ...]

Any recipe field (StageArguments, PretrainArguments, TrainingArguments) can follow as `--field value`;
`--help-recipe` lists them (with `--stage S [--recipe R]`: their values in that recipe as defaults).
`accelerate launch -m trainer train ...` runs the same code on several processes.
"""

from __future__ import annotations

import argparse

from .safe_loading import ALLOW_PICKLE_HELP

# = recipes.STAGES, repeated so that `moe-vlm --help` does not import transformers.
STAGE_CHOICES = ("pretrain", "0", "1", "2", "2.5", "3", "dense")


def _cmd_train(args) -> None:
    from .recipes import build_parser, parse_recipe
    from .run import run
    from .sharding import end_distributed

    if args.help_recipe:
        build_parser(args.stage, args.recipe).print_help()
        return
    if args.stage is None or args.out is None:
        raise ValueError("--stage and --out are required")
    # The recipe fields (`--learning_rate 1e-4`): the arguments this parser does not know, which `moe_vlm_cli.main`
    # passes on in `extra_args` (`parse_known_args`); `HfArgumentParser` parses them.
    recipe = parse_recipe(
        args.stage, args.out, from_dir=args.from_dir, recipe=args.recipe, overrides=args.extra_args
    )
    profiler = None
    if args.profile:
        from .profiling import PROFILE_FILE, StepProfiler

        profiler = StepProfiler()
    out = run(recipe, callbacks=[profiler] if profiler else [])
    end_distributed()
    if recipe.training.process_index == 0:
        print(f"stage {args.stage} -> {out}")
        if profiler is not None and profiler.runs:
            from .profiling import markdown_table

            print(markdown_table(profiler.runs))
            print(f"wrote {profiler.write(out / PROFILE_FILE)}")


def _cmd_init(args) -> None:
    from configuration.cli_inputs import check_out_dir

    check_out_dir(args.out, refuse_finished=True)  # before building a model: a bad --out costs nothing
    from .upcycle import init_model

    out = init_model(
        args.out,
        preset=args.preset,
        mistral=args.mistral,
        vision=args.vision,
        seed=args.seed,
        allow_pickle=args.allow_pickle,
    )
    print(f"wrote an upcycled {args.preset} model to {out}")


def _cmd_merge(args) -> None:
    from .lora import merge_adapter

    print(f"merged {args.adapter} -> {merge_adapter(args.adapter, args.out)}")


def _cmd_plan(args) -> None:
    from .plan import run_command

    run_command(args)


def register_plan(sub: argparse._SubParsersAction) -> None:
    """`moe-vlm plan`: its values are checked by `trainer.plan.run_command` (one line naming the flag, exit 2), not
    by argparse's `type=` / `choices=` (which print the usage too)."""
    p = sub.add_parser(
        "plan",
        help="parameters, memory per GPU (FSDP / ZeRO-3), FLOPs and step time of each stage: does it fit?",
        description="Build the preset on the meta device and plan every training stage: total and active "
        "parameters, trainable per stage, memory per GPU under FSDP full sharding and ZeRO-3 (with and without "
        "activation checkpointing), FLOPs per token, step time at an assumed MFU, and a fits / does-not-fit line "
        "per stage. The memory model: trainer/plan.py's docstring.",
        allow_abbrev=False,
    )
    p.add_argument("--preset", default="paper", help="model preset: paper | tiny (default paper)")
    p.add_argument(
        "--recipe", default=None, help="recipe set or .yaml file (default: the preset's, paper | tiny)"
    )
    p.add_argument(
        "--stage", action="append", help="a stage to plan (1, 2, 2.5, 3, dense; default all); repeatable"
    )
    p.add_argument("--gpus", default="8", help="GPUs, data parallel and sharded (default 8)")
    p.add_argument(
        "--gpu-memory", "--gpu_memory", default="80GB", help="memory per GPU: 80GB, 141GB, 24GiB (GB = GiB)"
    )
    p.add_argument(
        "--sharding",
        action="append",
        help="fsdp, zero3, none (one process / DDP, replicated); comma-separated or repeated (default fsdp,zero3)",
    )
    p.add_argument(
        "--activation-checkpointing",
        "--activation_checkpointing",
        default=None,
        help="on | off: the setting the fits verdict uses (default: the recipe's; the table shows both)",
    )
    p.add_argument("--mfu", default="0.4", help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument(
        "--peak-tflops",
        "--peak_tflops",
        default="989",
        help="peak TFLOP/s per GPU (default 989: H100 SXM, dense bf16)",
    )
    p.add_argument(
        "--text-tokens",
        "--text_tokens",
        default=None,
        help="text tokens per sample, padded (default: the recipe's max_length, else coco/shapes 64, llava 512)",
    )
    p.add_argument(
        "--labelled-tokens",
        "--labelled_tokens",
        default=None,
        help="labelled tokens per sample (default: all text)",
    )
    p.add_argument(
        "--lora_r", "--lora-r", default=None, help="LoRA rank: the stage trains adapters (PEFT's count)"
    )
    p.add_argument("--lora_alpha", "--lora-alpha", default=None, help="LoRA alpha (default 2 x r)")
    p.add_argument(
        "--lora_targets",
        "--lora-targets",
        action="append",
        help="experts, attention, connector (comma-separated)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="Stage 0: upcycle a dense Mistral into the 2-expert MoE VLM and save it")
    p.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument(
        "--mistral", default=None, help="dense Mistral path or Hub id (default: random tiny / the preset's)"
    )
    p.add_argument(
        "--vision", default=None, help="open_clip NAME:TAG or a CLIP checkpoint file (default: preset's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-pickle", "--allow_pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser(
        "merge", help="fold a LoRA stage's adapter (`train --lora_r`) into a plain model directory"
    )
    p.add_argument("--adapter", required=True, help="the LoRA stage's output directory")
    p.add_argument("--out", required=True, help="output model directory (a stage directory)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser(
        "train",
        help="run one training stage (pretrain, 0 upcycle, 1 connector, 2 experts, 2.5 routers, 3 unified, dense)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # No prefix matching: `--prof` or `--st` are not `--profile` / `--stage`; a recipe field given in part is
        # passed on whole, and refused by the recipe parser naming it.
        allow_abbrev=False,
    )
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
        "--help-recipe",
        action="store_true",
        help="list every recipe field that can be overridden (with --stage: the recipe's values as defaults)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="time every step (data, forward, backward, optimizer, bookkeeping) and its model FLOPs against this "
        "machine's measured matmul rate: a table, and profile.json in --out",
    )
    p.set_defaults(func=_cmd_train, extra_args=[])

    register_plan(sub)
