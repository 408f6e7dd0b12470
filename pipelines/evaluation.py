"""Offline evaluation on a dataset's eval split: from embedding tables, a model, or baselines.

All paths end in ``twotower_core.metrics.retrieval_metrics`` over the full catalog, excluding
each user's train positives, with the same eval users the training job scored, so the numbers
are comparable across train, evaluate and the demo.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from pipelines import io
from pipelines.embed import from_embedding_array
from pipelines.train_loop import EvalData, load_eval_data
from twotower_core.metrics import retrieval_metrics


def _metrics(user_UD, item_ID, eval_data: EvalData, *, similarity: str, ks) -> dict[str, float]:
    return retrieval_metrics(
        torch.as_tensor(user_UD),
        torch.as_tensor(item_ID),
        similarity=similarity,
        eval_indptr=torch.as_tensor(eval_data.eval_indptr),
        eval_items=torch.as_tensor(eval_data.eval_items),
        exclude_indptr=torch.as_tensor(eval_data.exclude_indptr),
        exclude_items=torch.as_tensor(eval_data.exclude_items),
        ks=tuple(ks),
    )


def align_to_vocab(
    table: pa.Table, vocab: pa.Table, *, id_column: str, idx_column: str, dim: int, what: str
) -> np.ndarray:
    """Rows of an embedding table reordered to dataset indices: ``[len(vocab), dim]``.

    Raises when a vocab id has no embedding (the tables do not cover the dataset).
    """
    ids = pl.from_arrow(table.select([id_column])).with_row_index("row")
    joined = (
        pl.from_arrow(vocab.select([id_column, idx_column]))
        .join(ids, on=id_column, how="left")
        .sort(idx_column)
    )
    missing = joined.filter(pl.col("row").is_null())
    if missing.height:
        raise ValueError(
            f"{what}: {missing.height} {id_column}s of the dataset have no embedding, "
            f"e.g. {missing[id_column].head(3).to_list()}"
        )
    vectors = from_embedding_array(table["embedding"], dim)
    return vectors[joined["row"].to_numpy()]


def evaluate_embeddings(
    embeddings: str, dataset: str, *, ks=(10, 50, 100), max_users: int | None = None, seed: int = 0
) -> dict[str, float]:
    """Metrics of published embedding tables (Contract 4) on a dataset's eval split."""
    manifest = io.read_json(io.join(embeddings, "manifest.json"))
    dim, similarity = manifest["dim"], manifest["similarity"]
    eval_data = load_eval_data(dataset, max_users=max_users, seed=seed)
    user_vocab = io.read_table(
        io.join(dataset, "vocab", "users.parquet"), columns=["user_id", "user_idx"]
    )
    item_vocab = io.read_table(
        io.join(dataset, "vocab", "items.parquet"), columns=["item_id", "item_idx"]
    )
    users = align_to_vocab(
        io.read_table(io.join(embeddings, "users")),
        user_vocab,
        id_column="user_id",
        idx_column="user_idx",
        dim=dim,
        what="users",
    )
    items = align_to_vocab(
        io.read_table(io.join(embeddings, "items")),
        item_vocab,
        id_column="item_id",
        idx_column="item_idx",
        dim=dim,
        what="items",
    )
    return _metrics(users[eval_data.user_idx], items, eval_data, similarity=similarity, ks=ks)


def evaluate_popularity(
    dataset: str, *, ks=(10, 50, 100), max_users: int | None = None, seed: int = 0
) -> dict[str, float]:
    """MostPop: every user gets the items with the most train clicks (ties by index)."""
    eval_data = load_eval_data(dataset, max_users=max_users, seed=seed)
    counts = io.read_table(io.join(dataset, "vocab", "items.parquet"), columns=["count"])[
        "count"
    ].to_numpy()
    # Dot product of a constant user vector [1] with item vectors [count] scores by popularity;
    # the tiny index term breaks ties deterministically.
    item_I1 = (counts.astype(np.float64) - 1e-9 * np.arange(len(counts)))[:, None]
    user_U1 = np.ones((len(eval_data.user_idx), 1))
    return _metrics(user_U1, item_I1, eval_data, similarity="dot", ks=ks)


def evaluate_vectors(
    user_vectors_by_idx: np.ndarray,
    item_vectors_by_idx: np.ndarray,
    dataset: str,
    *,
    similarity: str,
    ks=(10, 50, 100),
    max_users: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of arbitrary per-index vectors (e.g. a planted oracle) on the eval split."""
    eval_data = load_eval_data(dataset, max_users=max_users, seed=seed)
    return _metrics(
        user_vectors_by_idx[eval_data.user_idx],
        item_vectors_by_idx,
        eval_data,
        similarity=similarity,
        ks=ks,
    )
