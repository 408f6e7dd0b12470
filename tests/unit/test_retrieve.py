"""pipelines.retrieval and `twotower retrieve`: FAISS over published tables equals brute force."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pytest

from jobs import retrieve
from pipelines import io
from pipelines.embed import SIDES, EmbeddingValidationError, to_embedding_array
from pipelines.retrieval import (
    EmbeddingTable,
    ItemIndex,
    brute_force_top_k,
    load_embeddings,
    parse_id,
)
from tests.model_fixtures import assert_same_top_k, model_config


def write_gaussian_dir(out, *, similarity: str, id_type: str, seed: int) -> str:
    """A published Contract 4 dir of standard-normal vectors (unit ones for cosine)."""
    from pipelines.embed import build_manifest
    from pipelines.synthetic import make_ids

    config = model_config(similarity)
    dim = config.model.embedding_dim
    rng = np.random.default_rng(seed)
    counts, id_types = {"users": 25, "items": 60}, {}
    with io.staged_output(str(out)) as staging:
        for side, count in counts.items():
            vectors_ND = rng.standard_normal((count, dim)).astype(np.float32)
            if similarity == "cosine":
                vectors_ND /= np.linalg.norm(vectors_ND, axis=1, keepdims=True)
            ids = make_ids(count, kind=side[:-1], id_type=id_type)
            id_types[side] = ids.type
            io.write_table(
                io.join(staging, side, "part-0.parquet"),
                pa.table({SIDES[side]: ids, "embedding": to_embedding_array(vectors_ND)}),
            )
        manifest = build_manifest(config, counts=counts, id_types=id_types, model="m", dataset="d")
        io.write_json(io.join(staging, "manifest.json"), manifest)
    return str(out)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """{(similarity, id_type): embedding dir}."""
    root = tmp_path_factory.mktemp("retrieve")
    return {
        (similarity, id_type): write_gaussian_dir(
            root / f"{similarity}_{id_type}", similarity=similarity, id_type=id_type, seed=n
        )
        for n, (similarity, id_type) in enumerate(
            (s, i) for s in ("dot", "cosine", "euclidean") for i in ("int", "string")
        )
    }


@pytest.mark.parametrize("id_type", ["int", "string"])
@pytest.mark.parametrize("similarity", ["dot", "cosine", "euclidean"])
def test_faiss_equals_brute_force(published, similarity, id_type):
    tables = load_embeddings(published[similarity, id_type])
    index = ItemIndex(tables.items, ann_metric=tables.ann_metric)
    assert index.index_name == ("IndexFlatL2" if similarity == "euclidean" else "IndexFlatIP")
    queries_QD = tables.users.vectors_ND
    found = index.search(queries_QD, 10)
    compared = assert_same_top_k(found, queries_QD, tables.items, similarity=similarity, k=10)
    assert compared > 0.9, "too many near-ties for the check to mean much"
    # Ids come back as the table's own ids, of its own type.
    catalog = set(tables.items.ids.to_pylist())
    assert all(item in catalog for row in found.ids for item in row)
    assert isinstance(found.ids[0][0], int if id_type == "int" else str)


def table(ids: list, vectors: list[list[float]]) -> EmbeddingTable:
    return EmbeddingTable(ids=pa.array(ids), vectors_ND=np.array(vectors, np.float32))


def test_inner_product_scores_by_hand():
    # query (1, 2): item 7 at (3, 0) -> 3, item 9 at (0, 2) -> 4, item 1000003 at (1, 1.25) -> 3.5
    items = table([7, 9, 1_000_003], [[3, 0], [0, 2], [1, 1.25]])
    found = ItemIndex(items, ann_metric="inner_product").search(np.array([[1, 2]]), 3)
    assert found.ids == [[9, 1_000_003, 7]]  # FAISS ids are the item ids, not row numbers
    np.testing.assert_allclose(found.scores_QK, [[4.0, 3.5, 3.0]])


def test_l2_scores_are_negative_distances():
    # query at the origin: distances 0, 5 (3-4-5 triangle), 1 -> scores 0, -1, -5
    items = table(["a", "far", "b"], [[0, 0], [3, 4], [1, 0]])
    found = ItemIndex(items, ann_metric="l2").search(np.zeros((1, 2)), 3)
    assert found.ids == [["a", "b", "far"]]
    np.testing.assert_allclose(found.scores_QK, [[0.0, -1.0, -5.0]])
    reference = brute_force_top_k(np.zeros((1, 2)), items, similarity="euclidean", k=3)
    assert reference.ids == found.ids
    np.testing.assert_allclose(reference.scores_QK, found.scores_QK, atol=1e-5)


def test_k_beyond_the_catalog_returns_every_item_once():
    items = table([1, 2], [[1, 0], [0, 1]])
    found = ItemIndex(items, ann_metric="inner_product").search(np.array([[1, 0]]), 10)
    assert found.ids == [[1, 2]]


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="valid: inner_product, l2"):
        ItemIndex(table([1], [[1.0]]), ann_metric="hamming")


def test_parse_id():
    assert parse_id("42", pa.int64()) == 42
    assert parse_id("42", pa.string()) == "42"
    with pytest.raises(ValueError, match="not an integer"):
        parse_id("u42", pa.int64())


def test_retrieve_prints_the_top_items(published, capsys):
    path = published["dot", "int"]
    tables = load_embeddings(path)
    user = tables.users.ids[3].as_py()
    assert retrieve.main(["--embeddings", path, "--user-id", str(user), "--k", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"user_id {user}: top 5 of 60 items (dot, FAISS IndexFlatIP)")
    expected = brute_force_top_k(
        tables.users.vectors_of([user], what="users"), tables.items, similarity="dot", k=5
    )
    printed = [int(line.split()[1]) for line in lines[2:]]
    assert printed == expected.ids[0]


def test_retrieve_string_ids_and_json(published, capsys):
    import json

    path = published["euclidean", "string"]
    tables = load_embeddings(path)
    users = [tables.users.ids[0].as_py(), tables.users.ids[5].as_py()]
    argv = ["--embeddings", path, "--k", "3", "--json"]
    assert retrieve.main(argv + ["--user-id", users[0], "--user-id", users[1]]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["index"] == "IndexFlatL2"
    assert list(payload["top_items"]) == users
    scores = [hit["score"] for hit in payload["top_items"][users[0]]]
    assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)


def test_unknown_user_is_named(published):
    with pytest.raises(ValueError, match=r"no embedding for \[123456789\]"):
        retrieve.run(embeddings=published["dot", "int"], user_ids=["123456789"])


def test_missing_faiss_gives_an_install_hint(published, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    path = published["dot", "string"]
    user = load_embeddings(path).users.ids[0].as_py()
    assert retrieve.main(["--embeddings", path, "--user-id", user]) == 2
    assert "pip install 'twotower[retrieve]'" in capsys.readouterr().err


def copy_dir(source: str, destination) -> str:
    io.copy_tree(source, str(destination))
    return str(destination)


def test_unpublished_or_inconsistent_dirs_are_refused(published, tmp_path):
    path = copy_dir(published["cosine", "int"], tmp_path / "emb")
    manifest = io.read_json(io.join(path, "manifest.json"))

    io.remove(io.join(path, "_SUCCESS"))
    with pytest.raises(FileNotFoundError, match="no _SUCCESS"):
        load_embeddings(path)
    io.write_text(io.join(path, "_SUCCESS"), "")

    io.write_json(io.join(path, "manifest.json"), {**manifest, "ann_metric": "l2"})
    with pytest.raises(EmbeddingValidationError, match="does not rank like similarity 'cosine'"):
        load_embeddings(path)

    io.write_json(io.join(path, "manifest.json"), {**manifest, "counts": {"users": 1, "items": 60}})
    with pytest.raises(EmbeddingValidationError, match="users/ has 25 rows, manifest says 1"):
        load_embeddings(path)

    io.write_json(io.join(path, "manifest.json"), manifest)
    items = io.read_table(io.join(path, "items"))
    io.remove(io.join(path, "items"))
    doubled = items.set_column(
        1, "embedding", to_embedding_array(2 * np.ones((items.num_rows, 32), np.float32))
    )
    io.write_table(io.join(path, "items", "part-0.parquet"), doubled)
    with pytest.raises(EmbeddingValidationError, match="manifest says normalized"):
        load_embeddings(path)


@pytest.mark.parametrize("id_type", ["int", "string"])
@pytest.mark.parametrize("similarity", ["dot", "euclidean"])
def test_docs_snippets_rank_like_brute_force(published, similarity, id_type, tmp_path, monkeypatch):
    """The FAISS and polars snippets of docs/consuming_embeddings.md run as written and find
    the brute-force top 20 of the first user."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "consuming_embeddings.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(snippets) == 2
    (tmp_path / "embeddings").symlink_to(published[similarity, id_type])
    monkeypatch.chdir(tmp_path)
    tables = load_embeddings(published[similarity, id_type])
    first_user = io.read_table(io.join(published[similarity, id_type], "users"))["user_id"][0]
    query_1D = tables.users.vectors_of([first_user.as_py()], what="users")
    expected = brute_force_top_k(query_1D, tables.items, similarity=similarity, k=20).ids[0]
    for snippet in snippets:
        namespace: dict = {}
        exec(snippet, namespace)
        top = namespace["top_items"] if "top_items" in namespace else None
        if top is None:  # the polars snippet
            top = namespace["items"]["item_id"].gather(namespace["top"]).to_list()
        assert top == expected
