"""The real scheduler on virtual workers and a virtual clock: scaling without the hardware.

:class:`VirtualBackend` is a backend whose chunks take the time a cost list says; the scheduler's
``wait`` advances a virtual clock to the next completion, and one serial caller spends
``overhead_seconds`` per dispatch (as the manager thread of the process backend feeds every
worker). :func:`simulate` runs :class:`~amortune._schedule.Scheduler` itself on it, so what is
measured is the engine that runs real maps, not a copy of it. Pure: no processes, no real time.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from ._policy import ChunkPolicy
from ._schedule import Scheduler
from .backends._base import Backend, BackendInfo, ChunkOutcome, ChunkTask, FunctionRef, Slot

__all__ = ["VirtualBackend", "simulate"]


def _index(x: int) -> int:
    return x


class VirtualBackend(Backend):
    """``n_workers`` virtual slots; item ``i`` takes ``item_seconds[i]`` virtual seconds."""

    name = "virtual"

    def __init__(self, item_seconds: Sequence[float], n_workers: int,
                 overhead_seconds: float = 150e-6) -> None:
        self.prefix = list(itertools.accumulate(item_seconds, initial=0.0))
        self.n_workers, self.overhead = n_workers, overhead_seconds
        self.now = 0.0
        self.caller_free = 0.0
        self.idle = list(range(n_workers))
        self.queue: list[tuple[Future[ChunkOutcome], ChunkTask]] = []
        self.running: list[tuple[float, int, int, Future[ChunkOutcome], ChunkTask]] = []
        self._order = itertools.count()
        self.chunks = 0

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, tuple(Slot(i) for i in range(self.n_workers)),
                           dispatch_seconds=self.overhead, ready_slots=self.n_workers)

    def clock(self) -> float:
        return self.now

    def submit(self, task: ChunkTask) -> Future[ChunkOutcome]:
        fut: Future[ChunkOutcome] = Future()
        fut.set_running_or_notify_cancel()
        self.queue.append((fut, task))
        self._dispatch()
        return fut

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            fut, task = self.queue.pop(0)
            slot = self.idle.pop(0)
            self.caller_free = max(self.now, self.caller_free) + self.overhead
            work = self.prefix[task.start + len(task.items)] - self.prefix[task.start]
            heapq.heappush(self.running, (self.caller_free + work, next(self._order), slot,
                                          fut, task))

    def wait(self, fs: Any, timeout: float | None = None, return_when: str = "") -> Any:
        fs = set(fs)
        done = {f for f in fs if f.done()}
        if done or not self.running:
            return done, fs - done
        finish, _, slot, fut, task = heapq.heappop(self.running)
        self.now = max(self.now, finish)
        self.idle.append(slot)
        self.chunks += 1
        work = self.prefix[task.start + len(task.items)] - self.prefix[task.start]
        fut.set_result(ChunkOutcome(list(task.items), work, work, 0, slot, finish - work, finish))
        self._dispatch()
        return {fut} & fs, fs - {fut}

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        pass


def simulate(
    item_seconds: Sequence[float],
    n_workers: int,
    *,
    initial_chunksize: int = 1,
    target_chunk_seconds: float = 0.05,
    overhead_seconds: float = 150e-6,
    max_chunks_in_flight: int | None = None,
    max_items_in_flight: int | None = None,
) -> tuple[float, int]:
    """Run the real scheduler over virtual items; returns ``(makespan, chunks)``."""
    backend = VirtualBackend(item_seconds, n_workers, overhead_seconds)
    policy = ChunkPolicy(initial_chunksize, n_workers, target_chunk_seconds,
                         dispatch_seconds=overhead_seconds)
    sched = Scheduler(backend, FunctionRef(_index), policy=policy,
                      max_chunks_in_flight=max_chunks_in_flight,
                      max_items_in_flight=max_items_in_flight, clock=backend.clock,
                      sleep=backend.sleep, wait=backend.wait)
    for _ in sched.run(iter(range(len(item_seconds))), n_remaining=len(item_seconds)):
        pass
    return backend.now, backend.chunks
