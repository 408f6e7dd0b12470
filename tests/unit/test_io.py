"""Staged publishing: output appears whole with _SUCCESS last, or not at all."""

import os

import pyarrow as pa
import pytest

from pipelines import io


def test_staged_output_publishes_with_success_marker(tmp_path):
    out = tmp_path / "dataset"
    with io.staged_output(str(out)) as staging:
        io.write_table(io.join(staging, "train", "part-0.parquet"), pa.table({"x": [1, 2]}))
        assert not out.exists()
    assert io.is_complete(str(out))
    assert io.read_table(str(out / "train"))["x"].to_pylist() == [1, 2]
    assert not [p for p in os.listdir(tmp_path) if "_staging" in p]


def test_failure_leaves_nothing_visible(tmp_path):
    out = tmp_path / "dataset"
    with pytest.raises(RuntimeError):
        with io.staged_output(str(out)) as staging:
            io.write_json(io.join(staging, "manifest.json"), {"a": 1})
            raise RuntimeError("worker died")
    assert os.listdir(tmp_path) == []


def test_existing_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "model"
    with io.staged_output(str(out)) as staging:
        io.write_json(io.join(staging, "metrics.json"), {"v": 1})
    with pytest.raises(io.OutputExistsError, match="--overwrite"):
        with io.staged_output(str(out)):
            pass


def test_overwrite_replaces_and_a_failed_overwrite_keeps_the_old(tmp_path):
    out = tmp_path / "model"
    with io.staged_output(str(out)) as staging:
        io.write_json(io.join(staging, "metrics.json"), {"v": 1})
    with pytest.raises(ValueError):
        with io.staged_output(str(out), overwrite=True) as staging:
            io.write_json(io.join(staging, "metrics.json"), {"v": 2})
            raise ValueError("gate failed")
    assert io.read_json(str(out / "metrics.json")) == {"v": 1}
    with io.staged_output(str(out), overwrite=True) as staging:
        io.write_json(io.join(staging, "metrics.json"), {"v": 3})
    assert io.read_json(str(out / "metrics.json")) == {"v": 3}
    assert io.is_complete(str(out))


def test_overwrite_never_replaces_a_dir_that_is_not_a_published_output(tmp_path):
    """``--out ~ --overwrite`` must not delete a home directory: without _SUCCESS it is refused."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    with pytest.raises(io.OutputExistsError, match=r"refusing to replace .*home.*_SUCCESS"):
        with io.staged_output(str(home), overwrite=True) as staging:
            io.write_json(io.join(staging, "metrics.json"), {"v": 1})
    assert (home / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["home"]  # no staging left behind
    a_file = tmp_path / "report.csv"
    a_file.write_text("a,b\n")
    with pytest.raises(io.OutputExistsError, match="refusing to replace"):
        io.check_writable(str(a_file), overwrite=True)
    assert a_file.read_text() == "a,b\n"


def test_an_owner_may_replace_its_own_incomplete_output(tmp_path):
    out = tmp_path / "cell"
    out.mkdir()
    (out / "result.json").write_text("{}")  # a writer died between the move and _SUCCESS
    with io.staged_output(str(out), overwrite=True, replace_incomplete=True) as staging:
        io.write_json(io.join(staging, "result.json"), {"v": 2})
    assert io.read_json(str(out / "result.json")) == {"v": 2}
    assert io.is_complete(str(out))


def test_an_empty_directory_counts_as_no_output(tmp_path):
    out = tmp_path / "mounted"
    out.mkdir()
    with io.staged_output(str(out)) as staging:
        io.write_json(io.join(staging, "manifest.json"), {"v": 1})
    assert io.is_complete(str(out))


def test_replace_file_atomically(tmp_path):
    path = str(tmp_path / "LATEST")
    io.replace_file_atomically(path, "runs/2026-11-01\n")
    io.replace_file_atomically(path, "runs/2026-11-02\n")
    assert io.read_text(path) == "runs/2026-11-02\n"
    assert os.listdir(tmp_path) == ["LATEST"]


def test_torch_round_trip(tmp_path):
    import torch

    path = str(tmp_path / "x" / "model.pt")
    io.save_torch(path, {"w": torch.arange(3)})
    assert io.load_torch(path)["w"].tolist() == [0, 1, 2]


def test_absolute_resolves_local_paths_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert io.absolute("demo-output/model") == str(tmp_path / "demo-output" / "model")
    assert io.absolute(str(tmp_path / "x")) == str(tmp_path / "x")
    assert io.absolute("s3://bucket/runs/model") == "s3://bucket/runs/model"
    assert io.absolute(None) is None
