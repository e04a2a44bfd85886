"""An online batcher: single items in, one batched call out, one future per item.

Data flow::

    submit(item, priority) ─▶ bounded priority queue ─▶ runner thread(s): wait until ``size``
        ▲ Future                (blocks or raises        items wait or the oldest waited
        │                        when full)              ``max_wait``, take the highest
        │                                                priority first ─▶ fn(batch)
        └──────────── result i / the batch's exception ◀── one output per item

``size`` (how many items a batch waits for) adapts within ``[min_batch_size, max_batch_size]``:
it drops to what arrived within ``max_wait`` (no item waits for company that is not coming),
doubles when any item is left waiting after a full batch is taken (throughput when load rises),
and halves when a batch runs past ``target_batch_seconds``. A batch that starts takes every
item waiting, up to ``max_batch_size`` (or what fits ``target_batch_seconds``). An adaptive
batcher also starts a batch early once arrivals pause (``QUIET_GAPS`` times their usual gap),
and the size then drops as after ``max_wait``.
Batches of equal-shape numpy arrays are stacked into one array.

``fn`` runs in this process on ``concurrency`` threads (with the torch thread count of the thread
that made the batcher, when torch is loaded), or on model workers: pass an
:class:`amortune.gpu.ModelWorkers` as ``fn`` and each batch runs on an idle device. Imports the
standard library and :mod:`amortune._errors` only; numpy is used only when items are numpy arrays
(and therefore already imported).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from ._errors import AmortuneError

__all__ = ["Batcher", "BatcherFullError", "BatcherStoppedError"]

log = logging.getLogger("amortune")

#: Weight of the newest batch in the smoothed seconds per item (as the scheduler smooths).
EMA_ALPHA = 0.3
#: Latencies and batches kept for ``stats()``.
STATS_WINDOW = 10_000
#: An adaptive batcher starts a batch once no item has come for this many times the usual gap
#: between arrivals (a smoothed mean): the stream has paused, so waiting longer only adds latency.
QUIET_GAPS = 8.0


class BatcherFullError(AmortuneError, queue.Full):
    """``submit`` found the queue full (``block=False``, or still full after ``timeout``)."""


class BatcherStoppedError(AmortuneError, RuntimeError):
    """The batcher stopped before this item ran, or ``submit`` came after ``stop()``."""


class _Request:
    __slots__ = ("item", "future", "enqueued")

    def __init__(self, item: Any, future: Future[Any] | None, enqueued: float) -> None:
        self.item, self.future, self.enqueued = item, future, enqueued


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[k])


class Batcher:
    """Collect single items into batches for ``fn(batch) -> outputs`` and return futures.

    Parameters
    ----------
    fn:
        ``fn(batch)`` with ``batch`` a list of items (or one stacked numpy array when every item
        is an array of one shape and dtype), returning one output per item in order. An
        :class:`amortune.gpu.ModelWorkers` runs each batch on its devices.
    max_batch_size, min_batch_size:
        Bounds of the batch size.
    max_wait:
        Seconds the oldest waiting item may wait for a batch to fill (an adaptive batcher starts
        sooner once arrivals pause).
    initial_batch_size:
        Where the adaptive size starts (default ``min_batch_size``).
    target_batch_seconds:
        A batch that runs longer halves the size, and growth stops where a batch is predicted to
        exceed it (default: no limit but ``max_batch_size``).
    adaptive:
        ``False`` keeps the size at ``max_batch_size``.
    max_queue_size:
        Items that may wait (default unbounded); ``submit`` then blocks or raises, as asked.
    concurrency:
        Batches running at once (threads calling ``fn``; default 1, or the number of workers).
    stack:
        Stack numpy items into one array (default: yes, unless ``fn`` is model workers).

    Examples
    --------
    >>> with Batcher(lambda xs: [2 * x for x in xs], max_batch_size=8, max_wait=0.001) as b:
    ...     futures = [b.submit(i) for i in range(20)]
    ...     [f.result() for f in futures][:5]
    [0, 2, 4, 6, 8]
    """

    def __init__(
        self,
        fn: Callable[[Any], Sequence[Any]] | Any,
        *,
        max_batch_size: int = 64,
        max_wait: float = 0.01,
        min_batch_size: int = 1,
        initial_batch_size: int | None = None,
        target_batch_seconds: float | None = None,
        adaptive: bool = True,
        max_queue_size: int | None = None,
        concurrency: int | None = None,
        stack: bool | None = None,
        name: str = "amortune-batcher",
    ) -> None:
        workers = fn if hasattr(fn, "n_workers") and hasattr(fn, "predict") else None
        self._fn: Callable[[Any], Sequence[Any]] = workers.predict if workers is not None else fn
        if not callable(self._fn):
            raise TypeError(f"fn must be callable or model workers, got {fn!r}")
        _check_int("max_batch_size", max_batch_size)
        _check_int("min_batch_size", min_batch_size)
        if min_batch_size > max_batch_size:
            raise ValueError(f"min_batch_size={min_batch_size} exceeds "
                             f"max_batch_size={max_batch_size}")
        if not max_wait >= 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait!r}")
        if target_batch_seconds is not None and not target_batch_seconds > 0:
            raise ValueError(f"target_batch_seconds must be > 0, got {target_batch_seconds!r}")
        if max_queue_size is not None:
            _check_int("max_queue_size", max_queue_size)
        n_threads = concurrency if concurrency is not None else (
            workers.n_workers if workers is not None else 1)
        _check_int("concurrency", n_threads)
        self.max_batch_size, self.min_batch_size = max_batch_size, min_batch_size
        self.max_wait = float(max_wait)
        self.target_batch_seconds = target_batch_seconds
        self.adaptive = adaptive
        self.max_queue_size = max_queue_size
        self.stack = (workers is None) if stack is None else stack
        start = initial_batch_size if initial_batch_size is not None else min_batch_size
        self._size = max_batch_size if not adaptive else min(max(start, min_batch_size),
                                                             max_batch_size)
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Request]] = []
        self._seq = itertools.count()
        self._paused = self._stopping = self._stopped = False
        self._running = 0
        self._item_seconds: float | None = None
        self._last_arrival: float | None = None
        self._gap: float | None = None  # smoothed seconds between arrivals
        self._quiet_gaps = QUIET_GAPS if adaptive else 0.0
        self._started = time.perf_counter()
        self._counts = collections.Counter[str]()
        self._latencies: collections.deque[float] = collections.deque(maxlen=STATS_WINDOW)
        # (size, seconds, finished) of recent batches
        self._batches: collections.deque[tuple[int, float, float]] = collections.deque(
            maxlen=STATS_WINDOW)
        # OpenMP reads its thread count per thread: a new thread would use every core even when
        # this one was told otherwise (torch.set_num_threads), and on a busy or pinned machine
        # the extra threads stall each other. Runner threads take this thread's setting.
        torch = sys.modules.get("torch")
        self._torch_threads = torch.get_num_threads() if torch is not None else None
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(n_threads)]
        for t in self._threads:
            t.start()

    # -- public ----------------------------------------------------------------------------------

    def submit(self, item: Any, priority: float = 0, *, block: bool = True,
               timeout: float | None = None) -> Future[Any]:
        """Queue ``item``; the future holds its output (or the batch's exception).

        Higher ``priority`` runs first (ties in arrival order). When ``max_queue_size`` items
        wait, ``block=True`` waits for room (at most ``timeout`` seconds) and ``block=False``
        raises :class:`BatcherFullError` at once.
        """
        future: Future[Any] = Future()
        self._put(item, priority, future, block, timeout)
        return future

    def put(self, item: Any, priority: float = 0, *, block: bool = True,
            timeout: float | None = None) -> None:
        """Queue ``item`` without a future (fire and forget); failures count in ``stats()``."""
        self._put(item, priority, None, block, timeout)

    def pause(self) -> None:
        """Stop starting batches (running ones finish); items still queue."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def batch_size(self) -> int:
        """The size batches fill to now (adaptive)."""
        return self._size

    def stats(self) -> dict[str, Any]:
        """Throughput, latency percentiles, batch sizes, queue length and error counts.

        Latencies (``latency_p50``/``p95``/``p99``/``mean``, seconds from ``submit`` to the
        result) and batches cover the last ``STATS_WINDOW`` of each; ``throughput`` is items per
        second over the batches in that window, from the first one's start to the last one's end.
        """
        with self._cond:
            lat = sorted(self._latencies)
            batches = list(self._batches)
            counts = dict(self._counts)
            queued, running, size, paused = len(self._heap), self._running, self._size, self._paused
        sizes = sorted(b[0] for b in batches)
        seconds = sorted(b[1] for b in batches)
        span = (batches[-1][2] - (batches[0][2] - batches[0][1])) if batches else 0.0
        items = sum(sizes)
        return {
            "submitted": counts.get("submitted", 0),
            "completed": counts.get("completed", 0),
            "errors": counts.get("errors", 0),
            "error_batches": counts.get("error_batches", 0),
            "cancelled": counts.get("cancelled", 0),
            "batches": counts.get("batches", 0),
            "batch_starts": {r: counts.get(f"started_{r}", 0)
                             for r in ("size", "wait", "quiet", "drain")},
            "queue_length": queued,
            "running_batches": running,
            "paused": paused,
            "batch_size": size,
            "batch_size_mean": items / len(sizes) if sizes else 0.0,
            "batch_size_p50": _percentile(sizes, 0.5),
            "batch_size_max": sizes[-1] if sizes else 0,
            "batch_sizes": dict(sorted(collections.Counter(sizes).items())),
            "batch_seconds_p50": _percentile(seconds, 0.5),
            "batch_seconds_p95": _percentile(seconds, 0.95),
            "throughput": items / span if span > 0 else 0.0,
            "latency_mean": sum(lat) / len(lat) if lat else 0.0,
            "latency_p50": _percentile(lat, 0.5),
            "latency_p95": _percentile(lat, 0.95),
            "latency_p99": _percentile(lat, 0.99),
            "uptime_seconds": time.perf_counter() - self._started,
        }

    def stop(self, timeout: float | None = None, *, cancel_pending: bool = False) -> None:
        """Stop taking items, run what is queued (``cancel_pending=False``), then return.

        Queued items run without waiting for batches to fill, paused or not. Whatever has not
        started after ``timeout`` seconds, or everything queued with ``cancel_pending``, fails
        with :class:`BatcherStoppedError`. A batch already running is not interrupted.
        """
        with self._cond:
            self._stopping = True
            if cancel_pending:
                self._fail_queued("the batcher was stopped with cancel_pending=True")
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            if t is threading.current_thread():
                continue
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._stopped = True
            self._fail_queued(f"the batcher stopped (timeout={timeout}) before this item ran")
            self._cond.notify_all()

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(cancel_pending=exc[0] is not None)

    def __repr__(self) -> str:
        return (f"<Batcher size={self._size} max_batch_size={self.max_batch_size} "
                f"max_wait={self.max_wait} queued={len(self._heap)}>")

    # -- internals -------------------------------------------------------------------------------

    def _put(self, item: Any, priority: float, future: Future[Any] | None, block: bool,
             timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._stopping:
                    raise BatcherStoppedError("submit after stop(): the batcher takes no items")
                if self.max_queue_size is None or len(self._heap) < self.max_queue_size:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if not block or (left is not None and left <= 0):
                    raise BatcherFullError(f"the batcher queue is full ({self.max_queue_size} "
                                           "items waiting)")
                self._cond.wait(left)
            now = time.perf_counter()
            if self._last_arrival is not None:
                gap = now - self._last_arrival
                self._gap = gap if self._gap is None else (
                    EMA_ALPHA * gap + (1 - EMA_ALPHA) * self._gap)
            self._last_arrival = now
            request = _Request(item, future, now)
            heapq.heappush(self._heap, (-float(priority), next(self._seq), request))
            self._counts["submitted"] += 1
            # A runner waits for the first item, then for a full batch or a deadline it keeps
            # itself: only those two events need waking it (each wake costs it the GIL). A
            # runner that finds a full batch on its own takes it without waiting.
            queued = len(self._heap)
            if queued == 1 or queued == self._size:
                self._cond.notify_all()

    def _fail_queued(self, message: str) -> None:
        """Fail every queued item (the caller holds the lock)."""
        while self._heap:
            request = heapq.heappop(self._heap)[2]
            if request.future is not None and not request.future.set_running_or_notify_cancel():
                self._counts["cancelled"] += 1
                continue
            if request.future is not None:
                request.future.set_exception(BatcherStoppedError(message))
            self._counts["errors"] += 1

    def _take(self) -> tuple[list[_Request], str] | None:
        """Wait for a batch and take it (``None``: stopped and drained)."""
        with self._cond:
            while True:
                if self._stopping:
                    if not self._heap:
                        return None
                    reason = "drain"
                    break
                if self._paused or not self._heap:
                    self._cond.wait()
                    continue
                if len(self._heap) >= self._size:
                    reason = "size"
                    break
                oldest = min(r.enqueued for _, _, r in self._heap)
                now = time.perf_counter()
                left = oldest + self.max_wait - now
                if left <= 0:
                    reason = "wait"
                    break
                if self._quiet_gaps and self._gap is not None and self._last_arrival is not None:
                    quiet = self._last_arrival + self._quiet_gaps * self._gap - now
                    if quiet <= 0:
                        reason = "quiet"
                        break
                    left = min(left, quiet)
                self._cond.wait(left)
            # ``size`` is how many to wait for; once a batch starts it takes every item waiting,
            # up to the cap: under load an item then always makes the next batch, so it waits at
            # most for the batch running and its own, never for a queue of partial batches.
            take = max(self._size, self._cap()) if self.adaptive else self._size
            batch: list[_Request] = []
            while self._heap and len(batch) < take:
                request = heapq.heappop(self._heap)[2]
                if request.future is not None and not request.future.set_running_or_notify_cancel():
                    self._counts["cancelled"] += 1
                    continue
                batch.append(request)
            if reason == "size" and self.adaptive and self._heap:
                self._grow()
            elif reason in ("wait", "quiet") and self.adaptive:
                self._size = max(self.min_batch_size, min(self._size, len(batch)))
            self._running += 1
            self._counts[f"started_{reason}"] += 1
            self._cond.notify_all()  # room in the queue for blocked submitters
            return batch, reason

    def _cap(self) -> int:
        """The most items one batch takes: ``max_batch_size``, or what fits in
        ``target_batch_seconds`` at the measured time per item."""
        if self.target_batch_seconds is not None and self._item_seconds:
            fits = int(self.target_batch_seconds / self._item_seconds)
            return max(self.min_batch_size, min(self.max_batch_size, fits))
        return self.max_batch_size

    def _grow(self) -> None:
        new = min(self.max_batch_size, self._size * 2)
        if self.target_batch_seconds is not None and self._item_seconds:
            fits = int(self.target_batch_seconds / self._item_seconds)
            new = max(self._size, min(new, fits))
        self._size = max(self.min_batch_size, new)

    def _run(self) -> None:
        torch = sys.modules.get("torch")
        if torch is not None and self._torch_threads:
            torch.set_num_threads(self._torch_threads)
        while True:
            taken = self._take()
            if taken is None:
                return
            batch, _ = taken
            began = time.perf_counter()
            outputs: Sequence[Any] | None = None
            error: BaseException | None = None
            try:
                if batch:
                    outputs = self._call(batch)
            except BaseException as exc:
                error = exc
            finished = time.perf_counter()
            self._finish(batch, outputs, error, finished - began, finished)

    def _call(self, batch: list[_Request]) -> Sequence[Any]:
        items = [r.item for r in batch]
        payload: Any = items
        if self.stack:
            np = sys.modules.get("numpy")
            if np is not None and all(isinstance(x, np.ndarray) for x in items):
                first = items[0]
                if all(x.shape == first.shape and x.dtype == first.dtype for x in items):
                    payload = np.stack(items)
        outputs = self._fn(payload)
        try:
            n = len(outputs)
        except TypeError:
            raise TypeError(f"fn returned {type(outputs).__name__}, not one output per item") \
                from None
        if n != len(items):
            raise ValueError(f"fn returned {n} outputs for a batch of {len(items)} items")
        return outputs

    def _finish(self, batch: list[_Request], outputs: Sequence[Any] | None,
                error: BaseException | None, seconds: float, finished: float) -> None:
        for i, request in enumerate(batch):
            future = request.future
            if future is not None:
                if error is not None:
                    future.set_exception(error)
                else:
                    assert outputs is not None
                    future.set_result(outputs[i])
        if error is not None and batch:
            log.debug("amortune: a batch of %d items failed: %r", len(batch), error)
        with self._cond:
            self._running -= 1
            if batch:
                self._counts["batches"] += 1
                self._batches.append((len(batch), seconds, finished))
                self._latencies.extend(finished - r.enqueued for r in batch)
                if error is not None:
                    self._counts["errors"] += len(batch)
                    self._counts["error_batches"] += 1
                else:
                    self._counts["completed"] += len(batch)
                    per = seconds / len(batch)
                    self._item_seconds = per if self._item_seconds is None else (
                        EMA_ALPHA * per + (1 - EMA_ALPHA) * self._item_seconds)
                if (self.adaptive and self.target_batch_seconds is not None
                        and seconds > self.target_batch_seconds and len(batch) > 1):
                    self._size = max(self.min_batch_size, min(self._size, len(batch) // 2))
            self._cond.notify_all()


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
