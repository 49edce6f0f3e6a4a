"""Keras layers of the diffusion U-Net (Ho et al. 2020, appendix B; Nichol & Dhariwal 2021).

All tensors are NHWC: images ``[B, H, W, C]``, embeddings ``[B, E]``, per-example int32
keys and timesteps ``[B]``. Layers follow the Keras dtype policy (mixed precision);
group normalisation computes its statistics in float32 and the output block returns
float32. Only APIs common to Keras 2 (Graphcore's 2.6 fork, tf_keras) and Keras 3 are
used: ``Layer`` subclasses with ``build``/``call(inputs, training=None)``, and TensorFlow
ops only inside ``call``.

Initialisation follows the DDPM reference: variance scaling (scale 1, fan_avg, uniform)
for every conv and dense layer, and zero for the last conv of each residual block, the
attention output projection and the output conv (DDPM uses scale 1e-10; improved DDPM
zeros them), so each block starts as the identity.
"""
from __future__ import annotations

import math
from typing import Optional

import tensorflow as tf

from ipu_diffusion import rng
from ipu_diffusion._keras import keras

# Group normalisation lives in norm.py; re-exported here for the layers that use it.
from ipu_diffusion.models.norm import (GROUP_NORM_EPSILON, GroupNorm, group_norm,  # noqa: E402,F401
                                       norm_act, set_group_norm_factory)


def default_init(scale: float = 1.0):
    """DDPM's ``default_init``: variance scaling, fan_avg, uniform; ``scale == 0`` is zeros."""
    if scale == 0.0:
        return keras.initializers.Zeros()
    return keras.initializers.VarianceScaling(scale=scale, mode="fan_avg", distribution="uniform")


def conv(filters: int, kernel: int, name: str, strides: int = 1, scale: float = 1.0,
         dtype=None) -> keras.layers.Layer:
    """``[B, H, W, Cin] -> [B, H/strides, W/strides, filters]``, SAME padding, with bias."""
    return keras.layers.Conv2D(filters, kernel, strides=strides, padding="same",
                               kernel_initializer=default_init(scale), name=name, dtype=dtype)


def dense(units: int, name: str, scale: float = 1.0) -> keras.layers.Layer:
    return keras.layers.Dense(units, kernel_initializer=default_init(scale), name=name)


def build_child(layer: keras.layers.Layer, shape) -> None:
    """Build a sub-layer inside its own name scope (unique weight names under Keras 2)."""
    with tf.name_scope(layer.name):
        layer.build(shape)


def timestep_embedding(t: tf.Tensor, dim: int) -> tf.Tensor:
    """Sinusoidal embedding ``[B] -> [B, dim]`` float32, DDPM's ``get_timestep_embedding``
    (Vaswani et al. 2017, section 3.5): ``[sin(t w_i), cos(t w_i)]`` with
    ``w_i = 10000^(-i / (dim/2 - 1))``; zero-padded when ``dim`` is odd."""
    half = dim // 2
    freqs = tf.exp(tf.range(half, dtype=tf.float32) * (-math.log(10000.0) / max(half - 1, 1)))
    args = tf.cast(t, tf.float32)[:, None] * freqs[None, :]
    emb = tf.concat([tf.sin(args), tf.cos(args)], axis=1)
    if dim % 2:
        emb = tf.pad(emb, [[0, 0], [0, 1]])
    return emb


def upsample_nearest(x: tf.Tensor) -> tf.Tensor:
    """Nearest-neighbour x2: ``[B, H, W, C] -> [B, 2H, 2W, C]`` (one broadcast copy)."""
    _, h, w, c = x.shape
    b = tf.shape(x)[0]
    x = tf.broadcast_to(tf.reshape(x, [b, h, 1, w, 1, c]), [b, h, 2, w, 2, c])
    return tf.reshape(x, [b, 2 * h, 2 * w, c])


def downsample_avg(x: tf.Tensor) -> tf.Tensor:
    """2x2 average pooling, stride 2: ``[B, H, W, C] -> [B, H/2, W/2, C]``."""
    return tf.nn.avg_pool2d(x, ksize=2, strides=2, padding="VALID")


# Calls hold only static Python control flow: skip AutoGraph's source conversion (slow).
_no_autograph = tf.autograph.experimental.do_not_convert


def _shape(shape) -> tuple:
    """A shape (tuple or TensorShape, Keras 3 or 2) as a tuple of ints/None."""
    return tuple(None if d is None else int(d) for d in shape)


def _resampled(shape, resample: Optional[str], channels: int) -> tuple:
    """``[B, H, W, C]`` after optional x2 up/down sampling, with ``channels`` channels."""
    b, h, w, _ = _shape(shape)
    f = {"up": lambda d: None if d is None else 2 * d,
         "down": lambda d: None if d is None else d // 2}.get(resample, lambda d: d)
    return (b, f(h), f(w), channels)


class TimestepEmbed(keras.layers.Layer):
    """``t [B]`` (and ``y [B]`` when ``num_classes > 0``) -> ``emb [B, 4ch]``.

    Sinusoidal embedding of width ``ch`` -> Dense(4ch) -> swish -> Dense(4ch) (DDPM); with
    classes, a learned label embedding of ``num_classes + 1`` rows is added (row
    ``num_classes`` is the null label of classifier-free guidance, Ho & Salimans 2022).
    """

    def __init__(self, ch: int, num_classes: int = 0, name: Optional[str] = None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.ch = ch
        self.dense0 = dense(4 * ch, "dense0")
        self.dense1 = dense(4 * ch, "dense1")
        self.label_emb = None
        if num_classes > 0:
            self.label_emb = keras.layers.Embedding(
                num_classes + 1, 4 * ch, embeddings_initializer="random_normal", name="label_emb")

    def build(self, input_shape):
        build_child(self.dense0, (None, self.ch))
        build_child(self.dense1, (None, 4 * self.ch))
        if self.label_emb is not None:
            build_child(self.label_emb, (None,))
        self.built = True

    @_no_autograph
    def call(self, inputs, training=None):
        t, y = (inputs[0], inputs[1]) if self.label_emb is not None else (inputs, None)
        emb = self.dense1(tf.nn.silu(self.dense0(timestep_embedding(t, self.ch))))
        if y is not None:
            emb = emb + tf.cast(self.label_emb(y), emb.dtype)
        return emb

    def compute_output_shape(self, input_shape):
        t_shape = input_shape[0] if self.label_emb is not None else input_shape
        return (_shape(t_shape)[0], 4 * self.ch)


def _keep_mask_math(key, shape, salt: int, rate: float):
    """Inverted-dropout multiplier ``[B, *shape]``: 0 or 1/(1-rate), float32."""
    u = rng.uniform(rng.fold(key, salt), shape, salt)
    return tf.cast(u >= rate, tf.float32) * (1.0 / (1.0 - rate))


# The hash is ~20 elementwise integer ops: fused by XLA into one pass.
_keep_mask = tf.function(_keep_mask_math, jit_compile=True, autograph=False)


class KeyedDropout(keras.layers.Layer):
    """Stateless inverted dropout keyed per example: ``[h [B, ...], key int32 [B]] -> h``.

    The mask of example ``b`` is ``rng.uniform(fold(key_b, salt), shape, salt) >= rate``
    with ``salt = rng.salt_of(salt_name)``: a pure function of the example's key and the
    layer, so a recomputed forward, a microbatch or a pipeline stage reproduces it exactly.
    Active only when ``training`` is true.
    """

    def __init__(self, rate: float, salt_name: str, name: Optional[str] = None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.rate = float(rate)
        self.salt = rng.salt_of(salt_name)

    def build(self, input_shape):
        self.built = True

    @_no_autograph
    def call(self, inputs, training=None):
        h, key = inputs
        if self.rate <= 0.0 or training is None or training is False:
            return h
        keep = _keep_mask(key, tuple(int(d) for d in h.shape[1:]), self.salt, self.rate)
        dropped = h * tf.cast(keep, h.dtype)
        if isinstance(training, bool):
            return dropped
        return tf.cond(tf.cast(training, tf.bool), lambda: dropped, lambda: h)

    def compute_output_shape(self, input_shape):
        return _shape(input_shape[0])


class ResBlock(keras.layers.Layer):
    """Residual block: ``[x [B,H,W,Cin], emb [B,E], key [B]] -> [B,H',W',Cout]``.

    GroupNorm -> swish -> (BigGAN up/down) -> conv3x3 -> + Dense(swish(emb)) -> GroupNorm
    -> swish -> dropout -> conv3x3 (zero init), plus the (resampled) input through a 1x1
    conv when ``Cin != Cout`` (Ho et al. 2020, appendix B). With ``use_scale_shift_norm``
    the embedding gives ``(scale, shift)`` and the second norm becomes
    ``norm(h) * (1 + scale) + shift`` (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021).
    ``resample`` "up"/"down" resamples without conv inside the block (BigGAN, Brock et al.
    2019; ``resblock_updown``): ``H' = 2H`` or ``H/2``.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, num_groups: int,
                 dropout: float, salt_name: str, use_scale_shift_norm: bool = False,
                 resample: Optional[str] = None, zero_init: bool = True,
                 name: Optional[str] = None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.use_scale_shift_norm, self.resample = use_scale_shift_norm, resample
        self.norm1 = group_norm(num_groups, "norm1")
        self.conv1 = conv(out_channels, 3, "conv1")
        self.emb_proj = dense(out_channels * (2 if use_scale_shift_norm else 1), "emb_proj")
        self.norm2 = group_norm(num_groups, "norm2")
        self.dropout = KeyedDropout(dropout, salt_name, name="dropout")
        self.conv2 = conv(out_channels, 3, "conv2", scale=0.0 if zero_init else 1.0)
        self.skip = conv(out_channels, 1, "skip") if in_channels != out_channels else None

    def build(self, input_shape):
        x_shape = (None, None, None, self.in_channels)
        h_shape = (None, None, None, self.out_channels)
        build_child(self.norm1, x_shape)
        build_child(self.conv1, x_shape)
        build_child(self.emb_proj, (None, self.emb_channels))
        build_child(self.norm2, h_shape)
        build_child(self.conv2, h_shape)
        if self.skip is not None:
            build_child(self.skip, x_shape)
        self.built = True

    def _resample(self, x: tf.Tensor) -> tf.Tensor:
        if self.resample == "up":
            return upsample_nearest(x)
        if self.resample == "down":
            return downsample_avg(x)
        return x

    @_no_autograph
    def call(self, inputs, training=None):
        x, emb, key = inputs
        h = norm_act(self.norm1, x)
        h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)
        e = self.emb_proj(tf.nn.silu(emb))[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = tf.split(e, 2, axis=-1)
            h = norm_act(self.norm2, h, scale=scale, shift=shift)
        else:
            h = norm_act(self.norm2, h, add=e)
        h = self.dropout([h, key], training=training)
        h = self.conv2(h)
        if self.skip is not None:
            x = self.skip(x)
        return x + h

    def compute_output_shape(self, input_shape):
        return _resampled(input_shape[0], self.resample, self.out_channels)


class AttentionBlock(keras.layers.Layer):
    """Self-attention over positions: ``[B, H, W, C] -> [B, H, W, C]``, residual.

    GroupNorm -> qkv 1x1 conv -> per-head softmax(q k^T / sqrt(d)) v as batched matmuls over
    ``[B, heads, HW, d]`` (``d = C / heads``) -> proj_out 1x1 conv (zero init) -> + x
    (Ho et al. 2020, appendix B; heads as in Nichol & Dhariwal 2021). The softmax runs in
    float32 under mixed precision.
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int, zero_init: bool = True,
                 name: Optional[str] = None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.channels, self.num_heads = channels, num_heads
        self.norm = group_norm(num_groups, "norm")
        self.qkv = conv(3 * channels, 1, "qkv")
        self.proj_out = conv(channels, 1, "proj_out", scale=0.0 if zero_init else 1.0)

    def build(self, input_shape):
        shape = (None, None, None, self.channels)
        build_child(self.norm, shape)
        build_child(self.qkv, shape)
        build_child(self.proj_out, shape)
        self.built = True

    @_no_autograph
    def call(self, inputs, training=None):
        _, hh, ww, c = inputs.shape
        heads, d, n = self.num_heads, c // self.num_heads, hh * ww
        b = tf.shape(inputs)[0]
        qkv = self.qkv(norm_act(self.norm, inputs, swish=False))  # [B, H, W, 3C], channels ordered (q|k|v, head, d)
        if heads == 1:
            q, k, v = tf.split(tf.reshape(qkv, [b, n, 3 * c]), 3, axis=-1)  # [B, HW, C]
        else:
            qkv = tf.transpose(tf.reshape(qkv, [b, n, 3, heads, d]), [2, 0, 3, 1, 4])
            q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, HW, d]
        logits = tf.matmul(q * tf.cast(d ** -0.5, q.dtype), k, transpose_b=True)
        weights = tf.cast(tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1), v.dtype)
        a = tf.matmul(weights, v)
        if heads > 1:
            a = tf.transpose(a, [0, 2, 1, 3])  # [B, HW, heads, d]
        return inputs + self.proj_out(tf.reshape(a, [b, hh, ww, c]))

    def compute_output_shape(self, input_shape):
        return _shape(input_shape)


class ResAttnBlock(keras.layers.Layer):
    """A U-Net block: optional skip concatenation, a :class:`ResBlock`, optional attention.

    Inputs ``[h, emb, key]``, or ``[h, skip, emb, key]`` on the up path, where
    ``concat([h, skip])`` (channels ``Cin = Ch + Cskip``) enters the residual block.
    Output ``[B, H', W', Cout]``.
    """

    def __init__(self, resblock: ResBlock, attention: Optional[AttentionBlock] = None,
                 concat_skip: bool = False, name: Optional[str] = None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.res, self.attn, self.concat_skip = resblock, attention, concat_skip

    def build(self, input_shape):
        build_child(self.res, None)
        if self.attn is not None:
            build_child(self.attn, None)
        self.built = True

    @_no_autograph
    def call(self, inputs, training=None):
        if self.concat_skip:
            h, skip, emb, key = inputs
            h = tf.concat([h, skip], axis=-1)
        else:
            h, emb, key = inputs
        h = self.res([h, emb, key], training=training)
        if self.attn is not None:
            h = self.attn(h, training=training)
        return h

    def compute_output_shape(self, input_shape):
        return _resampled(input_shape[0], self.res.resample, self.res.out_channels)


class _Resample(keras.layers.Layer):
    """x2 resampling of ``[B, H, W, C]`` with an optional 3x3 conv (``channels`` kept)."""

    direction = ""

    def __init__(self, channels: int, with_conv: bool, name: Optional[str] = None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.channels = channels
        strides = 2 if self.direction == "down" else 1
        self.conv = conv(channels, 3, "conv", strides=strides) if with_conv else None

    def build(self, input_shape):
        if self.conv is not None:
            build_child(self.conv, (None, None, None, self.channels))
        self.built = True

    def compute_output_shape(self, input_shape):
        return _resampled(input_shape, self.direction, self.channels)


class Downsample(_Resample):
    """``[B, H, W, C] -> [B, H/2, W/2, C]``: 3x3 conv with stride 2 (``with_conv``, SAME
    padding as DDPM) or 2x2 average pooling."""

    direction = "down"

    @_no_autograph
    def call(self, inputs, training=None):
        return self.conv(inputs) if self.conv is not None else downsample_avg(inputs)


class Upsample(_Resample):
    """``[B, H, W, C] -> [B, 2H, 2W, C]``: nearest x2, then a 3x3 conv if ``with_conv``."""

    direction = "up"

    @_no_autograph
    def call(self, inputs, training=None):
        h = upsample_nearest(inputs)
        return self.conv(h) if self.conv is not None else h


class OutBlock(keras.layers.Layer):
    """``[B, H, W, C] -> [B, H, W, out_channels]``: GroupNorm -> swish -> conv3x3 (zero
    init). Runs in float32 whatever the dtype policy, so the U-Net's output is float32."""

    def __init__(self, channels: int, out_channels: int, num_groups: int, zero_init: bool = True,
                 name: Optional[str] = None, **kwargs):
        super().__init__(name=name, dtype="float32", **kwargs)
        self.channels, self.out_channels = channels, out_channels
        self.norm = group_norm(num_groups, "norm", dtype="float32")
        self.conv = conv(out_channels, 3, "conv", scale=0.0 if zero_init else 1.0, dtype="float32")

    def build(self, input_shape):
        build_child(self.norm, (None, None, None, self.channels))
        build_child(self.conv, (None, None, None, self.channels))
        self.built = True

    @_no_autograph
    def call(self, inputs, training=None):
        return self.conv(norm_act(self.norm, inputs))

    def compute_output_shape(self, input_shape):
        return _shape(input_shape)[:3] + (self.out_channels,)
