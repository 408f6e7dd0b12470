"""build-dataset options, without Ray: the dwell filter (dataset.min_dwell_s) and the partition count."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines import io
from pipelines.build import build_dataset, check_inputs
from pipelines.contracts import LogsValidationError
from tests.fixtures_logs import HandLogs
from twotower_core.config import DatasetConfig, NegativesConfig

D1, D2 = "2026-11-01 10:00", "2026-11-02 10:00"


def logs_with_dwell(dwell: list | None, *, dwell_type: pa.DataType | None = None) -> HandLogs:
    """User 1 sees items 10, 11, 12 in r1 and clicks all three; an eval click on day 2."""
    logs = HandLogs(
        clicks=[("r1", 1, 10, D1), ("r1", 1, 11, D1), ("r1", 1, 12, D1), ("r2", 1, 13, D2)],
        impressions=[("r1", 1, 10, 0, D1), ("r1", 1, 11, 1, D1), ("r1", 1, 12, 2, D1)],
        items=range(10, 40),
    )
    if dwell is not None:
        clicks = logs.tables["clicks"]
        values = pa.array(dwell, dwell_type or pa.float64())
        logs.tables["clicks"] = clicks.append_column("dwell_s", values)
    return logs


def build(tmp_path, logs: HandLogs, **config):
    settings = DatasetConfig(
        negatives=NegativesConfig(unexposed=2, ranked_out=0, exposed_not_clicked=1), **config
    )
    out = str(tmp_path / "dataset")
    result = build_dataset(logs.write(tmp_path / "logs"), out, settings, engine="local")
    return result, io.read_table(io.join(out, "train")).to_pylist()


def test_short_dwell_clicks_are_not_positives(tmp_path, no_ray):
    # 11 is a bounce (1 s); 12 has no dwell recorded, so it is kept.
    result, train = build(tmp_path, logs_with_dwell([30.0, 1.0, None, 8.0]), min_dwell_s=5.0)
    assert sorted(row["item_id"] for row in train) == [10, 12]
    assert result.manifest["counts"]["short_dwell_clicks"] == 1
    assert any("1 clicks with dwell_s < 5.0" in note for note in result.manifest["notes"])
    # The bounce counts as not clicked: an exposed-not-clicked negative of r1's positives.
    for row in train:
        assert dict(zip(row["neg_sources"], row["neg_item_ids"])).get("exposed_not_clicked") == 11


def test_without_the_setting_every_click_is_a_positive(tmp_path, no_ray):
    result, train = build(tmp_path, logs_with_dwell([30.0, 1.0, None, 8.0]))
    assert sorted(row["item_id"] for row in train) == [10, 11, 12]
    assert result.manifest["counts"]["short_dwell_clicks"] == 0


def test_no_dwell_column_means_no_filter_and_a_note(tmp_path, no_ray):
    result, train = build(tmp_path, logs_with_dwell(None), min_dwell_s=5.0)
    assert sorted(row["item_id"] for row in train) == [10, 11, 12]
    assert any("no dwell filter applied" in note for note in result.manifest["notes"])


def test_a_non_numeric_dwell_column_is_refused_before_work(tmp_path):
    logs = logs_with_dwell(["30", "1", None, "8"], dwell_type=pa.string())
    path = logs.write(tmp_path / "logs")
    with pytest.raises(LogsValidationError, match="table 'clicks'.*column 'dwell_s'.*numeric"):
        check_inputs(path, str(tmp_path / "out"), DatasetConfig(min_dwell_s=5.0))
    check_inputs(path, str(tmp_path / "out"), DatasetConfig())  # not used: not checked


def test_partitions_follow_the_size_of_the_logs(tmp_path):
    from pipelines.build import num_partitions_for
    from pipelines.contracts import validate_logs

    info = validate_logs(logs_with_dwell(None).write(tmp_path / "logs"))
    assert num_partitions_for(DatasetConfig(), info) == 8  # at least 8
    assert num_partitions_for(DatasetConfig(num_partitions=3), info) == 3
    big = {
        name: table.__class__(**{**table.__dict__, "num_rows": 1_000_001})
        for name, table in info.tables.items()
    }
    info = info.__class__(**{**info.__dict__, "tables": big})
    # clicks and impressions, 1,000,001 rows each: one partition per 250k rows
    assert num_partitions_for(DatasetConfig(), info) == 9
