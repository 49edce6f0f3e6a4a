"""Counter-based per-example random numbers.

Every random draw of training (timestep, noise, dropout mask) is a pure function of
``(seed, step, global example index, salt)``. Because the key belongs to the *example*,
not to the batch or microbatch, splitting a batch into microbatches, replicas or
pipeline stages, or recomputing a stage's forward pass, reproduces exactly the same
numbers as one full-batch step on one device. That is what makes the pipelined update
equal the unsplit one with dropout on.

The generator is a stateless hash (MurmurHash3's 32-bit finaliser applied twice to a
mix of key and counter), built from integer ops that exist on every TensorFlow device
and under XLA. Keys travel as int32 tensors ``[B]``; arithmetic happens in uint32.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence, Union

import tensorflow as tf

_GOLDEN = 0x9E3779B9
_M1 = 0x85EBCA6B
_M2 = 0xC2B2AE35


def salt_of(name: str) -> int:
    """A stable 31-bit salt for a string (e.g. a layer name)."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def _u32(x: Union[int, tf.Tensor]) -> tf.Tensor:
    if isinstance(x, int):
        return tf.constant(x & 0xFFFFFFFF, tf.uint32)
    x = tf.convert_to_tensor(x)
    if x.dtype == tf.uint32:
        return x
    if x.dtype == tf.int32:
        return tf.bitcast(x, tf.uint32)
    return tf.cast(tf.cast(x, tf.int64) & 0xFFFFFFFF, tf.uint32)


def _fmix32(h: tf.Tensor) -> tf.Tensor:
    """MurmurHash3 32-bit finaliser: a bijection on uint32 with full avalanche."""
    rs = tf.bitwise.right_shift
    h = tf.bitwise.bitwise_xor(h, rs(h, _u32(16)))
    h = h * _u32(_M1)
    h = tf.bitwise.bitwise_xor(h, rs(h, _u32(13)))
    h = h * _u32(_M2)
    return tf.bitwise.bitwise_xor(h, rs(h, _u32(16)))


def example_keys(seed, step, index) -> tf.Tensor:
    """int32 ``[B]`` keys for examples ``index`` (int ``[B]``) of training step ``step``."""
    h = _fmix32(_u32(seed) * _u32(_GOLDEN) + _u32(0x632BE5AB))
    h = _fmix32(tf.bitwise.bitwise_xor(h, _u32(step)) * _u32(_M1))
    h = _fmix32(tf.bitwise.bitwise_xor(h, _u32(index)) + _u32(_GOLDEN))
    return tf.bitcast(h, tf.int32)


def _bits(keys: tf.Tensor, shape: Sequence[int], salt: int) -> tf.Tensor:
    """uint32 ``[B, *shape]`` hash bits; ``shape`` excludes the batch axis."""
    k = _fmix32(_u32(keys) + _u32(salt * _M2))  # [B]
    n = 1
    for d in shape:
        n *= int(d)
    counter = tf.range(n, dtype=tf.int32)
    c = _fmix32(_u32(counter) * _u32(_GOLDEN) + _u32(salt))  # [n]
    h = _fmix32(tf.bitwise.bitwise_xor(k[:, None], c[None, :]) * _u32(_M1) + k[:, None])
    return tf.reshape(h, tf.concat([tf.shape(keys)[:1], tf.constant(list(shape), tf.int32)], 0))


def uniform(keys: tf.Tensor, shape: Sequence[int], salt: int, dtype=tf.float32) -> tf.Tensor:
    """Uniform floats in the open interval (0, 1), ``[B, *shape]``, 24 random bits each."""
    top = tf.bitwise.right_shift(_bits(keys, shape, salt), _u32(8))
    u = (tf.cast(tf.bitcast(top, tf.int32), tf.float32) + 0.5) * (1.0 / (1 << 24))
    return tf.cast(u, dtype)


def normal(keys: tf.Tensor, shape: Sequence[int], salt: int, dtype=tf.float32) -> tf.Tensor:
    """Standard normal ``[B, *shape]`` by the Box-Muller transform of two uniforms."""
    u1 = uniform(keys, shape, 2 * salt + 1)
    u2 = uniform(keys, shape, 2 * salt + 2)
    z = tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos((2.0 * math.pi) * u2)
    return tf.cast(z, dtype)


def randint(keys: tf.Tensor, maxval: int, salt: int) -> tf.Tensor:
    """Integers in ``[0, maxval)``, int32 ``[B]`` (bias below 2^-24 * maxval)."""
    u = uniform(keys, (), salt)
    return tf.minimum(tf.cast(u * float(maxval), tf.int32), maxval - 1)


def fold(keys: tf.Tensor, salt: int) -> tf.Tensor:
    """Derived int32 keys ``[B]``, independent of ``keys`` for a different salt."""
    return tf.bitcast(_fmix32(_u32(keys) * _u32(_M2) + _u32(salt * _GOLDEN)), tf.int32)
