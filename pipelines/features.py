"""Feature specs from Arrow tables, and the tensors the towers read (Contract 1 feature columns).

Legend: R rows of the users / items table, L longest bag in the table.

Kinds come from the Arrow type (Contract 1), unless config overrides them
(``model.user_feature_kinds`` / ``model.item_feature_kinds``: categorical, numeric, bag, ignore):

- string, integer, bool (also dictionary-encoded) → ``categorical``
- float, decimal → ``numeric``
- list / large_list / fixed_size_list of string, integer or bool → ``bag``

Any other type (timestamps, structs, binary) is an error naming the column; set its kind to
``ignore`` to leave it out.

Fitting: numeric features get the mean and the population std of their non-null, non-NaN values
(std 1 when constant or empty). Categorical and bag features get a vocabulary: the
``max_vocab_size`` most frequent values (ties broken by value), then sorted by value so codes do
not depend on counts; code 0 is missing, unknown, or cut by the cap. The cap keeps an id-like
integer column (millions of distinct values) from growing an embedding table per value: its rare
values share the unknown row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from twotower_core.features import FeatureSpec, FeatureTable

DEFAULT_MAX_VOCAB_SIZE = 100_000


def _value_type(data_type: pa.DataType) -> pa.DataType:
    return data_type.value_type if pa.types.is_dictionary(data_type) else data_type


def _is_discrete(data_type: pa.DataType) -> bool:
    data_type = _value_type(data_type)
    return (
        pa.types.is_string(data_type)
        or pa.types.is_large_string(data_type)
        or pa.types.is_string_view(data_type)
        or pa.types.is_integer(data_type)
        or pa.types.is_boolean(data_type)
    )


def _is_list(data_type: pa.DataType) -> bool:
    return (
        pa.types.is_list(data_type)
        or pa.types.is_large_list(data_type)
        or pa.types.is_fixed_size_list(data_type)
    )


def _is_number(data_type: pa.DataType) -> bool:
    data_type = _value_type(data_type)
    return (
        pa.types.is_floating(data_type)
        or pa.types.is_decimal(data_type)
        or pa.types.is_integer(data_type)
        or pa.types.is_boolean(data_type)
    )


def infer_kind(data_type: pa.DataType) -> str | None:
    """The feature kind of an Arrow type, or None when it has none."""
    if _is_discrete(data_type):
        return "categorical"
    if pa.types.is_floating(data_type) or pa.types.is_decimal(data_type):
        return "numeric"
    if _is_list(data_type) and _is_discrete(data_type.value_type):
        return "bag"
    return None


def _plain(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dictionary-encoded columns as their value type."""
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def _fit_vocabulary(values: pa.ChunkedArray | pa.Array, max_vocab_size: int) -> tuple:
    counts = pc.value_counts(pc.drop_null(values))
    pairs = [
        (value, count)
        for value, count in zip(
            counts.field("values").to_pylist(), counts.field("counts").to_pylist()
        )
        if value == value  # a float NaN is missing, not a category
    ]
    if len(pairs) > max_vocab_size:
        pairs = sorted(pairs, key=lambda pair: (-pair[1], pair[0]))[:max_vocab_size]
    return tuple(sorted(value for value, _ in pairs))


def _fit_numeric(values: pa.ChunkedArray) -> tuple[float, float]:
    array = pc.fill_null(values.cast(pa.float64()), np.nan).to_numpy()
    array = array[np.isfinite(array)]
    if array.size == 0:
        return 0.0, 1.0
    mean, std = float(array.mean()), float(array.std())
    return mean, std if std > 0 and np.isfinite(std) else 1.0


def infer_feature_specs(
    table: pa.Table,
    *,
    exclude: Iterable[str] = (),
    overrides: Mapping[str, str] | None = None,
    max_vocab_size: int = DEFAULT_MAX_VOCAB_SIZE,
    table_name: str = "table",
) -> list[FeatureSpec]:
    """One fitted ``FeatureSpec`` per feature column of ``table``, in column order.

    Args:
        table: the users or items table (Contract 1), one row per entity.
        exclude: columns that are not features (the id column).
        overrides: column → categorical | numeric | bag | ignore (from ModelConfig).
        max_vocab_size: most values a categorical or bag vocabulary keeps (by frequency).
        table_name: named in error messages (``users``, ``items``).
    """
    overrides = dict(overrides or {})
    excluded = set(exclude)
    unknown = sorted(set(overrides) - set(table.column_names))
    if unknown:
        raise ValueError(
            f"{table_name}: feature kind override for column {unknown[0]!r}, which the table does not "
            f"have (columns: {', '.join(table.column_names)})"
        )
    specs = []
    for name in table.column_names:
        if name in excluded:
            continue
        column = _plain(table[name])
        kind = overrides.get(name) or infer_kind(column.type)
        if kind is None:
            raise ValueError(
                f"{table_name}: column {name!r} has type {column.type}, which is no feature kind; "
                f"set its kind to 'ignore' (or categorical / numeric / bag) in the model config"
            )
        if kind == "ignore":
            continue
        _check_kind(table_name, name, column.type, kind)
        if kind == "numeric":
            mean, std = _fit_numeric(column)
            specs.append(FeatureSpec(name, "numeric", mean=mean, std=std))
        elif kind == "categorical":
            specs.append(
                FeatureSpec(name, "categorical", vocabulary=_fit_vocabulary(column, max_vocab_size))
            )
        else:
            flat = pc.list_flatten(column)
            specs.append(
                FeatureSpec(name, "bag", vocabulary=_fit_vocabulary(_plain(flat), max_vocab_size))
            )
    return specs


def _check_kind(table_name: str, name: str, data_type: pa.DataType, kind: str) -> None:
    valid = {
        "numeric": _is_number(data_type),
        "categorical": _is_discrete(data_type) or _is_number(data_type),
        "bag": _is_list(data_type)
        and (_is_discrete(data_type.value_type) or _is_number(data_type.value_type)),
    }
    if kind not in valid:
        raise ValueError(
            f"{table_name}: column {name!r}: unknown feature kind {kind!r}; valid: bag, categorical, ignore, numeric"
        )
    if not valid[kind]:
        raise ValueError(
            f"{table_name}: column {name!r} of type {data_type} cannot be a {kind} feature"
        )


def _codes(values: pa.ChunkedArray | pa.Array, vocabulary: tuple, name: str) -> np.ndarray:
    """int64 code of each value: 1 + its vocabulary position, 0 when null or unknown."""
    if not vocabulary:
        return np.zeros(len(values), dtype=np.int64)
    try:
        value_set = pa.array(vocabulary, type=values.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as error:
        raise ValueError(
            f"column {name!r} of type {values.type} does not match its fitted vocabulary: {error}"
        ) from None
    positions = pc.fill_null(pc.index_in(values, value_set=value_set), -1)
    return positions.to_numpy().astype(np.int64) + 1


def encode_features(table: pa.Table, specs: Iterable[FeatureSpec]) -> dict[str, np.ndarray]:
    """Feature arrays aligned to ``table``'s rows, per the tensor contract of ``features.py``.

    categorical → int64 [R] codes; numeric → float32 [R] raw values, null → NaN;
    bag → int64 [R, L] codes, 0 = padding (unknown values also read 0), L ≥ 1.
    """
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in table.column_names:
            raise ValueError(
                f"feature column {spec.name!r} is missing (columns: {', '.join(table.column_names)})"
            )
        column = _plain(table[spec.name])
        if spec.kind == "numeric":
            arrays[spec.name] = (
                pc.fill_null(column.cast(pa.float64()), np.nan).to_numpy().astype(np.float32)
            )
        elif spec.kind == "categorical":
            arrays[spec.name] = _codes(column, spec.vocabulary, spec.name)
        else:
            arrays[spec.name] = _encode_bag(column, spec)
    return arrays


def _encode_bag(column: pa.ChunkedArray, spec: FeatureSpec) -> np.ndarray:
    column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_fixed_size_list(column.type):
        column = column.cast(pa.list_(column.type.value_type))
    num_rows = len(column)
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
    flat = _plain(pa.chunked_array([pc.list_flatten(column)]))
    parents = pc.list_parent_indices(column).to_numpy().astype(np.int64)
    codes = _codes(flat, spec.vocabulary, spec.name)
    # Position of each flattened value inside its list: [nnz]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    positions = np.arange(len(parents)) - starts[parents]
    padded = np.zeros((num_rows, max(int(lengths.max(initial=0)), 1)), dtype=np.int64)
    padded[parents, positions] = codes
    return padded


def history_codes(
    user_specs: Iterable[FeatureSpec], feature: str, item_ids: pa.ChunkedArray | pa.Array
) -> np.ndarray:
    """[I] int64 code of each item (row = item_idx) in the user bag feature ``feature``, 0 where
    the bag's vocabulary lacks it (``model.user_history_feature``).

    Raises ValueError, naming the key, when ``feature`` is not a user bag feature, when its
    values are not of the items' id type, or when no item id is among its values.
    """
    key = "model.user_history_feature"
    specs = {spec.name: spec for spec in user_specs}
    spec = specs.get(feature)
    if spec is None:
        raise ValueError(
            f"{key}: {feature!r} is not a user feature (user features: {', '.join(specs) or 'none'})"
        )
    if spec.kind != "bag":
        raise ValueError(f"{key}: user feature {feature!r} is {spec.kind}, not a bag of item ids")
    try:
        codes = _codes(_plain(item_ids), spec.vocabulary, feature)
    except ValueError as error:
        raise ValueError(f"{key}: user feature {feature!r} does not hold item ids: {error}") from None
    if len(codes) and not codes.any():
        raise ValueError(
            f"{key}: no item id is among the values of user feature {feature!r}; it must be a "
            f"bag of item ids (the user's past items)"
        )
    return codes


def build_feature_table(table: pa.Table, specs: Iterable[FeatureSpec]) -> FeatureTable:
    """A ``FeatureTable`` of ``table`` (row r = entity with dense index r)."""
    arrays = encode_features(table, specs)
    return FeatureTable(
        {name: torch.from_numpy(array) for name, array in arrays.items()}, num_rows=table.num_rows
    )
