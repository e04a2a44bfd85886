"""What a run did, as plain data: one event per chunk, plan changes, memory samples.

The scheduler fills a :class:`RunStats`; :mod:`amortune._report` turns it into text, HTML/SVG
and PNG. Times are ``time.perf_counter()`` readings (one clock for the caller and its local
workers on Linux), so a timeline can be drawn without converting clocks. Imports the standard
library only.
"""

from __future__ import annotations

import threading
from typing import Any

from ._record import field, record

__all__ = ["ChunkEvent", "PlanChange", "Recorder", "RunStats", "active_recorders"]


@record(frozen=True)
class ChunkEvent:
    """One chunk's life: sent by the caller, run in ``slot``, its outcome received."""

    start_index: int
    n_items: int
    slot: int
    backend: str
    #: Caller clock: when the chunk was handed to the backend and when its outcome arrived.
    submitted: float
    received: float
    #: Where it ran (0.0 when the backend cannot tell): the first item started, the last ended.
    started: float
    finished: float
    wall_seconds: float
    cpu_seconds: float
    #: Worker-side unpickling of items plus pickling of results.
    serde_seconds: float = 0.0
    rss_bytes: int = 0
    attempt: int = 1
    #: ``"ok"``, ``"error"`` (func raised), ``"lost"`` (crash/timeout), ``"cancelled"``.
    status: str = "ok"


@record(frozen=True)
class PlanChange:
    """Something the run changed in the plan while it ran (moved to workers, chunk size ...)."""

    at: float
    what: str


@record()
class RunStats:
    """Everything the scheduler saw during one call."""

    chunks: int = 0
    retries: int = 0
    items: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0
    events: list[ChunkEvent] = field(default_factory=list)
    changes: list[PlanChange] = field(default_factory=list)
    #: ``(caller clock, resident bytes of the caller)`` samples.
    memory: list[tuple[float, int]] = field(default_factory=list)
    #: ``(caller clock, chunk size chosen)`` each time the policy cut a chunk.
    chunk_sizes: list[tuple[float, int]] = field(default_factory=list)
    #: Worker start-up per slot: ``slot -> (started, ready)`` on the caller clock.
    worker_starts: dict[int, tuple[float, float]] = field(default_factory=dict)
    #: One-off first-call seconds seen per slot (imports, model loads), not item costs.
    first_calls: dict[int, float] = field(default_factory=dict)
    #: Seconds the caller itself spent running items (serial, or helping while workers boot).
    caller_item_seconds: float = 0.0

    @property
    def wall_seconds(self) -> float:
        return max(0.0, self.finished_at - self.started_at)

    def note(self, at: float, what: str) -> None:
        """Record a change of plan made during the run."""
        self.changes.append(PlanChange(at, what))


class Recorder:
    """Collects the runs made inside ``with amortune.report() as rep:`` in this thread."""

    def __init__(self) -> None:
        self.runs: list[tuple[Any, RunStats]] = []

    def add(self, plan: Any, stats: RunStats) -> None:
        self.runs.append((plan, stats))

    @property
    def stats(self) -> RunStats | None:
        """The last run's stats (``None`` before any run)."""
        return self.runs[-1][1] if self.runs else None

    @property
    def plan(self) -> Any:
        """The last run's plan."""
        return self.runs[-1][0] if self.runs else None


_LOCAL = threading.local()


def active_recorders() -> list[Recorder]:
    """The recorders open in this thread (innermost last); empty almost always."""
    return list(getattr(_LOCAL, "stack", ()))


def push_recorder(rec: Recorder) -> None:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    stack.append(rec)


def pop_recorder(rec: Recorder) -> None:
    stack = getattr(_LOCAL, "stack", [])
    if rec in stack:
        stack.remove(rec)
