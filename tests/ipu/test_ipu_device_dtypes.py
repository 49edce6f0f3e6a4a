"""The device side of a training step uses only dtypes the Poplar backend compiles.

What the IPU compiles of a step, traced on CPU: the forward diffusion
(``objective.front``: per-example rng draws, q_sample), the U-Net with dropout on, the
loss, the gradient, clipping and the Keras Adam update of float32 variables. Every op of
that graph and of its function library (jit-compiled dropout masks, gradient functions,
cond branches) must compute in int32/int64/float32/float16/bool (sdk_dtypes.py cites the
SDK). A uint32 hash or a float64 schedule table runs fine on CPU but does not compile on
an IPU, so this is the only place the CPU suite can see it.
"""
from __future__ import annotations

import pytest
import tensorflow as tf
from ipu_testlib import small_config
from sdk_dtypes import IPU_DTYPES, format_violations, non_ipu_dtypes

from ipu_diffusion._keras import IS_KERAS3

pytestmark = pytest.mark.keras2  # the SDK runs Keras 2.6

B = 4
# (id, config overrides, class dropout) on top of ipu_testlib's small digits config
# (ch 8, dropout 0.2, 10 classes with labels)
VARIANTS = [
    ("eps_mse", ["model.num_classes=0", "data.use_labels=false"], 0.0),
    ("v_prediction", ["model.num_classes=0", "data.use_labels=false",
                      "diffusion.mean_type=v", "diffusion.min_snr_gamma=5.0"], 0.0),
    ("learned_range_hybrid", ["model.num_classes=0", "data.use_labels=false",
                              "diffusion.var_type=learned_range", "model.learn_sigma=true",
                              "diffusion.loss_type=hybrid"], 0.0),
    ("conditional_class_dropout", ["diffusion.schedule=linear",
                                   "diffusion.timestep_sampler=loss_aware"], 0.3),
]


def device_step(overrides, class_dropout: float):
    """The traced step (a ConcreteFunction) ``(x0, key, y) -> loss`` of one variant."""
    from ipu_diffusion.models.unet import build_unet
    from ipu_diffusion.training.objective import DiffusionObjective
    from ipu_diffusion.training.trainer import make_optimizer

    cfg = small_config(*overrides)
    assert cfg.training.precision == "float32"
    num_classes = cfg.model.num_classes if cfg.data.use_labels else 0
    unet = build_unet(cfg.model, zero_init=False)
    objective = DiffusionObjective(cfg.diffusion, num_classes, class_dropout=class_dropout)
    optimizer = make_optimizer(cfg.training)  # the CPU trainer's Adam (+ warmup/decay)
    variables = unet.trainable_variables
    # slots made eagerly, as before an IPU run (not inside the trace)
    if hasattr(optimizer, "build"):  # Keras 3, tf_keras >= 2.11
        optimizer.build(variables)
    else:  # OptimizerV2 (the SDK's Keras 2.6)
        optimizer._create_all_weights(variables)  # noqa: SLF001
    assert variables and all(tf.as_dtype(v.dtype) == tf.float32 for v in variables)
    assert all(tf.as_dtype(v.dtype) in IPU_DTYPES for v in optimizer.variables)

    @tf.function
    def step(x0, key, y):
        carry = {"x0": x0, "key": key}
        if num_classes:
            carry["y"] = y
        with tf.GradientTape() as tape:
            carry.update(objective.front(carry))
            carry["out"] = unet.keras_model({k: carry[k] for k in unet.input_keys},
                                            training=True)
            out = objective.loss(carry)
            loss = tf.reduce_sum(out["loss"]) / B
        grads = tape.gradient(loss, variables)
        if objective.sampler.learns:
            objective.sampler.update(carry["t"], out["sampler_loss"])
        grads, _ = tf.clip_by_global_norm(grads, cfg.training.grad_clip)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    size, ch = cfg.model.image_size, cfg.model.in_channels
    return step, step.get_concrete_function(
        tf.TensorSpec([B, size, size, ch], tf.float32), tf.TensorSpec([B], tf.int32),
        tf.TensorSpec([B], tf.int32))


@pytest.mark.skipif(IS_KERAS3, reason="the SDK traces with Keras 2.6: checked in the Keras 2 "
                    "run (make test-keras2), once")
@pytest.mark.parametrize("overrides,class_dropout", [v[1:] for v in VARIANTS],
                         ids=[v[0] for v in VARIANTS])
def test_training_step_uses_only_ipu_dtypes(overrides, class_dropout):
    step, concrete = device_step(overrides, class_dropout)
    found = non_ipu_dtypes(concrete)
    assert not found, "dtypes the IPU does not compile:\n" + format_violations(found)
    # the traced step is a real one: it runs, with finite loss
    x0 = tf.random.stateless_uniform([B, 16, 16, 1], (1, 2), -1.0, 1.0)
    loss = step(x0, tf.constant([3, -7, 2**31 - 1, -2**31], tf.int32), tf.constant([0, 1, 2, 9]))
    assert bool(tf.math.is_finite(loss))


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
