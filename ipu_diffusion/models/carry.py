"""Blocks over a carry, and liveness.

A network is an ordered list of blocks. Each block reads some named entries of the
*carry* (a dict of tensors such as ``h``, ``emb``, ``skip_3``, ``key``) and writes
others. Cutting the list into contiguous stages, the entries that must cross the
boundary before block ``i`` are exactly those that are *live* there: written by an
earlier block (or given as an input) and read by block ``i`` or a later one (or wanted
as a final output). Nothing dead is sent; a skip written in stage 0 and read in stage 3
rides through stages 1 and 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple


@dataclass(frozen=True)
class BlockSpec:
    """A block's name and the carry keys it reads and writes."""

    name: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]


def live_before(blocks: Sequence[BlockSpec], final_outputs: Sequence[str]) -> List[Tuple[str, ...]]:
    """Live carry keys before each block, plus one entry after the last block.

    Returns ``live[i]`` for ``i`` in ``0..len(blocks)``: the keys that a stage starting at
    block ``i`` must receive (``live[len(blocks)]`` is ``final_outputs``). Keys are sorted.
    Standard backward dataflow: live_in(b) = reads(b) | (live_out(b) - writes(b)).
    """
    live = set(final_outputs)
    result = [tuple(sorted(live))]
    for block in reversed(blocks):
        live = (live - set(block.outputs)) | set(block.inputs)
        result.append(tuple(sorted(live)))
    return list(reversed(result))


def stage_ranges(blocks: Sequence[BlockSpec], cuts: Sequence[str]) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` block index ranges for stages that begin at ``cuts``.

    ``cuts`` names the first block of stages 1..S-1, in order. Raises ValueError naming an
    unknown block, a cut out of order or one that would leave a stage empty.
    """
    index: Dict[str, int] = {b.name: i for i, b in enumerate(blocks)}
    starts = [0]
    for name in cuts:
        if name not in index:
            raise ValueError(f"pipeline.cuts: unknown block {name!r}; blocks are: "
                             + ", ".join(b.name for b in blocks))
        i = index[name]
        if i <= starts[-1]:
            what = "an empty first stage" if i == 0 else "stages out of order or empty"
            raise ValueError(f"pipeline.cuts: cut at {name!r} (block {i}) makes {what}; cuts "
                             "must name blocks in increasing order, after the first block")
        starts.append(i)
    stops = starts[1:] + [len(blocks)]
    return list(zip(starts, stops))


def check_defined(blocks: Sequence[BlockSpec], inputs: Sequence[str]) -> None:
    """Raise ValueError if a block reads a key that no earlier block or input wrote."""
    defined = set(inputs)
    for b in blocks:
        missing = [k for k in b.inputs if k not in defined]
        if missing:
            raise ValueError(f"block {b.name!r} reads {missing} before any block writes it")
        defined |= set(b.outputs)
