"""`moe-vlm reproduce`: the main job on the embedded default."""

from __future__ import annotations

import argparse


def _cmd_reproduce(args) -> None:
    from .reproduce import reproduce

    reproduce(args.out, seed=args.seed, n_samples=args.n_samples, n_eval=args.n_eval)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="run the protocol on the embedded default (tiny models, generated data)"
    )
    p.add_argument("--out", default="runs/reproduce", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-samples", type=int, default=200, help="test captions for routing/crossover analyses")
    p.add_argument("--n-eval", type=int, default=100, help="test images captioned for the metrics")
    p.set_defaults(func=_cmd_reproduce)
