"""The IPU path held to the Poplar SDK's own rules, on CPU.

Each stand-in (``sdk_stages.py``, ``sdk_options.py``, ``sdk_dtypes.py``) ports a check of
the SDK 3.4 sources and cites its file; here the real objects ``pipeline/ipu.py`` and
``training/ipu_train.py`` build go through them. The SDK runs Keras 2.6, so the tests that
need Keras 2 internals (functional nodes, OptimizerV2, its LossScaleOptimizer) skip under
Keras 3 and run in ``make test-keras2``.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import sdk_options
import sdk_stages
import tensorflow as tf
from ipu_testlib import batch, small_config
from sdk_dtypes import format_violations, non_ipu_dtypes

from ipu_diffusion._keras import IS_KERAS3, keras
from ipu_diffusion.config import ConfigError
from ipu_diffusion.pipeline import ipu
from ipu_diffusion.pipeline.fallback import build_executor
from ipu_diffusion.pipeline.ipu_plan import fit_steps, ipu_plan
from ipu_diffusion.pipeline.partition import partition_unet
from ipu_diffusion.training import ipu_train

pytestmark = pytest.mark.keras2
keras2_only = pytest.mark.skipif(IS_KERAS3, reason="the SDK's Keras is 2.6: needs Keras 2 "
                                 "internals (run with TF_USE_LEGACY_KERAS=1, make test-keras2)")


def _partition(net, *overrides):
    cfg = small_config(*overrides)
    part = partition_unet(net.unet, cfg.pipeline, net.objective.front_spec,
                          net.objective.loss_spec)
    return cfg, part


# --------------------------------------------------------------------------- stages

LAYOUTS = [
    ("pipeline.device_mapping=[0,1,2,3]",),
    ("pipeline.device_mapping=[0,0,1,1]", "pipeline.recompute=true"),
    ("pipeline.stages=2", "pipeline.schedule=interleaved", "pipeline.microbatches=4",
     "training.batch_size=16"),
    ("pipeline.schedule=sequential", "ipu.available_memory_proportion=[0.5,0.5,0.4,0.3]",
     "training.precision=mixed_float16", "ipu.partials_type=half"),
]


@keras2_only
@pytest.mark.parametrize("overrides", LAYOUTS)
def test_flat_model_passes_the_sdk_stage_check(small_net, overrides):
    cfg, part = _partition(small_net, *overrides)
    plan = ipu_plan(cfg, part)
    model = ipu.build_pipelined_model(small_net.unet, small_net.objective, part, plan,
                                      sdk_options.SDK, wrap=sdk_stages.PipelinedModel)
    got = model.assignment  # validated by the SDK's algorithm in set_pipeline_stage_assignment
    assert not any(a.is_nested_model for a in got)
    stage = {a.layer.name: a.pipeline_stage for a in got}
    assert len(stage) == len(got)  # one invocation per layer
    want = {"front": 0, "loss": plan.num_stages - 1}
    want.update({name: s for s in range(plan.num_stages) for name in part.stage_blocks(s)})
    assert stage == want
    sdk_options.check_pipelining_options(model.pipelining, plan.num_stages)
    sdk_options.check_pipeline_depth(model.pipelining["gradient_accumulation_steps_per_replica"],
                                     model.pipelining["pipeline_schedule"], plan.num_stages)


def _nested_model(unet, objective, part):
    """The model train-ipu built before: stage models nested in a functional model,
    each called with a dict of the carry entries it reads."""
    from ipu_diffusion.models.carry import live_before

    live = live_before(unet.blocks, (unet.output_key,))
    inputs = {k: keras.Input(shape=(16, 16, 1) if k == "x0" else (), name=k,
                             dtype="float32" if k == "x0" else "int32") for k in part.batch_keys}
    front = ipu.CarryLayer(objective.front, objective.front_spec.inputs, name="front")
    loss = ipu.CarryLayer(objective.loss, objective.loss_spec.inputs, "loss", name="loss")
    carry = dict(inputs)
    carry.update(front(dict(inputs)))
    for (start, _), model in zip(part.ranges, unet.stage_models_for_ranges(part.ranges)):
        carry.update(model({k: carry[k] for k in live[start]}))
    out = loss({k: carry[k] for k in objective.loss_spec.inputs})
    return keras.Model(inputs=inputs, outputs=out)


@keras2_only
def test_nested_dict_input_stage_models_fail_the_sdk_stage_check(small_net):
    _, part = _partition(small_net)
    model = sdk_stages.PipelinedModel(_nested_model(small_net.unet, small_net.objective, part))
    top = model.get_pipeline_stage_assignment()
    assert [a.is_nested_model for a in top] == [False] + [True] * 4 + [False]
    top[0].pipeline_stage, top[-1].pipeline_stage = 0, 3
    for s, a in enumerate(top[1:-1]):
        for inner in a.pipeline_stage_assignments:
            inner.pipeline_stage = s
    with pytest.raises(ValueError, match="has a dependency from a pipeline stage which has not "
                                         "yet been executed"):
        model.set_pipeline_stage_assignment(top)


@keras2_only
def test_sdk_stage_check_rejects_what_the_sdk_rejects(small_net):
    _, part = _partition(small_net)
    keras_model, stage_of = ipu.compose_training_model(small_net.unet, small_net.objective, part)
    model = sdk_stages.PipelinedModel(keras_model)

    def assignment(**changes):
        a = ipu.assign_stages(model.get_pipeline_stage_assignment(), stage_of)
        for x in a:
            x.pipeline_stage = changes.get(x.layer.name, x.pipeline_stage)
        return a

    model.set_pipeline_stage_assignment(assignment())  # the real one passes
    with pytest.raises(ValueError, match="has not been assigned a pipeline stage"):
        model.set_pipeline_stage_assignment(assignment(front=None))
    with pytest.raises(ValueError, match="dependency from a pipeline stage"):
        model.set_pipeline_stage_assignment(assignment(loss=0))  # reads stage 3's output
    shifted = {n: stage_of_n + 1 for n, stage_of_n in
               ((a.layer.name, a.pipeline_stage) for a in assignment()) if stage_of_n >= 2}
    with pytest.raises(ValueError, match="missing \\[2\\]"):
        model.set_pipeline_stage_assignment(assignment(**shifted))
    with pytest.raises(ValueError, match="has no stage"):
        ipu.assign_stages(model.get_pipeline_stage_assignment(), {})


@keras2_only
def test_one_stage_accumulation_passes_offload_to_the_sdk(small_net):
    cfg, part = _partition(small_net, "pipeline.stages=1", "pipeline.microbatches=4",
                           "ipu.offload_optimizer_state=true")
    plan = ipu_plan(cfg, part)
    model = ipu.build_pipelined_model(small_net.unet, small_net.objective, part, plan,
                                      sdk_options.SDK, wrap=sdk_stages.PipelinedModel)
    opts = sdk_options.check_gradient_accumulation_options(model.accumulation)
    assert opts["offload_weight_update_variables"] is True
    assert opts["gradient_accumulation_steps_per_replica"] == 4
    assert model.assignment is None and model.pipelining is None


# --------------------------------------------------------------------------- XLA, dtypes


@keras2_only  # the IPU driver runs on the SDK's Keras 2.6
def test_ipu_train_function_compiles_with_xla_and_equals_the_fallback(small_net):
    """The fork compiles the train function whole with XLA (``extensions_base.py``:
    ``@tf_function(jit_compile=True)``); on CPU, the flat model's per-example loss and
    mean-loss gradients under XLA equal the plain-TF pipeline executor's."""
    cfg, part = _partition(small_net)
    model, _ = ipu.compose_training_model(small_net.unet, small_net.objective, part)
    variables = small_net.unet.trainable_variables

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            losses = model(x, training=True)
            mean = tf.reduce_mean(ipu_train.model_output_loss(None, losses))
        return losses, tape.gradient(mean, variables)

    b = batch(8)
    losses, grads = step(b)
    executor = build_executor(small_net.unet, small_net.objective, cfg.pipeline, partition=part)
    _, want, stats = executor.gradients(b)
    np.testing.assert_allclose(losses.numpy(), stats["loss"].numpy(), rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(), w.numpy(), rtol=1e-4,
                                   atol=1e-6)


# (id, config overrides, class dropout, precision) on top of ipu_testlib's small config:
# every objective the IPU path trains (loss_aware is refused there: ipu_plan.py)
DTYPE_VARIANTS = [
    ("eps_mse", ["model.num_classes=0", "data.use_labels=false"], 0.0, "float32"),
    ("v_min_snr", ["model.num_classes=0", "data.use_labels=false", "diffusion.mean_type=v",
                   "diffusion.min_snr_gamma=5.0"], 0.0, "float32"),
    ("learned_range_hybrid", ["model.num_classes=0", "data.use_labels=false",
                              "diffusion.var_type=learned_range", "model.learn_sigma=true",
                              "diffusion.loss_type=hybrid"], 0.0, "float32"),
    ("conditional_class_dropout", ["diffusion.schedule=linear"], 0.3, "float32"),
    ("conditional_mixed_float16", [], 0.3, "mixed_float16"),
]


@keras2_only
@pytest.mark.parametrize("overrides,class_dropout,precision", [v[1:] for v in DTYPE_VARIANTS],
                         ids=[v[0] for v in DTYPE_VARIANTS])
def test_ipu_training_step_uses_only_ipu_dtypes(overrides, class_dropout, precision):
    """The device side of one IPU training step as the fork traces it (``_ipu_train_step``:
    model with the forward diffusion's per-example rng draws and q_sample, dropout on,
    compiled loss, ``get_gradients`` through the optimizer wrapper, ``apply_gradients`` with
    the EMA slot update, in its function library the jit-compiled masks, gradient functions
    and cond branches) computes only in int32/int64/float32/float16/bool. A uint32 hash or
    a float64 schedule table runs on CPU but does not compile on an IPU; this is the only
    place the CPU suite can see it."""
    from ipu_diffusion.models.unet import build_unet
    from ipu_diffusion.training.objective import DiffusionObjective
    from ipu_diffusion.training.trainer import build_optimizer_state

    keras.mixed_precision.set_global_policy(precision)
    try:
        cfg = small_config(f"training.precision={precision}", *overrides)
        unet = build_unet(cfg.model, zero_init=False)
        num_classes = cfg.model.num_classes if cfg.data.use_labels else 0
        objective = DiffusionObjective(cfg.diffusion, num_classes, class_dropout=class_dropout)
        part = partition_unet(unet, cfg.pipeline, objective.front_spec, objective.loss_spec)
        plan = ipu_plan(cfg, part)
        model, _ = ipu.compose_training_model(unet, objective, part)
        opt = ipu_train.make_ipu_optimizer(cfg.training, plan)
        build_optimizer_state(type("T", (), {"optimizer": opt, "unet": unet})())
        variables = unet.trainable_variables

        @tf.function
        def step(x):
            loss = tf.reduce_mean(ipu_train.model_output_loss(None, model(x, training=True)))
            grads = opt.get_gradients(loss, variables)  # _KerasOptimizerWrapper.compute_gradients
            opt.apply_gradients(zip(grads, variables))
            return loss

        micro = {k: v for k, v in batch(8).items() if k in part.batch_keys}
        bad = non_ipu_dtypes(step.get_concrete_function(
            {k: tf.TensorSpec(v.shape, v.dtype) for k, v in micro.items()}))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert not bad, "dtypes the IPU does not compile:\n" + format_violations(bad)


def test_checker_sees_nested_functions_and_attrs():
    """The walker reaches a jit-compiled tf.function inside a cond branch and reports a
    uint32 bitcast, a float64 constant and a bfloat16 cast; int64 and bool pass."""

    @tf.function(jit_compile=True)
    def inner(x):
        return tf.bitcast(tf.bitcast(x, tf.uint32) ^ tf.constant(1, tf.uint32), tf.int32)

    @tf.function
    def outer(x, flag):
        y = tf.cond(flag, lambda: inner(x), lambda: x)
        z = tf.cast(tf.cast(y, tf.float32) * tf.cast(tf.constant(0.5, tf.float64), tf.float32),
                    tf.bfloat16)
        return tf.cast(z, tf.float32) + tf.cast(tf.cast(y, tf.int64), tf.float32)

    found = non_ipu_dtypes(outer.get_concrete_function(tf.TensorSpec([3], tf.int32),
                                                       tf.TensorSpec([], tf.bool)))
    dtypes = {d for _, _, d in found}
    assert dtypes == {"uint32", "float64", "bfloat16"}, found
    assert any("/" in where and op == "Bitcast" for where, op, _ in found), found  # in the library

    @tf.function
    def clean(x):
        return tf.cast(tf.cast(x, tf.int64) * 3, tf.float16) > 0

    assert non_ipu_dtypes(clean.get_concrete_function(tf.TensorSpec([3], tf.int32))) == []


# --------------------------------------------------------------------------- gradients


def _emulated_update(model, variables, opt, whole, m, r, popdist):
    """One weight update as the SDK makes it: per micro-batch the fork's step (compiled loss
    = micro-batch mean, x 1/R under PopDistStrategy: ``compile_utils.py``
    ``scale_loss_for_distribution``; gradients by ``opt.get_gradients``, which a static
    LossScaleOptimizer scales and unscales), MEAN over the M accumulation steps, SUM over
    the replicas (``ipu_strategy.py`` / ``popdist_strategy.py`` ``_reduce_to``:
    ``cross_replica_sum``), then ``apply_gradients``."""
    b = whole["x0"].shape[0] // (m * r)

    @tf.function
    def grads(micro):
        loss = tf.reduce_mean(ipu_train.model_output_loss(None, model(micro, training=True)))
        return opt.get_gradients(loss / r if popdist else loss, variables)

    total = None
    for rep in range(r):
        acc = [tf.add_n(gs) / m for gs in zip(*[
            grads({k: v[(rep * m + i) * b:(rep * m + i + 1) * b] for k, v in whole.items()})
            for i in range(m)])]
        total = acc if total is None else [t + a for t, a in zip(total, acc)]
    opt.apply_gradients(zip(total, variables))


@keras2_only
@pytest.mark.parametrize("popdist", [False, True])
def test_ipu_update_equals_the_global_batch_update(small_net, popdist):
    """M = 2 micro-batches on each of R = 2 replicas, static loss scale 128, clip active:
    the weights and the EMA slots after the SDK's update equal plain Adam on the clipped
    global-batch mean gradient and the trainer's EMA rule."""
    cfg, part = _partition(small_net, "pipeline.microbatches=8", "ipu.replicas=2",
                           "training.precision=mixed_float16", "training.grad_clip=0.05")
    plan = ipu_plan(cfg, part)
    assert plan.loss_scale == 128.0 and plan.half_precision
    model, _ = ipu.compose_training_model(small_net.unet, small_net.objective, part)
    variables = small_net.unet.trainable_variables
    start = [v.numpy() for v in variables]
    opt = ipu_train.make_ipu_optimizer(cfg.training, plan, 2 if popdist else 1)
    assert sdk_options.compile_optimizer(opt, "mixed_float16") is opt  # compile keeps it
    assert isinstance(opt, keras.mixed_precision.LossScaleOptimizer) and not opt.dynamic
    assert float(opt.loss_scale) == 128.0
    whole = batch(8)
    _emulated_update(model, variables, opt, whole, m=2, r=2, popdist=popdist)
    got = [v.numpy() for v in variables]
    ema = [ipu_train.inner_optimizer(opt).get_slot(v, "ema").numpy() for v in variables]
    for v, s in zip(variables, start):
        v.assign(s)
    with tf.GradientTape() as tape:
        mean = tf.reduce_mean(model(whole, training=True))
    want_g, norm = tf.clip_by_global_norm(tape.gradient(mean, variables), 0.05)
    assert float(norm) > 0.05
    ref = keras.optimizers.legacy.Adam(learning_rate=ipu_train.lr_schedule(cfg.training),
                                       beta_1=cfg.training.adam_beta1,
                                       beta_2=cfg.training.adam_beta2,
                                       epsilon=cfg.training.adam_eps)
    ref.apply_gradients(zip(want_g, variables))
    decay = min(cfg.training.ema_decay, 2.0 / 11.0)  # trainer.EMA after one update
    for g, v, s, e in zip(got, variables, start, ema):
        np.testing.assert_allclose(g, v.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(e, decay * s + (1 - decay) * v.numpy(), rtol=1e-5, atol=1e-7)
    for v, s in zip(variables, start):
        v.assign(s)


def test_replica_divisor_follows_the_strategy():
    plan = ipu_plan(small_config("ipu.replicas=4", "pipeline.microbatches=8",
                                 "training.batch_size=128"))
    assert ipu_train.replica_divisor(plan, 1) == 4.0  # IPUStrategy: summed, not averaged
    assert ipu_train.replica_divisor(plan, 4) == 1.0  # PopDistStrategy: Keras took 1/R


def test_compile_wraps_a_bare_optimizer_in_a_dynamic_loss_scale():
    """The stand-in itself: the fork wraps what is not a LossScaleOptimizer, dynamically."""
    legacy = getattr(keras.optimizers, "legacy", None)
    if IS_KERAS3 or legacy is None:
        pytest.skip("Keras 2 LossScaleOptimizer")
    wrapped = sdk_options.compile_optimizer(legacy.Adam(), "mixed_float16")
    assert isinstance(wrapped, keras.mixed_precision.LossScaleOptimizer) and wrapped.dynamic


# --------------------------------------------------------------------------- steps, depth


@pytest.mark.parametrize("replicas,instances", [(1, 1), (2, 1), (4, 1), (4, 2), (8, 4)])
@pytest.mark.parametrize("spe", [0, 16])
def test_fit_steps_give_the_sdk_the_updates_asked_for(replicas, instances, spe):
    plan = ipu_plan(small_config(f"ipu.replicas={replicas}", f"ipu.steps_per_execution={spe}",
                                 f"training.batch_size={32 * replicas}",
                                 "training.log_every=10", "training.steps=100"))
    local = replicas // instances
    for updates in (plan.updates_per_execution, 10 * plan.updates_per_execution):
        n = fit_steps(plan, updates, local)
        per_replica = sdk_options.fit_steps_per_replica(n, local, plan.steps_per_execution,
                                                        plan.microbatches)
        assert per_replica // plan.microbatches == updates  # weight updates in this fit
        # micro-batches read by all instances = the global batches of those updates
        assert per_replica * local * instances * plan.micro_batch == updates * plan.global_batch
    if local > 1:  # what train-ipu passed before, updates x M: 1/local of the updates ran
        updates = 10 * plan.updates_per_execution * local
        old = sdk_options.fit_steps_per_replica(updates * plan.microbatches, local,
                                                plan.steps_per_execution, plan.microbatches)
        assert old // plan.microbatches == updates // local
    with pytest.raises(ValueError, match="not a positive multiple of steps_per_execution"):
        fit_steps(plan, plan.updates_per_execution + 1 if plan.updates_per_execution > 1 else 0,
                  local)


SCHEDULES = {"grouped": sdk_options.PipelineSchedule.Grouped,
             "interleaved": sdk_options.PipelineSchedule.Interleaved,
             "sequential": sdk_options.PipelineSchedule.Sequential}


@pytest.mark.parametrize("stages,schedule", list(itertools.product(
    [2, 3, 4, 8], ["grouped", "interleaved", "sequential"])))
def test_plan_depth_rule_is_the_compilers(stages, schedule):
    for m in range(1, 21):
        cfg = small_config(f"pipeline.stages={stages}", f"pipeline.schedule={schedule}",
                           f"pipeline.microbatches={m}", f"training.batch_size={m * 2}",
                           f"ipu.steps_per_execution={m}")  # one update per execution
        try:
            sdk_options.check_pipeline_depth(m, SCHEDULES[schedule], stages)
            sdk_ok = True
        except ValueError:
            sdk_ok = False
        try:
            ipu_plan(cfg)
            ours = None
        except ConfigError as e:
            ours = str(e)
        if sdk_ok:
            assert ours is None, ours
        else:  # M = 1 interleaved has its own message, which names the key too
            assert ours is not None and "pipeline.microbatches" in ours, (m, ours)


# --------------------------------------------------------------------------- IPUConfig


def test_apply_ipu_config_sets_only_what_ipuconfig_has():
    plan = ipu_plan(small_config("pipeline.recompute=true", "ipu.replicas=2",
                                 "pipeline.device_mapping=[0,0,1,1]"))
    cfg = ipu.apply_ipu_config(plan, sdk_options.ipu_config(), sdk_options.SDK)
    assert (cfg.allow_recompute, cfg.auto_select_ipus) == (True, [4])  # 2 IPUs x 2 replicas
    assert cfg.device_connection.type is sdk_options.DeviceConnectionType.ON_DEMAND
    assert cfg.floating_point_behaviour.esr is sdk_options.StochasticRoundingBehaviour.OFF
    assert cfg.matmuls.poplar_options == cfg.convolutions.poplar_options == {"partialsType": "float"}
    plan = ipu_plan(small_config("pipeline.stages=1", "ipu.ipu_model=true", "ipu.tiles_per_ipu=8",
                                 "ipu.available_memory_proportion=[0.3]",
                                 "training.precision=mixed_float16", "ipu.offload_optimizer_state=true"))
    cfg = ipu.apply_ipu_config(plan, sdk_options.ipu_config(), sdk_options.SDK, distributed=True)
    assert (cfg.ipu_model.tiles_per_ipu, cfg.ipu_model.version, cfg.auto_select_ipus) == (8, "ipu2", [])
    assert cfg.floating_point_behaviour.esr is sdk_options.StochasticRoundingBehaviour.ON
    assert cfg.device_connection.enable_remote_buffers is True
    assert cfg.matmuls.poplar_options == {"partialsType": "float", "availableMemoryProportion": "0.3"}
    strict = sdk_options.ipu_config()  # the stand-in refuses what IPUConfig refuses
    with pytest.raises(TypeError, match="StochasticRoundingBehaviour"):
        strict.floating_point_behaviour.esr = True
    with pytest.raises(ValueError, match="not a valid attribute"):
        strict.ipu_model.tile_count = 8


def test_emulator_takes_only_ipumodel_versions():
    with pytest.raises(ConfigError, match="ipu.ipu_version: 'ipu21' is not an IPUModel version"):
        ipu_plan(small_config("ipu.ipu_model=true", "ipu.ipu_version=ipu21"))
    assert ipu_plan(small_config("ipu.ipu_version=ipu21")).ipu_version == "ipu21"  # hardware


def test_stop_guard_stops_on_a_non_finite_loss_and_on_sigterm():
    guard = ipu_train.IPUStopGuard(3)
    model = type("M", (), {"stop_training": False,
                           "optimizer": type("O", (), {"iterations": tf.Variable(7)})()})()
    guard.set_model(model)
    model.abort_reason = None
    guard.on_train_batch_end(0, {"loss": 0.5})
    assert not model.stop_training and not guard.stopped
    guard.on_train_batch_end(0, {"loss": float("nan")})
    assert model.stop_training and "not finite (nan) at step 7" in model.abort_reason
    model.stop_training, model.abort_reason = False, None
    guard.signal_received = 15
    guard.on_train_batch_end(0, {"loss": 0.5})
    assert model.stop_training and guard.stopped and model.abort_reason is None
