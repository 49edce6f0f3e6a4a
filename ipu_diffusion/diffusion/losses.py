"""Training losses and likelihood terms of diffusion models.

- L_simple: MSE (or L1) between the network's prediction and its target (Ho et al.
  2020 eq. 14; the target is eps, x_0 or v according to ``mean_type``).
- L_vlb terms (Ho et al. eq. 5): KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0
  and the discretised decoder NLL -log p(x_0 | x_1) at t = 0 (eq. 13), in bits per dim.
- Hybrid L_simple + lambda L_vlb and the importance-weighted VLB (Nichol & Dhariwal 2021,
  eq. 16 and section 3.3); min-SNR-gamma weighting (Hang et al. 2023).

Shapes: ``x0``, ``x_t``, ``noise`` are ``[B, ...]`` (images ``[B, H, W, C]``); the
network output ``model_out`` is ``[B, ..., C]``, or ``[B, ..., 2C]`` with a learned
variance; ``t`` is int32 ``[B]``; per-example terms are float32 ``[B]``.

The timestep samplers live in ``timestep_sampler.py`` and are re-exported here.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import tensorflow as tf

from ipu_diffusion.diffusion.compiled import compiled
from ipu_diffusion.diffusion.gaussian import GaussianDiffusion
from ipu_diffusion.diffusion.timestep_sampler import (  # noqa: F401  (re-exported)
    TIMESTEP_SAMPLERS, LossAwareSampler, UniformSampler, make_timestep_sampler)

_LN2 = math.log(2.0)


def mean_flat(x: tf.Tensor) -> tf.Tensor:
    """Mean over every axis but the batch axis: ``[B, ...]`` -> ``[B]``."""
    return tf.reduce_mean(x, axis=list(range(1, x.shape.rank)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> tf.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (broadcasts):
    0.5 (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + tf.exp(logvar1 - logvar2)
                  + tf.square(mean1 - mean2) * tf.exp(-logvar2))


def approx_standard_normal_cdf(x: tf.Tensor) -> tf.Tensor:
    """Phi(x) ~= 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (the tanh approximation
    used by the DDPM reference code)."""
    return 0.5 * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: tf.Tensor, means: tf.Tensor,
                                        log_scales: tf.Tensor) -> tf.Tensor:
    """log P(x) in nats under N(means, e^(2 log_scales)) discretised to 256 bins (Ho et al.
    eq. 13), elementwise ``[B, ...]``.

    ``x`` holds pixel values in [-1, 1] on the grid -1 + 2k/255; each bin is
    [x - 1/255, x + 1/255], the edge bins are open (x < -0.999: (-inf, x + 1/255];
    x > 0.999: [x - 1/255, inf)); probabilities are floored at 1e-12 before the log.
    """
    x, means, log_scales = (tf.cast(v, tf.float32) for v in (x, means, log_scales))
    centered = x - means
    inv_std = tf.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = tf.math.log(tf.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = tf.math.log(tf.maximum(1.0 - cdf_min, 1e-12))
    log_delta = tf.math.log(tf.maximum(cdf_plus - cdf_min, 1e-12))
    return tf.where(x < -0.999, log_cdf_plus,
                    tf.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _vb_terms(diffusion: GaussianDiffusion, model_out, x0, x_t, t, clip_denoised: bool):
    """(per-example VLB term in bits/dim ``[B]``, p_mean_variance dict) in float32."""
    x0, x_t = tf.cast(x0, tf.float32), tf.cast(x_t, tf.float32)
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    out = diffusion.p_mean_variance(tf.cast(model_out, tf.float32), x_t, t, clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / _LN2
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
        x0, out["mean"], 0.5 * out["log_variance"])) / _LN2
    return tf.where(tf.equal(tf.cast(t, tf.int32), 0), decoder_nll, kl), out


def vb_terms_bpd(diffusion: GaussianDiffusion, model_out, x0, x_t, t,
                 clip_denoised: bool = True) -> tf.Tensor:
    """One term of the variational bound (Ho et al. eq. 5), bits/dim, float32 ``[B]``:
    the decoder NLL -log2 p(x_0 | x_1) / D where t == 0 (eq. 13), otherwise
    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / (D ln 2) (eq. 6-7 vs. the model)."""
    return _vb_terms(diffusion, model_out, x0, x_t, t, clip_denoised)[0]


def _target(diffusion: GaussianDiffusion, x0, x_t, t, noise) -> tf.Tensor:
    if diffusion.mean_type == "eps":
        return noise
    if diffusion.mean_type == "x0":
        return x0
    return diffusion.get_v(x0, noise, t)


def min_snr_weight(diffusion: GaussianDiffusion, t: tf.Tensor, gamma: float) -> tf.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023), float32 ``[B]``, with
    SNR_t = alpha_bar_t / (1 - alpha_bar_t): eps: min(SNR, gamma) / SNR;
    x0: min(SNR, gamma); v: min(SNR, gamma) / (SNR + 1)."""
    snr_table = diffusion.alphas_cumprod / (1.0 - diffusion.alphas_cumprod)  # float64
    snr = tf.gather(tf.constant(snr_table, tf.float32), tf.cast(t, tf.int32))
    clipped = tf.minimum(snr, float(gamma))
    if diffusion.mean_type == "eps":
        return clipped / snr
    if diffusion.mean_type == "x0":
        return clipped
    return clipped / (snr + 1.0)


def training_losses(diffusion: GaussianDiffusion, model_out, x0, x_t, t, noise,
                    weights: Optional[tf.Tensor] = None, min_snr_gamma: float = 0.0,
                    hybrid_lambda: float = 0.001) -> Dict[str, tf.Tensor]:
    """Per-example training loss terms, float32 ``[B]`` each.

    ``x_t = diffusion.q_sample(x0, t, noise)`` comes from the caller. Keys:

    - ``"mse"`` (``"l1"`` for loss_type l1): mean over dims of the squared (absolute)
      error between the mean channels and the target (eps -> noise, x0 -> x0, v -> v);
      reported for every loss_type, unweighted.
    - ``"vb"`` for hybrid and kl: the VLB term L_t in bits/dim (:func:`vb_terms_bpd`,
      with ``clip_denoised=False``).
    - ``"loss"``, what is minimised, by ``diffusion.loss_type`` with T = num_timesteps:
      ``mse`` / ``l1``: w_snr * simple;
      ``hybrid``: w_snr * mse + hybrid_lambda * T * vb (N&D eq. 16; the vb term sees the
      mean channels through stop_gradient, so it only trains the variance; with
      lambda = 0.001 this is improved-diffusion's RESCALED_MSE, vb * T / 1000);
      ``kl``: T * vb, an unbiased one-sample estimate of L_vlb = sum_t L_t in bits/dim.
      w_snr is :func:`min_snr_weight` if ``min_snr_gamma > 0`` else 1. The result is
      multiplied by ``weights`` (importance weights from a timestep sampler) if given.
    - ``"unweighted_loss"``: ``loss`` before that multiplication (what a loss-aware
      timestep sampler records; improved-diffusion's ``losses["loss"]``).
    """
    if min_snr_gamma < 0:
        raise ValueError(f"min_snr_gamma: must be >= 0 (0 = off), got {min_snr_gamma!r}")
    x0, x_t, noise = (tf.cast(v, tf.float32) for v in (x0, x_t, noise))
    model_out = tf.cast(model_out, tf.float32)
    mean_part, var_part = diffusion.split_model_output(model_out)
    err = mean_part - _target(diffusion, x0, x_t, t, noise)
    simple_name = "l1" if diffusion.loss_type == "l1" else "mse"
    simple = mean_flat(tf.abs(err) if simple_name == "l1" else tf.square(err))
    weighted = simple * min_snr_weight(diffusion, t, min_snr_gamma) if min_snr_gamma > 0 else simple
    terms = {simple_name: simple}
    T = float(diffusion.num_timesteps)
    if diffusion.loss_type in ("mse", "l1"):
        loss = weighted
    elif diffusion.loss_type == "hybrid":
        frozen = tf.stop_gradient(mean_part)
        frozen_out = frozen if var_part is None else tf.concat([frozen, var_part], axis=-1)
        terms["vb"] = vb_terms_bpd(diffusion, frozen_out, x0, x_t, t, clip_denoised=False)
        loss = weighted + hybrid_lambda * T * terms["vb"]
    else:
        terms["vb"] = vb_terms_bpd(diffusion, model_out, x0, x_t, t, clip_denoised=False)
        loss = T * terms["vb"]
    terms["unweighted_loss"] = loss
    if weights is not None:
        loss = loss * tf.cast(weights, tf.float32)
    terms["loss"] = loss
    return terms


def prior_bpd(diffusion: GaussianDiffusion, x0: tf.Tensor) -> tf.Tensor:
    """KL(q(x_T | x_0) || N(0, I)) in bits/dim, float32 ``[B]`` (the L_T term of eq. 5)."""
    x0 = tf.cast(x0, tf.float32)
    last = tf.fill(tf.shape(x0)[:1], diffusion.num_timesteps - 1)
    mean, _, log_var = diffusion.q_mean_variance(x0, last)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / _LN2


def bits_per_dim(diffusion: GaussianDiffusion, denoise_fn: Callable, x0: tf.Tensor,
                 seed=0, clip_denoised: bool = True, jit_compile: bool = False
                 ) -> Dict[str, tf.Tensor]:
    """The full variational bound of ``x0`` ``[B, ...]`` in bits/dim (Ho et al. eq. 5);
    ``x0`` holds pixel values in [-1, 1] on the 256-level grid (the decoder's bins).

    Every term L_0 .. L_{T-1} is evaluated at one x_t ~ q(x_t | x_0) per timestep, with
    noise ``tf.random.stateless_normal(seed=[seed, t])``, plus the prior term L_T. Runs as
    one compiled function with a ``tf.while_loop`` over t; ``denoise_fn(x_t, t_original)``
    is the network (``t_original = timestep_map[t]``, int32 ``[B]``).

    Returns float32: ``total_bpd`` ``[B]`` (= sum(vb) + prior_bpd), ``prior_bpd`` ``[B]``,
    ``vb`` ``[B, T]`` (L_t by table index t), ``x0_mse`` ``[B, T]`` (mean squared error of
    the predicted x_0) and ``mse`` ``[B, T]`` (of the predicted eps).
    """
    run = compiled("bpd", diffusion, [denoise_fn], (bool(clip_denoised),),
                   lambda: _bpd_chain(diffusion, denoise_fn, bool(clip_denoised)), jit_compile)
    return run(tf.convert_to_tensor(x0), tf.cast(seed, tf.int64))


def _bpd_chain(diffusion: GaussianDiffusion, denoise_fn: Callable, clip_denoised: bool):
    T = diffusion.num_timesteps

    def run(x0: tf.Tensor, seed: tf.Tensor) -> Dict[str, tf.Tensor]:
        tmap = tf.constant(diffusion.timestep_map, tf.int32)
        x0_32 = tf.cast(x0, tf.float32)
        arrays = [tf.TensorArray(tf.float32, size=T) for _ in range(3)]

        def body(i, vb_ta, x0_ta, eps_ta):
            t = tf.fill(tf.shape(x0)[:1], i)
            noise = tf.random.stateless_normal(tf.shape(x0), tf.stack([seed, tf.cast(i, tf.int64)]))
            x_t = diffusion.q_sample(x0, t, tf.cast(noise, x0.dtype))
            model_out = denoise_fn(x_t, tf.gather(tmap, t))
            vb, out = _vb_terms(diffusion, model_out, x0_32, x_t, t, clip_denoised)
            pred_x0 = tf.cast(out["pred_x0"], tf.float32)
            eps = diffusion.predict_eps_from_x0(tf.cast(x_t, tf.float32), t, pred_x0)
            x0_mse = mean_flat(tf.square(pred_x0 - x0_32))
            eps_mse = mean_flat(tf.square(eps - noise))
            return i + 1, vb_ta.write(i, vb), x0_ta.write(i, x0_mse), eps_ta.write(i, eps_mse)

        _, *arrays = tf.while_loop(lambda i, *_: i < T, body, [tf.constant(0)] + arrays)
        vb, x0_mse, mse = (tf.transpose(a.stack()) for a in arrays)
        prior = prior_bpd(diffusion, x0_32)
        return {"total_bpd": tf.reduce_sum(vb, axis=1) + prior, "prior_bpd": prior,
                "vb": vb, "x0_mse": x0_mse, "mse": mse}

    return run
