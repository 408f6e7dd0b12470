"""embed → evaluate → retrieve on a really trained model: Contract 4 holds, the published tables
score what training logged, FAISS ranks like brute force, and a crash publishes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from jobs import build_dataset, cli, embed, evaluate, train
from pipelines import io
from pipelines.embed import output_schema
from pipelines.retrieval import ItemIndex, load_embeddings
from tests.model_fixtures import FailingEmbedBatch, assert_same_top_k
from twotower_core.config import config_from_dict, config_to_dict, debug_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local):
    """A tiny world, its dataset and a 2-epoch debug model (2 DDP workers): the slow part."""
    from pipelines.synthetic import WorldSpec, generate_world

    root = tmp_path_factory.mktemp("embed_evaluate")
    logs = generate_world(WorldSpec(users=200, items=150, days=3, seed=5), str(root / "logs"))
    config = config_from_dict(
        config_to_dict(debug_config()),
        overrides=["train.epochs=2", "embed.batch_size=32", "embed.concurrency=2"],
    )
    dataset = build_dataset.run(logs=logs.out_dir, out=str(root / "dataset"), config=config).out
    model = train.run(dataset=dataset, out=str(root / "model"), config=config).out
    return {"root": root, "dataset": dataset, "model": model, "config": config}


@pytest.fixture(scope="module")
def published(trained):
    return embed.run(model=trained["model"], out=str(trained["root"] / "embeddings"))


def test_contract_4_layout(trained, published):
    out, dim = published.out, trained["config"].model.embedding_dim
    assert io.is_complete(out)
    manifest = io.read_json(io.join(out, "manifest.json"))
    assert manifest == published.manifest
    assert (manifest["dim"], manifest["similarity"], manifest["ann_metric"]) == (
        dim,
        "dot",
        "inner_product",
    )
    assert manifest["normalized"] is False
    assert manifest["model"] == trained["model"] and manifest["dataset"] == trained["dataset"]
    for side, id_column in (("users", "user_id"), ("items", "item_id")):
        source = io.read_table(io.join(trained["dataset"], "features", f"{side}.parquet"))
        schema = output_schema(side, source.schema.field(id_column).type, dim)
        # Each file's own footer: Ray Data must not have turned the column into a list or a
        # tensor extension type.
        for file in io.list_files(io.join(out, side)):
            written = io.read_parquet_metadata(file).schema.to_arrow_schema()
            assert written.remove_metadata().equals(schema), file
        table = io.read_table(io.join(out, side))
        assert manifest["counts"][side] == table.num_rows == source.num_rows
        assert sorted(table[id_column].to_pylist()) == sorted(source[id_column].to_pylist())
        vectors = table["embedding"].combine_chunks().flatten().to_numpy()
        assert np.isfinite(vectors).all()


def test_items_no_one_clicked_are_embedded(trained, published):
    vocab = io.read_table(io.join(trained["dataset"], "vocab", "items.parquet"))
    never_clicked = vocab.filter(pa.compute.equal(vocab["count"], 0))["item_id"].to_pylist()
    embedded = set(io.read_table(io.join(published.out, "items"))["item_id"].to_pylist())
    assert set(never_clicked) <= embedded
    assert len(embedded) == vocab.num_rows


def test_evaluate_from_tables_reproduces_training(trained, published, tmp_path):
    report_path = tmp_path / "report.json"
    argv = ["evaluate", "--embeddings", published.out, "--report", str(report_path)]
    assert cli.main(argv) == 0
    report = json.loads(report_path.read_text())
    logged = io.read_json(io.join(trained["model"], "metrics.json"))["best"]
    assert report["training_reported"] is not None
    for key, value in report["training_reported"].items():
        assert value == logged[key]
        assert report["metrics"][key] == pytest.approx(value, abs=1e-5), key
    assert report["max_abs_difference"] < 1e-5
    assert {"recall@10", "recall@50", "ndcg@10", "mrr"} <= set(report["training_reported"])
    assert report["metrics"]["recall@50"] > 0


def test_evaluate_a_model_dir_embeds_it_first(trained, published):
    from_model = evaluate.run(model=trained["model"])
    from_tables = evaluate.run(embeddings=published.out)
    assert from_model.source == {"model": trained["model"]}
    assert from_model.max_abs_difference is not None and from_model.max_abs_difference < 1e-5
    assert from_model.metrics == pytest.approx(from_tables.metrics, abs=1e-6)


def test_faiss_on_published_tables_equals_brute_force(published):
    tables = load_embeddings(published.out)
    index = ItemIndex(tables.items, ann_metric=tables.ann_metric)
    found = index.search(tables.users.vectors_ND, 20)
    compared = assert_same_top_k(
        found, tables.users.vectors_ND, tables.items, similarity=tables.similarity, k=20
    )
    assert compared > 0.8, "too many near-ties for the check to mean much"


def test_retrieve_cli_on_published_tables(published, capsys):
    tables = load_embeddings(published.out)
    user = tables.users.ids[0].as_py()
    argv = ["retrieve", "--embeddings", published.out, "--user-id", str(user), "--k", "20"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"user_id {user}: top 20 of {len(tables.items)} items")
    assert len(lines) == 22


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_a_crash_mid_way_publishes_nothing_and_a_rerun_is_safe(trained, published):
    """The item side dies on its second batch, after the user side was written: no output
    and no staging leftovers; then the same command succeeds, and again with --overwrite."""
    root = trained["root"]
    out = root / "crashed"
    with pytest.raises(Exception, match="injected failure in the item tower"):
        embed.run(model=trained["model"], out=str(out), embed_class=FailingEmbedBatch)
    assert not out.exists()
    assert leftovers(root, "crashed") == []

    argv = ["embed", "--model", trained["model"], "--out", str(out), "--concurrency", "1"]
    assert cli.main(argv) == 0
    assert io.is_complete(str(out))
    first = load_embeddings(str(out))
    assert cli.main(argv) == 2  # refused: the output exists and --overwrite was not given
    assert cli.main(argv + ["--overwrite"]) == 0
    second = load_embeddings(str(out))
    assert leftovers(root, "crashed") == []
    for side in ("users", "items"):
        a, b = getattr(first, side), getattr(second, side)
        order_a, order_b = np.argsort(a.ids.to_pylist()), np.argsort(b.ids.to_pylist())
        np.testing.assert_array_equal(a.vectors_ND[order_a], b.vectors_ND[order_b])
        reference = getattr(load_embeddings(published.out), side)
        order_r = np.argsort(reference.ids.to_pylist())
        np.testing.assert_allclose(a.vectors_ND[order_a], reference.vectors_ND[order_r], atol=1e-6)
