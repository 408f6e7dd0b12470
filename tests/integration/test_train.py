"""Ray Train for real: a killed driver resumes on rerun; warm start keeps rows.

A training worker killed mid-epoch is tested through the nightly, in test_faults.py.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import build_dataset, train
from pipelines import io
from pipelines.checkpoint import CHECKPOINT_DIR, MODEL_FILE, VOCAB_DIR
from twotower_core.config import config_from_dict

pytestmark = pytest.mark.integration

# Small batches so an epoch has enough steps to be interrupted in the middle.
EPOCHS = 3
TRAIN_OVERRIDES = [
    f"train.epochs={EPOCHS}",
    "train.batch_size=32",
    "train.checkpoint_every_steps=8",
    "train.max_failures=3",
    # The schedule follows the step counter: resumed, it still ends at 0 on the last step.
    "train.lr_schedule=cosine",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local, small_world):
    out = tmp_path_factory.mktemp("train") / "dataset"
    config = config_from_dict({"dataset": {"num_partitions": 2}})
    build_dataset.run(logs=small_world.out_dir, out=str(out), config=config)
    return str(out)


def _descendants(root_pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root_pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _start_training(dataset: str, out: Path, log: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "train",
        "--dataset",
        dataset,
        "--out",
        str(out),
        "--config",
        "debug",
    ]
    for override in TRAIN_OVERRIDES:
        command += ["--set", override]
    return subprocess.Popen(
        command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _wait_for_checkpoint(out: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until epoch 1 is in the live CSV log, checkpoints exist and the controller has had
    time to register one.

    Ray Train's controller polls workers every 2 s: a checkpoint written just before a crash
    may not be registered yet, and the restart would then begin from the one before.
    """
    state = out.parent / f".{out.name}._train" / "run"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        epoch_logged = (state.parent / "train_log.csv").exists()
        checkpoints = state.exists() and sum(p.name.startswith("checkpoint_") for p in state.iterdir())
        if epoch_logged and checkpoints >= 2:
            time.sleep(3)
            assert process.poll() is None, "training ended before it could be interrupted"
            return
        assert process.poll() is None, "training ended before its first checkpoints"
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def _metrics(out: Path) -> dict:
    assert io.is_complete(str(out))
    return io.read_json(str(out / "metrics.json"))


def _assert_continued(metrics: dict) -> None:
    epochs = [row["epoch"] for row in metrics["epochs"]]
    assert epochs == list(range(1, EPOCHS + 1)), epochs
    assert metrics["resumed_at_steps"], "training restarted instead of resuming"
    assert metrics["resumed_at_steps"][0] > 0
    # The step counter continues: every epoch adds the same number of steps, none redone.
    steps = [row["step"] for row in metrics["epochs"]]
    per_epoch = np.diff([0, *steps])
    assert (per_epoch == per_epoch[0]).all(), steps
    rates = [row["learning_rate"] for row in metrics["epochs"]]
    assert rates[0] > rates[1] > rates[2] == pytest.approx(0, abs=1e-12), rates


def test_rerun_after_a_killed_driver_resumes(dataset, tmp_path):
    out = tmp_path / "model"
    first = _start_training(dataset, out, tmp_path / "first.log")
    try:
        _wait_for_checkpoint(out, first)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert not io.exists(str(out)), "a killed run must not publish"
    # The CSV log is written every epoch while the run goes on, not only at publish.
    live_log = tmp_path / ".model._train" / "train_log.csv"
    rows = live_log.read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) >= 2, rows
    second_log = tmp_path / "second.log"
    second = _start_training(dataset, out, second_log)
    try:
        assert second.wait(timeout=420) == 0, second_log.read_text()[-3000:]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    _assert_continued(_metrics(out))
    assert not (tmp_path / ".model._train").exists(), "training state is removed once published"


def _with_changed_catalog(logs: str, out: Path, *, removed: int, added: int) -> tuple[list, list]:
    """Copy the logs with ``removed`` catalog items dropped and ``added`` new ones appended."""
    io.copy_tree(logs, str(out))
    items_dir = out / "items"
    table = pq.read_table(items_dir)
    dropped = table["item_id"].to_pylist()[:removed]
    kept = table.slice(removed)
    new_rows = kept.slice(0, added)
    offset = max(table["item_id"].to_pylist()) + 1
    new_ids = list(range(offset, offset + added))
    new_rows = new_rows.set_column(
        0, "item_id", pa.array(new_ids, table.schema.field("item_id").type)
    )
    for path in items_dir.iterdir():
        path.unlink()
    pq.write_table(pa.concat_tables([kept, new_rows]), items_dir / "part-0.parquet")
    return dropped, new_ids


def test_a_shard_over_the_cache_limit_streams_every_epoch(dataset, tmp_path):
    config = config_from_dict(
        {
            "train": {
                "epochs": 2,
                "batch_size": 128,
                "num_workers": 2,
                "cpus_per_worker": 0.5,
                "cache_shard_bytes": 1,
                "lr_schedule": "linear",
                "lr_final_fraction": 0.5,
            }
        }
    )
    train.run(dataset=dataset, out=str(tmp_path / "model"), config=config)
    metrics = _metrics(tmp_path / "model")
    assert [row["data"] for row in metrics["epochs"]] == ["stream", "stream"]
    steps = [row["step"] for row in metrics["epochs"]]
    assert steps[1] == 2 * steps[0] > 0, steps
    # Streamed shards hold the planned number of steps: the decay ends on the last one.
    assert metrics["epochs"][1]["learning_rate"] == pytest.approx(0.5 * 3e-3)


@pytest.mark.parametrize("members", [1, 2])
def test_warm_start_keeps_known_rows_adds_new_drops_removed(
    small_world, dataset, tmp_path, ray_local, members
):
    """With ``model.ensemble_members`` 2 (DDP over both members' losses), each member keeps
    its own rows."""
    model = {"ensemble_members": members}
    config = config_from_dict(
        {
            "model": model,
            "train": {"epochs": 1, "batch_size": 128, "num_workers": 2, "cpus_per_worker": 0.5},
        }
    )
    old_model = str(tmp_path / "old")
    train.run(dataset=dataset, out=old_model, config=config)

    dropped, new_ids = _with_changed_catalog(
        small_world.out_dir, tmp_path / "logs2", removed=5, added=3
    )
    new_dataset = str(tmp_path / "dataset2")
    build_dataset.run(
        logs=str(tmp_path / "logs2"),
        out=new_dataset,
        config=config_from_dict({"dataset": {"num_partitions": 2}}),
    )
    # A vanishing learning rate: after one epoch the weights are still the warm-started ones.
    frozen = config_from_dict(
        {
            "model": model,
            "train": {"epochs": 1, "batch_size": 128, "learning_rate": 1e-12, "optimizer": "sgd"},
        }
    )
    new_model = str(tmp_path / "new")
    result = train.run(dataset=new_dataset, out=new_model, config=frozen, init_from=old_model)
    assert result.best_epoch == 1

    towers = ["item_tower"] if members == 1 else [f"item_tower.members.{k}" for k in range(members)]

    def item_rows(model_dir):
        """{item id: the ID rows of every member, side by side}."""
        state = io.load_torch(io.join(model_dir, CHECKPOINT_DIR, MODEL_FILE))["state_dict"]
        ids = io.read_table(io.join(model_dir, CHECKPOINT_DIR, VOCAB_DIR, "items.parquet"))[
            "item_id"
        ].to_pylist()
        rows = np.concatenate(
            [state[f"{tower}.id_embedding.weight"].numpy() for tower in towers], axis=1
        )
        return dict(zip(ids, rows))

    old_rows, new_rows = item_rows(old_model), item_rows(new_model)
    assert not set(dropped) & set(new_rows), "removed ids are dropped"
    assert set(new_ids) <= set(new_rows)
    known = set(old_rows) & set(new_rows)
    assert len(known) == len(old_rows) - len(dropped)
    for item_id in known:
        np.testing.assert_allclose(new_rows[item_id], old_rows[item_id], atol=1e-6)
    old_matrix = np.stack(list(old_rows.values()))
    for item_id in new_ids:
        distances = np.abs(old_matrix - new_rows[item_id]).max(axis=1)
        assert distances.min() > 1e-3, "a new id must get a fresh row, not a copied one"
    warm = io.read_json(io.join(new_model, "metrics.json"))
    assert warm["init_from"] == old_model
    # The warm-start report is kept with the model.
    for tower in towers:
        assert warm["warm_start"]["kept_rows"][tower] == len(known)
        assert warm["warm_start"]["new_rows"][tower] == len(new_ids)
    assert io.read_json(io.join(old_model, "metrics.json"))["warm_start"] is None
