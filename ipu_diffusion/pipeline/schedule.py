"""Pipeline schedules as task lists: which forward F(s, m) and backward B(s, m) runs when.

Per stage s of S, over microbatches m = 0..M-1:

* ``grouped``      F(s,0) .. F(s,M-1), then B(s,0) .. B(s,M-1): all forwards, then all
                   backwards (GPipe; Graphcore's default). Stage s holds M microbatches.
* ``interleaved``  one-forward-one-backward: ``min(M, S-s-1)`` warm-up forwards, then
                   alternate F and B, then the remaining backwards; each backward runs as
                   soon as possible, so stage s holds at most ``min(M, S - s)``
                   microbatches (PipeDream-Flush, Narayanan et al. 2021; Graphcore's
                   Interleaved keeps the same bound, see memory.py).
* ``sequential``   one microbatch at a time through all stages: F(0,m) .. F(S-1,m),
                   B(S-1,m) .. B(0,m), then m+1. One microbatch in flight (a sharded model).

:func:`schedule_tasks` merges the per-stage orders into one global order that respects the
data dependencies F(s-1,m) -> F(s,m) and B(s+1,m) -> B(s,m); the fallback executor issues
tasks in that order and chains the tasks of each device with control dependencies.
"""
from __future__ import annotations

from typing import List, NamedTuple

from ipu_diffusion.pipeline.memory import SCHEDULES


class Task(NamedTuple):
    """``kind`` "F" (forward) or "B" (backward) of microbatch ``micro`` in stage ``stage``."""

    kind: str
    stage: int
    micro: int


def _stage_order(schedule: str, s: int, num_stages: int, microbatches: int) -> List[Task]:
    m_all = range(microbatches)
    if schedule == "grouped":
        return [Task("F", s, m) for m in m_all] + [Task("B", s, m) for m in m_all]
    if schedule == "interleaved":
        warm = min(num_stages - s - 1, microbatches)
        order = [Task("F", s, m) for m in range(warm)]
        for m in range(microbatches - warm):
            order += [Task("F", s, warm + m), Task("B", s, m)]
        return order + [Task("B", s, m) for m in range(microbatches - warm, microbatches)]
    return [t for m in m_all for t in (Task("F", s, m), Task("B", s, m))]


def _ready(task: Task, done: set, num_stages: int) -> bool:
    if task.kind == "F":
        return task.stage == 0 or Task("F", task.stage - 1, task.micro) in done
    after = Task("B", task.stage + 1, task.micro) if task.stage < num_stages - 1 else None
    return Task("F", task.stage, task.micro) in done and (after is None or after in done)


def schedule_tasks(schedule: str, num_stages: int, microbatches: int) -> List[Task]:
    """All ``2 S M`` tasks in a global order that keeps each stage's order and the data
    dependencies (round-robin over stages, each running its next task once it is ready)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline.schedule: {schedule!r} is not one of {SCHEDULES}")
    if schedule == "sequential":
        return [t for m in range(microbatches)
                for t in [Task("F", s, m) for s in range(num_stages)]
                + [Task("B", s, m) for s in reversed(range(num_stages))]]
    queues = [_stage_order(schedule, s, num_stages, microbatches) for s in range(num_stages)]
    order: List[Task] = []
    done: set = set()
    while any(queues):
        progressed = False
        for s in range(num_stages):
            if queues[s] and _ready(queues[s][0], done, num_stages):
                task = queues[s].pop(0)
                order.append(task)
                done.add(task)
                progressed = True
        if not progressed:  # pragma: no cover - the per-stage orders above cannot deadlock
            raise RuntimeError(f"schedule {schedule!r} deadlocked at {[q[0] for q in queues if q]}")
    return order


def max_in_flight(tasks: List[Task], num_stages: int) -> List[int]:
    """Per stage, the largest number of microbatches forwarded but not yet backwarded."""
    live = [0] * num_stages
    peak = [0] * num_stages
    for task in tasks:
        live[task.stage] += 1 if task.kind == "F" else -1
        peak[task.stage] = max(peak[task.stage], live[task.stage])
    return peak
