"""Run every benchmark, each in its own fresh process, then check the targets.

    .venv/bin/python benchmarks/run_all.py                     # quick (~20 min on 2 idle cores)
    FULL=1 .venv/bin/python benchmarks/run_all.py              # the long version
    .venv/bin/python benchmarks/run_all.py --only sampling,memory
    .venv/bin/python benchmarks/run_all.py --summary-only      # re-check existing results

Order: roofline, train_throughput, group_norm, step_profile, sampling, pipeline, memory (a
fresh process each:
pipeline.py needs logical CPU devices before TensorFlow starts; memory.py starts one
more process per configuration). Then reads their JSON and writes
``results/summary.json`` and ``results/summary.md``: the headline table and each target
with its measured ratio and met / missed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import benchlib as bl

SCRIPTS = ("roofline", "train_throughput", "group_norm", "step_profile", "sampling", "pipeline",
           "memory")


def _row(result: Optional[dict], label: str, key: str = "label") -> Optional[dict]:
    for r in (result or {}).get("rows", []):
        if r.get(key) == label:
            return r
    return None


def _target(name: str, value: Optional[float], goal: float, text: str, unit: str = "x",
            at_most: bool = False) -> Dict[str, object]:
    met = None if value is None else bool(value <= goal if at_most else value >= goal)
    return {"target": name, "measured": value, "goal": goal, "met": met, "how": text,
            "unit": unit, "at_most": at_most}


def targets(res: Dict[str, Optional[dict]]) -> List[Dict[str, object]]:
    """The benchmark targets from the benchmarks' JSON (None = not measured)."""
    tt, sa, pl, me = (res.get(k) for k in ("train_throughput", "sampling", "pipeline", "memory"))
    fp32 = _row(tt, "cifar b16 fp32")
    ratio = ((tt or {}).get("ratios") or {}).get("cifar b16: bf16 / fp32")
    ddim = _row(sa, "ddim50", "name")
    cfg = {r["batch"]: r["cfg_cost"] for r in ((sa or {}).get("guidance") or {}).get("rows", [])}
    base = "speedup_vs_ddpm1000"
    one, fused = _row(pl, "S4 M1 grouped 1dev"), _row(pl, "S4 M4 grouped")
    off, on = _row(me, "S4 M8 grouped"), _row(me, "S4 M8 grouped rc")

    ratios = [r["host_vs_tf"] for r in (me or {}).get("rows", []) if "host_vs_tf" in r]
    worst = 1.0 - max(abs(r - 1.0) for r in ratios) if ratios else None

    def mem_ratio(key: str) -> Optional[float]:
        if not (off and on and key in off and key in on):
            return None
        return off[key]["median"] / on[key]["median"]

    return [
        _target("ddpm_cifar10 b16 fp32 training MFU", fp32 and fp32["mfu"]["median"], 0.80,
                "achieved model FLOP/s / measured fp32 2048^2 matmul GFLOP/s", "fraction"),
        _target("mixed_bfloat16 / fp32 training img/s (cifar b16)", ratio and ratio["median"], 1.4,
                "per-round img/s ratio, median"),
        _target("DDIM-50 / DDPM-1000 sampling img/s (digits)", ddim and ddim[base]["median"], 19.0,
                "per-round ratio, median"),
        *[_target(f"classifier-free guidance / conditional, seconds per DDIM step (digits_cond, "
                  f"batch {b})", c["median"], 1.2, "eval.parallel_calls concurrent calls (2: the "
                  "conditional and unconditional halves); per-round ratio, median",
                  at_most=True) for b, c in sorted(cfg.items())],
        _target("S=4 on one device / unsplit training img/s (digits)",
                one and one["relative"]["median"], 0.98, "M = 1, per-round ratio, median"),
        _target("S=4, M=4 grouped / unsplit training img/s (digits)",
                fused and fused["relative"]["median"], 0.9,
                "logical CPUs, fused microbatches, per-round ratio, median"),
        _target("recompute off / on, TF allocator peak (S=4, M=8 grouped)",
                mem_ratio("tf_peak_mib"), 1.0 + 1e-9, "> 1 means recompute lowers the peak"),
        _target("recompute off / on, steady-state peak RSS (S=4, M=8 grouped)",
                mem_ratio("peak_rss_steps_mib"), 1.0 + 1e-9, "> 1 means recompute lowers the peak"),
        _target("memory.py estimate vs TF allocator peak, worst row (memory.json)", worst, 0.75,
                "1 - max |host estimate / peak - 1|; >= 0.75 is within 25%", "fraction"),
    ]


def headline(res: Dict[str, Optional[dict]]) -> List[List[str]]:
    """Rows: measurement, median, spread (max - min) / median over rounds, CPU cores the
    process got while measuring (2 = the whole machine), load average at start -> end."""
    rows = [["measurement", "median", "spread", "cores used", "load avg"]]

    def add(name: str, s: Optional[dict], fmt: str, result: Optional[dict],
            cores: Optional[dict] = None) -> None:
        if s is None:
            return
        env = (result or {}).get("environment", {})
        load = f"{env.get('loadavg', [0])[0]:.1f} -> {env.get('loadavg_end', [0])[0]:.1f}"
        rows.append([name, fmt.format(s["median"]), f"{s['spread']:.0%}",
                     "" if cores is None else f"{cores['median']:.2f}", load])

    rl = res.get("roofline")
    for r in (rl or {}).get("rows", []):
        add(f"TF {r['label']} (GFLOP/s)", r["gflops"], "{:.0f}", rl, r.get("cores_used"))
    tt = res.get("train_throughput")
    for r in (tt or {}).get("rows", []):
        add(f"train {r['label']} (img/s)", r["img_per_s"], "{:.2f}", tt, r.get("cores_used"))
        add(f"train {r['label']} MFU", r["mfu"], "{:.1%}", tt, r.get("cores_used"))
    gn = res.get("group_norm")
    for r in (gn or {}).get("networks", []):
        add(f"group norm, pixels first / earlier: {r['label']} (time)",
            r["package_over_earlier"], "{:.2f}", gn)
    sp = res.get("step_profile")
    for r in (sp or {}).get("rows", []):
        add(f"train step, package / earlier Adam update and group norm: {r['label']} (time)",
            r["package_over_earlier"], "{:.2f}", sp)
    sa = res.get("sampling")
    for r in (sa or {}).get("rows", []):
        add(f"sample {r['name']} b{r['batch']} (img/s)", r["img_per_s"], "{:.2f}", sa,
            r.get("cores_used"))
        add(f"sample {r['name']} step overhead vs forward", r["overhead_vs_forward"], "{:+.1%}",
            sa, r.get("cores_used"))
    pl = res.get("pipeline")
    for r in (pl or {}).get("rows", []):
        add(f"pipeline {r['label']} / unsplit", r["relative"], "{:.3f}", pl, r.get("cores_used"))
    me = res.get("memory")
    for r in (me or {}).get("rows", []):
        add(f"memory {r.get('preset', 'digits')} {r['label']} TF peak (MiB; estimate "
            f"{r.get('host_estimate_mib', r['estimate_mib']):.0f})", r.get("tf_peak_mib"), "{:.0f}", me)
        add(f"memory {r.get('preset', 'digits')} {r['label']} steps peak RSS (MiB)",
            r.get("peak_rss_steps_mib"), "{:.0f}", me)
    return rows


def markdown(table: List[List[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + " --- |" * len(table[0])]
    lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
    return "\n".join(lines)


def summarize() -> Dict[str, object]:
    res = {name: bl.read_json(name) for name in SCRIPTS}
    tg = targets(res)
    table = headline(res)
    payload = {"benchmark": "summary", "environment": bl.environment(), "targets": tg,
               "headline": table}
    bl.write_json("summary", payload)
    text = ["# Benchmark summary", "", markdown(table), "", "## Targets", "",
            markdown([["target", "measured", "goal", "met"]] + [
                [t["target"], "n/a" if t["measured"] is None else f"{t['measured']:.3f}",
                 ("<= " if t.get("at_most") else ">= ") + f"{t['goal']:g}",
                 {True: "yes", False: "NO", None: "not measured"}[t["met"]]]
                for t in tg])]
    with open(os.path.join(bl.RESULTS, "summary.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text), flush=True)
    return payload


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(SCRIPTS))
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args(argv)
    chosen = [s for s in args.only.split(",") if s] or list(SCRIPTS)
    unknown = [s for s in chosen if s not in SCRIPTS]
    if unknown:
        ap.error(f"--only: unknown {unknown}; choose from {', '.join(SCRIPTS)}")
    failed = []
    if not args.summary_only:
        here = os.path.dirname(os.path.abspath(__file__))
        for name in chosen:
            began = time.time()
            bl.log(f"== {name} (FULL={int(bl.full_mode())}, load {os.getloadavg()[0]:.2f})")
            rc = subprocess.call([sys.executable, os.path.join(here, name + ".py")])
            bl.log(f"== {name}: exit {rc} after {time.time() - began:.0f} s")
            if rc:
                failed.append(name)
    summarize()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
