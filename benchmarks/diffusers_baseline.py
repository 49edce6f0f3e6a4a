"""Baseline: what a PyTorch user gets from Hugging Face diffusers in the same wall time on
the same CPU, on the same digits, scored by the same code as ``make train``.

Two steps in two environments (``make bench-diffusers`` runs both):

    # 1. under .venv-torch (torch + diffusers; never imports TensorFlow)
    .venv-torch/bin/python benchmarks/diffusers_baseline.py train --seconds 395 \\
        --out benchmarks/results/diffusers_digits.npz
    # 2. under .venv (the project's environment; never imports torch)
    .venv/bin/python benchmarks/diffusers_baseline.py score \\
        --samples benchmarks/results/diffusers_digits.npz \\
        --out benchmarks/results/diffusers_baseline.json

``train`` follows diffusers' examples/unconditional_image_generation/train_unconditional.py
wherever its defaults apply: ``UNet2DModel``, ``DDPMScheduler`` (1000 steps, beta schedule
"linear", epsilon prediction), ``F.mse_loss`` on the noise, gradient-norm clipping at 1.0,
AdamW (lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, eps 1e-8) with the cosine schedule
and 500 warmup steps, ``EMAModel`` (max decay 0.9999, EMA warmup, inv_gamma 1, power 3/4),
a shuffling ``DataLoader`` (last partial batch kept), no random flip (the example's
default), fp32. It differs from the example only where this comparison requires:

- data: scikit-learn's digits, the project's own train split (stratified, seed 0, 20 %
  held out), 8x8 -> 16x16 half-pixel bilinear, [-1, 1] -- reproduced here in numpy; the
  ``score`` step checks the array against the project's loader bit for bit;
- network: the example's 6-level 35M-parameter 64x64 U-Net shrunk to the project's digits
  U-Net: block_out_channels (32, 64, 64), layers_per_block 1, attention at 8x8 (and in
  the mid block, as in every UNet2DModel), norm_num_groups 8 -- 1,112,801 parameters,
  the same count as pipeline_configs/digits.yaml;
- batch 64 (the example's default is 16), ``torch.set_num_threads(2)`` (torch's default
  here anyway) and ``OMP_WAIT_POLICY=PASSIVE``: on this 2-core machine shared with other
  jobs, libgomp's default spin-waiting made 2-thread steps 3-15x slower than 1-thread
  steps (measured 0.8-4.1 s vs 0.25-0.29 s per step at load average ~4-5; passive
  0.23-0.52 s), which would measure the neighbours, not diffusers (``--omp-wait-policy``);
- length: a wall-clock budget (``--seconds``; training stops at the first step that
  ends past it) instead of ``--num_epochs``. The example's cosine decay runs over
  ``num_training_steps``, which a user would have to guess from the budget; here, after
  the 500 warmup steps, its progress is the fraction of the remaining budget used, i.e.
  the example's schedule with a perfect guess. ``--max-steps N`` instead uses the
  example's own ``get_scheduler("cosine", ...)`` over N steps (and stops at N steps or
  the budget, whichever comes first). No accelerate: on one CPU process it only wraps
  these same calls;
- sampling: ``DDIMPipeline`` (50 steps, eta 0 or ``--eta``, the scheduler built with
  ``DDIMScheduler.from_config`` from the training scheduler) from the EMA weights, as
  many images as ``make train`` scores (1,000), instead of the example's DDPM grid.

``score`` evaluates the samples with ``ipu_diffusion.evaluation.run_eval._quality`` (the
function that writes the ``eval`` block of ``runs/digits/metrics.json``: the digits
classifier's FID/KID/IS/precision/recall against the held-out test split, the
real-train floor, and the near-copy check), with pipeline_configs/digits.yaml, and
writes a JSON whose ``eval`` block has the same keys.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from typing import Any, Dict, Optional

import numpy as np

from machine import cpu_model, cpu_seconds, start_torch  # no TF, no torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DEFAULT_SAMPLES = os.path.join(RESULTS, "diffusers_digits.npz")
DEFAULT_JSON = os.path.join(RESULTS, "diffusers_baseline.json")
DIGITS_CONFIG = os.path.join(ROOT, "pipeline_configs", "digits.yaml")
REF_WORKDIR = os.path.join(ROOT, "runs", "digits")  # make train's default run

# The project's digits data (ipu_diffusion/data/digits.py): split seed, test fraction,
# pixel maximum, image size.
SPLIT_SEED = 0
TEST_FRACTION = 0.2
DIGITS_MAX = 16.0
IMAGE_SIZE = 16


# --------------------------------------------------------------------------- data (numpy)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of half-pixel-centred bilinear upsampling with the
    triangle kernel renormalised at the borders (what ``tf.image.resize(...,
    "bilinear", antialias=True)`` computes when enlarging)."""
    if n_out < n_in:
        raise ValueError("only upsampling is reproduced here")
    centres = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(centres[:, None] - np.arange(n_in)[None, :]))
    return w / w.sum(axis=1, keepdims=True)


def digits_split(split: str, image_size: int = IMAGE_SIZE, labels: bool = False):
    """The project's digits ``split`` ("train"/"test") as float32 ``[N, S, S, 1]`` in
    [-1, 1], computed with numpy and scikit-learn only (with ``labels``: and its int64
    labels ``[N]``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[..., None] * np.float32(2.0 / DIGITS_MAX) - np.float32(1.0)
    if image_size != x.shape[1]:
        m = _bilinear_matrix(x.shape[1], image_size).astype(np.float32)
        x = np.einsum("ih,nhwc,jw->nijc", m, x, m).astype(np.float32)
        x = np.clip(x, -1.0, 1.0).astype(np.float32)
    idx = np.arange(len(x))
    train, test = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                   stratify=bunch.target.astype(np.int32))
    keep = np.sort(train if split == "train" else test)
    return (x[keep], bunch.target[keep].astype(np.int64)) if labels else x[keep]


def dataset_identity(images: np.ndarray) -> str:
    """Same string as ``ipu_diffusion.data.common.dataset_identity`` (no labels)."""
    h = hashlib.sha1()
    h.update(f"{images.dtype.str}{tuple(images.shape)}".encode("ascii"))
    h.update(np.ascontiguousarray(images).tobytes())
    return f"sha1:{h.hexdigest()}:{'x'.join(str(d) for d in images.shape)}"


# --------------------------------------------------------------------------- environment


def _write_json(path: str, data: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
        f.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- train (torch)


def digits_unet2d(unet2d_model, num_classes: int = 0):
    """diffusers' ``UNet2DModel`` shrunk to the project's digits U-Net (1,112,801
    parameters; see the module doc). With ``num_classes`` K: a learned embedding of the
    labels 0..K (K the null label) added to the timestep embedding, as in the project's
    conditional U-Net (``num_class_embeds``; 1,114,209 parameters at K = 10)."""
    return unet2d_model(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=num_classes + 1 if num_classes else None)


def ddim_sample_conditional(torch, model, scheduler, labels, steps: int, eta: float, generator):
    """DDIMPipeline.__call__'s loop (diffusers 0.42: ``randn_tensor`` noise, ``set_timesteps``,
    ``scheduler.step(..., eta, generator)``, ``/ 2 + 0.5`` and clamp) with the class labels
    passed to the U-Net: no diffusers pipeline takes labels for a ``UNet2DModel``.
    ``[n, H, W, 1]`` numpy in [0, 1], like the pipeline's ``output_type="np"``."""
    from diffusers.utils.torch_utils import randn_tensor

    c = model.config
    x = randn_tensor((len(labels), c.in_channels, c.sample_size, c.sample_size),
                     generator=generator, dtype=model.dtype)
    y = torch.as_tensor(labels, dtype=torch.long)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(x, t, class_labels=y).sample
            x = scheduler.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def cmd_train(args) -> int:
    torch = start_torch(args.omp_wait_policy, args.threads, args.seed)  # see --omp-wait-policy
    import torch.nn.functional as F
    import diffusers
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    load_start = os.getloadavg()

    x_train, y_train = digits_split("train", labels=True)
    data = torch.from_numpy(np.ascontiguousarray(x_train.transpose(0, 3, 1, 2)))  # NCHW
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data, torch.from_numpy(y_train)),
        batch_size=args.batch_size, shuffle=True,
        num_workers=0, generator=torch.Generator().manual_seed(args.seed))
    k = args.num_classes

    model = digits_unet2d(UNet2DModel, k)
    params = sum(p.numel() for p in model.parameters())
    ema = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True,
                   inv_gamma=args.ema_inv_gamma, power=args.ema_power,
                   model_cls=UNet2DModel, model_config=model.config)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=args.beta_schedule,
                                    prediction_type="epsilon")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.95, 0.999),
                                  weight_decay=1e-6, eps=1e-8)

    timer: Dict[str, Optional[float]] = {"began": None, "cpu0": None, "warm": None}
    budget = args.cpu_seconds if args.cpu_seconds else args.seconds

    def used() -> float:
        if args.cpu_seconds:
            return cpu_seconds() - timer["cpu0"]
        return time.perf_counter() - timer["began"]

    if args.max_steps:
        lr_scheduler = get_scheduler("cosine", optimizer=optimizer,
                                     num_warmup_steps=args.warmup_steps,
                                     num_training_steps=args.max_steps)
        schedule = f"diffusers get_scheduler('cosine'), warmup {args.warmup_steps}, " \
                   f"num_training_steps {args.max_steps}"
    else:
        def lr_lambda(step: int) -> float:
            # get_cosine_schedule_with_warmup's formula, progress measured in budget.
            if step < args.warmup_steps:
                return float(step) / float(max(1, args.warmup_steps))
            if timer["began"] is None:  # LambdaLR's call at construction
                return 1.0
            if timer["warm"] is None:
                timer["warm"] = used()
            span = max(1e-9, budget - timer["warm"])
            progress = min(1.0, (used() - timer["warm"]) / span)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        schedule = (f"cosine with {args.warmup_steps} linear warmup steps (diffusers' formula); "
                    f"after warmup, progress = share of the remaining "
                    f"{'CPU' if args.cpu_seconds else 'wall'}-time budget used")

    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; UNet2DModel {params:,} parameters; "
          f"{len(x_train)} training images; budget {budget:g} "
          f"{'CPU' if args.cpu_seconds else 'wall'} s", flush=True)

    model.train()
    losses = []
    step = 0
    timer["began"], timer["cpu0"] = time.perf_counter(), cpu_seconds()
    done = False
    while not done:
        for clean, y in loader:
            noise = torch.randn(clean.shape)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],)).long()
            noisy = noise_scheduler.add_noise(clean, noise, t)
            if k:  # labels dropped to the null label k with probability --class-dropout
                y = torch.where(torch.rand(y.shape) < args.class_dropout, k, y)
            pred = model(noisy, t, class_labels=y if k else None).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            ema.step(model.parameters())
            step += 1
            losses.append(loss.item())
            if step % args.log_every == 0:
                print(f"step {step}  loss {np.mean(losses[-args.log_every:]):.4f}  "
                      f"lr {lr_scheduler.get_last_lr()[0]:.3g}  ema {ema.cur_decay_value:.4f}  "
                      f"{time.perf_counter() - timer['began']:.0f} s", flush=True)
            if used() >= budget or (args.max_steps and step >= args.max_steps):
                done = True
                break
    train_wall = time.perf_counter() - timer["began"]
    train_cpu = cpu_seconds() - timer["cpu0"]
    load_train = os.getloadavg()
    print(f"trained {step} steps in {train_wall:.1f} s wall, {train_cpu:.1f} s CPU", flush=True)

    # Sample from the EMA weights with DDIM-50 (--eta), as make train's evaluation does
    # (a conditional model: labels 0..K-1 cycled, as make train's evaluation samples them).
    ema.copy_to(model.parameters())
    model.eval()
    pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(args.seed)
    began, cpu0, chunks = time.perf_counter(), cpu_seconds(), []
    while sum(len(c) for c in chunks) < args.num_samples:
        done_n = sum(len(c) for c in chunks)
        n = min(args.sample_batch, args.num_samples - done_n)
        if k:
            out = ddim_sample_conditional(torch, model, pipe.scheduler,
                                          np.arange(done_n, done_n + n) % k,
                                          args.sample_steps, args.eta, gen)
        else:
            out = pipe(batch_size=n, generator=gen, eta=args.eta,
                       num_inference_steps=args.sample_steps,
                       output_type="np").images  # [n, H, W, 1] in [0, 1]
        chunks.append(np.asarray(out, np.float32) * np.float32(2.0) - np.float32(1.0))
        print(f"sampled {done_n + len(out)}/{args.num_samples}", flush=True)
    sample_wall = time.perf_counter() - began
    sample_cpu = cpu_seconds() - cpu0
    images = np.concatenate(chunks).astype(np.float32)

    record = {
        "train": {
            "steps": step, "wall_time_s": round(train_wall, 2), "cpu_time_s": round(train_cpu, 2),
            "img_per_s": round(step * args.batch_size / train_wall, 2),
            "budget": {"kind": "cpu" if args.cpu_seconds else "wall", "seconds": budget},
            "final_loss": float(np.mean(losses[-100:])) if losses else None,
            "final_loss_note": "mean training loss of the last 100 steps",
            "epochs": round(step * args.batch_size / len(x_train), 2),
        },
        "sampling": {"sampler": "ddim", "steps": args.sample_steps, "eta": args.eta,
                     "num_samples": int(len(images)), "batch": args.sample_batch,
                     "wall_time_s": round(sample_wall, 2), "cpu_time_s": round(sample_cpu, 2),
                     "img_per_s": round(len(images) / sample_wall, 2)},
        "recipe": {
            "source": "diffusers examples/unconditional_image_generation/train_unconditional.py "
                      "defaults, except data, network size, batch and length (see the script)",
            "model": "UNet2DModel", "parameters": params, "model_config": dict(model.config),
            "noise_scheduler": dict(noise_scheduler.config),
            "beta_schedule": args.beta_schedule, "prediction_type": "epsilon", "loss": "mse",
            "optimizer": "AdamW", "lr": args.lr, "betas": [0.95, 0.999], "weight_decay": 1e-6,
            "eps": 1e-8, "grad_clip_norm": 1.0, "lr_schedule": schedule,
            "warmup_steps": args.warmup_steps, "max_steps": args.max_steps or None,
            "batch_size": args.batch_size, "drop_last": False, "random_flip": False,
            "ema": {"max_decay": args.ema_max_decay, "use_ema_warmup": True,
                    "inv_gamma": args.ema_inv_gamma, "power": args.ema_power,
                    "final_decay": float(ema.cur_decay_value)},
            "precision": "float32", "seed": args.seed,
            "num_classes": k, "class_dropout": args.class_dropout if k else None,
        },
        "data": {"train_images": len(x_train), "identity": dataset_identity(x_train)},
        "environment": {
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                               "OMP_WAIT_POLICY") if k in os.environ},
            "parallel_backend": [ln.strip() for ln in torch.__config__.parallel_info().splitlines()
                                 if "backend" in ln or "OpenMP" in ln][:2],
            "loadavg": {"start": list(load_start), "after_training": list(load_train),
                        "after_sampling": list(os.getloadavg())},
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:  # a file object: savez adds no ".npz" to the name
        np.savez(f, images=images, record=np.array(json.dumps(record)))
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(images)} images)", flush=True)
    return 0


# --------------------------------------------------------------------------- score (TF)


def cmd_score(args) -> int:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import types

    import tensorflow as tf
    from ipu_diffusion.config import load_config
    from ipu_diffusion.data import load_arrays
    from ipu_diffusion.evaluation.digits_classifier import load_digits_classifier
    from ipu_diffusion.evaluation.run_eval import _quality
    from ipu_diffusion.visualize import save_image_grid

    if "torch" in sys.modules:
        raise SystemExit("the score step must not import torch")
    with np.load(args.samples, allow_pickle=False) as f:
        images = f["images"].astype(np.float32)
        record = json.loads(str(f["record"]))
    cfg = load_config(args.config)
    if (cfg.data.source, cfg.model.image_size, cfg.model.in_channels, cfg.data.test_fraction) != \
            ("digits", IMAGE_SIZE, 1, TEST_FRACTION):
        raise SystemExit(f"{args.config} is not the 16x16x1 digits config this baseline trains on")

    # The data the baseline trained on must be the project's, bit for bit.
    ours_train, _ = load_arrays(cfg, "train")
    ours_test, _ = load_arrays(cfg, "test")
    mine_train, mine_test = digits_split("train"), digits_split("test")
    data_check = {
        "train_identity_project": dataset_identity(ours_train),
        "train_identity_baseline_run": record["data"]["identity"],
        "train_identical": bool(dataset_identity(ours_train) == record["data"]["identity"]),
        "train_max_abs_diff_numpy_vs_project": float(np.abs(mine_train - ours_train).max()),
        "test_max_abs_diff_numpy_vs_project": float(np.abs(mine_test - ours_test).max()),
    }
    print(f"data check: {data_check}", flush=True)

    # run_eval._quality is what evaluate_run calls for the eval block of metrics.json; it
    # keeps the classifier and reference statistics in <workdir>/eval_cache.
    workdir = args.workdir or (REF_WORKDIR if os.path.isdir(os.path.join(REF_WORKDIR, "eval_cache"))
                               else os.path.join(ROOT, "runs", "diffusers_baseline"))
    cache = os.path.join(workdir, "eval_cache")
    began = time.perf_counter()
    quality = _quality(types.SimpleNamespace(cfg=cfg, workdir=workdir), images, verbose=False)
    score_wall = time.perf_counter() - began
    net = load_digits_classifier(cfg, cache, verbose=False)  # cached: its identity only

    t, s = record["train"], record["sampling"]
    eval_block = {"checkpoint_step": t["steps"], "sampler": s["sampler"], "steps": s["steps"],
                  "eta": s["eta"], "num_samples": s["num_samples"],
                  "sampling_img_per_s": s["img_per_s"]}
    eval_block.update(quality)
    eval_block["wall_time_s"] = round(s["wall_time_s"] + score_wall, 2)
    result = {
        "what": "Hugging Face diffusers (PyTorch) on the same digits, CPU and wall-time "
                "budget, scored by ipu_diffusion's own digits evaluation",
        "steps": t["steps"], "wall_time_s": t["wall_time_s"], "img_per_s": t["img_per_s"],
        "final_loss": t["final_loss"],
        "eval": eval_block,
        "train": t, "sampling": s, "scoring": {
            "wall_time_s": round(score_wall, 2), "config": os.path.relpath(args.config, ROOT),
            "cache_dir": cache, "feature_network": net.identity,
            "tensorflow": tf.__version__, "loadavg": list(os.getloadavg())},
        "data_check": data_check,
        "recipe": record["recipe"], "environment": record["environment"],
        "samples": os.path.relpath(os.path.abspath(args.samples), ROOT),
    }
    ref = os.path.join(REF_WORKDIR, "metrics.json")
    if os.path.isfile(ref):
        with open(ref) as f:
            ours = json.load(f)
        e = ours.get("eval", {})
        result["ipu_diffusion_run"] = {
            "metrics": os.path.relpath(ref, ROOT), "steps": ours.get("steps"),
            "wall_time_s": ours.get("wall_time_s"),
            **{k: e.get(k) for k in ("fid", "kid", "inception_score", "precision", "recall",
                                     "near_copies", "floor_fid")}}
    _write_json(args.out, result)
    png = os.path.splitext(args.out)[0] + "_samples.png"
    save_image_grid(images[:64], png)
    print(json.dumps({k: eval_block.get(k) for k in (
        "checkpoint_step", "num_samples", "fid", "kid", "inception_score", "precision", "recall",
        "near_copies", "floor_fid")}, indent=1))
    print(f"wrote {args.out} and {png}")
    return 0


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train with diffusers under a time budget, sample, save "
                       ".npz (run under .venv-torch)")
    t.add_argument("--seconds", type=float, default=395.0,
                   help="wall-clock training budget; stops at the first step ending past it "
                        "(default 395: the training time of the README's make train)")
    t.add_argument("--cpu-seconds", type=float, default=0.0,
                   help="budget in this process's CPU seconds instead of wall seconds "
                        "(fairer on a shared machine: a CPU budget does not shrink when "
                        "other jobs take the cores)")
    t.add_argument("--max-steps", type=int, default=0,
                   help="also stop at N steps and run the example's cosine over N steps")
    t.add_argument("--num-samples", type=int, default=1000)
    t.add_argument("--sample-steps", type=int, default=50)
    t.add_argument("--sample-batch", type=int, default=250)
    t.add_argument("--eta", type=float, default=0.0,
                   help="DDIM eta of the sampler (0: deterministic; make train's default "
                        "sampler uses 0.5)")
    t.add_argument("--beta-schedule", default="linear",
                   choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--warmup-steps", type=int, default=500)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--num-classes", type=int, default=0,
                   help="class-conditional on the digit labels (10), with a null label for "
                        "--class-dropout; sampled with labels 0..K-1 cycled (0: unconditional)")
    t.add_argument("--class-dropout", type=float, default=0.1,
                   help="probability that a training label is replaced by the null label")
    t.add_argument("--ema-max-decay", type=float, default=0.9999)
    t.add_argument("--ema-inv-gamma", type=float, default=1.0)
    t.add_argument("--ema-power", type=float, default=0.75)
    t.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads (2 = torch's own default on this machine)")
    t.add_argument("--omp-wait-policy", choices=("passive", "active", "default"),
                   default="passive",
                   help="OMP_WAIT_POLICY for torch's OpenMP threads unless already set in the "
                        "environment (default passive: with libgomp's default spinning, 2 "
                        "threads on 2 cores shared with other jobs ran 3-15x slower per step "
                        "than 1 thread here; passive sleeps at barriers, as TF's pool does)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=100)
    t.add_argument("--out", default=DEFAULT_SAMPLES)
    s = sub.add_parser("score", help="score the samples with the project's digits evaluation "
                       "(run under .venv)")
    s.add_argument("--samples", default=DEFAULT_SAMPLES)
    s.add_argument("--out", default=DEFAULT_JSON)
    s.add_argument("--config", default=DIGITS_CONFIG)
    s.add_argument("--workdir", default="",
                   help="its eval_cache/ holds the digits classifier and reference statistics "
                        "(default: runs/digits when make train has scored there, so the very "
                        "classifier that scored our run scores this one; else "
                        "runs/diffusers_baseline)")
    args = p.parse_args(argv)
    return cmd_train(args) if args.cmd == "train" else cmd_score(args)


if __name__ == "__main__":
    sys.exit(main())
