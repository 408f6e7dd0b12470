"""Chunked full-catalog metrics against hand-worked cases and a naive full-matrix reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower_core.metrics import per_user_metrics, popularity_embeddings, retrieval_metrics
from twotower_core.similarity import SIMILARITIES, similarity


def csr(lists):
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    items = np.array([i for x in lists for i in x], dtype=np.int64)
    return indptr, items


def one_dim_items(scores):
    """Items embedded in 1-D so that a user (1.0) scores each exactly its value under dot."""
    return torch.ones(1, 1, dtype=torch.float64), torch.tensor(scores, dtype=torch.float64).view(
        -1, 1
    )


def test_hand_worked_single_user():
    # Item scores 5, 4, 3, 2, 1. Train positive: item 0 (excluded). Held out: items 2 and 4.
    # Ranking without item 0: 1, 2, 3, 4. Top 2 = (1, 2): one of the 2 targets.
    user, items = one_dim_items([5.0, 4.0, 3.0, 2.0, 1.0])
    eval_indptr, eval_items = csr([[2, 4]])
    exclude_indptr, exclude_items = csr([[0]])
    m = retrieval_metrics(
        user,
        items,
        similarity="dot",
        eval_indptr=eval_indptr,
        eval_items=eval_items,
        exclude_indptr=exclude_indptr,
        exclude_items=exclude_items,
        ks=(2, 4),
    )
    assert m["recall@2"] == pytest.approx(1 / 2)
    # Capped recall: 1 hit out of min(2, 2 targets) = 1/2; recall@1 below differs.
    assert m["recall_capped@2"] == pytest.approx(1 / 2)
    assert m["hit_rate@2"] == 1.0
    # DCG@2 = 1/log2(3) (hit at rank 2); IDCG@2 = 1 + 1/log2(3) (2 targets): 0.630930 / 1.630930.
    assert m["ndcg@2"] == pytest.approx(0.3868528, abs=1e-6)
    # Top 4 = every rankable item: both targets, at ranks 2 and 4.
    assert m["recall@4"] == 1.0
    assert m["ndcg@4"] == pytest.approx(
        (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    )
    # Best target is item 2 at rank 2.
    assert m["mrr"] == pytest.approx(1 / 2)
    assert m["coverage@2"] == pytest.approx(2 / 5)
    assert m["eval_users"] == 1.0


def test_capped_recall_divides_by_what_top_k_can_hold():
    # Scores 4, 3, 2, 1; targets items 0, 1, 3. Top 1 = (0): recall 1/3, capped 1/min(1, 3) = 1.
    # Top 2 = (0, 1): recall 2/3, capped 2/2. Top 4: all 3 targets, both 1.
    user, items = one_dim_items([4.0, 3.0, 2.0, 1.0])
    eval_indptr, eval_items = csr([[0, 1, 3]])
    m = retrieval_metrics(
        user, items, similarity="dot", eval_indptr=eval_indptr, eval_items=eval_items, ks=(1, 2, 4)
    )
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall_capped@1"] == 1.0
    assert m["recall@2"] == pytest.approx(2 / 3) and m["recall_capped@2"] == 1.0
    assert m["recall@4"] == 1.0 and m["recall_capped@4"] == 1.0


def test_mrr_is_over_the_full_catalog_not_cut_at_k():
    # 40 items scored 40..1; the only target is item 29 (score 11): 29 items score higher → rank 30.
    user, items = one_dim_items([float(40 - i) for i in range(40)])
    eval_indptr, eval_items = csr([[29]])
    m = retrieval_metrics(
        user, items, similarity="dot", eval_indptr=eval_indptr, eval_items=eval_items, ks=(10,)
    )
    assert m["recall@10"] == 0.0
    assert m["mrr"] == pytest.approx(1 / 30)


def test_targets_that_are_train_positives_and_duplicates():
    user, items = one_dim_items([3.0, 2.0, 1.0])
    # User 0: held out item 0 twice and item 1; item 0 is a train positive → the target is {1}.
    # User 1: held out only item 2, which is a train positive → skipped.
    user = user.expand(2, 1)
    eval_indptr, eval_items = csr([[0, 0, 1], [2]])
    exclude_indptr, exclude_items = csr([[0], [2]])
    m = retrieval_metrics(
        user,
        items,
        similarity="dot",
        eval_indptr=eval_indptr,
        eval_items=eval_items,
        exclude_indptr=exclude_indptr,
        exclude_items=exclude_items,
        ks=(1,),
    )
    assert m["eval_users"] == 1.0
    assert m["recall@1"] == 1.0 and m["mrr"] == 1.0


def test_no_eval_users_gives_zeros():
    user, items = one_dim_items([1.0, 2.0])
    m = retrieval_metrics(user, items, similarity="dot", eval_indptr=[0, 0], eval_items=[], ks=(1,))
    assert m == {
        "recall@1": 0.0,
        "recall_capped@1": 0.0,
        "hit_rate@1": 0.0,
        "ndcg@1": 0.0,
        "mrr": 0.0,
        "coverage@1": 0.0,
        "eval_users": 0.0,
    }


def test_k_beyond_the_catalog_and_fully_excluded_tail():
    # 3 items, user has 2 train positives: only 1 rankable item; K = 10 must not count the
    # excluded ones as recommendations.
    user, items = one_dim_items([1.0, 2.0, 3.0])
    m = retrieval_metrics(
        user,
        items,
        similarity="dot",
        eval_indptr=[0, 1],
        eval_items=[0],
        exclude_indptr=[0, 2],
        exclude_items=[1, 2],
        ks=(10,),
    )
    assert m["recall@10"] == 1.0 and m["ndcg@10"] == 1.0 and m["mrr"] == 1.0
    assert m["coverage@10"] == pytest.approx(1 / 3)


def naive_metrics(user, items, sim_name, eval_lists, exclude_lists, ks):
    scores = similarity(sim_name).matrix(user, items)  # the full [U, I] matrix, fine when tiny
    sums = {f"{n}@{k}": 0.0 for k in ks for n in ("recall", "recall_capped", "hit_rate", "ndcg")}
    sums["mrr"] = 0.0
    covered = {k: set() for k in ks}
    users = 0
    for u in range(user.shape[0]):
        excluded = set(exclude_lists[u])
        targets = set(eval_lists[u]) - excluded
        if not targets:
            continue
        users += 1
        ranking = [
            i
            for i in sorted(range(items.shape[0]), key=lambda i: -scores[u, i].item())
            if i not in excluded
        ]
        first = next(r for r, i in enumerate(ranking) if i in targets)
        sums["mrr"] += 1 / (first + 1)
        for k in ks:
            top = ranking[:k]
            covered[k].update(top)
            hits = [1.0 if i in targets else 0.0 for i in top]
            sums[f"recall@{k}"] += sum(hits) / len(targets)
            sums[f"recall_capped@{k}"] += sum(hits) / min(k, len(targets))
            sums[f"hit_rate@{k}"] += float(sum(hits) > 0)
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(targets))))
            sums[f"ndcg@{k}"] += dcg / idcg
    out = {key: value / users for key, value in sums.items()}
    out.update({f"coverage@{k}": len(covered[k]) / items.shape[0] for k in ks})
    out["eval_users"] = float(users)
    return out


@pytest.mark.parametrize("sim_name", sorted(SIMILARITIES))
@settings(derandomize=True, max_examples=12, deadline=None)
@given(
    num_users=st.integers(1, 9),
    num_items=st.integers(2, 23),
    seed=st.integers(0, 10_000),
    user_chunk=st.integers(1, 4),
    item_chunk=st.integers(1, 8),
)
def test_chunked_equals_naive_reference(
    sim_name, num_users, num_items, seed, user_chunk, item_chunk
):
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    user = torch.randn(num_users, 3, generator=generator, dtype=torch.float64)
    items = torch.randn(num_items, 3, generator=generator, dtype=torch.float64)
    eval_lists = [list(rng.integers(0, num_items, rng.integers(0, 4))) for _ in range(num_users)]
    exclude_lists = [list(rng.integers(0, num_items, rng.integers(0, 4))) for _ in range(num_users)]
    ks = (1, 3, 5)
    got = retrieval_metrics(
        user,
        items,
        similarity=sim_name,
        eval_indptr=csr(eval_lists)[0],
        eval_items=csr(eval_lists)[1],
        exclude_indptr=csr(exclude_lists)[0],
        exclude_items=csr(exclude_lists)[1],
        ks=ks,
        user_chunk_size=user_chunk,
        item_chunk_size=item_chunk,
    )
    expected = (
        naive_metrics(user, items, sim_name, eval_lists, exclude_lists, ks)
        if any(set(e) - set(x) for e, x in zip(eval_lists, exclude_lists))
        else None
    )
    if expected is None:
        assert got["eval_users"] == 0.0
        return
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key


def test_popularity_baseline_through_the_same_function():
    counts = np.array([5, 50, 0, 20, 10])
    user, items = popularity_embeddings(counts, num_users=2)
    # Most popular order: 1, 3, 4, 0, 2. User 0 held out item 3 (rank 2); user 1 item 2 (rank 5),
    # but user 1's train positive item 1 is excluded, so item 2 climbs to rank 4.
    m = retrieval_metrics(
        user,
        items,
        similarity="dot",
        eval_indptr=[0, 1, 2],
        eval_items=[3, 2],
        exclude_indptr=[0, 0, 1],
        exclude_items=[1],
        ks=(2,),
    )
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    # Top 2: user 0 → (1, 3), user 1 → (3, 4): 3 distinct of 5 items.
    assert m["coverage@2"] == pytest.approx(3 / 5)


def test_popularity_ties_break_by_index():
    _, items = popularity_embeddings(torch.tensor([3, 7, 3, 0, 7]), num_users=1)
    # Order: item 1 (7), item 4 (7), item 0 (3), item 2 (3), item 3 (0).
    assert items.view(-1).argsort(descending=True).tolist() == [1, 4, 0, 2, 3]


def test_bad_csr_names_the_argument():
    user, items = one_dim_items([1.0, 2.0])
    with pytest.raises(ValueError, match="eval_indptr has 3 entries, expected 2"):
        retrieval_metrics(user, items, similarity="dot", eval_indptr=[0, 1, 1], eval_items=[0])
    with pytest.raises(ValueError, match="exclude_items holds item indices outside"):
        retrieval_metrics(
            user,
            items,
            similarity="dot",
            eval_indptr=[0, 1],
            eval_items=[0],
            exclude_indptr=[0, 1],
            exclude_items=[7],
        )
    with pytest.raises(ValueError, match="unknown similarity"):
        retrieval_metrics(user, items, similarity="l1", eval_indptr=[0, 1], eval_items=[0])


def test_per_user_values_of_a_hand_worked_case():
    # Scores 5, 4, 3, 2, 1 for every user. User 0: train item 0 excluded, targets 2 and 4.
    # User 1: no target (skipped). User 2: target 0, ranked first.
    user = torch.ones(3, 1, dtype=torch.float64)
    _, items = one_dim_items([5.0, 4.0, 3.0, 2.0, 1.0])
    _, users, values = per_user_metrics(
        user,
        items,
        similarity="dot",
        eval_indptr=csr([[2, 4], [], [0]])[0],
        eval_items=csr([[2, 4], [], [0]])[1],
        exclude_indptr=csr([[0], [], []])[0],
        exclude_items=csr([[0], [], []])[1],
        ks=(2,),
    )
    assert users.tolist() == [0, 2]
    # User 0 ranks 1, 2, 3, 4: item 2 at rank 2 is the one hit in the top 2.
    assert values["recall@2"].tolist() == [0.5, 1.0]
    assert values["hit_rate@2"].tolist() == [1.0, 1.0]
    assert values["ndcg@2"].tolist() == pytest.approx(
        [(1 / math.log2(3)) / (1 + 1 / math.log2(3)), 1.0]
    )
    assert values["reciprocal_rank"].tolist() == [0.5, 1.0]


@settings(derandomize=True, max_examples=12, deadline=None)
@given(
    num_users=st.integers(1, 9),
    num_items=st.integers(2, 23),
    seed=st.integers(0, 10_000),
    user_chunk=st.integers(1, 4),
)
def test_per_user_values_average_to_retrieval_metrics(num_users, num_items, seed, user_chunk):
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    user = torch.randn(num_users, 3, generator=generator, dtype=torch.float64)
    items = torch.randn(num_items, 3, generator=generator, dtype=torch.float64)
    eval_lists = [list(rng.integers(0, num_items, rng.integers(0, 4))) for _ in range(num_users)]
    exclude_lists = [list(rng.integers(0, num_items, rng.integers(0, 3))) for _ in range(num_users)]
    kwargs = dict(
        similarity="dot",
        eval_indptr=csr(eval_lists)[0],
        eval_items=csr(eval_lists)[1],
        exclude_indptr=csr(exclude_lists)[0],
        exclude_items=csr(exclude_lists)[1],
        ks=(1, 3),
        user_chunk_size=user_chunk,
    )
    means = retrieval_metrics(user, items, **kwargs)
    _, users, values = per_user_metrics(user, items, **kwargs)
    expected_users = [
        u for u in range(num_users) if set(eval_lists[u]) - set(exclude_lists[u])
    ]
    assert users.tolist() == expected_users
    assert means["eval_users"] == len(expected_users)
    for key, per_user in values.items():
        assert per_user.shape == (len(expected_users),)
        mean = float(per_user.mean()) if len(expected_users) else 0.0
        assert mean == pytest.approx(means["mrr" if key == "reciprocal_rank" else key], abs=1e-12)
