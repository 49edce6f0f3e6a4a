"""Float64 numpy transcriptions of the papers' formulas, written from
``../shared/REFERENCES.md`` without ipu_diffusion, for tests to take expected values from.

Indices are 0-based table indices: index i is the paper's t = i + 1; ``ab_prev[0] = 1``.
"""
from __future__ import annotations

import math

import numpy as np


def linear_betas(T: int) -> np.ndarray:
    """Ho et al. 2020: 1e-4 -> 0.02 over T = 1000; improved DDPM scales both ends by 1000/T."""
    return np.linspace(1e-4 * 1000.0 / T, 0.02 * 1000.0 / T, T)


def tables(betas: np.ndarray) -> dict:
    """alpha_bar, the posterior q(x_{t-1} | x_t, x_0) and the two fixed variances."""
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    beta_tilde = betas * (1.0 - ab_prev) / (1.0 - ab)          # 0 at index 0
    return {
        "betas": betas, "ab": ab, "ab_prev": ab_prev, "beta_tilde": beta_tilde,
        # log of [bt_1, bt_1, bt_2, ...]: the 0 at index 0 replaced by the next entry
        "log_beta_tilde_clipped": np.log(np.append(beta_tilde[1], beta_tilde[1:])),
        "coef_x0": betas * np.sqrt(ab_prev) / (1.0 - ab),
        "coef_xt": (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab),
        "fixed_small": beta_tilde,
        # beta_t, with beta_tilde at the first step so it is not degenerate
        "fixed_large": np.append(beta_tilde[1], betas[1:]),
    }


def per_example(table: np.ndarray, t: np.ndarray, ndim: int) -> np.ndarray:
    """``table[t]`` shaped ``[B, 1, ...]`` for arrays of rank ``ndim``."""
    return table[np.asarray(t)].reshape((-1,) + (1,) * (ndim - 1))


def eps_model_mean(tab: dict, x_t: np.ndarray, t: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Ho et al. eq. 11: mu = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t)."""
    g = lambda name: per_example(tab[name], t, x_t.ndim)  # noqa: E731
    return (x_t - g("betas") / np.sqrt(1.0 - g("ab")) * eps) / np.sqrt(1.0 - g("betas"))


def normal_kl(m1, lv1, m2, lv2):
    """KL(N(m1, e^lv1) || N(m2, e^lv2)) in nats, elementwise."""
    return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def approx_cdf(x):
    """The standard normal CDF by the tanh approximation."""
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_log_likelihood(x, mean, log_scale):
    """Decoder likelihood in nats: bins of half-width 1/255 around x in [-1, 1]; below
    -0.999 the CDF up to the upper edge, above 0.999 one minus the CDF at the lower edge;
    log floored at 1e-12."""
    inv = np.exp(-log_scale)
    upper = approx_cdf(inv * (x - mean + 1.0 / 255.0))
    lower = approx_cdf(inv * (x - mean - 1.0 / 255.0))
    p = np.where(x < -0.999, upper, np.where(x > 0.999, 1.0 - lower, upper - lower))
    return np.log(np.maximum(p, 1e-12))


def vb_bits_per_dim(tab: dict, x0, x_t, t, model_mean, model_log_var) -> np.ndarray:
    """L_t per example in bits/dim: KL(q(x_{t-1} | x_t, x_0) || N(model_mean, e^lv)) for
    t > 0, the decoder NLL -log p(x_0 | x_1) at t = 0."""
    axes = tuple(range(1, x0.ndim))
    g = lambda name: per_example(tab[name], t, x0.ndim)  # noqa: E731
    q_mean = g("coef_x0") * x0 + g("coef_xt") * x_t
    q_log_var = g("log_beta_tilde_clipped") + 0.0 * x0
    kl = normal_kl(q_mean, q_log_var, model_mean, model_log_var).mean(axis=axes)
    nll = -discretized_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(axis=axes)
    return np.where(np.asarray(t) == 0, nll, kl) / math.log(2.0)
