"""Helpers of the IPU tests: a small class-conditional variant of digits.yaml."""
from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "pipeline_configs", "digits.yaml")
# digits.yaml with ch 8 and two resolutions (16x16, and 8x8 with attention), 10 classes,
# 4 stages of M = 8 microbatches
SMALL = ["model.ch=8", "model.ch_mult=[1,2]", "model.num_classes=10", "data.use_labels=true",
         "model.dropout=0.2", "pipeline.stages=4", "pipeline.microbatches=8",
         "training.batch_size=64"]


def small_config(*overrides: str):
    from ipu_diffusion.config import load_config

    return load_config(DIGITS, SMALL + list(overrides))


def batch(n: int, offset: int = 0):
    """A micro-batch ``{x0 [n,16,16,1], key [n], y [n]}`` of examples ``offset ..``."""
    import tensorflow as tf

    from ipu_diffusion import rng

    index = tf.range(offset, offset + n, dtype=tf.int64)
    return {"x0": tf.random.stateless_uniform([n, 16, 16, 1], (7, offset), -1.0, 1.0),
            "key": rng.example_keys(0, 0, index), "y": tf.cast(index % 10, tf.int32)}
