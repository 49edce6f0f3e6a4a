"""Noise schedules: the variances beta_1..beta_T of the forward process as float64 tables.

Notation (Ho et al. 2020, eq. 2 and 4):

    betas[i]           beta_{i+1}      variance added at forward step i + 1
    alpha_bar(i)       \\bar{alpha}     prod_{s <= i} (1 - beta_s)

    betas = make_betas("cosine", 1000)   # np.float64[1000]

Every schedule returns a strictly increasing (or, for cosine, non-decreasing) table
with 0 < beta < 1, so ``alpha_bar`` stays positive and every derived table is finite.
"""
from __future__ import annotations

import math
from typing import Callable, Tuple

import numpy as np

from ipu_diffusion.config import SCHEDULES

# Ho et al. 2020, section 4: beta_1 = 1e-4 .. beta_T = 0.02 at T = 1000.
_BETA_START = 1e-4
_BETA_END = 0.02
_COSINE_S = 0.008  # Nichol & Dhariwal 2021, section 3.2
MAX_BETA = 0.999  # Nichol & Dhariwal 2021, eq. 17 and below: clip to avoid singularities


def make_betas(name: str, T: int) -> np.ndarray:
    """The beta schedule ``name`` for ``T`` steps, ``np.float64[T]``.

    - ``linear``: Ho et al. 2020, 1e-4 -> 0.02 at T = 1000; for other T both ends are
      scaled by 1000 / T (Nichol & Dhariwal 2021, improved-diffusion), which keeps
      alpha_bar_T about the same.
    - ``cosine``: Nichol & Dhariwal 2021 eq. 17, alpha_bar(t) = f(t) / f(0) with
      f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), s = 0.008;
      beta_t = min(1 - alpha_bar(t) / alpha_bar(t - 1), 0.999).
    - ``quadratic``: linear in sqrt(beta), the original DDPM code's ``quad``:
      linspace(sqrt(start), sqrt(end), T) ** 2.
    - ``sigmoid``: the DDPM / GeoDiff code's ``sigmoid``:
      sigmoid(linspace(-6, 6, T)) * (end - start) + start.

    ``quadratic`` and ``sigmoid`` use the same 1000 / T scaling of their end points as
    ``linear`` (identical to the references at T = 1000).

    Raises:
        ValueError: unknown ``name`` (the message lists :data:`SCHEDULES`), ``T < 1``,
            or a scaled schedule whose largest beta would reach 0.999 (T too small).
    """
    if name not in _BUILDERS:
        raise ValueError(f"name: unknown beta schedule {name!r}; valid schedules: "
                         f"{', '.join(SCHEDULES)}")
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T: the number of timesteps must be an integer >= 1, got {T!r}")
    betas = _BUILDERS[name](int(T))
    if not (betas.max() < MAX_BETA + 1e-12 and betas.min() > 0.0):
        raise ValueError(
            f"T: the {name!r} schedule with T={T} has betas in [{betas.min():.4g}, "
            f"{betas.max():.4g}], outside (0, {MAX_BETA}]; use more timesteps "
            f"(T >= {math.ceil(1000 * _BETA_END / MAX_BETA)}) or the 'cosine' schedule")
    return betas


def _scaled_ends(T: int) -> Tuple[float, float]:
    scale = 1000.0 / T
    return scale * _BETA_START, scale * _BETA_END


def _linear(T: int) -> np.ndarray:
    start, end = _scaled_ends(T)
    return np.linspace(start, end, T, dtype=np.float64)


def _quadratic(T: int) -> np.ndarray:
    start, end = _scaled_ends(T)
    return np.linspace(start ** 0.5, end ** 0.5, T, dtype=np.float64) ** 2


def _sigmoid(T: int) -> np.ndarray:
    start, end = _scaled_ends(T)
    x = np.linspace(-6.0, 6.0, T, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x)) * (end - start) + start


def cosine_alpha_bar(t: np.ndarray) -> np.ndarray:
    """Nichol & Dhariwal 2021 eq. 17 before normalisation: f(t) for t = step / T in [0, 1]."""
    return np.cos((t + _COSINE_S) / (1.0 + _COSINE_S) * math.pi / 2.0) ** 2


def betas_for_alpha_bar(T: int, alpha_bar: Callable[[np.ndarray], np.ndarray],
                        max_beta: float = MAX_BETA) -> np.ndarray:
    """Betas that discretise a continuous alpha_bar(t), t in [0, 1] (N&D 2021 eq. 17):
    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta), ``[T]``."""
    i = np.arange(T, dtype=np.float64)
    ratio = alpha_bar((i + 1.0) / T) / alpha_bar(i / T)
    return np.minimum(1.0 - ratio, max_beta)


def _cosine(T: int) -> np.ndarray:
    return betas_for_alpha_bar(T, cosine_alpha_bar)


_BUILDERS = {"linear": _linear, "cosine": _cosine, "quadratic": _quadratic, "sigmoid": _sigmoid}
