"""The linear member (model.linear_member_dim) through the real Ray Train job: 2 workers, DDP over
gloo, on a MovieLens-shaped dataset whose users carry a history bag."""

import numpy as np
import pytest
import torch

from benchmarks.movielens import (
    load_ml100k,
    model_vectors,
    split_random_fraction,
    with_overrides,
    write_dataset,
)
from jobs import train
from pipelines import io
from pipelines.checkpoint import load_model
from pipelines.features import build_feature_table
from tests.unit.test_movielens_data import INTER, ITEMS, USERS
from twotower_core.config import debug_config
from twotower_core.towers import linear_members

pytestmark = pytest.mark.integration


def test_two_workers_train_and_publish_the_linear_member(tmp_path, ray_local):
    for name, text in (("inter", INTER), ("item", ITEMS), ("user", USERS)):
        (tmp_path / f"ml-100k.{name}").write_text(text, encoding="utf-8")
    ml = load_ml100k(tmp_path)
    split = split_random_fraction(ml.ratings, fraction=0.2, seed=0)
    dataset = str(tmp_path / "dataset")
    write_dataset(dataset, ml, split, num_negatives=1, alpha=0.75, seed=0)
    config = with_overrides(
        debug_config(),
        [
            "train.epochs=2",
            "train.batch_size=2",
            "train.num_workers=2",
            "train.early_stopping_metric=epoch",
            "model.user_history_feature=history",
            "model.linear_member_dim=4",
            "model.linear_member_l2=0.001",
            "model.linear_member_weight=0.5",
        ],
    )
    out = str(tmp_path / "model")
    result = train.run(dataset=dataset, out=out, config=config)
    metrics = io.read_json(io.join(out, "metrics.json"))
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    assert all(np.isfinite(row["train_loss"]) for row in metrics["epochs"])
    assert result.best_epoch == 2

    loaded = load_model(out)
    user_UD, item_ID = model_vectors(loaded, dataset)
    width = config.model.output_dim
    assert user_UD.shape == (ml.num_users, width) and item_ID.shape == (ml.num_items, width)
    # The published user vectors end with 0.5 × the linear member's sum of history rows.
    users = io.read_table(io.join(dataset, "features", "users.parquet"))
    user_table = build_feature_table(users, loaded.user_specs)
    user_linear, item_linear = linear_members(loaded.model)
    with torch.no_grad():
        ids = torch.arange(users.num_rows)
        linear_UD = user_linear(ids, user_table.lookup(ids))
        linear_ID = item_linear(torch.arange(ml.num_items))
    np.testing.assert_allclose(user_UD[:, -4:], 0.5 * linear_UD.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(item_ID[:, -4:], linear_ID.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(linear_ID.numpy()).sum() > 0
