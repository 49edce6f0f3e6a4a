"""Per-stage memory model of a pipelined training step.

For stage ``s`` of ``S`` with ``P_s`` parameters, micro-batch ``b`` and ``M`` microbatches
(``e`` bytes per element, 4 for float32)::

    weights      = e * P_s
    gradients    = e * P_s                       (the gradient accumulator)
    optimizer    = slots * e * P_s               (Adam: m and v, 2 slots)
    ema          = e * P_s                       (the EMA copy of the weights, if kept)
    stash        = depth(s) * (I_s + A_s)        without recomputation
                 = depth(s) * I_s                with recomputation
    working      = e * P_s                       one microbatch's gradients before they join
                                                 the accumulator
                 + A_s                           with recomputation: one microbatch's
                                                 activations while it is recomputed
    total        = weights + gradients + optimizer + ema + stash + working

``I_s`` = bytes of the stage's inputs for one micro-batch (the live carry keys received,
exact, from the partition's liveness); ``A_s`` = bytes of the activations its backward
pass keeps for one micro-batch: ``activation_multiplier`` times the output of every
block (``block_info()["output_shapes"]``), unless the block info carries its own
``"activation_elements"``.

The multiplier (10) and the ``e * P_s`` working term are **fitted to measurements**, not
derived: ``benchmarks/memory.py`` compares :func:`host_total` with TensorFlow's CPU allocator peak
for the digits and DDPM CIFAR-10 networks, S in {1, 2, 4}, recomputation on and off
(``results/memory.json``; all within 25%). The first version counted 4 tensors per
block output and no gradient buffer, and was 2.3x low for one stage. A residual block
keeps about ten tensors the size of its output for backprop: the two GroupNorm inputs
with their normalised copies, the swish inputs and outputs, the conv inputs, the dropout
mask and its output; an attention block keeps q, k, v and its logits and softmax weights.
On an IPU the same tensors are live, but Poplar's liveness, its code and exchange buffers
are not in this count: there it is a planning estimate that has not been checked against
a real IPU's memory report.

Stash depth ``depth(s)``: how many microbatches' forward state stage ``s`` holds at once.

* ``backend="fallback"`` (this package's plain-TF executor, :mod:`.fallback`):
  grouped ``M`` (all forwards before any backward, as in GPipe); interleaved
  ``min(M, S - s)`` (one-forward-one-backward: stage s runs ``S - s - 1`` warm-up
  forwards, then alternates); sequential ``1``. These equal the maximum in-flight counts
  of the executor's task lists (:func:`ipu_diffusion.pipeline.schedule.max_in_flight`;
  tested).
* ``backend="ipu"`` (Graphcore's Poplar pipeline): the forward-to-backward FIFO of stage
  ``s`` has depth ``k * (S - 1 - s)`` with ``k = 2`` for Grouped, ``1`` for Interleaved
  and ``0`` for Sequential (graphcore/tensorflow,
  ``tensorflow/compiler/plugin/poplar/driver/passes/pipeline_fifo_inserter.cc``:
  ``CreateFifo(..., fifo_depth_multiplier * (last_stage_id - stage_id.id))``, and
  ``driver/tools/pipeline_util.cc`` ``GetFifoDepthMultiplier``); with the microbatch in
  flight that is ``k * (S - 1 - s) + 1`` microbatches: ``2 (S - s) - 1`` for Grouped,
  ``S - s`` for Interleaved, 1 for Sequential. The FIFOs are allocated statically, so the
  depth does not shrink when ``M`` is small. With recomputation Poplar stashes only the
  stage inputs (the FIFOs then carry the inputs; ``pipeline_recomputation_stage_inserter``)
  — the same ``I_s`` / ``A_s`` split as above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

from ipu_diffusion.config import PIPELINE_SCHEDULES as SCHEDULES
BACKENDS = ("fallback", "ipu")
_IPU_FIFO_MULTIPLIER = {"grouped": 2, "interleaved": 1, "sequential": 0}


def stash_depth(schedule: str, num_stages: int, stage: int, microbatches: int,
                backend: str = "fallback") -> int:
    """Microbatches whose forward state stage ``stage`` (0-based) holds at once."""
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline.schedule: {schedule!r} is not one of {SCHEDULES}")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} outside 0..{num_stages - 1}")
    if backend == "ipu":
        return _IPU_FIFO_MULTIPLIER[schedule] * (num_stages - 1 - stage) + 1
    if backend != "fallback":
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    if schedule == "grouped":
        return microbatches
    if schedule == "interleaved":
        return min(microbatches, num_stages - stage)
    return 1


@dataclass(frozen=True)
class MemorySpec:
    """What the estimate depends on besides the partition (defaults: Adam + EMA, fp32)."""

    micro_batch: int
    microbatches: int = 1
    schedule: str = "grouped"
    recompute: bool = False
    backend: str = "fallback"
    bytes_per_element: int = 4
    optimizer_slots: int = 2
    ema: bool = True
    activation_multiplier: float = 10.0  # measured on CPU: see the module doc


@dataclass(frozen=True)
class StageMemory:
    """Bytes of one stage's device; ``state`` = weights + gradients + optimizer + ema;
    ``inputs``: one micro-batch's stage inputs (part of ``stash``)."""

    weights: int
    gradients: int
    optimizer: int
    ema: int
    stash: int
    working: int
    depth: int
    inputs: int = 0

    @property
    def state(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.ema

    @property
    def total(self) -> int:
        return self.state + self.stash + self.working


def _elements(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def activation_elements(info: Mapping, multiplier: float) -> float:
    """Per-example activation elements one block keeps for backprop (see module doc)."""
    if "activation_elements" in info:
        return float(info["activation_elements"])
    return multiplier * sum(_elements(s) for s in info["output_shapes"].values())


def stage_memory(params: int, input_elements: int, act_elements: float, stage: int,
                 num_stages: int, spec: MemorySpec) -> StageMemory:
    """The estimate for one stage from per-example element counts (module doc formulas)."""
    e, b = spec.bytes_per_element, spec.micro_batch
    depth = stash_depth(spec.schedule, num_stages, stage, spec.microbatches, spec.backend)
    inputs, acts = e * b * input_elements, int(e * b * act_elements)
    if spec.recompute:
        stash, working = depth * inputs, acts
    else:
        stash, working = depth * (inputs + acts), 0
    return StageMemory(weights=e * params, gradients=e * params,
                       optimizer=spec.optimizer_slots * e * params,
                       ema=e * params if spec.ema else 0, stash=stash,
                       working=working + e * params, depth=depth, inputs=inputs)


def estimate_partition(partition, block_info: Sequence[Mapping], spec: MemorySpec,
                       extra_shapes: Mapping[str, Tuple[int, ...]]) -> List[StageMemory]:
    """:func:`stage_memory` for every stage of a :class:`~.partition.Partition`."""
    from ipu_diffusion.pipeline.partition import boundary_elements

    out = []
    for s, (start, stop) in enumerate(partition.ranges):
        infos = block_info[start:stop]
        inputs = sum(boundary_elements(partition, block_info, s, extra_shapes).values())
        acts = sum(activation_elements(i, spec.activation_multiplier) for i in infos)
        params = sum(int(i["params"]) for i in infos)
        out.append(stage_memory(params, inputs, acts, s, partition.num_stages, spec))
    return out


def host_total(partition, block_info: Sequence[Mapping], mems: Sequence[StageMemory],
               spec: MemorySpec, extra_shapes: Mapping[str, Tuple[int, ...]]) -> int:
    """Peak bytes of the whole step when every stage shares one allocator (the fallback
    on one host's logical CPUs), from the per-stage estimates ``mems``:

    * the state of every stage;
    * without recomputation, the activations every stage stashes and stage 0's inputs:
      a later stage's inputs are tensors an earlier stage keeps for its own backward;
    * with recomputation, every stage's stashed inputs, each tensor once: a skip that
      crosses several stage boundaries is one tensor here (one copy per device on IPUs);
    * the largest ``working`` of one stage: the stages' backward passes take turns.
    """
    from ipu_diffusion.pipeline.partition import boundary_elements

    e, b = spec.bytes_per_element, spec.micro_batch
    total = sum(m.state for m in mems) + max(m.working for m in mems)
    if not spec.recompute:
        acts = sum(m.stash - m.depth * m.inputs for m in mems)
        return total + acts + mems[0].depth * mems[0].inputs
    held: Dict[Tuple[str, int], Tuple[int, int]] = {}  # (key, writer block) -> elements, depth
    for s in range(partition.num_stages):
        start = partition.ranges[s][0]
        for key, n in boundary_elements(partition, block_info, s, extra_shapes).items():
            writer = max((i for i in range(start) if key in block_info[i]["output_shapes"]),
                         default=-1)
            _, depth = held.get((key, writer), (n, 0))
            held[(key, writer)] = (n, max(depth, mems[s].depth))
    return total + sum(e * b * n * depth for n, depth in held.values())


def memory_fits(blocks, front, loss, block_info: Sequence[Mapping], spec: MemorySpec,
                extra_shapes: Mapping[str, Tuple[int, ...]], num_stages: int, budget: int,
                final_outputs: Sequence[str] = ("loss",)) -> Callable[[int, int, int], bool]:
    """A ``fits(s, start, stop)`` veto for :func:`~.partition.balance`: stage ``s`` of
    ``num_stages`` made of U-Net blocks ``[start, stop)`` stays within ``budget`` bytes."""
    from ipu_diffusion.models.carry import live_before
    from ipu_diffusion.pipeline.partition import LOSS_KEY

    chain = (front,) + tuple(blocks) + (loss,)
    live = live_before(chain, tuple(final_outputs))
    shapes: List[Dict[str, Tuple[int, ...]]] = []
    current: Dict[str, Tuple[int, ...]] = {LOSS_KEY: ()}
    current.update({k: tuple(v) for k, v in extra_shapes.items()})
    for info in block_info:
        shapes.append(dict(current))
        current.update({k: tuple(v) for k, v in info["output_shapes"].items()})
    params = [int(i["params"]) for i in block_info]
    acts = [activation_elements(i, spec.activation_multiplier) for i in block_info]

    def fits(s: int, start: int, stop: int) -> bool:
        keys = live[0] if s == 0 else live[start + 1]
        inputs = sum(_elements(shapes[start][k]) for k in keys)
        mem = stage_memory(sum(params[start:stop]), inputs, sum(acts[start:stop]), s,
                           num_stages, spec)
        return mem.total <= budget

    return fits
