"""The SDK-free parts of ipu.py, on CPU: the composed training model, the gradient
arithmetic of the IPU's accumulation and replication, the micro-batch stream, the EMA
optimizer, and the option builders against stand-ins for the SDK's objects."""
from __future__ import annotations

import os
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from ipu_testlib import small_config

from ipu_diffusion import rng
from ipu_diffusion._keras import keras
from ipu_diffusion.data.dataset import batches_from_arrays
from ipu_diffusion.pipeline import ipu
from ipu_diffusion.pipeline.ipu_plan import ipu_plan
from ipu_diffusion.pipeline.partition import partition_unet
from ipu_diffusion.training.trainer import EMA

pytestmark = pytest.mark.keras2  # the SDK runs Keras 2.6


@pytest.fixture(scope="module")
def parts(small_net):
    """The small class-conditional digits U-Net cut into 4 stages, composed."""
    unet, objective = small_net.unet, small_net.objective
    part = partition_unet(unet, small_config().pipeline, objective.front_spec, objective.loss_spec)
    model, stages, front, loss = ipu.compose_training_model(unet, objective, part)
    return unet, objective, part, model, stages


def batch(n: int, offset: int = 0):
    index = tf.range(offset, offset + n, dtype=tf.int64)
    return {"x0": tf.random.stateless_uniform([n, 16, 16, 1], (7, offset), -1.0, 1.0),
            "key": rng.example_keys(0, 0, index), "y": tf.cast(index % 10, tf.int32)}


def trainer_losses(unet, objective, carry):
    """DiffusionTrainer.per_example_losses: front -> whole U-Net -> loss on one device."""
    carry = dict(carry)
    carry.update(objective.front(carry))
    carry["out"] = unet.keras_model({k: carry[k] for k in unet.input_keys}, training=True)
    return objective.loss(carry)["loss"]


# --------------------------------------------------------------------------- the model


def test_ipu_composed_model_is_front_stages_loss(parts):
    unet, objective, part, model, stages = parts
    names = [layer.name for layer in model.layers if layer.name not in part.batch_keys]
    assert names == ["front", "stage_0", "stage_1", "stage_2", "stage_3", "loss"]
    assert len(stages) == 4 and part.batch_keys == ("key", "x0", "y")
    b = batch(6)
    got = model(b, training=True)
    want = trainer_losses(unet, objective, b)
    assert got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)


def test_ipu_gradient_arithmetic_equals_global_batch_mean(parts):
    """Emulate the SDK: per micro-batch, Keras' mean of the (gradient-scaled) loss; MEAN
    over the M accumulation steps of each replica; SUM over replicas (all-reduce); then
    the optimizer's transformers (x 1/(scale R), clip). Equals the gradient of the
    global-batch mean sum(loss) / B, clipped, which the CPU trainer applies (the composed
    model's per-example losses are the trainer's: test above)."""
    unet, objective, part, model, _ = parts
    m, r, b, scale, clip = 2, 2, 1, 128.0, 0.05
    loss_fn, variables = ipu.model_output_loss(scale), unet.trainable_variables

    def grads(micro, weight):
        with tf.GradientTape() as tape:
            value = weight * tf.reduce_mean(loss_fn(None, model(micro, training=True)))
        return [tf.convert_to_tensor(g) for g in tape.gradient(value, variables)]

    whole = batch(m * r * b)
    per_replica = []
    for rep in range(r):
        micro = [{k: v[(rep * m + i) * b:(rep * m + i + 1) * b] for k, v in whole.items()}
                 for i in range(m)]
        per_replica.append([tf.add_n(gs) / m for gs in zip(*[grads(x, 1.0) for x in micro])])
    pairs = list(zip([tf.add_n(gs) for gs in zip(*per_replica)], variables))
    for fn in ipu.gradient_transformers(1.0 / (scale * r), clip):
        pairs = fn(pairs)
    # sum(loss) / B = mean over the whole batch; the weight undoes the loss scale
    want, norm = tf.clip_by_global_norm(grads(whole, 1.0 / scale), clip)
    assert float(norm) > clip  # the clip is active
    for (g, _), w in zip(pairs, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=2e-4, atol=1e-7)


def test_ipu_loss_scale_scales_gradient_not_value():
    y = tf.constant([0.5, 2.0])
    with tf.GradientTape() as tape:
        tape.watch(y)
        value = ipu.model_output_loss(128.0)(None, y)
    np.testing.assert_array_equal(value.numpy(), y.numpy())
    np.testing.assert_array_equal(tape.gradient(value, y).numpy(), [128.0, 128.0])


# --------------------------------------------------------------------------- data


def test_ipu_micro_batch_stream_splits_global_batches():
    images = np.random.RandomState(0).uniform(-1, 1, (40, 4, 4, 1)).astype(np.float32)
    labels = np.arange(40, dtype=np.int32) % 10
    stream = batches_from_arrays(images, labels, batch_size=8, seed=3, start_step=5)
    micro = ipu.micro_batch_stream(stream, seed=3, micro_batch=2, use_labels=True)
    first = next(iter(stream))
    parts = list(micro.take(4))
    assert all(f["x0"].shape == (2, 4, 4, 1) and t.shape == (2,) for f, t in parts)
    np.testing.assert_array_equal(np.concatenate([f["x0"] for f, _ in parts]), first["image"])
    np.testing.assert_array_equal(np.concatenate([f["y"] for f, _ in parts]), first["label"])
    keys = rng.example_keys(3, 0, first["index"])  # the CPU trainer's keys
    np.testing.assert_array_equal(np.concatenate([f["key"] for f, _ in parts]), keys)
    # two poprun instances: every other micro-batch each, together the whole batch
    halves = [list(ipu.micro_batch_stream(stream, 3, 2, False, 2, i).take(2)) for i in (0, 1)]
    got = [halves[0][0], halves[1][0], halves[0][1], halves[1][1]]
    np.testing.assert_array_equal(np.concatenate([f["x0"] for f, _ in got]), first["image"])
    assert "y" not in halves[0][0][0]


class _Model:
    def fit(self, dataset, **kwargs):
        return kwargs


def test_ipu_trainer_fit_counts_micro_batch_steps():
    trainer = ipu.PipelinedTrainer(_Model(), None, None, microbatches=8)
    got = trainer.fit("ds", steps_per_epoch=100, initial_epoch=2, epochs=3)
    assert got == {"steps_per_epoch": 800, "initial_epoch": 2, "epochs": 3}


# --------------------------------------------------------------------------- optimizer


def test_ipu_ema_optimizer_matches_adam_and_trainer_ema():
    legacy = pytest.importorskip("tf_keras").optimizers.legacy
    v, w = tf.Variable([1.0, -2.0, 3.0]), tf.Variable([[0.5]])
    v_ref, w_ref = tf.Variable(v), tf.Variable(w)
    opt = ipu.ema_optimizer_class(legacy.Adam)(ema_decay=0.9, learning_rate=0.1,
                                               gradient_transformers=ipu.gradient_transformers(0.5, 1.0))
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
    ipu.EMASyncCallback(slots, ema, every=1).sync()
    for s, x in zip(shadow, ema.shadow):
        np.testing.assert_allclose(x.numpy(), s, rtol=1e-6)
    # a slot may not be a dependency of another object: the copy checkpoints beside it
    saved = tf.train.Checkpoint(v=v, w=w, optimizer=opt, ema=ema).save(
        os.path.join(tempfile.mkdtemp(), "ck"))
    names = [n for n, _ in tf.train.list_variables(saved)]
    assert "ema/shadow/0/.ATTRIBUTES/VARIABLE_VALUE" in names  # the CPU trainer's layout
    assert any(n.startswith("v/.OPTIMIZER_SLOT/optimizer/ema") for n in names)


# --------------------------------------------------------------------------- SDK stand-ins


class _Assignment:
    def __init__(self, layer, nested=None):
        self.layer = self.nested_model = layer
        self.is_nested_model = nested is not None
        self.pipeline_stage_assignments = nested or []
        self.pipeline_stage = None


def test_ipu_assign_stages_fills_nested_models():
    front, loss = SimpleNamespace(name="front"), SimpleNamespace(name="loss")
    models = [SimpleNamespace(name=f"stage_{s}") for s in range(3)]
    inner = [[_Assignment(SimpleNamespace(name=f"b{s}{i}")) for i in range(2)] for s in range(3)]
    top = ([_Assignment(front)] + [_Assignment(m, inner[s]) for s, m in enumerate(models)]
           + [_Assignment(loss)])
    stage_of = {id(m): s for s, m in enumerate(models)}
    stage_of.update({id(front): 0, id(loss): 2})
    ipu.assign_stages(top, stage_of)
    assert top[0].pipeline_stage == 0 and top[-1].pipeline_stage == 2
    assert [[a.pipeline_stage for a in group] for group in inner] == [[0, 0], [1, 1], [2, 2]]
    with pytest.raises(ValueError, match="'stray' of the pipelined model has no stage"):
        ipu.assign_stages([_Assignment(SimpleNamespace(name="stray"))], stage_of)


def test_ipu_build_pipelined_model_assigns_front_stages_loss(parts, monkeypatch):
    """build_pipelined_model on the real composed model, with the SDK's two model methods
    stood in: front on stage 0, stage model s's layers on s, loss on the last stage."""
    unet, objective, part, model, stages = parts
    front, loss = model.get_layer("front"), model.get_layer("loss")
    def computed(layers):
        return [x for x in layers if not isinstance(x, keras.layers.InputLayer)]

    inner = {id(m): [_Assignment(x) for x in computed(m.layers)] for m in stages}
    top = [_Assignment(x, inner.get(id(x))) for x in computed(model.layers)]
    got = {}
    proxy = SimpleNamespace(layers=model.layers, get_pipeline_stage_assignment=lambda: top,
                            set_pipeline_stage_assignment=lambda a: got.update(assignment=a),
                            set_pipelining_options=lambda **kw: got.update(options=kw))
    monkeypatch.setattr(ipu, "compose_training_model",
                        lambda *args: (proxy, stages, front, loss))
    plan = ipu_plan(small_config("pipeline.device_mapping=[0,0,1,1]"))
    assert ipu.build_pipelined_model(unet, objective, part, plan, FAKE_SDK) is proxy
    assert got["assignment"] is top
    assert (top[0].layer.name, top[0].pipeline_stage) == ("front", 0)
    assert (top[-1].layer.name, top[-1].pipeline_stage) == ("loss", 3)
    assert [{a.pipeline_stage for a in inner[id(m)]} for m in stages] == [{0}, {1}, {2}, {3}]
    assert got["options"]["device_mapping"] == [0, 0, 1, 1]


FAKE_SDK = SimpleNamespace(
    PipelineSchedule=SimpleNamespace(Grouped="G", Interleaved="I", Sequential="S"),
    RecomputationMode=SimpleNamespace(Auto="auto", RecomputeThenBackpropagate="rtb",
                                      RecomputeAndBackpropagateInterleaved="rabi"),
    PipelineStageOptions=lambda convolution_options, matmul_options: (convolution_options,
                                                                      matmul_options),
    reduction_mean="MEAN", stochastic_rounding_on="SR_ON", device_on_demand="ON_DEMAND")


def test_ipu_pipelining_options():
    plan = ipu_plan(small_config("pipeline.device_mapping=[0,0,1,1]"))
    assert ipu.pipelining_options(plan, FAKE_SDK) == {
        "gradient_accumulation_steps_per_replica": 8, "device_mapping": [0, 0, 1, 1],
        "gradient_accumulation_reduction_method": "MEAN", "pipeline_schedule": "G",
        "offload_weight_update_variables": None}
    plan = ipu_plan(small_config("pipeline.recompute=true", "pipeline.schedule=sequential",
                          "ipu.available_memory_proportion=[0.5,0.5,0.4,0.3]",
                          "training.precision=mixed_float16", "ipu.partials_type=half",
                          "ipu.offload_optimizer_state=true"))
    opts = ipu.pipelining_options(plan, FAKE_SDK)
    assert (opts["pipeline_schedule"], opts["recomputation_mode"]) == ("S", "auto")
    assert opts["offload_weight_update_variables"] is True
    per_stage = opts["forward_propagation_stages_poplar_options"]
    assert per_stage == opts["backward_propagation_stages_poplar_options"]
    assert [conv["availableMemoryProportion"] for conv, _ in per_stage] == ["0.5", "0.5", "0.4", "0.3"]
    assert all(conv == mm and conv["partialsType"] == "half" for conv, mm in per_stage)


def _fake_ipu_config():
    ns = SimpleNamespace
    return ns(allow_recompute=False, auto_select_ipus=[], matmuls=ns(poplar_options={}),
              convolutions=ns(poplar_options={}), floating_point_behaviour=ns(esr=None),
              ipu_model=ns(compile_ipu_code=True, tiles_per_ipu=0, version="ipu2"),
              device_connection=ns(type="ALWAYS", enable_remote_buffers=False))


def test_ipu_apply_ipu_config_hardware_and_emulator():
    plan = ipu_plan(small_config("pipeline.recompute=true", "ipu.replicas=2",
                          "pipeline.device_mapping=[0,0,1,1]"))
    cfg = ipu.apply_ipu_config(plan, _fake_ipu_config(), FAKE_SDK)
    assert (cfg.allow_recompute, cfg.auto_select_ipus) == (True, 4)  # 2 IPUs x 2 replicas
    assert cfg.device_connection.type == "ON_DEMAND" and cfg.floating_point_behaviour.esr is None
    assert cfg.matmuls.poplar_options == cfg.convolutions.poplar_options == {"partialsType": "float"}
    plan = ipu_plan(small_config("pipeline.stages=1", "ipu.ipu_model=true", "ipu.tiles_per_ipu=8",
                          "ipu.available_memory_proportion=[0.3]",
                          "training.precision=mixed_float16"))
    cfg = ipu.apply_ipu_config(plan, _fake_ipu_config(), FAKE_SDK, distributed=True)
    assert (cfg.ipu_model.tiles_per_ipu, cfg.ipu_model.version, cfg.auto_select_ipus) == (8, "ipu2", [])
    assert cfg.device_connection.type == "ALWAYS" and cfg.floating_point_behaviour.esr == "SR_ON"
    assert cfg.matmuls.poplar_options == {"partialsType": "float", "availableMemoryProportion": "0.3"}
    assert ipu.emulator_flags("--foo --ipu_model_tiles=4", plan) == (
        "--foo --use_ipu_model --ipu_model_tiles=8")


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
        ipu.train(small_config(), "/nonexistent/workdir")
