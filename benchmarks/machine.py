"""Benchmark helpers that import neither TensorFlow nor PyTorch, so the TF benchmarks
(benchlib) and the PyTorch baselines (.venv-torch) share them: the machine (CPU model,
flags, this process's CPU seconds), the statistics every result reports, and how a
PyTorch baseline starts torch; and the overrides that make the digits config the
unconditional network the sampling benchmarks and their diffusers counterpart measure."""
from __future__ import annotations

import os
import platform
import statistics
import sys
from typing import Dict, Iterable, List, Optional, Sequence

#: ``--set`` overrides of pipeline_configs/digits.yaml: the unconditional digits network (the
#: default until 2026-12-04, when it became class-conditional). The sampling benchmarks
#: measure it, like diffusers' unconditional side and the figures recorded before then; a
#: class label adds one embedding lookup per step.
DIGITS_UNCONDITIONAL = ["model.num_classes=0", "data.use_labels=false"]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    t = os.times()
    return t.user + t.system


def cpu_flags(wanted: Iterable[str] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                        "amx_tile", "avx512_fp16")) -> List[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def summary(samples: Sequence[float]) -> Dict[str, float]:
    """median, min, max, spread = (max - min) / median, n."""
    xs = [float(x) for x in samples]
    med = statistics.median(xs)
    return {"median": med, "min": min(xs), "max": max(xs),
            "spread": (max(xs) - min(xs)) / med if med else 0.0, "n": len(xs)}


def start_torch(omp_wait_policy: str, threads: int, seed: int):
    """Import and set up torch for a baseline: ``OMP_WAIT_POLICY`` (read by libgomp when
    torch loads, so set before the import; "default" leaves libgomp's own), thread count
    and seed. Refuses a process that has imported TensorFlow. Returns the module."""
    if omp_wait_policy != "default":
        os.environ.setdefault("OMP_WAIT_POLICY", omp_wait_policy.upper())
    import torch

    if "tensorflow" in sys.modules:
        raise SystemExit("a PyTorch baseline must not import TensorFlow")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch


def bar_chart(path: str, labels: Sequence[str], values: Sequence[float],
              lows: Optional[Sequence[float]] = None, highs: Optional[Sequence[float]] = None,
              ylabel: str = "", title: str = "", hline: Optional[float] = None,
              hline_label: str = "") -> str:
    """A bar chart with min..max whiskers (Agg backend) at ``path``."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(labels) + 2), 3.6))
    x = np.arange(len(labels))
    err = None
    if lows is not None and highs is not None:
        err = [np.maximum(np.subtract(values, lows), 0), np.maximum(np.subtract(highs, values), 0)]
    ax.bar(x, values, yerr=err, capsize=3, color="#4477aa")
    if hline is not None:
        ax.axhline(hline, color="#cc3311", ls="--", lw=1, label=hline_label)
        ax.legend(loc="best", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
