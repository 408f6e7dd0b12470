"""Contract 5 losses: hand-worked cases, naive references from the formulas, limits, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower_core import losses
from twotower_core.config import LossConfig
from twotower_core.losses import (
    LOSSES,
    bpr,
    contrastive,
    cosine_regression,
    in_batch_softmax,
    pointwise_bce,
    sampled_softmax,
    triplet_hinge,
    triplet_logistic,
)
from twotower_core.similarity import SIMILARITIES


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# hand-worked cases


def test_pointwise_bce_by_hand():
    # s⁺ = 0, s⁻ = 0: −log σ(0) = log 2 and −log(1 − σ(0)) = log 2; mean over 2 pairs = log 2.
    assert pointwise_bce(t([0.0]), t([[0.0]])).item() == pytest.approx(math.log(2))
    # s⁺ = 2, s⁻ = (−1, 1): log(1+e⁻²) = 0.126928, log(1+e⁻¹) = 0.313262, log(1+e¹) = 1.313262;
    # mean over the 3 labelled pairs = 1.753452 / 3 = 0.584484.
    assert pointwise_bce(t([2.0]), t([[-1.0, 1.0]])).item() == pytest.approx(0.5844838, abs=1e-6)


def test_pointwise_bce_scale_multiplies_logits():
    # scale 4 on s = 0.5 is the bare loss on s = 2.
    assert pointwise_bce(t([0.5]), t([[-0.25, 0.25]]), scale=4.0).item() == pytest.approx(
        pointwise_bce(t([2.0]), t([[-1.0, 1.0]])).item()
    )


def test_cosine_regression_by_hand():
    # (0.5 − 1)² = 0.25; (0 + 1)² = 1; (−1 + 1)² = 0; mean over 3 pairs = 1.25 / 3.
    assert cosine_regression(t([0.5]), t([[0.0, -1.0]])).item() == pytest.approx(1.25 / 3)


def test_contrastive_by_hand_on_euclidean_scores():
    # Euclidean scores are −distance: d⁺ = 0.3, d⁻ = (0.2, 2.0), m = 1.
    # d⁺² = 0.09; max(0, 1 − 0.2)² = 0.64; max(0, 1 − 2)² = 0; mean over 3 pairs = 0.73 / 3.
    loss = contrastive(t([-0.3]), t([[-0.2, -2.0]]), margin=1.0)
    assert loss.item() == pytest.approx(0.73 / 3)


def test_triplet_hinge_by_hand():
    # s⁺ = 0.8, s⁻ = (0.5, 0.9), m = 0.5: max(0, 0.5 − 0.8 + 0.5) = 0.2, max(0, 0.9 − 0.8 + 0.5) = 0.6.
    assert triplet_hinge(t([0.8]), t([[0.5, 0.9]]), margin=0.5).item() == pytest.approx(0.4)


def test_triplet_hinge_sign_is_on_similarities():
    # The seed's reversed sign would reward a negative scored above the positive; here it costs.
    ranked_wrong = triplet_hinge(t([0.0]), t([[1.0]]), margin=0.0)
    ranked_right = triplet_hinge(t([1.0]), t([[0.0]]), margin=0.0)
    assert ranked_wrong.item() == pytest.approx(1.0)
    assert ranked_right.item() == 0.0


def test_triplet_logistic_by_hand():
    # σ = 2, s⁺ = 1, s⁻ = (0, 1): log(1 + e⁻²) = 0.126928, log(1 + e⁰) = 0.693147; mean = 0.410038.
    assert triplet_logistic(t([1.0]), t([[0.0, 1.0]]), scale=2.0).item() == pytest.approx(
        0.4100376, abs=1e-6
    )


def test_bpr_by_hand():
    # −log σ(1 − 0) = 0.313262, −log σ(1 − 1) = 0.693147; mean = 0.503204.
    assert bpr(t([1.0]), t([[0.0, 1.0]])).item() == pytest.approx(0.5032044, abs=1e-6)


def test_sampled_softmax_by_hand():
    # logits (1, 0, 0): −log(e / (e + 2)) = log(1 + 2/e) = 0.551445.
    assert sampled_softmax(t([1.0]), t([[0.0, 0.0]])).item() == pytest.approx(0.5514447, abs=1e-6)
    # τ = 0.5 doubles the logits: (2, 0, 0) → log(1 + 2e⁻²) = 0.239545.
    assert sampled_softmax(t([1.0]), t([[0.0, 0.0]]), temperature=0.5).item() == pytest.approx(
        0.2395448, abs=1e-6
    )


def test_sampled_softmax_logq_by_hand():
    # q⁺ = 0.5, q⁻ = 0.25: logits 1 − log 0.5 = 1.693147 and 0 − log 0.25 = 1.386294 (twice);
    # loss = log(1 + 2·e^(1.386294 − 1.693147)) = log(1 + 2·0.735759) = 0.904832.
    loss = sampled_softmax(
        t([1.0]), t([[0.0, 0.0]]), log_q_pos=t([math.log(0.5)]), log_q_neg=t([[math.log(0.25)] * 2])
    )
    assert loss.item() == pytest.approx(0.9048324, abs=1e-6)


def test_in_batch_softmax_by_hand():
    scores = t([[2.0, 0.0], [1.0, 1.0]])
    # Row 0: −log(e² / (e² + e⁰)) = log(1 + e⁻²) = 0.126928. Row 1: −log(e / 2e) = log 2 = 0.693147.
    assert in_batch_softmax(scores).item() == pytest.approx(0.4100376, abs=1e-6)
    # logQ with q = (0.5, 0.25): row 0 logits (2 + log 2, log 4) → log(1 + 2e⁻²) = 0.239545;
    # row 1 logits (1 + log 2, 1 + log 4), positive second → log(1 + 1/2) = 0.405465; mean 0.322505.
    loss = in_batch_softmax(scores, log_q=t([math.log(0.5), math.log(0.25)]))
    assert loss.item() == pytest.approx(0.3225049, abs=1e-6)


def test_in_batch_softmax_accidental_hits_by_hand():
    # Both rows clicked item 7: each row's only negative is its own positive item; masked, the
    # softmax holds the positive alone and the loss is 0. Unmasked, it is the 0.410038 above.
    scores = t([[2.0, 0.0], [1.0, 1.0]])
    assert in_batch_softmax(scores, item_ids=torch.tensor([7, 7])).item() == pytest.approx(
        0.0, abs=1e-12
    )
    assert in_batch_softmax(scores, item_ids=torch.tensor([7, 8])).item() == pytest.approx(
        0.4100376, abs=1e-6
    )


def test_in_batch_softmax_symmetric_by_hand():
    # Item → user: column 0 (2, 1) → log(1 + e⁻¹) = 0.313262; column 1 (0, 1) → the same.
    # Mean of the two directions: (0.410038 + 0.313262) / 2 = 0.361650.
    loss = in_batch_softmax(t([[2.0, 0.0], [1.0, 1.0]]), symmetric=True)
    assert loss.item() == pytest.approx(0.3616496, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# naive references, written loop by loop from the Contract 5 formulas


def naive_pointwise(term_pos, term_neg, pos, neg, weights):
    total, count = 0.0, 0.0
    for b in range(len(pos)):
        total += term_pos(pos[b])
        count += 1
        for n in range(len(neg[b])):
            total += weights[b][n] * term_neg(neg[b][n])
            count += weights[b][n]
    return total / count


def naive_pairwise(term, pos, neg, weights):
    total, count = 0.0, 0.0
    for b in range(len(pos)):
        for n in range(len(neg[b])):
            total += weights[b][n] * term(pos[b], neg[b][n])
            count += weights[b][n]
    return total / count


def naive_softmax_row(pos_logit, neg_logits, weights):
    denominator = math.exp(pos_logit) + sum(w * math.exp(x) for x, w in zip(neg_logits, weights))
    return -math.log(math.exp(pos_logit) / denominator)


def naive(
    name,
    pos,
    neg,
    weights,
    *,
    margin=0.7,
    scale=1.5,
    temperature=0.4,
    log_q_pos=None,
    log_q_neg=None,
):
    if name == "pointwise_bce":
        return naive_pointwise(
            lambda s: -math.log(sigmoid(scale * s)),
            lambda s: -math.log(1 - sigmoid(scale * s)),
            pos,
            neg,
            weights,
        )
    if name == "cosine_regression":
        return naive_pointwise(lambda s: (s - 1) ** 2, lambda s: (s + 1) ** 2, pos, neg, weights)
    if name == "contrastive":
        return naive_pointwise(
            lambda s: (-s) ** 2, lambda s: max(0.0, margin - (-s)) ** 2, pos, neg, weights
        )
    if name == "triplet_hinge":
        return naive_pairwise(lambda p, n: max(0.0, n - p + margin), pos, neg, weights)
    if name == "triplet_logistic":
        return naive_pairwise(
            lambda p, n: math.log(1 + math.exp(scale * (n - p))), pos, neg, weights
        )
    if name == "bpr":
        return naive_pairwise(lambda p, n: -math.log(sigmoid(p - n)), pos, neg, weights)
    assert name == "sampled_softmax"
    rows = []
    for b in range(len(pos)):
        pos_logit = pos[b] / temperature - (log_q_pos[b] if log_q_pos else 0.0)
        neg_logits = [
            neg[b][n] / temperature - (log_q_neg[b][n] if log_q_neg else 0.0)
            for n in range(len(neg[b]))
        ]
        rows.append(naive_softmax_row(pos_logit, neg_logits, weights[b]))
    return sum(rows) / len(rows)


PAIR_LOSSES = [name for name in LOSSES if name != "in_batch_softmax"]
HYPER = {"margin": 0.7, "scale": 1.5, "temperature": 0.4}


def call(name, pos, neg, **kwargs):
    hyper = losses.hyperparameters(name, LossConfig(**HYPER))
    return LOSSES[name](pos, neg, **hyper, **kwargs)


@pytest.mark.parametrize("name", PAIR_LOSSES)
@settings(derandomize=True, max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    num_negatives=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    weighted=st.booleans(),
)
def test_matches_naive_reference(name, batch, num_negatives, seed, weighted):
    generator = torch.Generator().manual_seed(seed)
    pos = torch.rand(batch, generator=generator, dtype=torch.float64) * 2 - 1
    neg = torch.rand(batch, num_negatives, generator=generator, dtype=torch.float64) * 2 - 1
    weights = torch.ones(batch, num_negatives, dtype=torch.float64)
    if weighted:
        # Weights in {0, 0.5, 1, 2}, at least one non-zero per row.
        weights = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)[
            torch.randint(0, 4, (batch, num_negatives), generator=generator)
        ]
        weights[:, 0] = 1.0
    log_q_pos = (torch.rand(batch, generator=generator, dtype=torch.float64) - 3).tolist()
    log_q_neg = (
        torch.rand(batch, num_negatives, generator=generator, dtype=torch.float64) - 3
    ).tolist()
    kwargs = {"neg_weights": weights}
    expected_kwargs = {}
    if name == "sampled_softmax":
        kwargs.update(log_q_pos=t(log_q_pos), log_q_neg=t(log_q_neg))
        expected_kwargs = {"log_q_pos": log_q_pos, "log_q_neg": log_q_neg}
    got = call(name, pos, neg, **kwargs).item()
    expected = naive(name, pos.tolist(), neg.tolist(), weights.tolist(), **HYPER, **expected_kwargs)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


@settings(derandomize=True, max_examples=30, deadline=None)
@given(batch=st.integers(1, 5), seed=st.integers(0, 2**16), num_distinct_items=st.integers(1, 5))
def test_in_batch_softmax_matches_naive_reference(batch, seed, num_distinct_items):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, batch, generator=generator, dtype=torch.float64)
    item_ids = torch.randint(0, num_distinct_items, (batch,), generator=generator)
    log_q = torch.rand(batch, generator=generator, dtype=torch.float64) - 3
    temperature = 0.3
    rows = []
    for i in range(batch):
        logits = [scores[i, j].item() / temperature - log_q[j].item() for j in range(batch)]
        # Same item as the positive, off the diagonal: an accidental hit, out of the softmax.
        keep = [1.0 if j == i or item_ids[j] != item_ids[i] else 0.0 for j in range(batch)]
        negatives = [j for j in range(batch) if j != i]
        rows.append(
            naive_softmax_row(
                logits[i], [logits[j] for j in negatives], [keep[j] for j in negatives]
            )
        )
    expected = sum(rows) / batch
    got = in_batch_softmax(scores, temperature=temperature, log_q=log_q, item_ids=item_ids).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_in_batch_softmax_extra_columns_are_more_negatives():
    # Extra columns with weight 1 and logQ join each row's softmax like sampled negatives.
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    extra = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    extra_log_q = torch.rand(2, dtype=torch.float64, generator=generator) - 2
    got = in_batch_softmax(scores, temperature=0.5, extra_scores=extra, extra_log_q=extra_log_q)
    rows = []
    for i in range(3):
        negatives = [scores[i, j].item() / 0.5 for j in range(3) if j != i]
        negatives += [extra[i, m].item() / 0.5 - extra_log_q[m].item() for m in range(2)]
        rows.append(naive_softmax_row(scores[i, i].item() / 0.5, negatives, [1.0] * 4))
    assert got.item() == pytest.approx(sum(rows) / 3, rel=1e-9)


def test_in_batch_softmax_rectangular_offset_picks_the_local_block():
    # Worker 1 of 2 with 2 rows each: its positives are global columns 2 and 3.
    generator = torch.Generator().manual_seed(4)
    full = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    ids = torch.tensor([5, 6, 5, 7])
    whole = in_batch_softmax(full, item_ids=ids, log_q=torch.zeros(4, dtype=torch.float64))
    top = in_batch_softmax(full[:2], item_ids=ids, positive_offset=0)
    bottom = in_batch_softmax(full[2:], item_ids=ids, positive_offset=2)
    assert ((top + bottom) / 2).item() == pytest.approx(whole.item(), rel=1e-12)
    with pytest.raises(ValueError, match="symmetric needs the square"):
        in_batch_softmax(full[2:], positive_offset=2, symmetric=True)
    with pytest.raises(ValueError, match="do not fit"):
        in_batch_softmax(full[2:], positive_offset=3)


# ---------------------------------------------------------------------------------------------
# limits


@pytest.mark.parametrize(
    ("name", "pos", "neg"),
    [
        # Margin losses are exactly 0 once the margin is met.
        ("triplet_hinge", [1.0, 0.9], [[-1.0, 0.0], [0.1, 0.2]]),
        ("contrastive", [0.0, 0.0], [[-5.0, -1.0], [-0.8, -3.0]]),  # d⁺ = 0, every d⁻ ≥ m = 0.7
        ("cosine_regression", [1.0, 1.0], [[-1.0, -1.0], [-1.0, -1.0]]),
    ],
)
def test_perfect_separation_is_exactly_zero(name, pos, neg):
    assert call(name, t(pos), t(neg)).item() == 0.0


@pytest.mark.parametrize("name", ["pointwise_bce", "triplet_logistic", "bpr", "sampled_softmax"])
def test_perfect_separation_is_near_zero(name):
    # Scores ±20 (logits up to ±100 after τ = 0.4): every term is below e⁻²⁰.
    loss = call(name, t([20.0, 20.0]), t([[-20.0, -20.0], [-20.0, -20.0]]))
    assert 0.0 <= loss.item() < 1e-8


def test_in_batch_perfect_separation_is_near_zero():
    assert (
        in_batch_softmax(20.0 * torch.eye(4, dtype=torch.float64), temperature=0.5).item() < 1e-15
    )


def test_uniform_logq_equals_no_correction():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    uniform = torch.full((5,), math.log(1 / 1000), dtype=torch.float64)
    assert in_batch_softmax(scores, log_q=uniform).item() == pytest.approx(
        in_batch_softmax(scores).item(), rel=1e-12
    )
    pos, neg = scores[:, 0], scores[:, 1:]
    corrected = sampled_softmax(
        pos,
        neg,
        log_q_pos=torch.full((5,), -7.0, dtype=torch.float64),
        log_q_neg=torch.full((5, 4), -7.0, dtype=torch.float64),
    )
    assert corrected.item() == pytest.approx(sampled_softmax(pos, neg).item(), rel=1e-12)


def test_logq_lowers_popular_negatives():
    # logits = s − log q: a popular negative's logit 0 − log 0.9 = 0.105 sits far below a rare
    # one's 0 − log 0.01 = 4.605, so popular negatives cost less (they are over-sampled).
    pos, neg = t([0.0]), t([[0.0, 0.0]])
    popular = sampled_softmax(pos, neg, log_q_neg=t([[math.log(0.9)] * 2]))
    rare = sampled_softmax(pos, neg, log_q_neg=t([[math.log(0.01)] * 2]))
    # log(1 + 2·e^0.105) = 1.170071 and log(1 + 2·e^4.605) = 5.303305.
    assert popular.item() == pytest.approx(math.log(1 + 2 / 0.9))
    assert rare.item() == pytest.approx(math.log(1 + 2 / 0.01))


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_weight_two_equals_a_duplicated_negative(name):
    generator = torch.Generator().manual_seed(1)
    pos = torch.randn(3, generator=generator, dtype=torch.float64)
    neg = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    weights = t([[2.0, 1.0]] * 3)
    duplicated = torch.cat([neg[:, :1], neg], dim=1)
    assert call(name, pos, neg, neg_weights=weights).item() == pytest.approx(
        call(name, pos, duplicated).item(), rel=1e-12
    )


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_weight_zero_equals_a_removed_negative(name):
    generator = torch.Generator().manual_seed(2)
    pos = torch.randn(3, generator=generator, dtype=torch.float64)
    neg = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    weights = t([[1.0, 0.0, 1.0]] * 3)
    removed = neg[:, [0, 2]]
    assert call(name, pos, neg, neg_weights=weights).item() == pytest.approx(
        call(name, pos, removed).item(), rel=1e-12
    )


# ---------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_gradcheck(name):
    generator = torch.Generator().manual_seed(5)
    # Scores away from the hinge kinks (|s⁻ − s⁺ + m| and |m − d⁻| stay well above gradcheck's eps).
    pos = (torch.rand(3, generator=generator, dtype=torch.float64) * 0.4 + 0.3).requires_grad_()
    neg = (torch.rand(3, 2, generator=generator, dtype=torch.float64) * 0.4 - 0.9).requires_grad_()
    weights = t([[1.0, 0.5], [2.0, 1.0], [0.0, 1.0]])
    assert torch.autograd.gradcheck(lambda p, n: call(name, p, n, neg_weights=weights), (pos, neg))


def test_gradcheck_in_batch_softmax():
    generator = torch.Generator().manual_seed(6)
    scores = torch.randn(4, 4, generator=generator, dtype=torch.float64).requires_grad_()
    extra = torch.randn(4, 2, generator=generator, dtype=torch.float64).requires_grad_()
    log_q = torch.rand(4, generator=generator, dtype=torch.float64) - 3
    ids = torch.tensor([0, 1, 0, 2])

    def loss(s, e):
        return in_batch_softmax(
            s,
            temperature=0.5,
            log_q=log_q,
            item_ids=ids,
            symmetric=True,
            extra_scores=e,
            extra_weights=t([[1.0, 0.0]] * 4),
        )

    assert torch.autograd.gradcheck(loss, (scores, extra))


def test_masked_columns_get_no_gradient():
    scores = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    in_batch_softmax(scores, item_ids=torch.tensor([4, 4, 5])).backward()
    # Rows 0 and 1 share item 4: (0, 1) and (1, 0) are accidental hits.
    assert scores.grad[0, 1] == 0 and scores.grad[1, 0] == 0
    assert scores.grad[0, 2] != 0


# ---------------------------------------------------------------------------------------------
# registry and every loss with every similarity


def test_registry_names_and_families():
    assert set(LOSSES) == {
        "pointwise_bce",
        "cosine_regression",
        "contrastive",
        "triplet_hinge",
        "triplet_logistic",
        "bpr",
        "sampled_softmax",
        "in_batch_softmax",
    }
    assert {losses.loss_family(n) for n in LOSSES} == {"pointwise", "pairwise", "listwise"}
    assert losses.loss_family("bpr") == "pairwise"
    with pytest.raises(ValueError, match="unknown loss 'hinge'; valid: bpr, contrastive"):
        losses.loss_fn("hinge")


def test_hyperparameters_pick_only_what_a_loss_takes():
    config = LossConfig(margin=0.3, scale=2.0, temperature=0.1)
    assert losses.hyperparameters("triplet_hinge", config) == {"margin": 0.3}
    assert losses.hyperparameters("triplet_logistic", config) == {"scale": 2.0}
    assert losses.hyperparameters("in_batch_softmax", config) == {"temperature": 0.1}
    assert losses.hyperparameters("bpr", config) == {}


@pytest.mark.parametrize("similarity_name", sorted(SIMILARITIES))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_trains_with_every_similarity(name, similarity_name):
    sim = SIMILARITIES[similarity_name]
    generator = torch.Generator().manual_seed(7)
    user = torch.randn(4, 3, generator=generator, requires_grad=True)
    items = torch.randn(4, 3, generator=generator, requires_grad=True)
    negs = torch.randn(4, 2, 3, generator=generator, requires_grad=True)
    if name == "in_batch_softmax":
        loss = in_batch_softmax(sim.matrix(user, items), temperature=0.5)
    else:
        loss = call(name, sim.pairs(user, items), sim.negatives(user, negs))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() >= 0
    assert torch.isfinite(user.grad).all()
    # A hinge already past its margin has zero loss and zero gradient; any other loss moves.
    assert (user.grad.abs().sum() > 0) == (loss.item() > 0)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"pos_scores \[B\] and neg_scores \[B, N\]"):
        bpr(t([1.0, 2.0]), t([[0.0]]))
    with pytest.raises(ValueError, match="neg_weights"):
        bpr(t([1.0]), t([[0.0]]), neg_weights=t([[1.0, 1.0]]))


def _ease_objective(X_UI: torch.Tensor, P_ID: torch.Tensor, Q_ID: torch.Tensor) -> torch.Tensor:
    """EASE's loss for the low-rank B = P Qᵀ with diag(B) zeroed, scoring every (user, item)."""
    B_II = P_ID @ Q_ID.T
    B_II = B_II - torch.diag(torch.diag(B_II))
    return ((X_UI - X_UI @ B_II) ** 2).sum()


def _rows_of(X_UI: torch.Tensor, P_ID: torch.Tensor, Q_ID: torch.Tensor, users_R, items_R):
    """``linear_autoencoder_rows`` per row, each row's bag given as its user's X row."""
    bags_RI = X_UI[users_R]
    loo_RI = bags_RI.clone()
    loo_RI[torch.arange(len(items_R)), items_R] = 0.0
    num_items = X_UI.shape[1]
    return torch.stack(
        [
            losses.linear_autoencoder_rows(
                (bags_RI[r] @ P_ID)[None],
                (loo_RI[r] @ P_ID)[None],
                Q_ID[items_R[r]][None],
                Q_ID.T @ Q_ID,
                Q_ID[None].expand(1, num_items, -1),
                bags_RI[r][None] > 0,
            )
            for r in range(len(items_R))
        ]
    )


@settings(max_examples=25, deadline=None)
@given(
    num_users=st.integers(1, 6),
    num_items=st.integers(2, 9),
    dim=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_linear_autoencoder_rows_sum_to_the_ease_objective(num_users, num_items, dim, seed):
    """Summed over one row per (user, item of its bag), the rows' losses are EASE's squared
    error over the whole catalog with the zero diagonal, for any low-rank weights; and every
    row's loss is ≥ 0, so repeated rows or items missing from the bag only reweight squares."""
    generator = torch.Generator().manual_seed(seed)
    X_UI = (torch.rand(num_users, num_items, generator=generator) < 0.5).to(torch.float64)
    X_UI[:, 0] = 1.0  # every user has a row
    P_ID = torch.randn(num_items, dim, generator=generator, dtype=torch.float64)
    Q_ID = torch.randn(num_items, dim, generator=generator, dtype=torch.float64)
    users_R, items_R = X_UI.nonzero(as_tuple=True)
    rows_R = _rows_of(X_UI, P_ID, Q_ID, users_R, items_R)
    torch.testing.assert_close(rows_R.sum(), _ease_objective(X_UI, P_ID, Q_ID))
    # User 0 with every item, in its bag or not (a stray row), still costs ≥ 0 a row.
    stray_R = _rows_of(
        X_UI, P_ID, Q_ID, torch.zeros(num_items, dtype=torch.long), torch.arange(num_items)
    )
    assert bool((rows_R >= -1e-9).all()) and bool((stray_R >= -1e-9).all())


def test_linear_autoencoder_rows_by_hand():
    """One user with bag {0}, two items, 1-d: h = p0 = 2, h without item 0 = 0, q = (0.5, 1).
    Item 0: (1 − 0)²; item 1 (not in the bag): (h·q1)² = 4. Total 5; the row's share is
    (1 − 0)² + (h G h − (h·q0)²) / 1 = 1 + (2·1.25·2 − 1) = 5."""
    loss = losses.linear_autoencoder_rows(
        torch.tensor([[2.0]]),
        torch.tensor([[0.0]]),
        torch.tensor([[0.5]]),
        torch.tensor([[1.25]]),
        torch.tensor([[[0.5], [1.0]]]),
        torch.tensor([[True, False]]),
    )
    assert float(loss) == pytest.approx(5.0)
