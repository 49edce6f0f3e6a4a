"""Guidance: classifier-free guidance and classifier guidance as sampler inputs.

Both plug into every sampler without touching it:

- classifier-free guidance (Ho & Salimans 2022, eq. 6) is a different ``denoise_fn``:
  eps = eps(x, null) + w (eps(x, y) - eps(x, null)), conditional and unconditional
  outputs from ONE forward pass over the concatenated batch (:func:`cfg_denoise_fn`);
- classifier guidance (Dhariwal & Nichol 2021, algorithms 1 and 2) is the samplers'
  ``cond_fn(x_t, t_original) -> s grad_x log p_phi(y | x_t, t)`` (:func:`classifier_cond_fn`);
  DDPM adds Sigma * cond_fn to the mean, DDIM and DPM-Solver subtract
  sqrt(1 - alpha_bar_t) * cond_fn from eps_hat (the score form).

Labels and scales may be ``tf.Variable`` s: they are read when the compiled chain runs,
so one traced sampler serves every label set and scale (:class:`Guide` holds such
variables and the two callables for one kind of guidance).

    guide = cfg_guide(lambda x, t, y: unet(x, t, y), null_label=10)
    guide.set(labels=np.arange(64) % 10, scale=3.0)
    x = sample(diffusion, guide.denoise_fn, (64, 16, 16, 1), cond_fn=guide.cond_fn)
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import tensorflow as tf

GUIDANCE: Tuple[str, ...] = ("none", "cfg", "classifier")


class GuidanceError(ValueError):
    """A guidance request that cannot be met (wrong model, labels or classifier)."""


def _read(value, dtype) -> tf.Tensor:
    """A tensor from ``value`` (tensor, variable, array or number), read now."""
    return tf.cast(tf.convert_to_tensor(value), dtype)


def cfg_denoise_fn(model_fn: Callable, y, null_label: int, scale,
                   split_variance: bool = False) -> Callable:
    """Classifier-free guidance (Ho & Salimans 2022) as a ``denoise_fn`` for any sampler.

    ``model_fn(x, t, y)`` is a class-conditional network; ``y`` int ``[B]`` the labels;
    ``null_label`` the "no label" class. Conditional and unconditional outputs come from
    ONE forward pass over the concatenated batch ``[2B, ...]``, then
    out = out(x, null) + scale (out(x, y) - out(x, null)): scale 1 is plain conditional,
    0 unconditional (Ho & Salimans' w is scale - 1). Guiding eps, x0 or v is the same,
    since each is affine in the others given x_t. With ``split_variance`` (learned_range
    outputs ``[B, ..., 2C]``) only the first C channels are guided and the variance
    channels come from the conditional pass. ``y`` and ``scale`` may be variables (read
    at every call). Keep the returned function and reuse it: compiled samplers are
    cached by its identity.
    """

    def denoise_fn(x: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        labels = _read(y, tf.int32)
        w = _read(scale, tf.float32)
        batch = tf.shape(x)[0]
        labels = tf.concat([labels, tf.fill([batch], tf.constant(null_label, tf.int32))], 0)
        out = model_fn(tf.concat([x, x], 0), tf.concat([t, t], 0), labels)
        cond, uncond = out[:batch], out[batch:]
        w = tf.cast(w, out.dtype)
        if not split_variance:
            return uncond + w * (cond - uncond)
        cond_mean, cond_var = tf.split(cond, 2, axis=-1)
        uncond_mean = tf.split(uncond, 2, axis=-1)[0]
        return tf.concat([uncond_mean + w * (cond_mean - uncond_mean), cond_var], axis=-1)

    return denoise_fn


def classifier_log_prob_grad(logits_fn: Callable, x: tf.Tensor, t: tf.Tensor,
                             y) -> tf.Tensor:
    """grad_x log p_phi(y | x_t, t) ``[B, ...]`` float32 for a classifier
    ``logits_fn(x_t, t) -> [B, K]`` (log p = log_softmax(logits)[y]). Each example's
    log-probability depends on its own x only, so the gradient of their sum is the
    per-example gradient."""
    x = tf.cast(x, tf.float32)
    labels = _read(y, tf.int32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        log_probs = tf.nn.log_softmax(tf.cast(logits_fn(x, t), tf.float32), axis=-1)
        total = tf.reduce_sum(tf.gather(log_probs, labels, axis=1, batch_dims=1))
    return tape.gradient(total, x)


def classifier_cond_fn(logits_fn: Callable, y, scale) -> Callable:
    """The samplers' ``cond_fn(x_t, t_original) -> s grad_x log p_phi(y | x_t, t)``
    (Dhariwal & Nichol 2021, algorithms 1 and 2, gradient scale s = ``scale``).
    ``y`` int ``[B]`` and ``scale`` may be variables (read at every call)."""

    def cond_fn(x: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        return _read(scale, tf.float32) * classifier_log_prob_grad(logits_fn, x, t, y)

    return cond_fn


class Guide:
    """One kind of guidance, ready for a sampler: ``denoise_fn``, ``cond_fn`` (or None),
    and the ``labels`` (int32 ``[B]``, any B) and ``scale`` variables they read.

    Set them with :meth:`set` before each batch; the compiled chain is traced once per
    batch shape and reused for every label set and scale.
    """

    def __init__(self, kind: str, build: Callable[[tf.Variable, tf.Variable],
                                                  Tuple[Callable, Optional[Callable]]]):
        self.kind = kind
        self.labels = tf.Variable(tf.zeros([0], tf.int32), shape=tf.TensorShape([None]),
                                  trainable=False, name="guide_labels")
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="guide_scale")
        self.denoise_fn, self.cond_fn = build(self.labels, self.scale)

    def set(self, labels, scale: float = 1.0) -> "Guide":
        self.labels.assign(np.asarray(labels, np.int32).reshape(-1))
        self.scale.assign(float(scale))
        return self


def conditional_guide(model_fn: Callable) -> Guide:
    """Plain class-conditional sampling ``model_fn(x, t, y)`` (one pass; ``scale`` unused):
    what classifier-free guidance gives at scale 1, at half the cost."""
    return Guide("conditional", lambda y, w: (lambda x, t: model_fn(x, t, y), None))


def cfg_guide(model_fn: Callable, null_label: int, split_variance: bool = False) -> Guide:
    """Classifier-free guidance over ``model_fn(x, t, y)`` (:func:`cfg_denoise_fn`)."""
    return Guide("cfg", lambda y, w: (cfg_denoise_fn(model_fn, y, null_label, w,
                                                     split_variance), None))


def classifier_guide(denoise_fn: Callable, logits_fn: Callable) -> Guide:
    """Classifier guidance of the (unconditional) ``denoise_fn`` by ``logits_fn(x_t, t)``
    (:func:`classifier_cond_fn`)."""
    return Guide("classifier", lambda y, w: (denoise_fn, classifier_cond_fn(logits_fn, y, w)))


def cycle_labels(num: int, num_classes: int, label: Optional[int] = None) -> np.ndarray:
    """int32 ``[num]``: all ``label``, or 0, 1, ..., K-1, 0, 1, ... when ``label`` is None.

    Raises:
        GuidanceError: ``label`` outside 0..K-1.
    """
    if num_classes <= 0:
        raise GuidanceError("labels need a class-conditional model or a classifier "
                            "(model.num_classes > 0)")
    if label is None:
        return (np.arange(num) % num_classes).astype(np.int32)
    if not 0 <= int(label) < num_classes:
        raise GuidanceError(f"--label: {label} is not a class; choose 0..{num_classes - 1}")
    return np.full([num], int(label), np.int32)
