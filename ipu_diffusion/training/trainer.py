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


class FusedAdam(keras.optimizers.Adam):
    """Keras' Adam with each variable's update done by TensorFlow's fused Adam kernel
    (``ResourceApplyAdam``: one pass over the weight and its two moments) instead of
    Keras' eight element-wise ops. The formula is Keras' own (Kingma & Ba 2015, with
    epsilon added to sqrt(v) after the bias correction of the step size), the slots are
    Keras' (same checkpoint), and tracing the update takes half the time."""

    def _step_scalars(self, dtype, learning_rate) -> Dict[str, tf.Tensor]:
        """The kernel's scalar inputs, made once per ``apply`` and dtype rather than once
        per variable (a step's update then traces in less time, as fewer ops): Keras 3
        passes every ``update_step`` of one ``apply`` the same ``learning_rate``."""
        graph = tf.compat.v1.get_default_graph()
        memo = self.__dict__.get("_scalar_memo")  # a plain object: not checkpoint-tracked
        if (memo is None or tf.executing_eagerly() or memo.graph is not graph
                or memo.learning_rate is not learning_rate):
            memo = _ScalarMemo(graph, learning_rate)
            self.__dict__["_scalar_memo"] = memo
        if dtype not in memo.by_dtype:
            step = tf.cast(self.iterations + 1, dtype)
            b1, b2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
            memo.by_dtype[dtype] = dict(
                beta1_power=tf.pow(b1, step), beta2_power=tf.pow(b2, step),
                lr=tf.cast(learning_rate, dtype), beta1=b1, beta2=b2,
                epsilon=tf.cast(self.epsilon, dtype))
        return memo.by_dtype[dtype]

    def _fused_update(self, gradient, variable, learning_rate) -> None:
        dtype = variable.dtype
        index = (self._get_variable_index(variable) if IS_KERAS3
                 else self._index_dict[self._var_key(variable)])
        m, v = self._momentums[index], self._velocities[index]
        tf.raw_ops.ResourceApplyAdam(var=_handle(variable), m=_handle(m), v=_handle(v),
                                     grad=tf.cast(gradient, dtype),
                                     **self._step_scalars(dtype, learning_rate))

    if IS_KERAS3:
        def update_step(self, gradient, variable, learning_rate):
            self._fused_update(gradient, variable, learning_rate)
    else:  # tf_keras' optimizer reads its learning rate itself
        def update_step(self, gradient, variable):
            self._fused_update(gradient, variable, self.learning_rate)

    _reduced = False

    def apply_reduced(self, grads_and_vars) -> None:
        """``apply_gradients`` (in replica context) of gradients every replica already
        holds summed over all replicas: the trainer reduces them itself, to clip by the
        global norm, so the optimizer must not all-reduce them a second time."""
        if not IS_KERAS3:
            self.apply_gradients(grads_and_vars, skip_gradients_aggregation=True)
            return
        self._reduced = True  # read while the step is traced
        try:
            self.apply_gradients(grads_and_vars)
        finally:
            self._reduced = False

    if IS_KERAS3:
        def _all_reduce_sum_gradients(self, grads_and_vars):
            # keras/src/backend/tensorflow/optimizer.py: the one place Keras 3 sums
            # gradients over replicas, with no public switch (tf_keras has
            # skip_gradients_aggregation)
            if self._reduced:
                return list(grads_and_vars)
            return super()._all_reduce_sum_gradients(grads_and_vars)


class _ScalarMemo:
    """:meth:`FusedAdam._step_scalars`' tensors of one traced ``apply``."""

    def __init__(self, graph, learning_rate):
        self.graph, self.learning_rate, self.by_dtype = graph, learning_rate, {}


def _handle(variable):
    """The resource handle of a tf.Variable or of a Keras 3 variable wrapping one."""
    if IS_KERAS3 and isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


def make_optimizer(cfg: TrainingConfig):
    """Adam with the warmup (and decay) of :func:`lr_schedule`. Loss scaling for
    ``mixed_float16`` is the trainer's :class:`DynamicLossScale`, not a Keras wrapper."""
    return FusedAdam(learning_rate=lr_schedule(cfg), beta_1=cfg.adam_beta1,
                     beta_2=cfg.adam_beta2, epsilon=cfg.adam_eps)


def ema_decay_at(decay: float, n) -> tf.Tensor:
    """The EMA decay after ``n`` updates (this one included): min(decay, (1 + n) / (10 + n)),
    so early averages are not dominated by the random initialisation. The CPU trainer's
    :class:`EMA` and the IPU optimizer's EMA slots both use it."""
    n = tf.cast(n, tf.float32)
    return tf.minimum(float(decay), (1.0 + n) / (10.0 + n))


def clip_gradients(grads: List[tf.Tensor], clip_norm: float, norm=None) -> List[tf.Tensor]:
    """``training.grad_clip``: scale ``grads`` so their global norm is at most ``clip_norm``
    (``norm``: that norm if already known); ``clip_norm`` <= 0 leaves them as they are."""
    if clip_norm <= 0:
        return list(grads)
    clipped, _ = tf.clip_by_global_norm(grads, clip_norm, use_norm=norm)
    return clipped


# Each variable below is the same on every replica and is updated from replica context
# with values every replica computes alike; ONLY_FIRST_REPLICA makes that legal.
_SYNCED = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


class EMA(tf.Module):
    """Exponential moving average of weights, kept in float32 shadow variables, with the
    decay of :func:`ema_decay_at`."""

    def __init__(self, variables: List[Any], decay: float):
        super().__init__(name="ema")
        self.decay = float(decay)
        self.shadow = [tf.Variable(tf.convert_to_tensor(v), name=f"ema_{i}", **_SYNCED)
                       for i, v in enumerate(variables)]

    def update(self, variables: List[Any], n, active=True) -> None:
        """One EMA step after update ``n``; with ``active`` false (a skipped step) the
        shadow is left exactly as it is."""
        # s <- s - (1 - decay) * (s - v) in one kernel per variable; a skipped step has
        # rate 0 and leaves s bit for bit (s - v is finite: the weights were not updated)
        rate = (1.0 - ema_decay_at(self.decay, n)) * tf.cast(active, tf.float32)
        for s, v in zip(self.shadow, variables):
            tf.raw_ops.ResourceApplyGradientDescent(
                var=s.handle, alpha=rate, delta=s - tf.cast(tf.convert_to_tensor(v), s.dtype))

    def copy_to(self, variables: List[Any]) -> None:
        for s, v in zip(self.shadow, variables):
            v.assign(tf.convert_to_tensor(s))


class NonFiniteGuard(tf.Module):
    """Counts skipped steps: those whose loss or gradient norm is not finite, except
    loss-scale overflows (see :class:`DynamicLossScale`)."""

    def __init__(self):
        super().__init__(name="nonfinite_guard")
        self.consecutive = tf.Variable(0, dtype=tf.int64, **_SYNCED)
        self.total = tf.Variable(0, dtype=tf.int64, **_SYNCED)

    def record(self, failed: tf.Tensor) -> None:
        bad = tf.cast(failed, tf.int64)
        self.consecutive.assign((self.consecutive + 1) * bad)
        self.total.assign_add(bad)


class DynamicLossScale(tf.Module):
    """Dynamic loss scaling for ``mixed_float16`` (Micikevicius et al. 2018), with Keras'
    constants: the loss is multiplied by ``scale`` (initially 2^15) before the backward
    pass and the gradients divided by it after, before their norm is taken or clipped.
    A step whose scaled gradients overflow is skipped and halves the scale (not below 1);
    ``growth_interval`` finite steps in a row double it. An overflow is counted in
    ``overflows`` and is not a failure, unless the scale is already 1."""

    def __init__(self, initial: float = 2.0 ** 15, growth_interval: int = 2000):
        super().__init__(name="loss_scale")
        self.growth_interval = int(growth_interval)
        self.scale = tf.Variable(float(initial), dtype=tf.float32, **_SYNCED)
        self.good_steps = tf.Variable(0, dtype=tf.int64, **_SYNCED)
        self.overflows = tf.Variable(0, dtype=tf.int64, **_SYNCED)

    def update(self, loss_finite: tf.Tensor, grads_finite: tf.Tensor) -> tf.Tensor:
        """Adjust the scale after a step; returns whether the step was an overflow (a
        finite loss whose gradients did not fit at a scale above 1)."""
        scale = self.scale.read_value()
        overflow = tf.logical_and(loss_finite, tf.logical_not(grads_finite)) & (scale > 1.0)
        grow = tf.logical_and(grads_finite, self.good_steps + 1 >= self.growth_interval)
        self.scale.assign(tf.where(grads_finite, tf.where(grow, scale * 2.0, scale),
                                   tf.maximum(scale / 2.0, 1.0)))
        self.good_steps.assign(tf.where(grads_finite & ~grow, self.good_steps + 1, 0))
        self.overflows.assign_add(tf.cast(overflow, tf.int64))
        return overflow


class DiffusionTrainer(keras.Model):
    """Trains ``unet`` on ``objective``; ``fit`` expects batches from training.stream.

    A step whose loss or gradient norm is not finite is skipped: the weights, the EMA
    shadow, Adam's moments and the timestep sampler's history are left bit for bit as they
    were, on one replica or many, and the step is left out of the logged averages. It
    still consumes its batch and advances ``optimizer.iterations``, the step counter that
    positions the data stream and the learning-rate schedule, so a resumed run reads the
    same batches (Adam's bias correction counts it too).
    """

    def __init__(self, unet, objective: DiffusionObjective, cfg: TrainingConfig, seed: int,
                 global_batch: int, executor=None, **kwargs):
        # The trainer's own dtype stays float32 so that Keras does not wrap the optimizer
        # in its LossScaleOptimizer under mixed_float16: that one unscales only inside
        # apply_gradients, after the norm and the clip here (the U-Net keeps the policy).
        super().__init__(dtype="float32", **kwargs)
        self.unet = unet
        self.objective = objective
        self.train_cfg = cfg
        self.seed = int(seed)
        self.global_batch = int(global_batch)
        self.executor = executor
        self.ema = EMA(unet.trainable_variables, cfg.ema_decay)
        # Consecutive and total skipped (non-finite) steps; checkpointed with the EMA.
        self.guard = NonFiniteGuard()
        self.loss_scale = DynamicLossScale() if cfg.precision == "mixed_float16" else None
        self.abort_reason = None  # set by callbacks.StopGuard
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.gnorm_tracker = keras.metrics.Mean(name="grad_norm")
        self.lr_tracker = keras.metrics.Mean(name="lr")

    @property
    def metrics(self):
        return [self.loss_tracker, self.gnorm_tracker, self.lr_tracker]

    def checkpoint_objects(self) -> Dict[str, Any]:
        """What a checkpoint holds, by name: weights, optimizer, EMA, the skipped-step
        counters, and the loss-aware sampler's history and the loss scale when in use."""
        objects = {"unet": self.unet.keras_model, "optimizer": self.optimizer, "ema": self.ema,
                   "guard": self.guard}
        if self.objective.sampler.learns:  # its history decides the next steps' timesteps
            objects["timestep_sampler"] = self.objective.sampler
        if self.loss_scale is not None:
            objects["loss_scale"] = self.loss_scale
        return objects

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

    def local_gradients(self, data: Dict[str, tf.Tensor]):
        """This replica's part of a step: ``(loss, grads, stats)`` with the loss and
        gradients of sum(per-example loss) / global_batch, unscaled (under mixed_float16
        the backward pass ran on the loss times the loss scale), and ``stats`` the
        per-example ``t`` and the objective's ``sampler_keys``."""
        carry = self.carry_from_batch(data)
        scale = None if self.loss_scale is None else self.loss_scale.scale.read_value()
        if self.executor is not None:
            loss, grads, stats = self.executor.gradients(carry, training=True, loss_scale=scale)
        else:
            variables = self.unet.trainable_variables
            with tf.GradientTape() as tape:
                terms, full = self.per_example_losses(carry)
                loss = tf.reduce_sum(terms["loss"]) / self.global_batch
                scaled = loss if scale is None else loss * scale
            grads = tape.gradient(scaled, variables)
            stats = {"t": full["t"], **self.objective.sampler_outputs(terms)}
        if scale is not None:
            grads = [tf.cast(g, tf.float32) / scale for g in grads]
        return loss, list(grads), stats

    def train_step(self, data):
        loss, grads, stats = self.local_gradients(data)
        ctx = tf.distribute.get_replica_context()
        replicas = self.distribute_strategy.num_replicas_in_sync
        if replicas > 1:
            # Clip by the norm of the *global* gradient: reduce first (once; the
            # optimizer applies the reduced gradients as they are: apply_reduced).
            loss, *grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [loss] + grads)
        variables = self.unet.trainable_variables
        gnorm = tf.linalg.global_norm(grads)
        loss_finite, grads_finite = tf.math.is_finite(loss), tf.math.is_finite(gnorm)
        finite = tf.logical_and(loss_finite, grads_finite)
        overflow = tf.constant(False)
        if self.loss_scale is not None:
            overflow = self.loss_scale.update(loss_finite, grads_finite)
        grads = clip_gradients(grads, self.train_cfg.grad_clip, gnorm)
        lr = self.optimizer.learning_rate
        lr = lr(self.optimizer.iterations) if callable(lr) else lr
        self._apply_if_finite(grads, variables, finite)
        self.ema.update(variables, self.optimizer.iterations, active=finite)
        self.guard.record(tf.logical_not(finite) & tf.logical_not(overflow))
        if self.objective.sampler.learns:
            t, losses = stats["t"], stats["sampler_loss"]
            if replicas > 1:  # every replica records the global batch, in its order
                t, losses = ctx.all_gather(t, axis=0), ctx.all_gather(losses, axis=0)
            self.objective.sampler.update(t, losses, active=finite)
        counted = tf.cast(finite, tf.float32)
        self.loss_tracker.update_state(tf.where(finite, loss, 0.0), sample_weight=counted)
        self.gnorm_tracker.update_state(tf.where(finite, gnorm, 0.0), sample_weight=counted)
        self.lr_tracker.update_state(lr)
        logs = {m.name: m.result() for m in self.metrics}
        if IS_KERAS3 and self._multi_worker and self._workers > 1:
            # Keras 3 averages step outputs over workers with strategy.reduce(MEAN, axis=0),
            # which rejects scalars; shape [1] averages to the same scalar.
            logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    def _apply_if_finite(self, grads, variables, finite) -> None:
        """``apply_gradients`` when ``finite`` (the same on every replica: it comes from
        reduced values); otherwise only the step counter advances. ``apply_gradients``
        synchronises replicas, which a ``tf.cond`` in replica context may not contain, so
        the condition is taken in cross-replica context, as Keras' LossScaleOptimizer does
        (one path for the default strategy, mirrored and multi-worker)."""
        opt = self.optimizer

        def cross_replica(strategy, grads, finite):
            def apply():
                strategy.extended.call_for_each_replica(
                    lambda g: opt.apply_reduced(zip(g, variables)), args=(grads,))

            def skip():
                opt.iterations.assign_add(1)

            tf.cond(strategy.experimental_local_results(finite)[0], apply, skip)

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(grads, finite))

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
    inner = getattr(opt, "inner_optimizer", opt)
    if hasattr(inner, "_create_all_weights"):  # Keras 2's OptimizerV2 (the IPU path)
        inner._create_all_weights(variables)  # noqa: SLF001 (no public equivalent there)
    else:  # Keras 3, and Keras 2's newer optimizer (tf_keras.optimizers.Adam)
        inner.build(variables)
