"""Respacing: a diffusion over a subsequence of timesteps (DDIM's tau; improved-diffusion).

Keeping timesteps tau_1 < ... < tau_S of a T-step diffusion gives a new S-step diffusion
with the same alpha_bar at the kept steps: beta_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}}
(alpha_bar_{tau_0} := 1). Its ``timestep_map`` records tau, which is what the network sees
as t. So DDPM, strided DDPM and DDIM sampling all run on one ``GaussianDiffusion``.

    steps = space_timesteps(1000, "ddim50")          # [0, 20, 40, ..., 980]
    fast = respace(diffusion, steps)                 # 50-step GaussianDiffusion

:class:`RuntimeRespaced` is the uniform respacing for a step count that is a tensor (an
input of an exported sampler), computed as graph ops with the same float64 arithmetic.
"""
from __future__ import annotations

from typing import Iterable, List, Union

import numpy as np
import tensorflow as tf

from ipu_diffusion.diffusion.gaussian import GaussianDiffusion, gather_coef

SPACINGS = ("uniform", "ddim", "quadratic")


def _count(spec: str, text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"spec: cannot read a step count from {spec!r}; expected 'ddimN', "
                         f"'uniform N', 'quadratic N' or 'N'") from None
    if count < 1:
        raise ValueError(f"spec: {spec!r} asks for {count} steps; need at least 1")
    return count


def _uniform(T: int, count: int) -> List[int]:
    """improved-diffusion's section_counts with one section: round(i (T-1)/(count-1))."""
    if count > T:
        raise ValueError(f"spec: cannot take {count} steps out of {T} timesteps")
    stride = (T - 1) / (count - 1) if count > 1 else 1.0
    return [int(round(i * stride)) for i in range(count)]


def _ddim(T: int, count: int) -> List[int]:
    """improved-diffusion's ``ddimN``: range(0, T, stride) for the integer stride that
    yields exactly N steps."""
    for stride in range(1, T):
        if len(range(0, T, stride)) == count:
            return list(range(0, T, stride))
    raise ValueError(f"spec: cannot create exactly {count} steps out of {T} with an "
                     f"integer stride; use 'uniform {count}'")


def _quadratic(T: int, count: int) -> List[int]:
    """Song et al. 2021 (DDIM code, skip_type 'quad'): int(linspace(0, sqrt(0.8 T), N)^2).

    For large N the first values repeat (N = 50 of 1000 starts 0, 0, 1, 3, ...); a
    repeated step is a no-op in the DDIM code (x_t -> x_t), so repeats are dropped and
    fewer than N distinct steps are returned."""
    if count > T:
        raise ValueError(f"spec: cannot take {count} steps out of {T} timesteps")
    return sorted(set(int(s) for s in np.linspace(0.0, np.sqrt(T * 0.8), count) ** 2))


def space_timesteps(T: int, spec: Union[str, int]) -> List[int]:
    """The kept timesteps, sorted, for a spacing ``spec``.

    - ``"ddimN"``: stride spacing range(0, T, k) with exactly N steps (improved-diffusion).
    - ``"uniform N"`` or ``"N"`` (or the int N): N steps evenly spaced from 0 to T-1,
      rounded (improved-diffusion's section counts with a single section).
    - ``"quadratic N"``: the DDIM paper's quadratic spacing, denser at small t (up to
      0.8 T; repeated steps are dropped, so possibly fewer than N).

    Raises:
        ValueError: unparsable ``spec`` or a count that the spacing cannot produce.
    """
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return _uniform(T, _count(str(spec), str(spec)))
    if not isinstance(spec, str):
        raise ValueError(f"spec: expected a string such as 'ddim50' or 'uniform 100', got {spec!r}")
    text = spec.strip()
    if text.startswith("ddim"):
        return _ddim(T, _count(spec, text[len("ddim"):]))
    parts = text.split()
    if len(parts) == 1:
        return _uniform(T, _count(spec, parts[0]))
    if len(parts) == 2 and parts[0] in ("uniform", "quadratic"):
        count = _count(spec, parts[1])
        return _uniform(T, count) if parts[0] == "uniform" else _quadratic(T, count)
    raise ValueError(f"spec: {spec!r} is not a spacing; expected 'ddimN', 'uniform N', "
                     f"'quadratic N' or 'N'")


def respace(diffusion: GaussianDiffusion, use_timesteps: Iterable[int]) -> GaussianDiffusion:
    """A diffusion over the kept steps ``use_timesteps`` (table indices of ``diffusion``).

    New betas: beta_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}} (so the kept
    alpha_bars are unchanged, Song et al. 2021 section 4.2); ``timestep_map`` composes with
    the parent's, so respacing a respaced diffusion still maps to original timesteps.
    The mean, variance and loss types are kept.
    """
    kept = sorted(set(int(s) for s in use_timesteps))
    T = diffusion.num_timesteps
    if not kept or kept[0] < 0 or kept[-1] >= T:
        raise ValueError(f"use_timesteps: need a non-empty set of steps in [0, {T}), got "
                         f"{kept[:5]}{'...' if len(kept) > 5 else ''}")
    alpha_bar = diffusion.alphas_cumprod[kept]
    betas = 1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1])
    return GaussianDiffusion(betas, mean_type=diffusion.mean_type, var_type=diffusion.var_type,
                             loss_type=diffusion.loss_type,
                             timestep_map=diffusion.timestep_map[kept])


def _uniform_graph(T: int, count: tf.Tensor) -> tf.Tensor:
    """:func:`_uniform` as graph ops, int32 ``[count]``: the same float64 stride and
    product, rounded half to even like Python's ``round``."""
    stride = tf.where(count > 1, (T - 1) / tf.cast(tf.maximum(count - 1, 1), tf.float64),
                      tf.constant(1.0, tf.float64))
    return tf.cast(tf.round(tf.range(count, dtype=tf.float64) * stride), tf.int32)


def _prepend_one(x: tf.Tensor) -> tf.Tensor:
    """``np.append(1.0, x)`` for a float64 ``[n]`` tensor."""
    return tf.concat([tf.ones([1], tf.float64), x], 0)


class RuntimeRespaced(GaussianDiffusion):
    """``diffusion`` respaced to ``steps`` evenly spaced steps, ``steps`` an int32 scalar
    tensor in 1..T known only when the graph runs: the diffusion ``sampling.sample(...,
    steps=steps)`` samples with (``respace(diffusion, space_timesteps(T, "uniform S"))``,
    or ``diffusion`` itself for S = T, which ``sample`` does not respace).

    Built inside a ``tf.function``; ``num_timesteps`` is the tensor S, ``timestep_map`` an
    int32 ``[S]`` tensor, and the tables are float64 tensors computed from ``diffusion``'s
    float64 ``alphas_cumprod`` by the operations of :func:`_uniform`, :func:`respace` and
    ``GaussianDiffusion._set_tables``, in their order (a 1-D ``cumprod`` runs sequentially
    like numpy's), so their float32 casts equal the numpy tables bit for bit. Only the
    tables the DDIM chain reads exist (:attr:`TABLES`).
    """

    TABLES = ("alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
              "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
              "sqrt_recipm1_alphas_cumprod")

    def __init__(self, diffusion: GaussianDiffusion, steps):
        T = diffusion.num_timesteps
        steps = tf.convert_to_tensor(steps, tf.int32)
        kept = _uniform_graph(T, steps)
        alpha_bar = tf.gather(tf.constant(diffusion.alphas_cumprod, tf.float64), kept)
        betas = tf.cond(tf.equal(steps, T), lambda: tf.constant(diffusion.betas, tf.float64),
                        lambda: 1.0 - alpha_bar / _prepend_one(alpha_bar[:-1]))
        self.mean_type, self.var_type = diffusion.mean_type, diffusion.var_type
        self.loss_type = diffusion.loss_type
        self.num_timesteps = steps
        self.timestep_map = tf.gather(tf.constant(diffusion.timestep_map, tf.int32), kept)
        self.betas = betas
        self.alphas_cumprod = tf.math.cumprod(1.0 - betas)  # Ho et al. eq. 4
        self.alphas_cumprod_prev = _prepend_one(self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = tf.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = tf.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = tf.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = tf.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self._f32 = {name: tf.cast(getattr(self, name), tf.float32) for name in self.TABLES}

    def coef(self, name: str, t: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
        if name not in self._f32:
            raise NotImplementedError(f"{name}: a RuntimeRespaced diffusion has only the tables "
                                      f"of DDIM sampling ({', '.join(self.TABLES)})")
        return gather_coef(self._f32[name], t, x)

    @property
    def fingerprint(self):
        raise TypeError("a RuntimeRespaced diffusion holds tensors: it cannot key a cache")

    def __repr__(self) -> str:
        return (f"RuntimeRespaced(S={self.num_timesteps}, mean_type={self.mean_type!r}, "
                f"var_type={self.var_type!r})")
