"""Offline evaluation on a dataset's eval split: from embedding tables, or baselines.

Legend: U users, I items, D embedding dim.

Every path ends in ``twotower_core.metrics.retrieval_metrics`` over the full catalog, excluding
each user's train positives, with the eval users ``pipelines.train_loop.load_eval_data`` picks
(all of them, or a seeded sample), exactly as the training job scores each epoch. So published
embedding tables evaluated with the model's own settings (``settings_of_model``) reproduce the
numbers in the model's ``metrics.json`` up to float rounding: the check that the tables a
retrieval service loads are the model that was validated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipelines import io
from pipelines.checkpoint import load_config_of
from pipelines.embed import IdIndex
from pipelines.retrieval import EmbeddingTable, load_embeddings
from pipelines.train_loop import EvalData, load_eval_data
from twotower_core.metrics import popularity_embeddings, retrieval_metrics


@dataclass(frozen=True)
class EvalSettings:
    """Which cut-offs and which eval users: the knobs that must match to compare numbers."""

    ks: tuple[int, ...] = (10, 50, 100)
    max_users: int | None = None  # None = every eval user
    seed: int = 0  # picks the sample when max_users is set


def settings_of_model(model_dir: str) -> EvalSettings:
    """The settings the training job evaluated with (``train.eval_ks``, ``eval_max_users``, ``seed``)."""
    train = load_config_of(model_dir).train
    return EvalSettings(ks=tuple(train.eval_ks), max_users=train.eval_max_users, seed=train.seed)


def _metrics(
    user_UD: np.ndarray, item_ID: np.ndarray, eval_data: EvalData, *, similarity: str, ks
) -> dict[str, float]:
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
    table: EmbeddingTable, vocab: pa.Table, *, id_column: str, idx_column: str, what: str
) -> np.ndarray:
    """Vectors of an embedding table in dataset index order: ``[len(vocab), D]``.

    Ids the table has beyond the vocab (items added after the dataset) are left out; a vocab
    id the table lacks is an error (the tables do not cover the dataset).
    """
    rows = IdIndex(table.ids).rows(vocab[id_column].combine_chunks())
    missing = np.flatnonzero(rows < 0)
    if len(missing):
        examples = vocab[id_column].take(pa.array(missing[:3])).to_pylist()
        raise ValueError(
            f"{what}: {len(missing)} {id_column}s of the dataset have no embedding, e.g. {examples}"
        )
    index = vocab[idx_column].to_numpy()
    if not np.array_equal(np.sort(index), np.arange(len(index))):
        raise ValueError(f"{what}: {idx_column} of the dataset vocab is not 0..{len(index) - 1}")
    aligned = np.empty((len(index), table.vectors_ND.shape[1]), dtype=np.float32)
    aligned[index] = table.vectors_ND[rows]
    return aligned


def _vocab(dataset: str, side: str) -> pa.Table:
    key = side[:-1]
    return io.read_table(
        io.join(dataset, "vocab", f"{side}.parquet"), columns=[f"{key}_id", f"{key}_idx"]
    )


def evaluate_embeddings(
    embeddings: str,
    dataset: str,
    *,
    ks: Sequence[int] = (10, 50, 100),
    max_users: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of published embedding tables (Contract 4) on a dataset's eval split."""
    tables = load_embeddings(embeddings)
    assert tables.users is not None and tables.items is not None
    eval_data = load_eval_data(dataset, max_users=max_users, seed=seed)
    user_UD = align_to_vocab(
        tables.users,
        _vocab(dataset, "users"),
        id_column="user_id",
        idx_column="user_idx",
        what=f"users/ of {embeddings}",
    )
    item_ID = align_to_vocab(
        tables.items,
        _vocab(dataset, "items"),
        id_column="item_id",
        idx_column="item_idx",
        what=f"items/ of {embeddings}",
    )
    return _metrics(
        user_UD[eval_data.user_idx], item_ID, eval_data, similarity=tables.similarity, ks=ks
    )


def evaluate_popularity(
    dataset: str, *, ks: Sequence[int] = (10, 50, 100), max_users: int | None = None, seed: int = 0
) -> dict[str, float]:
    """MostPop: every user gets the items with the most train clicks (ties by lower index)."""
    eval_data = load_eval_data(dataset, max_users=max_users, seed=seed)
    counts = io.read_table(
        io.join(dataset, "vocab", "items.parquet"), columns=["item_idx", "count"]
    )
    counts_I = np.zeros(counts.num_rows, dtype=np.int64)
    counts_I[counts["item_idx"].to_numpy()] = counts["count"].to_numpy()
    user_U1, item_I1 = popularity_embeddings(counts_I, len(eval_data.user_idx))
    return _metrics(user_U1.numpy(), item_I1.numpy(), eval_data, similarity="dot", ks=ks)


def evaluate_vectors(
    user_vectors_by_idx: np.ndarray,
    item_vectors_by_idx: np.ndarray,
    dataset: str,
    *,
    similarity: str,
    ks: Sequence[int] = (10, 50, 100),
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
