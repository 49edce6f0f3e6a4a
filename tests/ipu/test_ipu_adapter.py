"""The SDK-free parts of the IPU path on CPU: the flat training model, the micro-batch
stream, the EMA optimizer and the option builders (the SDK's own rules are checked in
test_ipu_contract.py)."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import sdk_options
import tensorflow as tf
from ipu_testlib import batch, small_config

from ipu_diffusion import rng
from ipu_diffusion.data.dataset import batches_from_arrays
from ipu_diffusion.pipeline import ipu
from ipu_diffusion.pipeline.ipu_plan import ipu_plan
from ipu_diffusion.pipeline.partition import partition_unet
from ipu_diffusion.training import ipu_train
from ipu_diffusion.training.trainer import EMA

pytestmark = pytest.mark.keras2  # the SDK runs Keras 2.6


def trainer_losses(unet, objective, carry):
    """DiffusionTrainer.per_example_losses: front -> whole U-Net -> loss on one device."""
    carry = dict(carry)
    carry.update(objective.front(carry))
    carry["out"] = unet.keras_model({k: carry[k] for k in unet.input_keys}, training=True)
    return objective.loss(carry)["loss"]


# --------------------------------------------------------------------------- the model


def test_ipu_flat_model_is_front_blocks_loss(small_net):
    unet, objective = small_net.unet, small_net.objective
    part = partition_unet(unet, small_config().pipeline, objective.front_spec, objective.loss_spec)
    model, stage_of = ipu.compose_training_model(unet, objective, part)
    stages = {x.name: stage_of[id(x)] for x in model.layers if x.name not in part.batch_keys}
    want = {"front": 0, "loss": 3}
    want.update({name: s for s in range(4) for name in part.stage_blocks(s)})
    assert stages == want and len(want) == len(unet.block_names) + 2
    assert part.batch_keys == ("key", "x0", "y")
    b = batch(6)
    got = model(b, training=True)
    want = trainer_losses(unet, objective, b)
    assert got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- data


def test_ipu_micro_batch_stream_splits_global_batches():
    images = np.random.RandomState(0).uniform(-1, 1, (40, 4, 4, 1)).astype(np.float32)
    labels = np.arange(40, dtype=np.int32) % 10
    stream = batches_from_arrays(images, labels, batch_size=8, seed=3, start_step=5)
    micro = ipu_train.micro_batch_stream(stream, seed=3, micro_batch=2, use_labels=True)
    first = next(iter(stream))
    parts = list(micro.take(4))
    assert all(f["x0"].shape == (2, 4, 4, 1) and t.shape == (2,) for f, t in parts)
    np.testing.assert_array_equal(np.concatenate([f["x0"] for f, _ in parts]), first["image"])
    np.testing.assert_array_equal(np.concatenate([f["y"] for f, _ in parts]), first["label"])
    keys = rng.example_keys(3, 0, first["index"])  # the CPU trainer's keys
    np.testing.assert_array_equal(np.concatenate([f["key"] for f, _ in parts]), keys)
    # two poprun instances: every other micro-batch each, together the whole batch
    halves = [list(ipu_train.micro_batch_stream(stream, 3, 2, False, 2, i).take(2)) for i in (0, 1)]
    got = [halves[0][0], halves[1][0], halves[0][1], halves[1][1]]
    np.testing.assert_array_equal(np.concatenate([f["x0"] for f, _ in got]), first["image"])
    assert "y" not in halves[0][0][0]


class _Model:
    def fit(self, dataset, **kwargs):
        return kwargs


def test_ipu_trainer_fit_counts_micro_batch_steps_of_all_local_replicas():
    plan = ipu_plan(small_config("ipu.replicas=2", "training.batch_size=128"))  # M = 8, k = 8
    trainer = ipu_train.PipelinedTrainer(_Model(), None, None, plan, local_replicas=2)
    got = trainer.fit("ds", steps_per_epoch=100, initial_epoch=2, epochs=3)
    assert got == {"steps_per_epoch": 1600, "initial_epoch": 2, "epochs": 3}


# --------------------------------------------------------------------------- optimizer


def test_ipu_ema_optimizer_matches_adam_and_trainer_ema():
    legacy = pytest.importorskip("tf_keras").optimizers.legacy
    v, w = tf.Variable([1.0, -2.0, 3.0]), tf.Variable([[0.5]])
    v_ref, w_ref = tf.Variable(v), tf.Variable(w)
    opt = ipu_train.ema_optimizer_class(legacy.Adam)(
        ema_decay=0.9, learning_rate=0.1, gradient_transformers=ipu_train.gradient_transformers(2.0, 1.0))
    ref = legacy.Adam(learning_rate=0.1)
    opt._create_all_weights([v, w])  # what build_optimizer_state does under Keras 2
    shadow = [v.numpy(), w.numpy()]
    slots = [opt.get_slot(x, "ema") for x in (v, w)]
    step = tf.function(lambda g1, g2: opt.apply_gradients([(g1, v), (g2, w)]) and None)
    for n in range(1, 4):
        g = [tf.constant([4.0, 0.0, -2.0]), tf.constant([[6.0]])]
        step(*g)
        scaled, _ = tf.clip_by_global_norm([x * 0.5 for x in g], 1.0)
        ref.apply_gradients(zip(scaled, [v_ref, w_ref]))
        decay = min(0.9, (1 + n) / (10 + n))  # trainer.EMA, n updates done
        shadow = [decay * s + (1 - decay) * x.numpy() for s, x in zip(shadow, (v_ref, w_ref))]
        np.testing.assert_allclose(v.numpy(), v_ref.numpy(), rtol=1e-6)
        for s, x in zip(shadow, slots):
            np.testing.assert_allclose(x.numpy(), s, rtol=1e-6)
    ema = EMA([v, w], 0.9)  # the trainer's module, a host copy
    ipu_train.EMASyncCallback(slots, ema, every=1).sync()
    for s, x in zip(shadow, ema.shadow):
        np.testing.assert_allclose(x.numpy(), s, rtol=1e-6)
    # a slot may not be a dependency of another object: the copy checkpoints beside it
    saved = tf.train.Checkpoint(v=v, w=w, optimizer=opt, ema=ema).save(
        os.path.join(tempfile.mkdtemp(), "ck"))
    names = [n for n, _ in tf.train.list_variables(saved)]
    assert "ema/shadow/0/.ATTRIBUTES/VARIABLE_VALUE" in names  # the CPU trainer's layout
    assert any(n.startswith("v/.OPTIMIZER_SLOT/optimizer/ema") for n in names)


# --------------------------------------------------------------------------- options


def test_ipu_pipelining_options():
    plan = ipu_plan(small_config("pipeline.device_mapping=[0,0,1,1]"))
    sdk = sdk_options.SDK
    assert ipu.pipelining_options(plan, sdk) == {
        "gradient_accumulation_steps_per_replica": 8, "device_mapping": [0, 0, 1, 1],
        "gradient_accumulation_reduction_method": sdk.reduction_mean,
        "pipeline_schedule": sdk.PipelineSchedule.Grouped, "offload_weight_update_variables": None}
    plan = ipu_plan(small_config("pipeline.recompute=true", "pipeline.schedule=sequential",
                                 "ipu.available_memory_proportion=[0.5,0.5,0.4,0.3]",
                                 "training.precision=mixed_float16", "ipu.partials_type=half",
                                 "ipu.offload_optimizer_state=true"))
    opts = sdk_options.check_pipelining_options(ipu.pipelining_options(plan, sdk), 4)
    assert opts["pipeline_schedule"] is sdk.PipelineSchedule.Sequential
    assert opts["recomputation_mode"] is sdk.RecomputationMode.Auto
    assert opts["offload_weight_update_variables"] is True
    per_stage = opts["forward_propagation_stages_poplar_options"]
    assert per_stage == opts["backward_propagation_stages_poplar_options"]
    assert [o.convolution_options["availableMemoryProportion"] for o in per_stage] == [
        "0.5", "0.5", "0.4", "0.3"]
    assert all(o.convolution_options == o.matmul_options and
               o.matmul_options["partialsType"] == "half" for o in per_stage)
    assert ipu.emulator_flags("--foo --ipu_model_tiles=4", ipu_plan(small_config(
        "ipu.ipu_model=true", "ipu.tiles_per_ipu=8"))) == "--foo --use_ipu_model --ipu_model_tiles=8"


def test_ipu_group_norm_factory_is_conventional():
    made = []
    make = ipu.ipu_group_norm_factory(lambda **kw: made.append(kw) or "layer")
    assert make(groups=8, name="norm1", epsilon=1e-6) == "layer"
    assert made == [{"groups": 8, "epsilon": 1e-6, "strided_channel_grouping": False,
                     "gamma_initializer": "ones", "beta_initializer": "zeros", "name": "norm1"}]


def test_ipu_sdk_missing_message():
    if ipu.sdk_available():
        pytest.skip("the Poplar SDK is installed here")
    with pytest.raises(ipu.SDKMissing) as info:
        ipu.require_sdk("pipeline_configs/digits.yaml")
    msg = str(info.value)
    assert "Poplar SDK" in msg and "ipu_tensorflow_addons" in msg and "\n" not in msg
    assert "make train CONFIG=pipeline_configs/digits.yaml" in msg
    assert "python -m ipu_diffusion train --config pipeline_configs/digits.yaml" in msg
    with pytest.raises(ipu.SDKMissing):
        ipu_train.train(small_config(), "/nonexistent/workdir")
