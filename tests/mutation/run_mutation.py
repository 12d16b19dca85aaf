"""`make mutation`: mutation testing of the science code with cosmic-ray, one session per target of
`targets.toml`, and one report of what the tests kill.

cosmic-ray makes the mutants, applies each to the file, runs the test command and records the outcome. What it
does not do, and this file adds: (1) mutate only the named functions/classes of a module (its filters select by
line pragma or git diff, not by scope), (2) run several modules at once safely: cosmic-ray edits the file in
place, so each target runs in its own copy of the working tree, (3) leave out the mutants `equivalent.toml`
explains, and (4) one score over all targets with the survivors listed.

    python tests/mutation/run_mutation.py --out runs/mutation --jobs 2 [--only stats load] [--limit N]
    python tests/mutation/run_mutation.py --rejudge   # after adding tests: the survivors again, with today's tests

Writes `<out>/report.json` and `<out>/report.md`; the sessions (`<out>/<target>/session.sqlite`) are kept, so a
rerun continues an interrupted session (cosmic-ray's `exec` runs only the pending mutants).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: cosmic-ray's own dependency `toml` reads the same files
    import toml as tomllib

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TARGETS = HERE / "targets.toml"
EQUIVALENT = HERE / "equivalent.toml"
MUTANT_TIMEOUT_S = 240.0


@dataclass
class Target:
    name: str
    module: str
    # pytest argument lists, run in order, each only when the one before passed: a mutant the fast unit files
    # kill never pays for collecting the slow ones (importing transformers and the trainer costs ~9 s a mutant)
    tests: list[list[str]]
    scope: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.tests or not all(
            isinstance(s, list) and s and all(isinstance(a, str) for a in s) for s in self.tests
        ):
            raise SystemExit(
                f"targets.toml: target {self.name}: `tests` must be a list of pytest argument lists "
                f'(stages), e.g. [["tests/test_fast.py"], ["tests/test_slow.py", "-k", "not train"]]'
            )


def load_targets(path: Path = TARGETS) -> tuple[list[Target], list[re.Pattern]]:
    """The targets and the operator allow-list of `targets.toml`."""
    data = tomllib.loads(path.read_text())
    return [Target(**t) for t in data["target"]], [re.compile(p) for p in data["operators"]]


def test_command(target: Target, warm_socket: str | None = None) -> str:
    """The command one mutant is judged by: `pytest -x` per stage, the stages joined by `&&` (cosmic-ray splits
    its test command with shlex and runs it without a shell, hence `sh -c`). With `warm_socket`, each stage runs
    in a fork of that target's `warm_pytest` server instead of a fresh interpreter."""
    pytest = ["-x", "-q", "-p", "no:cacheprovider"]
    if warm_socket:
        prefix = [sys.executable, str(HERE / "warm_pytest.py"), "run", warm_socket, "--"]
    else:
        prefix = [sys.executable, "-m", "pytest"]
    runs = [shlex.join([*prefix, *pytest, *stage]) for stage in target.tests]
    return runs[0] if len(runs) == 1 else shlex.join(["sh", "-c", " && ".join(runs)])


def scope_lines(source: str, names: list[str], module: str = "") -> set[int]:
    """The 1-based line numbers of the top-level definitions `names` in `source` (decorators included); every
    line when `names` is empty. A name the module lacks is an error: a renamed function must not silently drop
    out of the run."""
    if not names:
        return set(range(1, source.count("\n") + 2))
    spans = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            spans[node.name] = range(first, node.end_lineno + 1)
    missing = [n for n in names if n not in spans]
    if missing:
        raise SystemExit(f"targets.toml: {module} has no top-level {', '.join(missing)}")
    return {line for n in names for line in spans[n]}


# Tensor methods whose integer arguments are axes (`x.softmax(-1)`, `x.sum(1)`, `x.view(-1, 2)`).
AXIS_METHODS = {
    "argmax", "argmin", "cat", "cumsum", "flatten", "gather", "log_softmax", "logsumexp", "max", "mean", "min",
    "norm", "permute", "reshape", "size", "softmax", "squeeze", "stack", "sum", "topk", "transpose", "unsqueeze",
    "view", "std", "var", "all", "any", "amax", "amin", "roll", "split", "chunk", "expand", "repeat", "flip",
}  # fmt: skip
AXIS_KEYWORDS = {"dim", "axis", "dims", "start_dim", "end_dim", "keepdim", "indent"}


def axis_positions(source: str) -> set[tuple[int, int]]:
    """(line, column) of every integer literal used as an axis: a `dim=`/`axis=` keyword, an argument of a tensor
    method of AXIS_METHODS, or an index into `.shape`; for `-1` both the minus and the digit. Mutants there
    (`dim=-1` -> `dim=1`, `-2`, `0`) are axis bookkeeping, not arithmetic: on the 2-D tensors of these functions
    `-1 -> 1` is equivalent, and the others reduce over another axis. They are left out of the run by choice
    (they are a third of cosmic-ray's number mutants here); the README says so."""

    def literals(node: ast.AST):
        if isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant):
            yield node
            node = node.operand
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int)
            and not isinstance(node.value, bool)
        ):
            yield node
        elif isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                yield from literals(element)

    found = set()
    for node in ast.walk(ast.parse(source)):
        candidates = []
        if isinstance(node, ast.Call):
            candidates += [k.value for k in node.keywords if k.arg in AXIS_KEYWORDS]
            if isinstance(node.func, ast.Attribute) and node.func.attr in AXIS_METHODS:
                candidates += node.args
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "shape"
        ):
            candidates.append(node.slice)
        for candidate in candidates:
            found |= {(n.lineno, n.col_offset) for n in literals(candidate)}
    return found


def keep_mutation(
    mutation: dict, lines: set[int], operators: list[re.Pattern], axes: set[tuple[int, int]] = frozenset()
) -> bool:
    """Whether a cosmic-ray mutation (`operator_name`, `start_pos` as (line, column)) is in scope, in the
    operator allow-list and not on an axis literal (`axis_positions`)."""
    line, column = mutation["start_pos"]
    return (
        line in lines
        and (line, column) not in axes
        and any(p.search(mutation["operator_name"]) for p in operators)
    )


def _equivalents(path: Path = EQUIVALENT) -> list[dict]:
    """The survivors explained: `[[equivalent]] target, line (the source line's text, stripped), operator ("*":
    any), occurrence (optional), kind, reason`. kind "equivalent": the mutant behaves as the original on every
    input; kind "choice": it changes a number that is a budget or a default, not a result (e.g. a chunk size).
    Matched by text, not line number, so edits elsewhere keep them."""
    if not path.exists():
        return []
    return tomllib.loads(path.read_text()).get("equivalent", [])


def is_equivalent(
    target: str, line_text: str, operator: str, occurrence: int, equivalents: list[dict]
) -> str | None:
    """The reason a mutant is equivalent, or None."""
    for e in equivalents:
        if (
            e["target"] == target
            and e["line"] == line_text.strip()
            and e["operator"] in ("*", operator)
            and e.get("occurrence", occurrence) == occurrence
        ):
            return f"{e['kind']}: {e['reason']}"
    return None


def _copy_tree(dest: Path, keep: str | None = None) -> None:
    """The working tree as git sees it (tracked and untracked-but-not-ignored files), without runs/ or venvs;
    `keep`, a path relative to the tree, is left as it is in `dest`."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for rel in filter(None, listing.split("\0")):
        src = REPO / rel
        if src.is_file() and rel != keep:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _cosmic(*args: str, cwd: Path, env: dict, log: Path) -> None:
    with log.open("a") as handle:
        result = subprocess.run(
            [sys.executable, "-m", "cosmic_ray.cli", *args], cwd=cwd, env=env, stdout=handle, stderr=handle
        )
    if result.returncode != 0:
        raise RuntimeError(f"cosmic-ray {args[0]} failed (rc {result.returncode}); see {log}")


def _filter_session(session: Path, tree: Path, target: Target, operators: list[re.Pattern]) -> None:
    """Marks every mutant out of scope or off the allow-list as skipped (cosmic-ray's own filters do the same
    through the WorkDB API)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    source = (tree / target.module).read_text()
    lines, axes = scope_lines(source, target.scope, target.module), axis_positions(source)
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item in list(db.pending_work_items):
            m = item.mutations[0]
            mutation = {"start_pos": m.start_pos, "operator_name": m.operator_name}
            if not keep_mutation(mutation, lines, operators, axes):
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))


def _write_config(target: Target, work: Path, warm_socket: str | None) -> Path:
    """The cosmic-ray config of `target`: its module in the tree copy, its tests as the test command. Written
    afresh for every run (the warm server's socket is new each time); the session does not keep it."""
    command = test_command(target, warm_socket)
    config = work / "cosmic-ray.toml"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{work / "tree" / target.module}"\n'
        f"timeout = {MUTANT_TIMEOUT_S}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(command)}\n"
        '[cosmic-ray.distributor]\nname = "local"\n'
    )
    return config


def run_target(
    target: Target, operators: list[re.Pattern], out: Path, limit: int | None, warm: bool = True
) -> Path:
    """One cosmic-ray session for `target` in its own tree copy; returns the session file."""
    work = out / target.name
    tree, session, log = work / "tree", work / "session.sqlite", work / "cosmic-ray.log"
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if not session.exists():
        shutil.rmtree(work, ignore_errors=True)
        tree.mkdir(parents=True)
        _copy_tree(tree)
    with _warm_server(tree, env, log) if warm else contextlib.nullcontext() as warm_socket:
        config = _write_config(target, work, warm_socket)
        if not session.exists():
            partial = work / "session.partial.sqlite"
            _cosmic("init", str(config), str(partial), cwd=tree, env=env, log=log)
            _filter_session(partial, tree, target, operators)
            if limit is not None:
                _limit_session(partial, limit)
            _cosmic("baseline", str(config), cwd=tree, env=env, log=log)  # the warm path too must pass
            partial.rename(session)
        _cosmic("exec", str(config), str(session), cwd=tree, env=env, log=log)
    return session


@contextlib.contextmanager
def _warm_server(tree: Path, env: dict, log: Path):
    """A `warm_pytest` server in the tree copy for one target's run; yields its socket path (in a short temporary
    folder: a Unix socket's path is limited to ~100 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="mutation-"))
    path = folder / "warm.sock"
    with log.open("a") as handle:
        server = subprocess.Popen(
            [sys.executable, str(HERE / "warm_pytest.py"), "serve", str(path), "--timeout", str(MUTANT_TIMEOUT_S - 10)],
            cwd=tree, env={**env, "PYTHONDONTWRITEBYTECODE": "1"}, stdout=handle, stderr=handle,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not path.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the warm pytest server did not start (rc {server.poll()}); see {log}")
            time.sleep(0.2)
        yield str(path)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _limit_session(session: Path, limit: int) -> None:
    """Keeps the first `limit` pending mutants (a quick check of the machinery, `--limit`)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(session), WorkDB.Mode.open) as db:
        for item in list(db.pending_work_items)[limit:]:
            db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))


def rejudge(target: Target, out: Path) -> None:
    """Sends the survivors of a finished session back to pending and refreshes the tree copy's files (the new
    tests), so the next `exec` judges them again with today's tests; killed mutants stay killed (a test
    that was added does not un-kill them). The mutated module itself stays as the session made its mutants
    from (their positions and occurrence numbers refer to it); when it has changed since, the run says so."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome

    work = out / target.name
    session = work / "session.sqlite"
    if not session.exists():
        return
    _copy_tree(work / "tree", keep=target.module)
    if (work / "tree" / target.module).read_text() != (REPO / target.module).read_text():
        print(f"{target.name}: {target.module} changed since its session; delete {work} for fresh mutants")
    _write_config(target, work)  # today's test list
    source = (work / "tree" / target.module).read_text().splitlines()
    equivalents = _equivalents()

    def explained(item) -> bool:  # an explained survivor stays explained
        m = item.mutations[0]
        return is_equivalent(
            target.name, source[m.start_pos[0] - 1], m.operator_name, m.occurrence, equivalents
        )

    with use_db(str(session), WorkDB.Mode.open) as db:
        survived = [
            item.job_id
            for item, r in db.completed_work_items
            if r.test_outcome == TestOutcome.SURVIVED and not explained(item)
        ]
    # cosmic-ray's WorkDB has no "forget a result": its table `work_results` is keyed by job_id.
    with sqlite3.connect(session) as conn:
        conn.executemany("DELETE FROM work_results WHERE job_id = ?", [(j,) for j in survived])


def summarise(target: Target, session: Path, equivalents: list[dict]) -> dict:
    """Counts and survivors of one finished session. Score = killed / (killed + survived), with the survivors
    `equivalent.toml` explains counted apart (`explained`); incompetent mutants (the module no longer
    imports, a test errors at collection) count as killed, as cosmic-ray counts them."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    counts = {"killed": 0, "survived": 0, "explained": 0, "pending": 0}
    base = {"target": target.name, "module": target.module, "scope": target.scope, "tests": target.tests}
    if not session.exists():  # not started (an interrupted `make mutation` continues with it)
        return {**base, **counts, "started": False, "score": None, "survivors": [], "explained_survivors": []}
    source = (session.parent / "tree" / target.module).read_text().splitlines()
    survivors, explained = [], []
    with use_db(str(session), WorkDB.Mode.open) as db:
        counts["pending"] = sum(1 for _ in db.pending_work_items)
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            m = item.mutations[0]
            line = source[m.start_pos[0] - 1]
            row = {
                "line_no": m.start_pos[0],
                "line": line.strip(),
                "operator": m.operator_name,
                "occurrence": m.occurrence,
                "diff": "\n".join(
                    d
                    for d in (result.diff or "").splitlines()
                    if d.startswith(("+", "-")) and d[:3] not in ("+++", "---")
                ),
            }
            reason = is_equivalent(target.name, line, m.operator_name, m.occurrence, equivalents)
            if result.test_outcome == TestOutcome.SURVIVED and reason:
                counts["explained"] += 1
                explained.append({**row, "reason": reason})
            elif result.test_outcome == TestOutcome.SURVIVED:
                counts["survived"] += 1
                survivors.append(row)
            else:
                counts["killed"] += 1
    judged = counts["killed"] + counts["survived"]
    return {
        **base,
        **counts,
        "started": True,
        "score": counts["killed"] / judged if judged else None,
        "survivors": sorted(survivors, key=lambda r: r["line_no"]),
        "explained_survivors": sorted(explained, key=lambda r: r["line_no"]),
    }


def write_report(rows: list[dict], out: Path) -> dict:
    killed = sum(r["killed"] for r in rows)
    survived = sum(r["survived"] for r in rows)
    report = {
        "score": killed / (killed + survived) if killed + survived else None,
        "killed": killed,
        "survived": survived,
        "explained": (explained := sum(r["explained"] for r in rows)),
        "score_counting_explained_as_survivors": killed / (killed + survived + explained)
        if killed + survived + explained
        else None,
        "pending": sum(r["pending"] for r in rows),
        "targets": rows,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        f"# Mutation testing: {report['score']:.1%} of the mutants not explained killed "
        f"({killed} killed, {survived} survived, {explained} explained, {report['pending']} pending)",
        "",
        f"Counting the explained survivors too: {report['score_counting_explained_as_survivors']:.1%}.",
        "",
        "| target | module | killed | survived | explained | score |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        score = "not started" if not r["started"] else "n/a" if r["score"] is None else f"{r['score']:.1%}"
        md.append(
            f"| {r['target']} | `{r['module']}` | {r['killed']} | {r['survived']} | {r['explained']} | {score} |"
        )
    for r in rows:
        for kind, key in (("Survivors", "survivors"), ("Explained survivors", "explained_survivors")):
            if r[key]:
                md += ["", f"## {kind}: {r['target']}", ""]
                for s in r[key]:
                    reason = f" — {s['reason']}" if "reason" in s else ""
                    md.append(
                        f"- line {s['line_no']} `{s['operator']}` #{s['occurrence']}: `{s['line']}`{reason}"
                    )
    (out / "report.md").write_text("\n".join(md) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "mutation")
    parser.add_argument("--jobs", type=int, default=2, help="targets run at once, each in its own tree copy")
    parser.add_argument("--only", nargs="+", help="target names to run (default: all)")
    parser.add_argument("--limit", type=int, help="at most this many mutants per target (a quick check)")
    parser.add_argument(
        "--rejudge", action="store_true", help="run the survivors again with the current tests"
    )
    parser.add_argument("--report-only", action="store_true", help="summarise the sessions already in --out")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="judge each mutant by a fresh pytest process, not a warm server's fork",
    )
    args = parser.parse_args(argv)

    targets, operators = load_targets()
    if args.only:
        unknown = sorted(set(args.only) - {t.name for t in targets})
        if unknown:
            parser.error(f"--only: no target {', '.join(unknown)} in {TARGETS}")
        targets = [t for t in targets if t.name in args.only]
    args.out = args.out.resolve()  # the sessions run with their tree copy as working directory
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rejudge:
        for t in targets:
            rejudge(t, args.out)
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {
                t.name: pool.submit(run_target, t, operators, args.out, args.limit, not args.cold)
                for t in targets
            }
        failed = {name: f.exception() for name, f in futures.items() if f.exception()}
        for name, error in failed.items():
            print(f"target {name}: {error}", file=sys.stderr)
        if failed:
            return 2
    rows = [summarise(t, args.out / t.name / "session.sqlite", _equivalents()) for t in targets]
    report = write_report(rows, args.out)
    print((args.out / "report.md").read_text())
    return 0 if report["score"] is not None and report["score"] >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
