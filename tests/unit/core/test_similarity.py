"""Similarities: hand-worked values, the three forms agree, serving metadata, gradients."""

from __future__ import annotations

import pytest
import torch

from twotower_core.similarity import SIMILARITIES, ann_metric, normalize_for_serving, similarity


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_dot_by_hand():
    # (1, 2)·(3, −1) = 3 − 2 = 1
    assert similarity("dot").pairs(t([[1.0, 2.0]]), t([[3.0, -1.0]])).item() == pytest.approx(1.0)


def test_cosine_by_hand_has_no_temperature():
    # (3, 4)·(4, 3) / (5·5) = 24 / 25 = 0.96: plain cosine, the loss's temperature does the rest.
    assert similarity("cosine").pairs(t([[3.0, 4.0]]), t([[4.0, 3.0]])).item() == pytest.approx(
        0.96
    )


def test_euclidean_is_negative_distance():
    # ‖(0, 0) − (3, 4)‖ = 5, so the score is −5 (not −25).
    assert similarity("euclidean").pairs(t([[0.0, 0.0]]), t([[3.0, 4.0]])).item() == pytest.approx(
        -5.0
    )


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_three_forms_agree(name):
    sim = similarity(name)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    keys = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    matrix = sim.matrix(query, keys)  # [4, 3]
    for i in range(4):
        for j in range(3):
            assert matrix[i, j].item() == pytest.approx(
                sim.pairs(query[i : i + 1], keys[j : j + 1]).item(), rel=1e-9
            )
    per_row = keys.unsqueeze(0).expand(4, 3, 5)  # every row's negatives = the shared keys
    torch.testing.assert_close(sim.negatives(query, per_row), matrix)
    # pairs(q, k) is the diagonal of matrix(q, k)
    torch.testing.assert_close(
        sim.pairs(query[:3], keys), torch.diagonal(sim.matrix(query[:3], keys))
    )


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_higher_is_closer(name):
    sim = similarity(name)
    query = t([[1.0, 0.0]])
    close, far = t([[0.9, 0.1]]), t([[-1.0, 0.2]])
    assert sim.pairs(query, close).item() > sim.pairs(query, far).item()


def test_serving_metadata():
    assert (ann_metric("dot"), normalize_for_serving("dot")) == ("inner_product", False)
    assert (ann_metric("cosine"), normalize_for_serving("cosine")) == ("inner_product", True)
    assert (ann_metric("euclidean"), normalize_for_serving("euclidean")) == ("l2", False)


def test_serving_metric_ranks_like_the_similarity():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 4, generator=generator, dtype=torch.float64)
    keys = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    for name in SIMILARITIES:
        scores = similarity(name).matrix(query, keys)[0]
        q, k = query, keys
        if normalize_for_serving(name):
            q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
        if ann_metric(name) == "inner_product":
            served = (q @ k.T)[0]
        else:
            served = -((q - k) ** 2).sum(1)  # an L2 index ranks by ascending squared distance
        assert torch.equal(scores.argsort(descending=True), served.argsort(descending=True))


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match="unknown similarity 'manhattan'; valid: cosine, dot, euclidean"
    ):
        similarity("manhattan")


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_gradcheck(name):
    sim = similarity(name)
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    negs = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sim.matrix, (query, keys))
    assert torch.autograd.gradcheck(sim.negatives, (query, negs))
    assert torch.autograd.gradcheck(sim.pairs, (query, keys[[0, 1, 0]].detach().requires_grad_()))


@pytest.mark.parametrize("name", ["cosine", "euclidean"])
def test_identical_or_zero_vectors_have_finite_gradients(name):
    query = torch.zeros(2, 3, requires_grad=True)
    keys = torch.zeros(2, 3, requires_grad=True)
    similarity(name).pairs(query, keys).sum().backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(keys.grad).all()
