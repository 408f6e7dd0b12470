"""`twotower train` refuses bad input before Ray starts, naming the problem."""

import pytest

import jobs.ray_runtime
from jobs import train
from jobs.cli import main
from pipelines import io


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr(jobs.ray_runtime, "ensure_ray", refuse)


def _cli(tmp_path, *extra):
    return main(
        ["train", "--dataset", str(tmp_path / "dataset"), "--out", str(tmp_path / "model"), *extra]
    )


def test_unknown_loss_is_named(tmp_path, capsys):
    assert _cli(tmp_path, "--set", "loss.name=listnet") == 2
    err = capsys.readouterr().err
    assert "loss.name" in err and "in_batch_softmax" in err


def test_negative_learning_rate_is_named(tmp_path, capsys):
    assert _cli(tmp_path, "--set", "train.learning_rate=-0.01") == 2
    assert "train.learning_rate" in capsys.readouterr().err


def test_missing_dataset_is_named(tmp_path, capsys):
    assert _cli(tmp_path) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "dataset") in err and "does not exist" in err


def test_dataset_without_success_marker_is_refused(tmp_path, capsys):
    io.write_json(str(tmp_path / "dataset" / "manifest.json"), {})
    assert _cli(tmp_path) == 2
    assert "_SUCCESS" in capsys.readouterr().err


def test_init_from_must_be_a_published_model(tmp_path, monkeypatch):
    monkeypatch.setattr("pipelines.contracts.validate_dataset_dir", lambda path: {})
    with pytest.raises(FileNotFoundError, match="--init-from"):
        train.check_inputs(str(tmp_path / "dataset"), init_from=str(tmp_path / "old-model"))


def test_state_dir_is_a_hidden_sibling(tmp_path):
    assert train.state_dir_for(str(tmp_path / "model")) == str(tmp_path / ".model._train")
    assert train.state_dir_for("s3://bucket/runs/model/") == "s3://bucket/runs/.model._train"


def test_a_history_feature_that_is_not_a_user_bag_is_named_before_ray(tmp_path, capsys):
    from pipelines.build import build_dataset
    from pipelines.synthetic import WorldSpec, generate_world
    from twotower_core.config import config_from_dict

    logs = str(tmp_path / "logs")
    generate_world(WorldSpec(users=30, items=60, days=3, seed=1), logs)
    build_dataset(logs, str(tmp_path / "dataset"), config_from_dict({}).dataset, engine="local")
    assert _cli(tmp_path, "--set", "model.user_history_feature=country") == 2
    err = capsys.readouterr().err
    assert "model.user_history_feature" in err and "'country'" in err
