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

Shapes: I catalog items, U users of a partition, P positives needing unexposed draws,
R those still drawing in a round, D draws, K draws kept.
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
    REASON_NULL_RANK,
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
    """Draws catalog item indices with probability ∝ weight in O(1) each (Walker's alias table).

    Built once on the driver from the train click counts and shared by every partition.
    """

    weights_I: np.ndarray  # float64 (count + 1)^alpha
    accept_I: np.ndarray  # float64: keep column i with this probability ...
    alias_I: np.ndarray  # int64: ... else take its alias

    @classmethod
    def from_counts(cls, counts_I: np.ndarray, *, alpha: float) -> UnexposedSampler:
        weights_I = np.power(np.asarray(counts_I, dtype=np.float64) + 1.0, alpha)
        accept_I, alias_I = _alias_table(weights_I)
        return cls(weights_I=weights_I, accept_I=accept_I, alias_I=alias_I)

    @property
    def num_items(self) -> int:
        return len(self.weights_I)

    def probabilities(self) -> np.ndarray:
        return self.weights_I / self.weights_I.sum()

    def draw(self, uniforms_D: np.ndarray) -> np.ndarray:
        """[D] uniforms in [0, 1) -> [D] int64 item indices.

        One uniform per draw: its integer part picks the column, its fraction the coin.
        """
        scaled_D = uniforms_D * self.num_items
        column_D = np.minimum(scaled_D.astype(np.int64), self.num_items - 1)
        coin_D = scaled_D - column_D
        return np.where(coin_D < self.accept_I[column_D], column_D, self.alias_I[column_D])


def _alias_table(weights_I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias method: column i holds item i with mass accept[i] and alias[i] with the rest."""
    num_items = len(weights_I)
    scaled = (weights_I * (num_items / weights_I.sum())).tolist()
    accept_I = np.ones(num_items, dtype=np.float64)
    alias_I = np.arange(num_items, dtype=np.int64)
    small = [i for i, p in enumerate(scaled) if p < 1.0]
    large = [i for i, p in enumerate(scaled) if p >= 1.0]
    while small and large:
        low, high = small.pop(), large.pop()
        accept_I[low], alias_I[low] = scaled[low], high
        scaled[high] -= 1.0 - scaled[low]
        (small if scaled[high] < 1.0 else large).append(high)
    return accept_I, alias_I


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
        .when((pl.col("table") == TABLE_CODES[TABLE_RETRIEVALS]) & pl.col("rank").is_null())
        .then(pl.lit(REASON_NULL_RANK))
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


def _is_member(values: np.ndarray, keys: pl.Series) -> np.ndarray:
    """[len(values)] bool: which values are in ``keys`` (a hash lookup)."""
    return pl.Series(values).is_in(keys.implode()).to_numpy()


class UnexposedDraws(NamedTuple):
    drawn: pl.DataFrame  # pos_id, item_idx, order
    short: pl.DataFrame  # pos_id of positives whose user has too few eligible items
    num_exact: int  # positives drawn by the exact fallback


def sample_unexposed(
    needing: pl.DataFrame, exclusion_keys: pl.Series, sampler: UnexposedSampler
) -> UnexposedDraws:
    """Weighted draws without replacement from the catalog minus each user's exclusion set.

    ``needing``: pos_id, user (an int code >= 0), pos_key (uint64), need (> 0).
    ``exclusion_keys``: ``user * I + item_idx`` of the items each user met.
    Draws are rejection sampling from the full table: a draw of an excluded or already drawn
    item is redrawn, which is sequential sampling from the renormalised eligible set. Users
    with little eligible mass, and positives still short after a few rounds, get exact
    Efraimidis–Spirakis sampling over their eligible items.
    """
    num_items = sampler.num_items
    exclusion_keys = exclusion_keys.cast(pl.Int64).unique().sort()
    exclusion_K = exclusion_keys.to_numpy()
    pos_P = needing["pos_id"].to_numpy().astype(np.int64)
    user_P = needing["user"].to_numpy().astype(np.int64)
    key_P = needing["pos_key"].to_numpy().astype(np.uint64)
    need_P = needing["need"].to_numpy().astype(np.int64)
    excluded_user = exclusion_K // num_items
    num_users = int(max(user_P.max(initial=-1), excluded_user.max(initial=-1))) + 1
    excluded_mass_U = np.bincount(
        excluded_user,
        weights=sampler.probabilities()[exclusion_K % num_items],
        minlength=num_users,
    )
    excluded_items_U = np.bincount(excluded_user, minlength=num_users)
    accept_P = np.clip(1.0 - excluded_mass_U[user_P], 0.0, 1.0)
    short_P = need_P > num_items - excluded_items_U[user_P]
    exact_P = ~short_P & (accept_P < MIN_ACCEPTANCE)

    drawn_pos, drawn_item, drawn_order = [], [], []
    drawn_pairs = [np.zeros(0, dtype=np.int64)]  # pos_id * I + item_idx of every drawn item
    rows = np.flatnonzero(~short_P & ~exact_P)  # positives still drawing, as rows of needing
    remaining = need_P[rows]
    for round_index in range(MAX_REJECTION_ROUNDS):
        if len(rows) == 0:
            break
        # Enough draws that one round usually suffices: need / acceptance, plus slack.
        draws_R = np.ceil(remaining / accept_P[rows] * 1.5).astype(np.int64) + 4
        owner_D = np.repeat(np.arange(len(rows)), draws_R)  # draws grouped by positive
        slot_D = np.arange(len(owner_D), dtype=np.int64) - np.repeat(
            np.cumsum(draws_R) - draws_R, draws_R
        )
        round_keys_R = combine(combine(key_P[rows], _SALT_SOURCE[UNEXPOSED]), round_index)
        item_D = sampler.draw(
            to_unit_interval(combine(round_keys_R[owner_D], slot_D.view(np.uint64)))
        )
        pos_D = pos_P[rows][owner_D]
        pair_D = pos_D * num_items + item_D
        ok_D = ~_is_member(user_P[rows][owner_D] * num_items + item_D, exclusion_keys)
        ok_D &= ~_is_member(pair_D, pl.Series(np.concatenate(drawn_pairs)))
        ok_index = np.flatnonzero(ok_D)
        # The first draw of each new item, in draw order (draws are grouped by positive).
        kept = ok_index[pl.Series(pair_D[ok_index]).is_first_distinct().to_numpy()]
        owner_K = owner_D[kept]
        starts_K = np.r_[True, owner_K[1:] != owner_K[:-1]]
        group_start_K = np.maximum.accumulate(np.where(starts_K, np.arange(len(kept)), 0))
        chosen = kept[np.arange(len(kept)) - group_start_K < remaining[owner_K]]
        drawn_pos.append(pos_D[chosen])
        drawn_item.append(item_D[chosen])
        drawn_order.append(slot_D[chosen] + round_index * (1 << 40))
        drawn_pairs.append(pair_D[chosen])
        remaining = remaining - np.bincount(owner_D[chosen], minlength=len(rows))
        rows, remaining = rows[remaining > 0], remaining[remaining > 0]

    exact_rows = np.concatenate([np.flatnonzero(exact_P), rows])
    pairs_sorted = np.sort(np.concatenate(drawn_pairs))
    exact_need = np.concatenate([need_P[exact_P], remaining])
    for row, need in zip(exact_rows.tolist(), exact_need.tolist()):
        # This user's excluded items and this positive's drawn ones: key ranges [x*I, (x+1)*I).
        lo, hi = np.searchsorted(
            exclusion_K, [user_P[row] * num_items, (user_P[row] + 1) * num_items]
        )
        pair_lo, pair_hi = np.searchsorted(
            pairs_sorted, [pos_P[row] * num_items, (pos_P[row] + 1) * num_items]
        )
        blocked = np.concatenate(
            [exclusion_K[lo:hi] % num_items, pairs_sorted[pair_lo:pair_hi] % num_items]
        )
        items = _sample_exact(key_P[row], need, blocked, sampler)
        drawn_pos.append(np.full(len(items), pos_P[row], dtype=np.int64))
        drawn_item.append(items)
        drawn_order.append(MAX_REJECTION_ROUNDS * (1 << 40) + np.arange(len(items), dtype=np.int64))
    drawn = pl.DataFrame(
        {
            "pos_id": np.concatenate([np.zeros(0, np.int64), *drawn_pos]),
            "item_idx": np.concatenate([np.zeros(0, np.int64), *drawn_item]),
            "order": np.concatenate([np.zeros(0, np.int64), *drawn_order]),
        }
    ).sort("pos_id", "order")
    short = pl.DataFrame({"pos_id": pos_P[short_P]})
    return UnexposedDraws(drawn=drawn, short=short, num_exact=len(exact_rows))


def _sample_exact(
    pos_key: np.uint64, need: int, blocked: np.ndarray, sampler: UnexposedSampler
) -> np.ndarray:
    """Efraimidis–Spirakis: the ``need`` eligible items with the largest log(u) / weight."""
    eligible = np.setdiff1d(np.arange(sampler.num_items, dtype=np.int64), blocked)
    salted = combine(np.uint64(pos_key), _SALT_EXACT)
    uniforms = to_unit_interval(combine(salted, eligible.view(np.uint64)))
    score = np.log(np.maximum(uniforms, 1e-300)) / sampler.weights_I[eligible]
    return eligible[np.argsort(-score, kind="stable")[:need]]


def build_partition(
    events: pl.DataFrame, lookups: PartitionLookups, settings: PartitionSettings
) -> PartitionResult:
    """All in-window events of a set of users -> their Contract 2 rows (see module docstring)."""
    negatives = settings.negatives
    counts_by_source = negatives.counts()
    num_negatives = settings.num_negatives
    num_items = lookups.items.height
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
    # Rows that say "this user met this item in the window": the good ones, and those only
    # missing a request id or a retrieval rank (they still count for the exclusion rules; a
    # null rank is never in a ranked_out window).
    usable = (
        reasons.filter(
            pl.col("reason").is_null()
            | pl.col("reason").is_in([REASON_NULL_REQUEST_ID, REASON_NULL_RANK])
        )
        .drop("reason")
        .join(lookups.items, on="item_id", how="left")
    )
    not_in_catalog = usable.filter(
        pl.col("item_idx").is_null() & pl.col("request_id").is_not_null()
    )
    if not_in_catalog.height:
        quarantine_parts.append(quarantine_events(not_in_catalog, REASON_ITEM_NOT_IN_CATALOG))
    # Dense per-partition codes turn (user, item) and (user, request) into single int keys.
    usable = usable.filter(pl.col("item_idx").is_not_null()).with_columns(
        pl.col("user_id").rank("dense").cast(pl.Int64).alias("user"),
        pl.col("request_id").rank("dense").cast(pl.Int64).alias("request"),
    )
    num_requests = int(usable["request"].max() or 0) + 1
    usable = usable.with_columns(
        (pl.col("user") * num_items + pl.col("item_idx")).alias("user_item"),
        (pl.col("user") * num_requests + pl.col("request")).alias("user_request"),
    )
    is_click = pl.col("table") == TABLE_CODES[TABLE_CLICKS]
    clicked = usable.filter(is_click)["user_item"].unique()
    exclusion_keys = usable["user_item"].unique()

    good = usable.filter(pl.col("request_id").is_not_null())
    clicks = good.filter(is_click)
    impressions = good.filter(pl.col("table") == TABLE_CODES[TABLE_IMPRESSIONS])
    retrievals = good.filter(pl.col("table") == TABLE_CODES[TABLE_RETRIEVALS])
    request_item = ["user_request", "item_idx"]
    impressed = impressions.select(*request_item, "user_item").unique(subset=request_item)

    if settings.require_click_impression:
        unmatched = clicks.join(impressed, on=request_item, how="anti")
        if unmatched.height:
            quarantine_parts.append(quarantine_events(unmatched, REASON_CLICK_WITHOUT_IMPRESSION))
        clicks = clicks.join(impressed, on=request_item, how="semi")

    positives = (
        clicks.group_by(request_item)
        .agg(pl.all().sort_by("ts_us").first())
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

    pos_frame = train_pos.select("pos_id", "pos_key", "user_request")
    not_clicked = ~pl.col("user_item").is_in(clicked.implode())
    picked: dict[str, pl.DataFrame] = {}
    if counts_by_source[EXPOSED_NOT_CLICKED] > 0 and impressed.height:
        candidates = pos_frame.join(impressed, on="user_request").filter(not_clicked)
        picked[EXPOSED_NOT_CLICKED] = take_random(
            candidates, counts_by_source[EXPOSED_NOT_CLICKED], source=EXPOSED_NOT_CLICKED
        )
    if counts_by_source[RANKED_OUT] > 0 and retrievals.height:
        in_window = retrievals.filter(pl.col("rank") >= negatives.ranked_out_min_rank)
        if negatives.ranked_out_max_rank is not None:
            in_window = in_window.filter(pl.col("rank") <= negatives.ranked_out_max_rank)
        ranked = (
            in_window.select(*request_item, "user_item")
            .unique(subset=request_item)
            .join(impressed, on=request_item, how="anti")
        )
        candidates = pos_frame.join(ranked, on="user_request").filter(not_clicked)
        picked[RANKED_OUT] = take_random(
            candidates, counts_by_source[RANKED_OUT], source=RANKED_OUT
        )

    # Shortfall of each source is filled from unexposed: need = unexposed count + fills.
    need = train_pos.select("pos_id", "user", "pos_key")
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
            needing.select("pos_id", "user", "pos_key", "need"), exclusion_keys, lookups.sampler
        )
        picked[UNEXPOSED], short = draws.drawn, draws.short
        stats["unexposed_exact_positives"] = draws.num_exact
    else:
        short = pl.DataFrame(schema={"pos_id": pl.Int64})

    if short.height:
        short_rows = train_pos.join(short, on="pos_id", how="semi")
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
