"""The study without Ray: grid validation and expansion, negative selection, one cell run in
process, resume bookkeeping, ranking and the report from hand-made results."""

import json
import os

import pytest
import torch

from jobs.config_io import load_config
from jobs.study import best_config_yaml, load_grid
from pipelines import study
from pipelines.study import StudyGridError, expand_grid, grid_from_dict
from twotower_core.config import NEGATIVE_SOURCES

ENC, RO, UNX = NEGATIVE_SOURCES
DATA_MIXES = [ENC, RO, UNX, f"{ENC}+{RO}", f"{ENC}+{UNX}", f"{RO}+{UNX}", f"{ENC}+{RO}+{UNX}"]


def tiny_grid(**changes):
    grid = {
        "base": {"train": {"epochs": 1, "batch_size": 8, "num_workers": 2, "eval_ks": [10, 50]}},
        "data_negatives": 2,
        "sampled_negatives": 4,
        "mixes": [RO, f"{ENC}+{UNX}", "in_batch", "mixed"],
        "losses": ["bpr", "in_batch_softmax"],
        "similarities": ["dot"],
        "seeds": [0, 1],
    }
    grid.update(changes)
    return grid


# ---------------------------------------------------------------------------------------------
# the shipped grid


def test_default_grid_expands_to_every_mix_loss_and_similarity():
    grid = load_grid()
    expansion = expand_grid(grid)
    assert grid.mixes == (*DATA_MIXES, "in_batch", "mixed")
    assert grid.similarities == ("dot", "cosine", "euclidean")
    assert len(grid.seeds) >= 2
    expected = {
        (mix, loss, sim)
        for sim in grid.similarities
        for mix, losses in [
            *[(m, ("pointwise_bce", "bpr", "sampled_softmax")) for m in DATA_MIXES],
            ("in_batch", ("bpr", "in_batch_softmax")),
            ("mixed", ("in_batch_softmax",)),
        ]
        for loss in losses
    }
    assert set(expansion.configurations) == expected
    # 7 data mixes x 3 losses + in_batch x 2 + mixed x 1 = 24 per similarity.
    assert len(expansion.configurations) == 24 * 3
    assert len(expansion.cells) == 24 * 3 * len(grid.seeds)
    # Every other (mix, loss, similarity) is dropped, each with a reason.
    assert len(expansion.dropped) == 9 * 4 * 3 - 72
    assert all(d.reason for d in expansion.dropped)
    assert {(d.mix, d.loss) for d in expansion.dropped} >= {
        ("in_batch", "pointwise_bce"),
        ("mixed", "bpr"),
        ("in_batch", "sampled_softmax"),
        (RO, "in_batch_softmax"),
    }
    # Every family is in the grid.
    assert {c.family for c in expansion.cells} == {"pointwise", "pairwise", "listwise"}


def test_cell_configs_carry_the_mix_as_negatives_and_loss_settings():
    grid = load_grid()
    cells = {(c.mix, c.loss, c.similarity, c.seed): c for c in expand_grid(grid).cells}
    pair = cells[(f"{ENC}+{RO}", "bpr", "dot", 1)].config
    assert pair.dataset.negatives.counts() == {ENC: 3, RO: 3, UNX: 0}
    assert pair.loss.name == "bpr" and pair.loss.use_data_negatives
    assert pair.loss.num_sampled_negatives == 0 and pair.train.seed == 1
    three = cells[(f"{ENC}+{RO}+{UNX}", "sampled_softmax", "euclidean", 0)].config
    assert three.dataset.negatives.counts() == {ENC: 2, RO: 2, UNX: 2}
    in_batch = cells[("in_batch", "in_batch_softmax", "cosine", 2)].config
    assert in_batch.dataset.negatives.counts() == dict.fromkeys(NEGATIVE_SOURCES, 0)
    assert not in_batch.loss.use_data_negatives and in_batch.loss.num_sampled_negatives == 0
    mixed = cells[("mixed", "in_batch_softmax", "dot", 0)].config
    assert mixed.loss.num_sampled_negatives == grid.sampled_negatives
    assert mixed.loss.sampler_alpha == grid.sampler_alpha
    # The override of the shipped grid: pointwise_bce on cosine gets a scale, nothing else does.
    assert cells[(UNX, "pointwise_bce", "cosine", 0)].config.loss.scale == 10.0
    assert cells[(UNX, "pointwise_bce", "dot", 0)].config.loss.scale == 1.0
    # The budget is the same for every cell.
    budgets = {(c.config.train.epochs, c.config.train.batch_size) for c in cells.values()}
    assert len(budgets) == 1


def test_the_movielens_grid_runs_only_what_ml100k_has():
    grid = load_grid(study_grid_path("movielens.yaml"))
    expansion = expand_grid(grid, available_sources=[UNX])
    assert {c.mix for c in expansion.cells} == {UNX, "in_batch", "mixed"}
    assert len(grid.seeds) >= 2


def study_grid_path(name):
    from jobs.study import GRIDS_DIR

    return GRIDS_DIR / name


def test_the_study_grids_are_not_run_config_presets():
    from jobs.config_io import preset_names

    assert "grid" not in preset_names() and "movielens" not in preset_names()


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mixess": [RO]}, r"unknown grid key 'mixess'"),
        ({"mixes": [RO, "exposed"]}, r"mixes\[1\].*'exposed'.*exposed_not_clicked"),
        ({"mixes": [RO, f"{RO}+{RO}"]}, r"mixes\[1\].*twice"),
        ({"losses": ["bpr", "softmax"]}, r"losses\[1\].*'softmax'.*in_batch_softmax"),
        ({"similarities": ["dot", "l2"]}, r"similarities\[1\].*'l2'"),
        ({"seeds": [0, -1]}, r"seeds\[1\]"),
        ({"seeds": []}, r"seeds"),
        ({"data_negatives": 1, "mixes": [f"{ENC}+{RO}"]}, r"data_negatives"),
        ({"sampled_negatives": 0}, r"sampled_negatives"),
        ({"base": {"train": {"learning_rate": -1}}}, r"base\.train\.learning_rate"),
        ({"base": {"trian": {}}}, r"base\.unknown config key trian"),
        ({"base": {"train": {"eval_ks": [10, 20], "early_stopping_metric": "recall@10"}}},
         r"base\.train\.eval_ks.*50"),
        ({"overrides": [{"match": {"loss": "bpr"}, "set": {"loss.margin": -1}}]},
         r"overrides\[0\]\.set.*loss\.margin"),
        ({"overrides": [{"match": {"optimizer": "adam"}, "set": {"loss.margin": 1}}]},
         r"overrides\[0\]\.match.*'optimizer'"),
        ({"overrides": [{"match": {"family": "setwise"}, "set": {"loss.margin": 1}}]},
         r"overrides\[0\]\.match\.family\[0\]"),
    ],
)  # fmt: skip
def test_a_bad_grid_fails_naming_the_key(change, message):
    with pytest.raises(StudyGridError, match=message):
        grid_from_dict(tiny_grid(**change))


def test_a_missing_required_key_is_named():
    data = tiny_grid()
    del data["losses"]
    with pytest.raises(StudyGridError, match="'losses' is required"):
        grid_from_dict(data)


def test_the_cli_reports_a_bad_grid_file_before_any_work(tmp_path, capsys, no_ray):
    from jobs.cli import main

    path = tmp_path / "grid.yaml"
    path.write_text(
        "mixes: [ranked_out]\nlosses: [bpr]\nsimilarities: [dot]\nseeds: [0]\nepochs: 3\n"
    )
    code = main(
        ["study", "--logs", str(tmp_path), "--out", str(tmp_path / "s"), "--grid", str(path)]
    )
    assert code == 2
    assert "'epochs'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------------
# mixes and expansion


def test_mix_names_are_canonical_and_counts_split_evenly():
    assert study.parse_mix(f"{UNX}+{ENC}") == f"{ENC}+{UNX}"
    assert study.mix_label(f"{ENC}+{RO}+{UNX}") == "enc+ro+unx"
    # 7 over three sources: 3 + 2 + 2, the remainder to the first in NEGATIVE_SOURCES order.
    assert study.mix_counts(f"{ENC}+{RO}+{UNX}", 7) == {ENC: 3, RO: 2, UNX: 2}
    assert study.mix_counts(f"{RO}+{UNX}", 6) == {ENC: 0, RO: 3, UNX: 3}
    assert study.mix_counts("mixed", 6) == dict.fromkeys(NEGATIVE_SOURCES, 0)


def test_expansion_drops_mixes_of_sources_the_dataset_lacks_with_the_reason():
    grid = grid_from_dict(tiny_grid(mixes=[ENC, UNX, f"{RO}+{UNX}"], losses=["bpr"]))
    expansion = expand_grid(grid, available_sources=[UNX])
    assert [c.mix for c in expansion.cells] == [UNX, UNX]
    reasons = {d.mix: d.reason for d in expansion.dropped}
    assert reasons == {
        ENC: f"the dataset has no {ENC} negatives",
        f"{RO}+{UNX}": f"the dataset has no {RO} negatives",
    }


def test_incompatible_combinations_have_reasons():
    def reason(mix, loss, similarity="dot"):
        return study.incompatibility(mix, loss, similarity, available_sources=NEGATIVE_SOURCES)

    assert "pointwise" in reason("in_batch", "pointwise_bce")
    assert "pointwise" in reason("mixed", "contrastive", "euclidean")
    assert reason("in_batch", "bpr") is None
    assert reason("mixed", "in_batch_softmax") is None
    assert "samples alone" in reason("mixed", "triplet_hinge")
    assert "in_batch_softmax" in reason(RO, "in_batch_softmax")
    assert "cosine" in reason(UNX, "cosine_regression", "dot")
    assert reason(UNX, "cosine_regression", "cosine") is None
    assert "distances" in reason(UNX, "contrastive", "cosine")
    assert reason(UNX, "contrastive", "euclidean") is None


def test_cell_ids_are_stable_and_follow_the_config():
    grid = grid_from_dict(tiny_grid())
    first = [c.cell_id for c in expand_grid(grid).cells]
    again = [c.cell_id for c in expand_grid(grid_from_dict(tiny_grid())).cells]
    assert first == again
    assert len(set(first)) == len(first)
    # A grid with one more similarity shares the old cells' ids.
    wider = [
        c.cell_id
        for c in expand_grid(grid_from_dict(tiny_grid(similarities=["dot", "cosine"]))).cells
    ]
    assert set(first) < set(wider)
    # A different budget is a different cell.
    longer = tiny_grid()
    longer["base"]["train"]["epochs"] = 2
    assert not set(first) & {c.cell_id for c in expand_grid(grid_from_dict(longer)).cells}


# ---------------------------------------------------------------------------------------------
# negative selection


def test_select_negatives_takes_each_sources_first_ones_and_fills_from_unexposed():
    e, r, u = 0, 1, 2
    items = torch.tensor(
        [
            [10, 11, 20, 21, 30, 31],
            # row 1 had one exposed_not_clicked negative: the build filled one more unexposed
            [12, 22, 23, 32, 33, 34],
        ]
    )
    sources = torch.tensor([[e, e, r, r, u, u], [e, r, r, u, u, u]])

    kept, kept_sources, fills = study.select_negatives(items, sources, {ENC: 2})
    # row 1 has one enc; its shortfall comes from its first unexposed.
    assert kept.tolist() == [[10, 11], [12, 32]]
    assert kept_sources.tolist() == [[e, e], [e, u]]
    assert fills == 1

    kept, _, fills = study.select_negatives(items, sources, {ENC: 1, RO: 1, UNX: 1})
    assert kept.tolist() == [[10, 20, 30], [12, 22, 32]]
    assert fills == 0

    kept, _, fills = study.select_negatives(items, sources, {ENC: 2, UNX: 2})
    assert kept.tolist() == [[10, 11, 30, 31], [12, 32, 33, 34]]
    assert fills == 1

    kept, _, fills = study.select_negatives(items, sources, {})
    assert kept.shape == (2, 0) and fills == 0

    with pytest.raises(ValueError, match="unexposed"):
        study.select_negatives(items, sources, {ENC: 2, UNX: 3})


# ---------------------------------------------------------------------------------------------
# one cell in process, and resume bookkeeping


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from pipelines.build import build_dataset
    from pipelines.synthetic import WorldSpec, generate_world

    root = tmp_path_factory.mktemp("study")
    logs, dataset = str(root / "logs"), str(root / "dataset")
    spec = WorldSpec(users=80, items=120, days=3, seed=3, candidates_per_request=20,
                     shown_per_request=6)  # fmt: skip
    generate_world(spec, logs)
    grid = grid_from_dict(tiny_grid())
    build_dataset(logs, dataset, grid.dataset_config(), engine="local")
    return dataset


def test_run_cell_trains_scores_and_publishes_its_result(tiny_dataset, tmp_path):
    grid = grid_from_dict(tiny_grid())
    cell = next(c for c in expand_grid(grid).cells if c.mix == f"{ENC}+{UNX}")
    out = str(tmp_path)
    assert not study.is_done(out, cell.cell_id)
    result = study.run_cell(tiny_dataset, cell, out=out)
    assert study.is_done(out, cell.cell_id)
    assert study.read_result(out, cell.cell_id) == json.loads(json.dumps(result))
    assert result["data_negatives_per_row"] == 2
    assert result["epochs"] == 1
    # One epoch of the rows in steps of batch_size x num_workers = 16 rows.
    assert result["steps"] == result["train_rows"] // 16
    assert result["examples"] == result["steps"] * 16
    assert {"recall@10", "recall@50", "ndcg@10"} <= set(result["metrics"])
    assert 0.0 <= result["metrics"]["recall@50"] <= 1.0
    assert result["train_seconds"] > 0
    assert not result["diverged"]


def test_a_cell_is_reproducible_and_seeds_differ(tiny_dataset, tmp_path):
    grid = grid_from_dict(tiny_grid())
    cells = [c for c in expand_grid(grid).cells if c.mix == "mixed"]
    first = study.run_cell(tiny_dataset, cells[0], out=str(tmp_path / "a"))
    again = study.run_cell(tiny_dataset, cells[0], out=str(tmp_path / "b"))
    other_seed = study.run_cell(tiny_dataset, cells[1], out=str(tmp_path / "c"))
    assert cells[0].seed != cells[1].seed
    assert first["metrics"] == again["metrics"]
    assert first["final_train_loss"] == again["final_train_loss"]
    assert other_seed["final_train_loss"] != first["final_train_loss"]


def test_a_failing_cell_comes_back_as_an_error_and_stays_unfinished(tmp_path):
    cell = expand_grid(grid_from_dict(tiny_grid())).cells[0]
    result = study._run_cell_task(str(tmp_path / "no-dataset"), cell, str(tmp_path))
    assert result["cell_id"] == cell.cell_id
    assert "no-dataset" in result["error"]
    assert not study.is_done(str(tmp_path), cell.cell_id)


def test_a_study_with_no_finished_cell_still_renders():
    markdown = study.render_markdown(
        [], setup={"title": "empty"}, references={}, dropped=[], failed={"a": "RuntimeError: x"},
        command="twotower study", plots={}, best_config=None,
    )  # fmt: skip
    assert "RuntimeError: x" in markdown
    assert study.plot_recall([], {})[:4] == b"\x89PNG"


def test_an_unfinished_cell_dir_is_not_done(tmp_path):
    out = str(tmp_path)
    os.makedirs(study.cell_dir(out, "x"))
    with open(os.path.join(study.cell_dir(out, "x"), "result.json"), "w") as handle:
        handle.write("{}")
    assert not study.is_done(out, "x")


# ---------------------------------------------------------------------------------------------
# ranking and report from hand-made results


def fake_result(mix, loss, similarity, seed, recall50, seconds=2.0):
    return {
        "cell_id": f"{study.mix_label(mix)}.{loss}.{similarity}.seed{seed}.x",
        "mix": mix,
        "loss": loss,
        "similarity": similarity,
        "seed": seed,
        "metrics": {"recall@10": recall50 / 2, "recall@50": recall50, "ndcg@10": recall50 / 4,
                    "eval_users": 100.0},
        "train_seconds": seconds,
        "fill_share": 0.0,
        "diverged": False,
    }  # fmt: skip


FAKE_RESULTS = [
    fake_result(UNX, "bpr", "dot", 0, 0.40, 2.0),
    fake_result(UNX, "bpr", "dot", 1, 0.50, 4.0),
    fake_result(ENC, "bpr", "dot", 0, 0.20),
    fake_result(ENC, "bpr", "dot", 1, 0.20),
    fake_result("in_batch", "in_batch_softmax", "cosine", 0, 0.60),
    fake_result("in_batch", "in_batch_softmax", "cosine", 1, 0.58),
]


def test_summarize_ranks_by_mean_recall_with_the_sample_std():
    ranking = study.summarize(FAKE_RESULTS)
    assert [s.label for s in ranking] == [
        "in_batch · in_batch_softmax · cosine",
        "unx · bpr · dot",
        "enc · bpr · dot",
    ]
    unexposed = ranking[1]
    # mean(0.40, 0.50) = 0.45; sample std = sqrt(((-.05)^2 + .05^2) / 1) = 0.0707
    assert unexposed.metrics["recall@50"] == pytest.approx((0.45, 0.0707107), abs=1e-6)
    assert unexposed.train_seconds == pytest.approx((3.0, 1.4142136))
    assert unexposed.seeds == (0, 1)
    assert ranking[2].metrics["recall@50"] == pytest.approx((0.20, 0.0))
    assert "eval_users" not in unexposed.metrics


def test_axis_summaries_average_over_configurations():
    ranking = study.summarize(FAKE_RESULTS)
    by_family = {row["value"]: row for row in study.axis_summary(ranking, "loss family")}
    # pairwise: configurations at 0.45 and 0.20 -> mean 0.325, best 0.45 (unx · bpr · dot)
    assert by_family["pairwise"]["mean"] == pytest.approx(0.325)
    assert by_family["pairwise"]["best"] == pytest.approx(0.45)
    assert by_family["pairwise"]["best_label"] == "unx · bpr · dot"
    assert by_family["listwise"]["configurations"] == 1
    assert [row["value"] for row in study.axis_summary(ranking, "similarity")] == ["cosine", "dot"]


def test_report_lists_the_ranking_dropped_combinations_and_the_command():
    ranking = study.summarize(FAKE_RESULTS)
    dropped = [study.Dropped("in_batch", "pointwise_bce", "dot", "no logQ for pointwise")]
    markdown = study.render_markdown(
        ranking,
        setup={"title": "test", "seeds": "0, 1"},
        references={"oracle": {"recall@50": 0.9}, "popularity": {"recall@50": 0.1}},
        dropped=dropped,
        failed={"enc.bpr.dot.seed2.x": "RuntimeError: boom"},
        command="twotower study --logs L --out S",
        plots={"Recall@50": "recall_at_50.png"},
        best_config="best_config.yaml",
    )
    rows = [line for line in markdown.splitlines() if line.startswith("| 1 |") or
            line.startswith("| 2 |") or line.startswith("| 3 |")]  # fmt: skip
    assert [row.split(" | ")[1] for row in rows] == ["in_batch", "unx", "enc"]
    assert "0.4500 ± 0.0707" in markdown
    assert "no logQ for pointwise" in markdown and "in_batch · pointwise_bce · dot" in markdown
    assert "RuntimeError: boom" in markdown
    assert "twotower study --logs L --out S" in markdown
    assert "![Recall@50](recall_at_50.png)" in markdown
    assert "| oracle | 0.9000 |" in markdown


def test_plots_are_png():
    ranking = study.summarize(FAKE_RESULTS)
    references = {"oracle": {"recall@50": 0.9}}
    for png in (study.plot_recall(ranking, references), study.plot_cost(ranking),
                study.plot_both(ranking, references)):  # fmt: skip
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_config_file_loads_as_a_run_config(tmp_path):
    grid = grid_from_dict(tiny_grid())
    cell = next(c for c in expand_grid(grid).cells if c.mix == "mixed")
    summary = study.summarize([fake_result("mixed", "in_batch_softmax", "dot", 0, 0.5)])[0]
    from twotower_core.config import config_to_dict

    path = tmp_path / "best_config.yaml"
    path.write_text(best_config_yaml(summary, config_to_dict(cell.config), study="S"))
    assert load_config(str(path)) == cell.config


def test_mask_user_positives_reads_the_train_pairs_and_changes_training(tiny_dataset):
    from pipelines import io, local_train
    from pipelines.train_loop import load_user_positives
    from twotower_core.config import config_from_dict

    base = ["train.epochs=1", "train.batch_size=16", "train.num_workers=1"]
    off = config_from_dict({}, overrides=base)
    on = config_from_dict({}, overrides=[*base, "loss.mask_user_positives=true"])
    assert load_user_positives(tiny_dataset, off, num_items=120) is None
    positives = load_user_positives(tiny_dataset, on, num_items=120)
    train = io.read_table(io.join(tiny_dataset, "train"), columns=["user_idx", "item_idx"])
    users = torch.tensor(train["user_idx"].to_pylist())
    items = torch.tensor(train["item_idx"].to_pylist())
    assert positives.num_pairs == len(set(zip(users.tolist(), items.tolist(), strict=True)))
    assert positives.contains(users, items.unsqueeze(1)).all()
    # Same seed and steps: only the masked false negatives differ.
    loss_off = local_train.fit(tiny_dataset, off).history[0]["train_loss"]
    loss_on = local_train.fit(tiny_dataset, on).history[0]["train_loss"]
    assert loss_on < loss_off


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_in_process_training_on_a_gpu_is_refused_without_cuda(tiny_dataset):
    from pipelines import local_train
    from twotower_core.config import config_from_dict

    config = config_from_dict({}, overrides=["train.epochs=1", "train.use_gpu=true"])
    with pytest.raises(ValueError, match="train.use_gpu"):
        local_train.fit(tiny_dataset, config)
