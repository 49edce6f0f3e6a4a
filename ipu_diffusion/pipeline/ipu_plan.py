"""What the Poplar backend asks the IPUs for: a pure function of the run config.

:func:`ipu_plan` turns a :class:`~ipu_diffusion.config.RunConfig` (and, when known, the
U-Net's :class:`~ipu_diffusion.pipeline.partition.Partition` and ``block_info()``) into a
frozen :class:`IPUPlan` holding every value :mod:`ipu_diffusion.pipeline.ipu` passes to
the SDK; invalid combinations raise one :class:`~ipu_diffusion.config.ConfigError` naming
the keys. Nothing here imports TensorFlow or the SDK, so it is tested everywhere.

Rules (S stages, M = ``pipeline.microbatches``, R = ``ipu.replicas``, B =
``training.batch_size``):

* **IPUs.** Stage s runs on IPU ``device_mapping[s]`` of its replica (default s). A replica
  uses ``K = next_pow2(max(device_mapping) + 1)`` IPUs: multi-IPU devices come only in
  power-of-two sizes (``gc-info -l``; Graphcore's pipelining tests size their device the
  same way, ``get_num_ipus`` in ``pipelining_test_util.py``). The run asks for ``K * R``
  IPUs (``IPUConfig.auto_select_ipus``), so R must be a power of two as well, and
  ``K * R`` must fit the system (``system_ipus``, default an IPU-POD64): a replica may use
  IPUs ``0 .. system_ipus / R - 1`` only.
* **Batch.** B is the global batch: ``B = micro_batch * M * R`` exactly. M is the
  SDK's ``gradient_accumulation_steps_per_replica``; one weight update consumes one
  global batch.
* **Steps per execution** (``compile(steps_per_execution=k)``, counted in micro-batches
  per replica) must be a multiple of M (graphcore/keras ``keras/ipu/extensions/
  extensions_base.py``, ``_verify_and_get_gradient_accumulation_steps_per_replica``).
  ``ipu.steps_per_execution = 0`` chooses ``k = M * ceil(2 S / M)``: the smallest multiple
  of M that is at least 2 S. ``k / M`` weight updates run per execution, and
  ``training.steps`` and ``training.log_every`` must be multiples of it (callbacks and
  checkpoints happen between executions). :func:`fit_steps` converts updates into the
  ``steps_per_epoch`` the SDK's data adapter expects (all local replicas' steps).
* **Depth.** A pipelined M must be a multiple of, and at least, the schedule's overlap
  length: 2 S for Grouped, S for Interleaved, 1 for Sequential (:func:`overlap_length`).
* **Memory.** With a partition and block info, :mod:`ipu_diffusion.pipeline.memory`
  (backend ``"ipu"``) estimates each stage; stages sharing an IPU add up and each IPU
  must stay within its In-Processor Memory (1472 tiles x 624 KiB, about 900 MB, on a Mk2
  GC200 or Bow IPU; ``tiles_per_ipu`` tiles on the IPUModel emulator, where an overrun
  is only noted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ipu_diffusion.config import ConfigError, RunConfig

TILES_PER_IPU = {"ipu2": 1472, "ipu21": 1472}  # Mk2 GC200 and Bow IPU
# IPUConfig.ipu_model.version: 'Options are "ipu1" or "ipu2" (default)' (graphcore/tensorflow
# tensorflow/python/ipu/config.py, SDK 3.4); ipu_version's other choice is the Bow IPU
IPU_MODEL_VERSIONS = ("ipu2",)
TILE_BYTES = 624 * 1024  # In-Processor Memory per tile
DEFAULT_SYSTEM_IPUS = 64  # an IPU-POD64; pass system_ipus for other systems
FP16_LOSS_SCALE = 128.0  # static loss scale for mixed_float16 (see ipu.py)

SCHEDULES = {"grouped": "Grouped", "interleaved": "Interleaved", "sequential": "Sequential"}
RECOMPUTATION_MODES = {
    "auto": "Auto",
    "recompute_then_backpropagate": "RecomputeThenBackpropagate",
    "recompute_and_backpropagate_interleaved": "RecomputeAndBackpropagateInterleaved",
}


@dataclass(frozen=True)
class IPUPlan:
    """Every value the IPU backend passes to the SDK, worked out from the config.

    Names of enum members (``schedule``, ``recomputation_mode``) are those of
    ``ipu.ops.pipelining_ops.PipelineSchedule`` / ``RecomputationMode``. Byte estimates
    (``stage_bytes`` per stage, ``ipu_bytes`` per IPU of a replica) are empty when the
    plan was made without a partition and block info.
    """

    num_stages: int
    device_mapping: Tuple[int, ...]
    ipus_per_replica: int
    replicas: int
    total_ipus: int
    system_ipus: int
    microbatches: int
    micro_batch: int
    global_batch: int
    steps_per_execution: int
    schedule: str
    allow_recompute: bool
    recomputation_mode: str
    available_memory_proportion: Tuple[float, ...]
    half_precision: bool
    partials_type: str
    loss_scale: float
    offload_optimizer_state: bool
    ipu_model: bool
    tiles_per_ipu: int
    ipu_version: str
    memory_budget: int
    stage_ranges: Tuple[Tuple[int, int], ...] = ()
    stage_bytes: Tuple[int, ...] = ()
    ipu_bytes: Tuple[int, ...] = ()
    notes: Tuple[str, ...] = ()

    @property
    def pipelined(self) -> bool:
        """The SDK's pipeline needs at least two computational stages."""
        return self.num_stages > 1

    @property
    def gradient_accumulation_steps_per_replica(self) -> int:
        return self.microbatches

    @property
    def updates_per_execution(self) -> int:
        return self.steps_per_execution // self.microbatches

    @property
    def compute_dtype(self) -> str:
        return "float16" if self.half_precision else "float32"

    @property
    def stochastic_rounding(self) -> bool:
        """Stochastic rounding of float16 results, as Graphcore's fp16 examples enable."""
        return self.half_precision


# --------------------------------------------------------------------------- helpers


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (``n >= 1``)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _mapping(cfg: RunConfig) -> Tuple[int, ...]:
    from ipu_diffusion.pipeline.partition import device_mapping

    mapping = device_mapping(cfg.pipeline)
    unused = sorted(set(range(max(mapping) + 1)) - set(mapping))
    if unused:
        raise ConfigError(f"pipeline.device_mapping: {list(mapping)} leaves IPU(s) {unused} of "
                          f"the replica without a stage; number the IPUs 0..{len(set(mapping)) - 1}")
    return mapping


def _check_ipu_count(cfg: RunConfig, mapping: Tuple[int, ...], system_ipus: int) -> int:
    """``ipus_per_replica``; ConfigError when the replicas do not fit the system."""
    p, r = cfg.pipeline, cfg.ipu.replicas
    if not is_pow2(r):
        raise ConfigError(f"ipu.replicas: {r} is not a power of two; IPU systems allocate "
                          "1, 2, 4, 8, ... IPUs, so replicas x IPUs per replica must be one")
    per_replica = system_ipus // r
    if per_replica < 1:
        raise ConfigError(f"ipu.replicas: {r} replicas need at least {r} IPUs but the system has "
                          f"{system_ipus}")
    need = next_pow2(max(mapping) + 1)
    if need > per_replica:
        if not p.device_mapping:
            raise ConfigError(
                f"pipeline.stages: {p.stages} stages need {need} IPUs per replica, but "
                f"ipu.replicas {r} on a {system_ipus}-IPU system leaves {per_replica} per replica; "
                "set pipeline.device_mapping to put several stages on one IPU, or lower ipu.replicas")
        raise ConfigError(
            f"pipeline.device_mapping: {list(mapping)} uses IPUs 0..{max(mapping)}, so {need} IPUs "
            f"per replica, beyond the {per_replica} that ipu.replicas {r} leaves on a "
            f"{system_ipus}-IPU system")
    return need


def _micro_batch(cfg: RunConfig) -> int:
    b, m, r = cfg.training.batch_size, cfg.pipeline.microbatches, cfg.ipu.replicas
    if b % (m * r):
        raise ConfigError(
            f"training.batch_size: the global batch {b} must equal micro-batch x "
            f"pipeline.microbatches {m} x ipu.replicas {r}, but {b} is not divisible by "
            f"{m} x {r} = {m * r}")
    return b // (m * r)


def _steps_per_execution(cfg: RunConfig) -> int:
    m, s, k = cfg.pipeline.microbatches, cfg.pipeline.stages, cfg.ipu.steps_per_execution
    if k == 0:
        k = m * -(-2 * s // m)  # smallest multiple of M >= 2 S
    elif k % m:
        raise ConfigError(f"ipu.steps_per_execution: {k} is not a multiple of "
                          f"pipeline.microbatches {m}; an execution must hold whole weight "
                          "updates (each consumes M micro-batches per replica)")
    u = k // m
    for key, value in (("training.steps", cfg.training.steps),
                       ("training.log_every", cfg.training.log_every)):
        if value % u:
            raise ConfigError(
                f"{key}: {value} is not a multiple of the {u} weight updates per execution "
                f"(ipu.steps_per_execution {k} / pipeline.microbatches {m}); callbacks and "
                "checkpoints run between executions")
    return k


def _schedule(cfg: RunConfig, mapping: Tuple[int, ...]) -> Tuple[str, str]:
    p, mode = cfg.pipeline, cfg.ipu.recomputation_mode
    if p.stages > 1 and p.schedule == "interleaved":
        if p.microbatches == 1:
            raise ConfigError("pipeline.schedule: 'interleaved' overlaps the microbatches of "
                              "gradient accumulation and needs pipeline.microbatches > 1")
        if len(set(mapping)) != len(mapping):
            raise ConfigError(f"pipeline.schedule: 'interleaved' cannot train several stages on "
                              f"one IPU (pipeline.device_mapping {list(mapping)}); use 'grouped' "
                              "or 'sequential'")
        if mode == "recompute_and_backpropagate_interleaved":
            raise ConfigError("ipu.recomputation_mode: 'recompute_and_backpropagate_interleaved' "
                              "is supported by the grouped and sequential schedules only, not "
                              "pipeline.schedule 'interleaved'")
    return SCHEDULES[p.schedule], RECOMPUTATION_MODES[mode]


def _precision(cfg: RunConfig) -> Tuple[bool, str, float]:
    """``(half_precision, partials_type, loss_scale)``."""
    precision, partials = cfg.training.precision, cfg.ipu.partials_type
    if precision == "mixed_bfloat16":
        raise ConfigError("training.precision: 'mixed_bfloat16' is not an IPU type (IPUs compute "
                          "in float16 and float32); use 'mixed_float16' or 'float32'")
    half = precision == "mixed_float16"
    if partials == "half" and not half:
        raise ConfigError("ipu.partials_type: 'half' partials need training.precision "
                          "'mixed_float16'; float32 convolutions and matmuls accumulate in float")
    return half, partials, FP16_LOSS_SCALE if half else 1.0


def _memory_proportions(cfg: RunConfig) -> Tuple[float, ...]:
    amp = tuple(cfg.ipu.available_memory_proportion)
    if amp and len(amp) != cfg.pipeline.stages:
        raise ConfigError(f"ipu.available_memory_proportion: needs one value per stage "
                          f"({cfg.pipeline.stages}), got {list(amp)}")
    bad = [v for v in amp if not 0.0 < v <= 1.0]
    if bad:
        raise ConfigError(f"ipu.available_memory_proportion: {bad} outside (0, 1]; it is the "
                          "fraction of tile memory convolutions and matmuls may use")
    return amp


def _emulator(cfg: RunConfig) -> Tuple[int, int]:
    """``(tiles_per_ipu, memory budget in bytes per IPU)``."""
    ipu = cfg.ipu
    if ipu.tiles_per_ipu and not ipu.ipu_model:
        raise ConfigError(f"ipu.tiles_per_ipu: {ipu.tiles_per_ipu} applies to the IPUModel "
                          "emulator only; set ipu.ipu_model true or leave it 0")
    if ipu.tiles_per_ipu < 0:
        raise ConfigError(f"ipu.tiles_per_ipu: {ipu.tiles_per_ipu} must be >= 0")
    if ipu.ipu_model and ipu.ipu_version not in IPU_MODEL_VERSIONS:
        raise ConfigError(
            f"ipu.ipu_version: {ipu.ipu_version!r} is not an IPUModel version; the emulator "
            f"takes {' or '.join(repr(v) for v in IPU_MODEL_VERSIONS)} "
            "(IPUConfig.ipu_model.version, graphcore/tensorflow tensorflow/python/ipu/config.py); "
            f"{ipu.ipu_version!r} is for hardware (ipu.ipu_model false)")
    tiles = ipu.tiles_per_ipu or TILES_PER_IPU[ipu.ipu_version]
    return tiles, tiles * TILE_BYTES


def _unsupported(cfg: RunConfig) -> List[str]:
    """ConfigError for what the pipelined Keras model cannot do; notes for ignored keys."""
    if cfg.diffusion.timestep_sampler == "loss_aware":
        raise ConfigError("diffusion.timestep_sampler: 'loss_aware' updates its loss history in "
                          "train_step, which pipelined IPU Keras models may not override; use "
                          "'uniform' on IPUs")
    notes = []
    if cfg.training.strategy != "default" or cfg.training.num_replicas:
        notes.append("training.strategy/num_replicas are ignored on IPUs; ipu.replicas sets "
                     "data parallelism")
    if cfg.training.steps_per_execution != 1:
        notes.append("training.steps_per_execution is ignored on IPUs; "
                     "ipu.steps_per_execution applies")
    if cfg.ipu.recomputation_mode != "auto" and not cfg.pipeline.recompute:
        notes.append("ipu.recomputation_mode has no effect while pipeline.recompute is false")
    return notes


# --------------------------------------------------------------------------- memory


def carry_shapes(cfg: RunConfig) -> Dict[str, Tuple[int, ...]]:
    """Per-example shapes of the carry keys no U-Net block writes: the batch (``x0``,
    ``key``, ``y``) and the forward diffusion's outputs (``x_t``, ``t``, ``noise``,
    ``weight``); memory.py needs them to size what crosses each stage boundary."""
    m = cfg.model
    image = (m.image_size, m.image_size, m.in_channels)
    shapes: Dict[str, Tuple[int, ...]] = {"x0": image, "x_t": image, "noise": image,
                                          "key": (), "t": (), "weight": ()}
    if m.num_classes:
        shapes["y"] = ()
    return shapes


def stage_bytes(cfg: RunConfig, partition, block_info: Sequence[Mapping],
                micro_batch: int) -> Tuple[int, ...]:
    """memory.py's estimate of each stage on the IPU (backend ``"ipu"``: the Poplar FIFO
    depths). Weights, gradients, Adam's two slots and the EMA copy are float32 (also
    under mixed_float16, whose weights stay float32: an upper bound for activations);
    ``ipu.offload_optimizer_state`` moves the slots and the EMA (weight-update-only
    variables) to Streaming Memory."""
    from ipu_diffusion.pipeline.memory import MemorySpec, estimate_partition

    offload = cfg.ipu.offload_optimizer_state
    spec = MemorySpec(micro_batch=micro_batch, microbatches=cfg.pipeline.microbatches,
                      schedule=cfg.pipeline.schedule, recompute=cfg.pipeline.recompute,
                      backend="ipu", bytes_per_element=4, optimizer_slots=0 if offload else 2,
                      ema=not offload)
    mems = estimate_partition(partition, block_info, spec, carry_shapes(cfg))
    return tuple(int(m.total) for m in mems)


def per_ipu(mapping: Sequence[int], per_stage: Sequence[int]) -> Tuple[int, ...]:
    """Sum the stages' bytes onto the IPUs they share (index = IPU of the replica)."""
    out = [0] * (max(mapping) + 1)
    for ipu, value in zip(mapping, per_stage):
        out[ipu] += int(value)
    return tuple(out)


def _check_memory(cfg: RunConfig, mapping: Tuple[int, ...], ipu_bytes: Sequence[int],
                  budget: int) -> List[str]:
    mib = 1 << 20
    over = [(i, b) for i, b in enumerate(ipu_bytes) if b > budget]
    if not over:
        return []
    i, b = over[0]
    stages = [s for s, d in enumerate(mapping) if d == i]
    where = (f"IPU {i} (stage{'s' if len(stages) > 1 else ''} "
             f"{', '.join(str(s) for s in stages)})")
    text = (f"{where} needs an estimated {b / mib:,.0f} MiB (pipeline/memory.py) but an "
            f"{'emulated ' if cfg.ipu.ipu_model else ''}{cfg.ipu.ipu_version} IPU has "
            f"{budget / mib:,.0f} MiB")
    if cfg.ipu.ipu_model:
        return [text + "; the emulator runs anyway"]
    raise ConfigError(
        f"pipeline.device_mapping / pipeline.stages: {text}. Spread the stages over more IPUs, "
        "set pipeline.recompute true, lower the micro-batch (raise pipeline.microbatches or "
        "ipu.replicas) or set ipu.offload_optimizer_state true")


# --------------------------------------------------------------------------- the plan


def ipu_plan(run_config: RunConfig, partition=None, block_info: Optional[Sequence[Mapping]] = None,
             system_ipus: Optional[int] = None) -> IPUPlan:
    """The :class:`IPUPlan` for ``run_config``; raises ConfigError naming the keys at fault.

    ``partition`` (from :func:`~ipu_diffusion.pipeline.partition.partition_unet`) fixes the
    stage ranges; with ``block_info`` as well (``unet.block_info()``), each IPU's memory is
    estimated and checked. ``system_ipus``: IPUs the system offers (default 64).
    """
    cfg = run_config
    system = int(system_ipus or DEFAULT_SYSTEM_IPUS)
    mapping = _mapping(cfg)
    per_replica = _check_ipu_count(cfg, mapping, system)
    micro = _micro_batch(cfg)
    spe = _steps_per_execution(cfg)
    schedule, mode = _schedule(cfg, mapping)
    half, partials, loss_scale = _precision(cfg)
    amp = _memory_proportions(cfg)
    tiles, budget = _emulator(cfg)
    _check_depth(cfg)
    notes = _unsupported(cfg)
    ranges: Tuple[Tuple[int, int], ...] = ()
    sizes: Tuple[int, ...] = ()
    ipu_sizes: Tuple[int, ...] = ()
    if partition is not None:
        ranges = _check_partition(cfg, partition, mapping)
        if block_info is not None:
            sizes = stage_bytes(cfg, partition, block_info, micro)
            ipu_sizes = per_ipu(mapping, sizes)
            notes += _check_memory(cfg, mapping, ipu_sizes, budget)
    return IPUPlan(
        num_stages=cfg.pipeline.stages, device_mapping=mapping, ipus_per_replica=per_replica,
        replicas=cfg.ipu.replicas, total_ipus=per_replica * cfg.ipu.replicas, system_ipus=system,
        microbatches=cfg.pipeline.microbatches, micro_batch=micro,
        global_batch=cfg.training.batch_size, steps_per_execution=spe, schedule=schedule,
        allow_recompute=cfg.pipeline.recompute, recomputation_mode=mode,
        available_memory_proportion=amp, half_precision=half, partials_type=partials,
        loss_scale=loss_scale, offload_optimizer_state=cfg.ipu.offload_optimizer_state,
        ipu_model=cfg.ipu.ipu_model, tiles_per_ipu=tiles, ipu_version=cfg.ipu.ipu_version,
        memory_budget=budget, stage_ranges=ranges, stage_bytes=sizes, ipu_bytes=ipu_sizes,
        notes=tuple(notes))


def overlap_length(schedule: str, stages: int) -> int:
    """The pipeline's overlap length in training: the accumulation count M must be a
    multiple of it and at least it (graphcore/tensorflow ``tensorflow/compiler/plugin/
    poplar/driver/visitors/pipeline_visitor.cc``, ``VerifyPipelineArguments``: "The number
    of iterations of the pipeline must be a multiple of %d"). It is the size of the
    schedule's union of stage offsets (``pipeline_visitor_utils.h``): Grouped, every stage
    op, forward and backward, so 2 S; Interleaved, the rotations of the stage-to-IPU list,
    S on distinct IPUs (the only kind it trains on); Sequential, 1."""
    return {"grouped": 2 * stages, "interleaved": stages, "sequential": 1}[schedule]


def _check_depth(cfg: RunConfig) -> None:
    p = cfg.pipeline
    if p.stages < 2:
        return
    n, m = overlap_length(p.schedule, p.stages), p.microbatches
    if m >= n and m % n == 0:
        return
    lower = m // n * n
    valid = sorted({v for v in (lower, lower + n) if v >= n})
    raise ConfigError(
        f"pipeline.microbatches: {m} microbatches cannot fill the {p.schedule} pipeline of "
        f"{p.stages} stages: the IPU compiler needs a multiple of {n} (at least {n}), e.g. "
        f"{' or '.join(str(v) for v in valid)} (pipeline_visitor.cc: 'The number of "
        "iterations of the pipeline must be a multiple of ...')")


def fit_steps(plan: IPUPlan, updates: int, local_replicas: int) -> int:
    """``steps_per_epoch`` for the SDK's ``fit`` to make ``updates`` weight updates.

    The IPU data adapter counts ``steps_per_epoch`` over all the process's replicas: each
    of the ``local_replicas`` runs ``steps_per_epoch // local_replicas`` micro-batch steps,
    which must be a multiple of ``steps_per_execution`` (graphcore/keras ``keras/ipu/
    extensions/data_adapter.py``, ``IPUDataHandler._infer_steps`` and
    ``_validate_data_handler``); M of them make one update. Under ``poprun`` each instance
    counts only its own replicas.
    """
    per_replica = int(updates) * plan.microbatches
    if updates < 1 or per_replica % plan.steps_per_execution:
        raise ValueError(f"{updates} weight updates are {per_replica} micro-batch steps per "
                         f"replica, not a positive multiple of steps_per_execution "
                         f"{plan.steps_per_execution} ({plan.updates_per_execution} updates)")
    return per_replica * int(local_replicas)


def _check_partition(cfg: RunConfig, partition, mapping: Tuple[int, ...]):
    if partition.num_stages != cfg.pipeline.stages or tuple(partition.device_mapping) != mapping:
        raise ValueError(f"the partition ({partition.num_stages} stages on "
                         f"{list(partition.device_mapping)}) was not made from this config "
                         f"({cfg.pipeline.stages} stages on {list(mapping)})")
    return tuple(tuple(r) for r in partition.ranges)


# --------------------------------------------------------------------------- report


def describe(plan: IPUPlan) -> str:
    """A plain-text table of the plan (what ``train-ipu`` prints before compiling)."""
    mib = 1.0 / (1 << 20)
    where = (f"IPUModel emulator, {plan.tiles_per_ipu} tiles per IPU" if plan.ipu_model
             else f"{plan.ipu_version} hardware")
    lines = [
        f"IPUs       {plan.num_stages} stage(s) on {plan.ipus_per_replica} IPU(s) per replica x "
        f"{plan.replicas} replica(s) = {plan.total_ipus} IPUs ({where}; system "
        f"{plan.system_ipus})",
        f"batch      global {plan.global_batch} = micro-batch {plan.micro_batch} x "
        f"{plan.microbatches} microbatches x {plan.replicas} replica(s)",
        f"execution  steps_per_execution {plan.steps_per_execution} micro-batches = "
        f"{plan.updates_per_execution} weight update(s)",
        f"pipeline   {'schedule ' + plan.schedule if plan.pipelined else 'not pipelined'}; "
        f"recompute {'on (' + plan.recomputation_mode + ')' if plan.allow_recompute else 'off'}",
        f"precision  {plan.compute_dtype}, partials {plan.partials_type}, loss scale "
        f"{plan.loss_scale:g}{', stochastic rounding' if plan.stochastic_rounding else ''}",
        "",
        f"{'stage':>5} {'ipu':>4} {'blocks':>10} {'avail.mem':>10} {'est. MiB':>10}",
    ]
    for s in range(plan.num_stages):
        blocks = ("%d..%d" % (plan.stage_ranges[s][0], plan.stage_ranges[s][1] - 1)
                  if plan.stage_ranges else "-")
        amp = ("%.2f" % plan.available_memory_proportion[s]
               if plan.available_memory_proportion else "default")
        est = "%.1f" % (plan.stage_bytes[s] * mib) if plan.stage_bytes else "-"
        lines.append(f"{s:>5} {plan.device_mapping[s]:>4} {blocks:>10} {amp:>10} {est:>10}")
    for i, b in enumerate(plan.ipu_bytes):
        lines.append(f"IPU {i}: {b * mib:,.1f} of {plan.memory_budget * mib:,.0f} MiB (estimate)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
