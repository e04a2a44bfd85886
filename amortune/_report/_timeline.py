"""The time split of a run: its lanes (the caller, each slot) and where each one's time went."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .._record import record
from .._stats import ChunkEvent, RunStats

#: Lanes whose chunk events come from these backends ran in the caller's own process.
CALLER_BACKENDS = frozenset({"serial", "caller"})


@record(frozen=True)
class SlotTime:
    """How one slot (a worker, a thread, or the caller) spent the run, in seconds.

    ``startup`` is the worker booting; ``compute`` the chunks running (first item's start to last
    item's end); ``serialization`` unpickling items and pickling results in the worker;
    ``waiting`` the time the slot had finished its previous chunk and the caller had not yet sent
    the next one; ``idle`` everything else in the run (the chunk in transit, nothing left to do
    while other slots finish).
    """

    lane: str
    slot: int
    chunks: int
    items: int
    span: float
    startup: float
    compute: float
    serialization: float
    waiting: float
    idle: float
    lost: int = 0
    errors: int = 0


@record(frozen=True)
class _Lane:
    key: tuple[int, int]  # (0 for the caller, 1 for workers; slot)
    label: str
    events: tuple[ChunkEvent, ...]


def _sent(e: ChunkEvent) -> float:
    return e.submitted


def _ran(e: ChunkEvent) -> tuple[float, float]:
    """When a chunk ran where it ran; the caller's view when the backend could not tell."""
    if e.started > 0 and e.finished >= e.started:
        return e.started, e.finished
    return e.submitted, e.received


def _window(stats: RunStats) -> tuple[float, float]:
    times = [t for e in stats.events for t in (e.submitted, e.received, e.started, e.finished)
             if t > 0]
    times += [t for t, _ in stats.memory] + [t for t, _ in stats.chunk_sizes]
    times += [t for pair in stats.worker_starts.values() for t in pair]
    times += [c.at for c in stats.changes]
    start = stats.started_at if stats.started_at or not times else min(times)
    if times:
        start = min(start, min(times))
    end = stats.finished_at if stats.finished_at > start else max(times, default=start)
    if times:
        end = max(end, max(times))
    return start, end


def _lanes(events: Sequence[ChunkEvent]) -> list[_Lane]:
    by: dict[tuple[int, int], list[ChunkEvent]] = {}
    for e in events:
        key = (0, 0) if e.backend in CALLER_BACKENDS else (1, e.slot)
        by.setdefault(key, []).append(e)
    lanes = []
    for key in sorted(by):
        evs = tuple(sorted(by[key], key=lambda e: _ran(e)[0]))
        label = "caller" if key[0] == 0 else _slot_name(key[1], evs)
        lanes.append(_Lane(key, label, evs))
    return lanes


def _slot_name(slot: int, events: Iterable[ChunkEvent]) -> str:
    kinds = {e.backend for e in events if e.slot == slot}
    if kinds <= CALLER_BACKENDS and kinds:
        return "caller"
    if kinds == {"threads"}:
        return f"thread {slot}"
    if kinds == {"gpu"}:
        return f"gpu {slot}"
    return f"worker {slot}"


def _split(lane: _Lane, start: tuple[float, float] | None, t0: float, t1: float) -> SlotTime:
    begin = t0
    startup = 0.0
    free_at = t0  # when the slot could take its next chunk
    if start is not None:
        s, r = max(t0, start[0]), min(t1, max(start[0], start[1]))
        startup = max(0.0, r - s)
        begin = min(begin, s)
        free_at = max(r, t0)
    compute = serde = waiting = 0.0
    for e in lane.events:
        a, b = _ran(e)
        compute += max(0.0, b - a) if e.started > 0 else e.wall_seconds
        serde += e.serde_seconds
        if e.started > 0 and lane.key[0]:
            # The slot was free from ``free_at``; the chunk left the caller at ``submitted``.
            gap = max(0.0, a - free_at)
            waiting += min(gap, max(0.0, e.submitted - free_at))
        free_at = max(free_at, b + e.serde_seconds)
    span = max(0.0, t1 - begin)
    idle = max(0.0, span - startup - compute - serde - waiting)
    return SlotTime(
        lane=lane.label, slot=lane.key[1], chunks=len(lane.events),
        items=sum(e.n_items for e in lane.events if e.status == "ok"), span=span,
        startup=startup, compute=compute, serialization=serde, waiting=waiting, idle=idle,
        lost=sum(1 for e in lane.events if e.status == "lost"),
        errors=sum(1 for e in lane.events if e.status == "error"))


def _items(e: ChunkEvent) -> str:
    return f"{e.start_index}-{e.start_index + e.n_items - 1}" if e.n_items > 1 else str(
        e.start_index)
