"""The Space under load: 16 concurrent sessions, each its own `gradio_client.Client`, send 10 requests apiece to the
deployed Space (`python app.py` on 127.0.0.1) — good inputs and bad ones in a seeded mix. No request is lost, every
good one gets a full result, every bad one the message that says what to fix, and the process is healthy after.

Requests/s and latency percentiles are measurements, printed and written to `$MOE_VLM_BENCH_OUT/space_load.json`
(when that variable names a directory); the only time limits are generous ones that turn a hang into a failure.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import test_space
import test_space_serving
from PIL import Image

from space.input_checks import MAX_PROMPT_CHARS, MAX_UPLOAD_BYTES
from space.shapes_examples import example_inputs

model_dir = test_space.model_dir  # the saved tiny Stage-3 model, test_space's module fixture

SESSIONS = 16
REQUESTS_PER_SESSION = 10
SEED = 15
CALL_TIMEOUT_S = 180  # one request, queue wait included: only a hang gets near it
DEADLINE_S = 600  # the whole run
MODES = ("hard", "gumbel", "softmax", "inverted")
# What each bad input must be told (a regex): the input checks' messages, as a person reads them.
BAD_INPUTS = {
    "no image": "No image: upload one",
    "not an image": "notes.txt is not an image this app can read",
    "huge image": r"8000×5100 px \(40.8 MP\); images up to 40 MP are accepted",
    "file too large": f"big.png exceeds the maximum file size of {MAX_UPLOAD_BYTES} bytes",  # refused before sending
    "empty prompt": "The prompt is empty",
    "long prompt": f"The prompt is {MAX_PROMPT_CHARS + 1} characters long; keep it under {MAX_PROMPT_CHARS}",
    "too many tokens": r"The prompt is \d+ tokens with the image's placeholders; this model takes at most \d+",
}
GOOD_SHARE = 0.4  # the good ones take the time (generation, two figures): 0.4 keeps the test near a minute


def request_plan() -> list[list[str]]:
    """Each session's request kinds: half good, the rest every bad kind in turn, shuffled with `SEED`."""
    total = SESSIONS * REQUESTS_PER_SESSION
    n_good = int(total * GOOD_SHARE)
    bad = list(BAD_INPUTS)
    kinds = ["good"] * n_good + [bad[i % len(bad)] for i in range(total - n_good)]
    random.Random(SEED).shuffle(kinds)
    return [kinds[s * REQUESTS_PER_SESSION : (s + 1) * REQUESTS_PER_SESSION] for s in range(SESSIONS)]


def make_inputs(directory: Path) -> dict[str, tuple]:
    """`kind -> (image path or None, prompt)` for the bad kinds; good ones take the Space's own examples."""
    (directory / "notes.txt").write_text("not an image")
    Image.new("L", (8000, 5100), 128).save(directory / "huge.png")  # 40.8 MP in 50 kB of PNG
    with open(directory / "big.png", "wb") as file:
        file.truncate(MAX_UPLOAD_BYTES + 1)  # sparse: no disk written
    image, prompt = example_inputs()[0]
    return {
        "no image": (None, prompt),
        "not an image": (directory / "notes.txt", prompt),
        "huge image": (directory / "huge.png", prompt),
        "file too large": (directory / "big.png", prompt),
        "empty prompt": (image, "  \n "),
        "long prompt": (image, "x" * (MAX_PROMPT_CHARS + 1)),
        "too many tokens": (image, "red " * 400),  # under the character limit, over the model's positions
    }


def check_good(outputs, prompt: str) -> None:
    answer, heatmap, load, tokens = outputs
    assert isinstance(answer, str) and answer
    for path in (heatmap, load):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 400
    assert prompt in "".join(item["token"] for item in tokens)


def test_sixteen_sessions_of_ten_mixed_requests(model_dir, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    (tmp_path / "sandbox").mkdir()
    space = test_space_serving.launch_space(tmp_path / "sandbox", model_dir)
    try:
        bad_inputs = make_inputs(tmp_path)
        good_inputs = example_inputs()
        plan = request_plan()
        started: list[float] = []  # when every client had connected and the first requests went out
        start = threading.Barrier(SESSIONS, action=lambda: started.append(time.perf_counter()))
        results: list[dict] = []
        results_lock = threading.Lock()

        def session(index: int) -> None:
            client = Client(space.url, verbose=False, download_files=str(tmp_path / f"downloads{index}"))
            start.wait(timeout=CALL_TIMEOUT_S)  # every client connected: the load starts at once
            for i, kind in enumerate(plan[index]):
                if kind == "good":
                    image, prompt = good_inputs[(index + i) % len(good_inputs)]
                else:
                    image, prompt = bad_inputs[kind]
                mode = MODES[(index + i) % len(MODES)]
                began = time.perf_counter()
                record = {"session": index, "kind": kind, "prompt": prompt}
                try:
                    file = handle_file(str(image)) if image is not None else None
                    job = client.submit(file, prompt, mode, 1, api_name="/run")
                    record["outputs"] = job.result(timeout=CALL_TIMEOUT_S)
                except (AppError, ValueError) as error:
                    record["error"] = str(error)
                record["latency_s"] = time.perf_counter() - began
                with results_lock:
                    results.append(record)

        with ThreadPoolExecutor(SESSIONS) as pool:
            futures = [pool.submit(session, index) for index in range(SESSIONS)]
            done, pending = wait(futures, timeout=DEADLINE_S)
            assert not pending, f"{len(pending)} sessions still running after {DEADLINE_S} s"
            for future in done:
                future.result()  # a session that died (e.g. a timeout) fails here with its error
        wall_s = time.perf_counter() - started[0]

        assert len(results) == SESSIONS * REQUESTS_PER_SESSION  # none lost
        for record in results:
            if record["kind"] == "good":
                assert "error" not in record, record
                check_good(record["outputs"], record["prompt"])
            else:
                assert "outputs" not in record, record
                assert re.search(BAD_INPUTS[record["kind"]], record["error"]), record

        # Healthy after: alive, a good request still answered, no traceback in its log, no token anywhere.
        assert space.alive()
        image, prompt = good_inputs[0]
        check_good(
            Client(space.url, verbose=False).predict(handle_file(image), prompt, "hard", 1, api_name="/run"),
            prompt,
        )
        assert "Traceback" not in space.log(), space.log()[-3000:]
        test_space_serving.assert_no_token(space.sandbox, texts=tuple(r.get("error", "") for r in results))

        report = load_report(results, wall_s)
        print(f"\nSpace load: {json.dumps(report)}")
        out = os.environ.get("MOE_VLM_BENCH_OUT")
        path = Path(out) / "space_load.json" if out else tmp_path / "space_load.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        space.stop()


def load_report(results: list[dict], wall_s: float) -> dict:
    """Requests/s over the whole run and latency percentiles (all requests, good ones, bad ones that reached the
    server), with the conditions they were measured under."""

    def percentiles(latencies):
        return (
            {f"p{q}_s": round(float(np.percentile(latencies, q)), 3) for q in (50, 95)} if latencies else {}
        )

    good = [r["latency_s"] for r in results if r["kind"] == "good"]
    bad = [r["latency_s"] for r in results if r["kind"] not in ("good", "file too large")]
    return {
        "sessions": SESSIONS,
        "requests_per_session": REQUESTS_PER_SESSION,
        "requests": len(results),
        "good": len(good),
        "wall_s": round(wall_s, 2),
        "requests_per_s": round(len(results) / wall_s, 2),
        "latency_all": percentiles([r["latency_s"] for r in results]),
        "latency_good": percentiles(good),
        "latency_bad_served": percentiles(bad),
        "cpu_count": os.cpu_count(),
        "load_average_1min_after": round(os.getloadavg()[0], 2),  # other work on the machine shares its cores
        "model": "tiny test model (2 layers, hidden 64), 20 new tokens, CPU",
    }
