"""Whole-process sampling time against diffusers: 1,000 DDIM-50 digits samples, each side
a fresh process started and timed to its exit, back to back in interleaved rounds.

    .venv/bin/python benchmarks/sampling_process.py [--rounds 3] [--workdir runs/digits]
    make bench-sampling            # the same (needs .venv-torch: torch + diffusers)

Each round runs, in this order:

- ``ours fp32``: ``python -m ipu_diffusion sample --workdir W --num 1000 --steps 50 --eta 0``
  (batches of ``eval.batch_size`` = 250; imports, checkpoint, tracing, sampling, the PNG
  and NPZ writes all count);
- ``ours bf16``: the same with ``--precision bfloat16``;
- ``diffusers``: ``.venv-torch/bin/python benchmarks/sampling_process.py diffusers``:
  ``DDIMPipeline`` (``DDIMScheduler``, 50 steps, eta 0) driving diffusers' ``UNet2DModel``
  shrunk to the digits U-Net (``diffusers_baseline.digits_unet2d``, the same 1,112,801
  parameters, random weights: the cost does not depend on them), batches of 250,
  ``torch.set_num_threads(2)``, ``OMP_WAIT_POLICY=PASSIVE`` (see diffusers_baseline.py).

``W`` defaults to a 1-step digits run made once in a temporary directory (not timed),
unconditional (``machine.DIGITS_UNCONDITIONAL``) like the diffusers side and like the digits
default when the recorded figures were measured;
``--workdir runs/digits`` samples the real ``make train`` run. Ratios are per round
(ours / diffusers, lower is faster), median and spread over rounds. The fp32 samples'
sha256 is recorded, so a later change can show its samples are unchanged bit for bit.
Writes ``results/sampling_process.json`` and ``results/sampling_process.png``. This
script imports neither TensorFlow nor torch: each side runs in its own interpreter.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

from machine import DIGITS_UNCONDITIONAL, bar_chart, cpu_flags, cpu_model, summary  # no TF, no torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PY = os.path.join(ROOT, ".venv", "bin", "python")
TORCH_PY = os.path.join(ROOT, ".venv-torch", "bin", "python")
BATCH = 250


def cmd_diffusers(args) -> int:
    """Under .venv-torch: sample ``--num`` images (the parent times the whole process)."""
    from machine import start_torch

    torch = start_torch("passive", 2, 0)
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    from diffusers_baseline import digits_unet2d

    model = digits_unet2d(UNet2DModel).eval()
    pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    done = 0
    with torch.no_grad():
        while done < args.num:
            n = min(BATCH, args.num - done)
            pipe(batch_size=n, generator=gen, eta=0.0, num_inference_steps=args.steps,
                 output_type="np")
            done += n
    return 0


def _timed(cmd: List[str], env: Dict[str, str]) -> float:
    began = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return wall


def _make_workdir(tmp: str, env: Dict[str, str]) -> str:
    workdir = os.path.join(tmp, "digits_1step")
    _timed([PY, "-m", "ipu_diffusion", "train", "--config", "digits", "--workdir", workdir,
            "--set", "training.steps=1", "--set", "eval.num_samples=0",
            "--set", "training.num_sample_images=0"]
           + [a for o in DIGITS_UNCONDITIONAL for a in ("--set", o)], env)
    return workdir


def cmd_compare(args) -> int:
    for exe in (PY, TORCH_PY):
        if not os.path.exists(exe):
            raise SystemExit(f"{exe} is missing: run make setup (and make bench-torch's "
                             ".venv-torch) first")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with tempfile.TemporaryDirectory(prefix="sampling_process_") as tmp:
        workdir = args.workdir or _make_workdir(tmp, env)
        out = os.path.join(tmp, "ours")
        ours = [PY, "-m", "ipu_diffusion", "sample", "--workdir", workdir, "--num",
                str(args.num), "--steps", str(args.steps), "--eta", "0", "--seed", "0"]
        cmds = {"ours fp32": ours + ["--precision", "float32", "--out", out + "_fp32"],
                "ours bf16": ours + ["--precision", "bfloat16", "--out", out + "_bf16"],
                "diffusers": [TORCH_PY, os.path.abspath(__file__), "diffusers", "--num",
                              str(args.num), "--steps", str(args.steps)]}
        secs: Dict[str, List[float]] = {k: [] for k in cmds}
        load = [list(os.getloadavg())]
        for r in range(args.rounds):
            for name, cmd in cmds.items():
                secs[name].append(_timed(cmd, env))
                print(f"round {r + 1}/{args.rounds}  {name}: {secs[name][-1]:.1f} s", flush=True)
            load.append(list(os.getloadavg()))
        with np.load(out + "_fp32.npz") as z:
            images = np.asarray(z["images"])
    rows = []
    for name in cmds:
        rows.append({"name": name, "seconds": summary(secs[name]),
                     "img_per_s": summary([args.num / s for s in secs[name]]),
                     "vs_diffusers": summary([a / b for a, b in zip(secs[name], secs["diffusers"])])})
        print(f"{name}: {rows[-1]['seconds']['median']:.1f} s, "
              f"{rows[-1]['vs_diffusers']['median']:.2f}x diffusers' time", flush=True)
    payload = {
        "benchmark": "sampling_process", "num": args.num, "steps": args.steps, "batch": BATCH,
        "workdir": "1-step digits run" if not args.workdir else os.path.relpath(workdir, ROOT),
        "rounds": args.rounds, "rows": rows,
        "ours_fp32_samples_sha256": hashlib.sha256(images.astype(np.float32).tobytes()).hexdigest(),
        "environment": {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(),
                        "cpu_count": os.cpu_count(),
                        "loadavg_per_round": load, "time": time.strftime("%Y-%m-%d %H:%M:%S")},
        "notes": "whole processes, started and timed to exit; vs_diffusers = ours / diffusers "
                 "seconds in the same round (lower is faster)",
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "sampling_process.json"), "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    bar_chart(os.path.join(RESULTS, "sampling_process.png"), [r["name"] for r in rows],
              [r["seconds"]["median"] for r in rows], [r["seconds"]["min"] for r in rows],
              [r["seconds"]["max"] for r in rows], ylabel="seconds, whole process",
              title=f"{args.num} DDIM-{args.steps} digits samples, {args.rounds} rounds")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    d = sub.add_parser("diffusers", help="(under .venv-torch) one diffusers sampling process")
    for p in (ap, d):
        p.add_argument("--num", type=int, default=1000)
        p.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="a trained run (default: a 1-step run)")
    args = ap.parse_args(argv)
    return cmd_diffusers(args) if args.cmd == "diffusers" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
