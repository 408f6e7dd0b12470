"""Pure per-partition logic of build-dataset, on polars frames (no Ray here).

The three log tables are first normalised into one *event* frame (``normalize_events``); after
the hash shuffle by user a partition holds every in-window event of its users, and
``build_partition`` turns it into train rows with their negatives, eval rows, quarantined rows
and counts (Contract 2):

- positives (set A): valid clicks, deduplicated per (user, request, item);
- ``exposed_not_clicked``: impressed in the positive's request, never clicked by the user;
- ``ranked_out``: retrieved in the request (within the configured rank window), not impressed
  in it, never clicked by the user;
- ``unexposed``: a catalog item never retrieved, impressed or clicked for the user in the
  window, drawn with probability ∝ (train clicks + 1)^alpha; it also fills the shortfall of
  the other two sources.

No negative is an item the user clicked anywhere in the window (train or eval days), and the
negatives of one positive are distinct items.

Randomness is a stable hash of (seed, user id, the positive's rank among the user's train
positives, source, slot): no RNG state crosses users, so the rows do not depend on how users
are partitioned or on how many nodes run the job.

Shapes: I catalog items, P train positives in the partition, D draws.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

from pipelines.contracts import (
    RANK_COLUMN,
    REASON_CLICK_WITHOUT_IMPRESSION,
    REASON_ITEM_NOT_IN_CATALOG,
    REASON_NOT_ENOUGH_NEGATIVES,
    REASON_NULL_ITEM_ID,
    REASON_NULL_REQUEST_ID,
    REASON_NULL_TS,
    REASON_NULL_USER_ID,
    TABLE_CLICKS,
    TABLE_IMPRESSIONS,
    TABLE_RETRIEVALS,
)
from twotower_core.config import NEGATIVE_SOURCES, NegativesConfig

EXPOSED_NOT_CLICKED, RANKED_OUT, UNEXPOSED = NEGATIVE_SOURCES
TABLE_CODES: dict[str, int] = {TABLE_CLICKS: 0, TABLE_IMPRESSIONS: 1, TABLE_RETRIEVALS: 2}
TABLE_NAMES: dict[int, str] = {code: name for name, code in TABLE_CODES.items()}
SOURCE_CODES: dict[str, int] = {name: code for code, name in enumerate(NEGATIVE_SOURCES)}

# Salts keep the draws of different purposes independent.
_SALT_USER = 0x5EED_0001
_SALT_SOURCE = {EXPOSED_NOT_CLICKED: 0x5EED_0011, RANKED_OUT: 0x5EED_0012, UNEXPOSED: 0x5EED_0013}
_SALT_EXACT = 0x5EED_0014

# Rejection sampling of unexposed items: rounds before the exact per-user fallback, and the
# acceptance mass below which a user goes straight to the fallback.
MAX_REJECTION_ROUNDS = 4
MIN_ACCEPTANCE = 0.05


# ---------------------------------------------------------------------------------------------
# stable hashing


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = np.array(x, dtype=np.uint64, copy=True, ndmin=1)
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def combine(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """A uint64 hash of the pair (a, b), elementwise with broadcasting."""
    b = np.asarray(b).astype(np.uint64, copy=False)
    return mix64(np.asarray(a, dtype=np.uint64) ^ mix64(b + _GOLDEN))


def to_unit_interval(x: np.ndarray) -> np.ndarray:
    """uint64 hashes -> float64 uniforms in [0, 1)."""
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def stable_id_hash(ids: pl.Series) -> np.ndarray:
    """uint64 per id that is the same in every process and Polars version (no ``hash()``).

    Integer ids are their own bits; strings go through BLAKE2b (one call per id, so callers
    pass unique ids).
    """
    if ids.dtype.is_integer():
        return ids.cast(pl.Int64).to_numpy().view(np.uint64).copy()
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
            for s in ids.to_list()
        ),
        dtype=np.uint64,
        count=len(ids),
    )


def user_keys(user_ids: pl.Series, seed: int) -> np.ndarray:
    """[len(user_ids)] uint64 base key of each user's draws."""
    seed_key = combine(np.uint64(_SALT_USER), np.uint64(seed % (1 << 64)))
    return combine(seed_key, stable_id_hash(user_ids))


# ---------------------------------------------------------------------------------------------
# the unexposed sampling table


@dataclass(frozen=True, eq=False)
class UnexposedSampler:
    """Draws catalog item indices with probability ∝ weight, by inverse CDF.

    Built once on the driver from the train click counts and shared by every partition.
    """

    weights_I: np.ndarray  # float64 (count + 1)^alpha
    cdf_I: np.ndarray  # float64 cumulative weights / total, last = 1

    @classmethod
    def from_counts(cls, counts_I: np.ndarray, *, alpha: float) -> UnexposedSampler:
        counts_I = np.asarray(counts_I, dtype=np.float64)
        weights_I = np.power(counts_I + 1.0, alpha)
        cdf_I = np.cumsum(weights_I)
        cdf_I /= cdf_I[-1] if len(cdf_I) else 1.0
        return cls(weights_I=weights_I, cdf_I=cdf_I)

    @property
    def num_items(self) -> int:
        return len(self.weights_I)

    def probabilities(self) -> np.ndarray:
        return self.weights_I / self.weights_I.sum()

    def draw(self, uniforms_D: np.ndarray) -> np.ndarray:
        """[D] uniforms in [0, 1) -> [D] int64 item indices."""
        index_D = np.searchsorted(self.cdf_I, uniforms_D, side="right")
        return np.minimum(index_D, self.num_items - 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# normalising the log tables into events


def event_schema(user_id_type: pa.DataType, item_id_type: pa.DataType) -> pa.Schema:
    """The one Arrow schema every log table is normalised to before the shuffle."""

    def wide(t: pa.DataType) -> pa.DataType:
        return pa.large_string() if not pa.types.is_integer(t) else pa.int64()

    return pa.schema(
        [
            pa.field("table", pa.int8()),
            pa.field("request_id", pa.large_string()),
            pa.field("user_id", wide(user_id_type)),
            pa.field("item_id", wide(item_id_type)),
            pa.field("ts_us", pa.int64()),
            pa.field("rank", pa.int64()),
        ]
    )


def _id_dtype(arrow_type: pa.DataType) -> pl.DataType:
    return pl.Int64 if pa.types.is_integer(arrow_type) else pl.String


def normalize_events(
    batch: pl.DataFrame,
    *,
    table: str,
    start_us: int,
    end_us: int,
    user_id_type: pa.DataType,
    item_id_type: pa.DataType,
) -> pl.DataFrame:
    """One log table's rows -> event rows, keeping those in [start, end) and those with no ts.

    Rows with a null ts are kept so that ``build_partition`` quarantines them.
    """
    rank_column = RANK_COLUMN[table]
    ts_us = pl.col("ts").dt.epoch("us")
    return batch.select(
        pl.lit(TABLE_CODES[table], dtype=pl.Int8).alias("table"),
        pl.col("request_id").cast(pl.String),
        pl.col("user_id").cast(_id_dtype(user_id_type)),
        pl.col("item_id").cast(_id_dtype(item_id_type)),
        ts_us.alias("ts_us"),
        (pl.col(rank_column) if rank_column else pl.lit(None)).cast(pl.Int64).alias("rank"),
    ).filter(
        pl.col("ts_us").is_null() | pl.col("ts_us").is_between(start_us, end_us, closed="left")
    )


def empty_events(user_id_type: pa.DataType, item_id_type: pa.DataType) -> pl.DataFrame:
    return pl.from_arrow(event_schema(user_id_type, item_id_type).empty_table())


# ---------------------------------------------------------------------------------------------
# the click summary (pass 1): users with a positive and train click counts per item


def summarize_clicks(
    clicks: pl.DataFrame, *, catalog_ids: pl.Series, split_us: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Normalised click events -> (users with a valid click, [item_id, train_clicks]).

    Valid = no null id or ts and an item in the catalog; the same rule ``build_partition``
    applies, so every user with a positive is in the user vocab.
    """
    valid = clicks.filter(
        pl.col("user_id").is_not_null()
        & pl.col("item_id").is_not_null()
        & pl.col("request_id").is_not_null()
        & pl.col("ts_us").is_not_null()
        & pl.col("item_id").is_in(catalog_ids.implode())
    )
    users = valid.select(pl.col("user_id").unique())
    items = (
        valid.filter(pl.col("ts_us") < split_us)
        .group_by("item_id")
        .agg(pl.len().cast(pl.Int64).alias("train_clicks"))
    )
    return users, items


# ---------------------------------------------------------------------------------------------
# build_partition


@dataclass(frozen=True)
class PartitionSettings:
    """Everything about the run a partition needs besides the lookups."""

    split_us: int
    negatives: NegativesConfig
    seed: int
    require_click_impression: bool = False

    @property
    def num_negatives(self) -> int:
        return sum(self.negatives.counts().values())


@dataclass(frozen=True, eq=False)
class PartitionLookups:
    """The shared, driver-built tables: catalog and user vocab (sorted by id) and the sampler."""

    items: pl.DataFrame  # item_id, item_idx (0..I-1)
    users: pl.DataFrame  # user_id, user_idx
    sampler: UnexposedSampler


@dataclass
class PartitionResult:
    """Outputs of one partition; ts columns are ``ts_us`` (µs since the epoch, UTC)."""

    train: pl.DataFrame
    eval: pl.DataFrame
    quarantine: pl.DataFrame
    user_counts: pl.DataFrame  # user_idx, count (train positives)
    item_counts: pl.DataFrame  # item_idx, count
    stats: dict[str, Any] = field(default_factory=dict)


def _row_json(events: pl.DataFrame, table_code: int) -> pl.Expr:
    """The Contract 1 columns of an event row as a JSON object string."""
    table = TABLE_NAMES[table_code]
    fields = [
        pl.col("request_id"),
        pl.col("user_id"),
        pl.col("item_id"),
        pl.from_epoch(pl.col("ts_us"), time_unit="us").alias("ts"),
    ]
    if RANK_COLUMN[table]:
        fields.append(pl.col("rank").alias(RANK_COLUMN[table]))
    return pl.struct(fields).struct.json_encode()


def quarantine_events(events: pl.DataFrame, reason: pl.Expr | str) -> pl.DataFrame:
    """Event rows -> quarantine rows (table, reason, request_id, user_id, item_id, row)."""
    reason_expr = pl.lit(reason) if isinstance(reason, str) else reason
    parts = []
    for code, name in TABLE_NAMES.items():
        rows = events.filter(pl.col("table") == code)
        if rows.height:
            parts.append(
                rows.select(
                    pl.lit(name).alias("table"),
                    reason_expr.alias("reason"),
                    "request_id",
                    "user_id",
                    "item_id",
                    _row_json(rows, code).alias("row"),
                )
            )
    if not parts:
        return events.head(0).select(
            pl.lit("").alias("table"),
            pl.lit("").alias("reason"),
            "request_id",
            "user_id",
            "item_id",
            pl.lit("").alias("row"),
        )
    return pl.concat(parts)


def _null_reason() -> pl.Expr:
    return (
        pl.when(pl.col("user_id").is_null())
        .then(pl.lit(REASON_NULL_USER_ID))
        .when(pl.col("item_id").is_null())
        .then(pl.lit(REASON_NULL_ITEM_ID))
        .when(pl.col("request_id").is_null())
        .then(pl.lit(REASON_NULL_REQUEST_ID))
        .when(pl.col("ts_us").is_null())
        .then(pl.lit(REASON_NULL_TS))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def take_random(candidates: pl.DataFrame, k: int, *, source: str) -> pl.DataFrame:
    """A uniform sample of at most k distinct candidates per positive, without replacement.

    ``candidates``: pos_id, pos_key (uint64), item_idx, unique per (pos_id, item_idx).
    Returns pos_id, item_idx, order (0..k-1 within the positive, the draw order).
    Each candidate's key is a hash of (positive, source, item), so the k smallest keys are a
    uniform k-subset that does not depend on row order.
    """
    salted = combine(candidates["pos_key"].to_numpy(), _SALT_SOURCE[source])
    key_D = combine(salted, candidates["item_idx"].to_numpy().view(np.uint64))
    return (
        candidates.select("pos_id", "item_idx")
        .with_columns(pl.Series("key", key_D))
        .sort("pos_id", "key", "item_idx")
        .with_columns(pl.int_range(pl.len()).over("pos_id").alias("order"))
        .filter(pl.col("order") < k)
        .select("pos_id", "item_idx", pl.col("order").cast(pl.Int64))
    )


def _accepted_mass(
    needing: pl.DataFrame, exclusion: pl.DataFrame, sampler: UnexposedSampler
) -> pl.DataFrame:
    """Per user: the probability mass that may be drawn (1 - excluded mass), excluded items."""
    users = needing.select("user_id").unique()
    excluded = exclusion.join(users, on="user_id", how="semi")
    probabilities_I = sampler.probabilities()
    excluded = (
        excluded.with_columns(pl.Series("w", probabilities_I[excluded["item_idx"].to_numpy()]))
        .group_by("user_id")
        .agg(
            pl.col("w").sum().alias("excluded_mass"),
            pl.len().cast(pl.Int64).alias("excluded_items"),
        )
    )
    return users.join(excluded, on="user_id", how="left").select(
        "user_id",
        (1.0 - pl.col("excluded_mass").fill_null(0.0)).clip(0.0, 1.0).alias("accept_mass"),
        pl.col("excluded_items").fill_null(0),
    )


class UnexposedDraws(NamedTuple):
    drawn: pl.DataFrame  # pos_id, item_idx, order
    short: pl.DataFrame  # pos_id of positives whose user has too few eligible items
    num_exact: int  # positives drawn by the exact fallback


def sample_unexposed(
    needing: pl.DataFrame, exclusion: pl.DataFrame, sampler: UnexposedSampler
) -> UnexposedDraws:
    """Weighted draws without replacement from the catalog minus each user's exclusion set.

    ``needing``: pos_id, user_id, pos_key, need (> 0). ``exclusion``: user_id, item_idx.
    Draws are rejection sampling from the full table (a
    rejected excluded or repeated item is redrawn, which is sequential sampling from the
    renormalised eligible set); users with little eligible mass, and positives still short
    after a few rounds, get exact Efraimidis–Spirakis sampling over their eligible items.
    """
    num_items = sampler.num_items
    schema = {"pos_id": pl.Int64, "item_idx": pl.Int64, "order": pl.Int64}
    mass = _accepted_mass(needing, exclusion, sampler)
    needing = needing.join(mass, on="user_id", how="left")
    eligible = num_items - pl.col("excluded_items")
    short = needing.filter(pl.col("need") > eligible).select("pos_id")
    needing = needing.filter(pl.col("need") <= eligible)
    exact = needing.filter(pl.col("accept_mass") < MIN_ACCEPTANCE)
    remaining = needing.filter(pl.col("accept_mass") >= MIN_ACCEPTANCE)
    drawn_parts = [pl.DataFrame(schema=schema)]
    drawn_pairs = pl.DataFrame(schema={"pos_id": pl.Int64, "item_idx": pl.Int64})
    for round_index in range(MAX_REJECTION_ROUNDS):
        if remaining.height == 0:
            break
        need_P = remaining["need"].to_numpy()
        # Enough draws that one round usually suffices: need / acceptance, plus slack.
        draws_P = np.ceil(need_P / remaining["accept_mass"].to_numpy() * 1.5).astype(np.int64) + 4
        total = int(draws_P.sum())
        starts_P = np.cumsum(draws_P) - draws_P
        slot_D = np.arange(total, dtype=np.int64) - np.repeat(starts_P, draws_P)
        round_keys_P = combine(
            combine(remaining["pos_key"].to_numpy(), _SALT_SOURCE[UNEXPOSED]), round_index
        )
        key_D = combine(np.repeat(round_keys_P, draws_P), slot_D.view(np.uint64))
        draws = pl.DataFrame(
            {
                "pos_id": np.repeat(remaining["pos_id"].to_numpy(), draws_P),
                "user_id": remaining["user_id"].gather(np.repeat(np.arange(len(need_P)), draws_P)),
                "item_idx": sampler.draw(to_unit_interval(key_D)),
                "order": slot_D + round_index * (1 << 40),
            }
        )
        accepted = (
            draws.join(exclusion, on=["user_id", "item_idx"], how="anti")
            .join(drawn_pairs, on=["pos_id", "item_idx"], how="anti")
            .sort("pos_id", "order")
            .unique(subset=["pos_id", "item_idx"], keep="first", maintain_order=True)
            .join(remaining.select("pos_id", "need"), on="pos_id", maintain_order="left")
            .filter(pl.int_range(pl.len()).over("pos_id") < pl.col("need"))
            .select("pos_id", "item_idx", "order")
        )
        drawn_parts.append(accepted)
        drawn_pairs = pl.concat([drawn_pairs, accepted.select("pos_id", "item_idx")])
        got = accepted.group_by("pos_id").agg(pl.len().cast(pl.Int64).alias("got"))
        remaining = (
            remaining.join(got, on="pos_id", how="left")
            .with_columns((pl.col("need") - pl.col("got").fill_null(0)).alias("need"))
            .drop("got")
            .filter(pl.col("need") > 0)
        )
    exact = pl.concat([exact, remaining])
    if exact.height:
        drawn_parts.append(_sample_exact(exact, exclusion, drawn_pairs, sampler))
    drawn = pl.concat(drawn_parts).sort("pos_id", "order")
    return UnexposedDraws(drawn=drawn, short=short, num_exact=exact.height)


def _sample_exact(
    needing: pl.DataFrame,
    exclusion: pl.DataFrame,
    drawn_pairs: pl.DataFrame,
    sampler: UnexposedSampler,
) -> pl.DataFrame:
    """Efraimidis–Spirakis: the ``need`` largest log(u)/w over each positive's eligible items."""
    log_weights_I = np.log(sampler.weights_I)
    base_order = MAX_REJECTION_ROUNDS * (1 << 40)
    parts = []
    excluded_by_user = {
        user: group["item_idx"].to_numpy()
        for (user,), group in exclusion.join(
            needing.select("user_id").unique(), on="user_id", how="semi"
        ).group_by("user_id")
    }
    drawn_by_pos = {
        pos: group["item_idx"].to_numpy()
        for (pos,), group in drawn_pairs.join(
            needing.select("pos_id"), on="pos_id", how="semi"
        ).group_by("pos_id")
    }
    empty = np.zeros(0, dtype=np.int64)
    for row in needing.iter_rows(named=True):
        blocked = np.concatenate(
            [excluded_by_user.get(row["user_id"], empty), drawn_by_pos.get(row["pos_id"], empty)]
        )
        eligible = np.setdiff1d(np.arange(sampler.num_items, dtype=np.int64), blocked)
        salted = combine(np.uint64(row["pos_key"]), _SALT_EXACT)
        uniforms = to_unit_interval(combine(salted, eligible.view(np.uint64)))
        # log(u) / w: larger is better; u = 0 cannot occur for more than one item in practice.
        score = np.log(np.maximum(uniforms, 1e-300)) / np.exp(log_weights_I[eligible])
        chosen = eligible[np.argsort(-score, kind="stable")[: row["need"]]]
        parts.append(
            pl.DataFrame(
                {
                    "pos_id": np.full(len(chosen), row["pos_id"], dtype=np.int64),
                    "item_idx": chosen,
                    "order": base_order + np.arange(len(chosen), dtype=np.int64),
                }
            )
        )
    return pl.concat(parts)


def build_partition(
    events: pl.DataFrame, lookups: PartitionLookups, settings: PartitionSettings
) -> PartitionResult:
    """All in-window events of a set of users -> their Contract 2 rows (see module docstring)."""
    negatives = settings.negatives
    counts_by_source = negatives.counts()
    num_negatives = settings.num_negatives
    stats: dict[str, Any] = {
        "window_rows": {
            TABLE_NAMES[code]: int(n) for code, n in events.group_by("table").len().iter_rows()
        },
        "duplicate_clicks": 0,
        "unexposed_exact_positives": 0,
    }
    quarantine_parts = []

    reasons = events.with_columns(_null_reason().alias("reason"))
    bad = reasons.filter(pl.col("reason").is_not_null())
    if bad.height:
        quarantine_parts.append(quarantine_events(bad, pl.col("reason")))
    good = (
        reasons.filter(pl.col("reason").is_null())
        .drop("reason")
        .join(lookups.items, on="item_id", how="left")
    )
    not_in_catalog = good.filter(pl.col("item_idx").is_null())
    if not_in_catalog.height:
        quarantine_parts.append(quarantine_events(not_in_catalog, REASON_ITEM_NOT_IN_CATALOG))
    good = good.filter(pl.col("item_idx").is_not_null())
    # The exclusion rules use every row that says "this user met this item in the window",
    # also rows quarantined for a missing request id or (below) a missing impression.
    met = pl.concat(
        [
            good.select("table", "user_id", "item_idx"),
            reasons.filter(pl.col("reason") == REASON_NULL_REQUEST_ID)
            .join(lookups.items, on="item_id")
            .select("table", "user_id", "item_idx"),
        ]
    )
    clicked = (
        met.filter(pl.col("table") == TABLE_CODES[TABLE_CLICKS])
        .select("user_id", "item_idx")
        .unique()
    )
    exclusion = met.select("user_id", "item_idx").unique()

    clicks = good.filter(pl.col("table") == TABLE_CODES[TABLE_CLICKS])
    impressions = good.filter(pl.col("table") == TABLE_CODES[TABLE_IMPRESSIONS])
    retrievals = good.filter(pl.col("table") == TABLE_CODES[TABLE_RETRIEVALS])
    request_keys = ["user_id", "request_id", "item_idx"]
    impressed = impressions.select(request_keys).unique()

    if settings.require_click_impression:
        unmatched = clicks.join(impressed, on=request_keys, how="anti")
        if unmatched.height:
            quarantine_parts.append(quarantine_events(unmatched, REASON_CLICK_WITHOUT_IMPRESSION))
        clicks = clicks.join(impressed, on=request_keys, how="semi")

    positives = (
        clicks.group_by(request_keys)
        .agg(pl.col("ts_us").min(), pl.col("item_id").first())
        .sort("user_id", "ts_us", "request_id", "item_idx")
    )
    stats["duplicate_clicks"] = clicks.height - positives.height
    positives = positives.join(lookups.users, on="user_id", how="left", maintain_order="left")
    assert positives["user_idx"].null_count() == 0, "a user with a valid click is not in the vocab"

    eval_rows = (
        positives.filter(pl.col("ts_us") >= settings.split_us)
        .group_by("user_id", "item_idx")
        .agg(pl.col("ts_us").min(), pl.col("item_id").first(), pl.col("user_idx").first())
        .sort("user_id", "ts_us", "item_idx")
        .select("user_id", "item_id", "ts_us", "user_idx", "item_idx")
    )
    train_pos = positives.filter(pl.col("ts_us") < settings.split_us).with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("pos_id"),
        pl.int_range(pl.len(), dtype=pl.Int64).over("user_id").alias("ordinal"),
    )
    unique_users = train_pos["user_id"].unique(maintain_order=True)
    user_key_table = pl.DataFrame(
        {"user_id": unique_users, "user_key": user_keys(unique_users, settings.seed)}
    )
    train_pos = train_pos.join(user_key_table, on="user_id", maintain_order="left")
    train_pos = train_pos.with_columns(
        pl.Series(
            "pos_key",
            combine(
                train_pos["user_key"].to_numpy(), train_pos["ordinal"].to_numpy().view(np.uint64)
            ),
        )
    )

    pos_frame = train_pos.select("pos_id", "pos_key", "user_id", "request_id")
    picked: dict[str, pl.DataFrame] = {}
    if counts_by_source[EXPOSED_NOT_CLICKED] > 0 and impressed.height:
        candidates = pos_frame.join(impressed, on=["user_id", "request_id"]).join(
            clicked, on=["user_id", "item_idx"], how="anti"
        )
        picked[EXPOSED_NOT_CLICKED] = take_random(
            candidates, counts_by_source[EXPOSED_NOT_CLICKED], source=EXPOSED_NOT_CLICKED
        )
    if counts_by_source[RANKED_OUT] > 0 and retrievals.height:
        in_window = retrievals.filter(pl.col("rank") >= negatives.ranked_out_min_rank)
        if negatives.ranked_out_max_rank is not None:
            in_window = in_window.filter(pl.col("rank") <= negatives.ranked_out_max_rank)
        ranked = (
            in_window.select(request_keys).unique().join(impressed, on=request_keys, how="anti")
        )
        candidates = pos_frame.join(ranked, on=["user_id", "request_id"]).join(
            clicked, on=["user_id", "item_idx"], how="anti"
        )
        picked[RANKED_OUT] = take_random(
            candidates, counts_by_source[RANKED_OUT], source=RANKED_OUT
        )

    # Shortfall of each source is filled from unexposed: need = unexposed count + fills.
    need = train_pos.select("pos_id", "user_id", "pos_key")
    for source in (EXPOSED_NOT_CLICKED, RANKED_OUT):
        got = (
            picked[source].group_by("pos_id").agg(pl.len().cast(pl.Int64).alias("got"))
            if source in picked
            else pl.DataFrame(schema={"pos_id": pl.Int64, "got": pl.Int64})
        )
        need = (
            need.join(got, on="pos_id", how="left", maintain_order="left")
            .with_columns(
                (counts_by_source[source] - pl.col("got").fill_null(0)).alias(f"fill_{source}")
            )
            .drop("got")
        )
    need = need.with_columns(
        (
            counts_by_source[UNEXPOSED]
            + pl.col(f"fill_{EXPOSED_NOT_CLICKED}")
            + pl.col(f"fill_{RANKED_OUT}")
        ).alias("need")
    )

    needing = need.filter(pl.col("need") > 0)
    if needing.height:
        draws = sample_unexposed(
            needing.select("pos_id", "user_id", "pos_key", "need"), exclusion, lookups.sampler
        )
        picked[UNEXPOSED], short = draws.drawn, draws.short
        stats["unexposed_exact_positives"] = draws.num_exact
    else:
        short = pl.DataFrame(schema={"pos_id": pl.Int64})

    if short.height:
        short_rows = train_pos.join(short, on="pos_id", how="semi").with_columns(
            pl.lit(TABLE_CODES[TABLE_CLICKS], dtype=pl.Int8).alias("table"),
            pl.lit(None, dtype=pl.Int64).alias("rank"),
        )
        quarantine_parts.append(quarantine_events(short_rows, REASON_NOT_ENOUGH_NEGATIVES))
    kept = train_pos.join(short, on="pos_id", how="anti").sort("pos_id")
    kept_ids = kept.select("pos_id")

    negative_rows = pl.concat(
        [
            frame.join(kept_ids, on="pos_id", how="semi").with_columns(
                pl.lit(SOURCE_CODES[source], dtype=pl.Int8).alias("source")
            )
            for source, frame in picked.items()
        ]
        + [
            pl.DataFrame(
                schema={
                    "pos_id": pl.Int64,
                    "item_idx": pl.Int64,
                    "order": pl.Int64,
                    "source": pl.Int8,
                }
            )
        ]
    ).sort("pos_id", "source", "order")
    item_ids = lookups.items["item_id"]
    grouped = (
        negative_rows.with_columns(
            item_ids.gather(negative_rows["item_idx"]).alias("item_id"),
            pl.col("source")
            .replace_strict(
                {code: name for name, code in SOURCE_CODES.items()}, return_dtype=pl.String
            )
            .alias("source_name"),
        )
        .group_by("pos_id", maintain_order=True)
        .agg(
            pl.col("item_id").alias("neg_item_ids"),
            pl.col("source_name").alias("neg_sources"),
            pl.col("item_idx").alias("neg_item_idxs"),
        )
    )
    train = kept.join(grouped, on="pos_id", how="left", maintain_order="left").select(
        "user_id",
        "item_id",
        "ts_us",
        "request_id",
        pl.col("neg_item_ids").fill_null(pl.lit([], dtype=pl.List(item_ids.dtype))),
        pl.col("neg_sources").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        "user_idx",
        "item_idx",
        pl.col("neg_item_idxs").fill_null(pl.lit([], dtype=pl.List(pl.Int64))),
    )
    if train.height:
        lengths = train["neg_item_idxs"].list.len()
        assert (lengths == num_negatives).all(), "a train row has the wrong number of negatives"

    source_counts = negative_rows.group_by("source").len()
    stats["negatives_by_source"] = {source: 0 for source in NEGATIVE_SOURCES}
    for code, n in source_counts.iter_rows():
        stats["negatives_by_source"][NEGATIVE_SOURCES[code]] = int(n)
    kept_need = need.join(kept_ids, on="pos_id", how="semi")
    fill_totals = {
        source: int(kept_need[f"fill_{source}"].sum())
        for source in (EXPOSED_NOT_CLICKED, RANKED_OUT)
    }
    stats["fills"] = {"total": sum(fill_totals.values()), **fill_totals}
    stats["train_positives"] = train.height
    stats["eval_positives"] = eval_rows.height

    quarantine = (
        pl.concat(quarantine_parts)
        if quarantine_parts
        else quarantine_events(events.head(0), REASON_NULL_TS)
    )
    stats["quarantined_by_reason"] = {
        reason: int(n) for reason, n in quarantine.group_by("reason").len().iter_rows()
    }
    stats["quarantined_by_table"] = {
        table: int(n) for table, n in quarantine.group_by("table").len().iter_rows()
    }
    return PartitionResult(
        train=train,
        eval=eval_rows,
        quarantine=quarantine,
        user_counts=train.group_by("user_idx").agg(pl.len().cast(pl.Int64).alias("count")),
        item_counts=train.group_by("item_idx").agg(pl.len().cast(pl.Int64).alias("count")),
        stats=stats,
    )


def merge_stats(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Add one partition's (nested) counts into ``total``."""
    for key, value in part.items():
        if isinstance(value, dict):
            merge_stats(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def make_lookups(
    item_ids: pl.Series, user_ids: pl.Series, train_clicks_I: np.ndarray, *, alpha: float
) -> PartitionLookups:
    """Lookups from the vocab ids (each sorted, unique: row i has index i) and click counts."""
    assert len(train_clicks_I) == len(item_ids), "one click count per catalog item"
    items = pl.DataFrame(
        {"item_id": item_ids, "item_idx": np.arange(len(item_ids), dtype=np.int64)}
    )
    users = pl.DataFrame(
        {"user_id": user_ids, "user_idx": np.arange(len(user_ids), dtype=np.int64)}
    )
    return PartitionLookups(
        items=items,
        users=users,
        sampler=UnexposedSampler.from_counts(train_clicks_I, alpha=alpha),
    )
