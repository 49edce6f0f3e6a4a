"""The Keras in use: Keras 3 by default, Keras 2 (tf_keras) with TF_USE_LEGACY_KERAS=1,
Graphcore's Keras 2.6 fork inside the Poplar SDK. Model code imports ``keras`` from here
and uses only APIs common to all three."""
from __future__ import annotations

import tensorflow as tf

keras = tf.keras


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 2


KERAS_MAJOR = _major(getattr(keras, "__version__", "2"))
IS_KERAS3 = KERAS_MAJOR >= 3
