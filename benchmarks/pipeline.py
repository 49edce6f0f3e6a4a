"""Pipeline overhead: the digits U-Net cut into S = 1, 2, 4 stages on logical CPU devices,
schedules grouped / interleaved / sequential, recompute on/off, M microbatches.

    .venv/bin/python benchmarks/pipeline.py          # quick: 6 configurations, M in {1, 4}
    FULL=1 .venv/bin/python benchmarks/pipeline.py   # every schedule, recompute, M = 1..16

Each configuration is a run built by ``build_run`` with ``pipeline.*`` overrides (the
placed ``pipeline.fallback`` executor, stages balanced by FLOPs) and timed over four
``DiffusionTrainer.train_step`` calls per round on the same global batch, interleaved with the unsplit
run; ``relative`` = img/s / unsplit img/s per round (median over rounds). Logical CPU
devices share the same cores, so this measures the split's overhead (smaller per-op
batches, control dependencies, per-stage tapes), never a speed-up. ``S4 M1 1dev`` maps
all four stages to one device (``pipeline.device_mapping=[0,0,0,0]``). ``S4 M4 grouped``
runs each stage's 4 microbatches as one batch (``pipeline.fuse_microbatches``, the
default there); ``unfused`` runs them one by one, as the schedule is written.
Writes ``results/pipeline.json`` and ``results/pipeline.png``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import benchlib as bl

BATCH = 64
Case = Tuple[str, Sequence[str]]


def pipe(stages: int, m: int, schedule: str = "grouped", recompute: bool = False,
         one_device: bool = False, fuse: bool = True) -> Case:
    label = (f"S{stages} M{m} {schedule}{' rc' if recompute else ''}"
             f"{' 1dev' if one_device else ''}{' unfused' if not fuse else ''}")
    sets = [f"pipeline.stages={stages}", f"pipeline.microbatches={m}",
            f"pipeline.schedule={schedule}", f"pipeline.recompute={str(recompute).lower()}",
            f"pipeline.fuse_microbatches={str(fuse).lower()}"]
    if one_device:
        sets.append(f"pipeline.device_mapping={[0] * stages}")
    return label, sets


def cases(full: bool) -> List[Case]:
    out = [("S1 unsplit", ["pipeline.stages=1"]),
           pipe(2, 1), pipe(4, 1, one_device=True), pipe(4, 1),
           pipe(4, 4), pipe(4, 4, fuse=False), pipe(4, 4, recompute=True)]
    if full:
        out += [pipe(2, 4, "interleaved"), pipe(4, 4, "interleaved"), pipe(4, 4, "sequential"),
                pipe(4, 4, "interleaved", True), pipe(4, 4, "sequential", True)]
        out += [pipe(4, m) for m in (2, 8, 16)] + [pipe(4, m, recompute=True) for m in (8, 16)]
    return out


def measure(preset: str, batch: int, selected: Sequence[Case], rounds: int, log=None,
            eager: bool = False) -> List[Dict[str, object]]:
    fns, info = {}, {}
    for label, sets in selected:
        if log:
            log(f"  build {label} (load {os.getloadavg()[0]:.2f})")
        cfg = bl.load(preset, [f"training.batch_size={batch}"] + list(sets))
        step = bl.TrainStep(cfg, eager=eager)
        step()
        fns[label] = step
        ex = step.executor
        info[label] = {"stages": cfg.pipeline.stages, "microbatches": cfg.pipeline.microbatches,
                       "schedule": cfg.pipeline.schedule, "recompute": cfg.pipeline.recompute,
                       "devices": list(ex.devices) if ex else ["(default)"],
                       "ranges": [list(r) for r in ex.partition.ranges] if ex else None}
    cores: Dict[str, List[float]] = {}
    secs = bl.interleaved(fns, rounds, calls=4, warmup=1, log=log, cores=cores)
    base = secs[selected[0][0]]
    rows = []
    for label, _ in selected:
        s = secs[label]
        rows.append({"label": label, "batch": batch, "precision": "float32", **info[label],
                     "step_s": bl.summary(s), "img_per_s": bl.summary([batch / v for v in s]),
                     "relative": bl.summary([b / v for v, b in zip(s, base)]),
                     "cores_used": bl.summary(cores[label])})
        if log:
            log(f"  {label}: {rows[-1]['img_per_s']['median']:.1f} img/s, "
                f"x{rows[-1]['relative']['median']:.3f} of unsplit")
    return rows


def main() -> Dict[str, object]:
    from ipu_diffusion.pipeline.devices import configure_logical_cpus

    configure_logical_cpus(4)  # before TensorFlow starts its runtime
    full = bl.full_mode()
    env = bl.environment()
    bl.log(f"pipeline: digits, batch {BATCH}, load {os.getloadavg()[0]:.2f}")
    rows = measure("digits", BATCH, cases(full), rounds=7 if full else 5, log=bl.log)
    env["loadavg_end"] = list(os.getloadavg())
    payload = {"benchmark": "pipeline", "environment": env, "preset": "digits", "rows": rows,
               "notes": "logical CPU devices share the same cores: relative < 1 is the "
                        "split's overhead, not a missing speed-up"}
    bl.write_json("pipeline", payload)
    bl.bar_chart(bl.chart_path("pipeline"), [r["label"] for r in rows],
                 [r["relative"]["median"] for r in rows], [r["relative"]["min"] for r in rows],
                 [r["relative"]["max"] for r in rows], ylabel="img/s relative to unsplit",
                 title=f"digits pipeline overhead, batch {BATCH} (logical CPUs, one host)",
                 hline=0.95, hline_label="target S4 1dev >= 0.95")
    return payload


if __name__ == "__main__":
    main()
