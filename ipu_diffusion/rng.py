"""Counter-based per-example random numbers.

Every random draw of training (timestep, noise, dropout mask) is a pure function of
``(seed, step, global example index, salt)``. Because the key belongs to the *example*,
not to the batch or microbatch, splitting a batch into microbatches, replicas or
pipeline stages, or recomputing a stage's forward pass, reproduces exactly the same
numbers as one full-batch step on one device. That is what makes the pipelined update
equal the unsplit one with dropout on.

The generator is a stateless hash (MurmurHash3's 32-bit finaliser applied twice to a
mix of key and counter), built from integer ops that exist on every TensorFlow device
and under XLA. Keys travel as int32 tensors ``[B]`` and all arithmetic is int32: the
hash runs on the device inside the training step, and the Poplar XLA backend registers
only int32, int64, float32, float16 and bool as device types (``GetIPUSupportedTypes``
in graphcore/tensorflow ``tensorflow/compiler/plugin/poplar/driver/xla_ipu_common.cc``),
so a uint32 hash would not compile for an IPU. The int32 ops give the bits of the
uint32 hash: wrapping multiply and add and xor act on the bit pattern alike; a logical
right shift by ``n`` is the arithmetic shift masked with ``2^(32-n) - 1``; constants
are their two's-complement int32 values; an int64 input (an example index) is reduced
modulo 2^32 into the signed range in int64 before the cast to int32.
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


def _signed32(x: int) -> int:
    """The int32 value with the low 32 bits of the Python int ``x``."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= (1 << 31) else x


def _i32(x: Union[int, tf.Tensor]) -> tf.Tensor:
    """int32 tensor with the low 32 bits of ``x`` (a Python int or an integer tensor)."""
    if isinstance(x, int):
        return tf.constant(_signed32(x), tf.int32)
    x = tf.convert_to_tensor(x)
    if x.dtype == tf.int32:
        return x
    # Low 32 bits in int64 ([0, 2^32)), moved into [-2^31, 2^31), then a lossless cast.
    low = tf.bitwise.bitwise_and(tf.cast(x, tf.int64), tf.constant(0xFFFFFFFF, tf.int64))
    high_bit = tf.bitwise.bitwise_and(low, tf.constant(1 << 31, tf.int64))
    return tf.cast(low - 2 * high_bit, tf.int32)


def _shr(h: tf.Tensor, n: int) -> tf.Tensor:
    """Logical right shift of int32 bit patterns: arithmetic shift, sign bits masked off."""
    return tf.bitwise.bitwise_and(tf.bitwise.right_shift(h, _i32(n)), _i32((1 << (32 - n)) - 1))


def _fmix32(h: tf.Tensor) -> tf.Tensor:
    """MurmurHash3 32-bit finaliser on int32 bit patterns: a bijection, full avalanche."""
    xor = tf.bitwise.bitwise_xor
    h = xor(h, _shr(h, 16))
    h = h * _i32(_M1)
    h = xor(h, _shr(h, 13))
    h = h * _i32(_M2)
    return xor(h, _shr(h, 16))


def example_keys(seed, step, index) -> tf.Tensor:
    """int32 ``[B]`` keys for examples ``index`` (int ``[B]``) of training step ``step``."""
    xor = tf.bitwise.bitwise_xor
    h = _fmix32(_i32(seed) * _i32(_GOLDEN) + _i32(0x632BE5AB))
    h = _fmix32(xor(h, _i32(step)) * _i32(_M1))
    return _fmix32(xor(h, _i32(index)) + _i32(_GOLDEN))


def _bits(keys: tf.Tensor, shape: Sequence[int], salt: int) -> tf.Tensor:
    """int32 ``[B, *shape]`` hash bits; ``shape`` excludes the batch axis."""
    k = _fmix32(_i32(keys) + _i32(salt * _M2))  # [B]
    n = 1
    for d in shape:
        n *= int(d)
    counter = tf.range(n, dtype=tf.int32)
    c = _fmix32(counter * _i32(_GOLDEN) + _i32(salt))  # [n]
    h = _fmix32(tf.bitwise.bitwise_xor(k[:, None], c[None, :]) * _i32(_M1) + k[:, None])
    return tf.reshape(h, tf.concat([tf.shape(keys)[:1], tf.constant(list(shape), tf.int32)], 0))


def uniform(keys: tf.Tensor, shape: Sequence[int], salt: int, dtype=tf.float32) -> tf.Tensor:
    """Uniform floats in the open interval (0, 1), ``[B, *shape]``, 24 random bits each."""
    top = _shr(_bits(keys, shape, salt), 8)  # [0, 2^24): exact in float32
    u = (tf.cast(top, tf.float32) + 0.5) * (1.0 / (1 << 24))
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
    return _fmix32(_i32(keys) * _i32(_M2) + _i32(salt * _GOLDEN))
