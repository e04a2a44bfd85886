"""Chunk sizes from measured chunk times: pure policy objects, no clock, no processes.

The scheduler asks :meth:`ChunkPolicy.next_size` before it cuts a chunk and feeds back every
chunk's measured time with :meth:`ChunkPolicy.observe`; a virtual clock can drive it for any
number of workers. Imports the standard library only.
"""

from __future__ import annotations

import math

__all__ = ["EMA_ALPHA", "MAX_STEP", "TAIL_FACTOR", "ChunkPolicy", "FixedChunkPolicy"]

#: Weight of the newest chunk in the smoothed per-item time (an EMA, as tqdm smooths its rate).
EMA_ALPHA = 0.3
#: A chunk's size changes by at most this factor from one chunk to the next, so a few fast early
#: items cannot inflate chunks before slow ones arrive.
MAX_STEP = 2.0
#: Near the end a chunk holds at most remaining / (TAIL_FACTOR * workers) items (guided
#: self-scheduling), so the last chunks are small and no worker straggles on a big one.
TAIL_FACTOR = 2


class ChunkPolicy:
    """Chunk sizes that follow measured chunk durations; pure and deterministic.

    One caller dispatches every chunk (``dispatch_seconds`` each), so chunks shorter than one
    round of dispatches (``n_workers * dispatch_seconds``) only make workers wait for the caller:
    that is the floor of both the target and the tail's shrinking, and the floor never exceeds
    ``MAX_STEP`` times the largest chunk measured so far (its item time may be stale when costs
    grow along the input).
    """

    def __init__(self, initial: int, n_workers: int, target_chunk_seconds: float,
                 *, max_size: int | None = None, dispatch_seconds: float = 0.0) -> None:
        self.size = max(1, initial)
        self.n_workers = max(1, n_workers)
        self.min_seconds = self.n_workers * max(dispatch_seconds, 0.0)
        self.target = max(target_chunk_seconds, self.min_seconds)
        self.max_size = max_size
        self.item_seconds: float | None = None
        self.largest = 0

    def observe(self, n_items: int, seconds: float) -> None:
        """Feed back how long a chunk of ``n_items`` took to run."""
        if n_items <= 0:
            return
        self.largest = max(self.largest, n_items)
        per = max(seconds, 0.0) / n_items
        self.item_seconds = per if self.item_seconds is None else (
            EMA_ALPHA * per + (1 - EMA_ALPHA) * self.item_seconds)
        ideal = self.target / max(self.item_seconds, 1e-12)
        lo = max(1, min(self.size - 1, math.ceil(self.size / MAX_STEP)))
        hi = max(self.size + 1, int(self.size * MAX_STEP))
        self.size = max(1, min(max(int(ideal), lo), hi))
        if self.max_size is not None:
            self.size = min(self.size, self.max_size)

    def next_size(self, remaining: int | None) -> int:
        """Size of the next chunk given how many items are left (``None``: unknown)."""
        size = self.size
        if remaining is not None:
            tail = math.ceil(remaining / (TAIL_FACTOR * self.n_workers))
            if self.item_seconds and self.min_seconds:
                floor = math.ceil(self.min_seconds / max(self.item_seconds, 1e-12))
                tail = max(tail, min(floor, int(MAX_STEP * self.largest)))
            size = min(size, tail, remaining)
        return max(1, size)


class FixedChunkPolicy(ChunkPolicy):
    """A chunk size the caller pinned, honoured exactly (as ``multiprocessing.Pool`` does)."""

    def observe(self, n_items: int, seconds: float) -> None:
        pass

    def next_size(self, remaining: int | None) -> int:
        return self.size if remaining is None else max(1, min(self.size, remaining))
