"""Sampling from a model source's EMA weights (``inference/pipeline.py``) with the compiled
samplers of diffusion/sampling.py."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from ipu_diffusion.diffusion import guidance as guidance_lib
from ipu_diffusion.diffusion import sampling
from ipu_diffusion.diffusion.guidance import GuidanceError
from ipu_diffusion.progress import Progress


def ema_unet(source):
    """A U-Net holding the model source's EMA weights (built once unless the source
    brings one, refreshed every call: a training run's EMA moves), and its denoise
    function (one closure, so the compiled sampler is traced once). It computes in
    ``eval.precision``, whatever precision the run trained in."""
    if getattr(source, "_ema_denoise", None) is None:
        if getattr(source, "_ema_unet", None) is None:
            source._ema_unet = build_sampling_unet(source.cfg)
        source._ema_denoise = denoise_fn_for(source._ema_unet,
                                             parts=source.cfg.eval.parallel_calls)
    source.ema.copy_to(source._ema_unet.trainable_variables)
    return source._ema_unet, source._ema_denoise


def build_sampling_unet(cfg):
    """``build_unet(cfg.model)`` under the Keras dtype policy of ``eval.precision``
    (float32 variables either way; the process's global policy is left as it was)."""
    from ipu_diffusion._keras import keras
    from ipu_diffusion.models.unet import build_unet

    mp = keras.mixed_precision
    before = mp.global_policy()
    mp.set_global_policy("mixed_bfloat16" if cfg.eval.precision == "bfloat16" else "float32")
    try:
        return build_unet(cfg.model)
    finally:
        mp.set_global_policy(before)


def _network(unet, parts: int) -> Callable:
    """``unet``'s Keras model in inference mode on ``inputs`` (a dict of ``[B, ...]``
    tensors) cut into ``parts`` nearly equal pieces along the batch (never an empty one:
    one example per call when the batch is smaller), one call each, concatenated: independent
    branches of one graph that TensorFlow runs at the same time.
    Each example's output depends on that example alone (inference mode), so only float32
    round-off differs from one call."""

    def network(inputs):
        return unet.keras_model(inputs, training=False)

    if parts <= 1:
        return network

    def split(inputs, n):
        batch = tf.shape(inputs["x_t"])[0]
        sizes = batch // n + tf.cast(tf.range(n) < batch % n, tf.int32)
        pieces = {k: tf.split(v, sizes, num=n) for k, v in inputs.items()}
        return tf.concat([network({k: v[i] for k, v in pieces.items()}) for i in range(n)], 0)

    def call(inputs):
        # No empty part: a convolution of zero examples fails on some oneDNN builds
        # (seen with AVX-512), e.g. the last batch of ``sample --num 1001``.
        static = inputs["x_t"].shape[0]
        if static is not None:
            n = min(parts, static)
            return split(inputs, n) if n > 1 else network(inputs)
        # A batch known only at run time (the export's signatures): one graph of ``parts``
        # calls; a batch below ``parts`` is padded to one example per call and the padding's
        # outputs dropped, so each example gets the one-example call of the static path.
        batch = tf.shape(inputs["x_t"])[0]
        pad = tf.maximum(parts - batch, 0)
        padded = {k: tf.concat([v, tf.zeros([pad] + v.shape.as_list()[1:], v.dtype)], 0)
                  for k, v in inputs.items()}
        return split(padded, parts)[:batch]

    return call


def denoise_fn_for(unet, labels: Optional[tf.Tensor] = None, parts: int = 1) -> Callable:
    """``(x_t [B,H,W,C], t int32 [B]) -> model output`` of ``unet`` in inference mode, the
    batch in ``parts`` concurrent calls (``eval.parallel_calls``)."""
    network = _network(unet, parts)

    def denoise(x_t, t):
        inputs = {"x_t": x_t, "t": t, "key": tf.zeros_like(t)}
        if "y" in unet.input_keys:
            if labels is None:
                raise ValueError("this model is class-conditional: pass labels")
            inputs["y"] = labels
        return tf.cast(network(inputs), tf.float32)

    return denoise


def conditional_fn_for(unet, parts: int = 1) -> Callable:
    """``(x_t [B,H,W,C], t int32 [B], y int32 [B]) -> model output`` of a class-conditional
    ``unet`` in inference mode (``y = model.num_classes`` is the null label), the batch in
    ``parts`` concurrent calls. Classifier-free guidance doubles the batch, so with 2 parts
    its conditional and unconditional halves are two concurrent calls."""
    if "y" not in unet.input_keys:
        raise GuidanceError("this model is unconditional (model.num_classes = 0): it takes no "
                            "labels; use --guidance classifier with --classifier DIR")
    network = _network(unet, parts)

    def model_fn(x_t, t, y):
        inputs = {"x_t": x_t, "t": t, "key": tf.zeros_like(t), "y": tf.cast(y, tf.int32)}
        return tf.cast(network(inputs), tf.float32)

    return model_fn


def unconditional_fn(run) -> Callable:
    """The EMA model without labels: the null label of a conditional model."""
    unet, denoise = ema_unet(run)
    if "y" not in unet.input_keys:
        return denoise
    if getattr(run, "_null_denoise", None) is None:
        model_fn = conditional_fn_for(unet, run.cfg.eval.parallel_calls)
        null = run.cfg.model.num_classes
        run._null_denoise = lambda x, t: model_fn(x, t, tf.fill(tf.shape(t), null))
    return run._null_denoise


def ema_guide(run, guidance: str, classifier=None) -> guidance_lib.Guide:
    """The (cached) :class:`~ipu_diffusion.diffusion.guidance.Guide` of the run's EMA
    model: ``"none"`` on a conditional model = plain conditional sampling, ``"cfg"`` =
    classifier-free guidance, ``"classifier"`` = guidance of the unconditional (null
    label) model by ``classifier`` (a ``inference.classifier.NoiseAwareClassifier``)."""
    unet, _ = ema_unet(run)
    key = (guidance, id(classifier))
    guides = run.__dict__.setdefault("_guides", {})
    if key not in guides:
        if guidance == "classifier":
            if classifier is None:
                raise GuidanceError("--guidance classifier needs --classifier DIR (a directory "
                                    "written by train-classifier)")
            classifier.check_compatible(run.cfg)
            guides[key] = guidance_lib.classifier_guide(unconditional_fn(run),
                                                        classifier.logits_fn)
        elif guidance in ("none", "cfg"):
            model_fn = conditional_fn_for(unet, run.cfg.eval.parallel_calls)
            guides[key] = (guidance_lib.conditional_guide(model_fn) if guidance == "none" else
                           guidance_lib.cfg_guide(model_fn, run.cfg.model.num_classes,
                                                  split_variance=run.cfg.model.learn_sigma))
        else:
            raise GuidanceError(f"--guidance: {guidance!r} is not valid; choose one of "
                                f"{', '.join(guidance_lib.GUIDANCE)}")
    return guides[key]


def _plan_guidance(run, num: int, labels, guidance: Optional[str], classifier):
    """(guide or None, labels [num] or None) for :func:`sample_images`."""
    conditional = "y" in ema_unet(run)[0].input_keys
    guidance = guidance or "none"
    if guidance == "none" and not conditional:
        if labels is not None:
            raise GuidanceError("labels were given but the model is unconditional; add "
                                "--guidance classifier --classifier DIR")
        return None, None
    classes = classifier.num_classes if guidance == "classifier" and classifier is not None \
        else run.cfg.model.num_classes
    if labels is None:
        labels = guidance_lib.cycle_labels(num, classes)
    labels = np.asarray(labels, np.int32).reshape(-1)
    if len(labels) != num or labels.min() < 0 or labels.max() >= classes:
        raise GuidanceError(f"labels: need {num} labels in 0..{classes - 1}, got "
                            f"{len(labels)} in [{labels.min()}, {labels.max()}]")
    return ema_guide(run, guidance, classifier), labels


def sample_images(run, num: int, seed: int, sampler: Optional[str] = None,
                  steps: Optional[int] = None, eta: Optional[float] = None,
                  batch_size: Optional[int] = None, progress: bool = False,
                  labels=None, guidance: Optional[str] = None, scale: float = 1.0,
                  classifier=None) -> np.ndarray:
    """``num`` images [N, H, W, C] in [-1, 1] from the EMA weights, in batches.

    A class-conditional run samples ``labels`` (int ``[num]``; default 0..K-1 cycled)
    conditionally; ``guidance`` ``"cfg"`` applies classifier-free guidance with scale
    ``scale`` (1 = conditional, 0 = unconditional), ``"classifier"`` guides the
    unconditional model with ``classifier`` and gradient scale ``scale`` (Dhariwal &
    Nichol 2021). Unconditional runs without guidance sample as before.
    """
    cfg = run.cfg
    sampler = sampler or cfg.eval.sampler
    steps = steps or cfg.eval.steps
    eta = cfg.eval.eta if eta is None else eta
    batch_size = min(batch_size or cfg.eval.batch_size, num)
    guide, labels = _plan_guidance(run, num, labels, guidance, classifier)
    denoise = ema_unet(run)[1] if guide is None else guide.denoise_fn
    extra = {"cond_fn": guide.cond_fn} if guide is not None and guide.cond_fn else {}
    if sampler == "ddim":
        extra["eta"] = eta
    shape = (batch_size, cfg.model.image_size, cfg.model.image_size, cfg.model.in_channels)
    bar = Progress(num, "sampling") if progress else None
    out = []
    for i in range(0, num, batch_size):
        if guide is not None:  # a short last batch is padded with repeated labels
            guide.set(np.resize(labels[i:i + batch_size], batch_size), scale)
        x = sampling.sample(run.diffusion, denoise, shape, sampler=sampler, steps=steps,
                            seed=sampling.batch_seed(seed, i), **extra)
        out.append(np.asarray(x)[: num - i])
        if bar is not None:
            bar.add(len(out[-1]))
    return np.clip(np.concatenate(out, 0), -1.0, 1.0)
