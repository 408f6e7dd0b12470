"""Batch inference for Contract 4: tower outputs for every user and every catalog item.

``EmbedBatch`` is a callable class run on a Ray Data actor pool: each actor loads the model
once, then maps pyarrow batches of an entity table (id + feature columns) to
``(id, embedding: fixed_size_list<float32>[dim])``. Ids the model has never seen go to its
OOV rows, so new catalog items still get an embedding from their features.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from pipelines.checkpoint import load_model
from pipelines.features import encode_features
from twotower_core.similarity import normalize_for_serving

SIDES = {"users": "user_id", "items": "item_id"}


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def to_embedding_array(vectors_ND: np.ndarray) -> pa.FixedSizeListArray:
    """``[N, D]`` float32 -> ``fixed_size_list<float32>[D]``."""
    num_rows, dim = vectors_ND.shape
    flat = pa.array(np.ascontiguousarray(vectors_ND, dtype=np.float32).reshape(-1))
    return (
        pa.FixedSizeListArray.from_arrays(flat, dim)
        if num_rows or dim
        else pa.array([], embedding_type(dim))
    )


def from_embedding_array(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """``fixed_size_list<float32>[D]`` -> ``[N, D]`` float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return (
        column.flatten()
        .to_numpy(zero_copy_only=False)
        .reshape(-1, dim)
        .astype(np.float32, copy=False)
    )


class EmbedBatch:
    """Ray Data actor: loads the model once, embeds one side (``users`` or ``items``)."""

    def __init__(self, model_dir: str, side: str, *, torch_threads: int = 1):
        if side not in SIDES:
            raise ValueError(f"side must be one of {sorted(SIDES)}, got {side!r}")
        torch.set_num_threads(torch_threads)
        loaded = load_model(model_dir)
        self.side = side
        self.id_column = SIDES[side]
        self.tower = loaded.model.user_tower if side == "users" else loaded.model.item_tower
        self.specs = loaded.user_specs if side == "users" else loaded.item_specs
        vocab = loaded.user_vocab if side == "users" else loaded.item_vocab
        self.vocab = pl.from_arrow(vocab.select([self.id_column])).with_row_index("row")
        self.normalize = normalize_for_serving(loaded.config.loss.similarity)

    def rows_of(self, ids: pa.Array) -> np.ndarray:
        """Model vocab row of each id, -1 for ids the model never saw: ``[B]``."""
        frame = pl.DataFrame({self.id_column: pl.Series(values=ids)}).with_row_index("position")
        joined = frame.join(self.vocab, on=self.id_column, how="left").sort("position")
        return joined["row"].fill_null(-1).cast(pl.Int64).to_numpy()

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch[self.id_column].combine_chunks()
        rows_B = torch.as_tensor(self.rows_of(ids))
        features = {
            name: torch.as_tensor(values)
            for name, values in encode_features(batch, self.specs).items()
        }
        vectors_BD = self.tower(rows_B, features)
        if self.normalize:
            vectors_BD = torch.nn.functional.normalize(vectors_BD, dim=-1)
        vectors = vectors_BD.float().numpy()
        if not np.isfinite(vectors).all():
            bad = ids.take(pa.array(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[:5]))
            raise ValueError(
                f"{self.side}: non-finite embeddings for {self.id_column} {bad.to_pylist()}"
            )
        return pa.table({self.id_column: ids, "embedding": to_embedding_array(vectors)})
