"""pipelines.embed without Ray: the actor's batch function, id lookup, output checks, manifest."""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs import embed as embed_job
from pipelines import io
from pipelines.checkpoint import load_model
from pipelines.embed import (
    EmbedBatch,
    EmbeddingValidationError,
    IdIndex,
    build_manifest,
    check_pool_fits,
    check_side,
    embedding_type,
    from_embedding_array,
    output_schema,
    rows_per_block,
    to_embedding_array,
)
from pipelines.features import build_feature_table
from pipelines.train_loop import embed_all
from tests.model_fixtures import model_config, write_dataset_dir, write_model_dir


@pytest.fixture(scope="module", params=["int", "string"])
def world(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"embed_{request.param}")
    dataset = write_dataset_dir(root / "dataset", num_users=20, num_items=40, id_type=request.param)
    return dataset, root


def features_table(dataset: str, side: str) -> pa.Table:
    return io.read_table(io.join(dataset, "features", f"{side}.parquet"))


def test_embedding_array_round_trip():
    vectors_BD = np.arange(6, dtype=np.float32).reshape(3, 2)
    array = to_embedding_array(vectors_BD)
    assert array.type == embedding_type(2) == pa.list_(pa.float32(), 2)
    assert array.to_pylist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    np.testing.assert_array_equal(from_embedding_array(pa.chunked_array([array]), 2), vectors_BD)
    empty = to_embedding_array(np.zeros((0, 4), np.float32))
    assert empty.type == embedding_type(4) and len(empty) == 0


@pytest.mark.parametrize(
    "vocab, queries, expected",
    [
        # unsorted vocab: rows are positions in the vocab, not in sorted order
        (pa.array([30, 10, 20]), pa.array([10, 20, 30, 99, 10]), [1, 2, 0, -1, 1]),
        (pa.array(["c", "a", "b"]), pa.array(["b", "zz", "c"]), [2, -1, 0]),
        (pa.array([], pa.int64()), pa.array([5]), [-1]),
    ],
)
def test_id_index_rows(vocab, queries, expected):
    assert IdIndex(vocab).rows(queries).tolist() == expected


@pytest.mark.parametrize("similarity", ["dot", "cosine", "euclidean"])
def test_batches_equal_the_training_path(world, similarity):
    """Embedding in small batches (bags padded per batch, ids looked up by value) gives the
    vectors training's evaluation computes from whole-table feature tensors by dense index."""
    dataset, root = world
    model_dir = write_model_dir(root / f"model_{similarity}", dataset, similarity=similarity)
    loaded = load_model(model_dir)
    for side, tower, specs in (
        ("users", loaded.model.user_tower, loaded.user_specs),
        ("items", loaded.model.item_tower, loaded.item_specs),
    ):
        table = features_table(dataset, side)
        embed = EmbedBatch(model_dir, side)
        parts = [embed(table.slice(start, 7)) for start in range(0, table.num_rows, 7)]
        got = pa.concat_tables(parts)
        assert got[embed.id_column].to_pylist() == table[embed.id_column].to_pylist()
        expected_ND = embed_all(tower, build_feature_table(table, specs), np.arange(table.num_rows))
        if similarity == "cosine":
            expected_ND = torch.nn.functional.normalize(expected_ND, dim=-1)
        np.testing.assert_allclose(
            from_embedding_array(got["embedding"], 32), expected_ND.numpy(), rtol=1e-5, atol=1e-6
        )
        if similarity == "cosine":
            norms = np.linalg.norm(from_embedding_array(got["embedding"], 32), axis=1)
            np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_output_schema_keeps_the_id_type(world):
    dataset, root = world
    model_dir = write_model_dir(root / "model_schema", dataset)
    table = features_table(dataset, "items")
    out = EmbedBatch(model_dir, "items")(table)
    assert out.schema.equals(output_schema("items", table.schema.field("item_id").type, 32))
    assert out.num_rows == table.num_rows


def test_new_items_embed_from_their_features(world):
    """Items the model never saw share the OOV ID row, so their features tell them apart;
    a cold catalog item (in the vocab, never clicked) keeps its own row."""
    dataset, root = world
    model_dir = write_model_dir(root / "model_new", dataset)
    loaded = load_model(model_dir)
    table = features_table(dataset, "items")
    new_ids = (
        ["new-1", "new-2"]
        if pa.types.is_string(table.schema.field("item_id").type)
        else [
            -1,
            -2,
        ]
    )
    new = (
        table.slice(0, 2)
        .set_column(1, "item_id", pa.array(new_ids, table.schema.field("item_id").type))
        .set_column(2, "category", pa.array(["x", "z"]))
    )
    embed = EmbedBatch(model_dir, "items")
    got_ND = from_embedding_array(embed(new)["embedding"], 32)
    with torch.no_grad():
        oov_ND = loaded.model.item_tower(
            torch.tensor([-1, -1]),
            build_feature_table(new, loaded.item_specs).lookup(torch.arange(2)),
        )
    np.testing.assert_allclose(got_ND, oov_ND.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got_ND[0], got_ND[1])
    cold = table.slice(table.num_rows - 1, 1)  # the fixture's last items have no clicks
    cold_D = from_embedding_array(embed(cold)["embedding"], 32)[0]
    assert not np.allclose(cold_D, got_ND[0])


def test_non_finite_vectors_are_refused_naming_the_ids(world):
    dataset, root = world
    model_dir = write_model_dir(root / "model_nan", dataset)
    table = features_table(dataset, "items").slice(0, 4)
    embed = EmbedBatch(model_dir, "items")
    tower = embed.tower

    def poisoned(rows_B, features):
        vectors_BD = tower(rows_B, features)
        vectors_BD[2, 0] = float("inf")
        return vectors_BD

    embed.tower = poisoned
    with pytest.raises(EmbeddingValidationError, match="non-finite") as error:
        embed(table)
    assert repr(table["item_id"][2].as_py()) in str(error.value)


def test_bad_batches_are_refused(world):
    dataset, root = world
    model_dir = write_model_dir(root / "model_bad", dataset)
    table = features_table(dataset, "items").slice(0, 3)
    embed = EmbedBatch(model_dir, "items")
    with pytest.raises(ValueError, match="no 'item_id' column"):
        embed(table.drop_columns(["item_id"]))
    nulls = table.set_column(1, "item_id", pa.nulls(3, table.schema.field("item_id").type))
    with pytest.raises(ValueError, match="3 null item_ids"):
        embed(nulls)
    with pytest.raises(ValueError, match="side must be one of users, items"):
        EmbedBatch(model_dir, "queries")


def write_side(path, parts: list[pa.Table]) -> str:
    for number, part in enumerate(parts):
        io.write_table(io.join(str(path), f"part-{number}.parquet"), part)
    return str(path)


def test_check_side_counts_rows_and_checks_types(tmp_path):
    ids = pa.array([5, 6, 7], pa.int64())
    good = pa.table({"item_id": ids, "embedding": to_embedding_array(np.ones((3, 4)))})
    path = write_side(tmp_path / "good", [good.slice(0, 2), good.slice(2)])
    assert check_side(path, side="items", id_type=pa.int64(), dim=4, expected_rows=3) == 3
    with pytest.raises(EmbeddingValidationError, match="wrote 3 embeddings for 4 rows"):
        check_side(path, side="items", id_type=pa.int64(), dim=4, expected_rows=4)
    with pytest.raises(EmbeddingValidationError, match="expected"):
        check_side(path, side="items", id_type=pa.int64(), dim=8, expected_rows=3)
    with pytest.raises(EmbeddingValidationError, match="expected"):
        check_side(path, side="items", id_type=pa.string(), dim=4, expected_rows=3)
    variable = good.set_column(1, "embedding", good["embedding"].cast(pa.list_(pa.float32())))
    path = write_side(tmp_path / "variable", [variable])
    with pytest.raises(EmbeddingValidationError, match="list<"):
        check_side(path, side="items", id_type=pa.int64(), dim=4, expected_rows=3)


def test_check_side_gives_an_empty_side_a_schema(tmp_path):
    path = str(tmp_path / "users")
    assert check_side(path, side="users", id_type=pa.string(), dim=4, expected_rows=0) == 0
    table = io.read_table(path)
    assert table.num_rows == 0
    assert table.schema.equals(output_schema("users", pa.string(), 4))
    with pytest.raises(EmbeddingValidationError, match="no files written for 2 rows"):
        check_side(
            str(tmp_path / "items"), side="items", id_type=pa.int64(), dim=4, expected_rows=2
        )


@pytest.mark.parametrize(
    "similarity, normalize, metric, normalized",
    [
        ("dot", False, "inner_product", False),
        ("dot", True, "inner_product", True),
        ("cosine", False, "inner_product", True),
        ("euclidean", False, "l2", False),
    ],
)
def test_manifest(similarity, normalize, metric, normalized):
    config = model_config(similarity, normalize=normalize)
    manifest = build_manifest(
        config,
        counts={"users": 3, "items": 5},
        id_types={"users": pa.int64(), "items": pa.string()},
        model="m",
        dataset="d",
    )
    assert manifest["dim"] == config.model.embedding_dim
    assert (manifest["similarity"], manifest["ann_metric"]) == (similarity, metric)
    assert manifest["normalized"] is normalized
    assert manifest["counts"] == {"users": 3, "items": 5}
    assert manifest["id_types"] == {"users": "int64", "items": "string"}
    assert {"model", "dataset", "created_at"} <= set(manifest)


@pytest.mark.parametrize(
    "num_rows, batch_size, concurrency, expected",
    [
        (1_000_000, 4096, 1, 62 * 4096),  # 1M / 4 blocks = 250,000 -> 62 whole batches
        (1_000_000, 4096, 2, 31 * 4096),  # 125,000 -> 31 batches
        (10_000_000, 4096, 1, 262_144),  # capped: 64 batches
        (100, 4096, 2, 4096),  # never less than one batch
        (0, 32, 1, 32),
        (1_000_000, 500_000, 1, 500_000),  # a batch larger than the cap wins
    ],
)
def test_rows_per_block(num_rows, batch_size, concurrency, expected):
    assert rows_per_block(num_rows, batch_size=batch_size, concurrency=concurrency) == expected


def test_a_pool_that_takes_every_cpu_is_refused():
    check_pool_fits(concurrency=3, cpus_per_actor=1.0, cluster_cpus=4)
    check_pool_fits(concurrency=8, cpus_per_actor=1.0, cluster_cpus=0)  # autoscaling head
    with pytest.raises(ValueError, match=r"embed.concurrency \(2\).*needs 3 CPUs.*has 2"):
        check_pool_fits(concurrency=2, cpus_per_actor=1.0, cluster_cpus=2)


def test_cli_flags_override_the_models_embed_settings(world):
    dataset, root = world
    model_dir = write_model_dir(root / "model_cli", dataset, similarity="cosine")
    parser = argparse.ArgumentParser()
    embed_job.add_arguments(parser)
    args = parser.parse_args(
        ["--model", model_dir, "--out", "x", "--batch-size", "64", "--set", "embed.concurrency=3"]
    )
    config = embed_job.config_from_args(args)
    assert (config.embed.batch_size, config.embed.concurrency) == (64, 3)
    assert config.loss.similarity == "cosine"  # the rest is the model's own config
    assert (
        embed_job.config_from_args(parser.parse_args(["--model", model_dir, "--out", "x"])) is None
    )


def test_embed_refuses_before_ray_starts(tmp_path, world):
    dataset, root = world
    with pytest.raises(FileNotFoundError, match="not a published model dir"):
        embed_job.run(model=str(tmp_path / "missing"), out=str(tmp_path / "out"))
    model_dir = write_model_dir(root / "model_refuse", dataset)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        embed_job.run(model=model_dir, out=str(tmp_path / "taken"))
