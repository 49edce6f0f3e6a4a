"""Plain-TensorFlow pipeline executor: stages on devices, microbatches, schedules, recompute.

Stage s = (front if s = 0) + U-Net blocks ``ranges[s]`` (one functional Keras model over
the shared layers) + (loss if s = S-1), placed with ``tf.device(devices[s])``. A step:

1. split the batch ``{x0 [B, ...], key [B] (, y [B])}`` into M microbatches of b = B/M;
2. run the tasks of :func:`ipu_diffusion.pipeline.schedule.schedule_tasks` in order:
   F(s, m) runs stage s forward on microbatch m (under a ``tf.GradientTape`` that keeps
   its activations, or, with ``recompute``, without one: only the stage's inputs are
   kept); B(s, m) receives the gradient of stage s's outputs (for the last stage the seed
   ``d objective / d loss_i = 1 / B`` per example, so the accumulated gradient is that of
   the global-batch mean), re-runs the forward under a tape if recomputing, and returns
   gradients for stage s's inputs (sent to B(s-1, m)) and variables (added to stage s's
   accumulator on device s);
3. return the mean loss, the accumulated gradients aligned with ``unet.trainable_variables``
   and stats.

The tasks of each device are chained with control dependencies (sequential: all tasks),
so inside a ``tf.function`` the graph runs in the schedule's order and the schedule really
decides which microbatches' activations are alive. Randomness is per-example and keyed
(ipu_diffusion.rng), so microbatching and recomputation reproduce the full-batch numbers.

Fused microbatches (``pipeline.fuse_microbatches``, on by default): under ``grouped``
without recomputation a stage holds all M microbatches' activations from its first
forward to its last backward anyway, and stages on CPUs of one host share the same cores,
so nothing overlaps. There each stage runs its M microbatches as one batch of B
(:func:`fuses_microbatches`): the same update (per-example keyed randomness; per-example
losses seeded with 1/B), the same activations held, without M times the per-op overhead of
batches of B/M. Interleaved and sequential schedules, recomputation, and stages on GPUs
(which can overlap) keep the microbatch-by-microbatch execution.

    executor = build_executor(unet, objective, cfg.pipeline, global_batch=128)
    loss, grads, stats = executor.gradients({"x0": x0, "key": keys}, training=True)
    optimizer.apply_gradients(zip(grads, executor.variables))
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf

from ipu_diffusion.config import ConfigError, PipelineConfig
from ipu_diffusion.models.carry import BlockSpec, live_before
from ipu_diffusion.pipeline.devices import (build_on_stage_devices, raw_variable, same_device,
                                            stage_devices, variable_device)
from ipu_diffusion.pipeline.partition import LOSS_KEY, Partition, partition_unet
from ipu_diffusion.pipeline.schedule import Task, max_in_flight, schedule_tasks

log = logging.getLogger(__name__)
Carry = Dict[str, tf.Tensor]


def call_block(fn: Callable, spec: BlockSpec, carry: Mapping[str, tf.Tensor]) -> Carry:
    """``fn`` on the keys ``spec`` reads; returns the keys it declares (a bare tensor is
    accepted for a single output)."""
    out = fn({k: carry[k] for k in spec.inputs})
    if not isinstance(out, Mapping):
        if len(spec.outputs) != 1:
            raise ValueError(f"{spec.name} returned one tensor but declares outputs {spec.outputs}")
        out = {spec.outputs[0]: out}
    missing = [k for k in spec.outputs if k not in out]
    if missing:
        raise ValueError(f"{spec.name} did not return {missing} (it declares {spec.outputs})")
    return {k: out[k] for k in spec.outputs}


def _as_dict(out: Any, keys: Sequence[str]) -> Carry:
    if isinstance(out, Mapping):
        return dict(out)
    if isinstance(out, (list, tuple)):
        return dict(zip(sorted(keys), out))
    return {keys[0]: out}


def _gate(tensors: Sequence[tf.Tensor], deps: Sequence[Any]) -> List[tf.Tensor]:
    """Identities of ``tensors`` that run only after ``deps`` (no-op when eager)."""
    if not deps or tf.executing_eagerly():
        return list(tensors)
    with tf.control_dependencies(list(deps)):
        return [tf.identity(t) for t in tensors]


def _gate_dict(carry: Carry, deps: Sequence[Any]) -> Carry:
    keys = sorted(carry)
    return dict(zip(keys, _gate([carry[k] for k in keys], deps)))


def fuses_microbatches(pipeline: PipelineConfig, devices: Sequence[str]) -> bool:
    """Whether the executor runs each stage's M microbatches as one batch (module doc)."""
    return (bool(pipeline.fuse_microbatches) and pipeline.microbatches > 1
            and pipeline.schedule == "grouped" and not pipeline.recompute
            and all(tf.DeviceSpec.from_string(d).device_type in (None, "CPU") for d in devices))


def _dense(g: Any) -> tf.Tensor:
    return tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g


class _Step:
    """Mutable state of one step's unrolled schedule."""

    def __init__(self, micro: List[Carry]):
        self.carry: Dict[Tuple[int, int], Carry] = {(0, m): c for m, c in enumerate(micro)}
        self.stash: Dict[Tuple[int, int], Tuple[Carry, Any]] = {}
        self.upstream: Dict[Tuple[int, int], Carry] = {}
        self.results: Dict[int, Carry] = {}
        self.acc: Dict[int, List[tf.Tensor]] = {}
        self.last: Dict[Any, List[tf.Tensor]] = {}


class PipelineExecutor:
    """Accumulated gradients of a U-Net cut into stages (see module docstring).

    ``front(carry) -> dict`` and ``loss(carry) -> dict or [B] tensor`` are the callables of
    ``partition.front`` / ``partition.loss``. ``devices``: full device names per stage
    (default: :func:`~.devices.stage_devices`). ``global_batch``: the B of the objective
    ``sum(loss) / B`` (default: the batch's size at run time). ``stage_models``: reuse
    ``unet.stage_models_for_ranges(partition.ranges)`` built earlier.
    """

    def __init__(self, unet, front: Callable, loss: Callable, partition: Partition,
                 pipeline: PipelineConfig, devices: Optional[Sequence[str]] = None,
                 global_batch: Optional[int] = None, stage_models: Optional[Sequence[Any]] = None):
        if pipeline.stages != partition.num_stages:
            raise ConfigError(f"pipeline.stages: {pipeline.stages} but the partition has "
                              f"{partition.num_stages} stages")
        self.partition, self.pipeline = partition, pipeline
        self.front, self.loss = front, loss
        self.num_stages, self.microbatches = partition.num_stages, pipeline.microbatches
        self.recompute = bool(pipeline.recompute)
        self.global_batch = global_batch
        self.devices = list(devices) if devices is not None else stage_devices(pipeline)
        if len(self.devices) != self.num_stages:
            raise ConfigError(f"pipeline.device_mapping: {len(self.devices)} devices for "
                              f"{self.num_stages} stages")
        self.stage_models = list(stage_models) if stage_models is not None else \
            unet.stage_models_for_ranges(partition.ranges)
        live = live_before(list(partition.blocks), (getattr(unet, "output_key", "out"),))
        self._model_keys = [(live[a], live[b]) for a, b in partition.ranges]
        self.variables = list(unet.trainable_variables)
        self.stage_variables = self._assign_variables()
        self.fused = fuses_microbatches(pipeline, self.devices)
        self.runs = 1 if self.fused else self.microbatches  # batches each stage runs
        self.tasks: List[Task] = schedule_tasks(pipeline.schedule, self.num_stages, self.runs)
        # microbatches each stage holds at its peak under the schedule (fused: the same data)
        self.in_flight = max_in_flight(schedule_tasks(pipeline.schedule, self.num_stages,
                                                      self.microbatches), self.num_stages)
        self.sent_keys: List[Tuple[str, ...]] = []  # recorded while running: keys F(s) sent
        misplaced = self.misplaced_variables()
        if misplaced:
            log.warning("%d variables are not on their stage's device (e.g. %s); build the U-Net "
                        "with pipeline.devices.build_on_stage_devices", len(misplaced), misplaced[0])

    # ------------------------------------------------------------------ set-up

    def _assign_variables(self) -> List[List[int]]:
        """Indices into ``self.variables`` of each stage's trainable variables."""
        position = {id(raw_variable(v)): i for i, v in enumerate(self.variables)}
        owner: Dict[int, int] = {}
        stages: List[List[int]] = []
        for s, model in enumerate(self.stage_models):
            idx = []
            for v in model.trainable_variables:
                i = position.get(id(raw_variable(v)))
                if i is None:
                    raise ValueError(f"stage {s} uses variable {v.name} that is not among the "
                                     "U-Net's trainable_variables")
                if owner.setdefault(i, s) != s:
                    raise ValueError(f"variable {v.name} is used by stages {owner[i]} and {s}; "
                                     "each variable must belong to one stage")
                idx.append(i)
            stages.append(idx)
        return stages

    def misplaced_variables(self) -> List[Tuple[str, int, str]]:
        """``(name, stage, device)`` of variables not on their stage's device."""
        out = []
        for s, idx in enumerate(self.stage_variables):
            for i in idx:
                dev = variable_device(self.variables[i])
                if not same_device(dev, self.devices[s]):
                    out.append((self.variables[i].name, s, dev))
        return out

    # ------------------------------------------------------------------ one stage

    def run_stage(self, s: int, inputs: Carry, training: Any = True) -> Carry:
        """Stage ``s`` forward: ``partition.inputs(s)`` -> ``partition.sends(s)``."""
        carry = dict(inputs)
        if s == 0:
            carry.update(call_block(self.front, self.partition.front, carry))
        model_in, model_out = self._model_keys[s]
        out = self.stage_models[s]({k: carry[k] for k in model_in}, training=training)
        carry.update(_as_dict(out, model_out))
        if s == self.num_stages - 1:
            carry.update(call_block(self.loss, self.partition.loss, carry))
        return {k: carry[k] for k in self.partition.sends(s)}

    def _grad_keys(self, s: int, carry: Carry) -> List[str]:
        keys = self.partition.differentiable(sorted(carry)) if s > 0 else ()
        return [k for k in keys if carry[k].dtype.is_floating]

    def _taped_stage(self, s: int, inputs: Carry, training: Any):
        tape = tf.GradientTape()
        with tape:
            tape.watch([inputs[k] for k in self._grad_keys(s, inputs)])
            outputs = self.run_stage(s, inputs, training)
        return tape, outputs

    def _deps_key(self, s: int) -> Any:
        return "all" if self.pipeline.schedule == "sequential" else self.devices[s]

    def _forward(self, task: Task, st: _Step, training: Any) -> None:
        s, m = task.stage, task.micro
        with tf.name_scope(f"pipeline_F{s}_m{m}"), tf.device(self.devices[s]):
            inputs = _gate_dict(st.carry.pop((s, m)), st.last.get(self._deps_key(s), []))
            if self.recompute:
                tape, outputs = None, self.run_stage(s, inputs, training)
            else:
                tape, outputs = self._taped_stage(s, inputs, training)
        st.stash[(s, m)] = (inputs, tape, outputs)
        if s + 1 < self.num_stages:
            st.carry[(s + 1, m)] = outputs
            if m == 0:
                self.sent_keys.append(tuple(sorted(outputs)))
        else:
            st.results[m] = outputs
        st.last[self._deps_key(s)] = list(outputs.values())

    def _seed(self, loss: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
        return tf.fill(tf.shape(loss), tf.cast(scale, loss.dtype))

    def _backward(self, task: Task, st: _Step, training: Any, scale: tf.Tensor) -> None:
        s, m = task.stage, task.micro
        inputs, tape, outputs = st.stash.pop((s, m))
        with tf.name_scope(f"pipeline_B{s}_m{m}"), tf.device(self.devices[s]):
            if s == self.num_stages - 1:
                upstream = {LOSS_KEY: self._seed(outputs[LOSS_KEY], scale)}
            else:
                upstream = st.upstream.pop((s, m))
            upstream = _gate_dict(upstream, st.last.get(self._deps_key(s), []))
            if self.recompute:  # re-run the forward once the upstream gradient is here
                inputs = _gate_dict(inputs, list(upstream.values()))
                tape, outputs = self._taped_stage(s, inputs, training)
            grad_keys = self._grad_keys(s, inputs)
            variables = [self.variables[i] for i in self.stage_variables[s]]
            keys = sorted(upstream)
            sources = [inputs[k] for k in grad_keys] + variables
            if keys:
                grads = tape.gradient([outputs[k] for k in keys], sources,
                                      output_gradients=[upstream[k] for k in keys],
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO)
            else:  # nothing differentiable leaves this stage
                grads = [tf.zeros_like(inputs[k]) for k in grad_keys] + \
                    [tf.zeros(tuple(v.shape), v.dtype) for v in variables]
            input_grads = dict(zip(grad_keys, grads[:len(grad_keys)]))
            var_grads = [_dense(g) for g in grads[len(grad_keys):]]
            acc = st.acc.get(s)
            st.acc[s] = var_grads if acc is None else [a + g for a, g in zip(acc, var_grads)]
        if s > 0:
            st.upstream[(s - 1, m)] = input_grads
        # The device's next task waits for the gradients this task sends upstream; its
        # weight gradients may overlap that task (as in an unsplit backward pass). Stage 0
        # sends nothing, so there the accumulated weight gradients mark the task's end.
        st.last[self._deps_key(s)] = list(input_grads.values()) or st.acc[s]

    # ------------------------------------------------------------------ a step

    def split(self, batch: Mapping[str, tf.Tensor]) -> List[Carry]:
        """The batch keys stage 0 needs, split into M microbatches along axis 0 (one part
        when the microbatches are fused)."""
        missing = [k for k in self.partition.batch_keys if k not in batch]
        if missing:
            raise ValueError(f"the batch lacks {missing}; stage 0 needs {self.partition.batch_keys}")
        m = self.microbatches
        with tf.device(self.devices[0]):
            parts = {}
            for k in self.partition.batch_keys:
                x = tf.convert_to_tensor(batch[k])
                n = x.shape[0]
                if n is not None and n % m:
                    raise ConfigError(f"pipeline.microbatches: a batch of {n} examples does "
                                      f"not split into {m} equal microbatches")
                parts[k] = [x] if self.runs == 1 else tf.split(x, m, axis=0)
        return [{k: parts[k][i] for k in parts} for i in range(self.runs)]

    def gradients(self, batch: Mapping[str, tf.Tensor], training: Any = True,
                  loss_scale: Optional[Any] = None):
        """One step: ``(mean loss [], grads aligned with self.variables, stats)``.

        ``stats["loss"]`` is the per-example loss ``[B]`` and ``stats[k]`` every other final
        output (e.g. ``t`` when the partition was made with ``final_outputs=("loss", "t")``).
        With ``loss_scale`` the gradients are those of ``loss_scale * objective`` (mixed
        precision); the returned loss is not scaled.
        """
        first = batch[self.partition.batch_keys[0]]
        if self.global_batch:
            total = tf.constant(float(self.global_batch), tf.float32)
        else:
            total = tf.cast(tf.shape(first)[0], tf.float32)
        scale = 1.0 / total if loss_scale is None else tf.cast(loss_scale, tf.float32) / total
        self.sent_keys = []
        st = _Step(self.split(batch))
        for task in self.tasks:
            if task.kind == "F":
                self._forward(task, st, training)
            else:
                self._backward(task, st, training, scale)
        return self._finish(st, total)

    def _finish(self, st: _Step, total: tf.Tensor):
        grads: List[Optional[tf.Tensor]] = [None] * len(self.variables)
        for s, idx in enumerate(self.stage_variables):
            for i, g in zip(idx, st.acc[s]):
                grads[i] = g
        for i, g in enumerate(grads):
            if g is None:  # a variable no stage uses
                v = self.variables[i]
                grads[i] = tf.zeros(v.shape, v.dtype)
        with tf.device(self.devices[-1]):
            results = [st.results[m] for m in range(self.runs)]
            stats = {k: tf.concat([r[k] for r in results], axis=0) if self.runs > 1
                     else results[0][k] for k in self.partition.final_outputs}
            loss = tf.reduce_sum(tf.cast(stats[LOSS_KEY], tf.float32)) / total
        return loss, grads, stats


def build_executor(unet, objective, pipeline: PipelineConfig, global_batch: Optional[int] = None,
                   report_keys: Sequence[str] = (), partition: Optional[Partition] = None,
                   devices: Optional[Sequence[str]] = None) -> PipelineExecutor:
    """An executor for ``objective`` (``front``/``loss`` methods, ``front_spec``/``loss_spec``).

    ``report_keys`` (e.g. ``("t",)``) ride to the last stage and come back in ``stats``.
    """
    if partition is None:
        partition = partition_unet(unet, pipeline, objective.front_spec, objective.loss_spec,
                                   (LOSS_KEY,) + tuple(report_keys))
    return PipelineExecutor(unet, objective.front, objective.loss, partition, pipeline,
                            devices=devices, global_batch=global_batch)


def build_placed_executor(build_fn: Callable[[], Any], objective, pipeline: PipelineConfig,
                          global_batch: Optional[int] = None, report_keys: Sequence[str] = ()):
    """``(unet, executor)`` with stage s's variables created on device s (see
    :func:`~.devices.build_on_stage_devices`); ``build_fn`` e.g. ``lambda: build_unet(cfg.model)``.
    """
    unet, partition, devices = build_on_stage_devices(
        build_fn, pipeline, objective.front_spec, objective.loss_spec,
        (LOSS_KEY,) + tuple(report_keys))
    executor = PipelineExecutor(unet, objective.front, objective.loss, partition, pipeline,
                                devices=devices, global_batch=global_batch)
    return unet, executor
