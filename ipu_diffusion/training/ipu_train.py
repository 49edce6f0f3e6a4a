"""Training on Graphcore IPUs: optimizer, EMA, loss scaling, callbacks and the run.

:mod:`ipu_diffusion.pipeline.ipu` maps the plan onto the SDK (IPU configuration,
strategy, the flat pipelined model and its options); this module trains that model
with Keras ``fit`` and keeps the CPU run's workdir, data stream and checkpoint layout.
Facts it relies on, from the SDK 3.4 sources (graphcore/keras ``r2.6/sdk-release-3.4``,
graphcore/tensorflow ``r2.6/sdk-release-3.4``):

* Pipelined models may not override ``train_step``; the fork's own step computes
  ``compiled_loss`` on the model output and calls ``optimizer.compute_gradients`` /
  ``apply_gradients`` (``keras/ipu/extensions/extensions_base.py``, ``_ipu_train_step``),
  so the model outputs the per-example loss and the compiled loss returns it.
* Only the optimizer may modify variables inside the pipeline, so the EMA is an optimizer
  slot updated after each Adam update, copied into the trainer's ``EMA`` module (the CPU
  run's ``ema/shadow/i`` layout) before each checkpoint.
* ``mixed_float16``: ``Model.compile`` wraps any optimizer that is not already a
  ``LossScaleOptimizer`` in a *dynamic* one (``keras/engine/training.py``); we pass one
  static ``LossScaleOptimizer(dynamic=False, initial_scale=plan.loss_scale)``, as
  Graphcore's examples do, and scale nowhere else.
* Gradients: Keras averages the micro-batch, accumulation takes the MEAN over M, replicas
  are summed. ``PopDistStrategy`` reports all R replicas in ``num_replicas_in_sync`` and
  Keras then scales the loss by 1/R itself; ``IPUStrategy`` reports 1. A gradient
  transformer divides by ``R / num_replicas_in_sync`` and clips by global norm: the
  global-batch mean, clipped, as on CPU.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import tensorflow as tf

from ipu_diffusion import rng
from ipu_diffusion._keras import keras
from ipu_diffusion.config import RunConfig, TrainingConfig
from ipu_diffusion.pipeline import ipu
from ipu_diffusion.pipeline.ipu_plan import IPUPlan, describe, fit_steps, ipu_plan
from ipu_diffusion.training import callbacks as cb
from ipu_diffusion.training.trainer import (EMA, build_optimizer_state, clip_gradients,
                                            ema_decay_at, lr_schedule)


# --------------------------------------------------------------------------- loss, optimizer


def model_output_loss(y_true, y_pred):
    """The compiled loss: the model output itself, the per-example loss ``[b]`` (Keras
    averages it over the micro-batch)."""
    del y_true  # the batch carries a dummy target
    return tf.cast(y_pred, tf.float32)


def gradient_transformers(divisor: float, clip_norm: float) -> List[Callable]:
    """OptimizerV2 ``gradient_transformers``, run on the accumulated, all-reduced and
    unscaled gradients: divide by ``divisor`` (replicas the SDK summed without averaging),
    then clip by global norm (``clip_norm > 0``), as the CPU trainer does."""

    def rescale(grads_and_vars):
        return [(tf.cast(tf.convert_to_tensor(g), tf.float32) / divisor if g is not None else g,
                 v) for g, v in grads_and_vars]

    def clip(grads_and_vars):
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        return list(zip(clip_gradients([g for g, _ in pairs], clip_norm), [v for _, v in pairs]))

    return [rescale, clip] if clip_norm > 0 else [rescale]


def ema_optimizer_class(base: type) -> type:
    """``base`` (a Keras 2 ``OptimizerV2``, e.g. Adam) that also keeps an ``ema`` slot per
    variable, updated after the variable's own update with the trainer's rule
    (:func:`~ipu_diffusion.training.trainer.ema_decay_at`, ``n`` = updates done including
    this one)."""

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
                decay = ema_decay_at(self.ema_decay, self.iterations + 1)
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


def replica_divisor(plan: IPUPlan, num_replicas_in_sync: int) -> float:
    """What the summed replica gradients still need dividing by: R under ``IPUStrategy``
    (``num_replicas_in_sync`` 1), 1 under ``PopDistStrategy`` (R, and Keras has scaled the
    loss by 1/R already)."""
    return plan.replicas / float(num_replicas_in_sync)


def make_ipu_optimizer(cfg: TrainingConfig, plan: IPUPlan, num_replicas_in_sync: int = 1):
    """Adam with warmup, EMA slots and the gradient transformers above; under
    ``mixed_float16`` wrapped once in a static ``LossScaleOptimizer``."""
    # OptimizerV2 (slots, gradient_transformers): keras.optimizers.Adam in the SDK's Keras
    # 2.6, keras.optimizers.legacy.Adam in later Keras 2 releases
    cls = ema_optimizer_class(getattr(keras.optimizers, "legacy", keras.optimizers).Adam)
    opt = cls(ema_decay=cfg.ema_decay, learning_rate=lr_schedule(cfg),
              beta_1=cfg.adam_beta1, beta_2=cfg.adam_beta2, epsilon=cfg.adam_eps,
              gradient_transformers=gradient_transformers(
                  replica_divisor(plan, num_replicas_in_sync), cfg.grad_clip))
    if plan.half_precision:
        return keras.mixed_precision.LossScaleOptimizer(opt, dynamic=False,
                                                        initial_scale=plan.loss_scale)
    return opt


def inner_optimizer(optimizer):
    """The optimizer that owns the slots (inside a ``LossScaleOptimizer`` if wrapped)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


# --------------------------------------------------------------------------- callbacks


class EMASyncCallback(keras.callbacks.Callback):
    """Before each checkpoint (same cadence as ``CheckpointCallback``; list it first) and at
    the end, copy the optimizer's ``ema`` slots into the trainer's :class:`EMA` module, a
    host copy with the CPU run's checkpoint layout (``ema/shadow/i``): a slot variable may
    not also be a checkpoint dependency of another object."""

    def __init__(self, slots: Sequence[Any], ema: EMA, every: int):
        super().__init__()
        self.slots, self.ema, self.due = list(slots), ema, cb._Every(every)  # noqa: SLF001

    def sync(self) -> None:
        for shadow, slot in zip(self.ema.shadow, self.slots):
            shadow.assign(tf.convert_to_tensor(slot))

    def on_train_batch_end(self, batch, logs=None):
        if self.due(int(self.model.optimizer.iterations.numpy())):
            self.sync()

    def on_train_end(self, logs=None):
        self.sync()


class IPUStopGuard(cb.StopGuard):
    """SIGTERM/SIGINT stop ``fit`` after the running execution (the checkpoint callback then
    saves), as in ``train``. A non-finite loss cannot be skipped inside the SDK's
    pipelined step, so training stops at the first execution whose loss is not finite,
    without saving: the newest checkpoint stays the last good state."""

    def nonfinite_reason(self, logs) -> Optional[str]:
        loss = logs.get("loss")
        if loss is None or math.isfinite(float(loss)):
            return None
        return (f"the loss was not finite ({float(loss)}) at step "
                f"{int(self.model.optimizer.iterations.numpy())}")


# --------------------------------------------------------------------------- data


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


# --------------------------------------------------------------------------- run


class PipelinedTrainer:
    """What run.py's helpers need of a trainer: ``optimizer``, ``unet``, ``ema`` and a
    ``fit`` counted in weight updates; the SDK's ``fit`` counts micro-batch steps of all
    the process's replicas (:func:`~ipu_diffusion.pipeline.ipu_plan.fit_steps`)."""

    def __init__(self, model, unet, optimizer, plan: IPUPlan, local_replicas: int):
        self.model, self.unet, self.optimizer = model, unet, optimizer
        self.plan, self.local_replicas = plan, int(local_replicas)
        self.ema: Optional[EMA] = None
        self.ema_slots: List[Any] = []

    def fit(self, dataset, steps_per_epoch: int, **kwargs):
        steps = fit_steps(self.plan, steps_per_epoch, self.local_replicas)
        return self.model.fit(dataset, steps_per_epoch=steps, **kwargs)


def build_ipu_run(cfg: RunConfig, workdir: str, system_ipus: Optional[int] = None):
    """``(Run, IPUPlan)``: IPU system configured, model built, compiled, checkpoint ready."""
    from ipu_diffusion.models import layers
    from ipu_diffusion.models.unet import build_unet
    from ipu_diffusion.pipeline.partition import partition_unet
    from ipu_diffusion.training import run as run_lib
    from ipu_diffusion.training.objective import DiffusionObjective

    ns = ipu.sdk()
    strategy = ipu.configure(ipu_plan(cfg, system_ipus=system_ipus), seed=cfg.run.seed)
    run_lib.set_precision(cfg.training.precision)
    layers.set_group_norm_factory(ipu.ipu_group_norm_factory(ns.GroupNormalization))
    with strategy.scope():
        unet = build_unet(cfg.model)
        objective = DiffusionObjective(cfg.diffusion, cfg.model.num_classes if cfg.data.use_labels
                                       else 0, cfg.training.class_dropout)
        partition = partition_unet(unet, cfg.pipeline, objective.front_spec, objective.loss_spec)
        plan = ipu_plan(cfg, partition, unet.block_info(), system_ipus)
        model = ipu.build_pipelined_model(unet, objective, partition, plan, ns)
        optimizer = make_ipu_optimizer(cfg.training, plan, strategy.num_replicas_in_sync)
        model.compile(optimizer=optimizer, loss=model_output_loss,
                      steps_per_execution=plan.steps_per_execution)
        trainer = PipelinedTrainer(model, unet, optimizer, plan, ipu.local_replicas(plan, ns))
        build_optimizer_state(trainer)
        slots = inner_optimizer(optimizer)
        trainer.ema_slots = [slots.get_slot(v, "ema") for v in unet.trainable_variables]
    trainer.ema = EMA(unet.trainable_variables, cfg.training.ema_decay)  # on the host
    checkpoint = tf.train.Checkpoint(unet=unet.keras_model, optimizer=optimizer, ema=trainer.ema)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(workdir, run_lib.CHECKPOINT_DIR),
                                         max_to_keep=cfg.training.keep_checkpoints)
    run = run_lib.Run(cfg, workdir, strategy, unet, objective, trainer, checkpoint, manager)
    return run, plan


def train(run_config: RunConfig, workdir: Optional[str] = None, resume: bool = False,
          verbose: int = 1, system_ipus: Optional[int] = None,
          on_start: Optional[Callable[[Any, IPUPlan, int], None]] = None) -> Dict[str, Any]:
    """Train on IPUs to ``training.steps``; same workdir, stream, checkpoint layout and
    SIGTERM handling as :func:`ipu_diffusion.training.run.train`. Under ``poprun`` only
    instance 0 writes (checkpoints, TensorBoard, ``metrics.json``, ``config.yaml``) and
    calls ``on_start(run, plan, start_step)`` before the first step (default: print the
    plan's table).
    Sample grids are not made during IPU training (see the README's IPU section)."""
    from ipu_diffusion.data import make_dataset
    from ipu_diffusion.evaluation.run_eval import merge_metrics
    from ipu_diffusion.training import run as run_lib

    ipu.require_sdk()
    cfg, t = run_config, run_config.training
    workdir = workdir or cfg.workdir
    ipu_plan(cfg, system_ipus=system_ipus)  # config errors before any device work
    shards = ipu.instances(ipu.sdk())
    writer = shards[1] == 0
    if writer:
        run_lib.prepare_workdir(cfg, workdir, resume)
    run, plan = build_ipu_run(cfg, workdir, system_ipus)
    run.writer = writer
    if writer:
        start = run_lib.start_from_checkpoint(run)
        if on_start is not None:
            on_start(run, plan, start)
        else:
            print(describe(plan))
    else:  # reads instance 0's checkpoints; checks no disk, says nothing
        start = run_lib.restore_latest(run, required=False, log=lambda message: None)
    use_labels = bool(run.objective.num_classes)

    def stream_from(step: int):
        ds = make_dataset(cfg, t.batch_size, cfg.run.seed, start_step=step)
        return micro_batch_stream(ds, cfg.run.seed, plan.micro_batch, use_labels, *shards)

    throughput = cb.ThroughputCallback(t.batch_size)
    guard = IPUStopGuard(t.max_nonfinite_steps)
    callbacks: List[Any] = [throughput, guard]
    if writer:
        callbacks += [cb.TensorBoardCallback(os.path.join(workdir, "tensorboard"), t.log_every),
                      EMASyncCallback(run.trainer.ema_slots, run.trainer.ema, t.checkpoint_every),
                      cb.CheckpointCallback(run.manager, t.checkpoint_every)]
    began = time.time()
    with run.strategy.scope():
        logs = run_lib.fit_in_chunks(run, stream_from, start, t.steps, t.log_every,
                                     callbacks, verbose if writer else 0, lambda: guard.stopped)
    abort = getattr(run.trainer.model, "abort_reason", None)
    if abort is not None:
        raise run_lib.RunError(f"training stopped: {abort}; the newest checkpoint "
                               f"({run.manager.latest_checkpoint}) is the last good state. "
                               "Lower training.lr or check the data, then resume with --resume")
    if guard.stop_signal:
        raise run_lib.Interrupted(
            f"stopped by signal {guard.stop_signal} at step {run.step}; checkpoint saved in "
            f"{os.path.join(workdir, run_lib.CHECKPOINT_DIR)}. Resume: python -m ipu_diffusion "
            f"train-ipu --workdir {workdir} --resume", guard.stop_signal)
    metrics = {"backend": "ipu", "ipus": plan.total_ipus, "steps": run.step,
               "resumed_from": start, "wall_time_s": round(time.time() - began, 2),
               "img_per_s": round(throughput.img_per_s, 2), "final_loss": logs.get("loss"),
               "samples": None}
    if writer:
        merge_metrics(workdir, metrics)
    else:
        metrics["written_by"] = "instance 0"
    return metrics
