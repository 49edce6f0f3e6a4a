"""Shared helpers of the benchmark scripts (benchlib): environment record, timing statistics,
interleaved rounds, synthetic training steps built through the library, JSON and charts.

Nothing here re-implements the library: runs come from
``ipu_diffusion.training.run.build_run`` and a step is ``DiffusionTrainer.train_step``
under ``tf.function`` (with ``training.jit_compile`` as Keras would apply it); FLOPs come
from ``ipu_diffusion.models.plan.block_flops``.

Timing on a shared, noisy 2-core machine: every script measures the configurations it
compares in interleaved rounds (A B C, A B C, ...), so a burst of load from another job
hits all of them alike, and reports the median and spread over rounds. Ratios measured
within one run are the numbers to trust; absolute numbers move with the load average,
which every result records.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from machine import (  # noqa: E402,F401 (re-exported)
    DIGITS_UNCONDITIONAL, bar_chart, cpu_flags, cpu_model, cpu_seconds, summary)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
CONFIGS = os.path.join(ROOT, "pipeline_configs")
THREAD_VARS = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS",
               "TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA", "TF_XLA_FLAGS")


def full_mode() -> bool:
    """``FULL=1`` in the environment selects the long version of every benchmark."""
    return os.environ.get("FULL", "0") not in ("", "0", "false", "no")


# --------------------------------------------------------------------------- environment


def environment() -> Dict[str, object]:
    """What every result records: versions, CPU, threads, thread env vars, load."""
    return {
        "tensorflow": tf.__version__,
        "keras": getattr(tf.keras, "__version__", "?"),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),  # 0 = TF default
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ},
        "loadavg": list(os.getloadavg()),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "full": full_mode(),
    }


# --------------------------------------------------------------------------- timing


def seconds_per_call(fn: Callable[[], object], calls: int, cpu: Optional[List[float]] = None
                     ) -> float:
    """Wall seconds per call of ``fn`` over ``calls`` calls (results are fetched, so the
    work has finished when the clock stops). ``cpu`` gets this process's CPU seconds
    per wall second appended: ~2 when the step had both cores of the machine, less when
    other jobs took them (the noise indicator every result records)."""
    c0, began = cpu_seconds(), time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn()
    _fetch(out)
    wall = time.perf_counter() - began
    if cpu is not None:
        cpu.append((cpu_seconds() - c0) / wall)
    return wall / calls


def _fetch(out) -> None:
    for t in tf.nest.flatten(out):
        if hasattr(t, "numpy"):
            t.numpy()


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int, calls: int = 1,
                warmup: int = 1, log: Optional[Callable[[str], None]] = None,
                cores: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[float]]:
    """Seconds per call of each ``fns[name]``, ``rounds`` samples each, measured in
    interleaved rounds (a load burst hits every configuration of a round). ``cores``
    gets each configuration's CPU-seconds-per-second samples (see seconds_per_call)."""
    for name, fn in fns.items():
        for _ in range(warmup):
            _fetch(fn())
    out: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            cpu = cores.setdefault(name, []) if cores is not None else None
            out[name].append(seconds_per_call(fn, calls, cpu))
        if log:
            log(f"  round {r + 1}/{rounds} load {os.getloadavg()[0]:.2f}")
    return out


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- library glue


def load(name: str, overrides: Sequence[str] = ()):
    """``pipeline_configs/<name>.yaml`` with ``--set``-style overrides."""
    from ipu_diffusion.config import load_config

    return load_config(os.path.join(CONFIGS, name + ".yaml"), list(overrides))


def forward_flops(model_cfg) -> int:
    """Forward FLOPs per image from the layer shapes (``models.plan.block_flops``)."""
    from ipu_diffusion.models.plan import block_flops, plan_unet

    return int(sum(block_flops(model_cfg, p) for p in plan_unet(model_cfg)))


def train_flops(model_cfg) -> int:
    """Training FLOPs per image: forward + backward ~ 3 x forward."""
    return 3 * forward_flops(model_cfg)


def synthetic_batch(cfg, batch: Optional[int] = None) -> Dict[str, tf.Tensor]:
    """A data-stream-shaped batch {image [B,H,W,C] in [-1, 1], label [B], index [B]}."""
    m = cfg.model
    b = batch or cfg.training.batch_size
    rs = np.random.RandomState(0)
    image = rs.uniform(-1, 1, (b, m.image_size, m.image_size, m.in_channels)).astype(np.float32)
    return {"image": tf.constant(image), "label": tf.zeros([b], tf.int32),
            "index": tf.range(b, dtype=tf.int64)}


class TrainStep:
    """One compiled ``DiffusionTrainer.train_step`` of ``cfg`` on a fixed synthetic batch.

    ``build_run`` builds model, optimizer state, EMA and (with ``pipeline.stages > 1``) the
    placed pipeline executor exactly as ``train`` does; ``__call__`` runs one step.
    ``eager=True`` skips ``tf.function`` (smoke tests: no tracing latency).
    """

    def __init__(self, cfg, eager: bool = False):
        from ipu_diffusion.training.run import build_run

        self.cfg = cfg
        self._tmp = tempfile.TemporaryDirectory(prefix="bench_")
        self.run = build_run(cfg, self._tmp.name)
        trainer = self.run.trainer
        self.batch = synthetic_batch(cfg)
        self._fn = trainer.train_step if eager else tf.function(
            trainer.train_step, jit_compile=bool(cfg.training.jit_compile))
        self.params = self.run.unet.count_params()

    def __call__(self):
        return self._fn(self.batch)["loss"]

    @property
    def executor(self):
        return self.run.trainer.executor


# --------------------------------------------------------------------------- output


def write_json(name: str, payload: Dict[str, object]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name + ".json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=float)
        f.write("\n")
    return path


def read_json(name: str) -> Optional[Dict[str, object]]:
    path = os.path.join(RESULTS, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def chart_path(name: str) -> str:
    return os.path.join(RESULTS, name + ".png")
