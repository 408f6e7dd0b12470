"""MovieLens-100K quality benchmark: the two-tower model, trained by the project's Ray Train job
(``jobs.train.run``, 2 workers), against MostPop, EASE and iALS. Every model is scored by the
same ``twotower_core.metrics.retrieval_metrics``: full catalog, each user's train items excluded.

Legend: U users, I items, D embedding dim, R rows, N negatives per row.

Data: RecBole's atomic files of ML-100K (``ml-100k.{inter,item,user}``; tab-separated, header
``name:type``), from ``--ml100k-dir`` or from the ``recbole==1.2.1`` wheel, fetched once with
``pip download`` into ~/.cache/twotower/. Every rating is a click (the rating value is ignored).
Features: users age (numeric), gender, occupation, zip_prefix (first character of the zip code);
items genres (a bag) and release_year (categorical).

Protocols (only users with >= 2 ratings hold anything out; every ML-100K user has >= 20):

- p1: each user's last rating by timestamp is held out; HR@10 (``hit_rate@10``) and NDCG@10.
  Equal timestamps keep the order of the lines of ml-100k.inter (a stable sort by time, as
  RecBole orders them). 415 of the 943 users have ties at their last timestamp, and an
  item-index tie-break would bias the held-out item: it moves EASE's HR@10 from 0.088
  (larger index last: obscure films) to 0.183 (smaller index last: popular ones); file order
  gives 0.139.
- p2: a random 20% of each user's ratings is held out with seed 0 (round(0.2·n), at least 1 and
  at most n − 1); Recall@20 and NDCG@20. Recall@20 is reported both ways: ``recall@20`` =
  hits / |held out| (RecBole's) and ``recall_capped@20`` = hits / min(20, |held out|) (Liang et
  al. 2018, the EASE paper's; a user with 30 held-out items can reach 1). The issue's reference
  figures are capped ones: EASE scores 0.362 and 0.451 here, the issue measured 0.449.

Tuning never sees the test split: the protocol applied to TRAIN carves a validation split (p1:
each user's last train rating; p2: a random 10% of each user's train ratings, seed 1, so that
the validation model trains on 72% of the ratings, near the test model's 80%). EASE's λ and
iALS's factors / regularization / alpha are chosen on it (by NDCG at the protocol's cut-off)
and refit on the whole train split. The two-tower configs in
``benchmarks/configs/ml100k_{p1,p2}.yaml`` were chosen on the validation split with ``--tune``,
which also fixes their epoch count; the final runs train exactly that many epochs on the whole
train split and publish the last epoch (``train.early_stopping_metric: epoch``), so the test
split never picks a checkpoint.

Seeds: "3 seeds" are 3 training seeds (model init, negative sampling, batch order; iALS init);
the p2 split stays seed 0. MostPop and EASE are deterministic: their std is 0.

Paired comparison: when EASE runs, every other model is also compared with it user by user
(``paired_vs_ease`` in the results): the mean over test users of (model − EASE) on each headline
metric, each user's value averaged over the seeds first, with a 95% percentile bootstrap interval
over the users (2,000 resamples, seed 0). The std over seeds says how much training noise moves a
figure; the interval says how much the choice of test users does, which at 943 users is the
larger. An interval above 0 is a win that these users support.

The two-tower model reads a Contract 2 dataset dir written here (``write_dataset``): train/ with
``unexposed`` negatives drawn ∝ (train count + 1)^α outside the user's train items (ML-100K has
no impressions or retrievals, so there are no other data negatives), eval/ = the held-out split,
vocab/ with train counts, features/.

    python -m benchmarks.movielens                          # all models, p1 and p2, seeds 0 1 2
    python -m benchmarks.movielens --models ease ials --protocols p1
    python -m benchmarks.movielens --tune --protocols p1 --candidate dim128 model.embedding_dim=128
    # the in-process tuning engine trains on a GPU with the override train.use_gpu=true

Prints a table (mean ± std over seeds, and each model − EASE with its interval), writes benchmarks/results/movielens.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from benchmarks.baselines import (
    IALSParams,
    ease_vectors,
    ials_vectors,
    interaction_matrix,
    most_popular_vectors,
)
from twotower_core.config import Config, config_from_dict, config_to_dict
from twotower_core.metrics import per_user_metrics

RESULTS = Path(__file__).parent / "results"
CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CACHE = Path.home() / ".cache" / "twotower"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
WHEEL_PREFIX = "recbole/dataset_example/ml-100k/"
ML100K_FILES: tuple[str, ...] = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
ZIP_PREFIX_LENGTH = 1
MODELS: tuple[str, ...] = ("mostpop", "ease", "ials", "two_tower")
MODEL_LABELS = {"mostpop": "MostPop", "ease": "EASE", "ials": "iALS", "two_tower": "two-tower"}
# Paired comparisons against EASE: percentile bootstrap over the test users.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
EASE_L2_GRID: tuple[float, ...] = (50.0, 100.0, 200.0, 300.0, 500.0, 800.0, 1200.0, 2000.0)
IALS_GRID: tuple[IALSParams, ...] = tuple(
    IALSParams(factors=factors, regularization=regularization, alpha=alpha)
    for factors in (64, 128)
    for regularization in (0.01, 0.1, 1.0)
    for alpha in (1.0, 5.0, 20.0)
)

# ---------------------------------------------------------------------------------------------
# RecBole atomic files

ATOMIC_TYPES: tuple[str, ...] = ("token", "float", "token_seq", "float_seq")


def read_atomic_file(path: str | Path) -> pl.DataFrame:
    """A RecBole atomic file as a frame: ``token`` → string, ``float`` → Float64,
    ``token_seq`` → list[str] (split on spaces), ``float_seq`` → list[f64]; an empty field is null
    (an empty list for sequences).
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty file (expected a name:type header)")
    names, kinds = [], []
    for field in lines[0].split("\t"):
        name, _, kind = field.rpartition(":")
        if not name or kind not in ATOMIC_TYPES:
            raise ValueError(
                f"{path}: header field {field!r} is not name:type with type one of "
                f"{', '.join(ATOMIC_TYPES)}"
            )
        names.append(name)
        kinds.append(kind)
    columns: list[list[Any]] = [[] for _ in names]
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(names):
            raise ValueError(
                f"{path}: line {number} has {len(fields)} fields, the header has {len(names)}"
            )
        for column, kind, text in zip(columns, kinds, fields):
            column.append(_parse_atomic(text, kind, path, number))
    dtypes = {
        "token": pl.String,
        "float": pl.Float64,
        "token_seq": pl.List(pl.String),
        "float_seq": pl.List(pl.Float64),
    }
    return pl.DataFrame(
        {
            name: pl.Series(name, column, dtype=dtypes[kind])
            for name, kind, column in zip(names, kinds, columns)
        }  # fmt: skip
    )


def _parse_atomic(text: str, kind: str, path: Path, line: int) -> Any:
    text = text.strip()
    try:
        if kind == "token":
            return text or None
        if kind == "float":
            return float(text) if text else None
        if kind == "token_seq":
            return text.split()
        return [float(value) for value in text.split()]
    except ValueError:
        raise ValueError(f"{path}: line {line}: {text!r} is not a {kind}") from None


def fetch_ml100k(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Directory holding the three ML-100K atomic files, extracted from the recbole wheel.

    The wheel is downloaded once (``pip download --no-deps recbole==1.2.1``); later calls read
    the cache.
    """
    target = Path(cache_dir) / "ml-100k"
    if all((target / name).exists() for name in ML100K_FILES):
        return target
    wheels = Path(cache_dir) / "wheels"
    found = sorted(wheels.glob("recbole-1.2.1-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", RECBOLE_REQUIREMENT,
                   "-d", str(wheels)]  # fmt: skip
        subprocess.run(command, check=True)
        found = sorted(wheels.glob("recbole-1.2.1-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip download {RECBOLE_REQUIREMENT} left no wheel in {wheels}")
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as wheel:
        for name in ML100K_FILES:
            staging = target / f".{name}.part"
            staging.write_bytes(wheel.read(WHEEL_PREFIX + name))
            os.replace(staging, target / name)
    return target


# ---------------------------------------------------------------------------------------------
# the data set


@dataclass(frozen=True)
class MovieLens:
    """Ratings with dense indices, and the users and items tables (row = dense index)."""

    # user_idx, item_idx, ts (seconds), line (0-based row in ml-100k.inter), rating
    ratings: pl.DataFrame
    users: pl.DataFrame  # user_idx, user_id, age, gender, occupation, zip_prefix
    items: pl.DataFrame  # item_idx, item_id, genres, release_year

    @property
    def num_users(self) -> int:
        return self.users.height

    @property
    def num_items(self) -> int:
        return self.items.height


def _require_columns(frame: pl.DataFrame, columns: Sequence[str], file: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{file}: missing column(s) {', '.join(missing)} (has {', '.join(frame.columns)})"
        )


def _int_ids(series: pl.Series, file: str) -> pl.Series:
    ids = series.cast(pl.Int64, strict=False)
    bad = series.filter(ids.is_null())
    if bad.len():
        raise ValueError(f"{file}: column {series.name!r} has non-integer ids, e.g. {bad[0]!r}")
    return ids


def load_ml100k(directory: str | Path) -> MovieLens:
    """Read ``ml-100k.{inter,item,user}``; ids become dense indices in ascending id order."""
    directory = Path(directory)
    inter = read_atomic_file(directory / "ml-100k.inter")
    items = read_atomic_file(directory / "ml-100k.item")
    users = read_atomic_file(directory / "ml-100k.user")
    _require_columns(inter, ("user_id", "item_id", "rating", "timestamp"), "ml-100k.inter")
    _require_columns(items, ("item_id", "release_year", "class"), "ml-100k.item")
    _require_columns(users, ("user_id", "age", "gender", "occupation", "zip_code"), "ml-100k.user")

    users = (
        users.with_columns(_int_ids(users["user_id"], "ml-100k.user"))
        .sort("user_id")
        .with_row_index("user_idx")
        .select(
            pl.col("user_idx").cast(pl.Int64),
            "user_id",
            pl.col("age").cast(pl.Float64, strict=False),
            "gender",
            "occupation",
            pl.col("zip_code").str.slice(0, ZIP_PREFIX_LENGTH).alias("zip_prefix"),
        )
    )
    items = (
        items.with_columns(_int_ids(items["item_id"], "ml-100k.item"))
        .sort("item_id")
        .with_row_index("item_idx")
        .select(
            pl.col("item_idx").cast(pl.Int64),
            "item_id",
            pl.col("class").alias("genres"),
            # A year is 4 digits; anything else (one item says "V") is unknown.
            pl.when(pl.col("release_year").str.contains(r"^\d{4}$"))
            .then(pl.col("release_year"))
            .otherwise(None)
            .alias("release_year"),
        )
    )
    for name, frame in (("users", users), ("items", items)):
        id_column = f"{name[:-1]}_id"
        if frame[id_column].n_unique() != frame.height:
            raise ValueError(f"ml-100k.{name[:-1]}: duplicate {id_column}s")
    ratings = inter.with_row_index("line").select(
        _int_ids(inter["user_id"], "ml-100k.inter"),
        _int_ids(inter["item_id"], "ml-100k.inter"),
        pl.col("timestamp").cast(pl.Int64).alias("ts"),
        pl.col("line").cast(pl.Int64),
        "rating",
    )
    ratings = ratings.join(users.select("user_id", "user_idx"), on="user_id", how="left").join(
        items.select("item_id", "item_idx"), on="item_id", how="left"
    )
    unknown = ratings.filter(pl.col("user_idx").is_null() | pl.col("item_idx").is_null())
    if unknown.height:
        raise ValueError(
            f"ml-100k.inter: {unknown.height} ratings name a user or item missing from "
            f"ml-100k.user / ml-100k.item, e.g. {unknown.row(0, named=True)}"
        )
    ratings = ratings.select("user_idx", "item_idx", "ts", "line", "rating").sort(
        "user_idx", "ts", "line"
    )
    return MovieLens(ratings=ratings, users=users, items=items)


# ---------------------------------------------------------------------------------------------
# protocols


@dataclass(frozen=True)
class Split:
    """Rows (user_idx, item_idx, ts, line) used for training, and those held out for scoring."""

    train: pl.DataFrame
    held_out: pl.DataFrame


COLUMNS: tuple[str, ...] = ("user_idx", "item_idx", "ts", "line")


def _ordered(frame: pl.DataFrame) -> pl.DataFrame:
    """Each user's rows in time order; equal timestamps keep their order in the input file."""
    return frame.select(COLUMNS).sort("user_idx", "ts", "line")


def split_leave_last_out(frame: pl.DataFrame) -> Split:
    """Hold out each user's last row by (ts, line); users with one row keep it in train."""
    ranked = _ordered(frame).with_columns(
        position=pl.int_range(pl.len()).over("user_idx"), size=pl.len().over("user_idx")
    )
    held = (pl.col("position") == pl.col("size") - 1) & (pl.col("size") >= 2)
    return Split(
        train=ranked.filter(~held).select(COLUMNS),
        held_out=ranked.filter(held).select(COLUMNS),
    )


def num_held_out(size: int, fraction: float) -> int:
    """round(fraction · size), at least 1 and at most size − 1 (0 when size < 2)."""
    if size < 2:
        return 0
    return min(size - 1, max(1, round(fraction * size)))


def split_random_fraction(frame: pl.DataFrame, *, fraction: float = 0.2, seed: int = 0) -> Split:
    """Hold out a random ``fraction`` of each user's rows (``num_held_out``), seeded.

    Rows are put in (user_idx, ts, line) order first, so the split depends on the rows and
    the seed only, not on the input order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    ordered = _ordered(frame)
    keys = np.random.default_rng(seed).random(ordered.height)
    sizes = ordered.group_by("user_idx").len().sort("user_idx")
    quota = pl.DataFrame(
        {
            "user_idx": sizes["user_idx"],
            "quota": [num_held_out(n, fraction) for n in sizes["len"].to_list()],
        }
    )
    ranked = (
        ordered.with_columns(key=pl.Series(keys))
        .with_columns(draw=pl.col("key").rank("ordinal").over("user_idx") - 1)
        .join(quota, on="user_idx", how="left")
    )
    held = pl.col("draw") < pl.col("quota")
    return Split(
        train=ranked.filter(~held).select(COLUMNS),
        held_out=ranked.filter(held).select(COLUMNS),
    )


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    split: Callable[[pl.DataFrame], Split]
    ks: tuple[int, ...]
    # The metrics of the requirement, in table order.
    headline: tuple[str, ...]
    # What validation picks hyperparameters by.
    tuning_metric: str
    # Carves the validation split out of the test split's TRAIN rows.
    validation_split: Callable[[pl.DataFrame], Split]


PROTOCOLS: dict[str, Protocol] = {
    "p1": Protocol(
        name="p1",
        description="leave-last-out by timestamp",
        split=split_leave_last_out,
        ks=(10, 20, 50),
        headline=("hit_rate@10", "ndcg@10"),
        tuning_metric="ndcg@10",
        validation_split=split_leave_last_out,
    ),
    "p2": Protocol(
        name="p2",
        description="random 20% per user, seed 0",
        split=lambda frame: split_random_fraction(frame, fraction=0.2, seed=0),
        ks=(10, 20, 50),
        # recall@20 divides by |targets|, recall_capped@20 by min(20, |targets|): the issue's
        # reference figures (EASE 0.449, iALS 0.368) are the capped ones (EASE here: 0.451).
        headline=("recall@20", "recall_capped@20", "ndcg@20"),
        tuning_metric="ndcg@20",
        # 10% of each user's train rows (seed 1): the validation model trains on 72% of the
        # ratings, near the test model's 80%. Carving 20% (64%) misranked configs: there the
        # two-tower led EASE by 0.001-0.004 NDCG@20 on three carves, while with 10% carves it
        # trails by 0.009, as on test (0.015); smaller batches pay off only with the larger
        # train split (movielens_tuning.json, note_2026-12-04_stop21).
        validation_split=lambda frame: split_random_fraction(frame, fraction=0.1, seed=1),
    ),
}


def protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}") from None


def holdout_splits(ml: MovieLens, proto: Protocol) -> tuple[Split, Split]:
    """(train → test split, train-of-train → validation split) of one protocol."""
    test = proto.split(ml.ratings)
    return test, proto.validation_split(test.train)


# ---------------------------------------------------------------------------------------------
# scoring


def evaluate_vectors(
    user_UD: np.ndarray | torch.Tensor,
    item_ID: np.ndarray | torch.Tensor,
    split: Split,
    *,
    num_users: int,
    similarity: str = "dot",
    ks: Sequence[int],
) -> dict[str, float]:
    """``retrieval_metrics`` of per-index vectors on ``split.held_out``, excluding train items."""
    metrics, _, _ = evaluate_vectors_per_user(
        user_UD, item_ID, split, num_users=num_users, similarity=similarity, ks=ks
    )
    return metrics


def evaluate_vectors_per_user(
    user_UD: np.ndarray | torch.Tensor,
    item_ID: np.ndarray | torch.Tensor,
    split: Split,
    *,
    num_users: int,
    similarity: str = "dot",
    ks: Sequence[int],
) -> tuple[dict[str, float], np.ndarray, dict[str, np.ndarray]]:
    """``per_user_metrics`` of the same evaluation, in one pass: (the ``evaluate_vectors``
    metrics, [E] user indices, {metric: [E] values})."""
    metrics, users_E, values = per_user_metrics(
        torch.as_tensor(user_UD),
        torch.as_tensor(item_ID),
        similarity=similarity,
        ks=tuple(ks),
        **_targets_and_exclusions(split, num_users),
    )
    return metrics, users_E.numpy(), {key: value.numpy() for key, value in values.items()}


def _targets_and_exclusions(split: Split, num_users: int) -> dict[str, np.ndarray]:
    """CSR held-out items (targets) and train items (excluded) of every user index."""
    from pipelines.train_loop import to_csr

    user_ids = np.arange(num_users)
    eval_indptr, eval_items = to_csr(
        split.held_out["user_idx"].to_numpy(), split.held_out["item_idx"].to_numpy(), user_ids
    )
    train = split.train.unique(["user_idx", "item_idx"])
    exclude_indptr, exclude_items = to_csr(
        train["user_idx"].to_numpy(), train["item_idx"].to_numpy(), user_ids
    )
    return {
        "eval_indptr": eval_indptr,
        "eval_items": eval_items,
        "exclude_indptr": exclude_indptr,
        "exclude_items": exclude_items,
    }


def paired_difference(
    model_SE: np.ndarray,
    baseline_E: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """Mean over users of (model − baseline) with a 95% percentile bootstrap interval.

    ``model_SE`` holds one row of per-user values per training seed; each user's value is first
    averaged over the seeds, then users are resampled with replacement (``resamples`` times,
    ``seed``), so the interval is the uncertainty of the comparison from which users were
    tested, the larger part at this size; the seed spread is reported beside it.
    """
    model_SE = np.atleast_2d(np.asarray(model_SE, dtype=np.float64))
    baseline_E = np.asarray(baseline_E, dtype=np.float64)
    if model_SE.shape[1] != baseline_E.shape[0] or baseline_E.shape[0] == 0:
        raise ValueError(
            f"paired users differ: model {model_SE.shape[1]}, baseline {baseline_E.shape[0]}"
        )
    diff_E = model_SE.mean(axis=0) - baseline_E
    rng = np.random.default_rng(seed)
    draws_RE = rng.integers(0, diff_E.shape[0], size=(resamples, diff_E.shape[0]))
    means_R = diff_E[draws_RE].mean(axis=1)
    low, high = np.quantile(means_R, [0.025, 0.975])
    return {
        "difference": float(diff_E.mean()),
        "ci95": [float(low), float(high)],
        "users": int(diff_E.shape[0]),
        "users_better": int((diff_E > 0).sum()),
        "users_worse": int((diff_E < 0).sum()),
    }


def train_matrix(split: Split, ml: MovieLens):
    return interaction_matrix(
        split.train["user_idx"].to_numpy(),
        split.train["item_idx"].to_numpy(),
        num_users=ml.num_users,
        num_items=ml.num_items,
    )


def tune_ease(ml: MovieLens, validation: Split, proto: Protocol) -> tuple[float, list[dict]]:
    """(best λ on the validation split, one row per λ tried)."""
    train_UI = train_matrix(validation, ml)
    rows = []
    for l2 in EASE_L2_GRID:
        metrics = evaluate_vectors(
            *ease_vectors(train_UI, l2=l2), validation, num_users=ml.num_users, ks=proto.ks
        )
        rows.append({"l2": l2, **{k: metrics[k] for k in proto.headline}})
    best = max(rows, key=lambda row: row[proto.tuning_metric])
    return best["l2"], rows


def tune_ials(ml: MovieLens, validation: Split, proto: Protocol) -> tuple[IALSParams, list[dict]]:
    """(best iALS parameters on the validation split with seed 0, one row per setting)."""
    train_UI = train_matrix(validation, ml)
    rows = []
    for params in IALS_GRID:
        metrics = evaluate_vectors(
            *ials_vectors(train_UI, params, seed=0),
            validation,
            num_users=ml.num_users,
            ks=proto.ks,
        )
        rows.append({**params.__dict__, **{k: metrics[k] for k in proto.headline}})
    best = max(rows, key=lambda row: row[proto.tuning_metric])
    return IALSParams(**{k: best[k] for k in IALSParams.__dataclass_fields__}), rows


# ---------------------------------------------------------------------------------------------
# the two-tower model: a Contract 2 dataset dir, the Ray Train job, embeddings

NUM_TRAIN_FILES = 4


def sample_unexposed(
    user_idx_R: np.ndarray,
    train_keys: np.ndarray,
    item_counts_I: np.ndarray,
    *,
    num_negatives: int,
    alpha: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """``[R, N]`` items drawn i.i.d. ∝ (count + 1)^α, none in the row's user's train items.

    Args:
        user_idx_R: [R] user of each row.
        train_keys: sorted unique ``user_idx · I + item_idx`` of every train positive.
        item_counts_I: [I] train click counts.
        num_negatives: N, negatives per row.
        alpha: popularity exponent; 0 is uniform.
        rng: the source of randomness.
    """
    num_items = len(item_counts_I)
    weights_I = (item_counts_I.astype(np.float64) + 1.0) ** alpha
    cdf_I = np.cumsum(weights_I) / weights_I.sum()
    draws_RN = np.zeros((len(user_idx_R), num_negatives), dtype=np.int64)
    pending = np.ones(draws_RN.shape, dtype=bool)
    users_RN = np.broadcast_to(user_idx_R[:, None], draws_RN.shape)
    for _ in range(1000):
        count = int(pending.sum())
        if count == 0:
            return draws_RN
        draws = np.searchsorted(cdf_I, rng.random(count), side="right").clip(max=num_items - 1)
        draws_RN[pending] = draws
        keys = users_RN[pending] * num_items + draws
        positions = np.searchsorted(train_keys, keys).clip(max=len(train_keys) - 1)
        clash = train_keys[positions] == keys
        still = np.zeros_like(pending)
        still[pending] = clash
        pending = still
    raise ValueError("some users have (almost) every catalog item in train: no negatives left")


def write_dataset(
    out: str,
    ml: MovieLens,
    split: Split,
    *,
    num_negatives: int,
    alpha: float,
    seed: int,
    description: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``split`` as a Contract 2 dataset dir (train/ shuffled with ``seed``); its manifest.

    features/users.parquet also gets ``history``: the item ids of the user's train rows, oldest
    first (a bag; a model that should not see it sets ``model.user_feature_kinds.history:
    ignore``; with ``model.user_history_feature: history`` training takes each row's own target
    out of it, or with ``model.causal_history`` everything from the target on).
    """
    from pipelines import io
    from pipelines.contracts import (
        ITEMS_FILE,
        MANIFEST_FILE,
        USERS_FILE,
        eval_schema,
        train_schema,
        vocab_schema,
    )

    rng = np.random.default_rng(seed)
    num_items = ml.num_items
    train = split.train
    user_idx = train["user_idx"].to_numpy()
    item_idx = train["item_idx"].to_numpy()
    item_counts_I = np.bincount(item_idx, minlength=num_items)
    user_counts_U = np.bincount(user_idx, minlength=ml.num_users)
    train_keys = np.unique(user_idx * num_items + item_idx)
    negatives_RN = sample_unexposed(
        user_idx, train_keys, item_counts_I, num_negatives=num_negatives, alpha=alpha, rng=rng
    )
    order = rng.permutation(train.height)
    user_ids = ml.users["user_id"].to_numpy()
    item_ids = ml.items["item_id"].to_numpy()
    ts_type = pa.timestamp("us", tz="UTC")

    def timestamps(seconds: np.ndarray) -> pa.Array:
        return pa.array(seconds.astype(np.int64) * 1_000_000, type=pa.int64()).cast(ts_type)

    def lists(values_RN: np.ndarray, value_type: pa.DataType) -> pa.Array:
        """[R, N] → R lists of N values."""
        offsets = np.arange(values_RN.shape[0] + 1, dtype=np.int32) * values_RN.shape[1]
        return pa.ListArray.from_arrays(offsets, pa.array(values_RN.ravel(), type=value_type))

    negatives_RN = negatives_RN[order]
    rows_user, rows_item = user_idx[order], item_idx[order]
    train_table = pa.Table.from_arrays(
        [
            pa.array(user_ids[rows_user]),
            pa.array(item_ids[rows_item]),
            timestamps(train["ts"].to_numpy()[order]),
            pa.array([f"ml100k-{u}-{i}" for u, i in zip(rows_user, rows_item)]),
            lists(item_ids[negatives_RN], pa.int64()),
            lists(np.full(negatives_RN.shape, "unexposed", dtype=object), pa.string()),
            pa.array(rows_user),
            pa.array(rows_item),
            lists(negatives_RN, pa.int64()),
        ],
        schema=train_schema(pa.int64(), pa.int64(), ts_type),
    )
    held = split.held_out
    eval_table = pa.Table.from_arrays(
        [
            pa.array(user_ids[held["user_idx"].to_numpy()]),
            pa.array(item_ids[held["item_idx"].to_numpy()]),
            timestamps(held["ts"].to_numpy()),
            pa.array(held["user_idx"].to_numpy()),
            pa.array(held["item_idx"].to_numpy()),
        ],
        schema=eval_schema(pa.int64(), pa.int64(), ts_type),
    )
    user_vocab = pa.table(
        {"user_id": user_ids, "user_idx": np.arange(ml.num_users), "count": user_counts_U}
    ).cast(vocab_schema("user", pa.int64()))
    item_vocab = pa.table(
        {"item_id": item_ids, "item_idx": np.arange(num_items), "count": item_counts_I}
    ).cast(vocab_schema("item", pa.int64()))
    manifest = {
        "source": "movielens-100k",
        **(description or {}),
        "negatives": {"unexposed": num_negatives, "unexposed_alpha": alpha, "seed": seed},
        "counts": {
            "train_positives": train.height,
            "eval_positives": held.height,
            "users": ml.num_users,
            "items": num_items,
            "negatives_by_source": {
                "exposed_not_clicked": 0,
                "ranked_out": 0,
                "unexposed": int(negatives_RN.size),
            },
        },
        "created_at": io.utc_now(),
    }
    with io.staged_output(out, overwrite=True) as staging:
        bounds = np.linspace(0, train_table.num_rows, NUM_TRAIN_FILES + 1).astype(int)
        for part, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            io.write_table(
                io.join(staging, "train", f"part-{part:05d}.parquet"),
                train_table.slice(start, stop - start),
            )
        io.write_table(io.join(staging, "eval", "part-00000.parquet"), eval_table)
        io.write_table(io.join(staging, "vocab", USERS_FILE), user_vocab)
        io.write_table(io.join(staging, "vocab", ITEMS_FILE), item_vocab)
        io.write_table(
            io.join(staging, "features", USERS_FILE), user_features(ml, split).to_arrow()
        )
        io.write_table(io.join(staging, "features", ITEMS_FILE), ml.items.to_arrow())
        io.write_json(io.join(staging, MANIFEST_FILE), manifest)
    return manifest


def user_features(ml: MovieLens, split: Split) -> pl.DataFrame:
    """The users table plus ``history``: the item ids of each user's train rows in time order,
    oldest first (by timestamp, then line in ml-100k.inter), as ``model.causal_history`` needs.
    ML-100K has one rating per (user, item), so no id repeats."""
    history = (
        split.train.join(ml.items.select("item_idx", "item_id"), on="item_idx")
        .sort("user_idx", "ts", "line")
        .group_by("user_idx", maintain_order=True)
        .agg(pl.col("item_id").alias("history"))
    )
    return (
        ml.users.join(history, on="user_idx", how="left")
        .with_columns(pl.col("history").fill_null(pl.lit([], dtype=pl.List(pl.Int64))))
        .sort("user_idx")
    )


def model_vectors(loaded, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """([U, D], [I, D]) embeddings of a loaded model for every user and item of ``dataset``."""
    from pipelines import io
    from pipelines.features import build_feature_table
    from pipelines.train_loop import embed_all

    users = io.read_table(io.join(dataset, "features", "users.parquet"))
    items = io.read_table(io.join(dataset, "features", "items.parquet"))
    user_table = build_feature_table(users, loaded.user_specs)
    item_table = build_feature_table(items, loaded.item_specs)
    user_UD = embed_all(loaded.model.user_tower, user_table, np.arange(users.num_rows))
    item_ID = embed_all(loaded.model.item_tower, item_table, np.arange(items.num_rows))
    return user_UD.numpy(), item_ID.numpy()


def start_ray(*, attempts: int = 5) -> None:
    """``jobs.ray_runtime.ensure_ray()``, retried: on a loaded machine a local Ray can miss its
    fixed 30 s startup deadline, and a later try usually makes it."""
    import ray

    from jobs.ray_runtime import ensure_ray

    for attempt in range(1, attempts + 1):
        try:
            ensure_ray()
            return
        except Exception as error:  # ray raises a bare Exception on a startup timeout
            ray.shutdown()
            if attempt == attempts:
                raise
            print(f"Ray did not start ({error}); retrying ({attempt}/{attempts})", flush=True)
            time.sleep(10 * attempt)


def with_overrides(config: Config, overrides: Sequence[str]) -> Config:
    return config_from_dict(config_to_dict(config), overrides=list(overrides))


def train_two_tower(
    ml: MovieLens,
    split: Split,
    config: Config,
    *,
    work_dir: str,
    description: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray, Any]:
    """Write the dataset, train with ``jobs.train.run``; ([U, D], [I, D], TrainResult)."""
    from jobs import train
    from pipelines.checkpoint import load_model

    dataset, model = os.path.join(work_dir, "dataset"), os.path.join(work_dir, "model")
    negatives = config.dataset.negatives
    write_dataset(
        dataset,
        ml,
        split,
        num_negatives=negatives.unexposed,
        alpha=negatives.unexposed_alpha,
        seed=config.train.seed,
        description=description,
    )
    result = train.run(dataset=dataset, out=model, config=config, overwrite=True)
    user_UD, item_ID = model_vectors(load_model(model), dataset)
    shutil.rmtree(work_dir, ignore_errors=True)
    return user_UD, item_ID, result


def two_tower_config(proto: Protocol, path: str | None = None) -> Config:
    from jobs.config_io import load_config

    return load_config(path or str(CONFIGS / f"ml100k_{proto.name}.yaml"))


def fit_in_process(
    dataset: str,
    config: Config,
    *,
    ml: MovieLens,
    validation: Split,
    ks: Sequence[int],
    metric: str,
    patience: int,
) -> list[dict[str, float]]:
    """Train in this process, without Ray, and score ``validation`` after every epoch.

    For quick tuning only: ``pipelines.local_train.fit`` (the same model, task, optimizer and
    ``_train_step`` as the Ray job, one step of ``batch_size × num_workers`` rows, as the job's
    DDP workers with ``loss.gather_across_workers`` take it).
    Stops after ``patience`` epochs without a gain in ``metric``; one history row per epoch.
    """
    from pipelines import local_train
    from pipelines.train_loop import embed_all

    def evaluate(model, user_table, item_table) -> dict[str, float]:
        user_UD = embed_all(model.user_tower, user_table, np.arange(user_table.num_rows)).cpu()
        item_ID = embed_all(model.item_tower, item_table, np.arange(item_table.num_rows)).cpu()
        return evaluate_vectors(
            user_UD, item_ID, validation, num_users=ml.num_users,
            similarity=config.loss.similarity, ks=ks,
        )  # fmt: skip

    def report(row: dict[str, Any]) -> None:
        print(
            f"  epoch {row['epoch']}: loss {row['train_loss']:.4f}, {metric} "
            f"{row[metric]:.4f} ({row['seconds']:.0f} s)",
            flush=True,
        )

    fitted = local_train.fit(
        dataset, config, evaluate=evaluate, metric=metric, patience=patience, on_epoch=report
    )
    return fitted.history


# ---------------------------------------------------------------------------------------------
# runs


def mean_std(values: Sequence[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def run_protocol(
    ml: MovieLens,
    proto: Protocol,
    *,
    models: Sequence[str],
    seeds: Sequence[int],
    work_dir: str,
    config_path: str | None = None,
) -> dict[str, Any]:
    """Tune the baselines on validation, then score every model on the test split per seed."""
    test, validation = holdout_splits(ml, proto)
    out: dict[str, Any] = {
        "protocol": proto.name,
        "description": proto.description,
        "train_rows": test.train.height,
        "test_rows": test.held_out.height,
        "validation_rows": validation.held_out.height,
        "models": {},
        "tuning": {},
    }
    train_UI = train_matrix(test, ml)

    # model -> one {metric: [E] per-user value} per seed, for the paired comparison with EASE.
    per_user: dict[str, list[dict[str, np.ndarray]]] = {}
    eval_users: list[np.ndarray] = []

    def score(model: str, user_UD, item_ID, similarity: str = "dot") -> dict[str, float]:
        metrics, users_E, values = evaluate_vectors_per_user(
            user_UD, item_ID, test, num_users=ml.num_users, similarity=similarity, ks=proto.ks
        )
        eval_users.append(users_E)
        per_user.setdefault(model, []).append({m: values[m] for m in proto.headline})
        return metrics

    for model in models:
        started = time.perf_counter()
        per_seed: list[dict[str, float]] = []
        details: dict[str, Any] = {}
        if model == "mostpop":
            metrics = score(model, *most_popular_vectors(train_UI))
            per_seed = [metrics for _ in seeds]
        elif model == "ease":
            l2, rows = tune_ease(ml, validation, proto)
            out["tuning"]["ease"] = rows
            details["l2"] = l2
            metrics = score(model, *ease_vectors(train_UI, l2=l2))
            per_seed = [metrics for _ in seeds]
        elif model == "ials":
            params, rows = tune_ials(ml, validation, proto)
            out["tuning"]["ials"] = rows
            details["params"] = params.__dict__
            per_seed = [
                score(model, *ials_vectors(train_UI, params, seed=seed)) for seed in seeds
            ]
        elif model == "two_tower":
            base = two_tower_config(proto, config_path)
            details["config"] = config_to_dict(base)
            details["history"] = []
            for seed in seeds:
                config = with_overrides(
                    base,
                    [f"train.seed={seed}", f"dataset.seed={seed}", "train.early_stopping_metric=epoch",
                     "train.early_stopping_patience=null"],
                )  # fmt: skip
                user_UD, item_ID, result = train_two_tower(
                    ml,
                    test,
                    config,
                    work_dir=os.path.join(work_dir, f"{proto.name}-seed{seed}"),
                    description={"protocol": proto.name, "split": "test", "seed": seed},
                )
                per_seed.append(score(model, user_UD, item_ID, config.loss.similarity))
                details["history"].append(result.history)
        else:
            raise ValueError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
        keys = [k for k in per_seed[0] if k != "eval_users"]
        out["models"][model] = {
            "per_seed": per_seed,
            "summary": {k: mean_std([m[k] for m in per_seed]) for k in keys},
            "seconds": time.perf_counter() - started,
            **details,
        }
        summary = out["models"][model]["summary"]
        print(
            f"[{proto.name}] {MODEL_LABELS[model]}: "
            + ", ".join(f"{k} {summary[k][0]:.4f} ± {summary[k][1]:.4f}" for k in proto.headline),
            flush=True,
        )
    if "ease" in per_user:
        # Every model is scored on the same split, so on the same users in the same order.
        if any(not np.array_equal(users, eval_users[0]) for users in eval_users):
            raise RuntimeError(f"[{proto.name}] models were evaluated on different users")
        out["paired_vs_ease"] = {
            model: {
                metric: paired_difference(
                    np.stack([seed_values[metric] for seed_values in runs]),
                    per_user["ease"][0][metric],
                )
                for metric in proto.headline
            }
            for model, runs in per_user.items()
            if model != "ease"
        }
        for model, rows in out["paired_vs_ease"].items():
            print(
                f"[{proto.name}] {MODEL_LABELS[model]} − EASE: "
                + ", ".join(
                    f"{metric} {row['difference']:+.4f} [{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]"
                    for metric, row in rows.items()
                ),
                flush=True,
            )
    return out


TUNE_ENGINES: tuple[str, ...] = ("in-process", "ray")


def tune_two_tower(
    ml: MovieLens,
    proto: Protocol,
    candidates: dict[str, list[str]],
    *,
    work_dir: str,
    config_path: str | None = None,
    max_epochs: int,
    patience: int,
    engine: str = "in-process",
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train each candidate (overrides on the protocol's config) on the validation split.

    Each run early-stops on the protocol's tuning metric; its best epoch is what the final
    config's ``train.epochs`` should be. ``engine`` is ``in-process`` (``fit_in_process``, fast)
    or ``ray`` (the training job itself). ``on_result(name, result)`` runs after each candidate.
    """
    if engine not in TUNE_ENGINES:
        raise ValueError(f"unknown tuning engine {engine!r}; valid: {', '.join(TUNE_ENGINES)}")
    _, validation = holdout_splits(ml, proto)
    base = two_tower_config(proto, config_path)
    results = {}
    for name, overrides in candidates.items():
        config = with_overrides(
            base,
            [*overrides, f"train.epochs={max_epochs}",
             f"train.early_stopping_metric={proto.tuning_metric}",
             f"train.early_stopping_patience={patience}"],
        )  # fmt: skip
        started = time.perf_counter()
        if engine == "ray":
            _, _, result = train_two_tower(
                ml,
                validation,
                config,
                work_dir=os.path.join(work_dir, f"tune-{proto.name}-{name}"),
                description={"protocol": proto.name, "split": "validation", "seed": 0},
            )
            history = result.history
        else:
            dataset = os.path.join(work_dir, f"tune-{proto.name}-{name}", "dataset")
            write_dataset(
                dataset,
                ml,
                validation,
                num_negatives=config.dataset.negatives.unexposed,
                alpha=config.dataset.negatives.unexposed_alpha,
                seed=config.train.seed,
            )
            history = fit_in_process(
                dataset, config, ml=ml, validation=validation, ks=proto.ks,
                metric=proto.tuning_metric, patience=patience,
            )  # fmt: skip
            shutil.rmtree(os.path.dirname(dataset), ignore_errors=True)
        best = max(history, key=lambda row: row[proto.tuning_metric])
        results[name] = {
            "engine": engine,
            "overrides": overrides,
            "best_epoch": best["epoch"],
            **{k: best[k] for k in (*proto.headline, "recall@20", "ndcg@10") if k in best},
            "history": [
                {k: row[k] for k in ("epoch", "train_loss", proto.tuning_metric) if k in row}
                for row in history
            ],
            "seconds": time.perf_counter() - started,
        }
        print(
            f"[tune {proto.name}] {name}: best epoch {best['epoch']}, "
            + ", ".join(f"{k} {best[k]:.4f}" for k in proto.headline)
            + f" ({results[name]['seconds']:.0f} s)",
            flush=True,
        )
        if on_result is not None:
            on_result(name, results[name])
    return results


# ---------------------------------------------------------------------------------------------
# output


def plus_minus(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}"


def table(results: dict[str, Any], *, num_seeds: int) -> str:
    lines = [
        f"MovieLens-100K, full catalog, train items excluded (mean ± std over {num_seeds} seeds)"
    ]
    for name, run in results.items():
        proto = PROTOCOLS[name]
        lines.append(
            f"{name}: {proto.description} (train {run['train_rows']:,} rows, test {run['test_rows']:,})"
        )
        lines.append(f"  {'model':<12}" + "".join(f"{m:>20}" for m in proto.headline))
        for model, entry in run["models"].items():
            cells = "".join(f"{plus_minus(*entry['summary'][m]):>20}" for m in proto.headline)
            lines.append(f"  {MODEL_LABELS[model]:<12}{cells}")
        for model, rows in run.get("paired_vs_ease", {}).items():
            cells = "".join(
                f"{f'{r[0]:+.4f} [{r[1][0]:+.4f}, {r[1][1]:+.4f}]':>28}"
                for r in ((rows[m]["difference"], rows[m]["ci95"]) for m in proto.headline)
            )
            lines.append(f"  {MODEL_LABELS[model] + ' − EASE':<18}{cells}")
    if any("paired_vs_ease" in run for run in results.values()):
        lines.append(
            "  model − EASE: mean over test users of the paired difference (each user's value "
            "averaged over seeds) [95% bootstrap interval over users]"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, metric) for name in results for metric in PROTOCOLS[name].headline]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for axis, (name, metric) in zip(axes[0], panels):
        models = list(results[name]["models"])
        means = [results[name]["models"][m]["summary"][metric][0] for m in models]
        stds = [results[name]["models"][m]["summary"][metric][1] for m in models]
        colors = ["tab:gray", "tab:orange", "tab:green", "tab:blue"]
        axis.bar([MODEL_LABELS[m] for m in models], means, yerr=stds, capsize=4,
                 color=[colors[MODELS.index(m)] for m in models])  # fmt: skip
        axis.set_title(f"{name}: {metric}")
        axis.tick_params(axis="x", labelrotation=30)
    fig.suptitle("MovieLens-100K (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ml100k-dir",
        default=None,
        help="directory with ml-100k.{inter,item,user} (default: extract from the recbole wheel)",
    )
    parser.add_argument(
        "--cache-dir", default=str(DEFAULT_CACHE), help="where the wheel and files are cached"
    )
    parser.add_argument(
        "--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS),
        help="protocols to run",
    )  # fmt: skip
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument(
        "--config",
        default=None,
        help="two-tower YAML config (default: benchmarks/configs/ml100k_<protocol>.yaml)",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="tune the two-tower model on the validation split instead (see --candidate)",
    )
    parser.add_argument(
        "--candidate",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME [KEY=VALUE ...]",
        help="with --tune: a named set of config overrides (repeatable)",
    )
    parser.add_argument("--max-epochs", type=int, default=30, help="with --tune: epoch cap")
    parser.add_argument("--patience", type=int, default=3, help="with --tune: early stopping")
    parser.add_argument(
        "--tune-engine",
        default="in-process",
        choices=TUNE_ENGINES,
        help="with --tune: train in this process (fast) or with the Ray training job",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="results path without suffix (default benchmarks/results/movielens, "
        "or movielens_tuning with --tune)",
    )
    args = parser.parse_args(argv)

    directory = Path(args.ml100k_dir) if args.ml100k_dir else fetch_ml100k(args.cache_dir)
    ml = load_ml100k(directory)
    print(f"ML-100K: {ml.ratings.height:,} ratings, {ml.num_users} users, {ml.num_items} items")
    if (args.tune and args.tune_engine == "ray") or (not args.tune and "two_tower" in args.models):
        start_ray()
    work_dir = tempfile.mkdtemp(prefix="twotower-ml100k-")
    try:
        if args.tune:
            return _tune_main(ml, args, work_dir)
        results = {
            name: run_protocol(
                ml,
                PROTOCOLS[name],
                models=args.models,
                seeds=args.seeds,
                work_dir=work_dir,
                config_path=args.config,
            )
            for name in args.protocols
        }
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print()
    print(table(results, num_seeds=len(args.seeds)))
    out = Path(args.out or RESULTS / "movielens")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"seeds": args.seeds, "data": str(directory), "protocols": results}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


def _tune_main(ml: MovieLens, args: argparse.Namespace, work_dir: str) -> int:
    candidates = {group[0]: list(group[1:]) for group in args.candidate} or {"base": []}
    out = Path(args.out or RESULTS / "movielens_tuning").with_suffix(".json")
    # Runs accumulate across invocations: the file is the log of everything tried, written after
    # every candidate so an interrupted search keeps what it found. It is read afresh each time
    # because two searches (p1 and p2) may share it.
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.protocols:

        def record(candidate: str, result: dict[str, Any], protocol_name: str = name) -> None:
            log = json.loads(out.read_text()) if out.exists() else {}
            log.setdefault(protocol_name, {})[candidate] = result
            out.write_text(json.dumps(log, indent=2))

        tune_two_tower(
            ml,
            PROTOCOLS[name],
            candidates,
            work_dir=work_dir,
            config_path=args.config,
            max_epochs=args.max_epochs,
            patience=args.patience,
            engine=args.tune_engine,
            on_result=record,
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
