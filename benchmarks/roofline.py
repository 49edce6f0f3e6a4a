"""The machine's matmul roofline: TensorFlow fp32 and bf16 square-matmul GFLOP/s.

    .venv/bin/python benchmarks/roofline.py            # quick: 2048^2, 5 rounds
    FULL=1 .venv/bin/python benchmarks/roofline.py     # 1024^2, 2048^2 and 4096^2, 9 rounds

A matmul of two n x n matrices is 2 n^3 FLOPs. fp32 and bf16 are measured in interleaved
rounds (median and spread over rounds). The peak of a precision is the best median over
the sizes; train_throughput.py divides achieved model FLOP/s by it (MFU). Writes
``results/roofline.json`` and ``results/roofline.png``.
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


def measure(sizes: Sequence[int], rounds: int, calls: int = 2, log=None) -> Dict[str, object]:
    """GFLOP/s per precision and size, interleaved; ``peak_gflops[precision]`` = best median."""
    fns, flops = {}, {}
    for n in sizes:
        for name, dt in DTYPES.items():
            fns[f"{name}_{n}"] = matmul_fn(n, dt)
            flops[f"{name}_{n}"] = 2.0 * n ** 3
    secs = bl.interleaved(fns, rounds, calls=calls, log=log)
    rows: List[Dict[str, object]] = []
    peak = {name: 0.0 for name in DTYPES}
    for key, samples in secs.items():
        name, n = key.split("_")
        gflops = [flops[key] / s / 1e9 for s in samples]
        row = {"precision": name, "n": int(n), "gflops": bl.summary(gflops)}
        rows.append(row)
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
    bl.bar_chart(bl.chart_path("roofline"), [f"{r['precision']} {r['n']}^2" for r in rows],
                 [r["gflops"]["median"] for r in rows], [r["gflops"]["min"] for r in rows],
                 [r["gflops"]["max"] for r in rows], ylabel="GFLOP/s",
                 title=f"TF matmul roofline ({env['cpu_model']}, {env['cpu_affinity']} cpus)")
    for r in rows:
        bl.log(f"  {r['precision']} {r['n']}^2: {r['gflops']['median']:.1f} GFLOP/s "
               f"(spread {r['gflops']['spread']:.0%})")
    return payload


if __name__ == "__main__":
    main()
