"""Sample-quality metrics on feature arrays (numpy float64; no TensorFlow).

- FID: Fréchet distance between Gaussian fits of two feature sets (Heusel et al. 2017,
  eq. 6; Dowson & Landau 1982): ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``.
- KID: unbiased MMD^2 with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``,
  averaged over random subsets (Bińkowski et al. 2018, eq. 2 and sec. 4).
- Inception Score: ``exp(E_x KL(p(y|x) || p(y)))`` over splits (Salimans et al. 2016).
- Precision / recall of k-NN manifolds (Kynkäänniemi et al. 2019, eq. 1-3, k = 3).

Features are ``[N, D]``; logits ``[N, K]``.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Tuple

import numpy as np

#: Rows of a pairwise-distance block; bounds memory to ROW_BLOCK x N float64 values.
ROW_BLOCK = 1024


def single_blas_thread() -> ContextManager[object]:
    """Limit BLAS to one thread for many small products (KID's 100 subsets): a
    multi-threaded BLAS spends more time synchronising than computing on them, badly
    so on a busy machine. Uses threadpoolctl (a scikit-learn dependency) if present."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn always brings it
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _as_features(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name}: expected features [N, D] with N >= 2, got shape {list(x.shape)}")
    return x


def gaussian_stats(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of features ``[N, D]``."""
    f = _as_features(features, "features")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigendecomposition
    (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr((S1 S2)^(1/2))`` for symmetric PSD ``S1``, ``S2``.

    ``S1 S2`` is similar to the symmetric PSD ``M = S1^(1/2) S2 S1^(1/2)``
    (conjugate by ``S1^(1/2)``), so its square root has trace ``sum(sqrt(eig(M)))``.
    This needs no general (complex) matrix square root and no diagonal offset, and it
    holds for singular covariances (fewer samples than dimensions).
    """
    root1 = _psd_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (Heusel et al. 2017, eq. 6).

    ``mu`` ``[D]``, ``sigma`` ``[D, D]``. Clipped at 0: the distance is non-negative and
    only round-off makes it negative for (nearly) equal Gaussians.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes disagree: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return max(float(value), 0.0)


def fid(features1, features2) -> float:
    """FID between two feature sets ``[N1, D]`` and ``[N2, D]``."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between equal-size samples with ``k = (x.y/d + 1)^3``
    (Bińkowski et al. 2018, eq. 2: the diagonal terms k(x_i, x_i) are left out)."""
    m, d = x.shape

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        k = a @ b.T / d + 1.0
        return k * k * k

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    off_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    off_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off_x + off_y - 2.0 * kxy.mean())


def kid(features1, features2, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> Tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation of the unbiased MMD^2 over
    ``num_subsets`` random subsets drawn without replacement from each set (Bińkowski et
    al. 2018, sec. 4; their reference code uses 100 subsets of 1000).

    The subset size is ``min(subset_size, N1 // 2, N2 // 2)``: at most half of each
    set, so subsets differ and the spread is informative even for small sets (the
    mean stays unbiased for any size; with 2,000 or more samples per set this is the
    reference's 1000)."""
    f1, f2 = _as_features(features1, "features1"), _as_features(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"kid: feature widths differ: {f1.shape[1]} vs {f2.shape[1]}")
    m = min(subset_size, len(f1) // 2, len(f2) // 2)
    if m < 2:
        raise ValueError(f"kid: need at least 4 samples per set, got {len(f1)} and {len(f2)}")
    rs = np.random.RandomState(seed)
    with single_blas_thread():
        values = [_polynomial_mmd2(f1[rs.choice(len(f1), m, replace=False)],
                                   f2[rs.choice(len(f2), m, replace=False)])
                  for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def inception_score(logits, splits: int = 10) -> Tuple[float, float]:
    """Inception Score from classifier logits ``[N, K]``: ``exp(E_x KL(p(y|x) || p(y)))``
    per split, ``p(y)`` the split's mean prediction (Salimans et al. 2016, sec. 4);
    returns the mean and standard deviation over ``splits`` contiguous splits, as the
    reference code does. Uniform predictions give 1; confident predictions spread
    evenly over k classes give k."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or len(z) < splits:
        raise ValueError(f"inception_score: expected logits [N, K] with N >= splits ({splits}), "
                         f"got shape {list(z.shape)}")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # log p(y|x), stable
    scores = []
    for part in np.array_split(log_p, splits):
        log_py = np.log(np.exp(part).mean(axis=0))  # log p(y) of this split
        kl = (np.exp(part) * (part - log_py)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[len(a), len(b)]``, clipped at 0."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def knn_radii(features: np.ndarray, k: int = 3) -> np.ndarray:
    """Squared distance of each sample to its k-th nearest other sample ``[N]``."""
    radii = np.empty(len(features))
    for start in range(0, len(features), ROW_BLOCK):
        d2 = _sq_distances(features[start:start + ROW_BLOCK], features)
        radii[start:start + ROW_BLOCK] = np.partition(d2, k, axis=1)[:, k]  # index 0 is self
    return radii


def manifold_coverage(reference: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Fraction of ``queries`` inside the union of balls around ``reference`` samples
    with squared radii ``radii`` (Kynkäänniemi et al. 2019, eq. 1-2)."""
    inside = 0
    for start in range(0, len(queries), ROW_BLOCK):
        d2 = _sq_distances(queries[start:start + ROW_BLOCK], reference)
        inside += int((d2 <= radii[None, :]).any(axis=1).sum())
    return inside / len(queries)


def precision_recall(real_features, fake_features, k: int = 3) -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 3, k = 3):
    precision = fraction of fakes inside the real manifold, recall = fraction of reals
    inside the fake manifold; manifolds are unions of k-NN balls. Distances are
    computed in blocks of :data:`ROW_BLOCK` rows."""
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall: need more than k={k} samples per set, "
                         f"got {len(real)} real and {len(fake)} fake")
    precision = manifold_coverage(real, knn_radii(real, k), fake)
    recall = manifold_coverage(fake, knn_radii(fake, k), real)
    return precision, recall
