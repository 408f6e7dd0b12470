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
