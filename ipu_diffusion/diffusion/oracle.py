"""The optimal denoiser for Gaussian data, in closed form: a network-free ``denoise_fn``.

For data x_0 ~ N(mu, s^2 I) and x_t = sqrt(a) x_0 + sqrt(1 - a) eps (a = alpha_bar_t,
Ho et al. 2020 eq. 4), (x_0, eps, x_t) are jointly Gaussian, so the MSE-optimal
predictions are the conditional means, with d = a s^2 + 1 - a = Var(x_t):

    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / d
    E[x_0 | x_t] = mu + sqrt(a) s^2 (x_t - sqrt(a) mu) / d
    E[v   | x_t] = sqrt(a) E[eps | x_t] - sqrt(1 - a) E[x_0 | x_t]

Samplers fed with it must reproduce N(mu, s^2) up to their discretisation error, which
makes it the reference for end-to-end tests of samplers and likelihoods.
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from ipu_diffusion.diffusion.gaussian import GaussianDiffusion, MEAN_TYPES


def gaussian_oracle(diffusion: GaussianDiffusion, mean: float, std: float,
                    mean_type: str = "") -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """``denoise_fn(x_t [B, ...], t_original int32 [B]) -> [B, ...]`` predicting eps, x0 or
    v (``mean_type``, default the diffusion's) for data N(mean, std^2 I).

    ``diffusion`` must be the *original* (not respaced) diffusion: the oracle reads
    alpha_bar at original timesteps, as a trained network would. With a learned
    variance the oracle has no variance channels; use it with fixed variances.
    """
    mean_type = mean_type or diffusion.mean_type
    if mean_type not in MEAN_TYPES:
        raise ValueError(f"mean_type: {mean_type!r} is not valid; choose one of "
                         f"{', '.join(MEAN_TYPES)}")
    if std <= 0:
        raise ValueError(f"std: must be > 0, got {std!r}")
    alpha_bar = tf.constant(diffusion.alphas_cumprod, tf.float32)

    def denoise_fn(x_t: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        x = tf.cast(x_t, tf.float32)
        a = tf.reshape(tf.gather(alpha_bar, t), [-1] + [1] * (x.shape.rank - 1))
        centred = (x - tf.sqrt(a) * mean) / (a * std ** 2 + 1.0 - a)
        eps = tf.sqrt(1.0 - a) * centred
        x0 = mean + tf.sqrt(a) * std ** 2 * centred
        out = {"eps": eps, "x0": x0, "v": tf.sqrt(a) * eps - tf.sqrt(1.0 - a) * x0}[mean_type]
        return tf.cast(out, x_t.dtype)

    return denoise_fn
