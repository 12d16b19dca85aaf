"""`moe-vlm demo`: launch the Space's Gradio app on this machine (127.0.0.1 unless `--host` says otherwise)."""

from __future__ import annotations

import argparse

from .serving import add_launch_arguments, exposure_warning, launch_options


def _cmd_demo(args) -> None:
    from .app import build_demo

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port (1-65535)")
    options = launch_options(args.host, args.port)
    host = options["server_name"]
    demo = build_demo(args.model, args.allow_pickle)
    warning = exposure_warning(host)
    if warning:
        print(f"moe-vlm demo: {warning}")
    print(f"moe-vlm demo: http://{host}:{args.port} (Ctrl+C stops it)")
    try:
        demo.launch(**options)
    except OSError as error:  # the port is taken: Gradio says so in an OSError
        raise ValueError(f"cannot serve on {host}:{args.port} ({error}); pick another --port") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="launch the Gradio app that shows per-layer routing of an image + prompt")
    add_launch_arguments(p, port_default=7860)
    p.set_defaults(func=_cmd_demo)
