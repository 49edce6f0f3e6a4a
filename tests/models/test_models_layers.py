"""Layers against closed forms: sinusoidal embedding, keyed dropout, multi-head attention,
resampling; the GroupNorm factory hook; float32 output under mixed precision."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion import rng
from ipu_diffusion._keras import keras
from ipu_diffusion.config import ModelConfig
from ipu_diffusion.models import layers as L
from ipu_diffusion.models.unet import build_unet

pytestmark = pytest.mark.keras2

TINY = ModelConfig(image_size=4, in_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1,
                   attn_resolutions=(4,), num_groups=4, dropout=0.1)


def test_timestep_embedding_closed_form():
    # DDPM get_timestep_embedding: [sin(t w_i), cos(t w_i)], w_i = 10000^(-i/(half-1)).
    t = np.array([0, 1, 17, 999])
    dim, half = 10, 5
    w = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))
    want = np.concatenate([np.sin(t[:, None] * w), np.cos(t[:, None] * w)], axis=1)
    got = L.timestep_embedding(tf.constant(t, tf.int32), dim).numpy()
    np.testing.assert_allclose(got, want, atol=2e-4)  # float32 arguments up to 999
    odd = L.timestep_embedding(tf.constant(t, tf.int32), dim + 1).numpy()
    np.testing.assert_array_equal(odd[:, -1], 0.0)


def test_keyed_dropout_mask_is_the_documented_function_of_key():
    rate, name = 0.25, "down0_res0/dropout"
    layer = L.KeyedDropout(rate, name)
    keys = tf.constant([7, -3, 123456], tf.int32)
    ones = tf.ones([3, 4, 4, 16])
    out = layer([ones, keys], training=True).numpy()
    salt = rng.salt_of(name)
    u = rng.uniform(rng.fold(keys, salt), (4, 4, 16), salt).numpy()
    np.testing.assert_allclose(out, np.where(u >= rate, 1.0 / (1.0 - rate), 0.0), rtol=1e-6)
    assert abs((out == 0).mean() - rate) < 0.06
    np.testing.assert_array_equal(layer([ones[1:2], keys[1:2]], training=True).numpy(), out[1:2])
    np.testing.assert_array_equal(layer([ones, keys], training=False).numpy(), ones.numpy())
    other = L.KeyedDropout(rate, "down0_res1/dropout")([ones, keys], training=True).numpy()
    assert np.any(other != out)  # another layer draws another mask for the same key


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_matches_numpy(heads):
    layer = L.AttentionBlock(8, heads, num_groups=2, zero_init=False)
    x = tf.random.stateless_normal([2, 3, 3, 8], seed=[1, 2])
    got = layer(x).numpy()
    qkv = layer.qkv(layer.norm(x)).numpy().reshape(2, 9, 3, heads, 8 // heads)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, heads, HW, d]
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(8 // heads)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    a = (w / w.sum(-1, keepdims=True)) @ v
    a = a.transpose(0, 2, 1, 3).reshape(2, 3, 3, 8)
    want = x.numpy() + layer.proj_out(tf.constant(a)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_attention_starts_as_identity():
    x = tf.random.stateless_normal([1, 2, 2, 8], seed=[3, 4])
    np.testing.assert_array_equal(L.AttentionBlock(8, 2, 2)(x).numpy(), x.numpy())


def test_resampling_shapes_and_values():
    x = tf.reshape(tf.range(2 * 4 * 4 * 3, dtype=tf.float32), [2, 4, 4, 3])
    up = L.upsample_nearest(x).numpy()
    np.testing.assert_array_equal(up, np.repeat(np.repeat(x.numpy(), 2, axis=1), 2, axis=2))
    down = L.downsample_avg(x).numpy()
    np.testing.assert_allclose(down, x.numpy().reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)))
    assert L.Downsample(3, True)(x).shape == (2, 2, 2, 3)
    assert L.Upsample(3, True)(x).shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(L.Downsample(3, False)(x).numpy(), down)
    np.testing.assert_array_equal(L.Upsample(3, False)(x).numpy(), up)
    keys, emb = tf.zeros([2], tf.int32), tf.zeros([2, 16])
    for resample, size in (("up", 8), ("down", 2)):
        block = L.ResBlock(3, 6, 16, num_groups=3, dropout=0.0, salt_name="r", resample=resample)
        assert block([x, emb, keys]).shape == (2, size, size, 6)


def test_group_norm_factory_hook():
    made = []

    def factory(groups, name, epsilon):
        made.append((groups, name))
        return keras.layers.GroupNormalization(groups=groups, epsilon=epsilon, name=name)

    L.set_group_norm_factory(factory)
    try:
        unet = build_unet(TINY)
    finally:
        L.set_group_norm_factory(None)
    # 5 ResBlocks (down, 2 mid, 2 up) with two norms each, 4 attention layers (down, mid,
    # 2 up at the single 4x4 level) and the output block one each
    assert len(made) == 2 * 5 + 4 + 1 and all(g == 4 for g, _ in made)
    assert isinstance(L.group_norm(4, "n"), L.GroupNorm)
    assert unet.count_params() > 0


def test_fused_group_norm_equals_keras_group_norm_op_by_op():
    """Ours eagerly (op by op) and traced (one XLA cluster, forward and gradient) against
    Keras' layer with the scale-shift and swish done op by op."""
    x = tf.random.stateless_normal([3, 4, 4, 8], seed=[1, 2]) * 3.0 + 1.0
    add = tf.random.stateless_normal([3, 1, 1, 8], seed=[3, 4])
    scale = tf.random.stateless_normal([3, 1, 1, 8], seed=[5, 6])
    shift = tf.random.stateless_normal([3, 1, 1, 8], seed=[7, 8])
    ours = L.GroupNorm(4, name="ours")
    ref = keras.layers.GroupNormalization(groups=4, epsilon=L.GROUP_NORM_EPSILON, name="ref")
    ours.build(x.shape)
    ref.build(x.shape)
    gamma = tf.random.stateless_normal([8], seed=[9, 9])
    for layer in (ours, ref):  # same non-trivial weights in both
        layer.gamma.assign(gamma)
        layer.beta.assign(gamma * 0.5)
    for kwargs in [{}, {"add": add}, {"scale": scale, "shift": shift}]:
        for swish in (False, True):
            def grad(layer, traced):
                def f(x):
                    with tf.GradientTape() as tape:
                        tape.watch(x)
                        y = L.norm_act(layer, x, swish=swish, **kwargs)
                        loss = tf.reduce_sum(y * tf.sin(y))
                    return y, tape.gradient(loss, [x, layer.gamma])
                return tf.function(f)(x) if traced else f(x)

            plain, plain_grads = grad(ref, False)
            for traced in (False, True):
                ours_y, ours_grads = grad(ours, traced)
                np.testing.assert_allclose(ours_y.numpy(), plain.numpy(), rtol=1e-4, atol=1e-5)
                for g, want in zip(ours_grads, plain_grads):
                    np.testing.assert_allclose(g.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    traced = tf.function(lambda x: L.norm_act(ours, x)).get_concrete_function(x)
    assert "_XlaMustCompile" in str(traced.graph.as_graph_def()), "traced: not one XLA cluster"


def test_mixed_precision_output_is_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        unet = build_unet(TINY, zero_init=False)
        out = unet(np.ones((2, 4, 4, 1), np.float32), np.array([1, 2]), key=np.array([1, 2]),
                   training=True)
        mid = unet.stage_models(["mid_res0"])[0]({"x_t": np.ones((2, 4, 4, 1), np.float32),
                                                  "t": np.array([1, 2]), "key": np.array([1, 2])})
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == tf.float32 and np.all(np.isfinite(out.numpy()))
    assert unet.carry_dtype("h") == "bfloat16" and mid["emb"].dtype == tf.bfloat16
    assert unet.carry_dtype("out") == "float32" and unet.carry_dtype("key") == "int32"
