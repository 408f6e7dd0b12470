"""The per-worker training loop run by Ray Train's TorchTrainer, and what it reads.

Legend: B batch, N data negatives per row, S sampled negatives per batch, D embedding dim,
M items embedded in one step (B + B·N + S).

Every worker reads the small per-entity tables (features, vocab counts) itself; training rows
stream in through ``ray.train.get_dataset_shard("train")``. Rank 0 evaluates at the end of each
epoch and writes the checkpoint; every worker calls ``ray.train.report`` (it is a barrier).
A checkpoint carries the model, the optimizer, the step counter, the metric history and the
best weights so far, so a restarted worker group or a relaunched driver resumes where it was.
"""

from __future__ import annotations

import csv
import io as _stdio
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from pipelines import io
from pipelines.checkpoint import model_payload, row_map
from pipelines.features import build_feature_table
from twotower_core.config import (
    NEGATIVE_SOURCES,
    Config,
    LossConfig,
    ModelConfig,
    TrainConfig,
    config_from_dict,
)
from twotower_core.features import FeatureSpec, FeatureTable
from twotower_core.losses import linear_autoencoder_rows
from twotower_core.metrics import retrieval_metrics
from twotower_core.negatives import UserPositives
from twotower_core.task import build_task
from twotower_core.towers import TwoTowerModel, build_two_tower, linear_members, member_chunks

STATE_FILE = "train_state.pt"
TRAIN_COLUMNS = ["user_idx", "item_idx", "neg_item_idxs", "neg_sources"]


def train_columns(loss: LossConfig) -> list[str]:
    """The train split's columns a run reads: the data negatives only when the loss uses them,
    and their sources only when ``loss.source_weights`` weighs one of them. Every column not read
    is bytes the workers neither fetch, shuffle nor convert (``neg_sources`` is a list of
    strings per row: the dearest column to move)."""
    columns = ["user_idx", "item_idx"]
    if loss.use_data_negatives:
        columns.append("neg_item_idxs")
        if any(weight != 1.0 for weight in loss.source_weights.values()):
            columns.append("neg_sources")
    return columns


class TowerPair(nn.Module):
    """Both towers behind one ``forward`` so DDP sees every parameter in a single call.

    Feature tables are plain tensors looked up by index, not parameters or buffers: DDP
    never broadcasts them. With ``history`` (``model.user_history_feature``: the bag feature's
    name and the [I] code of each item in it), each row's target item is taken out of its
    user's bag (with ``causal``, the bag is cut at the target: only the values before it stay),
    and in train mode each other value is dropped with ``history_dropout``.
    """

    def __init__(
        self,
        model: TwoTowerModel,
        user_features: FeatureTable,
        item_features: FeatureTable,
        history: tuple[str, torch.Tensor] | None = None,
        history_dropout: float = 0.0,
        causal: bool = False,
    ):
        super().__init__()
        self.model = model
        self.user_features = user_features
        self.item_features = item_features
        self.history = history
        self.history_dropout = history_dropout
        self.causal = causal

    @classmethod
    def for_model_config(
        cls,
        model: TwoTowerModel,
        user_features: FeatureTable,
        item_features: FeatureTable,
        history: tuple[str, torch.Tensor] | None,
        config: ModelConfig,
    ) -> TowerPair:
        """The pair with ``model.history_dropout`` and ``model.causal_history`` applied."""
        return cls(
            model,
            user_features,
            item_features,
            history,
            config.history_dropout,
            causal=config.causal_history,
        )

    def forward(
        self,
        user_idx_B: torch.Tensor,
        item_idx_M: torch.Tensor,
        target_item_idx_B: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        user_features = self.user_features.lookup(user_idx_B)
        if self.history is not None and target_item_idx_B is not None:
            name, codes_I = self.history
            cut = before_targets if self.causal else without_targets
            bag_BL = cut(user_features[name], codes_I[target_item_idx_B.to(codes_I.device)])
            if self.training and self.history_dropout > 0:
                dropped_BL = torch.rand(bag_BL.shape, device=bag_BL.device) < self.history_dropout
                bag_BL = bag_BL.masked_fill(dropped_BL, 0)
            user_features[name] = bag_BL
        user_BD = self.model.user_tower(user_idx_B, user_features)
        item_MD = self.model.item_tower(item_idx_M, self.item_features.lookup(item_idx_M))
        return user_BD, item_MD


def without_targets(bag_BL: torch.Tensor, target_code_B: torch.Tensor) -> torch.Tensor:
    """[B, L] bag codes with each row's target code set to 0 (padding); code 0 stays 0."""
    return bag_BL.masked_fill(bag_BL == target_code_B[:, None], 0)


def before_targets(bag_BL: torch.Tensor, target_code_B: torch.Tensor) -> torch.Tensor:
    """[B, L] time-ordered bag codes with each row's target and every value after it set to 0.

    The cut is at the target's first occurrence (a repeated item sees the past of its first
    time). A row whose target is not in its bag (or has code 0, no code) keeps the whole bag.
    """
    hit_BL = (bag_BL == target_code_B[:, None]) & (target_code_B[:, None] != 0)
    length = bag_BL.shape[1]
    # First position of the target, or L where it is absent.
    cut_B = torch.where(hit_BL.any(dim=1), hit_BL.int().argmax(dim=1), length)
    positions_L = torch.arange(length, device=bag_BL.device)
    return bag_BL.masked_fill(positions_L[None, :] >= cut_B[:, None], 0)


def load_history_codes(
    dataset_dir: str,
    user_specs: list[FeatureSpec],
    config: Config,
    device: torch.device | None = None,
) -> tuple[str, torch.Tensor] | None:
    """(feature, [I] code of each item in it, on ``device``) for ``model.user_history_feature``,
    or None."""
    from pipelines.features import history_codes

    feature = config.model.user_history_feature
    if feature is None:
        return None
    item_ids = io.read_table(io.join(dataset_dir, "vocab", "items.parquet"), columns=["item_id"])
    codes_I = torch.from_numpy(history_codes(user_specs, feature, item_ids["item_id"]))
    return feature, codes_I.to(device) if device is not None else codes_I


def load_user_positives(dataset_dir: str, config: Config, num_items: int) -> UserPositives | None:
    """The train split's (user, item) pairs for ``loss.mask_user_positives``, or None."""
    if not config.loss.mask_user_positives:
        return None
    pairs = io.read_table(io.join(dataset_dir, "train"), columns=["user_idx", "item_idx"])
    return UserPositives(
        _long_tensor(pairs["user_idx"]), _long_tensor(pairs["item_idx"]), num_items=num_items
    )


@dataclass
class EvalData:
    """Held-out positives of the eval users, and their train positives to exclude (CSR)."""

    user_idx: np.ndarray  # [U] eval users
    eval_indptr: np.ndarray  # [U + 1]
    eval_items: np.ndarray  # [nnz]
    exclude_indptr: np.ndarray  # [U + 1]
    exclude_items: np.ndarray


@dataclass
class TrainState:
    epoch: int = 0  # epochs fully done
    global_step: int = 0
    step_in_epoch: int = 0  # batches done in the current (unfinished) epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float = -math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    best_state_dict: dict[str, torch.Tensor] | None = None
    # global_step at every restore from a checkpoint (worker restart or relaunched driver).
    resumed_at_steps: list[int] = field(default_factory=list)
    # --init-from: ids kept and new per tower, tensors left fresh (None without a warm start).
    warm_start: dict[str, Any] | None = None


def to_csr(
    rows: np.ndarray, values: np.ndarray, row_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Group ``values`` by ``rows`` into CSR aligned to ``row_ids`` (sorted unique)."""
    order = np.lexsort((values, rows))
    rows, values = rows[order], values[order]
    positions = np.searchsorted(row_ids, rows)
    keep = (positions < len(row_ids)) & (row_ids[np.minimum(positions, len(row_ids) - 1)] == rows)
    positions, values = positions[keep], values[keep]
    counts = np.bincount(positions, minlength=len(row_ids))
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return indptr, values.astype(np.int64)


def load_eval_data(dataset_dir: str, *, max_users: int | None, seed: int) -> EvalData:
    eval_table = io.read_table(io.join(dataset_dir, "eval"), columns=["user_idx", "item_idx"])
    eval_users = eval_table["user_idx"].to_numpy()
    eval_items = eval_table["item_idx"].to_numpy()
    users = np.unique(eval_users)
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))
    eval_indptr, eval_values = to_csr(eval_users, eval_items, users)
    train = io.read_table(io.join(dataset_dir, "train"), columns=["user_idx", "item_idx"])
    exclude_indptr, exclude_values = to_csr(
        train["user_idx"].to_numpy(), train["item_idx"].to_numpy(), users
    )
    # A user's train positives may repeat (clicked in several requests): keep each item once.
    exclude_indptr, exclude_values = _dedupe_csr(exclude_indptr, exclude_values)
    return EvalData(users, eval_indptr, eval_values, exclude_indptr, exclude_values)


def _dedupe_csr(indptr: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    pairs = (
        np.unique(np.stack([rows, values], axis=1), axis=0)
        if len(values)
        else np.zeros((0, 2), np.int64)
    )
    counts = np.bincount(pairs[:, 0], minlength=len(indptr) - 1)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), pairs[:, 1].astype(np.int64)


@torch.no_grad()
def embed_all(
    tower: nn.Module, table: FeatureTable, idx: np.ndarray, *, chunk: int = 8192
) -> torch.Tensor:
    """Tower outputs for the given entity rows, in chunks: ``[len(idx), D]``."""
    outputs = []
    device = next(tower.parameters()).device
    for start in range(0, len(idx), chunk):
        ids = torch.as_tensor(idx[start : start + chunk], dtype=torch.long, device=device)
        outputs.append(tower(ids, table.lookup(ids)))
    return torch.cat(outputs) if outputs else torch.zeros(0)


def evaluate_model(
    model: TwoTowerModel,
    *,
    user_features: FeatureTable,
    item_features: FeatureTable,
    num_items: int,
    eval_data: EvalData,
    similarity: str,
    ks: tuple[int, ...],
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    user_UD = embed_all(model.user_tower, user_features, eval_data.user_idx)
    item_ID = embed_all(model.item_tower, item_features, np.arange(num_items))
    model.train(was_training)
    return retrieval_metrics(
        user_UD,
        item_ID,
        similarity=similarity,
        eval_indptr=torch.as_tensor(eval_data.eval_indptr),
        eval_items=torch.as_tensor(eval_data.eval_items),
        exclude_indptr=torch.as_tensor(eval_data.exclude_indptr),
        exclude_items=torch.as_tensor(eval_data.exclude_items),
        ks=ks,
    )


def _long_tensor(values: pa.Array | pa.ChunkedArray) -> torch.Tensor:
    # torch.tensor copies: Arrow buffers are read-only.
    return torch.tensor(values.to_numpy(zero_copy_only=False), dtype=torch.long)


def batch_tensors(batch: pa.Table) -> dict[str, torch.Tensor]:
    """A pyarrow batch of train rows -> index tensors (``neg_*`` are ``[B, N]``).

    Without a ``neg_item_idxs`` column (see ``train_columns``) N is 0; without ``neg_sources``
    there is no ``neg_source`` tensor.
    """
    num_rows = batch.num_rows
    tensors = {
        "user_idx": _long_tensor(batch["user_idx"]),
        "item_idx": _long_tensor(batch["item_idx"]),
        "neg_item_idx": torch.zeros((num_rows, 0), dtype=torch.long),
    }
    if "neg_item_idxs" not in batch.column_names:
        return tensors
    neg_flat = pc.list_flatten(batch["neg_item_idxs"])
    num_negatives = len(neg_flat) // num_rows if num_rows else 0
    tensors["neg_item_idx"] = _long_tensor(neg_flat).view(num_rows, num_negatives)
    if "neg_sources" in batch.column_names:
        sources_flat = pc.index_in(
            pc.list_flatten(batch["neg_sources"]), value_set=pa.array(NEGATIVE_SOURCES)
        )
        tensors["neg_source"] = _long_tensor(sources_flat).view(num_rows, num_negatives)
    return tensors


class ShardCache:
    """One worker's shard, collected batch by batch as it streams past.

    Past ``max_bytes`` (``train.cache_shard_bytes``) it gives up and lets go of what it holds;
    ``fits`` says whether it kept everything.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.batches: list[pa.Table] | None = [] if max_bytes > 0 else None
        self.nbytes = 0

    @property
    def fits(self) -> bool:
        return self.batches is not None

    def add(self, batch: pa.Table) -> None:
        if self.batches is None:
            return
        self.nbytes += batch.nbytes
        if self.nbytes > self.max_bytes:
            self.batches = None
        else:
            self.batches.append(batch)

    def table(self) -> pa.Table:
        """The shard as one table, copied out of its batches (they may be views of Ray blocks)."""
        if self.batches is None:
            raise ValueError("the shard did not fit in train.cache_shard_bytes")
        return pa.concat_tables(self.batches).combine_chunks()


def cached_batches(
    table: pa.Table, batch_size: int, *, shuffle_seed: tuple[int, ...] | None
) -> Iterator[pa.Table]:
    """Full batches of a cached shard: a fresh permutation of every row per seed (data order
    without one); the last partial batch is left out, as when streaming.

    Each shuffled batch is gathered on its own (``take`` of its slice of the permutation), so
    the shard is never held twice: no shuffled copy of the whole table is built.
    """
    order = None
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(table.num_rows)
    for start in range(0, table.num_rows - batch_size + 1, batch_size):
        if order is None:
            yield table.slice(start, batch_size)
        else:
            yield table.take(order[start : start + batch_size])


def learning_rate_at(t: TrainConfig, step: int, total_steps: int) -> float:
    """``train.lr_schedule``: the learning rate of optimizer step ``step`` (0-based) of a run of
    ``total_steps`` (all of ``train.epochs``)."""
    base = t.learning_rate
    if step < t.lr_warmup_steps:
        return base * (step + 1) / t.lr_warmup_steps
    if t.lr_schedule == "constant":
        return base
    # 0 at the first step after warm-up, 1 at the last step of the run.
    span = max(total_steps - t.lr_warmup_steps - 1, 1)
    progress = min(max((step - t.lr_warmup_steps) / span, 0), 1)
    if t.lr_schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = 1 - progress
    return base * (t.lr_final_fraction + (1 - t.lr_final_fraction) * shape)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _optimizer(config: Config, parameters) -> torch.optim.Optimizer:
    t = config.train
    if t.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=t.learning_rate, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=t.learning_rate, weight_decay=t.weight_decay)
    if t.optimizer == "adagrad":
        return torch.optim.Adagrad(parameters, lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.SGD(
        parameters, lr=t.learning_rate, weight_decay=t.weight_decay, momentum=0.9
    )


def history_csv(history: list[dict[str, Any]]) -> str:
    if not history:
        return ""
    columns = list(dict.fromkeys(key for row in history for key in row))
    buffer = _stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def load_entity_tables(
    dataset_dir: str, user_specs: list[FeatureSpec], item_specs: list[FeatureSpec]
):
    users = io.read_table(io.join(dataset_dir, "features", "users.parquet"))
    items = io.read_table(io.join(dataset_dir, "features", "items.parquet"))
    item_counts = io.read_table(io.join(dataset_dir, "vocab", "items.parquet"), columns=["count"])
    return (
        build_feature_table(users, user_specs),
        build_feature_table(items, item_specs),
        users.num_rows,
        items.num_rows,
        torch.tensor(item_counts["count"].to_numpy(zero_copy_only=False), dtype=torch.float64),
    )


def warm_start(model: TwoTowerModel, init_from: str, dataset_dir: str):
    """Copy a previous model's rows for ids known to both; new ids keep their fresh init.
    Returns the ``WarmStartReport`` (rows kept and new per tower)."""
    from pipelines.checkpoint import CHECKPOINT_DIR, MODEL_FILE, VOCAB_DIR
    from twotower_core.towers import remap_id_rows

    payload = io.load_torch(io.join(init_from, CHECKPOINT_DIR, MODEL_FILE))
    maps = {}
    for side, column in (("users", "user_id"), ("items", "item_id")):
        old = io.read_table(
            io.join(init_from, CHECKPOINT_DIR, VOCAB_DIR, f"{side}.parquet"), columns=[column]
        )
        new = io.read_table(io.join(dataset_dir, "vocab", f"{side}.parquet"), columns=[column])
        maps[side] = torch.as_tensor(row_map(old[column], new[column]))
    return remap_id_rows(
        model,
        payload["state_dict"],
        user_index_map=maps["users"],
        item_index_map=maps["items"],
        old_user_specs=[FeatureSpec.from_dict(d) for d in payload["user_specs"]],
        old_item_specs=[FeatureSpec.from_dict(d) for d in payload["item_specs"]],
    )


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    import ray.train
    import ray.train.torch

    config = config_from_dict(loop_config["config"])
    dataset_dir: str = loop_config["dataset"]
    user_specs = [FeatureSpec.from_dict(d) for d in loop_config["user_specs"]]
    item_specs = [FeatureSpec.from_dict(d) for d in loop_config["item_specs"]]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    t = config.train
    torch.set_num_threads(t.torch_threads or max(1, int(t.cpus_per_worker)))
    torch.manual_seed(t.seed)

    user_table, item_table, num_users, num_items, item_counts = load_entity_tables(
        dataset_dir, user_specs, item_specs
    )
    model = build_two_tower(
        config.model,
        num_users=num_users,
        num_items=num_items,
        user_specs=user_specs,
        item_specs=item_specs,
    )
    task = build_task(
        config.loss,
        item_counts=item_counts,
        user_positives=load_user_positives(dataset_dir, config, num_items),
    )
    state = TrainState()
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")

    checkpoint = ray.train.get_checkpoint()
    saved = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = torch.load(
                os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False
            )
        model.load_state_dict(saved["model"])
    elif loop_config.get("init_from"):
        report = warm_start(model, loop_config["init_from"], dataset_dir)
        state.warm_start = {
            "kept_rows": report.kept_rows,
            "new_rows": report.new_rows,
            "fresh_tensors": report.fresh,
        }
        if rank == 0:
            print(
                f"[train] warm start from {loop_config['init_from']}: "
                + "; ".join(
                    f"{tower} {report.kept_rows[tower]} ids kept, {report.new_rows[tower]} new"
                    for tower in report.kept_rows
                )
                + f"; {len(report.fresh)} tensors fresh",
                flush=True,
            )
    # On the device before the optimizer exists: a loaded optimizer state follows its
    # parameters' device, and moving the model afterwards would leave it behind.
    model.to(device)
    optimizer = _optimizer(config, model.parameters())
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        state.resumed_at_steps.append(state.global_step)
        if rank == 0:
            print(
                f"[train] resumed from checkpoint: epoch {state.epoch}, step {state.global_step}",
                flush=True,
            )

    user_table, item_table = user_table.to(device), item_table.to(device)
    history = load_history_codes(dataset_dir, user_specs, config, device)
    pair = TowerPair.for_model_config(model, user_table, item_table, history, config.model)
    pair = ray.train.torch.prepare_model(pair)
    eval_data = (
        load_eval_data(dataset_dir, max_users=t.eval_max_users, seed=t.seed) if rank == 0 else None
    )
    generator = torch.Generator().manual_seed(t.seed * 1000 + rank)
    shard = ray.train.get_dataset_shard("train")
    # Ray Train splits the rows equally; every worker trains on this many full batches an epoch.
    total_steps = t.epochs * (loop_config["train_rows"] // world_size // t.batch_size)

    def save_and_report(metrics: dict[str, Any]) -> None:
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state},
                os.path.join(directory, STATE_FILE),
            )
            payload = model_payload(
                state.best_state_dict or model.state_dict(),
                config=config,
                user_specs=user_specs,
                item_specs=item_specs,
                num_users=num_users,
                num_items=num_items,
            )
            torch.save(payload, os.path.join(directory, "best_model.pt"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    cached: pa.Table | None = None  # this worker's shard, once every worker's fit in memory
    while state.epoch < t.epochs:
        pair.train()
        skip = state.step_in_epoch
        loss_sum, loss_count, started, examples = 0.0, 0, time.perf_counter(), 0
        last_log = started
        collector = None
        if cached is not None:
            batches = cached_batches(
                cached,
                t.batch_size,
                shuffle_seed=(t.seed, state.epoch, rank) if t.shuffle_buffer_batches else None,
            )
        else:
            collector = ShardCache(t.cache_shard_bytes)
            # Every row comes through, for the cache; only full batches are trained on.
            batches = shard.iter_batches(
                batch_size=t.batch_size,
                batch_format="pyarrow",
                drop_last=False,
                local_shuffle_buffer_size=t.batch_size * t.shuffle_buffer_batches or None,
                local_shuffle_seed=t.seed + state.epoch if t.shuffle_buffer_batches else None,
                prefetch_batches=prefetch_batches(t),
            )
        for batch_number, batch in enumerate(batches):
            if collector is not None:
                collector.add(batch)
            if batch_number < skip or batch.num_rows < t.batch_size:
                continue
            set_learning_rate(optimizer, learning_rate_at(t, state.global_step, total_steps))
            loss = _train_step(
                pair, task, optimizer, batch_tensors(batch), config, generator, num_items, device
            )
            state.global_step += 1
            state.step_in_epoch = batch_number + 1
            loss_sum, loss_count = loss_sum + loss, loss_count + 1
            examples += batch.num_rows
            now = time.perf_counter()
            if rank == 0 and now - last_log >= 10:
                print(
                    f"[train] epoch {state.epoch + 1}/{t.epochs} step {state.global_step} "
                    f"loss {float(loss_sum) / loss_count:.4f} {examples * world_size / (now - started):.0f} examples/s",
                    flush=True,
                )
                last_log = now
            if t.checkpoint_every_steps and state.global_step % t.checkpoint_every_steps == 0:
                save_and_report(
                    {
                        "epoch": state.epoch,
                        "step": state.global_step,
                        "train_loss": float(loss_sum) / loss_count,
                    }
                )
        # Reading the loss waits for the device's last step: the epoch's time covers its work.
        loss_total = float(loss_sum)
        elapsed = time.perf_counter() - started
        epoch_loss = _mean_across_workers(loss_total, loss_count)
        row: dict[str, Any] = {
            "epoch": state.epoch + 1,
            "step": state.global_step,
            "train_loss": epoch_loss,
            "examples_per_s": examples * world_size / max(elapsed, 1e-9),
            "epoch_seconds": elapsed,
            "learning_rate": optimizer.param_groups[0]["lr"],  # at the epoch's last step
            "data": "memory" if collector is None else "stream",
        }
        if collector is not None and t.cache_shard_bytes > 0:
            # All or none: a worker that stops streaming while another streams on would leave
            # Ray Data's split waiting for it at the next epoch.
            if _all_workers(collector.fits):
                cached = collector.table()
                if rank == 0:
                    print(
                        f"[train] shard kept in memory ({cached.nbytes / 2**20:.1f} MiB on rank "
                        "0): later epochs shuffle it there instead of streaming it again",
                        flush=True,
                    )
            elif rank == 0:
                print(
                    "[train] a worker's shard is over train.cache_shard_bytes "
                    f"({t.cache_shard_bytes:,} bytes): every epoch streams",
                    flush=True,
                )
            collector = None
        stop = False
        if rank == 0:
            assert eval_data is not None
            row.update(
                evaluate_model(
                    model,
                    user_features=user_table,
                    item_features=item_table,
                    num_items=num_items,
                    eval_data=eval_data,
                    similarity=config.loss.similarity,
                    ks=t.eval_ks,
                )
            )
            score = row.get(t.early_stopping_metric, -math.inf)
            if score > state.best_metric:
                state.best_metric, state.best_epoch = score, state.epoch + 1
                state.epochs_without_improvement = 0
                state.best_state_dict = {
                    k: v.detach().clone() for k, v in model.state_dict().items()
                }
            else:
                state.epochs_without_improvement += 1
            patience = t.early_stopping_patience
            stop = patience is not None and state.epochs_without_improvement >= patience
            summary = " ".join(f"{k} {v:.4f}" for k, v in row.items() if "@" in k or k == "mrr")
            print(
                f"[train] epoch {state.epoch + 1}/{t.epochs} done: loss {epoch_loss:.4f} "
                f"{row['examples_per_s']:.0f} examples/s; {summary}",
                flush=True,
            )
        state.history.append(row)
        if rank == 0 and loop_config.get("state_dir"):
            # Every finished epoch, while the run goes on (the model dir has it at publish).
            io.replace_file_atomically(
                io.join(loop_config["state_dir"], "train_log.csv"), history_csv(state.history)
            )
        state.epoch += 1
        state.step_in_epoch = 0
        stop = _broadcast_flag(stop)
        if stop:
            state.epoch = t.epochs
        save_and_report({k: v for k, v in row.items() if isinstance(v, int | float)})
        if stop and rank == 0:
            print(
                f"[train] early stop: no gain in {t.early_stopping_metric} for {patience} epochs",
                flush=True,
            )


def _train_step(
    pair: nn.Module,
    task,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    config: Config,
    generator: torch.Generator,
    num_items: int,
    device: torch.device,
) -> torch.Tensor:
    """One optimizer step; returns the batch's loss, detached and still on ``device``.

    Reading it (``float``) waits for the device to finish the step, so callers sum the tensors
    and read the sum when they log or end an epoch: on a GPU the host then queues the next
    steps' kernels while this one runs, instead of stalling once a step.
    """
    user_idx, item_idx = tensors["user_idx"].to(device), tensors["item_idx"].to(device)
    neg_idx_BN = tensors["neg_item_idx"].to(device)
    neg_source_BN = tensors["neg_source"].to(device) if "neg_source" in tensors else None
    batch_size, num_negatives = neg_idx_BN.shape
    use_data = config.loss.use_data_negatives and num_negatives > 0
    parts = [item_idx]
    if use_data:
        parts.append(neg_idx_BN.reshape(-1))
    sampled_idx_S = None
    if config.loss.num_sampled_negatives > 0:
        sampled_idx_S = task.sample(config.loss.num_sampled_negatives, generator=generator).to(
            device
        )
        parts.append(sampled_idx_S)
    user_BD, item_MD = pair(user_idx, torch.cat(parts), item_idx)
    # The linear member's columns (model.linear_member_dim) come last; it has its own loss.
    members, normalized = config.model.ensemble_members, config.model.normalize
    base_dim = config.model.embedding_dim * members
    user_BD, item_MD = user_BD[:, :base_dim], item_MD[:, :base_dim]
    pos_BD = item_MD[:batch_size]
    offset = batch_size
    neg_BND = None
    if use_data:
        neg_BND = item_MD[offset : offset + batch_size * num_negatives].view(
            batch_size, num_negatives, -1
        )
        offset += batch_size * num_negatives
    sampled_SD = item_MD[offset:] if sampled_idx_S is not None else None
    # One loss per ensemble member, on its own slice of the embeddings (K = 1: the whole
    # embedding); their mean is the step's loss, so each member trains as if alone.
    losses = [
        task(
            member_user_BD,
            member_pos_BD,
            pos_item_idx_B=item_idx,
            neg_item_BND=member_neg_BND,
            neg_item_idx_BN=neg_idx_BN if use_data else None,
            neg_source_BN=neg_source_BN if use_data else None,
            sampled_item_SD=member_sampled_SD,
            sampled_item_idx_S=sampled_idx_S,
            user_idx_B=user_idx,
        )
        for member_user_BD, member_pos_BD, member_neg_BND, member_sampled_SD in zip(
            member_chunks(user_BD, members, normalized=normalized),
            member_chunks(pos_BD, members, normalized=normalized),
            _optional_chunks(neg_BND, members, normalized=normalized),
            _optional_chunks(sampled_SD, members, normalized=normalized),
        )
    ]
    loss = losses[0] if members == 1 else torch.stack(losses).mean()
    if config.model.linear_member_dim > 0:
        # Under DDP the towers are reached through .module; DDP's gradient hooks sit on the
        # parameters, so this second use of them is reduced like the first.
        loss = loss + linear_member_loss(getattr(pair, "module", pair), user_idx, item_idx, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def linear_member_loss(
    pair: TowerPair, user_idx_B: torch.Tensor, item_idx_B: torch.Tensor, config: Config
) -> torch.Tensor:
    """The linear member's step loss: ``linear_autoencoder_rows`` on its unscaled towers, from
    each row's whole history bag and the bag without the row's item, plus
    ``model.linear_member_l2`` · the squared norm of its weights."""
    user_linear, item_linear = linear_members(pair.model)
    name, codes_I = pair.history
    bag_BL = pair.user_features.lookup(user_idx_B)[name]
    target_code_B = codes_I[item_idx_B.to(codes_I.device)].to(bag_BL.device)
    user_BD = user_linear(user_idx_B, {name: bag_BL})
    # The bag without the row's item (``without_targets``) sums to the whole bag's rows minus
    # that item's row once per occurrence: no second pass over the bag.
    occurrences_B1 = ((bag_BL == target_code_B[:, None]) & (bag_BL > 0)).sum(1, keepdim=True)
    target_rows_BD = user_linear.features.embeddings[0](target_code_B)
    user_loo_BD = user_BD - occurrences_B1.to(user_BD.dtype) * target_rows_BD
    item_ID = item_linear(torch.arange(item_linear.num_ids, device=item_idx_B.device))
    bag_items_BL, bag_mask_BL = _distinct_bag_items(bag_BL, codes_I.to(bag_BL.device))
    loss = linear_autoencoder_rows(
        user_BD,
        user_loo_BD,
        item_ID[item_idx_B],
        item_ID.T @ item_ID,
        item_ID[bag_items_BL],
        bag_mask_BL,
    )
    l2 = config.model.linear_member_l2
    if l2 > 0:
        weights = [*user_linear.parameters(), *item_linear.parameters()]
        loss = loss + l2 * sum(w.square().sum() for w in weights)
    return loss


def _distinct_bag_items(
    bag_BL: torch.Tensor, codes_I: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L] item index of each bag value, [B, L] mask of the ones to count): each item of a
    bag once (a repeated value counts at its first sorted place), no padding, no value that is
    no item of the catalog."""
    num_codes = max(int(bag_BL.max()) if bag_BL.numel() else 0, int(codes_I.max())) + 1
    item_of_code = torch.full((num_codes,), -1, dtype=torch.long, device=bag_BL.device)
    known_I = codes_I > 0
    item_of_code[codes_I[known_I]] = torch.nonzero(known_I).squeeze(1)
    sorted_BL = bag_BL.sort(dim=1).values
    first_BL = torch.ones_like(sorted_BL, dtype=torch.bool)
    first_BL[:, 1:] = sorted_BL[:, 1:] != sorted_BL[:, :-1]
    items_BL = item_of_code[sorted_BL]
    return items_BL.clamp_min(0), first_BL & (sorted_BL > 0) & (items_BL >= 0)


def _optional_chunks(
    embedding_XD: torch.Tensor | None, num_members: int, *, normalized: bool
) -> tuple[torch.Tensor | None, ...]:
    """``member_chunks``, or K Nones for an absent tensor."""
    if embedding_XD is None:
        return (None,) * num_members
    return member_chunks(embedding_XD, num_members, normalized=normalized)


def prefetch_batches(t) -> int:
    """``train.prefetch_batches``, or its default: 1 with a GPU, 0 on CPU."""
    if t.prefetch_batches is not None:
        return t.prefetch_batches
    return 1 if t.use_gpu else 0


def _collective_device() -> torch.device:
    """Where tensors for a collective must live: NCCL only takes CUDA tensors."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _mean_across_workers(total: float, count: int) -> float:
    import torch.distributed as dist

    values = torch.tensor([total, float(count)], dtype=torch.float64, device=_collective_device())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return float(values[0] / max(values[1].item(), 1.0))


def _all_workers(flag: bool) -> bool:
    """True when ``flag`` is true on every worker."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _broadcast_flag(flag: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], device=_collective_device())
    dist.broadcast(value, src=0)
    return bool(value.item())
