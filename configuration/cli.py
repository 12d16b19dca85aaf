"""`moe-vlm init` (Stage 0: upcycle) and `moe-vlm route` (per-layer routing of one image + caption)."""

from __future__ import annotations

import argparse


def _cmd_init(args) -> None:
    from .init_model import init_model

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
    if args.image:
        with Image.open(args.image) as opened:
            image = opened.convert("RGB")
    else:
        image = example_image(model.config.vision_config.image_size)
    text = args.text if "<image>" in args.text else "<image>\n" + args.text
    routing = route_sample(model, processor, image, text)
    n_image = sum(routing["is_image"])
    print(
        f"router_mode={model.config.router_mode}  ({n_image} image tokens, "
        f"{len(routing['is_image']) - n_image} text tokens)"
    )
    print(format_routing(routing))


def example_image(size: int):
    """A red circle on white, so `moe-vlm route` works without an image file."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(220, 30, 30))
    return image


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
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("route", help="print per-layer expert routing of one image + caption")
    p.add_argument("--model", required=True, help="model directory or Hub id")
    p.add_argument("--image", default=None, help="image file (default: a generated red circle)")
    p.add_argument(
        "--text", default="<image>\nA red circle.", help="text; '<image>' marks where the image goes"
    )
    p.add_argument("--router-mode", default=None, choices=["hard", "gumbel", "softmax", "modality_aware"])
    p.set_defaults(func=_cmd_route)
