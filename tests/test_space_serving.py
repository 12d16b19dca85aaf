"""The Space as a served process: bound to 127.0.0.1 unless told otherwise, uploads capped, a checkpoint holding a
pickle refused unless allowed, and no token in anything it produces.

`launch_space` (test_space_load uses it too) runs a copy of `space/` the way a Hub Space runs it (`python app.py`,
nothing of the project on the path) in a sandbox that holds every place it can write: its home, temporary,
Gradio and Hugging Face cache directories, and its stdout and stderr; `HF_TOKEN` is a fake token unique to the run,
so `assert_no_token` can grep everything the process produced for it.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import test_space
import torch

from space import model_source
from space.input_checks import MAX_UPLOAD_BYTES

model_dir = test_space.model_dir  # the saved tiny Stage-3 model, test_space's module fixture
RED_CIRCLE = test_space.RED_CIRCLE
FAKE_TOKEN = f"hf_{uuid.uuid4().hex}"  # unique to this run: found anywhere, the Space put it there
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
START_TIMEOUT_S = 240  # two shared cores: importing torch, transformers and Gradio, then loading the model
SANDBOX_PLACES = ("home", "tmp", "cache", "gradio", "hf_home", "hf_modules", "mpl")


def sandbox_env(sandbox: Path, token: str = FAKE_TOKEN, **extra: str) -> dict:
    """The environment of a Space process: every writable place under `sandbox`, offline, the token variables set
    to `token`, no project on `PYTHONPATH` and no Gradio address or port (so the Space's defaults apply)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT")
    }
    places = {name: sandbox / name for name in SANDBOX_PLACES}
    for place in places.values():
        place.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(places["home"]),
        TMPDIR=str(places["tmp"]),
        XDG_CACHE_HOME=str(places["cache"]),
        GRADIO_TEMP_DIR=str(places["gradio"]),
        HF_HOME=str(places["hf_home"]),
        HF_MODULES_CACHE=str(places["hf_modules"]),
        MPLCONFIGDIR=str(places["mpl"]),
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        PYTHONUNBUFFERED="1",
        **dict.fromkeys(TOKEN_VARIABLES, token),
    )
    env.update(extra)
    return env


def deploy(sandbox: Path) -> Path:
    """A copy of `space/` as a Hub Space holds it, inside `sandbox` (files it writes beside app.py are grepped)."""
    deployed = sandbox / "space"
    if not deployed.exists():
        shutil.copytree(test_space.SPACE_DIR, deployed, ignore=shutil.ignore_patterns("__pycache__"))
    return deployed


@dataclass
class SpaceProcess:
    """A running `python app.py` and where it writes; `stop()` ends it (once; later calls do nothing)."""

    process: subprocess.Popen
    url: str
    port: int
    sandbox: Path

    def log(self) -> str:
        return "".join(
            (self.sandbox / name).read_text(errors="replace") for name in ("stdout.txt", "stderr.txt")
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def launch_space(sandbox: Path, model: Path, *args: str, **env: str) -> SpaceProcess:
    """Start `python app.py --model MODEL --port FREE ARGS` in `sandbox` and wait until it answers HTTP."""
    port = test_space.free_port()
    with open(sandbox / "stdout.txt", "wb") as stdout, open(sandbox / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--model", str(model), "--port", str(port), *args],
            cwd=deploy(sandbox),
            env=sandbox_env(sandbox, **env),
            stdout=stdout,
            stderr=stderr,
        )
    space = SpaceProcess(process, f"http://127.0.0.1:{port}/", port, sandbox)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not space.alive():
            raise AssertionError(f"the Space exited with {process.returncode}:\n{space.log()[-3000:]}")
        try:
            if httpx.get(space.url, timeout=5).status_code == 200:
                return space
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    space.stop()
    raise AssertionError(f"the Space did not answer within {START_TIMEOUT_S} s:\n{space.log()[-3000:]}")


def assert_no_token(*roots: Path, texts: tuple[str, ...] = (), token: str = FAKE_TOKEN) -> int:
    """Fail when `token` occurs in any file under `roots` (bytes, so binary files count) or in `texts`; returns how
    many files were read (a grep of nothing proves nothing)."""
    needle = token.encode()
    files = [path for root in roots for path in Path(root).rglob("*") if path.is_file()]
    holding = [str(path) for path in files if needle in path.read_bytes()]
    holding += [f"text #{i}" for i, text in enumerate(texts) if token in text]
    assert not holding, f"the token appears in {holding}"
    return len(files)


def listening_addresses(port: int) -> set[str]:
    """The addresses a socket on this machine listens on at TCP `port`, from the kernel's own table
    (/proc/net/tcp and tcp6: state 0A is LISTEN; each 32-bit word of the address in host byte order)."""
    found = set()
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if fields[3] != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(raw)))
    return found


@pytest.fixture(scope="module")
def space(model_dir, tmp_path_factory):
    """The deployed Space on a free port with its defaults (no --host), a fake token in its environment."""
    served = launch_space(tmp_path_factory.mktemp("space_sandbox"), model_dir)
    try:
        yield served
    finally:
        served.stop()


# ----- where it listens -----------------------------------------------------------------------------------------------
def test_launch_options_serve_on_loopback_unless_told_otherwise(monkeypatch):
    from space.serving import exposure_warning, launch_options

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert launch_options() == {
        "server_name": "127.0.0.1",
        "server_port": None,
        "max_file_size": MAX_UPLOAD_BYTES,
    }
    assert launch_options("0.0.0.0", 8000)["server_name"] == "0.0.0.0"  # --host, said explicitly
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # what a Hub Space sets
    assert launch_options()["server_name"] == "0.0.0.0"
    assert launch_options("127.0.0.1")["server_name"] == "127.0.0.1"  # --host wins over the variable
    assert all(exposure_warning(host) is None for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        assert "reachable from other machines" in exposure_warning(host)


def test_demo_command_serves_on_loopback_with_the_upload_limit(monkeypatch, capsys):
    """`moe-vlm demo` hands `demo.launch` 127.0.0.1 and the upload limit unless --host says otherwise (the launch
    itself is recorded, not run: the real one blocks; the served test below checks a real socket)."""
    import moe_vlm_cli
    import space.app

    calls = []

    class RecordedDemo:
        def launch(self, **options):
            calls.append(options)

    def build_demo(model, allow_pickle):
        calls.append((model, allow_pickle))
        return RecordedDemo()

    monkeypatch.setattr(space.app, "build_demo", build_demo)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert moe_vlm_cli.main(["demo", "--model", "some/dir", "--port", "7999"]) == 0
    assert calls == [
        ("some/dir", None),
        {"server_name": "127.0.0.1", "server_port": 7999, "max_file_size": MAX_UPLOAD_BYTES},
    ]
    assert "reachable" not in capsys.readouterr().out
    calls.clear()
    assert moe_vlm_cli.main(["demo", "--model", "d", "--host", "0.0.0.0", "--allow-pickle"]) == 0
    assert calls == [
        ("d", True),
        {"server_name": "0.0.0.0", "server_port": 7860, "max_file_size": MAX_UPLOAD_BYTES},
    ]
    assert "serving on 0.0.0.0: the app is reachable from other machines" in capsys.readouterr().out


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the kernel's socket table (Linux)")
def test_the_deployed_space_listens_on_loopback_only(space):
    assert listening_addresses(space.port) == {"127.0.0.1"}
    assert "reachable from other machines" not in space.log()


# ----- upload size --------------------------------------------------------------------------------------------------------
def test_an_upload_above_the_limit_is_refused_with_its_size(space, tmp_path):
    from gradio_client import Client, handle_file

    big = tmp_path / "big.png"
    with open(big, "wb") as file:  # MAX_UPLOAD_BYTES + 1 bytes of zeros (sparse: no disk written)
        file.truncate(MAX_UPLOAD_BYTES + 1)
    client = Client(space.url, verbose=False, download_files=str(tmp_path / "downloads"))
    with pytest.raises(
        ValueError, match=f"big.png exceeds the maximum file size of {MAX_UPLOAD_BYTES} bytes"
    ):
        client.predict(handle_file(str(big)), "Describe the image.", "hard", 1, api_name="/run")
    # The server refuses it as well, for a client that does not check first (it stops reading at the limit).
    with open(big, "rb") as file:
        response = httpx.post(f"{space.url}gradio_api/upload", files={"files": ("big.png", file)}, timeout=60)
    assert response.status_code == 413
    assert f"maximum allowed size of {MAX_UPLOAD_BYTES} bytes" in response.text
    answer, *_ = client.predict(
        handle_file(str(RED_CIRCLE)), "Describe the image.", "hard", 1, api_name="/run"
    )
    assert answer  # still serving


def test_a_cut_short_weights_file_is_a_one_line_error(model_dir, tmp_path):
    from space import app

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(model_dir, checkpoint)
    (checkpoint / "model.safetensors").write_bytes(b"")  # an interrupted download or copy
    with pytest.raises(FileNotFoundError, match=r"could not load the model .*checkpoint"):
        app.RoutingDemo(model_source.choose_model(str(checkpoint)))


# ----- pickled checkpoints ----------------------------------------------------------------------------------------------
def test_a_checkpoint_holding_a_pickle_is_refused_unless_allowed(model_dir, tmp_path, monkeypatch):
    from space import app

    monkeypatch.delenv(model_source.ALLOW_PICKLE_ENV, raising=False)
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(model_dir, checkpoint)
    (checkpoint / "training_args.bin").write_bytes(b"")  # the Trainer's arguments: never opened by the loader
    choice = model_source.choose_model(str(checkpoint))
    assert app.RoutingDemo(choice).native_mode == "gumbel"
    for suffix in (".bin", ".pt", ".pth", ".ckpt"):
        (checkpoint / f"weights{suffix}").write_bytes(b"")
        assert model_source.pickle_files(checkpoint) == [f"weights{suffix}"]
        (checkpoint / f"weights{suffix}").unlink()

    # Weights as a pickle only (what torch.save / an old save_pretrained wrote): refused, loaded when allowed.
    model = app.AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    torch.save(model.state_dict(), checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(model_source.PickleRefused) as refused:
        app.RoutingDemo(choice)
    message = str(refused.value)
    assert "holds pickled files (pytorch_model.bin)" in message and "training_args" not in message
    assert "--allow-pickle" in message and "ALLOW_PICKLE_WEIGHTS=1" in message
    with pytest.raises(model_source.PickleRefused):
        app.build_demo(str(checkpoint))
    loaded = app.RoutingDemo(choice, allow_pickle=True).model
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)  # read from the pickle, as asked
    monkeypatch.setenv(model_source.ALLOW_PICKLE_ENV, "1")
    assert app.RoutingDemo(choice).native_mode == "gumbel"
    monkeypatch.setenv(model_source.ALLOW_PICKLE_ENV, "perhaps")
    with pytest.raises(ValueError, match="ALLOW_PICKLE_WEIGHTS='perhaps'"):
        app.RoutingDemo(choice)

    # What a Hub id relies on (its files are not listed): the loader itself reads safetensors only.
    monkeypatch.delenv(model_source.ALLOW_PICKLE_ENV)
    monkeypatch.setattr(app, "refuse_pickles", lambda choice, allow: None)
    with pytest.raises(FileNotFoundError, match="reads safetensors weights only: see --allow-pickle"):
        app.RoutingDemo(choice)


# ----- the token ------------------------------------------------------------------------------------------------------------
def test_no_token_in_anything_the_space_produces(space, model_dir, tmp_path):
    """The served Space answers good and bad requests with `HF_TOKEN` set; then it is stopped and its stdout, its
    stderr, every file in its sandbox and what its clients received are grepped for the token. (Stops the module's
    Space: the last test here.) Two failing starts, a missing model and a pickled one, are grepped as well."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    (tmp_path / "notes.txt").write_text("not an image")
    client = Client(space.url, verbose=False, download_files=str(tmp_path / "downloads"))
    received = [client.view_api(print_info=False, return_format="str")]
    for image, prompt in (
        (RED_CIRCLE, "Describe the image."),
        (tmp_path / "notes.txt", "Describe the image."),
        (RED_CIRCLE, "   "),
        (None, "What is it?"),
    ):
        try:
            outputs = client.predict(image and handle_file(str(image)), prompt, "softmax", 1, api_name="/run")
            received.append(repr(outputs))
        except AppError as error:
            received.append(str(error))
    assert any("not an image" in text for text in received) and len(received) == 5
    received.append(httpx.get(space.url, timeout=30).text)  # the page itself
    space.stop()
    assert FAKE_TOKEN not in space.log()
    assert assert_no_token(space.sandbox, model_dir, tmp_path / "downloads", texts=tuple(received)) > 10

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "model.ckpt").write_bytes(b"")
    for model, expected in (
        (tmp_path / "missing", "does not exist"),
        (pickled, "holds pickled files (model.ckpt)"),
    ):
        sandbox = tmp_path / f"sandbox_{model.name}"
        sandbox.mkdir()
        result = subprocess.run(
            [sys.executable, "app.py", "--model", str(model)],
            cwd=deploy(sandbox),
            env=sandbox_env(sandbox),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
        assert result.returncode == 2 and result.stderr.startswith("app.py: error: "), result.stderr[-2000:]
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert_no_token(sandbox, texts=(result.stdout, result.stderr))
