"""The embedded default data set: scikit-learn's 8x8 handwritten digits.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey images (values 0..16, ten
classes) inside the package, so a run needs no download. They are scaled to [-1, 1],
resized bilinearly to ``model.image_size`` and split once, with a fixed seed and
stratified by label, into a training part and a held-out test part
(``data.test_fraction``) that evaluation compares samples against.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

from ipu_diffusion.data.common import DataError, convert_channels

#: Seed of the train/test split. Fixed forever: changing it changes the test set and so
#: every cached reference statistic and every reported metric.
SPLIT_SEED = 0
#: Largest pixel value in the scikit-learn digits (4x4 blocks of a 32x32 bitmap, counted).
DIGITS_MAX = 16.0

_CACHE: Dict[Tuple[int, int, float], Tuple[np.ndarray, ...]] = {}


def _split_indices(labels: np.ndarray, test_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices (sorted), deterministic under :data:`SPLIT_SEED`."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    if test_fraction <= 0.0:
        return idx, idx[:0]
    train, test = train_test_split(idx, test_size=test_fraction, random_state=SPLIT_SEED,
                                   stratify=labels)
    return np.sort(train), np.sort(test)


def _load(image_size: int, channels: int, test_fraction: float) -> Tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = bunch.images.astype(np.float32)  # [1797, 8, 8] in 0..16
    labels = bunch.target.astype(np.int32)
    x = pixels[..., None] * np.float32(2.0 / DIGITS_MAX) - np.float32(1.0)  # [-1, 1]
    if image_size != x.shape[1]:
        # Half-pixel-centred bilinear; antialiased when shrinking below 8x8.
        x = tf.image.resize(x, (image_size, image_size), method="bilinear",
                            antialias=True).numpy()
        x = np.clip(x, -1.0, 1.0).astype(np.float32)
    x = convert_channels(x, channels, "data.source 'digits'")
    train, test = _split_indices(labels, test_fraction)
    return x[train], labels[train], x[test], labels[test]


def load_digits_split(image_size: int, channels: int, test_fraction: float,
                      split: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The digits ``split`` ("train" or "test") as float32 ``[N, S, S, C]`` in [-1, 1]
    and int32 labels ``[N]``. With the default ``test_fraction`` 0.2 the split is
    1,437 / 360 images, 10 classes in equal proportion in both parts."""
    key = (int(image_size), int(channels), float(test_fraction))
    if key not in _CACHE:
        _CACHE[key] = _load(*key)
    x_train, y_train, x_test, y_test = _CACHE[key]
    if split == "train":
        return x_train.copy(), y_train.copy()
    if len(x_test) == 0:
        raise DataError("data.test_fraction is 0, so the digits have no test split; "
                        "set data.test_fraction in (0, 1) to hold out images for evaluation")
    return x_test.copy(), y_test.copy()
