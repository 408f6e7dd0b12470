"""build-dataset: Contract 1 logs -> Contract 2 dataset, on Ray Data (or in one process).

The order of work, all of it visible in ``build_dataset``:

1. validate the logs from their Parquet footers (``contracts.validate_logs``) and refuse an
   existing output, before any Ray work;
2. read the catalog and the users table on the driver (dimension tables, not logs): vocab
   ids, features, quarantine of null and duplicate ids;
3. pass 1 (clicks only): which users have a positive, train clicks per item; from these the
   user vocab and the ``unexposed`` sampling table, put once in the object store;
4. pass 2: every log table read in units of row groups and normalised to one event schema,
   one hash shuffle by ``user_id``, then ``examples.build_partition`` on each partition
   (polars), which writes its train/eval/quarantine part files into the staging dir and
   returns only counts;
5. on the driver: vocab with counts, features, manifest; ``io.staged_output`` moves the staging
   dir into place and writes ``_SUCCESS`` last.

With the Ray engine logs never reach the driver: a task holds one read unit (about
``READ_UNIT_ROWS`` rows) or one partition, so memory is bounded by the partition size
(``dataset.num_partitions``; by default one partition per 250k log rows), not by the size of
the logs. The local engine runs the same functions in one process over all events at once (a
reference and a benchmark baseline).
Partition files are named after their users, so a rerun writes the very same files.

Shapes: U users in the vocab, I catalog items.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipelines import io
from pipelines.contracts import (
    DATASET_EVAL,
    DATASET_FEATURES,
    DATASET_QUARANTINE,
    DATASET_TRAIN,
    DATASET_VOCAB,
    ITEMS_FILE,
    LOG_TABLES,
    MANIFEST_FILE,
    REASON_DUPLICATE_ID,
    REASON_NULL_ITEM_ID,
    REASON_NULL_USER_ID,
    REQUIRED_COLUMNS,
    TABLE_CLICKS,
    TABLE_IMPRESSIONS,
    TABLE_ITEMS,
    TABLE_USERS,
    USERS_FILE,
    LogsInfo,
    LogsValidationError,
    eval_schema,
    id_type_name,
    quarantine_schema,
    train_schema,
    validate_logs,
    vocab_schema,
)
from pipelines.examples import (
    PartitionLookups,
    PartitionSettings,
    build_partition,
    event_schema,
    make_lookups,
    merge_stats,
    normalize_events,
    stable_id_hash,
    summarize_clicks,
)
from twotower_core.config import DatasetConfig, config_to_dict

logger = logging.getLogger(__name__)

_US_PER_DAY = 86_400 * 1_000_000


class QuarantineLimitError(ValueError):
    """More input rows were quarantined than ``dataset.max_quarantine_fraction`` allows."""


@dataclass(frozen=True)
class BuildResult:
    out: str
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Window:
    """The log window [start, end] in whole UTC days and the train/eval split time."""

    start: date
    end: date  # inclusive
    split_us: int

    @property
    def start_us(self) -> int:
        return _day_start_us(self.start)

    @property
    def end_us(self) -> int:
        """Exclusive: midnight after ``end``."""
        return _day_start_us(self.end + timedelta(days=1))


def _day_start_us(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * 1_000_000


def _iso_us(value_us: int) -> str:
    return datetime.fromtimestamp(value_us / 1_000_000, tz=UTC).isoformat()


def _parse_day(text: str, key: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as error:
        raise ValueError(f"{key}: expected a date YYYY-MM-DD, got {text!r}") from error


def resolve_window(config: DatasetConfig, ts_range_us: tuple[int, int] | None) -> Window:
    """Window and split time from the config, defaulting from the logs' ts range.

    end = ``dataset.end`` or the last day with data; start = ``dataset.start``, else
    ``end - window_days + 1``, else the first day with data; split = ``dataset.split_time``
    or midnight starting the last ``eval_days`` days of the window.
    """
    needs_range = config.end is None or (config.start is None and config.window_days is None)
    if needs_range and ts_range_us is None:
        raise ValueError(
            "the logs hold no rows with a ts: cannot default the window (set dataset.start/end)"
        )
    if config.end is not None:
        end = _parse_day(config.end, "dataset.end")
    else:
        end = datetime.fromtimestamp(ts_range_us[1] / 1_000_000, tz=UTC).date()
    if config.start is not None:
        start = _parse_day(config.start, "dataset.start")
    elif config.window_days is not None:
        start = end - timedelta(days=config.window_days - 1)
    else:
        start = datetime.fromtimestamp(ts_range_us[0] / 1_000_000, tz=UTC).date()
    if start > end:
        raise ValueError(f"dataset.start ({start}) is after dataset.end ({end})")
    if config.split_time is not None:
        try:
            split = datetime.fromisoformat(config.split_time)
        except ValueError as error:
            raise ValueError(
                f"dataset.split_time: expected an ISO date-time, got {config.split_time!r}"
            ) from error
        split = split if split.tzinfo else split.replace(tzinfo=UTC)
        split_us = int(split.timestamp() * 1_000_000)
    else:
        split_us = _day_start_us(end + timedelta(days=1 - config.eval_days))
    window = Window(start=start, end=end, split_us=split_us)
    if not window.start_us < split_us <= window.end_us:
        raise ValueError(
            f"split time {_iso_us(split_us)} leaves no training days in the window "
            f"{start}..{end} (dataset.eval_days={config.eval_days}, "
            f"dataset.split_time={config.split_time})"
        )
    return window


# ---------------------------------------------------------------------------------------------
# driver side: catalog and users tables


@dataclass(frozen=True)
class EntityTable:
    """A catalog or users table after quarantine: unique non-null ids, sorted by id."""

    table: pl.DataFrame  # <side>_id first, then feature columns
    quarantine: pl.DataFrame


def _read_entity_table(info: LogsInfo, name: str, id_type: pa.DataType) -> EntityTable:
    side = "item" if name == TABLE_ITEMS else "user"
    key = f"{side}_id"
    table = pl.from_arrow(io.read_table(info.tables[name].path))
    table = table.with_columns(
        pl.col(key).cast(pl.Int64 if pa.types.is_integer(id_type) else pl.String)
    )
    table = table.select(key, pl.exclude(key)).with_row_index("_row")
    null = table.filter(pl.col(key).is_null())
    non_null = table.filter(pl.col(key).is_not_null())
    duplicate = non_null.filter(pl.int_range(pl.len()).over(key) > 0)
    kept = non_null.filter(pl.int_range(pl.len()).over(key) == 0).sort(key).drop("_row")

    def quarantine(rows: pl.DataFrame, reason: str) -> pl.DataFrame:
        rows = rows.drop("_row")
        return rows.select(
            pl.lit(name).alias("table"),
            pl.lit(reason).alias("reason"),
            pl.lit(None, dtype=pl.String).alias("request_id"),
            (pl.col(key) if side == "user" else pl.lit(None)).alias("user_id"),
            (pl.col(key) if side == "item" else pl.lit(None)).alias("item_id"),
            pl.struct(pl.all()).struct.json_encode().alias("row"),
        )

    null_reason = REASON_NULL_ITEM_ID if side == "item" else REASON_NULL_USER_ID
    return EntityTable(
        table=kept,
        quarantine=pl.concat(
            [quarantine(null, null_reason), quarantine(duplicate, REASON_DUPLICATE_ID)]
        ),
    )


# ---------------------------------------------------------------------------------------------
# read units and the per-unit / per-partition work (plain functions: the engines wire them)

# Rows per read task: consecutive row groups of one file are grouped up to about this many.
READ_UNIT_ROWS = 1_000_000


def read_units(
    info: LogsInfo, tables: tuple[str, ...], *, target_rows: int = READ_UNIT_ROWS
) -> list[dict[str, Any]]:
    """The read tasks of some log tables: {table, path, row_groups, rows}, from the footers.

    A task reads whole row groups of one file, so its memory is bounded by ``target_rows``
    (or one row group) whatever the size of the logs.
    """
    units: list[dict[str, Any]] = []
    for table in tables:
        if not info.has(table):
            continue
        current = None
        for path, index, rows in info.tables[table].row_groups:
            if current is None or current["path"] != path or current["rows"] >= target_rows:
                current = {"table": table, "path": path, "row_groups": [], "rows": 0}
                units.append(current)
            current["row_groups"].append(index)
            current["rows"] += rows
    return units


@dataclass(frozen=True)
class _ReadSpec:
    """What a read task needs to normalise rows: the window and the id types."""

    start_us: int
    end_us: int
    user_id_type: pa.DataType
    item_id_type: pa.DataType
    # Drop clicks with dwell_s below this (None: no dwell filter, or no dwell_s column).
    min_dwell_s: float | None = None


DWELL_COLUMN = "dwell_s"


def _read_unit(unit: dict[str, Any], columns: list[str] | None = None) -> pl.DataFrame:
    columns = columns or list(REQUIRED_COLUMNS[unit["table"]])
    return pl.from_arrow(
        io.read_parquet_row_groups(unit["path"], unit["row_groups"], columns=columns)
    )


def _drop_short_dwell(
    rows: pl.DataFrame, table: str, spec: _ReadSpec
) -> tuple[pl.DataFrame, int]:
    """Clicks without the ones whose dwell is below ``spec.min_dwell_s``; and how many of
    those fell in the window (other tables, or no filter: unchanged, 0)."""
    if table != TABLE_CLICKS or spec.min_dwell_s is None:
        return rows, 0
    short = pl.col(DWELL_COLUMN).is_not_null() & (pl.col(DWELL_COLUMN) < spec.min_dwell_s)
    in_window = pl.col("ts").dt.epoch("us").is_between(spec.start_us, spec.end_us, closed="left")
    dropped = rows.filter(short & in_window).height
    return rows.filter(~short).drop(DWELL_COLUMN), dropped


def _read_events_counted(
    units: list[dict[str, Any]], spec: _ReadSpec
) -> tuple[pl.DataFrame, int]:
    """Read units (row groups of log files) -> (normalised event rows in the window, clicks
    in the window dropped for a short dwell)."""
    frames, dropped = [], 0
    for unit in units:
        columns = list(REQUIRED_COLUMNS[unit["table"]])
        if unit["table"] == TABLE_CLICKS and spec.min_dwell_s is not None:
            columns.append(DWELL_COLUMN)
        rows, short = _drop_short_dwell(_read_unit(unit, columns), unit["table"], spec)
        dropped += short
        frames.append(
            normalize_events(
                rows,
                table=unit["table"],
                start_us=spec.start_us,
                end_us=spec.end_us,
                user_id_type=spec.user_id_type,
                item_id_type=spec.item_id_type,
            )
        )
    schema = event_schema(spec.user_id_type, spec.item_id_type)
    return (pl.concat(frames) if frames else pl.from_arrow(schema.empty_table())), dropped


def _read_events(units: list[dict[str, Any]], spec: _ReadSpec) -> pl.DataFrame:
    return _read_events_counted(units, spec)[0]


def _summarize_units(
    units: list[dict[str, Any]], spec: _ReadSpec, *, catalog_ids: pl.Series, split_us: int
) -> pl.DataFrame:
    """Click units -> rows ``user_id`` (a user with a valid click), ``item_id, train_clicks``
    or ``short_dwell_clicks`` (clicks dropped by ``dataset.min_dwell_s``)."""
    events, dropped = _read_events_counted(units, spec)
    users, items = summarize_clicks(events, catalog_ids=catalog_ids, split_us=split_us)
    short = pl.DataFrame({"short_dwell_clicks": [dropped]}, schema={"short_dwell_clicks": pl.Int64})
    return pl.concat([users, items, short], how="diagonal")


def _ts_range_units(units: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    ts_us = pl.concat(
        [_read_unit(u, ["ts"]).select(pl.col("ts").dt.epoch("us"))["ts"] for u in units]
    )
    return ts_us.min(), ts_us.max()


@dataclass(frozen=True)
class _OutputSpec:
    staging: str
    train: pa.Schema
    eval: pa.Schema
    quarantine: pa.Schema


def _to_arrow(frame: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    """A polars output frame (``ts_us`` as int) -> the canonical Arrow schema."""
    table = frame.to_arrow()
    if "ts_us" in table.column_names:
        index = table.column_names.index("ts_us")
        ts = table.column(index).cast(pa.int64()).cast(schema.field("ts").type)
        table = table.set_column(index, "ts", ts)
    return table.select(schema.names).cast(schema)


def _partition_file_name(events: pl.DataFrame) -> str:
    """Deterministic per partition: named after a hash of its smallest user id."""
    first = events["user_id"].drop_nulls().min()
    if first is None:
        return "part-null-users.parquet"
    return f"part-{int(stable_id_hash(pl.Series([first]))[0]):016x}.parquet"


_COUNTS_SCHEMA = pa.schema(
    [
        ("stats", pa.string()),
        ("user_idx", pa.list_(pa.int64())),
        ("user_count", pa.list_(pa.int64())),
        ("item_idx", pa.list_(pa.int64())),
        ("item_count", pa.list_(pa.int64())),
    ]
)


def _build_and_write(
    events: pl.DataFrame,
    lookups: PartitionLookups,
    settings: PartitionSettings,
    output: _OutputSpec,
) -> pa.Table:
    """One partition (all events of its users) -> its part files in staging; one counts row."""
    if events.height == 0:
        return _COUNTS_SCHEMA.empty_table()
    result = build_partition(events, lookups, settings)
    name = _partition_file_name(events)
    for folder, frame, schema in (
        (DATASET_TRAIN, result.train, output.train),
        (DATASET_EVAL, result.eval, output.eval),
        (DATASET_QUARANTINE, result.quarantine, output.quarantine),
    ):
        if frame.height:
            io.write_table(io.join(output.staging, folder, name), _to_arrow(frame, schema))
    return pa.table(
        {
            "stats": [json.dumps(result.stats)],
            "user_idx": [result.user_counts["user_idx"].to_list()],
            "user_count": [result.user_counts["count"].to_list()],
            "item_idx": [result.item_counts["item_idx"].to_list()],
            "item_count": [result.item_counts["count"].to_list()],
        },
        schema=_COUNTS_SCHEMA,
    )


class _ClickSummary:
    """Driver-side merge of click summaries; holds O(users + items), never O(clicks)."""

    def __init__(self, user_dtype: pl.DataType, item_dtype: pl.DataType) -> None:
        self.user_parts: list[pl.Series] = [pl.Series("user_id", [], dtype=user_dtype)]
        self.item_parts: list[pl.DataFrame] = [
            pl.DataFrame(schema={"item_id": item_dtype, "train_clicks": pl.Int64})
        ]
        self.short_dwell_clicks = 0

    def add(self, frame: pl.DataFrame) -> None:
        if "short_dwell_clicks" in frame.columns:
            self.short_dwell_clicks += int(frame["short_dwell_clicks"].sum())
        if "user_id" in frame.columns:
            self.user_parts.append(frame["user_id"].drop_nulls())
        if "item_id" in frame.columns:
            self.item_parts.append(
                frame.filter(pl.col("item_id").is_not_null()).select("item_id", "train_clicks")
            )
        if len(self.user_parts) + len(self.item_parts) > 128:
            self.user_parts, self.item_parts = [self.users()], [self.item_counts()]

    def users(self) -> pl.Series:
        return pl.concat(self.user_parts).unique()

    def item_counts(self) -> pl.DataFrame:
        return pl.concat(self.item_parts).group_by("item_id").agg(pl.col("train_clicks").sum())


class _PartitionCounts:
    """Driver-side merge of the partitions' counts rows."""

    def __init__(self, num_users: int, num_items: int) -> None:
        self.stats: dict[str, Any] = {}
        self.user_counts_U = np.zeros(num_users, dtype=np.int64)
        self.item_counts_I = np.zeros(num_items, dtype=np.int64)

    def add(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            merge_stats(self.stats, json.loads(row["stats"]))
            np.add.at(self.user_counts_U, np.asarray(row["user_idx"], np.int64), row["user_count"])
            np.add.at(self.item_counts_I, np.asarray(row["item_idx"], np.int64), row["item_count"])


# ---------------------------------------------------------------------------------------------
# engines: Ray Data (the job), and one process with polars (reference and benchmark baseline)

_SHARED_CACHE: dict[str, Any] = {}


def _shared(ref: Any) -> Any:
    """``ray.get`` once per worker process and object (the object is immutable)."""
    import ray

    key = ref.hex()
    if key not in _SHARED_CACHE:
        _SHARED_CACHE.clear()
        _SHARED_CACHE[key] = ray.get(ref)
    return _SHARED_CACHE[key]


# Second shuffle key: 0 for every row with a user, a running number for rows without one.
# Rows of one user still share (user_id, 0) and so a partition; rows with a null user_id
# (anonymous traffic, quarantined by build_partition) spread over all partitions instead of
# all hashing to one.
SPREAD_COLUMN = "_spread"
SHUFFLE_KEYS = ["user_id", SPREAD_COLUMN]


def with_spread(events: pl.DataFrame) -> pl.DataFrame:
    spread = pl.when(pl.col("user_id").is_null()).then(pl.int_range(pl.len())).otherwise(0)
    return events.with_columns(spread.cast(pl.Int64).alias(SPREAD_COLUMN))


def _ray_read_events(batch: pa.Table, *, spec: _ReadSpec) -> pa.Table:
    events = _read_events(batch.to_pylist(), spec)
    schema = event_schema(spec.user_id_type, spec.item_id_type)
    table = with_spread(events).to_arrow()
    return table.cast(schema.append(pa.field(SPREAD_COLUMN, pa.int64())))


def _ray_summarize(
    batch: pa.Table, *, spec: _ReadSpec, catalog_ref: Any, split_us: int
) -> pa.Table:
    units = batch.to_pylist()
    return _summarize_units(
        units, spec, catalog_ids=_shared(catalog_ref), split_us=split_us
    ).to_arrow()


def _ray_ts_range(batch: pa.Table) -> pa.Table:
    low, high = _ts_range_units(batch.to_pylist())
    return pa.table(
        {"low": [low], "high": [high]},
        schema=pa.schema([("low", pa.int64()), ("high", pa.int64())]),
    )


def _ray_build(
    batch: pa.Table, *, lookups_ref: Any, settings: PartitionSettings, output: _OutputSpec
) -> pa.Table:
    events = pl.from_arrow(batch).drop(SPREAD_COLUMN, strict=False)
    return _build_and_write(events, _shared(lookups_ref), settings, output)


class RayEngine:
    """Ray Data: one task per read unit, one hash shuffle by user, one task per partition."""

    name = "ray"

    def __init__(self, num_partitions: int, shuffle_batch_mb: int = 128) -> None:
        self.num_partitions = num_partitions
        self.shuffle_batch_bytes = shuffle_batch_mb * 2**20

    @staticmethod
    def _units(units: list[dict[str, Any]]):
        import ray.data

        # One block, so one task, per read unit.
        return ray.data.from_items(units, override_num_blocks=len(units))

    def ts_range(self, units: list[dict[str, Any]]) -> tuple[int, int] | None:
        ranges = self._units(units).map_batches(_ray_ts_range, batch_format="pyarrow")
        lows, highs = [], []
        for batch in ranges.iter_batches(batch_format="pyarrow", batch_size=None):
            lows += [v for v in batch["low"].to_pylist() if v is not None]
            highs += [v for v in batch["high"].to_pylist() if v is not None]
        return (min(lows), max(highs)) if lows else None

    def summarize_clicks(
        self,
        units: list[dict[str, Any]],
        spec: _ReadSpec,
        summary: _ClickSummary,
        *,
        catalog_ids: pl.Series,
        split_us: int,
    ) -> None:
        import ray

        summaries = self._units(units).map_batches(
            _ray_summarize,
            batch_format="pyarrow",
            fn_kwargs={"spec": spec, "catalog_ref": ray.put(catalog_ids), "split_us": split_us},
        )
        for batch in summaries.iter_batches(batch_format="pyarrow", batch_size=None):
            summary.add(pl.from_arrow(batch))

    def build_examples(
        self,
        units: list[dict[str, Any]],
        spec: _ReadSpec,
        counts: _PartitionCounts,
        *,
        lookups: PartitionLookups,
        settings: PartitionSettings,
        output: _OutputSpec,
    ) -> None:
        rows = self.example_rows(units, spec, lookups=lookups, settings=settings, output=output)
        for batch in rows.iter_batches(batch_format="pyarrow", batch_size=None):
            counts.add(batch)

    def example_rows(
        self,
        units: list[dict[str, Any]],
        spec: _ReadSpec,
        *,
        lookups: PartitionLookups,
        settings: PartitionSettings,
        output: _OutputSpec,
    ):
        """The pass-2 Dataset: read units -> events -> hash shuffle by user -> counts rows.

        A shuffle-map task partitions at most ``shuffle_batch_bytes`` of events at once. Ray
        2.60 batches up to 1 GiB per map task by default; at 5M impressions that one task
        held 1.4 GiB, and its worker kept it after the task ended.
        """
        import ray

        with io.data_context(shuffle_input_batch_bytes=self.shuffle_batch_bytes):
            events = self._units(units).map_batches(
                _ray_read_events, batch_format="pyarrow", fn_kwargs={"spec": spec}
            )
        # All events of a user land in one partition; a partition is one block, one batch.
        return events.repartition(self.num_partitions, keys=SHUFFLE_KEYS).map_batches(
            _ray_build,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={"lookups_ref": ray.put(lookups), "settings": settings, "output": output},
        )


class LocalEngine:
    """One process, polars: every event in memory as a single partition.

    The same per-partition functions as the Ray engine, so the rows are identical; memory
    grows with the logs. For small logs, tests, and as the benchmark's baseline.
    """

    name = "local"

    def ts_range(self, units: list[dict[str, Any]]) -> tuple[int, int] | None:
        low, high = _ts_range_units(units)
        return None if low is None else (low, high)

    def summarize_clicks(
        self,
        units: list[dict[str, Any]],
        spec: _ReadSpec,
        summary: _ClickSummary,
        *,
        catalog_ids: pl.Series,
        split_us: int,
    ) -> None:
        summary.add(_summarize_units(units, spec, catalog_ids=catalog_ids, split_us=split_us))

    def build_examples(
        self,
        units: list[dict[str, Any]],
        spec: _ReadSpec,
        counts: _PartitionCounts,
        *,
        lookups: PartitionLookups,
        settings: PartitionSettings,
        output: _OutputSpec,
    ) -> None:
        counts.add(_build_and_write(_read_events(units, spec), lookups, settings, output))


ENGINES = {"ray": RayEngine, "local": LocalEngine}


# Input log rows per partition when dataset.num_partitions is not set.
ROWS_PER_PARTITION = 250_000
MIN_PARTITIONS = 8


def num_partitions_for(config: DatasetConfig, info: LogsInfo) -> int:
    """``dataset.num_partitions``, or one per ``ROWS_PER_PARTITION`` log rows (footers)."""
    if config.num_partitions is not None:
        return config.num_partitions
    rows = sum(info.tables[t].num_rows for t in LOG_TABLES if info.has(t))
    return max(MIN_PARTITIONS, -(-rows // ROWS_PER_PARTITION))


def _check_engine(name: str) -> None:
    if name not in ENGINES:
        raise ValueError(f"unknown build engine {name!r}; valid: {', '.join(sorted(ENGINES))}")


def _make_engine(name: str, config: DatasetConfig, num_partitions: int):
    if name == "ray":
        return RayEngine(num_partitions, config.shuffle_batch_mb)
    return LocalEngine()


# ---------------------------------------------------------------------------------------------
# the job


def check_inputs(
    logs: str, out: str, config: DatasetConfig, *, overwrite: bool = False
) -> LogsInfo:
    """Every check that needs no Ray: output writable, logs valid, config fits the logs."""
    io.check_writable(out, overwrite=overwrite)
    info = validate_logs(logs)
    if config.require_click_impression and not info.has(TABLE_IMPRESSIONS):
        raise ValueError(
            "dataset.require_click_impression is true but the logs have no impressions table"
        )
    if config.min_dwell_s is not None and dwell_filter_applies(info):
        for file in info.tables[TABLE_CLICKS].files:
            schema = io.read_parquet_metadata(file).schema.to_arrow_schema()
            dwell_type = schema.field(DWELL_COLUMN).type if DWELL_COLUMN in schema.names else None
            if dwell_type is None or not (
                pa.types.is_floating(dwell_type) or pa.types.is_integer(dwell_type)
            ):
                raise LogsValidationError(
                    f"dataset.min_dwell_s needs a numeric {DWELL_COLUMN} in every file, "
                    f"found {dwell_type or 'no such column'}",
                    table=TABLE_CLICKS,
                    file=file,
                    column=DWELL_COLUMN,
                )
    return info


def dwell_filter_applies(info: LogsInfo) -> bool:
    """Whether the clicks table has a dwell column (its first file says)."""
    return info.has(TABLE_CLICKS) and DWELL_COLUMN in info.tables[TABLE_CLICKS].schema.names


def build_dataset(
    logs: str,
    out: str,
    config: DatasetConfig,
    *,
    overwrite: bool = False,
    engine: str = "ray",
) -> BuildResult:
    """Turn Contract 1 logs into a Contract 2 dataset at ``out`` (see the module docstring).

    ``engine``: ``ray`` (Ray Data; joins the running Ray or starts a local one) or ``local``
    (one process, polars; the same rows).
    """
    started = time.perf_counter()
    _check_engine(engine)
    info = check_inputs(logs, out, config, overwrite=overwrite)
    num_partitions = num_partitions_for(config, info)
    runner = _make_engine(engine, config, num_partitions)
    items = _read_entity_table(info, TABLE_ITEMS, info.item_id_type)
    users_table = (
        _read_entity_table(info, TABLE_USERS, info.user_id_type) if info.has(TABLE_USERS) else None
    )
    if items.table.height == 0:
        raise ValueError(f"table {TABLE_ITEMS!r}: the catalog has no item with a non-null item_id")

    ts_range = info.ts_range_us()
    needs_range = config.end is None or (config.start is None and config.window_days is None)
    if ts_range is None and needs_range:
        units = read_units(info, LOG_TABLES)
        ts_range = runner.ts_range(units) if units else None
    window = resolve_window(config, ts_range)
    min_dwell_s = config.min_dwell_s if dwell_filter_applies(info) else None
    if config.min_dwell_s is not None and min_dwell_s is None:
        logger.warning("dataset.min_dwell_s is set but clicks has no %s column", DWELL_COLUMN)
    spec = _ReadSpec(
        window.start_us, window.end_us, info.user_id_type, info.item_id_type, min_dwell_s
    )
    logger.info("window %s..%s, split at %s", window.start, window.end, _iso_us(window.split_us))

    with io.staged_output(out, overwrite=overwrite) as staging:
        item_ids = items.table["item_id"]
        logger.info("pass 1/2: users with a positive and train clicks per item")
        summary = _ClickSummary(_polars_id(info.user_id_type), _polars_id(info.item_id_type))
        click_units = read_units(info, (TABLE_CLICKS,))
        if click_units:
            runner.summarize_clicks(
                click_units, spec, summary, catalog_ids=item_ids, split_us=window.split_us
            )
        user_ids = summary.users()
        if users_table is not None:
            user_ids = pl.concat([users_table.table["user_id"], user_ids])
        user_ids = user_ids.unique().sort()
        train_clicks_I = (
            pl.DataFrame({"item_id": item_ids})
            .join(summary.item_counts(), on="item_id", how="left", maintain_order="left")[
                "train_clicks"
            ]
            .fill_null(0)
            .to_numpy()
        )
        lookups = make_lookups(
            item_ids, user_ids, train_clicks_I, alpha=config.negatives.unexposed_alpha
        )
        settings = PartitionSettings(
            split_us=window.split_us,
            negatives=config.negatives,
            seed=config.seed,
            require_click_impression=config.require_click_impression,
        )
        output = _OutputSpec(
            staging=staging,
            train=train_schema(info.user_id_type, info.item_id_type, info.ts_type),
            eval=eval_schema(info.user_id_type, info.item_id_type, info.ts_type),
            quarantine=quarantine_schema(info.user_id_type, info.item_id_type),
        )
        logger.info(
            "pass 2/2: %d users, %d items; %s engine, %d partitions by user",
            user_ids.len(),
            item_ids.len(),
            runner.name,
            num_partitions,
        )
        counts = _PartitionCounts(user_ids.len(), item_ids.len())
        event_units = read_units(info, LOG_TABLES)
        if event_units:
            runner.build_examples(
                event_units, spec, counts, lookups=lookups, settings=settings, output=output
            )

        catalog_quarantine = pl.concat(
            [items.quarantine] + ([users_table.quarantine] if users_table is not None else []),
            how="diagonal_relaxed",
        )
        _write_driver_outputs(
            staging,
            output,
            lookups,
            users_table,
            items,
            counts.user_counts_U,
            counts.item_counts_I,
            catalog_quarantine,
            info,
        )
        manifest = _manifest(info, config, window, counts.stats, catalog_quarantine, lookups)
        manifest["num_partitions"] = num_partitions
        manifest["counts"]["short_dwell_clicks"] = summary.short_dwell_clicks
        if config.min_dwell_s is not None:
            manifest["notes"].append(
                f"{summary.short_dwell_clicks} clicks with {DWELL_COLUMN} < "
                f"{config.min_dwell_s} were not positives"
                if min_dwell_s is not None
                else f"dataset.min_dwell_s is set but clicks has no {DWELL_COLUMN} column: "
                "no dwell filter applied"
            )
        manifest["engine"] = runner.name
        manifest["build_seconds"] = round(time.perf_counter() - started, 3)
        io.write_json(io.join(staging, MANIFEST_FILE), manifest)
        _check_quarantine_fraction(manifest, config.max_quarantine_fraction)
    logger.info(
        "dataset %s: %d train rows, %d eval rows, %d quarantined",
        out,
        manifest["counts"]["train_positives"],
        manifest["counts"]["eval_positives"],
        manifest["counts"]["quarantined"],
    )
    return BuildResult(out=str(out), manifest=manifest)


def _polars_id(arrow_type: pa.DataType) -> pl.DataType:
    return pl.Int64 if pa.types.is_integer(arrow_type) else pl.String


def _write_driver_outputs(
    staging: str,
    output: _OutputSpec,
    lookups: PartitionLookups,
    users_table: EntityTable | None,
    items: EntityTable,
    user_counts_U: np.ndarray,
    item_counts_I: np.ndarray,
    catalog_quarantine: pl.DataFrame,
    info: LogsInfo,
) -> None:
    """Vocab, features, the catalog's quarantine, and a schema-only part for empty outputs."""
    user_vocab = lookups.users.with_columns(pl.Series("count", user_counts_U))
    item_vocab = lookups.items.with_columns(pl.Series("count", item_counts_I))
    io.write_table(
        io.join(staging, DATASET_VOCAB, USERS_FILE),
        user_vocab.to_arrow().cast(vocab_schema("user", info.user_id_type)),
    )
    io.write_table(
        io.join(staging, DATASET_VOCAB, ITEMS_FILE),
        item_vocab.to_arrow().cast(vocab_schema("item", info.item_id_type)),
    )
    user_features = lookups.users.select("user_idx", "user_id")
    if users_table is not None:
        user_features = user_features.join(
            users_table.table, on="user_id", how="left", maintain_order="left"
        )
    item_features = lookups.items.select("item_idx", "item_id").join(
        items.table, on="item_id", how="left", maintain_order="left"
    )
    for frame, file, id_type, key in (
        (user_features, USERS_FILE, info.user_id_type, "user_id"),
        (item_features, ITEMS_FILE, info.item_id_type, "item_id"),
    ):
        table = frame.to_arrow()
        table = table.set_column(
            table.column_names.index(key), key, table.column(key).cast(id_type)
        )
        io.write_table(io.join(staging, DATASET_FEATURES, file), _narrow_strings(table))
    if catalog_quarantine.height:
        io.write_table(
            io.join(staging, DATASET_QUARANTINE, "part-catalog.parquet"),
            catalog_quarantine.select(output.quarantine.names).to_arrow().cast(output.quarantine),
        )
    for folder, schema in (
        (DATASET_TRAIN, output.train),
        (DATASET_EVAL, output.eval),
        (DATASET_QUARANTINE, output.quarantine),
    ):
        if not io.list_files(io.join(staging, folder)):
            io.write_table(io.join(staging, folder, "part-empty.parquet"), schema.empty_table())


def _narrow_strings(table: pa.Table) -> pa.Table:
    """large_string -> string (also inside lists), the types Contract 1 tables usually carry."""

    def narrow(t: pa.DataType) -> pa.DataType:
        if pa.types.is_large_string(t) or pa.types.is_string_view(t):
            return pa.string()
        if pa.types.is_large_list(t) or pa.types.is_list(t):
            return pa.list_(narrow(t.value_type))
        return t

    return table.cast(pa.schema([pa.field(f.name, narrow(f.type)) for f in table.schema]))


def _manifest(
    info: LogsInfo,
    config: DatasetConfig,
    window: Window,
    stats: dict[str, Any],
    catalog_quarantine: pl.DataFrame,
    lookups: PartitionLookups,
) -> dict[str, Any]:
    quarantined_by_reason = dict(stats.get("quarantined_by_reason", {}))
    quarantined_by_table = dict(stats.get("quarantined_by_table", {}))
    for table, reason, n in catalog_quarantine.group_by("table", "reason").len().iter_rows():
        quarantined_by_reason[reason] = quarantined_by_reason.get(reason, 0) + int(n)
        quarantined_by_table[table] = quarantined_by_table.get(table, 0) + int(n)
    window_rows = dict(stats.get("window_rows", {}))
    for table in LOG_TABLES:
        if info.has(table):
            window_rows.setdefault(table, 0)
    window_rows[TABLE_ITEMS] = info.tables[TABLE_ITEMS].num_rows
    if info.has(TABLE_USERS):
        window_rows[TABLE_USERS] = info.tables[TABLE_USERS].num_rows
    counts = {
        "train_positives": int(stats.get("train_positives", 0)),
        "eval_positives": int(stats.get("eval_positives", 0)),
        "negatives_by_source": {
            source: int(stats.get("negatives_by_source", {}).get(source, 0))
            for source in config.negatives.counts()
        },
        "fills": {
            "total": int(stats.get("fills", {}).get("total", 0)),
            **{
                source: int(stats.get("fills", {}).get(source, 0))
                for source in ("exposed_not_clicked", "ranked_out")
            },
        },
        "quarantined": int(sum(quarantined_by_reason.values())),
        "quarantined_by_reason": dict(sorted(quarantined_by_reason.items())),
        "quarantined_by_table": dict(sorted(quarantined_by_table.items())),
        "input_rows": {name: t.num_rows for name, t in info.tables.items()},
        "window_rows": window_rows,
        "duplicate_clicks": int(stats.get("duplicate_clicks", 0)),
        "unexposed_exact_positives": int(stats.get("unexposed_exact_positives", 0)),
        "users": lookups.users.height,
        "items": lookups.items.height,
    }
    notes = list(info.notes)
    if counts["fills"]["total"]:
        notes.append(
            f"{counts['fills']['total']} negatives were filled from unexposed "
            "(a source had fewer candidates than configured)"
        )
    return {
        "inputs": {
            "logs": info.path,
            "tables": sorted(info.tables),
            "files": {name: list(t.files) for name, t in info.tables.items()},
        },
        "config": config_to_dict(config),
        "window": {
            "start": window.start.isoformat(),
            "end": window.end.isoformat(),
            "start_time": _iso_us(window.start_us),
            "end_time": _iso_us(window.end_us),
        },
        "split_time": _iso_us(window.split_us),
        "id_type": info.id_type,
        "user_id_type": id_type_name(info.user_id_type),
        "item_id_type": id_type_name(info.item_id_type),
        "num_negatives": sum(config.negatives.counts().values()),
        "negatives_per_source": config.negatives.counts(),
        "unexposed_weights": f"(train clicks + 1) ** {config.negatives.unexposed_alpha}",
        "counts": counts,
        "notes": notes,
        "created_at": io.utc_now(),
        "seed": config.seed,
    }


def _check_quarantine_fraction(manifest: dict[str, Any], limit: float | None) -> None:
    """Quarantined / rows considered (in-window log rows + catalog and users rows)."""
    if limit is None:
        return
    counts = manifest["counts"]
    considered = sum(counts["window_rows"].values())
    fraction = counts["quarantined"] / considered if considered else 0.0
    if fraction > limit:
        raise QuarantineLimitError(
            f"{counts['quarantined']} of {considered} input rows quarantined "
            f"({fraction:.2%}) exceeds dataset.max_quarantine_fraction={limit:.2%}; "
            f"by reason: {counts['quarantined_by_reason']}"
        )
