"""The linear member (model.linear_member_dim): config checks, its place in the embeddings, its
loss against EASE's objective computed by brute force, the train step, and warm start."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.features import build_feature_table, history_codes, infer_feature_specs
from pipelines.train_loop import TowerPair, _train_step, batch_tensors, linear_member_loss
from twotower_core.config import ConfigError, config_from_dict
from twotower_core.task import build_task
from twotower_core.towers import build_two_tower, linear_members, remap_id_rows

ITEM_IDS = np.array([500, 501, 502, 503, 504, 505])
HISTORIES = [[500, 502], [501, 502, 503], [504], [500, 501, 503, 505]]
LINEAR = {
    "embedding_dim": 4,
    "id_embedding_dim": 4,
    "feature_embedding_dim": 4,
    "hidden_dims": [8],
    "user_history_feature": "history",
    "linear_member_dim": 3,
    "linear_member_weight": 2.5,
}


def _users(histories=HISTORIES) -> pa.Table:
    return pa.table(
        {
            "user_idx": np.arange(len(histories)),
            "user_id": np.arange(len(histories)) + 10,
            "country": ["US", "DE", "US", "FR"][: len(histories)],
            "history": histories,
        }
    )


def _config(**model):
    return config_from_dict({"model": {**LINEAR, **model}})


def _pair(config, item_ids=ITEM_IDS, histories=HISTORIES, seed=0):
    users = _users(histories)
    user_specs = infer_feature_specs(users, exclude={"user_idx", "user_id"})
    torch.manual_seed(seed)
    model = build_two_tower(
        config.model, num_users=users.num_rows, num_items=len(item_ids), user_specs=user_specs
    )
    items = pa.table({"item_idx": np.arange(len(item_ids)), "item_id": item_ids})
    codes = history_codes(user_specs, "history", pa.chunked_array([item_ids]))
    pair = TowerPair.for_model_config(
        model,
        build_feature_table(users, user_specs),
        build_feature_table(items, []),
        ("history", torch.from_numpy(codes)),
        config.model,
    )
    return pair, user_specs


def _all_rows(histories=HISTORIES, item_ids=ITEM_IDS):
    """One (user, item) row per value of each user's bag: the rows the dataset would hold."""
    index = {item: i for i, item in enumerate(item_ids)}
    pairs = [(u, index[item]) for u, bag in enumerate(histories) for item in bag]
    users, items = zip(*pairs, strict=True)
    return torch.tensor(users), torch.tensor(items)


@pytest.mark.parametrize(
    "model, message",
    [
        ({"linear_member_dim": -1}, r"model\.linear_member_dim: must be >= 0"),
        ({"linear_member_weight": 0.0}, r"model\.linear_member_weight: must be > 0"),
        ({"linear_member_l2": -0.1}, r"model\.linear_member_l2: must be >= 0"),
        (
            {"user_history_feature": None},
            r"model\.linear_member_dim: needs model\.user_history_feature",
        ),
        ({"normalize": True}, r"model\.linear_member_dim: needs loss\.similarity=dot and model"),
    ],
)
def test_linear_member_config_is_checked(model, message):
    with pytest.raises(ConfigError, match=message):
        _config(**model)


def test_linear_member_needs_dot_similarity():
    with pytest.raises(ConfigError, match=r"model\.linear_member_dim: needs loss\.similarity=dot"):
        config_from_dict({"model": LINEAR, "loss": {"similarity": "cosine"}})


def test_output_dim_adds_the_linear_member():
    assert _config(ensemble_members=2).model.output_dim == 2 * 4 + 3
    assert _config(linear_member_dim=0).model.output_dim == 4


def test_a_model_without_the_history_feature_fails_naming_it():
    config = _config()
    with pytest.raises(ValueError, match=r"linear_member_dim needs the user bag feature 'history'"):
        build_two_tower(config.model, num_users=2, num_items=3, user_specs=[])


@pytest.mark.parametrize("members", [1, 2])
def test_embeddings_append_the_weighted_linear_member(members):
    """Users: the other members' embedding, then weight × the linear member's; items: then the
    linear member's own. So a dot score is the others' score + weight × the linear score."""
    pair, _ = _pair(_config(ensemble_members=members))
    pair.eval()
    model = pair.model
    user_linear, item_linear = linear_members(model)
    users, items = torch.arange(4), torch.arange(len(ITEM_IDS))
    user_features = pair.user_features.lookup(users)
    with torch.no_grad():
        user_UD, item_ID = pair(users, items)
        base_dim = 4 * members
        assert user_UD.shape == (4, base_dim + 3) and item_ID.shape == (6, base_dim + 3)
        torch.testing.assert_close(
            user_UD[:, :base_dim], model.user_tower.base(users, user_features)
        )
        torch.testing.assert_close(user_UD[:, base_dim:], 2.5 * user_linear(users, user_features))
        torch.testing.assert_close(item_ID[:, base_dim:], item_linear(items))
        scores = user_UD @ item_ID.T
        base = user_UD[:, :base_dim] @ item_ID[:, :base_dim].T
        linear = user_linear(users, user_features) @ item_linear(items).T
        torch.testing.assert_close(scores, base + 2.5 * linear)


def _ease_objective_of(pair) -> torch.Tensor:
    """EASE's squared error of the linear member, by brute force: every (user, item) scored,
    an item of the user's bag from the bag without it (the zero diagonal)."""
    user_linear, item_linear = linear_members(pair.model)
    name, codes_I = pair.history
    num_users, num_items = pair.user_features.num_rows, pair.item_features.num_rows
    item_ID = item_linear(torch.arange(num_items))
    total = torch.zeros(())
    for user in range(num_users):
        bag_1L = pair.user_features.lookup(torch.tensor([user]))[name]
        for item in range(num_items):
            in_bag = bool((bag_1L == codes_I[item]).any()) and int(codes_I[item]) > 0
            seen_1L = bag_1L.masked_fill(bag_1L == codes_I[item], 0) if in_bag else bag_1L
            score = user_linear(torch.tensor([user]), {name: seen_1L})[0] @ item_ID[item]
            total = total + (float(in_bag) - score) ** 2
    return total


def test_the_linear_loss_over_every_row_is_eases_objective_plus_l2():
    pair, _ = _pair(_config(linear_member_l2=0.0))
    users_R, items_R = _all_rows()
    config = _config(linear_member_l2=0.0)
    with torch.no_grad():
        rows = linear_member_loss(pair, users_R, items_R, config) * len(users_R)
        torch.testing.assert_close(rows, _ease_objective_of(pair), rtol=1e-4, atol=1e-4)
        l2_config = _config(linear_member_l2=0.01)
        user_linear, item_linear = linear_members(pair.model)
        norm = sum(w.square().sum() for m in (user_linear, item_linear) for w in m.parameters())
        torch.testing.assert_close(
            linear_member_loss(pair, users_R, items_R, l2_config),
            rows / len(users_R) + 0.01 * norm,
        )


def test_a_step_adds_the_linear_loss_and_trains_the_linear_member():
    """The step's loss is the members' loss (as without a linear member) + the linear loss; the
    linear member's weights get a gradient, and a step lowers its loss."""
    config = _config(linear_member_l2=0.001)
    pair, _ = _pair(config)
    plain_config = _config(linear_member_dim=0)
    plain, _ = _pair(plain_config)
    plain.model.load_state_dict(
        {
            k.replace(".base.", "."): v
            for k, v in pair.model.state_dict().items()
            if ".linear." not in k
        }
    )
    users_R, items_R = _all_rows()
    batch = batch_tensors(
        pa.table(
            {
                "user_idx": users_R.numpy(),
                "item_idx": items_R.numpy(),
                "neg_item_idxs": [[] for _ in range(len(users_R))],
                "neg_sources": [[] for _ in range(len(users_R))],
            },
            schema=pa.schema(
                [
                    ("user_idx", pa.int64()),
                    ("item_idx", pa.int64()),
                    ("neg_item_idxs", pa.list_(pa.int64())),
                    ("neg_sources", pa.list_(pa.string())),
                ]
            ),
        )
    )
    counts = torch.ones(len(ITEM_IDS), dtype=torch.float64)

    def step(p, c, lr):
        p.eval()  # no dropout: the two steps see the same network
        return float(
            _train_step(
                p,
                build_task(c.loss, item_counts=counts),
                torch.optim.SGD(p.model.parameters(), lr=lr),
                batch,
                c,
                torch.Generator().manual_seed(0),
                len(ITEM_IDS),
                torch.device("cpu"),
            )
        )

    with torch.no_grad():
        linear_before = float(linear_member_loss(pair, users_R, items_R, config))
    total = step(pair, config, lr=0.0)
    assert total == pytest.approx(step(plain, plain_config, lr=0.0) + linear_before, rel=1e-5)
    user_linear, item_linear = linear_members(pair.model)
    for module in (user_linear, item_linear):
        assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in module.parameters())
    step(pair, config, lr=0.01)
    with torch.no_grad():
        assert float(linear_member_loss(pair, users_R, items_R, config)) < linear_before


def test_warm_start_moves_the_linear_rows_with_their_ids():
    """Items reordered and one replaced, bag values reordered: the linear member's item ID rows
    and history rows follow their ids, a new id keeps its fresh row."""
    config = _config()
    old_pair, old_specs = _pair(config, seed=1)
    new_item_ids = np.array([503, 500, 599, 501, 502, 505, 504])  # 599 is new
    new_histories = [[505, 503, 501], [502], [500, 504], [501]]
    new_pair, new_specs = _pair(config, item_ids=new_item_ids, histories=new_histories, seed=2)
    fresh_new_row = linear_members(new_pair.model)[1].id_embedding.weight[2].clone()
    old_index = {item: i for i, item in enumerate(ITEM_IDS)}
    item_map = torch.tensor([old_index.get(item, -1) for item in new_item_ids])
    report = remap_id_rows(
        new_pair.model,
        old_pair.model.state_dict(),
        user_index_map=torch.arange(4),
        item_index_map=item_map,
        old_user_specs=old_specs,
        old_item_specs=[],
    )
    old_items = linear_members(old_pair.model)[1].id_embedding.weight
    new_items = linear_members(new_pair.model)[1].id_embedding.weight
    for new_row, old_row in enumerate(item_map.tolist()):
        if old_row >= 0:
            torch.testing.assert_close(new_items[new_row], old_items[old_row])
    torch.testing.assert_close(new_items[2], fresh_new_row)
    assert report.new_rows["item_tower.linear"] == 1

    def history_rows(pair, specs):
        spec = next(s for s in specs if s.name == "history")
        table = linear_members(pair.model)[0].features.embeddings[0].weight
        return {value: table[code] for code, value in enumerate(spec.vocabulary, start=1)}

    old_rows, new_rows = history_rows(old_pair, old_specs), history_rows(new_pair, new_specs)
    for value, row in new_rows.items():
        torch.testing.assert_close(row, old_rows[value])


def test_the_linear_member_has_no_layers_after_its_rows():
    """Its user embedding is the sum of the bag's rows, its item embedding the ID row."""
    pair, _ = _pair(_config())
    user_linear, item_linear = linear_members(pair.model)
    assert isinstance(user_linear.mlp, torch.nn.Identity)
    assert isinstance(item_linear.mlp, torch.nn.Identity)
    table = user_linear.features.embeddings[0].weight
    bag = pair.user_features.lookup(torch.tensor([1]))["history"]
    torch.testing.assert_close(
        user_linear(torch.tensor([1]), {"history": bag})[0], table[bag[0]].sum(dim=0)
    )
    torch.testing.assert_close(item_linear(torch.tensor([3])), item_linear.id_embedding.weight[3:4])


def test_a_tower_without_output_map_needs_matching_width():
    from twotower_core.towers import Tower

    config = _config(hidden_dims=[8]).model
    with pytest.raises(ValueError, match=r"without an output map needs no hidden layers"):
        Tower(3, (), config, use_ids=True, output_map=False)


def test_distinct_bag_items_count_each_item_once():
    from pipelines.train_loop import _distinct_bag_items

    codes_I = torch.tensor([2, 0, 1, 3])  # item 1 is no bag value; code 4 is no item
    bag_BL = torch.tensor([[1, 2, 1, 0], [4, 3, 3, 2], [0, 0, 0, 0]])
    items_BL, mask_BL = _distinct_bag_items(bag_BL, codes_I)
    counted = [sorted(items_BL[b][mask_BL[b]].tolist()) for b in range(3)]
    assert counted == [[0, 2], [0, 3], []]


def test_repeated_rows_and_stray_items_keep_the_loss_bounded():
    """A bag holding a value twice and rows repeated or outside their user's bag are outside
    the exact case, but no row's loss goes below 0 whatever the weights."""
    histories = [[500, 500, 502], [501, 502, 503], [504], [500, 501, 503, 505]]
    config = _config()
    pair, _ = _pair(config, histories=histories)
    user_linear, item_linear = linear_members(pair.model)
    with torch.no_grad():
        for module in (user_linear, item_linear):
            for weight in module.parameters():
                weight.mul_(10.0)  # large scores: a negative part would show
        for user, item in [(0, 0), (0, 0), (0, 5), (2, 1), (3, 3)]:
            loss = linear_member_loss(pair, torch.tensor([user]), torch.tensor([item]), config)
            assert torch.isfinite(loss) and float(loss) >= 0.0, (user, item)
