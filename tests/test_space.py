"""The Gradio Space (`space/`): the routing views, the input checks, the model choice, the app through
`gradio_client`, `moe-vlm demo`, and the folder deploying as it is (only its own files and requirements.txt)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from space import model_source
from space import routing_view as view
from space.input_checks import InputError, check_prompt, load_image

SPACE_DIR = Path(__file__).resolve().parent.parent / "space"
RED_CIRCLE = SPACE_DIR / "examples" / "red_circle.png"


# ----- shared fixtures (the browser test imports these) -------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny model saved as a finished Stage-3 directory (gumbel routing), as the app loads it."""
    from configuration import build_processor
    from modeling_moe_vlm import MoeVlmForCausalLM

    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config(router_mode="gumbel")).eval()
    path = tmp_path_factory.mktemp("space_model")
    model.save_pretrained(path)
    build_processor(model.config, tokenizer=tokenizer).save_pretrained(path)
    (path / model_source.MARKER).write_text(json.dumps({"stage": "3", "name": "instruct"}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir):
    """The app on 127.0.0.1 and a free port as both launch paths serve it (`serving.launch_options`: the upload
    limit too), closed after the module; yields its URL."""
    from space.app import build_demo
    from space.serving import launch_options

    demo = build_demo(str(model_dir))
    demo.launch(**launch_options("127.0.0.1", free_port()), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


# ----- routing views: pure functions of a routing dict ------------------------------------------------------------
@pytest.fixture
def routing():
    """BOS, 4 image placeholders, 4 prompt tokens, 2 answer tokens; MoE layers 0 and 2 (not contiguous)."""
    tokens = ["<s>", "[IMG]", "[IMG]", "[IMG]", "[IMG]", "<0x0A>", "What", "▁colour", "?", "▁red", "</s>"]
    is_image = [False, True, True, True, True, False, False, False, False, False, False]
    choices = {0: [1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1], 2: [0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]}
    layers = {}
    for layer_idx, choice in choices.items():
        prob = [[0.9, 0.1] if c == 0 else [0.3, 0.7] for c in choice]
        counts = {
            "image": [sum(1 for c, i in zip(choice, is_image) if i and c == e) for e in range(2)],
            "text": [sum(1 for c, i in zip(choice, is_image) if not i and c == e) for e in range(2)],
        }
        layers[layer_idx] = {"choice": choice, "prob": prob, "counts": counts}
    return {"tokens": tokens, "is_image": is_image, "n_prompt": 9, "layers": layers}


def test_segments_split_image_prompt_and_answer(routing):
    assert view.segments(routing) == [("prompt", 0, 1), ("image", 1, 5), ("prompt", 5, 9), ("answer", 9, 11)]
    without_answer = {**routing, "n_prompt": None}
    del without_answer["n_prompt"]  # route_sample's dicts have no answer: everything is prompt
    assert [name for name, *_ in view.segments(without_answer)] == ["prompt", "image", "prompt"]


def test_token_display_and_chosen_probability(routing):
    assert view.display_token("<0x0A>") == "\n" and view.display_token("▁colour") == " colour"
    assert view.tick_label("<0x0A>") == "\\n" and view.tick_label("▁") == "␣"
    assert view.chosen_probability(routing["layers"][0])[:2] == [0.7, 0.9]


def test_highlighted_tokens_follow_the_chosen_layer(routing):
    items = view.highlighted_tokens(routing, 2)
    assert items[1] == ("[image: 4 tokens; 1 → e0, 3 → e1] ", None)  # one summary for the placeholders
    assert ("  ⟶ answer: ", None) in items
    text = [item for item in items if item[1] is not None]
    assert [t for t, _ in text] == ["<s>", "\n", "What", " colour", "?", " red", "</s>"]
    assert [label for _, label in text] == ["expert 0", "expert 0", "expert 0", "expert 1", "expert 1"] + [
        "expert 0",
        "expert 0",
    ]
    assert [label for _, label in view.highlighted_tokens(routing, 0) if label][:3] == ["expert 1"] * 3
    assert view.expert_colour_map(2) == {
        "expert 0": view.EXPERT_COLOURS[0],
        "expert 1": view.EXPERT_COLOURS[1],
    }


def test_nearest_layer_snaps_to_moe_layers(routing):
    assert [view.nearest_layer(routing, x) for x in (0, 1, 1.6, 2, 9)] == [0, 0, 2, 2, 2]


def test_heatmap_shows_choices_probabilities_and_labels(routing):
    figure = view.heatmap_figure(routing, "under test")
    top, bottom = figure.axes[:2]
    assert top.images[0].get_array().tolist() == [
        routing["layers"][0]["choice"],
        routing["layers"][2]["choice"],
    ]
    assert bottom.images[0].get_array()[1].tolist() == pytest.approx(
        view.chosen_probability(routing["layers"][2])
    )
    assert [t.get_text() for t in top.get_yticklabels()] == ["layer 0", "layer 2"]
    labels = [t.get_text() for t in bottom.get_xticklabels()]
    assert labels == ["<s>", "[IMG] ×4", "\\n", "What", "colour", "?", "red", "</s>"]
    assert bottom.get_xlabel() and figure.get_suptitle() == "under test"
    legend = figure.axes[2]  # the expert colour bar
    assert [t.get_text() for t in legend.get_yticklabels()] == ["expert 0", "expert 1"]
    image = view.figure_to_image(figure)
    assert image.mode == "RGB" and image.width > 600 and image.height > 200


def test_load_chart_bars_are_shares_per_modality(routing):
    axis = view.load_figure(routing).axes[0]
    heights = [round(p.get_height(), 4) for p in axis.patches]
    # layer 0: image [3 of 4 -> e0, 1 -> e1], text [1 of 7 -> e0, 6 -> e1]; layer 2: image [1, 3], text [5, 2]
    assert heights == [
        0.75,
        0.25,
        round(1 / 7, 4),
        round(6 / 7, 4),
        0.25,
        0.75,
        round(5 / 7, 4),
        round(2 / 7, 4),
    ]
    assert [t.get_text() for t in axis.get_xticklabels()] == [
        "image\nlayer 0",
        "text\nlayer 0",
        "image\nlayer 2",
        "text\nlayer 2",
    ]
    assert axis.get_ylabel() and axis.get_title().startswith(
        "Expert load by modality (4 image tokens, 7 text"
    )
    assert [t.get_text() for t in axis.get_legend().get_texts()] == ["expert 0", "expert 1"]


# ----- routing read from a real (tiny) model -------------------------------------------------------------------------
def test_read_routing_prompt_part_equals_a_prompt_only_pass(tiny_model, processor, red_image):
    """One pass over prompt + answer shows the prompt's routing as a prompt-only pass has it (causal attention)."""
    tiny_model.set_router_mode(
        "gumbel"
    )  # eval: argmax of the router, so routing depends on the hidden states
    inputs = processor(images=[red_image], text=["<image>\nA red circle."], return_tensors="pt")
    ids = tiny_model.generate(**inputs, max_new_tokens=5, do_sample=False)
    n_prompt = inputs["input_ids"].shape[1]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    full = view.read_routing(tiny_model, ids, inputs["pixel_values"], tokens, n_prompt)
    prompt_only = view.read_routing(tiny_model, inputs["input_ids"], inputs["pixel_values"], tokens, n_prompt)
    assert list(full["layers"]) == tiny_model.config.moe_layers
    assert sum(full["is_image"]) == 16 and len(full["tokens"]) == ids.shape[1] == n_prompt + 5
    for layer_idx, layer in full["layers"].items():
        assert layer["choice"][:n_prompt] == prompt_only["layers"][layer_idx]["choice"]
        assert sum(layer["counts"]["image"]) == 16 and sum(layer["counts"]["text"]) == ids.shape[1] - 16
        assert all(abs(sum(p) - 1) < 1e-5 for p in layer["prob"])


def test_routing_demo_modes_reach_the_model_and_are_reset(model_dir, red_image):
    from space.app import RoutingDemo

    demo = RoutingDemo(model_source.choose_model(str(model_dir)))
    assert demo.native_mode == "gumbel" and demo.modes == ["hard", "gumbel", "softmax", "inverted"]
    text = "<image>\nA red circle."
    _, hard = demo.run(red_image, text, "hard")
    _, gumbel = demo.run(red_image, text, "gumbel")
    _, inverted = demo.run(red_image, text, "inverted")
    n_prompt = gumbel["n_prompt"]
    for layer in hard[
        "layers"
    ].values():  # hard: image -> expert 0, text -> expert 1, whatever the router says
        assert layer["counts"]["image"] == [16, 0] and layer["counts"]["text"][0] == 0
    for layer in inverted[
        "layers"
    ].values():  # inverted: every token goes to the expert its router ranks last
        assert layer["choice"] == [min(range(2), key=p.__getitem__) for p in layer["prob"]]
    first = min(
        gumbel["layers"]
    )  # the first MoE layer sees the same hidden states, so its choices flip exactly
    assert inverted["layers"][first]["choice"][:n_prompt] == [
        1 - c for c in gumbel["layers"][first]["choice"][:n_prompt]
    ]
    with pytest.raises(InputError, match="Unknown routing mode"):
        demo.run(red_image, "<image>\nA red circle.", "sideways")
    assert demo.model.config.router_mode == "gumbel"  # restored, also after the failed request
    assert not any(block.gate.invert for block in demo.model.moe_blocks().values())
    with pytest.raises(
        InputError, match=r"\[IMG\]"
    ):  # the processor's own check, passed on as an input error
        demo.run(red_image, "<image>\n[IMG] sneaky", "hard")


def test_prompt_format_follows_the_stage_and_reaches_the_model_as_the_collator_builds_it(
    model_dir, red_image, monkeypatch
):
    from space.app import RoutingDemo
    from trainer.data import MoeVlmCollator

    demo = RoutingDemo(model_source.choose_model(str(model_dir)))
    assert (demo.prompt_format, demo.prompt_format_reason) == ("chat", "Stage 3's training format")
    text = "<image>\nWhat colour is the circle?"
    ids = demo.processor(images=[red_image], text=[demo.model_text(text)])["input_ids"][0].tolist()
    record = {"image": red_image, "conversations": [{"from": "human", "value": text}]}
    assert ids == MoeVlmCollator(demo.processor).prompt_ids(record)[0]  # one format: what Stage 3 trained on
    _, routing = demo.run(red_image, text, "hard")
    assert (
        routing["tokens"][:2] == ["<s>", "[INST]"] and routing["tokens"][routing["n_prompt"] - 1] == "[/INST]"
    )

    processor = demo.processor
    stage2 = model_source.ModelChoice("dir", "test", {"stage": "2"})
    hub = model_source.ModelChoice("user/model", "Hub")
    assert model_source.choose_prompt_format(stage2, processor)[0] == "raw"
    assert model_source.choose_prompt_format(hub, processor) == ("raw", "the processor's prompt_format")
    monkeypatch.setattr(processor, "prompt_format", "chat")
    assert model_source.choose_prompt_format(hub, processor)[0] == "chat"  # what a Hub Stage-3 copy carries
    monkeypatch.setenv("PROMPT_FORMAT", "raw")
    assert model_source.choose_prompt_format(model_source.choose_model(str(model_dir)), processor)[0] == "raw"
    monkeypatch.setenv("PROMPT_FORMAT", "instruct")
    with pytest.raises(ValueError, match="PROMPT_FORMAT"):
        model_source.choose_prompt_format(hub, processor)
    monkeypatch.delenv("PROMPT_FORMAT")
    monkeypatch.setattr(processor, "chat_template", None)
    assert model_source.choose_prompt_format(hub, processor) == ("raw", "the processor has no chat template")


# ----- input checks -----------------------------------------------------------------------------------------------------
def test_load_image_refuses_what_is_not_a_usable_image(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="No image"):
        load_image(None)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(InputError, match="notes.txt is not an image"):
        load_image(text_file)
    Image.new("RGB", (200, 100), "white").save(tmp_path / "wide.png")
    with pytest.raises(InputError, match=r"200×100 px \(0.0 MP\); images up to"):
        load_image(tmp_path / "wide.png", max_pixels=10_000)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "wide.png").read_bytes()[:60])
    with pytest.raises(InputError):
        load_image(truncated)
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 1000
    )  # PIL refuses > 2x this outright: a decompression bomb
    with pytest.raises(InputError, match="far too large"):
        load_image(tmp_path / "wide.png")


def test_load_image_downscales_large_images_and_converts_to_rgb(tmp_path):
    Image.new("RGBA", (3000, 1500), (255, 0, 0, 128)).save(tmp_path / "big.png")
    image, note = load_image(tmp_path / "big.png")
    assert image.mode == "RGB" and image.size == (1024, 512)
    assert note == "The image was downscaled from 3000×1500 px (4.5 MP) to 1024×512 px."
    assert load_image(RED_CIRCLE)[1] == ""


def test_check_prompt():
    for empty in (None, "", "  \n "):
        with pytest.raises(InputError, match="empty"):
            check_prompt(empty)
    assert check_prompt("  What is it? ") == "<image>\nWhat is it?"
    assert check_prompt("Look: <image> what is it?") == "Look: <image> what is it?"
    with pytest.raises(InputError, match="2 '<image>' markers"):
        check_prompt("<image> <image>")
    with pytest.raises(InputError, match="characters long"):
        check_prompt("x" * 5000)


# ----- which model is shown ----------------------------------------------------------------------------------------------
def write_stage(directory: Path, stage: str, moe_layers=(0, 1)) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps({"model_type": "moe_vlm", "moe_layers": list(moe_layers)})
    )
    (directory / model_source.MARKER).write_text(json.dumps({"stage": stage, "name": f"stage {stage}"}))
    return directory


def test_find_reproduced_model_prefers_the_most_trained_finished_moe_stage(tmp_path):
    root = tmp_path / "reproduce"
    assert model_source.find_reproduced_model(root) is None
    write_stage(root / "stage0", "0")
    write_stage(root / "stage2", "2")
    write_stage(root / "dense", "dense", moe_layers=())  # no experts: nothing to show
    unfinished = write_stage(root / "stage3", "3")
    (unfinished / model_source.MARKER).unlink()  # an interrupted Stage 3
    assert model_source.find_reproduced_model(root) == root / "stage2"
    write_stage(root / "stage3b", "3")
    assert model_source.find_reproduced_model(root) == root / "stage3b"


def test_choose_model_order_and_errors(tmp_path, monkeypatch):
    stage3 = write_stage(tmp_path / "reproduce" / "stage3", "3")
    stage0 = write_stage(tmp_path / "elsewhere" / "stage0", "0")
    monkeypatch.setattr(model_source, "REPRODUCE_DIR", tmp_path / "reproduce")
    monkeypatch.delenv("MODEL_ID", raising=False)
    chosen = model_source.choose_model()
    assert chosen.source == str(stage3) and not chosen.untrained and "Stage 3" in chosen.describe()
    monkeypatch.setenv("MODEL_ID", str(stage0))
    chosen = model_source.choose_model()
    assert (chosen.source, chosen.origin, chosen.untrained) == (str(stage0), "MODEL_ID", True)
    assert "untrained" in chosen.describe()
    assert model_source.choose_model("someone/moe-vlm-tiny").origin == "Hub, --model"  # the argument wins
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_source.choose_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model_source.choose_model(str(tmp_path))


def test_without_any_model_one_is_built_on_the_spot_and_called_untrained(tmp_path, monkeypatch):
    import trainer.upcycle

    def fake_init_model(out, preset):  # the real one takes ~20 s; the wiring is what is under test here
        write_stage(Path(out), "0")

    monkeypatch.setattr(trainer.upcycle, "init_model", fake_init_model)
    monkeypatch.setattr(model_source, "REPRODUCE_DIR", tmp_path / "nothing")
    monkeypatch.delenv("MODEL_ID", raising=False)
    chosen = model_source.choose_model()
    assert chosen.untrained and chosen.origin.startswith("built on the spot")
    assert (Path(chosen.source) / "config.json").is_file()


# ----- the app through gradio_client -------------------------------------------------------------------------------------
def test_client_runs_the_endpoint_and_gets_every_view(server):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    answer, heatmap, load, tokens = client.predict(
        handle_file(str(RED_CIRCLE)), "Describe the image.", "hard", 1, api_name="/run"
    )
    assert isinstance(answer, str) and answer
    for path in (heatmap, load):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 200
    text = [(item["token"], item["class_or_confidence"]) for item in tokens]
    assert "Describe the image." in "".join(token for token, _ in text)
    assert {label for _, label in text if label} == {"expert 1"}  # hard routing: every text token -> expert 1
    # A Stage-3 model gets the chat template: <s> [INST] <image> ... [/INST], then its answer.
    assert [token for token, _ in text[:2]] == ["<s>", "[INST]"] and "[/INST]" in [token for token, _ in text]
    assert text[2] == ("[image: 16 tokens; 16 → e0, 0 → e1] ", None)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no image", "No image: upload one"),
        ("not an image", "notes.txt is not an image"),
        ("huge image", r"8000×5100 px \(40.8 MP\); images up to 40 MP"),
        ("empty prompt", "The prompt is empty"),
    ],
)
def test_client_bad_input_gets_a_clear_message(server, tmp_path, case, message):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    image, prompt = handle_file(str(RED_CIRCLE)), "Describe the image."
    if case == "no image":
        image = None
    elif case == "not an image":
        (tmp_path / "notes.txt").write_text("not an image")
        image = handle_file(str(tmp_path / "notes.txt"))
    elif case == "huge image":
        Image.new("L", (8000, 5100), 128).save(tmp_path / "huge.png")  # 40.8 MP, 50 kB of PNG
        image = handle_file(str(tmp_path / "huge.png"))
    else:
        prompt = "   "
    with pytest.raises(AppError, match=message):
        Client(server, verbose=False).predict(image, prompt, "hard", 1, api_name="/run")


# ----- moe-vlm demo ------------------------------------------------------------------------------------------------------------
def test_demo_command_is_registered_and_reports_bad_input_in_one_line(tmp_path, capsys):
    import moe_vlm_cli

    args = moe_vlm_cli.build_parser().parse_args(["demo", "--model", "some/dir", "--port", "7999"])
    assert (args.model, args.port) == ("some/dir", 7999)
    assert moe_vlm_cli.main(["demo", "--model", str(tmp_path / "missing" / "model")]) == 2
    assert capsys.readouterr().err.strip().startswith("moe-vlm demo: error: model directory")
    assert moe_vlm_cli.main(["demo", "--port", "70000"]) == 2
    assert "not a TCP port" in capsys.readouterr().err


# ----- the folder deploys as a Space as it is ------------------------------------------------------------------------
def test_space_folder_runs_alone_with_remote_code(model_dir, tmp_path):
    """A copy of `space/` (as a Hub Space holds it) imports as a script and builds the app on the model's remote
    code, without importing any of the project's packages."""
    deployed = tmp_path / "deployed_space"
    shutil.copytree(SPACE_DIR, deployed, ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent(
        f"""
        import json, sys
        import app
        demo = app.build_demo({str(model_dir)!r})
        project = {{"analysis", "configuration", "trainer", "hub", "space", "benchmarks", "modeling_moe_vlm"}}
        print(json.dumps({{"project": sorted(project & set(sys.modules)), "type": type(demo).__name__,
                          "examples": len(app.example_inputs())}}))
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=deployed, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"project": [], "type": "Blocks", "examples": 4}


def test_requirements_cover_every_import_and_front_matter_is_valid():
    import gradio
    from huggingface_hub import SpaceCard

    requirement_names = {
        line.split(">")[0].split("=")[0].split("<")[0].strip().lower()
        for line in (SPACE_DIR / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    pip_name = {"PIL": "pillow"}
    imported = set()
    for path in SPACE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    local = {p.stem for p in SPACE_DIR.glob("*.py")}
    lazy_repository_only = {"configuration", "trainer", "moe_vlm_cli"}  # imported inside functions, guarded
    third_party = imported - set(sys.stdlib_module_names) - local - lazy_repository_only - {"gradio", "space"}
    assert {pip_name.get(m, m).lower() for m in third_party} <= requirement_names
    # What the model's remote code imports where it loads (open_clip's pip name differs from its import name).
    assert {"open_clip_torch", "torchvision", "transformers", "torch"} <= requirement_names

    card = SpaceCard.load(SPACE_DIR / "README.md")  # huggingface_hub's own parser of the Spaces front matter
    assert (card.data.sdk, card.data.app_file, card.data.license) == ("gradio", "app.py", "apache-2.0")
    assert card.data.sdk_version == gradio.__version__  # the Space runs the Gradio the tests ran
    assert len(card.data.short_description) <= 60 and "MODEL_ID" in card.text
