"""Cut the U-Net's ordered block list into contiguous pipeline stages.

The pipeline sees one *chain* of blocks over the carry::

    [front] + unet.blocks + [loss]

``front`` (the trainer's forward diffusion: ``x0, key [, y] -> x_t, t, noise, ...``) runs
first in stage 0, ``loss`` (``out, x0, ... -> loss [B]``) last in stage S-1; this module
knows nothing else about them. A :class:`PipelineConfig` gives the cut as ``cuts`` (names
of the blocks that start stages 1..S-1), as ``blocks_per_stage``, or as neither with
``stages > 1``: then the stages are balanced by per-block forward FLOPs (exact dynamic
programme over contiguous splits, optionally subject to a per-device memory budget).

What crosses each boundary is decided by liveness over the whole chain
(:func:`ipu_diffusion.models.carry.live_before`): a key is sent from stage s to s+1 iff
it is defined before the boundary and read at or after it (or is a final output). Nothing
dead is sent; a skip made in stage 0 and read in stage 3 rides through stages 1 and 2; the
batch enters stage 0 only, so ``x0`` rides to the loss (as on the IPU, where only stage 0
reads the infeed).

    part = partition_unet(unet, cfg.pipeline, objective.front_spec, objective.loss_spec)
    print(summary_table(part, unet.block_info(), micro_batch=4, extra_shapes={...}))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ipu_diffusion.config import ConfigError, PipelineConfig, validate_pipeline
from ipu_diffusion.models.carry import BlockSpec, live_before, stage_ranges

LOSS_KEY = "loss"
Range = Tuple[int, int]


@dataclass(frozen=True)
class Partition:
    """S contiguous stages of ``front + blocks + loss``.

    ``ranges[s] = (start, stop)`` indexes ``blocks`` (the U-Net's); ``boundary[s]`` is the
    sorted tuple of carry keys stage s receives (``boundary[0]``: the batch keys the chain
    needs) and ``boundary[S]`` the final outputs; so stage s sends ``boundary[s + 1]``.
    ``device_mapping[s]`` is the index of stage s's device.
    """

    front: BlockSpec
    blocks: Tuple[BlockSpec, ...]
    loss: BlockSpec
    ranges: Tuple[Range, ...]
    boundary: Tuple[Tuple[str, ...], ...]
    final_outputs: Tuple[str, ...]
    device_mapping: Tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.ranges)

    @property
    def chain(self) -> Tuple[BlockSpec, ...]:
        return (self.front,) + self.blocks + (self.loss,)

    @property
    def batch_keys(self) -> Tuple[str, ...]:
        """Keys the batch must provide (what stage 0 receives)."""
        return self.boundary[0]

    def inputs(self, s: int) -> Tuple[str, ...]:
        """Carry keys stage ``s`` receives."""
        return self.boundary[s]

    def sends(self, s: int) -> Tuple[str, ...]:
        """Carry keys stage ``s`` sends on (the last stage: the final outputs)."""
        return self.boundary[s + 1]

    def chain_range(self, s: int) -> Range:
        """Stage ``s`` as a ``(start, stop)`` range of :attr:`chain` (front and loss included)."""
        start, stop = self.ranges[s]
        return (0 if s == 0 else start + 1,
                len(self.blocks) + 2 if s == self.num_stages - 1 else stop + 1)

    def stage_blocks(self, s: int) -> Tuple[str, ...]:
        """Names of the U-Net blocks of stage ``s``."""
        start, stop = self.ranges[s]
        return tuple(b.name for b in self.blocks[start:stop])

    def differentiable(self, keys: Sequence[str]) -> Tuple[str, ...]:
        """The subset of ``keys`` written by U-Net blocks (the only ones that can carry a
        gradient to trainable variables: front and loss own none)."""
        written = {k for b in self.blocks for k in b.outputs}
        return tuple(k for k in keys if k in written)


# --------------------------------------------------------------------------- chain


def external_inputs(chain: Sequence[BlockSpec]) -> Tuple[str, ...]:
    """Keys the chain reads before any block writes them (sorted): the batch keys."""
    defined, needed = set(), set()
    for b in chain:
        needed |= {k for k in b.inputs if k not in defined}
        defined |= set(b.outputs)
    return tuple(sorted(needed))


def _check_chain(chain: Sequence[BlockSpec], final_outputs: Sequence[str]) -> None:
    names = [b.name for b in chain]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"block names must be unique; repeated: {dupes}")
    produced = set(external_inputs(chain)) | {k for b in chain for k in b.outputs}
    missing = [k for k in final_outputs if k not in produced]
    if missing:
        raise ValueError(f"final outputs {missing} are written by no block of the chain "
                         f"{names}")


# --------------------------------------------------------------------------- ranges


def ranges_from_sizes(sizes: Sequence[int], num_blocks: int, names: Sequence[str]) -> List[Range]:
    """``blocks_per_stage`` (checked by :func:`validate_pipeline`) -> ranges; ConfigError
    unless they sum to ``num_blocks``."""
    if sum(sizes) != num_blocks:
        raise ConfigError(f"pipeline.blocks_per_stage: {list(sizes)} sums to {sum(sizes)} but the "
                          f"U-Net has {num_blocks} blocks: {', '.join(names)}")
    stops = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    return list(zip([0] + stops[:-1], stops))


def balance(costs: Sequence[float], num_stages: int,
            fits: Optional[Callable[[int, int, int], bool]] = None) -> List[Range]:
    """Contiguous split of ``costs`` into ``num_stages`` non-empty ranges minimising the
    largest stage cost (exact DP, O(S N^2)); ``fits(s, start, stop)`` may veto a stage
    (e.g. the memory model). Ties go to the earliest cut. Raises ConfigError if no split fits.
    """
    n, big = len(costs), float("inf")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    ok = fits or (lambda s, i, j: True)
    # best[s][j]: minimal max cost of stages 0..s covering blocks [0, j); arg[s][j]: start of s
    best = [[big] * (n + 1) for _ in range(num_stages)]
    arg = [[-1] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        if ok(0, 0, j):
            best[0][j] = prefix[j]
    for s in range(1, num_stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                if best[s - 1][i] == big or not ok(s, i, j):
                    continue
                value = max(best[s - 1][i], prefix[j] - prefix[i])
                if value < best[s][j]:
                    best[s][j], arg[s][j] = value, i
    if best[num_stages - 1][n] == big:
        raise ConfigError(f"pipeline.stages: no split of the {n} blocks into {num_stages} stages "
                          "fits the memory budget; add stages or lower the micro-batch size")
    ranges, stop = [], n
    for s in reversed(range(1, num_stages)):
        start = arg[s][stop]
        ranges.append((start, stop))
        stop = start
    ranges.append((0, stop))
    return list(reversed(ranges))


def _ranges(blocks: Sequence[BlockSpec], pipeline: PipelineConfig,
            costs: Optional[Sequence[float]],
            fits: Optional[Callable[[int, int, int], bool]]) -> List[Range]:
    validate_pipeline(pipeline)
    names = [b.name for b in blocks]
    s = pipeline.stages
    if s > len(blocks):
        raise ConfigError(f"pipeline.stages: {s} stages but the U-Net has only {len(blocks)} "
                          f"blocks ({', '.join(names)}); every stage needs at least one block")
    if pipeline.cuts:
        try:
            return stage_ranges(blocks, pipeline.cuts)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if pipeline.blocks_per_stage:
        return ranges_from_sizes(pipeline.blocks_per_stage, len(blocks), names)
    if s == 1:
        return [(0, len(blocks))]
    if costs is None:
        raise ValueError("automatic balancing (pipeline.stages > 1 without cuts or "
                         "blocks_per_stage) needs per-block costs")
    return balance(costs, s, fits)


def device_mapping(pipeline: PipelineConfig) -> Tuple[int, ...]:
    """``pipeline.device_mapping`` or ``0..S-1``; ConfigError (:func:`validate_pipeline`)
    on a length mismatch or a negative device."""
    validate_pipeline(pipeline)
    return tuple(pipeline.device_mapping) or tuple(range(pipeline.stages))


# --------------------------------------------------------------------------- partition


def make_partition(blocks: Sequence[BlockSpec], pipeline: PipelineConfig, front: BlockSpec,
                   loss: BlockSpec, block_costs: Optional[Sequence[float]] = None,
                   final_outputs: Sequence[str] = (LOSS_KEY,),
                   fits: Optional[Callable[[int, int, int], bool]] = None) -> Partition:
    """Stages of ``[front] + blocks + [loss]`` as ``pipeline`` asks.

    ``block_costs`` (one per U-Net block, e.g. forward FLOPs) are needed only for automatic
    balancing; ``fits(s, start, stop)`` optionally vetoes candidate stages there.
    ``final_outputs``: keys the last stage returns (``loss`` plus any the caller wants
    reported, e.g. ``t``). Raises ConfigError naming the ``pipeline.<key>`` at fault.
    """
    blocks = tuple(blocks)
    chain = (front,) + blocks + (loss,)
    _check_chain(chain, final_outputs)
    ranges = _ranges(blocks, pipeline, block_costs, fits)
    mapping = device_mapping(pipeline)
    live = live_before(chain, tuple(final_outputs))
    starts = [0] + [start + 1 for start, _ in ranges[1:]]
    boundary = tuple(live[i] for i in starts) + (live[len(chain)],)
    return Partition(front, blocks, loss, tuple(ranges), boundary, tuple(final_outputs), mapping)


def partition_unet(unet, pipeline: PipelineConfig, front: BlockSpec, loss: BlockSpec,
                   final_outputs: Sequence[str] = (LOSS_KEY,),
                   fits: Optional[Callable[[int, int, int], bool]] = None) -> Partition:
    """:func:`make_partition` for a U-Net object (``blocks``, ``block_info()`` flops)."""
    costs = None
    if pipeline.stages > 1 and not pipeline.cuts and not pipeline.blocks_per_stage:
        costs = [float(info["flops"]) for info in unet.block_info()]
    return make_partition(unet.blocks, pipeline, front, loss, costs, final_outputs, fits)


# --------------------------------------------------------------------------- shapes, summary


def shapes_at(partition: Partition, block_info: Sequence[Mapping], index: int,
              extra_shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """Per-example shape of every carry key defined before U-Net block ``index`` (a key such
    as ``h`` changes shape along the network): the latest block output, else
    ``extra_shapes`` (batch keys, front outputs, e.g. ``x0``, ``noise``, ``t``)."""
    shapes: Dict[str, Tuple[int, ...]] = {LOSS_KEY: ()}
    shapes.update({k: tuple(v) for k, v in extra_shapes.items()})
    for info in block_info[:index]:
        shapes.update({k: tuple(v) for k, v in info["output_shapes"].items()})
    return shapes


def boundary_elements(partition: Partition, block_info: Sequence[Mapping], s: int,
                      extra_shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, int]:
    """Per-example element count of each key stage ``s`` receives (``s = S``: final outputs)."""
    index = partition.ranges[s][0] if s < partition.num_stages else len(partition.blocks)
    shapes = shapes_at(partition, block_info, index, extra_shapes)
    out = {}
    for k in partition.boundary[s]:
        if k not in shapes:
            raise ValueError(f"shape of carry key {k!r} is unknown; pass it in extra_shapes "
                             f"(known: {sorted(shapes)})")
        n = 1
        for d in shapes[k]:
            n *= int(d)
        out[k] = n
    return out


def summary_table(partition: Partition, block_info: Sequence[Mapping], micro_batch: int,
                  extra_shapes: Mapping[str, Tuple[int, ...]], microbatches: int = 1,
                  schedule: str = "grouped", recompute: bool = False, backend: str = "fallback",
                  bytes_per_element: int = 4) -> str:
    """Per stage: blocks (first..last), params, forward GFLOPs/example, bytes sent to the
    next stage per micro-batch (keys listed) and the memory estimate of
    :mod:`ipu_diffusion.pipeline.memory` (weights+grads+Adam+EMA, stash, total) in MiB."""
    from ipu_diffusion.pipeline.memory import MemorySpec, estimate_partition

    spec = MemorySpec(micro_batch=micro_batch, microbatches=microbatches, schedule=schedule,
                      recompute=recompute, backend=backend, bytes_per_element=bytes_per_element)
    mems = estimate_partition(partition, block_info, spec, extra_shapes)
    mib = 1.0 / (1 << 20)
    head = (f"{'stage':>5} {'dev':>3}  {'blocks':<28} {'params':>10} {'GFLOP/ex':>9} "
            f"{'sent/mb':>10}  {'state MiB':>9} {'stash MiB':>9} {'total MiB':>9}  sends")
    lines = [head, "-" * len(head)]
    for s, (start, stop) in enumerate(partition.ranges):
        infos = block_info[start:stop]
        names = partition.stage_blocks(s)
        span = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
        sent = sum(boundary_elements(partition, block_info, s + 1, extra_shapes).values())
        m = mems[s]
        lines.append(
            f"{s:>5} {partition.device_mapping[s]:>3}  {span:<28} "
            f"{sum(int(i['params']) for i in infos):>10,} "
            f"{sum(float(i['flops']) for i in infos) / 1e9:>9.4f} "
            f"{sent * micro_batch * bytes_per_element:>10,}  {m.state * mib:>9.2f} "
            f"{(m.stash + m.working) * mib:>9.2f} {m.total * mib:>9.2f}  "
            f"{','.join(partition.sends(s))}")
    return "\n".join(lines)
