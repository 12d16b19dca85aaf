"""Bad command-line input outside a stage's recipe is refused before any work, in one line naming what to fix, with
exit status 2 and no traceback; and nothing a person already has is replaced or deleted without being asked.

Each case is a mistake a new user made when the commands were tried with wrong input (2026-12-08): an `--out` that
is a file, a folder that holds a finished stage, a count below one, a missing or unreadable file, a checkpoint
whose files were cut short. `test_reliability_config.py` covers the recipe and the checkpoint of `moe-vlm train`.
"""

from __future__ import annotations

import json

import pytest

from configuration.cli_inputs import at_least, check_out_dir
from configuration.contract import ADAPTER_CONFIG_FILE, COMPLETION_MARKER


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`moe-vlm ARGV`: its exit status and the last line it wrote to stderr (argparse's errors exit via SystemExit)."""
    from moe_vlm_cli import main

    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return status, (err.strip().splitlines() or [""])[-1]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a folder\n")
    return path


@pytest.fixture
def finished(tmp_path):
    """A folder holding a finished Stage 2 (its marker; the weights do not matter to the refusal)."""
    path = tmp_path / "stage2"
    path.mkdir()
    (path / COMPLETION_MARKER).write_text(json.dumps({"stage": "2"}))
    (path / "model.safetensors").write_text("the user's weights")
    return path


# ----- the shared checks -------------------------------------------------------------------------------------------------
def test_check_out_dir_refuses_a_file_a_file_above_and_with_refuse_finished_a_finished_stage(
    a_file, finished
):
    with pytest.raises(ValueError, match=r"--out .*notes.txt is not a folder: give a folder path"):
        check_out_dir(a_file)
    with pytest.raises(ValueError, match=r"notes.txt is a file"):
        check_out_dir(a_file / "run", flag="--out")
    assert check_out_dir(finished) == finished  # analyses may write beside a stage
    with pytest.raises(ValueError, match=r"already holds a finished Stage 2 .*choose a new folder"):
        check_out_dir(finished, refuse_finished=True)
    (finished / COMPLETION_MARKER).write_text("{cut")
    with pytest.raises(ValueError, match=r"already holds a finished stage "):
        check_out_dir(finished, refuse_finished=True)
    assert check_out_dir(finished.parent / "new", refuse_finished=True) == finished.parent / "new"


def test_at_least_names_the_bound_and_the_value():
    parse = at_least(1)
    assert parse("3") == 3
    for text, said in (("0", ">= 1, got 0"), ("-3", ">= 1, got -3"), ("two", "expected a whole number")):
        with pytest.raises(Exception, match=said):
            parse(text)


# ----- an --out that is a file: refused before the work, not after it ----------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["init", "--preset", "tiny"],
        ["analyze", "--model", "unused"],
        ["evaluate", "--model", "unused"],
        ["reproduce"],
        ["ablate", "--variants", "hard", "--seeds", "0"],
        ["bench", "--quick"],
    ],
    ids=lambda argv: argv[0],
)
def test_an_out_that_is_a_file_is_refused_first(argv, a_file, capsys):
    status, error = run_cli([*argv, "--out", str(a_file)], capsys)
    assert status == 2 and f"--out {a_file} is not a folder" in error, error
    assert a_file.read_text() == "not a folder\n"


def test_a_finished_stage_is_not_trained_over(finished, capsys):
    """`moe-vlm train` (and `init`) into a folder holding a finished stage would replace it without a word."""
    for argv in (
        ["train", "--stage", "1", "--from", "unused", "--out", str(finished)],
        ["train", "--stage", "pretrain", "--out", str(finished)],
        ["init", "--preset", "tiny", "--out", str(finished)],
    ):
        status, error = run_cli(argv, capsys)
        assert status == 2 and "already holds a finished Stage 2" in error, error
    assert (finished / "model.safetensors").read_text() == "the user's weights"
    assert json.loads((finished / COMPLETION_MARKER).read_text()) == {"stage": "2"}


def test_publish_overwrite_empties_a_folder_but_never_deletes_a_file(a_file, finished):
    from hub.publish import prepare_out

    with pytest.raises(ValueError, match="is not a folder"):
        prepare_out(a_file, finished, overwrite=True)
    assert a_file.read_text() == "not a folder\n"


# ----- counts below one --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["analyze", "--model", "m", "--out", "o", "--n-samples", "-3"], "--n-samples"),
        (["analyze", "--model", "m", "--out", "o", "--n-probe", "0"], "--n-probe"),
        (["evaluate", "--model", "m", "--out", "o", "--n-samples", "0"], "--n-samples"),
        (["reproduce", "--n-eval", "-1"], "--n-eval"),
        (["ablate", "--jobs", "0"], "--jobs"),
        (["ablate", "--max-steps", "0"], "--max-steps"),
    ],
    ids=[
        "analyze_n_samples",
        "analyze_n_probe",
        "evaluate_n_samples",
        "reproduce_n_eval",
        "ablate_jobs",
        "ablate_max_steps",
    ],
)
def test_a_count_below_one_is_refused_by_the_parser(argv, flag, capsys):
    status, error = run_cli(argv, capsys)
    assert status == 2 and f"argument {flag}" in error and "must be a whole number >= " in error, error


def test_ablate_checks_transfer_folders_before_it_trains(tmp_path, monkeypatch):
    from pipeline import ablate

    monkeypatch.setattr(
        ablate, "prepare_seed", lambda *a, **k: pytest.fail("trained before checking --transfer")
    )
    with pytest.raises(FileNotFoundError, match=r"--transfer coco=.*not a saved DatasetDict"):
        ablate.ablate(tmp_path / "out", ["hard"], [0], transfer={"coco": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="--jobs must be >= 1"):
        ablate.ablate(tmp_path / "out", ["hard"], [0], jobs=0)


# ----- files that are missing, of the wrong kind, or cut short -------------------------------------------------------
def test_route_image_that_is_missing_a_folder_or_not_an_image(tmp_path, a_file, capsys):
    for image, said in (
        (tmp_path / "nope.png", "no such file"),
        (tmp_path, "a folder"),
        (a_file, "not an image"),
    ):
        status, error = run_cli(["route", "--model", "unused", "--image", str(image)], capsys)
        assert status == 2 and f"--image {image}: {said}" in error, error


def test_a_model_path_that_does_not_exist_is_not_taken_for_a_hub_id(tmp_path, capsys):
    missing = tmp_path / "runs" / "stage2"
    for argv in (
        ["analyze", "--model", str(missing), "--out", str(tmp_path / "a")],
        ["init", "--mistral", str(missing)],
    ):
        status, error = run_cli([*argv, *([] if "--out" in argv else ["--out", str(tmp_path / "i")])], capsys)
        assert status == 2 and f"{missing} does not exist" in error, error


def test_a_cut_short_checkpoint_names_its_file(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from trainer.safe_loading import from_pretrained_checked

    folder = tmp_path / "mistral"
    MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    ).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"model.safetensors: cannot be read as safetensors"):
        from_pretrained_checked(MistralForCausalLM, folder)
    (folder / "config.json").write_text('{"model_type": "mistral",')
    with pytest.raises(ValueError, match=r"config.json: .*not a valid JSON file"):
        from_pretrained_checked(MistralForCausalLM, folder)


def test_vision_that_is_neither_a_file_nor_an_open_clip_name(tmp_path):
    from trainer.upcycle import check_open_clip_name

    assert check_open_clip_name("ViT-L-14:openai") == "ViT-L-14:openai"
    with pytest.raises(FileNotFoundError, match=r"--vision .*nofile.pt: no such file"):
        check_open_clip_name(str(tmp_path / "nofile.pt"))
    with pytest.raises(ValueError, match=r"--vision ViT-Huge-99: neither a file nor an open_clip model name"):
        check_open_clip_name("ViT-Huge-99")


def test_merge_refuses_an_adapter_config_that_is_not_an_object_and_a_finished_out(tmp_path, finished):
    from trainer.lora import merge_adapter

    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / COMPLETION_MARKER).write_text(json.dumps({"stage": "3", "adapter": {}}))
    (adapter / ADAPTER_CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{ADAPTER_CONFIG_FILE} is not PEFT's adapter config"):
        merge_adapter(adapter, tmp_path / "merged")
    with pytest.raises(ValueError, match="already holds a finished Stage 2"):
        merge_adapter(adapter, finished)
