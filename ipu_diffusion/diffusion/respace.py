"""Respacing: a diffusion over a subsequence of timesteps (DDIM's tau; improved-diffusion).

Keeping timesteps tau_1 < ... < tau_S of a T-step diffusion gives a new S-step diffusion
with the same alpha_bar at the kept steps: beta_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}}
(alpha_bar_{tau_0} := 1). Its ``timestep_map`` records tau, which is what the network sees
as t. So DDPM, strided DDPM and DDIM sampling all run on one ``GaussianDiffusion``.

    steps = space_timesteps(1000, "ddim50")          # [0, 20, 40, ..., 980]
    fast = respace(diffusion, steps)                 # 50-step GaussianDiffusion
"""
from __future__ import annotations

from typing import Iterable, List, Union

import numpy as np

from ipu_diffusion.diffusion.gaussian import GaussianDiffusion

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
