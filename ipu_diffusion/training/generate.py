"""Sampling from a run's EMA weights with the compiled samplers of diffusion/sampling.py."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from ipu_diffusion._keras import keras
from ipu_diffusion.diffusion import sampling


def ema_unet(run):
    """A second U-Net holding the run's EMA weights (built once, refreshed every call),
    and its denoise function (one closure, so the compiled sampler is traced once)."""
    from ipu_diffusion.models.unet import build_unet

    if getattr(run, "_ema_unet", None) is None:
        run._ema_unet = build_unet(run.cfg.model)
        run._ema_denoise = denoise_fn_for(run._ema_unet)
    run.trainer.ema.copy_to(run._ema_unet.trainable_variables)
    return run._ema_unet, run._ema_denoise


def denoise_fn_for(unet, labels: Optional[tf.Tensor] = None) -> Callable:
    """``(x_t [B,H,W,C], t int32 [B]) -> model output`` of ``unet`` in inference mode."""

    def denoise(x_t, t):
        inputs = {"x_t": x_t, "t": t, "key": tf.zeros_like(t)}
        if "y" in unet.input_keys:
            if labels is None:
                raise ValueError("this model is class-conditional: pass labels")
            inputs["y"] = labels
        return tf.cast(unet.keras_model(inputs, training=False), tf.float32)

    return denoise


def sample_images(run, num: int, seed: int, sampler: Optional[str] = None,
                  steps: Optional[int] = None, eta: Optional[float] = None,
                  batch_size: Optional[int] = None, progress: bool = False) -> np.ndarray:
    """``num`` images [N, H, W, C] in [-1, 1] from the EMA weights, in batches."""
    cfg = run.cfg
    sampler = sampler or cfg.eval.sampler
    steps = steps or cfg.eval.steps
    eta = cfg.eval.eta if eta is None else eta
    batch_size = min(batch_size or cfg.eval.batch_size, num)
    _, denoise = ema_unet(run)
    shape = (batch_size, cfg.model.image_size, cfg.model.image_size, cfg.model.in_channels)
    bar = keras.utils.Progbar(num, unit_name="image") if progress else None
    out = []
    for i in range(0, num, batch_size):
        extra = {"eta": eta} if sampler == "ddim" else {}
        x = sampling.sample(run.objective.diffusion, denoise, shape, sampler=sampler, steps=steps,
                            seed=seed * 1_000_003 + i, **extra)
        out.append(np.asarray(x)[: num - i])
        if bar is not None:
            bar.add(len(out[-1]))
    return np.clip(np.concatenate(out, 0), -1.0, 1.0)
