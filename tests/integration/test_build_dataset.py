"""build-dataset on Ray Data: the contract on generated logs, determinism, a 2-node cluster,
quarantine and a failed run that leaves the previous output untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipelines import io
from pipelines.build import QuarantineLimitError, build_dataset
from pipelines.contracts import validate_dataset_dir, validate_logs
from tests.fixtures_logs import HandLogs, contract_violations, ts_us
from twotower_core.config import DatasetConfig, NegativesConfig

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONFIG = DatasetConfig(
    num_partitions=4,
    seed=5,
    negatives=NegativesConfig(ranked_out_min_rank=10, ranked_out_max_rank=40),
)


def read(dataset: str, folder: str) -> pl.DataFrame:
    frame = pl.from_arrow(io.read_table(io.join(dataset, folder)))
    keys = [
        c
        for c in ("user_id", "ts", "request_id", "item_id", "table", "reason", "row")
        if c in frame.columns
    ]
    return frame.sort(keys)


@pytest.fixture(scope="module")
def built(small_world, ray_local, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("build") / "dataset")
    return build_dataset(small_world.out_dir, out, CONFIG)


def test_every_row_obeys_the_contract(small_world, built):
    manifest = built.manifest
    assert validate_dataset_dir(built.out)["counts"] == manifest["counts"]
    train, eval_rows = read(built.out, "train"), read(built.out, "eval")
    tables = {
        name: pq.read_table(small_world.paths[name])
        for name in ("clicks", "impressions", "retrievals", "items")
    }
    problems = contract_violations(
        tables,
        train,
        eval_rows,
        start_us=ts_us("2026-11-01 00:00"),
        end_us=ts_us("2026-11-05 00:00"),
        split_us=ts_us("2026-11-04 00:00"),
        counts=CONFIG.negatives.counts(),
        ranked_out_ranks=(10, 40),
    )
    assert problems == []
    assert manifest["split_time"] == "2026-11-04T00:00:00+00:00"
    assert manifest["window"] == {
        "start": "2026-11-01",
        "end": "2026-11-04",
        "start_time": "2026-11-01T00:00:00+00:00",
        "end_time": "2026-11-05T00:00:00+00:00",
    }
    counts = manifest["counts"]
    assert counts["train_positives"] == train.height > 1000
    assert counts["eval_positives"] == eval_rows.height > 100
    flat_sources = train["neg_sources"].explode()
    for source, n in counts["negatives_by_source"].items():
        assert (flat_sources == source).sum() == n > 0
    assert counts["quarantined"] == 0
    assert counts["input_rows"] == small_world.rows


def test_vocab_counts_and_features_line_up(small_world, built):
    train = read(built.out, "train")
    items = pl.read_parquet(io.join(built.out, "vocab", "items.parquet"))
    users = pl.read_parquet(io.join(built.out, "vocab", "users.parquet"))
    catalog = pq.read_table(small_world.paths["items"])
    # Every catalog item, sorted by id, indexed 0..I-1, counted in train positives.
    assert items["item_id"].to_list() == sorted(catalog["item_id"].to_pylist())
    assert items["item_idx"].to_list() == list(range(catalog.num_rows))
    expected = train.group_by("item_idx").len()
    joined = items.join(expected, on="item_idx", how="left").fill_null(0)
    assert (joined["count"] == joined["len"]).all() and items["count"].sum() == train.height
    assert users["user_idx"].to_list() == list(range(users.height))
    assert users["user_id"].is_sorted() and users["count"].sum() == train.height
    # Training rows' indices agree with the vocab.
    assert train.join(items, on="item_id")["item_idx"].equals(train["item_idx"])
    assert train.join(users, on="user_id")["user_idx"].equals(train["user_idx"])
    neg_ids = train["neg_item_ids"].explode()
    neg_idxs = train["neg_item_idxs"].explode()
    assert (items["item_id"].gather(neg_idxs) == neg_ids).all()
    features = pl.read_parquet(io.join(built.out, "features", "items.parquet"))
    assert features.columns[:2] == ["item_idx", "item_id"]
    assert set(catalog.column_names) <= set(features.columns)
    assert features["item_id"].equals(items["item_id"])
    user_features = pl.read_parquet(io.join(built.out, "features", "users.parquet"))
    assert user_features["user_id"].equals(users["user_id"])


def test_rerun_with_same_inputs_and_seed_gives_identical_rows(small_world, built, tmp_path):
    again = build_dataset(small_world.out_dir, str(tmp_path / "again"), CONFIG)
    for folder in ("train", "eval", "quarantine"):
        assert read(again.out, folder).equals(read(built.out, folder)), folder
        # Partition files are named after their users: the very same files.
        assert sorted(os.listdir(io.join(again.out, folder))) == sorted(
            os.listdir(io.join(built.out, folder))
        )


def test_local_engine_writes_the_same_rows(small_world, built, tmp_path):
    """One process, one partition (polars only) and Ray with 4 partitions agree row for row."""
    local = build_dataset(small_world.out_dir, str(tmp_path / "local"), CONFIG, engine="local")
    for folder in ("train", "eval", "quarantine"):
        assert read(local.out, folder).equals(read(built.out, folder)), folder
    for file in ("vocab/users.parquet", "vocab/items.parquet", "features/items.parquet"):
        assert pl.read_parquet(io.join(local.out, file)).equals(
            pl.read_parquet(io.join(built.out, file))
        ), file
    assert local.manifest["counts"] == built.manifest["counts"]


_TWO_NODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from pipelines.build import build_dataset
    from twotower_core.config import DatasetConfig, config_from_dict

    logs, out, config_json = sys.argv[1:4]
    node = {"num_cpus": 2, "object_store_memory": 150 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        config = config_from_dict({"dataset": json.loads(config_json)}).dataset
        result = build_dataset(logs, out, config)
        counts = result.manifest["counts"]
        print(json.dumps({"nodes": len(nodes), "train": counts["train_positives"]}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


def test_two_node_cluster_gives_the_same_rows(small_world, built, tmp_path):
    """A 2-node local cluster (and a different partition count) writes the same rows."""
    from twotower_core.config import config_to_dict

    config = config_to_dict(CONFIG)
    config["num_partitions"] = 3
    out = str(tmp_path / "two_nodes")
    completed = subprocess.run(
        [sys.executable, "-c", _TWO_NODE_SCRIPT, small_world.out_dir, out, json.dumps(config)],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "RAY_ADDRESS": "",
            "RAY_raylet_start_wait_time_s": "120",
        },
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith('{"nodes"')]
    assert lines, completed.stdout[-4000:] + completed.stderr[-4000:]
    report = json.loads(lines[-1])
    assert report["nodes"] == 2
    for folder in ("train", "eval"):
        assert read(out, folder).equals(read(built.out, folder)), folder


def _hand_logs() -> HandLogs:
    t, e = "2026-11-01 10:00", "2026-11-02 09:00"
    return HandLogs(
        clicks=[
            ("r1", "u1", "i2", t),
            ("r1", "u1", "i2", "2026-11-01 10:05"),
            ("r2", "u1", "i3", e),
            ("s1", "u2", "i10", t),
            ("s1", None, "i11", t),
            ("s1", "u2", "i99", t),
            ("s1", "u2", "i12", None),
        ],
        impressions=[("r1", "u1", f"i{i}", i, t) for i in range(1, 5)],
        retrievals=[("r1", "u1", f"i{i}", i, t) for i in range(1, 9)],
        items=[{"item_id": f"i{i}", "price": float(i)} for i in range(1, 21)]
        + [{"item_id": None, "price": 0.0}, {"item_id": "i5", "price": 5.5}],
        users=[{"user_id": "u1", "country": "DE"}, {"user_id": "u9", "country": "FR"}],
        id_type="string",
    )


def test_bad_rows_quarantined_and_a_failed_run_leaves_the_old_output(ray_local, tmp_path):
    logs = _hand_logs().write(tmp_path / "logs", files_per_table=2)
    out = str(tmp_path / "dataset")
    result = build_dataset(logs, out, DatasetConfig(num_partitions=2))
    counts = result.manifest["counts"]
    assert counts["quarantined_by_reason"] == {
        "duplicate_id": 1,
        "item_not_in_catalog": 1,
        "null_item_id": 1,
        "null_ts": 1,
        "null_user_id": 1,
    }
    assert counts["quarantined_by_table"] == {"clicks": 3, "items": 2}
    quarantine = read(out, "quarantine")
    assert quarantine.height == 5
    assert set(quarantine.columns) >= {"table", "reason", "request_id", "user_id", "item_id", "row"}
    duplicate = quarantine.filter(pl.col("reason") == "duplicate_id").row(0, named=True)
    assert json.loads(duplicate["row"]) == {"item_id": "i5", "price": 5.5}
    assert counts["train_positives"] == 2 and counts["eval_positives"] == 1
    assert counts["duplicate_clicks"] == 1
    assert result.manifest["id_type"] == "string"
    # Users: the users table (u1, u9) and users with a positive (u2); features null for u2.
    user_features = pl.read_parquet(io.join(out, "features", "users.parquet"))
    assert user_features.rows() == [(0, "u1", "DE"), (1, "u2", None), (2, "u9", "FR")]

    before = io.read_json(io.join(out, "manifest.json"))
    strict = DatasetConfig(num_partitions=2, max_quarantine_fraction=0.01)
    with pytest.raises(QuarantineLimitError, match="exceeds dataset.max_quarantine_fraction"):
        build_dataset(logs, out, strict, overwrite=True)
    assert io.read_json(io.join(out, "manifest.json")) == before and io.is_complete(out)
    assert sorted(os.listdir(tmp_path)) == ["dataset", "logs"], "no staging dir left behind"


def test_logs_without_statistics_or_optional_tables(ray_local, tmp_path):
    """No impressions/retrievals/users tables and no ts statistics: the window comes from a
    Ray pass over ts, every negative is unexposed, and the manifest says why."""
    logs = _hand_logs()
    for name in ("impressions", "retrievals", "users"):
        del logs.tables[name]
    path = Path(logs.write(tmp_path / "logs"))
    clicks = pq.read_table(path / "clicks")
    pq.write_table(clicks, path / "clicks" / "part-000.parquet", write_statistics=False)
    assert validate_logs(str(path)).ts_range_us() is None
    result = build_dataset(str(path), str(tmp_path / "dataset"), DatasetConfig(num_partitions=2))
    assert result.manifest["window"]["end"] == "2026-11-02"
    train = read(result.out, "train")
    assert set(train["neg_sources"].explode().to_list()) == {"unexposed"}
    assert result.manifest["counts"]["fills"] == {
        "total": 3 * train.height,
        "exposed_not_clicked": train.height,
        "ranked_out": 2 * train.height,
    }
    assert any("no impressions table" in note for note in result.manifest["notes"])
    assert np.all(train["neg_item_idxs"].list.len().to_numpy() == 7)


def test_shuffle_map_batch_is_bounded_by_config(ray_local):
    """Ray 2.60 hands a shuffle-map task up to 1 GiB of input by default; the job caps it."""
    import pyarrow as pa
    import ray.data

    from pipelines.build import RayEngine, _OutputSpec, _ReadSpec

    context = ray.data.DataContext.get_current()
    default = context.shuffle_input_batch_bytes
    schema = pa.schema([("x", pa.int64())])
    rows = RayEngine(num_partitions=3, shuffle_batch_mb=64).example_rows(
        [{"table": "clicks", "path": "unused.parquet", "row_groups": [0], "rows": 1}],
        _ReadSpec(0, 1, pa.int64(), pa.int64()),
        lookups=None,
        settings=None,
        output=_OutputSpec("unused", schema, schema, schema),
    )
    assert rows.context.shuffle_input_batch_bytes == 64 * 2**20
    # The process-wide context is left as it was for other Datasets.
    assert context.shuffle_input_batch_bytes == default != 64 * 2**20


def test_rows_without_a_user_spread_over_the_partitions(ray_local, tmp_path):
    """Anonymous impressions (null user_id) are quarantined by many partitions, not all by
    one; every user's rows still meet in one partition (same rows as one process)."""
    day = "2026-11-01 10:00"
    logs = HandLogs(
        clicks=[(f"r{u}", u, 1 + u % 5, day) for u in range(1, 9)]
        + [("r1", 1, 2, "2026-11-02 09:00")],
        impressions=[(f"r{u}", u, 1 + u % 5, 0, day) for u in range(1, 9)]
        + [(f"anon{i}", None, 1 + i % 20, 0, day) for i in range(400)],
        items=range(1, 21),
    ).write(tmp_path / "logs")
    config = DatasetConfig(num_partitions=4, seed=1)
    ray_run = build_dataset(logs, str(tmp_path / "ray"), config)
    assert ray_run.manifest["counts"]["quarantined_by_reason"] == {"null_user_id": 400}
    files = io.list_files(io.join(ray_run.out, "quarantine"))
    per_file = [pq.read_metadata(f).num_rows for f in files]
    assert len(per_file) >= 3 and max(per_file) < 250, per_file
    local = build_dataset(logs, str(tmp_path / "local"), config, engine="local")
    for folder in ("train", "eval", "quarantine"):
        assert read(ray_run.out, folder).equals(read(local.out, folder)), folder
