"""`moe-vlm reproduce`: the main job on the embedded default, for one seed or several."""

from __future__ import annotations

import argparse

from configuration.cli_inputs import at_least


def _cmd_reproduce(args) -> None:
    from .reproduce import reproduce, reproduce_seeds

    options = {"cache": not args.no_cache, "rebuild_pretraining": args.rebuild_pretraining}
    if args.seeds is not None:
        reproduce_seeds(args.out, args.seeds, n_samples=args.n_samples, n_eval=args.n_eval, **options)
    else:
        seed = 0 if args.seed is None else args.seed
        reproduce(args.out, seed=seed, n_samples=args.n_samples, n_eval=args.n_eval, **options)


def _cmd_ablate(args) -> None:
    from .ablate import ablate

    overrides = {}
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    ablate(
        args.out,
        args.variants,
        args.seeds,
        jobs=args.jobs,
        n_samples=args.n_samples,
        n_eval=args.n_eval,
        cache=not args.no_cache,
        overrides=overrides or None,
        transfer=dict(args.transfer),
        n_instruction=args.n_instruction,
    )


def _named_dir(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (e.g. coco=data/coco-karpathy), got {text!r}")
    return name, path


def _register_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate",
        help="Stage 3 under each routing variant (configuration/ablations/), over seeds, and one table",
        description="From the same Stage 2 checkpoint per seed (Stages 0-2 trained as `moe-vlm reproduce` trains "
        "them), train Stage 3 under each variant, analyse and evaluate it, and write ablation.md / ablation.json "
        "(mean and 95%% t interval over seeds, every seed's value) and one figure per metric. Complete cells "
        "(cell.json) are skipped, so an interrupted run resumes.",
    )
    p.add_argument("--out", default="runs/ablate", help="output directory")
    p.add_argument(
        "--variants", nargs="+", default=None, metavar="NAME", help="variants to run (default: every one)"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="N", help="seeds (default 0 1 2)"
    )
    p.add_argument(
        "--jobs",
        type=at_least(1),
        default=None,
        help="cells run at once, each in its own process (default: cores / 2)",
    )
    p.add_argument(
        "--n-samples", type=at_least(1), default=200, help="test captions for routing/crossover analyses"
    )
    p.add_argument("--n-eval", type=at_least(1), default=100, help="test images captioned for the metrics")
    p.add_argument(
        "--max-steps",
        type=at_least(1),
        default=None,
        help="Stage 3 steps for every variant (a smoke budget; default: each variant's own recipe)",
    )
    p.add_argument(
        "--transfer",
        type=_named_dir,
        nargs="+",
        default=[],
        metavar="NAME=DIR",
        help="more worlds to measure each variant's routing on (a saved DatasetDict with a test split, e.g. COCO); "
        "the seed's shifted Shapes world is always measured",
    )
    p.add_argument(
        "--n-instruction",
        type=at_least(0),
        default=8,
        help="held-out questions per kind asked in the shifted world",
    )
    p.add_argument("--no-cache", action="store_true", help="build the pretraining inside --out")
    p.set_defaults(func=_cmd_ablate)


def register(sub: argparse._SubParsersAction) -> None:
    _register_ablate(sub)
    p = sub.add_parser(
        "reproduce",
        help="run the protocol on the embedded default (tiny models, generated data)",
        description="Train every stage on the embedded default, analyse and evaluate, and write report.json/.html. "
        "Finished steps are skipped, so an interrupted run resumes. Seeds vary the Shapes world and Stages 1-3 "
        "(and the dense control); the pretrained backbone (tiny CLIP + Mistral, frozen like CLIP/Mistral at paper "
        "scale) has its seed fixed by its recipe and is built once per recipe in the cache ($MOE_VLM_CACHE/pretrain), "
        "shared by every seed and run.",
    )
    p.add_argument("--out", default="runs/reproduce", help="output directory")
    seeds = p.add_mutually_exclusive_group()
    # default None, not 0: argparse lets an option given at its default value pass a mutually exclusive group
    seeds.add_argument(
        "--seed", type=int, default=None, help="one seed (default 0): the run goes straight into --out"
    )
    seeds.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="several seeds: each into OUT/seed<N>/, then a report across them in OUT (mean, 95%% t interval and "
        "per-seed values of every headline number); one value is the same as --seed",
    )
    p.add_argument(
        "--n-samples", type=at_least(1), default=200, help="test captions for routing/crossover analyses"
    )
    p.add_argument("--n-eval", type=at_least(1), default=100, help="test images captioned for the metrics")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="build the pretraining inside --out (OUT/pretrain) instead of the shared cache",
    )
    p.add_argument(
        "--rebuild-pretraining",
        action="store_true",
        help="train the pretraining again even where a finished one exists (finished later steps are kept)",
    )
    p.set_defaults(func=_cmd_reproduce)
