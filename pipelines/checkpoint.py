"""The model artifact (Contract 3): what a checkpoint holds and how a model dir is read back.

A model dir looks like::

    model/
      checkpoint/
        model.pt          weights + model config + feature specs + vocab sizes
        config.yaml       the resolved run config
        vocab/            users.parquet, items.parquet copied from the dataset (id -> row)
        dataset.json      which dataset it was trained on
      metrics.json        per-epoch train loss and eval metrics, best epoch
      train_log.csv       one row per epoch
      _SUCCESS
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import yaml

from pipelines import io
from twotower_core.config import Config, config_from_dict, config_to_dict
from twotower_core.features import FeatureSpec
from twotower_core.towers import TwoTowerModel, build_two_tower

CHECKPOINT_DIR = "checkpoint"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
VOCAB_DIR = "vocab"
DATASET_REF_FILE = "dataset.json"
METRICS_FILE = "metrics.json"
TRAIN_LOG_FILE = "train_log.csv"


@dataclass(frozen=True)
class LoadedModel:
    """A published model, ready for embedding or warm start."""

    model: TwoTowerModel
    config: Config
    user_specs: list[FeatureSpec]
    item_specs: list[FeatureSpec]
    user_vocab: pa.Table
    item_vocab: pa.Table
    dataset: str
    path: str


def model_payload(
    state_dict: dict[str, Any],
    *,
    config: Config,
    user_specs: list[FeatureSpec],
    item_specs: list[FeatureSpec],
    num_users: int,
    num_items: int,
) -> dict[str, Any]:
    """Everything needed to rebuild the model without the dataset at hand."""
    return {
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "model_config": config_to_dict(config.model),
        "similarity": config.loss.similarity,
        "user_specs": [s.to_dict() for s in user_specs],
        "item_specs": [s.to_dict() for s in item_specs],
        "num_users": num_users,
        "num_items": num_items,
    }


def model_from_payload(payload: dict[str, Any], config: Config) -> tuple[TwoTowerModel, list, list]:
    user_specs = [FeatureSpec.from_dict(d) for d in payload["user_specs"]]
    item_specs = [FeatureSpec.from_dict(d) for d in payload["item_specs"]]
    model = build_two_tower(
        config.model,
        num_users=payload["num_users"],
        num_items=payload["num_items"],
        user_specs=user_specs,
        item_specs=item_specs,
    )
    model.load_state_dict(payload["state_dict"])
    return model, user_specs, item_specs


def write_model_dir(
    staging: str,
    *,
    payload: dict[str, Any],
    config: Config,
    dataset_dir: str,
    metrics: dict[str, Any],
    train_log_csv: str,
) -> None:
    """Fill a staging model dir (the caller publishes it)."""
    checkpoint = io.join(staging, CHECKPOINT_DIR)
    io.save_torch(io.join(checkpoint, MODEL_FILE), payload)
    io.write_text(
        io.join(checkpoint, CONFIG_FILE), yaml.safe_dump(config_to_dict(config), sort_keys=False)
    )
    for side in ("users", "items"):
        table = io.read_table(io.join(dataset_dir, "vocab", f"{side}.parquet"))
        io.write_table(io.join(checkpoint, VOCAB_DIR, f"{side}.parquet"), table)
    io.write_json(io.join(checkpoint, DATASET_REF_FILE), {"dataset": str(dataset_dir)})
    io.write_json(io.join(staging, METRICS_FILE), metrics)
    io.write_text(io.join(staging, TRAIN_LOG_FILE), train_log_csv)


def load_config_of(model_dir: str) -> Config:
    text = io.read_text(io.join(model_dir, CHECKPOINT_DIR, CONFIG_FILE))
    return config_from_dict(yaml.safe_load(text))


def load_model(model_dir: str) -> LoadedModel:
    """Read a published model dir (refuses one without ``_SUCCESS``)."""
    if not io.is_complete(model_dir):
        raise FileNotFoundError(f"model dir {model_dir} is missing or incomplete (no _SUCCESS)")
    config = load_config_of(model_dir)
    payload = io.load_torch(io.join(model_dir, CHECKPOINT_DIR, MODEL_FILE))
    model, user_specs, item_specs = model_from_payload(payload, config)
    model.eval()
    vocab = io.join(model_dir, CHECKPOINT_DIR, VOCAB_DIR)
    return LoadedModel(
        model=model,
        config=config,
        user_specs=user_specs,
        item_specs=item_specs,
        user_vocab=io.read_table(io.join(vocab, "users.parquet")),
        item_vocab=io.read_table(io.join(vocab, "items.parquet")),
        dataset=io.read_json(io.join(model_dir, CHECKPOINT_DIR, DATASET_REF_FILE))["dataset"],
        path=str(model_dir),
    )


def row_map(old_ids: pa.Array, new_ids: pa.Array) -> np.ndarray:
    """For each new id, its row in the old vocab, or -1 when the id is new: ``[len(new_ids)]``."""
    old = pl.DataFrame({"id": pl.Series(values=old_ids), "old_row": np.arange(len(old_ids))})
    new = pl.DataFrame({"id": pl.Series(values=new_ids), "new_row": np.arange(len(new_ids))})
    if old.schema["id"] != new.schema["id"]:
        raise ValueError(
            f"warm start: id types differ between the old model ({old.schema['id']}) "
            f"and the new dataset ({new.schema['id']})"
        )
    joined = new.join(old, on="id", how="left").sort("new_row")
    return joined["old_row"].fill_null(-1).to_numpy().astype(np.int64)
