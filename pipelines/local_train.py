"""Training in one process, without Ray: the model, task, optimizer and step of the Ray Train
job (``pipelines.train_loop``), for many small runs side by side (``twotower study`` cells,
benchmark tuning).

Legend: R train rows, N data negatives per row, B rows per step.

One step takes ``train.batch_size × train.num_workers`` rows: the step of the Ray job's
``num_workers`` DDP workers with ``loss.gather_across_workers`` (every worker's softmax over the
global batch; DDP averages the workers' losses), except that catalog samples
(``num_sampled_negatives``) are drawn once per step instead of once per worker. Each epoch
visits the rows in a permutation seeded by ``(train.seed, epoch)`` and drops the last partial
batch, so two runs with the same rows, config and seed take the very same steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines import io
from pipelines.features import infer_feature_specs
from pipelines.train_loop import (
    TRAIN_COLUMNS,
    TowerPair,
    _optimizer,
    _train_step,
    batch_tensors,
    learning_rate_at,
    load_entity_tables,
    load_history_codes,
    load_user_positives,
    set_learning_rate,
)
from twotower_core.config import Config
from twotower_core.features import FeatureTable
from twotower_core.task import build_task
from twotower_core.towers import TwoTowerModel, build_two_tower

USER_KEY_COLUMNS = {"user_idx", "user_id"}
ITEM_KEY_COLUMNS = {"item_idx", "item_id"}


@dataclass(frozen=True)
class TrainRows:
    """A dataset's train rows as index tensors (what ``batch_tensors`` makes of them)."""

    user_idx: torch.Tensor  # [R]
    item_idx: torch.Tensor  # [R]
    neg_item_idx: torch.Tensor  # [R, N]
    # [R, N] codes into NEGATIVE_SOURCES
    neg_source: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.user_idx.shape[0])

    def batch(self, rows_B: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "user_idx": self.user_idx[rows_B],
            "item_idx": self.item_idx[rows_B],
            "neg_item_idx": self.neg_item_idx[rows_B],
            "neg_source": self.neg_source[rows_B],
        }


def read_train_rows(dataset: str) -> TrainRows:
    tensors = batch_tensors(io.read_table(io.join(dataset, "train"), columns=TRAIN_COLUMNS))
    return TrainRows(
        user_idx=tensors["user_idx"],
        item_idx=tensors["item_idx"],
        neg_item_idx=tensors["neg_item_idx"],
        neg_source=tensors["neg_source"],
    )


@dataclass
class LocalFit:
    """The trained model with the tables it reads, and what training cost."""

    model: TwoTowerModel
    user_table: FeatureTable
    item_table: FeatureTable
    num_users: int
    num_items: int
    # One row per epoch: epoch, train_loss, train_seconds, seconds (with evaluation), metrics.
    history: list[dict[str, float]] = field(default_factory=list)
    # Time spent in training steps, evaluation excluded.
    train_seconds: float = 0.0
    steps: int = 0
    examples: int = 0


# (model, user table, item table) -> metrics; called with the model in eval mode.
Evaluate = Callable[[TwoTowerModel, FeatureTable, FeatureTable], dict[str, float]]


def feature_specs(dataset: str, config: Config):
    """(user specs, item specs) of the dataset's feature tables, for this loop and the Ray job
    (``jobs.train.infer_specs``) alike."""
    users = io.read_table(io.join(dataset, "features", "users.parquet"))
    items = io.read_table(io.join(dataset, "features", "items.parquet"))
    user_specs = infer_feature_specs(
        users, exclude=USER_KEY_COLUMNS, overrides=config.model.user_feature_kinds
    )
    item_specs = infer_feature_specs(
        items, exclude=ITEM_KEY_COLUMNS, overrides=config.model.item_feature_kinds
    )
    return user_specs, item_specs


def _device(config: Config) -> torch.device:
    """``cuda`` with ``train.use_gpu`` (refused when torch sees no CUDA device), else ``cpu``."""
    if not config.train.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.use_gpu is set but torch sees no CUDA device on this machine")
    return torch.device("cuda")


def fit(
    dataset: str,
    config: Config,
    *,
    rows: TrainRows | None = None,
    evaluate: Evaluate | None = None,
    metric: str | None = None,
    patience: int | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> LocalFit:
    """Train ``config.train.epochs`` epochs on ``dataset`` in this process.

    Args:
        dataset: a Contract 2 dataset dir (features, vocab counts; train rows unless ``rows``).
        config: model, loss and train settings; ``train.torch_threads`` (default 1) threads;
            ``train.use_gpu``: model and feature tables on the (first) CUDA device.
        rows: the train rows to use instead of the dataset's (e.g. with some negatives dropped).
        evaluate: scores the model after every epoch; its metrics go into the history row.
        metric: with ``evaluate`` and ``patience``: stop after ``patience`` epochs without a
            gain in this metric.
        patience: see ``metric``; None = train every epoch.
        on_epoch: called with each history row (progress printing).
    """
    t = config.train
    torch.manual_seed(t.seed)
    # One intra-op thread: the step is small, and on a shared machine more threads only spin.
    torch.set_num_threads(t.torch_threads or 1)
    user_specs, item_specs = feature_specs(dataset, config)
    user_table, item_table, num_users, num_items, counts = load_entity_tables(
        dataset, user_specs, item_specs
    )
    model = build_two_tower(
        config.model,
        num_users=num_users,
        num_items=num_items,
        user_specs=user_specs,
        item_specs=item_specs,
    )
    device = _device(config)
    # On the device before the optimizer exists, as in the Ray job.
    model.to(device)
    user_table, item_table = user_table.to(device), item_table.to(device)
    history = load_history_codes(dataset, user_specs, config, device)
    pair = TowerPair.for_model_config(model, user_table, item_table, history, config.model)
    task = build_task(
        config.loss,
        item_counts=counts,
        user_positives=load_user_positives(dataset, config, num_items),
    )
    optimizer = _optimizer(config, model.parameters())
    if rows is None:
        rows = read_train_rows(dataset)
    batch_size = t.batch_size * t.num_workers
    generator = torch.Generator().manual_seed(t.seed)
    result = LocalFit(model, user_table, item_table, num_users, num_items)
    best, since_best = -math.inf, 0
    total_steps = t.epochs * (rows.num_rows // batch_size)
    for epoch in range(t.epochs):
        started = time.perf_counter()
        order_R = torch.as_tensor(np.random.default_rng([t.seed, epoch]).permutation(rows.num_rows))
        losses = []
        model.train()
        for start in range(0, rows.num_rows - batch_size + 1, batch_size):
            batch = rows.batch(order_R[start : start + batch_size])
            step = result.steps + len(losses)
            set_learning_rate(optimizer, learning_rate_at(t, step, total_steps))
            losses.append(
                _train_step(pair, task, optimizer, batch, config, generator, num_items, device)
            )
        train_seconds = time.perf_counter() - started
        result.train_seconds += train_seconds
        result.steps += len(losses)
        result.examples += len(losses) * batch_size
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": float(torch.stack(losses).mean()) if losses else math.nan,
            "train_seconds": train_seconds,
        }
        model.eval()
        if evaluate is not None:
            row.update(evaluate(model, user_table, item_table))
        row["seconds"] = time.perf_counter() - started
        result.history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if metric is None or patience is None or evaluate is None:
            continue
        if row[metric] > best:
            best, since_best = row[metric], 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    model.eval()
    return result
