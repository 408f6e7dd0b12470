"""Consuming Contract 4: read published embedding tables, build an exact FAISS index, rank items.

Legend: N rows of a table, D embedding dim, Q queries, K results per query.

This is what a retrieval service does with an embedding dir: it trusts only a published one
(``_SUCCESS``), takes dim, similarity and ANN metric from ``manifest.json`` instead of guessing,
checks the tables against it, and keeps the original ids:

- int item ids go into FAISS as its ids (``IndexIDMap2``), so a search returns item ids;
- string ids cannot (FAISS ids are int64): the index holds row numbers, mapped back through
  the ``item_id`` column of the same Parquet. Ids are never hashed into int64.

Scores come back on the similarity's own scale (higher = closer): inner products as they are
(on L2-normalised vectors for cosine, so they are the cosines); ``IndexFlatL2`` returns
‖u − v‖², turned into −‖u − v‖ as ``twotower_core.similarity`` defines euclidean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipelines import io
from pipelines.embed import (
    EMBEDDING_COLUMN,
    MANIFEST_FILE,
    SIDES,
    EmbeddingValidationError,
    embedding_type,
    from_embedding_array,
)
from twotower_core.similarity import ann_metric as ann_metric_of
from twotower_core.similarity import similarity as get_similarity

MANIFEST_KEYS: tuple[str, ...] = ("dim", "similarity", "normalized", "ann_metric", "counts")
# ann metric (manifest) -> exact FAISS index class
FAISS_INDEXES: dict[str, str] = {"inner_product": "IndexFlatIP", "l2": "IndexFlatL2"}
UNIT_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class EmbeddingTable:
    """One side of an embedding dir: ``ids`` [N] (original type) and ``vectors_ND`` float32."""

    ids: pa.Array
    vectors_ND: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def vectors_of(self, ids: Sequence[Any], *, what: str) -> np.ndarray:
        """``[Q, D]`` rows for ``ids``; ValueError naming the ids that are not in the table."""
        positions = pc.index_in(pa.array(list(ids), self.ids.type), value_set=self.ids)
        missing = [i for i, p in zip(ids, positions.to_pylist()) if p is None]
        if missing:
            raise ValueError(f"{what}: no embedding for {missing[:5]} ({len(missing)} missing)")
        return self.vectors_ND[positions.to_numpy(zero_copy_only=False)]


@dataclass(frozen=True)
class Embeddings:
    """A published embedding dir, read and checked against its manifest."""

    path: str
    manifest: dict[str, Any]
    users: EmbeddingTable | None
    items: EmbeddingTable | None

    @property
    def similarity(self) -> str:
        return self.manifest["similarity"]

    @property
    def ann_metric(self) -> str:
        return self.manifest["ann_metric"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])


def read_manifest(path: str) -> dict[str, Any]:
    """``manifest.json`` of a published embedding dir, with its keys and metric checked."""
    if not io.is_complete(path):
        raise FileNotFoundError(f"embeddings {path}: not a published embedding dir (no _SUCCESS)")
    manifest = io.read_json(io.join(path, MANIFEST_FILE))
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise EmbeddingValidationError(
            f"embeddings {path}: {MANIFEST_FILE} lacks {', '.join(missing)}"
        )
    expected = ann_metric_of(manifest["similarity"])
    if manifest["ann_metric"] != expected:
        raise EmbeddingValidationError(
            f"embeddings {path}: ann_metric {manifest['ann_metric']!r} does not rank like "
            f"similarity {manifest['similarity']!r} (expected {expected!r})"
        )
    return manifest


def read_side(path: str, side: str, manifest: dict[str, Any]) -> EmbeddingTable:
    """One side's table, checked: type, row count, finite values, unique ids, unit norms."""
    dim = int(manifest["dim"])
    id_column = SIDES[side]
    table = io.read_table(io.join(path, side), columns=[id_column, EMBEDDING_COLUMN])
    column_type = table.schema.field(EMBEDDING_COLUMN).type
    if column_type != embedding_type(dim):
        raise EmbeddingValidationError(
            f"embeddings {path}: {side}/{EMBEDDING_COLUMN} is {column_type}, "
            f"expected fixed_size_list<float32>[{dim}]"
        )
    expected_rows = manifest["counts"].get(side)
    if expected_rows is not None and table.num_rows != expected_rows:
        raise EmbeddingValidationError(
            f"embeddings {path}: {side}/ has {table.num_rows} rows, manifest says {expected_rows}"
        )
    ids = table[id_column].combine_chunks()
    if ids.null_count or pc.count_distinct(ids).as_py() != len(ids):
        raise EmbeddingValidationError(
            f"embeddings {path}: {side}/{id_column} has nulls or repeats"
        )
    vectors_ND = from_embedding_array(table[EMBEDDING_COLUMN], dim)
    if not np.isfinite(vectors_ND).all():
        raise EmbeddingValidationError(f"embeddings {path}: {side}/ holds NaN or Inf")
    if manifest["normalized"] and len(vectors_ND):
        worst = float(np.abs(np.linalg.norm(vectors_ND, axis=1) - 1.0).max())
        if worst > UNIT_NORM_TOLERANCE:
            raise EmbeddingValidationError(
                f"embeddings {path}: manifest says normalized but a {side} vector's norm is "
                f"off by {worst:.3g}"
            )
    return EmbeddingTable(ids=ids, vectors_ND=vectors_ND)


def load_embeddings(path: str, *, sides: Sequence[str] = ("users", "items")) -> Embeddings:
    """Read and check a published embedding dir (only ``sides``)."""
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        raise ValueError(f"unknown side {unknown[0]!r}; valid: {', '.join(SIDES)}")
    manifest = read_manifest(path)
    tables = {side: read_side(path, side, manifest) for side in sides}
    return Embeddings(
        path=str(path), manifest=manifest, users=tables.get("users"), items=tables.get("items")
    )


def parse_id(text: str, id_type: pa.DataType) -> Any:
    """A command-line id as the table's id type (``"42"`` -> 42 for int ids)."""
    if not pa.types.is_integer(id_type):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"ids are {id_type} here; {text!r} is not an integer") from None


def import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "faiss is not installed; install the retrieve extra: pip install 'twotower[retrieve]' "
            "(or pip install faiss-cpu)"
        ) from error
    return faiss


@dataclass(frozen=True)
class SearchResult:
    """Top K per query: ``scores_QK`` on the similarity's scale, ``ids`` [Q] lists of item ids."""

    scores_QK: np.ndarray
    ids: list[list[Any]]


class ItemIndex:
    """An exact FAISS index over an item table that answers with the original item ids."""

    def __init__(self, items: EmbeddingTable, *, ann_metric: str):
        if ann_metric not in FAISS_INDEXES:
            raise ValueError(
                f"unknown ann_metric {ann_metric!r}; valid: {', '.join(sorted(FAISS_INDEXES))}"
            )
        faiss = import_faiss()
        self.items = items
        self.ann_metric = ann_metric
        self.index_name = FAISS_INDEXES[ann_metric]
        dim = items.vectors_ND.shape[1]
        flat = getattr(faiss, self.index_name)(dim)
        vectors_ND = np.ascontiguousarray(items.vectors_ND, dtype=np.float32)
        self.ids_are_labels = pa.types.is_integer(items.ids.type)
        if self.ids_are_labels:
            self.index = faiss.IndexIDMap2(flat)
            self.index.add_with_ids(vectors_ND, items.ids.to_numpy().astype(np.int64))
        else:
            # String ids: FAISS labels are row numbers into ``items.ids``.
            self.index = flat
            self.index.add(vectors_ND)

    def search(self, query_QD: np.ndarray, k: int) -> SearchResult:
        k = min(k, len(self.items))
        distances_QK, labels_QK = self.index.search(
            np.ascontiguousarray(query_QD, dtype=np.float32), k
        )
        scores_QK = (
            -np.sqrt(np.maximum(distances_QK, 0.0)) if self.ann_metric == "l2" else distances_QK
        )
        if self.ids_are_labels:
            ids = labels_QK.tolist()
        else:
            flat = self.items.ids.take(pa.array(labels_QK.reshape(-1))).to_pylist()
            ids = [flat[row * k : (row + 1) * k] for row in range(len(labels_QK))]
        return SearchResult(scores_QK=scores_QK.astype(np.float32), ids=ids)


@torch.no_grad()
def brute_force_top_k(
    query_QD: np.ndarray, items: EmbeddingTable, *, similarity: str, k: int
) -> SearchResult:
    """The reference ranking: every item scored with ``twotower_core.similarity``, top K."""
    scores_QN = get_similarity(similarity).matrix(
        torch.as_tensor(query_QD, dtype=torch.float32),
        torch.as_tensor(items.vectors_ND, dtype=torch.float32),
    )
    top = scores_QN.topk(min(k, len(items)), dim=1)
    rows_QK = top.indices.numpy()
    ids = [items.ids.take(pa.array(rows)).to_pylist() for rows in rows_QK]
    return SearchResult(scores_QK=top.values.numpy(), ids=ids)
