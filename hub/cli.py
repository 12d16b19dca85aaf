"""`moe-vlm publish`: stage a finished stage directory as a Hub repository, or (`--space`) the Gradio app as the Hub
Space of a published model, and (without `--dry-run`) upload it in one commit."""

from __future__ import annotations

import argparse

DEFAULT_LICENSE = "apache-2.0"
MODEL_ONLY = (("analysis", "--analysis"), ("base_model", "--base-model"), ("dataset", "--dataset"))


def _publish_model(args):
    from .publish import publish

    if not args.repo_id:
        raise ValueError(
            "--repo-id USER/NAME is required to publish a model (or pass --space USER/NAME to publish the Space)"
        )
    return publish(
        args.model,
        args.repo_id,
        out=args.out,
        dry_run=args.dry_run,
        private=args.private,
        overwrite=args.overwrite,
        commit_message=args.commit_message,
        analysis_dirs=args.analysis,
        base_model=args.base_model,
        datasets=args.dataset,
        license=args.license or DEFAULT_LICENSE,
    )


def _publish_space(args):
    from .space_repo import publish_space

    if args.repo_id:
        raise ValueError(
            "--repo-id names a model repository; with --space, --model is the published model's Hub id and "
            "--space the Space's (publish the model first, without --space)"
        )
    given = [flag for name, flag in MODEL_ONLY if getattr(args, name)]
    if given:
        raise ValueError(f"{', '.join(given)}: options of a model upload; the Space takes none")
    return publish_space(
        args.space,
        args.model,
        out=args.out,
        dry_run=args.dry_run,
        private=args.private,
        overwrite=args.overwrite,
        commit_message=args.commit_message,
        license=args.license,
    )


def _cmd_publish(args) -> None:
    from moe_vlm_cli import UserError

    from .publish import UploadError

    try:
        staged, info = _publish_space(args) if args.space else _publish_model(args)
    except UploadError as error:
        raise UserError(str(error)) from None
    size_mb = staged.size / 2**20
    what = f"the Space {staged.repo_id}" if staged.repo_type == "space" else staged.repo_id
    if info is None:
        print(f"staged {len(staged.files)} files ({size_mb:.1f} MiB) of {what} in {staged.folder}:")
        for name in staged.files:
            print(f"  {name}")
        print(
            "dry run: nothing was uploaded; run the same command without --dry-run to create and upload the repo"
        )
    else:
        print(
            f"uploaded {len(staged.files)} files ({size_mb:.1f} MiB) to {what} in one commit: {info.commit_url}"
        )
        if staged.repo_type == "space":
            print(f"the Space builds and starts at https://huggingface.co/spaces/{staged.repo_id}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "publish",
        help="stage a finished stage directory as a Hub repo (weights, remote code, processor, routing stats, "
        "analysis, figures, model card), or with --space the Gradio app as a Hub Space showing a published model, "
        "and upload it in one commit",
    )
    p.add_argument(
        "--model",
        required=True,
        help="finished stage directory (has moe_vlm_stage.json); with --space: the Hub id USER/MODEL of the "
        "published model the Space shows",
    )
    p.add_argument("--repo-id", default=None, help="USER/NAME of the model repository (not with --space)")
    p.add_argument(
        "--space",
        default=None,
        metavar="USER/NAME",
        help="publish the Space instead: the app, its requirements and examples, the card naming --model",
    )
    p.add_argument("--private", action="store_true", help="create the repository (or Space) private")
    p.add_argument("--dry-run", action="store_true", help="only stage the folder (no token, no network)")
    p.add_argument(
        "--out", default=None, help="folder to stage into (default: a new temporary folder, printed)"
    )
    p.add_argument("--overwrite", action="store_true", help="empty a non-empty --out first")
    p.add_argument(
        "--analysis",
        action="append",
        default=None,
        metavar="DIR",
        help="folder with analysis.json / captioning.json / *.png (repeatable; default: the model dir and "
        "<run>/analysis/<model dir name> when it exists)",
    )
    p.add_argument(
        "--base-model",
        action="append",
        default=None,
        metavar="HUB_ID",
        help="card metadata (default: from the stage markers)",
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        metavar="HUB_ID",
        help="card metadata (default: from the recipes)",
    )
    p.add_argument(
        "--license",
        default=None,
        help=f"card licence (default: {DEFAULT_LICENSE} for a model, the one space/README.md states for the Space)",
    )
    p.add_argument("--commit-message", default=None)
    p.set_defaults(func=_cmd_publish)
