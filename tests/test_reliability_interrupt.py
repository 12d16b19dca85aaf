"""Interruption (issue 15, item 1): a stage killed with SIGKILL (the real process, at a step drawn from a seed) and
resumed with `--resume_from_checkpoint true` ends with the same weights, bit for bit, and the same routing logs (no
row duplicated, none missing) as a run never interrupted; a checkpoint is never left half-written under its final
name; `moe-vlm ablate` killed mid-way and rerun skips the complete cells and writes the same table; `moe-vlm
reproduce` killed mid-stage (its work stood in) reruns only what was unfinished and writes the same report.

The real kills run `python -m moe_vlm_cli train ...` (the code `moe-vlm train` runs) in subprocesses, one torch thread
each, so that the uninterrupted run can go alongside and both do the same arithmetic. `MOE_VLM_KILL_SEED` picks
other kill steps."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from training_helpers import make_shapes, make_stage0, quick_args, routing_lines, train, weights
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from configuration.atomic import write_atomic
from configuration.contract import CACHE_ENV, COMPLETION_MARKER, PROBE_CHOICES_FILE
from trainer.callbacks import _keep_lines_up_to
from trainer.routing_stats import read_log_lines
from trainer.stage_dirs import CHECKPOINT_STAGING

REPO = Path(__file__).resolve().parent.parent
KILL_SEED = int(os.environ.get("MOE_VLM_KILL_SEED", "15"))
STEPS = 6
STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME: written last into a checkpoint


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    return make_shapes(root / "shapes"), make_stage0(root / "stage0"), root


def stage3_args(shapes, steps: int = STEPS, **fields) -> list[str]:
    return quick_args(shapes, steps=steps, save_strategy="steps", save_steps=1, logging_steps=1, **fields)


def environment(**extra) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def start(argv: list[str], log: Path, **popen) -> subprocess.Popen:
    with log.open("w") as f:  # a file, not a pipe: a full pipe would block the child while the test polls
        return subprocess.Popen(
            argv, cwd=REPO, env=environment(), stdout=f, stderr=subprocess.STDOUT, **popen
        )


def kill_when(
    process: subprocess.Popen, ready: Callable[[], bool], log: Path, group: bool = False, timeout: float = 120
) -> None:
    """SIGKILL `process` (its whole process group with `group`) as soon as `ready()`; fails if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            _kill(process, group)
            pytest.fail(
                f"the run ended (rc {process.returncode}) before it could be killed:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.005)
    _kill(process, group)
    assert process.returncode == -signal.SIGKILL


def _kill(process: subprocess.Popen, group: bool) -> None:
    """SIGKILL `process`, or with `group` every process of its group until none is left: a child the command forks
    while the first signal is delivered (a cell worker being spawned) can miss it, and would run on as an orphan."""
    if not group:
        process.kill()
        process.wait(timeout=30)
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is empty
            break
        process.poll()  # reap the command itself, so only live members keep the group
        time.sleep(0.05)
    process.wait(timeout=30)


def finish(process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    assert process.wait(timeout=timeout) == 0, log.read_text()[-3000:]


def probe_lines(directory: Path) -> list[dict]:
    return read_log_lines(directory / PROBE_CHOICES_FILE)


def assert_every_checkpoint_is_whole(out: Path) -> None:
    checkpoints = list(out.glob("checkpoint-*"))
    assert all((c / STATE).is_file() and (c / "model.safetensors").is_file() for c in checkpoints), (
        checkpoints
    )


def test_a_stage_killed_twice_with_sigkill_resumes_to_the_same_weights_and_logs(chain, tmp_path):
    """Kill 1 right after checkpoint-K is complete (K drawn from KILL_SEED: the process is in step K+1 then);
    kill 2 during the resumed run's next save (its checkpoint half-written in the staging folder); then resume to
    the end. Compared with an uninterrupted run of the same command that runs alongside."""
    shapes, stage0, root = chain
    k = random.Random(KILL_SEED).randint(2, 4)
    whole, out = root / "sigkill-whole", root / "sigkill"

    def command(directory, *extra):
        return [sys.executable, "-m", "moe_vlm_cli", "train", "--stage", "3", "--out", str(directory)] + [
            "--from",
            str(stage0),
            *stage3_args(shapes),
            *extra,
        ]

    resume = ("--resume_from_checkpoint", "true")
    started = time.monotonic()
    uninterrupted = start(command(whole), tmp_path / "whole.log")
    first = start(command(out), tmp_path / "first.log")
    kill_when(first, lambda: (out / f"checkpoint-{k}" / STATE).is_file(), tmp_path / "first.log")
    assert not (out / COMPLETION_MARKER).exists()
    assert_every_checkpoint_is_whole(out)
    logged_before_resume = [r["step"] for r in read_log_lines(out / "routing_stats.jsonl")]
    assert logged_before_resume[:k] == list(range(1, k + 1))

    second = start(command(out, *resume), tmp_path / "second.log")
    staging = out / CHECKPOINT_STAGING

    def saving() -> (
        bool
    ):  # a checkpoint is being written: in the staging folder (or, were saves not atomic, in place)
        in_place = [c for c in out.glob("checkpoint-*") if not (c / STATE).is_file()]
        return any(staging.glob("checkpoint-*/*")) or bool(in_place)

    kill_when(second, saving, tmp_path / "second.log")
    assert_every_checkpoint_is_whole(out)  # the checkpoint being saved is only in the staging folder
    half_written = [p.name for p in staging.glob("checkpoint-*")]
    assert half_written and all(not (staging / name / STATE).is_file() for name in half_written)
    resumed_from = get_last_checkpoint(str(out))
    assert resumed_from is not None and Path(resumed_from).name not in half_written

    third = start(command(out, *resume), tmp_path / "third.log")
    finish(third, tmp_path / "third.log")
    finish(uninterrupted, tmp_path / "whole.log")
    seconds = time.monotonic() - started

    a, b = weights(whole), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert [r["step"] for r in routing_lines(out)] == list(range(1, STEPS + 1))
    assert routing_lines(out) == routing_lines(whole)
    assert [r["step"] for r in probe_lines(out)] == list(range(0, STEPS + 1))
    assert probe_lines(out) == probe_lines(whole)
    assert json.loads((out / COMPLETION_MARKER).read_text())["steps"] == STEPS
    assert not list(out.glob("checkpoint-*")) and not staging.exists()  # finished: the resume state is gone
    print(
        f"killed after checkpoint-{k} (log at kill: steps {logged_before_resume}), then during the save of "
        f"{half_written} (resumed from {Path(resumed_from).name}); {seconds:.1f} s for all runs"
    )


class _Killed(BaseException):
    """Stands for a kill inside a save: not an Exception, so nothing on the way catches it."""


def test_a_checkpoint_interrupted_mid_save_is_never_resumed_from(chain, monkeypatch):
    """The save of checkpoint-2 stops after the model and optimizer were written, before the RNG state and
    `trainer_state.json`: nothing is named checkpoint-2, `get_last_checkpoint` (what `--resume_from_checkpoint true`
    calls) picks checkpoint-1, and the resumed run ends as one never interrupted."""
    shapes, stage0, root = chain
    overrides = stage3_args(shapes, steps=4)
    whole = train("3", root / "midsave-whole", stage0, overrides)
    save_rng_state = Trainer._save_rng_state

    def interrupted(self, output_dir):
        if self.state.global_step == 2:
            raise _Killed
        return save_rng_state(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", interrupted)
    out = root / "midsave"
    with pytest.raises(_Killed):
        train("3", out, stage0, overrides)
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / CHECKPOINT_STAGING / "checkpoint-2" / "model.safetensors").is_file()
    assert not (out / CHECKPOINT_STAGING / "checkpoint-2" / STATE).exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-1")
    resumed = train("3", out, stage0, [*overrides, "--resume_from_checkpoint", "true"])
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert routing_lines(resumed) == routing_lines(whole)
    assert not (out / CHECKPOINT_STAGING).exists()


def test_rotation_and_the_best_checkpoint_see_the_renamed_folders(chain):
    """save_total_limit 2 keeps the newest checkpoint and the best one (here: step 1, as an evaluation would have
    marked it); the best one's path is the final name, not the staging folder it was written in."""
    shapes, stage0, root = chain

    class BestAtStepOne(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                state.best_global_step, state.best_metric = 1, 0.0

    out = root / "rotation"
    overrides = stage3_args(shapes, steps=4, save_total_limit=2, keep_checkpoints="true")
    train("3", out, stage0, overrides, callbacks=[BestAtStepOne()])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-4"]
    for state_file in (out / STATE, out / "checkpoint-4" / STATE):
        assert json.loads(state_file.read_text())["best_model_checkpoint"] == str(out / "checkpoint-1")


def test_a_checkpoint_is_deleted_whole_or_not_at_all(tmp_path, monkeypatch):
    """Rotation and the end-of-stage cleanup delete checkpoints; a kill in the middle of a deletion must not leave a
    half-deleted `checkpoint-N` for `--resume_from_checkpoint true` to pick."""
    from trainer import stage_dirs

    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in ("model.safetensors", "optimizer.pt", STATE):
            (tmp_path / f"checkpoint-{step}" / name).write_text("x")
    rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        files = sorted(Path(path).glob("*"))
        if files:
            files[0].unlink()  # part of the folder is gone when the kill comes
            raise _Killed
        rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(stage_dirs.shutil, "rmtree", killed_midway)
    with pytest.raises(_Killed):
        stage_dirs.discard_checkpoint(tmp_path / "checkpoint-1")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    stage_dirs.remove_checkpoints(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_torn_last_log_line_is_dropped_and_a_damaged_earlier_one_is_named(tmp_path):
    log = tmp_path / "routing_stats.jsonl"
    rows = [{"step": s, "layers": {"0": [s]}} for s in (1, 2, 3)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lay')  # killed while appending
    assert read_log_lines(log) == rows
    _keep_lines_up_to(log, 2)  # resuming from checkpoint-2
    assert log.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])
    log.write_text(json.dumps(rows[0]) + "\n" + '{"step": 2,\n' + json.dumps(rows[2]) + "\n")
    with pytest.raises(ValueError, match=rf"{log}, line 2: not a JSON record"):
        _keep_lines_up_to(log, 3)


def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "analysis.json"
    write_atomic(path, '{"old": 1}')

    def killed(fd):
        raise _Killed

    monkeypatch.setattr(os, "fsync", killed)  # the new text is (partly) in the file system, not yet renamed
    with pytest.raises(_Killed):
        write_atomic(path, '{"new": 2}' * 1000)
    assert path.read_text() == '{"old": 1}'
    monkeypatch.undo()
    write_atomic(path, '{"new": 2}')
    assert path.read_text() == '{"new": 2}' and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# ----- moe-vlm ablate -------------------------------------------------------------------------------------------------

ABLATE = """
import json, sys
from pipeline import ablate
out, shapes, variants = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
budget = {"dataset": shapes, "max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1,
          "save_strategy": "steps", "save_steps": 1, "warmup_steps": 0, "routing_probe_samples": 4}
ablate.ablate(out, variants, [0], jobs=1, n_samples=4, n_eval=4, overrides=budget, data_dir=shapes,
              n_instruction=1)
"""


def test_ablate_killed_after_its_first_cell_reruns_only_the_rest_and_writes_the_same_table(chain, tmp_path):
    """`ablate` over two variants, one cell at a time, killed (SIGKILL to its process group: the command and its
    worker) once the first cell (baseline) is complete, while the second (aux_free) runs; the rerun keeps the first
    cell as it was (not run again: its files untouched) and writes the second as a run of it alone, never
    interrupted, writes it (alongside, to save time: the costly part of the test is the cells' analyses)."""
    from pipeline.ablate import CELL_MARKER, TABLE_JSON, cell_dir

    shapes, stage0, root = chain
    seed_dir = root / "ablate-chain" / "seed0"
    (seed_dir / "pretrain").mkdir(parents=True)
    (seed_dir / "pretrain" / COMPLETION_MARKER).write_text("{}")  # stands for a finished pretraining
    train("1", seed_dir / "stage1", stage0, quick_args(shapes, steps=2))
    train("2", seed_dir / "stage2", seed_dir / "stage1", quick_args(shapes, steps=2))
    shutil.copytree(stage0, seed_dir / "stage0")
    runs = {name: tmp_path / name for name in ("whole", "killed")}
    for run in runs.values():
        shutil.copytree(seed_dir.parent, run)
    started = time.monotonic()

    def launch(name, variants, log):
        with log.open("w") as f:
            return subprocess.Popen(
                [sys.executable, "-c", ABLATE, str(runs[name]), str(shapes), ",".join(variants)],
                cwd=REPO,
                env=environment(**{CACHE_ENV: str(tmp_path / "cache")}),
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the kill takes the cell worker too
            )

    uninterrupted = launch("whole", ["aux_free"], tmp_path / "whole.log")
    killed = launch("killed", ["baseline", "aux_free"], tmp_path / "killed.log")
    cells = runs["killed"] / "seed0" / "ablations"
    # The first cell trains, analyses and evaluates before its marker: minutes on busy cores, so the deadline is the
    # reruns' own (600 s), not kill_when's default meant for one training checkpoint.
    kill_when(
        killed, lambda: any(cells.glob(f"*/{CELL_MARKER}")), tmp_path / "killed.log", group=True, timeout=600
    )
    assert [p.parent.name for p in cells.glob(f"*/{CELL_MARKER}")] == ["baseline"]
    kept = cell_dir(runs["killed"] / "seed0", "baseline")
    written = json.loads((kept / CELL_MARKER).read_text())
    before = {p: p.stat().st_mtime_ns for p in (kept / CELL_MARKER, kept / "stage3" / "model.safetensors")}
    rerun = launch("killed", ["baseline", "aux_free"], tmp_path / "rerun.log")
    finish(rerun, tmp_path / "rerun.log", timeout=600)
    finish(uninterrupted, tmp_path / "whole.log", timeout=600)
    seconds = time.monotonic() - started

    assert "2 cells (2 variants x 1 seeds): 1 complete, 1 to run" in (tmp_path / "rerun.log").read_text()
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the complete cell was not run again
    tables = {name: json.loads((run / TABLE_JSON).read_text()) for name, run in runs.items()}
    rows = {name: {r["variant"]: r["metrics"] for r in table["rows"]} for name, table in tables.items()}
    assert rows["killed"]["aux_free"] == rows["whole"]["aux_free"]
    assert {k: v["values"] for k, v in rows["killed"]["baseline"].items()} == {
        k: {"0": v} for k, v in written["metrics"].items()
    }
    spent = {c.parent.name: json.loads(c.read_text())["seconds"] for c in cells.glob(f"*/{CELL_MARKER}")}
    print(f"ablate killed after cell 'baseline'; {seconds:.1f} s for all runs; cell steps (s): {spent}")


# ----- moe-vlm reproduce killed mid-way ----------------------------------------------------------------------------

# The reproduction's steps with the work stood in (test_seeds.Recorder: each stage writes its marker, each analysis
# its file, the report the per-seed numbers): what is tested is the skip rule under a real SIGKILL, not training.
REPRODUCE_SCRIPT = """
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import analysis.run, pipeline.report
from pipeline import reproduce
from test_seeds import Recorder
from moe_vlm_cli import main

calls, kill_at = Path({calls!r}), {kill_at!r}

class Logged(Recorder):
    def _log(self, *call):
        with calls.open("a") as f:
            f.write(json.dumps([str(c) for c in call]) + "\\n")

    def train(self, out_dir, stage, source, seed, extra=()):
        self._log("train", stage, seed)
        if kill_at is not None and [stage, seed] == kill_at:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "model.safetensors").write_bytes(b"half a model")  # killed mid-stage
            os.kill(os.getpid(), signal.SIGKILL)
        super().train(out_dir, stage, source, seed, extra)

    def analyze(self, model_dir, out_dir, **kw):
        self._log("analyze", Path(model_dir).name, kw.get("seed"))
        super().analyze(model_dir, out_dir, **kw)

    def evaluate(self, model_dir, out_dir, **kw):
        self._log("evaluate", Path(model_dir).name, kw.get("seed"))
        super().evaluate(model_dir, out_dir, **kw)

rec = Logged()
reproduce._train = rec.train
analysis.run.analyze, analysis.run.evaluate = rec.analyze, rec.evaluate
pipeline.report.write_report = rec.write_report
sys.exit(main(["reproduce", "--seeds", "0", "1", "--out", {out!r}]))
"""


def run_reproduce(out: Path, calls: Path, kill_at) -> subprocess.CompletedProcess:
    script = REPRODUCE_SCRIPT.format(
        tests=str(REPO / "tests"), calls=str(calls), kill_at=kill_at, out=str(out)
    )
    env = environment(**{CACHE_ENV: str(out.parent / "cache")})
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)


def _normalised_report(out: Path) -> dict:
    text = (out / "report.json").read_text().replace(str(out.parent), "ROOT")
    return _without_times(json.loads(text))


def _without_times(value):
    """A report without its wall-clock fields (`timings_seconds`, `seconds_*`), which differ from run to run."""
    if isinstance(value, dict):
        return {
            k: _without_times(v)
            for k, v in value.items()
            if not (k == "timings_seconds" or k.startswith("seconds"))
        }
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_reproduce_killed_mid_way_reruns_only_what_is_unfinished_and_writes_the_same_report(tmp_path):
    steps = [[stage, seed] for seed in (0, 1) for stage in ("0", "1", "2", "3", "dense")]
    kill_at = random.Random(KILL_SEED).choice(steps[1:])  # a step after the first, of either seed
    whole = run_reproduce(tmp_path / "whole" / "run", tmp_path / "whole-calls.jsonl", None)
    assert whole.returncode == 0, whole.stderr[-2000:]

    out, calls = tmp_path / "killed" / "run", tmp_path / "killed-calls.jsonl"
    killed = run_reproduce(out, calls, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = [json.loads(line) for line in calls.read_text().splitlines()]
    assert before[-1] == ["train", *map(str, kill_at)] and not (out / "report.json").exists()
    seed_dir = out / f"seed{kill_at[1]}"
    stage_dir = seed_dir / {"dense": "dense"}.get(kill_at[0], f"stage{kill_at[0]}")
    assert stage_dir.is_dir() and not (stage_dir / COMPLETION_MARKER).exists()  # the half-trained stage

    calls.write_text("")
    resumed = run_reproduce(out, calls, None)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = [json.loads(line) for line in calls.read_text().splitlines()]
    finished_before = [c for c in before[:-1] if c[0] == "train"]
    assert not [c for c in again if c in finished_before]  # nothing finished was trained again
    assert again[0] == ["train", *map(str, kill_at)]  # the killed stage first, from the start
    assert _normalised_report(out) == _normalised_report(tmp_path / "whole" / "run")
