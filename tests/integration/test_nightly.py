"""The nightly end to end on a local Ray: a first run publishes, rerunning it changes nothing,
the next day warm-starts from it and, refused by the gate, keeps its outputs while LATEST
stays put and the command exits 3."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from jobs import nightly
from jobs.config_io import load_config
from pipelines import io, runs

pytestmark = pytest.mark.integration

FIRST, SECOND = "2026-11-03", "2026-11-04"
# Tiny and fast; the relative-drop check is exercised in unit tests (metrics on a 300-user
# world move too much from day to day to gate on them here).
OVERRIDES = ["train.epochs=1", "nightly.window_days=2", "nightly.max_relative_drop=1.0"]


def file_stamps(root: Path) -> dict[Path, int]:
    """Every file and its mtime, lock files aside (taking a lock is not a change)."""
    return {
        path: path.stat().st_mtime_ns
        for path in root.rglob("*")
        if path.is_file() and path.name not in {runs.LOCK_FILE, runs.PUBLISH_LOCK_FILE}
    }


@pytest.fixture(scope="module")
def nightly_root(tmp_path_factory, small_world, ray_local):
    root = tmp_path_factory.mktemp("nightly") / "root"
    config = load_config("debug", OVERRIDES)
    first = nightly.run(logs=small_world.out_dir, root=str(root), config=config, date=FIRST)
    return root, first


def test_first_run_publishes_every_output(nightly_root, small_world):
    root, result = nightly_root
    assert result.status == "published" and result.published
    assert result.steps_run == runs.STEPS
    assert runs.read_latest(str(root)) == FIRST == result.latest
    paths = runs.run_paths(str(root), FIRST)
    for output in (paths.dataset, paths.model, paths.embeddings):
        assert io.is_complete(output), output
    # Contract 4: the window ends with the run's day, which is the eval split.
    build = runs.read_marker(paths, "build")
    assert (build["window"]["start"], build["window"]["end"]) == ("2026-11-02", FIRST)
    assert build["split_time"].startswith(f"{FIRST}T00:00:00")
    assert runs.read_marker(paths, "train")["init_from_run"] is None  # nothing published before
    # The gate's metric is the evaluate step's full-catalog number; training scored the same
    # model on the same split with the same function.
    metrics = runs.read_marker(paths, "evaluate")["metrics"]
    trained = io.read_json(io.join(paths.model, "metrics.json"))["best"]
    assert math.isclose(metrics["recall@50"], trained["recall@50"], rel_tol=1e-6)
    assert result.gate.passed and result.gate.value == metrics["recall@50"]
    assert io.count_rows(io.join(paths.embeddings, "items")) == small_world.rows["items"]
    report = Path(paths.report_dir)
    text = (report / "report.md").read_text()
    assert text.startswith(f"# Nightly run {FIRST}: published")
    for plot in ("metric_history.png", "negatives_per_source.png"):
        assert (report / plot).read_bytes()[:4] == b"\x89PNG"


def test_rerunning_a_finished_day_changes_nothing(nightly_root, small_world):
    root, _ = nightly_root
    before = file_stamps(root)
    again = nightly.run(
        logs=small_world.out_dir,
        root=str(root),
        config=load_config("debug", OVERRIDES),
        date=FIRST,
    )
    assert again.steps_run == () and again.status == "published"
    assert file_stamps(root) == before


def test_gated_day_keeps_outputs_and_latest_and_exits_3(nightly_root, small_world, capsys):
    root, first = nightly_root
    code = nightly.main(
        ["--logs", small_world.out_dir, "--root", str(root), "--date", SECOND, "--config", "debug"]
        + [arg for override in OVERRIDES for arg in ("--set", override)]
        + ["--set", "nightly.gate_floor=0.99"]
    )
    assert code == nightly.EXIT_GATED == 3
    err = capsys.readouterr().err
    assert f"run {SECOND} gated: recall@50" in err and "below the floor 0.9900" in err
    assert f"LATEST stays on {FIRST}" in err
    assert runs.read_latest(str(root)) == FIRST

    paths = runs.run_paths(str(root), SECOND)
    # Kept for inspection: dataset, model, the decision, the report; never embedded.
    assert io.is_complete(paths.dataset) and io.is_complete(paths.model)
    assert not io.exists(paths.embeddings)
    assert runs.finished_steps(paths) == ["build", "train", "evaluate", "gate"]
    gate = runs.read_marker(paths, "gate")
    assert gate["passed"] is False and gate["previous_run"] == FIRST
    assert gate["previous_value"] == first.metrics["recall@50"]
    # Warm start from the run LATEST names, the last one published before this day.
    train = runs.read_marker(paths, "train")
    assert train["init_from_run"] == FIRST
    assert train["init_from"] == runs.run_paths(str(root), FIRST).model
    text = (Path(paths.report_dir) / "report.md").read_text()
    assert text.startswith(f"# Nightly run {SECOND}: gated")
    assert f"| LATEST | {FIRST} |" in text
    assert f"| {FIRST} (LATEST) | published |" in text

    # Asking again changes nothing and gives the same answer.
    before = file_stamps(root)
    again = nightly.run(
        logs=small_world.out_dir,
        root=str(root),
        config=load_config("debug", [*OVERRIDES, "nightly.gate_floor=0.99"]),
        date=SECOND,
    )
    assert again.status == "gated" and again.steps_run == ()
    assert file_stamps(root) == before
