"""The pretrained backbone of the embedded default, built once and cached, keyed by its recipe.

Pretraining (a tiny open_clip CLIP and a tiny dense Mistral, `trainer/pretrain.py`) plays the part CLIP ViT-L/14 and
Mistral-7B play at paper scale: the frozen backbone every later stage starts from. It does not depend on the
reproduction's seed (its own seed and its Shapes world are fixed by `configuration/recipes/pretrain.yaml`), so every
seed of `moe-vlm reproduce --seeds ...` and every later reproduction shares one copy:

    cache_root() / "pretrain" / <key>          (`$MOE_VLM_CACHE/pretrain/<key>`, default ~/.cache/moe_vlm/...)

`<key>` is a hash of everything that defines the pretraining: the pretraining recipe's text, the text of the preset
it names, and the source of the code that trains it, generates its data and probes it (`trainer/pretrain.py`,
`trainer/data/shapes.py`, `trainer/vision_probe.py`), plus any command-line overrides. Changing any of them gives a new key, hence a fresh
build; an unchanged recipe is never trained twice.

A build is atomic: it trains into the sibling `<key>.partial`, and only once the stage's completion marker exists
there is the folder renamed to `<key>`. A folder without the marker is never used; an interrupted build resumes from
the checkpoints left in `<key>.partial`. A lock file (`<key>.lock`) makes concurrent reproductions wait for one build
instead of training side by side. The `recipe.yaml` inside records the build folder as its `output_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from configuration.contract import COMPLETION_MARKER, cache_root

CACHE_SUBDIR = "pretrain"
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
# Written into a finished build: the key and a digest of each input it was computed from (what a cache folder holds).
INPUTS_FILE = "cache_inputs.json"
# The project modules whose source defines the pretraining: the trainer, the Shapes world it trains on, and the
# vision probe whose numbers its marker records. (Not `trainer/recipes.py`: every pretraining value comes from the
# recipe file, and hashing the module every stage's fields live in would rebuild on unrelated changes.)
SOURCE_MODULES = ("trainer/pretrain.py", "trainer/data/shapes.py", "trainer/vision_probe.py")
KEY_LENGTH = 16  # hex digits of the sha256: 64 bits, ample for the few recipes one machine builds

# `train(build_dir, resume)`: run `moe-vlm train --stage pretrain --out build_dir` (resuming from its checkpoints).
TrainFn = Callable[[Path, bool], None]


def _repo_file(relative: str) -> Path:
    """A project source file, found from the installed `configuration` package (the project's packages are siblings;
    `importlib` would import `trainer` and, through it, transformers, just to hash its sources)."""
    import configuration

    return Path(configuration.__file__).resolve().parent.parent / relative


def recipe_inputs(
    recipe_file: str | Path | None = None,
    source_files: Sequence[str | Path] | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, str]:
    """The texts the cache key is computed from, by name: the pretraining recipe (default: the embedded
    `configuration/recipes/pretrain.yaml`), the preset YAML it names, the source files (default: `SOURCE_MODULES`)
    and the command-line overrides. A preset given as an override (`--preset X`) is the one hashed."""
    import yaml

    from configuration.presets import PRESET_DIR

    recipe_path = (
        Path(recipe_file) if recipe_file is not None else _repo_file("configuration/recipes/pretrain.yaml")
    )
    recipe_text = recipe_path.read_text()
    preset = (yaml.safe_load(recipe_text) or {}).get("preset", "tiny")
    overrides = list(overrides)
    if "--preset" in overrides[:-1]:
        preset = overrides[overrides.index("--preset") + 1]
    inputs = {
        f"recipe:{recipe_path.name}": recipe_text,
        f"preset:{preset}": (PRESET_DIR / f"{preset}.yaml").read_text(),
    }
    files = (
        [Path(f) for f in source_files]
        if source_files is not None
        else [_repo_file(m) for m in SOURCE_MODULES]
    )
    for path in files:
        inputs[f"source:{path.parent.name}/{path.name}"] = path.read_text()
    inputs["overrides"] = " ".join(overrides)
    return inputs


def cache_key(inputs: Mapping[str, str]) -> str:
    """sha256 over the inputs (names and texts, in name order), shortened to `KEY_LENGTH` hex digits."""
    digest = hashlib.sha256()
    for name in sorted(inputs):
        # length-prefixed, so that moving text from one input to the next cannot give the same stream
        for part in (name, inputs[name]):
            data = part.encode()
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:KEY_LENGTH]


def cached_dir(key: str) -> Path:
    """Where the pretraining with this key lives: `cache_root() / "pretrain" / key`."""
    return cache_root() / CACHE_SUBDIR / key


def is_complete(directory: str | Path) -> bool:
    """A finished pretraining folder: its completion marker exists (the trainer writes it last)."""
    return (Path(directory) / COMPLETION_MARKER).is_file()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (`fcntl.flock`) held for the block; where fcntl is missing (Windows), no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - POSIX only
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"[pretraining] waiting for another process building {path.with_suffix('')} ...", flush=True
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def build(
    final: str | Path, train: TrainFn, *, rebuild: bool = False, inputs: Mapping[str, str] | None = None
) -> bool:
    """Make `final` a finished pretraining folder; returns whether it was (re)built now (False: it already was).

    Trains into `final.partial` (resuming from its checkpoints when the folder is left from an interrupted build),
    checks the completion marker, writes `INPUTS_FILE` (when `inputs` are given), then renames it to `final`. With
    `rebuild`, a finished `final` and any partial build are discarded first.
    """
    final = Path(final)
    if is_complete(final) and not rebuild:
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    with _locked(final.with_name(final.name + LOCK_SUFFIX)):
        if is_complete(final) and not rebuild:
            return False  # another process finished it while this one waited
        if rebuild:
            _remove(partial)
        if not is_complete(partial):  # (complete: trained, but the rename was interrupted)
            resume = partial.is_dir()
            if resume:
                print(f"[pretraining] resuming the interrupted build in {partial}", flush=True)
            train(partial, resume)
            if not is_complete(partial):
                raise RuntimeError(f"pretraining into {partial} finished without its {COMPLETION_MARKER}")
        if inputs is not None:
            record = {"key": cache_key(inputs)}
            record["inputs_sha256"] = {
                k: hashlib.sha256(v.encode()).hexdigest() for k, v in sorted(inputs.items())
            }
            (partial / INPUTS_FILE).write_text(json.dumps(record, indent=1))
        # `final` may exist unfinished, or finished under --rebuild: move it aside, then swap the new build in.
        stale = final.with_name(f"{final.name}.old-{os.getpid()}")
        if final.exists() or final.is_symlink():
            final.rename(stale)
        partial.rename(final)
        _remove(stale)
    return True


def ensure_cached(
    train: TrainFn, *, rebuild: bool = False, overrides: Sequence[str] = ()
) -> tuple[Path, str, bool]:
    """The cached pretraining for the current recipe and code: `(folder, key, built_now)`, building it if needed."""
    inputs = recipe_inputs(overrides=overrides)
    key = cache_key(inputs)
    final = cached_dir(key)
    built = build(final, train, rebuild=rebuild, inputs=inputs)
    return final, key, built


def current_key(overrides: Sequence[str] = ()) -> str:
    """The key of the pretraining the current recipe and code define (hashing only: nothing is built)."""
    return cache_key(recipe_inputs(overrides=overrides))


def link(run_pretrain: str | Path, target: str | Path, *, relative: bool = False) -> Path:
    """Make `run_pretrain` (a run's `pretrain` entry) a symlink to `target`, relative (a shared folder inside the same
    output folder, which then stays movable) or absolute (the cache). Replaces a stale link or an unfinished folder;
    a finished folder of its own is left alone (returned as it is)."""
    run_pretrain, target = Path(run_pretrain), Path(target)
    if run_pretrain.resolve() == target.resolve():
        return run_pretrain
    if run_pretrain.is_symlink() or not run_pretrain.exists():
        run_pretrain.unlink(missing_ok=True)
    elif is_complete(run_pretrain):
        return run_pretrain
    else:
        shutil.rmtree(run_pretrain)  # an unfinished in-place build of an older layout: the cache replaces it
    run_pretrain.parent.mkdir(parents=True, exist_ok=True)
    destination = target.resolve()
    if relative:
        destination = Path(os.path.relpath(destination, run_pretrain.parent.resolve()))
    run_pretrain.symlink_to(destination, target_is_directory=True)
    return run_pretrain


__all__ = [
    "CACHE_SUBDIR",
    "INPUTS_FILE",
    "PARTIAL_SUFFIX",
    "SOURCE_MODULES",
    "build",
    "cache_key",
    "cached_dir",
    "current_key",
    "ensure_cached",
    "is_complete",
    "link",
    "recipe_inputs",
]
