"""A trained model, for use: a run directory's EMA network, its schedule and its config.

    pipe = Pipeline.from_workdir("runs/digits")
    images = pipe.sample(64, sampler="ddim", steps=50, seed=0)   # [64, H, W, C] in [-1, 1]
    z = pipe.encode(images[:8])                                   # DDIM latents x_T
    back = pipe.decode(z)                                         # images again

``from_workdir`` reads ``config.yaml`` and restores only the EMA weights and the step of
the newest checkpoint (no optimizer, no training strategy, one device). Everything in
``inference/`` takes a *model source*: an object with ``cfg``, ``workdir``, ``step``,
``diffusion`` and ``ema`` (``ema.copy_to(variables)``). A :class:`Pipeline` is one, and
so is a training run (``training.run.Run``): training draws its sample grids and
evaluates at the end through the same functions.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf

from ipu_diffusion.config import RunConfig, load_config
from ipu_diffusion.diffusion.gaussian import GaussianDiffusion
from ipu_diffusion.inference.checkpoints import (CHECKPOINT_DIR, CONFIG_FILE, WorkdirError,
                                                 checkpoint_step, no_checkpoint_error,
                                                 recorded_checkpoints, restore_newest)


class EMAWeights(tf.Module):
    """The EMA shadow of a checkpoint (``ema/shadow/<i>``), restored on its own."""

    def __init__(self, variables: Sequence[Any]):
        super().__init__(name="ema")
        self.shadow = [tf.Variable(tf.zeros(v.shape, tf.float32), name=f"ema_{i}")
                       for i, v in enumerate(variables)]

    def copy_to(self, variables: Sequence[Any]) -> None:
        for s, v in zip(self.shadow, variables):
            v.assign(tf.cast(s, v.dtype))


class Pipeline:
    """A model source restored from a run directory, with sampling and DDIM control."""

    def __init__(self, cfg: RunConfig, workdir: str, unet: Any, ema: EMAWeights, step: int,
                 restored_from: Optional[str] = None):
        self.cfg, self.workdir, self.ema = cfg, workdir, ema
        self.step, self.restored_from = int(step), restored_from
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        self._ema_unet = unet  # what inference.generate.ema_unet copies the EMA weights into

    @classmethod
    def from_workdir(cls, workdir: str, overrides: Sequence[str] = (),
                     step: Optional[int] = None) -> "Pipeline":
        """The newest recorded checkpoint's EMA weights; a damaged one is skipped with a
        warning for the one before it (``checkpoints.restore_newest``, as training's resume).
        ``step``: that recorded checkpoint instead, and no other."""
        from ipu_diffusion.inference.generate import build_sampling_unet

        path = os.path.join(workdir, CONFIG_FILE)
        if not os.path.isfile(path):
            raise WorkdirError(f"{workdir}: no {CONFIG_FILE}; is it a run directory written "
                               "by python -m ipu_diffusion train?")
        cfg = load_config(path, overrides)
        candidates = recorded_checkpoints(workdir)
        if not candidates:
            raise no_checkpoint_error(os.path.join(workdir, CHECKPOINT_DIR))
        if step is not None:
            steps = sorted(checkpoint_step(p) for p in candidates)
            candidates = [p for p in candidates if checkpoint_step(p) == step]
            if not candidates:
                raise WorkdirError(f"{os.path.join(workdir, CHECKPOINT_DIR)}: no checkpoint of "
                                   f"step {step}; recorded steps: {steps}")
        unet = build_sampling_unet(cfg)
        ema = EMAWeights(unet.trainable_variables)
        reader = tf.train.Checkpoint(ema=ema)
        prefix = restore_newest(
            candidates, lambda p: reader.read(p).assert_existing_objects_matched().expect_partial(),
            os.path.join(workdir, CHECKPOINT_DIR), lambda message: print(message, file=sys.stderr))
        return cls(cfg, workdir, unet, ema, checkpoint_step(prefix), prefix)

    def sample(self, n: int, sampler: Optional[str] = None, steps: Optional[int] = None,
               seed: int = 0, eta: Optional[float] = None, **kwargs) -> np.ndarray:
        """``n`` images ``[n, H, W, C]`` in [-1, 1] (``inference.generate.sample_images``;
        defaults: the config's ``eval`` sampler, steps and eta)."""
        from ipu_diffusion.inference.generate import sample_images

        return sample_images(self, n, seed, sampler=sampler, steps=steps, eta=eta, **kwargs)

    def encode(self, x: np.ndarray, steps: int = 50) -> np.ndarray:
        """DDIM latents x_T of images ``x`` ``[B, H, W, C]`` in [-1, 1]."""
        from ipu_diffusion.inference.control import encode
        from ipu_diffusion.inference.generate import unconditional_fn

        return encode(self.diffusion, unconditional_fn(self), x, steps).numpy()

    def decode(self, z: np.ndarray, steps: int = 50) -> np.ndarray:
        """Images ``[B, H, W, C]`` decoded from DDIM latents ``z`` (the inverse of encode)."""
        from ipu_diffusion.inference.control import decode
        from ipu_diffusion.inference.generate import unconditional_fn

        return decode(self.diffusion, unconditional_fn(self), tf.convert_to_tensor(z, tf.float32),
                      steps).numpy()
