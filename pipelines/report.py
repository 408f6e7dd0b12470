"""The nightly run report: a short Markdown page plus two PNG plots next to a run's outputs.

``report/report.md`` says what the run did (window, warm start, gate decision, where LATEST
points), its metrics next to the popularity baseline, the metric history across every run
under the root, negatives per source and step timings. ``metric_history.png`` plots the gate
metric across runs (published, gated, baseline, floor); ``negatives_per_source.png`` stacks
the negatives of each source per run. Everything is read from the run registry
(``pipelines.runs``); rendering is pure, plotting uses matplotlib's Agg canvas (no display).
"""

from __future__ import annotations

import io as _stdio
from dataclasses import dataclass, field
from typing import Any

from pipelines import io, runs
from twotower_core.config import NEGATIVE_SOURCES

REPORT_FILE = "report.md"
METRIC_PLOT = "metric_history.png"
NEGATIVES_PLOT = "negatives_per_source.png"

STATUS_PUBLISHED = "published"
STATUS_GATED = "gated"
STATUS_INCOMPLETE = "incomplete"

# Metric columns of the history table besides the gate metric, when evaluation produced them.
HISTORY_METRICS = ("recall@10", "recall@50", "ndcg@10", "mrr")
_SOURCE_COLORS = {"exposed_not_clicked": "#4c72b0", "ranked_out": "#dd8452", "unexposed": "#55a868"}


@dataclass(frozen=True)
class RunSummary:
    """What the registry knows about one run."""

    run_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    window: dict[str, Any] | None = None
    split_time: str | None = None
    init_from_run: str | None = None
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def negatives_by_source(self) -> dict[str, int]:
        found = self.counts.get("negatives_by_source", {})
        return {source: int(found.get(source, 0)) for source in NEGATIVE_SOURCES}


@dataclass(frozen=True)
class ReportResult:
    markdown: str
    plots: dict[str, str]


def summarize_run(root: str, run_id: str) -> RunSummary:
    paths = runs.run_paths(root, run_id)
    steps = {step: marker for step in runs.STEPS if (marker := runs.read_marker(paths, step))}
    gate = steps.get("gate")
    if "publish" in steps:
        status = STATUS_PUBLISHED
    elif gate is not None and not gate.get("passed", False):
        status = STATUS_GATED
    else:
        status = STATUS_INCOMPLETE
    build = steps.get("build", {})
    evaluate = steps.get("evaluate", {})
    return RunSummary(
        run_id=run_id,
        status=status,
        metrics=dict(evaluate.get("metrics", {})),
        baseline=dict(evaluate.get("baseline", {})),
        gate=gate,
        counts=dict(build.get("counts", {})),
        window=build.get("window"),
        split_time=build.get("split_time"),
        init_from_run=steps.get("train", {}).get("init_from_run"),
        steps=steps,
    )


def collect_history(root: str) -> list[RunSummary]:
    """Every run under the root, oldest first."""
    return [summarize_run(root, run_id) for run_id in runs.list_runs(root)]


# ---------------------------------------------------------------------------------------------
# Markdown (pure)


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _metric_order(key: str) -> tuple[str, int]:
    """``recall@10`` before ``recall@50`` before ``recall@100``."""
    name, _, k = key.partition("@")
    return name, int(k) if k.isdigit() else 0


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(
    current: RunSummary,
    history: list[RunSummary],
    *,
    gate_metric: str,
    latest: str | None,
    plots: dict[str, str],
) -> str:
    """The report page. ``plots`` maps a plot's title to its file name (relative links)."""
    lines = [f"# Nightly run {current.run_id}: {current.status}", ""]
    window = current.window or {}
    facts = [
        [
            "window",
            f"{window.get('start', '?')} .. {window.get('end', '?')} "
            f"(eval day {current.run_id}, split at {current.split_time or '?'})",
        ],
        [
            "model",
            f"warm start from run {current.init_from_run}"
            if current.init_from_run
            else "cold start (no earlier published run)",
        ],
    ]
    if current.gate is not None:
        decision = runs.GateDecision.from_dict(current.gate)
        facts.append(["gate", decision.summary()])
    facts.append(["LATEST", latest or "(none)"])
    lines += _table(["", ""], facts) + [""]

    if current.metrics:
        lines += ["## Metrics on the eval day", ""]
        keys = sorted((k for k in current.metrics if k != "eval_users"), key=_metric_order)
        rows = [
            [
                f"**{key}**" if key == gate_metric else key,
                _number(current.metrics[key]),
                _number(current.baseline.get(key)),
            ]
            for key in keys
        ]
        lines += _table(["metric", "model", "popularity"], rows)
        lines += ["", f"{int(current.metrics.get('eval_users', 0))} eval users.", ""]

    lines += [f"## History (gate metric: {gate_metric})", ""]
    columns = [gate_metric] + [m for m in HISTORY_METRICS if m != gate_metric]
    rows = []
    for run in history:
        marker = " (LATEST)" if run.run_id == latest else ""
        rows.append(
            [f"{run.run_id}{marker}", run.status]
            + [_number(run.metrics.get(m)) for m in columns]
            + [
                _number(run.counts.get("train_positives")),
                _number(run.counts.get("eval_positives")),
            ]
        )
    lines += _table(["run", "status", *columns, "train positives", "eval positives"], rows)
    lines += [""]

    negatives = current.negatives_by_source
    if current.counts:
        total = sum(negatives.values())
        fills = current.counts.get("fills", {})
        lines += ["## Negatives per source (this run)", ""]
        rows = [
            [source, _number(count), f"{count / total:.1%}" if total else "–"]
            for source, count in negatives.items()
        ]
        lines += _table(["source", "negatives", "share"], rows)
        lines += [
            "",
            f"{_number(fills.get('total', 0))} negatives were filled from unexposed "
            "(a source had fewer candidates than configured).",
            "",
        ]

    for title, file_name in plots.items():
        lines += [f"![{title}]({file_name})", ""]

    if current.steps:
        lines += ["## Steps", ""]
        rows = [
            [step, str(marker.get("finished_at", "")), _number(marker.get("seconds"), 1)]
            for step, marker in current.steps.items()
        ]
        lines += _table(["step", "finished at", "seconds"], rows) + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots


def _png_bytes(figure) -> bytes:
    buffer = _stdio.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def plot_metric_history(
    history: list[RunSummary], *, gate_metric: str, floor: float | None = None
) -> bytes:
    """PNG: the gate metric of every evaluated run; published dots, gated crosses."""
    from matplotlib.figure import Figure

    evaluated = [run for run in history if gate_metric in run.metrics]
    figure = Figure(figsize=(7, 3.5))
    axes = figure.add_subplot()
    labels = [run.run_id for run in evaluated]
    values = [run.metrics[gate_metric] for run in evaluated]
    axes.plot(labels, values, color="#4c72b0", linewidth=1, zorder=1)
    for status, style in (
        (STATUS_PUBLISHED, {"marker": "o", "color": "#4c72b0", "label": "published"}),
        (STATUS_GATED, {"marker": "x", "color": "#c44e52", "label": "gated"}),
        (STATUS_INCOMPLETE, {"marker": "s", "color": "#8c8c8c", "label": "incomplete"}),
    ):
        points = [
            (run.run_id, run.metrics[gate_metric]) for run in evaluated if run.status == status
        ]
        if points:
            xs, ys = zip(*points)
            axes.scatter(xs, ys, zorder=2, s=40, **style)
    baseline = [
        (run.run_id, run.baseline[gate_metric]) for run in evaluated if gate_metric in run.baseline
    ]
    if baseline:
        xs, ys = zip(*baseline)
        axes.plot(xs, ys, linestyle="--", color="#8c8c8c", label="popularity")
    if floor is not None and floor > 0:
        axes.axhline(floor, color="#c44e52", linestyle=":", label="gate floor")
    axes.set_ylabel(gate_metric)
    axes.set_xlabel("run (eval day)")
    axes.set_title(f"{gate_metric} across nightly runs")
    axes.tick_params(axis="x", labelrotation=45)
    if evaluated:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        axes.text(0.5, 0.5, "no evaluated run yet", ha="center", transform=axes.transAxes)
    return _png_bytes(figure)


def plot_negatives_per_source(history: list[RunSummary]) -> bytes:
    """PNG: stacked negatives per source for every built run."""
    from matplotlib.figure import Figure

    built = [run for run in history if run.counts]
    figure = Figure(figsize=(7, 3.5))
    axes = figure.add_subplot()
    labels = [run.run_id for run in built]
    bottoms = [0] * len(built)
    for source in NEGATIVE_SOURCES:
        heights = [run.negatives_by_source[source] for run in built]
        axes.bar(labels, heights, bottom=bottoms, label=source, color=_SOURCE_COLORS[source])
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    axes.set_ylabel("negatives")
    axes.set_xlabel("run")
    axes.set_title("negatives per source")
    axes.tick_params(axis="x", labelrotation=45)
    if built:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return _png_bytes(figure)


def _write_bytes(path: str, data: bytes) -> None:
    fs, inner = io.resolve(path)
    with fs.open_output_stream(inner) as stream:
        stream.write(data)


# ---------------------------------------------------------------------------------------------
# the job-facing entry point


def write_report(
    root: str,
    run_id: str,
    *,
    gate_metric: str,
    floor: float | None = None,
    status: str | None = None,
    latest: str | None = None,
) -> ReportResult:
    """Write ``runs/<run_id>/report/`` (Markdown + plots) from the registry.

    ``status`` overrides the current run's status as the markers tell it: the publish step
    writes its report before it flips LATEST and writes its own marker.
    """
    paths = runs.run_paths(root, run_id)
    history = collect_history(root)
    current = next((run for run in history if run.run_id == run_id), None)
    if current is None:
        current = summarize_run(root, run_id)
        history.append(current)
    if status is not None:
        current = RunSummary(**{**current.__dict__, "status": status})
        history = [current if run.run_id == run_id else run for run in history]
    io.makedirs(paths.report_dir)
    plots = {
        f"{gate_metric} across runs": METRIC_PLOT,
        "negatives per source": NEGATIVES_PLOT,
    }
    _write_bytes(
        io.join(paths.report_dir, METRIC_PLOT),
        plot_metric_history(history, gate_metric=gate_metric, floor=floor),
    )
    _write_bytes(io.join(paths.report_dir, NEGATIVES_PLOT), plot_negatives_per_source(history))
    markdown = render_markdown(
        current, history, gate_metric=gate_metric, latest=latest, plots=plots
    )
    io.write_text(io.join(paths.report_dir, REPORT_FILE), markdown)
    return ReportResult(
        markdown=io.join(paths.report_dir, REPORT_FILE),
        plots={name: io.join(paths.report_dir, name) for name in plots.values()},
    )
