"""Where and how the Space serves: the address, the upload limit, and the options both launch paths take
(`python app.py`, as a Hub Space runs it, and `moe-vlm demo`).

127.0.0.1 (this machine only) unless told otherwise: `--host`, else `$GRADIO_SERVER_NAME` (Gradio's own variable;
a Hub Space sets it to 0.0.0.0, which it must: the Hub's proxy reaches the app over the network). No Gradio import,
so `moe-vlm` builds its parser without loading Gradio or torch.
"""

from __future__ import annotations

import argparse
import ipaddress
import os

if __package__:  # imported as `space.serving`
    from .input_checks import MAX_UPLOAD_BYTES
    from .model_source import ALLOW_PICKLE_ENV
else:  # a Hub Space runs `python app.py` inside this folder
    from input_checks import MAX_UPLOAD_BYTES
    from model_source import ALLOW_PICKLE_ENV

DEFAULT_HOST = "127.0.0.1"  # loopback: reachable from this machine only
HOST_ENV = "GRADIO_SERVER_NAME"


def server_host(host: str | None = None) -> str:
    """The address to serve on: `host`, else `$GRADIO_SERVER_NAME`, else 127.0.0.1."""
    return host or os.environ.get(HOST_ENV) or DEFAULT_HOST


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); False for any other address or host name."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def launch_options(host: str | None = None, port: int | None = None) -> dict:
    """`demo.launch` keywords for every launch path: the address (`server_host`), the port (None: Gradio's
    `$GRADIO_SERVER_PORT`, else 7860) and the upload limit (`input_checks.MAX_UPLOAD_BYTES`)."""
    return {"server_name": server_host(host), "server_port": port, "max_file_size": MAX_UPLOAD_BYTES}


def exposure_warning(host: str) -> str | None:
    """What to tell the person when `host` is not loopback (None when it is)."""
    if is_loopback(host):
        return None
    return (
        f"serving on {host}: the app is reachable from other machines on every network this one is on "
        "(0.0.0.0 means all of them); use --host 127.0.0.1 to keep it on this machine"
    )


def add_launch_arguments(parser: argparse.ArgumentParser, port_default: int | None) -> None:
    """The options both launch paths take: --model, --host, --port, --allow-pickle."""
    parser.add_argument(
        "--model",
        default=None,
        help="model directory or Hub id (default: $MODEL_ID, the Space card's models:, else the latest stage under "
        "runs/reproduce/, else an untrained tiny model built on the spot)",
    )
    parser.add_argument(
        "--host",
        default=None,
        help=f"address to serve on (default: ${HOST_ENV}, else {DEFAULT_HOST}: this machine only); 0.0.0.0 "
        "exposes the app to every network this machine is on",
    )
    parser.add_argument(
        "--port", type=int, default=port_default, help="TCP port (default: $GRADIO_SERVER_PORT, else 7860)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        default=None,
        help="load a checkpoint holding pickled files (.bin, .pt, .pth, .ckpt): only one you trust, unpickling "
        f"can run code (default: ${ALLOW_PICKLE_ENV}=1 allows it, else such a checkpoint is refused)",
    )


__all__ = ["DEFAULT_HOST", "add_launch_arguments", "exposure_warning", "launch_options", "server_host"]
