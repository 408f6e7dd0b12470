"""Tiny dataset dirs (Contract 2) and model dirs (Contract 3) built by hand, without Ray.

    dataset = write_dataset_dir(tmp_path / "dataset", num_users=20, num_items=40)
    model = write_model_dir(tmp_path / "model", dataset, similarity="cosine")

The dataset has users (country), items (category, tags, price with a null), vocab with click
counts (the last ``cold_items`` items have none), train and eval positives. The model is
randomly initialised from a seed: good enough to check that embedding, evaluation and retrieval
agree with each other, which is all these fixtures are for.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipelines import io
from pipelines.checkpoint import model_payload
from pipelines.checkpoint import write_model_dir as write_checkpoint
from pipelines.contracts import eval_schema, train_schema, vocab_schema
from pipelines.embed import EmbedBatch
from pipelines.retrieval import brute_force_top_k
from pipelines.synthetic import make_ids
from twotower_core.config import Config, debug_config
from twotower_core.towers import build_two_tower

SPLIT = datetime(2026, 11, 3, tzinfo=UTC)
TS_TYPE = pa.timestamp("us", tz="UTC")


def entity_tables(
    num_users: int, num_items: int, *, id_type: str = "int", seed: int = 0
) -> tuple[pa.Table, pa.Table]:
    """(users: user_id, country; items: item_id, category, tags, price) in id order."""
    rng = np.random.default_rng(seed)
    users = pa.table(
        {
            "user_id": make_ids(num_users, kind="user", id_type=id_type),
            "country": pa.array(rng.choice(["de", "fr", "us"], num_users).tolist()),
        }
    )
    tags = [
        rng.choice(["a", "b", "c", "d", "e"], rng.integers(0, 4), replace=False).tolist()
        for _ in range(num_items)
    ]
    price = np.round(rng.lognormal(3.0, 0.5, num_items), 2).tolist()
    price[0] = None  # a missing numeric value must embed too
    items = pa.table(
        {
            "item_id": make_ids(num_items, kind="item", id_type=id_type),
            "category": pa.array(rng.choice(["x", "y", "z"], num_items).tolist()),
            "tags": pa.array(tags, pa.list_(pa.string())),
            "price": pa.array(price, pa.float64()),
        }
    )
    return users, items


def write_dataset_dir(
    out: str | Path,
    *,
    num_users: int = 20,
    num_items: int = 40,
    cold_items: int = 5,
    id_type: str = "int",
    seed: int = 0,
) -> str:
    """A complete Contract 2 dir; items ``num_items - cold_items ..`` are never clicked."""
    rng = np.random.default_rng([seed, 1])
    users, items = entity_tables(num_users, num_items, id_type=id_type, seed=seed)
    warm_items = num_items - cold_items
    train_pairs = [
        (u, int(i))
        for u in range(num_users)
        for i in rng.choice(warm_items, rng.integers(1, 5), replace=False)
    ]
    eval_pairs = [
        (u, int(i))
        for u in range(0, num_users, 2)
        for i in rng.choice(warm_items, rng.integers(1, 4), replace=False)
    ]
    user_counts = np.bincount([u for u, _ in train_pairs], minlength=num_users)
    item_counts = np.bincount([i for _, i in train_pairs], minlength=num_items)
    user_ids, item_ids = users["user_id"], items["item_id"]

    def rows(pairs, start: datetime, schema: pa.Schema, *, train: bool) -> pa.Table:
        user_idx = np.array([u for u, _ in pairs], np.int64)
        item_idx = np.array([i for _, i in pairs], np.int64)
        columns = {
            "user_id": user_ids.take(pa.array(user_idx)),
            "item_id": item_ids.take(pa.array(item_idx)),
            "ts": pa.array([start + timedelta(minutes=n) for n in range(len(pairs))], TS_TYPE),
        }
        if train:
            columns["request_id"] = pa.array([f"r{n}" for n in range(len(pairs))])
            columns["neg_item_ids"] = pa.array([[] for _ in pairs], pa.list_(item_ids.type))
            columns["neg_sources"] = pa.array([[] for _ in pairs], pa.list_(pa.string()))
        columns["user_idx"] = pa.array(user_idx)
        columns["item_idx"] = pa.array(item_idx)
        if train:
            columns["neg_item_idxs"] = pa.array([[] for _ in pairs], pa.list_(pa.int64()))
        return pa.table(columns).cast(schema)

    id_arrow = users.schema.field("user_id").type
    with io.staged_output(str(out)) as staging:
        io.write_table(
            io.join(staging, "train", "part-0.parquet"),
            rows(
                train_pairs,
                SPLIT - timedelta(days=1),
                train_schema(id_arrow, id_arrow, TS_TYPE),
                train=True,
            ),
        )
        io.write_table(
            io.join(staging, "eval", "part-0.parquet"),
            rows(eval_pairs, SPLIT, eval_schema(id_arrow, id_arrow, TS_TYPE), train=False),
        )
        for side, table, counts in (("user", users, user_counts), ("item", items, item_counts)):
            index = pa.array(np.arange(table.num_rows, dtype=np.int64))
            vocab = pa.table(
                [table[f"{side}_id"], index, pa.array(counts.astype(np.int64))],
                schema=vocab_schema(side, id_arrow),
            )
            io.write_table(io.join(staging, "vocab", f"{side}s.parquet"), vocab)
            features = table.add_column(0, f"{side}_idx", index)
            io.write_table(io.join(staging, "features", f"{side}s.parquet"), features)
        io.write_json(
            io.join(staging, "manifest.json"),
            {"counts": {"train_positives": len(train_pairs), "eval_positives": len(eval_pairs)}},
        )
    return str(out)


def model_config(similarity: str = "dot", *, normalize: bool = False) -> Config:
    """The debug preset with ``similarity`` (and a loss that accepts it)."""
    from twotower_core.config import config_from_dict, config_to_dict

    return config_from_dict(
        config_to_dict(debug_config()),
        overrides=[f"loss.similarity={similarity}", f"model.normalize={str(normalize).lower()}"],
    )


def write_model_dir(
    out: str | Path,
    dataset: str,
    *,
    config: Config | None = None,
    similarity: str = "dot",
    seed: int = 0,
    metrics: dict | None = None,
) -> str:
    """A published, randomly initialised model dir for ``dataset``."""
    from jobs.train import infer_specs

    config = config or model_config(similarity)
    user_specs, item_specs = infer_specs(dataset, config)
    num_users = io.count_rows(io.join(dataset, "vocab", "users.parquet"))
    num_items = io.count_rows(io.join(dataset, "vocab", "items.parquet"))
    torch.manual_seed(seed)
    model = build_two_tower(
        config.model,
        num_users=num_users,
        num_items=num_items,
        user_specs=user_specs,
        item_specs=item_specs,
    )
    payload = model_payload(
        model.state_dict(),
        config=config,
        user_specs=user_specs,
        item_specs=item_specs,
        num_users=num_users,
        num_items=num_items,
    )
    with io.staged_output(str(out)) as staging:
        write_checkpoint(
            staging,
            payload=payload,
            config=config,
            dataset_dir=dataset,
            metrics=metrics or {"best": {}, "epochs": []},
            train_log_csv="",
        )
    return str(out)


def write_embeddings_dir(
    out: str | Path, model: str, *, dataset: str | None = None, batch_size: int = 16
) -> str:
    """A published Contract 4 dir embedded in this process (no Ray), as the embed job would."""
    from pipelines.checkpoint import load_config_of
    from pipelines.embed import (
        MANIFEST_FILE,
        SIDES,
        build_manifest,
        check_side,
        source_id_type,
    )

    dataset = dataset or io.read_json(io.join(model, "checkpoint", "dataset.json"))["dataset"]
    config = load_config_of(model)
    counts, id_types = {}, {}
    with io.staged_output(str(out)) as staging:
        for side in SIDES:
            source = io.join(dataset, "features", f"{side}.parquet")
            table = io.read_table(source)
            embed = EmbedBatch(model, side)
            for number, start in enumerate(range(0, table.num_rows, batch_size)):
                part = embed(table.slice(start, batch_size))
                io.write_table(io.join(staging, side, f"part-{number:04d}.parquet"), part)
            id_types[side] = source_id_type(source, side)
            counts[side] = check_side(
                io.join(staging, side),
                side=side,
                id_type=id_types[side],
                dim=config.model.embedding_dim,
                expected_rows=table.num_rows,
            )
        manifest = build_manifest(
            config, counts=counts, id_types=id_types, model=model, dataset=dataset
        )
        io.write_json(io.join(staging, MANIFEST_FILE), manifest)
    return str(out)


def assert_same_top_k(found, queries_QD, items, *, similarity: str, k: int) -> float:
    """FAISS top k against the full brute-force ranking; returns the share of positions whose
    id was compared exactly.

    Tolerant of near-ties only (FAISS and torch round differently): every returned item must
    carry its true score, in order, with no better item missing; and every position whose score
    is clear of its neighbours' must hold the same id as the reference.
    """
    full = brute_force_top_k(queries_QD, items, similarity=similarity, k=len(items))
    compared = 0
    for ids, scores_K, all_ids, all_scores in zip(
        found.ids, found.scores_QK, full.ids, full.scores_QK
    ):
        tol = 1e-5 * max(1.0, float(np.abs(all_scores).max()))
        assert len(ids) == len(set(ids)) == k
        true_score = dict(zip(all_ids, all_scores.tolist()))
        np.testing.assert_allclose(scores_K, [true_score[i] for i in ids], rtol=0, atol=tol)
        assert (np.diff(scores_K) <= tol).all()
        assert scores_K[-1] >= all_scores[k - 1] - tol
        gaps = np.abs(np.diff(all_scores[: k + 1]))
        for position in range(k):
            before = gaps[position - 1] if position else np.inf
            if before > tol and gaps[position] > tol:
                assert ids[position] == all_ids[position], position
                compared += 1
    return compared / (k * len(found.ids))


class FailingEmbedBatch(EmbedBatch):
    """An ``EmbedBatch`` whose item side raises on its second batch: a crash mid-way."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_done = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.side == "items" and self.batches_done >= 1:
            raise RuntimeError("injected failure in the item tower")
        self.batches_done += 1
        return super().__call__(batch)
