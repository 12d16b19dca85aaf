"""`moe-vlm`: one console script for the whole protocol. Each subcommand lives in its own package; this file only
parses arguments and dispatches, importing the heavy parts lazily so `--help` is instant."""

from __future__ import annotations

import argparse
import sys


def _cmd_init(args) -> None:
    from configuration.init_model import init_model

    out = init_model(args.out, preset=args.preset, mistral=args.mistral, vision=args.vision, seed=args.seed)
    print(f"wrote an upcycled {args.preset} model to {out}")


def _cmd_route(args) -> None:
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    from analysis.routing import format_routing, route_sample

    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    if args.router_mode:
        model.set_router_mode(args.router_mode)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    image = Image.open(args.image) if args.image else _example_image(model.config.vision_config.image_size)
    text = args.text if args.image or "<image>" in args.text else "<image>\n" + args.text
    routing = route_sample(model, processor, image, text)
    print(
        f"router_mode={model.config.router_mode}  ({sum(routing['is_image'])} image tokens, "
        f"{len(routing['is_image']) - sum(routing['is_image'])} text tokens)"
    )
    print(format_routing(routing))


def _cmd_reproduce(args) -> None:
    """The main job on the embedded default. For now: Stage 0 (upcycle the tiny model) and its routing of one
    image + caption; the training stages and analyses extend it as they land."""
    from pathlib import Path

    from configuration.init_model import init_model

    out = Path(args.out)
    stage0 = init_model(out / "stage0", preset="tiny", seed=args.seed)
    print(f"Stage 0 (upcycled tiny model) -> {stage0}")
    _cmd_route(
        argparse.Namespace(model=str(stage0), image=None, text="<image>\nA red circle.", router_mode=None)
    )


def _example_image(size: int):
    """A red circle on white, so `moe-vlm route` works without an image file."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(220, 30, 30))
    return image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-vlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("route", help="print per-layer expert routing of one image + caption")
    p.add_argument("--model", required=True, help="model directory or Hub id")
    p.add_argument("--image", default=None, help="image file (default: a generated red circle)")
    p.add_argument(
        "--text", default="<image>\nA red circle.", help="text; '<image>' marks where the image goes"
    )
    p.add_argument("--router-mode", default=None, choices=["hard", "gumbel", "softmax", "modality_aware"])
    p.set_defaults(func=_cmd_route)
    p = sub.add_parser(
        "reproduce", help="run the protocol on the embedded default (tiny models, generated data)"
    )
    p.add_argument("--out", default="runs/reproduce", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as error:  # bad input: one clear line, no traceback
        print(f"moe-vlm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
