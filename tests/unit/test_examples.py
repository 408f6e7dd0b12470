"""Per-partition build logic (pipelines.examples) on hand-built logs where the answer is known."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.examples import (
    MIN_ACCEPTANCE,
    PartitionSettings,
    UnexposedSampler,
    build_partition,
    combine,
    make_lookups,
    mix64,
    normalize_events,
    sample_unexposed,
    stable_id_hash,
    take_random,
    to_unit_interval,
    user_keys,
)
from tests.fixtures_logs import HandLogs, contract_violations, events_of, ts_us
from twotower_core.config import NegativesConfig

START, END, SPLIT = "2026-11-01 00:00", "2026-11-03 00:00", "2026-11-02 00:00"
T = "2026-11-01 10:00"  # a train-day time
E = "2026-11-02 09:00"  # an eval-day time
ENC, RO, UNEXP = "exposed_not_clicked", "ranked_out", "unexposed"


def run(
    logs: HandLogs,
    *,
    negatives: NegativesConfig | None = None,
    seed: int = 0,
    alpha=0.75,
    require_click_impression=False,
    users=None,
):
    """build_partition over all of ``logs`` as one partition, with vocab from the logs."""
    events = events_of(logs, start=START, end=END)
    item_ids = pl.Series(sorted(logs.tables["items"].column("item_id").drop_null().to_pylist()))
    if users is None:
        users = sorted(
            {u for u in logs.tables["clicks"].column("user_id").to_pylist() if u is not None}
        )
    lookups = make_lookups(item_ids, pl.Series(users), np.zeros(len(item_ids)), alpha=alpha)
    result = build_partition(
        events,
        lookups,
        PartitionSettings(
            split_us=ts_us(SPLIT),
            negatives=negatives or NegativesConfig(),
            seed=seed,
            require_click_impression=require_click_impression,
        ),
    )
    return result, lookups


def scenario(**overrides) -> HandLogs:
    """User 100: request r1 retrieved items 1..8 (ranks 0..7), showed 1..4, click on 2 (twice);
    request r2 on the eval day showed and got clicks on 3 and 7. User 200: request s1 showed
    10, 11, click on 10; a click on 11 without a request id; bad rows of every kind."""
    fields = {
        "clicks": [
            ("r1", 100, 2, "2026-11-01 10:01"),
            ("r1", 100, 2, "2026-11-01 10:02"),
            ("r2", 100, 3, E),
            ("r2", 100, 7, E),
            ("s1", 200, 10, T),
            (None, 200, 11, T),
            ("s1", None, 11, T),
            ("s1", 200, 99, T),
            ("s1", 200, 12, None),
            ("s0", 200, 13, "2026-10-30 10:00"),
        ],
        "impressions": [("r1", 100, i, i - 1, T) for i in (1, 2, 3, 4)]
        + [
            ("r2", 100, 3, 0, E),
            ("r2", 100, 7, 1, E),
            ("s1", 200, 10, 0, T),
            ("s1", 200, 11, 1, T),
        ],
        "retrievals": [("r1", 100, i, i - 1, T) for i in range(1, 9)],
        "items": range(1, 21),
    }
    fields.update(overrides)
    return HandLogs(**fields)


def negatives_of(result, user_id) -> list[tuple[int, str]]:
    row = result.train.filter(pl.col("user_id") == user_id).row(0, named=True)
    return list(zip(row["neg_item_ids"], row["neg_sources"]))


# ---------------------------------------------------------------------------------------------
# hashing and sampling primitives


def test_stable_id_hash_is_bits_for_ints_and_blake2b_for_strings():
    assert stable_id_hash(pl.Series([5, -1])).tolist() == [5, 2**64 - 1]
    expected = int.from_bytes(hashlib.blake2b(b"u1", digest_size=8).digest(), "little")
    assert stable_id_hash(pl.Series(["u1"])).tolist() == [expected]


def test_mix64_is_splitmix64():
    # splitmix64's finalizer applied to the first state 0x9E3779B97F4A7C15 gives the reference
    # generator's first output for seed 0.
    assert mix64(np.array([0x9E3779B97F4A7C15], dtype=np.uint64)).tolist() == [0xE220A8397B1DCDAF]
    assert mix64(np.array([0], dtype=np.uint64)).tolist() == [0]


def test_user_keys_depend_on_seed_and_id_only():
    keys = user_keys(pl.Series([7, 8]), seed=1)
    assert keys.tolist() == user_keys(pl.Series([8, 7]), seed=1).tolist()[::-1]
    assert keys.tolist() != user_keys(pl.Series([7, 8]), seed=2).tolist()


def test_sampler_weights_are_count_plus_one_to_the_alpha():
    sampler = UnexposedSampler.from_counts(np.array([0, 1, 3]), alpha=1.0)
    # weights 1, 2, 4 -> probabilities 1/7, 2/7, 4/7
    np.testing.assert_allclose(sampler.probabilities(), [1 / 7, 2 / 7, 4 / 7])
    # The alias table implies the same: item j gets accept[j] of its own column and
    # 1 - accept[i] of every column i aliased to it, each column having mass 1/3.
    implied = sampler.accept_I.copy()
    np.add.at(implied, sampler.alias_I, 1.0 - sampler.accept_I)
    np.testing.assert_allclose(implied / 3, [1 / 7, 2 / 7, 4 / 7])
    uniform = UnexposedSampler.from_counts(np.array([0, 1, 3]), alpha=0.0)
    np.testing.assert_allclose(uniform.probabilities(), [1 / 3] * 3)
    # Uniform weights: every column keeps its own item, so u in [j/3, (j+1)/3) draws j.
    assert uniform.draw(np.array([0.0, 0.33, 0.34, 0.66, 0.67, 0.999])).tolist() == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]


def test_sampler_draw_frequencies_match_the_weights():
    sampler = UnexposedSampler.from_counts(np.array([0, 5, 1, 30, 2, 0, 9]), alpha=0.75)
    uniforms = to_unit_interval(combine(np.uint64(3), np.arange(200_000)))
    frequency = np.bincount(sampler.draw(uniforms), minlength=7) / 200_000
    np.testing.assert_allclose(frequency, sampler.probabilities(), atol=0.005)


def test_take_random_is_a_uniform_subset_without_replacement():
    num_positives, k = 3000, 2
    candidates = pl.DataFrame(
        {
            "pos_id": np.repeat(np.arange(num_positives), 5),
            "pos_key": np.repeat(combine(np.uint64(1), np.arange(num_positives)), 5),
            "item_idx": np.tile(np.arange(5), num_positives),
        }
    )
    picked = take_random(candidates, k, source=ENC)
    per_positive = picked.group_by("pos_id").agg(pl.col("item_idx").n_unique().alias("n"), pl.len())
    assert (per_positive["n"] == k).all() and (per_positive["len"] == k).all()
    # Each of 5 candidates is in a uniform 2-subset with probability 2/5.
    frequency = (
        picked["item_idx"].value_counts().sort("item_idx")["count"].to_numpy() / num_positives
    )
    np.testing.assert_allclose(frequency, [0.4] * 5, atol=0.04)
    reordered = take_random(candidates.reverse(), k, source=ENC)
    assert picked.sort("pos_id", "order").equals(reordered.sort("pos_id", "order"))


def _needing(num_positives: int, need: int, user_of=lambda p: p % 3) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "pos_id": np.arange(num_positives, dtype=np.int64),
            "user": [user_of(p) for p in range(num_positives)],
            "pos_key": combine(np.uint64(9), np.arange(num_positives)),
            "need": np.full(num_positives, need, dtype=np.int64),
        }
    )


def test_unexposed_draws_follow_the_popularity_weights():
    counts = np.array([0, 1, 3, 7, 15])
    sampler = UnexposedSampler.from_counts(counts, alpha=0.5)  # weights 1, √2, 2, √8, 4
    draws = sample_unexposed(_needing(20000, 1), pl.Series([], dtype=pl.Int64), sampler)
    frequency = draws.drawn["item_idx"].value_counts().sort("item_idx")["count"].to_numpy() / 20000
    np.testing.assert_allclose(frequency, sampler.probabilities(), atol=0.015)


def test_unexposed_draws_skip_excluded_items_and_repeats():
    sampler = UnexposedSampler.from_counts(np.arange(30), alpha=1.0)
    # User 0 met items 10..29: keys user * I + item = 0 * 30 + item.
    exclusion_keys = pl.Series(np.arange(10, 30))
    draws = sample_unexposed(_needing(300, 6), exclusion_keys, sampler)
    drawn = draws.drawn.join(_needing(300, 6).select("pos_id", "user"), on="pos_id")
    assert drawn.group_by("pos_id").agg(pl.col("item_idx").n_unique())["item_idx"].eq(6).all()
    assert drawn.group_by("pos_id").len()["len"].eq(6).all()
    assert drawn.filter(pl.col("user") == 0)["item_idx"].max() < 10
    assert drawn.filter(pl.col("user") == 1)["item_idx"].max() >= 10
    assert draws.short.height == 0


def test_unexposed_exact_fallback_when_little_mass_is_left():
    # User 0 is excluded from items 0..97 of 100 (almost all the mass): only 98, 99 remain.
    sampler = UnexposedSampler.from_counts(np.zeros(100), alpha=0.0)
    exclusion = pl.Series(np.arange(98))
    needing = _needing(4, 2, user_of=lambda p: 0)
    draws = sample_unexposed(needing, exclusion, sampler)
    assert 2 / 100 < MIN_ACCEPTANCE and draws.num_exact == 4
    assert sorted(draws.drawn["item_idx"].to_list()) == [98, 98, 98, 98, 99, 99, 99, 99]
    # A user with fewer eligible items than needed is reported short, not drawn.
    short = sample_unexposed(_needing(1, 3, user_of=lambda p: 0), exclusion, sampler)
    assert short.short["pos_id"].to_list() == [0] and short.drawn.height == 0


# ---------------------------------------------------------------------------------------------
# build_partition on the scenario


def test_each_negative_source_follows_its_rule():
    result, lookups = run(scenario())
    assert result.train.select("user_id", "item_id", "request_id").rows() == [
        (100, 2, "r1"),
        (200, 10, "s1"),
    ]
    user_100 = negatives_of(result, 100)
    assert [s for _, s in user_100] == [ENC, RO, RO, UNEXP, UNEXP, UNEXP, UNEXP]
    # r1 showed 1..4; 2 is the positive and 3 was clicked on the eval day: only 1 and 4 qualify.
    assert user_100[0][0] in {1, 4}
    # r1 retrieved 1..8, showed 1..4; 7 was clicked on the eval day: 5, 6, 8 qualify.
    assert {item for item, s in user_100 if s == RO} <= {5, 6, 8}
    # Unexposed: never retrieved, shown or clicked for user 100: 9..20.
    assert {item for item, s in user_100 if s == UNEXP} <= set(range(9, 21))
    assert len({item for item, _ in user_100}) == 7

    user_200 = negatives_of(result, 200)
    # s1 showed 10 (clicked) and 11, clicked by user 200 in a row without request id: no
    # exposed_not_clicked; no retrievals: no ranked_out. All 7 are unexposed, 3 of them fills.
    assert [s for _, s in user_200] == [UNEXP] * 7
    assert {item for item, _ in user_200}.isdisjoint({10, 11})
    assert result.stats["fills"] == {"total": 3, ENC: 1, RO: 2}
    assert result.stats["negatives_by_source"] == {ENC: 1, RO: 2, UNEXP: 11}


def test_idx_columns_match_the_vocab():
    result, lookups = run(scenario())
    row = result.train.filter(pl.col("user_id") == 100).row(0, named=True)
    # item ids 1..20 -> item_idx 0..19; users [100, 200] -> 0, 1
    assert row["item_idx"] == 1 and row["user_idx"] == 0
    assert row["neg_item_idxs"] == [item - 1 for item in row["neg_item_ids"]]


def test_positives_are_deduplicated_and_split_by_time():
    result, _ = run(scenario())
    assert result.stats["duplicate_clicks"] == 1
    # (r1, 2) was clicked at 10:01 and 10:02: one row, first ts.
    assert result.train.filter(pl.col("user_id") == 100)["ts_us"].to_list() == [
        ts_us("2026-11-01 10:01")
    ]
    assert result.eval.select("user_id", "item_id", "ts_us").rows() == [
        (100, 3, ts_us(E)),
        (100, 7, ts_us(E)),
    ]
    assert result.stats["train_positives"] == 2 and result.stats["eval_positives"] == 2


def test_bad_rows_are_quarantined_with_a_reason():
    result, _ = run(scenario())
    reasons = dict(result.quarantine.select("reason", "item_id").rows())
    assert reasons == {
        "null_request_id": 11,
        "null_user_id": 11,
        "item_not_in_catalog": 99,
        "null_ts": 12,
    }
    assert result.stats["quarantined_by_reason"] == {r: 1 for r in reasons}
    row = result.quarantine.filter(pl.col("reason") == "null_ts").row(0, named=True)
    assert row["table"] == "clicks"
    assert row["row"] == '{"request_id":"s1","user_id":200,"item_id":12,"ts":null}'
    # Out-of-window rows (s0 on Oct 30) are not bad rows: dropped by the window, not counted.
    assert result.stats["window_rows"]["clicks"] == 9


def test_a_retrieval_without_a_rank_is_quarantined_but_still_excludes():
    """Item 9 was retrieved in r1 with no rank: a bad row, never a ranked_out candidate, and
    (the user met it) never an unexposed negative either."""
    retrievals = [("r1", 100, i, i - 1, T) for i in range(1, 9)] + [("r1", 100, 9, None, T)]
    result, _ = run(scenario(retrievals=retrievals))
    bad = result.quarantine.filter(pl.col("reason") == "null_retrieval_rank")
    assert bad.select("table", "item_id").rows() == [("retrievals", 9)]
    assert result.stats["quarantined_by_reason"]["null_retrieval_rank"] == 1
    negatives = result.train.filter(pl.col("user_id") == 100)["neg_item_ids"].explode()
    assert 9 not in negatives.to_list()


def test_ranked_out_rank_window():
    negatives = NegativesConfig(ranked_out_min_rank=6, ranked_out_max_rank=7)
    result, _ = run(scenario(), negatives=negatives)
    # Ranks 6, 7 are items 7 (clicked on the eval day) and 8: one candidate, one fill.
    user_100 = negatives_of(result, 100)
    assert [item for item, s in user_100 if s == RO] == [8]
    assert [s for _, s in user_100].count(UNEXP) == 5
    assert result.stats["fills"][RO] == 1 + 2
    # The upper bound is inclusive and binds: ranks 6..6 hold only the clicked item 7.
    narrow = NegativesConfig(ranked_out_min_rank=6, ranked_out_max_rank=6)
    result, _ = run(scenario(), negatives=narrow)
    assert [item for item, s in negatives_of(result, 100) if s == RO] == []


def test_without_impressions_and_retrievals_everything_is_unexposed():
    result, _ = run(scenario(impressions=None, retrievals=None))
    assert all(s == UNEXP for _, s in negatives_of(result, 100))
    assert result.stats["fills"] == {"total": 6, ENC: 2, RO: 4}
    # Without impressions, r1's shown items are unexposed candidates too; clicked ones never.
    clicked_by_100 = {2, 3, 7}
    assert {item for item, _ in negatives_of(result, 100)}.isdisjoint(clicked_by_100)


def test_positive_without_enough_unexposed_items_is_quarantined():
    # Catalog 1..11: user 100 met 1..8 (and clicked 3, 7 among them): 9, 10, 11 are left
    # unexposed, 7 are needed. User 200 met 10, 11: 9 left, enough.
    result, _ = run(scenario(items=range(1, 12)))
    assert result.train["user_id"].to_list() == [200]
    row = result.quarantine.filter(pl.col("reason") == "not_enough_negatives").row(0, named=True)
    assert (row["user_id"], row["item_id"], row["request_id"]) == (100, 2, "r1")
    assert result.stats["quarantined_by_reason"]["not_enough_negatives"] == 1
    assert result.stats["train_positives"] == 1


def test_require_click_impression():
    logs = scenario(clicks=[*scenario().clicks, ("s1", 200, 15, T)])
    result, _ = run(logs, require_click_impression=True)
    reasons = result.quarantine.filter(pl.col("reason") == "click_without_impression")
    assert reasons["item_id"].to_list() == [15]
    # Still a click of the user: never a negative for them.
    assert 15 not in {item for item, _ in negatives_of(result, 200)}


def test_zero_counts_give_empty_negative_lists():
    negatives = NegativesConfig(exposed_not_clicked=0, ranked_out=0, unexposed=0)
    result, _ = run(scenario(), negatives=negatives)
    assert result.train["neg_item_ids"].to_list() == [[], []]


def test_string_ids():
    result, _ = run(scenario(id_type="string"), users=["100", "200"])
    assert result.train["user_id"].to_list() == ["100", "200"]
    assert {item for item, _ in negatives_of(result, "100")} <= {str(i) for i in range(1, 21)}


def test_seed_changes_negatives_and_reruns_repeat_them():
    first, _ = run(scenario(), seed=1)
    again, _ = run(scenario(), seed=1)
    other, _ = run(scenario(), seed=2)
    assert first.train.equals(again.train)
    assert not first.train.equals(other.train)


def test_rows_do_not_depend_on_partitioning():
    logs = scenario()
    events = events_of(logs, start=START, end=END)
    item_ids = pl.Series(range(1, 21))
    lookups = make_lookups(item_ids, pl.Series([100, 200]), np.arange(20), alpha=0.75)
    settings_ = PartitionSettings(split_us=ts_us(SPLIT), negatives=NegativesConfig(), seed=3)
    whole = build_partition(events, lookups, settings_)
    parts = [
        build_partition(events.filter(pl.col("user_id") == user), lookups, settings_)
        for user in (200, 100)
    ]
    assert pl.concat([p.train for p in parts]).sort("user_id").equals(whole.train)
    assert pl.concat([p.eval for p in parts]).sort("user_id").equals(whole.eval)


def test_normalize_keeps_window_rows_and_null_ts():
    import pyarrow as pa

    clicks = scenario().tables["clicks"]
    events = normalize_events(
        pl.from_arrow(clicks),
        table="clicks",
        start_us=ts_us(START),
        end_us=ts_us(END),
        user_id_type=pa.int64(),
        item_id_type=pa.int64(),
    )
    assert events.height == clicks.num_rows - 1  # only the Oct 30 click is outside
    assert events["ts_us"].null_count() == 1
    assert events["table"].unique().to_list() == [0]


# ---------------------------------------------------------------------------------------------
# property: every output row obeys the contract on random small logs


@st.composite
def random_logs(draw):
    num_items = draw(st.integers(8, 25))
    users = [1, 2, 3]
    clicks, impressions, retrievals = [], [], []
    for request in range(draw(st.integers(1, 8))):
        user = draw(st.sampled_from(users))
        day = draw(st.sampled_from(["2026-11-01", "2026-11-02"]))
        at = f"{day} {10 + request % 10:02d}:00"
        retrieved = draw(st.lists(st.integers(1, num_items), min_size=0, max_size=10, unique=True))
        shown = retrieved[: draw(st.integers(0, len(retrieved)))]
        shown += draw(st.lists(st.integers(1, num_items + 3), max_size=3))
        clicked = draw(st.lists(st.sampled_from(shown), max_size=3)) if shown else []
        rid = f"q{request}"
        retrievals += [(rid, user, item, rank, at) for rank, item in enumerate(retrieved)]
        impressions += [(rid, user, item, pos, at) for pos, item in enumerate(shown)]
        clicks += [(rid, user, item, at) for item in clicked]
    return HandLogs(
        clicks=clicks,
        impressions=impressions,
        retrievals=retrievals,
        items=range(1, num_items + 1),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs=random_logs(), seed=st.integers(0, 3), min_rank=st.integers(0, 3))
def test_every_row_obeys_the_contract(logs, seed, min_rank):
    negatives = NegativesConfig(
        exposed_not_clicked=2, ranked_out=2, unexposed=3, ranked_out_min_rank=min_rank
    )
    result, _ = run(logs, negatives=negatives, seed=seed, users=[1, 2, 3])
    short = {
        (r["user_id"], r["request_id"], r["item_id"])
        for r in result.quarantine.filter(pl.col("reason") == "not_enough_negatives").iter_rows(
            named=True
        )
    }
    problems = contract_violations(
        logs.tables,
        result.train.rename({"ts_us": "ts"}),
        result.eval.rename({"ts_us": "ts"}),
        start_us=ts_us(START),
        end_us=ts_us(END),
        split_us=ts_us(SPLIT),
        counts=negatives.counts(),
        ranked_out_ranks=(min_rank, None),
        quarantined_positives=short,
    )
    assert problems == []


def test_contract_check_catches_a_broken_row():
    """The property test's checker can fail: a clicked item slipped in as a negative."""
    result, _ = run(scenario())
    broken = result.train.with_columns(
        pl.when(pl.col("user_id") == 100)
        .then(pl.lit([3, 5, 6, 9, 10, 11, 12]))
        .otherwise(pl.col("neg_item_ids"))
        .alias("neg_item_ids")
    )
    problems = contract_violations(
        scenario().tables,
        broken.rename({"ts_us": "ts"}),
        result.eval.rename({"ts_us": "ts"}),
        start_us=ts_us(START),
        end_us=ts_us(END),
        split_us=ts_us(SPLIT),
        counts=NegativesConfig().counts(),
    )
    assert any("negative 3 was clicked" in p for p in problems)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_unexposed_never_met_items_whatever_alpha(alpha):
    result, _ = run(scenario(), alpha=alpha)
    assert {item for item, s in negatives_of(result, 100) if s == UNEXP} <= set(range(9, 21))
