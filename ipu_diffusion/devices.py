"""Logical devices: several TensorFlow CPU devices on one CPU, for pipeline stages and
data-parallel replicas when there are not enough GPUs. Must run before TensorFlow
initialises its devices (the CLI calls it first thing)."""
from __future__ import annotations

import tensorflow as tf


def ensure_logical_cpus(count: int) -> int:
    """Make at least ``count`` logical CPU devices; returns how many exist.

    Raises RuntimeError with advice when TensorFlow has already started with fewer.
    """
    if count <= 1 or tf.config.list_physical_devices("GPU"):
        return len(tf.config.list_logical_devices("CPU"))
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) >= count:
        return len(current)
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have >= count:
            return have
        raise RuntimeError(f"{count} logical CPU devices are needed but TensorFlow already "
                           f"started with {have}; call ensure_logical_cpus({count}) before "
                           "any TensorFlow op runs") from None
    return count
