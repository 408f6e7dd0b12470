"""RetrievalTask: each configured piece equals the loss written out by hand from its parts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from twotower_core.config import NEGATIVE_SOURCES, LossConfig
from twotower_core.losses import (
    bpr,
    in_batch_softmax,
    pointwise_bce,
    sampled_softmax,
    triplet_hinge,
)
from twotower_core.negatives import UserPositives
from twotower_core.samplers import log_q_from_counts
from twotower_core.task import build_task

B, N, S, D, NUM_ITEMS = 4, 3, 2, 5, 10
COUNTS = torch.tensor([5.0, 0.0, 2.0, 9.0, 1.0, 0.0, 3.0, 4.0, 7.0, 1.0])
EXPOSED, RANKED_OUT, UNEXPOSED = range(3)


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "user_BD": torch.randn(B, D, generator=generator, dtype=torch.float64, requires_grad=True),
        "pos_item_BD": torch.randn(
            B, D, generator=generator, dtype=torch.float64, requires_grad=True
        ),
        "pos_item_idx_B": torch.tensor([0, 3, 0, 6]),  # rows 0 and 2 share item 0
        "neg_item_BND": torch.randn(
            B, N, D, generator=generator, dtype=torch.float64, requires_grad=True
        ),
        "neg_item_idx_BN": torch.tensor(
            [[1, 2, 4], [5, 3, 7], [8, 9, 1], [2, 4, 5]]
        ),  # (1, 1) = its positive
        "neg_source_BN": torch.tensor([[EXPOSED, RANKED_OUT, UNEXPOSED]] * B),
        "sampled_item_SD": torch.randn(
            S, D, generator=generator, dtype=torch.float64, requires_grad=True
        ),
        "sampled_item_idx_S": torch.tensor([6, 2]),  # item 6 is row 3's positive
    }


def run(config: LossConfig, inputs: dict, **task_kwargs) -> torch.Tensor:
    task = build_task(config, item_counts=COUNTS, **task_kwargs)
    user = inputs["user_BD"]
    return task(
        user,
        inputs["pos_item_BD"],
        **{k: v for k, v in inputs.items() if k not in ("user_BD", "pos_item_BD")},
    )


def dot_parts(inputs):
    """Dot scores of the batch: positives [B], in-batch [B, B], data [B, N], sampled [B, S]."""
    user, pos = inputs["user_BD"], inputs["pos_item_BD"]
    neg, sampled = inputs["neg_item_BND"], inputs["sampled_item_SD"]
    return (
        (user * pos).sum(1),
        user @ pos.T,
        None if neg is None else torch.einsum("bd,bnd->bn", user, neg),
        None if sampled is None else user @ sampled.T,
    )


def without(inputs, *keys):
    return {k: (None if k in keys else v) for k, v in inputs.items()}


def test_in_batch_softmax_is_the_loss_with_batch_logq_and_masking():
    config = LossConfig(name="in_batch_softmax", temperature=0.2, use_data_negatives=False)
    inputs = without(batch(), "sampled_item_SD", "sampled_item_idx_S")
    _, matrix, _, _ = dot_parts(inputs)
    ids = inputs["pos_item_idx_B"]
    # log q of each column = log(B · p(item)), p from the click counts with the +1 smoothing.
    log_q = log_q_from_counts(COUNTS, 1.0)[ids] + math.log(B)
    expected = in_batch_softmax(matrix, temperature=0.2, log_q=log_q, item_ids=ids)
    assert run(config, inputs).item() == pytest.approx(expected.item(), rel=1e-6)
    plain = in_batch_softmax(matrix, temperature=0.2)
    off = dataclasses.replace(config, logq_correction=False, accidental_hit_masking=False)
    assert run(off, inputs).item() == pytest.approx(plain.item(), rel=1e-9)


# loss.logq_exponent reshapes the in-batch columns' q only; samples keep their sampler's alpha.
@pytest.mark.parametrize("exponent", [1.0, 1.3])
def test_in_batch_softmax_mixes_sampled_and_data_negatives_with_their_logq(exponent):
    config = LossConfig(
        name="in_batch_softmax",
        temperature=0.5,
        num_sampled_negatives=S,
        sampler_alpha=0.5,
        logq_exponent=exponent,
    )
    inputs = batch(1)
    _, matrix, data, sampled = dot_parts(inputs)
    ids = inputs["pos_item_idx_B"]
    in_batch_log_q = log_q_from_counts(COUNTS, exponent)[ids] + math.log(B)  # log(B·p)
    sampled_log_q = log_q_from_counts(COUNTS, 0.5)[inputs["sampled_item_idx_S"]] + math.log(
        S
    )  # log(S·q)
    # Masks: sampled item 6 is row 3's positive; data negative (1, 1) is row 1's positive.
    sampled_weights = torch.ones(B, S, dtype=torch.float64)
    sampled_weights[3, 0] = 0
    data_weights = torch.ones(B, N, dtype=torch.float64)
    data_weights[1, 1] = 0
    expected = in_batch_softmax(
        matrix,
        temperature=0.5,
        log_q=in_batch_log_q,
        item_ids=ids,
        extra_scores=torch.cat([sampled, data], dim=1),
        extra_log_q=torch.cat(
            [sampled_log_q.expand(B, S), torch.zeros(B, N, dtype=torch.float64)], dim=1
        ),
        extra_weights=torch.cat([sampled_weights, data_weights], dim=1),
    )
    assert run(config, inputs).item() == pytest.approx(expected.item(), rel=1e-6)


def test_symmetric_adds_the_item_to_user_direction():
    config = LossConfig(
        name="in_batch_softmax", symmetric=True, logq_correction=False, use_data_negatives=False
    )
    inputs = without(batch(2), "sampled_item_SD", "sampled_item_idx_S")
    _, matrix, _, _ = dot_parts(inputs)
    ids = inputs["pos_item_idx_B"]
    forward = in_batch_softmax(matrix, temperature=0.05, item_ids=ids)
    reverse = in_batch_softmax(matrix.T.contiguous(), temperature=0.05, item_ids=ids)
    assert run(config, inputs).item() == pytest.approx((0.5 * (forward + reverse)).item(), rel=1e-6)


def test_sampled_softmax_corrects_positive_and_samples_not_data():
    config = LossConfig(
        name="sampled_softmax", temperature=0.3, num_sampled_negatives=S, sampler_alpha=0.75
    )
    inputs = batch(3)
    pos, _, data, sampled = dot_parts(inputs)
    log_q = log_q_from_counts(COUNTS, 0.75)
    log_q_pos = log_q[inputs["pos_item_idx_B"]] + math.log(S)
    log_q_neg = torch.cat(
        [
            torch.zeros(B, N, dtype=torch.float64),
            (log_q[inputs["sampled_item_idx_S"]] + math.log(S)).expand(B, S),
        ],
        1,
    )
    weights = torch.ones(B, N + S, dtype=torch.float64)
    weights[1, 1] = 0  # data negative = row 1's positive
    weights[3, N] = 0  # sampled item 6 = row 3's positive
    expected = sampled_softmax(
        pos,
        torch.cat([data, sampled], 1),
        temperature=0.3,
        log_q_pos=log_q_pos,
        log_q_neg=log_q_neg,
        neg_weights=weights,
    )
    assert run(config, inputs).item() == pytest.approx(expected.item(), rel=1e-6)


def test_source_weights_and_hit_masking_on_a_pairwise_loss():
    config = LossConfig(name="bpr", source_weights={"exposed_not_clicked": 3.0, "unexposed": 0.0})
    inputs = without(batch(4), "sampled_item_SD", "sampled_item_idx_S")
    pos, _, data, _ = dot_parts(inputs)
    # Per row: exposed ×3, ranked_out ×1, unexposed dropped; row 1's ranked_out is its positive.
    weights = torch.tensor([[3.0, 1.0, 0.0]] * B, dtype=torch.float64)
    weights[1, 1] = 0.0
    expected = bpr(pos, data, neg_weights=weights)
    assert run(config, inputs).item() == pytest.approx(expected.item(), rel=1e-9)
    # The same by hand for row 0: (3·ℓ₀ + ℓ₁) / 4 is its share, over Σw = 3·4 + 4 − 1 = 15 pairs.
    assert weights.sum().item() == 15.0


def test_hard_negative_top_k_keeps_the_highest_scored_data_negatives():
    config = LossConfig(
        name="triplet_hinge", margin=0.5, hard_negative_top_k=1, accidental_hit_masking=False
    )
    inputs = without(batch(5), "sampled_item_SD", "sampled_item_idx_S")
    pos, _, data, _ = dot_parts(inputs)
    hardest = data.max(dim=1, keepdim=True).values
    expected = triplet_hinge(pos, hardest, margin=0.5)
    assert run(config, inputs).item() == pytest.approx(expected.item(), rel=1e-9)


def test_pointwise_loss_without_other_negatives_uses_in_batch_columns():
    config = LossConfig(name="pointwise_bce", use_data_negatives=False)
    inputs = without(batch(6), "sampled_item_SD", "sampled_item_idx_S")
    pos, matrix, _, _ = dot_parts(inputs)
    # Off-diagonal columns are the negatives, minus the accidental hits (0, 2) and (2, 0).
    weights = 1.0 - torch.eye(B, dtype=torch.float64)
    weights[0, 2] = weights[2, 0] = 0.0
    expected = pointwise_bce(pos, matrix, neg_weights=weights)
    assert run(config, inputs).item() == pytest.approx(expected.item(), rel=1e-9)
    # Data negatives present: in-batch columns stay out unless asked for.
    with_data = batch(6)
    data_only = pointwise_bce(
        pos,
        dot_parts(with_data)[2],
        neg_weights=torch.tensor(
            [[1.0, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.float64
        ),
    )
    assert run(
        LossConfig(name="pointwise_bce"),
        without(with_data, "sampled_item_SD", "sampled_item_idx_S"),
    ).item() == pytest.approx(data_only.item(), rel=1e-9)
    both = run(
        LossConfig(name="pointwise_bce"),
        without(with_data, "sampled_item_SD", "sampled_item_idx_S"),
        in_batch_negatives=True,
    )
    assert both.item() != pytest.approx(data_only.item())


@pytest.mark.parametrize(
    "name", ["in_batch_softmax", "sampled_softmax", "bpr", "contrastive", "cosine_regression"]
)
@pytest.mark.parametrize("similarity", ["dot", "cosine", "euclidean"])
def test_gradients_reach_every_embedding_used(name, similarity):
    # A margin no random pair meets, so contrastive's negatives all contribute.
    config = LossConfig(name=name, similarity=similarity, num_sampled_negatives=S, margin=20.0)
    inputs = batch(7)
    loss = run(config, inputs)
    loss.backward()
    assert torch.isfinite(loss)
    for key in ("user_BD", "pos_item_BD", "neg_item_BND", "sampled_item_SD"):
        grad = inputs[key].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key


def test_sample_and_errors():
    task = build_task(LossConfig(num_sampled_negatives=3), item_counts=COUNTS)
    drawn = task.sample(3, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (3,) and int(drawn.max()) < NUM_ITEMS
    with pytest.raises(ValueError, match="num_sampled_negatives > 0 needs item counts"):
        build_task(LossConfig(num_sampled_negatives=3))
    with pytest.raises(ValueError, match="logq_correction needs item counts"):
        build_task(LossConfig(name="in_batch_softmax"))
    assert build_task(LossConfig(name="bpr")).sampler is None
    with pytest.raises(ValueError, match="unknown loss"):
        build_task(LossConfig(name="nope"))
    assert len(NEGATIVE_SOURCES) == 3


def test_sampled_softmax_without_other_negatives_uses_in_batch_columns_with_their_logq():
    # Only in-batch columns: sampled_softmax over the off-diagonal negatives, the positive
    # corrected like its column, is exactly in_batch_softmax.
    config = LossConfig(name="sampled_softmax", temperature=0.4, use_data_negatives=False)
    inputs = without(batch(8), "sampled_item_SD", "sampled_item_idx_S")
    _, matrix, _, _ = dot_parts(inputs)
    ids = inputs["pos_item_idx_B"]
    log_q = log_q_from_counts(COUNTS, 1.0)[ids] + math.log(B)
    expected = in_batch_softmax(matrix, temperature=0.4, log_q=log_q, item_ids=ids)
    # The task keeps log p in float32.
    assert run(config, inputs).item() == pytest.approx(expected.item(), rel=1e-6)


# -- loss.mask_user_positives ------------------------------------------------------------------

# Row users of ``batch()``: rows 0 and 1 share user 7. Train pairs: each row's own positive, plus
# user 7's item 6 (row 3's positive, an in-batch column), user 8's item 2 (a catalog sample) and
# user 9's items 5 (one of row 3's data negatives) and 1.
ROW_USERS = torch.tensor([7, 7, 8, 9])
TRAIN_PAIRS = (
    torch.tensor([7, 7, 8, 9, 7, 8, 9, 9]),
    torch.tensor([0, 3, 0, 6, 6, 2, 5, 1]),
)


def user_positives() -> UserPositives:
    return UserPositives(*TRAIN_PAIRS, num_items=NUM_ITEMS)


def test_user_positives_looks_up_pairs():
    positives = user_positives()
    assert positives.num_pairs == 8
    users = torch.tensor([7, 8, 9])
    items = torch.tensor([[0, 3, 6], [0, 1, 2], [5, 6, 9]])
    expected = torch.tensor([[True, True, True], [True, False, True], [True, True, False]])
    assert torch.equal(positives.contains(users, items), expected)
    # [N] items shared by every row, users absent from the pairs, the first and last keys.
    shared = positives.contains(torch.tensor([7, 0, 10]), torch.tensor([0, 1, 6]))
    assert shared.tolist() == [[True, False, True], [False, False, False], [False, False, False]]
    empty = UserPositives(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long),
                          num_items=3)  # fmt: skip
    assert not empty.contains(users, items).any()
    with pytest.raises(ValueError, match="item indices"):
        UserPositives(torch.tensor([0]), torch.tensor([NUM_ITEMS]), num_items=NUM_ITEMS)
    with pytest.raises(ValueError, match=r"\[R\] alike"):
        UserPositives(torch.tensor([0, 1]), torch.tensor([0]), num_items=NUM_ITEMS)


def test_mask_user_positives_leaves_the_users_other_items_out_of_the_in_batch_softmax():
    config = LossConfig(
        name="in_batch_softmax", temperature=0.2, logq_correction=False, use_data_negatives=False
    )
    inputs = without(batch(), "sampled_item_SD", "sampled_item_idx_S")
    _, matrix, _, _ = dot_parts(inputs)
    ids = inputs["pos_item_idx_B"]
    # Columns hold items [0, 3, 0, 6]. Users 7 (rows 0, 1) clicked 0, 3, 6: every column, the
    # own positive aside; user 8 (row 2) clicked 0 (its own) and 2; user 9 (row 3) 6, 5, 1.
    excluded = torch.tensor(
        [[False, True, True, True], [True, False, True, True], [False] * 4, [False] * 4]
    )
    expected = in_batch_softmax(matrix, temperature=0.2, item_ids=ids, excluded=excluded)
    masked = dataclasses.replace(config, mask_user_positives=True)
    got = run(masked, {**inputs, "user_idx_B": ROW_USERS}, user_positives=user_positives())
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)
    assert got.item() != pytest.approx(run(config, inputs).item())


def test_in_batch_softmax_never_excludes_the_positive_column():
    scores = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    everything = torch.ones(3, 3, dtype=torch.bool)
    # Only the positives are left: each row's softmax is over itself, loss 0.
    assert in_batch_softmax(scores, excluded=everything).item() == pytest.approx(0.0, abs=1e-7)
    both = in_batch_softmax(scores, excluded=everything, symmetric=True)
    assert both.item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="excluded must be"):
        in_batch_softmax(scores, excluded=everything[:2])


@pytest.mark.parametrize("name", ["bpr", "sampled_softmax", "pointwise_bce"])
def test_mask_user_positives_gives_false_negatives_no_gradient(name):
    # Sampled item 2 is user 8's (row 2); data negative 5 is user 9's (row 3, column 2).
    config = LossConfig(name=name, num_sampled_negatives=S, mask_user_positives=True)
    inputs = batch(4)
    loss = run(config, {**inputs, "user_idx_B": ROW_USERS}, user_positives=user_positives())
    loss.backward()
    # Row 3's data negative 5 is a false negative; its other data negatives are not.
    assert torch.count_nonzero(inputs["neg_item_BND"].grad[3, 2]) == 0
    assert torch.count_nonzero(inputs["neg_item_BND"].grad[3, 0]) > 0
    # Sampled item 2 is shared: only row 2's use of it is masked, so compare the loss instead.
    inputs_off = batch(4)
    off = dataclasses.replace(config, mask_user_positives=False)
    assert run(off, inputs_off).item() != pytest.approx(loss.item())
    moved = batch(4)
    with torch.no_grad():
        moved["neg_item_BND"][3, 2] += 5.0
    again = run(config, {**moved, "user_idx_B": ROW_USERS}, user_positives=user_positives())
    assert again.item() == pytest.approx(loss.item(), rel=1e-12)


def test_mask_user_positives_needs_the_pairs_and_the_row_users():
    config = LossConfig(name="in_batch_softmax", mask_user_positives=True)
    with pytest.raises(ValueError, match="needs the train \\(user, item\\) pairs"):
        build_task(config, item_counts=COUNTS)
    task = build_task(config, item_counts=COUNTS, user_positives=user_positives())
    inputs = batch()
    with pytest.raises(ValueError, match="user_idx_B"):
        task(inputs["user_BD"], inputs["pos_item_BD"], pos_item_idx_B=inputs["pos_item_idx_B"])
