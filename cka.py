"""Representation alignment between two class spaces: CKA, unbiased CKA, CKNNA, mutual kNN.

ScoreMix (Rahimi & Marcel, Sec. 5) asks whether the generator's learned class-condition vectors
arrange the identities the way the discriminator's class centres do. Rows of X and Y are paired
(one row per class); the metrics follow the platonic-representation code (Huh et al. 2024) and
PROTOCOLS.md section 6. Rows are L2-normalised first, everything in float64.

The command compares, for every generator snapshot and discriminator given:
  generator condition vectors  vs  each discriminator's class centres   (the paper's ~0.35)
  discriminator                vs  discriminator                         (the paper's ~0.95)
and a permutation null (the rows of one space shuffled: mean +- std over --permutations).

    python cka.py --generator RUN/network-snapshot-*.pt --fr BASE/model.pt --data DATA/train --out cka.json
"""
import argparse
import json
import os
import re

import numpy as np


def as_float64(X):
    X = X.detach().cpu().numpy() if hasattr(X, "detach") else np.asarray(X)
    return X.astype(np.float64)


def l2_normalise(X):
    X = as_float64(X)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def hsic_biased(K, L):
    n = K.shape[0]
    H = np.eye(n) - 1.0 / n
    return np.trace(K @ H @ L @ H)


def hsic_unbiased(K, L):
    """Song et al. 2012, eq. 5: an unbiased HSIC estimator from kernels with zeroed diagonals."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    value = (np.sum(K * L.T) + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2 * np.sum(K @ L) / (n - 2))
    return value / (n * (n - 3))


def _cka(X, Y, hsic):
    X, Y = as_float64(X), as_float64(Y)
    K, L = X @ X.T, Y @ Y.T
    return float(hsic(K, L) / (np.sqrt(hsic(K, K) * hsic(L, L)) + 1e-6))


def linear_cka(X, Y):
    return _cka(X, Y, hsic_biased)


def unbiased_cka(X, Y):
    return _cka(X, Y, hsic_unbiased)


def knn_mask(K, k):
    """M[i, j] = 1 where j is among the k rows with the largest inner product with row i (self excluded)."""
    K = K.copy()
    np.fill_diagonal(K, -np.inf)
    idx = np.argsort(-K, axis=1, kind="stable")[:, :k]
    M = np.zeros_like(K)
    np.put_along_axis(M, idx, 1.0, axis=1)
    return M


def cknna(X, Y, k):
    """CKNNA (Huh et al. 2024): unbiased HSIC restricted to pairs that are mutual k-nearest
    neighbours in both spaces (row-wise masks, not symmetrised). k = n-1 gives unbiased CKA."""
    X, Y = as_float64(X), as_float64(Y)
    K, L = X @ X.T, Y @ Y.T

    def masked_hsic(K, L):
        M = knn_mask(K, k) * knn_mask(L, k)
        return hsic_unbiased(M * K, M * L)

    return float(masked_hsic(K, L) / (np.sqrt(masked_hsic(K, K) * masked_hsic(L, L)) + 1e-6))


def mutual_knn(X, Y, k):
    """Mean over rows of |kNN_X(i) & kNN_Y(i)| / k."""
    X, Y = as_float64(X), as_float64(Y)
    return float(np.mean((knn_mask(X @ X.T, k) * knn_mask(Y @ Y.T, k)).sum(axis=1) / k))
