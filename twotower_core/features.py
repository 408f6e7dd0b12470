"""Entity features: their specs, the per-entity tensors, and the encoder inside a tower.

Legend: B entities in a batch, L bag length (padded), E feature embedding dim,
F encoder output width, R entities in a table.

Tensor contract per feature kind (what ``FeatureTable.lookup`` returns and the encoder takes):

- ``categorical``: int64 [B] codes; 0 = missing or unknown, 1..V = ``vocabulary[code - 1]``.
- ``numeric``: float32 [B] raw values, NaN = missing; the encoder standardises with the stored
  mean/std and turns NaN into 0 (the mean) after standardising.
- ``bag``: int64 [B, L] codes of a multi-valued column, 0 = padding (and unknown values);
  pooled by mean, sum or sum / sqrt(count) of the non-padding rows (``model.bag_pooling``).

Specs are fitted from the data by ``pipelines.features`` and stored in the checkpoint
(``to_dict``), so the embed job encodes features exactly as training did.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower_core.config import BAG_POOLINGS, ModelConfig

SPEC_KINDS: tuple[str, ...] = ("categorical", "numeric", "bag")


@dataclass(frozen=True)
class FeatureSpec:
    """One feature column: its kind and what was fitted on it."""

    name: str
    kind: str
    # categorical / bag: the known values in code order (code c is vocabulary[c - 1]).
    vocabulary: tuple[Any, ...] = ()
    # numeric: standardisation x → (x − mean) / std.
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in SPEC_KINDS:
            raise ValueError(
                f"feature {self.name!r}: unknown kind {self.kind!r}; valid: {', '.join(SPEC_KINDS)}"
            )
        if not (self.std > 0 and math.isfinite(self.std) and math.isfinite(self.mean)):
            raise ValueError(
                f"feature {self.name!r}: needs a finite mean and std > 0, got {self.mean}, {self.std}"
            )
        object.__setattr__(self, "vocabulary", tuple(self.vocabulary))

    @property
    def num_codes(self) -> int:
        """Rows of the embedding table: the vocabulary plus code 0."""
        return len(self.vocabulary) + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the checkpoint stores this)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "vocabulary": list(self.vocabulary),
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        return cls(
            name=data["name"],
            kind=data["kind"],
            vocabulary=tuple(data.get("vocabulary", ())),
            mean=float(data.get("mean", 0.0)),
            std=float(data.get("std", 1.0)),
        )


class FeatureEncoder(nn.Module):
    """Features of a batch → one row per entity: [B, F].

    F = E per categorical feature + E per bag feature + 1 per numeric feature, in spec order
    within each group (embedded features first, then numeric).
    """

    def __init__(self, specs: Sequence[FeatureSpec], config: ModelConfig) -> None:
        super().__init__()
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate feature names in {names}")
        self.embedded_specs = [s for s in specs if s.kind != "numeric"]
        self.numeric_specs = [s for s in specs if s.kind == "numeric"]
        self.bag_pooling = config.bag_pooling
        if self.bag_pooling not in BAG_POOLINGS:
            raise ValueError(
                f"model.bag_pooling: unknown value {self.bag_pooling!r}; "
                f"valid: {', '.join(BAG_POOLINGS)}"
            )
        dim = config.feature_embedding_dim
        # Bags: code 0 is padding, a zero row with no gradient. Categoricals: code 0 is a learned
        # "missing / unknown" row, since a missing value can itself carry signal.
        self.embeddings = nn.ModuleList(
            nn.Embedding(s.num_codes, dim, padding_idx=0 if s.kind == "bag" else None)
            for s in self.embedded_specs
        )
        for table in self.embeddings:
            nn.init.normal_(table.weight, std=0.1)
            if table.padding_idx is not None:
                with torch.no_grad():
                    table.weight[table.padding_idx].zero_()
        self.register_buffer(
            "numeric_mean",
            torch.tensor([s.mean for s in self.numeric_specs], dtype=torch.float32),
            persistent=False,
        )
        self.register_buffer(
            "numeric_std",
            torch.tensor([s.std for s in self.numeric_specs], dtype=torch.float32),
            persistent=False,
        )
        self.output_dim = dim * len(self.embedded_specs) + len(self.numeric_specs)

    def _pool_bag(self, table: nn.Embedding, codes_BL: Tensor) -> Tensor:
        """[B, E] pooled rows of a padded bag; padding (code 0) counts neither in sum nor length.

        ``embedding_bag`` reduces without building the [B, L, E] rows: a history bag of a few
        hundred items per user is the encoder's biggest cost, and that tensor was most of it.
        """
        if codes_BL.shape[1] == 0:  # every bag of the batch is empty
            return table.weight.new_zeros((codes_BL.shape[0], table.embedding_dim))
        mode = "mean" if self.bag_pooling == "mean" else "sum"
        pooled_BE = F.embedding_bag(codes_BL, table.weight, mode=mode, padding_idx=0)
        if self.bag_pooling == "sqrtn":
            lengths_B1 = (codes_BL > 0).sum(dim=1, keepdim=True).clamp_min(1)
            pooled_BE = pooled_BE / lengths_B1.to(pooled_BE.dtype).sqrt()
        return pooled_BE

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """[B, F] from the per-kind tensors described in the module docstring."""
        parts = []
        for spec, table in zip(self.embedded_specs, self.embeddings):
            codes = _get(features, spec.name)
            # A code outside the table (a vocabulary from another fit) reads as unknown.
            codes = codes.masked_fill((codes < 0) | (codes >= spec.num_codes), 0)
            if spec.kind == "categorical":
                parts.append(table(codes))
                continue
            parts.append(self._pool_bag(table, codes))
        if self.numeric_specs:
            # [B, F_numeric]
            raw = torch.stack(
                [_get(features, s.name).to(torch.float32) for s in self.numeric_specs], dim=1
            )
            standard = (raw - self.numeric_mean) / self.numeric_std
            parts.append(torch.nan_to_num(standard, nan=0.0, posinf=0.0, neginf=0.0))
        return torch.cat(parts, dim=1)


def _get(features: Mapping[str, Tensor], name: str) -> Tensor:
    try:
        return features[name]
    except KeyError:
        raise ValueError(
            f"feature {name!r} missing from the batch (has: {sorted(features)})"
        ) from None


class FeatureTable:
    """Every entity's feature tensors, indexed by dense idx (row r = entity r).

    Plain tensors, not module parameters or buffers: the model never owns them, DDP never
    broadcasts them. ``lookup`` with an index outside [0, R) (an unseen entity) returns the
    missing values: code 0, NaN, an empty bag.
    """

    def __init__(self, columns: Mapping[str, Tensor], *, num_rows: int) -> None:
        for name, column in columns.items():
            if column.shape[0] != num_rows:
                raise ValueError(
                    f"feature {name!r} has {column.shape[0]} rows, expected {num_rows}"
                )
        self.num_rows = num_rows
        # One extra row at index R holds the missing values.
        self._columns = {
            name: torch.cat([column, _missing_row(column)]) for name, column in columns.items()
        }

    @classmethod
    def _from_padded(cls, columns: dict[str, Tensor], num_rows: int) -> FeatureTable:
        table = cls.__new__(cls)
        table.num_rows, table._columns = num_rows, columns
        return table

    @property
    def names(self) -> list[str]:
        return list(self._columns)

    def lookup(self, idx_B: Tensor) -> dict[str, Tensor]:
        """Feature tensors of the entities ``idx_B`` ([B] int64): {name: [B] or [B, L]}."""
        if not self._columns:
            return {}
        device = next(iter(self._columns.values())).device
        idx_B = idx_B.to(device)
        idx_B = torch.where((idx_B >= 0) & (idx_B < self.num_rows), idx_B, self.num_rows)
        return {name: column[idx_B] for name, column in self._columns.items()}

    def to(self, device: torch.device | str) -> FeatureTable:
        return FeatureTable._from_padded(
            {k: v.to(device) for k, v in self._columns.items()}, self.num_rows
        )


def _missing_row(column: Tensor) -> Tensor:
    row = column.new_zeros((1, *column.shape[1:]))
    if column.is_floating_point():
        row.fill_(math.nan)
    return row
