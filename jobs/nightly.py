"""Scheduled retraining for one day: build-dataset -> train (warm start from the last
published run) -> evaluate -> gate -> embed -> publish, under ROOT/runs/DATE/ with
ROOT/LATEST naming the last published run.

The run for DATE reads the log window that ends with DATE (nightly.window_days long), so its
eval split is DATE itself; run for an earlier date it sees only the days up to then and warm
starts from, and is gated against, the last run published before it.

Every step records its completion (ROOT/runs/DATE/steps/<step>.json) after its output was
published, so rerunning a date after a crash resumes at the failed step (training resumes
from its own checkpoint), and rerunning a finished date changes nothing unless --force.
A second nightly for the same root and date refuses while the first holds the run's lock.

The gate publishes only when the eval metric (nightly.gate_metric) reaches nightly.gate_floor
and did not drop by more than nightly.max_relative_drop from the previous published run. A
gated run keeps its dataset, model and report for inspection, LATEST stays where it was, and
the command exits 3 with the reason. Publishing replaces LATEST atomically and keeps the
newest nightly.retention runs. A published or a gated run writes report/report.md with plots
next to its outputs; a run that fails before its gate decided writes none.

Exit codes: 0 published (or already finished), 2 bad input or config, 3 gated, 4 locked, the
same for ``python -m jobs.nightly`` as for ``twotower nightly``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from jobs import cli
from jobs.config_io import add_config_arguments, load_config
from pipelines import io, runs
from twotower_core.config import Config, ConfigError, config_to_dict, validate

logger = logging.getLogger(__name__)

EXIT_GATED = 3
EXIT_LOCKED = 4

PUBLISHED = "published"
GATED = "gated"

# Keys that may differ between attempts of one run: how it runs, not what it computes
# (resuming on a smaller cluster is fine; a different model or window is another run).
OPERATIONAL_KEYS = frozenset(
    {
        "train.num_workers",
        "train.cpus_per_worker",
        "train.use_gpu",
        "train.torch_threads",
        "train.max_failures",
        "train.checkpoint_every_steps",
        "embed.batch_size",
        "embed.concurrency",
        "embed.cpus_per_actor",
        "embed.use_gpu",
        "dataset.num_partitions",
        "nightly.retention",
    }
)

# Seconds a publish waits for another date's publish (LATEST + retention) to finish.
PUBLISH_LOCK_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class NightlyResult:
    run_id: str
    run_dir: str
    status: str  # "published" or "gated"
    steps_run: tuple[str, ...]  # empty when the run had already finished: nothing changed
    gate: runs.GateDecision | None
    metrics: dict[str, float]
    latest: str | None  # what LATEST names after this command
    report: str | None
    removed_runs: tuple[str, ...] = ()

    @property
    def published(self) -> bool:
        return self.status == PUBLISHED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--logs", required=True, help="raw logs dir (Contract 1), shared storage on a cluster"
    )
    parser.add_argument(
        "--root", required=True, help="nightly root: runs/<date>/ and LATEST live here"
    )
    parser.add_argument(
        "--date",
        default=None,
        help="the run's day, YYYY-MM-DD: the last day of the window and the eval day "
        "(default: yesterday in UTC, the last complete day)",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="redo a finished or gated run from scratch (refused for the run LATEST names)",
    )
    parser.add_argument(
        "--cold-start",
        action="store_true",
        help="train from scratch instead of warm starting from the last published run",
    )


def default_run_date(today: date | None = None) -> str:
    """Yesterday in UTC: the newest day whose logs are complete when the schedule fires."""
    today = today or datetime.now(UTC).date()
    return (today - timedelta(days=1)).isoformat()


def nightly_config(config: Config, run_id: str) -> Config:
    """The config of the run for ``run_id``: the window ends with that day, which is the eval
    split (Contract 4). The nightly owns these dataset keys; any value they had is replaced."""
    dataset = dataclasses.replace(
        config.dataset,
        start=None,
        end=run_id,
        window_days=config.nightly.window_days,
        eval_days=1,
        split_time=None,
    )
    resolved = dataclasses.replace(config, dataset=dataset)
    validate(resolved)
    metrics = runs.gate_metric_names(resolved.train.eval_ks)
    if resolved.nightly.gate_metric not in metrics:
        raise ConfigError(
            f"nightly.gate_metric: {resolved.nightly.gate_metric!r} is not a metric evaluation "
            f"produces for train.eval_ks {list(resolved.train.eval_ks)}; valid: {', '.join(metrics)}"
        )
    return resolved


def _day_start_us(day: str) -> int:
    parsed = date.fromisoformat(day)
    return int(datetime(parsed.year, parsed.month, parsed.day, tzinfo=UTC).timestamp()) * 10**6


def check_logs(logs: str, run_id: str):
    """Validate the logs (a corrupt or malformed file fails here, named) and check they reach
    the run's day, before the lock is taken or Ray starts."""
    from pipelines.contracts import validate_logs

    info = validate_logs(logs)
    ts_range = info.ts_range_us()
    if ts_range is not None and ts_range[1] < _day_start_us(run_id):
        last = datetime.fromtimestamp(ts_range[1] / 1e6, tz=UTC).date().isoformat()
        raise ValueError(
            f"--date {run_id}: the logs in {logs} end on {last}, so the eval day has no data"
        )
    return info


# ---------------------------------------------------------------------------------------------
# the steps: each returns what its marker records


@dataclass(frozen=True)
class _Run:
    paths: runs.RunPaths
    logs: str
    config: Config
    address: str | None
    cold_start: bool

    @property
    def root(self) -> str:
        return self.paths.root


def _clear_incomplete(path: str) -> None:
    """Remove a dir without _SUCCESS (a writer died between its move and the marker).

    The run dir is the nightly job's own, so this is safe here; ``--overwrite`` elsewhere
    refuses such a dir (it may be a user's).
    """
    if io.exists(path) and not io.is_complete(path):
        logger.warning("removing %s: a previous attempt left it without _SUCCESS", path)
        io.remove(path)


def _step_build(run: _Run) -> dict[str, Any]:
    from jobs import build_dataset

    paths = run.paths
    if io.is_complete(paths.dataset):
        manifest = io.read_json(io.join(paths.dataset, "manifest.json"))
    else:
        _clear_incomplete(paths.dataset)
        manifest = build_dataset.run(
            logs=run.logs,
            out=paths.dataset,
            config=run.config,
            address=run.address,
        ).manifest
    return {
        "dataset": paths.dataset,
        "counts": manifest["counts"],
        "window": manifest["window"],
        "split_time": manifest["split_time"],
    }


def _step_train(run: _Run) -> dict[str, Any]:
    from jobs import train

    paths = run.paths
    previous = None if run.cold_start else runs.previous_published(run.root, before=paths.run_id)
    init_from = runs.run_paths(run.root, previous).model if previous else None
    if init_from is not None and not io.is_complete(init_from):
        raise FileNotFoundError(
            f"the last published run {previous} has no complete model at {init_from}; "
            "pass --cold-start to train from scratch"
        )
    if not io.is_complete(paths.model):
        logger.info(
            "training %s", f"warm-started from run {previous}" if previous else "from scratch"
        )
        _clear_incomplete(paths.model)
        train.run(
            dataset=paths.dataset,
            out=paths.model,
            config=run.config,
            init_from=init_from,
            address=run.address,
        )
    metrics = io.read_json(io.join(paths.model, "metrics.json"))
    return {
        "model": paths.model,
        "init_from": metrics.get("init_from"),
        "init_from_run": previous if metrics.get("init_from") else None,
        "best_epoch": metrics.get("best_epoch"),
        "global_step": metrics.get("global_step"),
        "resumed_at_steps": metrics.get("resumed_at_steps", []),
        "best": metrics.get("best", {}),
    }


def evaluate_model_dir(model: str, dataset: str, *, ks: tuple[int, ...]) -> dict[str, float]:
    """Full-catalog metrics of a model dir on a dataset's whole eval split (on the driver)."""
    from pipelines.checkpoint import load_model
    from pipelines.train_loop import evaluate_model, load_entity_tables, load_eval_data

    loaded = load_model(model)
    user_table, item_table, _, num_items, _ = load_entity_tables(
        dataset, loaded.user_specs, loaded.item_specs
    )
    return evaluate_model(
        loaded.model,
        user_features=user_table,
        item_features=item_table,
        num_items=num_items,
        eval_data=load_eval_data(dataset, max_users=None, seed=0),
        similarity=loaded.config.loss.similarity,
        ks=tuple(ks),
    )


def _step_evaluate(run: _Run) -> dict[str, Any]:
    from pipelines.evaluation import evaluate_popularity

    ks = tuple(run.config.train.eval_ks)
    return {
        "metrics": evaluate_model_dir(run.paths.model, run.paths.dataset, ks=ks),
        "baseline": evaluate_popularity(run.paths.dataset, ks=ks),
    }


def _step_gate(run: _Run) -> dict[str, Any]:
    metrics = runs.read_marker(run.paths, "evaluate")["metrics"]
    previous = runs.previous_published(run.root, before=run.paths.run_id)
    previous_metrics = None
    if previous is not None:
        marker = runs.read_marker(runs.run_paths(run.root, previous), "evaluate") or {}
        previous_metrics = marker.get("metrics")
    decision = runs.decide_gate(
        metrics,
        config=run.config.nightly,
        previous_run=previous,
        previous_metrics=previous_metrics,
    )
    logger.info("gate %s", decision.summary())
    return decision.to_dict()


def _step_embed(run: _Run) -> dict[str, Any]:
    from jobs import embed

    paths = run.paths
    if io.is_complete(paths.embeddings):
        manifest = io.read_json(io.join(paths.embeddings, "manifest.json"))
    else:
        _clear_incomplete(paths.embeddings)
        manifest = embed.run(
            model=paths.model,
            out=paths.embeddings,
            config=run.config,
            dataset=paths.dataset,
            address=run.address,
        ).manifest
    return {"embeddings": paths.embeddings, "counts": manifest["counts"], "dim": manifest["dim"]}


def _step_publish(run: _Run) -> dict[str, Any]:
    from pipelines.report import write_report

    paths, nightly = run.paths, run.config.nightly
    publish_lock = io.join(run.root, runs.PUBLISH_LOCK_FILE)
    with runs.RunLock(
        publish_lock, what=f"publishing under {run.root}", timeout=PUBLISH_LOCK_TIMEOUT_SECONDS
    ):
        current = runs.read_latest(run.root)
        # A backfill of an older day is published (others may warm start from it) but
        # never moves LATEST backwards.
        moves = current is None or current <= paths.run_id
        latest = paths.run_id if moves else current
        # The report is written first: if it fails, LATEST has not moved and a rerun retries.
        report = write_report(
            run.root,
            paths.run_id,
            gate_metric=nightly.gate_metric,
            floor=nightly.gate_floor,
            status=PUBLISHED,
            latest=latest,
        )
        if moves:
            runs.write_latest(run.root, paths.run_id)
        removed = runs.apply_retention(
            run.root, keep=nightly.retention, protected={latest, paths.run_id}
        )
    if removed:
        logger.info("retention removed runs %s", ", ".join(removed))
    return {
        "latest": latest,
        "moved_latest": moves,
        "removed_runs": removed,
        "report": report.markdown,
    }


STEP_FUNCTIONS: dict[str, Callable[[_Run], dict[str, Any]]] = {
    "build": _step_build,
    "train": _step_train,
    "evaluate": _step_evaluate,
    "gate": _step_gate,
    "embed": _step_embed,
    "publish": _step_publish,
}
assert tuple(STEP_FUNCTIONS) == runs.STEPS


# ---------------------------------------------------------------------------------------------
# the job


def _finished_status(paths: runs.RunPaths) -> str | None:
    if runs.read_marker(paths, "publish") is not None:
        return PUBLISHED
    gate = runs.read_marker(paths, "gate")
    if gate is not None and not gate["passed"]:
        return GATED
    return None


def _result(
    paths: runs.RunPaths, status: str, steps_run: list[str], removed: tuple[str, ...] = ()
) -> NightlyResult:
    gate = runs.read_marker(paths, "gate")
    evaluate = runs.read_marker(paths, "evaluate") or {}
    report = io.join(paths.report_dir, "report.md")
    return NightlyResult(
        run_id=paths.run_id,
        run_dir=paths.run_dir,
        status=status,
        steps_run=tuple(steps_run),
        gate=runs.GateDecision.from_dict(gate) if gate else None,
        metrics=evaluate.get("metrics", {}),
        latest=runs.read_latest(paths.root),
        report=report if io.exists(report) else None,
        removed_runs=removed,
    )


def _check_record(
    paths: runs.RunPaths, record: dict[str, Any], *, logs: str, config: Config
) -> None:
    differences = runs.config_differences(
        record["config"], config_to_dict(config), ignore=OPERATIONAL_KEYS
    )
    if record.get("logs") != logs:
        differences.append(f"--logs (was {record.get('logs')})")
    if differences:
        raise ValueError(
            f"run {paths.run_id} under {paths.root} was started with different settings "
            f"({', '.join(differences)}); rerun with the same ones to resume, or pass --force "
            "to redo the run from scratch"
        )


def _open_record(
    paths: runs.RunPaths, *, logs: str, config: Config, force: bool
) -> dict[str, Any] | None:
    """The run's record, after --force cleared the run or a rerun's settings were checked."""
    record = runs.read_run_record(paths)
    if force and (record is not None or runs.finished_steps(paths)):
        if runs.read_latest(paths.root) == paths.run_id:
            raise ValueError(
                f"run {paths.run_id} is the published run (LATEST names it): --force would "
                "replace live outputs; publish a later day first"
            )
        logger.info("--force: removing run %s", paths.run_id)
        runs.clear_run(paths)
        return None
    if record is not None:
        _check_record(paths, record, logs=logs, config=config)
    return record


def _start_attempt(
    paths: runs.RunPaths, record: dict[str, Any] | None, *, logs: str, config: Config
) -> list[str]:
    """Record this attempt, clear what a killed one left, and say which steps are done."""
    if record is None:
        record = {
            "run_id": paths.run_id,
            "logs": logs,
            "config": config_to_dict(config),
            "created_at": io.utc_now(),
            "attempts": [],
        }
    done = runs.finished_steps(paths)
    record["attempts"].append(
        {
            "started_at": io.utc_now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "resumed_after": done[-1] if done else None,
        }
    )
    runs.write_run_record(paths, record)
    leftovers = runs.remove_leftovers(paths)
    if leftovers:
        logger.info("removed leftovers of an interrupted attempt: %s", ", ".join(leftovers))
    if done:
        logger.info("resuming run %s after step %s", paths.run_id, done[-1])
    return done


def _run_steps(context: _Run, done: list[str]) -> NightlyResult:
    """Every step without a marker, in order; a refusing gate ends the run with its report."""
    paths, config = context.paths, context.config
    steps_run: list[str] = []
    for step in runs.STEPS:
        if step in done:
            continue
        logger.info("run %s: %s", paths.run_id, step)
        started = time.perf_counter()
        marker = STEP_FUNCTIONS[step](context)
        marker["seconds"] = round(time.perf_counter() - started, 3)
        runs.write_marker(paths, step, marker)
        steps_run.append(step)
        if step == "gate" and not marker["passed"]:
            from pipelines.report import write_report

            write_report(
                paths.root,
                paths.run_id,
                gate_metric=config.nightly.gate_metric,
                floor=config.nightly.gate_floor,
                latest=runs.read_latest(paths.root),
            )
            return _result(paths, GATED, steps_run)
    removed = tuple(runs.read_marker(paths, "publish").get("removed_runs", ()))
    return _result(paths, PUBLISHED, steps_run, removed)


def run(
    *,
    logs: str,
    root: str,
    config: Config,
    date: str | None = None,
    address: str | None = None,
    force: bool = False,
    cold_start: bool = False,
) -> NightlyResult:
    """Run, resume or confirm the nightly for one day. The config, the logs and the lock are
    checked before any Ray work starts."""
    logs, root = io.absolute(logs), io.absolute(root)
    run_id = runs.validate_run_id(date or default_run_date())
    config = nightly_config(config, run_id)
    paths = runs.run_paths(root, run_id)
    check_logs(logs, run_id)

    with runs.RunLock(paths.lock, what=f"nightly run {run_id} under {paths.root}"):
        record = _open_record(paths, logs=logs, config=config, force=force)
        finished = _finished_status(paths) if record is not None else None
        if finished is not None:
            logger.info("run %s already %s; nothing to do", run_id, finished)
            return _result(paths, finished, [])
        done = _start_attempt(paths, record, logs=logs, config=config)
        context = _Run(
            paths=paths, logs=logs, config=config, address=address, cold_start=cold_start
        )
        return _run_steps(context, done)


def run_from_args(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    try:
        result = run(
            logs=args.logs,
            root=args.root,
            config=config,
            date=args.date,
            address=args.address,
            force=args.force,
            cold_start=args.cold_start,
        )
    except runs.RunLockedError as error:
        print(f"twotower nightly: {error}; not started", file=sys.stderr)
        return EXIT_LOCKED
    done = ", ".join(result.steps_run) if result.steps_run else "none (already finished)"
    if result.status == GATED:
        reasons = "; ".join(result.gate.reasons) if result.gate else "?"
        print(
            f"twotower nightly: run {result.run_id} gated: {reasons}. LATEST stays on "
            f"{result.latest or '(none)'}; outputs kept in {result.run_dir}",
            file=sys.stderr,
        )
        return EXIT_GATED
    print(
        f"nightly {result.run_id}: {result.status} ({result.gate.summary() if result.gate else ''}); "
        f"LATEST = {result.latest}; steps run: {done}; report: {result.report}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.nightly ARGS`` (a RayJob or CronJob entrypoint) is ``twotower nightly
    ARGS``: the CLI maps bad input to exit 2 with one line, so a scheduler reading the exit
    code sees the same codes whichever entrypoint it runs."""
    return cli.main(["nightly", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
