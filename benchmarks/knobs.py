"""What moves training MFU: runtime knobs on the ddpm_cifar10 step (b16), each in a fresh
process with the matmul peak measured in that same process.

    .venv/bin/python benchmarks/knobs.py                  # every variant (~15 min on 2 cores)
    .venv/bin/python benchmarks/knobs.py default xla      # a subset
    PRESET=digits BATCH=64 .venv/bin/python benchmarks/knobs.py

Variants (environment variables must be set before TensorFlow starts, hence a process
each): ``default``; ``interop1`` (TF_NUM_INTEROP_THREADS=1); ``intraop1``
(TF_NUM_INTRAOP_THREADS=1); ``onednn_off`` (TF_ENABLE_ONEDNN_OPTS=0); ``xla``
(``training.jit_compile=true``: the whole step one XLA cluster); ``gn_ops`` (Keras'
GroupNormalization op by op instead of the fused XLA GroupNorm, through
``models.norm.set_group_norm_factory``); ``bf16`` (mixed_bfloat16). Each child times
interleaved rounds of the step and of the 2048^2 matmul of the step's precision and
reports img/s and MFU; ``relative`` = img/s / default img/s. Processes run one after
another, so compare ratios with the load averages they record.
Writes ``results/knobs.json`` and ``results/knobs.png`` (``knobs_<preset>.*`` for another preset).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS: Dict[str, Dict[str, object]] = {
    "default": {},
    "interop1": {"env": {"TF_NUM_INTEROP_THREADS": "1"}},
    "intraop1": {"env": {"TF_NUM_INTRAOP_THREADS": "1"}},
    "onednn_off": {"env": {"TF_ENABLE_ONEDNN_OPTS": "0"}},
    "xla": {"sets": ["training.jit_compile=true"]},
    "gn_ops": {"gn_ops": True},
    "bf16": {"sets": ["training.precision=mixed_bfloat16"]},
}


def child(spec: Dict[str, object]) -> Dict[str, object]:
    sys.path.insert(0, HERE)
    import benchlib as bl
    import roofline

    if spec.get("gn_ops"):
        from ipu_diffusion._keras import keras
        from ipu_diffusion.models.norm import set_group_norm_factory

        set_group_norm_factory(keras.layers.GroupNormalization)
    cfg = bl.load(spec["preset"], [f"training.batch_size={spec['batch']}"] + list(spec["sets"]))
    p = "bf16" if "bfloat16" in cfg.training.precision else "fp32"
    step = bl.TrainStep(cfg)
    step()
    fns = {"matmul": roofline.matmul_fn(2048, roofline.DTYPES[p]), "step": step}
    cores: Dict[str, List[float]] = {}
    secs = bl.interleaved(fns, int(spec["rounds"]), cores=cores)
    img_s = [cfg.training.batch_size / s for s in secs["step"]]
    peak = [2.0 * 2048 ** 3 / s / 1e9 for s in secs["matmul"]]
    flops = bl.train_flops(cfg.model)
    return {"environment": bl.environment(), "precision": p, "batch": cfg.training.batch_size,
            "img_per_s": bl.summary(img_s), "peak_gflops": bl.summary(peak),
            "mfu": bl.summary([flops * v / 1e9 / k for v, k in zip(img_s, peak)]),
            "cores_used": bl.summary(cores["step"]), "step_s_per_round": secs["step"]}


def run_variant(name: str, preset: str, batch: int, rounds: int) -> Dict[str, object]:
    v = VARIANTS[name]
    spec = {"preset": preset, "batch": batch, "rounds": rounds, "sets": v.get("sets", []),
            "gn_ops": v.get("gn_ops", False)}
    env = dict(os.environ, **v.get("env", {}))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                         capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"knobs child {name} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(names: List[str]) -> Dict[str, object]:
    sys.path.insert(0, HERE)
    import benchlib as bl

    preset, batch = os.environ.get("PRESET", "ddpm_cifar10"), int(os.environ.get("BATCH", "16"))
    names = names or list(VARIANTS)
    rows = []
    for name in names:
        bl.log(f"knobs: {name} ({preset} b{batch}, load {os.getloadavg()[0]:.2f})")
        r = {"variant": name, **run_variant(name, preset, batch, rounds=3)}
        rows.append(r)
        bl.log(f"  {r['img_per_s']['median']:.2f} img/s, MFU {r['mfu']['median']:.1%} "
               f"of {r['precision']} matmul ({r['peak_gflops']['median']:.0f} GFLOP/s)")
    base = next((r for r in rows if r["variant"] == "default"), rows[0])
    for r in rows:
        r["relative"] = r["img_per_s"]["median"] / base["img_per_s"]["median"]
    payload = {"benchmark": "knobs", "preset": preset, "batch": batch,
               "environment": bl.environment(), "rows": rows}
    name = "knobs" if preset == "ddpm_cifar10" else f"knobs_{preset}"
    bl.write_json(name, payload)
    bl.bar_chart(bl.chart_path(name), [r["variant"] for r in rows],
                 [100 * r["mfu"]["median"] for r in rows], [100 * r["mfu"]["min"] for r in rows],
                 [100 * r["mfu"]["max"] for r in rows], ylabel="MFU (% of same-process matmul)",
                 title=f"{preset} b{batch} training: runtime knobs", hline=80.0,
                 hline_label="target 80%")
    return payload


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))), flush=True)
    else:
        main(sys.argv[1:])
