"""The synthetic world: Contract 1 exactly, consistent logs, determinism, planted structure."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs import generate_logs
from pipelines import io
from pipelines.synthetic import (
    LOG_TABLES,
    WorldSpec,
    generate_world,
    load_oracle,
    make_ids,
    make_world,
    oracle_scores,
    oracle_top_k,
    simulate_day,
)
from pipelines.synthetic import _popular_repeats as popular_repeats

SMALL = WorldSpec(
    users=600, items=300, days=4, seed=3, candidates_per_request=30, shown_per_request=8
)
TS = pa.timestamp("us", tz="UTC")
ID_ARROW_TYPES = {"int": pa.int64(), "string": pa.string()}


@pytest.fixture(scope="module", params=["int", "string"])
def world_dir(request, tmp_path_factory) -> tuple[WorldSpec, str]:
    spec = dataclasses.replace(SMALL, id_type=request.param)
    out = str(tmp_path_factory.mktemp(f"world-{request.param}") / "logs")
    generate_world(spec, out)
    return spec, out


def read_log(out: str, table: str) -> pl.DataFrame:
    """A table as readers see it, without the hive ``date`` column."""
    return pl.from_arrow(io.read_table(io.join(out, table))).drop("date", strict=False)


def expected_schemas(id_type: str) -> dict[str, pa.Schema]:
    ids = ID_ARROW_TYPES[id_type]
    return {
        "clicks": pa.schema(
            [
                ("request_id", pa.string()),
                ("user_id", ids),
                ("item_id", ids),
                ("ts", TS),
                ("dwell_s", pa.float64()),
            ]
        ),
        "impressions": pa.schema(
            [
                ("request_id", pa.string()),
                ("user_id", ids),
                ("item_id", ids),
                ("position", pa.int32()),
                ("ts", TS),
            ]
        ),
        "retrievals": pa.schema(
            [
                ("request_id", pa.string()),
                ("user_id", ids),
                ("item_id", ids),
                ("retrieval_rank", pa.int32()),
                ("ts", TS),
            ]
        ),
        "items": pa.schema(
            [
                ("item_id", ids),
                ("category", pa.string()),
                ("tags", pa.list_(pa.string())),
                ("price", pa.float64()),
                ("brand", pa.string()),
            ]
        ),
        "users": pa.schema(
            [("user_id", ids), ("country", pa.string()), ("age_bucket", pa.string())]
        ),
    }


# --- layout and schema ------------------------------------------------------------------------


def test_every_file_has_exactly_the_contract_1_schema(world_dir):
    spec, out = world_dir
    for table, schema in expected_schemas(spec.id_type).items():
        files = sorted(Path(out, table).rglob("*.parquet"))
        assert files, table
        for path in files:
            assert pq.read_schema(path).remove_metadata().equals(schema), (table, path)


def test_log_tables_are_hive_partitioned_by_the_day_of_their_rows(world_dir):
    spec, out = world_dir
    for table in LOG_TABLES:
        partitions = sorted(p.name for p in Path(out, table).iterdir())
        assert partitions == [f"date={day}" for day in spec.dates()]
        for day in spec.dates():
            rows = pl.read_parquet(Path(out, table, f"date={day}", "part-0.parquet"))
            assert rows.height > 0
            assert rows["ts"].dt.date().cast(pl.String).unique().to_list() == [day], table
    assert [p.name for p in Path(out, "items").iterdir()] == ["part-0.parquet"]


def test_ids_have_one_type_and_every_logged_id_is_known(world_dir):
    spec, out = world_dir
    users = set(read_log(out, "users")["user_id"].to_list())
    items = set(read_log(out, "items")["item_id"].to_list())
    assert len(users) == spec.users and len(items) == spec.items
    for table in LOG_TABLES:
        log = read_log(out, table)
        assert set(log["user_id"].unique().to_list()) <= users, table
        assert set(log["item_id"].unique().to_list()) <= items, table


def test_make_ids_strings_are_padded_ordinals_and_ints_are_distinct_and_not_dense():
    assert make_ids(3, kind="user", id_type="string").to_pylist() == [
        "u000000",
        "u000001",
        "u000002",
    ]
    assert make_ids(1_000_001, kind="item", id_type="string")[-1].as_py() == "i1000000"
    ints = make_ids(50_000, kind="item", id_type="int").to_numpy()
    assert len(np.unique(ints)) == 50_000
    assert (ints >= 0).all()
    assert not np.array_equal(np.sort(ints), np.arange(50_000))


# --- log consistency --------------------------------------------------------------------------


def test_every_click_was_impressed_and_every_impression_retrieved_in_its_request(world_dir):
    _, out = world_dir
    keys = ["request_id", "user_id", "item_id"]
    clicks, impressions, retrievals = (read_log(out, t) for t in LOG_TABLES)
    assert clicks.height > 0
    assert clicks.join(impressions, on=keys, how="anti").height == 0
    assert impressions.join(retrievals, on=keys, how="anti").height == 0
    # ...and at the request's time (clicks follow it within the same day).
    joined = clicks.join(impressions, on=keys, suffix="_shown")
    assert (joined["ts"] > joined["ts_shown"]).all()


def test_requests_have_r_distinct_ranked_candidates_and_s_shown_positions(world_dir):
    spec, out = world_dir
    per_request = (
        read_log(out, "retrievals")
        .group_by("request_id")
        .agg(
            pl.len().alias("rows"),
            pl.col("item_id").n_unique().alias("items"),
            pl.col("retrieval_rank").sort().alias("ranks"),
            pl.col("user_id").n_unique().alias("users"),
            pl.col("ts").n_unique().alias("times"),
        )
    )
    assert (per_request["rows"] == spec.candidates_per_request).all()
    assert (per_request["items"] == spec.candidates_per_request).all()
    assert (
        per_request["ranks"].to_list()
        == [list(range(spec.candidates_per_request))] * per_request.height
    )
    assert (per_request["users"] == 1).all() and (per_request["times"] == 1).all()
    shown = (
        read_log(out, "impressions")
        .group_by("request_id")
        .agg(pl.col("position").sort(), pl.col("item_id").n_unique().alias("items"))
    )
    assert shown.height == per_request.height
    assert shown["position"].to_list() == [list(range(spec.shown_per_request))] * shown.height
    assert (shown["items"] == spec.shown_per_request).all()


@settings(max_examples=15, deadline=None)
@given(
    users=st.integers(1, 40),
    items=st.integers(5, 60),
    candidates=st.integers(1, 12),
    shown=st.integers(1, 12),
    popular=st.integers(0, 15),
    pool_factor=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_any_small_world_keeps_the_request_invariants(
    users, items, candidates, shown, popular, pool_factor, seed
):
    candidates = min(candidates, items)
    shown = min(shown, candidates)
    spec = WorldSpec(
        users=users,
        items=items,
        days=1,
        seed=seed,
        num_categories=3,
        num_tags=6,
        tags_per_category=2,
        candidates_per_request=candidates,
        shown_per_request=shown,
        popular_candidates_per_request=popular,
        pool_factor=pool_factor,
        requests_per_user_per_day=3.0,
    )
    day = simulate_day(make_world(spec), 0)
    keys = ["request_id", "user_id", "item_id"]
    retrievals, impressions, clicks = (
        pl.from_arrow(day[t]) for t in ("retrievals", "impressions", "clicks")
    )
    assert retrievals.height == candidates * impressions.height // shown
    assert retrievals.select(keys).is_unique().all()
    assert impressions.join(retrievals, on=keys, how="anti").height == 0
    assert clicks.join(impressions, on=keys, how="anti").height == 0


def test_a_day_without_requests_gives_empty_tables_with_the_contract_schema():
    spec = dataclasses.replace(SMALL, requests_per_user_per_day=0.0)
    day = simulate_day(make_world(spec), 0)
    schemas = expected_schemas("int")
    for table in LOG_TABLES:
        assert day[table].num_rows == 0
        assert day[table].schema.equals(schemas[table]), table


def test_popular_repeats_matches_a_naive_membership_check():
    spec = dataclasses.replace(SMALL, users=50, items=80, candidates_per_request=10)
    world = make_world(spec)
    rng = np.random.default_rng(0)
    user_N = np.sort(rng.integers(0, spec.users, 200))
    popular_NE = rng.integers(0, spec.items, (200, 12))
    expected = np.zeros(popular_NE.shape, dtype=bool)
    for n, user in enumerate(user_N):
        seen = set(world.pool_items_UP[user].tolist())
        for e, item in enumerate(popular_NE[n]):
            expected[n, e] = item in seen
            seen.add(item)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(popular_repeats(world, user_N, popular_NE), expected)


# --- determinism ------------------------------------------------------------------------------


def _contents(out: str) -> dict[str, pa.Table]:
    return {
        str(path.relative_to(out)): pq.read_table(path)
        for path in sorted(Path(out).rglob("*.parquet"))
    }


def test_same_seed_writes_identical_tables_and_another_seed_does_not(tmp_path):
    spec = dataclasses.replace(SMALL, users=150, items=100, days=2)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_world(dataclasses.replace(spec, seed=seed), str(tmp_path / name))
    first, again, other = (_contents(str(tmp_path / name)) for name in "abc")
    assert first.keys() == again.keys() == other.keys()
    for path, table in first.items():
        assert table.equals(again[path]), path
    assert not first["clicks/date=2026-11-01/part-0.parquet"].equals(
        other["clicks/date=2026-11-01/part-0.parquet"]
    )
    assert not first["users/part-0.parquet"].equals(other["users/part-0.parquet"])


# --- the click model and the planted structure ------------------------------------------------


def _ctr_by_position(spec: WorldSpec) -> np.ndarray:
    world = make_world(spec)
    shown = np.zeros(spec.shown_per_request)
    clicked = np.zeros(spec.shown_per_request)
    for day_index in range(spec.days):
        day = {name: pl.from_arrow(table) for name, table in simulate_day(world, day_index).items()}
        shown += np.bincount(day["impressions"]["position"], minlength=spec.shown_per_request)
        clicked_positions = day["clicks"].join(
            day["impressions"], on=["request_id", "user_id", "item_id"]
        )["position"]
        clicked += np.bincount(clicked_positions, minlength=spec.shown_per_request)
    return clicked / shown


def test_ctr_falls_with_position_by_the_position_bias():
    ranked = _ctr_by_position(SMALL)
    assert ranked[0] > 2 * ranked[-1]
    # A ranker that ignores affinity (huge noise) puts equally good items at every position,
    # so the CTR ratio is the position bias alone: (1 + 7) ** 0.7 ≈ 4.29 for 8 positions.
    shuffled = _ctr_by_position(dataclasses.replace(SMALL, ranker_noise=1000.0))
    expected_ratio = SMALL.position_bias()[0] / SMALL.position_bias()[-1]
    assert expected_ratio == pytest.approx(8**0.7)
    assert shuffled[0] / shuffled[-1] == pytest.approx(expected_ratio, rel=0.25)


def _click_indices(out: str, oracle) -> tuple[np.ndarray, np.ndarray]:
    clicks = read_log(out, "clicks")
    user_index = {u: i for i, u in enumerate(oracle.user_ids.tolist())}
    item_index = {v: i for i, v in enumerate(oracle.item_ids.tolist())}
    users = np.array([user_index[u] for u in clicks["user_id"].to_list()])
    items = np.array([item_index[v] for v in clicks["item_id"].to_list()])
    return users, items


def test_true_affinity_ranks_clicked_items_near_the_top_of_the_catalog(world_dir):
    _, out = world_dir
    oracle = load_oracle(out)
    users, items = _click_indices(out, oracle)
    scores_CI = oracle_scores(oracle.user_vectors[users], oracle.item_vectors, oracle.item_bias)
    clicked_score_C = scores_CI[np.arange(len(items)), items]
    # Fraction of the catalog each clicked item beats: 0.5 for a random item.
    percentile_C = (scores_CI < clicked_score_C[:, None]).mean(axis=1)
    assert percentile_C.mean() > 0.85


def test_feature_centroids_alone_prefer_clicked_items(world_dir):
    spec, out = world_dir
    world = make_world(spec)
    oracle = load_oracle(out)
    users, items = _click_indices(out, oracle)
    feature_scores_CI = world.user_feature_vectors_UD[users] @ world.item_feature_vectors_ID.T
    clicked_C = feature_scores_CI[np.arange(len(items)), items]
    assert (feature_scores_CI < clicked_C[:, None]).mean() > 0.7


def test_country_predicts_clicked_categories_from_the_logs_alone(tmp_path):
    """Learnable from data: a (country → category) click table fitted on the first days
    predicts the last day's clicked categories better than global category shares."""
    spec = dataclasses.replace(SMALL, users=1500, days=4)
    out = str(tmp_path / "logs")
    generate_world(spec, out)
    clicks = (
        read_log(out, "clicks")
        .join(read_log(out, "users"), on="user_id")
        .join(read_log(out, "items").select("item_id", "category"), on="item_id")
        .with_columns(pl.col("ts").dt.date().cast(pl.String).alias("day"))
    )
    last_day = spec.dates()[-1]
    train, test = clicks.filter(pl.col("day") < last_day), clicks.filter(pl.col("day") == last_day)
    categories = spec.num_categories

    def log_share(group: list[str]) -> pl.DataFrame:
        # Add-one smoothing over all categories: log P(category | group).
        counts = train.group_by([*group, "category"]).len()
        totals = train.group_by(group).len().rename({"len": "total"}) if group else None
        if totals is None:
            counts = counts.with_columns(total=pl.lit(train.height))
        else:
            counts = counts.join(totals, on=group)
        return counts.with_columns(
            log_p=((pl.col("len") + 1) / (pl.col("total") + categories)).log()
        ).select([*group, "category", "log_p"])

    conditioned = test.join(log_share(["country"]), on=["country", "category"], how="left")
    marginal = test.join(log_share([]), on="category", how="left")
    floor = np.log(1 / (train.height + categories))
    conditioned_ll = conditioned["log_p"].fill_null(floor).mean()
    marginal_ll = marginal["log_p"].fill_null(floor).mean()
    assert conditioned_ll > marginal_ll + 0.1


def test_popular_items_get_more_clicks(world_dir):
    _, out = world_dir
    oracle = load_oracle(out)
    _, items = _click_indices(out, oracle)
    clicks_I = np.bincount(items, minlength=len(oracle.item_ids))
    top_decile = oracle.item_bias > np.quantile(oracle.item_bias, 0.9)
    bottom_half = oracle.item_bias < np.median(oracle.item_bias)
    # Per item, the planted-popular tenth is clicked several times as often as the bottom half.
    assert clicks_I[top_decile].mean() > 2 * clicks_I[bottom_half].mean()


# --- oracle -----------------------------------------------------------------------------------


def test_oracle_scores_is_dot_plus_bias():
    user_UD = np.array([[1.0, 2.0], [0.0, -1.0]])
    item_ID = np.array([[3.0, 4.0], [0.0, 1.0], [1.0, 1.0]])
    bias_I = np.array([0.5, -1.0, 0.0])
    # user 0: 1*3 + 2*4 + 0.5 = 11.5, 0 + 2 - 1 = 1, 1 + 2 = 3; user 1: -4 + 0.5, -1 - 1, -1
    np.testing.assert_allclose(
        oracle_scores(user_UD, item_ID, bias_I), [[11.5, 1.0, 3.0], [-3.5, -2.0, -1.0]]
    )
    np.testing.assert_array_equal(
        oracle_top_k(user_UD, item_ID, bias_I, 2, batch_size=1), [[0, 2], [2, 1]]
    )


def test_oracle_top_k_matches_a_full_sort():
    rng = np.random.default_rng(1)
    user_UD, item_ID, bias_I = (
        rng.standard_normal((37, 4)),
        rng.standard_normal((90, 4)),
        rng.standard_normal(90),
    )
    expected = np.argsort(-oracle_scores(user_UD, item_ID, bias_I), axis=1)[:, :10]
    np.testing.assert_array_equal(
        oracle_top_k(user_UD, item_ID, bias_I, 10, batch_size=8), expected
    )


def test_oracle_files_hold_the_planted_vectors_in_catalog_order(world_dir):
    spec, out = world_dir
    world = make_world(spec)
    oracle = load_oracle(out)
    assert oracle.user_ids.tolist() == read_log(out, "users")["user_id"].to_list()
    assert oracle.item_ids.tolist() == read_log(out, "items")["item_id"].to_list()
    assert oracle.user_vectors.shape == (spec.users, spec.latent_dim)
    assert oracle.item_vectors.dtype == np.float32
    np.testing.assert_array_equal(oracle.item_vectors, world.item_vectors_ID)
    np.testing.assert_array_equal(oracle.item_bias, world.item_bias_I)
    meta = io.read_json(io.join(out, "_oracle", "meta.json"))
    assert meta["latent_dim"] == spec.latent_dim and meta["seed"] == spec.seed
    assert meta["spec"]["id_type"] == spec.id_type


# --- spec validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field_name"),
    [
        ({"candidates_per_request": 400}, "candidates_per_request"),
        ({"shown_per_request": 31}, "shown_per_request"),
        ({"id_type": "uuid"}, "id_type"),
        ({"start_date": "11/01/2026"}, "start_date"),
        ({"users": 0}, "users"),
        ({"retrieval_noise": -1.0}, "retrieval_noise"),
    ],
)
def test_invalid_spec_names_the_field(change, field_name):
    with pytest.raises(ValueError, match=field_name):
        dataclasses.replace(SMALL, **change).validate()


# --- the job ----------------------------------------------------------------------------------

JOB_ARGS = ["--users", "80", "--items", "60", "--days", "2", "--candidates", "12", "--shown", "4"]


def test_job_writes_a_complete_output_and_prints_a_summary(tmp_path, capsys):
    out = str(tmp_path / "logs")
    assert generate_logs.main([out, *JOB_ARGS, "--id-type", "string"]) == 0
    assert io.is_complete(out)
    assert {p.name for p in Path(out).iterdir()} == {
        "_SUCCESS",
        "_oracle",
        "clicks",
        "impressions",
        "retrievals",
        "items",
        "users",
    }
    summary = capsys.readouterr().out
    assert "impressions" in summary and "CTR" in summary
    assert read_log(out, "users")["user_id"][0] == "u000000"


def test_job_refuses_a_non_empty_output_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "logs"
    out.mkdir()
    spec = generate_logs.spec_from_args(_parse([str(out), *JOB_ARGS]))
    generate_logs.run(spec, str(out))  # an empty directory is fine
    with pytest.raises(io.OutputExistsError):
        generate_logs.run(spec, str(out))
    assert generate_logs.main([str(out), *JOB_ARGS]) == 2
    assert "--overwrite" in capsys.readouterr().err
    generate_logs.run(dataclasses.replace(spec, seed=9), str(out), overwrite=True)
    assert io.read_json(io.join(str(out), "_oracle", "meta.json"))["seed"] == 9


def test_job_rejects_a_bad_spec_before_writing(tmp_path, capsys):
    out = tmp_path / "logs"
    assert generate_logs.main([str(out), *JOB_ARGS, "--shown", "20"]) == 2
    assert "shown_per_request" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail_after_writing(spec, out_dir, *, progress=False):
        io.write_json(io.join(out_dir, "items", "partial.json"), {})
        raise RuntimeError("disk full")

    monkeypatch.setattr(generate_logs, "generate_world", fail_after_writing)
    spec = generate_logs.spec_from_args(_parse([str(tmp_path / "logs"), *JOB_ARGS]))
    with pytest.raises(RuntimeError, match="disk full"):
        generate_logs.run(spec, str(tmp_path / "logs"))
    assert os.listdir(tmp_path) == []


def _parse(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    generate_logs.add_arguments(parser)
    return parser.parse_args(argv)
