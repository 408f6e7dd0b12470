"""Catalog sampler and logQ probabilities: hand-worked values and seeded property tests."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower_core.samplers import CatalogSampler, in_batch_log_q, log_q_from_counts


def test_log_q_by_hand():
    counts = torch.tensor([0.0, 1.0, 3.0])
    # α = 1: (c + 1) = (1, 2, 4) over 7.
    assert log_q_from_counts(counts, 1.0).exp().tolist() == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    # α = 0: uniform.
    assert log_q_from_counts(counts, 0.0).exp().tolist() == pytest.approx([1 / 3] * 3)
    # α = 0.5: (1, √2, 2) over 3 + √2.
    total = 3 + math.sqrt(2)
    assert log_q_from_counts(counts, 0.5).exp().tolist() == pytest.approx(
        [1 / total, math.sqrt(2) / total, 2 / total]
    )


def test_log_q_rejects_bad_counts():
    with pytest.raises(ValueError, match=">= 0"):
        log_q_from_counts(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="non-empty"):
        log_q_from_counts(torch.zeros(0))


def test_in_batch_log_q_is_log_expected_count():
    # p = (c + 1) / Σ = (2, 4) / 6; a batch of C = 3 positives holds item j C·p(j) times.
    log_p = log_q_from_counts(torch.tensor([1.0, 3.0]), 1.0)
    got = in_batch_log_q(log_p, torch.tensor([0, 1, 1]))
    assert got.exp().tolist() == pytest.approx([3 * 2 / 6, 3 * 4 / 6, 3 * 4 / 6])


@settings(derandomize=True, max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 1000), min_size=1, max_size=50),
    alpha=st.sampled_from([0.0, 0.5, 0.75, 1.0]),
)
def test_probabilities_sum_to_one_and_order_by_count(counts, alpha):
    log_q = log_q_from_counts(torch.tensor(counts, dtype=torch.float64), alpha)
    assert log_q.exp().sum().item() == pytest.approx(1.0)
    for i in range(len(counts)):
        for j in range(len(counts)):
            if counts[i] > counts[j] and alpha > 0:
                assert log_q[i] > log_q[j]


@settings(derandomize=True, max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(0, 50), min_size=1, max_size=30),
    num=st.integers(0, 200),
    seed=st.integers(0, 2**31 - 1),
)
def test_samples_are_in_range_and_seeded(counts, num, seed):
    sampler = CatalogSampler(torch.tensor(counts), alpha=0.75)
    first = sampler.sample(num, generator=torch.Generator().manual_seed(seed))
    second = sampler.sample(num, generator=torch.Generator().manual_seed(seed))
    assert first.dtype == torch.long and first.shape == (num,)
    assert torch.equal(first, second)
    if num:
        assert 0 <= int(first.min()) and int(first.max()) < len(counts)


def test_empirical_frequencies_match_q():
    counts = torch.tensor([0.0, 1.0, 3.0, 7.0, 99.0])
    sampler = CatalogSampler(counts, alpha=0.75)
    draws = sampler.sample(200_000, generator=torch.Generator().manual_seed(0))
    observed = torch.bincount(draws, minlength=5).double() / draws.numel()
    expected = sampler.log_q_I.exp()
    # Binomial standard error ≤ √(0.25 / 200000) ≈ 0.0011; 5 σ.
    assert torch.allclose(observed, expected, atol=0.0056)


def test_different_seeds_differ_and_uniform_is_uniform():
    sampler = CatalogSampler.uniform(1000)
    a = sampler.sample(50, generator=torch.Generator().manual_seed(1))
    b = sampler.sample(50, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)
    assert torch.allclose(
        sampler.log_q_I, torch.full((1000,), -math.log(1000), dtype=torch.float64)
    )


def test_log_q_of_samples():
    sampler = CatalogSampler(torch.tensor([0.0, 1.0, 3.0]), alpha=1.0)
    idx = torch.tensor([[2, 0], [1, 1]])
    assert sampler.log_q(idx).exp().view(-1).tolist() == pytest.approx([4 / 7, 1 / 7, 2 / 7, 2 / 7])
    # Expected count in a pool of 10 draws: 10·q.
    assert sampler.log_expected_count(idx, 10).exp()[0, 0].item() == pytest.approx(40 / 7)
