"""The user history bag (model.user_history_feature): the row's target leaves the bag in
training, history dropout, the history-only user tower, and the checks that name the key."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.features import build_feature_table, history_codes, infer_feature_specs
from pipelines.train_loop import TowerPair, before_targets, without_targets
from twotower_core.config import ConfigError, config_from_dict
from twotower_core.towers import build_two_tower

ITEM_IDS = np.array([500, 501, 502, 503, 504])


def _users() -> pa.Table:
    return pa.table(
        {
            "user_idx": [0, 1, 2],
            "user_id": [10, 11, 12],
            "country": ["US", "DE", "US"],
            "history": [[500, 502], [501, 502, 503], []],
            "genres": [["a"], ["b"], ["a", "b"]],
        }
    )


def _pair(**model):
    config = config_from_dict(
        {
            "model": {
                "embedding_dim": 4,
                "id_embedding_dim": 4,
                "feature_embedding_dim": 4,
                "hidden_dims": [],
                "user_history_feature": "history",
                **model,
            }
        }
    )
    users = _users()
    user_specs = infer_feature_specs(users, exclude={"user_idx", "user_id"})
    torch.manual_seed(0)
    model_ = build_two_tower(
        config.model, num_users=3, num_items=len(ITEM_IDS), user_specs=user_specs
    )
    items = pa.table({"item_idx": np.arange(len(ITEM_IDS)), "item_id": ITEM_IDS})
    codes = history_codes(user_specs, "history", pa.chunked_array([ITEM_IDS]))
    pair = TowerPair.for_model_config(
        model_,
        build_feature_table(users, user_specs),
        build_feature_table(items, []),
        ("history", torch.from_numpy(codes)),
        config.model,
    )
    return pair, user_specs


def test_history_codes_map_items_to_bag_codes():
    specs = infer_feature_specs(_users(), exclude={"user_idx", "user_id"})
    codes = history_codes(specs, "history", pa.chunked_array([ITEM_IDS]))
    # The bag's vocabulary is 500..503 (504 is in no history): codes 1..4, and 0 for 504.
    assert codes.tolist() == [1, 2, 3, 4, 0]


@pytest.mark.parametrize(
    "feature, message",
    [
        ("histroy", r"'histroy' is not a user feature \(user features: country, history, genres"),
        ("country", "'country' is categorical, not a bag of item ids"),
        ("genres", "'genres' does not hold item ids"),
    ],
)
def test_history_codes_name_the_key_and_the_problem(feature, message):
    specs = infer_feature_specs(_users(), exclude={"user_idx", "user_id"})
    with pytest.raises(ValueError, match=r"model\.user_history_feature.*" + message):
        history_codes(specs, feature, pa.chunked_array([ITEM_IDS]))


def test_history_codes_refuse_a_bag_that_holds_no_item_id():
    specs = infer_feature_specs(_users(), exclude={"user_idx", "user_id"})
    with pytest.raises(ValueError, match="no item id is among the values of user feature"):
        history_codes(specs, "history", pa.chunked_array([np.array([7, 8, 9])]))


def test_without_targets_drops_only_the_rows_own_target():
    bag_BL = torch.tensor([[1, 3, 0], [2, 3, 4], [1, 1, 2]])
    assert without_targets(bag_BL, torch.tensor([3, 0, 1])).tolist() == [
        [1, 0, 0],
        [2, 3, 4],
        [0, 0, 2],
    ]


def test_before_targets_keeps_only_the_values_before_the_rows_target():
    bag_BL = torch.tensor([[5, 3, 7, 0], [2, 3, 4, 1], [1, 1, 2, 0], [4, 6, 0, 0]])
    # targets: 7 (third), 2 (first: nothing before it), 1 (first of two), 0 (no code: whole bag)
    assert before_targets(bag_BL, torch.tensor([7, 2, 1, 0])).tolist() == [
        [5, 3, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [4, 6, 0, 0],
    ]
    # a target absent from the bag keeps the whole bag
    assert before_targets(bag_BL[:1], torch.tensor([9])).tolist() == [[5, 3, 7, 0]]


def test_a_causal_row_sees_only_the_items_before_its_target():
    pair, _ = _pair(causal_history=True)
    pair.eval()
    # User 1's bag, oldest first: 501, 502, 503 (item_idx 1, 2, 3).
    users = torch.tensor([1, 1, 1])
    rows, _ = pair(users, torch.tensor([0]), torch.tensor([3, 2, 1]))

    def alone(codes):
        tables = pair.user_features.lookup(torch.tensor([1]))
        tables["history"] = torch.tensor([codes])
        return pair.model.user_tower(torch.tensor([1]), tables)[0]

    bag = pair.user_features.lookup(torch.tensor([1]))["history"][0].tolist()
    assert torch.allclose(rows[0], alone([bag[0], bag[1], 0]))  # before 503: 501, 502
    assert torch.allclose(rows[1], alone([bag[0], 0, 0]))  # before 502: 501
    assert torch.allclose(rows[2], alone([0, 0, 0]))  # 501 is the first: an empty bag
    # Serving (no target) reads the whole bag.
    whole, _ = pair(torch.tensor([1]), torch.tensor([0]))
    assert torch.allclose(whole[0], alone(bag))


def test_a_training_row_sees_its_users_bag_without_its_target():
    pair, _ = _pair()
    pair.eval()
    users = torch.tensor([0, 0, 1])
    # User 0's history is {500, 502}; item_idx 2 is 502, item_idx 4 (504) is in no bag.
    with_target, _ = pair(users, torch.tensor([0]), torch.tensor([2, 4, 2]))
    whole, _ = pair(users, torch.tensor([0]))
    # Row 1's target is not in the bag: the whole bag. Rows 0 and 2 lose item 502.
    assert torch.equal(with_target[1], whole[1])
    assert not torch.allclose(with_target[0], whole[0])
    assert not torch.allclose(with_target[2], whole[2])
    # Row 0 equals user 0 with history [500] only.
    tables = pair.user_features.lookup(torch.tensor([0]))
    tables["history"] = torch.tensor([[1, 0]])
    alone = pair.model.user_tower(torch.tensor([0]), tables)
    assert torch.allclose(with_target[0], alone[0])


def test_history_dropout_acts_in_training_only():
    pair, _ = _pair(history_dropout=0.5)
    users = torch.tensor([1] * 64)
    targets = torch.tensor([4] * 64)  # in no bag: only dropout changes the bag
    pair.eval()
    first, _ = pair(users, torch.tensor([0]), targets)
    assert torch.allclose(first, first[:1].expand_as(first))
    pair.train()
    torch.manual_seed(1)
    dropped, _ = pair(users, torch.tensor([0]), targets)
    distinct = {tuple(row) for row in dropped.detach().round(decimals=5).tolist()}
    # 3 values dropped independently at 0.5: several bags differ across 64 rows.
    assert len(distinct) >= 4


def test_history_only_user_tower_has_no_id_rows_and_items_keep_theirs():
    pair, _ = _pair(user_id_embedding=False)
    assert pair.model.user_tower.id_embedding is None
    assert pair.model.item_tower.id_embedding is not None
    users, _ = pair(torch.tensor([0, 2]), torch.tensor([0]))
    assert users.shape == (2, 4)


@pytest.mark.parametrize(
    "model, message",
    [
        ({"history_dropout": 0.2}, r"model\.history_dropout: needs model\.user_history_feature"),
        ({"causal_history": True}, r"model\.causal_history: needs model\.user_history_feature"),
        ({"user_history_feature": "h", "history_dropout": 1.0}, r"model\.history_dropout: must"),
        (
            {"user_history_feature": "h", "user_feature_kinds": {"h": "ignore"}},
            r"model\.user_history_feature: names 'h'.*'ignore', not bag",
        ),
        (
            {"user_history_feature": "h", "use_features": False},
            r"model\.user_history_feature: needs model\.use_features",
        ),
    ],
)
def test_history_config_is_checked(model, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": model})


def test_load_history_codes_reads_the_item_vocab_of_the_dataset(tmp_path):
    from pipelines import io
    from pipelines.train_loop import load_history_codes

    io.write_table(
        str(tmp_path / "vocab" / "items.parquet"),
        pa.table({"item_id": ITEM_IDS[::-1].copy(), "item_idx": np.arange(5), "count": [1] * 5}),
    )
    specs = infer_feature_specs(_users(), exclude={"user_idx", "user_id"})
    on = config_from_dict({"model": {"user_history_feature": "history"}})
    name, codes_I = load_history_codes(str(tmp_path), specs, on)
    # Row i is item_idx i: ids 504, 503, ..., 500.
    assert name == "history" and codes_I.tolist() == [0, 4, 3, 2, 1]
    assert load_history_codes(str(tmp_path), specs, config_from_dict({})) is None
