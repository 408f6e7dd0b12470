"""Config: every shipped preset validates; bad keys and values fail naming the dotted key."""

import pytest

from jobs.config_io import load_config, preset_names
from twotower_core.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    debug_config,
    parse_override,
)


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_validates(name):
    assert isinstance(load_config(name), Config)


def test_presets_include_default_and_debug():
    assert {"default", "debug"} <= set(preset_names())


def test_defaults_round_trip_through_a_plain_dict():
    config = config_from_dict({})
    assert config_from_dict(config_to_dict(config)) == config
    assert config_from_dict(config_to_dict(debug_config())) == debug_config()


def test_unknown_key_names_the_dotted_key():
    with pytest.raises(ConfigError, match=r"loss\.nmae"):
        config_from_dict({"loss": {"nmae": "bpr"}})


def test_unknown_loss_lists_the_valid_names():
    with pytest.raises(ConfigError, match=r"loss\.name.*in_batch_softmax"):
        config_from_dict({"loss": {"name": "softmaxx"}})


def test_negative_learning_rate_is_refused():
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        config_from_dict({"train": {"learning_rate": -0.1}})


@pytest.mark.parametrize(
    "train, message",
    [
        ({"early_stopping_metric": "recal@50"}, r"train\.early_stopping_metric.*'recal@50'.*recall@50"),
        # a cut-off evaluation does not compute: the score would be -inf every epoch
        ({"early_stopping_metric": "recall@20"}, r"train\.early_stopping_metric.*'recall@20'"),
        ({"early_stopping_patience": 0}, r"train\.early_stopping_patience.*>= 1"),
        ({"eval_max_users": 0}, r"train\.eval_max_users.*>= 1"),
        ({"torch_threads": -3}, r"train\.torch_threads.*>= 1"),
        ({"shuffle_buffer_batches": -1}, r"train\.shuffle_buffer_batches.*>= 0"),
        ({"prefetch_batches": -1}, r"train\.prefetch_batches.*>= 0"),
        ({"lr_schedule": "cosin"}, r"train\.lr_schedule.*'cosin'.*cosine"),
        ({"lr_warmup_steps": -1}, r"train\.lr_warmup_steps.*>= 0"),
        ({"lr_final_fraction": 1.5}, r"train\.lr_final_fraction.*\[0, 1\]"),
    ],
)
def test_train_evaluation_settings_are_checked(train, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"train": train})
    for metric in ("ndcg@20", "mrr", "epoch"):  # "epoch": publish the last epoch
        settings = {"early_stopping_metric": metric, "eval_ks": [10, 20]}
        assert config_from_dict({"train": settings}).train.early_stopping_metric == metric


def test_negative_logq_exponent_is_refused():
    with pytest.raises(ConfigError, match=r"loss\.logq_exponent.*>= 0"):
        config_from_dict({"loss": {"logq_exponent": -0.5}})
    assert config_from_dict({"loss": {"logq_exponent": 1.2}}).loss.logq_exponent == 1.2


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"model": {"ensemble_members": 0}}, r"model\.ensemble_members: must be >= 1"),
        (
            {"model": {"ensemble_members": 2}, "loss": {"similarity": "euclidean"}},
            r"model\.ensemble_members: needs loss\.similarity=dot",
        ),
        (
            {"model": {"ensemble_members": 2}, "loss": {"similarity": "cosine"}},
            r"model\.ensemble_members: needs loss\.similarity=dot \(or cosine with model",
        ),
    ],
)
def test_ensemble_members_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(settings)


def test_an_ensemble_writes_members_times_embedding_dim():
    config = config_from_dict({"model": {"ensemble_members": 3, "embedding_dim": 32}})
    assert config.model.output_dim == 96
    cosine = {"ensemble_members": 2, "normalize": True}
    assert config_from_dict({"model": cosine, "loss": {"similarity": "cosine"}}).model.output_dim


def test_shuffle_batch_must_be_positive():
    with pytest.raises(ConfigError, match=r"dataset\.shuffle_batch_mb.*>= 1"):
        config_from_dict({"dataset": {"shuffle_batch_mb": 0}})


def test_wrong_type_is_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs.*integer"):
        config_from_dict({"train": {"epochs": "five"}})


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        config_from_dict({"train": {"epochs": True}})


def test_overrides_win_and_are_typed():
    config = config_from_dict(
        {"loss": {"name": "bpr"}},
        overrides=[
            "loss.name=sampled_softmax",
            "train.epochs=7",
            "model.hidden_dims=[32,16]",
            "loss.hard_negative_top_k=null",
        ],
    )
    assert config.loss.name == "sampled_softmax"
    assert config.train.epochs == 7
    assert config.model.hidden_dims == (32, 16)
    assert config.loss.hard_negative_top_k is None


def test_override_needs_an_equals_sign():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("loss.name")


def test_source_weights_must_name_a_negative_source():
    with pytest.raises(ConfigError, match=r"loss\.source_weights\.clicked"):
        config_from_dict({"loss": {"source_weights": {"clicked": 1.0}}})


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_yaml_file_with_a_bad_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        load_config(str(path))
