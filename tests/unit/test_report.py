"""The nightly run report: Markdown built from the registry's markers, and two real PNGs."""

from __future__ import annotations

import io as _stdio

import pytest

from pipelines import report, runs
from twotower_core.config import NightlyConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GATE = NightlyConfig(gate_metric="recall@50", gate_floor=0.1, max_relative_drop=0.1)


def add_run(root, run_id, *, recall, negatives, publish, previous=None, init_from_run=None):
    """Markers as the nightly job writes them, with the gate decided by the real rule."""
    paths = runs.run_paths(str(root), run_id)
    runs.write_marker(
        paths,
        "build",
        {
            "counts": {
                "train_positives": 1000,
                "eval_positives": 120,
                "negatives_by_source": dict(
                    zip(("exposed_not_clicked", "ranked_out", "unexposed"), negatives)
                ),
                "fills": {"total": 3},
            },
            "window": {"start": "2026-11-01", "end": run_id},
            "split_time": f"{run_id}T00:00:00+00:00",
            "seconds": 12.5,
        },
    )
    runs.write_marker(paths, "train", {"init_from_run": init_from_run, "seconds": 30.0})
    metrics = {"recall@10": recall / 2, "recall@50": recall, "ndcg@10": 0.05, "eval_users": 40.0}
    runs.write_marker(
        paths, "evaluate", {"metrics": metrics, "baseline": {"recall@50": 0.08, "recall@10": 0.02}}
    )
    previous_metrics = None
    if previous is not None:
        previous_metrics = runs.read_marker(runs.run_paths(str(root), previous), "evaluate")[
            "metrics"
        ]
    decision = runs.decide_gate(
        metrics, config=GATE, previous_run=previous, previous_metrics=previous_metrics
    )
    runs.write_marker(paths, "gate", decision.to_dict())
    if publish:
        assert decision.passed
        runs.write_marker(paths, "publish", {"latest": run_id})
    return paths


@pytest.fixture
def history_root(tmp_path):
    add_run(tmp_path, "2026-11-02", recall=0.30, negatives=(100, 200, 400), publish=True)
    add_run(
        tmp_path,
        "2026-11-03",
        recall=0.20,
        negatives=(90, 180, 420),
        publish=False,
        previous="2026-11-02",
        init_from_run="2026-11-02",
    )
    add_run(
        tmp_path,
        "2026-11-04",
        recall=0.29,
        negatives=(110, 190, 400),
        publish=False,
        previous="2026-11-02",
        init_from_run="2026-11-02",
    )
    return tmp_path


def test_history_reads_status_from_markers(history_root):
    history = report.collect_history(str(history_root))
    assert [(r.run_id, r.status) for r in history] == [
        ("2026-11-02", "published"),
        ("2026-11-03", "gated"),  # 0.20 < 0.30 * 0.9 = 0.27
        ("2026-11-04", "incomplete"),  # passed the gate, not published yet
    ]
    assert history[1].negatives_by_source == {
        "exposed_not_clicked": 90,
        "ranked_out": 180,
        "unexposed": 420,
    }


def test_report_page_says_what_happened(history_root):
    result = report.write_report(
        str(history_root),
        "2026-11-04",
        gate_metric="recall@50",
        floor=0.1,
        status="published",
        latest="2026-11-04",
    )
    text = open(result.markdown).read()
    assert text.startswith("# Nightly run 2026-11-04: published\n")
    assert "| model | warm start from run 2026-11-02 |" in text
    # 0.29 >= 0.30 * 0.9 = 0.27: passed, and the line shows both numbers.
    assert "passed: recall@50 0.2900 (floor 0.1000; run 2026-11-02 had 0.3000" in text
    assert "| **recall@50** | 0.2900 | 0.0800 |" in text
    assert "| 2026-11-02 | published | 0.3000 | 0.1500 |" in text
    assert "| 2026-11-03 | gated | 0.2000 |" in text
    assert "| 2026-11-04 (LATEST) | published | 0.2900 |" in text
    # Shares of 110 / 190 / 400 negatives (700 in all).
    assert "| exposed_not_clicked | 110 | 15.7% |" in text
    assert "| unexposed | 400 | 57.1% |" in text
    assert "3 negatives were filled from unexposed" in text
    assert "![recall@50 across runs](metric_history.png)" in text
    assert "![negatives per source](negatives_per_source.png)" in text
    assert "| build |" in text and "| 12.5 |" in text
    for path in result.plots.values():
        assert open(path, "rb").read(8) == PNG_MAGIC


def test_gated_report_gives_the_reason(history_root):
    result = report.write_report(
        str(history_root), "2026-11-03", gate_metric="recall@50", latest="2026-11-02"
    )
    text = open(result.markdown).read()
    assert text.startswith("# Nightly run 2026-11-03: gated\n")
    assert "refused: recall@50 0.2000 dropped more than 10% from 0.3000 in run 2026-11-02" in text
    assert "| LATEST | 2026-11-02 |" in text


def test_plots_are_real_images_even_without_runs(history_root):
    from matplotlib.image import imread

    history = report.collect_history(str(history_root))
    for data in (
        report.plot_metric_history(history, gate_metric="recall@50", floor=0.1),
        report.plot_negatives_per_source(history),
        report.plot_metric_history([], gate_metric="recall@50"),
        report.plot_negatives_per_source([]),
    ):
        assert data[:8] == PNG_MAGIC
        height, width, _ = imread(_stdio.BytesIO(data), format="png").shape
        assert width > 300 and height > 150


def test_cold_start_and_missing_metrics_render():
    current = report.RunSummary(run_id="2026-11-02", status="incomplete")
    text = report.render_markdown(
        current, [current], gate_metric="recall@50", latest=None, plots={}
    )
    assert "cold start (no earlier published run)" in text
    assert "| LATEST | (none) |" in text
    assert "| 2026-11-02 | incomplete | – |" in text
