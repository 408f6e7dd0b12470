"""Similarities between user and item embeddings: higher score = closer, always.

Legend: B batch (queries), N keys per query or in a shared key set, D embedding dim.

Each similarity has three forms that give the same number for the same pair:

- ``pairs(query_BD, key_BD) -> [B]``          row i against row i (the positives)
- ``matrix(query_BD, key_ND) -> [B, N]``      every query against every key (in-batch, sampled, eval)
- ``negatives(query_BD, key_BND) -> [B, N]``  each query against its own N keys (data negatives)

Definitions (u = query, v = key):

- ``dot``:       s = u·v.                          Serve with inner product, vectors as they are.
- ``cosine``:    s = u·v / (‖u‖‖v‖), in [−1, 1].   Serve with inner product on L2-normalised vectors.
- ``euclidean``: s = −‖u − v‖ (the negative distance, not its square, so that margin losses such
  as ``contrastive`` see the true distance d = −s).  Serve with L2 (the ranking by −‖u − v‖ and by
  ‖u − v‖² is the same).

Cosine has no temperature of its own: the temperature lives in the loss (``LossConfig.temperature``
divides the scores of the softmax losses, ``LossConfig.scale`` multiplies them in the sigmoid
losses). A second temperature here would only multiply with that one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Keeps the cosine denominator and the square root of euclidean away from 0, so identical or
# zero vectors give finite gradients.
EPS = 1e-12


@dataclass(frozen=True)
class Similarity:
    """One similarity in its three forms, and how its vectors are served."""

    name: str
    pairs: Callable[[Tensor, Tensor], Tensor]
    matrix: Callable[[Tensor, Tensor], Tensor]
    negatives: Callable[[Tensor, Tensor], Tensor]
    # The metric an ANN index should use: "inner_product" or "l2".
    ann_metric: str
    # Whether vectors must be L2-normalised before they go into that index.
    normalize_for_serving: bool

    def __call__(self, query_BD: Tensor, key_BD: Tensor) -> Tensor:
        return self.pairs(query_BD, key_BD)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def _dot_pairs(query_BD: Tensor, key_BD: Tensor) -> Tensor:
    return (query_BD * key_BD).sum(-1)


def _dot_matrix(query_BD: Tensor, key_ND: Tensor) -> Tensor:
    return query_BD @ key_ND.T


def _dot_negatives(query_BD: Tensor, key_BND: Tensor) -> Tensor:
    # [B, N, D] @ [B, D, 1] -> [B, N, 1]
    return torch.bmm(key_BND, query_BD.unsqueeze(-1)).squeeze(-1)


def _cosine_pairs(query_BD: Tensor, key_BD: Tensor) -> Tensor:
    return _dot_pairs(_unit(query_BD), _unit(key_BD))


def _cosine_matrix(query_BD: Tensor, key_ND: Tensor) -> Tensor:
    return _dot_matrix(_unit(query_BD), _unit(key_ND))


def _cosine_negatives(query_BD: Tensor, key_BND: Tensor) -> Tensor:
    return _dot_negatives(_unit(query_BD), _unit(key_BND))


def _neg_distance(squared: Tensor) -> Tensor:
    return -squared.clamp_min(EPS).sqrt()


def _euclidean_pairs(query_BD: Tensor, key_BD: Tensor) -> Tensor:
    return _neg_distance((query_BD - key_BD).pow(2).sum(-1))


def _euclidean_matrix(query_BD: Tensor, key_ND: Tensor) -> Tensor:
    # ‖u − v‖² = ‖u‖² + ‖v‖² − 2u·v: one matmul instead of a [B, N, D] difference tensor.
    squared = (
        query_BD.pow(2).sum(-1, keepdim=True)
        + key_ND.pow(2).sum(-1).unsqueeze(0)
        - 2.0 * _dot_matrix(query_BD, key_ND)
    )
    return _neg_distance(squared)


def _euclidean_negatives(query_BD: Tensor, key_BND: Tensor) -> Tensor:
    return _neg_distance((key_BND - query_BD.unsqueeze(1)).pow(2).sum(-1))


SIMILARITIES: dict[str, Similarity] = {
    "dot": Similarity(
        "dot",
        _dot_pairs,
        _dot_matrix,
        _dot_negatives,
        ann_metric="inner_product",
        normalize_for_serving=False,
    ),
    "cosine": Similarity(
        "cosine",
        _cosine_pairs,
        _cosine_matrix,
        _cosine_negatives,
        ann_metric="inner_product",
        normalize_for_serving=True,
    ),
    "euclidean": Similarity(
        "euclidean",
        _euclidean_pairs,
        _euclidean_matrix,
        _euclidean_negatives,
        ann_metric="l2",
        normalize_for_serving=False,
    ),
}


def similarity(name: str) -> Similarity:
    """The similarity registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return SIMILARITIES[name]
    except KeyError:
        raise ValueError(
            f"unknown similarity {name!r}; valid: {', '.join(sorted(SIMILARITIES))}"
        ) from None


def ann_metric(name: str) -> str:
    """``"inner_product"`` or ``"l2"``: the ANN index metric that ranks like ``name``."""
    return similarity(name).ann_metric


def normalize_for_serving(name: str) -> bool:
    """Whether embeddings must be L2-normalised before serving with ``ann_metric(name)``."""
    return similarity(name).normalize_for_serving
