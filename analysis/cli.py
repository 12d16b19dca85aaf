"""`moe-vlm analyze` and `moe-vlm evaluate` on one stage directory, and `moe-vlm route` on one image + caption."""

from __future__ import annotations

import argparse

from configuration.cli_inputs import at_least
from trainer.safe_loading import ALLOW_PICKLE_HELP


def _cmd_analyze(args) -> None:
    from .run import analyze

    result = analyze(
        args.model,
        args.out,
        data_dir=args.data,
        init_dir=args.init,
        seed=args.seed,
        n_probe=args.n_probe,
        n_samples=args.n_samples,
        n_permutations=args.n_permutations,
        allow_pickle=args.allow_pickle,
    )
    last = max(result["binomial"], key=int)
    b = result["binomial"][last]
    print(f"analysis.json and {len(result['figures'])} figures -> {args.out}")
    print(f"layer {last}: binomial k={b['k']}/{b['n']} (null p={b['null_p']:.3f}) p={b['p_value']:.3g}")
    if "crossover" in result:
        print(f"crossover: +{result['crossover']['increase_pct']:.1f}% loss with routing inverted")
        print(f"collapsed layers: {result['load']['n_collapsed']}/{result['load']['n_layers']}")


def _cmd_evaluate(args) -> None:
    from .run import evaluate

    result = evaluate(
        args.model,
        args.out,
        data_dir=args.data,
        seed=args.seed,
        n_samples=args.n_samples,
        prompt_formats=args.prompt_format,
        allow_pickle=args.allow_pickle,
    )
    keys = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
    print(f"captioning.json -> {args.out} (trained on the {result['training_prompt_format']} prompt format)")
    for fmt, entry in result["by_prompt_format"].items():
        metrics = entry["metrics"]
        shown = ", ".join(f"{k}={metrics[k]:.3f}" for k in keys if metrics.get(k) is not None)
        print(f"  {fmt}: {shown}")


def _cmd_route(args) -> None:
    from .captioning import training_prompt_format
    from .routing import format_routing, route_sample
    from .run import load_checkpoint

    image = open_image(args.image) if args.image else None  # before the model loads: a bad file costs nothing
    model, processor = load_checkpoint(args.model, args.allow_pickle)
    if args.router_mode:
        model.set_router_mode(args.router_mode)
    if image is None:
        image = example_image(model.config.vision_config.image_size)
    text = args.text if "<image>" in args.text else "<image>\n" + args.text
    # auto: the model's own training format (a stage directory's recipe, else the processor's prompt_format)
    prompt_format = (
        training_prompt_format(args.model, processor) if args.prompt_format == "auto" else args.prompt_format
    )
    routing = route_sample(model, processor, image, text, prompt_format=prompt_format)
    n_image = sum(routing["is_image"])
    print(
        f"router_mode={model.config.router_mode}  prompt_format={prompt_format}  ({n_image} image tokens, "
        f"{len(routing['is_image']) - n_image} text tokens)"
    )
    print(format_routing(routing))


def open_image(path: str):
    """`--image` as an RGB image, or an error naming the flag: no such file, a folder, or not an image PIL reads."""
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"--image {path}: {'a folder' if Path(path).is_dir() else 'no such file'}")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"--image {path}: not an image PIL can read ({error})") from None


def example_image(size: int):
    """A red circle on white, so `moe-vlm route` works without an image file."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(220, 30, 30))
    return image


def register(sub: argparse._SubParsersAction) -> None:
    for name, func, helptext in (
        (
            "analyze",
            _cmd_analyze,
            "concept matrices, binomial/permutation/bootstrap, crossover, load, t-SNE, CKA",
        ),
        ("evaluate", _cmd_evaluate, "greedy captions on the test split + BLEU-4/METEOR/ROUGE-L/CIDEr"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="stage directory or Hub id")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--data", default=None, help="a saved DatasetDict (default: the Shapes world)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--n-samples", type=at_least(1), default=200 if name == "analyze" else 100)
        p.add_argument("--allow-pickle", "--allow_pickle", action="store_true", help=ALLOW_PICKLE_HELP)
        if name == "evaluate":
            p.add_argument(
                "--prompt-format",
                nargs="+",
                choices=["raw", "chat"],
                default=None,
                help="caption prompt format(s): raw (<image>\\n) and/or chat (the [INST] template); default: the "
                "stage's own training format from its recipe, plus raw always",
            )
        if name == "analyze":
            p.add_argument("--init", default=None, help="Stage-0 dir: measure expert weight distance from it")
            p.add_argument(
                "--n-probe", type=at_least(1), default=None, help="images/captions per concept (default: all)"
            )
            p.add_argument("--n-permutations", type=int, default=1000)
        p.set_defaults(func=func)

    p = sub.add_parser("route", help="print per-layer expert routing of one image + caption")
    p.add_argument("--model", required=True, help="model directory or Hub id")
    p.add_argument("--image", default=None, help="image file (default: a generated red circle)")
    p.add_argument(
        "--text", default="<image>\nA red circle.", help="text; '<image>' marks where the image goes"
    )
    p.add_argument("--router-mode", default=None, choices=["hard", "gumbel", "softmax", "modality_aware"])
    p.add_argument("--allow-pickle", "--allow_pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    p.add_argument(
        "--prompt-format",
        default="auto",
        choices=["auto", "raw", "chat"],
        help="raw: the text as it is; chat: the text as the user's turn of the chat template (Stage 3's format); "
        "auto (default): the model's training format (its recipe.yaml, else the processor's prompt_format)",
    )
    p.set_defaults(func=_cmd_route)
