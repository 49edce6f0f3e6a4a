"""Training throughput and MFU: ddpm_cifar10 and the digits preset, fp32 / mixed_bfloat16,
with and without XLA (``training.jit_compile``).

    .venv/bin/python benchmarks/train_throughput.py          # quick (~4 min on 2 cores)
    FULL=1 .venv/bin/python benchmarks/train_throughput.py   # more batches, XLA on CIFAR, more rounds

A step is ``DiffusionTrainer.train_step`` of a run built by ``build_run`` (forward
diffusion, U-Net, loss, gradients, clipping, Adam, EMA) on a fixed synthetic batch.
Model FLOPs per image are counted from the layer shapes (``models.plan.block_flops``,
convs, dense layers and attention matmuls); training = 3 x forward. MFU = achieved
model FLOP/s / the fp32 or bf16 2048^2 matmul GFLOP/s of the same precision, measured
in the same interleaved rounds (``roofline.matmul_fn``), median over rounds.
Writes ``results/train_throughput.json`` and ``results/train_throughput.png``.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Sequence, Tuple

import benchlib as bl
import roofline
import tensorflow as tf

PEAK_N = 2048
Case = Tuple[str, str, int, str, bool]  # label, preset, batch, precision, xla


def case(preset: str, batch: int, precision: str, xla: bool = False) -> Case:
    short = "bf16" if precision == "mixed_bfloat16" else "fp32"
    name = "cifar" if preset == "ddpm_cifar10" else preset
    return (f"{name} b{batch} {short}{' xla' if xla else ''}", preset, batch, precision, xla)


def cases(full: bool) -> List[List[Case]]:
    """Groups measured in interleaved rounds (one group's runs are alive together)."""
    precisions = ("float32", "mixed_bfloat16")
    cifar = [case("ddpm_cifar10", 16, p, x) for x in ((False, True) if full else (False,))
             for p in precisions]
    digits = [case("digits", 16, "float32"), case("digits", 64, "float32"),
              case("digits", 64, "mixed_bfloat16"), case("digits", 64, "float32", True)]
    if full:
        digits = [case("digits", b, p, x) for b in (16, 64, 256) for p in precisions
                  for x in (False, True)]
    return [cifar, digits]


def build(c: Case):
    label, preset, batch, precision, xla = c
    cfg = bl.load(preset, [f"training.batch_size={batch}", f"training.precision={precision}",
                           f"training.jit_compile={str(xla).lower()}"])
    began = time.perf_counter()
    step = bl.TrainStep(cfg)
    step().numpy()  # trace, compile, first step
    return cfg, step, time.perf_counter() - began


def measure_group(group: Sequence[Case], rounds: int, calls: int) -> List[Dict[str, object]]:
    fns: Dict[str, object] = {f"matmul_{p}": roofline.matmul_fn(PEAK_N, dt)
                              for p, dt in roofline.DTYPES.items()}
    built = {}
    for c in group:
        bl.log(f"  build {c[0]} (load {os.getloadavg()[0]:.2f})")
        built[c[0]] = build(c)
        fns[c[0]] = built[c[0]][1]
    cores: Dict[str, List[float]] = {}
    secs = bl.interleaved(fns, rounds, calls=calls, warmup=1, log=bl.log, cores=cores)
    peak = {p: [2.0 * PEAK_N ** 3 / s / 1e9 for s in secs[f"matmul_{p}"]] for p in roofline.DTYPES}
    rows = []
    for label, preset, batch, precision, xla in group:
        cfg, step, setup_s = built[label]
        flops = bl.train_flops(cfg.model)
        p = "bf16" if "bfloat16" in precision else "fp32"
        img_s = [batch / s for s in secs[label]]
        gflops = [flops * v / 1e9 for v in img_s]
        rows.append({
            "label": label, "preset": preset, "batch": batch, "precision": precision,
            "xla": xla, "params": step.params, "forward_flops_per_image": bl.forward_flops(cfg.model),
            "train_flops_per_image": flops, "setup_s": round(setup_s, 1),
            "step_s": bl.summary(secs[label]), "img_per_s": bl.summary(img_s),
            "achieved_gflops": bl.summary(gflops), "peak_precision": p,
            "peak_gflops_same_rounds": bl.summary(peak[p]),
            "mfu": bl.summary([g / k for g, k in zip(gflops, peak[p])]),
            "cores_used": bl.summary(cores[label]),
            "_secs": secs[label],
        })
        bl.log(f"  {label}: {rows[-1]['img_per_s']['median']:.2f} img/s, "
               f"{rows[-1]['achieved_gflops']['median']:.1f} GFLOP/s, MFU "
               f"{rows[-1]['mfu']['median']:.1%} of {p} matmul")
    del built
    return rows


def ratios(rows: List[Dict[str, object]]) -> Dict[str, Dict[str, float]]:
    """``"<base>: <variant> / fp32"``: median over rounds of the per-round img/s ratio of a
    variant (bf16, fp32 xla, bf16 xla) to the fp32 eager run of the same preset and batch."""
    by = {r["label"]: r for r in rows}
    out = {}
    for label in by:
        if not label.endswith(" fp32"):
            continue
        base = label[: -len(" fp32")]
        for variant in ("bf16", "fp32 xla", "bf16 xla"):
            other = by.get(f"{base} {variant}")
            if other is not None:
                out[f"{base}: {variant} / fp32"] = bl.summary(
                    [a / b for a, b in zip(by[label]["_secs"], other["_secs"])])
    return out


def main() -> Dict[str, object]:
    full = bl.full_mode()
    env = bl.environment()
    rows: List[Dict[str, object]] = []
    for group in cases(full):
        bl.log(f"train_throughput: {[c[0] for c in group]}")
        rows += measure_group(group, rounds=5 if full else 3, calls=2 if full else 1)
        tf.keras.backend.clear_session()
    env["loadavg_end"] = list(os.getloadavg())
    rel = ratios(rows)
    for r in rows:
        r["step_s_per_round"] = r.pop("_secs")
    payload = {"benchmark": "train_throughput", "environment": env, "rows": rows,
               "ratios": rel,
               "notes": "MFU against the measured TF matmul peak of the same precision "
                        f"({PEAK_N}^2, same interleaved rounds); training FLOPs = 3 x forward"}
    bl.write_json("train_throughput", payload)
    bl.bar_chart(bl.chart_path("train_throughput"), [r["label"] for r in rows],
                 [100 * r["mfu"]["median"] for r in rows], [100 * r["mfu"]["min"] for r in rows],
                 [100 * r["mfu"]["max"] for r in rows], ylabel="MFU (% of measured matmul peak)",
                 title="Training MFU (achieved model FLOP/s / TF matmul GFLOP/s, same precision)",
                 hline=80.0, hline_label="target 80% (cifar fp32)")
    return payload


if __name__ == "__main__":
    main()
