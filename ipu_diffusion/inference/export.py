"""A model's EMA network as a TensorFlow SavedModel that loads without this package.

    path = export_saved_model(pipe, "runs/digits/savedmodel")   # pipe: a model source
    m = tf.saved_model.load(path)                  # any TensorFlow 2 process; no Keras objects
    images = m.sample(num=16, steps=50, seed=0)    # uint8 [16, H, W, C]
    out = m.denoise(x_t, t)                        # the EMA U-Net's output [B, H, W, C_out]

Two signatures, fixed input signatures with a dynamic batch (the U-Net's Keras layers are
traced into the graphs; the weights are saved as variables):

- ``denoise(x_t, t[, y])`` -> ``{"out"}``: x_t float32 ``[B, H, W, C]``, t int32 ``[B]``
  (the trained timestep), y int32 ``[B]`` for a class-conditional model
  (``model.num_classes`` is the null label); out float32 ``[B, H, W, C_out]``, the raw
  network output (eps, x0 or v; with ``learn_sigma`` also the variance interpolant).
- ``sample(num, steps, seed)`` -> ``{"images"}``: num, steps int32, seed int64 scalars;
  images uint8 ``[num, H, W, C]``. Deterministic DDIM (eta = 0, Song et al. 2021 eq. 12)
  over ``steps`` evenly spaced steps (1..T): the images of ``generate.sample_images(
  source, num, seed, sampler="ddim", steps=steps, eta=0.0)`` through
  ``visualize.to_uint8``, bit for bit (on the same TensorFlow build and kind of device:
  another CPU kernel or a GPU's convolutions round differently). It runs the same chain (``sampling.ddim_loop``) on
  the respaced tables computed in the graph (``respace.RuntimeRespaced``), in the same
  batches of ``min(eval.batch_size, num)`` seeded by ``sampling.batch_seed``. A
  class-conditional model samples the labels 0, 1, ..., K-1 cycled, as ``sample`` does
  without ``--label``.

``assets.extra/export.json`` records the checkpoint step, shapes and schedule.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict

import tensorflow as tf

from ipu_diffusion.diffusion.respace import RuntimeRespaced
from ipu_diffusion.diffusion.sampling import batch_seed, ddim_loop, initial_noise
from ipu_diffusion.inference.generate import conditional_fn_for, denoise_fn_for, ema_unet

INFO_FILE = os.path.join("assets.extra", "export.json")


def to_uint8(images: tf.Tensor) -> tf.Tensor:
    """``visualize.to_uint8`` as graph ops: float32 in [-1, 1] -> uint8, rint((x + 1)
    127.5) clipped to [0, 255] (``tf.round`` rounds half to even like ``np.rint``)."""
    scaled = tf.round((tf.cast(images, tf.float32) + 1.0) * 127.5)
    return tf.cast(tf.clip_by_value(scaled, 0.0, 255.0), tf.uint8)


class ExportedModel(tf.Module):
    """The ``denoise`` and ``sample`` functions of one U-Net (holding the EMA weights)
    over one diffusion; ``cfg`` gives the image shape, ``eval.batch_size`` and the
    classes."""

    def __init__(self, unet: Any, diffusion, cfg):
        super().__init__(name="ipu_diffusion")
        self.weights = list(unet.keras_model.variables)  # tracked, so saved
        self._diffusion, self._batch_size = diffusion, int(cfg.eval.batch_size)
        self._num_classes = int(cfg.model.num_classes)
        size, channels = cfg.model.image_size, cfg.model.in_channels
        self._image_shape = (size, size, channels)
        x_t = tf.TensorSpec([None, size, size, channels], tf.float32, name="x_t")
        t = tf.TensorSpec([None], tf.int32, name="t")
        if self._num_classes:
            self._model_fn = conditional_fn_for(unet, cfg.eval.parallel_calls)
            self.denoise = tf.function(self._model_fn, input_signature=[
                x_t, t, tf.TensorSpec([None], tf.int32, name="y")])
        else:
            self._model_fn = denoise_fn_for(unet, parts=cfg.eval.parallel_calls)
            self.denoise = tf.function(self._model_fn, input_signature=[x_t, t])
        self.sample = tf.function(self._sample, input_signature=[
            tf.TensorSpec([], tf.int32, name="num"), tf.TensorSpec([], tf.int32, name="steps"),
            tf.TensorSpec([], tf.int64, name="seed")])

    def signatures(self) -> Dict[str, Any]:
        """The serving signatures: ``denoise`` -> ``{"out"}``, ``sample`` -> ``{"images"}``."""
        denoise_specs = self.denoise.input_signature
        return {
            "denoise": tf.function(lambda *args: {"out": self.denoise(*args)},
                                   input_signature=denoise_specs).get_concrete_function(),
            "sample": tf.function(lambda *args: {"images": self.sample(*args)},
                                  input_signature=self.sample.input_signature
                                  ).get_concrete_function(),
        }

    def _batch_denoise_fn(self, offset: tf.Tensor, batch: tf.Tensor, num: tf.Tensor) -> Callable:
        """The network for the batch of examples ``offset ..``: with classes, conditioned on
        the labels ``generate.sample_images`` gives it, ``(offset + k % r) % K`` for row k
        (labels 0..K-1 cycled; ``np.resize`` repeats a short last batch's r labels)."""
        if not self._num_classes:
            return self._model_fn
        rows = tf.minimum(batch, num - offset)
        labels = (offset + tf.range(batch) % rows) % self._num_classes
        return lambda x, t: self._model_fn(x, t, labels)

    def _sample(self, num: tf.Tensor, steps: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """uint8 ``[num, H, W, C]``: ``generate.sample_images(..., sampler="ddim",
        steps=steps, eta=0.0)``, batch by batch, then ``visualize.to_uint8``."""
        T = self._diffusion.num_timesteps
        checks = [tf.debugging.assert_positive(num, message="num: must be >= 1"),
                  tf.debugging.assert_positive(steps, message=f"steps: must be in [1, {T}]"),
                  tf.debugging.assert_less_equal(steps, T, message=f"steps: must be in [1, {T}]")]
        with tf.control_dependencies(checks):
            num, steps = tf.identity(num), tf.identity(steps)
        diffusion = RuntimeRespaced(self._diffusion, steps)
        batch = tf.minimum(self._batch_size, num)  # generate.sample_images' batches
        count = (num + batch - 1) // batch
        shape = [batch] + list(self._image_shape)
        eta = tf.constant(0.0)  # deterministic DDIM

        def body(b, images):
            offset = b * batch
            key = batch_seed(seed, tf.cast(offset, tf.int64))
            x = ddim_loop(diffusion, self._batch_denoise_fn(offset, batch, num),
                          initial_noise(shape, key), key, eta)
            return b + 1, images.write(b, x)

        images = tf.TensorArray(tf.float32, size=count,
                                element_shape=[None] + list(self._image_shape))
        _, images = tf.while_loop(lambda b, _: b < count, body, [tf.constant(0), images])
        return to_uint8(tf.clip_by_value(images.concat()[:num], -1.0, 1.0))


def export_saved_model(source, out: str) -> str:
    """Write the SavedModel of ``source``'s EMA network (a model source: an
    ``inference.Pipeline`` or a training run) to the directory ``out``; returns ``out``."""
    unet, _ = ema_unet(source)
    module = ExportedModel(unet, source.diffusion, source.cfg)
    tf.saved_model.save(module, out, signatures=module.signatures())
    cfg = source.cfg
    info = {"checkpoint_step": int(source.step), "workdir": os.path.abspath(source.workdir),
            "image_shape": list(module._image_shape), "out_channels": int(unet.out_channels),
            "num_classes": module._num_classes, "timesteps": source.diffusion.num_timesteps,
            "schedule": cfg.diffusion.schedule, "mean_type": cfg.diffusion.mean_type,
            "eval_batch_size": module._batch_size,
            "signatures": {"denoise": list(_arg_names(module.denoise)),
                           "sample": ["num", "steps", "seed"]}}
    os.makedirs(os.path.join(out, "assets.extra"), exist_ok=True)
    with open(os.path.join(out, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    return out


def _arg_names(fn) -> tuple:
    return tuple(spec.name for spec in fn.input_signature)
