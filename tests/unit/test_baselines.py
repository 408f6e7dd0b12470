"""MostPop, EASE and iALS baselines of the ML-100K benchmark, against hand-worked numbers and a
naive per-column least-squares reference for EASE."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.baselines import (
    IALSParams,
    ease_vectors,
    ease_weights,
    ials_vectors,
    interaction_matrix,
    most_popular_vectors,
)


def small_matrix():
    # 4 users × 4 items; a user's duplicate interaction counts once.
    users = np.array([0, 0, 1, 1, 1, 2, 3, 3, 0])
    items = np.array([0, 1, 0, 1, 2, 2, 3, 2, 1])
    return interaction_matrix(users, items, num_users=4, num_items=4)


def test_interaction_matrix_is_binary():
    matrix = small_matrix()
    assert matrix.toarray().tolist() == [
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [0, 0, 1, 0],
        [0, 0, 1, 1],
    ]


def test_interaction_matrix_rejects_length_mismatch():
    with pytest.raises(ValueError, match="user_idx has 2 entries but item_idx has 1"):
        interaction_matrix(np.array([0, 1]), np.array([0]), num_users=2, num_items=2)


def test_most_popular_orders_by_count_then_lower_index():
    user_U1, item_I1 = most_popular_vectors(small_matrix())
    # counts: item 0: 2, item 1: 2, item 2: 3, item 3: 1 → order 2, 0, 1, 3
    order = np.argsort(-(user_U1[0] @ item_I1.T))
    assert order.tolist() == [2, 0, 1, 3]
    assert user_U1.shape == (4, 1)


def naive_ease(X: np.ndarray, l2: float) -> np.ndarray:
    """Column j: argmin ‖X_j − X_{-j} b‖² + λ‖b‖² over the other items (B_jj = 0)."""
    num_items = X.shape[1]
    weights = np.zeros((num_items, num_items))
    for j in range(num_items):
        others = [i for i in range(num_items) if i != j]
        A = X[:, others]
        weights[others, j] = np.linalg.solve(A.T @ A + l2 * np.eye(len(others)), A.T @ X[:, j])
    return weights


@pytest.mark.parametrize("l2", [0.5, 3.0])
def test_ease_matches_per_column_least_squares(l2):
    matrix = small_matrix()
    weights = ease_weights(matrix, l2=l2)
    np.testing.assert_allclose(weights, naive_ease(matrix.toarray().astype(float), l2), atol=1e-10)
    assert np.all(np.diag(weights) == 0)


def test_ease_one_item_pair_by_hand():
    # X = [[1, 1]], λ = 1: G = [[2, 1], [1, 2]], P = G⁻¹ = [[2, −1], [−1, 2]] / 3,
    # B_01 = −P_01 / P_11 = (1/3) / (2/3) = 0.5, and B_10 = 0.5 by symmetry.
    matrix = interaction_matrix(np.array([0, 0]), np.array([0, 1]), num_users=1, num_items=2)
    np.testing.assert_allclose(ease_weights(matrix, l2=1.0), [[0.0, 0.5], [0.5, 0.0]])


def test_ease_vectors_score_is_x_times_b():
    matrix = small_matrix()
    user_UD, item_ID = ease_vectors(matrix, l2=1.0)
    np.testing.assert_allclose(
        user_UD @ item_ID.T, matrix.toarray() @ ease_weights(matrix, l2=1.0), atol=1e-5
    )


def test_ease_rejects_non_positive_l2():
    with pytest.raises(ValueError, match="lambda"):
        ease_weights(small_matrix(), l2=0.0)


def test_ials_shapes_seed_and_signal():
    # Two disjoint groups of users and items: users 0-19 like items 0-4, users 20-39 items 5-9.
    rng = np.random.default_rng(0)
    users, items = [], []
    for user in range(40):
        group = range(5) if user < 20 else range(5, 10)
        for item in rng.choice(list(group), size=3, replace=False):
            users.append(user)
            items.append(item)
    matrix = interaction_matrix(np.array(users), np.array(items), num_users=40, num_items=10)
    params = IALSParams(factors=4, regularization=0.1, alpha=5.0, iterations=10)
    user_UF, item_IF = ials_vectors(matrix, params, seed=0, num_threads=1)
    assert user_UF.shape == (40, 4) and item_IF.shape == (10, 4)
    again_UF, _ = ials_vectors(matrix, params, seed=0, num_threads=1)
    np.testing.assert_allclose(user_UF, again_UF, rtol=1e-5, atol=1e-6)
    scores = user_UF @ item_IF.T
    # Each user's best-scored item comes from their own group.
    assert (scores[:20].argmax(1) < 5).all() and (scores[20:].argmax(1) >= 5).all()
