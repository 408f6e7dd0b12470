"""The nightly run registry (pipelines.runs) and the nightly job's checks that need no Ray:
markers, LATEST, the gate's arithmetic, retention, the lock, and refusals before any work."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import pytest

from pipelines import runs
from twotower_core.config import ConfigError, NightlyConfig, config_to_dict, debug_config

REPO = Path(__file__).resolve().parents[2]


def make_run(root: Path, run_id: str, *, steps=(), metrics=None) -> runs.RunPaths:
    """A run dir with markers for ``steps`` (evaluate gets ``metrics``)."""
    paths = runs.run_paths(str(root), run_id)
    for step in steps:
        record = {"metrics": metrics or {}} if step == "evaluate" else {}
        runs.write_marker(paths, step, record)
    return paths


# ---------------------------------------------------------------------------------------------
# ids, paths, markers


@pytest.mark.parametrize("text", ["2026-11-4", "2026-13-01", "latest", "2026-11-04T00:00", ""])
def test_run_ids_are_calendar_dates(text):
    with pytest.raises(ValueError, match="--date: expected a date YYYY-MM-DD"):
        runs.validate_run_id(text)
    assert runs.validate_run_id("2026-11-04") == "2026-11-04"


def test_run_layout_follows_contract_4(tmp_path):
    paths = runs.run_paths(str(tmp_path), "2026-11-04")
    assert paths.run_dir == str(tmp_path / "runs" / "2026-11-04")
    assert paths.dataset == str(tmp_path / "runs" / "2026-11-04" / "dataset")
    assert paths.model.endswith("runs/2026-11-04/model")
    assert paths.embeddings.endswith("runs/2026-11-04/embeddings")
    assert paths.marker("gate").endswith("runs/2026-11-04/steps/gate.json")
    with pytest.raises(ValueError, match="unknown step 'deploy'; valid: build, train"):
        paths.marker("deploy")
    uri = runs.run_paths("s3://bucket/twotower/", "2026-11-04")
    assert uri.model == "s3://bucket/twotower/runs/2026-11-04/model"


def test_markers_are_written_whole_and_list_finished_steps(tmp_path):
    paths = runs.run_paths(str(tmp_path), "2026-11-04")
    assert runs.read_marker(paths, "build") is None
    runs.write_marker(paths, "build", {"counts": {"train_positives": 7}})
    runs.write_marker(paths, "gate", {"passed": False})
    marker = runs.read_marker(paths, "build")
    assert marker["counts"] == {"train_positives": 7}
    assert marker["step"] == "build" and marker["run_id"] == "2026-11-04"
    assert runs.finished_steps(paths) == ["build", "gate"]
    # replace_file_atomically leaves no temp file behind.
    assert sorted(os.listdir(tmp_path / "runs" / "2026-11-04" / "steps")) == [
        "build.json",
        "gate.json",
    ]


def test_list_runs_ignores_non_dates(tmp_path):
    for name in ("2026-11-04", "2026-11-02", "notes", ".2026-11-05._staging-x"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs" / "2026-11-09").write_text("a file, not a run")
    assert runs.list_runs(str(tmp_path)) == ["2026-11-02", "2026-11-04"]
    assert runs.list_runs(str(tmp_path / "missing")) == []


def test_config_differences_name_dotted_keys():
    before = {"train": {"epochs": 2, "num_workers": 2}, "loss": {"name": "bpr"}, "x": 1}
    after = {"train": {"epochs": 3, "num_workers": 4}, "loss": {"name": "bpr"}, "y": 1}
    assert runs.config_differences(before, after) == [
        "train.epochs",
        "train.num_workers",
        "x",
        "y",
    ]
    assert runs.config_differences(before, after, ignore=frozenset({"train.num_workers"})) == [
        "train.epochs",
        "x",
        "y",
    ]


def test_leftovers_of_a_killed_writer_are_removed_but_not_training_state(tmp_path):
    paths = runs.run_paths(str(tmp_path), "2026-11-04")
    run_dir = Path(paths.run_dir)
    for name in (".embeddings._staging-abc", ".model._replaced-def", ".model._train", "dataset"):
        (run_dir / name).mkdir(parents=True)
    assert sorted(runs.remove_leftovers(paths)) == [
        ".embeddings._staging-abc",
        ".model._replaced-def",
    ]
    assert sorted(os.listdir(run_dir)) == [".model._train", "dataset"]
    runs.clear_run(paths)
    assert os.listdir(run_dir) == []


# ---------------------------------------------------------------------------------------------
# LATEST and the published runs


def test_latest_is_replaced_atomically(tmp_path):
    root = str(tmp_path)
    assert runs.read_latest(root) is None
    runs.write_latest(root, "2026-11-03")
    runs.write_latest(root, "2026-11-04")
    assert runs.read_latest(root) == "2026-11-04"
    assert (tmp_path / "LATEST").read_text() == "2026-11-04\n"
    assert os.listdir(tmp_path) == ["LATEST"]
    with pytest.raises(ValueError):
        runs.write_latest(root, "not-a-date")


def test_previous_published_never_looks_ahead(tmp_path):
    make_run(tmp_path, "2026-11-01", steps=["publish"])
    make_run(tmp_path, "2026-11-02", steps=["gate"])  # gated or unfinished: not published
    make_run(tmp_path, "2026-11-03", steps=["publish"])
    make_run(tmp_path, "2026-11-05", steps=["publish"])
    root = str(tmp_path)
    assert runs.published_runs(root) == ["2026-11-01", "2026-11-03", "2026-11-05"]
    assert runs.previous_published(root, before="2026-11-04") == "2026-11-03"
    # A backfill of 11-02 warm starts from 11-01, not from a model that saw later days.
    assert runs.previous_published(root, before="2026-11-02") == "2026-11-01"
    assert runs.previous_published(root, before="2026-11-01") is None


# ---------------------------------------------------------------------------------------------
# the gate


GATE = NightlyConfig(gate_metric="recall@50", gate_floor=0.2, max_relative_drop=0.1)


def test_gate_passes_above_floor_and_within_the_allowed_drop():
    # Previous 0.40, drop 10%: lowest allowed 0.40 * 0.9 = 0.36.
    decision = runs.decide_gate(
        {"recall@50": 0.36, "eval_users": 12.0},
        config=GATE,
        previous_run="2026-11-03",
        previous_metrics={"recall@50": 0.40},
    )
    assert decision.passed and decision.reasons == ()
    assert decision.previous_run == "2026-11-03" and decision.previous_value == 0.40
    assert decision.summary().startswith("passed: recall@50 0.3600 (floor 0.2000; run 2026-11-03")


def test_gate_refuses_a_drop_larger_than_allowed():
    decision = runs.decide_gate(
        {"recall@50": 0.35},
        config=GATE,
        previous_run="2026-11-03",
        previous_metrics={"recall@50": 0.40},
    )
    assert not decision.passed
    (reason,) = decision.reasons
    assert "dropped more than 10% from 0.4000 in run 2026-11-03" in reason
    assert "lowest allowed 0.3600" in reason and "nightly.max_relative_drop" in reason


def test_gate_refuses_below_floor_even_without_a_previous_run():
    decision = runs.decide_gate({"recall@50": 0.19}, config=GATE)
    assert not decision.passed
    assert decision.reasons == ("recall@50 0.1900 is below the floor 0.2000 (nightly.gate_floor)",)
    assert decision.previous_run is None


def test_gate_gives_every_reason_and_refuses_nan_and_empty_eval():
    decision = runs.decide_gate(
        {"recall@50": 0.1, "eval_users": 0.0},
        config=GATE,
        previous_run="2026-11-03",
        previous_metrics={"recall@50": 0.5},
    )
    assert len(decision.reasons) == 3
    assert decision.reasons[0] == "the eval split has no users with a held-out positive"
    nan = runs.decide_gate({"recall@50": math.nan}, config=GATE)
    assert nan.reasons == ("recall@50 is nan",)


def test_gate_without_the_metric_in_the_previous_run_only_checks_the_floor():
    decision = runs.decide_gate(
        {"recall@50": 0.3},
        config=GATE,
        previous_run="2026-11-03",
        previous_metrics={"ndcg@10": 0.9},
    )
    assert decision.passed and decision.previous_run is None


def test_gate_metric_must_be_evaluated():
    with pytest.raises(ValueError, match=r"nightly.gate_metric: 'recall@20' is not among"):
        runs.decide_gate(
            {"recall@50": 0.3, "mrr": 0.1}, config=NightlyConfig(gate_metric="recall@20")
        )
    assert "ndcg@10" in runs.gate_metric_names((10, 50))
    assert "recall@20" not in runs.gate_metric_names((10, 50))


def test_gate_decision_round_trips_through_its_marker():
    decision = runs.decide_gate({"recall@50": 0.1}, config=GATE)
    again = runs.GateDecision.from_dict(json.loads(json.dumps(decision.to_dict())))
    assert again == decision


# ---------------------------------------------------------------------------------------------
# retention


def test_retention_keeps_the_newest_and_the_protected():
    ids = [f"2026-11-0{d}" for d in range(1, 7)]
    assert runs.runs_to_delete(ids, keep=3, protected=set()) == ids[:3]
    # LATEST stuck on 11-02 (later runs gated) survives.
    assert runs.runs_to_delete(ids, keep=3, protected={"2026-11-02"}) == [
        "2026-11-01",
        "2026-11-03",
    ]
    assert runs.runs_to_delete(ids[:2], keep=3, protected=set()) == []
    with pytest.raises(ValueError, match="nightly.retention"):
        runs.runs_to_delete(ids, keep=0, protected=set())


def test_apply_retention_skips_a_run_in_progress(tmp_path):
    for day in range(1, 5):
        make_run(tmp_path, f"2026-11-0{day}", steps=["publish"])
    busy = runs.run_paths(str(tmp_path), "2026-11-01")
    with runs.RunLock(busy.lock):
        removed = runs.apply_retention(str(tmp_path), keep=1, protected={"2026-11-04"})
    assert removed == ["2026-11-02", "2026-11-03"]
    assert runs.list_runs(str(tmp_path)) == ["2026-11-01", "2026-11-04"]


# ---------------------------------------------------------------------------------------------
# the lock

_HOLD_LOCK = """
import sys, time
from pipelines import runs
with runs.RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_holder_is_refused_and_a_dead_holder_releases_at_once(tmp_path):
    lock = str(tmp_path / "runs" / "2026-11-04" / ".lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, lock],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runs.RunLockedError, match=rf"locked by pid {holder.pid} on "):
            with runs.RunLock(lock, what="nightly run 2026-11-04"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's flock: no stale lock to clean up.
    with runs.RunLock(lock):
        pass


def test_lock_is_exclusive_within_a_process_and_reusable_after_release(tmp_path):
    lock = str(tmp_path / ".lock")
    with runs.RunLock(lock):
        with pytest.raises(runs.RunLockedError):
            runs.RunLock(lock).__enter__()
    with runs.RunLock(lock):
        pass


def test_lock_with_timeout_waits_for_the_holder(tmp_path):
    lock = str(tmp_path / ".publish.lock")
    first = runs.RunLock(lock).__enter__()
    threading.Timer(0.3, first.release).start()
    started = time.monotonic()
    with runs.RunLock(lock, timeout=10):
        waited = time.monotonic() - started
    assert 0.2 < waited < 5


@pytest.fixture
def fast_leases(monkeypatch):
    monkeypatch.setattr(runs, "LEASE_SETTLE_SECONDS", 0.01)


def test_lease_on_object_storage_refuses_a_live_holder(tmp_path, fast_leases):
    # file:// goes through pyarrow's filesystem layer like s3:// would: the lease path.
    lock = f"file://{tmp_path}/runs/2026-11-04/.lock"
    with runs.RunLock(lock) as held:
        assert not held.is_local
        holder = json.loads((tmp_path / "runs" / "2026-11-04" / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["token"]
        with pytest.raises(runs.RunLockedError, match="locked by pid"):
            runs.RunLock(lock).__enter__()
    assert not (tmp_path / "runs" / "2026-11-04" / ".lock").exists()


def test_lease_of_a_dead_or_silent_holder_is_taken_over(tmp_path, fast_leases):
    path = tmp_path / ".lock"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale_pid = int(dead.stdout)

    path.write_text(
        json.dumps({"host": socket.gethostname(), "pid": stale_pid, "heartbeat": time.time()})
    )
    with runs.RunLock(f"file://{path}"):
        pass
    # Another host, silent for longer than LEASE_STALE_SECONDS.
    old = time.time() - runs.LEASE_STALE_SECONDS - 1
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": old}))
    with runs.RunLock(f"file://{path}"):
        pass
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": time.time()}))
    with pytest.raises(runs.RunLockedError, match="pid 1 on elsewhere"):
        runs.RunLock(f"file://{path}").__enter__()


# ---------------------------------------------------------------------------------------------
# the nightly job's checks before any work (no Ray)


@pytest.fixture(scope="module")
def tiny_logs(tmp_path_factory):
    from pipelines.synthetic import WorldSpec, generate_world

    out = tmp_path_factory.mktemp("nightly_logs") / "logs"
    return generate_world(WorldSpec(users=40, items=60, days=3, seed=2), str(out)).out_dir


def test_nightly_config_owns_the_window():
    from jobs import nightly

    resolved = nightly.nightly_config(debug_config(), "2026-11-03")
    assert resolved.dataset.end == "2026-11-03"
    assert resolved.dataset.window_days == resolved.nightly.window_days
    assert resolved.dataset.start is None and resolved.dataset.split_time is None
    assert resolved.dataset.eval_days == 1
    assert nightly.default_run_date(date(2026, 11, 5)) == "2026-11-04"


def test_nightly_refuses_a_gate_metric_evaluation_does_not_produce():
    from jobs import nightly
    from twotower_core.config import config_from_dict

    config = config_from_dict({"nightly": {"gate_metric": "recall@20"}})
    with pytest.raises(ConfigError, match=r"nightly.gate_metric: 'recall@20'.*valid: coverage@10"):
        nightly.nightly_config(config, "2026-11-03")


def test_nightly_refuses_while_another_holds_the_run(tmp_path, tiny_logs, no_ray):
    from jobs import nightly

    paths = runs.run_paths(str(tmp_path), "2026-11-03")
    with runs.RunLock(paths.lock):
        with pytest.raises(runs.RunLockedError, match="nightly run 2026-11-03"):
            nightly.run(
                logs=tiny_logs, root=str(tmp_path), config=debug_config(), date="2026-11-03"
            )


def _finished_run(root: Path, logs: str, run_id: str, *, status: str):
    """A run whose markers say it finished, with the record nightly.run would have written."""
    from jobs import nightly

    config = nightly.nightly_config(debug_config(), run_id)
    paths = runs.run_paths(str(root), run_id)
    runs.write_run_record(
        paths, {"run_id": run_id, "logs": logs, "config": config_to_dict(config), "attempts": []}
    )
    runs.write_marker(paths, "evaluate", {"metrics": {"recall@50": 0.3}})
    runs.write_marker(
        paths,
        "gate",
        runs.decide_gate({"recall@50": 0.3}, config=config.nightly).to_dict()
        | {"passed": status == "published"},
    )
    if status == "published":
        runs.write_marker(paths, "publish", {"latest": run_id})
        runs.write_latest(str(root), run_id)
    return paths


def test_rerunning_a_finished_run_changes_nothing(tmp_path, tiny_logs, no_ray):
    from jobs import nightly

    paths = _finished_run(tmp_path, tiny_logs, "2026-11-03", status="published")
    # Files only: taking the lock creates .lock, which touches the run dir's mtime.
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    before.pop(Path(paths.lock), None)
    result = nightly.run(
        logs=tiny_logs, root=str(tmp_path), config=debug_config(), date="2026-11-03"
    )
    assert result.status == "published" and result.steps_run == ()
    assert result.latest == "2026-11-03" and result.run_dir == paths.run_dir
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    after.pop(Path(paths.lock), None)
    assert after == before


def test_a_gated_run_stays_gated_with_exit_code_3(tmp_path, tiny_logs, capsys):
    from jobs import nightly

    _finished_run(tmp_path, tiny_logs, "2026-11-03", status="gated")
    code = nightly.main(
        ["--logs", tiny_logs, "--root", str(tmp_path), "--date", "2026-11-03", "--config", "debug"]
    )
    assert code == nightly.EXIT_GATED
    assert "run 2026-11-03 gated" in capsys.readouterr().err


def test_rerun_with_other_settings_is_refused_naming_them(tmp_path, tiny_logs):
    from jobs import nightly
    from twotower_core.config import config_from_dict

    _finished_run(tmp_path, tiny_logs, "2026-11-03", status="published")
    changed = config_from_dict(
        {
            **config_to_dict(debug_config()),
            "train": {**config_to_dict(debug_config())["train"], "epochs": 9, "num_workers": 1},
        }
    )
    with pytest.raises(ValueError, match=r"different settings \(train.epochs\); .*--force"):
        nightly.run(logs=tiny_logs, root=str(tmp_path), config=changed, date="2026-11-03")


def test_force_is_refused_for_the_run_latest_names(tmp_path, tiny_logs):
    from jobs import nightly

    _finished_run(tmp_path, tiny_logs, "2026-11-03", status="published")
    with pytest.raises(ValueError, match="LATEST names it"):
        nightly.run(
            logs=tiny_logs, root=str(tmp_path), config=debug_config(), date="2026-11-03", force=True
        )
    assert runs.read_marker(runs.run_paths(str(tmp_path), "2026-11-03"), "publish") is not None


def test_a_date_past_the_logs_is_refused(tmp_path, tiny_logs):
    from jobs import nightly

    with pytest.raises(ValueError, match=r"--date 2026-11-09: the logs in .* end on 2026-11-03"):
        nightly.run(logs=tiny_logs, root=str(tmp_path), config=debug_config(), date="2026-11-09")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# the nightly job's exit codes, --force and retention (steps faked: no Ray)


def test_python_m_jobs_nightly_exits_2_with_the_cli_message(tmp_path):
    missing = tmp_path / "no-logs"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.nightly", "--logs", str(missing)]
        + ["--root", str(tmp_path / "root"), "--date", "2026-11-03", "--config", "debug"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    # The same one line `twotower nightly` prints, no traceback.
    assert done.stderr.splitlines() == [
        f"twotower nightly: error: logs directory {missing} does not exist"
    ]
    assert not (tmp_path / "root").exists()


def test_nightly_exits_4_while_another_holds_the_run(tmp_path, tiny_logs, no_ray, capsys):
    from jobs import cli

    paths = runs.run_paths(str(tmp_path), "2026-11-03")
    with runs.RunLock(paths.lock):
        code = cli.main(
            ["nightly", "--logs", tiny_logs, "--root", str(tmp_path)]
            + ["--date", "2026-11-03", "--config", "debug"]
        )
    assert code == 4
    err = capsys.readouterr().err
    assert err.startswith(f"twotower nightly: nightly run 2026-11-03 under {tmp_path} is locked")
    assert f"by pid {os.getpid()} on " in err and err.rstrip().endswith("; not started")
    assert runs.read_run_record(paths) is None  # refused before recording an attempt


def _fake_steps(monkeypatch, steps):
    """Replace ``steps`` of the nightly (the ones that start Ray) by fakes that record the
    order they ran in and which markers the run had when each started."""
    from jobs import nightly

    calls = []

    def fake(step):
        def run_step(context):
            calls.append((step, runs.finished_steps(context.paths)))
            if step == "evaluate":
                return {"metrics": {"recall@50": 0.3}}
            if step == "gate":
                return runs.decide_gate({"recall@50": 0.3}, config=context.config.nightly).to_dict()
            if step == "publish":
                return {"removed_runs": []}
            return {}

        return run_step

    for step in steps:
        monkeypatch.setitem(nightly.STEP_FUNCTIONS, step, fake(step))
    return calls


def test_force_redoes_a_gated_run_from_scratch(tmp_path, tiny_logs, monkeypatch, no_ray):
    from jobs import nightly

    _finished_run(tmp_path, tiny_logs, "2026-11-02", status="published")  # LATEST
    paths = _finished_run(tmp_path, tiny_logs, "2026-11-03", status="gated")
    record = runs.read_run_record(paths)
    runs.write_run_record(paths, record | {"attempts": [{"started_at": "the gated attempt"}]})
    run_dir = Path(paths.run_dir)
    for output in ("dataset", "model"):
        (run_dir / output).mkdir()
        (run_dir / output / "_SUCCESS").write_text("")  # complete: a rerun would reuse it
    (run_dir / "report").mkdir()
    (run_dir / "report" / "report.md").write_text("gated")
    calls = _fake_steps(monkeypatch, runs.STEPS)

    result = nightly.run(
        logs=tiny_logs, root=str(tmp_path), config=debug_config(), date="2026-11-03", force=True
    )
    # Every step ran again, in order, and the first found no marker of the gated attempt.
    assert [step for step, _ in calls] == list(runs.STEPS)
    assert calls[0] == ("build", [])
    assert result.steps_run == runs.STEPS and result.status == "published"
    assert runs.read_marker(paths, "gate")["passed"] is True
    assert sorted(os.listdir(run_dir)) == [".lock", "run.json", "steps"]
    attempts = runs.read_run_record(paths)["attempts"]
    assert len(attempts) == 1 and attempts[0]["resumed_after"] is None
    assert runs.read_latest(str(tmp_path)) == "2026-11-02"


def test_publish_applies_retention_keeping_latest_and_the_run(
    tmp_path, tiny_logs, monkeypatch, no_ray
):
    import dataclasses

    from jobs import nightly
    from pipelines import report

    for run_id in ("2026-10-28", "2026-10-29", "2026-10-30", "2026-11-01"):
        make_run(tmp_path, run_id, steps=["publish"])
    runs.write_latest(str(tmp_path), "2026-11-01")
    for run_id in ("2026-11-02", "2026-11-03"):
        make_run(tmp_path, run_id, steps=["gate"])  # gated: LATEST stayed on 11-01
    before_publish = [step for step in runs.STEPS if step != "publish"]
    calls = _fake_steps(monkeypatch, before_publish)
    monkeypatch.setattr(
        report, "write_report", lambda root, run_id, **_: report.ReportResult("report.md", {})
    )
    config = debug_config()
    config = dataclasses.replace(config, nightly=dataclasses.replace(config.nightly, retention=2))

    # Backfill 10-31. Runs: 10-28 10-29 10-30 10-31 11-01 11-02 11-03; retention 2 keeps the
    # newest two (11-02, 11-03), LATEST (11-01) and the run itself (10-31): 3 runs deleted.
    result = nightly.run(logs=tiny_logs, root=str(tmp_path), config=config, date="2026-10-31")
    assert [step for step, _ in calls] == before_publish
    assert result.status == "published" and result.steps_run == runs.STEPS
    assert result.removed_runs == ("2026-10-28", "2026-10-29", "2026-10-30")
    assert runs.list_runs(str(tmp_path)) == ["2026-10-31", "2026-11-01", "2026-11-02", "2026-11-03"]
    # A backfill never moves LATEST backwards.
    assert result.latest == runs.read_latest(str(tmp_path)) == "2026-11-01"


def test_nightly_clears_only_its_incomplete_step_outputs(tmp_path):
    """A step dir left without _SUCCESS (a crash between move and marker) is removed so the
    step reruns; a published one is kept (the step is skipped)."""
    from jobs.nightly import _clear_incomplete

    broken, published = tmp_path / "model", tmp_path / "embeddings"
    broken.mkdir()
    (broken / "metrics.json").write_text("{}")
    published.mkdir()
    (published / "manifest.json").write_text("{}")
    (published / "_SUCCESS").write_text("")
    _clear_incomplete(str(broken))
    _clear_incomplete(str(published))
    _clear_incomplete(str(tmp_path / "absent"))
    assert sorted(os.listdir(tmp_path)) == ["embeddings"]
    assert (published / "manifest.json").exists()
