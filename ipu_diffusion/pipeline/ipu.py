"""Poplar SDK mapping: IPU configuration, strategy, the flat pipelined model, its options.

:func:`~.ipu_plan.ipu_plan` decides what to ask for; this module applies it, and
:mod:`ipu_diffusion.training.ipu_train` trains the result. The SDK
(``tensorflow.python.ipu``, Graphcore's Keras 2.6 fork, ``ipu_tensorflow_addons``,
``popdist``) is imported only inside :func:`sdk`, after :func:`require_sdk`; SDK-free
pieces are plain functions tested on CPU against stand-ins that enforce the SDK's rules
(``tests/ipu/sdk_*.py``, each rule citing its SDK 3.4 source file).

* One flat functional model from the micro-batch ``{x0, key[, y]}`` to the per-example
  loss ``[b]`` (:func:`compose_training_model`), every layer invocation assigned its stage
  with ``get/set_pipeline_stage_assignment``.
* Every tensor on the device is int32, int64, float32, float16 or bool, the Poplar XLA
  backend's types (graphcore/tensorflow ``tensorflow/compiler/plugin/poplar/driver/
  xla_ipu_common.cc``, ``GetIPUSupportedTypes``): the per-example hash (``rng.py``) is int32.
"""
from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ipu_diffusion._keras import keras
from ipu_diffusion.config import ConfigError
from ipu_diffusion.pipeline.ipu_plan import IPUPlan

SDK_DOWNLOAD = "https://www.graphcore.ai/downloads"


class SDKMissing(RuntimeError):
    """The Poplar SDK's TensorFlow is not importable; the message says what to do."""


def sdk_available() -> bool:
    """True when ``tensorflow.python.ipu`` and ``ipu_tensorflow_addons`` are importable."""
    try:
        return (importlib.util.find_spec("ipu_tensorflow_addons") is not None
                and importlib.util.find_spec("tensorflow.python.ipu") is not None)
    except (ImportError, ValueError):
        return False


def require_sdk(config_path: Optional[str] = None) -> None:
    """Raise :class:`SDKMissing`: one line naming the SDK, its wheels and the CPU fallback."""
    if sdk_available():
        return
    cfg = config_path or "FILE"
    raise SDKMissing(
        f"train-ipu needs Graphcore's Poplar SDK, whose TensorFlow is not installed in this "
        f"Python (no tensorflow.python.ipu / ipu_tensorflow_addons). Download the SDK from "
        f"{SDK_DOWNLOAD}, run 'source <sdk>/enable' and, in a Python 3.8 virtualenv, 'pip "
        f"install' its tensorflow-2.6.3+gc*, keras-2.6.0+gc* and ipu_tensorflow_addons-2.6.3+gc* "
        f"wheels. Without IPUs, train the same config on CPU/GPU: make train CONFIG={cfg}  "
        f"(python -m ipu_diffusion train --config {cfg})")


def sdk() -> SimpleNamespace:
    """The SDK objects this module uses (SDK 3.x import paths, else 2.x)."""
    require_sdk()
    from ipu_tensorflow_addons.keras.layers import GroupNormalization
    from tensorflow.python import ipu
    from tensorflow.python.ipu.ops import pipelining_ops as pops

    try:
        from tensorflow.python.ipu.gradient_accumulation import GradientAccumulationReductionMethod
    except ImportError:
        from tensorflow.python.ipu.optimizers.gradient_accumulation_optimizer import (
            GradientAccumulationReductionMethod)
    popdist, strategy = _popdist()
    srb = getattr(ipu.config, "StochasticRoundingBehaviour", None)
    return SimpleNamespace(
        ipu=ipu, PipelineSchedule=pops.PipelineSchedule, RecomputationMode=pops.RecomputationMode,
        PipelineStageOptions=pops.PipelineStageOptions, GroupNormalization=GroupNormalization,
        reduction_mean=GradientAccumulationReductionMethod.MEAN, popdist=popdist,
        PopDistStrategy=strategy, stochastic_rounding_on=srb.ON if srb is not None else True,
        device_on_demand=ipu.config.DeviceConnectionType.ON_DEMAND)


def _popdist():
    """``(popdist, PopDistStrategy)`` when running under ``poprun``, else ``(None, None)``."""
    try:
        import popdist
        import popdist.tensorflow  # noqa: F401 (set_ipu_config)
        try:
            from tensorflow.python.ipu.distributed.popdist_strategy import PopDistStrategy
        except ImportError:
            from tensorflow.python.ipu.horovod.popdist_strategy import PopDistStrategy
    except ImportError:
        return None, None
    return (popdist, PopDistStrategy) if popdist.isPopdistEnvSet() else (None, None)


# --------------------------------------------------------------------------- IPUConfig


def emulator_flags(existing: str, plan: IPUPlan) -> str:
    """``TF_POPLAR_FLAGS`` with ``--use_ipu_model --ipu_model_tiles=N`` added (emulator)."""
    flags = [f for f in existing.split() if not f.startswith("--ipu_model_tiles")]
    if "--use_ipu_model" not in flags:
        flags.append("--use_ipu_model")
    flags.append(f"--ipu_model_tiles={plan.tiles_per_ipu}")
    return " ".join(flags)


def poplar_options(plan: IPUPlan, stage: Optional[int] = None) -> Dict[str, str]:
    """Convolution/matmul Poplar options (string values): ``partialsType`` and the stage's
    ``availableMemoryProportion``; ``stage=None``: global (one stage: stage 0's)."""
    opts = {"partialsType": plan.partials_type}
    amp = plan.available_memory_proportion
    if amp and (stage is not None or not plan.pipelined):
        opts["availableMemoryProportion"] = str(amp[stage or 0])
    return opts


def apply_ipu_config(plan: IPUPlan, config: Any, sdk_ns: Any, distributed: bool = False) -> Any:
    """Set the plan's fields on an ``ipu.config.IPUConfig`` (SDK API reference, "IPUConfig")."""
    config.allow_recompute = plan.allow_recompute
    config.matmuls.poplar_options = poplar_options(plan)
    config.convolutions.poplar_options = poplar_options(plan)
    if plan.stochastic_rounding:
        config.floating_point_behaviour.esr = sdk_ns.stochastic_rounding_on
    if plan.ipu_model:
        config.ipu_model.compile_ipu_code = True
        config.ipu_model.tiles_per_ipu = plan.tiles_per_ipu
        config.ipu_model.version = plan.ipu_version
    else:
        config.device_connection.type = sdk_ns.device_on_demand
    if plan.offload_optimizer_state:
        config.device_connection.enable_remote_buffers = True
    if not distributed:
        config.auto_select_ipus = plan.total_ipus
    return config


def configure(plan: IPUPlan, seed: Optional[int] = None):
    """Configure the IPU system; return ``PopDistStrategy`` under ``poprun``
    (``popdist.tensorflow.set_ipu_config``), else ``IPUStrategy``."""
    ns = sdk()
    if plan.ipu_model:
        os.environ["TF_POPLAR_FLAGS"] = emulator_flags(os.environ.get("TF_POPLAR_FLAGS", ""), plan)
    distributed = ns.popdist is not None
    config = apply_ipu_config(plan, ns.ipu.config.IPUConfig(), ns, distributed)
    if distributed:
        if ns.popdist.getNumTotalReplicas() != plan.replicas:
            raise ConfigError(f"ipu.replicas: {plan.replicas} but poprun started "
                              f"{ns.popdist.getNumTotalReplicas()} replicas (--num-replicas)")
        if hasattr(ns.popdist, "init"):
            ns.popdist.init()
        ns.popdist.tensorflow.set_ipu_config(config, ipus_per_replica=plan.ipus_per_replica,
                                             configure_device=True)
    config.configure_ipu_system()
    if plan.ipu_model and not ns.ipu.utils.running_on_ipu_model():
        raise RuntimeError("ipu.ipu_model is true but Poplar attached to hardware: start Python "
                           "with TF_POPLAR_FLAGS=--use_ipu_model in the environment")
    if seed is not None:
        ns.ipu.utils.reset_ipu_seed(seed)
    return ns.PopDistStrategy() if distributed else ns.ipu.ipu_strategy.IPUStrategy()


def instances(sdk_ns: Any) -> Tuple[int, int]:
    """``(number of poprun instances, this instance's index)``; ``(1, 0)`` without poprun."""
    popdist = sdk_ns.popdist
    return (popdist.getNumInstances(), popdist.getInstanceIndex()) if popdist else (1, 0)


def local_replicas(plan: IPUPlan, sdk_ns: Any) -> int:
    """Replicas this process drives: all R, or R / instances under ``poprun``."""
    return plan.replicas // instances(sdk_ns)[0]


def ipu_group_norm_factory(group_norm_cls: Callable) -> Callable:
    """For ``layers.set_group_norm_factory``: ipu_tensorflow_addons' GroupNormalization with
    conventional (non-strided) channel groups, gamma ones and beta zeros (its defaults
    are None initialisers, which Keras turns into Glorot)."""
    return lambda groups, name, epsilon: group_norm_cls(
        groups=groups, epsilon=epsilon, strided_channel_grouping=False,
        gamma_initializer="ones", beta_initializer="zeros", name=name)


# --------------------------------------------------------------------------- the model


class CarryLayer(keras.layers.Layer):
    """A carry block (``dict -> dict`` or ``dict -> tensor``) as a float32 Keras layer."""

    def __init__(self, fn: Callable, keys: Sequence[str], output_key: Optional[str] = None,
                 **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.fn, self.keys, self.output_key = fn, tuple(keys), output_key

    def call(self, inputs):
        out = self.fn({k: inputs[k] for k in self.keys})
        return out[self.output_key] if self.output_key else out


def compose_training_model(unet, objective, partition) -> Tuple[Any, Dict[int, int]]:
    """``(model, stage_of)``: ONE flat functional model from the micro-batch ``{x0 [b,H,W,C]
    float32, key [b] int32[, y [b] int32]}`` to the per-example loss ``[b]``, and the
    pipeline stage of each of its layers (``id(layer) -> stage``).

    The graph calls ``objective.front`` (stage 0), every U-Net block layer in chain order
    (the carry is a Python dict while building) and ``objective.loss`` (last stage)
    directly, one invocation each, as Graphcore's pipelined Keras models are built
    (graphcore/examples ``nlp/bert/tensorflow2``, ``vision/unet_medical/tensorflow2``). Stage
    models nested in a functional model, called with a dict, fail the SDK's stage check
    (``keras/ipu/extensions/functional_extensions.py``, ``_get_pipelined_post_order``
    marks only the ids of the nested call's positional arguments as computed). ``objective``
    needs ``front``/``loss`` callables and ``front_spec``/``loss_spec``.
    """
    image = tuple(unet.input_shapes()["x_t"])
    inputs = {k: keras.Input(shape=image if k == "x0" else (), name=k,
                             dtype="float32" if k == "x0" else "int32")
              for k in partition.batch_keys}
    front = CarryLayer(objective.front, objective.front_spec.inputs, name="front")
    loss = CarryLayer(objective.loss, objective.loss_spec.inputs, "loss", name="loss")
    carry = dict(inputs)
    carry.update(front({k: inputs[k] for k in objective.front_spec.inputs}))
    stage_of = {id(front): 0}
    for s, (start, stop) in enumerate(partition.ranges):
        unet.apply_blocks(carry, start, stop)
        stage_of.update({id(unet.layers[name]): s for name in partition.stage_blocks(s)})
    output = loss({k: carry[k] for k in objective.loss_spec.inputs})
    stage_of[id(loss)] = partition.num_stages - 1
    model = keras.Model(inputs=inputs, outputs=output, name="pipelined_unet")
    return model, stage_of


def assign_stages(assignments: Sequence[Any], stage_of: Mapping[int, int]) -> List[Any]:
    """Fill the ``pipeline_stage`` of each entry of ``model.get_pipeline_stage_assignment()``
    (one per layer invocation, in post order) from ``stage_of`` (``id(layer) -> stage``).
    The flat model has no nested models and calls each layer once."""
    out = list(assignments)
    for a in out:
        if a.is_nested_model:  # keras/ipu/extensions/pipeline_stage_assignment.py
            raise ValueError(f"{a.nested_model.name!r} is a nested model; the pipelined model "
                             "must be flat (see compose_training_model)")
        if id(a.layer) not in stage_of:
            raise ValueError(f"layer {a.layer.name!r} of the pipelined model has no stage")
        a.pipeline_stage = stage_of[id(a.layer)]
    return out


def pipelining_options(plan: IPUPlan, sdk_ns: Any) -> Dict[str, Any]:
    """Keyword arguments of ``model.set_pipelining_options`` (graphcore/keras
    ``FunctionalExtension``; extra ones are forwarded to ``pipelining_ops.pipeline``)."""
    opts: Dict[str, Any] = {
        "gradient_accumulation_steps_per_replica": plan.microbatches,
        "device_mapping": list(plan.device_mapping),
        "gradient_accumulation_reduction_method": sdk_ns.reduction_mean,
        "pipeline_schedule": getattr(sdk_ns.PipelineSchedule, plan.schedule),
        "offload_weight_update_variables": plan.offload_optimizer_state or None,
    }
    if plan.allow_recompute:
        opts["recomputation_mode"] = getattr(sdk_ns.RecomputationMode, plan.recomputation_mode)
    if plan.available_memory_proportion or plan.partials_type != "float":
        per_stage = [sdk_ns.PipelineStageOptions(convolution_options=poplar_options(plan, s),
                                                 matmul_options=poplar_options(plan, s))
                     for s in range(plan.num_stages)]
        opts["forward_propagation_stages_poplar_options"] = per_stage
        opts["backward_propagation_stages_poplar_options"] = per_stage
    return opts


def gradient_accumulation_options(plan: IPUPlan, sdk_ns: Any) -> Dict[str, Any]:
    """Keyword arguments of ``model.set_gradient_accumulation_options`` for one stage with
    M > 1; the extra ones reach ``GradientAccumulationOptimizerV2`` (``extensions_base.py``,
    ``_make_single_ipu_train_function_with_gradient_accumulation``), whose
    ``offload_weight_update_variables`` moves Adam's slots and the EMA off the IPU."""
    return {"gradient_accumulation_steps_per_replica": plan.microbatches,
            "gradient_accumulation_reduction_method": sdk_ns.reduction_mean,
            "offload_weight_update_variables": plan.offload_optimizer_state or None}


def build_pipelined_model(unet, objective, partition, plan: IPUPlan, sdk_ns: Any = None,
                          wrap: Callable = lambda model: model):
    """The flat training model (:func:`compose_training_model`) with every layer invocation
    assigned its stage and the pipelining options set; for one stage, gradient
    accumulation options when M > 1. Call under the IPU strategy's scope. ``wrap`` lets
    the tests put the SDK stand-in's methods around the Keras model."""
    ns = sdk_ns or sdk()
    keras_model, stage_of = compose_training_model(unet, objective, partition)
    model = wrap(keras_model)
    if not plan.pipelined:
        if plan.microbatches > 1:
            model.set_gradient_accumulation_options(**gradient_accumulation_options(plan, ns))
        return model
    model.set_pipeline_stage_assignment(
        assign_stages(model.get_pipeline_stage_assignment(), stage_of))
    model.set_pipelining_options(**pipelining_options(plan, ns))
    return model
