"""Contracts 1 (raw logs) and 2 (dataset): table names, required columns, Arrow schemas, and
validation that fails with a named error before any Ray work starts.

``validate_logs`` reads only Parquet footers: every file's schema is checked against the
required columns and types, and the footers' row counts and ``ts`` statistics are kept in the
returned ``LogsInfo`` (the window defaults come from them without reading any data).
``validate_dataset_dir`` checks that a build-dataset output is complete and well-formed; train
and embed call it before starting Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipelines import io

# ---------------------------------------------------------------------------------------------
# Contract 1: raw logs

TABLE_CLICKS = "clicks"
TABLE_IMPRESSIONS = "impressions"
TABLE_RETRIEVALS = "retrievals"
TABLE_ITEMS = "items"
TABLE_USERS = "users"
LOG_TABLES: tuple[str, ...] = (TABLE_CLICKS, TABLE_IMPRESSIONS, TABLE_RETRIEVALS)
CATALOG_TABLES: tuple[str, ...] = (TABLE_ITEMS, TABLE_USERS)
REQUIRED_TABLES: tuple[str, ...] = (TABLE_CLICKS, TABLE_ITEMS)
ALL_TABLES: tuple[str, ...] = LOG_TABLES + CATALOG_TABLES

# Column kinds accepted by the type check.
KIND_ID = "id"  # int64-compatible integer or string; one type per column across all tables
KIND_REQUEST = "request_id"  # string or integer (read as string)
KIND_INTEGER = "integer"
KIND_TIMESTAMP = "timestamp"

REQUIRED_COLUMNS: dict[str, dict[str, str]] = {
    TABLE_CLICKS: {
        "request_id": KIND_REQUEST,
        "user_id": KIND_ID,
        "item_id": KIND_ID,
        "ts": KIND_TIMESTAMP,
    },
    TABLE_IMPRESSIONS: {
        "request_id": KIND_REQUEST,
        "user_id": KIND_ID,
        "item_id": KIND_ID,
        "position": KIND_INTEGER,
        "ts": KIND_TIMESTAMP,
    },
    TABLE_RETRIEVALS: {
        "request_id": KIND_REQUEST,
        "user_id": KIND_ID,
        "item_id": KIND_ID,
        "retrieval_rank": KIND_INTEGER,
        "ts": KIND_TIMESTAMP,
    },
    TABLE_ITEMS: {"item_id": KIND_ID},
    TABLE_USERS: {"user_id": KIND_ID},
}
# The rank-like column of each log table (None for clicks).
RANK_COLUMN: dict[str, str | None] = {
    TABLE_CLICKS: None,
    TABLE_IMPRESSIONS: "position",
    TABLE_RETRIEVALS: "retrieval_rank",
}

# ---------------------------------------------------------------------------------------------
# Contract 2: dataset layout

DATASET_TRAIN = "train"
DATASET_EVAL = "eval"
DATASET_VOCAB = "vocab"
DATASET_FEATURES = "features"
DATASET_QUARANTINE = "quarantine"
MANIFEST_FILE = "manifest.json"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"

TRAIN_COLUMNS: tuple[str, ...] = (
    "user_id",
    "item_id",
    "ts",
    "request_id",
    "neg_item_ids",
    "neg_sources",
    "user_idx",
    "item_idx",
    "neg_item_idxs",
)
EVAL_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "ts", "user_idx", "item_idx")
USER_VOCAB_COLUMNS: tuple[str, ...] = ("user_id", "user_idx", "count")
ITEM_VOCAB_COLUMNS: tuple[str, ...] = ("item_id", "item_idx", "count")
QUARANTINE_COLUMNS: tuple[str, ...] = ("table", "reason", "request_id", "user_id", "item_id", "row")

# Quarantine reasons, exactly as written to quarantine/ and manifest.json.
REASON_NULL_USER_ID = "null_user_id"
REASON_NULL_ITEM_ID = "null_item_id"
REASON_NULL_REQUEST_ID = "null_request_id"
REASON_NULL_TS = "null_ts"
REASON_NULL_RANK = "null_retrieval_rank"
REASON_ITEM_NOT_IN_CATALOG = "item_not_in_catalog"
REASON_CLICK_WITHOUT_IMPRESSION = "click_without_impression"
REASON_NOT_ENOUGH_NEGATIVES = "not_enough_negatives"
REASON_DUPLICATE_ID = "duplicate_id"


def train_schema(
    user_id_type: pa.DataType, item_id_type: pa.DataType, ts_type: pa.DataType
) -> pa.Schema:
    return pa.schema(
        [
            pa.field("user_id", user_id_type),
            pa.field("item_id", item_id_type),
            pa.field("ts", ts_type),
            pa.field("request_id", pa.string()),
            pa.field("neg_item_ids", pa.list_(item_id_type)),
            pa.field("neg_sources", pa.list_(pa.string())),
            pa.field("user_idx", pa.int64()),
            pa.field("item_idx", pa.int64()),
            pa.field("neg_item_idxs", pa.list_(pa.int64())),
        ]
    )


def eval_schema(
    user_id_type: pa.DataType, item_id_type: pa.DataType, ts_type: pa.DataType
) -> pa.Schema:
    return pa.schema(
        [
            pa.field("user_id", user_id_type),
            pa.field("item_id", item_id_type),
            pa.field("ts", ts_type),
            pa.field("user_idx", pa.int64()),
            pa.field("item_idx", pa.int64()),
        ]
    )


def quarantine_schema(user_id_type: pa.DataType, item_id_type: pa.DataType) -> pa.Schema:
    """``row`` is the rejected row's Contract 1 columns as a JSON object."""
    return pa.schema(
        [
            pa.field("table", pa.string()),
            pa.field("reason", pa.string()),
            pa.field("request_id", pa.string()),
            pa.field("user_id", user_id_type),
            pa.field("item_id", item_id_type),
            pa.field("row", pa.string()),
        ]
    )


def vocab_schema(side: str, id_type: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            pa.field(f"{side}_id", id_type),
            pa.field(f"{side}_idx", pa.int64()),
            pa.field("count", pa.int64()),
        ]
    )


def id_type_name(id_type: pa.DataType) -> str:
    return "int64" if pa.types.is_integer(id_type) else "string"


def id_type_from_name(name: str) -> pa.DataType:
    if name not in ("int64", "string"):
        raise ValueError(f"unknown id type {name!r}; valid: int64, string")
    return pa.int64() if name == "int64" else pa.string()


# ---------------------------------------------------------------------------------------------
# Validation of Contract 1


class LogsValidationError(ValueError):
    """The logs do not follow Contract 1; the message names table, file, column and problem."""

    def __init__(
        self,
        problem: str,
        *,
        table: str | None = None,
        file: str | None = None,
        column: str | None = None,
    ) -> None:
        self.table, self.file, self.column, self.problem = table, file, column, problem
        where = []
        if table is not None:
            where.append(f"table {table!r}")
        if file is not None:
            where.append(f"file {file}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)


@dataclass(frozen=True)
class TableInfo:
    """One Contract 1 table as its Parquet footers describe it."""

    name: str
    path: str
    files: tuple[str, ...]
    schema: pa.Schema  # the first file's
    num_rows: int
    # (file, row group index, rows) of every row group: the units read tasks are made of.
    row_groups: tuple[tuple[str, int, int], ...] = ()
    # Range of ``ts`` in microseconds since the epoch (UTC), from row-group statistics;
    # None when a file has no usable statistics or the table has no ts column.
    ts_min_us: int | None = None
    ts_max_us: int | None = None


@dataclass(frozen=True)
class LogsInfo:
    """What ``validate_logs`` found: the tables present and the id and ts types."""

    path: str
    tables: dict[str, TableInfo]
    user_id_type: pa.DataType  # pa.int64() or pa.string()
    item_id_type: pa.DataType
    # Output ts type: microseconds, keeping the clicks table's time zone.
    ts_type: pa.DataType
    notes: tuple[str, ...] = field(default_factory=tuple)

    def has(self, table: str) -> bool:
        return table in self.tables

    @property
    def id_type(self) -> str:
        """``int64`` or ``string`` when users and items share it, else ``user:item``."""
        user, item = id_type_name(self.user_id_type), id_type_name(self.item_id_type)
        return user if user == item else f"{user}:{item}"

    def ts_range_us(self) -> tuple[int, int] | None:
        """(min, max) ts over the log tables, or None when some statistics are missing."""
        infos = [self.tables[t] for t in LOG_TABLES if t in self.tables]
        if any(info.ts_min_us is None and info.num_rows > 0 for info in infos):
            return None
        known = [info for info in infos if info.ts_min_us is not None]
        if not known:
            return None
        return min(i.ts_min_us for i in known), max(i.ts_max_us for i in known)


def _type_problem(kind: str, arrow_type: pa.DataType) -> str | None:
    """None when ``arrow_type`` is acceptable for a column of ``kind``, else the problem."""
    is_string = (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or (pa.types.is_string_view(arrow_type))
    )
    if kind == KIND_ID:
        if is_string or pa.types.is_integer(arrow_type):
            return None
        return f"expected int64 or string ids, got {arrow_type}"
    if kind == KIND_REQUEST:
        if is_string or pa.types.is_integer(arrow_type):
            return None
        return f"expected a string (or integer) request id, got {arrow_type}"
    if kind == KIND_INTEGER:
        return None if pa.types.is_integer(arrow_type) else f"expected an integer, got {arrow_type}"
    if kind == KIND_TIMESTAMP:
        if pa.types.is_timestamp(arrow_type):
            return None
        return f"expected an Arrow timestamp, got {arrow_type}"
    raise AssertionError(f"unknown column kind {kind}")


def _id_family(arrow_type: pa.DataType) -> pa.DataType:
    return pa.int64() if pa.types.is_integer(arrow_type) else pa.string()


_UNIT_TO_US = {"seconds": 1_000_000, "milliseconds": 1_000, "microseconds": 1, "nanoseconds": None}


def _ts_stats_us(metadata: Any, column: str) -> tuple[int, int] | None:
    """(min, max) of a timestamp column in µs from a file's row-group statistics, or None."""
    names = [metadata.schema.column(j).name for j in range(metadata.num_columns)]
    if column not in names:
        return None
    j = names.index(column)
    logical = metadata.schema.column(j).logical_type
    if logical.type != "TIMESTAMP":
        return None
    unit = json.loads(logical.to_json()).get("timeUnit")
    if unit not in _UNIT_TO_US:
        return None
    low = high = None
    for r in range(metadata.num_row_groups):
        chunk = metadata.row_group(r).column(j)
        if chunk.num_values == 0:
            continue
        stats = chunk.statistics
        if stats is None or not stats.has_min_max:
            return None
        lo, hi = int(stats.min_raw), int(stats.max_raw)
        if _UNIT_TO_US[unit] is None:
            lo, hi = lo // 1_000, -(-hi // 1_000)
        else:
            lo, hi = lo * _UNIT_TO_US[unit], hi * _UNIT_TO_US[unit]
        low = lo if low is None else min(low, lo)
        high = hi if high is None else max(high, hi)
    if low is None:
        return None
    return low, high


def _validate_table(name: str, path: str) -> tuple[TableInfo, dict[str, pa.DataType]]:
    files = io.list_files(path)
    if not files:
        raise LogsValidationError(f"no Parquet files under {path}", table=name)
    required = REQUIRED_COLUMNS[name]
    id_types: dict[str, pa.DataType] = {}
    id_first_file: dict[str, str] = {}
    num_rows = 0
    row_groups: list[tuple[str, int, int]] = []
    ts_low: int | None = None
    ts_high: int | None = None
    ts_known = True
    first_schema = None
    for file in files:
        try:
            metadata = io.read_parquet_metadata(file)
            schema = metadata.schema.to_arrow_schema()
        except Exception as error:  # pyarrow raises several types for a bad footer
            raise LogsValidationError(
                f"unreadable or corrupt Parquet file ({type(error).__name__}: {error})",
                table=name,
                file=file,
            ) from error
        first_schema = first_schema or schema
        for column, kind in required.items():
            if column not in schema.names:
                raise LogsValidationError(
                    f"missing required column (Contract 1 needs {', '.join(required)}; "
                    f"file has {', '.join(schema.names)})",
                    table=name,
                    file=file,
                    column=column,
                )
            problem = _type_problem(kind, schema.field(column).type)
            if problem is not None:
                raise LogsValidationError(problem, table=name, file=file, column=column)
            if kind == KIND_ID:
                family = _id_family(schema.field(column).type)
                if column in id_types and id_types[column] != family:
                    raise LogsValidationError(
                        f"ids are {family} here but {id_types[column]} in {id_first_file[column]}",
                        table=name,
                        file=file,
                        column=column,
                    )
                id_types.setdefault(column, family)
                id_first_file.setdefault(column, file)
        num_rows += metadata.num_rows
        row_groups.extend(
            (file, r, metadata.row_group(r).num_rows) for r in range(metadata.num_row_groups)
        )
        if "ts" in required and metadata.num_rows > 0:
            stats = _ts_stats_us(metadata, "ts")
            if stats is None:
                ts_known = False
            else:
                ts_low = stats[0] if ts_low is None else min(ts_low, stats[0])
                ts_high = stats[1] if ts_high is None else max(ts_high, stats[1])
    info = TableInfo(
        name=name,
        path=path,
        files=tuple(files),
        schema=first_schema,
        num_rows=num_rows,
        row_groups=tuple(row_groups),
        ts_min_us=ts_low if ts_known else None,
        ts_max_us=ts_high if ts_known else None,
    )
    return info, id_types


def validate_logs(logs_dir: str) -> LogsInfo:
    """Check a Contract 1 directory from its Parquet footers; raise ``LogsValidationError``.

    Checks: the logs dir and the required tables exist; every file of every table present is
    a readable Parquet file with the required columns in accepted types; ``user_id`` and
    ``item_id`` each have one type (int or string) across all files and tables.
    """
    if not io.exists(logs_dir):
        raise LogsValidationError(f"logs directory {logs_dir} does not exist")
    tables: dict[str, TableInfo] = {}
    id_types: dict[str, tuple[pa.DataType, str]] = {}
    for name in ALL_TABLES:
        path = io.join(logs_dir, name)
        if not io.exists(path):
            if name in REQUIRED_TABLES:
                raise LogsValidationError(
                    f"required table is missing (expected a Parquet dataset at {path})", table=name
                )
            continue
        info, table_id_types = _validate_table(name, path)
        for column, family in table_id_types.items():
            if column in id_types and id_types[column][0] != family:
                raise LogsValidationError(
                    f"ids are {family} here but {id_types[column][0]} in table "
                    f"{id_types[column][1]!r}; Contract 1 needs one type across tables",
                    table=name,
                    column=column,
                )
            id_types.setdefault(column, (family, name))
        tables[name] = info
    notes = []
    if TABLE_IMPRESSIONS not in tables:
        notes.append("no impressions table: no exposed_not_clicked negatives")
    if TABLE_RETRIEVALS not in tables:
        notes.append("no retrievals table: no ranked_out negatives")
    if TABLE_USERS not in tables:
        notes.append("no users table: users are those with a click, without features")
    clicks_ts = tables[TABLE_CLICKS].schema.field("ts").type
    return LogsInfo(
        path=str(logs_dir),
        tables=tables,
        user_id_type=id_types["user_id"][0],
        item_id_type=id_types["item_id"][0],
        ts_type=pa.timestamp("us", tz=clicks_ts.tz),
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------
# Validation of Contract 2


class DatasetValidationError(ValueError):
    """A dataset dir is incomplete or malformed; the message names the path and the problem."""


def _check_columns(path: str, expected: tuple[str, ...], what: str) -> None:
    files = io.list_files(path)
    if not files:
        raise DatasetValidationError(f"dataset {what} {path}: no Parquet files")
    for file in files:
        try:
            names = io.read_parquet_metadata(file).schema.to_arrow_schema().names
        except Exception as error:
            raise DatasetValidationError(
                f"dataset {what} file {file}: unreadable Parquet ({error})"
            ) from error
        missing = [c for c in expected if c not in names]
        if missing:
            raise DatasetValidationError(
                f"dataset {what} file {file}: missing column(s) {', '.join(missing)}"
            )


def validate_dataset_dir(path: str) -> dict[str, Any]:
    """Check a Contract 2 dir is complete and well-formed (footers only); return its manifest."""
    if not io.exists(path):
        raise DatasetValidationError(f"dataset {path} does not exist")
    if not io.is_complete(path):
        raise DatasetValidationError(
            f"dataset {path} has no {io.SUCCESS_MARKER} marker: incomplete or not a dataset dir"
        )
    manifest_path = io.join(path, MANIFEST_FILE)
    if not io.exists(manifest_path):
        raise DatasetValidationError(f"dataset {path}: {MANIFEST_FILE} is missing")
    try:
        manifest = io.read_json(manifest_path)
    except (OSError, ValueError) as error:
        raise DatasetValidationError(
            f"dataset {path}: {MANIFEST_FILE} is unreadable ({error})"
        ) from error
    _check_columns(io.join(path, DATASET_TRAIN), TRAIN_COLUMNS, DATASET_TRAIN)
    _check_columns(io.join(path, DATASET_EVAL), EVAL_COLUMNS, DATASET_EVAL)
    sizes = {}
    for folder, file, columns in (
        (DATASET_VOCAB, USERS_FILE, USER_VOCAB_COLUMNS),
        (DATASET_VOCAB, ITEMS_FILE, ITEM_VOCAB_COLUMNS),
        (DATASET_FEATURES, USERS_FILE, ("user_idx", "user_id")),
        (DATASET_FEATURES, ITEMS_FILE, ("item_idx", "item_id")),
    ):
        file_path = io.join(path, folder, file)
        if not io.exists(file_path):
            raise DatasetValidationError(f"dataset {path}: {folder}/{file} is missing")
        _check_columns(file_path, columns, f"{folder}/{file}")
        sizes[(folder, file)] = io.read_parquet_metadata(file_path).num_rows
    for file in (USERS_FILE, ITEMS_FILE):
        if sizes[(DATASET_VOCAB, file)] != sizes[(DATASET_FEATURES, file)]:
            raise DatasetValidationError(
                f"dataset {path}: {DATASET_VOCAB}/{file} has {sizes[(DATASET_VOCAB, file)]} rows "
                f"but {DATASET_FEATURES}/{file} has {sizes[(DATASET_FEATURES, file)]}"
            )
    return manifest
