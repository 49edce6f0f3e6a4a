"""PyTorch baseline of train_throughput.py's CIFAR rows: one DDPM CIFAR-10 training step of
Hugging Face diffusers' ``UNet2DModel`` on the same CPU, img/s and MFU measured like ours.

    # under .venv-torch (torch + diffusers; never imports TensorFlow); make bench-torch
    .venv-torch/bin/python benchmarks/torch_cifar_step.py                 # fp32 and bf16
    .venv-torch/bin/python benchmarks/torch_cifar_step.py --precision bf16 --rounds 9
    .venv-torch/bin/python benchmarks/torch_cifar_step.py --compare-layouts   # NCHW vs NHWC

Network: ``UNet2DModel`` with the configuration of google/ddpm-cifar10-32 (the diffusers
port of Ho et al.'s CIFAR-10 model): block_out_channels (128, 256, 256, 256),
layers_per_block 2, attention at 16x16 (AttnDownBlock2D / AttnUpBlock2D, one head,
``attention_head_dim`` None) and in the mid block, GroupNorm 32 with eps 1e-6, conv
down/upsampling with the reference's asymmetric padding (``downsample_padding`` 0),
sinusoidal time embedding with ``flip_sin_to_cos`` False and ``freq_shift`` 1 -- plus
dropout 0.1 as in pipeline_configs/ddpm_cifar10.yaml (the hub config predates the key and
so has 0). 35,746,307 parameters, the reference count (the script checks it).

Step (``make_step``): t ~ U{0..999}, eps ~ N(0, I), x_t by ``DDPMScheduler.add_noise``
(linear betas 1e-4..0.02 over 1000 steps), eps-prediction, ``F.mse_loss``, backward,
``clip_grad_norm_(1.0)`` (foreach on CPU), ``Adam(lr 2e-4)`` (``fused=True`` by
default: torch's CPU fused kernel; its own default on CPU is the per-tensor loop,
``--adam``), EMA 0.9999 of a parameter copy with ``torch._foreach_lerp_``, on one fixed
uniform[-1, 1] batch [B, 3, 32, 32]. bf16 = the forward under
``torch.autocast("cpu", torch.bfloat16)`` (fp32 weights, optimizer and loss), like Keras'
mixed_bfloat16 policy in our step. Train mode (dropout on).

Timing as benchmarks/benchlib.py ``interleaved``: warm-up, then rounds of (every step
configuration: ``--steps`` steps) then (2048x2048 matmuls of each precision measured, by
``torch.mm`` and by oneDNN's matmul, each called enough times to last
~``--matmul-seconds``), so a load burst from another job hits all of them alike.
Reported per configuration: seconds/step, img/s, achieved model GFLOP/s, the matmul
GFLOP/s of the same precision in the same rounds, MFU (= achieved / matmul, per round) as
median, min, max and spread (max - min) / median over rounds, and cores used (process CPU
seconds / wall seconds, benchmarks/machine.py). The matmul of a round is the faster of
the two paths: fp32 ``torch.mm`` is MKL's sgemm, which takes an AVX2 path on AMD CPUs
(on a 2-core Zen 5: ~200 GFLOP/s against ~450 for oneDNN and ~440 for tf.matmul, where
the fp32 step then ran at >100 % "MFU"); ``mfu_vs_torch_mm`` keeps the torch.mm-only
ratio.

Model FLOPs are NOT counted by torch for the MFU: ``--train-flops-per-image`` defaults to
the number train_throughput.py uses (models.plan.block_flops, training = 3 x forward), so
both MFUs divide the same work. As a cross-check the JSON also records what
``torch.utils.flop_counter`` counts for this network (forward and forward + backward at
batch 1, attention through the math SDPA kernel so its matmuls are counted).

Writes ``benchmarks/results/torch_cifar_step.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Callable, Dict, List

from machine import cpu_flags, cpu_model, cpu_seconds, start_torch, summary  # no TF/torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# Training FLOPs per image of ddpm_cifar10 as train_throughput.py counts them, computed with
#   .venv/bin/python -c "import sys; sys.path.insert(0,'benchmarks'); import benchlib as bl;
#                        print(bl.train_flops(bl.load('ddpm_cifar10', []).model))"
# = 3 x 12,443,713,536 forward FLOPs (convs, dense layers, attention matmuls; multiply-add
# = 2). torch.utils.flop_counter counts the same 12,443,713,536 for this UNet2DModel's
# forward (and 37,323,931,648 for forward + backward: the first conv needs no input grad).
TRAIN_FLOPS_PER_IMAGE = 37_331_140_608
REFERENCE_PARAMS = 35_746_307  # Ho et al.'s CIFAR-10 U-Net = pipeline_configs/ddpm_cifar10.yaml
PEAK_N = 2048

# google/ddpm-cifar10-32's config.json (diffusers' port of the DDPM CIFAR-10 checkpoint);
# dropout from the paper / our config (the hub file has none, i.e. 0).
UNET_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(128, 256, 256, 256), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=0, act_fn="silu", attention_head_dim=None, norm_num_groups=32,
    norm_eps=1e-6, dropout=0.1,
)


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- torch parts


def build_unet(torch, dropout: float):
    import inspect

    from diffusers import UNet2DModel

    cfg = dict(UNET_CONFIG)
    if "dropout" in inspect.signature(UNet2DModel.__init__).parameters:
        cfg["dropout"] = dropout
    else:  # diffusers before UNet2DModel took dropout
        cfg.pop("dropout")
    return UNet2DModel(**cfg)


def make_step(torch, model, x0, scheduler, bf16: bool, adam: str, ema_decay: float = 0.9999):
    """One training step on the fixed batch ``x0``; returns the loss tensor."""
    import torch.nn.functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    kw = {"fused": True} if adam == "fused" else {"foreach": adam == "foreach"}
    opt = torch.optim.Adam(params, lr=2e-4, **kw)
    ema = [p.detach().clone() for p in params]
    timesteps = scheduler.config.num_train_timesteps
    b = x0.shape[0]

    def step():
        t = torch.randint(0, timesteps, (b,))
        noise = torch.randn_like(x0)
        xt = scheduler.add_noise(x0, noise, t)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = model(xt, t).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - ema_decay)
        return loss

    return step


def matmul_fns(torch, n: int, dtype) -> Dict[str, Callable[[], object]]:
    """``A @ B`` of two fixed n x n matrices, through each CPU matmul path of torch:
    ``torch.mm`` (fp32: MKL sgemm; bf16: usually oneDNN) and oneDNN's matmul directly
    (``mkldnn_linear`` on oneDNN tensors, A @ B^T). They differ by CPU: MKL takes a slower
    AVX2 path on AMD CPUs (2048^2 fp32 on a 2-core Zen 5: torch.mm ~200 GFLOP/s, oneDNN
    ~450, tf.matmul ~440), so the MFU denominator is the faster of the two."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    fns: Dict[str, Callable[[], object]] = {"torch.mm": lambda: torch.mm(a, b, out=c)}
    try:
        am, bm = a.to_mkldnn(), b.to_mkldnn()
        fn = lambda: torch._C._nn.mkldnn_linear(am, bm, None)  # noqa: E731
        fn()
        fns["onednn"] = fn
    except (RuntimeError, AttributeError) as e:  # no oneDNN build / dtype
        log(f"  oneDNN matmul {dtype} unavailable: {e}")
    return fns


def torch_flop_count(torch, model) -> Dict[str, int]:
    """What torch.utils.flop_counter counts per image (batch 1, fp32, math SDPA)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x, t = torch.zeros(1, 3, 32, 32), torch.tensor([500])
    with sdpa_kernel(SDPBackend.MATH):
        fwd = FlopCounterMode(display=False)
        with fwd, torch.no_grad():
            model(x, t)
        train = FlopCounterMode(display=False)
        with train:
            F.mse_loss(model(x, t).sample, x).backward()
    model.zero_grad(set_to_none=True)
    return {"forward": int(fwd.get_total_flops()), "forward_backward": int(train.get_total_flops())}


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], object], calls: int, cores: List[float]) -> float:
    """Wall seconds per call over ``calls`` calls (torch CPU ops are synchronous; the loss
    is read with .item() anyway); appends CPU seconds / wall seconds to ``cores``."""
    c0, began = cpu_seconds(), time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn()
    if out is not None and hasattr(out, "item") and out.numel() == 1:
        out.item()
    wall = time.perf_counter() - began
    cores.append((cpu_seconds() - c0) / wall)
    return wall / calls


def interleaved(fns: Dict[str, Callable[[], object]], calls: Dict[str, int], rounds: int
                ) -> tuple:
    out: Dict[str, List[float]] = {k: [] for k in fns}
    cores: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            out[name].append(timed(fn, calls[name], cores[name]))
        log(f"  round {r + 1}/{rounds} load {os.getloadavg()[0]:.2f}: " + ", ".join(
            f"{k} {v[-1]:.3g} s" for k, v in out.items()))
    return out, cores


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                   help="one or both (default both, measured in the same interleaved rounds)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.channels_last for model and input (default on: in short smoke "
                        "runs on a shared 2-core Zen 5 it was ~5%% faster than NCHW in fp32 "
                        "and about even in bf16 -- noisy; --compare-layouts measures both)")
    p.add_argument("--compare-layouts", action="store_true",
                   help="measure NCHW and channels_last side by side (overrides --channels-last)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--omp-wait-policy", choices=("default", "passive", "active"), default="default",
                   help="OMP_WAIT_POLICY for torch's OpenMP pool unless already set in the "
                        "environment (default: libgomp's own, what a PyTorch user gets; "
                        "diffusers_baseline.py uses passive on the shared machine)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="train steps per round and configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--matmul-seconds", type=float, default=1.0,
                   help="each round's matmul sample lasts about this long")
    p.add_argument("--adam", choices=("fused", "foreach", "single"), default="fused",
                   help="torch.optim.Adam implementation (torch's CPU default is 'single')")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--train-flops-per-image", type=float, default=TRAIN_FLOPS_PER_IMAGE,
                   help="model training FLOPs per image for MFU (default: what "
                        "train_throughput.py counts for ddpm_cifar10)")
    p.add_argument("--no-flop-count", action="store_true",
                   help="skip the torch.utils.flop_counter cross-check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="torch_cifar_step",
                   help="result name in benchmarks/results/ (or a path ending in .json)")
    args = p.parse_args(argv)

    torch = start_torch(args.omp_wait_policy, args.threads, args.seed)
    import diffusers
    from diffusers import DDPMScheduler

    load_start = os.getloadavg()
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{torch.get_num_threads()} threads, {cpu_model()}, load {load_start[0]:.2f}")

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                              beta_start=1e-4, beta_end=0.02, prediction_type="epsilon")
    layouts = [False, True] if args.compare_layouts else [args.channels_last]
    x_base = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1

    fns: Dict[str, Callable[[], object]] = {}
    calls: Dict[str, int] = {}
    info: Dict[str, Dict[str, object]] = {}
    params = flop_check = model_config = attn_processor = None
    for prec in args.precision:
        for cl in layouts:
            label = f"torch cifar b{args.batch} {prec}" + (
                (" channels_last" if cl else " nchw") if args.compare_layouts else "")
            fmt = torch.channels_last if cl else torch.contiguous_format
            began = time.perf_counter()
            model = build_unet(torch, args.dropout)
            if params is None:
                params = sum(q.numel() for q in model.parameters())
                model_config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
                attn_processor = type(model.mid_block.attentions[0].processor).__name__
                log(f"UNet2DModel (google/ddpm-cifar10-32 config): {params:,} parameters "
                    f"({'=' if params == REFERENCE_PARAMS else '!='} reference "
                    f"{REFERENCE_PARAMS:,}); attention {attn_processor}")
                if not args.no_flop_count:
                    flop_check = torch_flop_count(torch, model)
                    log(f"torch flop_counter per image: forward {flop_check['forward']:,}, "
                        f"forward+backward {flop_check['forward_backward']:,} (MFU uses "
                        f"{args.train_flops_per_image:,.0f})")
            model = model.to(memory_format=fmt).train()
            x0 = x_base.contiguous(memory_format=fmt)
            step = make_step(torch, model, x0, scheduler, prec == "bf16", args.adam)
            losses = [step().item() for _ in range(max(1, args.warmup))]
            info[label] = {"precision": prec, "channels_last": cl,
                           "setup_s": round(time.perf_counter() - began, 1),
                           "warmup_losses": losses}
            log(f"  built + warmed {label} in {info[label]['setup_s']} s "
                f"(load {os.getloadavg()[0]:.2f})")
            fns[label], calls[label] = step, args.steps

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    mm_keys: Dict[str, List[str]] = {}
    for prec in args.precision:
        for backend, fn in matmul_fns(torch, PEAK_N, dtypes[prec]).items():
            key = f"matmul {prec} {backend} {PEAK_N}^2"
            fn()
            began = time.perf_counter()
            fn()
            one = time.perf_counter() - began
            fns[key], calls[key] = fn, max(1, math.ceil(args.matmul_seconds / max(one, 1e-6)))
            mm_keys.setdefault(prec, []).append(key)

    log(f"interleaved: {args.rounds} rounds of {calls} calls")
    secs, cores = interleaved(fns, calls, args.rounds)
    mm_gflops = {k: [2.0 * PEAK_N ** 3 / s / 1e9 for s in secs[k]]
                 for keys in mm_keys.values() for k in keys}
    # Per round, the faster matmul path of the precision (see matmul_fns).
    peak = {prec: [max(vals) for vals in zip(*(mm_gflops[k] for k in keys))]
            for prec, keys in mm_keys.items()}
    peak_mm = {prec: mm_gflops[f"matmul {prec} torch.mm {PEAK_N}^2"] for prec in mm_keys}

    rows = []
    for label, meta in info.items():
        prec = meta["precision"]
        img_s = [args.batch / s for s in secs[label]]
        gflops = [args.train_flops_per_image * v / 1e9 for v in img_s]
        rows.append({
            "label": label, "framework": "torch", "preset": "ddpm_cifar10", "batch": args.batch,
            "precision": "float32" if prec == "fp32" else "autocast_bfloat16",
            "channels_last": meta["channels_last"], "params": params,
            "train_flops_per_image": args.train_flops_per_image,
            "setup_s": meta["setup_s"], "warmup_losses": meta["warmup_losses"],
            "steps_per_round": args.steps,
            "step_s": summary(secs[label]), "img_per_s": summary(img_s),
            "achieved_gflops": summary(gflops), "peak_precision": prec,
            "peak_gflops_same_rounds": summary(peak[prec]),
            "mfu": summary([g / k for g, k in zip(gflops, peak[prec])]),
            "torch_mm_gflops_same_rounds": summary(peak_mm[prec]),
            "mfu_vs_torch_mm": summary([g / k for g, k in zip(gflops, peak_mm[prec])]),
            "cores_used": summary(cores[label]),
            "step_s_per_round": secs[label],
        })
        r = rows[-1]
        log(f"  {label}: {r['img_per_s']['median']:.2f} img/s (spread "
            f"{r['img_per_s']['spread']:.0%}), {r['achieved_gflops']['median']:.1f} GFLOP/s, "
            f"MFU {r['mfu']['median']:.1%} of the best torch {prec} matmul "
            f"{r['peak_gflops_same_rounds']['median']:.0f} GFLOP/s (torch.mm "
            f"{r['torch_mm_gflops_same_rounds']['median']:.0f}), "
            f"cores {r['cores_used']['median']:.2f}")
    matmul = {prec: {"n": PEAK_N, "best_gflops_per_round": summary(peak[prec]),
                     **{k.split()[2]: {"calls_per_round": calls[k], "gflops": summary(mm_gflops[k]),
                                       "cores_used": summary(cores[k])} for k in keys}}
              for prec, keys in mm_keys.items()}
    ratios = {}
    labels = list(info)
    for a in labels:  # per-round img/s ratios within this run: the numbers to trust
        for b in labels:
            pa, pb = info[a], info[b]
            same_layout = pa["channels_last"] == pb["channels_last"]
            if pa["precision"] == "fp32" and pb["precision"] == "bf16" and same_layout:
                ratios[f"{b} / {a}"] = summary([x / y for x, y in zip(secs[a], secs[b])])
            if pa["precision"] == pb["precision"] and not pa["channels_last"] and pb["channels_last"]:
                ratios[f"{b} / {a}"] = summary([x / y for x, y in zip(secs[a], secs[b])])

    env = {
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(), "cpu_model": cpu_model(), "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                                           "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA")
                if k in os.environ},
        "mkldnn_enabled": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "parallel_backend": [ln.strip() for ln in torch.__config__.parallel_info().splitlines()
                             if "backend" in ln or "OpenMP" in ln][:2],
        "loadavg": list(load_start), "loadavg_end": list(os.getloadavg()),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    payload = {
        "benchmark": "torch_cifar_step", "environment": env, "rows": rows, "matmul": matmul,
        "ratios": ratios,
        "model": {"class": "diffusers.UNet2DModel", "config_source": "google/ddpm-cifar10-32 "
                  "config.json + dropout", "params": params, "reference_params": REFERENCE_PARAMS,
                  "config": model_config, "attention_processor": attn_processor,
                  "torch_flop_counter_per_image": flop_check},
        "recipe": {"batch": args.batch, "timesteps": "uniform {0..999}",
                   "noise_schedule": "DDPMScheduler linear 1e-4..0.02, T=1000 (add_noise)",
                   "prediction": "epsilon", "loss": "F.mse_loss (fp32)", "grad_clip_norm": 1.0,
                   "optimizer": f"torch.optim.Adam lr 2e-4 ({args.adam})",
                   "ema": "0.9999, torch._foreach_lerp_ on a parameter copy",
                   "bf16": "torch.autocast('cpu', torch.bfloat16) around the forward",
                   "omp_wait_policy": args.omp_wait_policy, "seed": args.seed,
                   "rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup},
        "notes": "MFU = achieved model FLOP/s (train_flops_per_image from train_throughput.py, "
                 f"training = 3 x forward) / the {PEAK_N}^2 matmul GFLOP/s of the same precision "
                 "in the same round, the faster of torch.mm and oneDNN's matmul (MKL's fp32 "
                 "torch.mm takes an AVX2 path on AMD CPUs); mfu_vs_torch_mm divides by "
                 "torch.mm alone; median over rounds",
    }
    out = args.out if args.out.endswith(".json") else os.path.join(RESULTS, args.out + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, out)
    log(f"wrote {out}")
    if params != REFERENCE_PARAMS:
        log(f"WARNING: {params:,} parameters, the reference network has {REFERENCE_PARAMS:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
