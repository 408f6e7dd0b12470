"""The retrieval task: embeddings in, one scalar loss out, composed from the configured pieces.

Legend: B rows on this worker, N data negatives per row, S sampled items per batch,
C in-batch columns (B, or the global batch G when gathered across workers), D embedding dim.

A loss sees up to three pools of negatives, each scored with the configured similarity and
shaped by ``negatives.py`` in its fixed order:

- data negatives ``[B, N]`` (the dataset's exposed_not_clicked / ranked_out / unexposed):
  accidental hits masked, per-source weights, hard-negative top-k. No logQ: the logging system
  chose them, not a known proposal distribution, so each counts once (log q = 0).
- catalog samples ``[B, S]``, shared by all rows (mixed negative sampling): accidental hits
  masked, logQ = log(S·q_sampler(j)).
- in-batch columns ``[B, C]``: the batch's positives (every worker's with
  ``gather_across_workers``), logQ = log(C·p_click(j)), accidental hits masked.

Which pools each loss uses:

- ``in_batch_softmax``: in-batch columns, plus the samples and the data negatives
  (``use_data_negatives``) appended as extra columns of each row's softmax.
- every other loss: data negatives + samples, and in-batch columns too when
  ``in_batch_negatives`` is on, which by default it is only for a batch with no other negatives
  (so every loss trains out of the box). ``sampled_softmax`` corrects its positive like the pool
  it belongs to: log(C·p(pos)) with in-batch columns, else log(S·q_sampler(pos)) with samples.
  Pointwise and pairwise losses take no logQ (it corrects a softmax's partition estimate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from twotower_core import negatives
from twotower_core.config import LossConfig
from twotower_core.distributed import all_gather_with_offset
from twotower_core.losses import hyperparameters, in_batch_softmax, loss_family, loss_fn
from twotower_core.samplers import CatalogSampler, in_batch_log_q, log_q_from_counts
from twotower_core.similarity import Similarity, similarity


@dataclass
class _Pool:
    scores_BN: Tensor
    weights_BN: Tensor
    # [B, N] or [N]; None = no logQ correction.
    log_q: Tensor | None


@dataclass
class RetrievalTask:
    """Built by ``build_task``; call it with a batch's embeddings to get the loss."""

    config: LossConfig
    similarity: Similarity
    loss: Callable[..., Tensor]
    family: str
    hyperparameters: dict[str, float]
    # Draws catalog negatives; None without item counts.
    sampler: CatalogSampler | None
    # [I] log p(j) of an item being a click (α = 1), for in-batch logQ; None = no correction.
    click_log_p: Tensor | None
    # [len(NEGATIVE_SOURCES)] weight per source code.
    source_weight_table: Tensor
    # Losses other than in_batch_softmax: also use in-batch columns as negatives (None = only
    # when a batch has no data or sampled negatives).
    in_batch_negatives: bool | None = None
    # The train (user, item) pairs, for ``loss.mask_user_positives``; None = not loaded.
    user_positives: negatives.UserPositives | None = None

    def sample(self, num: int, *, generator: torch.Generator | None = None) -> Tensor:
        """[num] item indices drawn from the catalog sampler (CPU), for ``sampled_item_idx_S``."""
        if self.sampler is None:
            raise ValueError(
                "loss.num_sampled_negatives needs item counts: build_task(item_counts=...)"
            )
        return self.sampler.sample(num, generator=generator)

    def __call__(
        self,
        user_BD: Tensor,
        pos_item_BD: Tensor,
        *,
        pos_item_idx_B: Tensor,
        neg_item_BND: Tensor | None = None,
        neg_item_idx_BN: Tensor | None = None,
        neg_source_BN: Tensor | None = None,
        sampled_item_SD: Tensor | None = None,
        sampled_item_idx_S: Tensor | None = None,
        user_idx_B: Tensor | None = None,
    ) -> Tensor:
        """Scalar loss of one batch.

        Args:
            user_BD: [B, D] user embeddings.
            pos_item_BD: [B, D] embedding of each row's positive item.
            pos_item_idx_B: [B] dense index of each positive item.
            neg_item_BND: [B, N, D] data negative embeddings; used with ``use_data_negatives``.
            neg_item_idx_BN: [B, N] their item indices (accidental-hit masking).
            neg_source_BN: [B, N] their source codes, indices into ``NEGATIVE_SOURCES``.
            sampled_item_SD: [S, D] embeddings of catalog samples drawn with ``sample``.
            sampled_item_idx_S: [S] their item indices.
            user_idx_B: [B] dense index of each row's user; needed by ``mask_user_positives``.
        """
        pos_scores_B = self.similarity.pairs(user_BD, pos_item_BD)
        pools = [
            pool
            for pool in (
                self._data_pool(
                    user_BD,
                    pos_item_idx_B,
                    neg_item_BND,
                    neg_item_idx_BN,
                    neg_source_BN,
                    user_idx_B,
                ),  # fmt: skip
                self._sampled_pool(
                    user_BD, pos_item_idx_B, sampled_item_SD, sampled_item_idx_S, user_idx_B
                ),
            )
            if pool is not None
        ]
        if self.config.name == "in_batch_softmax":
            return self._in_batch_softmax(user_BD, pos_item_BD, pos_item_idx_B, pools, user_idx_B)

        use_in_batch = self.in_batch_negatives
        if use_in_batch is None:
            use_in_batch = not pools
        log_q_pos = None
        if use_in_batch:
            in_batch, in_batch_log_q_pos = self._in_batch_pool(
                user_BD, pos_item_BD, pos_item_idx_B, user_idx_B
            )
            pools.append(in_batch)
            # The positive is a member of the in-batch pool: corrected like its columns.
            log_q_pos = in_batch_log_q_pos
        elif sampled_item_SD is not None and self._logq:
            assert self.sampler is not None
            log_q_pos = self.sampler.log_expected_count(pos_item_idx_B, sampled_item_SD.shape[0])
        if not pools:
            raise ValueError(f"loss {self.config.name} got no negatives in this batch")
        neg_scores_BN, neg_weights_BN, log_q_neg_BN = _concat(pools)
        kwargs = dict(self.hyperparameters, neg_weights=neg_weights_BN)
        if self.family == "listwise":
            kwargs.update(log_q_pos=log_q_pos, log_q_neg=log_q_neg_BN)
        return self.loss(pos_scores_B, neg_scores_BN, **kwargs)

    # -- pools ---------------------------------------------------------------------------------

    @property
    def _logq(self) -> bool:
        return self.config.logq_correction and self.family == "listwise"

    def _user_positive_hits(self, user_idx_B: Tensor | None, item_idx: Tensor) -> Tensor | None:
        """bool [B, N]: negative ``item_idx`` is a train positive of the row's user; None when
        ``mask_user_positives`` is off."""
        if not self.config.mask_user_positives:
            return None
        if self.user_positives is None:
            raise ValueError(
                "loss.mask_user_positives needs the train (user, item) pairs: "
                "build_task(user_positives=...)"
            )
        if user_idx_B is None:
            raise ValueError("loss.mask_user_positives needs each row's user: pass user_idx_B")
        return self.user_positives.contains(user_idx_B, item_idx)

    def _data_pool(
        self, user_BD, pos_item_idx_B, neg_item_BND, neg_item_idx_BN, neg_source_BN, user_idx_B
    ):
        if not self.config.use_data_negatives or neg_item_BND is None or neg_item_BND.shape[1] == 0:
            return None
        scores_BN = self.similarity.negatives(user_BD, neg_item_BND)
        weights_BN = torch.ones_like(scores_BN)
        if self.config.accidental_hit_masking and neg_item_idx_BN is not None:
            weights_BN = weights_BN.masked_fill(
                negatives.accidental_hits(pos_item_idx_B, neg_item_idx_BN), 0.0
            )
        if neg_item_idx_BN is not None:
            false_negatives = self._user_positive_hits(user_idx_B, neg_item_idx_BN)
            if false_negatives is not None:
                weights_BN = weights_BN.masked_fill(false_negatives, 0.0)
        if neg_source_BN is not None:
            weights_BN = weights_BN * negatives.source_weights(
                self.source_weight_table, neg_source_BN
            )
        scores_BN, weights_BN = negatives.hard_negative_top_k(
            scores_BN, weights_BN, k=self.config.hard_negative_top_k
        )
        log_q = torch.zeros_like(scores_BN) if self._logq else None
        return _Pool(scores_BN, weights_BN, log_q)

    def _sampled_pool(
        self, user_BD, pos_item_idx_B, sampled_item_SD, sampled_item_idx_S, user_idx_B
    ):
        if sampled_item_SD is None or sampled_item_SD.shape[0] == 0:
            return None
        if sampled_item_idx_S is None:
            raise ValueError("sampled_item_SD needs sampled_item_idx_S")
        scores_BS = self.similarity.matrix(user_BD, sampled_item_SD)
        weights_BS = torch.ones_like(scores_BS)
        if self.config.accidental_hit_masking:
            weights_BS = weights_BS.masked_fill(
                negatives.accidental_hits(pos_item_idx_B, sampled_item_idx_S), 0.0
            )
        false_negatives = self._user_positive_hits(user_idx_B, sampled_item_idx_S)
        if false_negatives is not None:
            weights_BS = weights_BS.masked_fill(false_negatives, 0.0)
        log_q = None
        if self._logq:
            if self.sampler is None:
                raise ValueError(
                    "logQ for sampled negatives needs item counts: build_task(item_counts=...)"
                )
            log_q = self.sampler.log_expected_count(sampled_item_idx_S, sampled_item_idx_S.numel())
        return _Pool(scores_BS, weights_BS, log_q)

    def _gathered_items(
        self, pos_item_BD: Tensor, pos_item_idx_B: Tensor
    ) -> tuple[Tensor, Tensor, int]:
        """In-batch columns: ([C, D] embeddings, [C] item indices, column of row 0's positive)."""
        if not self.config.gather_across_workers:
            return pos_item_BD, pos_item_idx_B, 0
        items_CD, offset = all_gather_with_offset(pos_item_BD)
        item_idx_C, _ = all_gather_with_offset(pos_item_idx_B)
        return items_CD, item_idx_C, offset

    def _in_batch_log_q(self, item_idx_C: Tensor) -> Tensor | None:
        if not self._logq:
            return None
        if self.click_log_p is None:
            raise ValueError("loss.logq_correction needs item counts: build_task(item_counts=...)")
        if self.click_log_p.device != item_idx_C.device:
            # Moved once: the table is [I] and this runs every step.
            self.click_log_p = self.click_log_p.to(item_idx_C.device)
        return in_batch_log_q(self.click_log_p, item_idx_C)

    def _in_batch_pool(
        self, user_BD, pos_item_BD, pos_item_idx_B, user_idx_B
    ) -> tuple[_Pool, Tensor | None]:
        """(in-batch columns as negatives [B, C], the [B] log q of the rows' own positives)."""
        items_CD, item_idx_C, offset = self._gathered_items(pos_item_BD, pos_item_idx_B)
        scores_BC = self.similarity.matrix(user_BD, items_CD)
        num_rows = user_BD.shape[0]
        rows = torch.arange(num_rows, device=user_BD.device)
        weights_BC = torch.ones_like(scores_BC)
        # The row's own positive is not its negative.
        weights_BC[rows, rows + offset] = 0.0
        if self.config.accidental_hit_masking:
            hits = negatives.in_batch_hits(item_idx_C, num_rows=num_rows, positive_offset=offset)
            weights_BC = weights_BC.masked_fill(hits, 0.0)
        false_negatives = self._user_positive_hits(user_idx_B, item_idx_C)
        if false_negatives is not None:
            # The own positive's column is already 0: it is not a negative either way.
            weights_BC = weights_BC.masked_fill(false_negatives, 0.0)
        log_q_C = self._in_batch_log_q(item_idx_C)
        log_q_pos = None if log_q_C is None else log_q_C[offset : offset + num_rows]
        return _Pool(scores_BC, weights_BC, log_q_C), log_q_pos

    def _in_batch_softmax(
        self, user_BD, pos_item_BD, pos_item_idx_B, pools: list[_Pool], user_idx_B
    ) -> Tensor:
        items_CD, item_idx_C, offset = self._gathered_items(pos_item_BD, pos_item_idx_B)
        extra_scores = extra_weights = extra_log_q = None
        if pools:
            extra_scores, extra_weights, extra_log_q = _concat(pools)
        masking_ids = item_idx_C if self.config.accidental_hit_masking else None
        gathered = items_CD.shape[0] != user_BD.shape[0] or offset != 0
        loss = in_batch_softmax(
            self.similarity.matrix(user_BD, items_CD),
            temperature=self.config.temperature,
            log_q=self._in_batch_log_q(item_idx_C),
            item_ids=masking_ids,
            symmetric=self.config.symmetric and not gathered,
            positive_offset=offset,
            extra_scores=extra_scores,
            extra_log_q=extra_log_q,
            extra_weights=extra_weights,
            excluded=self._user_positive_hits(user_idx_B, item_idx_C),
        )
        if not (self.config.symmetric and gathered):
            return loss
        # Item → user over every worker's users: the local items are the rows.
        users_CD, _ = all_gather_with_offset(user_BD)
        excluded = None
        if self.config.mask_user_positives:
            # [B local items, C users]: item b is a train positive of gathered user c.
            user_idx_C, _ = all_gather_with_offset(user_idx_B)
            excluded = self._user_positive_hits(user_idx_C, pos_item_idx_B).T
        reverse = in_batch_softmax(
            self.similarity.matrix(pos_item_BD, users_CD),
            temperature=self.config.temperature,
            item_ids=masking_ids,
            positive_offset=offset,
            excluded=excluded,
        )
        return 0.5 * (loss + reverse)


def _concat(pools: list[_Pool]) -> tuple[Tensor, Tensor, Tensor | None]:
    """Pools side by side: ([B, ΣN] scores, [B, ΣN] weights, [B, ΣN] log q or None)."""
    num_rows = pools[0].scores_BN.shape[0]
    scores = torch.cat([p.scores_BN for p in pools], dim=1)
    weights = torch.cat([p.weights_BN for p in pools], dim=1)
    if all(p.log_q is None for p in pools):
        return scores, weights, None
    log_q = torch.cat(
        [
            torch.zeros_like(p.scores_BN)
            if p.log_q is None
            else p.log_q.to(p.scores_BN.dtype).expand(num_rows, -1)
            for p in pools
        ],
        dim=1,
    )
    return scores, weights, log_q


def build_task(
    loss_config: LossConfig,
    *,
    item_counts: Tensor | None = None,
    in_batch_negatives: bool | None = None,
    user_positives: negatives.UserPositives | None = None,
) -> RetrievalTask:
    """A ``RetrievalTask`` for ``loss_config``.

    Args:
        loss_config: which loss, similarity and negatives.
        item_counts: [I] click count of every catalog item (the dataset's vocab counts): the
            catalog sampler (α = ``sampler_alpha``) and the in-batch logQ (α = 1) come from it.
        in_batch_negatives: losses other than in_batch_softmax: add in-batch columns as
            negatives (None = only for a batch with no other negatives).
        user_positives: the train (user, item) pairs; needed by ``loss.mask_user_positives``.
    """
    name = loss_config.name
    family = loss_family(name)
    sim = similarity(loss_config.similarity)
    if item_counts is None:
        if loss_config.num_sampled_negatives > 0:
            raise ValueError(
                "loss.num_sampled_negatives > 0 needs item counts: build_task(item_counts=...)"
            )
        if name == "in_batch_softmax" and loss_config.logq_correction:
            raise ValueError("loss.logq_correction needs item counts: build_task(item_counts=...)")
    if loss_config.mask_user_positives and user_positives is None:
        raise ValueError(
            "loss.mask_user_positives needs the train (user, item) pairs: "
            "build_task(user_positives=...)"
        )
    sampler = click_log_p = None
    if item_counts is not None:
        counts = torch.as_tensor(item_counts)
        sampler = CatalogSampler(counts, alpha=loss_config.sampler_alpha)
        click_log_p = log_q_from_counts(counts, loss_config.logq_exponent).to(torch.float32)
    return RetrievalTask(
        config=loss_config,
        similarity=sim,
        loss=loss_fn(name),
        family=family,
        hyperparameters=hyperparameters(name, loss_config),
        sampler=sampler,
        click_log_p=click_log_p,
        source_weight_table=negatives.source_weight_table(loss_config.source_weights),
        in_batch_negatives=in_batch_negatives,
        user_positives=user_positives,
    )
