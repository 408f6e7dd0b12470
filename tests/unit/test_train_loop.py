"""The training step without Ray: every loss x similarity trains; batches and CSR helpers."""

import copy
import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.checkpoint import row_map
from pipelines.features import build_feature_table, infer_feature_specs
from pipelines.train_loop import (
    ShardCache,
    TowerPair,
    _dedupe_csr,
    _train_step,
    batch_tensors,
    cached_batches,
    history_csv,
    learning_rate_at,
    set_learning_rate,
    to_csr,
    train_columns,
)
from twotower_core.config import NEGATIVE_SOURCES, config_from_dict
from twotower_core.losses import LOSSES
from twotower_core.similarity import SIMILARITIES
from twotower_core.task import build_task
from twotower_core.towers import build_two_tower

NUM_USERS, NUM_ITEMS, NUM_NEGATIVES, BATCH = 40, 60, 3, 16


def _tables():
    rng = np.random.default_rng(0)
    users = pa.table(
        {
            "user_idx": np.arange(NUM_USERS),
            "user_id": np.arange(NUM_USERS) + 1000,
            "country": rng.choice(["US", "DE", "FR"], NUM_USERS),
        }
    )
    items = pa.table(
        {
            "item_idx": np.arange(NUM_ITEMS),
            "item_id": np.arange(NUM_ITEMS) + 5000,
            "category": rng.choice(["a", "b", "c", "d"], NUM_ITEMS),
            "price": rng.lognormal(size=NUM_ITEMS),
            "tags": [list(rng.choice(["x", "y", "z"], 2)) for _ in range(NUM_ITEMS)],
        }
    )
    return users, items


def _model(config):
    """(model, (users, user specs), (items, item specs)) of the test tables, seeded."""
    users, items = _tables()
    user_specs = infer_feature_specs(users, exclude={"user_idx", "user_id"}, overrides={})
    item_specs = infer_feature_specs(items, exclude={"item_idx", "item_id"}, overrides={})
    torch.manual_seed(0)
    model = build_two_tower(
        config.model,
        num_users=NUM_USERS,
        num_items=NUM_ITEMS,
        user_specs=user_specs,
        item_specs=item_specs,
    )
    return model, (users, user_specs), (items, item_specs)


def _batch(rng) -> pa.Table:
    neg = rng.integers(0, NUM_ITEMS, size=(BATCH, NUM_NEGATIVES))
    sources = [list(rng.choice(NEGATIVE_SOURCES, NUM_NEGATIVES)) for _ in range(BATCH)]
    return pa.table(
        {
            "user_idx": rng.integers(0, NUM_USERS, BATCH),
            "item_idx": rng.permutation(NUM_ITEMS)[:BATCH],
            "neg_item_idxs": [list(row) for row in neg],
            "neg_sources": sources,
        }
    )


def test_batch_tensors_shapes_and_source_codes():
    table = pa.table(
        {
            "user_idx": [0, 1],
            "item_idx": [5, 6],
            "neg_item_idxs": [[1, 2, 3], [4, 5, 6]],
            "neg_sources": [["unexposed", "ranked_out", "exposed_not_clicked"], ["unexposed"] * 3],
        }
    )
    tensors = batch_tensors(table)
    assert tensors["neg_item_idx"].shape == (2, 3)
    assert tensors["neg_item_idx"].tolist() == [[1, 2, 3], [4, 5, 6]]
    # codes index NEGATIVE_SOURCES = (exposed_not_clicked, ranked_out, unexposed)
    assert tensors["neg_source"].tolist() == [[2, 1, 0], [2, 2, 2]]


def test_train_columns_read_only_what_the_loss_uses():
    def columns(**loss):
        return train_columns(config_from_dict({"loss": loss}).loss)

    assert columns() == ["user_idx", "item_idx", "neg_item_idxs"]
    assert columns(source_weights={"unexposed": 1.0}) == ["user_idx", "item_idx", "neg_item_idxs"]
    assert columns(source_weights={"ranked_out": 2.0})[-1] == "neg_sources"
    assert columns(use_data_negatives=False) == ["user_idx", "item_idx"]


def test_batch_tensors_without_negative_columns():
    tensors = batch_tensors(pa.table({"user_idx": [0, 1], "item_idx": [5, 6]}))
    assert tensors["neg_item_idx"].shape == (2, 0)
    assert "neg_source" not in tensors
    with_negs = batch_tensors(
        pa.table({"user_idx": [0], "item_idx": [5], "neg_item_idxs": [[1, 2]]})
    )
    assert with_negs["neg_item_idx"].tolist() == [[1, 2]] and "neg_source" not in with_negs


def test_shard_cache_keeps_every_batch_or_gives_up():
    batches = [pa.table({"user_idx": np.arange(start, start + 4)}) for start in (0, 4, 8)]
    cache = ShardCache(max_bytes=10_000)
    for batch in batches:
        cache.add(batch)
    assert cache.fits
    assert cache.table()["user_idx"].to_pylist() == list(range(12))
    assert cache.table().column(0).num_chunks == 1  # a copy, not views of the batches
    small = ShardCache(max_bytes=2 * batches[0].nbytes)
    for batch in batches:
        small.add(batch)
    assert not small.fits and small.batches is None  # what it held is let go
    with pytest.raises(ValueError, match="cache_shard_bytes"):
        small.table()
    assert not ShardCache(max_bytes=0).fits


def test_cached_batches_are_full_and_reshuffled_per_seed():
    table = pa.table({"user_idx": np.arange(10)})

    def epoch(seed):
        return [b["user_idx"].to_pylist() for b in cached_batches(table, 3, shuffle_seed=seed)]

    in_order = epoch(None)
    assert in_order == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # the partial last batch is left out
    first, again, other = epoch((0, 1, 0)), epoch((0, 1, 0)), epoch((0, 2, 0))
    assert first == again and first != other
    assert all(len(b) == 3 for b in first)
    assert len({row for b in first for row in b}) == 9


def test_cached_batches_shuffle_without_a_second_copy_of_the_shard():
    """A shuffled epoch gathers batch by batch: its batches are the whole-table permutation's,
    and taking the first one allocates about a batch, not another shard."""
    table = pa.table(
        {"user_idx": np.arange(200_000), "neg_items": pa.array([[1, 2, 3, 4]] * 200_000)}
    ).combine_chunks()
    order = np.random.default_rng((0, 1, 0)).permutation(table.num_rows)
    whole = table.take(order)
    expected = [whole.slice(s, 1000) for s in range(0, 3000, 1000)]
    del whole
    batches = cached_batches(table, 1000, shuffle_seed=(0, 1, 0))
    before = pa.total_allocated_bytes()
    first = next(batches)
    grew = pa.total_allocated_bytes() - before
    assert grew < table.nbytes / 20, (grew, table.nbytes)
    assert [first, next(batches), next(batches)] == expected


@pytest.mark.parametrize("source_weights", [{}, {"unexposed": 0.0, "ranked_out": 3.0}])
def test_a_step_on_the_columns_read_equals_a_step_on_all_columns(source_weights):
    """Leaving neg_sources unread changes nothing unless a source is weighted, and then it is
    read: the loss on ``train_columns`` equals the loss on every column, and weighting changes
    the loss (so the sources do reach it)."""
    config = config_from_dict(
        {
            "loss": {"name": "bpr", "source_weights": source_weights},
            "model": {"embedding_dim": 8, "id_embedding_dim": 8, "hidden_dims": [16]},
        }
    )
    model, (users, user_specs), (items, item_specs) = _model(config)
    batch = _batch(np.random.default_rng(3))

    def step(table, loss_config):
        pair = TowerPair(
            copy.deepcopy(model),
            build_feature_table(users, user_specs),
            build_feature_table(items, item_specs),
        )
        return float(
            _train_step(
                pair,
                build_task(loss_config, item_counts=torch.arange(NUM_ITEMS, dtype=torch.float64)),
                torch.optim.SGD(pair.parameters(), lr=0.0),
                batch_tensors(table),
                config,
                torch.Generator().manual_seed(0),
                NUM_ITEMS,
                torch.device("cpu"),
            )
        )

    read = step(batch.select(train_columns(config.loss)), config.loss)
    assert read == pytest.approx(step(batch, config.loss), rel=1e-6)
    unweighted = step(batch, config_from_dict({"loss": {"name": "bpr"}}).loss)
    assert (read != pytest.approx(unweighted, rel=1e-6)) == bool(source_weights)


@pytest.mark.parametrize("loss, sim", list(itertools.product(sorted(LOSSES), sorted(SIMILARITIES))))
def test_every_loss_and_similarity_trains_a_few_steps(loss, sim):
    config = config_from_dict(
        {
            "loss": {"name": loss, "similarity": sim, "num_sampled_negatives": 4},
            "model": {
                "embedding_dim": 8,
                "id_embedding_dim": 8,
                "feature_embedding_dim": 4,
                "hidden_dims": [16],
            },
            "train": {"learning_rate": 0.01},
        }
    )
    model, (users, user_specs), (items, item_specs) = _model(config)
    pair = TowerPair(
        model, build_feature_table(users, user_specs), build_feature_table(items, item_specs)
    )
    task = build_task(config.loss, item_counts=torch.arange(NUM_ITEMS, dtype=torch.float64))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    rng = np.random.default_rng(1)
    losses = [
        float(
            _train_step(
                pair,
                task,
                optimizer,
                batch_tensors(_batch(rng)),
                config,
                torch.Generator().manual_seed(0),
                NUM_ITEMS,
                torch.device("cpu"),
            )
        )
        for _ in range(3)
    ]
    assert all(np.isfinite(losses)), losses
    changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert changed >= len(before) // 2, (
        f"{loss}/{sim}: only {changed} of {len(before)} tensors moved"
    )


def test_to_csr_groups_and_aligns_to_users():
    # users 7 and 3 are eval users; user 5 is not and must be ignored.
    rows = np.array([7, 3, 5, 7, 3])
    values = np.array([10, 11, 12, 9, 11])
    indptr, items = to_csr(rows, values, np.array([3, 7]))
    assert indptr.tolist() == [0, 2, 4]
    assert items.tolist() == [11, 11, 9, 10]
    dedup_indptr, dedup_items = _dedupe_csr(indptr, items)
    assert dedup_indptr.tolist() == [0, 1, 3]
    assert dedup_items.tolist() == [11, 9, 10]


def test_row_map_keeps_known_ids_and_marks_new_ones():
    old = pa.array(["a", "b", "c"])
    new = pa.array(["c", "d", "a"])
    assert row_map(old, new).tolist() == [2, -1, 0]


def test_row_map_refuses_a_change_of_id_type():
    with pytest.raises(ValueError, match="id types differ"):
        row_map(pa.array([1, 2]), pa.array(["1", "2"]))


def test_history_csv_has_a_header_and_a_row_per_epoch():
    text = history_csv(
        [{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.5, "recall@50": 0.3}]
    )
    lines = text.strip().splitlines()
    assert lines[0] == "epoch,train_loss,recall@50"
    assert lines[2] == "2,1.5,0.3"


def test_prefetch_defaults_to_zero_on_cpu_and_one_on_gpu():
    from pipelines.train_loop import prefetch_batches

    assert prefetch_batches(config_from_dict({}).train) == 0
    assert prefetch_batches(config_from_dict({"train": {"use_gpu": True}}).train) == 1
    assert prefetch_batches(config_from_dict({"train": {"prefetch_batches": 3}}).train) == 3


def _train(**settings):
    return config_from_dict({"train": {"learning_rate": 0.01, **settings}}).train


def test_constant_schedule_keeps_the_learning_rate():
    t = _train()
    assert [learning_rate_at(t, step, 100) for step in (0, 50, 99, 150)] == [0.01] * 4


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_runs_from_the_rate_to_its_final_fraction(schedule):
    t = _train(lr_schedule=schedule, lr_final_fraction=0.1)
    rates = [learning_rate_at(t, step, 101) for step in range(101)]
    assert rates[0] == pytest.approx(0.01)
    assert rates[-1] == pytest.approx(0.001)
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    middle = 0.001 + 0.009 * 0.5
    assert rates[50] == pytest.approx(middle)  # cosine and linear meet half-way
    if schedule == "cosine":  # slow at first: above the straight line in the first half
        assert rates[25] > 0.001 + 0.009 * 0.75
    else:
        assert rates[25] == pytest.approx(0.001 + 0.009 * 0.75)
    # past the planned end (a longer resumed run) it stays at the floor
    assert learning_rate_at(t, 500, 101) == pytest.approx(0.001)


def test_warmup_rises_linearly_then_the_decay_starts():
    t = _train(lr_schedule="cosine", lr_warmup_steps=10)
    assert learning_rate_at(t, 0, 111) == pytest.approx(0.001)
    assert learning_rate_at(t, 4, 111) == pytest.approx(0.005)
    assert learning_rate_at(t, 10, 111) == pytest.approx(0.01)
    assert learning_rate_at(t, 60, 111) == pytest.approx(0.005)
    warm_constant = _train(lr_warmup_steps=4)
    assert [learning_rate_at(warm_constant, s, 50) for s in (0, 3, 20)] == pytest.approx(
        [0.0025, 0.01, 0.01]
    )


def test_set_learning_rate_reaches_every_parameter_group():
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.Adam([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    set_learning_rate(optimizer, 0.02)
    assert [group["lr"] for group in optimizer.param_groups] == [0.02, 0.02]


@pytest.mark.parametrize(
    "loss, sim, normalize",
    [("in_batch_softmax", "dot", False), ("sampled_softmax", "dot", False), ("bpr", "cosine", True)],
)
def test_an_ensemble_step_trains_each_member_on_its_own_loss(loss, sim, normalize):
    """With ``model.ensemble_members`` K = 2 the step's loss is the mean of the members' losses,
    each member's gradient is 1/K of what it gets trained alone, and the concatenated
    embeddings score the sum (dot) or mean (cosine, unit members) of the members' scores."""
    settings = {
        "loss": {"name": loss, "similarity": sim, "num_sampled_negatives": 4},
        "model": {
            "embedding_dim": 8,
            "id_embedding_dim": 8,
            "hidden_dims": [16],
            "normalize": normalize,
        },
    }
    ensemble_config = config_from_dict(
        {**settings, "model": {**settings["model"], "ensemble_members": 2}}
    )
    single_config = config_from_dict(settings)
    ensemble, (users, user_specs), (items, item_specs) = _model(ensemble_config)
    assert ensemble.user_tower.output_dim == ensemble.item_tower.output_dim == 16
    batch = batch_tensors(_batch(np.random.default_rng(4)))
    counts = torch.arange(NUM_ITEMS, dtype=torch.float64)

    def step(model, config):
        pair = TowerPair(
            model, build_feature_table(users, user_specs), build_feature_table(items, item_specs)
        )
        loss = _train_step(
            pair,
            build_task(config.loss, item_counts=counts),
            torch.optim.SGD(model.parameters(), lr=0.0),
            batch,
            config,
            torch.Generator().manual_seed(0),
            NUM_ITEMS,
            torch.device("cpu"),
        )
        return float(loss), pair

    ensemble_loss, ensemble_pair = step(ensemble, ensemble_config)
    member_losses, member_scores = [], []
    for k in range(2):
        single, _, _ = _model(single_config)
        prefix = f".members.{k}."
        single.load_state_dict(
            {
                key.replace(prefix, "."): value
                for key, value in ensemble.state_dict().items()
                if prefix in key
            }
        )
        member_loss, pair = step(single, single_config)
        member_losses.append(member_loss)
        for side in ("user_tower", "item_tower"):
            alone = dict(getattr(single, side).named_parameters())
            together = dict(getattr(ensemble, side).members[k].named_parameters())
            for name, param in alone.items():
                assert torch.allclose(together[name].grad, param.grad / 2, atol=1e-6), (
                    f"member {k} {side}.{name}"
                )
        with torch.no_grad():
            user_BD, item_BD = pair(batch["user_idx"], batch["item_idx"])
        member_scores.append(user_BD @ item_BD.T)
    assert ensemble_loss == pytest.approx(sum(member_losses) / 2, rel=1e-5)
    with torch.no_grad():
        user_BD, item_BD = ensemble_pair(batch["user_idx"], batch["item_idx"])
    expected = sum(member_scores) / (2 if normalize else 1)
    torch.testing.assert_close(user_BD @ item_BD.T, expected, atol=1e-5, rtol=1e-5)
