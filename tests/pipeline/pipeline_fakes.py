"""A tiny U-Net-like network with the real U-Net's API, a toy diffusion front and an MSE
loss: fast material for the pipeline tests.

Blocks (8x8 images, C channels; ``h`` changes shape along the way)::

    embed   t [, y]           -> emb [16]
    in_conv x_t               -> h [8,8,8], skip_a [8,8,8]      (two outputs)
    res0    h, emb, key       -> h                               (keyed dropout)
    down    h                 -> h [4,4,8]
    res1    h, emb, key       -> h, skip_b                       (keyed dropout)
    mid     h, emb            -> h
    up      h, skip_b         -> h [8,8,8]
    up0     h, skip_a, emb    -> h                               (skip_a crosses 6 blocks)
    out     h                 -> out [8,8,C]
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ipu_diffusion import rng
from ipu_diffusion._keras import keras
from ipu_diffusion.models.carry import BlockSpec, live_before
from ipu_diffusion.models.plan import block_flops, output_shape, plan_unet

T_STEPS = 100
_INT = ("t", "key", "y")


def _swish(x):
    return x * tf.sigmoid(x)


def _dropout(h, key, rate, salt, training):
    if not training or rate <= 0:
        return h
    u = rng.uniform(rng.fold(key, salt), h.shape[1:], salt)
    return tf.where(u >= rate, h / (1.0 - rate), tf.zeros_like(h))


class Embed(keras.layers.Layer):
    def __init__(self, num_classes=0, **kw):
        super().__init__(**kw)
        self.num_classes = num_classes
        self.d1, self.d2 = keras.layers.Dense(16), keras.layers.Dense(16)
        self.table = keras.layers.Embedding(num_classes + 1, 16) if num_classes else None

    def call(self, inputs, training=None):
        t = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        freqs = tf.exp(-math.log(100.0) * tf.range(4, dtype=tf.float32) / 4.0)
        arg = tf.cast(t, tf.float32)[:, None] * freqs[None, :]
        emb = self.d2(_swish(self.d1(tf.concat([tf.sin(arg), tf.cos(arg)], -1))))
        if self.table is not None:
            emb = emb + self.table(inputs[1])
        return emb


class Conv(keras.layers.Layer):
    """conv(concat(inputs[:n_maps])) [+ dense(emb)] [dropout(key)]; optional 2nd output."""

    def __init__(self, ch, n_maps=1, emb=False, key=False, stride=1, up=False, two_out=False,
                 rate=0.0, **kw):
        super().__init__(**kw)
        self.n_maps, self.use_emb, self.use_key = n_maps, emb, key
        self.up, self.two_out, self.rate = up, two_out, rate
        self.conv = keras.layers.Conv2D(ch, 3, strides=stride, padding="same")
        self.proj = keras.layers.Dense(ch) if emb else None
        self.salt = rng.salt_of(self.name)

    def call(self, inputs, training=None):
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        x = tf.concat(inputs[:self.n_maps], -1) if self.n_maps > 1 else inputs[0]
        if self.up:
            x = tf.repeat(tf.repeat(x, 2, axis=1), 2, axis=2)
        h = self.conv(_swish(x))
        if self.use_emb:
            h = h + self.proj(inputs[self.n_maps])[:, None, None, :]
        if self.use_key:
            h = _dropout(h, inputs[-1], self.rate, self.salt, training)
        return [h, 0.5 * h] if self.two_out else h


def fake_blocks(num_classes: int = 0) -> List[BlockSpec]:
    """The fake's block list (no Keras needed)."""
    emb_in = ("t", "y") if num_classes else ("t",)
    return [BlockSpec("embed", emb_in, ("emb",)), BlockSpec("in_conv", ("x_t",), ("h", "skip_a")),
            BlockSpec("res0", ("h", "emb", "key"), ("h",)), BlockSpec("down", ("h",), ("h",)),
            BlockSpec("res1", ("h", "emb", "key"), ("h", "skip_b")),
            BlockSpec("mid", ("h", "emb"), ("h",)), BlockSpec("up", ("h", "skip_b"), ("h",)),
            BlockSpec("up0", ("h", "skip_a", "emb"), ("h",)), BlockSpec("out", ("h",), ("out",))]


class FakeUNet:
    """Same public API as ipu_diffusion.models.unet.UNet (blocks, keras_model, stage
    models over shared layers, block_info, input_shapes, trainable_variables)."""

    def __init__(self, channels: int = 2, num_classes: int = 0, dropout: float = 0.2):
        c = channels
        layers = [  # (layer, output shapes), aligned with fake_blocks()
            (Embed(num_classes, name="embed"), [(16,)]),
            (Conv(8, two_out=True, name="in_conv"), [(8, 8, 8), (8, 8, 8)]),
            (Conv(8, emb=True, key=True, rate=dropout, name="res0"), [(8, 8, 8)]),
            (Conv(8, stride=2, name="down"), [(4, 4, 8)]),
            (Conv(8, emb=True, key=True, rate=dropout, two_out=True, name="res1"),
             [(4, 4, 8), (4, 4, 8)]),
            (Conv(8, emb=True, name="mid"), [(4, 4, 8)]),
            (Conv(8, n_maps=2, up=True, name="up"), [(8, 8, 8)]),
            (Conv(8, n_maps=2, emb=True, name="up0"), [(8, 8, 8)]),
            (Conv(c, name="out"), [(8, 8, c)]),
        ]
        spec = [(b, layer, shapes) for b, (layer, shapes) in zip(fake_blocks(num_classes), layers)]
        self.blocks: List[BlockSpec] = [b for b, _, _ in spec]
        self._layers = [layer for _, layer, _ in spec]
        self._out_shapes = [dict(zip(b.outputs, shapes)) for b, _, shapes in spec]
        self.input_keys = ("x_t", "t", "key") + (("y",) if num_classes else ())
        self.output_key = "out"
        self._inputs = {"x_t": (8, 8, c), "t": (), "key": ()}
        if num_classes:
            self._inputs["y"] = ()
        self._live = live_before(self.blocks, ("out",))
        self.keras_model = self._functional(0, len(self.blocks), whole=True)

    def _shapes_before(self, index: int) -> Dict[str, Tuple[int, ...]]:
        shapes = dict(self._inputs)
        for out in self._out_shapes[:index]:
            shapes.update(out)
        return shapes

    def _functional(self, start: int, stop: int, whole: bool = False):
        shapes = self._shapes_before(start)
        keys = self.input_keys if whole else self._live[start]
        inputs = {k: keras.Input(shape=shapes[k], dtype="int32" if k in _INT else "float32",
                                 name=k) for k in keys}
        carry = dict(inputs)
        for b, layer in zip(self.blocks[start:stop], self._layers[start:stop]):
            args = [carry[k] for k in b.inputs]
            out = layer(args if len(args) > 1 else args[0])
            out = out if isinstance(out, (list, tuple)) else [out]
            carry.update(zip(b.outputs, out))
        if whole:
            return keras.Model(inputs, carry["out"])
        return keras.Model(inputs, {k: carry[k] for k in self._live[stop]})

    def stage_models_for_ranges(self, ranges: Sequence[Tuple[int, int]]):
        return [self._functional(a, b) for a, b in ranges]

    @property
    def trainable_variables(self):
        return self.keras_model.trainable_variables

    def input_shapes(self):
        return dict(self._inputs)

    def block_info(self) -> List[dict]:
        info = []
        for b, layer, shapes in zip(self.blocks, self._layers, self._out_shapes):
            params = int(sum(np.prod(v.shape) for v in layer.weights))
            elems = sum(int(np.prod(s)) for s in shapes.values())
            info.append({"name": b.name, "params": params, "flops": 2 * params * elems // 8,
                         "output_shapes": dict(shapes)})
        return info


# --------------------------------------------------------------------------- objective


FRONT = BlockSpec("front", ("x0", "key"), ("x_t", "t", "noise"))
FRONT_Y = BlockSpec("front", ("x0", "key", "y"), ("x_t", "t", "noise", "y"))
LOSS = BlockSpec("loss", ("out", "x0", "x_t", "t", "noise"), ("loss",))
SALT_T, SALT_NOISE = rng.salt_of("t"), rng.salt_of("noise")


def toy_front(carry):
    """t ~ U{0..T-1}, noise ~ N(0, I) keyed per example; x_t = a_t x0 + b_t noise."""
    x0, key = carry["x0"], carry["key"]
    t = rng.randint(key, T_STEPS, SALT_T)
    noise = rng.normal(key, x0.shape[1:], SALT_NOISE)
    a = tf.cos(0.5 * math.pi * tf.cast(t, tf.float32) / T_STEPS)[:, None, None, None]
    out = {"x_t": a * x0 + tf.sqrt(1.0 - a * a) * noise, "t": t, "noise": noise}
    if "y" in carry:
        out["y"] = carry["y"]
    return out


def toy_loss(carry):
    """Per-example MSE on the noise (plus a small x0/x_t term so those keys matter) [B]."""
    err = carry["out"] - carry["noise"] + 0.1 * (carry["x_t"] - carry["x0"])
    w = 1.0 + tf.cast(carry["t"], tf.float32) / T_STEPS
    return {"loss": w * tf.reduce_mean(tf.square(err), axis=[1, 2, 3])}


def make_batch(n: int, channels: int = 2, num_classes: int = 0, seed: int = 0):
    x0 = tf.random.stateless_normal((n, 8, 8, channels), (seed, 1))
    batch = {"x0": x0, "key": rng.example_keys(seed, 3, tf.range(n))}
    if num_classes:
        batch["y"] = tf.range(n, dtype=tf.int32) % (num_classes + 1)
    return batch


def reference_gradients(unet, batch, front=toy_front, loss=toy_loss, training=True):
    """Single device, whole batch: tape over front -> keras_model -> loss, mean over B."""
    variables = unet.trainable_variables
    with tf.GradientTape() as tape:
        carry = dict(batch)
        carry.update(front(carry))
        carry["out"] = unet.keras_model({k: carry[k] for k in unet.input_keys}, training=training)
        per_example = loss(carry)["loss"]
        mean = tf.reduce_mean(per_example)
    return mean, tape.gradient(mean, variables)


def max_relative_error(got, want) -> float:
    """max over variables of ||got - want|| / ||want||, and the global-norm version."""
    num = [float(tf.norm(tf.convert_to_tensor(g) - tf.convert_to_tensor(w))) for g, w in zip(got, want)]
    den = [float(tf.norm(tf.convert_to_tensor(w))) for w in want]
    glob = math.sqrt(sum(n * n for n in num)) / max(math.sqrt(sum(d * d for d in den)), 1e-30)
    per = max(n / d for n, d in zip(num, den) if d > 0)
    return max(glob, per)


# --------------------------------------------------------------------------- plans


def plan_info(cfg, params_per_block=1000):
    """block_info-like dicts from the pure-Python plan (no Keras)."""
    return [{"name": p.spec.name, "params": params_per_block, "flops": block_flops(cfg, p),
             "output_shapes": {p.spec.outputs[0]: output_shape(p)}} for p in plan_unet(cfg)]


def extra_shapes(cfg):
    img = (cfg.image_size, cfg.image_size, cfg.in_channels)
    label = {"y": ()} if cfg.num_classes else {}
    return {"x0": img, "x_t": img, "noise": img, "t": (), "key": (), "weight": (), **label}


# --------------------------------------------------------------------------- liveness


def brute_force_crossing(chain, index, final_outputs):
    """Keys that must cross a cut before chain[index], by direct search (independent of
    carry.live_before): defined before the cut, and read at or after it before any
    rewrite, or a final output that nothing after the cut rewrites."""
    defined = set()
    for j, b in enumerate(chain):  # batch keys: read by a block before any block writes them
        defined |= {k for k in b.inputs if not any(k in a.outputs for a in chain[:j])}
    for b in chain[:index]:
        defined |= set(b.outputs)
    crossing = set()
    for key in defined:
        for b in chain[index:]:
            if key in b.inputs:
                crossing.add(key)
                break
            if key in b.outputs:
                break
        else:
            if key in final_outputs:
                crossing.add(key)
    return tuple(sorted(crossing))
