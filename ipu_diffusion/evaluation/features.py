"""What every feature network offers the metrics, and batched feature extraction.

A feature network maps images float32 ``[N, H, W, C]`` in [-1, 1] to features
``[N, D]`` (for FID, KID, precision/recall) and classifier logits ``[N, K]`` (for the
Inception Score and label agreement). Its ``identity`` string names the network and
its weights; caches of reference statistics store it and are recomputed when it
changes.
"""
from __future__ import annotations

import abc
from typing import Callable, Tuple

import numpy as np

from ipu_diffusion.progress import Progress


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; the message names the key or file at fault."""


def check_images(images, name: str = "images") -> np.ndarray:
    """Validate float images ``[N, H, W, C]`` (C = 1 or 3) in [-1, 1]; returns float32."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] == 0:
        raise EvaluationError(f"{name}: expected a non-empty NHWC array [N, H, W, C] with "
                              f"C = 1 or 3, got shape {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise EvaluationError(f"{name}: expected floats in [-1, 1], got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise EvaluationError(f"{name}: contains NaN or infinite values")
    return x.astype(np.float32, copy=False)


class FeatureNet(abc.ABC):
    """Base of the feature networks. Subclasses set ``identity`` (a string naming the
    network and its weights) and implement :meth:`_batch`."""

    identity: str = ""

    @abc.abstractmethod
    def _batch(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """float32 ``[b, H, W, C]`` in [-1, 1] -> (features ``[b, D]``, logits ``[b, K]``)."""

    def __call__(self, images, batch_size: int = 250,
                 verbose: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        """Features float64 ``[N, D]`` and logits float64 ``[N, K]`` of ``images``."""
        return extract(self._batch, check_images(images), batch_size, verbose)


def extract(fn: Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]], images: np.ndarray,
            batch_size: int, verbose: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Run ``fn`` over ``images`` in batches (progress bar when ``verbose`` and there is
    more than one batch) and concatenate its two outputs as float64."""
    if batch_size <= 0:
        raise EvaluationError(f"batch_size must be > 0, got {batch_size}")
    n = len(images)
    bar = Progress(n, "features") if verbose and n > batch_size else None
    feats, logits = [], []
    for start in range(0, n, batch_size):
        f, z = fn(images[start:start + batch_size])
        feats.append(np.asarray(f, np.float64))
        logits.append(np.asarray(z, np.float64))
        if bar is not None:
            bar.add(len(f))
    return np.concatenate(feats), np.concatenate(logits)
