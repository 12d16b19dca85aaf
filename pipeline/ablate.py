"""`moe-vlm ablate`: Stage 3 under each routing variant, from the same Stage 2 checkpoint per seed, analysed and
evaluated as the reproduction analyses Stage 3, then one table across variants with 95 % intervals over seeds.

A variant is a recipe in `configuration/ablations/<name>.yaml`: a description and the Stage 3 recipe fields it
changes (`stage3:`), applied over the embedded Stage 3 recipe and written as a complete recipe file beside the run
(so `null` can unset a field, which the command line cannot).

Layout under `--out`:

    seed<N>/pretrain, stage0, stage1, stage2      the shared chain (as `moe-vlm reproduce` builds it)
    seed<N>/ablations/<variant>/stage3-recipe.yaml, stage3/, analysis/, transfer/<world>/, cell.json
    ablation.json, ablation.md, figures/<metric>.png

`cell.json` is written last, by rename: a cell with it is complete and is skipped when the command runs again; a
cell without it resumes its steps (a finished Stage 3 and finished analyses are kept). The cells run in `--jobs`
processes, each with its share of the cores as torch threads.

Transfer: every cell's Stage 3 is also measured on worlds it was not trained on (`analysis.transfer`): the shifted
Shapes world of its seed (`trainer.data.shifted`, built once per seed before the cells run) and any `--transfer
NAME=DIR` DatasetDict (e.g. COCO), with held-out questions rendered in the shifted world for instruction accuracy.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import resources
from multiprocessing import get_context
from pathlib import Path

import yaml

from configuration.atomic import write_atomic
from configuration.cli_inputs import check_out_dir
from configuration.contract import ANALYSIS_FILE, CAPTIONING_FILE, COMPLETION_MARKER, TRANSFER_FILE

from .seeds import interval, seed_dir_name

CELL_MARKER = "cell.json"
TIMINGS_FILE = (
    "timings.json"  # every invocation's times, appended: a rerun that only rewrites the table keeps them
)
BASELINE = "baseline"  # the paper's Stage 3: paired differences are taken against it, seed by seed
# The metrics whose paired difference from the baseline the Markdown shows (the JSON has every metric's).
PAIRED = (
    "captioning_CIDEr",
    "captioning_chat_CIDEr",
    "grounding_colour_accuracy",
    "crossover_increase_pct",
    "collapsed_soft_layers",
    "purity_balanced",
    "routing_mi",
    "expert_cka",
    "instruction_accuracy",
    "saturation_settle_fraction",
    "transfer_shifted_routing_mi",
)

TABLE_JSON = "ablation.json"
TABLE_MD = "ablation.md"
# The chain every variant starts from, per seed (the reproduction's first steps).
CHAIN = ("stage0", "stage1", "stage2")
# The table's columns: (model_metrics key, heading, what it is). Every cell writes all of model_metrics; these are
# the ones shown, in this order, and drawn.
COLUMNS = (
    ("captioning_CIDEr", "CIDEr", "captioning x100, raw caption prompt"),
    ("captioning_chat_CIDEr", "CIDEr chat", "captioning x100, the chat format Stage 3 trains in"),
    ("captioning_Bleu_4", "BLEU-4", "captioning x100, raw caption prompt"),
    ("grounding_shape_accuracy", "ground. shape", "caption names the shape"),
    ("grounding_colour_accuracy", "ground. colour", "caption names the colour"),
    ("raw_diagonal_k_over_n", "raw k/n", "binomial test, raw matrix, last layer"),
    ("raw_diagonal_p_binomial", "raw p", "binomial p, raw matrix"),
    ("centred_diagonal_k_over_n", "centred k/n", "binomial test, centred matrix"),
    ("centred_diagonal_p_binomial", "centred p", "binomial p, centred matrix"),
    ("crossover_increase_pct", "crossover %", "loss increase when routing is inverted"),
    ("collapsed_layers", "collapsed (hard)", "layers with >= 99 % of tokens on one expert"),
    (
        "collapsed_soft_layers",
        "collapsed (soft)",
        "layers with >= 90 % mean router probability on one expert",
    ),
    ("purity_balanced", "purity", "balanced purity towards the Stage 2 roles"),
    ("routing_mi", "I(E;M)/H(M)", "routing mutual information with the modality, mean over layers"),
    ("expert_cka", "expert CKA", "linear CKA between the two experts' outputs"),
    (
        "expert_distance_from_init",
        "dist. from init",
        "relative weight distance from the shared Stage 0 weights",
    ),
    ("instruction_accuracy", "instr. acc.", "held-out Shapes questions answered right, macro over kinds"),
    (
        "saturation_settle_fraction",
        "settle frac.",
        "share of Stage 3 before a probe token's expert stops changing, mean over tokens and layers",
    ),
    ("saturation_changed_share", "changed", "share of probe tokens whose expert ever changed in Stage 3"),
    ("transfer_shifted_routing_mi", "shifted I(E;M)/H(M)", "routing MI on the shifted Shapes world"),
    ("transfer_shifted_purity_balanced", "shifted purity", "balanced purity on the shifted Shapes world"),
    ("transfer_shifted_crossover_increase_pct", "shifted crossover %", "crossover on the shifted world"),
    ("transfer_shifted_grounding_shape_accuracy", "shifted ground. shape", "grounding on the shifted world"),
    ("transfer_shifted_instruction_accuracy", "shifted instr. acc.", "questions asked in the shifted world"),
)


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    stage3: dict  # Stage 3 recipe fields to set over the embedded recipe


def _variants_dir():
    return resources.files("configuration") / "ablations"


def load_variants() -> dict[str, Variant]:
    """Every variant in `configuration/ablations/`, by name, sorted; a malformed file raises naming it."""
    from trainer.recipes import field_names

    variants = {}
    for entry in sorted(_variants_dir().iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        data = yaml.safe_load(entry.read_text()) or {}
        name = entry.name[: -len(".yaml")]
        fields = data.get("stage3")
        if not isinstance(data.get("description"), str) or not isinstance(fields, dict):
            raise ValueError(
                f"ablation variant {entry}: needs `description: <text>` and `stage3: {{field: value}}`"
            )
        unknown = sorted(set(fields) - field_names())
        if unknown:
            raise ValueError(f"ablation variant {entry}: unknown recipe field(s) {unknown}")
        variants[name] = Variant(name, data["description"], dict(fields))
    return variants


def choose_variants(names: Sequence[str] | None) -> list[Variant]:
    variants = load_variants()
    if not names:  # the baseline first: every other variant is read against it
        return sorted(variants.values(), key=lambda v: (v.name != BASELINE, v.name))
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown}; choose from {', '.join(variants)}")
    return [variants[n] for n in dict.fromkeys(names)]


def write_variant_recipe(variant: Variant, path: Path, overrides: dict | None = None) -> Path:
    """The embedded Stage 3 recipe with the variant's fields (then `overrides`, e.g. a smoke run's step budget)."""
    from trainer.recipes import embedded_recipe

    recipe = {**embedded_recipe("3"), **variant.stage3, **(overrides or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(recipe, sort_keys=False))
    return path


# ----- one seed's chain, one cell --------------------------------------------------------------------------------


def cell_dir(seed_dir: Path, variant: str) -> Path:
    """Where one variant's cell of one seed lives: its recipe, Stage 3, analyses and `cell.json`."""
    return Path(seed_dir) / "ablations" / variant


def prepare_seed(seed_dir: Path, seed: int, pretraining, log=print) -> bool:
    """Stages 0-2 of one seed into `seed_dir` (what is complete is kept), as `moe-vlm reproduce` trains them.
    Returns whether anything was trained."""
    from .reproduce import TRAINING_STEPS, _train

    pretraining.attach(seed_dir)
    trained = False
    for name, stage, source in TRAINING_STEPS:
        if name not in CHAIN or (seed_dir / name / COMPLETION_MARKER).is_file():
            continue
        log(f"[ablate] seed {seed}: train {name} ...")
        _train(seed_dir / name, stage, seed_dir / source, seed)
        trained = True
    return trained


def run_cell(
    seed_dir: str,
    variant: Variant,
    seed: int,
    n_samples: int,
    n_eval: int,
    threads: int,
    overrides: dict | None = None,
    data_dir: str | None = None,
    transfer: dict[str, str] | None = None,
    n_instruction: int = 8,
) -> dict:
    """Stage 3 of `variant` from `seed_dir/stage2`, its analysis and captioning evaluation, its routing on each
    `transfer` world ({name: saved DatasetDict}; `shifted` also gets `n_instruction` held-out questions per kind
    rendered in the shifted world), then `cell.json` (its metrics and timings). Runs in a worker process: sets its
    torch threads first."""
    import torch

    torch.set_num_threads(threads)
    from analysis.run import analyze, evaluate

    from .reproduce import _train

    seed_dir = Path(seed_dir)
    cell = cell_dir(seed_dir, variant.name)
    timings = {}

    def step(name, func, done: bool):
        if done:
            return
        t0 = time.time()
        func()
        timings[name] = round(time.time() - t0, 1)

    recipe = write_variant_recipe(variant, cell / "stage3-recipe.yaml", overrides)
    stage3, analysis_dir = cell / "stage3", cell / "analysis"
    resume = ["--resume_from_checkpoint", "true"] if any(stage3.glob("checkpoint-*")) else []
    step(
        "train",
        lambda: _train(stage3, "3", seed_dir / "stage2", seed, ["--recipe", str(recipe), *resume]),
        (stage3 / COMPLETION_MARKER).is_file(),
    )
    step(
        "analyze",
        lambda: analyze(
            stage3,
            analysis_dir,
            data_dir=data_dir,
            init_dir=seed_dir / "stage0",
            seed=seed,
            n_samples=n_samples,
        ),
        (analysis_dir / ANALYSIS_FILE).is_file(),
    )
    step(
        "evaluate",
        lambda: evaluate(stage3, analysis_dir, data_dir=data_dir, seed=seed, n_samples=n_eval),
        (analysis_dir / CAPTIONING_FILE).is_file(),
    )
    for world, world_dir in (transfer or {}).items():
        out_dir = cell / "transfer" / world
        step(
            f"transfer_{world}",
            lambda world=world, world_dir=world_dir, out_dir=out_dir: _measure_transfer(
                stage3, out_dir, world, world_dir, seed, n_samples, n_instruction
            ),
            (out_dir / TRANSFER_FILE).is_file(),
        )
    result = {
        "variant": variant.name,
        "seed": seed,
        "metrics": cell_metrics(cell),
        "seconds": timings,
        "stage3_recipe": variant.stage3,
        "overrides": overrides or {},
    }
    write_atomic(cell / CELL_MARKER, json.dumps(result, indent=1))
    return result


SHIFTED = "shifted"  # the transfer world every cell is measured on: its seed's shifted Shapes world


def _image_size(model_dir) -> int:
    """The image side a stage directory's vision tower takes (its config, defaults filled in)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True).vision_config.image_size


def _measure_transfer(stage3, out_dir, world, world_dir, seed, n_samples, n_instruction) -> None:
    from analysis.instruction import instruction_records
    from analysis.transfer import analyze_transfer
    from trainer.data.shifted import shifted_seed, shifted_world

    questions = None
    if world == SHIFTED and n_instruction:
        with shifted_world():  # scenes of the shifted world's own seed stream, scored with the same names
            questions = instruction_records(shifted_seed(seed), n_instruction, _image_size(stage3))
    analyze_transfer(
        stage3, out_dir, world_dir, name=world, seed=seed, n_samples=n_samples, instruction_records=questions
    )


def cell_metrics(cell: Path) -> dict[str, float]:
    """`pipeline.report.model_metrics` of a cell's Stage 3 (its analysis.json and captioning.json), and
    `transfer_metrics` of each world it was measured on (its transfer/<world>/transfer.json)."""
    from .report import model_metrics, model_row, transfer_metrics

    analysis = json.loads((cell / "analysis" / ANALYSIS_FILE).read_text())
    captioning = json.loads((cell / "analysis" / CAPTIONING_FILE).read_text())
    metrics = model_metrics(model_row(cell.name, cell.name, analysis, captioning), analysis)
    for path in sorted((cell / "transfer").glob(f"*/{TRANSFER_FILE}")):
        metrics.update(transfer_metrics(json.loads(path.read_text())))
    return metrics


def check_transfer(extra: dict[str, str] | None) -> None:
    """Refuse a `--transfer NAME=DIR` whose name is not a word (or is the shifted world's) or whose folder holds no
    saved DatasetDict."""
    for name, path in (extra or {}).items():
        if name == SHIFTED or not name.isidentifier():
            raise ValueError(f"--transfer {name}={path}: the name must be a word other than {SHIFTED!r}")
        if not (Path(path) / "dataset_dict.json").is_file():
            raise FileNotFoundError(
                f"--transfer {name}={path}: not a saved DatasetDict (no dataset_dict.json there; write one with "
                "DatasetDict.save_to_disk, with a `test` split)"
            )


def prepare_transfer(seed_dir: Path, seed: int, extra: dict[str, str] | None, log=print) -> dict[str, str]:
    """The transfer worlds of one seed's cells: its shifted Shapes world (built once, cached, at the image size of
    its Stage 2) and the `extra` ones ({name: saved DatasetDict directory}, checked to exist)."""
    from trainer.data.shifted import build_shifted_shapes

    check_transfer(extra)
    log(f"[ablate] seed {seed}: shifted Shapes world for transfer ...")
    worlds = {SHIFTED: str(build_shifted_shapes(seed=seed, image_size=_image_size(seed_dir / "stage2")))}
    return {**worlds, **{name: str(path) for name, path in (extra or {}).items()}}


# ----- the whole grid --------------------------------------------------------------------------------------------


def ablate(
    out: str | Path,
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    jobs: int | None = None,
    n_samples: int = 200,
    n_eval: int = 100,
    cache: bool = True,
    overrides: dict | None = None,
    data_dir: str | Path | None = None,
    transfer: dict[str, str] | None = None,
    n_instruction: int = 8,
    log=print,
) -> dict:
    """Every variant x seed cell not yet complete under `out`, then the table. Returns the table dict.

    `jobs`: worker processes for the cells (default: one per two cores, at least one); the cores are shared out as
    torch threads. `overrides`: Stage 3 recipe fields applied to every variant after its own (the smoke test's
    budget); recorded in each cell and in the table. `data_dir`: a saved DatasetDict the analyses read instead of
    the seed's generated Shapes world (as `moe-vlm analyze --data`). `transfer`: {name: saved DatasetDict} worlds
    measured besides the seed's shifted Shapes world (`prepare_transfer`); `n_instruction`: held-out questions per
    kind asked in the shifted world."""
    from .reproduce import Pretraining

    out = Path(out)
    chosen = choose_variants(variants)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct seeds, got {seeds}")
    cores = os.cpu_count() or 1
    if jobs is not None and int(jobs) < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    jobs = max(1, cores // 2) if jobs is None else int(jobs)
    threads = max(1, cores // jobs)
    check_transfer(transfer)  # before anything trains: a wrong folder is found in a second, not after Stage 2
    check_out_dir(out).mkdir(parents=True, exist_ok=True)
    started = time.time()
    pretraining = Pretraining(out, cache=cache)
    trained = [prepare_seed(out / seed_dir_name(seed), seed, pretraining, log) for seed in seeds]
    worlds = {seed: prepare_transfer(out / seed_dir_name(seed), seed, transfer, log) for seed in seeds}
    chain_seconds = round(time.time() - started, 1)

    cells, pending = {}, []
    for seed in seeds:
        for variant in chosen:
            marker = cell_dir(out / seed_dir_name(seed), variant.name) / CELL_MARKER
            if marker.is_file():  # its metrics read afresh from its analyses: today's definitions
                cells[(variant.name, seed)] = {
                    **json.loads(marker.read_text()),
                    "metrics": cell_metrics(marker.parent),
                }
            else:
                pending.append((variant, seed))
    total = len(chosen) * len(seeds)
    log(
        f"[ablate] {total} cells ({len(chosen)} variants x {len(seeds)} seeds): {len(cells)} complete, "
        f"{len(pending)} to run in {jobs} process(es) x {threads} thread(s)"
    )
    grid_started = time.time()
    if pending:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {
                pool.submit(
                    run_cell,
                    str(out / seed_dir_name(s)),
                    v,
                    s,
                    n_samples,
                    n_eval,
                    threads,
                    overrides,
                    None if data_dir is None else str(data_dir),
                    worlds[s],
                    n_instruction,
                ): (v.name, s)
                for v, s in pending
            }
            for future in as_completed(futures):
                name, seed = futures[future]
                cells[(name, seed)] = future.result()  # a failed cell stops the run, naming its error
                spent = sum(cells[(name, seed)]["seconds"].values())
                log(f"[ablate] {len(cells)}/{total}: {name}, seed {seed} done ({spent:.0f} s)")
    invocation = {
        "chain_seconds": chain_seconds,
        "cells_run": len(pending),
        "cells_seconds": round(time.time() - grid_started, 1),
        "seconds": round(time.time() - started, 1),
        "jobs": jobs,
        "threads_per_job": threads,
    }
    timings_file = out / TIMINGS_FILE
    history = json.loads(timings_file.read_text()) if timings_file.is_file() else []
    if pending or any(trained):  # an invocation that only rewrites the table adds no time
        history.append(invocation)
        write_atomic(timings_file, json.dumps(history, indent=1))
    timings = {"invocations": history, "total_seconds": round(sum(i["seconds"] for i in history), 1)}
    table = build_table(chosen, seeds, cells, timings, overrides)
    for row in table["rows"]:
        row["dynamics_figures"] = _dynamics_figures(out, row["variant"], seeds)
    write_table(out, table)
    log(f"[ablate] wrote {out / TABLE_MD}, {out / TABLE_JSON} and {len(table['figures'])} figures")
    return table


def _dynamics_figures(out: Path, variant: str, seeds: Sequence[int]) -> dict[str, str]:
    """Per seed, the cell's figure of each layer's dispatch over Stage 3's steps (drawn by `analysis.run` from the
    routing log), relative to `out`."""
    from analysis.run import ROUTING_DYNAMICS_FIGURE

    figures = {}
    for seed in seeds:
        path = cell_dir(out / seed_dir_name(seed), variant) / "analysis" / ROUTING_DYNAMICS_FIGURE
        if path.is_file():
            figures[str(seed)] = str(path.relative_to(out))
    return figures


def build_table(
    variants: Sequence[Variant], seeds: Sequence[int], cells: dict, timings: dict, overrides
) -> dict:
    """Per variant and metric: the per-seed values (the cells' metrics) and their mean with a 95 % t interval, and
    against the baseline the same for the paired differences, seed by seed."""
    rows = []
    for variant in variants:
        per_seed = {s: cells[(variant.name, s)]["metrics"] for s in seeds}
        metrics = {}
        for key in sorted({k for m in per_seed.values() for k in m}):
            values = [per_seed[s][key] for s in seeds if key in per_seed[s]]
            metrics[key] = {**interval(values), "values": {str(s): per_seed[s].get(key) for s in seeds}}
        paired = {}
        if variant.name != BASELINE and all((BASELINE, s) in cells for s in seeds):
            base = {s: cells[(BASELINE, s)]["metrics"] for s in seeds}
            for key in metrics:
                diffs = [
                    per_seed[s][key] - base[s][key] for s in seeds if key in per_seed[s] and key in base[s]
                ]
                paired[key] = {**interval(diffs), "values": diffs}
        rows.append(
            {
                "variant": variant.name,
                "description": variant.description,
                "stage3": variant.stage3,
                "metrics": metrics,
                "minus_baseline": paired,
                "seconds": {str(s): cells[(variant.name, s)]["seconds"] for s in seeds},
            }
        )
    return {
        "seeds": list(seeds),
        "columns": [{"key": k, "heading": h, "meaning": m} for k, h, m in COLUMNS],
        "rows": rows,
        "timings": timings,
        "overrides": overrides or {},
        "figures": [],
    }


def _cell_text(summary: dict | None) -> str:
    if not summary or summary.get("mean") is None:
        return "–"
    mean, half = summary["mean"], summary.get("half_width")
    digits = 3 if abs(mean) < 10 else 1
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


def to_markdown(table: dict) -> str:
    head = "| variant | " + " | ".join(c["heading"] for c in table["columns"]) + " |"
    lines = [
        f"# Routing ablations: Stage 3 variants from the same Stage 2, seeds {table['seeds']}",
        "",
        "Mean ± half-width of the 95 % t interval over seeds (`ablation.json` has every seed's value).",
        "",
        head,
        "|" + "---|" * (len(table["columns"]) + 1),
    ]
    for row in table["rows"]:
        cells = [_cell_text(row["metrics"].get(c["key"])) for c in table["columns"]]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    paired_rows = [row for row in table["rows"] if row.get("minus_baseline")]
    if paired_rows:
        keys = [k for k in PAIRED if any(k in row["minus_baseline"] for row in paired_rows)]
        headings = {c["key"]: c["heading"] for c in table["columns"]}
        lines += [
            "",
            f"Minus the baseline, seed by seed (the same Stage 2 and world): mean ± half-width of the 95 % t "
            f"interval of the {len(table['seeds'])} paired differences; **bold** where the interval excludes 0.",
            "",
            "| variant | " + " | ".join(headings.get(k, k) for k in keys) + " |",
            "|" + "---|" * (len(keys) + 1),
        ]
        for row in paired_rows:
            texts = []
            for key in keys:
                d = row["minus_baseline"].get(key)
                text = _cell_text(d)
                low, high = (d or {}).get("low"), (d or {}).get("high")
                texts.append(f"**{text}**" if low is not None and (low > 0 or high < 0) else text)
            lines.append(f"| {row['variant']} | " + " | ".join(texts) + " |")
    lines += ["", "Variants:", ""]
    lines += [
        f"- **{row['variant']}**: {row['description']} (`{json.dumps(row['stage3'])}`)"
        for row in table["rows"]
    ]
    lines += ["", "Columns:", ""]
    lines += [f"- **{c['heading']}** (`{c['key']}`): {c['meaning']}" for c in table["columns"]]
    if table["overrides"]:
        lines += ["", f"Every variant also ran with `{json.dumps(table['overrides'])}` (a reduced budget)."]
    lines += ["", f"Time: {table['timings']['total_seconds']} s over every invocation:"]
    lines += [
        f"- {i['seconds']} s: Stages 0-2 {i['chain_seconds']} s, {i['cells_run']} cells {i['cells_seconds']} s in "
        f"{i['jobs']} process(es) x {i['threads_per_job']} thread(s)"
        for i in table["timings"]["invocations"]
    ]
    if table["figures"]:
        lines += ["", "Figures: " + ", ".join(f"[{Path(f).stem}]({f})" for f in table["figures"])]
    dynamics = [
        f"{row['variant']} ("
        + ", ".join(f"[seed {s}]({f})" for s, f in row["dynamics_figures"].items())
        + ")"
        for row in table["rows"]
        if row.get("dynamics_figures")
    ]
    if dynamics:
        lines += ["", "Per-layer dispatch over Stage 3's steps: " + "; ".join(dynamics)]
    return "\n".join(lines) + "\n"


def write_table(out: Path, table: dict) -> None:
    from analysis.figures import plot_ablation_metric

    figures_dir = out / "figures"
    figures_dir.mkdir(exist_ok=True)
    table["figures"] = []
    for column in table["columns"]:
        points = [(row["variant"], row["metrics"].get(column["key"])) for row in table["rows"]]
        if not any(summary and summary.get("mean") is not None for _, summary in points):
            continue
        path = figures_dir / f"{column['key']}.png"
        plot_ablation_metric(points, path, title=f"{column['heading']}: {column['meaning']}")
        table["figures"].append(str(path.relative_to(out)))
    write_atomic(out / TABLE_JSON, json.dumps(table, indent=1))
    write_atomic(out / TABLE_MD, to_markdown(table))
