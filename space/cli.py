"""`moe-vlm demo`: launch the Space's Gradio app on this machine (127.0.0.1)."""

from __future__ import annotations

import argparse


def _cmd_demo(args) -> None:
    from .app import build_demo

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port (1-65535)")
    demo = build_demo(args.model)
    print(f"moe-vlm demo: http://127.0.0.1:{args.port} (Ctrl+C stops it)")
    try:
        demo.launch(server_name="127.0.0.1", server_port=args.port)
    except OSError as error:  # the port is taken: Gradio says so in an OSError
        raise ValueError(f"cannot serve on 127.0.0.1:{args.port} ({error}); pick another --port") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="launch the Gradio app that shows per-layer routing of an image + prompt")
    p.add_argument(
        "--model",
        default=None,
        help="model directory or Hub id (default: $MODEL_ID, else the latest stage under runs/reproduce/, "
        "else an untrained tiny model built on the spot)",
    )
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=_cmd_demo)
