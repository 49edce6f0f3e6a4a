"""Stage s's variables, forward ops and backward ops live on device s; the schedule's order
is enforced in the traced graph; device configuration errors name the key."""
from __future__ import annotations

import re

import pytest
import tensorflow as tf

from ipu_diffusion.config import ConfigError, PipelineConfig
from ipu_diffusion.pipeline.devices import (build_on_stage_devices, same_device, stage_devices,
                                            variable_device)
from ipu_diffusion.pipeline.fallback import PipelineExecutor
from pipeline_fakes import (FRONT, LOSS, FakeUNet, make_batch, max_relative_error,
                            reference_gradients, toy_front, toy_loss)

pytestmark = pytest.mark.keras2

# Ops that the placer colocates with a variable's resource rather than the device scope.
_COLOCATED = {"ReadVariableOp", "Placeholder", "ResourceGather", "VarHandleOp"}
MAPPING = (1, 2, 3)


@pytest.fixture(scope="module")
def placed():
    pipeline = PipelineConfig(stages=3, cuts=("down", "up0"), microbatches=2,
                              schedule="interleaved", recompute=False, device_mapping=MAPPING)
    unet, part, devices = build_on_stage_devices(FakeUNet, pipeline, FRONT, LOSS)
    ex = PipelineExecutor(unet, toy_front, toy_loss, part, pipeline, devices=devices)
    return unet, ex


def _index(device: str) -> int:
    return tf.DeviceSpec.from_string(device).device_index


def test_variables_live_on_their_stage_device(placed):
    unet, ex = placed
    cpus = tf.config.list_logical_devices("CPU")
    assert ex.devices == [cpus[i].name for i in MAPPING]
    assert ex.misplaced_variables() == []
    assert sum(len(i) for i in ex.stage_variables) == len(unet.trainable_variables)
    for s, idx in enumerate(ex.stage_variables):
        assert idx and {_index(variable_device(ex.variables[i])) for i in idx} == {MAPPING[s]}


def test_eager_gradients_are_computed_on_the_stage_device(placed):
    unet, ex = placed
    batch = make_batch(4)
    _, ref = reference_gradients(unet, batch)
    loss, grads, stats = ex.gradients(batch)
    assert max_relative_error(grads, ref) <= 1e-5
    for s, idx in enumerate(ex.stage_variables):
        assert {_index(grads[i].device) for i in idx} == {MAPPING[s]}
    assert _index(stats["loss"].device) == MAPPING[-1]


def test_traced_graph_places_and_orders_stage_ops(placed):
    unet, ex = placed
    batch = make_batch(4)
    fn = tf.function(ex.gradients)
    graph = fn.get_concrete_function(batch).graph
    seen = set()
    for op in graph.get_operations():
        # gradient ops are named after the forward op they differentiate
        m = re.match(r"(gradient_tape/)?pipeline_([FB])(\d)_m\d", op.name)
        if not m or op.type in _COLOCATED:
            continue
        s = int(m.group(3))
        seen.add(("B" if m.group(1) else m.group(2), s))
        assert _index(op.device) == MAPPING[s], (op.name, op.device)
    assert seen == {(k, s) for k in "FB" for s in range(3)}
    # interleaved, S=3, M=2: the last stage runs F(2,0) B(2,0) F(2,1) B(2,1), so the inputs
    # of F(2,1) wait (control dependencies) for the gradients of B(2,0)
    backward_m0 = re.compile(r"(pipeline_B2_m0/|gradient_tape/pipeline_[FB]2_m0/)")
    gated = [op for op in graph.get_operations() if op.name.startswith("pipeline_F2_m1/")
             and any(backward_m0.match(c.name) for c in op.control_inputs)]
    assert gated and all(op.type == "Identity" for op in gated)
    # and the graph computes the same gradients
    _, ref = reference_gradients(unet, batch)
    _, grads, _ = fn(batch)
    assert max_relative_error(grads, ref) <= 1e-5


def test_device_errors_name_the_key():
    n = len(tf.config.list_logical_devices("CPU"))
    with pytest.raises(ConfigError, match="pipeline.device_mapping"):
        stage_devices(PipelineConfig(stages=2, device_mapping=(0, n)))
    if not tf.config.list_physical_devices("GPU"):
        with pytest.raises(ConfigError, match="pipeline.device_type"):
            stage_devices(PipelineConfig(stages=2, device_type="gpu"))
    assert same_device("/job:localhost/replica:0/task:0/device:CPU:1", "/device:CPU:1")
    assert not same_device("/device:CPU:1", "/device:CPU:2")
