"""The pretraining cache: a key that follows the recipe and the code, atomic builds that resume, run links.

No training: `build` takes the training function, here one that writes a fake pretraining folder (or fails midway).
Every test points `$MOE_VLM_CACHE` at a temp folder, so the user's real cache is never written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from configuration.contract import CACHE_ENV, COMPLETION_MARKER
from pipeline import pretrain_cache

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


class FakeTrain:
    """Records `(build_dir, resume)` calls; writes a checkpoint, then (unless `fail`) the weights and the marker."""

    def __init__(self, fail: bool = False, marker: bool = True):
        self.calls: list[tuple[Path, bool]] = []
        self.fail, self.marker = fail, marker

    def __call__(self, build_dir: Path, resume: bool) -> None:
        self.calls.append((build_dir, resume))
        (build_dir / "clip_run" / "checkpoint-100").mkdir(parents=True, exist_ok=True)
        if self.fail:
            raise KeyboardInterrupt("killed mid-build")
        (build_dir / "clip.safetensors").write_text(f"weights after {len(self.calls)} call(s)")
        if self.marker:
            (build_dir / COMPLETION_MARKER).write_text(json.dumps({"stage": "pretrain"}))


# ----- the key -------------------------------------------------------------------------------------------------------
def _recipe_copy(tmp_path: Path, text: str | None = None) -> Path:
    path = tmp_path / "pretrain.yaml"
    path.write_text(text if text is not None else (REPO / "configuration/recipes/pretrain.yaml").read_text())
    return path


def test_the_default_inputs_are_the_recipe_the_preset_and_the_pretraining_code():
    inputs = pretrain_cache.recipe_inputs()
    assert inputs["recipe:pretrain.yaml"] == (REPO / "configuration/recipes/pretrain.yaml").read_text()
    assert inputs["preset:tiny"] == (REPO / "configuration/presets/tiny.yaml").read_text()
    assert inputs["source:trainer/pretrain.py"] == (REPO / "trainer/pretrain.py").read_text()
    assert inputs["source:data/shapes.py"] == (REPO / "trainer/data/shapes.py").read_text()
    for module in pretrain_cache.SOURCE_MODULES:
        assert (REPO / module).read_text() in inputs.values()
    assert inputs["overrides"] == ""
    key = pretrain_cache.current_key()
    assert key == pretrain_cache.cache_key(inputs) and len(key) == pretrain_cache.KEY_LENGTH
    assert pretrain_cache.cached_dir(key) == Path(os.environ[CACHE_ENV]) / "pretrain" / key


def test_the_key_is_stable_and_changes_with_the_recipe_text(tmp_path):
    recipe = _recipe_copy(tmp_path)
    key = pretrain_cache.cache_key(pretrain_cache.recipe_inputs(recipe))
    assert pretrain_cache.cache_key(pretrain_cache.recipe_inputs(recipe)) == key
    assert key == pretrain_cache.current_key()  # the same text as the embedded recipe: the same key
    recipe.write_text(recipe.read_text().replace("clip_max_steps:", "clip_max_steps: 1 #", 1))
    assert "clip_max_steps: 1 #" in recipe.read_text()
    assert pretrain_cache.cache_key(pretrain_cache.recipe_inputs(recipe)) != key


def test_the_key_changes_with_the_source_code_and_the_overrides(tmp_path):
    recipe = _recipe_copy(tmp_path)
    source = tmp_path / "pretrain.py"
    source.write_text("STEPS = 1\n")
    base = pretrain_cache.cache_key(pretrain_cache.recipe_inputs(recipe, [source]))
    source.write_text("STEPS = 2\n")
    assert pretrain_cache.cache_key(pretrain_cache.recipe_inputs(recipe, [source])) != base
    source.write_text("STEPS = 1\n")
    assert pretrain_cache.cache_key(pretrain_cache.recipe_inputs(recipe, [source])) == base
    overridden = pretrain_cache.recipe_inputs(recipe, [source], overrides=["--clip_max_steps", "8"])
    assert pretrain_cache.cache_key(overridden) != base


def test_the_key_separates_names_from_texts():
    assert pretrain_cache.cache_key({"a": "bc"}) != pretrain_cache.cache_key({"ab": "c"})
    assert pretrain_cache.cache_key({"a": "x", "b": "y"}) == pretrain_cache.cache_key({"b": "y", "a": "x"})


# ----- atomic builds -------------------------------------------------------------------------------------------------
def test_a_build_trains_into_a_sibling_and_renames_it_when_the_marker_exists(cache):
    final = cache / "pretrain" / "k1"
    train = FakeTrain()
    assert pretrain_cache.build(final, train, inputs={"recipe:x": "y"}) is True
    assert train.calls == [(final.with_name("k1.partial"), False)]
    assert pretrain_cache.is_complete(final) and not final.with_name("k1.partial").exists()
    recorded = json.loads((final / pretrain_cache.INPUTS_FILE).read_text())
    assert recorded["key"] == pretrain_cache.cache_key({"recipe:x": "y"})
    # built: a second build does nothing
    assert pretrain_cache.build(final, train) is False
    assert len(train.calls) == 1


def test_an_interrupted_build_never_looks_complete_and_resumes(cache):
    final = cache / "pretrain" / "k2"
    with pytest.raises(KeyboardInterrupt):
        pretrain_cache.build(final, FakeTrain(fail=True))
    partial = final.with_name("k2.partial")
    assert not final.exists() and not pretrain_cache.is_complete(final)
    assert (partial / "clip_run" / "checkpoint-100").is_dir()
    train = FakeTrain()
    assert pretrain_cache.build(final, train) is True
    assert train.calls == [(partial, True)]  # resumed from the partial build's checkpoints
    assert pretrain_cache.is_complete(final) and (final / "clip_run" / "checkpoint-100").is_dir()


def test_a_folder_without_the_marker_is_not_used(cache):
    final = cache / "pretrain" / "k3"
    final.mkdir(parents=True)
    (final / "clip.safetensors").write_text("from an unknown half-finished copy")
    assert not pretrain_cache.is_complete(final)
    train = FakeTrain()
    assert pretrain_cache.build(final, train) is True
    assert len(train.calls) == 1
    assert (final / "clip.safetensors").read_text() == "weights after 1 call(s)"
    assert not list(final.parent.glob("k3.old-*"))


def test_a_training_that_ends_without_the_marker_fails_and_publishes_nothing(cache):
    final = cache / "pretrain" / "k4"
    with pytest.raises(RuntimeError, match=COMPLETION_MARKER):
        pretrain_cache.build(final, FakeTrain(marker=False))
    assert not final.exists()


def test_a_finished_build_whose_rename_was_interrupted_is_renamed_without_training(cache):
    final = cache / "pretrain" / "k5"
    partial = final.with_name("k5.partial")
    partial.mkdir(parents=True)
    FakeTrain()(partial, False)  # trained to the marker; the process died before the rename
    train = FakeTrain()
    assert pretrain_cache.build(final, train) is True
    assert train.calls == [] and pretrain_cache.is_complete(final)


def test_rebuild_trains_a_finished_copy_again_from_scratch(cache):
    final = cache / "pretrain" / "k6"
    pretrain_cache.build(final, FakeTrain())
    final.with_name("k6.partial").mkdir()  # debris of some other attempt: discarded, not resumed
    train = FakeTrain()
    assert pretrain_cache.build(final, train, rebuild=True) is True
    assert train.calls == [(final.with_name("k6.partial"), False)]
    assert pretrain_cache.is_complete(final)


def test_ensure_cached_builds_under_the_cache_root_once(cache):
    train = FakeTrain()
    folder, key, built = pretrain_cache.ensure_cached(train)
    assert built and folder == cache / "pretrain" / key and key == pretrain_cache.current_key()
    assert pretrain_cache.ensure_cached(train) == (folder, key, False)
    assert len(train.calls) == 1


# ----- a run's link ------------------------------------------------------------------------------------------------
def test_link_points_a_run_at_the_pretraining_and_replaces_stale_entries(tmp_path, cache):
    target = cache / "pretrain" / "k7"
    pretrain_cache.build(target, FakeTrain())
    entry = tmp_path / "run" / "pretrain"
    pretrain_cache.link(entry, target)
    assert (
        entry.is_symlink() and Path(os.readlink(entry)).is_absolute() and entry.resolve() == target.resolve()
    )
    assert pretrain_cache.is_complete(entry)

    other = cache / "pretrain" / "k8"
    pretrain_cache.build(other, FakeTrain())
    pretrain_cache.link(entry, other)  # a stale link is replaced
    assert entry.resolve() == other.resolve()

    shared = tmp_path / "multi" / "pretrain"
    pretrain_cache.build(shared, FakeTrain())
    seed_entry = tmp_path / "multi" / "seed0" / "pretrain"
    pretrain_cache.link(seed_entry, shared, relative=True)
    assert os.readlink(seed_entry) == os.path.join(os.pardir, "pretrain")
    assert pretrain_cache.is_complete(seed_entry)


def test_link_replaces_an_unfinished_folder_but_keeps_a_finished_one(tmp_path, cache):
    target = cache / "pretrain" / "k9"
    pretrain_cache.build(target, FakeTrain())
    unfinished = tmp_path / "a" / "pretrain"
    (unfinished / "clip_run").mkdir(parents=True)
    pretrain_cache.link(unfinished, target)
    assert unfinished.is_symlink()
    finished = tmp_path / "b" / "pretrain"
    pretrain_cache.build(finished, FakeTrain())
    pretrain_cache.link(finished, target)
    assert not finished.is_symlink() and pretrain_cache.is_complete(finished)
