"""Devices for pipeline stages, and building a U-Net with each stage's variables on its device.

Stage ``s`` runs on device ``device_mapping[s]``: GPU ``i`` when there are enough GPUs
(``pipeline.device_type`` "auto" or "gpu"), else logical CPU ``i``. Logical CPUs must be
configured before TensorFlow initialises its runtime, so the CLI calls
:func:`prepare_devices` first thing (tests/conftest.py does the same for tests).

Variables are created when the U-Net is built, before anyone knows the cut. So
:func:`build_on_stage_devices` builds the network twice: a probe build records the order in
which variables are created and which stage owns each (from the probe's stage models); the
real build then creates the i-th variable under ``tf.device`` of its owner's device, via
``tf.variable_creator_scope`` (works for Keras 3 and tf_keras alike). Building is
deterministic, so the orders agree; a mismatch in the count raises.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import tensorflow as tf

from ipu_diffusion.config import ConfigError, PipelineConfig
from ipu_diffusion.models.carry import BlockSpec
from ipu_diffusion.pipeline.partition import LOSS_KEY, Partition, device_mapping, partition_unet


def configure_logical_cpus(count: int) -> int:
    """Split the host CPU into ``count`` logical devices (before TensorFlow initialises;
    afterwards this is a no-op). Returns the number of logical CPUs now available."""
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * int(count))
    except RuntimeError:  # runtime already initialised: keep what exists
        pass
    return len(tf.config.list_logical_devices("CPU"))


def _use_gpus(pipeline: PipelineConfig, needed: int, available: int) -> bool:
    if pipeline.device_type == "gpu":
        if available < needed:
            raise ConfigError(f"pipeline.device_type: 'gpu' with device_mapping "
                              f"{list(device_mapping(pipeline))} needs {needed} GPUs, found "
                              f"{available}")
        return True
    return pipeline.device_type == "auto" and available >= needed


def prepare_devices(pipeline: PipelineConfig) -> str:
    """Start-up hook for the CLI: make enough logical CPUs when the stages will run on CPU.
    Returns "GPU" or "CPU", the device type the stages will use."""
    needed = max(device_mapping(pipeline)) + 1
    if _use_gpus(pipeline, needed, len(tf.config.list_physical_devices("GPU"))):
        return "GPU"
    if needed > 1:
        configure_logical_cpus(needed)
    return "CPU"


def stage_devices(pipeline: PipelineConfig) -> List[str]:
    """Full device names of the stages, ``[name of device_mapping[s]]``."""
    mapping = device_mapping(pipeline)
    needed = max(mapping) + 1
    gpus = tf.config.list_logical_devices("GPU")
    if _use_gpus(pipeline, needed, len(gpus)):
        return [gpus[i].name for i in mapping]
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < needed:
        raise ConfigError(
            f"pipeline.device_mapping: {list(mapping)} needs {needed} devices but there are "
            f"{len(gpus)} GPUs and {len(cpus)} logical CPUs; call "
            "ipu_diffusion.pipeline.devices.prepare_devices(cfg.pipeline) before TensorFlow "
            "starts, or map several stages to one device")
    return [cpus[i].name for i in mapping]


def same_device(a: str, b: str) -> bool:
    """Whether two device strings name the same device type and index."""
    da, db = tf.DeviceSpec.from_string(a or ""), tf.DeviceSpec.from_string(b or "")
    return ((da.device_type or "").upper(), da.device_index or 0) == \
        ((db.device_type or "").upper(), db.device_index or 0)


def raw_variable(v: Any) -> Any:
    """The tf.Variable behind a Keras 3 variable (``v.value``), or ``v`` itself."""
    return v if isinstance(v, tf.Variable) else getattr(v, "value", v)


def variable_device(v: Any) -> str:
    return raw_variable(v).device


def _record_owners(build_fn: Callable[[], Any], partition_fn: Callable[[Any], Partition]):
    created: List[Any] = []

    def record(next_creator, **kwargs):
        var = next_creator(**kwargs)
        created.append(var)
        return var

    with tf.variable_creator_scope(record):
        probe = build_fn()
    partition = partition_fn(probe)
    index = {id(v): i for i, v in enumerate(created)}
    owners: List[Optional[int]] = [None] * len(created)
    for s, model in enumerate(probe.stage_models_for_ranges(partition.ranges)):
        for v in model.variables:
            i = index.get(id(raw_variable(v)))
            if i is not None and owners[i] is None:
                owners[i] = s
    return owners, partition


def build_on_stage_devices(build_fn: Callable[[], Any], pipeline: PipelineConfig,
                           front: BlockSpec, loss: BlockSpec,
                           final_outputs: Sequence[str] = (LOSS_KEY,),
                           fits: Optional[Callable[[int, int, int], bool]] = None
                           ) -> Tuple[Any, Partition, List[str]]:
    """Build ``build_fn()`` (e.g. ``lambda: build_unet(cfg.model)``) with the variables of
    stage s on device s. Returns ``(unet, partition, devices)`` for :class:`PipelineExecutor`."""
    devices = stage_devices(pipeline)
    owners, partition = _record_owners(
        build_fn, lambda u: partition_unet(u, pipeline, front, loss, final_outputs, fits))
    counter = [0]

    def place(next_creator, **kwargs):
        i = counter[0]
        counter[0] += 1
        owner = owners[i] if i < len(owners) else None
        if owner is None:
            return next_creator(**kwargs)
        with tf.device(devices[owner]):
            return next_creator(**kwargs)

    with tf.variable_creator_scope(place):
        unet = build_fn()
    if counter[0] != len(owners):
        raise RuntimeError(f"build_fn created {counter[0]} variables, the probe build "
                           f"{len(owners)}; building must be deterministic")
    return unet, partition, devices
