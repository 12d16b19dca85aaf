"""`moe-vlm publish`: stage a finished stage directory as a Hub repository and (without `--dry-run`) upload it."""

from __future__ import annotations

import argparse


def _cmd_publish(args) -> None:
    from moe_vlm_cli import UserError

    from .publish import UploadError, publish

    try:
        staged, info = publish(
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
            license=args.license,
        )
    except UploadError as error:
        raise UserError(str(error)) from None
    size_mb = staged.size / 2**20
    if info is None:
        print(f"staged {len(staged.files)} files ({size_mb:.1f} MiB) of {staged.repo_id} in {staged.folder}:")
        for name in staged.files:
            print(f"  {name}")
        print(
            "dry run: nothing was uploaded; run the same command without --dry-run to create and upload the repo"
        )
    else:
        print(
            f"uploaded {len(staged.files)} files ({size_mb:.1f} MiB) to {staged.repo_id} in one commit: {info.commit_url}"
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "publish",
        help="stage a finished stage directory as a Hub repo (weights, remote code, processor, routing stats, "
        "analysis, figures, model card) and upload it in one commit",
    )
    p.add_argument("--model", required=True, help="finished stage directory (has moe_vlm_stage.json)")
    p.add_argument("--repo-id", required=True, help="USER/NAME of the Hub repository")
    p.add_argument("--private", action="store_true", help="create the repository private")
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
    p.add_argument("--license", default="apache-2.0")
    p.add_argument("--commit-message", default=None)
    p.set_defaults(func=_cmd_publish)
