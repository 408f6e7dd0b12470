"""Negative shaping pieces: accidental hits, hard-negative top-k, source weights, log w."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower_core import negatives
from twotower_core.config import NEGATIVE_SOURCES


def test_accidental_hits_by_hand():
    pos = torch.tensor([3, 5])
    per_row = torch.tensor([[3, 4], [5, 5]])
    assert negatives.accidental_hits(pos, per_row).tolist() == [[True, False], [True, True]]
    shared = torch.tensor([5, 3, 9])  # the same sampled items for every row
    assert negatives.accidental_hits(pos, shared).tolist() == [
        [False, True, False],
        [True, False, False],
    ]


def test_in_batch_hits_by_hand():
    # Rows 0 and 2 clicked item 1: (0, 2) and (2, 0) are hits; the diagonal never is.
    hits = negatives.in_batch_hits(torch.tensor([1, 2, 1]), num_rows=3)
    assert hits.tolist() == [[False, False, True], [False, False, False], [True, False, False]]


@settings(derandomize=True, max_examples=60, deadline=None)
@given(
    ids=st.lists(st.integers(0, 3), min_size=1, max_size=8),
    data=st.data(),
)
def test_in_batch_hits_property(ids, data):
    num_columns = len(ids)
    num_rows = data.draw(st.integers(1, num_columns))
    offset = data.draw(st.integers(0, num_columns - num_rows))
    hits = negatives.in_batch_hits(torch.tensor(ids), num_rows=num_rows, positive_offset=offset)
    for i in range(num_rows):
        for j in range(num_columns):
            assert bool(hits[i, j]) == (ids[offset + i] == ids[j] and j != offset + i)


def test_hard_negative_top_k_by_hand():
    scores = torch.tensor([[0.125, 0.875, 0.5, 0.75]])
    weights = torch.tensor([[1.0, 0.0, 1.0, 1.0]])  # 0.875 is masked: it never counts as hardest
    ids = torch.tensor([[10, 11, 12, 13]])
    kept_scores, kept_weights, kept_ids = negatives.hard_negative_top_k(scores, weights, ids, k=2)
    assert kept_scores.tolist() == [[0.75, 0.5]]
    assert kept_ids.tolist() == [[13, 12]]
    assert kept_weights.tolist() == [[1.0, 1.0]]


def test_hard_negative_top_k_no_op_when_k_covers_all():
    scores, weights = torch.rand(2, 3), torch.ones(2, 3)
    out = negatives.hard_negative_top_k(scores, weights, k=3)
    assert out[0] is scores and out[1] is weights
    assert negatives.hard_negative_top_k(scores, weights, k=None)[0] is scores


@settings(derandomize=True, max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    num_negatives=st.integers(1, 6),
    k=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_hard_negative_top_k_property(rows, num_negatives, k, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, num_negatives, generator=generator)
    weights = (torch.rand(rows, num_negatives, generator=generator) > 0.3).float()
    ids = torch.arange(rows * num_negatives).view(rows, num_negatives)
    kept_scores, kept_weights, kept_ids = negatives.hard_negative_top_k(scores, weights, ids, k=k)
    keep = min(k, num_negatives)
    assert kept_scores.shape == (rows, keep)
    for r in range(rows):
        valid = sorted(
            (s for s, w in zip(scores[r].tolist(), weights[r].tolist()) if w > 0), reverse=True
        )
        kept_valid = [s for s, w in zip(kept_scores[r].tolist(), kept_weights[r].tolist()) if w > 0]
        # The kept valid negatives are exactly the top of the valid ones.
        assert sorted(kept_valid, reverse=True) == valid[:keep]
        # Aligned tensors travel with their scores.
        for s, i in zip(kept_scores[r].tolist(), kept_ids[r].tolist()):
            assert scores.view(-1)[i].item() == s


def test_source_weights():
    table = negatives.source_weight_table({"ranked_out": 0.5})
    assert table.tolist() == [1.0 if s != "ranked_out" else 0.5 for s in NEGATIVE_SOURCES]
    codes = torch.tensor(
        [[NEGATIVE_SOURCES.index("ranked_out"), NEGATIVE_SOURCES.index("unexposed")]]
    )
    assert negatives.source_weights(table, codes).tolist() == [[0.5, 1.0]]
    with pytest.raises(
        ValueError,
        match="unknown negative source 'clicked' in source weights; valid: exposed_not_clicked",
    ):
        negatives.source_weight_table({"clicked": 1.0})


def test_weigh_logits_and_logq():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    weighted = negatives.weigh_logits(logits, torch.tensor([[1.0, 2.0, 0.0]]))
    # + log 1 = 0, + log 2, and −inf for weight 0
    assert weighted[0, 0].item() == 1.0
    assert weighted[0, 1].item() == pytest.approx(1.0 + math.log(2))
    assert weighted[0, 2].item() == -math.inf
    assert negatives.logq_correct(logits, torch.tensor([0.0, 1.0, -1.0])).tolist() == [
        [1.0, 0.0, 2.0]
    ]
    assert negatives.logq_correct(logits, None) is logits
