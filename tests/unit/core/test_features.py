"""FeatureSpec, FeatureEncoder and FeatureTable: the per-kind tensor contract, by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from twotower_core.config import ModelConfig
from twotower_core.features import FeatureEncoder, FeatureSpec, FeatureTable

CONFIG = ModelConfig(feature_embedding_dim=2, bag_pooling="mean")
SPECS = [
    FeatureSpec("country", "categorical", vocabulary=("de", "fr", "us")),
    FeatureSpec("tags", "bag", vocabulary=("a", "b", "c")),
    FeatureSpec("age", "numeric", mean=10.0, std=2.0),
]


def test_spec_round_trips_through_json():
    for spec in SPECS + [FeatureSpec("year", "categorical", vocabulary=(1999, 2001))]:
        again = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
        assert again == spec
    assert SPECS[0].num_codes == 4  # 3 values + code 0


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown kind 'text'; valid: categorical, numeric, bag"):
        FeatureSpec("x", "text")
    with pytest.raises(ValueError, match="std > 0"):
        FeatureSpec("x", "numeric", std=0.0)


def encoder_with_known_rows(pooling: str = "mean") -> FeatureEncoder:
    encoder = FeatureEncoder(SPECS, ModelConfig(feature_embedding_dim=2, bag_pooling=pooling))
    with torch.no_grad():
        # country rows: code c → (c, 10c); tags rows: code 1 → (1, 0), 2 → (0, 3), 3 → (2, 2).
        encoder.embeddings[0].weight.copy_(
            torch.tensor([[0.0, 0.0], [1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
        )
        encoder.embeddings[1].weight[1:].copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]]))
    return encoder


def batch():
    return {
        "country": torch.tensor([2, 0, 9]),  # fr, missing, out of range → read as code 0
        "tags": torch.tensor([[1, 2, 0], [0, 0, 0], [3, 0, 0]]),  # (a, b), empty, (c)
        "age": torch.tensor([14.0, math.nan, 10.0]),
    }


def test_encoder_layout_and_values_mean_pooling():
    encoder = encoder_with_known_rows("mean")
    assert encoder.output_dim == 2 + 2 + 1
    out = encoder(batch())
    assert out.shape == (3, 5)
    # Row 0: fr → (2, 20); mean of a, b = ((1, 0) + (0, 3)) / 2 = (0.5, 1.5); age (14 − 10) / 2 = 2.
    assert out[0].tolist() == [2.0, 20.0, 0.5, 1.5, 2.0]
    # Row 1: code 0 row (0, 0); empty bag → zeros; NaN age → 0 after standardising.
    assert out[1].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0]
    # Row 2: code 9 is outside the table → code 0; bag (c) → (2, 2); age 10 → 0.
    assert out[2].tolist() == [0.0, 0.0, 2.0, 2.0, 0.0]


def test_encoder_sum_pooling():
    out = encoder_with_known_rows("sum")(batch())
    # (1, 0) + (0, 3) = (1, 3)
    assert out[0, 2:4].tolist() == [1.0, 3.0]


def test_encoder_sqrtn_pooling():
    out = encoder_with_known_rows("sqrtn")(batch())
    # ((1, 0) + (0, 3)) / sqrt(2); a one-item bag is its row; an empty bag stays zero.
    assert out[0, 2:4].tolist() == pytest.approx([1 / math.sqrt(2), 3 / math.sqrt(2)])
    assert out[2, 2:4].tolist() == [2.0, 2.0]
    assert out[1, 2:4].tolist() == [0.0, 0.0]


def test_encoder_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="model.bag_pooling: unknown value 'max'; valid: mean, sum, sqrtn"):
        FeatureEncoder(SPECS, ModelConfig(feature_embedding_dim=2, bag_pooling="max"))


@pytest.mark.parametrize("pooling", ["mean", "sum", "sqrtn"])
def test_bag_pooling_matches_the_padded_rows_reduced_by_hand(pooling):
    encoder = FeatureEncoder(SPECS, ModelConfig(feature_embedding_dim=3, bag_pooling=pooling))
    codes = torch.tensor([[3, 1, 2, 0], [0, 0, 0, 0], [2, 2, 0, 0]])  # a repeated code counts twice
    table = encoder.embeddings[1]
    rows_BLE = table.weight[codes] * (codes > 0).unsqueeze(-1)
    lengths_B1 = (codes > 0).sum(dim=1, keepdim=True).clamp_min(1).float()
    divisor = {"mean": lengths_B1, "sum": 1.0, "sqrtn": lengths_B1.sqrt()}[pooling]
    expected = rows_BLE.sum(dim=1) / divisor
    assert torch.allclose(encoder._pool_bag(table, codes), expected)
    # A batch of empty bags padded to width 0 pools to zeros.
    assert encoder._pool_bag(table, torch.zeros((2, 0), dtype=torch.long)).tolist() == [[0.0] * 3] * 2


def test_bag_padding_row_has_no_gradient_but_categorical_missing_row_learns():
    encoder = FeatureEncoder(SPECS, CONFIG)
    encoder(batch()).sum().backward()
    assert encoder.embeddings[1].weight.grad[0].abs().sum() == 0  # bag padding
    assert encoder.embeddings[0].weight.grad[0].abs().sum() > 0  # categorical "missing" row


def test_missing_feature_names_itself():
    encoder = FeatureEncoder(SPECS, CONFIG)
    features = batch()
    del features["tags"]
    with pytest.raises(ValueError, match="feature 'tags' missing from the batch"):
        encoder(features)


def test_feature_table_lookup_and_unknown_rows():
    table = FeatureTable(
        {
            "country": torch.tensor([1, 3]),
            "tags": torch.tensor([[1, 2], [3, 0]]),
            "age": torch.tensor([20.0, 30.0]),
        },
        num_rows=2,
    )
    got = table.lookup(torch.tensor([1, -1, 0, 2]))
    assert got["country"].tolist() == [3, 0, 1, 0]
    assert got["tags"].tolist() == [[3, 0], [0, 0], [1, 2], [0, 0]]
    age = got["age"].tolist()
    assert age[0] == 30.0 and math.isnan(age[1]) and age[2] == 20.0 and math.isnan(age[3])
    moved = table.to("cpu")
    assert moved.lookup(torch.tensor([0]))["country"].tolist() == [1]
    assert FeatureTable({}, num_rows=5).lookup(torch.tensor([1])) == {}


def test_feature_table_rejects_ragged_columns():
    with pytest.raises(ValueError, match="feature 'age' has 3 rows, expected 2"):
        FeatureTable({"age": torch.zeros(3)}, num_rows=2)
