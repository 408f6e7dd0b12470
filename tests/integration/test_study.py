"""``twotower study`` end to end on a local Ray: a tiny grid runs, writes its report, plots and a
loadable best config; a rerun after losing some cells trains only those."""

import json
import os
import shutil

import pytest

from jobs import study as study_job
from jobs.config_io import load_config
from pipelines import study
from pipelines.study import grid_from_dict

pytestmark = pytest.mark.integration

TINY_GRID = {
    "base": {
        "model": {
            "embedding_dim": 8,
            "id_embedding_dim": 8,
            "feature_embedding_dim": 4,
            "hidden_dims": [16],
        },
        "train": {"epochs": 1, "batch_size": 64, "num_workers": 2, "eval_ks": [10, 50]},
        "dataset": {"num_partitions": 2},
    },
    "data_negatives": 2,
    "sampled_negatives": 8,
    "mixes": ["ranked_out", "exposed_not_clicked+unexposed", "in_batch", "mixed"],
    "losses": ["pointwise_bce", "in_batch_softmax"],
    "similarities": ["dot"],
    "seeds": [0, 1],
}


def test_tiny_study_runs_end_to_end_and_resumes(small_world, ray_local, tmp_path):
    grid = grid_from_dict(TINY_GRID)
    out = str(tmp_path / "study")
    first = study_job.run(out=out, grid=grid, logs=small_world.out_dir)

    # ranked_out and enc+unx train pointwise_bce; in_batch and mixed train in_batch_softmax;
    # the four other combinations are dropped with a reason. Two seeds each.
    configurations = {(s.mix, s.loss) for s in first.ranking}
    assert configurations == {
        ("ranked_out", "pointwise_bce"),
        ("exposed_not_clicked+unexposed", "pointwise_bce"),
        ("in_batch", "in_batch_softmax"),
        ("mixed", "in_batch_softmax"),
    }
    assert len(first.executed) == 8 and not first.reused and not first.failed
    assert len(first.dropped) == 4
    assert all(s.seeds == (0, 1) for s in first.ranking)
    headline = [s.metrics["recall@50"][0] for s in first.ranking]
    assert headline == sorted(headline, reverse=True)
    assert set(first.references) == {"oracle", "popularity"}

    for name in ("report.md", "recall_at_50.png", "cost.png", "summary.json", "best_config.yaml"):
        assert os.path.exists(os.path.join(out, name)), name
    report = open(os.path.join(out, "report.md")).read()
    assert "## Ranked configurations" in report and "## Combinations not run" in report
    assert f"twotower study --logs {small_world.out_dir} --out {out}" in report
    best = first.ranking[0]
    best_config = load_config(first.best_config)
    assert (best_config.loss.name, best_config.loss.similarity) == (best.loss, best.similarity)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["ranking"][0]["mix"] == best.mix

    # Lose two finished cells and leave a half-written one, as a killed run would.
    cells = {cell_id: os.path.join(out, "cells", cell_id) for cell_id in first.executed}
    lost = sorted(cells)[:2]
    for cell_id in lost:
        shutil.rmtree(cells[cell_id])
    half = sorted(cells)[2]
    os.remove(os.path.join(cells[half], "_SUCCESS"))
    kept = {
        cell_id: (os.stat(os.path.join(path, "result.json")).st_mtime_ns,
                  open(os.path.join(path, "result.json")).read())
        for cell_id, path in cells.items()
        if cell_id not in lost and cell_id != half
    }  # fmt: skip

    second = study_job.run(out=out, grid=grid, logs=small_world.out_dir)
    assert sorted(second.executed) == sorted([*lost, half])
    assert sorted(second.reused) == sorted(kept)
    for cell_id, (mtime, text) in kept.items():
        path = os.path.join(cells[cell_id], "result.json")
        assert os.stat(path).st_mtime_ns == mtime
        assert open(path).read() == text
    assert all(study.is_done(out, cell_id) for cell_id in cells)
    assert {(s.mix, s.loss) for s in second.ranking} == configurations

    # Nothing left to do: a third run trains no cell.
    third = study_job.run(out=out, grid=grid, logs=small_world.out_dir)
    assert third.executed == [] and len(third.reused) == 8
