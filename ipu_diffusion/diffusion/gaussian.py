"""GaussianDiffusion: the forward process, its posterior and the model's reverse step.

Tables are computed once in float64 numpy (as improved-diffusion does); the TF methods
gather float32 copies by timestep and broadcast them over ``x``. Tensors ``x`` are
``[B, ...]`` (images ``[B, H, W, C]``, channels last) in float32 or bfloat16: the
arithmetic runs in float32 and results are cast back to ``x.dtype``. ``t`` is int32
``[B]``, an *index* into this diffusion's tables; ``timestep_map[t]`` is the original
timestep (they differ only for a respaced diffusion, see ``sampling.respace``).

Notation (Ho et al. 2020; Nichol & Dhariwal 2021 "N&D"; index i <-> paper t = i + 1):

    betas[i]                  beta_t
    alphas_cumprod[i]         alpha_bar_t = prod_{s <= t} (1 - beta_s)        (eq. 4)
    alphas_cumprod_prev[i]    alpha_bar_{t-1}, with alpha_bar_0 := 1
    posterior_variance[i]     beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
    posterior_mean_coef1/2    coefficients of x_0 and x_t in mu_tilde_t     (eq. 7)
    eps / x0 / v              epsilon, x_0 and v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ipu_diffusion.config import (LOSS_TYPES, MEAN_TYPES, VAR_TYPES, ConfigError,
                                  DiffusionConfig)
from ipu_diffusion.diffusion.schedules import make_betas


def _check_choice(arg: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{arg}: {value!r} is not valid; choose one of {', '.join(allowed)}")


def model_output_channels(channels: int, var_type: str = "fixed_large") -> int:
    """Channels the network must output for images with ``channels`` channels:
    ``2 * channels`` for ``learned_range`` (mean parameterisation + interpolant v)."""
    _check_choice("var_type", var_type, VAR_TYPES)
    return 2 * channels if var_type == "learned_range" else channels


def gather_coef(table, t: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """float32 ``table[t]`` for a ``[T]`` table (numpy, or a tensor computed in the graph,
    see ``respace.RuntimeRespaced``) and int ``t`` ``[B]``, shaped ``[B, 1, ..., 1]`` to
    broadcast against ``x`` ``[B, ...]`` (static rank)."""
    table = tf.cast(table, tf.float32) if tf.is_tensor(table) else tf.constant(table, tf.float32)
    values = tf.gather(table, tf.cast(t, tf.int32))
    return tf.reshape(values, [-1] + [1] * (x.shape.rank - 1))


class GaussianDiffusion:
    """Diffusion with Gaussian transitions for a fixed beta schedule.

    Args:
        betas: ``[T]`` beta schedule, 0 < beta < 1 (see ``schedules.make_betas``).
        mean_type: what the network predicts: ``eps`` (Ho et al. eq. 11), ``x0`` or ``v``.
        var_type: ``fixed_small`` (beta_tilde_t), ``fixed_large`` (beta_t, with
            beta_tilde_1 at the first step) or ``learned_range`` (N&D eq. 15).
        loss_type: ``mse`` / ``l1`` (L_simple), ``hybrid`` (L_simple + lambda L_vlb) or
            ``kl`` (L_vlb); read by ``losses.training_losses``.
        timestep_map: ``[T]`` original timestep of each index; identity unless respaced.
    """

    def __init__(self, betas, mean_type: str = "eps", var_type: str = "fixed_large",
                 loss_type: str = "mse", timestep_map: Optional[Sequence[int]] = None):
        _check_choice("mean_type", mean_type, MEAN_TYPES)
        _check_choice("var_type", var_type, VAR_TYPES)
        _check_choice("loss_type", loss_type, LOSS_TYPES)
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"betas: expected a non-empty 1-D array, got shape {betas.shape}")
        if not (np.all(betas > 0.0) and np.all(betas < 1.0)):
            raise ValueError(f"betas: every beta must lie in (0, 1); got range "
                             f"[{betas.min():.4g}, {betas.max():.4g}]")
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = self._check_map(timestep_map)
        self._set_tables(betas)
        self._f32: Dict[str, np.ndarray] = {}

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "GaussianDiffusion":
        """Build from a ``config.DiffusionConfig`` (schedule, timesteps and the three
        types); a schedule the timestep count cannot hold is a ConfigError naming both."""
        try:
            betas = make_betas(cfg.schedule, cfg.timesteps)
        except ValueError as e:
            raise ConfigError(f"diffusion.timesteps: {cfg.timesteps} does not suit "
                              f"diffusion.schedule {cfg.schedule!r}: {e}") from None
        return cls(betas, mean_type=cfg.mean_type, var_type=cfg.var_type, loss_type=cfg.loss_type)

    def _check_map(self, timestep_map: Optional[Sequence[int]]) -> np.ndarray:
        if timestep_map is None:
            return np.arange(self.num_timesteps, dtype=np.int64)
        tmap = np.asarray(timestep_map, dtype=np.int64)
        if tmap.shape != (self.num_timesteps,) or np.any(np.diff(tmap) <= 0) or tmap.min() < 0:
            raise ValueError(f"timestep_map: expected {self.num_timesteps} increasing "
                             f"non-negative timesteps, got {tmap.tolist()}")
        return tmap

    def _set_tables(self, betas: np.ndarray) -> None:
        """The float64 tables (Ho et al. eq. 4, 6, 7)."""
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        # beta_tilde at the first step is 0; its log is clipped to beta_tilde of the second
        # step (with a single step, to beta_1: nothing else exists).
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas)
                                     / one_minus)
        # fixed_large: sigma_t^2 = beta_t, but beta_tilde at the first step (Ho et al. 3.2)
        self.fixed_large_variance = np.append(first, betas[1:])
        self.log_betas = np.log(betas)

    @property
    def fingerprint(self) -> Tuple:
        """Hashable identity of everything the TF methods depend on (for caching)."""
        return (self.betas.tobytes(), self.timestep_map.tobytes(), self.mean_type,
                self.var_type, self.loss_type)

    def model_output_channels(self, channels: int) -> int:
        """Channels the network outputs for ``channels`` image channels (2C if learned_range)."""
        return model_output_channels(channels, self.var_type)

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(T={self.num_timesteps}, mean_type={self.mean_type!r}, "
                f"var_type={self.var_type!r}, loss_type={self.loss_type!r})")

    # ------------------------------------------------------------------ table lookup

    def coef(self, name: str, t: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
        """float32 ``self.<name>[t]`` shaped ``[B, 1, ..., 1]`` to broadcast against ``x``."""
        if name not in self._f32:
            self._f32[name] = np.asarray(getattr(self, name), dtype=np.float32)
        return gather_coef(self._f32[name], t, x)

    @staticmethod
    def _f(x: tf.Tensor) -> tf.Tensor:
        return tf.cast(x, tf.float32)

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x0: tf.Tensor, t: tf.Tensor
                        ) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. eq. 4).
        Returns ``(mean, variance, log_variance)``, each ``[B, ...]`` like ``x0``."""
        mean = self.coef("sqrt_alphas_cumprod", t, x0) * self._f(x0)
        shape = tf.shape(x0)
        var = tf.broadcast_to(self.coef("one_minus_alphas_cumprod", t, x0), shape)
        log_var = tf.broadcast_to(self.coef("log_one_minus_alphas_cumprod", t, x0), shape)
        return tuple(tf.cast(v, x0.dtype) for v in (mean, var, log_var))

    def q_sample(self, x0: tf.Tensor, t: tf.Tensor, noise: tf.Tensor) -> tf.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. eq. 4), ``[B, ...]``.
        """
        x_t = (self.coef("sqrt_alphas_cumprod", t, x0) * self._f(x0)
               + self.coef("sqrt_one_minus_alphas_cumprod", t, x0) * self._f(noise))
        return tf.cast(x_t, x0.dtype)

    def q_posterior_mean_variance(self, x0: tf.Tensor, x_t: tf.Tensor, t: tf.Tensor
                                  ) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I) (Ho et al. eq. 6-7).
        Returns ``(mean, variance, log_variance_clipped)``, each ``[B, ...]`` like ``x_t``."""
        mean = (self.coef("posterior_mean_coef1", t, x_t) * self._f(x0)
                + self.coef("posterior_mean_coef2", t, x_t) * self._f(x_t))
        shape = tf.shape(x_t)
        var = tf.broadcast_to(self.coef("posterior_variance", t, x_t), shape)
        log_var = tf.broadcast_to(self.coef("posterior_log_variance_clipped", t, x_t), shape)
        return tuple(tf.cast(v, x_t.dtype) for v in (mean, var, log_var))

    # ------------------------------------------------------------------ parameterisations

    def predict_x0_from_eps(self, x_t: tf.Tensor, t: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (inverse of eq. 4)."""
        x0 = (self.coef("sqrt_recip_alphas_cumprod", t, x_t) * self._f(x_t)
              - self.coef("sqrt_recipm1_alphas_cumprod", t, x_t) * self._f(eps))
        return tf.cast(x0, x_t.dtype)

    def predict_eps_from_x0(self, x_t: tf.Tensor, t: tf.Tensor, x0: tf.Tensor) -> tf.Tensor:
        """eps = (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1 / alpha_bar_t - 1) (eq. 4 for eps)."""
        eps = ((self.coef("sqrt_recip_alphas_cumprod", t, x_t) * self._f(x_t) - self._f(x0))
               / self.coef("sqrt_recipm1_alphas_cumprod", t, x_t))
        return tf.cast(eps, x_t.dtype)

    def get_v(self, x0: tf.Tensor, noise: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022)."""
        v = (self.coef("sqrt_alphas_cumprod", t, x0) * self._f(noise)
             - self.coef("sqrt_one_minus_alphas_cumprod", t, x0) * self._f(x0))
        return tf.cast(v, x0.dtype)

    def predict_x0_from_v(self, x_t: tf.Tensor, t: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
        """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
        x0 = (self.coef("sqrt_alphas_cumprod", t, x_t) * self._f(x_t)
              - self.coef("sqrt_one_minus_alphas_cumprod", t, x_t) * self._f(v))
        return tf.cast(x0, x_t.dtype)

    def predict_eps_from_v(self, x_t: tf.Tensor, t: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
        """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
        eps = (self.coef("sqrt_one_minus_alphas_cumprod", t, x_t) * self._f(x_t)
               + self.coef("sqrt_alphas_cumprod", t, x_t) * self._f(v))
        return tf.cast(eps, x_t.dtype)

    # ------------------------------------------------------------------ reverse process

    def split_model_output(self, model_out: tf.Tensor) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
        """``[B, ..., C']`` -> (mean part ``[B, ..., C]``, variance interpolant or None).
        With ``learned_range`` C' = 2C: the first C channels are the mean
        parameterisation, the last C the interpolant v in [-1, 1] (N&D eq. 15)."""
        if self.var_type != "learned_range":
            return model_out, None
        mean_part, var_part = tf.split(model_out, 2, axis=-1)
        return mean_part, var_part

    def model_log_variance(self, var_part: Optional[tf.Tensor], x_t: tf.Tensor,
                           t: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """float32 (variance, log_variance) of p(x_{t-1} | x_t), broadcast to ``x_t``.

        ``learned_range`` (N&D eq. 15): log sigma^2 = f log beta_t + (1 - f) log beta_tilde_t
        (clipped), with f = (v + 1) / 2 from the network's interpolant v in [-1, 1].
        """
        shape = tf.shape(x_t)
        if self.var_type == "learned_range":
            frac = (self._f(var_part) + 1.0) / 2.0
            min_log = self.coef("posterior_log_variance_clipped", t, x_t)
            max_log = self.coef("log_betas", t, x_t)
            log_var = frac * max_log + (1.0 - frac) * min_log
            return tf.exp(log_var), log_var
        if self.var_type == "fixed_small":
            var = self.coef("posterior_variance", t, x_t)
            log_var = self.coef("posterior_log_variance_clipped", t, x_t)
        else:
            var = self.coef("fixed_large_variance", t, x_t)
            log_var = tf.math.log(var)
        return tf.broadcast_to(var, shape), tf.broadcast_to(log_var, shape)

    def predict_x0_eps(self, mean_part: tf.Tensor, x_t: tf.Tensor, t: tf.Tensor,
                       clip_denoised: bool = True) -> Tuple[tf.Tensor, tf.Tensor]:
        """float32 (x0_hat, eps_hat) from the network's mean parameterisation ``[B, ...]``.
        With ``clip_denoised`` x0_hat is clipped to [-1, 1] and eps_hat recomputed from it,
        so the pair stays consistent with x_t (the DDIM update relies on this)."""
        x_t32, out = self._f(x_t), self._f(mean_part)
        if self.mean_type == "eps":
            eps, x0 = out, self.predict_x0_from_eps(x_t32, t, out)
        elif self.mean_type == "x0":
            x0, eps = out, self.predict_eps_from_x0(x_t32, t, out)
        else:
            x0, eps = self.predict_x0_from_v(x_t32, t, out), self.predict_eps_from_v(x_t32, t, out)
        if clip_denoised:
            x0 = tf.clip_by_value(x0, -1.0, 1.0)
            eps = self.predict_eps_from_x0(x_t32, t, x0)
        return x0, eps

    def p_mean_variance(self, model_out: tf.Tensor, x_t: tf.Tensor, t: tf.Tensor,
                        clip_denoised: bool = True) -> Dict[str, tf.Tensor]:
        """The reverse step p(x_{t-1} | x_t) = N(mean, variance) from the network output.

        mean = mu_tilde_t(x0_hat, x_t) (Ho et al. eq. 7, which with eps_hat is eq. 11),
        variance per ``var_type``. ``model_out`` is ``[B, ..., C]`` (``[B, ..., 2C]`` for
        ``learned_range``), ``x_t`` ``[B, ..., C]``, ``t`` int32 ``[B]`` (table index).
        Returns a dict of ``[B, ..., C]`` tensors in ``x_t.dtype``: ``mean``, ``variance``,
        ``log_variance``, ``pred_x0`` (clipped to [-1, 1] if ``clip_denoised``) and
        ``pred_eps`` (the eps implied by ``pred_x0`` and ``x_t``).
        """
        mean_part, var_part = self.split_model_output(model_out)
        var, log_var = self.model_log_variance(var_part, x_t, t)
        x0, eps = self.predict_x0_eps(mean_part, x_t, t, clip_denoised)
        mean, _, _ = self.q_posterior_mean_variance(x0, self._f(x_t), t)
        out = {"mean": mean, "variance": var, "log_variance": log_var, "pred_x0": x0,
               "pred_eps": eps}
        return {k: tf.cast(v, x_t.dtype) for k, v in out.items()}
