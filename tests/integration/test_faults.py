"""Faults injected into real runs: a training worker killed mid-epoch, the embed step killed
mid-way, a node removed from a 2-node cluster during build-dataset, a corrupt input file.

The first two share one nightly run in a subprocess (its own local Ray, so the test can kill
its processes and read its log): a RayTrainWorker is SIGKILLed once a checkpoint exists, and
later the whole nightly is SIGKILLed while embeddings are being written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from jobs import cli, nightly
from jobs.config_io import load_config
from pipelines import io, runs
from tests.integration.test_cluster_submit import SCRIPT, LocalCluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PREVIOUS, RUN = "2026-11-02", "2026-11-03"
# Small batches and step checkpoints: enough steps per epoch for a kill to land mid-epoch.
OVERRIDES = [
    "train.epochs=2",
    "train.batch_size=32",
    "train.checkpoint_every_steps=4",
    "train.max_failures=2",
    "nightly.window_days=2",
]
# Ray Train V2's controller polls workers every 2 s, so a checkpoint on disk may not be
# registered yet; it writes this file each time it registers one (Ray 2.60).
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(name))
    found, stack = [], [pid]
    while stack:
        for child in children[stack.pop()]:
            found.append(child)
            stack.append(child)
    return found


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def wait_for(
    condition: Callable[[], bool],
    process: subprocess.Popen,
    *,
    what: str,
    log: Path,
    timeout: float = 900,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(
                f"exited ({process.returncode}) before {what}:\n{log.read_text()[-4000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a subprocess started in its own session, and everything it started."""
    for pid in [*descendants(process.pid), process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)


def registered_checkpoints(state_dir: Path) -> int:
    """Checkpoints Ray Train's controller has registered (0 before its first snapshot)."""
    for snapshot in state_dir.rglob(CHECKPOINT_SNAPSHOT):
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return 0
    return 0


def seed_published_run(root: Path, run_id: str) -> None:
    """A previous published run as the registry records it (markers and LATEST only): LATEST
    must have something to stay on while the run under test is interrupted."""
    paths = runs.run_paths(str(root), run_id)
    runs.write_marker(paths, "evaluate", {"metrics": {"recall@50": 0.0, "eval_users": 1.0}})
    runs.write_marker(paths, "publish", {"latest": run_id})
    runs.write_latest(str(root), run_id)


def nightly_env() -> dict[str, str]:
    # Its own local Ray: no address, nothing inherited from a cluster.
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, small_world):
    base = tmp_path_factory.mktemp("faults")
    root, log = base / "root", base / "nightly.log"
    seed_published_run(root, PREVIOUS)
    paths = runs.run_paths(str(root), RUN)
    run_dir = Path(paths.run_dir)
    command = [
        sys.executable, "-m", "jobs.nightly",
        "--logs", small_world.out_dir, "--root", str(root), "--date", RUN,
        "--config", "debug", "--cold-start",
    ] + [arg for override in OVERRIDES for arg in ("--set", override)]  # fmt: skip
    events = {}
    with open(log, "w") as sink:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=nightly_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            # 1. Kill one training worker once the controller registered a step checkpoint.
            state = run_dir / ".model._train"
            wait_for(
                lambda: registered_checkpoints(state) > 0,
                process,
                what="a registered training checkpoint",
                log=log,
            )
            workers = [p for p in descendants(process.pid) if b"RayTrainWorker" in cmdline(p)]
            assert workers, "no RayTrainWorker process under the nightly"
            events["model_complete_at_kill"] = io.is_complete(paths.model)
            os.kill(workers[0], signal.SIGKILL)
            events["killed_worker"] = workers[0]

            # 2. Kill the whole nightly once the embed step has begun: its staging dir exists.
            # (The actors write each part's file as they finish it; on this tiny world all
            # of them are written within a fraction of a second of the publish, too short a
            # window to aim a kill at.)
            def embed_started() -> bool:
                return any(run_dir.glob(".embeddings._staging-*"))

            wait_for(embed_started, process, what="the embed step's staging dir", log=log)
            kill_tree(process)
            events["killed_nightly"] = True
        finally:
            if process.poll() is None:
                kill_tree(process)
    return SimpleNamespace(root=root, paths=paths, log=log.read_text(), **events)


def test_training_worker_killed_mid_epoch_resumes_from_its_checkpoint(interrupted_run):
    run = interrupted_run
    assert run.model_complete_at_kill is False, "the kill landed after training"
    resumed = re.findall(r"\[train\] resumed from checkpoint: epoch (\d+), step (\d+)", run.log)
    assert resumed, run.log[-4000:]
    resumed_step = int(resumed[-1][1])

    metrics = io.read_json(io.join(run.paths.model, "metrics.json"))
    steps = [row["step"] for row in metrics["epochs"]]
    assert len(steps) == 2
    # The step counter continued from the checkpoint: every epoch has the same number of
    # steps, none lost and none counted twice (a restart from scratch would still say 2x,
    # but would not have logged a resume from a later step).
    assert steps == [steps[0], 2 * steps[0]]
    assert metrics["global_step"] == steps[-1]
    assert 0 < resumed_step < metrics["global_step"]
    assert resumed_step in metrics["resumed_at_steps"]
    train = runs.read_marker(run.paths, "train")
    assert train["global_step"] == metrics["global_step"]
    assert train["resumed_at_steps"] == metrics["resumed_at_steps"]


def test_embed_killed_mid_way_leaves_nothing_visible_and_the_rerun_completes(
    interrupted_run, small_world, ray_local
):
    run = interrupted_run
    assert run.killed_nightly
    run_dir = Path(run.paths.run_dir)
    # The interrupted embed exists only as a hidden staging dir; readers see no embeddings.
    assert not (run_dir / "embeddings").exists()
    assert list(run_dir.glob(".embeddings._staging-*"))
    assert runs.read_latest(str(run.root)) == PREVIOUS
    assert runs.finished_steps(run.paths) == ["build", "train", "evaluate", "gate"]

    result = nightly.run(
        logs=small_world.out_dir,
        root=str(run.root),
        config=load_config("debug", OVERRIDES),
        date=RUN,
        cold_start=True,
    )
    assert result.steps_run == ("embed", "publish")
    assert result.published and result.latest == RUN == runs.read_latest(str(run.root))
    assert not list(run_dir.glob(".embeddings._staging-*"))
    assert io.is_complete(run.paths.embeddings)
    assert io.count_rows(io.join(run.paths.embeddings, "items")) == small_world.rows["items"]
    record = runs.read_run_record(run.paths)
    assert [a["resumed_after"] for a in record["attempts"]] == [None, "gate"]


def test_corrupt_parquet_input_is_named_and_nothing_is_published(small_world, tmp_path, capsys):
    logs = tmp_path / "logs"
    shutil.copytree(small_world.out_dir, logs)
    victim = sorted((logs / "impressions").rglob("*.parquet"))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # the footer is gone
    root = tmp_path / "root"
    code = cli.main(
        ["nightly", "--logs", str(logs), "--root", str(root), "--date", RUN, "--config", "debug"]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert f"table 'impressions', file {victim}: unreadable or corrupt Parquet file" in error
    assert not root.exists()


def read_rows(dataset: Path, folder: str) -> pl.DataFrame:
    frame = pl.from_arrow(io.read_table(str(dataset / folder)))
    keys = ("user_id", "ts", "request_id", "item_id", "table", "reason", "row")
    return frame.sort([c for c in keys if c in frame.columns])


def active_nodes(status: str) -> int:
    """Nodes listed under "Active:" in `ray status`."""
    section = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    return section.count("node_")


def test_node_removed_during_build_dataset_gives_identical_rows(small_world, ray_local, tmp_path):
    from jobs import build_dataset

    window = ["--end", RUN, "--window-days", "2"]
    reference = build_dataset.run(
        logs=small_world.out_dir,
        out=str(tmp_path / "reference"),
        config=load_config("debug", [f"dataset.end={RUN}", "dataset.window_days=2"]),
    )
    cluster = LocalCluster(head_cpus=1, worker_cpus=2, workers=1)
    cluster.start()
    log = tmp_path / "submit.log"
    out = tmp_path / "dataset"
    try:
        with open(log, "w") as sink:
            submit = subprocess.Popen(
                ["bash", str(SCRIPT), "submit", "--", "twotower", "build-dataset"]
                + ["--logs", small_world.out_dir, "--out", str(out), "--config", "debug", *window],
                cwd=REPO,
                env=cluster.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
            wait_for(
                lambda: any(tmp_path.glob(".dataset._staging-*")),
                submit,
                what="the build's staging dir",
                log=log,
            )
            time.sleep(1.0)  # tasks of pass 1 are out on both nodes
            complete_at_kill = io.is_complete(str(out))
            cluster.kill_node("worker-1")
            assert submit.wait(timeout=900) == 0, log.read_text()[-5000:]
        assert not complete_at_kill, "the node was removed after the build finished"
        status = subprocess.run(
            ["ray", "status", f"--address={cluster.gcs_address}"],
            env=cluster.client_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert active_nodes(status.stdout) == 1, status.stdout
    finally:
        cluster.stop()
    for folder in ("train", "eval", "quarantine"):
        assert read_rows(out, folder).equals(read_rows(Path(reference.out), folder)), folder
    manifest = io.read_json(str(out / "manifest.json"))
    assert manifest["counts"] == reference.manifest["counts"]
