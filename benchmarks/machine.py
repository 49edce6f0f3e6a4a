"""Benchmark helpers that import neither TensorFlow nor PyTorch, so the TF benchmarks
(benchlib) and the PyTorch baselines (.venv-torch) share them: the machine (CPU model,
flags, this process's CPU seconds), the statistics every result reports, and how a
PyTorch baseline starts torch."""
from __future__ import annotations

import os
import platform
import statistics
import sys
from typing import Dict, Iterable, List, Sequence


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
