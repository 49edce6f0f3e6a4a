"""THE invariant: for any cut, microbatch count, schedule and recompute setting, the
accumulated pipelined gradient equals the single-device full-batch gradient (fp32, relative
error <= 1e-5), dropout on, with cuts that separate skip producers from their consumers."""
from __future__ import annotations

import logging

import pytest
import tensorflow as tf

from ipu_diffusion._keras import IS_KERAS3
from ipu_diffusion.config import ModelConfig, PipelineConfig
from ipu_diffusion.pipeline.fallback import PipelineExecutor
from ipu_diffusion.pipeline.memory import stash_depth
from ipu_diffusion.pipeline.partition import make_partition
from pipeline_fakes import (FRONT, FRONT_Y, LOSS, FakeUNet, brute_force_crossing, make_batch,
                            max_relative_error, reference_gradients, toy_front, toy_loss)

pytestmark = pytest.mark.keras2
# Under Keras 2 (make test-keras2) the same executor runs on tf_keras layers: there the
# grid is checked at its deepest corner, S = 4 with M = 4 (every schedule, recomputation on
# and off), and the real U-Net with its skip riding through three stages; Keras 3 runs
# the whole grid.
KERAS2_CORNER = "under Keras 2 only S = 4, M = 4 and the skip through three stages run"
logging.getLogger("ipu_diffusion.pipeline.fallback").setLevel(logging.ERROR)  # placement: see devices test

TOL = 1e-5
# S=2: skip_a (in_conv) and skip_b (res1) cross to up/up0; S=4: skip_a rides through 1 and 2,
# skip_b is made in stage 1 and read in stage 2
FAKE_CUTS = {1: (), 2: ("mid",), 4: ("down", "mid", "up0")}


@pytest.fixture(scope="module")
def fake():
    unet = FakeUNet(dropout=0.2)
    batch = make_batch(8)
    ref_loss, ref = reference_gradients(unet, batch)
    return unet, batch, ref_loss, ref, {}


def _executor(unet, pipeline, cache, front=FRONT, front_fn=toy_front, final=("loss",)):
    part = make_partition(unet.blocks, pipeline, front, LOSS, final_outputs=final)
    if part.ranges not in cache:
        cache[part.ranges] = unet.stage_models_for_ranges(part.ranges)
    return part, PipelineExecutor(unet, front_fn, toy_loss, part, pipeline,
                                  stage_models=cache[part.ranges])


@pytest.mark.parametrize("recompute", [False, True], ids=["stash", "recompute"])
@pytest.mark.parametrize("schedule", ["grouped", "interleaved", "sequential"])
@pytest.mark.parametrize("micro", [1, 4])
@pytest.mark.parametrize("stages", [1, 2, 4])
def test_pipelined_gradient_equals_full_batch_gradient(fake, stages, micro, schedule, recompute):
    if not IS_KERAS3 and (stages, micro) != (4, 4):
        pytest.skip(KERAS2_CORNER)
    unet, batch, ref_loss, ref, cache = fake
    pipeline = PipelineConfig(stages=stages, cuts=FAKE_CUTS[stages], microbatches=micro,
                              schedule=schedule, recompute=recompute, fuse_microbatches=False)
    part, ex = _executor(unet, pipeline, cache)
    assert not ex.fused and len(ex.tasks) == 2 * stages * micro
    loss, grads, stats = ex.gradients(batch, training=True)
    assert max_relative_error(grads, ref) <= TOL
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert stats["loss"].shape == (8,)
    # what crossed each boundary is exactly the live set (independent brute force)
    assert ex.sent_keys == [brute_force_crossing(part.chain, part.chain_range(s)[0], ("loss",))
                            for s in range(1, stages)]
    assert ex.in_flight == [stash_depth(schedule, stages, s, micro) for s in range(stages)]


@pytest.mark.parametrize("stages", [2, 4])
def test_fused_microbatches_give_the_full_batch_gradient(fake, stages):
    """pipeline.fuse_microbatches (the default): grouped, no recompute, stages on this
    host's CPUs -> each stage runs the M microbatches as one batch, one task per stage
    and direction, with the same gradient; the schedule's stash depth is still M."""
    unet, batch, ref_loss, ref, cache = fake
    pipeline = PipelineConfig(stages=stages, cuts=FAKE_CUTS[stages], microbatches=4)
    part, ex = _executor(unet, pipeline, cache)
    assert ex.fused and len(ex.tasks) == 2 * stages
    assert [len(m["x0"]) for m in ex.split(batch)] == [8]
    assert ex.in_flight == [4] * stages
    loss, grads, stats = ex.gradients(batch, training=True)
    assert max_relative_error(grads, ref) <= TOL
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert stats["loss"].shape == (8,)


@pytest.mark.parametrize("change", [dict(schedule="interleaved"), dict(schedule="sequential"),
                                    dict(recompute=True), dict(microbatches=1),
                                    dict(fuse_microbatches=False)])
def test_microbatches_are_fused_only_where_the_schedule_allows(change):
    from ipu_diffusion.pipeline.fallback import fuses_microbatches

    cpus = ["/job:localhost/replica:0/task:0/device:CPU:0", "/device:CPU:1"]
    grouped = dict(stages=2, microbatches=4, schedule="grouped")
    assert fuses_microbatches(PipelineConfig(**grouped), cpus)
    assert not fuses_microbatches(PipelineConfig(**{**grouped, **change}), cpus)
    # GPUs can overlap stages: there the microbatches stay apart
    assert not fuses_microbatches(PipelineConfig(**grouped), ["/device:GPU:0", "/device:GPU:1"])


def test_dropout_is_active(fake):
    """Guard against a vacuous invariant: the keyed dropout changes the gradient."""
    unet, batch, _, ref, _ = fake
    _, no_dropout = reference_gradients(unet, batch, training=False)
    assert max_relative_error(no_dropout, ref) > 1e-3


def test_labels_embeddings_and_reported_keys():
    """Class-conditional (embedding gradients arrive as IndexedSlices) and a reported key."""
    unet = FakeUNet(num_classes=3)
    batch = make_batch(8, num_classes=3)
    ref_loss, ref = reference_gradients(unet, batch)
    pipeline = PipelineConfig(stages=2, cuts=("res1",), microbatches=4, schedule="interleaved",
                              recompute=True)
    part, ex = _executor(unet, pipeline, {}, FRONT_Y, toy_front, final=("loss", "t"))
    assert part.batch_keys == ("key", "x0", "y")
    loss, grads, stats = ex.gradients(batch)
    assert max_relative_error(grads, ref) <= TOL
    assert stats["t"].numpy().tolist() == toy_front(batch)["t"].numpy().tolist()


def test_loss_scale_scales_gradients_not_loss(fake):
    unet, batch, ref_loss, ref, cache = fake
    pipeline = PipelineConfig(stages=2, cuts=FAKE_CUTS[2], microbatches=2)
    _, ex = _executor(unet, pipeline, cache)
    loss, grads, _ = ex.gradients(batch, loss_scale=128.0)
    assert max_relative_error([g / 128.0 for g in grads], ref) <= TOL
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)


# --------------------------------------------------------------------------- real U-Net

REAL = ModelConfig(image_size=8, in_channels=2, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(4,), num_groups=4, dropout=0.1)


@pytest.fixture(scope="module")
def real():
    from ipu_diffusion.models.unet import build_unet

    unet = build_unet(REAL, zero_init=False)  # zero-init convs would hide gradient paths
    batch = make_batch(4)
    ref_loss, ref = reference_gradients(unet, batch)
    return unet, batch, ref_loss, ref


@pytest.mark.parametrize("stages,cuts,micro,schedule,recompute", [
    # skip_0 (in_conv, stage 0) rides through stages 1-2 to up0_res1 (stage 3)
    (4, ("down0_down", "mid_res0", "up1_res1"), 2, "interleaved", True),
    (2, ("mid_attn",), 2, "grouped", False),
])
def test_real_unet_invariant(real, stages, cuts, micro, schedule, recompute):
    if not IS_KERAS3 and stages != 4:
        pytest.skip(KERAS2_CORNER)
    unet, batch, ref_loss, ref = real
    pipeline = PipelineConfig(stages=stages, cuts=cuts, microbatches=micro, schedule=schedule,
                              recompute=recompute)
    part, ex = _executor(unet, pipeline, {})
    if stages == 4:
        assert all("skip_0" in part.inputs(s) for s in (1, 2, 3))
    loss, grads, _ = ex.gradients(batch)
    assert max_relative_error(grads, ref) <= TOL
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert len(grads) == len(unet.trainable_variables)


def test_trainer_objective_through_build_executor():
    """The trainer's objective (hybrid loss, learned variance: Nichol & Dhariwal 2021) via
    build_executor, as training/run.py calls it; t comes back for loss-aware samplers."""
    objective_mod = pytest.importorskip("ipu_diffusion.training.objective")
    from ipu_diffusion.config import DiffusionConfig
    from ipu_diffusion.models.unet import build_unet
    from ipu_diffusion.pipeline.fallback import build_executor

    model = ModelConfig(image_size=8, in_channels=2, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                        attn_resolutions=(), num_groups=4, dropout=0.1, learn_sigma=True)
    diffusion = DiffusionConfig(schedule="cosine", timesteps=100, var_type="learned_range",
                                loss_type="hybrid")
    objective = objective_mod.DiffusionObjective(diffusion)
    unet = build_unet(model, zero_init=False)
    batch = make_batch(4)
    ref_loss, ref = reference_gradients(unet, batch, objective.front, objective.loss)
    pipeline = PipelineConfig(stages=2, cuts=("mid_res1",), microbatches=2,
                              schedule="interleaved", recompute=True)
    ex = build_executor(unet, objective, pipeline, global_batch=4, report_keys=("t",))
    loss, grads, stats = ex.gradients(batch)
    assert max_relative_error(grads, ref) <= TOL
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert stats["t"].numpy().tolist() == objective.front(batch)["t"].numpy().tolist()
