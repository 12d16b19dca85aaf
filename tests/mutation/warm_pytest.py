"""A warm pytest for mutation testing: one server per target imports the heavy third-party libraries once, and
every mutant's test run is a fork of it, so a mutant pays for its own tests and not for importing torch and
transformers again (about 10 s of a cold `pytest -x` run of ~14 s on these targets, measured on 2 cores).

Why hand-written: cosmic-ray runs its test command as a fresh subprocess per mutant and has no warm runner.
mutmut 3 forks from a warm process, but through its own trampolined copy of the package: switching tools would
remake every session and every explained survivor (not tried here). The server never imports a module of this project, so
each fork imports the mutated file from disk as a cold run would (and writes no bytecode, like cosmic-ray's
own runs: a mutant can keep the file's size and second-granular mtime, which a .pyc would not notice).

    python warm_pytest.py serve SOCKET [--timeout S]    # in the target's tree copy, with its environment
    python warm_pytest.py run SOCKET -- PYTEST_ARGS...   # the test command: the fork's pytest exit code

`run` is light (no torch), and exits with pytest's code; cosmic-ray counts non-zero as killed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import socket
import sys
import time

# Third-party modules the targets' tests import. Importing them is what a cold run spends its time on.
PRELOAD = (
    "numpy",
    "scipy.stats",
    "torch",
    "torch.nn.functional",
    "PIL.Image",
    "pytest",
    "hypothesis",
    "safetensors.torch",
    "yaml",
    "sklearn.linear_model",
    "matplotlib.pyplot",
    "transformers",
    "transformers.modeling_utils",
    "transformers.models.mistral.modeling_mistral",
    "transformers.integrations.moe",
    "transformers.trainer",
    "transformers.trainer_utils",
    "open_clip",
)
# This project's top-level packages: none may be in the server, or a fork would test the unmutated copy.
PROJECT = (
    "analysis",
    "configuration",
    "modeling_moe_vlm",
    "pipeline",
    "trainer",
    "moe_vlm_cli",
    "space",
    "benchmarks",
)


def _offline_env():
    """tests/offline_env.py, the one source of the variables conftest sets (standard library only). Loaded by path,
    neither put on sys.path nor kept in sys.modules: each fork's sys.path and conftest import stay a cold run's."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "offline_env.py")
    spec = importlib.util.spec_from_file_location("_warm_offline_env", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional extra not installed: its tests will import (or skip) it themselves
            pass
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in PROJECT)
    if leaked:
        raise SystemExit(
            f"warm_pytest: preloading imported project modules {leaked[:5]}: forks would not see mutants"
        )


def _run_child(request: dict) -> None:
    """In the fork: the client's working directory and environment, then pytest; never returns."""
    os.setsid()  # its own process group, so a timeout kills what the tests started too
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.dont_write_bytecode = True
        sys.argv = ["pytest", *request["args"]]
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import pytest

        code = int(pytest.main(request["args"]))
    except BaseException:  # noqa: BLE001 - any failure in the fork is a failed test run, reported as such
        code = 3
    os._exit(code)


def _wait(pid: int, timeout: float) -> int:
    """The fork's exit code; past `timeout` its group is killed and the run counts as failed (124)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return 124
        time.sleep(0.02)


def serve(path: str, timeout: float) -> None:
    _offline_env().apply()  # what tests/conftest.py sets, before the preloaded libraries read it at import
    _preload()
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    print(f"warm_pytest: serving on {path}", flush=True)
    while True:  # one run at a time: cosmic-ray's local distributor judges a target's mutants one by one
        conn, _ = server.accept()
        with conn:
            request = json.loads(_read_line(conn))
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                _run_child(request)
            code = _wait(pid, timeout)
            try:
                conn.sendall(f"{code}\n".encode())
            except OSError:  # the client was killed (cosmic-ray's own timeout): nothing to answer
                pass


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode()


def run(path: str, args: list[str]) -> int:
    """pytest `args` in the server's fork. Without a server to answer, the same run cold, in this process: cosmic-ray
    counts every non-zero exit as a kill, so a lost server must cost time, never a verdict."""
    request = {"args": args, "cwd": os.getcwd(), "env": dict(os.environ)}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            conn.sendall((json.dumps(request) + "\n").encode())
            answer = _read_line(conn).strip()
    except OSError:
        answer = ""
    if not answer:
        os.execv(sys.executable, [sys.executable, "-m", "pytest", *args])
    return int(answer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("socket")
    s.add_argument("--timeout", type=float, default=230.0, help="seconds one test run may take")
    r = sub.add_parser("run")
    r.add_argument("socket")
    r.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.socket, args.timeout)
        return 0
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    return run(args.socket, pytest_args)


if __name__ == "__main__":
    sys.exit(main())
