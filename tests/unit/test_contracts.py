"""Contract 1 validation (footers only, named errors) and Contract 2 dir checks; no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import build_dataset as job
from pipelines import io
from pipelines.build import check_inputs, resolve_window
from pipelines.contracts import (
    DatasetValidationError,
    LogsValidationError,
    validate_dataset_dir,
    validate_logs,
)
from tests.fixtures_logs import HandLogs, ts_us, write_table_files
from twotower_core.config import DatasetConfig, debug_config

T = "2026-11-01 10:00"


def small_logs(**overrides) -> HandLogs:
    fields = {
        "clicks": [("r1", 1, 10, T), ("r2", 2, 11, "2026-11-03 08:00")],
        "impressions": [("r1", 1, 10, 0, T), ("r1", 1, 12, 1, T)],
        "retrievals": [("r1", 1, 13, 0, T)],
        "items": [10, 11, 12, 13],
        "users": [{"user_id": 1, "country": "US"}],
    }
    fields.update(overrides)
    return HandLogs(**fields)


def test_valid_logs_give_types_counts_and_ts_range(tmp_path):
    logs = small_logs().write(tmp_path / "logs", files_per_table=2)
    info = validate_logs(logs)
    assert set(info.tables) == {"clicks", "impressions", "retrievals", "items", "users"}
    assert info.id_type == "int64"
    assert info.tables["clicks"].num_rows == 2
    assert len(info.tables["clicks"].files) == 2
    assert info.ts_range_us() == (ts_us(T), ts_us("2026-11-03 08:00"))
    assert info.ts_type == pa.timestamp("us", tz="UTC")
    assert info.notes == ()


def test_optional_tables_missing_are_noted(tmp_path):
    logs = small_logs(impressions=None, retrievals=None, users=None).write(tmp_path / "logs")
    info = validate_logs(logs)
    assert set(info.tables) == {"clicks", "items"}
    assert any("no impressions table" in note for note in info.notes)
    assert any("no retrievals table" in note for note in info.notes)


def test_string_ids_are_accepted(tmp_path):
    logs = small_logs(users=None, id_type="string")
    info = validate_logs(logs.write(tmp_path / "logs"))
    assert info.id_type == "string"


@pytest.mark.parametrize("table", ["clicks", "items"])
def test_missing_required_table_names_it(tmp_path, table):
    logs = small_logs().write(tmp_path / "logs")
    io.remove(str(Path(logs) / table))
    with pytest.raises(LogsValidationError, match=f"table '{table}'.*required table is missing"):
        validate_logs(logs)


def test_missing_logs_dir(tmp_path):
    with pytest.raises(LogsValidationError, match="does not exist"):
        validate_logs(str(tmp_path / "nowhere"))


def test_empty_table_dir(tmp_path):
    logs = small_logs().write(tmp_path / "logs")
    io.remove(str(Path(logs) / "impressions"))
    (Path(logs) / "impressions").mkdir()
    with pytest.raises(LogsValidationError, match="table 'impressions'.*no Parquet files"):
        validate_logs(logs)


def test_missing_column_names_table_file_and_column(tmp_path):
    logs = small_logs()
    logs.tables["retrievals"] = logs.tables["retrievals"].drop_columns(["retrieval_rank"])
    path = logs.write(tmp_path / "logs")
    with pytest.raises(LogsValidationError) as caught:
        validate_logs(path)
    error = caught.value
    assert error.table == "retrievals" and error.column == "retrieval_rank"
    assert error.file.endswith("part-000.parquet")
    assert "missing required column" in str(error)
    assert "retrievals" in str(error) and "retrieval_rank" in str(error)


@pytest.mark.parametrize(
    ("table", "column", "bad", "problem"),
    [
        ("clicks", "ts", pa.array(["2026-11-01", "2026-11-02"]), "expected an Arrow timestamp"),
        ("clicks", "user_id", pa.array([1.5, 2.5]), "expected int64 or string ids"),
        ("impressions", "position", pa.array(["a", "b"]), "expected an integer"),
    ],
)
def test_wrong_type_names_table_file_column_and_problem(tmp_path, table, column, bad, problem):
    logs = small_logs()
    original = logs.tables[table]
    logs.tables[table] = original.set_column(original.column_names.index(column), column, bad)
    path = logs.write(tmp_path / "logs")
    with pytest.raises(LogsValidationError, match=problem) as caught:
        validate_logs(path)
    assert (caught.value.table, caught.value.column) == (table, column)
    assert caught.value.file is not None


def test_id_type_must_agree_across_tables(tmp_path):
    logs = small_logs()
    items = logs.tables["items"]
    logs.tables["items"] = items.set_column(0, "item_id", items["item_id"].cast(pa.string()))
    with pytest.raises(
        LogsValidationError, match="table 'items', column 'item_id'.*one type across tables"
    ):
        validate_logs(logs.write(tmp_path / "logs"))


def test_id_type_must_agree_across_files(tmp_path):
    logs = small_logs().write(tmp_path / "logs")
    clicks = pq.read_table(Path(logs) / "clicks")
    stringly = clicks.set_column(1, "user_id", clicks["user_id"].cast(pa.string()))
    pq.write_table(stringly, Path(logs) / "clicks" / "part-zzz.parquet")
    with pytest.raises(LogsValidationError, match="part-zzz.parquet.*column 'user_id'"):
        validate_logs(logs)


def test_corrupt_parquet_file_is_named(tmp_path):
    logs = small_logs().write(tmp_path / "logs")
    bad = Path(logs) / "impressions" / "date=2026-11-02" / "part-0.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(LogsValidationError, match="unreadable or corrupt Parquet") as caught:
        validate_logs(logs)
    assert caught.value.table == "impressions"
    assert caught.value.file == str(bad)


def test_hidden_and_marker_files_are_ignored(tmp_path):
    logs = small_logs().write(tmp_path / "logs")
    (Path(logs) / "clicks" / "_SUCCESS").write_text("")
    (Path(logs) / "clicks" / ".part-000.parquet.crc").write_text("junk")
    assert len(validate_logs(logs).tables["clicks"].files) == 1


def test_ts_range_unknown_without_statistics(tmp_path):
    logs = small_logs().write(tmp_path / "logs")
    clicks = pq.read_table(Path(logs) / "clicks")
    io.remove(str(Path(logs) / "clicks"))
    (Path(logs) / "clicks").mkdir()
    pq.write_table(clicks, Path(logs) / "clicks" / "part-0.parquet", write_statistics=False)
    assert validate_logs(logs).ts_range_us() is None


def test_check_inputs_refuses_existing_output_and_bad_config(tmp_path):
    logs = small_logs(impressions=None).write(tmp_path / "logs")
    out = tmp_path / "dataset"
    out.mkdir()
    check_inputs(logs, str(out), DatasetConfig())  # an empty directory counts as none
    (out / "manifest.json").write_text("{}")
    (out / io.SUCCESS_MARKER).write_text("")
    with pytest.raises(io.OutputExistsError, match="--overwrite"):
        check_inputs(logs, str(out), DatasetConfig())
    check_inputs(logs, str(out), DatasetConfig(), overwrite=True)
    with pytest.raises(ValueError, match="require_click_impression"):
        check_inputs(logs, str(tmp_path / "new"), DatasetConfig(require_click_impression=True))


def test_job_fails_on_bad_logs_before_ray(tmp_path):
    """The job validates before ensure_ray: a bad input never reaches Ray."""
    logs = small_logs()
    logs.tables["clicks"] = logs.tables["clicks"].drop_columns(["ts"])
    path = logs.write(tmp_path / "logs")
    with pytest.raises(LogsValidationError, match="table 'clicks'.*column 'ts'"):
        job.run(
            logs=path, out=str(tmp_path / "out"), config=debug_config(), address="ray://nowhere:1"
        )
    assert not (tmp_path / "out").exists()


def test_job_flags_become_validated_overrides(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    args = parser.parse_args(
        ["--logs", "L", "--out", "O", "--start", "2026-11-01", "--window-days", "3", "--seed", "7"]
    )
    assert job.overrides_from_args(args) == [
        "dataset.start=2026-11-01",
        "dataset.window_days=3",
        "dataset.seed=7",
    ]
    for action in parser._actions:
        assert action.help, f"option {action.dest} has no help text"


# ---------------------------------------------------------------------------------------------
# window resolution


def test_window_defaults_to_all_days_and_last_day_eval():
    window = resolve_window(DatasetConfig(), (ts_us("2026-11-01 10:00"), ts_us("2026-11-07 23:00")))
    assert (str(window.start), str(window.end)) == ("2026-11-01", "2026-11-07")
    assert window.split_us == ts_us("2026-11-07 00:00")
    assert window.end_us == ts_us("2026-11-08 00:00")


def test_window_days_and_explicit_dates():
    data = (ts_us("2026-11-01 10:00"), ts_us("2026-11-07 23:00"))
    window = resolve_window(DatasetConfig(window_days=3, eval_days=2), data)
    assert (str(window.start), str(window.end)) == ("2026-11-05", "2026-11-07")
    assert window.split_us == ts_us("2026-11-06 00:00")
    window = resolve_window(DatasetConfig(start="2026-11-02", end="2026-11-04"), None)
    assert window.start_us == ts_us("2026-11-02 00:00") and window.split_us == ts_us(
        "2026-11-04 00:00"
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (DatasetConfig(start="2026-11-05", end="2026-11-04"), "after dataset.end"),
        (DatasetConfig(start="2026-11-04", end="2026-11-04"), "leaves no training days"),
        (DatasetConfig(end="11/04/2026", start="2026-11-01"), "dataset.end: expected a date"),
        (
            DatasetConfig(start="2026-11-01", end="2026-11-04", split_time="2026-12-01T00:00"),
            "leaves no training days",
        ),
    ],
)
def test_window_errors_name_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        resolve_window(config, None)


# ---------------------------------------------------------------------------------------------
# Contract 2 dir checks


def _fake_dataset(root: Path) -> Path:
    from pipelines.contracts import eval_schema, train_schema, vocab_schema

    ts_type = pa.timestamp("us", tz="UTC")
    write_table_files(root / "train", train_schema(pa.int64(), pa.int64(), ts_type).empty_table())
    write_table_files(root / "eval", eval_schema(pa.int64(), pa.int64(), ts_type).empty_table())
    for side in ("user", "item"):
        vocab = pa.table(
            {f"{side}_id": [1, 2], f"{side}_idx": [0, 1], "count": [0, 3]},
            schema=vocab_schema(side, pa.int64()),
        )
        (root / "vocab").mkdir(parents=True, exist_ok=True)
        (root / "features").mkdir(parents=True, exist_ok=True)
        pq.write_table(vocab, root / "vocab" / f"{side}s.parquet")
        pq.write_table(
            vocab.select([f"{side}_idx", f"{side}_id"]), root / "features" / f"{side}s.parquet"
        )
    (root / "manifest.json").write_text(json.dumps({"num_negatives": 7}))
    (root / "_SUCCESS").write_text("")
    return root


def test_validate_dataset_dir_accepts_complete_dir(tmp_path):
    assert validate_dataset_dir(str(_fake_dataset(tmp_path / "ds"))) == {"num_negatives": 7}


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda root: (root / "_SUCCESS").unlink(), "no _SUCCESS marker"),
        (lambda root: (root / "manifest.json").unlink(), "manifest.json is missing"),
        (
            lambda root: (root / "vocab" / "items.parquet").unlink(),
            "vocab/items.parquet is missing",
        ),
        (
            lambda root: pq.write_table(
                pa.table({"user_id": [1]}), root / "train" / "part-000.parquet"
            ),
            "missing column",
        ),
        (
            lambda root: pq.write_table(
                pa.table({"item_idx": [0], "item_id": [1]}), root / "features" / "items.parquet"
            ),
            "vocab/items.parquet has 2 rows but features/items.parquet has 1",
        ),
    ],
)
def test_validate_dataset_dir_names_the_problem(tmp_path, breakage, message):
    root = _fake_dataset(tmp_path / "ds")
    breakage(root)
    with pytest.raises(DatasetValidationError, match=message):
        validate_dataset_dir(str(root))
