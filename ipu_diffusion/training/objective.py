"""The training objective as two carry blocks: the forward diffusion and the loss.

The trainer runs them around the U-Net on one device; the pipeline runs ``front`` in
stage 0 and ``loss`` in the last stage. Both see only per-example tensors, and every
random draw is keyed by the example's key (ipu_diffusion.rng), so any split of the
batch into microbatches or replicas gives exactly the full-batch numbers.

    carry -> front -> {x_t, t, noise, weight} -> U-Net -> out -> loss -> {loss [B]}

With a loss-aware timestep sampler the loss block also writes ``sampler_loss`` [B], the
loss without its importance weight, which the trainer feeds back to the sampler.
"""
from __future__ import annotations

from typing import Dict, Tuple

import tensorflow as tf

from ipu_diffusion import rng
from ipu_diffusion.config import DiffusionConfig
from ipu_diffusion.diffusion.gaussian import GaussianDiffusion
from ipu_diffusion.diffusion.losses import make_timestep_sampler, training_losses
from ipu_diffusion.models.carry import BlockSpec

SALT_T = rng.salt_of("timestep")
SALT_NOISE = rng.salt_of("noise")
SALT_LABEL_DROP = rng.salt_of("label_dropout")


class DiffusionObjective:
    """Forward process q(x_t | x_0) (Ho et al. 2020 eq. 4) and the training loss.

    ``front`` reads ``x0`` [B, H, W, C] and ``key`` [B] (and ``y`` [B] when labels are
    used with classifier-free label dropout) and writes ``x_t``, ``t``, ``noise`` and the
    importance ``weight``; ``loss`` reads the U-Net's ``out`` and writes ``loss`` [B].
    """

    def __init__(self, cfg: DiffusionConfig, num_classes: int = 0, class_dropout: float = 0.0):
        self.cfg = cfg
        self.diffusion = GaussianDiffusion.from_config(cfg)
        self.sampler = make_timestep_sampler(cfg.timestep_sampler, cfg.timesteps)
        self.num_classes = num_classes
        self.class_dropout = class_dropout if num_classes else 0.0
        label = ("y",) if num_classes else ()
        self.front_spec = BlockSpec("front", ("x0", "key") + label,
                                    ("x_t", "t", "noise", "weight") + label)
        self.loss_spec = BlockSpec("loss", ("out", "x0", "x_t", "t", "noise", "weight"),
                                   ("loss",) + self.sampler_keys)

    @property
    def sampler_keys(self) -> Tuple[str, ...]:
        """Per-example outputs of the loss block a learning timestep sampler reads."""
        return ("sampler_loss",) if self.sampler.learns else ()

    def front(self, carry: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        x0, key = carry["x0"], carry["key"]
        u = rng.uniform(key, (), SALT_T)
        t, weight = self.sampler.sample(u)
        noise = rng.normal(key, x0.shape[1:], SALT_NOISE, dtype=x0.dtype)
        out = {"x_t": self.diffusion.q_sample(x0, t, noise), "t": t, "noise": noise,
               "weight": tf.cast(weight, tf.float32)}
        if self.num_classes:
            out["y"] = self._drop_labels(carry["y"], key)
        return out

    def _drop_labels(self, y: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
        """Replace labels by the null label with probability class_dropout (Ho & Salimans 2022)."""
        if not self.class_dropout:
            return y
        drop = rng.uniform(key, (), SALT_LABEL_DROP) < self.class_dropout
        return tf.where(drop, tf.fill(tf.shape(y), self.num_classes), y)

    def terms(self, carry: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """All per-example loss terms ([B] float32), ``loss`` among them."""
        out = tf.cast(carry["out"], tf.float32)
        x0 = tf.cast(carry["x0"], tf.float32)
        return training_losses(self.diffusion, out, x0, tf.cast(carry["x_t"], tf.float32),
                               carry["t"], tf.cast(carry["noise"], tf.float32),
                               weights=carry["weight"], min_snr_gamma=self.cfg.min_snr_gamma,
                               hybrid_lambda=self.cfg.hybrid_lambda)

    def sampler_outputs(self, terms: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """The :attr:`sampler_keys` entries from :meth:`terms`' output (none for the
        uniform sampler)."""
        if not self.sampler.learns:
            return {}
        return {"sampler_loss": tf.stop_gradient(terms["unweighted_loss"])}

    def loss(self, carry: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        terms = self.terms(carry)
        return {"loss": terms["loss"], **self.sampler_outputs(terms)}
