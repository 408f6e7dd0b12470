"""Which negatives, loss and similarity work on your logs? Trains a grid of small runs on one
dataset: negative mixes (each data source alone, pairs, all three, in-batch, in-batch + catalog
samples) x losses (pointwise, pairwise, listwise) x similarities x seeds, every run with the
same rows, epochs and batch. Runs are Ray tasks of one CPU each, spread over the cluster.

  twotower study --logs LOGS --out STUDY [--grid FILE]
  twotower study --movielens [ML100K_DIR] --out STUDY    (needs the repository's benchmarks/)

Writes under --out: dataset/ (built once with every source's negatives, then reused),
cells/<cell_id>/result.json (one per finished run), references/ (popularity and, for generated
logs, the planted oracle), report.md (ranked table with mean ± std over seeds, per-axis
summaries, combinations not run and why, the command), recall_at_50.png, cost.png,
summary.json and best_config.yaml (a run config for `twotower train --config`).

Rerunning the same command skips every finished run, so an interrupted study resumes; a
changed grid reuses the runs it shares with the old one; --force starts over. The grids are
jobs/configs/study/grid.yaml and, with --movielens, jobs/configs/study/movielens.yaml (ML-100K
under protocol p2, whose only data negatives are unexposed); each field is documented there.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from pipelines import io
from pipelines import study as studylib
from pipelines.study import ConfigSummary, Dropped, StudyGrid, StudyGridError
from twotower_core.config import NEGATIVE_SOURCES, config_to_dict

logger = logging.getLogger(__name__)

GRIDS_DIR = Path(__file__).parent / "configs" / "study"
DEFAULT_GRID = GRIDS_DIR / "grid.yaml"
MOVIELENS_GRID = GRIDS_DIR / "movielens.yaml"
MOVIELENS_PROTOCOL = "p2"
DATASET_DIR = "dataset"
REFERENCES_DIR = "references"
REPORT_FILE = "report.md"
RECALL_PLOT = "recall_at_50.png"
COST_PLOT = "cost.png"
SUMMARY_FILE = "summary.json"
BEST_CONFIG_FILE = "best_config.yaml"


@dataclass
class StudyResult:
    out: str
    report: str
    best_config: str | None
    # Cell ids trained by this call, and those found finished on disk.
    executed: list[str]
    reused: list[str]
    failed: dict[str, str]
    dropped: list[Dropped]
    ranking: list[ConfigSummary]
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


def load_grid(path: str | Path | None = None) -> StudyGrid:
    """A grid YAML file (default: the shipped grid); StudyGridError names a bad key."""
    path = Path(path or DEFAULT_GRID)
    if not path.exists():
        raise StudyGridError(f"grid file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise StudyGridError(f"grid file {path} is not valid YAML: {error}") from error
    try:
        return studylib.grid_from_dict(data)
    except StudyGridError as error:
        raise StudyGridError(f"grid file {path}: {error}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--logs", help="raw logs dir (Contract 1) to build the study dataset from")
    source.add_argument(
        "--movielens",
        nargs="?",
        const="",
        metavar="ML100K_DIR",
        help="study MovieLens-100K (protocol p2) instead of logs: a dir with "
        "ml-100k.{inter,item,user}, or none for the cached copy benchmarks/movielens.py fetches",
    )
    parser.add_argument("--out", required=True, help="study dir (dataset, cells, report)")
    parser.add_argument(
        "--grid",
        default=None,
        help=f"grid YAML (default {DEFAULT_GRID.relative_to(Path(__file__).parents[1])}, "
        f"or {MOVIELENS_GRID.name} next to it with --movielens)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild the dataset and rerun every cell"
    )
    parser.add_argument(
        "--results",
        default=None,
        metavar="PREFIX",
        help="also write PREFIX.json (summary), PREFIX.png (Recall@50 and cost) and PREFIX.md "
        "(the report), e.g. benchmarks/results/study_synthetic",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="logical CPUs of a local Ray, one cell each (default: this machine's cores)",
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)"
    )


# ---------------------------------------------------------------------------------------------
# the dataset


def _same_path(a: str, b: str) -> bool:
    def normal(path: str) -> str:
        return path.rstrip("/") if "://" in path else os.path.abspath(path)

    return normal(str(a)) == normal(str(b))


def _movielens_module() -> ModuleType:
    """benchmarks/movielens.py (ML-100K reading and its Contract 2 writer)."""
    try:
        return importlib.import_module("benchmarks.movielens")
    except ModuleNotFoundError as error:
        if error.name not in ("benchmarks", "benchmarks.movielens"):
            raise
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "movielens.py").exists():
        raise ValueError(
            "--movielens needs benchmarks/movielens.py from the repository checkout (it is not "
            "part of the installed package)"
        )
    # An editable install runs from the checkout, whose benchmarks/ is not a package entry.
    sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.movielens")


def _check_built(manifest: dict[str, Any], expected: dict[str, Any], dataset: str) -> None:
    for key, value in expected.items():
        found = manifest.get(key)
        if key == "logs" and found is not None and _same_path(found, value):
            continue
        if found != value:
            raise ValueError(
                f"{dataset} was built with {key} = {found!r}, this study needs {value!r}: pass "
                "--force to rebuild it, or choose another --out"
            )


def prepare_logs_dataset(logs: str, dataset: str, grid: StudyGrid) -> dict[str, Any]:
    """Build the study dataset from logs (every source's negatives, K each) unless it exists."""
    dataset_config = grid.dataset_config()
    expected = {"logs": logs, "config": config_to_dict(dataset_config)}
    if io.is_complete(dataset):
        manifest = io.read_json(io.join(dataset, "manifest.json"))
        _check_built(
            {"logs": manifest["inputs"]["logs"], "config": manifest["config"]}, expected, dataset
        )
        logger.info("reusing the study dataset %s", dataset)
        return manifest
    from pipelines.build import build_dataset

    logger.info("building the study dataset %s from %s", dataset, logs)
    # The dataset dir is the study's own: one left without _SUCCESS by a crash is replaced.
    if io.exists(dataset):
        io.remove(dataset)
    return build_dataset(logs, dataset, dataset_config).manifest


def prepare_movielens_dataset(directory: str, dataset: str, grid: StudyGrid) -> dict[str, Any]:
    """Write ML-100K (protocol p2: the held-out 20% is the eval split) as the study dataset."""
    negatives = grid.dataset_config().negatives
    expected = {
        "protocol": MOVIELENS_PROTOCOL,
        "negatives": {
            "unexposed": grid.data_negatives,
            "unexposed_alpha": negatives.unexposed_alpha,
            "seed": grid.dataset_config().seed,
        },
    }
    if io.is_complete(dataset):
        manifest = io.read_json(io.join(dataset, "manifest.json"))
        _check_built(manifest, expected, dataset)
        logger.info("reusing the study dataset %s", dataset)
        return manifest
    movielens = _movielens_module()
    source = Path(directory) if directory else movielens.fetch_ml100k()
    ml = movielens.load_ml100k(source)
    split = movielens.PROTOCOLS[MOVIELENS_PROTOCOL].split(ml.ratings)
    logger.info("writing ML-100K (%s) as the study dataset %s", MOVIELENS_PROTOCOL, dataset)
    return movielens.write_dataset(
        dataset,
        ml,
        split,
        num_negatives=grid.data_negatives,
        alpha=negatives.unexposed_alpha,
        seed=grid.dataset_config().seed,
        description={"protocol": MOVIELENS_PROTOCOL, "split": "test", "data": str(source)},
    )


def available_sources(manifest: dict[str, Any]) -> list[str]:
    found = manifest["counts"]["negatives_by_source"]
    return [source for source in NEGATIVE_SOURCES if found.get(source, 0) > 0]


# ---------------------------------------------------------------------------------------------
# reference lines


def compute_references(
    dataset: str, logs: str | None, ks: tuple[int, ...]
) -> dict[str, dict[str, float]]:
    """Popularity, and the planted oracle when the logs were generated (they hold ``_oracle``)."""
    from jobs.demo import oracle_vectors
    from pipelines.evaluation import evaluate_popularity, evaluate_vectors
    from pipelines.synthetic import ORACLE_DIR

    references = {}
    if logs is not None and io.exists(io.join(logs, ORACLE_DIR)):
        users, items = oracle_vectors(logs, dataset)
        references["oracle"] = evaluate_vectors(users, items, dataset, similarity="dot", ks=ks)
    references["popularity"] = evaluate_popularity(dataset, ks=ks)
    return references


def _references(out: str, dataset: str, logs: str | None, ks: tuple[int, ...]):
    """(cached references, or None and a Ray object ref computing them)."""
    path = io.join(out, REFERENCES_DIR)
    if io.is_complete(path):
        cached = io.read_json(io.join(path, "references.json"))
        if cached.get("ks") == list(ks):
            return cached["references"], None
    import ray

    return None, ray.remote(num_cpus=1)(compute_references).remote(dataset, logs, ks)


def _save_references(out: str, references: dict[str, Any], ks: tuple[int, ...]) -> None:
    with io.staged_output(
        io.join(out, REFERENCES_DIR), overwrite=True, replace_incomplete=True
    ) as staging:
        io.write_json(
            io.join(staging, "references.json"), {"ks": list(ks), "references": references}
        )


# ---------------------------------------------------------------------------------------------
# the job


def best_config_yaml(summary: ConfigSummary, config: dict[str, Any], *, study: str) -> str:
    header = [
        f"# Best configuration of the study in {study}:",
        f"#   {summary.label}: Recall@50 {summary.metrics['recall@50'][0]:.4f} ± "
        f"{summary.metrics['recall@50'][1]:.4f} over seeds {', '.join(map(str, summary.seeds))}",
        "# The negatives mix is dataset.negatives (rebuild the dataset with it) plus the loss",
        "# settings. Train with: twotower train --dataset DATASET --out MODEL --config THIS_FILE",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False)


# generate-logs flag -> WorldSpec field, for the command that regenerates a synthetic world.
GENERATE_FLAGS = {
    "--users": "users", "--items": "items", "--days": "days", "--seed": "seed",
    "--id-type": "id_type", "--start-date": "start_date",
    "--requests-per-user-per-day": "requests_per_user_per_day",
    "--candidates": "candidates_per_request", "--shown": "shown_per_request",
}  # fmt: skip


def generate_logs_command(logs: str) -> str | None:
    """``twotower generate-logs`` that rewrites ``logs``, when they are a generated world whose
    spec the command's flags can express; None otherwise."""
    from pipelines.synthetic import ORACLE_DIR, WorldSpec

    meta = io.join(logs, ORACLE_DIR, "meta.json")
    if not io.exists(meta):
        return None
    spec = io.read_json(meta).get("spec", {})
    defaults = config_to_dict(WorldSpec())
    expressible = set(GENERATE_FLAGS.values())
    if any(spec.get(k, v) != v for k, v in defaults.items() if k not in expressible):
        return None
    parts = ["twotower", "generate-logs", logs]
    for flag, name in GENERATE_FLAGS.items():
        if name in ("users", "items", "days", "seed") or spec.get(name) != defaults[name]:
            parts += [flag, str(spec.get(name, defaults[name]))]
    return shlex.join(parts)


def _command(
    *, logs: str | None, movielens: str | None, out: str, grid_path: str | None, results: str | None
) -> str:
    parts = ["twotower", "study"]
    if logs is not None:
        parts += ["--logs", logs]
    else:
        parts += ["--movielens"] + ([movielens] if movielens else [])
    parts += ["--out", out]
    if grid_path:
        parts += ["--grid", str(grid_path)]
    if results:
        parts += ["--results", results]
    return shlex.join(parts)


def _setup(
    *,
    logs: str | None,
    movielens: str | None,
    dataset: str,
    manifest: dict[str, Any],
    grid: StudyGrid,
    expansion: studylib.Expansion,
    executed: int,
    reused: int,
    failed: int,
    seconds: float,
    cpus: float,
) -> dict[str, Any]:
    base = grid.base_config()
    counts = manifest["counts"]
    rows_per_step = base.train.batch_size * base.train.num_workers
    steps_per_epoch = counts["train_positives"] // rows_per_step
    epochs = f"{base.train.epochs} epoch{'' if base.train.epochs == 1 else 's'}"
    if logs is not None:
        title, source = f"logs {logs}", f"`{logs}`"
    else:
        title = "MovieLens-100K"
        source = (
            f"MovieLens-100K, protocol {MOVIELENS_PROTOCOL} (a random 20% of each user's "
            "ratings held out as the eval split)"
        )
    return {
        "title": title,
        "data": source,
        "dataset": f"`{dataset}`: {counts['train_positives']:,} train rows, "
        f"{counts['eval_positives']:,} eval rows, {counts['users']:,} users, "
        f"{counts['items']:,} items",
        "negatives in the dataset": ", ".join(
            f"{s} {counts['negatives_by_source'].get(s, 0):,}" for s in NEGATIVE_SOURCES
        ),
        "budget per cell": f"{epochs} × {steps_per_epoch} steps of {rows_per_step} rows = "
        f"{steps_per_epoch * base.train.epochs:,} steps; data mixes: {grid.data_negatives} "
        f"data negatives per positive; mixed: {grid.sampled_negatives} catalog samples per step "
        f"(∝ (count + 1)^{grid.sampler_alpha:g})",
        "model": f"embedding_dim {base.model.embedding_dim}, hidden {list(base.model.hidden_dims)}, "
        f"lr {base.train.learning_rate:g}, temperature {base.loss.temperature:g}",
        "seeds": ", ".join(map(str, grid.seeds)),
        "cells": f"{len(expansion.cells)} ({len(expansion.configurations)} configurations × "
        f"seeds): {executed} trained now, {reused} reused, {failed} failed; "
        f"{len(expansion.dropped)} combinations not run",
        "wall time of this run": f"{seconds:.0f} s on {cpus:g} Ray CPUs",
    }


def run(
    *,
    out: str,
    grid: StudyGrid,
    logs: str | None = None,
    movielens: str | None = None,
    grid_path: str | None = None,
    force: bool = False,
    results: str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    command: str | None = None,
) -> StudyResult:
    """Dataset (once) → cells as Ray tasks (skipping finished ones) → report.

    ``logs``: a Contract 1 dir; or ``movielens``: an ML-100K dir ("" = the cached copy).
    """
    out, logs, movielens, results = (
        io.absolute(out),
        io.absolute(logs),
        io.absolute(movielens),
        io.absolute(results),
    )
    started = time.perf_counter()
    if (logs is None) == (movielens is None):
        raise ValueError("a study needs exactly one of --logs and --movielens")
    if logs is not None:
        from pipelines.contracts import validate_logs

        validate_logs(logs)
    else:
        _movielens_module()
    if command is None:
        command = _command(
            logs=logs, movielens=movielens, out=out, grid_path=grid_path, results=results
        )
        generate = generate_logs_command(logs) if logs is not None else None
        if generate is not None:
            command = f"{generate}\n{command}"
    dataset = io.join(out, DATASET_DIR)
    if force:
        for name in (DATASET_DIR, studylib.CELLS_DIR, REFERENCES_DIR):
            io.remove(io.join(out, name))
    io.makedirs(out)

    from jobs.ray_runtime import ensure_ray

    ensure_ray(address, num_cpus=num_cpus or (None if address else os.cpu_count()))
    if logs is not None:
        manifest = prepare_logs_dataset(logs, dataset, grid)
    else:
        manifest = prepare_movielens_dataset(movielens, dataset, grid)

    expansion = studylib.expand_grid(grid, available_sources=available_sources(manifest))
    todo = [c for c in expansion.cells if not studylib.is_done(out, c.cell_id)]
    reused = [c.cell_id for c in expansion.cells if studylib.is_done(out, c.cell_id)]
    logger.info(
        "study: %d cells (%d configurations), %d finished already, %d to train; %d combinations "
        "not run",
        len(expansion.cells),
        len(expansion.configurations),
        len(reused),
        len(todo),
        len(expansion.dropped),
    )
    ks = grid.ks
    references, references_ref = _references(out, dataset, logs, ks)
    finished = 0

    def progress(result: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        if "error" in result:
            logger.warning("[%d/%d] %s failed: %s", finished, len(todo), result["cell_id"],
                           result["error"])  # fmt: skip
            return
        logger.info(
            "[%d/%d] %s: recall@50 %.4f (%.1f s training)",
            finished,
            len(todo),
            result["cell_id"],
            result["metrics"]["recall@50"],
            result["train_seconds"],
        )

    _, failed = studylib.run_cells(dataset, todo, out=out, on_result=progress)
    import ray

    if references_ref is not None:
        references = ray.get(references_ref)
        _save_references(out, references, ks)

    results_found = [
        studylib.read_result(out, c.cell_id)
        for c in expansion.cells
        if studylib.is_done(out, c.cell_id)
    ]
    ranking = studylib.summarize(results_found)
    seconds = time.perf_counter() - started
    setup = _setup(
        logs=logs,
        movielens=movielens,
        dataset=dataset,
        manifest=manifest,
        grid=grid,
        expansion=expansion,
        executed=len(todo) - len(failed),
        reused=len(reused),
        failed=len(failed),
        seconds=seconds,
        cpus=ray.cluster_resources().get("CPU", 0.0),
    )
    best_config_path = None
    if ranking:
        best = ranking[0]
        best_result = next(r for r in results_found if r["cell_id"] == best.cell_ids[0])
        best_config_path = io.join(out, BEST_CONFIG_FILE)
        io.write_text(
            best_config_path, best_config_yaml(best, best_result["config"], study=str(out))
        )
    summary = {
        "setup": setup,
        "command": command,
        "grid": {
            "base": grid.base,
            "data_negatives": grid.data_negatives,
            "sampled_negatives": grid.sampled_negatives,
            "sampler_alpha": grid.sampler_alpha,
            "mixes": list(grid.mixes),
            "losses": list(grid.losses),
            "similarities": list(grid.similarities),
            "seeds": list(grid.seeds),
        },
        "references": references,
        "ranking": [s.to_dict() for s in ranking],
        "dropped": [d.__dict__ for d in expansion.dropped],
        "failed": failed,
    }
    io.write_json(io.join(out, SUMMARY_FILE), summary)

    def markdown(plots: dict[str, str]) -> str:
        return studylib.render_markdown(
            ranking,
            setup=setup,
            references=references,
            dropped=expansion.dropped,
            failed=failed,
            command=command,
            plots=plots,
            best_config=BEST_CONFIG_FILE if best_config_path else None,
        )

    studylib.write_bytes(io.join(out, RECALL_PLOT), studylib.plot_recall(ranking, references))
    studylib.write_bytes(io.join(out, COST_PLOT), studylib.plot_cost(ranking))
    report = io.join(out, REPORT_FILE)
    io.write_text(
        report, markdown({"Recall@50 per configuration": RECALL_PLOT, "training cost": COST_PLOT})
    )
    if results:
        prefix = str(results)
        io.write_json(prefix + ".json", summary)
        studylib.write_bytes(prefix + ".png", studylib.plot_both(ranking, references))
        name = prefix.replace("\\", "/").rsplit("/", 1)[-1]
        io.write_text(prefix + ".md", markdown({"Recall@50 and training cost": name + ".png"}))
    logger.info("study report: %s", report)
    return StudyResult(
        out=str(out),
        report=report,
        best_config=best_config_path,
        executed=[c.cell_id for c in todo if c.cell_id not in failed],
        reused=reused,
        failed=failed,
        dropped=expansion.dropped,
        ranking=ranking,
        references=references,
        seconds=seconds,
    )


def run_from_args(args: argparse.Namespace) -> int:
    grid_path = args.grid or (str(MOVIELENS_GRID) if args.movielens is not None else None)
    grid = load_grid(grid_path)
    result = run(
        out=args.out,
        grid=grid,
        logs=args.logs,
        movielens=args.movielens,
        grid_path=args.grid,
        force=args.force,
        results=args.results,
        address=args.address,
        num_cpus=args.num_cpus,
    )
    print(f"{'#':>3}  {'configuration':<48}{'Recall@50':>20}{'train s':>10}")
    for rank, summary in enumerate(result.ranking[:10], start=1):
        mean, std = summary.metrics["recall@50"]
        print(
            f"{rank:>3}  {summary.label:<48}{f'{mean:.4f} ± {std:.4f}':>20}"
            f"{summary.train_seconds[0]:>10.1f}"
        )
    for name, metrics in result.references.items():
        print(f"     {name:<48}{metrics['recall@50']:>20.4f}")
    print(
        f"study: {result.report} ({len(result.executed)} cells trained, {len(result.reused)} "
        f"reused, {len(result.failed)} failed; {result.seconds:.0f} s)"
    )
    if result.failed:
        print(f"{len(result.failed)} cells failed (see the report); rerun to retry them")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twotower study", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    raise SystemExit(main())
