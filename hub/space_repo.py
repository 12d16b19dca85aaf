"""`moe-vlm publish --space USER/NAME --model USER/MODEL`: stage the Hub Space of the Gradio app in one folder, then
(without `--dry-run`) create the Space and upload the folder in one commit, as `publish` does for the model.

The staged folder is `space/` as a Space runs it (`python app.py` in the folder, only `requirements.txt` installed):
the app and its modules, `requirements.txt`, the example images, and the card `README.md` whose front matter
carries the Space settings (`sdk: gradio`, `app_file`, ...) and, under `models:`, the published model the Space
shows. That one entry is how the app learns its model (`space/model_source.py` reads it; a `MODEL_ID` Space
variable, if someone sets one, takes precedence) and how the Hub links the model page to the Space. Files that
serve only the repository (the package marker, `moe-vlm demo`) stay behind.

This module reads `space/` as files: the Space and the Hub upload are sibling layers and never import each other.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

from .publish import StagedRepo, check_repo_id, listed_files, prepare_out, stage_and_upload

SPACE_DIR = Path(__file__).resolve().parent.parent / "space"
CARD = "README.md"
# What a Space does not run: the package marker and `moe-vlm demo` (a Space runs `python app.py` in the folder).
REPOSITORY_ONLY = ("__init__.py", "cli.py")
LEFT_BEHIND = ("__pycache__", "*.pyc", "*.pyi", ".*")  # caches, Gradio's generated stubs, hidden files


def space_source_files(space_dir: Path = SPACE_DIR) -> list[Path]:
    """The files of `space_dir` a Space needs, besides its card (which `stage_space` rewrites)."""

    def skipped(part: str) -> bool:
        return any(fnmatch.fnmatch(part, pattern) for pattern in LEFT_BEHIND)

    return sorted(
        path
        for path in space_dir.rglob("*")
        if path.is_file()
        and not any(skipped(part) for part in path.relative_to(space_dir).parts)
        and path.relative_to(space_dir).as_posix() not in (*REPOSITORY_ONLY, CARD)
    )


def check_model_id(model_id: str) -> str:
    """The Hub id of the published model the Space shows; a local directory is refused with what to run first."""
    if Path(model_id).expanduser().exists() or model_id.startswith((".", "/", "~")):
        raise ValueError(
            f"with --space, --model is the Hub id of a published model (USER/MODEL), not a local path ({model_id}): "
            "a Space cannot read this machine's files. Publish the directory first with `moe-vlm publish --model "
            f"{model_id} --repo-id USER/MODEL`, then pass --model USER/MODEL"
        )
    return check_repo_id(model_id, flag="--model")


def stage_space(
    space_id: str,
    model_id: str,
    out: str | Path,
    *,
    space_dir: str | Path = SPACE_DIR,
    license: str | None = None,
    overwrite: bool = False,
) -> StagedRepo:
    """Write the Space `space_id` showing the Hub model `model_id` into `out` (new or empty unless `overwrite`).
    `license`: the card's licence (None: the one `space/README.md` states)."""
    from huggingface_hub import SpaceCard

    check_repo_id(space_id, flag="--space")
    check_model_id(model_id)
    space_dir, out = Path(space_dir), Path(out)
    card_path = space_dir / CARD
    if not (space_dir / "app.py").is_file() or not card_path.is_file():
        raise FileNotFoundError(f"{space_dir} is not the Space folder: it has no app.py and {CARD}")
    card = SpaceCard.load(card_path)  # parsed before anything is written: a broken card fails here
    if not card.data.sdk:
        raise ValueError(
            f"{card_path} names no `sdk:` in its front matter; the Hub needs it to create the Space"
        )
    prepare_out(out, space_dir, overwrite, what="the Space folder")

    for path in space_source_files(space_dir):
        target = out / path.relative_to(space_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    card.data.models = [model_id]
    if license is not None:
        card.data.license = license
    card.save(out / CARD)
    return StagedRepo(
        folder=out, repo_id=space_id, files=listed_files(out), repo_type="space", space_sdk=card.data.sdk
    )


def publish_space(
    space_id: str,
    model_id: str,
    *,
    out: str | Path | None = None,
    dry_run: bool = False,
    private: bool = False,
    overwrite: bool = False,
    commit_message: str | None = None,
    **stage_options,
):
    """Stage the Space (into `out`, or a new temporary folder) and, unless `dry_run`, create it and upload it in one
    commit. Returns (StagedRepo, CommitInfo or None); a failed upload raises `UploadError` saying what reached the
    Hub and keeps the folder."""

    def stage(folder: Path) -> StagedRepo:
        return stage_space(space_id, model_id, folder, overwrite=overwrite, **stage_options)

    return stage_and_upload(stage, out=out, dry_run=dry_run, private=private, commit_message=commit_message)


__all__ = [
    "REPOSITORY_ONLY",
    "SPACE_DIR",
    "check_model_id",
    "publish_space",
    "space_source_files",
    "stage_space",
]
