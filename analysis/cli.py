"""`moe-vlm reproduce`: the main job on the embedded default."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_reproduce(args) -> None:
    """For now: Stage 0 (upcycle the tiny model) and its routing of one image + caption; the training stages and
    analyses extend it as they land."""
    from configuration.cli import _cmd_route
    from configuration.init_model import init_model

    stage0 = init_model(Path(args.out) / "stage0", preset="tiny", seed=args.seed)
    print(f"Stage 0 (upcycled tiny model) -> {stage0}")
    _cmd_route(
        argparse.Namespace(model=str(stage0), image=None, text="<image>\nA red circle.", router_mode=None)
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="run the protocol on the embedded default (tiny models, generated data)"
    )
    p.add_argument("--out", default="runs/reproduce", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_reproduce)
