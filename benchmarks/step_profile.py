"""Where a training step's time goes, by component, before and after the step's
optimisations (issue 19): the package's ``DiffusionTrainer.train_step`` against the same
step with the earlier pieces swapped in before tracing (Keras' own Adam update instead of
FusedAdam's fused ``ResourceApplyAdam``; the earlier group-norm formulation,
``group_norm.one_reduction``).

    .venv/bin/python benchmarks/step_profile.py            # ~5 min on 2 cores

For each configuration (DDPM CIFAR-10 batch 16 in fp32 and mixed_bfloat16, digits batch 64
fp32) and each variant:

- step time: unprofiled steps in interleaved rounds (the ratio per round, median and
  spread);
- op time by component: TensorFlow's profiler (``tf.profiler.experimental``) over single
  steps taken in interleaved rounds; each op's self time (its duration less that of the
  events nested in it, so an XLA cluster's thunks count once), summed by component and
  averaged over the profiled steps. Two cores run ops concurrently, so a step's op time
  is up to twice its wall time.

Components: convolutions (forward and both backward kernels), group norm (the XLA clusters:
the only ones in a step that is not ``jit_compile``), attention (its batched matmuls and
softmax), other network ops (forward and backward), loss and update (the ops outside the
network: noising, loss, global-norm clip, optimizer, EMA) and runtime (the executor's own
time between ops).

Writes ``results/step_profile.json`` and ``results/step_profile.png`` (stacked
milliseconds per step by component, earlier and package side by side).
"""
from __future__ import annotations

import collections
import contextlib
import glob
import os
import tempfile
from typing import Callable, Dict, List

import benchlib as bl
import tensorflow as tf

import group_norm
from ipu_diffusion._keras import keras
from ipu_diffusion.training.trainer import FusedAdam

CONFIGS = {"cifar b16 fp32": ("ddpm_cifar10", ["training.batch_size=16"]),
           "cifar b16 bf16": ("ddpm_cifar10", ["training.batch_size=16",
                                               "training.precision=mixed_bfloat16"]),
           "digits b64 fp32": ("digits", ["training.batch_size=64"])}
COMPONENTS = ("convolution", "group norm", "attention", "other network", "loss and update",
              "runtime")
COLORS = ("#4477aa", "#ee6677", "#228833", "#bbbbbb", "#ccbb44", "#66ccee")


@contextlib.contextmanager
def _variant(name: str):
    """The trainer built as ``name`` ('earlier' or 'package') while it is traced: the
    earlier one has Keras' own element-wise Adam update in FusedAdam (same slots) and the
    earlier group norm."""
    if name == "package":
        yield
        return
    saved = FusedAdam.update_step
    FusedAdam.update_step = keras.optimizers.Adam.update_step
    try:
        with group_norm._installed("earlier"):
            yield
    finally:
        FusedAdam.update_step = saved


def build(preset: str, overrides: List[str], variant: str) -> bl.TrainStep:
    with _variant(variant):
        step = bl.TrainStep(bl.load(preset, overrides))
        bl._fetch(step())  # traced with the variant installed
    return step


# XLA's events inside a cluster (fusions, thunks) carry no TensorFlow op name.
_XLA_EVENTS = ("fusion", "Thunk", "CpuExecutable", "BlockUntilReady", "wrapped_", "copy",
               "ProcessAsync")


def component(event: str) -> str:
    """The component of a profiler event name (``node/name:OpType`` for TensorFlow ops)."""
    if ":" not in event or "::" in event:  # not a TensorFlow op: XLA's or the executor's
        return "group norm" if any(k in event for k in _XLA_EVENTS) else "runtime"
    node, op = event.rsplit(":", 1)
    if not node.startswith(("unet", "gradient_tape/unet")):
        return "loss and update"
    if "Conv2D" in op:
        return "convolution"
    if "BatchMatMul" in op or "Softmax" in op:
        return "attention"
    return "other network"


def self_times(space) -> Dict[str, float]:
    """Milliseconds of self time per event name on the host's executor threads of an
    ``XSpace``: each event's duration less its nested events' (same thread)."""
    out: Dict[str, float] = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        meta = plane.event_metadata
        for line in plane.lines:
            if line.name == "python":  # the caller waiting on the step
                continue
            stack: List[tuple] = []  # (end, name) of the enclosing events
            for e in sorted(line.events, key=lambda e: (e.offset_ps, -e.duration_ps)):
                name = meta[e.metadata_id].name
                if name.startswith("ThreadpoolListener"):
                    continue
                while stack and stack[-1][0] <= e.offset_ps:
                    stack.pop()
                if stack:
                    out[stack[-1][1]] -= e.duration_ps / 1e9
                out[name] += e.duration_ps / 1e9
                stack.append((e.offset_ps + e.duration_ps, name))
    return out


def profile_once(fn: Callable[[], object]) -> Dict[str, float]:
    """Milliseconds per component of one call of ``fn``."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory(prefix="step_profile_") as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            bl._fetch(fn())
        finally:
            tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0],
                  "rb") as f:
            space.ParseFromString(f.read())
    totals = collections.Counter()
    for name, ms in self_times(space).items():
        totals[component(name)] += ms
    return {c: totals[c] for c in COMPONENTS}


def op_profiles(fns: Dict[str, Callable[[], object]], runs: int) -> Dict[str, Dict[str, float]]:
    """:func:`profile_once` of each of ``fns``, averaged over ``runs`` interleaved rounds."""
    totals = {k: collections.Counter() for k in fns}
    for _ in range(runs):
        for key, fn in fns.items():
            totals[key].update(profile_once(fn))
    return {k: {c: round(t[c] / runs, 1) for c in COMPONENTS} for k, t in totals.items()}


def chart(profiles: Dict[str, Dict[str, Dict[str, float]]], path: str) -> str:
    """Stacked bars, one panel per configuration (its own scale), a bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(profiles), figsize=(3.0 * len(profiles) + 1.5, 3.8),
                             squeeze=False)
    for ax, (label, variants) in zip(axes[0], profiles.items()):
        bottom = [0.0] * len(variants)
        for comp, color in zip(COMPONENTS, COLORS):
            vals = [ms[comp] for ms in variants.values()]
            ax.bar(list(variants), vals, bottom=bottom, color=color, label=comp)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(label, fontsize=9)
    axes[0][0].set_ylabel("ms per step (sum of op self times)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Training step by component: earlier pieces vs the package", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(rounds: int = 5, runs: int = 3) -> Dict[str, object]:
    env = bl.environment()
    rows, profiles = [], {}
    for label, (preset, overrides) in CONFIGS.items():
        bl.log(f"step_profile: {label}")
        fns = {v: build(preset, overrides, v) for v in ("earlier", "package")}
        rows += group_norm._ratios({f"{label} {v}": fn for v, fn in fns.items()}, [label],
                                   rounds=rounds, calls=2)
        profiles[label] = op_profiles(fns, runs)
        for variant, ms in profiles[label].items():
            bl.log(f"  {variant}: " + ", ".join(f"{c} {v:.0f} ms" for c, v in ms.items()))
        del fns
    chart(profiles, bl.chart_path("step_profile"))
    env["loadavg_end"] = list(os.getloadavg())
    payload = {"benchmark": "step_profile", "environment": env, "rows": rows,
               "profile_ms_per_step": profiles, "profiled_steps": runs,
               "notes": "earlier: Keras' Adam update (not FusedAdam's ResourceApplyAdam) and "
                        "the one-reduction group norm; package_over_earlier: per-round step "
                        "time ratio, lower is faster; profile: op self times summed by "
                        "component (two cores overlap ops: up to 2x the wall time)"}
    bl.write_json("step_profile", payload)
    return payload


if __name__ == "__main__":
    main()
