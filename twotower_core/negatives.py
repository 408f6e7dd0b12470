"""Small pieces that shape a loss's negatives; ``task.py`` applies them in a fixed order.

Legend: B rows (one positive each), N negatives per row, C in-batch columns, S sampled items.

Every negative carries a score, a weight (0 = masked out) and a log q: the log of how many times
its item is expected in the pool it was drawn from (see ``samplers.py``). The order, as in
TensorFlow Recommenders' retrieval task:

1. score each pool: in-batch columns, catalog samples, data negatives;
2. accidental hits: weight 0 where a negative is the row's own positive item;
3. source weights: multiply each data negative's weight by its source's weight;
4. hard negatives: keep the top-k scored data negatives of each row (weight-0 ones never win);
5. the loss applies temperature, then logQ (s/τ − log q), then the weights (+ log w).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from twotower_core.config import NEGATIVE_SOURCES


def logq_correct(logits: Tensor, log_q: Tensor | None) -> Tensor:
    """logits − log q, broadcasting ``log_q`` over rows ([C] against [B, C]); None = unchanged."""
    if log_q is None:
        return logits
    return logits - log_q.to(logits.dtype)


def weigh_logits(logits_BN: Tensor, weights_BN: Tensor | None) -> Tensor:
    """logits + log w: a weight-w negative counts as w copies in a softmax; w = 0 gives −inf."""
    if weights_BN is None:
        return logits_BN
    log_w = torch.where(weights_BN > 0, weights_BN.clamp_min(1e-30).log(), -math.inf)
    return logits_BN + log_w.to(logits_BN.dtype)


def accidental_hits(pos_item_idx_B: Tensor, neg_item_idx: Tensor) -> Tensor:
    """bool [B, N]: True where a negative is the row's own positive item.

    Args:
        pos_item_idx_B: [B] item of each row's positive.
        neg_item_idx: [B, N] each row's negatives, or [N] negatives shared by every row.
    """
    if neg_item_idx.dim() == 1:
        neg_item_idx = neg_item_idx.unsqueeze(0)
    return neg_item_idx == pos_item_idx_B.unsqueeze(1)


def in_batch_hits(item_ids_C: Tensor, *, num_rows: int, positive_offset: int = 0) -> Tensor:
    """bool [B, C]: column j holds row i's positive item but is not row i's positive column.

    Row i's positive is column ``positive_offset + i``, so its item is
    ``item_ids_C[positive_offset + i]``.
    """
    rows = torch.arange(num_rows, device=item_ids_C.device)
    row_items_B = item_ids_C[positive_offset : positive_offset + num_rows]
    same_B_C = row_items_B.unsqueeze(1) == item_ids_C.unsqueeze(0)
    same_B_C[rows, rows + positive_offset] = False
    return same_B_C


class UserPositives:
    """Which (user, item) pairs are train positives: a sorted key per pair, for false negatives.

    A row's negatives (in-batch columns, catalog samples, data negatives) can hold another item
    its user clicked, one the model should rank high, not push down. Accidental-hit masking only
    catches the row's own item; ``loss.mask_user_positives`` masks these too. Keys are
    ``user · num_items + item`` (int64, 8 bytes per distinct train pair), looked up with a
    binary search.
    """

    def __init__(self, user_idx_R: Tensor, item_idx_R: Tensor, *, num_items: int) -> None:
        if user_idx_R.shape != item_idx_R.shape or user_idx_R.dim() != 1:
            raise ValueError(
                f"user and item indices must be [R] alike, got {tuple(user_idx_R.shape)} and "
                f"{tuple(item_idx_R.shape)}"
            )
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if item_idx_R.numel() and (int(item_idx_R.min()) < 0 or int(item_idx_R.max()) >= num_items):
            raise ValueError(f"item indices must be in [0, {num_items})")
        self.num_items = num_items
        self.keys = torch.unique(user_idx_R.long() * num_items + item_idx_R.long())  # sorted

    @property
    def num_pairs(self) -> int:
        return int(self.keys.numel())

    def contains(self, user_idx_B: Tensor, item_idx: Tensor) -> Tensor:
        """bool [B, N]: item ``[b, n]`` (or ``[n]``, shared by every row) is a positive of user b."""
        if item_idx.dim() == 1:
            item_idx = item_idx.unsqueeze(0)
        query = user_idx_B.long().unsqueeze(1) * self.num_items + item_idx.long()
        if self.keys.numel() == 0:
            return torch.zeros(query.shape, dtype=torch.bool, device=query.device)
        if self.keys.device != query.device:
            # Moved once: the keys are large and this runs every step.
            self.keys = self.keys.to(query.device)
        keys = self.keys
        found = torch.searchsorted(keys, query).clamp_(max=keys.numel() - 1)
        return keys[found] == query


def hard_negative_top_k(
    scores_BN: Tensor, weights_BN: Tensor, *aligned: Tensor, k: int | None
) -> tuple[Tensor, ...]:
    """Keep each row's k highest-scored negatives among those with weight > 0.

    Returns ``(scores_BK, weights_BK, *aligned_BK)`` gathered at the kept columns, K = min(k, N).
    A row with fewer than k valid negatives keeps masked ones too, still at weight 0. ``k=None``
    or k ≥ N returns the inputs unchanged.

    Args:
        scores_BN: [B, N] similarity of each negative (the ranking key).
        weights_BN: [B, N] weight of each negative; 0 = masked, never preferred.
        aligned: more [B, N] tensors (item ids, sources) to gather the same way.
        k: how many to keep per row.
    """
    num_negatives = scores_BN.shape[1]
    if k is None or k >= num_negatives:
        return (scores_BN, weights_BN, *aligned)
    if k < 1:
        raise ValueError(f"hard_negative_top_k must be >= 1, got {k}")
    ranking_key = scores_BN.detach().masked_fill(weights_BN <= 0, -math.inf)
    keep_BK = ranking_key.topk(k, dim=1).indices
    return tuple(t.gather(1, keep_BK) for t in (scores_BN, weights_BN, *aligned))


def source_weight_table(weights: Mapping[str, float]) -> Tensor:
    """[len(NEGATIVE_SOURCES)] weight per source code; a source not named weighs 1.0."""
    unknown = sorted(set(weights) - set(NEGATIVE_SOURCES))
    if unknown:
        raise ValueError(
            f"unknown negative source {unknown[0]!r} in source weights; "
            f"valid: {', '.join(NEGATIVE_SOURCES)}"
        )
    return torch.tensor([float(weights.get(name, 1.0)) for name in NEGATIVE_SOURCES])


def source_weights(table: Tensor, source_BN: Tensor) -> Tensor:
    """[B, N] weight of each data negative from its source code (index into NEGATIVE_SOURCES)."""
    return table.to(source_BN.device)[source_BN]
