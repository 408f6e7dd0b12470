"""The two towers: ID embedding + feature encoder → MLP → embedding. Embeddings only.

Legend: B entities in a batch, D ``embedding_dim``, F feature encoder width.

A tower knows nothing about losses, negatives or distribution: ``task.py`` turns embeddings
into a loss, DDP is applied from outside, and serving uses the embeddings as they are.

ID rows: a tower for ``num_ids`` known entities has ``num_ids + num_oov_buckets`` ID rows.
Index i in [0, num_ids) is entity i. An unseen id is passed as the negative code ``−1 − b`` and
goes to OOV row ``num_ids + (b mod num_oov_buckets)``: −1 is bucket 0, the shared OOV row. The
tower never sees raw ids, so the bucket ``b`` (a stable hash of the raw id) is the caller's job
(``pipelines.embed.IdIndex.tower_rows``). Any other out-of-range index i ≥ num_ids is decoded by
the same formula, ``num_ids + ((−1 − i) mod num_oov_buckets)``.

OOV rows start at zero: no training id maps to them, so they never get a gradient and stay zero,
and an unseen entity is embedded from its features alone (ID part of the MLP input = 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower_core.config import ModelConfig
from twotower_core.features import FeatureEncoder, FeatureSpec

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"model.activation: unknown value {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


class Tower(nn.Module):
    """One entity kind's tower: ``forward(ids_B, features) -> [B, D]``."""

    def __init__(
        self,
        num_ids: int,
        specs: Sequence[FeatureSpec],
        config: ModelConfig,
        *,
        use_ids: bool | None = None,
        output_map: bool = True,
    ) -> None:
        """``use_ids`` overrides ``config.use_ids`` (the user tower passes
        ``model.user_id_embedding``). ``output_map`` False (the linear member): no layers at
        all, the embedding is the ID row or the pooled feature rows as they are, so their width
        must be ``embedding_dim``."""
        super().__init__()
        use_ids = config.use_ids if use_ids is None else use_ids
        if num_ids < 0:
            raise ValueError(f"num_ids must be >= 0, got {num_ids}")
        self.num_ids = num_ids
        self.num_oov_buckets = config.num_oov_buckets
        self.normalize = config.normalize
        self.specs = list(specs)
        self.id_embedding = None
        if use_ids:
            self.id_embedding = nn.Embedding(
                num_ids + config.num_oov_buckets, config.id_embedding_dim
            )
            # Small rows: initial scores near 0, a near-uniform softmax at step 0.
            nn.init.normal_(self.id_embedding.weight, std=0.1)
            # Every training id is in the vocab, so the OOV rows are never trained: a random
            # row would be fixed noise added to each unseen entity's feature-based embedding.
            # Zero rows contribute nothing (and get no gradient, so they stay zero).
            nn.init.zeros_(self.id_embedding.weight[num_ids:])
        self.features = FeatureEncoder(specs, config) if config.use_features and specs else None
        input_dim = (config.id_embedding_dim if use_ids else 0) + (
            self.features.output_dim if self.features is not None else 0
        )
        if input_dim == 0:
            raise ValueError(
                "a tower needs ID embeddings (model.use_ids, model.user_id_embedding) or at least "
                "one feature"
            )
        self.output_dim = config.embedding_dim
        if not output_map:
            if config.hidden_dims or input_dim != config.embedding_dim:
                raise ValueError(
                    f"a tower without an output map needs no hidden layers and input width "
                    f"{config.embedding_dim}, got {list(config.hidden_dims)} and {input_dim}"
                )
            self.mlp = nn.Identity()
            return
        layers: list[nn.Module] = []
        for hidden_dim in config.hidden_dims:
            layers.append(nn.Linear(input_dim, hidden_dim))
            if config.layer_norm:
                layers.append(nn.LayerNorm(hidden_dim))
            layers.append(_activation(config.activation))
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            input_dim = hidden_dim
        layers.append(nn.Linear(input_dim, config.embedding_dim))
        self.mlp = nn.Sequential(*layers)

    def id_rows(self, ids_B: Tensor) -> Tensor:
        """[B] row of the ID table for each index: i in [0, num_ids) → i; the code −1 − b of an
        unseen id in OOV bucket b → ``num_ids + (b mod num_oov_buckets)``."""
        known = (ids_B >= 0) & (ids_B < self.num_ids)
        # −1 − i is ~i, so it never overflows int64.
        bucket_B = torch.remainder(-1 - ids_B, self.num_oov_buckets)
        return torch.where(known, ids_B, self.num_ids + bucket_B)

    def forward(self, ids_B: Tensor, features: Mapping[str, Tensor] | None = None) -> Tensor:
        """[B, D] embeddings.

        Args:
            ids_B: [B] int64 dense index of each entity, or −1 − bucket for an unseen one.
            features: {name: tensor} per ``features.py``'s contract; ignored without features.
        """
        parts = []
        if self.id_embedding is not None:
            parts.append(self.id_embedding(self.id_rows(ids_B)))
        if self.features is not None:
            if features is None:
                raise ValueError("this tower has features; pass them to forward")
            parts.append(self.features(features))
        # [B, id_dim + F] -> [B, D]
        embedding = self.mlp(torch.cat(parts, dim=1))
        return F.normalize(embedding, dim=-1) if self.normalize else embedding


class EnsembleTower(nn.Module):
    """K towers of one entity kind side by side (``model.ensemble_members``):
    ``forward(ids_B, features) -> [B, K·D]``, the members' embeddings concatenated.

    Each member has its own ID rows, feature embeddings and MLP, initialised apart; training
    gives each member its own loss (``member_chunks``), so the members are K independent models
    that see the same batches. With dot similarity the concatenated embeddings score the sum of
    the members' scores, so serving and ANN search need nothing new. With ``model.normalize``
    each member is unit-norm and the concatenation is scaled by 1/√K: unit norm again, and its
    cosine is the members' mean cosine.
    """

    def __init__(self, members: Sequence[Tower]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 member towers, got {len(members)}")
        first = members[0]
        self.members = nn.ModuleList(members)
        self.num_ids = first.num_ids
        self.num_oov_buckets = first.num_oov_buckets
        self.normalize = first.normalize
        self.specs = first.specs
        self.output_dim = first.output_dim * len(members)

    def forward(self, ids_B: Tensor, features: Mapping[str, Tensor] | None = None) -> Tensor:
        # K x [B, D] -> [B, K·D]
        embedding = torch.cat([member(ids_B, features) for member in self.members], dim=1)
        return embedding / len(self.members) ** 0.5 if self.normalize else embedding


class WithLinearMember(nn.Module):
    """A side's towers plus the linear member (``model.linear_member_dim``):
    ``forward -> [B, K·D + D_lin]``, the linear member's embedding appended, times ``weight``
    on the user side (1 on the item side), so a dot score is the others' score + weight × the
    linear member's. ``linear`` is the member itself, unscaled, for its loss."""

    def __init__(self, base: nn.Module, linear: Tower, weight: float = 1.0) -> None:
        super().__init__()
        self.base = base
        self.linear = linear
        self.weight = weight
        self.num_ids = base.num_ids
        self.num_oov_buckets = base.num_oov_buckets
        self.normalize = base.normalize
        self.specs = base.specs
        self.output_dim = base.output_dim + linear.output_dim

    def forward(self, ids_B: Tensor, features: Mapping[str, Tensor] | None = None) -> Tensor:
        # [B, K·D] and [B, D_lin] -> [B, K·D + D_lin]
        return torch.cat(
            [self.base(ids_B, features), self.weight * self.linear(ids_B, features)], dim=1
        )


def tower_members(tower: nn.Module) -> list[tuple[str, Tower]]:
    """(state-dict key infix, member) of each plain tower inside ``tower``: ``("", tower)`` for
    a ``Tower``, ``(".members.k", member k)`` for an ``EnsembleTower``, and under a
    ``WithLinearMember`` its base's members (``".base…"``) then ``(".linear", linear)``."""
    if isinstance(tower, WithLinearMember):
        return [(".base" + infix, member) for infix, member in tower_members(tower.base)] + [
            (".linear", tower.linear)
        ]
    if isinstance(tower, EnsembleTower):
        return [(f".members.{k}", member) for k, member in enumerate(tower.members)]
    return [("", tower)]


def linear_member_config(config: ModelConfig) -> ModelConfig:
    """The linear member's tower settings: ``linear_member_dim`` wide rows, summed bag rows, no
    hidden layer, dropout or normalisation (its towers are built without an output map: the
    embedding is the rows themselves, B = P Qᵀ as in a low-rank EASE)."""
    dim = config.linear_member_dim
    return replace(
        config,
        embedding_dim=dim,
        id_embedding_dim=dim,
        feature_embedding_dim=dim,
        hidden_dims=(),
        dropout=0.0,
        layer_norm=False,
        normalize=False,
        bag_pooling="sum",
        use_features=True,
        ensemble_members=1,
        linear_member_dim=0,
    )


def linear_members(model: TwoTowerModel) -> tuple[Tower, Tower] | None:
    """The (user, item) linear member towers, unscaled, or None without one."""
    if isinstance(model.user_tower, WithLinearMember):
        return model.user_tower.linear, model.item_tower.linear
    return None


def member_chunks(
    embedding_XD: Tensor, num_members: int, *, normalized: bool = False
) -> tuple[Tensor, ...]:
    """The K members' [..., D] parts of ``[..., K·D]`` embeddings (one tensor for K = 1).

    ``normalized`` (``model.normalize``): each part is put back to unit norm (the ensemble
    scaled it by 1/√K), so a member's loss sees exactly that member's embedding.
    """
    if num_members == 1:
        return (embedding_XD,)
    chunks = embedding_XD.chunk(num_members, dim=-1)
    if not normalized:
        return chunks
    return tuple(chunk * num_members**0.5 for chunk in chunks)


class TwoTowerModel(nn.Module):
    """A user tower and an item tower with the same output dim. Returns embeddings only."""

    def __init__(self, user_tower: nn.Module, item_tower: nn.Module) -> None:
        super().__init__()
        if user_tower.output_dim != item_tower.output_dim:
            raise ValueError(
                f"tower output dims differ: {user_tower.output_dim} vs {item_tower.output_dim}"
            )
        self.user_tower = user_tower
        self.item_tower = item_tower

    def forward(
        self,
        user_ids: Tensor | None = None,
        user_features: Mapping[str, Tensor] | None = None,
        item_ids: Tensor | None = None,
        item_features: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """([B, D] users or None, [M, D] items or None).

        One call embeds both sides so DDP sees every parameter; the item rows may be positives,
        negatives and catalog samples concatenated, split again by the caller.
        """
        users = self.user_tower(user_ids, user_features) if user_ids is not None else None
        items = self.item_tower(item_ids, item_features) if item_ids is not None else None
        return users, items


def build_two_tower(
    config: ModelConfig,
    *,
    num_users: int,
    num_items: int,
    user_specs: Sequence[FeatureSpec] = (),
    item_specs: Sequence[FeatureSpec] = (),
) -> TwoTowerModel:
    """Towers per ``config``; with ``model.ensemble_members`` K > 1, each side is an
    ``EnsembleTower`` of K towers; with ``model.linear_member_dim``, a ``WithLinearMember``
    around them."""

    def side(num_ids: int, specs: Sequence[FeatureSpec], use_ids: bool) -> nn.Module:
        members = [
            Tower(num_ids, specs, config, use_ids=use_ids) for _ in range(config.ensemble_members)
        ]
        return members[0] if len(members) == 1 else EnsembleTower(members)

    user_tower = side(num_users, user_specs, config.use_ids and config.user_id_embedding)
    item_tower = side(num_items, item_specs, config.use_ids)
    if config.linear_member_dim > 0:
        history = [s for s in user_specs if s.name == config.user_history_feature]
        if not history or history[0].kind != "bag":
            raise ValueError(
                f"model.linear_member_dim needs the user bag feature "
                f"{config.user_history_feature!r} (model.user_history_feature); the user "
                f"features are {[s.name for s in user_specs]}"
            )
        linear = linear_member_config(config)
        user_tower = WithLinearMember(
            user_tower,
            Tower(num_users, history, linear, use_ids=False, output_map=False),
            config.linear_member_weight,
        )
        item_tower = WithLinearMember(
            item_tower, Tower(num_items, (), linear, use_ids=True, output_map=False)
        )
    return TwoTowerModel(user_tower, item_tower)


# ---------------------------------------------------------------------------------------------
# warm start


@dataclass
class WarmStartReport:
    """What ``remap_id_rows`` carried over from the old model."""

    kept_rows: dict[str, int] = field(default_factory=dict)  # tower -> known ids copied
    new_rows: dict[str, int] = field(default_factory=dict)  # tower -> ids with fresh rows
    copied: list[str] = field(default_factory=list)  # state-dict keys copied whole or remapped
    fresh: list[str] = field(default_factory=list)  # keys left at their new initialisation


def remap_id_rows(
    new_model: TwoTowerModel,
    old_state_dict: Mapping[str, Tensor],
    *,
    user_index_map: Tensor,
    item_index_map: Tensor,
    old_user_specs: Sequence[FeatureSpec] | None = None,
    old_item_specs: Sequence[FeatureSpec] | None = None,
) -> WarmStartReport:
    """Load ``old_state_dict`` into ``new_model`` across a change of ids (in place).

    ID tables: new row i takes old row ``index_map[i]``, or keeps its fresh initialisation where
    that is −1 (a new id); old rows no new id maps to are dropped. OOV rows are copied (a warm
    start keeps ``model.num_oov_buckets``; the state dict does not record it); they are zero
    unless the old model was built before OOV rows started at zero. Feature embeddings: remapped
    by value when the old specs are given (a value new to the vocabulary keeps a fresh row), else
    copied when shapes match.
    Every other tensor is copied when its shape matches.

    Args:
        new_model: the freshly built model for the new ids.
        old_state_dict: the previous model's ``state_dict()``.
        user_index_map: [num_new_users] int64 old row of each new user, −1 = new.
        item_index_map: [num_new_items] int64 old row of each new item, −1 = new.
        old_user_specs: the previous model's user feature specs (optional).
        old_item_specs: the previous model's item feature specs (optional).
    """
    state = new_model.state_dict()
    report = WarmStartReport()
    handled: set[str] = set()
    towers = [
        (side + infix, member, index_map, _member_specs(infix, member, old_specs))
        for side, tower, index_map, old_specs in (
            ("user_tower", new_model.user_tower, user_index_map, old_user_specs),
            ("item_tower", new_model.item_tower, item_index_map, old_item_specs),
        )
        for infix, member in tower_members(tower)
    ]
    for prefix, tower, index_map, old_specs in towers:
        key = f"{prefix}.id_embedding.weight"
        if tower.id_embedding is not None:
            handled.add(key)
            if key in old_state_dict and old_state_dict[key].shape[1] == state[key].shape[1]:
                kept = _remap_id_table(state[key], old_state_dict[key], index_map, tower, prefix)
                report.kept_rows[prefix], report.new_rows[prefix] = kept, tower.num_ids - kept
                report.copied.append(key)
            else:
                report.kept_rows[prefix], report.new_rows[prefix] = 0, tower.num_ids
                report.fresh.append(key)
        if tower.features is not None and old_specs is not None:
            old_embedded = [s for s in old_specs if s.kind != "numeric"]
            for i, spec in enumerate(tower.features.embedded_specs):
                key = f"{prefix}.features.embeddings.{i}.weight"
                handled.add(key)
                old_index = next(
                    (
                        j
                        for j, s in enumerate(old_embedded)
                        if s.name == spec.name and s.kind == spec.kind
                    ),
                    None,
                )
                old_key = f"{prefix}.features.embeddings.{old_index}.weight"
                if (
                    old_index is None
                    or old_key not in old_state_dict
                    or old_state_dict[old_key].shape[1] != state[key].shape[1]
                ):
                    report.fresh.append(key)
                    continue
                old_codes = {
                    value: code
                    for code, value in enumerate(old_embedded[old_index].vocabulary, start=1)
                }
                # Code 0 (missing / padding) maps to code 0; a new value gets −1 (fresh row).
                rows = [0] + [old_codes.get(value, -1) for value in spec.vocabulary]
                _copy_rows(state[key], old_state_dict[old_key], torch.tensor(rows))
                report.copied.append(key)
    for key, value in state.items():
        if key in handled:
            continue
        if key in old_state_dict and old_state_dict[key].shape == value.shape:
            value.copy_(old_state_dict[key])
            report.copied.append(key)
        else:
            report.fresh.append(key)
    new_model.load_state_dict(state)
    return report


def _member_specs(
    infix: str, member: Tower, old_specs: Sequence[FeatureSpec] | None
) -> Sequence[FeatureSpec] | None:
    """The old specs the member was built from: all of the side's, but the linear member reads
    only the history bag, so its old feature tables are numbered within that one."""
    if old_specs is None or not infix.endswith(".linear"):
        return old_specs
    names = {spec.name for spec in member.specs}
    return [spec for spec in old_specs if spec.name in names]


def _remap_id_table(
    new_weight: Tensor, old_weight: Tensor, index_map: Tensor, tower: Tower, prefix: str
) -> int:
    if index_map.shape != (tower.num_ids,):
        raise ValueError(
            f"{prefix}: index map has shape {tuple(index_map.shape)}, expected ({tower.num_ids},)"
        )
    # The state dict does not record the old OOV count; warm starts keep model.num_oov_buckets.
    old_num_ids = old_weight.shape[0] - tower.num_oov_buckets
    if old_num_ids < 0 or bool((index_map >= old_num_ids).any()):
        raise ValueError(
            f"{prefix}: index map points past the old model's {max(old_num_ids, 0)} ids"
        )
    kept = _copy_rows(new_weight[: tower.num_ids], old_weight, index_map)
    with torch.no_grad():
        new_weight[tower.num_ids :] = old_weight[old_num_ids:]
    return kept


def _copy_rows(new_rows: Tensor, old_rows: Tensor, index_map: Tensor) -> int:
    """new_rows[i] = old_rows[index_map[i]] where index_map[i] >= 0; returns how many."""
    index_map = index_map.to(torch.long)
    known = index_map >= 0
    with torch.no_grad():
        new_rows[known] = old_rows[index_map[known]].to(new_rows.dtype)
    return int(known.sum())
