"""A synthetic recommender world with planted structure, written as Contract 1 raw logs.

The world is a latent-factor model whose factors are tied to the features a two-tower model
sees, so that what it learns can be checked against the truth:

- item vector = category centroid + its tag vectors (tags lean towards the category's) +
  price direction × standardised log price + brand vector + item-specific noise;
- item bias = a Zipf-like popularity term (standardised log of 1 / a random popularity rank);
- user vector = country centroid + age-bucket centroid + user-specific noise;
- true affinity(u, i) = dot(user_vector[u], item_vector[i]) + item_bias[i]   (``oracle_scores``).

Features carry most of the signal (the centroids, ``ITEM_PARTS`` / ``USER_PARTS``); ids carry
the rest (the noise terms), so a model needs both to approach the oracle.

Each day every user makes Poisson(activity) requests. For each request:

1. retrieval returns R candidates: the user's top-P items by true affinity (P = pool_factor × R,
   a stand-in for a decent production retriever) plus E popularity-sampled "trending" items,
   scored by true affinity + N(0, retrieval_noise²); the top R are kept, ranked 0..R-1;
2. the ranker rescores the R candidates with true affinity + N(0, ranker_noise²) (sharper than
   retrieval, still imperfect) and shows the top S at positions 0..S-1;
3. each shown item is clicked with probability
   sigmoid(affinity + click_offset) × position_bias[position],
   position_bias[k] = 1 / (1 + k) ** position_bias_exponent.

The planted vectors are written to ``OUT/_oracle`` so that ranking the whole catalog by true
affinity gives the ceiling on Recall@K. Randomness comes from ``numpy.random.Generator``s
seeded from ``(seed, stream)``, one stream per day, so the same spec writes identical Parquet.

Shapes: U users, I items, D latent dim, C categories, T tags, N requests in a day,
P retrieval pool per user, E popularity-sampled candidates per request, R candidates, S shown.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from pipelines import io

ID_TYPES: tuple[str, ...] = ("int", "string")
LOG_TABLES: tuple[str, ...] = ("clicks", "impressions", "retrievals")
FEATURE_TABLES: tuple[str, ...] = ("items", "users")
ORACLE_DIR = "_oracle"
AGE_BUCKETS: tuple[str, ...] = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
AGE_BUCKET_SHARES: tuple[float, ...] = (0.18, 0.27, 0.22, 0.16, 0.11, 0.06)
COUNTRIES: tuple[str, ...] = (
    "US", "GB", "DE", "FR", "BR", "IN", "JP", "ES", "IT", "CA", "MX", "NL",
    "SE", "PL", "AU", "KR", "TR", "AR", "ZA", "NG", "ID", "EG", "VN", "CH",
)  # fmt: skip

# Share of each part in the expected squared norm of a latent vector before the final scaling.
# The feature parts are what a model can learn from features alone; the rest needs ids.
ITEM_PARTS = {"category": 0.40, "tags": 0.25, "price": 0.10, "brand": 0.10, "noise": 0.15}
USER_PARTS = {"country": 0.35, "age_bucket": 0.35, "noise": 0.30}

# Requests start in [0, 86400 - 600) s of their day and clicks follow within 600 s, so every row
# lands in its request's day partition.
MAX_CLICK_DELAY_S = 600.0
_SECONDS_PER_DAY = 86_400
_US = 1_000_000
TS_TYPE = pa.timestamp("us", tz="UTC")

# Seed streams: (seed, stream, day) keeps each day's draws independent of the others.
_STREAM_WORLD = 0
_STREAM_DAY = 1
# Requests per retrieval block: bounds the block's (requests × pool) arrays to ~100 MB.
_REQUEST_BLOCK = 16_384


@dataclass(frozen=True)
class WorldSpec:
    """Everything that determines a synthetic world; the same spec writes the same files."""

    users: int = 2000
    items: int = 1000
    days: int = 7
    seed: int = 0
    id_type: str = "int"
    start_date: str = "2026-11-01"
    latent_dim: int = 8
    num_categories: int = 20
    num_tags: int = 60
    # Tags an item draws from its category's home set (the rest are uniform over all tags).
    tags_per_category: int = 6
    home_tag_share: float = 0.7
    num_countries: int = 12
    # Mean requests per user per day; each user's rate is this × Gamma(2, 1/2) (mean 1).
    requests_per_user_per_day: float = 2.0
    candidates_per_request: int = 50  # R
    shown_per_request: int = 10  # S
    # Each user's retrieval pool is their top pool_factor × R items by true affinity.
    pool_factor: int = 4
    popular_candidates_per_request: int = 10  # E
    # Std of u·v over random (user, item) pairs after scaling.
    affinity_std: float = 1.5
    # Item bias = popularity_strength × standardised log(1 / popularity rank).
    popularity_strength: float = 0.4
    retrieval_noise: float = 3.0
    ranker_noise: float = 2.5
    click_offset: float = -3.5
    position_bias_exponent: float = 0.7

    def validate(self) -> None:
        """Raise ValueError naming the field when the spec cannot produce a world."""
        positive = ("users", "items", "days", "latent_dim", "num_categories", "num_tags",
                    "tags_per_category", "num_countries", "candidates_per_request",
                    "shown_per_request", "pool_factor")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"WorldSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.id_type not in ID_TYPES:
            raise ValueError(f"WorldSpec.id_type must be one of {ID_TYPES}, got {self.id_type!r}")
        try:
            date.fromisoformat(self.start_date)
        except ValueError as error:
            raise ValueError(
                f"WorldSpec.start_date must be YYYY-MM-DD, got {self.start_date!r}"
            ) from error
        if self.shown_per_request > self.candidates_per_request:
            raise ValueError(
                f"WorldSpec.shown_per_request ({self.shown_per_request}) must be <= "
                f"candidates_per_request ({self.candidates_per_request})"
            )
        if self.candidates_per_request > self.items:
            raise ValueError(
                f"WorldSpec.candidates_per_request ({self.candidates_per_request}) must be <= "
                f"items ({self.items})"
            )
        if self.tags_per_category > self.num_tags:
            raise ValueError(
                f"WorldSpec.tags_per_category ({self.tags_per_category}) must be <= "
                f"num_tags ({self.num_tags})"
            )
        if self.num_countries > len(COUNTRIES):
            raise ValueError(
                f"WorldSpec.num_countries must be <= {len(COUNTRIES)}, got {self.num_countries}"
            )
        non_negative = ("requests_per_user_per_day", "popular_candidates_per_request",
                        "retrieval_noise", "ranker_noise", "popularity_strength",
                        "position_bias_exponent")  # fmt: skip
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"WorldSpec.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.home_tag_share <= 1.0:
            raise ValueError(
                f"WorldSpec.home_tag_share must be in [0, 1], got {self.home_tag_share}"
            )
        if self.affinity_std <= 0:
            raise ValueError(f"WorldSpec.affinity_std must be > 0, got {self.affinity_std}")

    @property
    def pool_size(self) -> int:
        return min(self.items, self.pool_factor * self.candidates_per_request)

    def dates(self) -> list[str]:
        first = date.fromisoformat(self.start_date)
        return [(first + timedelta(days=d)).isoformat() for d in range(self.days)]

    def position_bias(self) -> np.ndarray:
        """position_bias_S: examination probability of each shown position."""
        positions = np.arange(self.shown_per_request, dtype=np.float64)
        return 1.0 / (1.0 + positions) ** self.position_bias_exponent


@dataclass(frozen=True, eq=False)
class World:
    """The planted truth and the feature tables of one spec (no logs yet)."""

    spec: WorldSpec
    user_ids: pa.Array  # [U] int64 or string
    item_ids: pa.Array  # [I]
    users: pa.Table  # user_id, country, age_bucket
    items: pa.Table  # item_id, category, tags, price, brand
    user_vectors_UD: np.ndarray  # float32
    item_vectors_ID: np.ndarray  # float32
    item_bias_I: np.ndarray  # float32
    # The feature-determined parts of the vectors (already scaled like the vectors).
    user_feature_vectors_UD: np.ndarray
    item_feature_vectors_ID: np.ndarray
    user_country_U: np.ndarray  # index into COUNTRIES
    item_category_I: np.ndarray  # index into the category names
    user_activity_U: np.ndarray  # mean requests per day
    popularity_I: np.ndarray  # float64, sums to 1: sampling weights of "trending" candidates
    pool_items_UP: np.ndarray  # int32: each user's top-P items by true affinity, by item index
    pool_affinity_UP: np.ndarray  # float32: their true affinity
    # [U * P] int64 user * I + item, sorted: membership in a pool is one searchsorted.
    pool_keys: np.ndarray


class Oracle(NamedTuple):
    """The planted vectors as written to ``_oracle/`` (ids in file order)."""

    user_ids: np.ndarray
    user_vectors: np.ndarray  # [U, D] float32
    item_ids: np.ndarray
    item_vectors: np.ndarray  # [I, D] float32
    item_bias: np.ndarray  # [I] float32


@dataclass(frozen=True)
class GeneratedWorld:
    """What ``generate_world`` wrote: row counts per table and where."""

    out_dir: str
    spec: WorldSpec
    rows: dict[str, int]
    paths: dict[str, str]
    dates: list[str]
    seconds: float
    active_user_days: int = 0
    clicks_per_position: list[int] = field(default_factory=list)

    @property
    def ctr(self) -> float:
        return self.rows["clicks"] / max(1, self.rows["impressions"])

    @property
    def clicks_per_user(self) -> float:
        return self.rows["clicks"] / max(1, self.rows["users"])

    @property
    def clicks_per_active_user_day(self) -> float:
        return self.rows["clicks"] / max(1, self.active_user_days)


# ---------------------------------------------------------------------------------------------
# Oracle helpers


def oracle_scores(user_UD: np.ndarray, item_ID: np.ndarray, item_bias_I: np.ndarray) -> np.ndarray:
    """scores_UI = user_UD @ item_ID.T + item_bias_I: the true affinity that drives clicks."""
    return user_UD @ item_ID.T + item_bias_I[None, :]


def oracle_top_k(
    user_UD: np.ndarray,
    item_ID: np.ndarray,
    item_bias_I: np.ndarray,
    k: int,
    *,
    batch_size: int = 1024,
) -> np.ndarray:
    """top_UK: item indices of each user's k highest true affinities, best first.

    Scored in user batches so memory stays at batch_size × I.
    """
    k = min(k, item_ID.shape[0])
    top_UK = np.empty((user_UD.shape[0], k), dtype=np.int64)
    for start in range(0, user_UD.shape[0], batch_size):
        scores_BI = oracle_scores(user_UD[start : start + batch_size], item_ID, item_bias_I)
        top_UK[start : start + batch_size] = _top_k_sorted(scores_BI, k)
    return top_UK


def _top_k_sorted(scores_BX: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest entries per row, best first."""
    part_BK = np.argpartition(-scores_BX, k - 1, axis=1)[:, :k]
    order_BK = np.argsort(-np.take_along_axis(scores_BX, part_BK, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part_BK, order_BK, axis=1)


def load_oracle(logs_dir: str) -> Oracle:
    """Read ``logs_dir/_oracle`` as written by ``generate_world``."""
    users = io.read_table(io.join(logs_dir, ORACLE_DIR, "user_vectors.parquet"))
    items = io.read_table(io.join(logs_dir, ORACLE_DIR, "item_vectors.parquet"))
    return Oracle(
        user_ids=users.column("user_id").to_numpy(),
        user_vectors=_list_column_to_matrix(users.column("vector")),
        item_ids=items.column("item_id").to_numpy(),
        item_vectors=_list_column_to_matrix(items.column("vector")),
        item_bias=items.column("bias").to_numpy().astype(np.float32),
    )


def _list_column_to_matrix(column: pa.ChunkedArray) -> np.ndarray:
    values = pc.list_flatten(column).to_numpy().astype(np.float32)
    return values.reshape(len(column), -1) if len(column) else values.reshape(0, 0)


# ---------------------------------------------------------------------------------------------
# The world: ids, feature tables, planted vectors


def make_ids(count: int, *, kind: str, id_type: str) -> pa.Array:
    """Ids for ``count`` users (kind "user") or items (kind "item").

    String ids are zero-padded ordinals ("u000123", "i000045"). Int ids are scattered,
    distinct int64s (an odd multiplier is a bijection mod 2**31) so that nothing downstream
    can get away with treating an id as a dense index.
    """
    if kind not in ("user", "item") or id_type not in ID_TYPES:
        raise ValueError(f"make_ids: kind must be user/item and id_type one of {ID_TYPES}")
    index = np.arange(count, dtype=np.int64)
    if id_type == "string":
        width = max(6, len(str(max(count - 1, 0))))
        digits = pc.utf8_lpad(pa.array(index).cast(pa.string()), width=width, padding="0")
        return pc.binary_join_element_wise(kind[0], digits, "")
    multiplier, offset = (2_654_435_761, 7) if kind == "user" else (2_246_822_519, 12_345)
    return pa.array((index * multiplier + offset) % (1 << 31), type=pa.int64())


def make_world(spec: WorldSpec) -> World:
    """Feature tables, planted vectors and each user's retrieval pool (no logs)."""
    spec.validate()
    rng = np.random.default_rng([spec.seed, _STREAM_WORLD])
    dim = spec.latent_dim

    def base_vectors(count: int) -> np.ndarray:
        # E|x|² = 1, so a part's share of the squared norm is its weight.
        return rng.standard_normal((count, dim)) / np.sqrt(dim)

    # Items: category → home tags, brand, log price; latent = weighted sum of the parts.
    category_names = [f"cat{c:02d}" for c in range(spec.num_categories)]
    category_centroids_CD = base_vectors(spec.num_categories)
    category_log_price_C = rng.normal(3.5, 0.8, spec.num_categories)
    tag_names = [f"tag{t:03d}" for t in range(spec.num_tags)]
    tag_vectors_TD = base_vectors(spec.num_tags)
    home_tags_CH = np.stack(
        [rng.choice(spec.num_tags, spec.tags_per_category, replace=False)
         for _ in range(spec.num_categories)]
    )  # fmt: skip
    brands_per_category = max(2, spec.items // (25 * spec.num_categories))
    brand_vectors_BD = base_vectors(spec.num_categories * brands_per_category)
    price_direction_D = base_vectors(1)[0]
    price_direction_D /= np.linalg.norm(price_direction_D)

    # Category sizes are uneven, as in any real catalog.
    category_share_C = rng.dirichlet(np.full(spec.num_categories, 2.0))
    item_category_I = rng.choice(spec.num_categories, spec.items, p=category_share_C)
    tag_lists, tag_part_ID = _draw_tags(spec, rng, item_category_I, home_tags_CH, tag_vectors_TD)
    brand_I = item_category_I * brands_per_category + rng.integers(
        0, brands_per_category, spec.items
    )
    log_price_I = category_log_price_C[item_category_I] + rng.normal(0.0, 0.5, spec.items)
    price_z_I = (log_price_I - log_price_I.mean()) / max(log_price_I.std(), 1e-9)
    item_noise_ID = base_vectors(spec.items)

    item_feature_ID = (
        np.sqrt(ITEM_PARTS["category"]) * category_centroids_CD[item_category_I]
        + np.sqrt(ITEM_PARTS["tags"]) * tag_part_ID
        + np.sqrt(ITEM_PARTS["price"]) * price_z_I[:, None] * price_direction_D[None, :]
        + np.sqrt(ITEM_PARTS["brand"]) * brand_vectors_BD[brand_I]
    )
    item_vectors_ID = item_feature_ID + np.sqrt(ITEM_PARTS["noise"]) * item_noise_ID

    # Zipf-like popularity: a random rank per item, bias ∝ standardised log(1 / rank).
    popularity_rank_I = rng.permutation(spec.items) + 1
    log_inverse_rank_I = -np.log(popularity_rank_I)
    item_bias_I = spec.popularity_strength * (
        (log_inverse_rank_I - log_inverse_rank_I.mean()) / max(log_inverse_rank_I.std(), 1e-9)
    )

    # Users: skewed country mix, fixed age mix; latent = country + age + personal noise.
    country_share_K = 1.0 / np.arange(1, spec.num_countries + 1) ** 0.8
    country_share_K /= country_share_K.sum()
    user_country_U = rng.choice(spec.num_countries, spec.users, p=country_share_K)
    user_age_U = rng.choice(len(AGE_BUCKETS), spec.users, p=np.array(AGE_BUCKET_SHARES))
    country_centroids_KD = base_vectors(spec.num_countries)
    age_centroids_AD = base_vectors(len(AGE_BUCKETS))
    user_feature_UD = (
        np.sqrt(USER_PARTS["country"]) * country_centroids_KD[user_country_U]
        + np.sqrt(USER_PARTS["age_bucket"]) * age_centroids_AD[user_age_U]
    )
    user_vectors_UD = user_feature_UD + np.sqrt(USER_PARTS["noise"]) * base_vectors(spec.users)
    user_activity_U = spec.requests_per_user_per_day * rng.gamma(2.0, 0.5, spec.users)

    # Scale both sides so u·v over (user, item) pairs has std affinity_std; deterministic
    # (a fixed corner of the matrix), so no draw depends on the scale.
    sample = user_vectors_UD[:512] @ item_vectors_ID[:2048].T
    scale = np.sqrt(spec.affinity_std / max(sample.std(), 1e-9))
    user_vectors_UD = (user_vectors_UD * scale).astype(np.float32)
    item_vectors_ID = (item_vectors_ID * scale).astype(np.float32)
    item_bias_I = item_bias_I.astype(np.float32)

    popularity_I = np.exp(item_bias_I.astype(np.float64))
    popularity_I /= popularity_I.sum()
    pool_items_UP, pool_affinity_UP = _retrieval_pools(
        user_vectors_UD, item_vectors_ID, item_bias_I, spec.pool_size
    )

    user_ids = make_ids(spec.users, kind="user", id_type=spec.id_type)
    item_ids = make_ids(spec.items, kind="item", id_type=spec.id_type)
    items = pa.table(
        {
            "item_id": item_ids,
            "category": pa.array(category_names, pa.string()).take(pa.array(item_category_I)),
            "tags": _tag_list_array(tag_lists, tag_names),
            "price": pa.array(np.round(np.exp(log_price_I), 2), pa.float64()),
            "brand": pa.array(
                [f"brand{b:04d}" for b in range(len(brand_vectors_BD))], pa.string()
            ).take(pa.array(brand_I)),
        }
    )
    users = pa.table(
        {
            "user_id": user_ids,
            "country": pa.array(COUNTRIES[: spec.num_countries], pa.string()).take(
                pa.array(user_country_U)
            ),
            "age_bucket": pa.array(AGE_BUCKETS, pa.string()).take(pa.array(user_age_U)),
        }
    )
    return World(
        spec=spec,
        user_ids=user_ids,
        item_ids=item_ids,
        users=users,
        items=items,
        user_vectors_UD=user_vectors_UD,
        item_vectors_ID=item_vectors_ID,
        item_bias_I=item_bias_I,
        user_feature_vectors_UD=(user_feature_UD * scale).astype(np.float32),
        item_feature_vectors_ID=(item_feature_ID * scale).astype(np.float32),
        user_country_U=user_country_U,
        item_category_I=item_category_I,
        user_activity_U=user_activity_U,
        popularity_I=popularity_I,
        pool_items_UP=pool_items_UP,
        pool_affinity_UP=pool_affinity_UP,
        # Rows are sorted by item and users are in order, so the keys come out sorted.
        pool_keys=(
            np.arange(spec.users, dtype=np.int64)[:, None] * spec.items + pool_items_UP
        ).ravel(),
    )


def _draw_tags(
    spec: WorldSpec,
    rng: np.random.Generator,
    item_category_I: np.ndarray,
    home_tags_CH: np.ndarray,
    tag_vectors_TD: np.ndarray,
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """1–4 distinct tags per item, mostly from its category's home set.

    Returns ((offsets [I + 1], tag indices), tag_part_ID: each item's tag vectors summed and
    divided by sqrt(count), so its expected squared norm is 1 whatever the count).
    """
    max_tags = 4
    wanted_I = 1 + rng.binomial(max_tags - 1, 0.4, spec.items)
    home_pick_IM = home_tags_CH[
        item_category_I[:, None], rng.integers(0, spec.tags_per_category, (spec.items, max_tags))
    ]
    any_tag_IM = rng.integers(0, spec.num_tags, (spec.items, max_tags))
    drawn_IM = np.where(rng.random((spec.items, max_tags)) < spec.home_tag_share,
                        home_pick_IM, any_tag_IM)  # fmt: skip
    drawn_IM.sort(axis=1)
    distinct_IM = np.ones_like(drawn_IM, dtype=bool)
    distinct_IM[:, 1:] = drawn_IM[:, 1:] != drawn_IM[:, :-1]
    # Keep the first `wanted` distinct tags (the first column is always distinct, so ≥ 1 tag).
    keep_IM = distinct_IM & (np.cumsum(distinct_IM, axis=1) <= wanted_I[:, None])
    counts_I = keep_IM.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts_I)]).astype(np.int32)
    tags = drawn_IM[keep_IM]
    tag_sum_ID = np.zeros((spec.items, tag_vectors_TD.shape[1]))
    np.add.at(tag_sum_ID, np.repeat(np.arange(spec.items), counts_I), tag_vectors_TD[tags])
    return (offsets, tags), tag_sum_ID / np.sqrt(counts_I)[:, None]


def _tag_list_array(tag_lists: tuple[np.ndarray, np.ndarray], tag_names: list[str]) -> pa.Array:
    offsets, tags = tag_lists
    values = pa.array(tag_names, pa.string()).take(pa.array(tags))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _retrieval_pools(
    user_UD: np.ndarray, item_ID: np.ndarray, item_bias_I: np.ndarray, pool_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's top pool_size items by true affinity, sorted by item index, and their affinity.

    Rows are sorted by item so that membership can be tested with one ``searchsorted``.
    """
    num_users = user_UD.shape[0]
    pool_UP = np.empty((num_users, pool_size), dtype=np.int32)
    affinity_UP = np.empty((num_users, pool_size), dtype=np.float32)
    # ~16M scores per batch bounds memory at any catalog size.
    batch = max(1, (1 << 24) // max(1, item_ID.shape[0]))
    for start in range(0, num_users, batch):
        scores_BI = oracle_scores(user_UD[start : start + batch], item_ID, item_bias_I)
        if pool_size < scores_BI.shape[1]:
            top_BP = np.sort(np.argpartition(scores_BI, -pool_size, axis=1)[:, -pool_size:], axis=1)
        else:
            top_BP = np.broadcast_to(np.arange(pool_size), scores_BI.shape)
        pool_UP[start : start + batch] = top_BP
        affinity_UP[start : start + batch] = np.take_along_axis(scores_BI, top_BP, axis=1)
    return pool_UP, affinity_UP


# ---------------------------------------------------------------------------------------------
# One day of logs


def simulate_day(world: World, day_index: int) -> dict[str, pa.Table]:
    """The clicks, impressions and retrievals of day ``day_index`` (0-based), in time order.

    Draws come from the generator seeded by (seed, day), so a day does not depend on the
    others and a rerun is identical.
    """
    spec = world.spec
    rng = np.random.default_rng([spec.seed, _STREAM_DAY, day_index])
    num_r, num_s = spec.candidates_per_request, spec.shown_per_request
    day_start = datetime.fromisoformat(spec.dates()[day_index]).replace(tzinfo=UTC)
    day_start_us = int(day_start.timestamp()) * _US

    # Requests: Poisson per user, uniform times, ordered by time.
    per_user_U = rng.poisson(world.user_activity_U)
    user_N = np.repeat(np.arange(spec.users, dtype=np.int64), per_user_U)
    offset_us_N = rng.integers(0, int((_SECONDS_PER_DAY - MAX_CLICK_DELAY_S) * _US), len(user_N))
    order = np.argsort(offset_us_N, kind="stable")
    user_N, ts_us_N = user_N[order], day_start_us + offset_us_N[order]
    num_requests = len(user_N)

    # Retrieval in request blocks: the pool × request arrays are the largest of the day.
    candidates_NR = np.empty((num_requests, num_r), dtype=np.int64)
    affinity_NR = np.empty((num_requests, num_r), dtype=np.float32)
    for start in range(0, num_requests, _REQUEST_BLOCK):
        block = slice(start, start + _REQUEST_BLOCK)
        candidates_NR[block], affinity_NR[block] = _retrieve(world, user_N[block], rng)

    # Ranker: sharper noisy affinity, top S shown in score order.
    ranker_score_NR = affinity_NR + spec.ranker_noise * rng.standard_normal(
        affinity_NR.shape, dtype=np.float32
    )
    shown_NS = _top_k_sorted(ranker_score_NR, num_s)
    shown_items_NS = np.take_along_axis(candidates_NR, shown_NS, axis=1)
    shown_affinity_NS = np.take_along_axis(affinity_NR, shown_NS, axis=1)

    # Clicks: relevance × examination.
    click_probability_NS = _sigmoid(shown_affinity_NS + spec.click_offset) * spec.position_bias()
    clicked_NS = rng.random(click_probability_NS.shape) < click_probability_NS
    click_request, click_position = np.nonzero(clicked_NS)
    delay_s = np.minimum(1.0 + rng.exponential(20.0, len(click_request)), MAX_CLICK_DELAY_S - 1)
    dwell_s = np.exp(
        rng.normal(3.0 + 0.3 * np.tanh(shown_affinity_NS[click_request, click_position]), 0.6)
    )
    click_ts_us = ts_us_N[click_request] + (delay_s * _US).astype(np.int64)
    by_time = np.argsort(click_ts_us, kind="stable")
    click_request, click_position = click_request[by_time], click_position[by_time]
    click_ts_us, dwell_s = click_ts_us[by_time], dwell_s[by_time]

    request_ids = _request_ids(spec.dates()[day_index], num_requests)
    retrieval_rows = np.repeat(np.arange(num_requests), num_r)
    impression_rows = np.repeat(np.arange(num_requests), num_s)
    retrievals = pa.table(
        {
            **_id_columns(world, request_ids, retrieval_rows, user_N, candidates_NR.ravel()),
            "retrieval_rank": pa.array(np.tile(np.arange(num_r, dtype=np.int32), num_requests)),
            "ts": pa.array(ts_us_N[retrieval_rows], TS_TYPE),
        }
    )
    impressions = pa.table(
        {
            **_id_columns(world, request_ids, impression_rows, user_N, shown_items_NS.ravel()),
            "position": pa.array(np.tile(np.arange(num_s, dtype=np.int32), num_requests)),
            "ts": pa.array(ts_us_N[impression_rows], TS_TYPE),
        }
    )
    clicks = pa.table(
        {
            **_id_columns(
                world,
                request_ids,
                click_request,
                user_N,
                shown_items_NS[click_request, click_position],
            ),
            "ts": pa.array(click_ts_us, TS_TYPE),
            "dwell_s": pa.array(np.round(dwell_s, 2), pa.float64()),
        }
    )
    return {"clicks": clicks, "impressions": impressions, "retrievals": retrievals}


def _retrieve(
    world: World, user_N: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """candidates_NR (item indices, best first) and their true affinity_NR for N requests.

    Candidates are the user's pool plus E popularity samples, scored by true affinity plus
    retrieval noise; a sample that repeats a pool item or an earlier sample is never kept.
    """
    spec = world.spec
    num_popular = spec.popular_candidates_per_request
    candidates_NX = world.pool_items_UP[user_N].astype(np.int64)
    affinity_NX = world.pool_affinity_UP[user_N]
    if num_popular > 0:
        popular_NE = rng.choice(spec.items, (len(user_N), num_popular), p=world.popularity_I)
        user_vectors_ND = world.user_vectors_UD[user_N]
        popular_affinity_NE = (
            np.einsum("ned,nd->ne", world.item_vectors_ID[popular_NE], user_vectors_ND)
            + world.item_bias_I[popular_NE]
        )
        candidates_NX = np.concatenate([candidates_NX, popular_NE], axis=1)
        affinity_NX = np.concatenate([affinity_NX, popular_affinity_NE], axis=1)
    score_NX = affinity_NX + spec.retrieval_noise * rng.standard_normal(
        affinity_NX.shape, dtype=np.float32
    )
    if num_popular > 0:
        score_NX[:, -num_popular:][_popular_repeats(world, user_N, popular_NE)] = -np.inf
    # Pool items are distinct and P >= R, so the top R never includes a masked repeat.
    top_NR = _top_k_sorted(score_NX, spec.candidates_per_request)
    return (
        np.take_along_axis(candidates_NX, top_NR, axis=1),
        np.take_along_axis(affinity_NX, top_NR, axis=1),
    )


def _popular_repeats(world: World, user_N: np.ndarray, popular_NE: np.ndarray) -> np.ndarray:
    """True where a popularity sample is in the user's pool or repeats an earlier sample."""
    pool_keys = world.pool_keys
    keys_NE = user_N[:, None] * world.spec.items + popular_NE
    found_NE = np.minimum(np.searchsorted(pool_keys, keys_NE), len(pool_keys) - 1)
    repeat_NE = pool_keys[found_NE] == keys_NE
    for column in range(1, popular_NE.shape[1]):
        earlier_NC = popular_NE[:, :column] == popular_NE[:, column : column + 1]
        repeat_NE[:, column] |= earlier_NC.any(axis=1)
    return repeat_NE


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _request_ids(day: str, count: int) -> pa.Array:
    """Ids like r20261101-0000042: unique across days, in time order within a day."""
    width = max(7, len(str(max(count - 1, 0))))
    digits = pc.utf8_lpad(pa.array(np.arange(count)).cast(pa.string()), width=width, padding="0")
    return pc.binary_join_element_wise(f"r{day.replace('-', '')}-", digits, "")


def _id_columns(
    world: World,
    request_ids: pa.Array,
    request_rows: np.ndarray,
    user_N: np.ndarray,
    item_rows: np.ndarray,
) -> dict[str, pa.Array]:
    """request_id, user_id, item_id of log rows that belong to the given requests."""
    return {
        "request_id": request_ids.take(pa.array(request_rows, pa.int64())),
        "user_id": world.user_ids.take(pa.array(user_N[request_rows], pa.int64())),
        "item_id": world.item_ids.take(pa.array(item_rows, pa.int64())),
    }


# ---------------------------------------------------------------------------------------------
# Writing a world


def generate_world(spec: WorldSpec, out_dir: str, *, progress: bool = False) -> GeneratedWorld:
    """Write the Contract 1 tables and ``_oracle/`` for ``spec`` under ``out_dir``.

    Log tables are hive-partitioned by day (``clicks/date=2026-11-01/part-0.parquet``) and
    written day by day, so memory is bounded by one day; items and users are one file each.
    ``out_dir`` is written in place: jobs pass a staging directory.
    """
    started = time.perf_counter()
    world = make_world(spec)
    paths = {table: io.join(out_dir, table) for table in (*LOG_TABLES, *FEATURE_TABLES)}
    paths["oracle"] = io.join(out_dir, ORACLE_DIR)
    io.write_table(io.join(paths["items"], "part-0.parquet"), world.items)
    io.write_table(io.join(paths["users"], "part-0.parquet"), world.users)
    write_oracle(world, paths["oracle"])

    rows = {table: 0 for table in LOG_TABLES}
    active_user_days = 0
    clicks_per_position = np.zeros(spec.shown_per_request, dtype=np.int64)
    for day_index, day in enumerate(tqdm(spec.dates(), desc="days", disable=not progress)):
        tables = simulate_day(world, day_index)
        for name, table in tables.items():
            io.write_table(io.join(paths[name], f"date={day}", "part-0.parquet"), table)
            rows[name] += table.num_rows
        active_user_days += len(pc.unique(tables["impressions"].column("user_id")))
        clicked_requests = tables["clicks"].select(["request_id", "item_id"])
        positions = (
            tables["impressions"]
            .join(clicked_requests, ["request_id", "item_id"], join_type="inner")
            .column("position")
            .to_numpy()
        )
        clicks_per_position += np.bincount(positions, minlength=spec.shown_per_request)
    rows["items"] = world.items.num_rows
    rows["users"] = world.users.num_rows
    return GeneratedWorld(
        out_dir=out_dir,
        spec=spec,
        rows=rows,
        paths=paths,
        dates=spec.dates(),
        seconds=time.perf_counter() - started,
        active_user_days=active_user_days,
        clicks_per_position=clicks_per_position.tolist(),
    )


def write_oracle(world: World, oracle_dir: str) -> None:
    """user_vectors.parquet, item_vectors.parquet and meta.json under ``oracle_dir``."""
    spec = world.spec
    io.write_table(
        io.join(oracle_dir, "user_vectors.parquet"),
        pa.table({"user_id": world.user_ids, "vector": _matrix_to_list(world.user_vectors_UD)}),
    )
    io.write_table(
        io.join(oracle_dir, "item_vectors.parquet"),
        pa.table(
            {
                "item_id": world.item_ids,
                "vector": _matrix_to_list(world.item_vectors_ID),
                "bias": pa.array(world.item_bias_I, pa.float32()),
            }
        ),
    )
    io.write_json(
        io.join(oracle_dir, "meta.json"),
        {
            "latent_dim": spec.latent_dim,
            "seed": spec.seed,
            "spec": dataclasses.asdict(spec),
            "dates": spec.dates(),
            "affinity": "dot(user_vector, item_vector) + item bias",
            "click_probability": "sigmoid(affinity + click_offset) * position_bias[position]",
            "position_bias": spec.position_bias().tolist(),
            "item_vector_parts": ITEM_PARTS,
            "user_vector_parts": USER_PARTS,
        },
    )


def _matrix_to_list(matrix_XD: np.ndarray) -> pa.Array:
    rows, dim = matrix_XD.shape
    offsets = pa.array(np.arange(0, (rows + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix_XD.ravel(), pa.float32()))
