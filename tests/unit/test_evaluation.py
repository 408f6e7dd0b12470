"""Evaluation from published tables reproduces the training job's evaluation, without Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from jobs import evaluate
from pipelines import io
from pipelines.checkpoint import load_model
from pipelines.evaluation import (
    EvalSettings,
    align_to_vocab,
    evaluate_embeddings,
    evaluate_popularity,
    settings_of_model,
)
from pipelines.features import build_feature_table
from pipelines.retrieval import EmbeddingTable
from pipelines.train_loop import evaluate_model, load_eval_data
from tests.model_fixtures import (
    model_config,
    write_dataset_dir,
    write_embeddings_dir,
    write_model_dir,
)
from twotower_core.config import config_from_dict, config_to_dict

KS = (5, 10, 20)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    return write_dataset_dir(root / "dataset", num_users=30, num_items=50, id_type="string")


def training_metrics(model_dir: str, dataset: str, settings: EvalSettings) -> dict[str, float]:
    """What train_loop logs for a checkpoint: whole-table feature tensors, by dense index."""
    loaded = load_model(model_dir)
    users = io.read_table(io.join(dataset, "features", "users.parquet"))
    items = io.read_table(io.join(dataset, "features", "items.parquet"))
    return evaluate_model(
        loaded.model,
        user_features=build_feature_table(users, loaded.user_specs),
        item_features=build_feature_table(items, loaded.item_specs),
        num_items=items.num_rows,
        eval_data=load_eval_data(dataset, max_users=settings.max_users, seed=settings.seed),
        similarity=loaded.config.loss.similarity,
        ks=settings.ks,
    )


@pytest.mark.parametrize("similarity", ["dot", "cosine", "euclidean"])
def test_tables_reproduce_the_training_evaluation(dataset, tmp_path, similarity):
    model = write_model_dir(tmp_path / "model", dataset, similarity=similarity, seed=7)
    embeddings = write_embeddings_dir(tmp_path / "embeddings", model)
    expected = training_metrics(model, dataset, EvalSettings(ks=KS))
    got = evaluate_embeddings(embeddings, dataset, ks=KS)
    assert set(got) == set(expected)
    assert got["eval_users"] == 15  # every second user of 30 has eval rows
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def rewrite_shuffled(path: str, seed: int) -> None:
    """The same rows in a random order, over two files: readers must not rely on order."""
    table = io.read_table(path)
    order = np.random.default_rng(seed).permutation(table.num_rows)
    shuffled = table.take(pa.array(order))
    io.remove(path)
    half = table.num_rows // 2
    io.write_table(io.join(path, "part-a.parquet"), shuffled.slice(0, half))
    io.write_table(io.join(path, "part-b.parquet"), shuffled.slice(half))


def test_row_order_of_the_tables_does_not_matter(dataset, tmp_path):
    model = write_model_dir(tmp_path / "model", dataset, seed=1)
    embeddings = write_embeddings_dir(tmp_path / "embeddings", model)
    before = evaluate_embeddings(embeddings, dataset, ks=KS)
    rewrite_shuffled(io.join(embeddings, "users"), seed=0)
    rewrite_shuffled(io.join(embeddings, "items"), seed=1)
    assert evaluate_embeddings(embeddings, dataset, ks=KS) == pytest.approx(before, abs=1e-9)


def test_align_to_vocab_by_hand():
    # Table rows: "b", "a", "new"; vocab: a -> 1, b -> 0. "new" is not in the dataset: ignored.
    table = EmbeddingTable(
        ids=pa.array(["b", "a", "new"]),
        vectors_ND=np.array([[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]], np.float32),
    )
    vocab = pa.table({"item_id": ["a", "b"], "item_idx": pa.array([1, 0], pa.int64())})
    aligned = align_to_vocab(table, vocab, id_column="item_id", idx_column="item_idx", what="t")
    np.testing.assert_array_equal(aligned, [[1.0, 1.0], [2.0, 2.0]])
    vocab = pa.table({"item_id": ["a", "c", "d"], "item_idx": pa.array([0, 1, 2], pa.int64())})
    with pytest.raises(ValueError, match=r"t: 2 item_ids of the dataset have no embedding.*'c'"):
        align_to_vocab(table, vocab, id_column="item_id", idx_column="item_idx", what="t")


def test_popularity_matches_a_naive_count(dataset):
    """MostPop by hand: rank items by train clicks (ties: lower index), skip the user's train
    items, recall@k = hits / held-out items that are not train items."""
    vocab = io.read_table(io.join(dataset, "vocab", "items.parquet")).to_pydict()
    count = dict(zip(vocab["item_idx"], vocab["count"]))
    ranking = sorted(count, key=lambda item: (-count[item], item))
    train = io.read_table(io.join(dataset, "train")).to_pydict()
    held = io.read_table(io.join(dataset, "eval")).to_pydict()
    seen, targets = {}, {}
    for user, item in zip(train["user_idx"], train["item_idx"]):
        seen.setdefault(user, set()).add(item)
    for user, item in zip(held["user_idx"], held["item_idx"]):
        targets.setdefault(user, set()).add(item)
    recalls = {k: [] for k in KS}
    for user, items in targets.items():
        items = items - seen.get(user, set())
        if not items:
            continue
        top = [item for item in ranking if item not in seen.get(user, set())]
        for k in KS:
            recalls[k].append(len(items & set(top[:k])) / len(items))
    got = evaluate_popularity(dataset, ks=KS)
    for k in KS:
        assert got[f"recall@{k}"] == pytest.approx(np.mean(recalls[k]), abs=1e-12)
    assert got["eval_users"] == len(recalls[KS[0]])


def test_evaluate_job_compares_with_what_training_logged(dataset, tmp_path):
    config = model_config("cosine")
    model = write_model_dir(tmp_path / "model", dataset, config=config, seed=2)
    settings = settings_of_model(model)
    assert settings == EvalSettings(ks=tuple(config.train.eval_ks), max_users=None, seed=0)
    logged = training_metrics(model, dataset, settings)
    io.write_json(io.join(model, "metrics.json"), {"best": {**logged, "train_loss": 1.5}})
    embeddings = write_embeddings_dir(tmp_path / "embeddings", model)

    report_path = tmp_path / "report.json"
    assert evaluate.main(["--embeddings", embeddings, "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["source"] == {"embeddings": embeddings}
    assert report["dataset"] == dataset
    assert report["settings"] == {"ks": list(config.train.eval_ks), "max_users": None, "seed": 0}
    assert set(report["training_reported"]) == set(logged)  # metrics only, not train_loss
    assert report["max_abs_difference"] < 1e-6
    for key, value in logged.items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-6)

    # Other cut-offs are not what training computed: nothing to compare with.
    other = evaluate.run(embeddings=embeddings, ks=(3,))
    assert other.training_reported is None and other.max_abs_difference is None
    assert "recall@3" in other.metrics


def test_eval_users_sample_follows_the_model(dataset, tmp_path):
    config = config_from_dict(
        config_to_dict(model_config("dot")), overrides=["train.eval_max_users=4", "train.seed=3"]
    )
    model = write_model_dir(tmp_path / "model", dataset, config=config)
    embeddings = write_embeddings_dir(tmp_path / "embeddings", model)
    result = evaluate.run(embeddings=embeddings)
    assert result.settings["max_users"] == 4 and result.settings["seed"] == 3
    assert result.metrics["eval_users"] <= 4
    assert evaluate.run(embeddings=embeddings, max_users=10).metrics["eval_users"] > 4


def test_evaluate_job_refuses_bad_requests(dataset, tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        evaluate.run(dataset=dataset)
    with pytest.raises(ValueError, match="--dataset is required"):
        evaluate.run(baseline="popularity")
    with pytest.raises(FileNotFoundError, match="no _SUCCESS"):
        evaluate.run(embeddings=str(tmp_path / "missing"))
    baseline = evaluate.run(baseline="popularity", dataset=dataset, ks=(5,))
    assert baseline.source == {"baseline": "popularity"} and baseline.training_reported is None
