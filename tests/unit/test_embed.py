"""pipelines.embed without Ray: the actor's batch function, id lookup, output checks, manifest."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

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
    EmbedParts,
    IdIndex,
    build_manifest,
    check_pool_fits,
    check_side,
    embedding_type,
    from_embedding_array,
    oov_buckets,
    output_schema,
    plan_parts,
    to_embedding_array,
)
from pipelines.features import build_feature_table
from pipelines.train_loop import embed_all
from tests.model_fixtures import model_config, write_dataset_dir, write_model_dir
from twotower_core.config import config_from_dict, config_to_dict


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


U64 = 2**64 - 1


def splitmix64(value: int) -> int:
    """SplitMix64 written from its definition on Python ints."""
    z = (value + 0x9E3779B97F4A7C15) & U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def fnv1a64(data: bytes) -> int:
    """64-bit FNV-1a written from its definition on Python ints."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & U64
    return h


def test_hash_references_match_published_values():
    # SplitMix64 seeded with 0: first output 0xE220A8397B1DCDAF; FNV-1a 64 test vectors.
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


# Fixed buckets, so a change of hash function is caught. With 16 buckets the bucket is the
# hash's last hex digit:
#   int 0:   splitmix64(0)                = 0x…1DCDAF → 0xF = 15
#   int 1:   splitmix64(1)                = 0x…025CC1 → 1
#   int 42:  splitmix64(42)               = 0x…EB6E95 → 5
#   int −1:  splitmix64(2^64 − 1)         = 0x…652C20 → 0
#   "a":      splitmix64(0xAF63DC4C8601EC8C) = 0x…9B8527 → 7
#   "foobar": splitmix64(0x85944171F73967E8) = 0x…03DE4F → 0xF = 15
INT_BUCKETS = {0: 15, 1: 1, 42: 5, -1: 0}
STRING_BUCKETS = {"a": 7, "foobar": 15}


def test_oov_buckets_are_fixed_hash_values():
    assert hex(splitmix64(0)).endswith("1dcdaf") and hex(splitmix64(1)).endswith("025cc1")
    assert hex(splitmix64(42)).endswith("eb6e95") and hex(splitmix64(U64)).endswith("652c20")
    assert hex(splitmix64(fnv1a64(b"a"))).endswith("9b8527")
    assert hex(splitmix64(fnv1a64(b"foobar"))).endswith("03de4f")
    ints, strings = list(INT_BUCKETS), list(STRING_BUCKETS)
    expected_ints, expected_strings = list(INT_BUCKETS.values()), list(STRING_BUCKETS.values())
    assert oov_buckets(pa.array(ints), 16).tolist() == expected_ints
    assert oov_buckets(pa.array(strings), 16).tolist() == expected_strings
    # The value decides, not the column type, and a sliced array hashes the same.
    assert oov_buckets(pa.array(ints, pa.int32()), 16).tolist() == expected_ints
    assert oov_buckets(pa.array(strings, pa.large_string()), 16).tolist() == expected_strings
    assert oov_buckets(pa.array(["x", *strings]).slice(1), 16).tolist() == expected_strings
    # Non-ASCII strings hash their UTF-8 bytes; empty strings hash to FNV's offset basis.
    odd = ["né", "", "日本"]
    expected = [splitmix64(fnv1a64(value.encode())) % 16 for value in odd]
    assert oov_buckets(pa.array(odd), 16).tolist() == expected
    assert oov_buckets(pa.array(["", ""]), 16).tolist() == [splitmix64(fnv1a64(b"")) % 16] * 2


def test_oov_buckets_are_the_same_in_another_process():
    """Python's str hash() is salted per process; the bucket must not be."""
    code = (
        "import pyarrow as pa; from pipelines.embed import oov_buckets; "
        "print(oov_buckets(pa.array(['a', 'foobar', 'new-7']), 16).tolist(), "
        "oov_buckets(pa.array([0, 1, 42, -1]), 16).tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    here = oov_buckets(pa.array(["a", "foobar", "new-7"]), 16).tolist()
    assert result.stdout.split() == f"{here} {list(INT_BUCKETS.values())}".split()
    assert here[:2] == list(STRING_BUCKETS.values())


@pytest.mark.parametrize(
    "ids",
    [
        pa.array(np.arange(1000, 1800)),
        pa.array(np.arange(1000, 1800) * 8),  # strided: id mod 8 would be a single bucket
        pa.array([f"new-{i}" for i in range(800)]),
    ],
    ids=["consecutive", "strided", "strings"],
)
def test_oov_buckets_spread_unseen_ids(ids):
    # 800 ids over 8 buckets: 100 expected per bucket; a fair hash stays well within 50..150.
    counts = np.bincount(oov_buckets(ids, 8), minlength=8)
    assert counts.sum() == 800 and counts.min() >= 50 and counts.max() <= 150


def test_oov_buckets_mix_fnvs_low_bits():
    # A, I, Q, Y, a, i, q, y agree in their low 3 bits, so plain FNV-1a mod 8 puts these in one
    # bucket; after the mix they spread.
    ids = [f"item-{c}" for c in "AIQYaiqy"]
    assert len({fnv1a64(i.encode()) % 8 for i in ids}) == 1
    assert len(set(oov_buckets(pa.array(ids), 8).tolist())) > 1


def test_tower_rows_code_unseen_ids_by_bucket():
    vocab = pa.array([30, 10, 20])
    queries = pa.array([10, 0, 1, 42, 30, -1])
    # Known ids keep their vocab row; unseen ones are −1 − bucket (INT_BUCKETS, 16 buckets):
    # 0 → −1 − 15 = −16, 1 → −2, 42 → −6, −1 → −1.
    assert IdIndex(vocab, num_oov_buckets=16).tower_rows(queries).tolist() == [
        1,
        -16,
        -2,
        -6,
        0,
        -1,
    ]
    # One bucket: every unseen id is −1, the shared OOV row.
    assert IdIndex(vocab).tower_rows(queries).tolist() == [1, -1, -1, -1, 0, -1]
    # STRING_BUCKETS: "foobar" → −1 − 15 = −16, "a" → −1 − 7 = −8.
    strings = IdIndex(pa.array(["c", "x", "b"]), num_oov_buckets=16)
    assert strings.tower_rows(pa.array(["b", "foobar", "a", "c"])).tolist() == [2, -16, -8, 0]
    empty = IdIndex(pa.array([], pa.int64()), num_oov_buckets=16)
    assert empty.tower_rows(pa.array([42])).tolist() == [-6]
    # Same input, same output, every call.
    index = IdIndex(vocab, num_oov_buckets=16)
    assert index.tower_rows(queries).tolist() == index.tower_rows(queries).tolist()


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


def zero_id_vector_embedding(tower, features):
    """``tower``'s forward written out with the ID part of the MLP input set to 0."""
    features_BF = tower.features(features)
    zeros_BI = torch.zeros(features_BF.shape[0], tower.id_embedding.embedding_dim)
    return tower.mlp(torch.cat([zeros_BI, features_BF], dim=1))


@pytest.mark.parametrize("num_oov_buckets", [1, 4])
def test_new_items_embed_from_their_features(world, num_oov_buckets):
    """Items the model never saw hash into zero OOV rows, so their features alone embed them;
    a cold catalog item (in the vocab, never clicked) keeps its own row."""
    dataset, root = world
    config = config_from_dict(
        config_to_dict(model_config()), overrides=[f"model.num_oov_buckets={num_oov_buckets}"]
    )
    model_dir = write_model_dir(root / f"model_new_{num_oov_buckets}", dataset, config=config)
    loaded = load_model(model_dir)
    tower = loaded.model.item_tower
    table = features_table(dataset, "items")
    id_type = table.schema.field("item_id").type
    new_ids = [f"new-{i}" for i in range(8)] if pa.types.is_string(id_type) else list(range(-8, 0))
    new = (
        table.slice(0, 8)
        .set_column(1, "item_id", pa.array(new_ids, id_type))
        .set_column(2, "category", pa.array(["x", "z", "y", "x", "z", "y", "x", "z"]))
    )
    embed = EmbedBatch(model_dir, "items")
    seen_rows = []

    def recording(rows_B, features):
        seen_rows.append(rows_B.tolist())
        return tower(rows_B, features)

    embed.tower = recording
    got_ND = from_embedding_array(embed(new)["embedding"], 32)
    # The ids went to the tower as −1 − bucket, i.e. to OOV rows num_ids + bucket.
    codes = -1 - oov_buckets(new["item_id"].combine_chunks(), num_oov_buckets)
    assert seen_rows == [codes.tolist()]
    if num_oov_buckets > 1:
        assert len(set(codes.tolist())) > 1  # 8 new ids did not all share one bucket
    features = build_feature_table(new, loaded.item_specs).lookup(torch.arange(8))
    with torch.no_grad():
        expected_ND = zero_id_vector_embedding(tower, features)
    oov_rows = tower.id_embedding.weight[tower.num_ids :]
    assert oov_rows.shape[0] == num_oov_buckets and not oov_rows.any()
    np.testing.assert_allclose(got_ND, expected_ND.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got_ND[0], got_ND[1])
    cold = table.slice(table.num_rows - 1, 1)  # the fixture's last items have no clicks
    cold_D = from_embedding_array(embed(cold)["embedding"], 32)[0]
    with torch.no_grad():
        cold_features = build_feature_table(cold, loaded.item_specs).lookup(torch.arange(1))
        cold_zero_id_D = zero_id_vector_embedding(tower, cold_features)[0]
    assert not np.allclose(cold_D, cold_zero_id_D.numpy())


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


def test_an_ensemble_model_embeds_and_declares_its_full_width(world):
    """``model.ensemble_members`` 2: the published model loads back as two members a side,
    each side's vectors are the members' concatenated (2 × 32 wide), and the manifest says so."""
    dataset, root = world
    config = config_from_dict(
        config_to_dict(model_config("dot")), overrides=["model.ensemble_members=2"]
    )
    model_dir = write_model_dir(root / "model_ensemble", dataset, config=config)
    loaded = load_model(model_dir)
    table = features_table(dataset, "items")
    got = EmbedBatch(model_dir, "items")(table)
    assert got.schema.equals(output_schema("items", table.schema.field("item_id").type, 64))
    tower_members = loaded.model.item_tower.members
    features = build_feature_table(table, loaded.item_specs)
    expected_ND = torch.cat(
        [embed_all(member, features, np.arange(table.num_rows)) for member in tower_members], 1
    )
    np.testing.assert_allclose(
        from_embedding_array(got["embedding"], 64), expected_ND.numpy(), rtol=1e-5, atol=1e-6
    )
    manifest = build_manifest(
        config, counts={"users": 1, "items": 1}, id_types={}, model="m", dataset="d"
    )
    assert manifest["dim"] == 64


def write_row_groups(path, table: pa.Table, row_group_rows: int) -> str:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path), row_group_size=row_group_rows)
    return str(path)


def test_plan_parts_splits_a_lone_row_group_into_whole_ranges(tmp_path):
    source = write_row_groups(tmp_path / "t" / "a.parquet", pa.table({"x": range(10_000)}), 10_000)
    parts = plan_parts(source, "dest", side="items", min_parts=4, batch_size=1000)
    assert [(p["row_group"], p["start"], p["stop"]) for p in parts] == [
        (0, 0, 2500), (0, 2500, 5000), (0, 5000, 7500), (0, 7500, 10_000)
    ]  # fmt: skip
    assert [p["out"] for p in parts] == [io.join("dest", f"part-{i:05d}.parquet") for i in range(4)]
    assert {p["side"] for p in parts} == {"items"} and {p["path"] for p in parts} == {source}
    # never a range shorter than one batch
    assert len(plan_parts(source, "dest", side="items", min_parts=4, batch_size=4000)) == 2
    assert len(plan_parts(source, "dest", side="items", min_parts=4, batch_size=50_000)) == 1


def test_plan_parts_one_per_row_group_when_there_are_enough(tmp_path):
    folder = tmp_path / "many"
    write_row_groups(folder / "a.parquet", pa.table({"x": range(300)}), 100)
    write_row_groups(folder / "b.parquet", pa.table({"x": range(250)}), 100)
    parts = plan_parts(str(folder), "dest", side="users", min_parts=2, batch_size=10)
    assert [(p["path"].rsplit("/", 1)[1], p["row_group"], p["start"], p["stop"]) for p in parts] == [
        ("a.parquet", 0, 0, 100), ("a.parquet", 1, 0, 100), ("a.parquet", 2, 0, 100),
        ("b.parquet", 0, 0, 100), ("b.parquet", 1, 0, 100), ("b.parquet", 2, 0, 50),
    ]  # fmt: skip
    empty = write_row_groups(tmp_path / "e" / "e.parquet", pa.table({"x": pa.array([], pa.int64())}), 10)
    assert plan_parts(empty, "dest", side="users", min_parts=2, batch_size=10) == []


def test_embed_parts_writes_each_range_as_embed_batch_would(world, tmp_path):
    """Row ranges that cut across the reader's batches: every row once, in order, in its
    part's file, with the values EmbedBatch gives for the whole table."""
    import pyarrow.parquet as pq

    dataset, root = world
    model_dir = write_model_dir(root / "model_parts", dataset)
    table = features_table(dataset, "items")  # 40 rows
    source = write_row_groups(tmp_path / "items" / "f.parquet", table, 25)  # groups of 25, 15
    parts = [
        {"side": "items", "path": source, "row_group": 0, "start": 0, "stop": 11},
        {"side": "items", "path": source, "row_group": 0, "start": 11, "stop": 25},
        {"side": "items", "path": source, "row_group": 1, "start": 0, "stop": 15},
    ]
    for i, part in enumerate(parts):
        part["out"] = str(tmp_path / "out" / f"part-{i}.parquet")
    actor = EmbedParts(model_dir, batch_size=4)
    done = actor(pa.Table.from_pylist(parts))
    assert done.to_pydict() == {
        "side": ["items"] * 3,
        "file": [p["out"] for p in parts],
        "rows": [11, 14, 15],
    }
    written = pa.concat_tables([pq.read_table(p["out"]) for p in parts])
    expected = EmbedBatch(model_dir, "items")(table)
    assert written["item_id"].to_pylist() == table["item_id"].to_pylist()
    np.testing.assert_allclose(
        from_embedding_array(written["embedding"], 32),
        from_embedding_array(expected["embedding"], 32),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    # a retried part rewrites its file rather than appending to it
    actor(pa.Table.from_pylist(parts[:1]))
    assert pq.read_table(parts[0]["out"]).num_rows == 11


def test_a_pool_larger_than_the_cluster_is_refused():
    check_pool_fits(concurrency=2, cpus_per_actor=1.0, cluster_cpus=2)
    check_pool_fits(concurrency=8, cpus_per_actor=1.0, cluster_cpus=0)  # autoscaling head
    with pytest.raises(ValueError, match=r"embed.concurrency \(3\).*needs 3 CPUs.*has 2"):
        check_pool_fits(concurrency=3, cpus_per_actor=1.0, cluster_cpus=2)
    # --use-gpu: one GPU per actor
    check_pool_fits(concurrency=2, cpus_per_actor=1.0, cluster_cpus=8, use_gpu=True, cluster_gpus=2)
    with pytest.raises(ValueError, match=r"needs 2 GPUs, one per actor; this Ray cluster has 0"):
        check_pool_fits(concurrency=2, cpus_per_actor=1.0, cluster_cpus=8, use_gpu=True)


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
    assert config.embed.use_gpu is False
    gpu = embed_job.config_from_args(parser.parse_args(["--model", model_dir, "--out", "x", "--use-gpu"]))
    assert gpu.embed.use_gpu is True
    assert (
        embed_job.config_from_args(parser.parse_args(["--model", model_dir, "--out", "x"])) is None
    )


def test_embed_refuses_before_ray_starts(tmp_path, world):
    dataset, root = world
    with pytest.raises(FileNotFoundError, match="not a published model dir"):
        embed_job.run(model=str(tmp_path / "missing"), out=str(tmp_path / "out"))
    model_dir = write_model_dir(root / "model_refuse", dataset)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("not empty")  # an empty dir counts as none
    with pytest.raises(FileExistsError, match="already exists"):
        embed_job.run(model=model_dir, out=str(tmp_path / "taken"))
