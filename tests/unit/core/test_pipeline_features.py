"""pipelines.features: kinds from Arrow types, fitted vocabularies and stats, encoding."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.features import build_feature_table, encode_features, infer_feature_specs
from twotower_core.features import FeatureSpec


def items_table() -> pa.Table:
    return pa.table(
        {
            "item_id": pa.array([10, 11, 12, 13], pa.int64()),
            "genre": pa.array(["drama", "comedy", None, "drama"]),
            "year": pa.array([2001, 1999, 2001, 2020], pa.int32()),
            "is_new": pa.array([True, False, None, True]),
            "price": pa.array([1.0, 3.0, None, float("nan")]),
            "tags": pa.array([["b", "a"], [], None, ["a", None, "c"]], pa.list_(pa.string())),
            "codes": pa.array([[3], [1, 2], [], [3, 3]], pa.list_(pa.int64())),
            "brand": pa.array(["x", "y", "x", "z"]).dictionary_encode(),
        }
    )


def test_kinds_vocabularies_and_stats():
    specs = {s.name: s for s in infer_feature_specs(items_table(), exclude={"item_id"})}
    assert list(specs) == ["genre", "year", "is_new", "price", "tags", "codes", "brand"]
    assert specs["genre"] == FeatureSpec("genre", "categorical", vocabulary=("comedy", "drama"))
    assert specs["year"].vocabulary == (1999, 2001, 2020)
    assert specs["is_new"].vocabulary == (False, True)
    # price: the non-null, non-NaN values are 1 and 3: mean 2, population std 1.
    assert (specs["price"].kind, specs["price"].mean, specs["price"].std) == ("numeric", 2.0, 1.0)
    assert specs["tags"] == FeatureSpec("tags", "bag", vocabulary=("a", "b", "c"))
    assert specs["codes"].vocabulary == (1, 2, 3)
    assert specs["brand"].vocabulary == ("x", "y", "z")


def test_encoding_per_kind():
    table = items_table()
    specs = infer_feature_specs(table, exclude={"item_id"})
    arrays = encode_features(table, specs)
    assert arrays["genre"].tolist() == [2, 1, 0, 2]  # comedy = 1, drama = 2, null = 0
    assert arrays["year"].dtype == np.int64 and arrays["year"].tolist() == [2, 1, 2, 3]
    assert arrays["is_new"].tolist() == [2, 1, 0, 2]
    price = arrays["price"]
    assert price.dtype == np.float32 and price[:2].tolist() == [1.0, 3.0]
    assert math.isnan(price[2]) and math.isnan(price[3])
    # Bags pad to the longest list (3) with 0; a null value inside a list reads 0 as well.
    assert arrays["tags"].tolist() == [[2, 1, 0], [0, 0, 0], [0, 0, 0], [1, 0, 3]]
    assert arrays["codes"].tolist() == [[3, 0], [1, 2], [0, 0], [3, 3]]


def test_unseen_values_encode_to_zero():
    specs = infer_feature_specs(items_table(), exclude={"item_id"})
    later = items_table().slice(0, 2).set_column(1, "genre", pa.array(["horror", "drama"]))
    arrays = encode_features(later, specs)
    assert arrays["genre"].tolist() == [0, 2]


def test_overrides_and_ignore():
    specs = infer_feature_specs(
        items_table(),
        exclude={"item_id"},
        overrides={"year": "numeric", "price": "ignore", "brand": "ignore", "codes": "ignore"},
    )
    by_name = {s.name: s for s in specs}
    assert "price" not in by_name and "brand" not in by_name
    # year as numeric: values 2001, 1999, 2001, 2020 → mean 2005.25.
    assert by_name["year"].kind == "numeric" and by_name["year"].mean == pytest.approx(2005.25)
    with pytest.raises(
        ValueError, match="items: column 'genre' of type string cannot be a bag feature"
    ):
        infer_feature_specs(
            items_table(), exclude={"item_id"}, overrides={"genre": "bag"}, table_name="items"
        )
    with pytest.raises(
        ValueError, match="override for column 'colour', which the table does not have"
    ):
        infer_feature_specs(items_table(), overrides={"colour": "ignore"})


def test_unsupported_type_is_named_and_can_be_ignored():
    table = items_table().append_column("added", pa.array([0, 1, 2, 3], pa.timestamp("s")))
    with pytest.raises(ValueError, match="users: column 'added' has type timestamp.*'ignore'"):
        infer_feature_specs(table, exclude={"item_id"}, table_name="users")
    specs = infer_feature_specs(table, exclude={"item_id"}, overrides={"added": "ignore"})
    assert "added" not in {s.name for s in specs}


def test_vocabulary_cap_keeps_the_most_frequent():
    # Counts: 7 ×3, 5 ×2, 9 ×2, 1 ×1. Cap 2: 7, then the tie between 5 and 9 → the smaller, 5.
    table = pa.table({"zip": pa.array([7, 7, 7, 5, 5, 9, 9, 1])})
    (spec,) = infer_feature_specs(table, max_vocab_size=2)
    assert spec.vocabulary == (5, 7)
    assert encode_features(table, [spec])["zip"].tolist() == [2, 2, 2, 1, 1, 0, 0, 0]


def test_constant_numeric_gets_unit_std():
    (spec,) = infer_feature_specs(pa.table({"x": pa.array([2.5, 2.5, None])}))
    assert (spec.mean, spec.std) == (2.5, 1.0)


def test_build_feature_table():
    table = items_table()
    specs = infer_feature_specs(table, exclude={"item_id"})
    features = build_feature_table(table, specs)
    got = features.lookup(torch.tensor([3, -1]))
    assert got["genre"].tolist() == [2, 0]
    assert got["tags"].tolist() == [[1, 0, 3], [0, 0, 0]]
    assert got["price"].dtype == torch.float32


def test_missing_column_is_named():
    with pytest.raises(ValueError, match="feature column 'colour' is missing"):
        encode_features(items_table(), [FeatureSpec("colour", "categorical", vocabulary=("red",))])
