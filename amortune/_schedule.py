"""The scheduler: one engine under every entry point and every backend.

Data flow::

    items ──fill──▶ chunks cut by the ChunkPolicy ──backend.submit()──▶ futures
      ▲                bounded: unfinished chunks, unyielded items, reorder window
      │        wait ◀── outcomes (results, or results before a failing item + its error)
      │          └──▶ retry: a lost chunk again, a failing item alone (after a backoff)
      └─ refill ◀── yield: result lists in input order (or completion order, ordered=False)

Phases are methods of :class:`Scheduler`: :meth:`~Scheduler._fill`, :meth:`~Scheduler._yield_ready`,
:meth:`~Scheduler._wait`, :meth:`~Scheduler._on_outcome` / :meth:`~Scheduler._on_failure`. An
error raised by the input itself is an event (:attr:`Scheduler.input_error`) placed at its index,
so it is raised in input order like an item's error. Clock, sleep and wait are arguments, so a
virtual clock can drive the real scheduler (:mod:`amortune._simulate`). The first error in input
order raises once every earlier result is yielded; when the call ends (returned, raised, closed)
every chunk not yet started is cancelled where it runs, and nothing new starts.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait
from typing import Any

from ._chunks import Chunk as _Chunk
from ._policy import ChunkPolicy, FixedChunkPolicy
from ._serde import add_note, note_item
from ._stats import RunStats
from .backends._base import Backend, ChunkOutcome, ChunkTask, FunctionRef, WorkerSetup

__all__ = ["Adopted", "ChunkPolicy", "FixedChunkPolicy", "RunStats", "Scheduler"]

#: Without a memory budget, the reorder window holds at most this many times the unfinished-chunk
#: bound (a chunk-count cap alone stalls every worker behind one slow head chunk).
REORDER_CHUNKS_PER_SLOT = 16
#: Base delay before re-running an item that failed with a ``retry_on`` exception; doubles per try.
RETRY_BACKOFF_SECONDS = 0.05
#: When a call ends, chunks still running get this long to stop at an item boundary before
#: their workers are killed (so nothing of the call runs after it returned or raised).
STOP_GRACE_SECONDS = 1.0


#: ``on_outcome(scheduler, n_items, seconds)`` after each finished chunk (plan corrections).
OutcomeHook = Callable[["Scheduler", int, float], None]
#: A chunk handed to a backend before the scheduler ran: ``(start, items, future, submitted)``.
Adopted = tuple[int, list[Any], "Future[ChunkOutcome]", float]


class Scheduler:
    """Run ``fn`` over an item stream on ``backend``; see the module docstring.

    Parameters
    ----------
    policy:
        Chunk sizes (a :class:`ChunkPolicy`, or :class:`FixedChunkPolicy` for a pinned size).
    style:
        ``"item"``, ``"star"``, ``"chunk"`` or ``"apply"`` (see :mod:`amortune.backends`).
    retries, retry_on, retry_backoff_seconds:
        A lost chunk (``backend.is_lost``) runs again, and an item failing with a ``retry_on``
        type runs again alone after a doubling backoff, up to ``retries`` times each.
    max_chunks_in_flight, max_items_in_flight:
        Bounds on unfinished chunks (default ``2 * slots + 1``) and on unyielded items.
    helper:
        An in-caller backend that runs chunks while ``backend`` has no worker ready yet.
    fail_fast:
        ``False`` runs every item and raises the first error in input order only at the end
        (``multiprocessing.Pool.map``); by default nothing new starts after an error.
    input_error_keeps_chunk:
        ``False`` makes an error raised by the input take the place of the whole chunk being
        read (``Pool.imap`` with a chunksize); by default the items read before it still run.
    wait:
        ``wait(futures, timeout=..., return_when=...)`` for a virtual clock; by default the
        scheduler sleeps until a future's done-callback wakes it (no cost per future in flight).
    """

    def __init__(self, backend: Backend, fn: FunctionRef, *, policy: ChunkPolicy,
                 style: str = "item", setup: WorkerSetup | None = None, retries: int = 0,
                 retry_on: tuple[type[BaseException], ...] = (),
                 retry_backoff_seconds: float = RETRY_BACKOFF_SECONDS,
                 timeout_seconds: float | None = None, max_chunks_in_flight: int | None = None,
                 max_items_in_flight: int | None = None, ordered: bool = True,
                 on_progress: Callable[[int], None] | None = None,
                 on_outcome: OutcomeHook | None = None, stats: RunStats | None = None,
                 helper: Backend | None = None, fail_fast: bool = True,
                 input_error_keeps_chunk: bool = True,
                 sample_memory: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep,
                 wait: Callable[..., Any] | None = None) -> None:
        self.backend, self.fn, self.policy, self.style, self.setup = backend, fn, policy, style, setup
        self.retries, self.retry_on, self.backoff = retries, retry_on, retry_backoff_seconds
        self.timeout = timeout_seconds
        self.max_chunks = max_chunks_in_flight or 2 * backend.capacity() + 1
        self.max_items = max_items_in_flight or (1 << 62)
        self.max_window = ((1 << 62) if max_items_in_flight
                           else REORDER_CHUNKS_PER_SLOT * self.max_chunks)
        self.ordered, self.on_progress, self.on_outcome = ordered, on_progress, on_outcome
        self.stats = stats if stats is not None else RunStats()
        self.helper, self.clock, self.sleep, self.wait = helper, clock, sleep, wait
        self.fail_fast, self.input_error_keeps_chunk = fail_fast, input_error_keeps_chunk
        self.sample_memory = sample_memory
        #: Without fail_fast (Pool.map), the first error waits here until every item ran.
        self.deferred: BaseException | None = None
        self.window: dict[int, _Chunk] = {}
        self.futures: dict[Future[ChunkOutcome], _Chunk] = {}
        self.delayed: list[tuple[float, int, _Chunk]] = []
        #: Chunks owed a (re)submission: the rest of a split chunk, a lost chunk, a retry due.
        self.requeue: collections.deque[_Chunk] = collections.deque()
        self.ready_unordered: list[list[Any]] = []
        #: Futures finished since the last look, in completion order (done-callbacks fill it).
        self._done: collections.deque[Future[ChunkOutcome]] = collections.deque()
        self._wake = threading.Event()
        self.item_failures: dict[int, int] = {}
        #: Futures cancelled after a failure that were already running: the call waits for
        #: them to stop before it raises, so nothing of it runs afterwards.
        self.stopping: list[Future[ChunkOutcome]] = []
        self._order = itertools.count()
        self.next_start = self.next_yield = 0
        self.unyielded = 0
        self.remaining: int | None = None
        self.exhausted = False
        self.failed_at: int | None = None
        self.first_error: BaseException | None = None
        self.input_error: tuple[int, BaseException] | None = None
        self._items: Iterator[Any] = iter(())
        #: The backend adopted chunks run on, when it is not ``backend`` (stopped with them).
        self.adopted_from: Backend | None = None

    # -- the run -----------------------------------------------------------------------------
    def run(self, items: Iterator[Any], *, start_index: int = 0,
            n_remaining: int | None = None, adopted: Sequence[Adopted] = (),
            adopted_from: Backend | None = None,
            settled: tuple[int, list[Any], list[Any]] | None = None,
            input_error: tuple[int, BaseException] | None = None,
            ) -> Generator[list[Any], None, None]:
        """Yield result lists for ``items`` (input indices from ``start_index``).

        Work that began before the plan comes first, in input order: ``adopted`` chunks already
        running on ``adopted_from`` (``(start, items, future, submitted)``), then ``settled``
        results (``(start, items, results)``, the planner's sample); ``items`` follow them.
        ``input_error`` ends the input at its index with that error (the sample failed).
        """
        self._items, self.remaining = items, n_remaining
        self.next_start = self.next_yield = start_index
        if adopted_from is not None and adopted_from is not self.backend:
            self.adopted_from = adopted_from
        for start, chunk_items, fut, submitted in adopted:
            chunk = self._adopt(start, chunk_items)
            chunk.attempts, chunk.submitted = 1, submitted
            self.futures[fut] = chunk
            fut.add_done_callback(self._on_done)
        if settled is not None:
            start, chunk_items, results = settled
            if chunk_items:
                self._settle(self._adopt(start, chunk_items), results)
        if input_error is not None:
            self.input_error, self.exhausted = input_error, True
        if not self.stats.started_at:
            self.stats.started_at = self.clock()
        try:
            while True:
                self._fill()
                if (yield from self._yield_ready()):
                    continue  # room was freed: refill before waiting
                if self._finished():
                    return
                self._wait()
        except KeyboardInterrupt:
            self._stop(kill=True)
            raise
        finally:
            self.stats.finished_at = self.clock()
            self._stop()

    def switch(self, backend: Backend, policy: ChunkPolicy, *, max_chunks_in_flight: int,
               helper: Backend | None = None) -> None:
        """Carry on with another backend (a serial run moving to workers); chunks already
        submitted finish where they are."""
        self.backend, self.policy, self.helper = backend, policy, helper
        self.max_chunks = max_chunks_in_flight
        if self.max_window < (1 << 62):
            self.max_window = REORDER_CHUNKS_PER_SLOT * self.max_chunks

    def _adopt(self, start: int, items: list[Any]) -> _Chunk:
        if start != self.next_start:
            raise ValueError(f"adopted work must follow in input order: {start} is not "
                             f"{self.next_start}")
        chunk = _Chunk(start, items)
        self.next_start += len(items)
        self.unyielded += len(items)
        if self.ordered:
            self.window[start] = chunk
        return chunk

    def _idle(self) -> bool:
        return not self.futures and not self.delayed and not self.requeue

    def _finished(self) -> bool:
        stopped = self.exhausted or (self.failed_at is not None and self.fail_fast)
        if self.ordered:
            return not self.window and self._idle() and stopped
        return self._idle() and stopped

    def _all_done(self) -> bool:
        return self.exhausted and self._idle() and (not self.ordered or not self.window)

    # -- fill: cut chunks and submit them within the bounds ----------------------------------
    def _in_flight(self) -> int:
        return len(self.futures) + len(self.delayed) + len(self.requeue)

    def _room(self) -> bool:
        return (not self.exhausted and (self.failed_at is None or not self.fail_fast)
                and self._in_flight() < self.max_chunks
                and self.unyielded < self.max_items and len(self.window) < self.max_window)

    def _cut(self, size: int) -> _Chunk | None:
        batch: list[Any] = []
        try:
            batch.extend(itertools.islice(self._items, size))
        except Exception as exc:  # the input itself failed: an event at its index
            self.exhausted = True
            if not self.input_error_keeps_chunk:
                batch = []  # the error takes the place of the whole chunk
            index = self.next_start + len(batch)
            note_item(exc, index, by_input=True)
            self.input_error = (index, exc)
        if not batch:
            self.exhausted = True
            return None
        chunk = _Chunk(self.next_start, batch)
        self.next_start += len(batch)
        self.unyielded += len(batch)
        if self.remaining is not None:
            self.remaining = max(0, self.remaining - len(batch))
        if self.ordered:
            self.window[chunk.start] = chunk
        self.stats.chunk_sizes.append((self.clock(), len(batch)))
        return chunk

    def _next_size(self) -> int:
        return max(1, min(self.policy.next_size(self.remaining), self.max_items - self.unyielded))

    def _fill(self) -> None:
        while self.requeue and len(self.futures) < self.max_chunks:
            self._submit(self.requeue.popleft())
        while self._room():
            chunk = self._cut(self._next_size())
            if chunk is None:
                break
            self._submit(chunk)

    def _submit(self, chunk: _Chunk, backend: Backend | None = None) -> None:
        chunk.attempts += 1
        chunk.submitted = self.clock()
        task = ChunkTask(self.fn, chunk.items, chunk.start, self.style, self.timeout, self.setup)
        fut = (backend or self.backend).submit(task)
        chunk.helper = backend is not None
        self.futures[fut] = chunk
        fut.add_done_callback(self._on_done)

    def _on_done(self, fut: Future[ChunkOutcome]) -> None:
        # Runs in whichever thread finished the future (a backend's manager thread).
        self._done.append(fut)
        self._wake.set()

    # -- yield: results in input order -------------------------------------------------------
    def _yield_ready(self) -> Generator[list[Any], None, bool]:
        yielded = False
        if not self.ordered:
            while self.ready_unordered:
                yielded = True
                results = self.ready_unordered.pop(0)
                self.unyielded -= len(results)
                yield results
            if self.first_error is not None and (self.fail_fast or self._all_done()):
                if self._idle():
                    raise self.first_error
            elif self.input_error is not None and self._idle():
                raise self.input_error[1]
            return yielded and self._room()
        while self.next_yield in self.window and self.window[self.next_yield].settled:
            chunk = self.window.pop(self.next_yield)
            if chunk.error is not None and self.deferred is None:
                if self.fail_fast:
                    raise chunk.error
                self.deferred = chunk.error
            results, chunk.results = chunk.results or [], None
            self.unyielded -= len(chunk.items)
            self.next_yield += len(chunk.items)
            yielded = True
            if self.deferred is None:
                yield results
        if self.deferred is not None and self._all_done():
            raise self.deferred
        if (self.input_error is not None and self.next_yield == self.input_error[0]
                and not self.window):
            raise self.input_error[1]
        return yielded and self._room()

    # -- wait: for an outcome, a retry's backoff, or help while workers boot -----------------
    def _wait(self) -> None:
        now = self.clock()
        while self.delayed and self.delayed[0][0] <= now:
            self.requeue.append(heapq.heappop(self.delayed)[2])
        if self.requeue and len(self.futures) < self.max_chunks:
            return  # fill submits them first
        wait_for = (self.delayed[0][0] - now) if self.delayed else None
        if (not self._done and self.helper is not None and self.futures
                and not self.backend.ready() and self._help()):
            return
        if not self.futures:
            if wait_for is None and not self.requeue and not self._done:
                stuck = [c.start for c in self.window.values() if not c.settled]
                if stuck:  # pragma: no cover - a bug here must raise, never spin
                    raise RuntimeError(f"amortune's scheduler lost track of chunks at {stuck}")
            self.sleep(max(0.0, wait_for or 0.0))
            return
        if not self._done:
            if self.wait is not None:  # an injected clock (simulation, tests) moves time
                self.wait(list(self.futures), timeout=wait_for, return_when=FIRST_COMPLETED)
            else:
                self._wake.clear()
                if not self._done:
                    self._wake.wait(wait_for)
        while self._done:
            fut = self._done.popleft()
            chunk = self.futures.pop(fut, None)
            if chunk is None:  # dropped: it came after a failure, or was never ours
                continue
            if fut.cancelled():  # cancelled by this scheduler: nobody waits for it
                continue
            exc = fut.exception()
            if exc is not None:  # lost, unsendable, or the backend shut down under it
                self._on_failure(chunk, exc)
                continue
            self._on_outcome(chunk, fut.result())

    def _help(self) -> bool:
        """Run one small chunk in the caller while no worker is ready (never idle)."""
        if (self.exhausted or self.failed_at is not None or self.unyielded >= self.max_items
                or len(self.window) >= self.max_window):
            return False
        chunk = self._cut(max(1, self._next_size() // 4))
        if chunk is None:
            return False
        assert self.helper is not None
        self._submit(chunk, self.helper)
        self.stats.note(self.clock(), f"the caller ran items {chunk.start}-"
                        f"{chunk.start + len(chunk.items) - 1} while workers started")
        return True

    # -- outcomes, failures and retries ------------------------------------------------------
    def _record(self, chunk: _Chunk, outcome: ChunkOutcome | None, status: str) -> None:
        now = self.clock()
        if self.sample_memory is not None:
            self.stats.memory.append((now, self.sample_memory()))
        self.stats.events.append(chunk.event(outcome, self.backend.name, now, status))
        if chunk.helper and outcome is not None:
            self.stats.caller_item_seconds += outcome.wall_seconds
        if outcome is not None and outcome.first_call_seconds is not None:
            self.stats.first_calls.setdefault(outcome.slot, outcome.first_call_seconds)

    def _on_outcome(self, chunk: _Chunk, outcome: ChunkOutcome) -> None:
        n_ok = len(outcome.results)
        self._record(chunk, outcome, "ok" if outcome.error is None else "error")
        self.stats.chunks += 1
        self.stats.items += n_ok
        seconds: float | None = outcome.wall_seconds
        if outcome.first_call_seconds is not None:
            # The first call in a worker paid a one-off (an import, a model load): not item cost.
            seconds = (None if n_ok < 2 else
                       (outcome.wall_seconds - outcome.first_call_seconds) * n_ok / (n_ok - 1))
        if n_ok:
            if seconds is not None:
                self.policy.observe(n_ok, max(0.0, seconds))
            if self.on_progress is not None:
                self.on_progress(n_ok)
            if self.on_outcome is not None and seconds is not None:
                self.on_outcome(self, n_ok, max(0.0, seconds))
        if outcome.error is None:
            self._settle(chunk, outcome.results)
            return
        exc = outcome.error
        head, item, rest = chunk.split_at_failure(n_ok, per_chunk=self.style == "chunk")
        at = item.start
        if self.ordered:
            self.window.pop(chunk.start, None)
            for part in (head, item, rest):
                if part is not None:
                    self.window[part.start] = part
        if head is not None:
            self._settle(head, outcome.results)
        failures = self.item_failures[at] = self.item_failures.get(at, 0) + 1
        if self.retry_on and isinstance(exc, self.retry_on) and failures <= self.retries:
            if self._past_failure(at):  # an earlier item already failed for good
                self._drop(item)
            else:
                self.stats.retries += 1
                due = self.clock() + self.backoff * 2 ** (failures - 1)
                heapq.heappush(self.delayed, (due, next(self._order), item))
        else:
            if failures > 1:
                add_note(exc, f"amortune: item {at} failed {failures} times "
                              f"(retries={self.retries})")
            if self.style == "chunk" and len(chunk.items) > 1:
                add_note(exc, f"amortune: raised by the per-chunk function on "
                              f"{_describe(chunk.indices)}")
            note_item(exc, at)
            item.error = exc
            self._fail_at(at, exc)
        if rest is not None:
            # The rest runs unless it comes after an item that failed for good: a failure
            # further on (another chunk's) must not strand items before it.
            if self._past_failure(rest.start):
                self._drop(rest)
            else:
                self.requeue.append(rest)

    def _past_failure(self, index: int) -> bool:
        """Whether item ``index`` need not run: the call stops at an earlier failure."""
        if not self.fail_fast or self.failed_at is None:
            return False
        return index > self.failed_at if self.ordered else True

    def _drop(self, part: _Chunk) -> None:
        """Forget a part that will not run (it comes after the failure the call stops at)."""
        if self.ordered and self.window.get(part.start) is part:
            del self.window[part.start]
            self.unyielded -= len(part.items)

    def _on_failure(self, chunk: _Chunk, exc: BaseException) -> None:
        lost = self.backend.is_lost(exc) or (self.helper is not None and self.helper.is_lost(exc))
        self._record(chunk, None, "lost" if lost else "error")
        if lost and chunk.attempts <= self.retries:
            self.stats.retries += 1
            self.requeue.appendleft(chunk)
            return
        if chunk.attempts > 1:
            note = (f"amortune: {_describe(chunk.indices)} failed {chunk.attempts} times "
                    f"(retries={self.retries})")
            if note not in getattr(exc, "__notes__", ()):
                add_note(exc, note)
        index = getattr(exc, "amortune_index", None)
        chunk.error = exc
        self._fail_at(chunk.start if index is None else min(index, chunk.start), exc)

    def _settle(self, chunk: _Chunk, results: list[Any]) -> None:
        if self.ordered:
            chunk.results = results
        else:
            self.ready_unordered.append(results)

    def _fail_at(self, index: int, exc: BaseException) -> None:
        if self.failed_at is not None and self.failed_at <= index:
            return
        self.failed_at = index
        self.first_error = exc
        if not self.fail_fast:
            return  # every item still runs; the first error is raised at the end
        if not self.ordered:
            for f in list(self.futures):
                if not f.cancel():
                    self.stopping.append(f)
            self.futures.clear()
            self.delayed.clear()
            self.requeue.clear()
            return
        # Chunks after the failure will never be yielded: stop them where they run.
        for start in [s for s in self.window if s > index]:
            later = self.window.pop(start)
            self.unyielded -= len(later.items)
            for f, c in list(self.futures.items()):
                if c is later:
                    if not f.cancel():  # already sent: it stops where it runs; wait for that
                        self.stopping.append(f)
                    del self.futures[f]
            self.delayed = [d for d in self.delayed if d[2] is not later]
            heapq.heapify(self.delayed)
            self.requeue = collections.deque(c for c in self.requeue if c is not later)

    # -- the end of a call: nothing of it may keep running -----------------------------------
    def _stop(self, kill: bool = False) -> None:
        running = [f for f in self.futures if not f.cancel()]
        running += [f for f in self.stopping if not f.done()]
        self.stopping.clear()
        self.futures.clear()
        self.delayed.clear()
        self.requeue.clear()
        if not running:
            return
        still = running
        if not kill:
            still = list((self.wait or futures_wait)(running, timeout=STOP_GRACE_SECONDS)[1])
        killed = False
        for backend in (self.backend, self.adopted_from):
            killer = getattr(backend, "kill_tasks", None)
            if still and killer is not None:
                killer(still)  # each backend stops the tasks that are its own
                killed = True
        if killed and kill:  # Ctrl-C: killed at once, and gone before the call raises
            (self.wait or futures_wait)(still, timeout=STOP_GRACE_SECONDS)


def _describe(indices: tuple[int, ...]) -> str:
    from ._errors import describe_indices

    return describe_indices(indices)
