"""`moe-vlm publish`: stage the exact Hub repository of a finished stage directory in one folder, then (without
`--dry-run`) create the repository and upload the folder in one commit.

The staged folder is what a user downloads, nothing more: safetensors weights, `config.json` (with `auto_map`),
every remote-code file, the processor/tokenizer files, `generation_config.json`, `routing_stats.json` (training-time
routing of every stage behind the model), `analysis.json` / `captioning.json` and the figures when present, and the
model card as `README.md`. Training leftovers (checkpoints, the raw jsonl log, the marker, the recipe with its local
paths) stay behind.

The upload is one `HfApi.create_commit` of exactly the staged files, rather than `upload_folder`: with `hf_xet`
installed `upload_folder` streams large folders in several commits and skips the server-side card check, while
one commit is all-or-nothing, validates `README.md`'s metadata before any byte moves, and tells us exactly which
files a failure left uploaded-but-uncommitted. The token comes from `HF_TOKEN` or the stored login
(`huggingface_hub.get_token`); it is handed to `HfApi` and never printed or written.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from configuration.cli_inputs import check_out_dir
from configuration.contract import ANALYSIS_FILE, CAPTIONING_FILE, RECIPE_FILE
from configuration.contract import ROUTING_SUMMARY_FILE as ROUTING_STATS_FILE

from .card import build_card, datasets_from_recipes
from .stats import COMPLETION_MARKER, read_marker, routing_stats, stage_chain, write_routing_figures

# Top-level files of a `save_pretrained` model + processor directory that belong in the repository.
MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "*.py",  # the remote code save_pretrained copied (checked against auto_map below)
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
RESULT_FILES = (ANALYSIS_FILE, CAPTIONING_FILE)
FIGURES_DIR = "figures"
_RELATIVE_IMPORT = re.compile(
    r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE
)  # what transformers copies as remote code


@dataclass
class StagedRepo:
    """A folder holding exactly the files of the repository `repo_id` (paths relative, POSIX, sorted): a model repo,
    or a Space (`repo_type="space"`, created with `space_sdk`)."""

    folder: Path
    repo_id: str
    files: list[str] = field(default_factory=list)
    repo_type: str = "model"
    space_sdk: str | None = None

    @property
    def size(self) -> int:
        return sum((self.folder / name).stat().st_size for name in self.files)


class UploadError(RuntimeError):
    """The upload failed; the message says what reached the Hub and what did not, and where the folder is."""


# ----- checks ------------------------------------------------------------------------------------------------------
def check_repo_id(repo_id: str, flag: str = "--repo-id") -> str:
    """`USER/NAME`, valid on the Hub (the card's loading snippet needs the full id); `flag` names it in errors."""
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise ValueError(f"{flag} {repo_id!r} must be USER/NAME (or ORG/NAME)")
    validate_repo_id(repo_id)  # HFValidationError is a ValueError
    return repo_id


def _auto_map_modules(value) -> set[str]:
    """Module names referenced by any `auto_map` inside a config JSON ("modeling_x.Class" or "repo--modeling_x.C")."""
    modules: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "auto_map" and isinstance(item, dict):
                for ref in item.values():
                    for one in ref if isinstance(ref, (list, tuple)) else [ref]:
                        if isinstance(one, str):
                            modules.add(one.split("--")[-1].rsplit(".", 1)[0])
            else:
                modules |= _auto_map_modules(item)
    return modules


def remote_code_files(model_dir: Path) -> list[str]:
    """The `.py` files a `trust_remote_code` load of `model_dir` needs: every module named in an `auto_map` of its
    config/processor/tokenizer JSON files and, recursively, their `from .x import` siblings. FileNotFoundError
    naming the missing one."""
    modules: set[str] = set()
    for name in ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file():
            modules |= _auto_map_modules(json.loads(path.read_text()))
    needed, todo = set(), sorted(modules)
    while todo:
        module = todo.pop()
        if module in needed:
            continue
        path = model_dir / f"{module}.py"
        if not path.is_file():
            raise FileNotFoundError(
                f"{model_dir} lacks {path.name}, which its auto_map / remote code imports"
            )
        needed.add(module)
        todo += _RELATIVE_IMPORT.findall(path.read_text())
    return sorted(f"{m}.py" for m in needed)


def check_model_dir(model_dir: str | Path) -> tuple[dict, dict]:
    """(config, marker) of a finished stage directory a stranger can load; a clear error otherwise."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir} is not a directory")
    marker = read_marker(model_dir)  # refuses an unfinished stage
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a saved model")
    config = json.loads(config_path.read_text())
    auto_map = config.get("auto_map") or {}
    if "AutoModelForCausalLM" not in auto_map or "AutoConfig" not in auto_map:
        raise ValueError(
            f"{config_path} has no auto_map for AutoConfig and AutoModelForCausalLM: a user could not load it with "
            "trust_remote_code=True (save it with MoeVlmForCausalLM.save_pretrained)"
        )
    remote_code_files(model_dir)
    if not list(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    return config, marker


# ----- staging -----------------------------------------------------------------------------------------------------
def _model_files(model_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in model_dir.iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in MODEL_FILE_PATTERNS)
    )


def _place(source: Path, target: Path) -> None:
    """Hard-link weights (a 7B checkpoint need not be copied twice on one disk), copy everything else."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix == ".safetensors":
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copy2(source, target)


def default_analysis_dirs(model_dir: Path) -> list[Path]:
    """Where `moe-vlm reproduce` puts a stage's analysis: `<run>/analysis/<stage dir name>`, next to the stages."""
    candidate = model_dir.parent / "analysis" / model_dir.name
    return [candidate] if candidate.is_dir() else []


def find_results(model_dir: Path, analysis_dirs: list[Path]) -> tuple[dict[str, Path], list[Path]]:
    """({"analysis.json": path, "captioning.json": path} found, [figure PNGs]) in the model dir and the analysis
    dirs. The same file name in two places is ambiguous: ValueError naming both."""
    results: dict[str, Path] = {}
    figures: dict[str, Path] = {}
    for directory in [model_dir, *analysis_dirs]:
        if not directory.is_dir():
            raise FileNotFoundError(f"--analysis {directory} is not a directory")
        found = [directory / n for n in RESULT_FILES if (directory / n).is_file()]
        for path, bucket in [(p, results) for p in found] + [
            (p, figures) for p in sorted(directory.glob("*.png"))
        ]:
            if path.name in bucket and bucket[path.name].resolve() != path.resolve():
                raise ValueError(
                    f"two {path.name} files: {bucket[path.name]} and {path}; pass only one --analysis"
                )
            bucket[path.name] = path
    return results, list(figures.values())


def _read_recipes(directories: list[Path]) -> list[dict]:
    import yaml

    return [
        yaml.safe_load((d / RECIPE_FILE).read_text()) or {}
        for d in directories
        if (d / RECIPE_FILE).is_file()
    ]


def prepare_out(out: Path, source: Path, overwrite: bool, what: str = "the model directory") -> None:
    """Make `out` a new or empty folder apart from `source` (`what` names it in the error)."""
    out_r, source_r = out.resolve(), source.resolve()
    if out_r == source_r or source_r in out_r.parents or out_r in source_r.parents:
        raise ValueError(f"--out {out} overlaps {what} {source}: stage into a separate folder")
    check_out_dir(out)  # a file is refused even with --overwrite, which only promises to empty a folder
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out} exists and is not empty: choose a new folder or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def listed_files(folder: Path) -> list[str]:
    """Every file under `folder`, as repository paths (POSIX, sorted)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def stage_repo(
    model_dir: str | Path,
    out: str | Path,
    repo_id: str,
    *,
    analysis_dirs: list[str | Path] | None = None,
    base_model: list[str] | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    overwrite: bool = False,
) -> StagedRepo:
    """Write the repository `repo_id` of `model_dir` into `out` (which must be new or empty unless `overwrite`).

    `analysis_dirs`: where `moe-vlm analyze` / `evaluate` wrote analysis.json, captioning.json and figures (None:
    the model dir and the reproduce layout's `<run>/analysis/<name>`). `base_model` / `datasets`: Hub ids for the
    card's metadata (None: derived from the stage markers and recipes)."""
    check_repo_id(repo_id)
    model_dir, out = Path(model_dir), Path(out)
    config, _ = check_model_dir(model_dir)
    chain = stage_chain(model_dir)
    dirs = default_analysis_dirs(model_dir) if analysis_dirs is None else [Path(d) for d in analysis_dirs]
    results, figure_paths = find_results(model_dir, dirs)
    prepare_out(out, model_dir, overwrite)

    for path in _model_files(model_dir):
        _place(path, out / path.name)
    routing = routing_stats(model_dir)
    (out / ROUTING_STATS_FILE).write_text(json.dumps(routing, indent=1))
    loaded = {}
    for name, path in results.items():
        data = json.loads(path.read_text())
        if isinstance(data.get("model"), str):  # the analysing machine's path means nothing to a downloader
            data["model"] = repo_id
        (out / name).write_text(json.dumps(data, indent=1))
        loaded[name] = data
    for path in figure_paths:
        _place(path, out / FIGURES_DIR / path.name)
    routing_figures = write_routing_figures(routing, out / FIGURES_DIR)

    figures = [f"{FIGURES_DIR}/{n}" for n in routing_figures + sorted(p.name for p in figure_paths)]
    if datasets is None:
        datasets = datasets_from_recipes(_read_recipes([d for d, _ in chain]))
    card = build_card(
        repo_id,
        markers=[m for _, m in chain],
        config=config,
        routing=routing,
        analysis=loaded.get(ANALYSIS_FILE),
        captioning=loaded.get(CAPTIONING_FILE),
        figures=figures,
        files=[*listed_files(out), "README.md"],
        base_model=base_model,
        datasets=datasets,
        license=license,
    )
    card.save(out / "README.md")
    return StagedRepo(folder=out, repo_id=repo_id, files=listed_files(out))


# ----- upload ------------------------------------------------------------------------------------------------------
def require_token(token: str | None = None) -> str:
    """The token to upload with: `token`, else `HF_TOKEN`, else the stored `hf auth login`. Never printed."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    return token


def _first_line(error: BaseException) -> str:
    """The error's type and first line, plus what the Hub said when it said something (HfHubHTTPError)."""
    text = str(error).strip().splitlines()
    summary = f"{type(error).__name__}: {text[0] if text else ''}"
    server = getattr(error, "server_message", None)
    return f"{summary} ({server.strip()})" if server and server.strip() not in summary else summary


def _failure_report(staged: StagedRepo, operations: list, phase: str, error: BaseException) -> str:
    uploaded = [op.path_in_repo for op in operations if getattr(op, "_is_uploaded", False)]
    not_uploaded = [name for name in staged.files if name not in uploaded]
    lines = [
        f"upload to {staged.repo_id} failed while {phase}: {_first_line(error)}",
        "Committed: none (a commit is all-or-nothing; the repository's files are unchanged).",
        f"Uploaded to the Hub's storage but not committed ({len(uploaded)}): {', '.join(uploaded) or 'none'}.",
        f"Not uploaded ({len(not_uploaded)}): {', '.join(not_uploaded) or 'none'}.",
        f"The staged folder is intact: {staged.folder}. Fix the cause and run the command again (with --overwrite "
        "if you staged into --out); the Hub skips content it already has.",
    ]
    return "\n".join(lines)


def upload_staged(
    staged: StagedRepo, *, private: bool = False, token: str | None = None, commit_message: str | None = None
):
    """Create `staged.repo_id` (kept as it is when it exists; a Space with `staged.space_sdk`) and commit exactly
    `staged.files` in one commit. Returns the `CommitInfo`; raises UploadError saying what was and was not
    uploaded."""
    from huggingface_hub import CommitOperationAdd, HfApi

    on_disk = listed_files(staged.folder)
    if on_disk != staged.files:
        raise ValueError(f"{staged.folder} changed since it was staged; stage it again")
    api = HfApi(token=require_token(token))
    operations = [
        CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(staged.folder / n)) for n in staged.files
    ]
    space = {"space_sdk": staged.space_sdk} if staged.repo_type == "space" else {}
    default_message = (
        "Upload the moe-vlm Space with `moe-vlm publish --space`"
        if space
        else "Upload moe-vlm checkpoint with `moe-vlm publish`"
    )
    phase = "creating the repository"
    try:
        # private=None (not False) without --private: the account's or organisation's default visibility applies.
        api.create_repo(
            staged.repo_id,
            repo_type=staged.repo_type,
            private=True if private else None,
            exist_ok=True,
            **space,
        )
        phase = "uploading and committing the files"
        return api.create_commit(
            staged.repo_id,
            operations,
            repo_type=staged.repo_type,
            commit_message=commit_message or default_message,
        )
    except Exception as error:
        raise UploadError(_failure_report(staged, operations, phase, error)) from error


def publish(
    model_dir: str | Path,
    repo_id: str,
    *,
    out: str | Path | None = None,
    dry_run: bool = False,
    private: bool = False,
    overwrite: bool = False,
    commit_message: str | None = None,
    **stage_options,
):
    """Stage (into `out`, or a new temporary folder) and, unless `dry_run`, upload. Returns (StagedRepo, CommitInfo
    or None). A temporary folder is removed after a successful upload and kept after a failed one."""

    def stage(folder: Path) -> StagedRepo:
        return stage_repo(model_dir, folder, repo_id, overwrite=overwrite, **stage_options)

    return stage_and_upload(stage, out=out, dry_run=dry_run, private=private, commit_message=commit_message)


def stage_and_upload(
    stage, *, out: str | Path | None, dry_run: bool, private: bool, commit_message: str | None
) -> tuple[StagedRepo, object]:
    """`stage(folder) -> StagedRepo` into `out` (or a new temporary folder), then, unless `dry_run`, upload it in one
    commit: what `publish` and `publish_space` share. Returns (StagedRepo, CommitInfo or None)."""
    if not dry_run:
        require_token()  # fail before the (possibly long) staging
    temporary = out is None
    folder = Path(tempfile.mkdtemp(prefix="moe-vlm-publish-")) if temporary else Path(out)
    try:
        staged = stage(folder)
    except BaseException:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if dry_run:
        return staged, None
    info = upload_staged(staged, private=private, commit_message=commit_message)
    if temporary:
        shutil.rmtree(folder, ignore_errors=True)
    return staged, info


__all__ = [
    "COMPLETION_MARKER",
    "MODEL_FILE_PATTERNS",
    "StagedRepo",
    "UploadError",
    "check_model_dir",
    "check_repo_id",
    "find_results",
    "listed_files",
    "prepare_out",
    "publish",
    "remote_code_files",
    "require_token",
    "stage_and_upload",
    "stage_repo",
    "upload_staged",
]
