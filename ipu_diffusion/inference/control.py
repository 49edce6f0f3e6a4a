"""Control with a trained model: DDIM encoding, reconstruction and latent interpolation.

Deterministic DDIM (eta = 0) is an invertible map between images and latents x_T
(Song et al. 2021, section 4.3 and 5.4): running its update (eq. 12) with t and t-1
swapped encodes x_0 into x_T, and sampling from that x_T decodes it back up to the
discretisation error of the steps. Latents then interpolate meaningfully: the
spherical interpolation of two encoded x_T decodes to a sequence of images morphing
one into the other (Song et al. figure 6).

    out = reconstruct(diffusion, denoise_fn, images, steps=50)   # latents, images, mse
    strip = interpolate(diffusion, denoise_fn, a, b, frames=8, steps=50)

The ``*_run`` functions do the same for a trained run's EMA model and held-out images,
write a PNG and record the figures in ``metrics.json`` (the CLI's ``reconstruct`` and
``interpolate``).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ipu_diffusion.diffusion.gaussian import GaussianDiffusion
from ipu_diffusion.diffusion.guidance import GuidanceError
from ipu_diffusion.diffusion.respace import respace
from ipu_diffusion.diffusion.sampling import ddim_invert, ddim_sample, slerp


ENCODE_MIN_ALPHA_BAR = 1e-3  # latents keep sqrt(1e-3) = 3% of the signal


def encoding_timesteps(diffusion: GaussianDiffusion, steps: int) -> List[int]:
    """``steps`` timesteps evenly spaced from 0 to the last t with alpha_bar_t >=
    :data:`ENCODE_MIN_ALPHA_BAR`. DDIM encoding is only as invertible as its top step is
    well conditioned: decoding divides by sqrt(alpha_bar_top), so where alpha_bar
    collapses (the cosine schedule's clipped last steps reach 2.4e-9) a tiny eps
    mismatch between encoder and decoder is amplified ~700x (measured on the digits:
    round-trip MSE 0.80 up to t = 999, 0.0015 up to t = 980)."""
    T = diffusion.num_timesteps
    top = int(np.nonzero(diffusion.alphas_cumprod >= ENCODE_MIN_ALPHA_BAR)[0].max(initial=0))
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) \
            or not 1 <= steps <= top + 1:
        raise GuidanceError(f"--steps: must be an integer in [1, {top + 1}] (timesteps 0..{top} "
                            f"of {T} keep alpha_bar >= {ENCODE_MIN_ALPHA_BAR:g}), got {steps!r}")
    return [int(round(i * top / max(steps - 1, 1))) for i in range(steps)]


def _respaced(diffusion: GaussianDiffusion, steps: int) -> GaussianDiffusion:
    return respace(diffusion, encoding_timesteps(diffusion, steps))


def encode(diffusion: GaussianDiffusion, denoise_fn: Callable, x0, steps: int) -> tf.Tensor:
    """DDIM latents ``[B, ...]`` of images ``x0`` ``[B, ...]`` in ``steps`` steps over
    :func:`encoding_timesteps` (no clipping: the inverse of :func:`decode`)."""
    return ddim_invert(_respaced(diffusion, steps), denoise_fn, tf.convert_to_tensor(x0, tf.float32))


def decode(diffusion: GaussianDiffusion, denoise_fn: Callable, x_T, steps: int) -> tf.Tensor:
    """Deterministic DDIM samples (eta = 0, no clipping) from latents ``x_T`` ``[B, ...]``
    at the top of :func:`encoding_timesteps`."""
    return ddim_sample(_respaced(diffusion, steps), denoise_fn, None, eta=0.0, clip_denoised=False,
                       noise=tf.convert_to_tensor(x_T, tf.float32))


def reconstruct(diffusion: GaussianDiffusion, denoise_fn: Callable, x0, steps: int
                ) -> Dict[str, np.ndarray]:
    """Encode then decode ``x0`` ``[B, ...]``: ``latents``, ``reconstructions`` and the
    per-image ``mse`` ``[B]`` between ``x0`` and the reconstructions."""
    x0 = np.asarray(x0, np.float32)
    latents = encode(diffusion, denoise_fn, x0, steps)
    recon = decode(diffusion, denoise_fn, latents, steps).numpy()
    mse = np.mean((recon - x0) ** 2, axis=tuple(range(1, x0.ndim)))
    return {"latents": latents.numpy(), "reconstructions": recon, "mse": mse}


def interpolate(diffusion: GaussianDiffusion, denoise_fn: Callable, x_a, x_b, frames: int,
                steps: int) -> Dict[str, np.ndarray]:
    """Slerp between the DDIM latents of images ``x_a`` and ``x_b`` (each ``[...]``, one
    image) at ``frames`` evenly spaced alphas 0..1 and decode: ``alphas`` ``[F]``,
    ``latents`` ``[F, ...]`` (the first and last are the encoded images) and ``images``."""
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 2:
        raise GuidanceError(f"--frames: need an integer >= 2 (both ends), got {frames!r}")
    pair = np.stack([np.asarray(x_a, np.float32), np.asarray(x_b, np.float32)])
    z = encode(diffusion, denoise_fn, pair, steps)
    alphas = np.linspace(0.0, 1.0, frames).astype(np.float32)
    ones = tf.ones([frames] + [1] * (z.shape.rank - 1))
    latents = slerp(z[:1] * ones, z[1:] * ones, tf.constant(alphas))
    images = decode(diffusion, denoise_fn, latents, steps)
    return {"alphas": alphas, "latents": latents.numpy(), "images": images.numpy(),
            "endpoints": z.numpy()}


# ----------------------------------------------------------------------------- runs


def held_out(run) -> Tuple[np.ndarray, Optional[np.ndarray], str]:
    """The run's held-out images and labels (test split where the source has one)."""
    from ipu_diffusion.data import held_out_split, load_arrays

    split = held_out_split(run.cfg)
    images, labels = load_arrays(run.cfg, split)
    return images, labels, split


def _run_denoiser(run, labels: Optional[np.ndarray]) -> Tuple[Callable, str]:
    """The EMA model's denoiser: conditional on ``labels`` when the model takes labels
    and they are given, else unconditional (the null label of a conditional model)."""
    from ipu_diffusion.inference.generate import unconditional_fn, ema_guide, ema_unet

    if labels is not None and "y" in ema_unet(run)[0].input_keys:
        return ema_guide(run, "none").set(labels).denoise_fn, "conditional"
    return unconditional_fn(run), "unconditional"


def reconstruct_run(run, num: int, steps: int, seed: int = 0, out: str = "") -> Dict[str, object]:
    """Reconstruct ``num`` random held-out images through DDIM latents; writes
    ``<out>.png`` (originals over reconstructions) and returns the MSE figures."""
    from ipu_diffusion.visualize import save_image_grid

    images, labels, split = held_out(run)
    if not 1 <= num <= len(images):
        raise GuidanceError(f"--num: need 1..{len(images)} held-out images, got {num}")
    pick = np.sort(np.random.RandomState(seed).choice(len(images), num, replace=False))
    denoise, mode = _run_denoiser(run, None if labels is None else labels[pick])
    result = reconstruct(run.diffusion, denoise, images[pick], steps)
    recon = np.clip(result["reconstructions"], -1.0, 1.0)
    mse = np.mean((recon - images[pick]) ** 2, axis=(1, 2, 3))
    cols = min(num, 16)
    rows = []
    for i in range(0, num, cols):  # originals above their reconstructions
        rows += [images[pick][i:i + cols], recon[i:i + cols]]
    path = (out or os.path.join(run.workdir, f"reconstruct_ddim{steps}")) + ".png"
    save_image_grid(np.concatenate(rows), path, ncols=cols, scale=2)
    return {"split": split, "num": num, "steps": steps, "model": mode,
            "mse": float(mse.mean()), "mse_stderr": float(mse.std() / np.sqrt(num)),
            "psnr_db": float(10 * np.log10(4.0 / max(float(mse.mean()), 1e-12))),
            "png": path, "checkpoint_step": run.step}


def interpolate_run(run, steps: int, frames: int, pair: Optional[Sequence[int]] = None,
                    seed: int = 0, out: str = "") -> Dict[str, object]:
    """Interpolate between two held-out images (``pair`` indices, default two of
    different classes picked by ``seed``); writes ``<out>.png``: the first original, the
    ``frames`` decoded frames, the second original."""
    from ipu_diffusion.visualize import save_image_grid

    images, labels, split = held_out(run)
    if pair is None:
        rs = np.random.RandomState(seed)
        a = int(rs.randint(len(images)))
        others = [i for i in range(len(images)) if labels is None or labels[i] != labels[a]]
        pair = (a, int(rs.choice(others)))
    if len(pair) != 2 or not all(0 <= int(i) < len(images) for i in pair):
        raise GuidanceError(f"--pair: need two indices in 0..{len(images) - 1}, got {list(pair)}")
    denoise, _ = _run_denoiser(run, None)
    result = interpolate(run.diffusion, denoise, images[pair[0]], images[pair[1]],
                         frames, steps)
    strip = np.concatenate([images[pair[0]][None], np.clip(result["images"], -1.0, 1.0),
                            images[pair[1]][None]])
    path = (out or os.path.join(run.workdir, f"interpolate_ddim{steps}")) + ".png"
    save_image_grid(strip, path, ncols=len(strip), scale=2)
    ends = np.clip(result["images"][[0, -1]], -1.0, 1.0)
    end_mse = np.mean((ends - images[list(pair)]) ** 2, axis=(1, 2, 3))
    return {"split": split, "pair": [int(i) for i in pair], "frames": frames, "steps": steps,
            "labels": None if labels is None else [int(labels[i]) for i in pair],
            "endpoint_mse": [float(v) for v in end_mse], "png": path,
            "checkpoint_step": run.step}
