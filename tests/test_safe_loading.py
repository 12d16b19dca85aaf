"""Weights load from safetensors only: a checkpoint folder holding pickled model weights is refused unless the user
passes `--allow_pickle`, and then only through `torch.load(weights_only=True)`, which refuses to unpickle anything
but tensors (a pickle that would run code when loaded does not run it). The Trainer's own resume files are not
model weights and pass."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import quick_args

from trainer.safe_loading import TRAINER_STATE_FILES, check_no_pickle, pickle_files


class WritesAMarker:
    """Unpickling this calls `Path.write_text`: a harmless stand-in for code a malicious pickle would run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "the pickle ran code")


def as_pickle(stage0: pathlib.Path, to: pathlib.Path, state: dict | None = None) -> pathlib.Path:
    """Stage 0 with its weights as `pytorch_model.bin` (the pre-safetensors format) instead of safetensors."""
    shutil.copytree(stage0, to)
    weights = load_file(str(to / "model.safetensors"))
    (to / "model.safetensors").unlink()
    torch.save(weights if state is None else state, to / "pytorch_model.bin")
    return to


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from moe_vlm_cli import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def test_pickled_weights_are_refused_by_train_and_analyze(workdir, stage0, shapes, capsys):
    folder = as_pickle(stage0, workdir / "pickled")
    out = workdir / "pickled_out"
    code, err = _cli(
        ["train", "--stage", "1", "--from", str(folder), "--out", str(out), *quick_args(shapes)], capsys
    )
    assert code == 2 and "Traceback" not in err
    error = err.strip().splitlines()[-1]
    assert str(folder / "pytorch_model.bin") in error and "--allow_pickle" in error, err
    assert not out.exists()
    for command in ("analyze", "evaluate", "route"):
        argv = [command, "--model", str(folder)] + ([] if command == "route" else ["--out", str(out)])
        code, err = _cli(argv, capsys)
        assert code == 2 and "pytorch_model.bin" in err and "--allow_pickle" in err and "Traceback" not in err


def test_allow_pickle_loads_the_same_weights(workdir, stage0, shapes, capsys):
    from analysis.run import load_checkpoint

    folder = as_pickle(stage0, workdir / "allowed")
    model, _ = load_checkpoint(folder, allow_pickle=True)
    expected = load_file(str(stage0 / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())
    out = workdir / "allowed_out"
    argv = ["train", "--stage", "1", "--from", str(folder), "--out", str(out)]
    code, err = _cli([*argv, *quick_args(shapes, steps=1, logging_steps=1), "--allow_pickle", "true"], capsys)
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and not pickle_files(out)  # the stage writes safetensors
    # The finished stage holds the Trainer's training_args.bin: not model weights, so the next stage loads it.
    assert (out / "training_args.bin").is_file() and check_no_pickle(out) == []


@pytest.mark.parametrize("allow", [False, True], ids=["refused", "allowed_but_weights_only"])
def test_a_pickle_that_runs_code_never_runs_it(workdir, stage0, allow, tmp_path):
    from analysis.run import load_checkpoint
    from trainer.upcycle import load_vision_state

    marker = tmp_path / "ran.txt"
    evil = {"model.embed_tokens.weight": WritesAMarker(marker)}
    folder = as_pickle(stage0, tmp_path / "evil", state=evil)
    match = r"weights_only=True\) refuses .*Unsupported global" if allow else "--allow_pickle"
    with pytest.raises(ValueError, match=match):
        load_checkpoint(folder, allow_pickle=allow)
    clip = tmp_path / "clip.pt"  # an open_clip checkpoint file for `moe-vlm init --vision`
    torch.save({"state_dict": evil}, clip)
    with pytest.raises(ValueError, match=match):
        load_vision_state(str(clip), allow_pickle=allow)
    assert not marker.exists(), "unpickling ran the pickle's code"


def test_the_trainers_resume_files_are_not_model_weights(tmp_path):
    """optimizer.pt, scheduler.pt, scaler.pt, rng_state*.pth (read by the Trainer with weights_only=True) and
    training_args.bin (only written) sit in checkpoint-N folders; a model weights pickle beside them is still found."""
    for name in (
        "optimizer.pt",
        "scheduler.pt",
        "scaler.pt",
        "rng_state.pth",
        "rng_state_1.pth",
        "training_args.bin",
    ):
        torch.save({}, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert pickle_files(tmp_path) == [] and check_no_pickle(tmp_path) == []
    assert len(TRAINER_STATE_FILES) == 5
    for name in ("pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt", "state.pkl", "Model.PICKLE"):
        torch.save({}, tmp_path / name)
    assert [p.name for p in pickle_files(tmp_path)] == [
        "Model.PICKLE",
        "last.ckpt",
        "model.pt",
        "pytorch_model.bin",
        "state.pkl",
        "weights.pth",
    ]
    with pytest.raises(ValueError, match="last.ckpt, .*model.pt, .*pytorch_model.bin, .*weights.pth"):
        check_no_pickle(tmp_path)


def test_the_space_refuses_the_same_pickle_suffixes_as_the_trainer():
    """The Space keeps its own copy of the suffix list (it runs without the project installed): one contract."""
    from space.model_source import PICKLE_SUFFIXES as SPACE_SUFFIXES
    from trainer.safe_loading import PICKLE_SUFFIXES

    assert set(SPACE_SUFFIXES) == set(PICKLE_SUFFIXES)
