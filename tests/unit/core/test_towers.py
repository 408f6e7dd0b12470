"""Towers: shapes, OOV rows, options from config, and warm-start row remapping."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from twotower_core.config import ModelConfig
from twotower_core.features import FeatureSpec
from twotower_core.towers import (
    EnsembleTower,
    Tower,
    TwoTowerModel,
    build_two_tower,
    member_chunks,
    remap_id_rows,
)

CONFIG = ModelConfig(
    embedding_dim=6,
    id_embedding_dim=4,
    feature_embedding_dim=3,
    hidden_dims=(8,),
    num_oov_buckets=3,
)
ITEM_SPECS = [
    FeatureSpec("genre", "categorical", vocabulary=("drama", "comedy")),
    FeatureSpec("price", "numeric", mean=5.0, std=2.0),
]


def item_features(batch: int):
    return {"genre": torch.arange(batch) % 3, "price": torch.linspace(0, 10, batch)}


def test_two_tower_shapes_and_embeddings_only():
    model = build_two_tower(CONFIG, num_users=5, num_items=7, item_specs=ITEM_SPECS)
    users, items = model(torch.arange(4), {}, torch.arange(6), item_features(6))
    assert users.shape == (4, 6) and items.shape == (6, 6)
    assert model(item_ids=torch.arange(2), item_features=item_features(2))[0] is None
    assert isinstance(model.user_tower, Tower) and isinstance(model.item_tower, Tower)


def test_oov_buckets():
    tower = Tower(5, [], CONFIG)
    # Known ids keep their row; the code −1 − b of bucket b → 5 + (b mod 3):
    # −1 → 5, −2 → 6, −3 → 7, −4 → 5 + (3 mod 3) = 5. Indices past the vocab decode the same
    # way: 5 → 5 + (−6 mod 3) = 5, 6 → 5 + (−7 mod 3) = 5 + 2 = 7.
    ids = torch.tensor([0, 4, -1, -2, -3, -4, 5, 6])
    assert tower.id_rows(ids).tolist() == [0, 4, 5, 6, 7, 5, 5, 7]
    assert tower.id_embedding.weight.shape == (5 + 3, 4)
    # int64 extremes: −1 − i is ~i, so no overflow. 2 ≡ −1 (mod 3), so 2^63 ≡ −1 ≡ 2:
    # ~(2^63 − 1) = −2^63 ≡ −2 ≡ 1 → 5 + 1; ~(−2^63) = 2^63 − 1 ≡ 1 → 5 + 1.
    extremes = torch.tensor([2**63 - 1, -(2**63)])
    assert tower.id_rows(extremes).tolist() == [6, 6]
    out = tower(torch.tensor([-1, 100]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("num_oov_buckets", [1, 3])
def test_oov_rows_start_at_zero_and_get_no_gradient(num_oov_buckets):
    config = dataclasses.replace(CONFIG, num_oov_buckets=num_oov_buckets)
    tower = Tower(5, [], config)
    weight = tower.id_embedding.weight
    assert torch.equal(weight[5:], torch.zeros(num_oov_buckets, 4))
    assert (weight[:5].abs().sum(dim=1) > 0).all()  # known rows keep their random init
    # Training only sees vocab ids, so the OOV rows get a zero gradient and stay zero.
    tower(torch.arange(5)).sum().backward()
    assert torch.equal(weight.grad[5:], torch.zeros(num_oov_buckets, 4))


def test_an_unseen_entity_is_embedded_from_its_features_alone():
    tower = Tower(3, ITEM_SPECS, CONFIG)
    features = item_features(4)
    # The forward written out with a zero ID vector: mlp([0, 0, 0, 0, features(4)]).
    zero_id_BD = tower.mlp(torch.cat([torch.zeros(4, 4), tower.features(features)], dim=1))
    for unseen in ([-1, -2, -3, -1], [3, 7, -100, 2**40]):
        torch.testing.assert_close(tower(torch.tensor(unseen), features), zero_id_BD)
    known_BD = tower(torch.arange(3), item_features(3))
    assert not torch.allclose(known_BD, zero_id_BD[:3])


def test_options_from_config():
    normalized = Tower(3, ITEM_SPECS, dataclasses.replace(CONFIG, normalize=True))
    out = normalized(torch.arange(3), item_features(3))
    assert torch.allclose(out.norm(dim=1), torch.ones(3))
    fancy = Tower(
        3,
        [],
        dataclasses.replace(
            CONFIG, layer_norm=True, dropout=0.2, activation="gelu", hidden_dims=(8, 4)
        ),
    )
    kinds = [type(m) for m in fancy.mlp]
    assert kinds == [
        nn.Linear,
        nn.LayerNorm,
        nn.GELU,
        nn.Dropout,
        nn.Linear,
        nn.LayerNorm,
        nn.GELU,
        nn.Dropout,
        nn.Linear,
    ]
    features_only = Tower(3, ITEM_SPECS, dataclasses.replace(CONFIG, use_ids=False))
    assert features_only.id_embedding is None
    assert features_only(torch.tensor([-1, -1]), item_features(2)).shape == (2, 6)
    with pytest.raises(ValueError, match="needs ID embeddings"):
        Tower(3, [], dataclasses.replace(CONFIG, use_ids=False))
    with pytest.raises(ValueError, match="pass them to forward"):
        Tower(3, ITEM_SPECS, CONFIG)(torch.arange(2))
    with pytest.raises(ValueError, match="tower output dims differ"):
        TwoTowerModel(
            Tower(2, [], CONFIG), Tower(2, [], dataclasses.replace(CONFIG, embedding_dim=3))
        )


def test_remap_id_rows_keeps_known_ids_and_initialises_new_ones():
    torch.manual_seed(0)
    old = build_two_tower(CONFIG, num_users=3, num_items=4, item_specs=ITEM_SPECS)
    with torch.no_grad():  # OOV rows start at zero; as if trained, so the copy can be seen
        old.user_tower.id_embedding.weight[3:] = torch.arange(12.0).reshape(3, 4)
    new_specs = [
        # "comedy" kept (old code 2 → new code 1), "action" new (code 2), "drama" dropped.
        FeatureSpec("genre", "categorical", vocabulary=("comedy", "action")),
        ITEM_SPECS[1],
    ]
    torch.manual_seed(1)
    new = build_two_tower(CONFIG, num_users=4, num_items=2, item_specs=new_specs)
    fresh_user_row = new.user_tower.id_embedding.weight[1].clone()
    fresh_action_row = new.item_tower.features.embeddings[0].weight[2].clone()
    # New users: 0 ← old 2, 1 is new, 2 ← old 0, 3 ← old 1. New items: 0 ← old 3, 1 ← old 0.
    report = remap_id_rows(
        new,
        old.state_dict(),
        user_index_map=torch.tensor([2, -1, 0, 1]),
        item_index_map=torch.tensor([3, 0]),
        old_item_specs=ITEM_SPECS,
    )
    old_users, new_users = old.user_tower.id_embedding.weight, new.user_tower.id_embedding.weight
    assert torch.equal(new_users[0], old_users[2])
    assert torch.equal(new_users[1], fresh_user_row)
    assert torch.equal(new_users[2], old_users[0]) and torch.equal(new_users[3], old_users[1])
    assert torch.equal(new_users[4:], torch.arange(12.0).reshape(3, 4))  # the 3 OOV rows
    new_items, old_items = new.item_tower.id_embedding.weight, old.item_tower.id_embedding.weight
    assert torch.equal(new_items[0], old_items[3]) and torch.equal(new_items[1], old_items[0])
    genre_new, genre_old = (
        new.item_tower.features.embeddings[0].weight,
        old.item_tower.features.embeddings[0].weight,
    )
    assert torch.equal(genre_new[0], genre_old[0]) and torch.equal(genre_new[1], genre_old[2])
    assert torch.equal(genre_new[2], fresh_action_row)
    # Same-shaped layers are copied whole.
    assert torch.equal(new.user_tower.mlp[0].weight, old.user_tower.mlp[0].weight)
    assert report.kept_rows == {"user_tower": 3, "item_tower": 2}
    assert report.new_rows == {"user_tower": 1, "item_tower": 0}
    assert "item_tower.mlp.0.weight" in report.copied


def test_remap_rejects_bad_maps():
    old = build_two_tower(CONFIG, num_users=3, num_items=2)
    new = build_two_tower(CONFIG, num_users=2, num_items=2)
    with pytest.raises(ValueError, match="user_tower: index map has shape"):
        remap_id_rows(
            new,
            old.state_dict(),
            user_index_map=torch.tensor([0]),
            item_index_map=torch.tensor([0, 1]),
        )
    with pytest.raises(ValueError, match="user_tower: index map points past the old model's 3 ids"):
        remap_id_rows(
            new,
            old.state_dict(),
            user_index_map=torch.tensor([0, 3]),
            item_index_map=torch.tensor([0, 1]),
        )


@pytest.mark.parametrize("normalize", [False, True])
def test_an_ensemble_concatenates_independently_initialised_members(normalize):
    config = dataclasses.replace(CONFIG, ensemble_members=3, normalize=normalize)
    torch.manual_seed(0)
    model = build_two_tower(config, num_users=5, num_items=7, item_specs=ITEM_SPECS)
    assert config.output_dim == 18
    assert isinstance(model.item_tower, EnsembleTower) and len(model.item_tower.members) == 3
    assert model.user_tower.output_dim == model.item_tower.output_dim == 18
    users, items = model(torch.arange(4), {}, torch.arange(6), item_features(6))
    assert users.shape == (4, 18) and items.shape == (6, 18)
    first, second = (m.id_embedding.weight for m in model.item_tower.members[:2])
    assert not torch.equal(first, second), "members start from different rows"
    members = [m(torch.arange(6), item_features(6)) for m in model.item_tower.members]
    scale = 3**-0.5 if normalize else 1.0
    torch.testing.assert_close(items, torch.cat(members, dim=1) * scale)
    if normalize:  # unit norm again, and each member's part back to unit norm
        torch.testing.assert_close(items.norm(dim=1), torch.ones(6))
        for chunk in member_chunks(items, 3, normalized=True):
            torch.testing.assert_close(chunk.norm(dim=1), torch.ones(6))
    else:  # a dot score is the sum of the members' dot scores
        torch.testing.assert_close(
            users @ items.T,
            sum(u @ i.T for u, i in zip(member_chunks(users, 3), member_chunks(items, 3))),
        )


def test_remap_id_rows_maps_each_ensemble_members_rows():
    config = dataclasses.replace(CONFIG, ensemble_members=2)
    torch.manual_seed(0)
    old = build_two_tower(config, num_users=3, num_items=4, item_specs=ITEM_SPECS)
    torch.manual_seed(1)
    new = build_two_tower(config, num_users=2, num_items=4, item_specs=ITEM_SPECS)
    fresh = new.user_tower.members[1].id_embedding.weight[1].clone()
    report = remap_id_rows(
        new,
        old.state_dict(),
        user_index_map=torch.tensor([2, -1]),
        item_index_map=torch.arange(4),
        old_item_specs=ITEM_SPECS,
    )
    for k in range(2):
        new_rows = new.user_tower.members[k].id_embedding.weight
        old_rows = old.user_tower.members[k].id_embedding.weight
        assert torch.equal(new_rows[0], old_rows[2]), f"member {k}"
    assert torch.equal(new.user_tower.members[1].id_embedding.weight[1], fresh)
    assert torch.equal(
        new.item_tower.members[1].mlp[0].weight, old.item_tower.members[1].mlp[0].weight
    )
    assert report.kept_rows == {
        "user_tower.members.0": 1,
        "user_tower.members.1": 1,
        "item_tower.members.0": 4,
        "item_tower.members.1": 4,
    }


def test_a_change_of_ensemble_members_warm_starts_nothing_and_says_so():
    single = build_two_tower(CONFIG, num_users=3, num_items=4, item_specs=ITEM_SPECS)
    pair = build_two_tower(
        dataclasses.replace(CONFIG, ensemble_members=2),
        num_users=3,
        num_items=4,
        item_specs=ITEM_SPECS,
    )
    report = remap_id_rows(
        pair,
        single.state_dict(),
        user_index_map=torch.arange(3),
        item_index_map=torch.arange(4),
        old_item_specs=ITEM_SPECS,
    )
    assert report.copied == []
    assert sorted(report.fresh) == sorted(pair.state_dict())
    assert set(report.kept_rows.values()) == {0}
