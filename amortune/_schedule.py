"""The chunk scheduler: one engine under every entry point.

Data flow::

    items ──▶ cut into chunks (ChunkPolicy: size from measured chunk times, shrinking at the end)
          ──▶ backend.submit() with a bounded number of unyielded chunks and items in flight
          ──▶ outcomes reassembled in input order ──▶ yielded as lists of results
                └─ lost chunks (crash, timeout) and transient errors are resubmitted up to `retries`

:class:`ChunkPolicy` and :func:`simulate` are pure (no clock, no processes), so the scheduling
decisions can be driven by virtual workers on a virtual clock for any number of workers.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any

from ._errors import TaskTimeoutError, WorkerCrashedError, add_note, describe_indices
from .backends._base import Backend, ChunkOutcome, FunctionRef

__all__ = ["ChunkPolicy", "FixedChunkPolicy", "RunStats", "run_chunks", "simulate"]

#: Weight of the newest chunk in the smoothed per-item time (an EMA, as tqdm smooths its rate).
EMA_ALPHA = 0.3
#: A chunk's size changes by at most this factor from one chunk to the next, so a few fast early
#: items cannot inflate chunks before slow ones arrive.
MAX_STEP = 2.0
#: Near the end a chunk holds at most remaining / (TAIL_FACTOR * workers) items (guided
#: self-scheduling), so the last chunks are small and no worker straggles on a big one.
TAIL_FACTOR = 2
#: Without a memory budget, the reorder window holds at most this many times the unfinished-chunk
#: bound (a chunk-count cap alone stalls every worker behind one slow head chunk).
REORDER_CHUNKS_PER_SLOT = 16
#: Base delay before re-running a chunk that failed with a ``retry_on`` exception; doubles per try.
RETRY_BACKOFF_SECONDS = 0.05


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


@dataclass
class RunStats:
    """What the scheduler saw: chunks run, retries, worker seconds (for reports and tests)."""

    chunks: int = 0
    retries: int = 0
    items: int = 0
    worker_seconds: float = 0.0
    max_rss_bytes: int = 0


class _Chunk:
    __slots__ = ("start", "items", "attempts", "outcome", "error")

    def __init__(self, start: int, items: list[Any]) -> None:
        self.start, self.items, self.attempts = start, items, 0
        self.outcome: ChunkOutcome | None = None
        self.error: BaseException | None = None

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(range(self.start, self.start + len(self.items)))


def _note_once(exc: BaseException, note: str) -> None:
    # A broken backend fails every chunk with one shared exception: do not stack copies.
    if note not in getattr(exc, "__notes__", ()):
        add_note(exc, note)


def run_chunks(
    backend: Backend,
    fn: FunctionRef,
    items: Iterator[Any],
    *,
    start_index: int,
    policy: ChunkPolicy,
    n_remaining: int | None,
    mode: str = "map",
    retries: int = 0,
    retry_on: tuple[type[BaseException], ...] = (),
    retry_backoff_seconds: float = RETRY_BACKOFF_SECONDS,
    timeout_seconds: float | None = None,
    max_chunks_in_flight: int | None = None,
    max_items_in_flight: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    stats: RunStats | None = None,
) -> Generator[list[Any], None, None]:
    """Run ``fn`` over ``items`` on ``backend``; yield result lists in input order.

    At most ``max_chunks_in_flight`` chunks (default ``2 * capacity + 1``) are unfinished, which
    keeps every worker fed. Finished results wait for earlier chunks in a reorder window bounded
    by ``max_items_in_flight`` items (the memory budget), or by ``REORDER_CHUNKS_PER_SLOT`` times
    the chunk bound when no budget is given, so memory stays bounded for an endless input while
    one slow chunk at the head does not stall the workers behind it. The first failing item (in
    input order) raises once every earlier item has been yielded.
    """
    stats = stats if stats is not None else RunStats()
    max_chunks = max_chunks_in_flight or 2 * backend.capacity() + 1
    max_items = max_items_in_flight or (1 << 62)
    max_window = (1 << 62) if max_items_in_flight else REORDER_CHUNKS_PER_SLOT * max_chunks
    window: dict[int, _Chunk] = {}
    futures: dict[Future[ChunkOutcome], _Chunk] = {}
    delayed: list[tuple[float, int, _Chunk]] = []
    order = itertools.count()
    next_start = start_index
    next_yield = start_index
    unyielded_items = 0
    remaining = n_remaining
    exhausted = False
    failed_at: int | None = None

    def submit(chunk: _Chunk) -> None:
        chunk.attempts += 1
        fut = backend.submit(fn, chunk.items, chunk.start, mode=mode, timeout_seconds=timeout_seconds)
        futures[fut] = chunk

    try:
        while True:
            while (not exhausted and failed_at is None
                   and len(futures) + len(delayed) < max_chunks
                   and unyielded_items < max_items and len(window) < max_window):
                size = policy.next_size(remaining)
                batch: list[Any] = []
                try:
                    batch.extend(itertools.islice(items, size))
                except Exception as input_exc:
                    # The input itself failed: run what was read, and raise the input's error
                    # in its place in input order, after every earlier item's result or error.
                    exhausted = True
                    failed = _Chunk(next_start + len(batch), [])
                    failed.error = input_exc
                    window[failed.start] = failed
                    failed_at = failed.start if failed_at is None else min(failed_at, failed.start)
                if not batch:
                    exhausted = True
                    break
                chunk = _Chunk(next_start, batch)
                window[chunk.start] = chunk
                next_start += len(batch)
                unyielded_items += len(batch)
                if remaining is not None:
                    remaining = max(0, remaining - len(batch))
                submit(chunk)
            yielded = False
            while next_yield in window and (window[next_yield].outcome is not None
                                            or window[next_yield].error is not None):
                yielded = True
                chunk = window.pop(next_yield)
                if chunk.error is not None:
                    raise chunk.error
                assert chunk.outcome is not None
                unyielded_items -= len(chunk.items)
                next_yield += len(chunk.items)
                results, chunk.outcome = chunk.outcome.results, None
                yield results
            if not window:
                if exhausted or failed_at is not None:
                    return
                continue
            if yielded and not exhausted and failed_at is None:
                continue  # room was freed: refill before waiting
            now = time.perf_counter()
            while delayed and delayed[0][0] <= now:
                submit(heapq.heappop(delayed)[2])
            wait_for = (delayed[0][0] - now) if delayed else None
            if not futures:
                time.sleep(max(0.0, wait_for or 0.0))
                continue
            done, _ = wait(list(futures), timeout=wait_for, return_when=FIRST_COMPLETED)
            for fut in done:
                maybe = futures.pop(fut, None)
                if maybe is None:  # dropped: it came after a failure seen in this same round
                    continue
                chunk = maybe
                exc = fut.exception()
                if exc is None:
                    outcome = fut.result()
                    chunk.outcome = outcome
                    stats.chunks += 1
                    stats.items += len(chunk.items)
                    stats.worker_seconds += outcome.wall_seconds
                    stats.max_rss_bytes = max(stats.max_rss_bytes, outcome.rss_bytes)
                    policy.observe(len(chunk.items), outcome.wall_seconds)
                    if on_progress is not None:
                        on_progress(len(chunk.items))
                    continue
                lost = isinstance(exc, (WorkerCrashedError, TaskTimeoutError))
                transient = bool(retry_on) and isinstance(exc, retry_on)
                if (lost or transient) and chunk.attempts <= retries:
                    stats.retries += 1
                    if transient:
                        due = time.perf_counter() + retry_backoff_seconds * 2 ** (chunk.attempts - 1)
                        heapq.heappush(delayed, (due, next(order), chunk))
                    else:
                        submit(chunk)
                    continue
                if chunk.attempts > 1:
                    _note_once(exc, f"amortune: {describe_indices(chunk.indices)} failed "
                                    f"{chunk.attempts} times (retries={retries})")
                chunk.error = exc
                failed_at = chunk.start if failed_at is None else min(failed_at, chunk.start)
                # Chunks after the failure will never be yielded: stop waiting for them.
                for later_start in [s for s in window if s > failed_at]:
                    later = window.pop(later_start)
                    unyielded_items -= len(later.items)
                    for f, c in list(futures.items()):
                        if c is later:
                            f.cancel()
                            del futures[f]
                    delayed = [d for d in delayed if d[2] is not later]
                    heapq.heapify(delayed)
    finally:
        for fut in futures:
            fut.cancel()


def simulate(
    item_seconds: Sequence[float],
    n_workers: int,
    *,
    initial_chunksize: int = 1,
    target_chunk_seconds: float = 0.05,
    overhead_seconds: float = 150e-6,
    max_chunks_in_flight: int | None = None,
) -> tuple[float, int]:
    """Run the scheduler's decisions on virtual workers with a virtual clock.

    Step for step as :func:`run_chunks`: at most ``max_chunks_in_flight`` (default ``2P + 1``)
    chunks are unfinished, chunk sizes come from the same :class:`ChunkPolicy`, and one caller
    dispatches chunks serially, ``overhead_seconds`` each, to idle workers in order. Returns
    ``(makespan, chunks)``.
    """
    n = len(item_seconds)
    prefix = list(itertools.accumulate(item_seconds, initial=0.0))
    policy = ChunkPolicy(initial_chunksize, n_workers, target_chunk_seconds,
                         dispatch_seconds=overhead_seconds)
    max_unfinished = max_chunks_in_flight or 2 * n_workers + 1
    queue: collections.deque[tuple[int, int]] = collections.deque()
    running: list[tuple[float, int, int, int]] = []  # (finish, order, start, size)
    order = itertools.count()
    now = caller_free = 0.0
    idle, pos, chunks = n_workers, 0, 0
    while True:
        while pos < n and len(queue) + len(running) < max_unfinished:
            size = policy.next_size(n - pos)
            queue.append((pos, size))
            pos += size
        while idle and queue:
            start, size = queue.popleft()
            caller_free = max(now, caller_free) + overhead_seconds
            work = prefix[start + size] - prefix[start]
            heapq.heappush(running, (caller_free + work, next(order), start, size))
            idle -= 1
        if not running:
            return now, chunks
        now, _, start, size = heapq.heappop(running)
        idle += 1
        chunks += 1
        policy.observe(size, prefix[start + size] - prefix[start])
