"""Run configuration as frozen dataclasses, with defaults in one place.

Config is data: a nested dict (parsed from YAML by ``jobs``) is validated into
``Config`` by ``config_from_dict``. An unknown key or a bad value raises
``ConfigError`` naming the dotted key (``loss.temperature``) before any Ray work starts.
This module reads no files; ``jobs.config_io`` does.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

# Names of the three data negative sources, exactly as written in Contract 2.
NEGATIVE_SOURCES: tuple[str, ...] = ("exposed_not_clicked", "ranked_out", "unexposed")
FEATURE_KINDS: tuple[str, ...] = ("categorical", "numeric", "bag", "ignore")


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the dotted key."""


@dataclass(frozen=True)
class NegativesConfig:
    """How many negatives of each source every positive gets, and how they are drawn."""

    exposed_not_clicked: int = 1
    ranked_out: int = 2
    unexposed: int = 4
    # unexposed negatives are drawn with probability ∝ (click count + 1)^alpha; 0 = uniform.
    unexposed_alpha: float = 0.75
    # ranked_out negatives come from retrieval ranks in [min_rank, max_rank] (inclusive; None = no bound).
    ranked_out_min_rank: int = 0
    ranked_out_max_rank: int | None = None

    def counts(self) -> dict[str, int]:
        return {source: getattr(self, source) for source in NEGATIVE_SOURCES}


@dataclass(frozen=True)
class DatasetConfig:
    """build-dataset: window, temporal split, negatives."""

    # Window: [start, end] dates (YYYY-MM-DD, inclusive). end defaults to the last day in the
    # logs; start defaults to end - window_days + 1, or the first day when window_days is None.
    start: str | None = None
    end: str | None = None
    window_days: int | None = None
    # Eval = positives with ts >= split time; default split time is the start of the last
    # eval_days days of the window.
    eval_days: int = 1
    split_time: str | None = None
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    seed: int = 0
    # Fail the run when quarantined rows exceed this fraction of input rows (None = never).
    max_quarantine_fraction: float | None = None
    # Require every click to have an impression in the same request (else quarantined).
    require_click_impression: bool = False
    # Clicks with dwell_s below this are not positives (bounces); they count as not clicked.
    # Applied only when the clicks table has a dwell_s column; null dwell passes.
    min_dwell_s: float | None = None
    # Hash partitions by user for the shuffle; a partition task holds all its users' events.
    # None: one per 250k input log rows (at least 8), so partitions stay the same size as
    # the logs grow.
    num_partitions: int | None = None
    # Input a shuffle-map task partitions at once, in MiB. Ray 2.60 batches up to 1 GiB per
    # task by default, which alone was a third of the 4 GiB budget at 5M impressions.
    shuffle_batch_mb: int = 128


# How a bag feature's rows are pooled: their mean, their sum, or their sum / sqrt(length) (the
# "sqrtn" combiner; FISM's |history|^-1/2, between the other two for long bags).
BAG_POOLINGS = ("mean", "sum", "sqrtn")


@dataclass(frozen=True)
class ModelConfig:
    """The two towers: ID embedding + feature encoders → MLP → embedding_dim."""

    embedding_dim: int = 64
    id_embedding_dim: int = 64
    feature_embedding_dim: int = 16
    hidden_dims: tuple[int, ...] = (128,)
    activation: str = "relu"
    dropout: float = 0.0
    layer_norm: bool = False
    # L2-normalise the tower output.
    normalize: bool = False
    # Unseen ids map to one of these shared rows (by hash of their index).
    num_oov_buckets: int = 1
    use_ids: bool = True
    # False: the user tower has no ID embedding and embeds a user from its features alone
    # (e.g. the history bag), as it would an unseen user; the item tower follows use_ids.
    user_id_embedding: bool = True
    use_features: bool = True
    bag_pooling: str = "mean"
    # Per-column feature kind override: column -> categorical | numeric | bag | ignore.
    user_feature_kinds: dict[str, str] = field(default_factory=dict)
    item_feature_kinds: dict[str, str] = field(default_factory=dict)
    # A user bag feature of item ids (the user's past items). In training, each row's own
    # positive is taken out of that row's bag: the bag is per user and holds every train item,
    # so otherwise the tower learns to find the target in it, a shortcut that is never there
    # when serving (the items to retrieve are not in the history). None = no such feature.
    user_history_feature: str | None = None
    # In training, each value of the history bag is dropped with this probability (a denoising
    # input dropout, as in Mult-DAE); the embed job always reads the whole bag.
    history_dropout: float = 0.0
    # The history bag is in time order, oldest first, and each training row keeps only the
    # values before its target: the items its user had before it, as when serving the next item
    # after the whole history (YouTube-DNN's "predict the next watch", not a held-out one).
    # Off: the row keeps every value but its target.
    causal_history: bool = False
    # K > 1: each side is K towers trained side by side, each with its own loss, and their
    # embeddings concatenated (K · embedding_dim wide): with dot similarity a score is the sum of
    # the K models' scores, a deep ensemble (Lakshminarayanan et al. 2017) served as one model.
    # K times the training compute and the embedding width.
    ensemble_members: int = 1
    # > 0: one more member of this width, linear: the user embedding is the sum of the history
    # bag's rows (``model.user_history_feature``), the item embedding its ID row, with no layers
    # after them. It is trained on EASE's objective (Steck 2019) with the rank this width allows:
    # reconstruct every user's whole history row, all items scored, each item predicted from
    # the rest of the bag (EASE's zero diagonal), squared error plus ``linear_member_l2`` ·
    # ||weights||². Its user embedding is scaled by ``linear_member_weight`` and appended, so a
    # score is the other members' score + weight × its own.
    linear_member_dim: int = 0
    linear_member_weight: float = 1.0
    linear_member_l2: float = 0.0

    @property
    def output_dim(self) -> int:
        """Width of the embeddings the towers write: ``embedding_dim × ensemble_members`` plus
        ``linear_member_dim``."""
        return self.embedding_dim * self.ensemble_members + self.linear_member_dim


@dataclass(frozen=True)
class LossConfig:
    """Which Contract 5 loss, on which similarity, with which negatives."""

    name: str = "in_batch_softmax"
    similarity: str = "dot"
    temperature: float = 0.05
    margin: float = 0.5
    scale: float = 1.0
    # Subtract log q(item) from logits (listwise losses), q from the dataset's click counts.
    logq_correction: bool = True
    # The in-batch correction takes q(j) ∝ (c_j + 1)^logq_exponent. 1 is the columns' true
    # frequency: the scores learn log p(item | user). Above 1 over-corrects, so the scores keep
    # (exponent − 1) · log p(item) of popularity (logit adjustment, Menon et al. 2021); below 1,
    # less. Catalog samples are corrected by their own sampler_alpha.
    logq_exponent: float = 1.0
    # Mask in-batch columns holding the same item as the row's positive.
    accidental_hit_masking: bool = True
    # Also mask any negative (in-batch column, catalog sample, data negative) that is another of
    # the row's user's train positives: a false negative. Each worker keeps the dataset's train
    # (user, item) pairs, 8 bytes per distinct pair.
    mask_user_positives: bool = False
    # in_batch_softmax: also add the item -> user direction.
    symmetric: bool = False
    # Use the dataset's negatives (neg_item_ids) in the loss.
    use_data_negatives: bool = True
    # Keep only the top-k scored data negatives per row (None = all).
    hard_negative_top_k: int | None = None
    # Weight of each data negative source in the loss (missing = 1.0).
    source_weights: dict[str, float] = field(default_factory=dict)
    # Mixed negative sampling: extra negatives drawn from the whole catalog per batch.
    num_sampled_negatives: int = 0
    sampler_alpha: float = 0.75
    # All-gather item embeddings across DDP workers so in-batch softmax sees the global batch.
    gather_across_workers: bool = False


LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 512
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    # Learning rate over the run: "constant", or "cosine" / "linear" decay from learning_rate
    # to lr_final_fraction × learning_rate at the last step of train.epochs, after
    # lr_warmup_steps of linear warm-up from 0 (set per step from the step counter, so a resumed
    # run continues the schedule).
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    lr_final_fraction: float = 0.0
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    use_gpu: bool = False
    # torch intra-op threads per worker (None = max(1, int(cpus_per_worker))).
    torch_threads: int | None = None
    seed: int = 0
    # Also checkpoint every N steps (None = only at epoch end).
    checkpoint_every_steps: int | None = None
    max_failures: int = 2
    eval_ks: tuple[int, ...] = (10, 50, 100)
    # The eval metric that picks the published epoch (higher is better); "epoch" publishes the
    # last one.
    early_stopping_metric: str = "recall@50"
    # Stop after this many epochs without improvement (None = never).
    early_stopping_patience: int | None = None
    # Evaluate on at most this many eval users each epoch (None = all).
    eval_max_users: int | None = None
    # Materialize the train rows in the Ray object store once (it spills to disk when they do
    # not fit), so later epochs skip Ray Data's per-epoch startup; false streams from Parquet
    # every epoch.
    materialize_dataset: bool = True
    # Each worker shuffles its rows within a buffer of this many batches (0: data order).
    shuffle_buffer_batches: int = 8
    # A worker whose shard holds at most this many bytes (Arrow) keeps it in memory after its
    # first full pass, and from then on shuffles it in memory each epoch (a full shuffle of the
    # shard) instead of streaming it through Ray Data again. Every worker must fit, else all
    # stream. 0 = always stream.
    cache_shard_bytes: int = 1 << 30
    # Batches Ray Data fetches ahead in a background thread of each worker. None: 1 with a GPU
    # (the fetch overlaps device compute), 0 on CPU, where that thread competes with the
    # training step for the same cores and the GIL (one side-by-side round on 2 cores, 1 thread:
    # 1-worker throughput 0.87x of a plain loop with it, 0.99x without).
    prefetch_batches: int | None = None


@dataclass(frozen=True)
class EmbedConfig:
    batch_size: int = 4096
    concurrency: int = 1
    cpus_per_actor: float = 1.0
    use_gpu: bool = False


@dataclass(frozen=True)
class NightlyConfig:
    window_days: int = 7
    gate_metric: str = "recall@50"
    gate_floor: float = 0.0
    # Refuse to publish when the metric drops by more than this fraction of the last published.
    max_relative_drop: float = 0.1
    retention: int = 7


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Check and coerce one value against its (string-free) type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(annotation, value, key)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {annotation} at {key}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s}; valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
    return cls(**kwargs)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-ready dict (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """``"loss.name=bpr"`` -> ``{"loss": {"name": "bpr"}}``; the value is parsed as YAML-ish scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    value: Any = _parse_scalar(raw.strip())
    for part in reversed(dotted.strip().split(".")):
        value = {part: value}
    return value


def _parse_scalar(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none", "~"):
        return None
    if raw.startswith("[") and raw.endswith("]"):
        inner = raw[1:-1].strip()
        return [_parse_scalar(p.strip()) for p in inner.split(",")] if inner else []
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def config_from_dict(
    data: dict[str, Any] | None = None, *, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Validate a nested dict (plus ``section.key=value`` overrides) into a ``Config``."""
    merged: dict[str, Any] = dict(data or {})
    for text in overrides:
        merged = _deep_merge(merged, parse_override(text))
    config = _from_dict(Config, merged, "")
    validate(config)
    return config


def debug_config() -> Config:
    """A tiny preset for tests and the demo: small towers, few epochs, 2 workers."""
    return config_from_dict(DEBUG_PRESET)


DEBUG_PRESET: dict[str, Any] = {
    "model": {
        "embedding_dim": 32,
        "id_embedding_dim": 32,
        "feature_embedding_dim": 8,
        "hidden_dims": [64],
    },
    "train": {"epochs": 3, "batch_size": 256, "num_workers": 2, "cpus_per_worker": 0.5},
    "dataset": {"num_partitions": 4},
}


# ---------------------------------------------------------------------------------------------
# value checks


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _check_name(value: str, valid: typing.Iterable[str], key: str) -> None:
    valid = sorted(valid)
    _require(value in valid, key, f"unknown value {value!r}; valid: {', '.join(valid)}")


def validate(config: Config) -> None:
    """Value checks that types alone cannot express. Raises ``ConfigError`` naming the key."""
    # Imported here: the registries live next to the code they name.
    from twotower_core.losses import LOSSES
    from twotower_core.metrics import metric_names
    from twotower_core.similarity import SIMILARITIES

    ds = config.dataset
    _require(ds.eval_days >= 1, "dataset.eval_days", "must be >= 1")
    _require(ds.window_days is None or ds.window_days >= 2, "dataset.window_days", "must be >= 2")
    _require(
        ds.num_partitions is None or ds.num_partitions >= 1, "dataset.num_partitions", "must be >= 1"
    )
    _require(ds.shuffle_batch_mb >= 1, "dataset.shuffle_batch_mb", "must be >= 1")
    _require(ds.min_dwell_s is None or ds.min_dwell_s >= 0, "dataset.min_dwell_s", "must be >= 0")
    _require(
        ds.max_quarantine_fraction is None or 0.0 <= ds.max_quarantine_fraction <= 1.0,
        "dataset.max_quarantine_fraction",
        "must be in [0, 1]",
    )
    for source, count in ds.negatives.counts().items():
        _require(count >= 0, f"dataset.negatives.{source}", "must be >= 0")
    _require(ds.negatives.unexposed_alpha >= 0, "dataset.negatives.unexposed_alpha", "must be >= 0")
    _require(
        ds.negatives.ranked_out_min_rank >= 0,
        "dataset.negatives.ranked_out_min_rank",
        "must be >= 0",
    )
    max_rank = ds.negatives.ranked_out_max_rank
    _require(
        max_rank is None or max_rank >= ds.negatives.ranked_out_min_rank,
        "dataset.negatives.ranked_out_max_rank",
        "must be >= ranked_out_min_rank",
    )

    m = config.model
    for name in (
        "embedding_dim",
        "id_embedding_dim",
        "feature_embedding_dim",
        "num_oov_buckets",
        "ensemble_members",
    ):
        _require(getattr(m, name) >= 1, f"model.{name}", "must be >= 1")
    _require(all(h >= 1 for h in m.hidden_dims), "model.hidden_dims", "every size must be >= 1")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    _check_name(m.activation, ("relu", "gelu", "tanh", "silu"), "model.activation")
    _check_name(m.bag_pooling, BAG_POOLINGS, "model.bag_pooling")
    _require(
        m.use_ids or m.use_features,
        "model.use_ids",
        "use_ids and use_features cannot both be false",
    )
    for side in ("user_feature_kinds", "item_feature_kinds"):
        for column, kind in getattr(m, side).items():
            _check_name(kind, FEATURE_KINDS, f"model.{side}.{column}")
    _require(0.0 <= m.history_dropout < 1.0, "model.history_dropout", "must be in [0, 1)")
    _require(
        m.history_dropout == 0.0 or m.user_history_feature is not None,
        "model.history_dropout",
        "needs model.user_history_feature",
    )
    _require(
        not m.causal_history or m.user_history_feature is not None,
        "model.causal_history",
        "needs model.user_history_feature",
    )
    history = m.user_history_feature
    if history is not None:
        _require(bool(history), "model.user_history_feature", "must be a column name or null")
        _require(m.use_features, "model.user_history_feature", "needs model.use_features")
        _require(
            m.user_feature_kinds.get(history, "bag") == "bag",
            "model.user_history_feature",
            f"names {history!r}, whose kind in model.user_feature_kinds is "
            f"{m.user_feature_kinds.get(history)!r}, not bag",
        )

    _require(m.linear_member_dim >= 0, "model.linear_member_dim", "must be >= 0")
    _require(m.linear_member_weight > 0, "model.linear_member_weight", "must be > 0")
    _require(m.linear_member_l2 >= 0, "model.linear_member_l2", "must be >= 0")
    if m.linear_member_dim > 0:
        _require(
            m.user_history_feature is not None,
            "model.linear_member_dim",
            "needs model.user_history_feature (the bag the linear member reconstructs)",
        )
        _require(
            config.loss.similarity == "dot" and not m.normalize,
            "model.linear_member_dim",
            "needs loss.similarity=dot and model.normalize=false: only then is a score the "
            "sum of the members' scores",
        )

    loss = config.loss
    _check_name(loss.name, LOSSES, "loss.name")
    _check_name(loss.similarity, SIMILARITIES, "loss.similarity")
    _require(loss.temperature > 0, "loss.temperature", "must be > 0")
    _require(loss.margin >= 0, "loss.margin", "must be >= 0")
    _require(loss.scale > 0, "loss.scale", "must be > 0")
    _require(loss.num_sampled_negatives >= 0, "loss.num_sampled_negatives", "must be >= 0")
    _require(loss.sampler_alpha >= 0, "loss.sampler_alpha", "must be >= 0")
    _require(loss.logq_exponent >= 0, "loss.logq_exponent", "must be >= 0")
    _require(
        m.ensemble_members == 1
        or loss.similarity == "dot"
        or (loss.similarity == "cosine" and m.normalize),
        "model.ensemble_members",
        "needs loss.similarity=dot (or cosine with model.normalize): only then do the "
        "concatenated embeddings score the sum (or mean) of the members' scores",
    )
    _require(
        loss.hard_negative_top_k is None or loss.hard_negative_top_k >= 1,
        "loss.hard_negative_top_k",
        "must be >= 1",
    )
    for source, weight in loss.source_weights.items():
        _check_name(source, NEGATIVE_SOURCES, f"loss.source_weights.{source}")
        _require(weight >= 0, f"loss.source_weights.{source}", "must be >= 0")

    t = config.train
    _require(t.epochs >= 1, "train.epochs", "must be >= 1")
    _require(t.batch_size >= 2, "train.batch_size", "must be >= 2")
    _require(t.learning_rate > 0, "train.learning_rate", "must be > 0")
    _require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check_name(t.optimizer, ("adam", "adamw", "adagrad", "sgd"), "train.optimizer")
    _check_name(t.lr_schedule, LR_SCHEDULES, "train.lr_schedule")
    _require(t.lr_warmup_steps >= 0, "train.lr_warmup_steps", "must be >= 0")
    _require(0 <= t.lr_final_fraction <= 1, "train.lr_final_fraction", "must be in [0, 1]")
    _require(t.num_workers >= 1, "train.num_workers", "must be >= 1")
    _require(t.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0")
    _require(t.max_failures >= 0, "train.max_failures", "must be >= 0")
    _require(t.shuffle_buffer_batches >= 0, "train.shuffle_buffer_batches", "must be >= 0")
    _require(t.cache_shard_bytes >= 0, "train.cache_shard_bytes", "must be >= 0")
    _require(
        t.prefetch_batches is None or t.prefetch_batches >= 0, "train.prefetch_batches", "must be >= 0"
    )
    _require(bool(t.eval_ks) and all(k >= 1 for k in t.eval_ks), "train.eval_ks", "must be >= 1")
    _check_name(
        t.early_stopping_metric,
        [*metric_names(t.eval_ks), "epoch"],
        "train.early_stopping_metric",
    )
    _require(
        t.early_stopping_patience is None or t.early_stopping_patience >= 1,
        "train.early_stopping_patience",
        "must be >= 1",
    )
    _require(t.eval_max_users is None or t.eval_max_users >= 1, "train.eval_max_users", "must be >= 1")
    _require(t.torch_threads is None or t.torch_threads >= 1, "train.torch_threads", "must be >= 1")
    _require(
        t.checkpoint_every_steps is None or t.checkpoint_every_steps >= 1,
        "train.checkpoint_every_steps",
        "must be >= 1",
    )

    e = config.embed
    _require(e.batch_size >= 1, "embed.batch_size", "must be >= 1")
    _require(e.concurrency >= 1, "embed.concurrency", "must be >= 1")

    n = config.nightly
    _require(n.retention >= 1, "nightly.retention", "must be >= 1")
    _require(0.0 <= n.max_relative_drop <= 1.0, "nightly.max_relative_drop", "must be in [0, 1]")
