"""Batch inference for Contract 4: tower outputs for every user and every catalog item.

Legend: B rows in a batch, D embedding dim, V ids in a model vocab.

``EmbedBatch`` is a callable class run on a Ray Data actor pool: each actor loads the model
once, then maps pyarrow batches of an entity table (id + feature columns) to
``(id, embedding: fixed_size_list<float32>[D])``. Ids the model has never seen (items added
after training) are hashed into its ``model.num_oov_buckets`` OOV rows, which are zero, so they
still get an embedding, from their features alone. Every batch is checked for NaN/Inf before
it leaves the actor, so nothing non-finite is ever written.

``embed_with_ray`` runs both sides through one pool of ``EmbedParts`` actors. The work is cut,
from the Parquet footers, into parts (a row group, or a row range of one); an actor loads the
model once and streams each part it is given from Parquet, batch by batch, through the tower
into its own output file, so rows never pass through the driver or the object store. Only a
(side, file, rows) row per part comes back. ``check_side`` and ``build_manifest`` are what the
embed job runs on the staging directory before it publishes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines import io
from pipelines.checkpoint import LoadedModel, load_model
from pipelines.features import encode_features
from twotower_core.config import Config
from twotower_core.similarity import ann_metric, normalize_for_serving

# side -> id column
SIDES: dict[str, str] = {"users": "user_id", "items": "item_id"}
EMBEDDING_COLUMN = "embedding"
MANIFEST_FILE = "manifest.json"
EMPTY_PART = "part-empty.parquet"
# Unique ids and random floats gain nothing from dictionary pages; building and then dropping
# them was about two thirds of the Parquet write time of an embedding table.
PARQUET_WRITE_OPTIONS: dict[str, Any] = {"use_dictionary": False}
# Parts per actor and side when the row groups are fewer: enough to balance the pool and
# show progress; each extra split of a row group re-decodes the rows before its range.
PARTS_PER_ACTOR = 2
# Rows per row group of an output file (the tower's batches are gathered up to this).
OUTPUT_ROW_GROUP_ROWS = 65_536


class EmbeddingValidationError(ValueError):
    """Embedding tables that break Contract 4; the message names the side, file and problem."""


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def output_schema(side: str, id_type: pa.DataType, dim: int) -> pa.Schema:
    return pa.schema(
        [pa.field(SIDES[side], id_type), pa.field(EMBEDDING_COLUMN, embedding_type(dim))]
    )


def to_embedding_array(vectors_BD: np.ndarray) -> pa.FixedSizeListArray:
    """``[B, D]`` float32 -> ``fixed_size_list<float32>[D]``."""
    dim = vectors_BD.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors_BD, dtype=np.float32).reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, list_size=dim)


def from_embedding_array(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """``fixed_size_list<float32>[D]`` -> ``[B, D]`` float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if column.null_count:
        raise EmbeddingValidationError(f"{column.null_count} null embeddings")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)


def _sortable(ids: pa.Array) -> np.ndarray:
    if pa.types.is_integer(ids.type):
        return ids.to_numpy(zero_copy_only=False).astype(np.int64)
    return np.asarray(ids.to_pylist(), dtype=str)


# OOV buckets need a hash of the raw id that is the same in every actor, run and release:
# Python's hash() of a str is salted per process (PYTHONHASHSEED), so it is not used.
_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _splitmix64(values_B: np.ndarray) -> np.ndarray:
    """SplitMix64's output for state ``values_B`` (uint64, arithmetic wraps mod 2^64).

    A fixed bijective mix: consecutive ids (a catalog's new items often are) land in
    unrelated buckets, which ``id mod num_buckets`` would not guarantee for strided ids.
    """
    z = values_B + _SPLITMIX_GAMMA
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _fnv1a64(strings: pa.Array) -> np.ndarray:
    """``[B]`` uint64 FNV-1a of each string's UTF-8 bytes, one numpy pass per byte position."""
    strings = strings.cast(pa.large_string())  # int64 offsets whatever the input type
    hashes_B = np.full(len(strings), _FNV_OFFSET)
    _, offsets_buffer, data_buffer = strings.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int64)[
        strings.offset : strings.offset + len(strings) + 1
    ]
    starts_B, lengths_B = offsets[:-1], np.diff(offsets)
    max_length = int(lengths_B.max(initial=0))
    if max_length == 0:  # no bytes at all: Arrow may not allocate a data buffer
        return hashes_B
    data = np.frombuffer(data_buffer, np.uint8)
    for position in range(max_length):
        active_B = lengths_B > position
        bytes_B = data[np.where(active_B, starts_B + position, 0)]
        hashes_B = np.where(active_B, (hashes_B ^ bytes_B) * _FNV_PRIME, hashes_B)
    return hashes_B


def oov_buckets(ids: pa.Array, num_buckets: int) -> np.ndarray:
    """``[B]`` int64 OOV bucket in ``[0, num_buckets)`` of each raw id: ``hash mod num_buckets``.

    The hash is stable across calls, processes and machines: integer ids (any width) hash as
    SplitMix64 of their int64 value (two's complement), string ids as SplitMix64 of the 64-bit
    FNV-1a of their UTF-8 bytes. Changing either changes which OOV row every unseen id of a
    published model uses.
    """
    if pa.types.is_integer(ids.type):
        values_B = ids.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
    else:
        # FNV-1a's low k bits depend only on the low k bits of each byte ("item-a" and
        # "item-q" agree mod 16); the mix spreads every bit into the bucket.
        values_B = _fnv1a64(ids)
    hashes_B = _splitmix64(values_B)
    return (hashes_B % np.uint64(num_buckets)).astype(np.int64)


class IdIndex:
    """Row of each id in a model vocab, by binary search over the ids sorted once.

    A hash join per batch rebuilds its table from the whole vocab every time (≈0.4 s per batch
    against a 1M-item vocab); a search over a sorted copy costs ≈ B·log V.

    Args:
        vocab_ids: [V] the vocab's raw ids; row v is entity v of the tower.
        num_oov_buckets: the tower's ``model.num_oov_buckets`` (used by ``tower_rows``).
    """

    def __init__(self, vocab_ids: pa.Array, *, num_oov_buckets: int = 1):
        ids_V = _sortable(vocab_ids)
        self.order_V = np.argsort(ids_V, kind="stable")
        self.sorted_V = ids_V[self.order_V]
        self.num_oov_buckets = num_oov_buckets

    def rows(self, ids: pa.Array) -> np.ndarray:
        """``[B]`` vocab row of each id, −1 for ids the vocab does not have."""
        if not len(self.sorted_V):
            return np.full(len(ids), -1, dtype=np.int64)
        ids_B = _sortable(ids)
        # Searching for sorted keys walks the vocab in one direction: about 2x faster.
        order_B = np.argsort(ids_B, kind="stable")
        positions_B = np.empty(len(ids_B), dtype=np.int64)
        positions_B[order_B] = np.searchsorted(self.sorted_V, ids_B[order_B])
        positions_B = np.minimum(positions_B, len(self.sorted_V) - 1)
        found_B = self.sorted_V[positions_B] == ids_B
        return np.where(found_B, self.order_V[positions_B], -1).astype(np.int64)

    def tower_rows(self, ids: pa.Array) -> np.ndarray:
        """``[B]`` tower input for each raw id: its vocab row, or ``−1 − oov_buckets(id)`` for
        an id the vocab does not have, which ``Tower.id_rows`` decodes to OOV row
        ``num_ids + bucket``. With one bucket every unseen id is −1: the shared OOV row.
        """
        rows_B = self.rows(ids)
        unseen_B = np.flatnonzero(rows_B < 0)
        if len(unseen_B) and self.num_oov_buckets > 1:
            buckets = oov_buckets(ids.take(pa.array(unseen_B)), self.num_oov_buckets)
            rows_B[unseen_B] = -1 - buckets
        return rows_B


class EmbedBatch:
    """Ray Data actor: loads the model once, embeds one side (``users`` or ``items``).

    Args:
        model_dir: a published model dir (Contract 3).
        side: ``users`` (user tower) or ``items`` (item tower).
        torch_threads: intra-op threads of this actor (match its CPU reservation).
        use_gpu: run the tower on the GPU Ray assigned to this actor.
    """

    def __init__(
        self,
        model_dir: str,
        side: str,
        *,
        torch_threads: int = 1,
        use_gpu: bool = False,
        loaded: LoadedModel | None = None,
    ):
        if side not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
        torch.set_num_threads(max(1, torch_threads))
        loaded = loaded or load_model(model_dir)
        self.side = side
        self.id_column = SIDES[side]
        self.device = torch.device("cuda" if use_gpu else "cpu")
        tower = loaded.model.user_tower if side == "users" else loaded.model.item_tower
        self.tower = tower.to(self.device).eval()
        self.specs = loaded.user_specs if side == "users" else loaded.item_specs
        vocab = loaded.user_vocab if side == "users" else loaded.item_vocab
        self.ids = IdIndex(
            vocab[self.id_column].combine_chunks(), num_oov_buckets=tower.num_oov_buckets
        )
        self.normalize = normalize_for_serving(loaded.config.loss.similarity)
        self.dim = loaded.config.model.output_dim

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.id_column not in batch.column_names:
            raise ValueError(
                f"{self.side} table has no {self.id_column!r} column "
                f"(columns: {', '.join(batch.column_names)})"
            )
        ids = batch[self.id_column].combine_chunks()
        if ids.null_count:
            raise ValueError(f"{self.side} table: {ids.null_count} null {self.id_column}s")
        rows_B = torch.as_tensor(self.ids.tower_rows(ids), device=self.device)
        features = {
            name: torch.as_tensor(values, device=self.device)
            for name, values in encode_features(batch, self.specs).items()
        }
        vectors_BD = self.tower(rows_B, features)
        if self.normalize:
            vectors_BD = torch.nn.functional.normalize(vectors_BD, dim=-1)
        vectors_BD = vectors_BD.float().cpu().numpy()
        finite_B = np.isfinite(vectors_BD).all(axis=1)
        if not finite_B.all():
            bad = ids.take(pa.array(np.flatnonzero(~finite_B)[:5]))
            raise EmbeddingValidationError(
                f"{self.side}: non-finite embeddings for {self.id_column} {bad.to_pylist()}"
            )
        assert vectors_BD.shape == (batch.num_rows, self.dim)
        return pa.table({self.id_column: ids, EMBEDDING_COLUMN: to_embedding_array(vectors_BD)})


def source_id_type(source: str, side: str) -> pa.DataType:
    """The id column's type in an entity table, from its Parquet footer."""
    files = io.list_files(source)
    if not files:
        raise FileNotFoundError(f"{side} table {source}: no Parquet files")
    schema = io.read_parquet_metadata(files[0]).schema.to_arrow_schema()
    if SIDES[side] not in schema.names:
        raise ValueError(
            f"{side} table {source} has no {SIDES[side]!r} column (columns: {', '.join(schema.names)})"
        )
    return schema.field(SIDES[side]).type


def check_pool_fits(
    *,
    concurrency: int,
    cpus_per_actor: float,
    cluster_cpus: float,
    use_gpu: bool = False,
    cluster_gpus: float = 0.0,
) -> None:
    """Refuse an actor pool larger than the cluster up front: Ray Data would wait forever for
    actors that cannot be placed. A cluster that reports no CPUs yet (an autoscaling head) is
    let through. The actors read and write themselves, so they are the only CPU users; with
    ``use_gpu`` each also needs one GPU.
    """
    if cluster_cpus <= 0:
        return
    needed = concurrency * cpus_per_actor
    if cluster_cpus < needed:
        raise ValueError(
            f"embed.concurrency ({concurrency}) x embed.cpus_per_actor ({cpus_per_actor}) "
            f"needs {needed:g} CPUs; this Ray cluster has {cluster_cpus:g}. "
            "Lower embed.concurrency or embed.cpus_per_actor."
        )
    if use_gpu and cluster_gpus < concurrency:
        raise ValueError(
            f"embed.use_gpu with embed.concurrency {concurrency} needs {concurrency} GPUs, one "
            f"per actor; this Ray cluster has {cluster_gpus:g}. Lower embed.concurrency or "
            "drop --use-gpu."
        )


def plan_parts(
    source: str, dest: str, *, side: str, min_parts: int, batch_size: int
) -> list[dict[str, Any]]:
    """The parts of one side, from the Parquet footers of ``source``.

    A part is ``{side, path, row_group, start, stop, out}``: rows ``[start, stop)`` of one row
    group, written to the file ``out``. Row groups are split into equal row ranges when there
    are fewer than ``min_parts`` of them (a catalog is often one file with one huge row
    group), never into ranges of less than one batch. File names follow the part order, so a
    rerun writes the same files.
    """
    groups = [
        (path, index, metadata.row_group(index).num_rows)
        for path in io.list_files(source)
        for metadata in [io.read_parquet_metadata(path)]
        for index in range(metadata.num_row_groups)
        if metadata.row_group(index).num_rows
    ]
    total = sum(rows for _, _, rows in groups)
    parts = []
    for path, index, rows in groups:
        share = -(-min_parts * rows // total) if len(groups) < min_parts else 1
        pieces = max(1, min(share, rows // max(batch_size, 1)))
        bounds = np.linspace(0, rows, pieces + 1).round().astype(int)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            parts.append(
                {
                    "side": side,
                    "path": path,
                    "row_group": index,
                    "start": int(start),
                    "stop": int(stop),
                    "out": io.join(dest, f"part-{len(parts):05d}.parquet"),
                }
            )
    return parts


class EmbedParts:
    """Ray Data actor for both sides: loads the model once, then embeds whole parts.

    Each part (see ``plan_parts``) is read batch by batch from its Parquet row group, run
    through ``embed_class`` for its side, and written to its own file; a retried part
    rewrites that file from the start. Returns one ``(side, file, rows)`` row per part.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        batch_size: int,
        torch_threads: int = 1,
        use_gpu: bool = False,
        embed_class: type[EmbedBatch] = EmbedBatch,
    ):
        loaded = load_model(model_dir)
        self.batch_size = batch_size
        self.sides = {
            side: embed_class(
                model_dir, side, torch_threads=torch_threads, use_gpu=use_gpu, loaded=loaded
            )
            for side in SIDES
        }

    def __call__(self, parts: pa.Table) -> pa.Table:
        parts = parts.to_pylist()
        done = [self.embed_part(part) for part in parts]
        return pa.table(
            {
                "side": [part["side"] for part in parts],
                "file": [part["out"] for part in parts],
                "rows": pa.array(done, pa.int64()),
            }
        )

    def _batches(self, part: dict[str, Any]):
        """The part's rows, as tables of at most ``batch_size`` rows."""
        fs, inner = io.resolve(part["path"])
        with fs.open_input_file(inner) as handle, pq.ParquetFile(handle) as reader:
            offset = 0  # rows of the row group before this batch
            for batch in reader.iter_batches(
                batch_size=self.batch_size, row_groups=[part["row_group"]]
            ):
                low = max(part["start"] - offset, 0)
                high = min(part["stop"] - offset, batch.num_rows)
                offset += batch.num_rows
                if high > low:
                    yield pa.Table.from_batches([batch.slice(low, high - low)])
                if offset >= part["stop"]:
                    return

    def embed_part(self, part: dict[str, Any]) -> int:
        embed = self.sides[part["side"]]
        fs, inner = io.resolve(part["out"])
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        rows, pending, pending_rows, writer = 0, [], 0, None
        try:
            for batch in self._batches(part):
                pending.append(embed(batch))
                pending_rows += pending[-1].num_rows
                if pending_rows >= OUTPUT_ROW_GROUP_ROWS:
                    writer = _append_row_group(writer, fs, inner, pending)
                    rows, pending, pending_rows = rows + pending_rows, [], 0
            if pending:
                writer = _append_row_group(writer, fs, inner, pending)
                rows += pending_rows
        finally:
            if writer is not None:
                writer.close()
        return rows


def _append_row_group(writer, fs, path: str, tables: list[pa.Table]) -> pq.ParquetWriter:
    """Write ``tables`` as one row group of ``path``, opening the writer on first use."""
    writer = writer or pq.ParquetWriter(
        path, tables[0].schema, filesystem=fs, **PARQUET_WRITE_OPTIONS
    )
    writer.write_table(pa.concat_tables(tables))
    return writer


def embed_with_ray(
    sources: dict[str, str],
    dests: dict[str, str],
    *,
    model_dir: str,
    batch_size: int,
    concurrency: int,
    cpus_per_actor: float,
    use_gpu: bool,
    embed_class: type[EmbedBatch] = EmbedBatch,
) -> dict[str, int]:
    """Embed every side's ``sources[side]`` table into Parquet files under ``dests[side]``.

    One Dataset of parts (largest first, so the pool finishes together) through one actor
    pool; returns the rows written per side. ``embed_class`` is the per-batch transform;
    tests pass a subclass that fails on purpose.
    """
    import ray.data

    parts = [
        part
        for side in sources
        for part in plan_parts(
            sources[side],
            dests[side],
            side=side,
            min_parts=concurrency * PARTS_PER_ACTOR,
            batch_size=batch_size,
        )
    ]
    written = {side: 0 for side in sources}
    if not parts:
        return written
    parts.sort(key=lambda part: part["start"] - part["stop"])
    results = ray.data.from_items(parts, override_num_blocks=len(parts)).map_batches(
        EmbedParts,
        fn_constructor_args=(str(model_dir),),
        fn_constructor_kwargs={
            "batch_size": batch_size,
            "torch_threads": max(1, int(cpus_per_actor)),
            "use_gpu": use_gpu,
            "embed_class": embed_class,
        },
        batch_format="pyarrow",
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
        for side, rows in zip(batch["side"].to_pylist(), batch["rows"].to_pylist()):
            written[side] += rows
    return written


def check_side(path: str, *, side: str, id_type: pa.DataType, dim: int, expected_rows: int) -> int:
    """Validate one written side from its Parquet footers; returns its row count.

    Checks every file has exactly ``(id: id_type, embedding: fixed_size_list<float32>[dim])``
    and that the rows add up to ``expected_rows`` (one per source row, none lost or doubled).
    Values were checked for NaN/Inf in the actors before they were written. A side with no
    rows gets one empty file, so readers always find a table with the right schema.
    """
    expected_schema = output_schema(side, id_type, dim)
    files = io.list_files(path)
    if not files:
        if expected_rows:
            raise EmbeddingValidationError(f"{side}: no files written for {expected_rows} rows")
        io.write_table(io.join(path, EMPTY_PART), expected_schema.empty_table())
        return 0
    total = 0
    for file in files:
        metadata = io.read_parquet_metadata(file)
        schema = metadata.schema.to_arrow_schema()
        if not schema.remove_metadata().equals(expected_schema):
            raise EmbeddingValidationError(
                f"{side}: file {file} has schema {schema.to_string(show_schema_metadata=False)}, "
                f"expected {expected_schema.to_string()}"
            )
        total += metadata.num_rows
    if total != expected_rows:
        raise EmbeddingValidationError(
            f"{side}: wrote {total} embeddings for {expected_rows} rows of the source table"
        )
    return total


def build_manifest(
    config: Config,
    *,
    counts: dict[str, int],
    id_types: dict[str, pa.DataType],
    model: str,
    dataset: str,
) -> dict[str, Any]:
    """Contract 4 ``manifest.json``: what a consumer needs to build the right index."""
    similarity = config.loss.similarity
    return {
        "dim": config.model.output_dim,
        "similarity": similarity,
        # Unit vectors: cosine is served as inner product on them; model.normalize makes the
        # towers emit them for any similarity.
        "normalized": bool(normalize_for_serving(similarity) or config.model.normalize),
        "ann_metric": ann_metric(similarity),
        "counts": dict(counts),
        "id_columns": dict(SIDES),
        "id_types": {side: str(id_type) for side, id_type in id_types.items()},
        "embedding_column": EMBEDDING_COLUMN,
        "model": str(model),
        "dataset": str(dataset),
        "created_at": io.utc_now(),
    }
