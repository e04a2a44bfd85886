"""A chunk as the scheduler tracks it: its items, attempts, and what came back.

Pure bookkeeping, no I/O: :meth:`Chunk.split_at_failure` says which items keep their results,
which one is retried or reported alone, and which run again as a chunk of their own;
:meth:`Chunk.event` is the chunk's line in the run's statistics. Imports ``_stats`` and
``backends._base`` only.
"""

from __future__ import annotations

from typing import Any

from ._stats import ChunkEvent
from .backends._base import ChunkOutcome

__all__ = ["Chunk"]


class Chunk:
    """Items ``start...`` of the input, submitted ``attempts`` times."""

    __slots__ = ("start", "items", "attempts", "results", "error", "submitted", "helper")

    def __init__(self, start: int, items: list[Any], attempts: int = 0) -> None:
        self.start, self.items, self.attempts = start, items, attempts
        self.results: list[Any] | None = None
        self.error: BaseException | None = None
        self.submitted = 0.0
        self.helper = False

    @property
    def settled(self) -> bool:
        return self.results is not None or self.error is not None

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(range(self.start, self.start + len(self.items)))

    def split_at_failure(self, n_ok: int, *, per_chunk: bool
                         ) -> tuple[Chunk | None, Chunk, Chunk | None]:
        """``(head, item, rest)`` after ``func`` raised at item ``start + n_ok``.

        The head keeps its results, the failing item is retried or reported alone, the rest
        runs as a chunk of its own. A per-chunk function fails as a whole: the chunk is the
        unit that is retried. Empty parts are ``None``.
        """
        if per_chunk:
            return None, Chunk(self.start, self.items), None
        at = self.start + n_ok
        head = Chunk(self.start, self.items[:n_ok]) if n_ok else None
        rest = Chunk(at + 1, self.items[n_ok + 1:]) if n_ok + 1 < len(self.items) else None
        return head, Chunk(at, self.items[n_ok:n_ok + 1]), rest

    def event(self, o: ChunkOutcome | None, backend: str, now: float, status: str) -> ChunkEvent:
        """This chunk's record in :class:`~amortune._stats.RunStats` (``o`` is ``None`` if lost)."""
        return ChunkEvent(
            self.start, len(self.items), -1 if self.helper else (o.slot if o else 0),
            "caller" if self.helper else backend, self.submitted, now,
            o.started if o else 0.0, o.finished if o else 0.0, o.wall_seconds if o else 0.0,
            o.cpu_seconds if o else 0.0, o.serde_seconds if o else 0.0,
            o.rss_bytes if o else 0, self.attempts, status)
