"""The walking skeleton end to end on a tiny world: every stage real, the four contracts hold."""

import os
from datetime import datetime

import numpy as np
import pyarrow as pa
import pytest

from jobs import demo
from pipelines import io
from twotower_core.config import NEGATIVE_SOURCES, debug_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, ray_local):
    """The demo as `make demo` runs it: ``--out`` relative to the working directory."""
    parent = tmp_path_factory.mktemp("pipeline")
    config = debug_config()
    cwd = os.getcwd()
    os.chdir(parent)
    try:
        result = demo.run(out="demo", config=config, users=500, items=300, days=5, seed=3)
    finally:
        os.chdir(cwd)
    assert result.paths["model"] == io.join("demo", "model")
    result.paths = {name: str(parent / path) for name, path in result.paths.items()}
    return result, config


def test_logs_follow_contract_1(demo_run):
    result, _ = demo_run
    logs = result.paths["logs"]
    required = {
        "clicks": {"request_id", "user_id", "item_id", "ts"},
        "impressions": {"request_id", "user_id", "item_id", "position", "ts"},
        "retrievals": {"request_id", "user_id", "item_id", "retrieval_rank", "ts"},
        "items": {"item_id"},
        "users": {"user_id"},
    }
    for table, columns in required.items():
        schema = io.read_table(io.join(logs, table)).schema
        assert columns <= set(schema.names), table
        if "ts" in columns:
            assert pa.types.is_timestamp(schema.field("ts").type)


def test_dataset_follows_contract_2(demo_run):
    result, config = demo_run
    dataset = result.paths["dataset"]
    assert io.is_complete(dataset)
    manifest = io.read_json(io.join(dataset, "manifest.json"))
    train = io.read_table(io.join(dataset, "train"))
    evaluation = io.read_table(io.join(dataset, "eval"))
    assert {"user_id", "item_id", "ts", "request_id", "neg_item_ids", "neg_sources"} <= set(
        train.schema.names
    )
    assert train.schema.field("neg_item_ids").type.value_type == train.schema.field("item_id").type
    assert {"user_id", "item_id", "ts"} <= set(evaluation.schema.names)
    expected_negatives = sum(config.dataset.negatives.counts().values())
    lengths = pa.compute.list_value_length(train["neg_sources"]).to_numpy()
    assert (lengths == expected_negatives).all()
    assert (pa.compute.list_value_length(train["neg_item_ids"]).to_numpy() == lengths).all()
    sources = set(pa.compute.list_flatten(train["neg_sources"]).to_pylist())
    assert sources == set(NEGATIVE_SOURCES), "the generated world has all three sources"
    ts_type = train.schema.field("ts").type
    split_time = datetime.fromisoformat(manifest["split_time"])
    if ts_type.tz is None:
        split_time = split_time.replace(tzinfo=None)
    split = pa.scalar(split_time, ts_type)
    assert pa.compute.all(pa.compute.less(train["ts"], split)).as_py()
    assert pa.compute.all(pa.compute.greater_equal(evaluation["ts"], split)).as_py()
    assert manifest["counts"]["train_positives"] == train.num_rows
    for kind in ("vocab", "features"):
        assert io.exists(io.join(dataset, kind, "users.parquet"))
        assert io.exists(io.join(dataset, kind, "items.parquet"))
    items = io.read_table(io.join(dataset, "vocab", "items.parquet"))
    assert items.num_rows == io.read_table(io.join(result.paths["logs"], "items")).num_rows


def test_model_follows_contract_3(demo_run):
    result, config = demo_run
    model = result.paths["model"]
    assert io.is_complete(model)
    for name in ("model.pt", "config.yaml", "dataset.json"):
        assert io.exists(io.join(model, "checkpoint", name)), name
    metrics = io.read_json(io.join(model, "metrics.json"))
    assert len(metrics["epochs"]) == config.train.epochs
    for row in metrics["epochs"]:
        assert np.isfinite(row["train_loss"])
        assert {"recall@10", "recall@50", "ndcg@10"} <= set(row)
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    # Both workers' shards fit train.cache_shard_bytes: only the first epoch streams.
    assert [row["data"] for row in metrics["epochs"]] == ["stream"] + ["memory"] * (
        config.train.epochs - 1
    )


def test_embeddings_follow_contract_4(demo_run):
    result, config = demo_run
    embeddings = result.paths["embeddings"]
    assert io.is_complete(embeddings)
    manifest = io.read_json(io.join(embeddings, "manifest.json"))
    dim = config.model.embedding_dim
    assert manifest["dim"] == dim
    assert manifest["similarity"] == config.loss.similarity
    assert manifest["ann_metric"] in ("inner_product", "l2")
    items = io.read_table(io.join(embeddings, "items"))
    catalog = io.read_table(io.join(result.paths["logs"], "items"))
    assert items.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    assert set(items["item_id"].to_pylist()) == set(catalog["item_id"].to_pylist())
    assert manifest["counts"]["items"] == catalog.num_rows
    users = io.read_table(io.join(embeddings, "users"))
    assert users.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    assert np.isfinite(items["embedding"].combine_chunks().flatten().to_numpy()).all()


def test_model_beats_popularity(demo_run):
    result, _ = demo_run
    assert result.recall_at_50["two-tower"] > result.recall_at_50["popularity"]
    assert result.recall_at_50["oracle"] >= result.recall_at_50["popularity"]
