"""Samplers: DDPM ancestral sampling, DDIM(eta), DDIM inversion, guidance hooks.

Every sampler takes the network as ``denoise_fn(x_t, t_original) -> model_out``, where
``x_t`` is ``[B, ...]`` (images ``[B, H, W, C]``) and ``t_original`` int32 ``[B]`` is
``diffusion.timestep_map[t]`` (the timestep the network was trained on, also for a
respaced diffusion). The whole chain, network included, runs as ONE compiled
``tf.function`` (a ``tf.while_loop`` over the steps; cached, see ``compiled.py``); the
noise of step t is ``tf.random.stateless_normal(seed=[seed, t])`` and x_T uses
``[seed, -1]``, so a seed gives the same samples every time.

Notation (Song et al. 2021, "DDIM"; index i of the diffusion's tables):

    alpha_bar_t       diffusion.alphas_cumprod[i]        (DDIM's alpha_t)
    alpha_bar_{t-1}   diffusion.alphas_cumprod_prev[i]   (1 after the last step)
    eps_hat, x0_hat   p_mean_variance(...)["pred_eps"], ["pred_x0"]
    sigma_t(eta)      eta * ddim_sigmas(diffusion, 1.0)[i]          (eq. 16)

Guidance: ``cond_fn(x_t, t_original)`` returns s * grad_x log p(y | x_t) (the scale s
folded in); DDPM: mean += Sigma * grad; DDIM: eps_hat -= sqrt(1 - alpha_bar_t) * grad
(Dhariwal & Nichol 2021, algorithms 1 and 2). Classifier-free guidance (Ho & Salimans
2022) is only a different ``denoise_fn``: see :func:`cfg_denoise_fn`.

    x = sample(diffusion, unet_fn, (64, 32, 32, 3), sampler="ddim", steps=50, seed=1)
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from ipu_diffusion.diffusion.compiled import compiled
from ipu_diffusion.diffusion.gaussian import GaussianDiffusion, gather_coef
from ipu_diffusion.diffusion.guidance import cfg_denoise_fn  # noqa: F401 (moved to guidance.py)
from ipu_diffusion.config import SAMPLERS
from ipu_diffusion.diffusion.respace import SPACINGS, respace, space_timesteps
Output = Union[tf.Tensor, Dict[str, tf.Tensor]]


def ddim_sigmas(diffusion: GaussianDiffusion, eta: float) -> np.ndarray:
    """sigma_t(eta) = eta sqrt((1 - a_{t-1}) / (1 - a_t)) sqrt(1 - a_t / a_{t-1}) with
    a = alpha_bar (Song et al. 2021 eq. 16), ``np.float64[T]`` (a float64 tensor for a
    ``respace.RuntimeRespaced`` diffusion, same operations); 0 at the last step."""
    ab, ab_prev = diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev
    sqrt = tf.sqrt if tf.is_tensor(ab) else np.sqrt
    return eta * sqrt((1.0 - ab_prev) / (1.0 - ab)) * sqrt(1.0 - ab / ab_prev)


def batch_seed(seed, offset):
    """The seed of the batch that starts at example ``offset`` of a sampling run seeded
    ``seed`` (``generate.sample_images``; the exported sampler, ``inference/export.py``).
    Python ints or int64 tensors."""
    return seed * 1_000_003 + offset


def _noise(x: tf.Tensor, seed: tf.Tensor, step) -> tf.Tensor:
    """float32 N(0, I) like ``x``, keyed by (seed, step)."""
    key = tf.stack([seed, tf.cast(step, tf.int64)])
    return tf.random.stateless_normal(tf.shape(x), key, dtype=tf.float32)


def _initial(shape: Optional[Sequence[int]], seed, noise: Optional[tf.Tensor]) -> tf.Tensor:
    if noise is not None:
        return tf.convert_to_tensor(noise)
    if shape is None:
        raise ValueError("shape: give the sample shape [B, ...] or an initial noise tensor")
    return initial_noise(shape, seed)


def initial_noise(shape: Sequence, seed) -> tf.Tensor:
    """x_T ~ N(0, I) float32 ``shape`` (``[B, ...]``; B may be a tensor), keyed by
    (seed, -1): what every sampler starts from when it is given no noise."""
    return tf.random.stateless_normal(list(shape), tf.stack([tf.cast(seed, tf.int64),
                                                             tf.constant(-1, tf.int64)]))


def _check_return_every(return_every: int) -> int:
    if isinstance(return_every, bool) or not isinstance(return_every, int) or return_every < 0:
        raise ValueError(f"return_every: must be an integer >= 0 (0 = only the final "
                         f"samples), got {return_every!r}")
    return return_every


def _run_chain(step_fn: Callable, x: tf.Tensor, num_steps: int, return_every: int) -> Output:
    """Run ``x <- step_fn(i, x)[0]`` for i = 0..num_steps-1 in one ``tf.while_loop``.

    ``step_fn`` returns (x_next, pred_x0). With ``return_every = k > 0`` the states after
    steps k, 2k, ... are stacked into ``intermediates`` ``[num_steps // k, B, ...]`` (and
    the x0_hat of those steps into ``pred_x0``)."""
    k = return_every
    size = num_steps // k if k else 0
    arrays = [tf.TensorArray(x.dtype, size=size, element_shape=x.shape)
              for _ in range(2 if k else 0)]

    def body(i, x, *arrays):
        x_next, pred_x0 = step_fn(i, x)
        x_next = tf.ensure_shape(tf.cast(x_next, x.dtype), x.shape)
        if k:
            done = i + 1
            values = (x_next, tf.cast(pred_x0, x.dtype))

            def write():
                return [a.write(done // k - 1, v) for a, v in zip(arrays, values)]

            arrays = tf.cond(tf.equal(done % k, 0), write, lambda: list(arrays))
        return [i + 1, x_next] + list(arrays)

    out = tf.while_loop(lambda i, *_: i < num_steps, body, [tf.constant(0), x] + arrays)
    if not k:
        return out[1]
    return {"samples": out[1], "intermediates": out[2].stack(), "pred_x0": out[3].stack()}


# ----------------------------------------------------------------------------- DDPM


def _ddpm_chain(diffusion: GaussianDiffusion, denoise_fn: Callable, cond_fn: Optional[Callable],
                clip_denoised: bool, return_every: int) -> Callable:
    N = diffusion.num_timesteps

    def run(x_T: tf.Tensor, seed: tf.Tensor) -> Output:
        tmap = tf.constant(diffusion.timestep_map, tf.int32)

        def step(i, x):
            index = N - 1 - i  # t, from T-1 down to 0
            t = tf.fill(tf.shape(x)[:1], index)
            t_original = tf.gather(tmap, t)
            out = diffusion.p_mean_variance(denoise_fn(x, t_original), x, t, clip_denoised)
            mean = tf.cast(out["mean"], tf.float32)
            variance = tf.cast(out["variance"], tf.float32)
            if cond_fn is not None:  # Dhariwal & Nichol 2021, algorithm 1
                mean = mean + variance * tf.cast(cond_fn(x, t_original), tf.float32)
            std = tf.exp(0.5 * tf.cast(out["log_variance"], tf.float32))
            nonzero = tf.cast(index > 0, tf.float32)  # no noise at t = 0
            return mean + nonzero * std * _noise(x, seed, index), out["pred_x0"]

        return _run_chain(step, x_T, N, return_every)

    return run


def ddpm_sample(diffusion: GaussianDiffusion, denoise_fn: Callable, shape: Optional[Sequence[int]],
                seed=0, clip_denoised: bool = True, return_every: int = 0,
                cond_fn: Optional[Callable] = None, noise: Optional[tf.Tensor] = None,
                jit_compile: bool = False) -> Output:
    """Ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t) for t = T-1 .. 0 (Ho et al. 2020,
    algorithm 2; eq. 11 for eps models), for every mean and variance type.

    Args:
        shape: ``[B, ...]`` of the samples (ignored when ``noise`` gives x_T).
        seed: int (or int tensor) seeding x_T and every step's noise.
        clip_denoised: clip x0_hat to [-1, 1] before forming the posterior mean.
        return_every: k > 0 also returns the states after every k steps.
        cond_fn: classifier guidance, ``cond_fn(x_t, t_original)`` -> s grad log p(y|x_t).
        noise: x_T ``[B, ...]``; default N(0, I) from ``seed``.
        jit_compile: compile the chain with XLA.

    Returns:
        samples ``[B, ...]``; with ``return_every`` a dict with ``samples``,
        ``intermediates`` and ``pred_x0`` (``[steps // k, B, ...]``).
    """
    k = _check_return_every(return_every)
    x_T = _initial(shape, seed, noise)
    run = compiled("ddpm", diffusion, [denoise_fn, cond_fn], (bool(clip_denoised), k),
                   lambda: _ddpm_chain(diffusion, denoise_fn, cond_fn, bool(clip_denoised), k),
                   jit_compile)
    return run(x_T, tf.cast(seed, tf.int64))


# ----------------------------------------------------------------------------- DDIM


def guided_x0_eps(diffusion: GaussianDiffusion, model_out: tf.Tensor, x: tf.Tensor, t: tf.Tensor,
                  t_original: tf.Tensor, cond_fn: Optional[Callable], clip: bool
                  ) -> Tuple[tf.Tensor, tf.Tensor]:
    """float32 (x0_hat, eps_hat) ``[B, ...]`` of a DDIM-type step, with classifier guidance
    in score form (Dhariwal & Nichol 2021, alg. 2): eps_hat -= sqrt(1 - alpha_bar_t) grad.

    With ``clip`` the guided x0_hat is clipped to [-1, 1] again and eps_hat recomputed from
    it (static thresholding of the guided data prediction, Lu et al. 2022 sec. 5). The
    guidance moves x0_hat by (1 - alpha_bar_t) / sqrt(alpha_bar_t) grad, ~2e4 grad at the
    cosine schedule's last step (alpha_bar = 2.4e-9), and unclipped that step throws the
    chain far outside the data range.
    """
    mean_part, _ = diffusion.split_model_output(model_out)
    x0, eps = diffusion.predict_x0_eps(mean_part, x, t, clip)
    if cond_fn is None:
        return x0, eps
    x32 = tf.cast(x, tf.float32)
    eps = eps - (diffusion.coef("sqrt_one_minus_alphas_cumprod", t, x)
                 * tf.cast(cond_fn(x, t_original), tf.float32))
    x0 = tf.cast(diffusion.predict_x0_from_eps(x32, t, eps), tf.float32)
    if clip:
        x0 = tf.clip_by_value(x0, -1.0, 1.0)
        eps = tf.cast(diffusion.predict_eps_from_x0(x32, t, x0), tf.float32)
    return x0, eps


def ddim_loop(diffusion: GaussianDiffusion, denoise_fn: Callable, x_T: tf.Tensor, seed: tf.Tensor,
              eta: tf.Tensor, cond_fn: Optional[Callable] = None, clip_denoised: bool = True,
              return_every: int = 0) -> Output:
    """The DDIM chain of :func:`ddim_sample` as graph ops, to call inside a ``tf.function``:
    x_T ``[B, ...]``, ``seed`` int64 and ``eta`` float32 scalars. ``diffusion`` may also be
    a ``respace.RuntimeRespaced`` (step count and tables are tensors), which is how the
    exported sampler (``inference/export.py``) runs this same chain."""
    N = diffusion.num_timesteps
    sigma_at_eta1 = ddim_sigmas(diffusion, 1.0)
    if not tf.is_tensor(sigma_at_eta1):
        sigma_at_eta1 = sigma_at_eta1.astype(np.float32)
    tmap = diffusion.timestep_map
    tmap = tmap if tf.is_tensor(tmap) else tf.constant(tmap, tf.int32)

    def step(i, x):
        index = N - 1 - i
        t = tf.fill(tf.shape(x)[:1], index)
        t_original = tf.gather(tmap, t)
        x0, eps = guided_x0_eps(diffusion, denoise_fn(x, t_original), x, t, t_original,
                                cond_fn, clip_denoised)
        ab_prev = diffusion.coef("alphas_cumprod_prev", t, x)
        sigma = eta * gather_coef(sigma_at_eta1, t, x)  # eq. 16; 0 at the last step
        direction = tf.sqrt(tf.maximum(1.0 - ab_prev - tf.square(sigma), 0.0)) * eps
        x_prev = tf.sqrt(ab_prev) * x0 + direction  # eq. 12
        nonzero = tf.cast(index > 0, tf.float32)  # no noise at the last step
        return x_prev + nonzero * sigma * _noise(x, seed, index), x0

    return _run_chain(step, x_T, N, return_every)


def _ddim_chain(diffusion: GaussianDiffusion, denoise_fn: Callable, cond_fn: Optional[Callable],
                clip_denoised: bool, return_every: int) -> Callable:
    def run(x_T: tf.Tensor, seed: tf.Tensor, eta: tf.Tensor) -> Output:
        return ddim_loop(diffusion, denoise_fn, x_T, seed, eta, cond_fn, clip_denoised,
                         return_every)

    return run


def ddim_sample(diffusion: GaussianDiffusion, denoise_fn: Callable, shape: Optional[Sequence[int]],
                seed=0, eta: float = 0.0, clip_denoised: bool = True, return_every: int = 0,
                cond_fn: Optional[Callable] = None, noise: Optional[tf.Tensor] = None,
                jit_compile: bool = False) -> Output:
    """DDIM sampling (Song et al. 2021 eq. 12) over the diffusion's steps:
    x_{t-1} = sqrt(a_{t-1}) x0_hat + sqrt(1 - a_{t-1} - sigma_t^2) eps_hat + sigma_t z,
    sigma_t from eq. 16 (eta = 0: deterministic; eta = 1 with consecutive steps: DDPM
    with the fixed-small variance); no noise at the last step. Respace first (or use
    :func:`sample`) to take fewer steps. Arguments and result as :func:`ddpm_sample`;
    ``eta`` may be a float or a scalar tensor (it does not retrace).
    """
    k = _check_return_every(return_every)
    x_T = _initial(shape, seed, noise)
    run = compiled("ddim", diffusion, [denoise_fn, cond_fn], (bool(clip_denoised), k),
                   lambda: _ddim_chain(diffusion, denoise_fn, cond_fn, bool(clip_denoised), k),
                   jit_compile)
    return run(x_T, tf.cast(seed, tf.int64), tf.cast(eta, tf.float32))


def _invert_chain(diffusion: GaussianDiffusion, denoise_fn: Callable,
                  clip_denoised: bool) -> Callable:
    N = diffusion.num_timesteps

    def run(x0: tf.Tensor) -> tf.Tensor:
        tmap = tf.constant(diffusion.timestep_map, tf.int32)

        def step(i, x):
            # x is at level a_{i-1} (x_0 itself for i = 0); move it to level a_i with eq. 12
            # (eta = 0, t and t-1 swapped), using eps_hat at the nearest known step max(i-1, 0).
            t = tf.fill(tf.shape(x)[:1], tf.maximum(i - 1, 0))
            out = diffusion.p_mean_variance(denoise_fn(x, tf.gather(tmap, t)), x, t, clip_denoised)
            eps = tf.cast(out["pred_eps"], tf.float32)
            x0_hat = tf.where(tf.equal(i, 0), tf.cast(x, tf.float32),
                              tf.cast(out["pred_x0"], tf.float32))
            ab_next = diffusion.coef("alphas_cumprod", tf.fill(tf.shape(x)[:1], i), x)
            return tf.sqrt(ab_next) * x0_hat + tf.sqrt(1.0 - ab_next) * eps, x0_hat

        return _run_chain(step, x0, N, 0)

    return run


def ddim_invert(diffusion: GaussianDiffusion, denoise_fn: Callable, x0: tf.Tensor,
                clip_denoised: bool = False, jit_compile: bool = False) -> tf.Tensor:
    """Deterministic DDIM encoding x_0 ``[B, ...]`` -> x_T ``[B, ...]`` (eta = 0, eq. 12 run
    forwards): x_{t} = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps_hat, with (x0_hat, eps_hat)
    predicted at the previous level. It visits exactly the levels a_0 .. a_{T-1} that
    :func:`ddim_sample` visits backwards, so sampling from the result reconstructs x_0
    up to the discretisation error of the steps."""
    run = compiled("ddim_invert", diffusion, [denoise_fn], (bool(clip_denoised),),
                   lambda: _invert_chain(diffusion, denoise_fn, bool(clip_denoised)), jit_compile)
    return run(tf.convert_to_tensor(x0))


def ddim_reconstruct(diffusion: GaussianDiffusion, denoise_fn: Callable, x0: tf.Tensor,
                     clip_denoised: bool = False, jit_compile: bool = False) -> tf.Tensor:
    """:func:`ddim_invert` then :func:`ddim_sample` with eta = 0: ``[B, ...]`` -> ``[B, ...]``."""
    x_T = ddim_invert(diffusion, denoise_fn, x0, clip_denoised, jit_compile)
    return ddim_sample(diffusion, denoise_fn, None, eta=0.0, clip_denoised=clip_denoised,
                       noise=x_T, jit_compile=jit_compile)


# ----------------------------------------------------------------------------- utilities


def slerp(z0: tf.Tensor, z1: tf.Tensor, alpha) -> tf.Tensor:
    """Spherical interpolation per example between latents ``[B, ...]`` (e.g. DDIM x_T):
    sin((1 - a) w) / sin(w) z0 + sin(a w) / sin(w) z1, w = angle(z0, z1) over the
    non-batch axes; linear when z0 and z1 are (anti)parallel. ``alpha`` is a scalar or
    ``[B]``; alpha = 0 gives z0, alpha = 1 gives z1."""
    z0, z1 = tf.convert_to_tensor(z0), tf.convert_to_tensor(z1)
    a = tf.cast(alpha, tf.float32)
    a32 = tf.reshape(a, [-1] + [1] * (z0.shape.rank - 1)) if a.shape.rank == 1 else a
    f0, f1 = tf.cast(z0, tf.float32), tf.cast(z1, tf.float32)
    axes = list(range(1, z0.shape.rank))
    dot = tf.reduce_sum(f0 * f1, axis=axes, keepdims=True)
    norms = tf.norm(tf.reshape(f0, [tf.shape(f0)[0], -1]), axis=1) * tf.norm(
        tf.reshape(f1, [tf.shape(f1)[0], -1]), axis=1)
    cos = tf.clip_by_value(dot / tf.reshape(norms, tf.shape(dot)), -1.0, 1.0)
    omega = tf.acos(cos)
    sin = tf.sin(omega)
    safe = sin > 1e-6
    sin = tf.where(safe, sin, 1.0)
    w0 = tf.where(safe, tf.sin((1.0 - a32) * omega) / sin, 1.0 - a32)
    w1 = tf.where(safe, tf.sin(a32 * omega) / sin, a32)
    return tf.cast(w0 * f0 + w1 * f1, z0.dtype)


def sample(diffusion: GaussianDiffusion, denoise_fn: Callable, shape: Optional[Sequence[int]],
           sampler: str = "ddpm", steps: Optional[int] = None, eta: float = 0.0, seed=0,
           spacing: Optional[str] = None, **kwargs) -> Output:
    """Sample with ``sampler`` in ``steps`` steps (default: all T).

    With ``steps < T`` the diffusion is respaced first: ``spacing`` ``"uniform"`` (the
    default; evenly spaced, ``space_timesteps(T, "uniform N")``; strided DDPM for
    ``ddpm``), ``"ddim"`` (integer stride) or ``"quadratic"``. ``kwargs`` go to :func:`ddpm_sample` /
    :func:`ddim_sample` (clip_denoised, return_every, cond_fn, noise, jit_compile).
    ``"dpm_solver"`` is DPM-Solver++(2M) (``dpm_solver.py``; ``steps`` network calls;
    ``spacing`` default ``"logsnr"``, evenly spaced half-log-SNR; it also takes ``order``).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: {sampler!r} is not valid; choose one of {', '.join(SAMPLERS)}")
    if sampler == "dpm_solver":  # DPM-Solver++(2M); respaces itself (also spacing "logsnr")
        from ipu_diffusion.diffusion.dpm_solver import dpm_solver

        if eta != 0.0:
            raise ValueError(f"eta: only the 'ddim' sampler takes eta, got {eta!r} with 'dpm_solver'")
        return dpm_solver(diffusion, denoise_fn, shape, steps=steps, spacing=spacing or "logsnr",
                          seed=seed, **kwargs)
    spacing = spacing or "uniform"
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: {spacing!r} is not valid; choose one of {', '.join(SPACINGS)}")
    T = diffusion.num_timesteps
    if steps is not None:
        if (isinstance(steps, bool) or not isinstance(steps, (int, np.integer))
                or not 1 <= steps <= T):
            raise ValueError(f"steps: must be an integer in [1, {T}], got {steps!r}")
        if steps < T:
            spec = f"ddim{steps}" if spacing == "ddim" else f"{spacing} {steps}"
            diffusion = respace(diffusion, space_timesteps(T, spec))
    if sampler == "ddpm":
        if eta != 0.0:
            raise ValueError(f"eta: only the 'ddim' sampler takes eta, got {eta!r} with 'ddpm'")
        return ddpm_sample(diffusion, denoise_fn, shape, seed=seed, **kwargs)
    return ddim_sample(diffusion, denoise_fn, shape, seed=seed, eta=eta, **kwargs)
