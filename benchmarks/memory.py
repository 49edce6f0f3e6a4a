"""Peak memory of a training step per pipeline configuration, each in a FRESH subprocess,
next to the estimate of ``pipeline/memory.py``.

    .venv/bin/python benchmarks/memory.py          # quick: digits, S1, S2/S4 M8 recompute off/on
    .venv/bin/python benchmarks/memory.py --cifar  # + DDPM CIFAR-10, batch 16, S1, S2/S4 M4 (8 min more)
    FULL=1 .venv/bin/python benchmarks/memory.py   # + schedules, M = 1..16, 3 repeats

A child process (``memory.py --child SPEC``) configures 4 logical CPUs, builds the run
with ``build_run`` (placed pipeline executor for S > 1), runs one step (tracing and graph
optimisation, whose memory dwarfs a small model's tensors), then resets both high-water
marks and runs ``steps`` more ``DiffusionTrainer.train_step`` calls. It reports:

- ``peak_rss_lifetime``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` before the reset
  (includes tracing); ``peak_rss_steps``: the same after the reset (Linux ``clear_refs``
  5), i.e. the high-water resident memory of the steady-state steps; VmRSS after import,
  after build and before the steps, to subtract;
- ``tf_peak``: ``tf.config.experimental.get_memory_info("CPU:0")["peak"]`` since the
  reset (one CPU allocator serves all logical CPU devices; checked): bytes of live
  tensors at the worst moment of the steps, weights and optimizer state included;
- ``estimate``: memory.py's per-stage totals (``MemorySpec`` with the run's micro-batch,
  M, schedule, recompute; backend "fallback"; Adam + EMA, float32) and their sum;
  ``host_estimate``: ``memory.host_total`` of them, the peak when all stages share one
  allocator, which is what ``tf_peak`` measures (the stages' own peaks cannot be told
  apart there); ``host_vs_tf`` = host_estimate / tf_peak (the model's target: 0.75..1.25).

Writes ``results/memory.json`` and ``results/memory.png``.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Dict, List, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 128
CIFAR_BATCH = 16  # the unsplit step's peak is 1.7 GiB
MIB = float(1 << 20)


def vm_rss() -> int:
    """Current resident bytes of this process (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    """High-water resident bytes of this process (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def estimate(run, cfg):
    """memory.py's per-stage totals for the run's partition (S = 1: one stage), and their
    one-allocator peak (``host_total``)."""
    from ipu_diffusion.pipeline.ipu_plan import carry_shapes
    from ipu_diffusion.pipeline.memory import MemorySpec, estimate_partition, host_total
    from ipu_diffusion.pipeline.partition import LOSS_KEY, partition_unet

    ex = run.trainer.executor
    part = ex.partition if ex is not None else partition_unet(
        run.unet, cfg.pipeline, run.objective.front_spec, run.objective.loss_spec, (LOSS_KEY, "t"))
    p = cfg.pipeline
    spec = MemorySpec(micro_batch=cfg.training.batch_size // p.microbatches,
                      microbatches=p.microbatches, schedule=p.schedule, recompute=p.recompute)
    info, shapes = run.unet.block_info(), carry_shapes(cfg)
    mems = estimate_partition(part, info, spec, shapes)
    return [int(m.total) for m in mems], int(host_total(part, info, mems, spec, shapes))


def reset_peak_rss() -> None:
    """Reset the high-water mark to the current RSS (Linux >= 4.0: ``clear_refs`` 5), so
    ``ru_maxrss`` afterwards is the peak of what follows; a no-op where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(spec: Dict[str, object]) -> Dict[str, object]:
    """Runs in the fresh subprocess; returns the measurements as a dict."""
    sys.path.insert(0, HERE)
    import benchlib as bl
    import tensorflow as tf
    from ipu_diffusion.pipeline.devices import configure_logical_cpus

    configure_logical_cpus(4)
    tf.constant(0)  # start the runtime before the baseline
    after_import = vm_rss()
    cfg = bl.load(spec["preset"], [f"training.batch_size={spec['batch']}"] + list(spec["sets"]))
    step = bl.TrainStep(cfg, eager=bool(spec.get("eager", False)))
    after_build = vm_rss()
    step().numpy()  # trace, graph optimisation and the first step
    lifetime_peak = peak_rss()
    reset_peak_rss()
    before_steps = vm_rss()
    info = {}
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except (ValueError, RuntimeError) as e:
        info["tf_memory_info"] = f"unavailable: {e}"
    for _ in range(int(spec["steps"])):
        step().numpy()
    steps_peak = peak_rss()
    try:
        info["tf_peak"] = int(tf.config.experimental.get_memory_info("CPU:0")["peak"])
    except (ValueError, RuntimeError) as e:
        info["tf_memory_info"] = f"unavailable: {e}"
    est, host = estimate(step.run, cfg)
    return {"peak_rss_lifetime": lifetime_peak, "peak_rss_steps": steps_peak,
            "rss_after_import": after_import, "rss_after_build": after_build,
            "rss_before_steps": before_steps, "estimate_per_stage": est, "estimate": sum(est),
            "host_estimate": host, **info}


def run_child(spec: Dict[str, object]) -> Dict[str, object]:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                         capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"memory child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def _pipe(s: int, m: int, schedule: str = "grouped", rc: bool = False):
    # microbatch by microbatch, as the schedule is written (and an IPU runs it): the
    # fallback's fused microbatches would hold B-sized temporaries (pipeline/fallback.py)
    return {"label": f"S{s} M{m} {schedule}{' rc' if rc else ''}",
            "sets": [f"pipeline.stages={s}", f"pipeline.microbatches={m}",
                     f"pipeline.schedule={schedule}", f"pipeline.recompute={str(rc).lower()}",
                     "pipeline.fuse_microbatches=false"]}


def _grid(m: int) -> List[Dict[str, object]]:
    """Unsplit, then S = 2 and 4 with ``m`` microbatches, recomputation off and on."""
    return [{"label": "S1 unsplit", "sets": ["pipeline.stages=1"]}] + [
        _pipe(s, m, rc=rc) for s in (2, 4) for rc in (False, True)]


def cases(full: bool) -> List[Dict[str, object]]:
    out = _grid(8)
    if full:
        out += [_pipe(4, 8, sch, rc) for sch in ("interleaved", "sequential") for rc in (False, True)]
        out += [_pipe(4, m, "grouped", rc) for m in (1, 2, 4, 16) for rc in (False, True)]
    return out


def measure(selected: Sequence[Dict[str, object]], preset: str, batch: int, repeats: int,
            steps: int = 3, log=None) -> List[Dict[str, object]]:
    import benchlib as bl

    rows = []
    for c in selected:
        spec = {"preset": preset, "batch": batch, "sets": c["sets"], "steps": steps}
        got = [run_child(spec) for _ in range(repeats)]
        row = {"label": c["label"], "preset": preset, "batch": batch, "precision": "float32",
               "sets": c["sets"], "repeats": repeats,
               "estimate_mib": got[0]["estimate"] / MIB,
               "estimate_per_stage_mib": [v / MIB for v in got[0]["estimate_per_stage"]],
               "host_estimate_mib": got[0]["host_estimate"] / MIB}
        for key in ("peak_rss_lifetime", "peak_rss_steps", "rss_after_import", "rss_after_build",
                    "rss_before_steps", "tf_peak"):
            if all(key in g for g in got):
                row[key + "_mib"] = bl.summary([g[key] / MIB for g in got])
        if "tf_peak_mib" in row:
            row["host_vs_tf"] = row["host_estimate_mib"] / row["tf_peak_mib"]["median"]
        row["steps_rss_above_build_mib"] = bl.summary(
            [(g["peak_rss_steps"] - g["rss_after_build"]) / MIB for g in got])
        rows.append(row)
        if log:
            log(f"  {c['label']}: peak RSS {row['peak_rss_lifetime_mib']['median']:.0f} MiB "
                f"(lifetime), {row['peak_rss_steps_mib']['median']:.0f} MiB (steps), TF peak "
                f"{row.get('tf_peak_mib', {}).get('median', float('nan')):.0f} MiB, "
                f"estimate {row['host_estimate_mib']:.0f} MiB (one allocator; "
                f"{row.get('host_vs_tf', float('nan')):.2f}x)")
    return rows


def main() -> Dict[str, object]:
    sys.path.insert(0, HERE)
    import benchlib as bl

    full = bl.full_mode()
    env = bl.environment()
    bl.log(f"memory: digits, batch {BATCH}, fresh subprocess per configuration, "
           f"load {os.getloadavg()[0]:.2f}")
    rows = measure(cases(full), "digits", BATCH, repeats=3 if full else 1, log=bl.log)
    if "--cifar" in sys.argv[1:]:
        bl.log(f"memory: ddpm_cifar10, batch {CIFAR_BATCH}")
        rows += measure(_grid(4), "ddpm_cifar10", CIFAR_BATCH, repeats=1, log=bl.log)
    env["loadavg_end"] = list(os.getloadavg())
    payload = {"benchmark": "memory", "environment": env, "rows": rows}
    bl.write_json("memory", payload)
    _chart(bl, rows)
    return payload


def _chart(bl, rows) -> None:
    """One panel per network: TF allocator peak and memory.py's one-allocator estimate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(5.2 * len(presets), 3.8), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        sub = [r for r in rows if r["preset"] == preset]
        x = np.arange(len(sub))
        tf_peak = [r.get("tf_peak_mib", {}).get("median", 0) for r in sub]
        ax.bar(x - 0.2, tf_peak, 0.4, label="TF allocator peak (measured)")
        ax.bar(x + 0.2, [r["host_estimate_mib"] for r in sub], 0.4,
               label="pipeline/memory.py estimate")
        for xi, r in zip(x, sub):
            if "host_vs_tf" in r:
                ax.text(xi + 0.2, r["host_estimate_mib"], f"{r['host_vs_tf']:.2f}x",
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels([r["label"] for r in sub], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("MiB")
        ax.set_title(f"{preset} training step, batch {sub[0]['batch']}", fontsize=10)
        ax.set_ylim(0, 1.3 * max(max(tf_peak), max(r["host_estimate_mib"] for r in sub)))
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(bl.chart_path("memory"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
