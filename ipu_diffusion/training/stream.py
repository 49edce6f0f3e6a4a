"""A training stream whose batch ``b`` is a pure function of (seed, b).

Keras ``Model.fit`` owns its dataset iterator, so the iterator cannot go into a
checkpoint. Instead the order is stateless: global example position ``p = b*B + i``
lies in epoch ``e = p // N`` at slot ``p % N``, and the example there is
``perm_e[p % N]`` with ``perm_e`` a permutation drawn from (seed, e). Resuming at step
``k`` is ``Dataset.range(k, ...)``: exactly the batches an uninterrupted run would see.
Each batch also carries ``index`` [B] (the positions ``p``), which keys every random
draw of the step (timestep, noise, dropout, flip) per example.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from ipu_diffusion import rng

SALT_FLIP = rng.salt_of("random_flip")


def _permutation(num: int, seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """A permutation of 0..num-1 drawn statelessly from (seed, epoch), int32 [num]."""
    u = tf.random.stateless_uniform([num], seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
    return tf.cast(tf.argsort(u, stable=True), tf.int32)


def training_stream(images: np.ndarray, labels: Optional[np.ndarray], batch_size: int,
                    seed: int, start_step: int = 0, random_flip: bool = False) -> tf.data.Dataset:
    """Infinite dataset of dicts {image [B,H,W,C] float32, label [B] int32, index [B] int64}.

    ``images`` float32 [N, H, W, C] in [-1, 1]; batch ``b`` of the stream is batch
    ``start_step + b`` of the run.
    """
    num = int(images.shape[0])
    if num == 0:
        raise ValueError("the training set is empty")
    images_t = tf.constant(images, tf.float32)
    labels_t = tf.constant(labels if labels is not None else np.zeros(num), tf.int32)

    def batch(step: tf.Tensor):
        pos = step * batch_size + tf.range(batch_size, dtype=tf.int64)  # [B]
        epochs = pos // num
        first = epochs[0]
        # A batch spans at most two epochs (batch_size <= num is checked below).
        perm = tf.concat([_permutation(num, seed, first), _permutation(num, seed, first + 1)], 0)
        slot = tf.cast(pos - first * num, tf.int32)
        idx = tf.gather(perm, slot)
        x = tf.gather(images_t, idx)
        if random_flip:
            keys = rng.example_keys(seed, 0, pos)
            flip = rng.uniform(keys, (), SALT_FLIP) < 0.5
            x = tf.where(flip[:, None, None, None], tf.reverse(x, axis=[2]), x)
        return {"image": x, "label": tf.gather(labels_t, idx), "index": pos}

    if batch_size > num:
        raise ValueError(f"training.batch_size {batch_size} is larger than the training set ({num})")
    ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
    return ds.map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)
