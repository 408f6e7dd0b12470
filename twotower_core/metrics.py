"""Full-catalog retrieval metrics, computed in blocks so no [users, items] matrix is ever built.

Legend: U users evaluated, I catalog items, D embedding dim, K = max(ks), u / i a block of
users / items.

For each user every catalog item is scored, the user's train positives are excluded from the
ranking, and the top K are compared with the user's held-out items (the targets):

- targets: the user's held-out items, each once, minus those that are also train positives
  (they were excluded from the ranking, so they could never be retrieved). Users with no target
  left are skipped; every metric is a mean over the remaining users (``eval_users``).
- ``recall@k`` = |top-k ∩ targets| / |targets|
- ``recall_capped@k`` = |top-k ∩ targets| / min(k, |targets|): recall whose denominator is
  what top-k could hold at best, so a user with more than k targets can reach 1 (Liang et al.,
  "Variational Autoencoders for Collaborative Filtering", WWW 2018; the EASE paper's Recall@k)
- ``hit_rate@k`` = 1 if top-k ∩ targets is non-empty
- ``ndcg@k`` = Σ_{r<k, item r is a target} 1/log2(r + 2)  /  Σ_{r < min(k, |targets|)} 1/log2(r + 2)
- ``mrr`` = 1 / rank of the best-scored target in the full ranking (not cut at K):
  rank = 1 + the number of non-excluded, non-target items scored strictly higher (ties count
  in the target's favour).
- ``coverage@k`` = |∪ over users of top-k| / I: how much of the catalog gets recommended at all.

Memory is O(u·i + u·K + I + nnz): users go through in blocks of ``user_chunk_size``, items in
blocks of ``item_chunk_size``, keeping a running top K per user of the block.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from twotower_core.similarity import similarity as get_similarity


def metric_names(ks: tuple[int, ...] | list[int]) -> list[str]:
    """The metrics an evaluation with these cut-offs reports (valid metric config values)."""
    names = [
        f"{name}@{k}"
        for name in ("recall", "recall_capped", "hit_rate", "ndcg", "coverage")
        for k in ks
    ]
    return sorted(names) + ["mrr"]

def _as_long(values: Tensor | np.ndarray, device: torch.device) -> Tensor:
    return torch.as_tensor(np.asarray(values) if not isinstance(values, Tensor) else values).to(
        device=device, dtype=torch.long
    )


def _csr_keys(indptr: Tensor, items: Tensor, num_users: int, num_items: int, name: str) -> Tensor:
    """Sorted unique ``user * I + item`` keys of a CSR of item indices per user."""
    if indptr.numel() != num_users + 1:
        raise ValueError(
            f"{name}_indptr has {indptr.numel()} entries, expected {num_users + 1} (users + 1)"
        )
    if items.numel() != int(indptr[-1]):
        raise ValueError(
            f"{name}_items has {items.numel()} entries, {name}_indptr ends at {int(indptr[-1])}"
        )
    if items.numel() and (int(items.min()) < 0 or int(items.max()) >= num_items):
        raise ValueError(f"{name}_items holds item indices outside [0, {num_items})")
    users = torch.repeat_interleave(torch.arange(num_users, device=items.device), indptr.diff())
    return torch.unique(users * num_items + items)


@torch.no_grad()
def retrieval_metrics(
    user_UD: Tensor,
    item_ID: Tensor,
    *,
    similarity: str,
    eval_indptr: Tensor | np.ndarray,
    eval_items: Tensor | np.ndarray,
    exclude_indptr: Tensor | np.ndarray | None = None,
    exclude_items: Tensor | np.ndarray | None = None,
    ks: Sequence[int] = (10, 50, 100),
    user_chunk_size: int = 512,
    item_chunk_size: int = 65536,
) -> dict[str, float]:
    """Recall, capped recall, HitRate, NDCG at each k, MRR and coverage over the full catalog.

    Args:
        user_UD: [U, D] embeddings of the users to evaluate.
        item_ID: [I, D] embeddings of every catalog item (row = dense item index).
        similarity: a ``SIMILARITIES`` name; higher scores rank first.
        eval_indptr: [U + 1] CSR offsets of each user's held-out items, aligned to ``user_UD``.
        eval_items: [nnz] held-out item indices.
        exclude_indptr: [U + 1] CSR offsets of each user's train positives (None = exclude none).
        exclude_items: [nnz'] train positive item indices.
        ks: cut-offs; keys come out as ``recall@10``, ``recall_capped@10``, ``hit_rate@10``,
            ``ndcg@10``, ``coverage@10``.
        user_chunk_size: users scored per block.
        item_chunk_size: items scored per block.

    Returns:
        {metric: value} plus ``mrr`` and ``eval_users`` (how many users the means are over).
    """
    metrics, _, _ = _evaluate(
        user_UD, item_ID, similarity=similarity, eval_indptr=eval_indptr,
        eval_items=eval_items, exclude_indptr=exclude_indptr, exclude_items=exclude_items, ks=ks,
        user_chunk_size=user_chunk_size, item_chunk_size=item_chunk_size, keep_per_user=False,
    )  # fmt: skip
    return metrics


@torch.no_grad()
def per_user_metrics(
    user_UD: Tensor,
    item_ID: Tensor,
    *,
    similarity: str,
    eval_indptr: Tensor | np.ndarray,
    eval_items: Tensor | np.ndarray,
    exclude_indptr: Tensor | np.ndarray | None = None,
    exclude_items: Tensor | np.ndarray | None = None,
    ks: Sequence[int] = (10, 50, 100),
    user_chunk_size: int = 512,
    item_chunk_size: int = 65536,
) -> tuple[dict[str, float], Tensor, dict[str, Tensor]]:
    """``retrieval_metrics`` with the per-user values behind its means, for paired comparisons.

    Same arguments as ``retrieval_metrics``; one pass over the catalog. Returns (the metrics
    ``retrieval_metrics`` returns, [E] indices of the evaluated users in ascending order,
    {metric: [E] float64}) with ``recall@k``, ``recall_capped@k``, ``hit_rate@k``, ``ndcg@k``
    and ``reciprocal_rank`` (whose mean is ``mrr``). Coverage is a catalog-level figure and has
    no per-user value.
    """
    metrics, users_E, values = _evaluate(
        user_UD, item_ID, similarity=similarity, eval_indptr=eval_indptr,
        eval_items=eval_items, exclude_indptr=exclude_indptr, exclude_items=exclude_items, ks=ks,
        user_chunk_size=user_chunk_size, item_chunk_size=item_chunk_size, keep_per_user=True,
    )  # fmt: skip
    assert users_E is not None and values is not None
    return metrics, users_E, values


def _evaluate(
    user_UD: Tensor,
    item_ID: Tensor,
    *,
    keep_per_user: bool,
    ks: Sequence[int],
    **blocks_kwargs,
) -> tuple[dict[str, float], Tensor | None, dict[str, Tensor] | None]:
    """(means, and with ``keep_per_user`` the evaluated users and their per-user values)."""
    _check_ks(ks)
    num_items = item_ID.shape[0]
    max_k = min(max(ks), num_items)
    device = user_UD.device
    keys = _per_user_keys(ks)
    sums = dict.fromkeys(keys, 0.0)
    users: list[Tensor] = []
    parts: dict[str, list[Tensor]] = {key: [] for key in keys}
    count = 0
    # best_rank_I[i] = the best rank item i reached in any user's top K (K = never).
    best_rank_I = torch.full((num_items,), max_k, dtype=torch.long, device=device)
    for users_u, top_uK, per_user in _scored_blocks(user_UD, item_ID, ks=ks, **blocks_kwargs):
        count += users_u.numel()
        for key, values_u in per_user.items():
            sums[key] += float(values_u.sum())
        if keep_per_user:
            users.append(users_u)
            for key, values_u in per_user.items():
                parts[key].append(values_u)
        valid_uK = top_uK >= 0
        ranks_uK = torch.arange(max_k, device=device).expand_as(top_uK)
        best_rank_I.scatter_reduce_(0, top_uK[valid_uK], ranks_uK[valid_uK], reduce="amin")

    metrics = {key: value / count if count else 0.0 for key, value in sums.items()}
    metrics["mrr"] = metrics.pop("reciprocal_rank")
    for k in ks:
        metrics[f"coverage@{k}"] = (
            float((best_rank_I < min(k, max_k)).sum()) / max(num_items, 1) if count else 0.0
        )
    metrics["eval_users"] = float(count)
    if not keep_per_user:
        return metrics, None, None
    empty = torch.empty(0, dtype=torch.float64, device=device)
    return (
        metrics,
        torch.cat(users) if users else torch.empty(0, dtype=torch.long, device=device),
        {key: torch.cat(values) if values else empty for key, values in parts.items()},
    )


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of cut-offs >= 1, got {list(ks)}")


def _per_user_keys(ks: Sequence[int]) -> list[str]:
    return [
        f"{name}@{k}" for k in ks for name in ("recall", "recall_capped", "hit_rate", "ndcg")
    ] + ["reciprocal_rank"]


def _scored_blocks(
    user_UD: Tensor,
    item_ID: Tensor,
    *,
    similarity: str,
    eval_indptr: Tensor | np.ndarray,
    eval_items: Tensor | np.ndarray,
    exclude_indptr: Tensor | np.ndarray | None,
    exclude_items: Tensor | np.ndarray | None,
    ks: Sequence[int],
    user_chunk_size: int,
    item_chunk_size: int,
) -> Iterator[tuple[Tensor, Tensor, dict[str, Tensor]]]:
    """Per block of evaluated users: ([u] user indices, [u, K] top items (−1 = none left),
    {metric: [u] float64 per-user value}); users without a target are skipped."""
    score_matrix = get_similarity(similarity).matrix
    score_pairs = get_similarity(similarity).pairs
    device = user_UD.device
    num_users, num_items = user_UD.shape[0], item_ID.shape[0]
    item_ID = item_ID.to(device)
    max_k = min(max(ks), num_items)

    target_keys = _csr_keys(
        _as_long(eval_indptr, device), _as_long(eval_items, device), num_users, num_items, "eval"
    )
    if exclude_indptr is None or exclude_items is None:
        exclude_keys = target_keys[:0]
    else:
        exclude_keys = _csr_keys(
            _as_long(exclude_indptr, device),
            _as_long(exclude_items, device),
            num_users,
            num_items,
            "exclude",
        )
    target_keys = target_keys[~torch.isin(target_keys, exclude_keys)]
    num_targets_U = torch.bincount(target_keys // num_items, minlength=num_users)
    eval_users = torch.nonzero(num_targets_U > 0).squeeze(1)

    discount_K = 1.0 / torch.log2(torch.arange(max_k, device=device, dtype=torch.float64) + 2.0)
    ideal_K = discount_K.cumsum(0)  # ideal DCG with r+1 targets, r < K

    for start in range(0, eval_users.numel(), user_chunk_size):
        users_u = eval_users[start : start + user_chunk_size]
        top_uK, rank_u = _rank_user_block(
            user_UD[users_u],
            users_u,
            item_ID,
            score_matrix=score_matrix,
            score_pairs=score_pairs,
            target_keys=target_keys,
            exclude_keys=exclude_keys,
            max_k=max_k,
            item_chunk_size=item_chunk_size,
        )
        valid_uK = top_uK >= 0
        hits_uK = (
            torch.isin(users_u.unsqueeze(1) * num_items + top_uK, target_keys) & valid_uK
        ).to(torch.float64)
        num_targets_u = num_targets_U[users_u].to(torch.float64)
        per_user: dict[str, Tensor] = {}
        for k in ks:
            kk = min(k, max_k)
            hits_u = hits_uK[:, :kk].sum(1)
            per_user[f"recall@{k}"] = hits_u / num_targets_u
            per_user[f"recall_capped@{k}"] = hits_u / num_targets_u.clamp_max(kk)
            per_user[f"hit_rate@{k}"] = (hits_u > 0).to(torch.float64)
            dcg_u = (hits_uK[:, :kk] * discount_K[:kk]).sum(1)
            ideal_u = ideal_K[(num_targets_u.clamp_max(kk) - 1).long()]
            per_user[f"ndcg@{k}"] = dcg_u / ideal_u
        per_user["reciprocal_rank"] = 1.0 / rank_u.to(torch.float64)
        yield users_u, top_uK, per_user


def _rank_user_block(
    user_uD: Tensor,
    users_u: Tensor,
    item_ID: Tensor,
    *,
    score_matrix,
    score_pairs,
    target_keys: Tensor,
    exclude_keys: Tensor,
    max_k: int,
    item_chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """([u, K] top item indices (−1 = none left), [u] full-catalog rank of each user's best target)."""
    num_items = item_ID.shape[0]
    device = user_uD.device
    num_rows = users_u.numel()

    def block_pairs(keys: Tensor) -> tuple[Tensor, Tensor]:
        """(row in block, item) of the keys belonging to this block's users, sorted by item."""
        # users_u is sorted, so the block's keys lie in one range (with skipped users' among them).
        lo = int(torch.searchsorted(keys, users_u[:1] * num_items).sum())
        hi = int(torch.searchsorted(keys, (users_u[-1:] + 1) * num_items).sum())
        picked = keys[lo:hi]
        key_users = picked // num_items
        rows = torch.searchsorted(users_u, key_users).clamp_max(num_rows - 1)
        mine = users_u[rows] == key_users
        rows, items = rows[mine], picked[mine] % num_items
        order = torch.argsort(items)
        return rows[order], items[order]

    exclude_rows, exclude_cols = block_pairs(exclude_keys)
    target_rows, target_cols = block_pairs(target_keys)
    # Best target score per user: the threshold of its full-catalog rank.
    target_scores = score_pairs(user_uD[target_rows], item_ID[target_cols])
    threshold_u = torch.full((num_rows,), -math.inf, dtype=target_scores.dtype, device=device)
    threshold_u.scatter_reduce_(0, target_rows, target_scores, reduce="amax")

    higher_u = torch.zeros(num_rows, dtype=torch.long, device=device)
    top_scores = torch.empty((num_rows, 0), dtype=user_uD.dtype, device=device)
    top_items = torch.empty((num_rows, 0), dtype=torch.long, device=device)
    for start in range(0, num_items, item_chunk_size):
        stop = min(start + item_chunk_size, num_items)
        scores_ui = score_matrix(user_uD, item_ID[start:stop])
        lo, hi = (
            int(x)
            for x in torch.searchsorted(exclude_cols, torch.tensor([start, stop], device=device))
        )
        scores_ui[exclude_rows[lo:hi], exclude_cols[lo:hi] - start] = -math.inf
        above_ui = scores_ui > threshold_u.unsqueeze(1)
        lo, hi = (
            int(x)
            for x in torch.searchsorted(target_cols, torch.tensor([start, stop], device=device))
        )
        # Targets never count against their own rank.
        above_ui[target_rows[lo:hi], target_cols[lo:hi] - start] = False
        # Summing bools as bytes into int32 is ~2x faster on CPU than the default int64 sum.
        higher_u += above_ui.view(torch.uint8).sum(1, dtype=torch.int32)
        chunk_top = scores_ui.topk(min(max_k, stop - start), dim=1, sorted=False)
        merged_scores = torch.cat([top_scores, chunk_top.values], dim=1)
        merged_items = torch.cat([top_items, chunk_top.indices + start], dim=1)
        keep = merged_scores.topk(min(max_k, merged_scores.shape[1]), dim=1)
        top_scores, top_items = keep.values, merged_items.gather(1, keep.indices)
    # A user with fewer than K rankable items gets excluded ones (−inf) at the tail: mark them.
    top_items = top_items.masked_fill(top_scores == -math.inf, -1)
    return top_items, higher_u + 1


def popularity_embeddings(
    item_counts_I: Tensor | np.ndarray, num_users: int
) -> tuple[Tensor, Tensor]:
    """The MostPop baseline as embeddings for ``retrieval_metrics(..., similarity="dot")``.

    Returns ([U, 1] ones, [I, 1] item scores): item scores follow the click counts, equal counts
    broken by the lower index, so every user gets the same deterministic popularity ranking.
    """
    counts = np.asarray(item_counts_I.cpu() if isinstance(item_counts_I, Tensor) else item_counts_I)
    # Position in the (count desc, index asc) order → score I − position: no two items tie.
    order = np.lexsort((np.arange(len(counts)), -counts.astype(np.float64)))
    scores = np.empty(len(counts), dtype=np.float64)
    scores[order] = len(counts) - np.arange(len(counts))
    return torch.ones(num_users, 1, dtype=torch.float64), torch.from_numpy(scores).reshape(-1, 1)
