"""Evaluate a trained run: sample with the EMA weights, score, write ``metrics.json``.

Digits runs are scored with the digits classifier against the held-out test split,
next to the real-train vs real-test floor; other datasets with the FID Inception graph
when its path is given (``eval.inception_path`` or ``$IPU_DIFFUSION_INCEPTION``).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import numpy as np

from ipu_diffusion.evaluation.evaluate import digits_quality, inception_quality
from ipu_diffusion.evaluation.inception import ENV_VAR
from ipu_diffusion.progress import Progress
from ipu_diffusion.visualize import save_image_grid

EVAL_CACHE = "eval_cache"


def quantize_256(images: np.ndarray) -> np.ndarray:
    """Snap [-1, 1] images to the 256-level grid the discretised decoder assumes."""
    return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def bits_per_dim(run, images: np.ndarray, batch_size: int, seed: int = 0) -> Dict[str, float]:
    """Mean negative VLB in bits/dim of ``images`` [N, H, W, C] under the EMA model,
    over all timesteps plus the prior term (Ho et al. 2020 eq. 5), batched."""
    from ipu_diffusion.diffusion.losses import bits_per_dim as vlb_bpd
    from ipu_diffusion.inference.generate import ema_unet

    _, denoise = ema_unet(run)
    x = quantize_256(images).astype(np.float32)
    bar = Progress(len(x), "bits/dim")
    totals, priors = [], []
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        pad = batch_size - len(chunk)  # keep one batch shape: one compiled chain
        out = vlb_bpd(run.diffusion, denoise,
                      np.concatenate([chunk, chunk[:pad]]) if pad else chunk, seed=seed + i)
        totals.append(out["total_bpd"].numpy()[: len(chunk)])
        priors.append(out["prior_bpd"].numpy()[: len(chunk)])
        bar.add(len(chunk))
    total = np.concatenate(totals)
    return {"bpd": float(total.mean()), "bpd_stderr": float(total.std() / np.sqrt(len(total))),
            "bpd_prior": float(np.concatenate(priors).mean()), "bpd_images": int(len(total))}


def _nearest_distances(queries: np.ndarray, pool: np.ndarray, batch: int = 256) -> np.ndarray:
    """Euclidean pixel distance from each query [N, ...] to its nearest image in ``pool``."""
    q = queries.reshape(len(queries), -1).astype(np.float64)
    p = pool.reshape(len(pool), -1).astype(np.float64)
    p_sq = (p ** 2).sum(1)
    out = []
    for i in range(0, len(q), batch):
        c = q[i:i + batch]
        d2 = (c ** 2).sum(1)[:, None] - 2.0 * c @ p.T + p_sq[None, :]
        out.append(np.sqrt(np.maximum(d2.min(1), 0.0)))
    return np.concatenate(out)


def memorization(images: np.ndarray, train: np.ndarray, test: np.ndarray) -> Dict[str, float]:
    """Do samples copy training images? Compares each sample's nearest-training-image
    distance with the same distance for held-out test images (which are not copies):
    ``near_copies`` is the fraction of samples closer to a training image than 99% of
    test images are."""
    fake = _nearest_distances(images, train)
    real = _nearest_distances(test, train)
    return {"nn_train_distance_median": float(np.median(fake)),
            "nn_train_distance_median_test": float(np.median(real)),
            "near_copies": float((fake < np.percentile(real, 1)).mean())}


def _quality(run, images: np.ndarray, verbose: bool) -> Dict[str, Any]:
    from ipu_diffusion.data import load_arrays

    cfg = run.cfg
    cache = os.path.join(run.workdir, EVAL_CACHE)
    if cfg.data.source == "digits":
        train, _ = load_arrays(cfg, "train")
        test, _ = load_arrays(cfg, "test")
        return {"feature_net": "digits classifier",
                **digits_quality(images, cfg, cache, seed=cfg.run.seed, verbose=verbose),
                **memorization(images, train, test)}
    if cfg.eval.inception_path or os.environ.get(ENV_VAR):
        return {"feature_net": "FID Inception (pool3)",
                **inception_quality(images, cfg, cache, seed=cfg.run.seed, verbose=verbose)}
    return {"feature_net": None,
            "note": f"no FID/KID: set eval.inception_path or ${ENV_VAR} to the FID Inception graph"}


def evaluate_run(run, num_samples: int, sampler: str, steps: int, eta: float, seed: int = 0,
                 bpd_images: int = 0, verbose: bool = True,
                 grid: Optional[str] = None) -> Dict[str, Any]:
    """Sample ``num_samples`` images, score them, and record everything in
    ``<workdir>/metrics.json`` under ``"eval"``; also writes a grid of 64 samples to
    ``grid`` (default ``<workdir>/eval_samples.png``)."""
    from ipu_diffusion.data import held_out_split, load_arrays
    from ipu_diffusion.inference.generate import sample_images

    began = time.time()
    images = sample_images(run, num_samples, seed, sampler=sampler, steps=steps, eta=eta,
                           progress=verbose)
    sample_time = time.time() - began
    result: Dict[str, Any] = {"checkpoint_step": run.step, "sampler": sampler, "steps": steps,
                              "eta": eta if sampler == "ddim" else None,
                              "sampling_precision": run.cfg.eval.precision,
                              "num_samples": num_samples,
                              "sampling_img_per_s": round(num_samples / sample_time, 2)}
    result.update(_quality(run, images, verbose))
    if bpd_images:
        split = held_out_split(run.cfg)
        held_out, _ = load_arrays(run.cfg, split)
        result.update(bits_per_dim(run, held_out[:bpd_images], run.cfg.eval.batch_size, seed))
        result["bpd_split"] = split
    result["wall_time_s"] = round(time.time() - began, 2)
    save_image_grid(images[:64], grid or os.path.join(run.workdir, "eval_samples.png"))
    merge_metrics(run.workdir, {"eval": result})
    return result


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, "metrics.json")


def merge_metrics(workdir: str, update: Dict[str, Any]) -> Dict[str, Any]:
    """Merge ``update`` into ``<workdir>/metrics.json`` (atomic replace)."""
    path = metrics_path(workdir)
    data: Dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update(update)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    os.replace(tmp, path)
    return data
