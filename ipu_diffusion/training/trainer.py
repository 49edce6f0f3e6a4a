"""``keras.Model`` integration: a train_step over the diffusion objective, EMA, warmup.

``DiffusionTrainer.fit`` gives progress bars and callbacks for free. Gradients come from
one device (a ``tf.GradientTape`` over front -> U-Net -> loss) or, with
``pipeline.stages > 1``, from the pipeline executor, which returns the same accumulated
gradients; either way the update, clipping, EMA and metrics below are shared.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import tensorflow as tf

from ipu_diffusion import rng
from ipu_diffusion._keras import IS_KERAS3, keras
from ipu_diffusion.config import TrainingConfig
from ipu_diffusion.training.objective import DiffusionObjective


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to ``lr`` over ``warmup_steps`` (Ho et al. 2020), then constant,
    or with ``decay_steps`` > 0 a cosine decay to 0 over the next ``decay_steps`` steps
    (Loshchilov & Hutter 2017, without restarts). A pure function of the step, so a resumed
    run follows the same curve."""

    def __init__(self, lr: float, warmup_steps: int, decay_steps: int = 0):
        super().__init__()
        self.lr = float(lr)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = int(decay_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.lr)
        if self.warmup_steps > 0:
            lr = lr * tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        if self.decay_steps > 0:
            done = tf.clip_by_value((step - self.warmup_steps) / float(self.decay_steps), 0.0, 1.0)
            lr = lr * 0.5 * (1.0 + tf.cos(math.pi * done))
        return lr

    def get_config(self) -> Dict[str, Any]:
        return {"lr": self.lr, "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps}


def lr_schedule(cfg: TrainingConfig) -> WarmupSchedule:
    """``training.lr`` with its warmup and, for ``lr_decay: cosine``, a cosine decay to 0
    at ``training.steps``."""
    decay = max(1, cfg.steps - cfg.warmup_steps) if cfg.lr_decay == "cosine" else 0
    return WarmupSchedule(cfg.lr, cfg.warmup_steps, decay)


def make_optimizer(cfg: TrainingConfig):
    """Adam with the warmup (and decay) of :func:`lr_schedule`; fp16 gets dynamic loss scaling."""
    opt = keras.optimizers.Adam(learning_rate=lr_schedule(cfg),
                                beta_1=cfg.adam_beta1, beta_2=cfg.adam_beta2, epsilon=cfg.adam_eps)
    if cfg.precision == "mixed_float16":
        opt = keras.mixed_precision.LossScaleOptimizer(opt)
    return opt


class EMA(tf.Module):
    """Exponential moving average of weights, kept in float32 shadow variables.

    decay_n = min(decay, (1 + n) / (10 + n)) at update n, so early averages are not
    dominated by the random initialisation. ONLY_FIRST_REPLICA aggregation lets the
    update run in replica context under tf.distribute (every replica computes the same
    value from synchronised weights).
    """

    def __init__(self, variables: List[Any], decay: float):
        super().__init__(name="ema")
        self.decay = float(decay)
        self.shadow = [
            tf.Variable(tf.convert_to_tensor(v), trainable=False, name=f"ema_{i}",
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            for i, v in enumerate(variables)
        ]

    def update(self, variables: List[Any], step: tf.Tensor, active=True) -> None:
        """One EMA step; with ``active`` false (a skipped step) the shadow is unchanged."""
        n = tf.cast(step, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + n) / (10.0 + n))
        decay = tf.where(active, decay, 1.0)
        for s, v in zip(self.shadow, variables):
            s.assign(decay * s + (1.0 - decay) * tf.cast(tf.convert_to_tensor(v), s.dtype))

    def copy_to(self, variables: List[Any]) -> None:
        for s, v in zip(self.shadow, variables):
            v.assign(tf.convert_to_tensor(s))


class NonFiniteGuard(tf.Module):
    """Counts steps whose loss or gradient norm is not finite (they are skipped: no
    optimizer or EMA update; the step counter does not advance)."""

    def __init__(self):
        super().__init__(name="nonfinite_guard")
        agg = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.consecutive = tf.Variable(0, trainable=False, dtype=tf.int64, aggregation=agg)
        self.total = tf.Variable(0, trainable=False, dtype=tf.int64, aggregation=agg)

    def record(self, finite: tf.Tensor) -> None:
        bad = tf.cast(tf.logical_not(finite), tf.int64)
        self.consecutive.assign((self.consecutive + 1) * bad)
        self.total.assign_add(bad)


class DiffusionTrainer(keras.Model):
    """Trains ``unet`` on ``objective``; ``fit`` expects batches from training.stream."""

    def __init__(self, unet, objective: DiffusionObjective, cfg: TrainingConfig, seed: int,
                 global_batch: int, executor=None, **kwargs):
        super().__init__(**kwargs)
        self.unet = unet
        self.objective = objective
        self.train_cfg = cfg
        self.seed = int(seed)
        self.global_batch = int(global_batch)
        self.executor = executor
        self.ema = EMA(unet.trainable_variables, cfg.ema_decay)
        # Consecutive and total skipped (non-finite) steps; checkpointed with the EMA.
        self.guard = NonFiniteGuard()
        self.abort_reason = None  # set by callbacks.StopGuard
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.gnorm_tracker = keras.metrics.Mean(name="grad_norm")
        self.lr_tracker = keras.metrics.Mean(name="lr")

    @property
    def metrics(self):
        return [self.loss_tracker, self.gnorm_tracker, self.lr_tracker]

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras 3 (TF backend) builds the model symbolically from a first batch before
        ``fit`` under ``tf.distribute``, averaging that batch over replicas with
        ``strategy.reduce``, which ``MultiWorkerMirroredStrategy`` cannot do on a dict (the
        ``Attempt to convert a value ({'image': PerReplica...})`` error; keras-team/keras
        #20585). Nothing here needs it: the U-Net is built on construction, the optimizer
        by :func:`build_optimizer_state`, and there are no compiled losses or metrics. So
        multi-worker runs skip it (also a symbolic forward pass saved); Keras 2 never
        calls this."""
        if self._multi_worker:
            return None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def call(self, inputs, training=False):
        """Per-example loss [B] of a data batch (what ``fit`` builds the model with)."""
        terms, _ = self.per_example_losses(self.carry_from_batch(inputs), training=training)
        return terms["loss"]

    def carry_from_batch(self, data: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """The step's input carry: images, per-example keys and (optionally) labels."""
        carry = {"x0": data["image"], "key": rng.example_keys(self.seed, 0, data["index"])}
        if self.objective.num_classes:
            carry["y"] = tf.cast(data["label"], tf.int32)
        return carry

    def per_example_losses(self, carry: Dict[str, tf.Tensor], training: bool = True):
        """front -> U-Net -> loss on one device; returns (terms dict, front outputs)."""
        carry = dict(carry)
        carry.update(self.objective.front(carry))
        inputs = {k: carry[k] for k in self.unet.input_keys}
        carry["out"] = self.unet.keras_model(inputs, training=training)
        return self.objective.terms(carry), carry

    def _single_device_gradients(self, carry):
        variables = self.unet.trainable_variables
        with tf.GradientTape() as tape:
            terms, full = self.per_example_losses(carry)
            loss = tf.reduce_sum(terms["loss"]) / self.global_batch
            scaled = self._scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        self.objective.update_sampler(full["t"], terms["loss"])
        return loss, self._unscale(grads)

    def _scale_loss(self, loss):
        opt = self.optimizer
        if IS_KERAS3:
            return opt.scale_loss(loss) if hasattr(opt, "scale_loss") else loss
        return opt.get_scaled_loss(loss) if hasattr(opt, "get_scaled_loss") else loss

    def _loss_scale(self):
        """The dynamic loss scale for fp16 (the executor scales its own losses), or None."""
        scale = getattr(self.optimizer, "dynamic_scale", None)  # Keras 3
        if scale is None:
            scale = getattr(self.optimizer, "loss_scale", None)  # Keras 2
        return None if scale is None else tf.cast(tf.convert_to_tensor(scale), tf.float32)

    def _unscale(self, grads):
        if not IS_KERAS3 and hasattr(self.optimizer, "get_unscaled_gradients"):
            return self.optimizer.get_unscaled_gradients(grads)
        return grads  # Keras 3's LossScaleOptimizer unscales inside apply_gradients

    def _apply_if_finite(self, grads, variables, finite, replicas: int) -> None:
        """Apply the update only when ``finite``. One replica: the step is skipped (no
        optimizer update; the step counter still advances so a resume reads the same
        data). Several replicas: ``apply_gradients`` synchronises replicas and may not sit
        inside a ``tf.cond``, so a zero gradient is applied instead (Adam's moments decay)."""
        if replicas > 1:
            zeros = [tf.where(finite, g, tf.zeros_like(g)) for g in grads]
            self.optimizer.apply_gradients(zip(zeros, variables))
            return

        def update():
            self.optimizer.apply_gradients(zip(grads, variables))
            return tf.constant(True)

        def skip():
            self.optimizer.iterations.assign_add(1)
            return tf.constant(False)

        tf.cond(finite, update, skip)

    def train_step(self, data):
        carry = self.carry_from_batch(data)
        if self.executor is not None:
            loss, grads, stats = self.executor.gradients(carry, training=True,
                                                         loss_scale=self._loss_scale())
            self.objective.update_sampler(stats["t"], stats["loss"])
            grads = self._unscale(grads)
        else:
            loss, grads = self._single_device_gradients(carry)
        replicas = self.distribute_strategy.num_replicas_in_sync
        if replicas > 1:
            # Clip by the norm of the *global* gradient: reduce first. The optimizer sums
            # over replicas once more, so hand it 1/R of the reduced gradient.
            ctx = tf.distribute.get_replica_context()
            loss, *grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [loss] + list(grads))
        variables = self.unet.trainable_variables
        gnorm = tf.linalg.global_norm(grads)
        if self.train_cfg.grad_clip > 0:
            grads, _ = tf.clip_by_global_norm(grads, self.train_cfg.grad_clip, use_norm=gnorm)
        if replicas > 1:
            grads = [g / replicas for g in grads]
        step = self.optimizer.iterations
        lr = self.optimizer.learning_rate
        lr = lr(step) if callable(lr) else lr
        finite = tf.logical_and(tf.math.is_finite(loss), tf.math.is_finite(gnorm))
        # a multi-worker strategy synchronises in apply_gradients even with one replica
        self._apply_if_finite(grads, variables, finite, 2 if self._multi_worker else replicas)
        self.ema.update(variables, step, active=finite)
        self.guard.record(finite)
        self.loss_tracker.update_state(tf.where(finite, loss, 0.0))
        self.gnorm_tracker.update_state(tf.where(finite, gnorm, 0.0))
        self.lr_tracker.update_state(lr)
        logs = {m.name: m.result() for m in self.metrics}
        if IS_KERAS3 and self._multi_worker and self._workers > 1:
            # Keras 3 averages step outputs over workers with strategy.reduce(MEAN, axis=0),
            # which rejects scalars; shape [1] averages to the same scalar.
            logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    @property
    def _multi_worker(self) -> bool:
        return isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy)

    @property
    def _workers(self) -> int:
        spec = self.distribute_strategy.cluster_resolver.cluster_spec()
        return spec.num_tasks("worker") if "worker" in spec.jobs else 1


def build_optimizer_state(trainer: DiffusionTrainer) -> None:
    """Create the optimizer's slot variables now, so a checkpoint can restore them."""
    opt = trainer.optimizer
    variables = trainer.unet.trainable_variables
    if IS_KERAS3:
        opt.build(variables)
    else:  # Keras 2: slots are created by _create_all_weights
        inner = getattr(opt, "inner_optimizer", opt)
        inner._create_all_weights(variables)  # noqa: SLF001 (no public equivalent in Keras 2)


def ema_weights_into(trainer: DiffusionTrainer, target_unet) -> None:
    """Copy the EMA weights into ``target_unet`` (same architecture) for sampling."""
    trainer.ema.copy_to(target_unet.trainable_variables)
