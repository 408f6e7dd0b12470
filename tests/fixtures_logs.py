"""Hand-built tiny Contract 1 logs for tests: rows as tuples, tables as Arrow, a dir on disk.

    logs = HandLogs(
        clicks=[("r1", 100, 2, "2026-11-01 10:01")],           # request_id, user_id, item_id, ts
        impressions=[("r1", 100, 1, 0, "2026-11-01 10:00")],   # ..., position, ts
        retrievals=[("r1", 100, 5, 0, "2026-11-01 10:00")],    # ..., retrieval_rank, ts
        items=range(1, 21),                                    # ids, or dicts with features
    )
    logs.write(tmp_path / "logs")

``None`` anywhere in a row writes a null. Timestamps are UTC, microseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

TS_TYPE = pa.timestamp("us", tz="UTC")


def ts(text: str | None) -> datetime | None:
    """``"2026-11-01 10:00"`` -> an aware UTC datetime (None stays None)."""
    if text is None:
        return None
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def ts_us(text: str) -> int:
    """``"2026-11-01 10:00"`` -> microseconds since the epoch."""
    return int(ts(text).timestamp()) * 1_000_000


def _id_type(id_type: str) -> pa.DataType:
    return pa.int64() if id_type == "int" else pa.string()


def _ids(values: Iterable[Any], id_type: str) -> pa.Array:
    values = list(values)
    if id_type == "string":
        values = [None if v is None else str(v) for v in values]
    return pa.array(values, type=_id_type(id_type))


def log_table(table: str, rows: Sequence[tuple], *, id_type: str = "int") -> pa.Table:
    """Rows of one log table (``clicks``, ``impressions`` or ``retrievals``) -> Arrow."""
    columns = list(zip(*rows)) if rows else None
    if table == "clicks":
        names = ["request_id", "user_id", "item_id", "ts"]
    elif table == "impressions":
        names = ["request_id", "user_id", "item_id", "position", "ts"]
    elif table == "retrievals":
        names = ["request_id", "user_id", "item_id", "retrieval_rank", "ts"]
    else:
        raise ValueError(f"unknown log table {table!r}")
    if columns is None:
        columns = [[] for _ in names]
    arrays = []
    for name, values in zip(names, columns):
        if name == "request_id":
            arrays.append(pa.array(values, type=pa.string()))
        elif name in ("user_id", "item_id"):
            arrays.append(_ids(values, id_type))
        elif name == "ts":
            arrays.append(pa.array([ts(v) for v in values], type=TS_TYPE))
        else:
            arrays.append(pa.array(values, type=pa.int32()))
    return pa.table(arrays, names=names)


def entity_table(side: str, rows: Iterable[Any], *, id_type: str = "int") -> pa.Table:
    """Catalog (``item``) or users (``user``) rows: plain ids or dicts with feature columns."""
    rows = list(rows)
    key = f"{side}_id"
    if rows and isinstance(rows[0], dict):
        ids = _ids([r[key] for r in rows], id_type)
        features = {k: [r.get(k) for r in rows] for k in rows[0] if k != key}
        return pa.table({key: ids, **{k: pa.array(v) for k, v in features.items()}})
    return pa.table({key: _ids(rows, id_type)})


@dataclass
class HandLogs:
    """A tiny Contract 1 world given row by row."""

    clicks: Sequence[tuple] = ()
    impressions: Sequence[tuple] | None = None
    retrievals: Sequence[tuple] | None = None
    items: Iterable[Any] = ()
    users: Iterable[Any] | None = None
    id_type: str = "int"
    tables: dict[str, pa.Table] = field(init=False)

    def __post_init__(self) -> None:
        self.tables = {"clicks": log_table("clicks", self.clicks, id_type=self.id_type)}
        if self.impressions is not None:
            self.tables["impressions"] = log_table(
                "impressions", self.impressions, id_type=self.id_type
            )
        if self.retrievals is not None:
            self.tables["retrievals"] = log_table(
                "retrievals", self.retrievals, id_type=self.id_type
            )
        self.tables["items"] = entity_table("item", self.items, id_type=self.id_type)
        if self.users is not None:
            self.tables["users"] = entity_table("user", self.users, id_type=self.id_type)

    def write(self, out_dir: str | Path, *, files_per_table: int = 1) -> str:
        """Write each table as ``files_per_table`` Parquet files under ``out_dir/<table>/``."""
        out_dir = Path(out_dir)
        for name, table in self.tables.items():
            write_table_files(out_dir / name, table, files=files_per_table)
        return str(out_dir)


def write_table_files(directory: str | Path, table: pa.Table, *, files: int = 1) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    step = max(1, -(-table.num_rows // files))
    for index in range(files):
        part = table.slice(index * step, step)
        if part.num_rows or index == 0:
            pq.write_table(part, directory / f"part-{index:03d}.parquet")


def events_of(logs: HandLogs, *, start: str, end: str) -> pl.DataFrame:
    """All log tables of ``logs`` normalised into one event frame for [start, end)."""
    from pipelines.examples import normalize_events

    user_type = item_type = _id_type(logs.id_type)
    frames = [
        normalize_events(
            pl.from_arrow(logs.tables[name]),
            table=name,
            start_us=ts_us(start),
            end_us=ts_us(end),
            user_id_type=user_type,
            item_id_type=item_type,
        )
        for name in ("clicks", "impressions", "retrievals")
        if name in logs.tables
    ]
    return pl.concat(frames)


# ---------------------------------------------------------------------------------------------
# A naive reference check of Contract 2 rows against the logs (Python sets, row by row)


def _valid_log_rows(table: pl.DataFrame, catalog: set, start_us: int, end_us: int) -> list[dict]:
    rows = []
    for row in table.with_columns(pl.col("ts").dt.epoch("us").alias("ts_us")).iter_rows(named=True):
        if row["user_id"] is None or row["item_id"] is None or row["ts_us"] is None:
            continue
        if not start_us <= row["ts_us"] < end_us or row["item_id"] not in catalog:
            continue
        rows.append(row)
    return rows


def contract_violations(
    tables: dict[str, pa.Table],
    train: pl.DataFrame,
    eval_rows: pl.DataFrame,
    *,
    start_us: int,
    end_us: int,
    split_us: int,
    counts: dict[str, int],
    ranked_out_ranks: tuple[int, int | None] = (0, None),
    quarantined_positives: set | None = None,
) -> list[str]:
    """Every way ``train``/``eval_rows`` break Contract 2 for the logs ``tables`` (empty = none).

    ``counts``: per-source negatives per positive. Positives quarantined as
    not_enough_negatives are passed as {(user_id, request_id, item_id)}.
    """
    problems: list[str] = []
    catalog = set(tables["items"].column("item_id").drop_null().to_pylist())
    frames = {
        name: _valid_log_rows(pl.from_arrow(tables[name]), catalog, start_us, end_us)
        for name in ("clicks", "impressions", "retrievals")
        if name in tables
    }
    clicked: dict[Any, set] = {}
    met: dict[Any, set] = {}
    impressed: dict[tuple, set] = {}
    retrieved: dict[tuple, set] = {}
    low, high = ranked_out_ranks
    for name, rows in frames.items():
        for row in rows:
            met.setdefault(row["user_id"], set()).add(row["item_id"])
            key = (row["user_id"], row["request_id"])
            if name == "clicks":
                clicked.setdefault(row["user_id"], set()).add(row["item_id"])
            elif name == "impressions" and row["request_id"] is not None:
                impressed.setdefault(key, set()).add(row["item_id"])
            elif name == "retrievals" and row["request_id"] is not None:
                rank = row["retrieval_rank"]
                if rank is not None and rank >= low and (high is None or rank <= high):
                    retrieved.setdefault(key, set()).add(row["item_id"])
    first_click: dict[tuple, int] = {}
    for r in frames["clicks"]:
        if r["request_id"] is not None:
            key = (r["user_id"], r["request_id"], r["item_id"])
            first_click[key] = min(first_click.get(key, r["ts_us"]), r["ts_us"])
    positives = {key for key, first in first_click.items() if first < split_us}
    eval_expected = {(key[0], key[2]) for key, first in first_click.items() if first >= split_us}
    num_negatives = sum(counts.values())
    seen = set()
    for row in train.iter_rows(named=True):
        key = (row["user_id"], row["request_id"], row["item_id"])
        where = f"train row {key}"
        if key in seen:
            problems.append(f"{where}: duplicate positive")
        seen.add(key)
        if key not in positives:
            problems.append(f"{where}: not a valid train-period click")
        negs, sources = row["neg_item_ids"], row["neg_sources"]
        if len(negs) != num_negatives or len(sources) != num_negatives:
            problems.append(f"{where}: {len(negs)} negatives, expected {num_negatives}")
        if len(set(negs)) != len(negs):
            problems.append(f"{where}: repeated negative")
        user, request = row["user_id"], row["request_id"]
        enc_candidates = impressed.get((user, request), set()) - clicked.get(user, set())
        ro_candidates = (
            retrieved.get((user, request), set())
            - impressed.get((user, request), set())
            - clicked.get(user, set())
        )
        for item, source in zip(negs, sources):
            if item in clicked.get(user, set()):
                problems.append(f"{where}: negative {item} was clicked by the user")
            if item not in catalog:
                problems.append(f"{where}: negative {item} not in the catalog")
            if source == "exposed_not_clicked" and item not in enc_candidates:
                problems.append(f"{where}: {item} is not exposed_not_clicked")
            elif source == "ranked_out" and item not in ro_candidates:
                problems.append(f"{where}: {item} is not ranked_out")
            elif source == "unexposed" and item in met.get(user, set()):
                problems.append(f"{where}: {item} is not unexposed")
            elif source not in ("exposed_not_clicked", "ranked_out", "unexposed"):
                problems.append(f"{where}: unknown source {source}")
        for source, candidates in (
            ("exposed_not_clicked", enc_candidates),
            ("ranked_out", ro_candidates),
        ):
            expected = min(counts[source], len(candidates))
            if sources.count(source) != expected:
                problems.append(f"{where}: {sources.count(source)} {source}, expected {expected}")
    missing = positives - seen - (quarantined_positives or set())
    if missing:
        problems.append(
            f"{len(missing)} train positives missing, e.g. {sorted(missing, key=str)[:3]}"
        )
    eval_seen = [(r["user_id"], r["item_id"]) for r in eval_rows.iter_rows(named=True)]
    if len(eval_seen) != len(set(eval_seen)):
        problems.append("eval rows repeat a (user, item)")
    if set(eval_seen) != eval_expected:
        problems.append(
            f"eval rows differ: {len(set(eval_seen) - eval_expected)} unexpected, "
            f"{len(eval_expected - set(eval_seen))} missing"
        )
    for row in eval_rows.iter_rows(named=True):
        if row["ts"] is not None and _as_us(row["ts"]) < split_us:
            problems.append(f"eval row {(row['user_id'], row['item_id'])} before the split")
    for row in train.iter_rows(named=True):
        if not start_us <= _as_us(row["ts"]) < split_us:
            problems.append(f"train row {(row['user_id'], row['item_id'])} outside [start, split)")
    return problems


def _as_us(value: Any) -> int:
    if isinstance(value, int):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1_000_000)
