"""What the group-norm formulation buys: the package's (statistics reduced over the pixels,
then over a group's channels) against the earlier one (one reduction over axes 1 and 3 of
the ``[B, HW, G, C/G]`` view), both as one XLA cluster with the trailing swish.

    .venv/bin/python benchmarks/group_norm.py            # ~3 min on 2 cores

Two levels, each in interleaved rounds (ratios per round, median and spread):

- layers: the U-Net's GroupNorm + swish shapes (digits training batch 64, a digits
  sampling part of 125, CIFAR-10 batch 16), forward and forward + backward;
- networks: the digits sampling network call (batch 250 in ``eval.parallel_calls`` parts,
  fp32 and bf16) and ``DiffusionTrainer.train_step`` (digits batch 64, DDPM CIFAR-10
  batch 16, fp32), each built twice, once per formulation (swapped in before tracing).

and an op-level profile of that sampling network call (one call of batch 250, each
formulation, fp32 and bf16): TensorFlow's per-op step statistics of the frozen graph in a
``tf.compat.v1`` session, summed by component (convolutions, group norm, attention,
other), averaged over traced runs taken in interleaved rounds.

Writes ``results/group_norm.json``, ``results/group_norm.png`` (time of the package's
formulation / the earlier one; below 1 is faster) and ``results/group_norm_profile.png``
(milliseconds per component, before and after).
"""
from __future__ import annotations

import collections
import contextlib
import os
from typing import Callable, Dict, List

import benchlib as bl
import tensorflow as tf

from ipu_diffusion.models import norm

GROUPS = 8
LAYER_SHAPES = {"digits b64": [[64, 16, 16, 32], [64, 8, 8, 64], [64, 4, 4, 64]],
                "digits sampling b125": [[125, 16, 16, 32], [125, 8, 8, 64]],
                "cifar b16": [[16, 32, 32, 128], [16, 16, 16, 256], [16, 8, 8, 256]]}


def one_reduction(x, gamma, beta, groups, epsilon, add=None, scale=None, shift=None,
                  swish=False):
    """The earlier formulation (before 2026-12-03), kept here as the baseline."""
    dtype = x.dtype
    x = tf.cast(x, tf.float32)
    if add is not None:
        x = x + tf.cast(add, tf.float32)
    _, h, w, c = x.shape
    xg = tf.reshape(x, [-1, h * w, groups, c // groups])
    mean, var = tf.nn.moments(xg, axes=[1, 3], keepdims=True)
    inv = tf.math.rsqrt(var + epsilon) * tf.reshape(tf.cast(gamma, tf.float32), [1, 1, groups, -1])
    y = xg * inv + (tf.reshape(tf.cast(beta, tf.float32), [1, 1, groups, -1]) - mean * inv)
    y = tf.reshape(y, [-1, h, w, c])
    if scale is not None:
        y = y * (1.0 + tf.cast(scale, tf.float32)) + tf.cast(shift, tf.float32)
    if swish:
        y = y * tf.sigmoid(y)
    return tf.cast(y, dtype)


FORMULATIONS = {"earlier": tf.function(one_reduction, jit_compile=True, autograph=False),
                "package": norm._fused_group_norm}


def _layer_fn(fused, shape, backward: bool) -> Callable[[], tf.Tensor]:
    c = shape[-1]
    x = tf.random.stateless_normal(shape, (1, 2)) * 3 + 1
    add = tf.random.stateless_normal([shape[0], 1, 1, c], (3, 4))
    gamma = tf.Variable(tf.random.stateless_normal([c], (5, 6)))
    beta = tf.Variable(tf.zeros([c]))

    @tf.function
    def fn():
        if not backward:
            return fused(x, gamma, beta, GROUPS, norm.GROUP_NORM_EPSILON, add, None, None, True)
        with tf.GradientTape() as tape:
            tape.watch([x, add])
            y = fused(x, gamma, beta, GROUPS, norm.GROUP_NORM_EPSILON, add, None, None, True)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x, add, gamma, beta])[0]

    return fn


@contextlib.contextmanager
def _installed(name: str):
    """Formulation ``name`` as the U-Net's fused group norm while networks are traced."""
    saved = norm._fused_group_norm
    norm._fused_group_norm = FORMULATIONS[name]
    try:
        yield
    finally:
        norm._fused_group_norm = saved


def _with(name: str, build: Callable[[], Callable[[], object]]) -> Callable[[], object]:
    """``build()`` with formulation ``name`` installed, traced once before it is restored."""
    with _installed(name):
        fn = build()
        bl._fetch(fn())
    return fn


def _sampling_network(precision: str, parts: int = 0):
    """The unconditional digits sampling network (``denoise_fn_for`` in ``parts`` calls; 0: the
    config's ``eval.parallel_calls``) and an input batch ``(x_t, t)`` of ``eval.batch_size``."""
    from ipu_diffusion.inference.generate import build_sampling_unet, denoise_fn_for

    cfg = bl.load("digits", bl.DIGITS_UNCONDITIONAL + [f"eval.precision={precision}"])
    unet = build_sampling_unet(cfg)  # the cost does not depend on the weights
    b = cfg.eval.batch_size
    x = tf.random.stateless_normal([b, 16, 16, 1], (7, 8))
    t = tf.fill([b], 500)
    return denoise_fn_for(unet, parts=parts or cfg.eval.parallel_calls), x, t


def _sampling_call(precision: str) -> Callable[[], object]:
    fn, x, t = _sampling_network(precision)
    denoise = tf.function(fn)
    return lambda: denoise(x, t)


# Op types by component of the profile; the fused group norm is the only XLA cluster
# (a call of a jit-compiled function) in the sampling graph.
COMPONENTS = {"convolution": ("Conv2D",), "group norm": ("PartitionedCall", "_XlaRun",
                                                          "XlaLaunch"),
              "attention": ("BatchMatMul", "Softmax")}


def _component(op: str) -> str:
    for name, keys in COMPONENTS.items():
        if any(k in op for k in keys):
            return name
    return "other"


def _profiled_session(precision: str, name: str):
    """A ``tf.compat.v1`` session on the frozen graph of one sampling network call (one
    part: a profile of concurrent parts would count overlapping ops twice) with group-norm
    formulation ``name``; returns ``run()``, which runs it traced and returns the step
    statistics."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2)

    with _installed(name):
        fn, x, t = _sampling_network(precision, parts=1)
        frozen = convert_variables_to_constants_v2(tf.function(fn).get_concrete_function(x, t))
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(frozen.graph.as_graph_def(), name="")
    feed = {graph.get_tensor_by_name(i.name): v.numpy() for i, v in zip(frozen.inputs, (x, t))}
    fetch = [graph.get_tensor_by_name(o.name) for o in frozen.outputs]
    sess = tf.compat.v1.Session(graph=graph)
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)

    def run():
        meta = tf.compat.v1.RunMetadata()
        sess.run(fetch, feed, options=options, run_metadata=meta)
        return meta.step_stats

    for _ in range(2):
        run()
    return run


def op_profiles(keys, runs: int = 5) -> Dict[str, Dict[str, float]]:
    """Milliseconds per component of one sampling network call for each ``(precision,
    formulation)`` in ``keys``, averaged over ``runs`` traced runs taken in interleaved
    rounds."""
    sessions = {f"{p} {name}": _profiled_session(p, name) for p, name in keys}
    totals = {k: collections.Counter() for k in sessions}
    for _ in range(runs):
        for key, run in sessions.items():
            for dev in run().dev_stats:
                for node in dev.node_stats:
                    label = node.timeline_label
                    op = label.split("=", 1)[-1].split("(")[0].strip() if "=" in label else node.node_name
                    ms = (node.op_end_rel_micros - node.op_start_rel_micros) / 1e3
                    totals[key][_component(op)] += ms
    return {key: {c: round(total[c] / runs, 2) for c in [*COMPONENTS, "other"]}
            for key, total in totals.items()}


def profile_chart(profiles: Dict[str, Dict[str, float]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(profiles)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bottom = [0.0] * len(labels)
    for comp, color in zip([*COMPONENTS, "other"], ("#4477aa", "#ee6677", "#228833", "#bbbbbb")):
        vals = [profiles[k][comp] for k in labels]
        ax.bar(labels, vals, bottom=bottom, color=color, label=comp)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("ms per call (sum of op times)")
    ax.set_title("Digits sampling network, batch 250: op time by component", fontsize=10)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    path = bl.chart_path("group_norm_profile")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


NETWORKS = {
    "digits sampling b250 fp32": lambda: _sampling_call("float32"),
    "digits sampling b250 bf16": lambda: _sampling_call("bfloat16"),
    "digits train b64 fp32": lambda: bl.TrainStep(bl.load("digits")),
    "cifar train b16 fp32": lambda: bl.TrainStep(bl.load("ddpm_cifar10",
                                                         ["training.batch_size=16"])),
}


def _ratios(fns: Dict[str, Callable[[], object]], labels: List[str], rounds: int, calls: int
            ) -> List[Dict[str, object]]:
    secs = bl.interleaved(fns, rounds, calls=calls, warmup=1, log=bl.log)
    rows = []
    for label in labels:
        new, old = secs[f"{label} package"], secs[f"{label} earlier"]
        rows.append({"label": label, "package_ms": bl.summary([1e3 * s for s in new]),
                     "earlier_ms": bl.summary([1e3 * s for s in old]),
                     "package_over_earlier": bl.summary([a / b for a, b in zip(new, old)])})
        bl.log(f"  {label}: {rows[-1]['package_over_earlier']['median']:.2f}x the earlier time")
    return rows


def main() -> Dict[str, object]:
    env = bl.environment()
    fns, labels = {}, []
    for group, shapes in LAYER_SHAPES.items():
        for shape in shapes:
            for backward in (False, True):
                label = f"{group} {'x'.join(map(str, shape[1:]))} {'fwd+bwd' if backward else 'fwd'}"
                labels.append(label)
                for name, fused in FORMULATIONS.items():
                    fns[f"{label} {name}"] = _layer_fn(fused, shape, backward)
    bl.log("group_norm: layers")
    layers = _ratios(fns, labels, rounds=7, calls=10)
    fns = {}
    for label, build in NETWORKS.items():
        bl.log(f"  build {label}")
        for name in FORMULATIONS:
            fns[f"{label} {name}"] = _with(name, build)
    bl.log("group_norm: networks")
    networks = _ratios(fns, list(NETWORKS), rounds=5, calls=2)
    bl.log("group_norm: op profile")
    profiles = op_profiles([(p, name) for p in ("float32", "bfloat16") for name in FORMULATIONS])
    for k, v in profiles.items():
        bl.log(f"  {k}: " + ", ".join(f"{c} {ms:.1f} ms" for c, ms in v.items()))
    profile_chart(profiles)
    env["loadavg_end"] = list(os.getloadavg())
    payload = {"benchmark": "group_norm", "environment": env, "groups": GROUPS,
               "layers": layers, "networks": networks, "profile_ms_per_call": profiles,
               "notes": "package_over_earlier: per-round time of the package's group norm "
                        "(pixels first, then the group's channels) over the earlier one "
                        "(one reduction over the [B, HW, G, C/G] view); both one XLA "
                        "cluster with the swish; lower is faster"}
    bl.write_json("group_norm", payload)
    rows = layers + networks
    bl.bar_chart(bl.chart_path("group_norm"), [r["label"] for r in rows],
                 [r["package_over_earlier"]["median"] for r in rows],
                 [r["package_over_earlier"]["min"] for r in rows],
                 [r["package_over_earlier"]["max"] for r in rows],
                 ylabel="time, package / earlier", hline=1.0, hline_label="no change",
                 title="Group norm + swish: statistics over pixels first")
    return payload


if __name__ == "__main__":
    main()
