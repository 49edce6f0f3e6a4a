"""Poplar SDK adapter: the pipelined U-Net trained with Keras ``fit`` on Graphcore IPUs.

:func:`~.ipu_plan.ipu_plan` decides what to ask for; this module applies it. The SDK
(``tensorflow.python.ipu``, Graphcore's Keras 2.6 fork, ``ipu_tensorflow_addons``,
``popdist``) is imported only inside :func:`sdk`, after :func:`require_sdk`; SDK-free
pieces are plain functions tested on CPU, with SDK objects passed in. Design (Graphcore
"Keras with IPUs" guide, SDK 3.x; graphcore/keras ``keras/ipu``):

* One functional model from the micro-batch ``{x0, key[, y]}`` to the per-example loss
  ``[b]``: ``objective.front``, the U-Net's stage models (``stage_models_for_ranges``, the
  same ones the plain-TF executor runs), ``objective.loss``. Pipelined models may not
  override ``train_step``, so ``compile`` gets a loss that returns the model output.
* Stages are set with ``get/set_pipeline_stage_assignment``, the guide's route for nested
  models: a ``keras.ipu.PipelineStage`` scope around a nested-model call does not reach
  the nested layers, and the Functional constructor rejects nested invocations without a
  stage (``functional_extensions.py``, ``_get_pipelining_from_nodes_delegate``).
* Gradients: Keras averages the micro-batch, accumulation takes the MEAN over M,
  replicas are summed (all-reduce), so a gradient transformer divides by R (as
  Graphcore's BERT does) and clips by global norm: the global-batch mean, as on CPU.
* EMA: inside a pipeline only ``apply_gradients`` may modify variables
  (``pipelining_ops.pipeline`` docs), so the EMA is an optimizer slot updated after each
  Adam update; :class:`EMASyncCallback` copies it into the trainer's ``EMA`` before each
  checkpoint, which keeps the CPU run's layout (``ema/shadow/i``).
* mixed_float16: Keras' dynamic LossScaleOptimizer does not support IPUStrategy, so a
  static ``plan.loss_scale`` scales the loss gradient (not its value) and the first
  gradient transformer divides it out; float16 results use stochastic rounding.
"""
from __future__ import annotations

import importlib.util
import os
import time
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf

from ipu_diffusion import rng
from ipu_diffusion._keras import keras
from ipu_diffusion.config import ConfigError, RunConfig, TrainingConfig
from ipu_diffusion.models.carry import live_before
from ipu_diffusion.pipeline.ipu_plan import IPUPlan, describe, ipu_plan
from ipu_diffusion.training.trainer import EMA, build_optimizer_state, lr_schedule

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


def compose_training_model(unet, objective, partition) -> Tuple[Any, List[Any], Any, Any]:
    """``(model, stage_models, front_layer, loss_layer)``: one functional model from the
    batch ``{x0 [b,H,W,C] float32, key [b] int32[, y [b] int32]}`` to the per-example
    loss ``[b]``: front, the U-Net's stage models in order, loss. Runs on any device."""
    stages = unet.stage_models_for_ranges(partition.ranges)
    live = live_before(unet.blocks, (unet.output_key,))
    image = tuple(unet.input_shapes()["x_t"])
    inputs = {k: keras.Input(shape=image if k == "x0" else (), name=k,
                             dtype="float32" if k == "x0" else "int32")
              for k in partition.batch_keys}
    front = CarryLayer(objective.front, objective.front_spec.inputs, name="front")
    loss = CarryLayer(objective.loss, objective.loss_spec.inputs, "loss", name="loss")
    carry = dict(inputs)
    carry.update(front(dict(inputs)))
    for (start, _), model in zip(partition.ranges, stages):
        carry.update(model({k: carry[k] for k in live[start]}))
    output = loss({k: carry[k] for k in objective.loss_spec.inputs})
    return keras.Model(inputs=inputs, outputs=output, name="pipelined_unet"), stages, front, loss


def assign_stages(assignments: Sequence[Any], stage_of: Mapping[int, int]) -> Sequence[Any]:
    """Fill the ``pipeline_stage`` of each entry of ``model.get_pipeline_stage_assignment()``:
    ``stage_of`` maps ``id(layer)`` (front, loss, stage model s) to its stage; every layer
    inside a nested model takes the nested model's stage."""

    def nested(a) -> bool:
        return bool(getattr(a, "is_nested_model", False))

    def fill(items, stage):
        for a in items:
            if nested(a):
                fill(a.pipeline_stage_assignments, stage)
            else:
                a.pipeline_stage = stage

    for a in assignments:
        layer = a.nested_model if nested(a) else a.layer
        if id(layer) not in stage_of:
            raise ValueError(f"layer {layer.name!r} of the pipelined model has no stage")
        fill(a.pipeline_stage_assignments if nested(a) else [a], stage_of[id(layer)])
    return assignments


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


def build_pipelined_model(unet, objective, partition, plan: IPUPlan, sdk_ns: Any = None):
    """The composed model with stages assigned and pipelining (or, for one stage,
    gradient accumulation) options set. Call under the IPU strategy's scope."""
    model, stages, _, loss = compose_training_model(unet, objective, partition)
    if not plan.pipelined:
        if plan.microbatches > 1:
            model.set_gradient_accumulation_options(
                gradient_accumulation_steps_per_replica=plan.microbatches,
                gradient_accumulation_reduction_method=(sdk_ns or sdk()).reduction_mean)
        return model
    stage_of = {id(layer): 0 for layer in model.layers}  # inputs (if listed) and front
    stage_of.update({id(m): s for s, m in enumerate(stages)})
    stage_of[id(loss)] = plan.num_stages - 1
    model.set_pipeline_stage_assignment(
        assign_stages(model.get_pipeline_stage_assignment(), stage_of))
    model.set_pipelining_options(**pipelining_options(plan, sdk_ns or sdk()))
    return model


# --------------------------------------------------------------------------- loss, optimizer


def model_output_loss(loss_scale: float = 1.0) -> Callable:
    """The compiled loss: the model output itself (the per-example loss ``[b]``; Keras
    averages it over the micro-batch). With ``loss_scale != 1`` its gradient is scaled
    but its value is not: ``y + (s - 1) (y - stop_gradient(y))`` equals ``y`` exactly."""
    scale = float(loss_scale)

    def loss(y_true, y_pred):
        del y_true  # the batch carries a dummy target
        y = tf.cast(y_pred, tf.float32)
        if scale == 1.0:
            return y
        return y + (scale - 1.0) * (y - tf.stop_gradient(y))

    return loss


def gradient_transformers(unscale: float, clip_norm: float) -> List[Callable]:
    """OptimizerV2 ``gradient_transformers`` run on the accumulated, all-reduced gradients:
    multiply by ``unscale`` (``1 / (loss_scale * replicas)``), then clip by global norm
    (``clip_norm > 0``), as the CPU trainer does."""

    def rescale(grads_and_vars):
        return [(tf.cast(tf.convert_to_tensor(g), tf.float32) * unscale if g is not None else g, v)
                for g, v in grads_and_vars]

    def clip(grads_and_vars):
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        clipped, _ = tf.clip_by_global_norm([g for g, _ in pairs], clip_norm)
        return list(zip(clipped, [v for _, v in pairs]))

    return [rescale, clip] if clip_norm > 0 else [rescale]


def ema_optimizer_class(base: type) -> type:
    """``base`` (a Keras 2 ``OptimizerV2``, e.g. Adam) that also keeps an ``ema`` slot per
    variable, updated after the variable's own update with the trainer's rule
    ``decay_n = min(decay, (1 + n) / (10 + n))``, ``n`` = updates done including this one."""

    class EMAOptimizer(base):
        def __init__(self, ema_decay: float, **kwargs):
            super().__init__(**kwargs)
            self.ema_decay = float(ema_decay)

        def _create_slots(self, var_list):
            super()._create_slots(var_list)
            for v in var_list:  # created eagerly by build_optimizer_state: start at the weights
                self.add_slot(v, "ema", initializer=tf.convert_to_tensor(v))

        def _ema_update(self, var, update):
            with tf.control_dependencies([update]):
                n = tf.cast(self.iterations, tf.float32) + 1.0
                decay = tf.minimum(self.ema_decay, (1.0 + n) / (10.0 + n))
                ema = self.get_slot(var, "ema")
                new = decay * ema + (1.0 - decay) * tf.cast(var.read_value(), ema.dtype)
                return tf.group(update, ema.assign(new))

        def _resource_apply_dense(self, grad, var, apply_state=None):
            # every gradient is dense here: the first transformer densifies IndexedSlices
            return self._ema_update(var, super()._resource_apply_dense(grad, var, apply_state))

        def get_config(self):
            return dict(super().get_config(), ema_decay=self.ema_decay)

    EMAOptimizer.__name__ = "EMA" + base.__name__
    return EMAOptimizer


def make_ipu_optimizer(cfg: TrainingConfig, plan: IPUPlan):
    """Adam with warmup, EMA slots and the gradient transformers above."""
    cls = ema_optimizer_class(keras.optimizers.Adam)
    return cls(ema_decay=cfg.ema_decay, learning_rate=lr_schedule(cfg),
               beta_1=cfg.adam_beta1, beta_2=cfg.adam_beta2, epsilon=cfg.adam_eps,
               gradient_transformers=gradient_transformers(
                   1.0 / (plan.loss_scale * plan.replicas), cfg.grad_clip))


class EMASyncCallback(keras.callbacks.Callback):
    """Before each checkpoint (same cadence as ``CheckpointCallback``; list it first) and at
    the end, copy the optimizer's ``ema`` slots into the trainer's :class:`EMA` module, a
    host copy with the CPU run's checkpoint layout (``ema/shadow/i``): a slot variable may
    not also be a checkpoint dependency of another object."""

    def __init__(self, slots: Sequence[Any], ema: EMA, every: int):
        super().__init__()
        from ipu_diffusion.training.callbacks import _Every  # noqa: SLF001 (same cadence)

        self.slots, self.ema, self.due = list(slots), ema, _Every(every)

    def sync(self) -> None:
        for shadow, slot in zip(self.ema.shadow, self.slots):
            shadow.assign(tf.convert_to_tensor(slot))

    def on_train_batch_end(self, batch, logs=None):
        if self.due(int(self.model.optimizer.iterations.numpy())):
            self.sync()

    def on_train_end(self, logs=None):
        self.sync()


# --------------------------------------------------------------------------- data, run


def micro_batch_stream(stream: tf.data.Dataset, seed: int, micro_batch: int, use_labels: bool,
                       num_shards: int = 1, shard: int = 0) -> tf.data.Dataset:
    """Each global batch of ``data.make_dataset`` as consecutive micro-batches ``({x0, key[,
    y]}, dummy target [b])``; a weight update consumes M x R of them, one global batch.
    Keys are the CPU trainer's. Under ``poprun`` instance ``shard`` takes every
    ``num_shards``-th micro-batch."""

    def split(batch):
        feats = {"x0": batch["image"], "key": rng.example_keys(seed, 0, batch["index"])}
        if use_labels:
            feats["y"] = tf.cast(batch["label"], tf.int32)
        feats = {k: tf.reshape(v, [-1, micro_batch] + v.shape[1:].as_list())
                 for k, v in feats.items()}
        return tf.data.Dataset.from_tensor_slices((feats, tf.zeros_like(feats["key"], tf.float32)))

    ds = stream.flat_map(split)
    return (ds.shard(num_shards, shard) if num_shards > 1 else ds).prefetch(tf.data.AUTOTUNE)


class PipelinedTrainer:
    """What run.py's helpers need of a trainer: ``optimizer``, ``unet``, ``ema`` and a
    ``fit`` counted in weight updates (IPU Keras counts micro-batch steps per replica)."""

    def __init__(self, model, unet, optimizer, microbatches: int):
        self.model, self.unet, self.optimizer = model, unet, optimizer
        self.microbatches = int(microbatches)
        self.ema: Optional[EMA] = None
        self.ema_slots: List[Any] = []

    def fit(self, dataset, steps_per_epoch: int, **kwargs):
        return self.model.fit(dataset, steps_per_epoch=steps_per_epoch * self.microbatches,
                              **kwargs)


def build_ipu_run(cfg: RunConfig, workdir: str, system_ipus: Optional[int] = None):
    """``(Run, IPUPlan)``: IPU system configured, model built, compiled, checkpoint ready."""
    from ipu_diffusion.models import layers
    from ipu_diffusion.models.unet import build_unet
    from ipu_diffusion.pipeline.partition import partition_unet
    from ipu_diffusion.training import run as run_lib
    from ipu_diffusion.training.objective import DiffusionObjective

    ns = sdk()
    strategy = configure(ipu_plan(cfg, system_ipus=system_ipus), seed=cfg.run.seed)
    run_lib.set_precision(cfg.training.precision)
    layers.set_group_norm_factory(ipu_group_norm_factory(ns.GroupNormalization))
    with strategy.scope():
        unet = build_unet(cfg.model)
        objective = DiffusionObjective(cfg.diffusion, cfg.model.num_classes if cfg.data.use_labels
                                       else 0, cfg.training.class_dropout)
        partition = partition_unet(unet, cfg.pipeline, objective.front_spec, objective.loss_spec)
        plan = ipu_plan(cfg, partition, unet.block_info(), system_ipus)
        model = build_pipelined_model(unet, objective, partition, plan, ns)
        optimizer = make_ipu_optimizer(cfg.training, plan)
        model.compile(optimizer=optimizer, loss=model_output_loss(plan.loss_scale),
                      steps_per_execution=plan.steps_per_execution)
        trainer = PipelinedTrainer(model, unet, optimizer, plan.microbatches)
        build_optimizer_state(trainer)
        trainer.ema_slots = [optimizer.get_slot(v, "ema") for v in unet.trainable_variables]
    trainer.ema = EMA(unet.trainable_variables, cfg.training.ema_decay)  # on the host
    checkpoint = tf.train.Checkpoint(unet=unet.keras_model, optimizer=optimizer, ema=trainer.ema)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(workdir, run_lib.CHECKPOINT_DIR),
                                         max_to_keep=cfg.training.keep_checkpoints)
    run = run_lib.Run(cfg, workdir, strategy, unet, objective, trainer, checkpoint, manager)
    return run, plan


def train(run_config: RunConfig, workdir: Optional[str] = None, resume: bool = False,
          verbose: int = 1, system_ipus: Optional[int] = None) -> Dict[str, Any]:
    """Train on IPUs to ``training.steps``; same workdir, stream, callbacks and checkpoint
    layout as :func:`ipu_diffusion.training.run.train`. Returns (and writes) metrics.json.
    Sample grids are not made during IPU training (see the README's IPU section)."""
    from ipu_diffusion.data import make_dataset
    from ipu_diffusion.evaluation.run_eval import merge_metrics
    from ipu_diffusion.training import callbacks as cb
    from ipu_diffusion.training import run as run_lib

    require_sdk()
    cfg, t = run_config, run_config.training
    workdir = workdir or cfg.workdir
    ipu_plan(cfg, system_ipus=system_ipus)  # config errors before any device work
    run_lib.prepare_workdir(cfg, workdir, resume)
    run, plan = build_ipu_run(cfg, workdir, system_ipus)
    print(describe(plan))
    start = run_lib.start_from_checkpoint(run)
    use_labels = bool(run.objective.num_classes)
    popdist = sdk().popdist
    shards = (popdist.getNumInstances(), popdist.getInstanceIndex()) if popdist else (1, 0)

    def stream_from(step: int):
        ds = make_dataset(cfg, t.batch_size, cfg.run.seed, start_step=step)
        return micro_batch_stream(ds, cfg.run.seed, plan.micro_batch, use_labels, *shards)

    throughput = cb.ThroughputCallback(t.batch_size)
    callbacks = [throughput, cb.TensorBoardCallback(os.path.join(workdir, "tensorboard"), t.log_every),
                 EMASyncCallback(run.trainer.ema_slots, run.trainer.ema, t.checkpoint_every),
                 cb.CheckpointCallback(run.manager, t.checkpoint_every)]
    began = time.time()
    with run.strategy.scope():
        logs = run_lib.fit_in_chunks(run, stream_from, start, t.steps, t.log_every,
                                     callbacks, verbose)
    metrics = {"backend": "ipu", "ipus": plan.total_ipus, "steps": run.step,
               "resumed_from": start, "wall_time_s": round(time.time() - began, 2),
               "img_per_s": round(throughput.img_per_s, 2), "final_loss": logs.get("loss"),
               "samples": None}
    merge_metrics(workdir, metrics)
    return metrics
