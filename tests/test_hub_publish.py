"""`moe-vlm publish`: the dry-run folder is the repository a stranger downloads (it loads with trust_remote_code in a
fresh process outside the repo and gives the source model's logits), its card parses and validates, and the real
upload code (huggingface_hub's own HTTP client, answered offline by a mock Hub) commits exactly the dry-run files;
a failed commit says what was and was not uploaded and leaves the folder intact; the token never shows. The Space
(`--space USER/NAME --model USER/MODEL`) the same way: its dry-run folder is the app with the model named in its card
(which the staged app picks), and the Space endpoints commit exactly that folder."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from conftest import tiny_config
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from huggingface_hub.utils._http import default_client_factory
from PIL import Image
from test_hub_loading import load_in_fresh_process

import moe_vlm_cli
from hub import stats as hub_stats
from hub.publish import listed_files

REPO_ID = "someone/tiny-moe-vlm"
TOKEN = "hf_moeVlmTestTokenThatMustNeverLeak0123"
STAGE2_LINES = [  # routing_stats.jsonl of Stage 2, in the training callback's format
    {"step": 10, "stage": "2", "layers": {
        "0": {"image": {"dispatch": [1.0, 0.0], "prob": [0.9, 0.1], "entropy": 0.3, "tokens": 10},
              "text": {"dispatch": [0.0, 1.0], "prob": [0.2, 0.8], "entropy": 0.5, "tokens": 30},
              "all": {"dispatch": [0.25, 0.75], "prob": [0.375, 0.625], "entropy": 0.45, "tokens": 40}},
        "1": {"all": {"dispatch": [0.5, 0.5], "prob": [0.5, 0.5], "entropy": 0.69, "tokens": 40}}}},
    {"step": 20, "stage": "2", "layers": {
        "0": {"image": {"dispatch": [0.5, 0.5], "prob": [0.6, 0.4], "entropy": 0.7, "tokens": 30}}}},
]  # fmt: skip
STAGE1_LINE = {
    "step": 5,
    "stage": "1",
    "layers": {"0": {"all": {"dispatch": [1.0, 0.0], "prob": [0.7, 0.3], "entropy": 0.6}}},
}
ANALYSIS = {
    "model": "/somewhere/local/stage2",
    "probe": {"set": "concept_probe", "n_per_concept": 4},
    "binomial": {"0": {"k": 2, "n": 8, "p_value": 0.26}, "1": {"k": 6, "n": 8, "p_value": 8.52e-5}},
    "load": {
        "n_layers": 2,
        "n_collapsed": 1,
        "collapsed_layers": [1],
        "n_collapsed_soft": 0,
        "collapsed_layers_soft": [],
        "collapse_threshold": 0.99,
        "soft_collapse_threshold": 0.9,
    },
    "crossover": {"increase_pct": 12.5},
}
CAPTIONING = {
    "model": "/somewhere/local/stage2",
    "split": "test",
    "n": 20,
    "metrics": {"Bleu_4": 0.2, "METEOR": 0.25, "ROUGE_L": 0.5, "CIDEr": 0.762,
                "scaled": {"Bleu_4": 20.0, "METEOR": 25.0, "ROUGE_L": 50.0, "CIDEr": 76.2}},
}  # fmt: skip
EXPECTED_FILES = {
    "README.md", "config.json", "generation_config.json", "model.safetensors", "configuration_moe_vlm.py",
    "modeling_moe_vlm.py", "processing_moe_vlm.py", "experts_kernels.py", "router_kernels.py", "cpp_kernels.py",
    "processor_config.json", "tokenizer.json",
    "tokenizer_config.json", "chat_template.jinja", "routing_stats.json", "analysis.json", "captioning.json",
    "figures/expert_load.png", "figures/routing_stage1.png", "figures/routing_stage2.png",
}  # fmt: skip
# chat_template.jinja: the processor's chat template (Stage 3's prompt format), which `save_pretrained` writes beside
# processor_config.json; without it a downloader's processor has no `apply_chat_template`.


def _write_marker(directory: Path, **marker) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / hub_stats.COMPLETION_MARKER).write_text(json.dumps(marker))


def _jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A reproduce-shaped run: stage0 (marker only: the chain walk reads markers), stage1 (a routing log),
    stage2 (the tiny model + processor, its log and recipe), analysis/stage2 (analysis, captioning, a figure)."""
    from configuration import build_processor
    from modeling_moe_vlm import MoeVlmForCausalLM

    root = tmp_path_factory.mktemp("run")
    stage0, stage1, stage2 = root / "stage0", root / "stage1", root / "stage2"
    _write_marker(stage0, stage="0", name="upcycle", preset="paper", mistral="mistralai/Mistral-7B-v0.3",
                  vision="ViT-L-14:openai", seed=0, **{"from": None})  # fmt: skip
    _write_marker(stage1, stage="1", name="connector", steps=5, **{"from": str(stage0)})
    _jsonl(stage1 / hub_stats.ROUTING_LOG, [STAGE1_LINE])
    (stage1 / "recipe.yaml").write_text("stage: '1'\ndataset: llava\n")

    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config(router_mode="softmax")).eval()
    model.save_pretrained(stage2)
    build_processor(tiny_config(), tokenizer=tokenizer).save_pretrained(stage2)
    _jsonl(stage2 / hub_stats.ROUTING_LOG, STAGE2_LINES)
    (stage2 / "recipe.yaml").write_text(f"stage: '2'\ndataset: shapes\noutput_dir: {stage2}\n")
    _write_marker(stage2, stage="2", name="experts, hard routing", steps=20, train_loss=3.25, router_mode="hard",
                  **{"from": str(stage1)})  # fmt: skip

    analysis = root / "analysis" / "stage2"
    analysis.mkdir(parents=True)
    (analysis / "analysis.json").write_text(json.dumps(ANALYSIS))
    (analysis / "captioning.json").write_text(json.dumps(CAPTIONING))
    Image.new("RGB", (8, 8), "red").save(analysis / "expert_load.png")
    return root


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = moe_vlm_cli.main(["publish", *argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def dry_run(run_dir):
    folder = run_dir / "dry"
    code, out, err = _cli(
        "--model", str(run_dir / "stage2"), "--repo-id", REPO_ID, "--dry-run", "--out", str(folder)
    )
    assert code == 0, err
    return folder, out


def _digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in listed_files(folder)}


# ----- the dry-run folder ------------------------------------------------------------------------------------------
def test_dry_run_stages_exactly_the_repository(run_dir, dry_run):
    folder, out = dry_run
    assert set(listed_files(folder)) == EXPECTED_FILES  # no marker, raw jsonl log, recipe
    assert "dry run" in out and all(name in out for name in EXPECTED_FILES)
    source = run_dir / "stage2" / "model.safetensors"
    assert (folder / "model.safetensors").read_bytes() == source.read_bytes()
    template = (run_dir / "stage2" / "chat_template.jinja").read_text()
    assert (folder / "chat_template.jinja").read_text() == template and "[INST]" in template
    assert json.loads((folder / "analysis.json").read_text())["model"] == REPO_ID
    for name in listed_files(folder):  # the publisher's local paths stay home
        if name.endswith((".json", ".md")):
            assert str(run_dir) not in (folder / name).read_text(), name


def test_dry_run_folder_loads_remote_code_in_fresh_process(tmp_path, run_dir, dry_run, processor, red_image):
    from modeling_moe_vlm import MoeVlmForCausalLM

    folder, _ = dry_run
    source = MoeVlmForCausalLM.from_pretrained(run_dir / "stage2").eval()
    inputs = dict(processor(images=[red_image], text=["<image>\nA red circle."], return_tensors="pt"))
    with torch.no_grad():
        expected = source(**inputs, output_router_logits=True)
    got = load_in_fresh_process(tmp_path, folder, inputs)
    assert got["processor"] == "MoeVlmProcessor"
    assert got["chat_template"] == processor.chat_template is not None  # the downloaded processor can chat
    torch.testing.assert_close(got["logits"], expected.logits)
    for a, b in zip(got["indices"], expected.router_indices):
        assert torch.equal(a, b)


def test_routing_stats_json(dry_run):
    stats = json.loads((dry_run[0] / "routing_stats.json").read_text())
    assert list(stats["stages"]) == ["0", "1", "2"]  # the whole chain, oldest first
    assert stats["stages"]["0"]["n_logs"] == 0 and stats["stages"]["0"]["layers"] == {}
    assert stats["stages"]["2"]["directory"] == "stage2" and stats["stages"]["2"]["last_step"] == 20
    image = stats["stages"]["2"]["layers"]["0"]["image"]
    assert image["last"]["dispatch"] == [0.5, 0.5] and image["last_step"] == 20 and image["n_logs"] == 2
    # token-weighted over the two intervals: (10 * 1.0 + 30 * 0.5) / 40, (10 * 0.3 + 30 * 0.7) / 40
    assert image["mean"]["dispatch"] == pytest.approx([0.625, 0.375])
    assert image["mean"]["entropy"] == pytest.approx(0.6)
    assert image["mean"]["tokens"] == 40
    text = stats["stages"]["2"]["layers"]["0"]["text"]
    assert text["last_step"] == 10 and text["mean"]["prob"] == pytest.approx([0.2, 0.8])
    assert set(stats["stages"]["2"]["layers"]["1"]) == {"all"}
    # a log without token counts averages its intervals equally
    assert stats["stages"]["1"]["layers"]["0"]["all"]["mean"]["prob"] == pytest.approx([0.7, 0.3])


def test_stage_chain_follows_relative_from_outside_the_training_cwd(tmp_path, monkeypatch):
    # `moe-vlm train --from runs/s1` run in tmp_path records the relative path; publish runs elsewhere.
    _write_marker(tmp_path / "runs" / "s1", stage="1", **{"from": None})
    _write_marker(tmp_path / "runs" / "s2", stage="2", **{"from": "runs/s1"})
    _write_marker(
        tmp_path / "runs" / "s3", stage="3", **{"from": "runs/gone"}
    )  # deleted since: the chain stops
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    chain = hub_stats.stage_chain(tmp_path / "runs" / "s2")
    assert [m["stage"] for _, m in chain] == ["1", "2"]
    assert [m["stage"] for _, m in hub_stats.stage_chain(tmp_path / "runs" / "s3")] == ["3"]


def test_malformed_routing_log_names_file_and_line(tmp_path):
    path = tmp_path / hub_stats.ROUTING_LOG
    path.write_text(json.dumps(STAGE2_LINES[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"routing_stats.jsonl:2"):
        hub_stats.read_routing_log(path)
    path.write_text(json.dumps({"step": 1, "layers": {"0": {"image": {"dispatch": [1.0, 0.0]}}}}) + "\n")
    with pytest.raises(ValueError, match=r":1: layer 0 modality 'image'.*missing \['prob', 'entropy'\]"):
        hub_stats.read_routing_log(path)


def test_file_names_agree_with_the_writers():
    from configuration import contract
    from hub import publish

    assert hub_stats.COMPLETION_MARKER == contract.COMPLETION_MARKER
    assert hub_stats.ROUTING_LOG == contract.ROUTING_LOG_FILE
    assert publish.RECIPE_FILE == contract.RECIPE_FILE
    assert publish.ROUTING_STATS_FILE == contract.ROUTING_SUMMARY_FILE


# ----- the card ----------------------------------------------------------------------------------------------------
def test_card_parses_with_its_metadata(dry_run):
    card = ModelCard.load(dry_run[0] / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert data.base_model == ["mistralai/Mistral-7B-v0.3", "timm/vit_large_patch14_clip_224.openai"]
    assert data.datasets == [
        "liuhaotian/LLaVA-Instruct-150K"
    ]  # Stage 1's llava; the Shapes world has no Hub id
    assert {"custom_code", "mixture-of-experts", "stage-2"} <= set(data.tags)
    metrics = {r.metric_type: r.metric_value for r in data.eval_results}
    assert metrics == {
        "bleu": 20.0,
        "meteor": 25.0,
        "rouge": 50.0,
        "cider": 76.2,
        "binomial_k": 6,  # the last layer's test
        "p_value": 8.52e-5,
        "collapsed_layers": 1,
        "collapsed_layers_soft": 0,
        "crossover_loss_increase": 12.5,
    }
    names = {r.metric_type: r.metric_name for r in data.eval_results}
    assert (
        names["collapsed_layers"]
        == "collapsed layers of 2 (hard: one expert takes ≥ 99% of all tokens' top-1 dispatch)"
    )
    assert names["collapsed_layers_soft"] == (
        "collapsed layers of 2 (soft: one expert's mean router probability over all tokens is ≥ 90%)"
    )
    model_index = data.to_dict()["model-index"]
    assert eval_results_to_model_index(*model_index_to_eval_results(model_index)) == model_index
    assert model_index[0]["name"] == "tiny-moe-vlm"
    text = card.text
    assert f'from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert "Stage 2 (experts, hard routing)" in text and "open_clip_torch" in text
    for figure in ("figures/expert_load.png", "figures/routing_stage2.png"):
        assert f"]({figure})" in text
    assert "| 0 | 0.5 | 0.5 | 0 | 1 | 0.45 |" in text  # layer 0's last logged load
    assert "This checkpoint: hard 1/2 (layers [1]), soft 0/2." in text  # collapse under both definitions


def test_card_captions_the_routing_dynamics_figure_and_reads_the_thresholds():
    from hub.card import build_card

    load = {"n_layers": 4, "n_collapsed": 3, "collapsed_layers": [0, 1, 3], "n_collapsed_soft": 1,
            "collapsed_layers_soft": [3], "collapse_threshold": 0.95, "soft_collapse_threshold": 0.8}  # fmt: skip
    card = build_card(
        REPO_ID,
        markers=[{"stage": "3", "name": "unified fine-tuning"}],
        config={"num_hidden_layers": 4},
        routing={},
        analysis={"load": load},
        figures=["figures/routing_dynamics.png", "figures/expert_load.png"],
    )
    text = card.text
    assert "![routing_dynamics](figures/routing_dynamics.png)\n\n*Routing over the training steps" in text
    assert "dashed: a fixed held-out probe routed in eval mode" in text
    assert "![expert_load](figures/expert_load.png)\n\n*" not in text  # its name says what it is
    assert "≥ 95% of all tokens' top-1 dispatch" in text and "is ≥ 80%" in text
    assert "This checkpoint: hard 3/4 (layers [0, 1, 3]), soft 1/4 (layers [3])." in text
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {"collapsed_layers": 3, "collapsed_layers_soft": 1}


# ----- a mock Hub: huggingface_hub's own client, answered offline ----------------------------------------------------
class MockHub:
    """Answers the Hub API calls of create_repo + create_commit (LFS storage included) for one repository, a model
    (`/api/models/{repo}/...`) or a Space (`repo_type="space"`: `/api/spaces/{repo}/...`); records every request;
    anything else is answered 404 and recorded as unexpected. `fail_commit` makes the commit endpoint fail."""

    def __init__(self, fail_commit: bool = False, repo_id: str = REPO_ID, repo_type: str = "model"):
        self.fail_commit = fail_commit
        self.repo_id, self.repo_type = repo_id, repo_type
        self.calls: list[str] = []
        self.unexpected: list[str] = []
        self.auth: set[str] = set()
        self.created: dict = {}
        self.storage: dict[str, bytes] = {}
        self.commit: list[dict] = []

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path, method = request.url.path, request.method
        self.calls.append(f"{method} {path}")
        if request.url.host != "storage.mock":
            self.auth.add(request.headers.get("authorization", ""))
        repo_id, prefix = self.repo_id, "spaces/" if self.repo_type == "space" else ""
        api = f"/api/{self.repo_type}s/{repo_id}"
        if (method, path) == ("POST", "/api/repos/create"):
            self.created = json.loads(request.content)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{prefix}{repo_id}"})
        if (method, path) == ("POST", "/api/validate-yaml"):
            body = json.loads(request.content)
            validate = validate_space_metadata if body.get("repoType") == "space" else validate_card_metadata
            problem = validate(body["content"])
            return httpx2.Response(400, text=problem) if problem else httpx2.Response(200, json={})
        if (method, path) == ("POST", f"{api}/preupload/main"):
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".png"))
                      else "regular", "shouldIgnore": False} for f in files]  # fmt: skip
            return httpx2.Response(200, json={"files": modes})
        if (method, path) == ("POST", f"/{prefix}{repo_id}.git/info/lfs/objects/batch"):
            objects = json.loads(request.content)["objects"]
            actions = [
                {**o, "actions": {"upload": {"href": f"https://storage.mock/{o['oid']}"}}} for o in objects
            ]
            return httpx2.Response(200, json={"transfer": "basic", "objects": actions})
        if method == "PUT" and request.url.host == "storage.mock":
            self.storage[path.strip("/")] = request.read()
            return httpx2.Response(200)
        if (method, path) == ("POST", f"{api}/commit/main"):
            self.commit = [json.loads(line) for line in request.content.splitlines() if line.strip()]
            if self.fail_commit:
                return httpx2.Response(
                    500, json={"error": "Internal Error - the commit could not be created"}
                )
            return httpx2.Response(
                200,
                json={
                    "commitUrl": f"https://huggingface.co/{prefix}{repo_id}/commit/{'a' * 40}",
                    "commitOid": "a" * 40,
                },
            )
        self.unexpected.append(f"{method} {request.url}")
        return httpx2.Response(404, json={"error": "not mocked"})

    def committed(self) -> dict[str, dict]:
        return {item["value"]["path"]: item for item in self.commit if item["key"] in ("file", "lfsFile")}


def validate_card_metadata(content: str) -> str | None:
    """The checks a Hub would make of a model card's YAML, offline: huggingface_hub parses it (model-index into
    EvalResults, which raises on a malformed one), the required keys are there, every model-index result has a task
    type, a dataset type and name, and numeric metric values. Returns the problem, or None."""
    try:
        data = ModelCard(content).data.to_dict()
    except ValueError as error:
        return f"metadata does not parse: {error}"
    for key in ("library_name", "pipeline_tag", "license"):
        if not isinstance(data.get(key), str):
            return f'"{key}" must be a string'
    for entry in data.get("model-index", []):
        for result in entry.get("results", []):
            if "type" not in result.get("task", {}) or not {"type", "name"} <= set(result.get("dataset", {})):
                return "model-index: each result needs task.type, dataset.type and dataset.name"
            for metric in result.get("metrics", []):
                if "type" not in metric or not isinstance(metric.get("value"), (int, float)):
                    return f"model-index: metric {metric} needs a type and a numeric value"
    return None


def validate_space_metadata(content: str) -> str | None:
    """What a Hub checks of a Space card's YAML, offline: huggingface_hub's SpaceCard parses it, the SDK is one the
    Hub knows, the app file and every linked model are named. Returns the problem, or None."""
    from huggingface_hub import SpaceCard, constants

    try:
        data = SpaceCard(content).data
    except ValueError as error:
        return f"metadata does not parse: {error}"
    if data.sdk not in constants.SPACES_SDK_TYPES:
        return f'"sdk" must be one of {constants.SPACES_SDK_TYPES}'
    if not data.app_file or not all(isinstance(m, str) and m.count("/") == 1 for m in data.models or []):
        return '"app_file" and every "models" entry (USER/NAME) are needed'
    return None


# huggingface_hub's own LFS upload passes `data=` to httpx2, which warns; not this project's code.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


# Every logger the publish path writes through (transformers' does not propagate to the root logger).
LOGGERS = ("", "huggingface_hub", "transformers", "moe_vlm", "httpx", "httpx2", "httpcore")


@pytest.fixture
def mock_hub(monkeypatch, tmp_path, caplog):
    """Routes huggingface_hub's HTTP client to a MockHub; HF_TOKEN set; Xet off so large files take the LFS path,
    whose storage requests go through the same client (hf_xet's own Rust client cannot be mocked). Every log record
    of `LOGGERS`, at DEBUG, lands in `hub.log` (the token must not be in it either); `hub.root` is the test's folder,
    everything under which the token must be absent from."""
    hub = MockHub()
    hub.log, hub.root = caplog, tmp_path
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handle)))
    levels = {}
    for name in LOGGERS:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(logging.DEBUG)
        if name:
            logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    yield hub
    for name in LOGGERS:
        logging.getLogger(name).setLevel(levels[name])
        if name:
            logging.getLogger(name).removeHandler(caplog.handler)
    huggingface_hub.set_client_factory(default_client_factory)
    huggingface_hub.close_session()


def test_card_validates_through_the_hub_api(dry_run, mock_hub):
    card = ModelCard.load(dry_run[0] / "README.md")
    card.validate()  # POST /api/validate-yaml, answered by validate_card_metadata
    assert mock_hub.calls == ["POST /api/validate-yaml"]
    broken = ModelCard(str(card).replace("value: 76.2", "value: lots"))
    with pytest.raises(ValueError, match="numeric value"):
        broken.validate()


def _token_absent(*texts: str, hub: MockHub) -> None:
    """The token is in none of `texts` (the command's stdout and stderr), none of the log records written while it
    ran, and no file under the test's folder (the staged folder and anything else the command wrote there)."""
    assert hub.log.records, "no log record was captured: the check of the logs would see nothing"
    for text in (*texts, hub.log.text, *(str(r.args) for r in hub.log.records)):
        assert TOKEN not in text
    for name in listed_files(hub.root):
        assert TOKEN.encode() not in (hub.root / name).read_bytes(), name


def test_upload_commits_exactly_the_dry_run_files(run_dir, dry_run, mock_hub, tmp_path):
    folder = tmp_path / "staged"
    code, out, err = _cli(
        "--model", str(run_dir / "stage2"), "--repo-id", REPO_ID, "--private", "--out", str(folder)
    )
    assert code == 0, err
    assert mock_hub.unexpected == []
    assert mock_hub.calls[:3] == [
        "POST /api/repos/create",
        "POST /api/validate-yaml",  # the card is checked before any byte moves
        f"POST /api/models/{REPO_ID}/preupload/main",
    ]
    assert mock_hub.calls[-1] == f"POST /api/models/{REPO_ID}/commit/main"
    assert sum(call.endswith("/commit/main") for call in mock_hub.calls) == 1  # one commit
    assert mock_hub.created == {
        "name": "tiny-moe-vlm",
        "organization": "someone",
        "visibility": "private",
        "type": "model",
    }
    assert mock_hub.auth == {f"Bearer {TOKEN}"}  # the token was used, on every Hub call
    assert f"https://huggingface.co/{REPO_ID}/commit/" in out

    dry_folder = dry_run[0]
    committed = mock_hub.committed()
    assert set(committed) == set(listed_files(dry_folder))  # the same files as the dry run
    assert committed["chat_template.jinja"]["key"] == "file"  # a small text file, committed inline
    digests = _digests(dry_folder)
    for name, item in committed.items():
        if item["key"] == "file":
            assert hashlib.sha256(base64.b64decode(item["value"]["content"])).hexdigest() == digests[name], (
                name
            )
        else:  # LFS: the commit names the object, the bytes went to storage
            assert item["value"]["oid"] == digests[name], name
            assert hashlib.sha256(mock_hub.storage[digests[name]]).hexdigest() == digests[name], name
    assert {n for n, i in committed.items() if i["key"] == "lfsFile"} == {
        n for n in digests if n.endswith((".safetensors", ".png"))
    }
    _token_absent(out, err, hub=mock_hub)


def test_failed_commit_says_what_was_uploaded_and_keeps_the_folder(run_dir, mock_hub, tmp_path):
    mock_hub.fail_commit = True
    folder = tmp_path / "staged"
    argv = ["--model", str(run_dir / "stage2"), "--repo-id", REPO_ID, "--out", str(folder)]
    code, out, err = _cli(*argv)
    assert code == 2 and "Traceback" not in err
    assert "failed while uploading and committing the files" in err and "500" in err
    assert "the commit could not be created" in err  # what the Hub said
    assert "Committed: none" in err
    uploaded = next(line for line in err.splitlines() if line.startswith("Uploaded to the Hub's storage"))
    not_uploaded = next(line for line in err.splitlines() if line.startswith("Not uploaded"))
    lfs = sorted(n for n in EXPECTED_FILES if n.endswith((".safetensors", ".png")))
    assert f"({len(lfs)}): {', '.join(lfs)}." in uploaded
    assert (
        all(name in not_uploaded for name in EXPECTED_FILES - set(lfs))
        and "model.safetensors" not in not_uploaded
    )
    assert f"The staged folder is intact: {folder}" in err
    assert set(listed_files(folder)) == EXPECTED_FILES
    assert _digests(folder)["model.safetensors"] == _digests(run_dir / "dry")["model.safetensors"]
    _token_absent(out, err, hub=mock_hub)


# ----- refusals ----------------------------------------------------------------------------------------------------
def test_refusals_are_one_clear_line(run_dir, tmp_path, monkeypatch):
    stage2 = run_dir / "stage2"
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"model_type": "moe_vlm"}))
    code, _, err = _cli("--model", str(unfinished), "--repo-id", REPO_ID, "--dry-run")
    assert code == 2 and "moe_vlm_stage.json" in err and "Traceback" not in err

    no_auto_map = tmp_path / "no_auto_map"
    _write_marker(no_auto_map, stage="2")
    (no_auto_map / "config.json").write_text(json.dumps({"model_type": "moe_vlm"}))
    code, _, err = _cli("--model", str(no_auto_map), "--repo-id", REPO_ID, "--dry-run")
    assert code == 2 and "auto_map" in err

    no_code = tmp_path / "no_code"
    _write_marker(no_code, stage="2")
    (no_code / "config.json").write_text((stage2 / "config.json").read_text())
    code, _, err = _cli("--model", str(no_code), "--repo-id", REPO_ID, "--dry-run")
    assert code == 2 and "lacks modeling_moe_vlm.py" in err

    code, _, err = _cli("--model", str(stage2), "--repo-id", "just-a-name", "--dry-run")
    assert code == 2 and "USER/NAME" in err

    code, _, err = _cli(
        "--model", str(stage2), "--repo-id", REPO_ID, "--dry-run", "--out", str(run_dir / "dry")
    )
    assert code == 2 and "not empty" in err

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    code, _, err = _cli("--model", str(stage2), "--repo-id", REPO_ID, "--out", str(tmp_path / "never"))
    assert code == 2 and "no Hugging Face token" in err
    assert not (tmp_path / "never").exists()  # refused before staging anything


# ----- the Space: `moe-vlm publish --space USER/NAME --model USER/MODEL` -------------------------------------------
SPACE_ID = "someone/moe-vlm-routing"
SPACE_DIR = Path(__file__).resolve().parents[1] / "space"
SPACE_FILES = {
    "README.md", "app.py", "input_checks.py", "model_source.py", "requirements.txt", "routing_view.py", "serving.py",
    "shapes_examples.py", "examples/blue_square_yellow_triangle.png", "examples/green_star.png",
    "examples/pink_heart_cyan_diamond.png", "examples/red_circle.png",
}  # fmt: skip


def _space_cli(*argv: str) -> tuple[int, str, str]:
    return _cli("--space", SPACE_ID, "--model", REPO_ID, *argv)


@pytest.fixture(scope="module")
def space_dry_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("space") / "dry"
    code, out, err = _space_cli("--dry-run", "--out", str(folder))
    assert code == 0, err
    return folder, out


def test_space_dry_run_stages_the_app_pointed_at_the_model(space_dry_run):
    from huggingface_hub import SpaceCard

    folder, out = space_dry_run
    assert set(listed_files(folder)) == SPACE_FILES  # not the package marker, not `moe-vlm demo`, no caches
    assert "dry run" in out and f"the Space {SPACE_ID}" in out and all(name in out for name in SPACE_FILES)
    for name in SPACE_FILES - {"README.md"}:  # the app as the repository has it
        assert (folder / name).read_bytes() == (SPACE_DIR / name).read_bytes(), name
    staged, source = SpaceCard.load(folder / "README.md"), SpaceCard.load(SPACE_DIR / "README.md")
    assert staged.data.models == [REPO_ID]  # where the app and the Hub learn the model
    assert validate_space_metadata(str(staged)) is None
    assert staged.text == source.text
    assert {k: v for k, v in staged.data.to_dict().items() if k != "models"} == source.data.to_dict()


def test_staged_space_app_chooses_the_model_its_card_names(space_dry_run, tmp_path):
    """The staged folder alone (as the Space runs it, no project importable): the app's model choice is the card's."""
    folder, _ = space_dry_run
    script = (
        "import json, model_source; c = model_source.choose_model(); "
        "print(json.dumps([c.source, c.origin, c.untrained]))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MODEL_ID")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == [REPO_ID, "Hub, the Space card's models:", False]


def test_space_upload_commits_exactly_the_dry_run_files(space_dry_run, mock_hub, tmp_path):
    mock_hub.repo_id, mock_hub.repo_type = SPACE_ID, "space"
    folder = tmp_path / "staged"
    code, out, err = _space_cli("--out", str(folder))
    assert code == 0, err
    assert mock_hub.unexpected == []
    assert mock_hub.calls[:3] == [
        "POST /api/repos/create",
        "POST /api/validate-yaml",  # the Space card is checked before any byte moves
        f"POST /api/spaces/{SPACE_ID}/preupload/main",
    ]
    assert mock_hub.calls[-1] == f"POST /api/spaces/{SPACE_ID}/commit/main"
    assert sum(call.endswith("/commit/main") for call in mock_hub.calls) == 1  # one commit
    assert mock_hub.created == {  # no --private: the account's default visibility
        "name": "moe-vlm-routing",
        "organization": "someone",
        "type": "space",
        "sdk": "gradio",
    }
    assert mock_hub.auth == {f"Bearer {TOKEN}"}
    assert f"https://huggingface.co/spaces/{SPACE_ID}/commit/" in out

    dry_folder = space_dry_run[0]
    committed = mock_hub.committed()
    assert set(committed) == set(listed_files(dry_folder)) == SPACE_FILES
    digests = _digests(dry_folder)
    for name, item in committed.items():
        if item["key"] == "file":
            content = base64.b64decode(item["value"]["content"])
            assert hashlib.sha256(content).hexdigest() == digests[name], name
        else:  # the example PNGs went through LFS storage
            assert item["value"]["oid"] == digests[name], name
            assert hashlib.sha256(mock_hub.storage[digests[name]]).hexdigest() == digests[name], name
    assert {n for n, i in committed.items() if i["key"] == "lfsFile"} == {
        n for n in digests if n.endswith(".png")
    }
    _token_absent(out, err, hub=mock_hub)


def test_space_failed_commit_says_what_was_uploaded_and_keeps_the_folder(mock_hub, tmp_path):
    mock_hub.repo_id, mock_hub.repo_type, mock_hub.fail_commit = SPACE_ID, "space", True
    folder = tmp_path / "staged"
    code, out, err = _space_cli("--private", "--out", str(folder))
    assert code == 2 and "Traceback" not in err
    assert mock_hub.created["visibility"] == "private"
    assert f"upload to {SPACE_ID} failed while uploading and committing the files" in err and "500" in err
    assert "the commit could not be created" in err and "Committed: none" in err
    pngs = sorted(n for n in SPACE_FILES if n.endswith(".png"))
    uploaded = next(line for line in err.splitlines() if line.startswith("Uploaded to the Hub's storage"))
    not_uploaded = next(line for line in err.splitlines() if line.startswith("Not uploaded"))
    assert f"({len(pngs)}): {', '.join(pngs)}." in uploaded
    assert all(name in not_uploaded for name in SPACE_FILES - set(pngs))
    assert f"The staged folder is intact: {folder}" in err and set(listed_files(folder)) == SPACE_FILES
    _token_absent(out, err, hub=mock_hub)


def test_space_refusals_are_one_clear_line(run_dir, tmp_path):
    stage2 = str(run_dir / "stage2")
    code, _, err = _cli("--space", SPACE_ID, "--model", stage2, "--dry-run")  # a local directory
    assert code == 2 and "Hub id of a published model" in err and f"--model {stage2} --repo-id" in err
    code, _, err = _space_cli("--repo-id", REPO_ID, "--dry-run")
    assert code == 2 and "--repo-id names a model repository" in err
    code, _, err = _space_cli("--analysis", str(tmp_path), "--dry-run")
    assert code == 2 and "--analysis" in err and "Traceback" not in err
    code, _, err = _cli("--space", "just-a-name", "--model", REPO_ID, "--dry-run")
    assert code == 2 and "--space 'just-a-name' must be USER/NAME" in err
    code, _, err = _cli("--model", stage2, "--dry-run")  # the model upload still needs its repo id
    assert code == 2 and "--repo-id USER/NAME is required" in err
