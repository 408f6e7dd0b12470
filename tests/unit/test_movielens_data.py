"""ML-100K benchmark data path on a hand-made atomic-file sample: parsing, protocols, negatives,
and the Contract 2 dataset dir the training job reads. No network, no Ray."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from benchmarks.movielens import (
    COLUMNS,
    PROTOCOLS,
    Split,
    evaluate_vectors,
    evaluate_vectors_per_user,
    fit_in_process,
    holdout_splits,
    load_ml100k,
    num_held_out,
    paired_difference,
    read_atomic_file,
    run_protocol,
    sample_unexposed,
    split_leave_last_out,
    split_random_fraction,
    table,
    user_features,
    with_overrides,
    write_dataset,
)
from pipelines import io
from pipelines.contracts import validate_dataset_dir
from twotower_core.config import debug_config

# user 1: 4 ratings, the last two at the same second (file order decides which is last);
# user 2: 3 ratings; user 3: a single rating (never held out).
INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
1\t10\t5\t100
2\t10\t3\t50
1\t20\t4\t200
1\t40\t2\t300
1\t30\t1\t300
2\t30\t4\t60
3\t20\t5\t10
2\t40\t5\t70
"""
ITEMS = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
10\tA Movie\t1995\tAnimation Children's Comedy
20\tB Movie\t1977\tAction Sci-Fi
30\tC Movie\tV\tDrama
40\tD Movie\t1994\t
50\tNever Rated\t1990\tHorror
"""
USERS = """user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token
2\t53\tF\tother\t94043
1\t24\tM\ttechnician\t85711
3\t33\tF\twriter\tT8H1N
"""


@pytest.fixture
def ml_dir(tmp_path):
    for name, text in (("inter", INTER), ("item", ITEMS), ("user", USERS)):
        (tmp_path / f"ml-100k.{name}").write_text(text, encoding="utf-8")
    return tmp_path


@pytest.fixture
def ml(ml_dir):
    return load_ml100k(ml_dir)


def pairs(frame: pl.DataFrame) -> list[tuple[int, int]]:
    return sorted(zip(frame["user_idx"].to_list(), frame["item_idx"].to_list()))


def test_read_atomic_file_types(ml_dir):
    items = read_atomic_file(ml_dir / "ml-100k.item")
    assert items.columns == ["item_id", "movie_title", "release_year", "class"]
    assert items["class"].to_list()[0] == ["Animation", "Children's", "Comedy"]
    assert items["class"].to_list()[3] == []
    inter = read_atomic_file(ml_dir / "ml-100k.inter")
    assert inter["rating"].dtype == pl.Float64
    assert inter["timestamp"].to_list()[:2] == [100.0, 50.0]


def test_read_atomic_file_rejects_bad_header_and_rows(tmp_path):
    bad_header = tmp_path / "bad.inter"
    bad_header.write_text("user_id:token\titem_id:weird\n1\t2\n")
    with pytest.raises(ValueError, match="item_id:weird"):
        read_atomic_file(bad_header)
    short_row = tmp_path / "short.inter"
    short_row.write_text("user_id:token\titem_id:token\n1\n")
    with pytest.raises(ValueError, match="line 2 has 1 fields"):
        read_atomic_file(short_row)


def test_load_indexes_ids_in_ascending_order(ml):
    assert ml.users["user_id"].to_list() == [1, 2, 3]
    assert ml.items["item_id"].to_list() == [10, 20, 30, 40, 50]
    assert ml.users["zip_prefix"].to_list() == ["8", "9", "T"]
    assert ml.users["age"].to_list() == [24.0, 53.0, 33.0]
    # "V" is no year.
    assert ml.items["release_year"].to_list() == ["1995", "1977", None, "1994", "1990"]
    assert ml.ratings.height == 8
    # user 1 = idx 0, item 30 = idx 2
    assert (0, 2) in pairs(ml.ratings)


def test_load_rejects_ratings_of_unknown_items(ml_dir):
    (ml_dir / "ml-100k.inter").write_text(INTER + "1\t99\t5\t400\n")
    with pytest.raises(ValueError, match="missing from"):
        load_ml100k(ml_dir)


def test_load_names_missing_column(ml_dir):
    (ml_dir / "ml-100k.user").write_text("user_id:token\tage:token\n1\t24\n")
    with pytest.raises(ValueError, match="ml-100k.user: missing column"):
        load_ml100k(ml_dir)


def test_leave_last_out_breaks_time_ties_by_file_order(ml):
    split = split_leave_last_out(ml.ratings)
    # user 1: items 40 and 30 share ts 300; 30 is on the later line, so it is held out (idx 2).
    # user 2: item 40 (idx 3) at ts 70 is last. user 3 has one rating: nothing held out.
    assert pairs(split.held_out) == [(0, 2), (1, 3)]
    assert split.train.height == 6
    assert set(pairs(split.train)).isdisjoint(pairs(split.held_out))


def test_leave_last_out_does_not_depend_on_row_order(ml):
    shuffled = ml.ratings.sample(fraction=1.0, shuffle=True, seed=3)
    assert pairs(split_leave_last_out(shuffled).held_out) == pairs(
        split_leave_last_out(ml.ratings).held_out
    )


@pytest.mark.parametrize(
    ("size", "expected"), [(1, 0), (2, 1), (3, 1), (5, 1), (8, 2), (10, 2), (13, 3), (20, 4)]
)
def test_num_held_out(size, expected):
    # round(0.2 · n), at least 1 and at most n − 1; 0.2 · 8 = 1.6 → 2, 0.2 · 13 = 2.6 → 3.
    assert num_held_out(size, 0.2) == expected


def test_random_fraction_split_sizes_and_seed():
    rng = np.random.default_rng(1)
    frame = pl.DataFrame(
        {
            "user_idx": np.repeat(np.arange(4), [1, 2, 10, 20]),
            "item_idx": np.concatenate([rng.permutation(50)[:n] for n in (1, 2, 10, 20)]),
            "ts": rng.integers(0, 1000, 33),
            "line": np.arange(33),
        }
    )
    split = split_random_fraction(frame, fraction=0.2, seed=0)
    held = split.held_out.group_by("user_idx").len().sort("user_idx")
    assert dict(zip(held["user_idx"].to_list(), held["len"].to_list())) == {1: 1, 2: 2, 3: 4}
    assert split.train.height + split.held_out.height == 33
    assert pairs(split_random_fraction(frame, seed=0).held_out) == pairs(split.held_out)
    assert pairs(split_random_fraction(frame, seed=1).held_out) != pairs(split.held_out)
    # The input order does not matter, only the rows and the seed.
    reordered = frame.reverse()
    assert pairs(split_random_fraction(reordered, seed=0).held_out) == pairs(split.held_out)


@pytest.mark.parametrize("name", ["p1", "p2"])
def test_validation_is_carved_from_train_only(ml, name):
    test, validation = holdout_splits(ml, PROTOCOLS[name])
    assert sorted(pairs(validation.train) + pairs(validation.held_out)) == pairs(test.train)
    assert set(pairs(validation.held_out)).isdisjoint(pairs(test.held_out))


def test_p2_validation_holds_out_a_tenth_of_each_users_train_rows(ml):
    test, validation = holdout_splits(ml, PROTOCOLS["p2"])
    train = test.train.group_by("user_idx").len()
    held = dict(validation.held_out.group_by("user_idx").len().iter_rows())
    for user, size in train.iter_rows():
        assert held.get(user, 0) == num_held_out(size, 0.1)


def test_sample_unexposed_avoids_train_items_and_follows_popularity():
    num_items = 6
    train_keys = np.array([0 * num_items + 0, 0 * num_items + 1, 1 * num_items + 5])
    counts = np.array([9, 9, 0, 0, 0, 99])
    users = np.array([0] * 2000 + [1] * 2000)
    drawn = sample_unexposed(
        users, train_keys, counts, num_negatives=3, alpha=1.0, rng=np.random.default_rng(0)
    )
    assert drawn.shape == (4000, 3)
    assert not np.isin(drawn[:2000], [0, 1]).any()
    assert not (drawn[2000:] == 5).any()
    # User 0 draws from items 2..5 ∝ (count + 1) = 1, 1, 1, 100: item 5 has p = 100 / 103.
    assert abs((drawn[:2000] == 5).mean() - 100 / 103) < 0.02
    # User 1: items 0..4 ∝ 10, 10, 1, 1, 1 → item 0 has p = 10 / 23.
    assert abs((drawn[2000:] == 0).mean() - 10 / 23) < 0.03


def test_sample_unexposed_fails_when_a_user_has_every_item():
    keys = np.arange(3)  # user 0 has items 0, 1, 2 of a 3-item catalog
    with pytest.raises(ValueError, match="no negatives left"):
        sample_unexposed(
            np.array([0]), keys, np.ones(3), num_negatives=1, alpha=0.0,
            rng=np.random.default_rng(0),
        )  # fmt: skip


def test_write_dataset_is_a_valid_contract2_dir(ml, tmp_path):
    split = split_leave_last_out(ml.ratings)
    out = str(tmp_path / "dataset")
    manifest = write_dataset(out, ml, split, num_negatives=2, alpha=0.5, seed=0)
    assert validate_dataset_dir(out)["counts"] == manifest["counts"]
    train = io.read_table(io.join(out, "train")).to_pylist()
    assert len(train) == 6
    assert manifest["counts"]["negatives_by_source"]["unexposed"] == 12
    train_items: dict[int, set[int]] = {}
    for row in train:
        train_items.setdefault(row["user_idx"], set()).add(row["item_idx"])
    for row in train:
        assert len(row["neg_item_idxs"]) == 2
        assert not set(row["neg_item_idxs"]) & train_items[row["user_idx"]]
        assert row["neg_sources"] == ["unexposed", "unexposed"]
        # ids and indices agree: item_id = 10 · (item_idx + 1) in this sample
        assert row["neg_item_ids"] == [10 * (i + 1) for i in row["neg_item_idxs"]]
    assert sorted((row["user_idx"], row["item_idx"]) for row in train) == pairs(split.train)
    vocab = io.read_table(io.join(out, "vocab", "items.parquet")).to_pydict()
    # train counts per item: 10 ×2, 20 ×2, 30 ×1, 40 ×1, 50 never rated
    assert vocab["count"] == [2, 2, 1, 1, 0]
    features = io.read_table(io.join(out, "features", "items.parquet"))
    assert features.column_names == ["item_idx", "item_id", "genres", "release_year"]
    users = io.read_table(io.join(out, "features", "users.parquet")).to_pydict()
    # train items only: user 1 (idx 0) held out item 30, user 2 (idx 1) item 40; user 3 kept 20.
    assert users["history"] == [[10, 20, 40], [10, 30], [20]]
    eval_rows = io.read_table(io.join(out, "eval")).to_pydict()
    assert sorted(zip(eval_rows["user_idx"], eval_rows["item_idx"])) == [(0, 2), (1, 3)]


def test_history_is_in_time_order_oldest_first(ml):
    # All of user 1's ratings: 10 at 100 s, 20 at 200 s, then 40 and 30 both at 300 s, 40 first
    # in the file. Time order, not id order: model.causal_history cuts the bag at the target.
    whole = Split(train=ml.ratings.select(COLUMNS), held_out=ml.ratings.select(COLUMNS).clear())
    history = user_features(ml, whole)["history"].to_list()
    assert history == [[10, 20, 40, 30], [10, 30, 40], [20]]


def test_write_dataset_same_seed_same_rows(ml, tmp_path):
    split = split_leave_last_out(ml.ratings)
    tables = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = str(tmp_path / name)
        write_dataset(out, ml, split, num_negatives=2, alpha=0.5, seed=seed)
        tables.append(io.read_table(io.join(out, "train"), columns=["item_idx", "neg_item_idxs"]))
    assert tables[0].equals(tables[1])
    assert not tables[0].equals(tables[2])


def test_evaluate_vectors_excludes_train_items():
    # 2 users, 3 items; user 0 trained on item 0 (scored highest) and holds out item 1.
    split = Split(
        train=pl.DataFrame({"user_idx": [0], "item_idx": [0], "ts": [0], "line": [0]}),
        held_out=pl.DataFrame({"user_idx": [0], "item_idx": [1], "ts": [1], "line": [1]}),
    )
    user_UD = np.array([[1.0], [1.0]])
    item_ID = np.array([[3.0], [2.0], [1.0]])
    metrics = evaluate_vectors(user_UD, item_ID, split, num_users=2, ks=(1,))
    # item 0 is excluded, so item 1 ranks first: hit at rank 1; user 1 has no target.
    assert metrics["hit_rate@1"] == 1.0
    assert metrics["ndcg@1"] == 1.0
    assert metrics["eval_users"] == 1.0


def test_fit_in_process_trains_and_scores_validation(ml, tmp_path):
    split = split_leave_last_out(ml.ratings)
    out = str(tmp_path / "dataset")
    write_dataset(out, ml, split, num_negatives=2, alpha=0.75, seed=0)
    config = with_overrides(
        debug_config(),
        ["train.epochs=2", "train.batch_size=2", "train.num_workers=1",
         "model.user_feature_kinds.history=ignore"],
    )  # fmt: skip
    history = fit_in_process(
        out, config, ml=ml, validation=split, ks=(1, 3), metric="ndcg@3", patience=5
    )
    assert [row["epoch"] for row in history] == [1, 2]
    # 6 train rows in 3 steps of 2 per epoch; the 2 users with a held-out item are scored.
    assert all(np.isfinite(row["train_loss"]) and row["eval_users"] == 2.0 for row in history)


def test_evaluate_vectors_per_user_matches_the_means():
    split = Split(
        train=pl.DataFrame({"user_idx": [0], "item_idx": [0], "ts": [0], "line": [0]}),
        held_out=pl.DataFrame(
            {"user_idx": [0, 2], "item_idx": [1, 0], "ts": [1, 1], "line": [1, 2]}
        ),
    )
    user_UD = np.array([[1.0], [1.0], [-1.0]])
    item_ID = np.array([[3.0], [2.0], [1.0]])
    _, users, values = evaluate_vectors_per_user(user_UD, item_ID, split, num_users=3, ks=(1,))
    # User 0: item 0 excluded, item 1 first (hit). User 1: no target. User 2 ranks item 0 last.
    assert users.tolist() == [0, 2]
    assert values["hit_rate@1"].tolist() == [1.0, 0.0]
    means = evaluate_vectors(user_UD, item_ID, split, num_users=3, ks=(1,))
    assert values["ndcg@1"].mean() == means["ndcg@1"] == 0.5


def test_paired_difference_of_identical_models_is_zero():
    values = np.random.default_rng(0).random(50)
    row = paired_difference(values[None, :], values)
    assert row["difference"] == 0.0 and row["ci95"] == [0.0, 0.0]
    assert row["users"] == 50 and row["users_better"] == row["users_worse"] == 0


def test_paired_difference_averages_seeds_before_comparing():
    # Two seeds that each win on one user and lose on the other tie the baseline per user.
    row = paired_difference(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0.5, 0.5]))
    assert row["difference"] == 0.0 and row["users_better"] == 0


def test_paired_difference_interval_separates_a_real_gain_from_noise():
    rng = np.random.default_rng(1)
    baseline = rng.random(900)
    noise = rng.normal(0.0, 0.1, 900)
    gain = paired_difference((baseline + 0.05 + noise)[None, :], baseline)
    assert 0.04 < gain["difference"] < 0.06
    assert 0.0 < gain["ci95"][0] < gain["difference"] < gain["ci95"][1]
    level = paired_difference((baseline + noise - noise.mean())[None, :], baseline)
    assert level["ci95"][0] < 0.0 < level["ci95"][1]
    # The interval is reproducible (seeded) and narrows with more users.
    assert paired_difference((baseline + noise)[None, :], baseline) == paired_difference(
        (baseline + noise)[None, :], baseline
    )
    few = paired_difference((baseline + noise)[None, :100], baseline[:100])
    assert few["ci95"][1] - few["ci95"][0] > gain["ci95"][1] - gain["ci95"][0]


def test_paired_difference_rejects_unpaired_users():
    with pytest.raises(ValueError, match="paired users differ: model 3, baseline 2"):
        paired_difference(np.zeros((1, 3)), np.zeros(2))


def test_run_protocol_compares_every_model_with_ease(ml, tmp_path):
    out = run_protocol(ml, PROTOCOLS["p2"], models=["mostpop", "ease"], seeds=[0, 1],
                       work_dir=str(tmp_path))  # fmt: skip
    assert list(out["paired_vs_ease"]) == ["mostpop"]
    rows = out["paired_vs_ease"]["mostpop"]
    assert list(rows) == list(PROTOCOLS["p2"].headline)
    for metric, row in rows.items():
        expected = (
            out["models"]["mostpop"]["summary"][metric][0]
            - out["models"]["ease"]["summary"][metric][0]
        )
        assert row["difference"] == pytest.approx(expected)
        assert row["ci95"][0] <= row["difference"] <= row["ci95"][1]
        assert row["users"] == out["models"]["ease"]["per_seed"][0]["eval_users"]
    assert "MostPop − EASE" in table({"p2": out}, num_seeds=2)
