"""The machine's matmul roofline: TensorFlow fp32 and bf16 square-matmul GFLOP/s.

    .venv/bin/python benchmarks/roofline.py            # quick: 2048^2, 5 rounds
    FULL=1 .venv/bin/python benchmarks/roofline.py     # 1024^2, 2048^2 and 4096^2, 9 rounds

A matmul of two n x n matrices is 2 n^3 FLOPs. fp32 and bf16 are measured in interleaved
rounds (median and spread over rounds). The peak of a precision is the best median over
the sizes; train_throughput.py divides achieved model FLOP/s by it (MFU). For context
(not the peak) the same rounds time the 3x3 convolution of ddpm_cifar10's first level
at batch 16 ([16, 32, 32, 128] -> 128 channels), forward alone and forward + both
gradients (3x the forward FLOPs): the ceiling a conv-dominated U-Net step can reach.
Writes ``results/roofline.json`` and ``results/roofline.png``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import benchlib as bl
import tensorflow as tf

DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16}


def matmul_fn(n: int, dtype: tf.DType):
    """A compiled ``A @ B`` of two fixed n x n matrices (returns one element, so no large
    copy leaves the op)."""
    a = tf.cast(tf.random.stateless_normal([n, n], seed=[1, 2]), dtype)
    b = tf.cast(tf.random.stateless_normal([n, n], seed=[3, 4]), dtype)
    fn = tf.function(lambda: tf.matmul(a, b)[0, 0])
    return fn


def conv_fn(shape: Sequence[int], cout: int, dtype: tf.DType, train: bool):
    """A compiled 3x3 SAME convolution of a fixed ``shape`` [B, H, W, C] input; with
    ``train`` also its input and filter gradients (as in a backward pass)."""
    x = tf.cast(tf.random.stateless_normal(list(shape), seed=[5, 6]), dtype)
    w = tf.cast(tf.random.stateless_normal([3, 3, shape[-1], cout], seed=[7, 8]) * 0.05, dtype)

    def fwd():
        return tf.nn.conv2d(x, w, 1, "SAME")

    def fwd_bwd():
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = fwd()
        gx, gw = tape.gradient(y, [x, w], output_gradients=tf.ones_like(y))
        return gx[0, 0, 0, 0] + gw[0, 0, 0, 0]

    return tf.function(fwd_bwd if train else (lambda: fwd()[0, 0, 0, 0]))


def conv_flops(shape: Sequence[int], cout: int, train: bool) -> float:
    b, h, w, c = shape
    return (3.0 if train else 1.0) * 2.0 * b * h * w * 9 * c * cout


CONV = ((16, 32, 32, 128), 128)  # ddpm_cifar10's first level at batch 16


def measure(sizes: Sequence[int], rounds: int, calls: int = 2, log=None,
            conv=CONV) -> Dict[str, object]:
    """GFLOP/s per precision and size, interleaved; ``peak_gflops[precision]`` = best
    matmul median. ``conv`` ``(shape, cout)`` or None adds the convolution rows."""
    fns, flops, kinds = {}, {}, {}
    for name, dt in DTYPES.items():
        for n in sizes:
            key = f"matmul {name} {n}^2"
            fns[key], flops[key], kinds[key] = matmul_fn(n, dt), 2.0 * n ** 3, ("matmul", name, n)
        for train in ((False, True) if conv else ()):
            key = f"conv3x3 {name} {'fwd+bwd' if train else 'fwd'}"
            fns[key] = conv_fn(conv[0], conv[1], dt, train)
            flops[key], kinds[key] = conv_flops(conv[0], conv[1], train), ("conv", name, None)
    cores: Dict[str, List[float]] = {}
    secs = bl.interleaved(fns, rounds, calls=calls, log=log, cores=cores)
    rows: List[Dict[str, object]] = []
    peak = {name: 0.0 for name in DTYPES}
    for key, samples in secs.items():
        kind, name, n = kinds[key]
        row = {"label": key, "kind": kind, "precision": name, "n": n,
               "gflops": bl.summary([flops[key] / s / 1e9 for s in samples]),
               "cores_used": bl.summary(cores[key])}
        if kind == "conv":
            row["shape"], row["cout"] = list(conv[0]), conv[1]
        rows.append(row)
        if kind == "matmul":
            peak[name] = max(peak[name], row["gflops"]["median"])
    return {"rows": rows, "peak_gflops": peak,
            "bf16_over_fp32": peak["bf16"] / peak["fp32"] if peak["fp32"] else None}


def main() -> Dict[str, object]:
    full = bl.full_mode()
    sizes = (1024, 2048, 4096) if full else (2048,)
    bl.log(f"roofline: sizes {sizes}, load {os.getloadavg()[0]:.2f}")
    env = bl.environment()
    res = measure(sizes, rounds=9 if full else 5, log=bl.log)
    env["loadavg_end"] = list(os.getloadavg())
    payload = {"benchmark": "roofline", "environment": env, **res}
    bl.write_json("roofline", payload)
    rows = res["rows"]
    bl.bar_chart(bl.chart_path("roofline"), [r["label"] for r in rows],
                 [r["gflops"]["median"] for r in rows], [r["gflops"]["min"] for r in rows],
                 [r["gflops"]["max"] for r in rows], ylabel="GFLOP/s",
                 title=f"TF matmul roofline ({env['cpu_model']}, {env['cpu_affinity']} cpus)")
    for r in rows:
        bl.log(f"  {r['label']}: {r['gflops']['median']:.1f} GFLOP/s "
               f"(spread {r['gflops']['spread']:.0%})")
    return payload


if __name__ == "__main__":
    main()
