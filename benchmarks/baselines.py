"""Non-neural retrieval baselines, each returned as (user vectors, item vectors) whose dot
product is the model's score, so that every model goes through the same
``twotower_core.metrics.retrieval_metrics`` (similarity ``dot``).

Legend: U users, I items, F latent factors.

- MostPop: one score per item, its train click count (ties by the lower index).
- EASE (Steck, "Embarrassingly Shallow Autoencoders", WWW 2019): item-item weights in closed
  form, B = I − P · diag(1 / diag(P)) with P = (XᵀX + λI)⁻¹, i.e. B_ij = −P_ij / P_jj off the
  diagonal and 0 on it; score(u, j) = X_u · B_:j. As vectors: users are their rows of X
  ``[U, I]``, items the columns of B ``[I, I]``.
- iALS: the ``implicit`` package's CPU AlternatingLeastSquares (confidence 1 + α·x), its user
  and item factors ``[U, F]``, ``[I, F]``.

Inputs are the binary train matrix X as ``scipy.sparse.csr_matrix`` ``[U, I]`` (a user's
repeated interactions with an item count once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from twotower_core.metrics import popularity_embeddings


def interaction_matrix(
    user_idx: np.ndarray, item_idx: np.ndarray, *, num_users: int, num_items: int
) -> sp.csr_matrix:
    """Binary ``[U, I]`` float32 CSR with a 1 where the user interacted with the item."""
    if len(user_idx) != len(item_idx):
        raise ValueError(f"user_idx has {len(user_idx)} entries but item_idx has {len(item_idx)}")
    matrix = sp.csr_matrix(
        (np.ones(len(user_idx), dtype=np.float32), (user_idx, item_idx)),
        shape=(num_users, num_items),
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def most_popular_vectors(train_UI: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """MostPop as ([U, 1] ones, [I, 1] scores ordered by train count, ties by lower index)."""
    counts_I = np.asarray(train_UI.sum(axis=0)).ravel()
    user_U1, item_I1 = popularity_embeddings(counts_I, train_UI.shape[0])
    return user_U1.numpy(), item_I1.numpy()


def ease_weights(train_UI: sp.csr_matrix, *, l2: float) -> np.ndarray:
    """EASE item-item weights ``B`` ``[I, I]`` (float64), zero diagonal."""
    if l2 <= 0:
        raise ValueError(f"EASE l2 (lambda) must be > 0, got {l2}")
    gram_II = (train_UI.T @ train_UI).toarray().astype(np.float64)
    gram_II[np.diag_indices_from(gram_II)] += l2
    precision_II = np.linalg.inv(gram_II)
    weights_II = -precision_II / np.diag(precision_II)[None, :]
    weights_II[np.diag_indices_from(weights_II)] = 0.0
    return weights_II


def ease_vectors(train_UI: sp.csr_matrix, *, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """EASE as ([U, I] rows of X, [I, I] columns of B): user_u · item_j = (X B)_uj."""
    weights_II = ease_weights(train_UI, l2=l2)
    return train_UI.toarray().astype(np.float32), np.ascontiguousarray(weights_II.T, np.float32)


@dataclass(frozen=True)
class IALSParams:
    factors: int = 64
    regularization: float = 0.05
    alpha: float = 2.0
    iterations: int = 15


def ials_vectors(
    train_UI: sp.csr_matrix, params: IALSParams, *, seed: int, num_threads: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """iALS user and item factors ``[U, F]``, ``[I, F]`` from ``implicit`` (CPU, no GPU)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    # implicit warns (and slows down) when BLAS runs a thread pool next to its own threads; it
    # checks when the model is built, so both steps run under the limit.
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=params.alpha,
            iterations=params.iterations,
            random_state=seed,
            num_threads=num_threads,
        )
        model.fit(train_UI.astype(np.float32), show_progress=False)
    return np.asarray(model.user_factors), np.asarray(model.item_factors)
