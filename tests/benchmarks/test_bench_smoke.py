"""Smoke test of the benchmark scripts' measurement helpers on tiny sizes (no timing
assertions), so benchmarks/ does not rot when the library changes."""
from __future__ import annotations

import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "benchmarks")
sys.path.insert(0, BENCH)

import benchlib as bl  # noqa: E402
import digits_recipe  # noqa: E402
import group_norm  # noqa: E402
from ipu_diffusion._keras import keras  # noqa: E402
from ipu_diffusion.models import norm  # noqa: E402
import memory  # noqa: E402
import pipeline  # noqa: E402
import roofline  # noqa: E402
import run_all  # noqa: E402
import sampling  # noqa: E402
import step_profile  # noqa: E402
import train_throughput  # noqa: E402

# A 2-level, 8-channel U-Net on 8x8 images and a 4-step diffusion: seconds to trace.
TINY = ["model.image_size=8", "model.ch=8", "model.ch_mult=[1,2]", "model.num_groups=4",
        "model.attn_resolutions=[4]", "diffusion.timesteps=4", "training.batch_size=4"]


@pytest.fixture(autouse=True)
def op_by_op_group_norm():
    """Keras' GroupNormalization instead of the fused XLA one: no XLA compilation per
    shape, so the tiny runs below take seconds (the wiring under test is the same)."""
    norm.set_group_norm_factory(keras.layers.GroupNormalization)
    yield
    norm.set_group_norm_factory(None)


def test_summary_closed_form():
    s = bl.summary([1.0, 2.0, 4.0])
    assert s == {"median": 2.0, "min": 1.0, "max": 4.0, "spread": 1.5, "n": 3}


def test_roofline_tiny():
    res = roofline.measure([32], rounds=1, calls=1, conv=((1, 8, 8, 8), 8))
    assert set(res["peak_gflops"]) == {"fp32", "bf16"}
    assert [r["kind"] for r in res["rows"]].count("conv") == 4
    assert all(r["gflops"]["median"] > 0 for r in res["rows"])


def test_train_step_pipeline_and_memory_child(tmp_path):
    label, sets = pipeline.pipe(2, 2)
    rows = pipeline.measure("digits", 4, [("S1 unsplit", ["pipeline.stages=1"] + TINY),
                                          (label, list(sets) + TINY)], rounds=1, eager=True)
    assert [r["stages"] for r in rows] == [1, 2]
    assert rows[0]["relative"]["median"] == 1.0
    got = memory.child({"preset": "digits", "batch": 4, "steps": 1, "eager": True,
                        "sets": TINY + ["pipeline.stages=2", "pipeline.microbatches=2"]})
    assert len(got["estimate_per_stage"]) == 2 and got["peak_rss_steps"] > 0
    assert max(got["estimate_per_stage"]) < got["host_estimate"] < got["estimate"]
    assert train_throughput.case("digits", 4, "mixed_bfloat16", True)[0] == "digits b4 bf16 xla"


def test_sampling_tiny():
    def digits(*sets):  # the unconditional network the sampling benchmarks measure
        return bl.load("digits", TINY + bl.DIGITS_UNCONDITIONAL + list(sets))

    res = sampling.measure(digits(), 2, (2,), rounds=1, target_s=0.0)
    assert [r["name"] for r in res["rows"]] == ["ddpm4", "ddim2"]
    assert all(math.isfinite(r["overhead_vs_forward"]["median"]) for r in res["rows"])
    prec = sampling.precision_rows(digits("eval.batch_size=2"), 2, rounds=1)
    assert sorted(prec["img_per_s"]) == ["bfloat16", "float32"] and prec["batch"] == 2
    assert math.isfinite(prec["bf16_speedup"]["median"])
    cfg = sampling.guidance_rows(bl.load("digits_cond", TINY), 2, (3,), rounds=1)
    assert [r["batch"] for r in cfg["rows"]] == [3]
    assert sorted(cfg["rows"][0]["step_s"]) == ["cfg", "cfg_one_call", "conditional"]
    assert all(math.isfinite(r[k]["median"]) and r[k]["median"] > 0
               for r in cfg["rows"] for k in ("cfg_cost", "cfg_one_call_cost"))
    parts = sampling.parts_rows(digits("eval.batch_size=3"), 2, rounds=1)
    assert sorted(parts["img_per_s"]) == ["2_parts", "one_call"] and parts["batch"] == 3
    assert math.isfinite(parts["parts_speedup"]["median"])


def test_group_norm_baseline_is_the_same_function_and_rows_are_ratios():
    """The earlier formulation the benchmark times against computes the same group norm
    (to float32 round-off); a row is the per-round time ratio of the two."""
    import numpy as np
    import tensorflow as tf

    x = tf.random.stateless_normal([3, 4, 4, 16], (1, 1)) * 4 + 2
    gamma, beta = tf.random.stateless_normal([16], (2, 2)), tf.random.stateless_normal([16], (3, 3))
    args = (gamma, beta, 4, norm.GROUP_NORM_EPSILON, None, None, None, True)
    np.testing.assert_allclose(group_norm.one_reduction(x, *args).numpy(),
                               norm._group_norm_math(x, *args).numpy(), rtol=0, atol=2e-5)
    fns = {f"l {name}": group_norm._layer_fn(f, [2, 4, 4, 16], True)
           for name, f in group_norm.FORMULATIONS.items()}
    rows = group_norm._ratios(fns, ["l"], rounds=2, calls=1)
    assert rows[0]["label"] == "l" and rows[0]["package_over_earlier"]["n"] == 2
    assert rows[0]["package_over_earlier"]["median"] > 0


def test_step_profile_self_time_is_duration_less_nested_events():
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    for i, name in enumerate(["op_a:Conv2D", "op_b:Mul", "op_c:Sum", "wait"], 1):
        plane.event_metadata[i].name = name
    ms = 10 ** 9  # picoseconds
    worker = plane.lines.add(name="tf_Compute/1")
    for meta, start, length in ((1, 0, 10), (2, 2, 3), (3, 3, 1), (3, 20, 5)):
        worker.events.add(metadata_id=meta, offset_ps=start * ms, duration_ps=length * ms)
    plane.lines.add(name="python").events.add(metadata_id=4, offset_ps=0, duration_ps=30 * ms)
    # a 10 ms op holding a 3 ms op holding a 1 ms one, and the 1 ms op's name again, 5 ms
    assert step_profile.self_times(space) == {"op_a:Conv2D": 7.0, "op_b:Mul": 2.0,
                                              "op_c:Sum": 6.0}


def test_step_profile_components_of_a_tiny_step(tmp_path):
    """Every op of a real step lands in a component; the names below have the form the
    profiler gives a DDPM CIFAR-10 step's events (``node:OpType``, XLA's and the executor's)."""
    names = {"gradient_tape/unet_1/up1_up_1/conv_1/convolution/Conv2DBackpropInput:"
             "_MklNativeConv2DBackpropInput": "convolution",
             "unet_1/up1_res0_1/attn_1/MatMul:_MklBatchMatMulV2": "attention",
             "unet_1/down1_res0_1/res_1/split:Split": "other network",
             "global_norm/L2Loss_4:L2Loss": "loss and update",
             "AddN_29:AddN": "loss and update", " ynn_fusion.1": "group norm",
             "ExecutorState::ProcessAsync::Start": "group norm",
             "ExecutorState::Process": "runtime"}
    assert {n: step_profile.component(n) for n in names} == names
    step = bl.TrainStep(bl.load("digits", TINY))
    bl._fetch(step())
    ms = step_profile.op_profiles({"tiny": step}, runs=1)["tiny"]
    assert list(ms) == list(step_profile.COMPONENTS)
    assert ms["convolution"] > 0 and ms["loss and update"] > 0 and ms["attention"] > 0
    assert os.path.getsize(step_profile.chart({"tiny": {"a": ms, "b": ms}, "again": {"a": ms}},
                                                str(tmp_path / "p.png"))) > 0


def test_targets_and_chart_without_results(tmp_path):
    assert all(t["met"] is None for t in run_all.targets({}))
    path = bl.bar_chart(str(tmp_path / "c.png"), ["a", "b"], [1.0, 2.0], [0.5, 1.5], [1.5, 2.5])
    assert os.path.getsize(path) > 0


def test_digits_recipe_budget_and_merged_results(tmp_path, monkeypatch):
    """A recipe 1.5x as fast with twice the batch gets 3000 * 1.5 / 2 steps (a multiple of
    the scored points); results written by two invocations keep both runs."""
    monkeypatch.setitem(digits_recipe.RECIPES, "b128", ["training.batch_size=128"])
    assert digits_recipe._steps_for("default", 1.0, 3000, 3) == 3000
    assert digits_recipe._steps_for("b128", 1.5, 3000, 3) == 2250
    assert digits_recipe._steps_for("b128", 1.0, 1000, 3) == 501
    monkeypatch.setattr(bl, "RESULTS", str(tmp_path))
    floor = {"floor_" + k: 0.1 for k in ("fid", "inception_score", "precision", "recall")}

    def scores(v):
        return {k: v for k in digits_recipe.SCORES}

    def run(seed, eta, eval_value, samplers):
        return {"budget_steps": 9, "recipe": "default", "seed": seed, "steps": 9,
                "command_wall_s": 1.0, "scores": {"samplers": samplers}, "metrics": {
                    "img_per_s": 1.0, "eval": dict(scores(eval_value), sampler="ddim",
                                                   steps=50, eta=eta, **floor)}}

    # seed 0 evaluated at eta 0; seed 1 at eta 0.5, its eta 0 scored afterwards
    a, b = run(0, 0.0, 0.25, {}), run(1, 0.5, 0.75, {"ddim50_eta0": scores(0.5)})
    first = {"recipes": {"default": []}, "calibration": {"default": 1}, "runs": {"a": a}}
    second = {"recipes": {"b128": []}, "calibration": {"b128": 2},
              "runs": {"b": b, "a": "stale"}}
    digits_recipe._save(first, 9, ["a"])
    digits_recipe._save(second, 9, ["b"])
    both = bl.read_json(digits_recipe.NAME)
    assert both["runs"] == {"a": a, "b": b}
    assert both["calibration"] == {"default": 1, "b128": 2}
    summary = both["summary"]["default"]
    assert summary["seeds"] == [0, 1]
    # each sampler over the seeds that scored it, never mixed across samplers
    assert summary["samplers"]["ddim50_eta0"]["seeds"] == [0, 1]
    assert summary["samplers"]["ddim50_eta0"]["fid"] == {"mean": 0.375, "min": 0.25, "max": 0.5}
    assert summary["samplers"]["ddim50_eta0"]["fid_over_floor"]["mean"] == pytest.approx(3.75)
    assert summary["samplers"]["ddim50_eta0.5"]["seeds"] == [1]
    assert summary["samplers"]["ddim50_eta0.5"]["precision"]["mean"] == 0.75
    assert "| default | ddim50_eta0 | 0,1 | 0.375 [0.250, 0.500] |" in digits_recipe.markdown(both, 9)
