"""Contract 5: the retrieval losses, as plain functions of similarity scores.

Legend: B rows (one positive each), N negatives per row, C in-batch columns, M extra columns.

Scores are similarities: higher means closer (euclidean similarity is −distance), so every loss
works with every similarity. Inputs: ``pos_scores: [B]``, ``neg_scores: [B, N]``, or the in-batch
matrix ``scores: [B, C]`` (row = user, column = item, positives on the diagonal).

Reductions (Contract 5):

- pointwise (``pointwise_bce``, ``cosine_regression``, ``contrastive``): the mean over all
  B·(1+N) labelled pairs;
- pairwise (``triplet_hinge``, ``triplet_logistic``, ``bpr``): the mean over all B·N
  (positive, negative) pairs;
- listwise (``sampled_softmax``, ``in_batch_softmax``): the mean over the B rows.

``neg_weights: [B, N]`` (an addition to Contract 5, default all ones) weighs each negative and
masks it with 0. Pointwise and pairwise losses take the weighted mean Σ w·ℓ / Σ w (positives have
weight 1), so a negative of weight 2 counts as the same negative listed twice. Softmax losses
add log w to the negative's logit: exp(s/τ + log w) = w·exp(s/τ), which again is the negative
listed w times; weight 0 removes it from the softmax.

Hyperparameters are keyword arguments; the defaults of ``temperature`` and ``scale`` (1.0) give
the bare formula, ``margin`` defaults to ``LossConfig.margin``. Which loss takes which one is
in each signature; ``hyperparameters(name, loss_config)`` picks them out of a ``LossConfig``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from twotower_core import negatives


def _check_pairs(pos_scores: Tensor, neg_scores: Tensor, neg_weights: Tensor | None) -> None:
    if pos_scores.dim() != 1 or neg_scores.dim() != 2 or neg_scores.shape[0] != pos_scores.shape[0]:
        raise ValueError(
            f"expected pos_scores [B] and neg_scores [B, N], got {tuple(pos_scores.shape)} "
            f"and {tuple(neg_scores.shape)}"
        )
    if neg_weights is not None and neg_weights.shape != neg_scores.shape:
        raise ValueError(
            f"neg_weights {tuple(neg_weights.shape)} must match neg_scores {tuple(neg_scores.shape)}"
        )


def _pointwise_mean(
    pos_terms_B: Tensor, neg_terms_BN: Tensor, neg_weights: Tensor | None
) -> Tensor:
    """(Σ ℓ⁺ + Σ w·ℓ⁻) / (B + Σ w): every labelled pair once, a negative w times."""
    if neg_weights is None:
        neg_weights = torch.ones_like(neg_terms_BN)
    weighted = torch.where(neg_weights > 0, neg_weights * neg_terms_BN, 0.0)
    return (pos_terms_B.sum() + weighted.sum()) / (pos_terms_B.numel() + neg_weights.sum())


def _pairwise_mean(terms_BN: Tensor, neg_weights: Tensor | None) -> Tensor:
    """Σ w·ℓ / Σ w over the (positive, negative) pairs; 0 when every pair is masked."""
    if neg_weights is None:
        return terms_BN.mean() if terms_BN.numel() else terms_BN.sum()
    weighted = torch.where(neg_weights > 0, neg_weights * terms_BN, 0.0)
    return weighted.sum() / neg_weights.sum().clamp_min(torch.finfo(terms_BN.dtype).tiny)


def _softmax_rows(pos_logits_B: Tensor, neg_logits_BN: Tensor) -> Tensor:
    """Mean over rows of −log softmax of the positive among [pos, negatives]."""
    # [B, 1 + N]
    logits = torch.cat([pos_logits_B.unsqueeze(1), neg_logits_BN], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos_logits_B).mean()


# --------------------------------------------------------------------------------------------
# pointwise


def pointwise_bce(
    pos_scores: Tensor, neg_scores: Tensor, *, scale: float = 1.0, neg_weights: Tensor | None = None
) -> Tensor:
    """−log σ(a·s⁺) − Σ log(1 − σ(a·s⁻)), a = ``scale``; mean over the B·(1+N) pairs.

    ``scale`` turns bounded scores (cosine ∈ [−1, 1]) into usable logits; 1.0 is the bare formula.

    Args:
        pos_scores: [B] similarity of each positive pair.
        neg_scores: [B, N] similarity of each row's negatives.
        scale: multiplies every score before the sigmoid.
        neg_weights: [B, N] weight of each negative, 0 = masked; None = all 1.
    """
    _check_pairs(pos_scores, neg_scores, neg_weights)
    # log(1 − σ(x)) = log σ(−x), stable for large |x|.
    return _pointwise_mean(
        -F.logsigmoid(scale * pos_scores), -F.logsigmoid(-scale * neg_scores), neg_weights
    )


def cosine_regression(
    pos_scores: Tensor, neg_scores: Tensor, *, neg_weights: Tensor | None = None
) -> Tensor:
    """(s⁺ − 1)² and (s⁻ + 1)² on cosine scores; mean over the B·(1+N) pairs.

    Args:
        pos_scores: [B] cosine of each positive pair.
        neg_scores: [B, N] cosine of each row's negatives.
        neg_weights: [B, N] weight of each negative, 0 = masked; None = all 1.
    """
    _check_pairs(pos_scores, neg_scores, neg_weights)
    return _pointwise_mean((pos_scores - 1.0).pow(2), (neg_scores + 1.0).pow(2), neg_weights)


def contrastive(
    pos_scores: Tensor,
    neg_scores: Tensor,
    *,
    margin: float = 0.5,
    neg_weights: Tensor | None = None,
) -> Tensor:
    """d⁺² + max(0, m − d⁻)² with d = −s; mean over the B·(1+N) pairs.

    With ``euclidean`` similarity d is the distance itself (Hadsell et al.). With ``dot`` or
    ``cosine`` d = −s can be negative, and d⁺² then pulls s⁺ towards 0 rather than up: the
    formula is Contract 5's, but it is meant for euclidean.

    Args:
        pos_scores: [B] similarity of each positive pair.
        neg_scores: [B, N] similarity of each row's negatives.
        margin: m, the distance beyond which a negative costs nothing.
        neg_weights: [B, N] weight of each negative, 0 = masked; None = all 1.
    """
    _check_pairs(pos_scores, neg_scores, neg_weights)
    pos_distance, neg_distance = -pos_scores, -neg_scores
    return _pointwise_mean(
        pos_distance.pow(2), (margin - neg_distance).clamp_min(0.0).pow(2), neg_weights
    )


# --------------------------------------------------------------------------------------------
# pairwise


def triplet_hinge(
    pos_scores: Tensor,
    neg_scores: Tensor,
    *,
    margin: float = 0.5,
    neg_weights: Tensor | None = None,
) -> Tensor:
    """max(0, s⁻ − s⁺ + m) per (positive, negative) pair; mean over the B·N pairs.

    Zero once every positive beats every negative by at least the margin.

    Args:
        pos_scores: [B] similarity of each positive pair.
        neg_scores: [B, N] similarity of each row's negatives.
        margin: m, how far above every negative the positive must score.
        neg_weights: [B, N] weight of each negative, 0 = masked; None = all 1.
    """
    _check_pairs(pos_scores, neg_scores, neg_weights)
    return _pairwise_mean(
        (neg_scores - pos_scores.unsqueeze(1) + margin).clamp_min(0.0), neg_weights
    )


def triplet_logistic(
    pos_scores: Tensor, neg_scores: Tensor, *, scale: float = 1.0, neg_weights: Tensor | None = None
) -> Tensor:
    """log(1 + exp(σ·(s⁻ − s⁺))), σ = ``scale``; mean over the B·N pairs.

    The smooth triplet hinge; with σ = 1 it equals ``bpr``.

    Args:
        pos_scores: [B] similarity of each positive pair.
        neg_scores: [B, N] similarity of each row's negatives.
        scale: σ, the sharpness of the soft hinge.
        neg_weights: [B, N] weight of each negative, 0 = masked; None = all 1.
    """
    _check_pairs(pos_scores, neg_scores, neg_weights)
    return _pairwise_mean(F.softplus(scale * (neg_scores - pos_scores.unsqueeze(1))), neg_weights)


def bpr(pos_scores: Tensor, neg_scores: Tensor, *, neg_weights: Tensor | None = None) -> Tensor:
    """−log σ(s⁺ − s⁻) per (positive, negative) pair; mean over the B·N pairs.

    Args:
        pos_scores: [B] similarity of each positive pair.
        neg_scores: [B, N] similarity of each row's negatives.
        neg_weights: [B, N] weight of each negative, 0 = masked; None = all 1.
    """
    _check_pairs(pos_scores, neg_scores, neg_weights)
    return _pairwise_mean(-F.logsigmoid(pos_scores.unsqueeze(1) - neg_scores), neg_weights)


# --------------------------------------------------------------------------------------------
# listwise


def sampled_softmax(
    pos_scores: Tensor,
    neg_scores: Tensor,
    *,
    temperature: float = 1.0,
    log_q_pos: Tensor | None = None,
    log_q_neg: Tensor | None = None,
    neg_weights: Tensor | None = None,
) -> Tensor:
    """−log softmax of the positive over [s⁺, s⁻₁ … s⁻ₙ], logits = s/τ − log q; mean over rows.

    Args:
        pos_scores: [B] similarity of each positive pair.
        neg_scores: [B, N] similarity of each row's negatives.
        temperature: τ, divides every score.
        log_q_pos: [B] log of how often the positive is expected in the sampled pool
            (logQ correction); None = no correction.
        log_q_neg: [B, N] (or [N]) the same for each negative; None = no correction.
        neg_weights: [B, N] weight of each negative (adds log w to its logit), 0 = masked.
    """
    _check_pairs(pos_scores, neg_scores, neg_weights)
    pos_logits = negatives.logq_correct(pos_scores / temperature, log_q_pos)
    neg_logits = negatives.logq_correct(neg_scores / temperature, log_q_neg)
    return _softmax_rows(pos_logits, negatives.weigh_logits(neg_logits, neg_weights))


def in_batch_softmax(
    scores: Tensor,
    *,
    temperature: float = 1.0,
    log_q: Tensor | None = None,
    item_ids: Tensor | None = None,
    symmetric: bool = False,
    positive_offset: int = 0,
    extra_scores: Tensor | None = None,
    extra_log_q: Tensor | None = None,
    extra_weights: Tensor | None = None,
    excluded: Tensor | None = None,
) -> Tensor:
    """−log softmax of row i's positive over its in-batch columns (and extras); mean over rows.

    logits = s/τ − log q(column's item). Row i's positive is column ``positive_offset + i``
    (the diagonal of a [B, B] matrix; gathered across workers, the local rows' block of a
    [B, C] matrix). With ``item_ids``, a column holding the same item as row i's positive, other
    than the positive itself, is an accidental hit and is left out of the softmax.

    Args:
        scores: [B, C] row = user, column = item; C = B unless gathered across workers.
        temperature: τ, divides every score.
        log_q: [C] log of each column's expected count in the batch (logQ correction); None = none.
        item_ids: [C] item of each column, for accidental-hit masking; None = no masking.
        symmetric: also the item → user direction, softmax over each column of the square
            [B, B] part (no logQ: users were not sampled by item popularity); the result is the
            mean of both directions.
        positive_offset: column of row 0's positive.
        extra_scores: [B, M] more negatives per row (sampled items, data negatives).
        extra_log_q: [B, M] or [M] their logQ correction; None = none.
        extra_weights: [B, M] their weights (log w added to the logit), 0 = masked.
        excluded: [B, C] bool, columns left out of row i's softmax (e.g. other items of row i's
            user: false negatives); row i's positive column never is. With ``symmetric``, the
            same pairs are left out of the item → user direction.
    """
    if scores.dim() != 2:
        raise ValueError(f"expected in-batch scores [B, C], got {tuple(scores.shape)}")
    num_rows, num_columns = scores.shape
    if positive_offset < 0 or positive_offset + num_rows > num_columns:
        raise ValueError(
            f"positives at columns {positive_offset}..{positive_offset + num_rows - 1} do not fit "
            f"in {num_columns} columns"
        )
    rows = torch.arange(num_rows, device=scores.device)
    logits = negatives.logq_correct(scores / temperature, log_q)
    if item_ids is not None:
        hits = negatives.in_batch_hits(item_ids, num_rows=num_rows, positive_offset=positive_offset)
        logits = logits.masked_fill(hits, -math.inf)
    if excluded is not None:
        if excluded.shape != scores.shape:
            raise ValueError(
                f"excluded must be [B, C] = {tuple(scores.shape)}, got {tuple(excluded.shape)}"
            )
        excluded = excluded.clone()
        excluded[rows, rows + positive_offset] = False
        logits = logits.masked_fill(excluded, -math.inf)
    pos_logits = logits[rows, rows + positive_offset]
    # The positive column is in ``logits`` already; log Σ over the whole row is the denominator.
    row_logits = logits
    if extra_scores is not None:
        extra = negatives.logq_correct(extra_scores / temperature, extra_log_q)
        row_logits = torch.cat([logits, negatives.weigh_logits(extra, extra_weights)], dim=1)
    loss = (torch.logsumexp(row_logits, dim=1) - pos_logits).mean()
    if not symmetric:
        return loss
    if num_rows != num_columns:
        raise ValueError(
            "symmetric needs the square [B, B] matrix; for gathered columns call again with "
            "the item → user scores"
        )
    reverse = (scores / temperature).T
    if item_ids is not None:
        reverse = reverse.masked_fill(hits.T, -math.inf)
    if excluded is not None:
        reverse = reverse.masked_fill(excluded.T, -math.inf)
    reverse_loss = (torch.logsumexp(reverse, dim=1) - reverse[rows, rows]).mean()
    return 0.5 * (loss + reverse_loss)


# --------------------------------------------------------------------------------------------
# the linear member's objective (``model.linear_member_dim``; not a selectable ``loss.name``)


def linear_autoencoder_rows(
    user_BD: Tensor,
    user_loo_BD: Tensor,
    item_BD: Tensor,
    item_gram_DD: Tensor,
    bag_items_BLD: Tensor,
    bag_mask_BL: Tensor,
) -> Tensor:
    """EASE's squared error over the whole catalog (Steck 2019), per train row; mean over rows.

    EASE fits B to minimise Σ_u Σ_i (X_ui − (X_u B)_ui)² with diag(B) = 0: every item of every
    user is scored, and a user's own item i is predicted from the rest of its row. Here the
    model is low-rank, score(u, i) = h_u · q_i, with h_u from the user's history bag (X_u) and
    h_u^(−i) from the bag without i (the zero diagonal). User u's term splits over its n_u rows
    (one per distinct item i of the bag) as

        row (u, i):  (1 − h_u^(−i) · q_i)²  +  (h_u G h_uᵀ − Σ_{j in bag} (h_u · q_j)²) / n_u,

    G = Σ_all q_j q_jᵀ: the second part is Σ_{j not in bag} (h_u · q_j)², the catalog's
    negatives, without scoring the catalog. The mean over an epoch's rows is the objective
    divided by the number of rows when each row's item is in its user's bag and each (user,
    item) is one row. Otherwise (a positive repeated over several rows, an item missing from
    the bag) it is a reweighted sum of the same squares: every row's loss stays ≥ 0, so the
    fit cannot run away.

    Args:
        user_BD: [B, D] h_u of each row's user, from the whole bag.
        user_loo_BD: [B, D] h_u^(−i), from the bag without the row's item.
        item_BD: [B, D] q_i of each row's item.
        item_gram_DD: [D, D] G over every item of the catalog.
        bag_items_BLD: [B, L, D] q_j of the items of each row's user's bag.
        bag_mask_BL: [B, L] bool, which of them count: each distinct item once, no padding.
    """
    loo_scores_B = (user_loo_BD * item_BD).sum(dim=-1)
    catalog_B = ((user_BD @ item_gram_DD) * user_BD).sum(dim=-1)
    bag_scores_BL = torch.einsum("bld,bd->bl", bag_items_BLD, user_BD)
    in_bag_B = (bag_scores_BL.square() * bag_mask_BL).sum(dim=-1)
    lengths_B = bag_mask_BL.sum(dim=-1).to(catalog_B.dtype).clamp_min(1.0)
    return ((1.0 - loo_scores_B) ** 2 + (catalog_B - in_bag_B) / lengths_B).mean()


# --------------------------------------------------------------------------------------------
# registry

LOSSES: dict[str, Callable[..., Tensor]] = {
    "pointwise_bce": pointwise_bce,
    "cosine_regression": cosine_regression,
    "contrastive": contrastive,
    "triplet_hinge": triplet_hinge,
    "triplet_logistic": triplet_logistic,
    "bpr": bpr,
    "sampled_softmax": sampled_softmax,
    "in_batch_softmax": in_batch_softmax,
}

LOSS_FAMILIES: dict[str, str] = {
    "pointwise_bce": "pointwise",
    "cosine_regression": "pointwise",
    "contrastive": "pointwise",
    "triplet_hinge": "pairwise",
    "triplet_logistic": "pairwise",
    "bpr": "pairwise",
    "sampled_softmax": "listwise",
    "in_batch_softmax": "listwise",
}

# Keyword arguments that come from LossConfig fields of the same name.
HYPERPARAMETERS: tuple[str, ...] = ("margin", "scale", "temperature")


def loss_fn(name: str) -> Callable[..., Tensor]:
    """The loss registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}") from None


def loss_family(name: str) -> str:
    """``"pointwise"``, ``"pairwise"`` or ``"listwise"``."""
    loss_fn(name)
    return LOSS_FAMILIES[name]


def hyperparameters(name: str, loss_config: Any) -> dict[str, float]:
    """The ``margin`` / ``scale`` / ``temperature`` values of ``loss_config`` that loss ``name`` takes."""
    accepted = inspect.signature(loss_fn(name)).parameters
    return {key: getattr(loss_config, key) for key in HYPERPARAMETERS if key in accepted}
