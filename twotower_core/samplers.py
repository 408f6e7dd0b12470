"""Catalog samplers and the sampling probabilities behind logQ correction.

Legend: I items in the catalog, S samples, C in-batch columns.

Probabilities come from item click counts c (the dataset's vocab counts):

    q(j) = (c_j + 1)^α / Σ_k (c_k + 1)^α

α = 0 is uniform, α = 1 is proportional to clicks. The +1 keeps items no one clicked samplable
and their log q finite (the dataset's ``unexposed`` negatives use the same rule).

logQ correction subtracts, from each negative's logit, the log of how many times its item is
expected in the pool it came from:

- S items drawn i.i.d. from the catalog by q:  log Q(j) = log S + log q(j)
- the C positives of a batch, which are clicks, so drawn ≈ i.i.d. by p(j) with α = 1:
  log Q(j) = log C + log p(j)

Within one pool the log S / log C term is the same for every column and cancels in the softmax;
it matters when a softmax mixes pools (in-batch columns + catalog samples), where expected counts
put both on one scale.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def log_q_from_counts(counts_I: Tensor, alpha: float = 1.0) -> Tensor:
    """[I] float64 log q(j) = α·log(c_j + 1) − log Σ_k (c_k + 1)^α."""
    if counts_I.dim() != 1 or counts_I.numel() == 0:
        raise ValueError(
            f"item counts must be a non-empty [I] tensor, got shape {tuple(counts_I.shape)}"
        )
    if alpha < 0:
        raise ValueError(f"sampler alpha must be >= 0, got {alpha}")
    counts = counts_I.to(torch.float64)
    if bool((counts < 0).any()):
        raise ValueError("item counts must be >= 0")
    logits = alpha * torch.log1p(counts)
    return logits - torch.logsumexp(logits, dim=0)


def in_batch_log_q(log_p_I: Tensor, item_idx_C: Tensor) -> Tensor:
    """[C] log expected count of each column's item among C batch positives: log C + log p(j)."""
    return log_p_I.to(item_idx_C.device)[item_idx_C] + math.log(item_idx_C.numel())


class CatalogSampler:
    """Draws item indices i.i.d. from q(j) ∝ (c_j + 1)^α over the whole catalog.

    Sampling inverts the CDF with ``torch.searchsorted`` on uniforms from the given
    ``torch.Generator``: the same generator state gives the same items, and a draw costs
    O(S log I), so a 1M-item catalog needs no [I]-sized work per batch.
    """

    def __init__(self, counts_I: Tensor, *, alpha: float) -> None:
        self.alpha = float(alpha)
        self.log_q_I = log_q_from_counts(counts_I, self.alpha)
        cdf = torch.cumsum(self.log_q_I.exp(), dim=0)
        self._cdf_I = cdf / cdf[-1]
        self._log_q_by_device: dict[torch.device, Tensor] = {}

    @classmethod
    def uniform(cls, num_items: int) -> CatalogSampler:
        return cls(torch.zeros(num_items), alpha=0.0)

    @property
    def num_items(self) -> int:
        return self.log_q_I.numel()

    def sample(self, num: int, *, generator: torch.Generator | None = None) -> Tensor:
        """[num] int64 item indices (on the CPU), drawn with replacement."""
        uniforms = torch.rand(num, generator=generator, dtype=torch.float64)
        idx = torch.searchsorted(self._cdf_I, uniforms, right=True)
        # A uniform within rounding of 1.0 can land past the last bin.
        return idx.clamp_max(self.num_items - 1)

    def log_q(self, idx: Tensor) -> Tensor:
        """log q(j) for each index, float32, on ``idx``'s device (same shape as ``idx``)."""
        table = self._log_q_by_device.get(idx.device)
        if table is None:
            table = self.log_q_I.to(device=idx.device, dtype=torch.float32)
            self._log_q_by_device[idx.device] = table
        return table[idx]

    def log_expected_count(self, idx: Tensor, num_samples: int) -> Tensor:
        """log(S·q(j)): the logQ correction for items in a pool of ``num_samples`` draws."""
        return self.log_q(idx) + math.log(num_samples)
