"""Local backends: worker processes with crash detection, and threads for I/O-bound work.

Data flow of :class:`ProcessBackend`::

    caller thread                 manager thread                       worker processes
    submit(fn, items) ──Task──▶ pending deque ──assign to idle──▶ pipe ──▶ _worker.worker_main
         ▲                          │  wait(pipes + sentinels + wakeup, deadline)      │
         └──── Future ◀── result / exception / WorkerCrashedError / timeout ◀── pipe ──┘

One pipe and one sentinel per worker, one task per worker at a time, so a death or a timeout is
attributed to exactly one chunk. Dead, timed-out and memory-bloated workers are replaced. A warm
pool per start method is kept for reuse by later calls and shut down at exit.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import multiprocessing as mp
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from multiprocessing.connection import wait as mp_wait
from typing import Any

from .._errors import (
    NotPicklableError,
    TaskTimeoutError,
    WorkerCrashedError,
    describe_indices,
    exit_reason,
    rebuild,
)
from .._worker import dumps, run_items, worker_main
from ._base import Backend, ChunkOutcome, FunctionRef

__all__ = ["ProcessBackend", "ThreadBackend", "get_warm_pool", "shutdown_warm_pools", "start_cost"]

log = logging.getLogger("amortune")
_ids = itertools.count()
#: Seconds a worker gets to exit after being asked before it is killed.
_JOIN_SECONDS = 1.0


class _Task:
    __slots__ = ("fn", "items", "start", "mode", "timeout", "future", "payload")

    def __init__(self, fn: FunctionRef, items: list[Any], start: int, mode: str,
                 timeout: float | None, payload: bytes) -> None:
        self.fn, self.items, self.start, self.mode = fn, items, start, mode
        self.timeout, self.payload = timeout, payload
        self.future: Future[ChunkOutcome] = Future()

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(range(self.start, self.start + len(self.items)))


class _Worker:
    __slots__ = ("process", "conn", "task", "item_started", "item_index", "funcs", "ready",
                 "rss", "baseline_rss", "retiring", "started_at")

    def __init__(self, process: Any, conn: Any) -> None:
        self.process, self.conn = process, conn
        self.task: _Task | None = None
        self.item_started = 0.0
        self.item_index = 0
        self.funcs: set[str] = set()
        self.ready = False
        self.rss = self.baseline_rss = 0
        self.retiring = False
        self.started_at = time.perf_counter()


# Measured start-up per start method, filled by the first pool of each method in this process:
# (seconds until the first worker is ready, seconds per further worker).
_START_COSTS: dict[str, tuple[float, float]] = {}
_DEFAULT_START_COSTS = {"fork": (0.006, 0.002), "forkserver": (0.05, 0.006), "spawn": (0.05, 0.04)}


def start_cost(start_method: str) -> tuple[float, float]:
    """(first worker, each further worker) start-up seconds: measured here once, else defaults."""
    return _START_COSTS.get(start_method, _DEFAULT_START_COSTS.get(start_method, (0.05, 0.04)))


class ProcessBackend(Backend):
    """Worker processes behind a manager thread; a dead or stuck worker never hangs the caller."""

    kind = "processes"

    def __init__(
        self,
        n_workers: int,
        *,
        start_method: str,
        thread_cap: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        memory_growth_bytes: int | None = None,
    ) -> None:
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        self._ctx: Any = mp.get_context(start_method)
        self.start_method = start_method
        self._n = n_workers
        self._thread_cap = thread_cap
        self._init: bytes | None = None
        if initializer is not None:
            self.setup_workers(initializer, initargs)
        self._max_tasks = max_tasks_per_child
        self._growth = memory_growth_bytes
        self._pending: collections.deque[_Task] = collections.deque()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._closing = False
        self._killing = False
        self._broken: BaseException | None = None
        self._first_start: float | None = None
        self._thread = threading.Thread(target=self._manage, name="amortune-manager", daemon=True)
        self._thread.start()

    # -- caller side -------------------------------------------------------------------------
    def capacity(self) -> int:
        return self._n

    @property
    def warm_workers(self) -> int:
        return sum(1 for w in list(self._workers) if w.ready and not w.retiring)

    @property
    def alive(self) -> bool:
        return not self._closing and self._broken is None and self._thread.is_alive()

    def setup_workers(self, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...] = ()) -> None:
        self._init = None if initializer is None else FunctionRef((initializer, initargs)).payload  # type: ignore[arg-type]

    def resize(self, n_workers: int) -> None:
        """Grow (never shrink) the pool to ``n_workers``."""
        with self._lock:
            self._n = max(self._n, n_workers)
        self._wake()

    def pids(self) -> list[int]:
        """PIDs of the live workers (tests use this to prove nothing is left behind)."""
        return [w.process.pid for w in list(self._workers) if w.process.pid is not None]

    def submit(self, fn: FunctionRef, items: list[Any], start: int, *, mode: str = "map",
               timeout_seconds: float | None = None) -> Future[ChunkOutcome]:
        try:
            payload = dumps(items)
        except Exception as exc:
            bad = start
            for i, item in enumerate(items):
                try:
                    dumps(item)
                except Exception:
                    bad = start + i
                    break
            fut: Future[ChunkOutcome] = Future()
            err = NotPicklableError(f"item {bad} cannot be pickled to send it to a worker: {exc}")
            err.amortune_index = bad  # type: ignore[attr-defined]
            fut.set_exception(err)
            return fut
        task = _Task(fn, items, start, mode, timeout_seconds, payload)
        with self._lock:
            if self._broken is not None:
                task.future.set_exception(self._broken)
                return task.future
            if self._closing:
                raise RuntimeError("cannot submit to a backend that is shut down")
            self._pending.append(task)
        self._wake()
        return task.future

    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        with self._lock:
            self._closing = True
            self._killing = self._killing or kill
        self._wake()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"")
        except OSError:
            pass

    # -- manager thread -----------------------------------------------------------------------
    def _spawn(self) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=worker_main,
            args=(child, self._thread_cap, self._init, self._max_tasks),
            name="amortune-worker",
            daemon=True,
        )
        proc.start()
        child.close()
        self._workers.append(_Worker(proc, parent))
        if self._first_start is None:
            self._first_start = time.perf_counter()

    def _manage(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # pragma: no cover - a bug here must not hang callers
            log.exception("amortune manager thread failed")
            self._broken = WorkerCrashedError(f"amortune's manager thread failed: {exc!r}")
        finally:
            self._stop_all()

    def _loop(self) -> None:
        while True:
            with self._lock:
                closing, killing = self._closing, self._killing
                if closing:
                    self._pending = collections.deque(
                        t for t in self._pending if not t.future.cancelled())
                if (not closing or self._pending) and self._broken is None:
                    while len(self._workers) < self._n:
                        self._spawn()
            if killing or (closing and not self._pending
                           and all(w.task is None for w in self._workers)):
                return
            self._assign()
            timeout = self._next_deadline()
            waitables: list[Any] = [self._wake_r]
            for w in self._workers:
                waitables += [w.conn, w.process.sentinel]
            ready = mp_wait(waitables, timeout)
            for obj in ready:
                if obj is self._wake_r:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
            for w in list(self._workers):
                if w.conn in ready:
                    self._receive(w)
                if w.process.sentinel in ready or not w.process.is_alive():
                    self._reap(w)
            self._check_timeouts()

    def _assign(self) -> None:
        for w in self._workers:
            if not self._pending:
                return
            if not w.ready or w.task is not None or w.retiring:
                continue
            with self._lock:
                task = self._pending.popleft()
            if not task.future.set_running_or_notify_cancel():
                continue
            w.task = task
            w.item_started, w.item_index = time.perf_counter(), task.start
            try:
                if task.fn.token not in w.funcs:
                    w.conn.send_bytes(dumps(("func", task.fn.token, task.fn.payload)))
                    w.funcs.add(task.fn.token)
                msg = ("task", id(task), task.fn.token, task.start, task.mode, task.payload,
                       task.timeout is not None)
                w.conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
            except OSError:
                pass  # the worker died; its sentinel reports it and the task fails there

    def _receive(self, w: _Worker) -> None:
        while True:
            try:
                if not w.conn.poll():
                    return
                msg = pickle.loads(w.conn.recv_bytes())
            except (EOFError, OSError):
                return
            kind = msg[0]
            if kind == "ready":
                w.ready, w.rss = True, msg[2]
                w.baseline_rss = w.rss
                if self._first_start is not None and self.start_method not in _START_COSTS:
                    first = time.perf_counter() - self._first_start
                    per = _DEFAULT_START_COSTS.get(self.start_method, (0.05, 0.04))[1]
                    _START_COSTS[self.start_method] = (first, per)
            elif kind == "tick":
                w.item_started, w.item_index = time.perf_counter(), msg[2]
            elif kind == "init_error":
                self._broken = rebuild(msg[1])
                self._fail_all(self._broken)
            elif kind in ("done", "error"):
                task, w.task = w.task, None
                wall, cpu, w.rss = msg[3], msg[4], msg[5]
                if self._growth is not None and w.rss - w.baseline_rss > self._growth:
                    self._retire(w)
                if task is None:
                    continue
                if kind == "done":
                    try:
                        results = pickle.loads(msg[2])
                    except BaseException as exc:
                        task.future.set_exception(NotPicklableError(
                            f"results of {describe_indices(task.indices)} cannot be unpickled "
                            f"in the caller: {exc!r}"))
                        continue
                    task.future.set_result(ChunkOutcome(results, wall, cpu, w.rss))
                else:
                    task.future.set_exception(rebuild(msg[2]))

    def _retire(self, w: _Worker) -> None:
        w.retiring = True
        try:
            w.conn.send_bytes(pickle.dumps(None))
        except OSError:
            pass

    def _reap(self, w: _Worker) -> None:
        w.process.join(_JOIN_SECONDS)
        if w.process.exitcode is None:
            return
        self._workers.remove(w)
        w.conn.close()
        task = w.task
        if task is not None and not task.future.done():
            code = w.process.exitcode
            task.future.set_exception(WorkerCrashedError(
                f"a worker process (pid {w.process.pid}) died with {exit_reason(code)} while "
                f"running {describe_indices(task.indices)}; pass retries=N to run lost chunks again",
                exitcode=code, indices=task.indices, rss_bytes=w.rss or None))
        if not w.ready and not w.retiring and self._broken is None and not self._closing:
            code = w.process.exitcode
            self._broken = WorkerCrashedError(
                f"a worker process exited with {exit_reason(code)} before it was ready",
                exitcode=code)
            self._fail_all(self._broken)

    def _next_deadline(self) -> float | None:
        deadlines = [w.item_started + w.task.timeout for w in self._workers
                     if w.task is not None and w.task.timeout is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.perf_counter()) + 0.001

    def _check_timeouts(self) -> None:
        now = time.perf_counter()
        for w in list(self._workers):
            task = w.task
            if task is None or task.timeout is None or now - w.item_started <= task.timeout:
                continue
            w.task = None
            w.process.kill()
            task.future.set_exception(TaskTimeoutError(
                f"item {w.item_index} ran longer than the timeout of {task.timeout} s; its "
                "worker was killed and replaced", indices=(w.item_index,)))

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            pending, self._pending = list(self._pending), collections.deque()
        for task in pending:
            if not task.future.done():
                task.future.set_exception(exc)

    def _stop_all(self) -> None:
        cancelled = CancelledError("the amortune backend was shut down")
        self._fail_all(cancelled)
        for w in self._workers:
            if w.task is not None and not w.task.future.done():
                w.task.future.set_exception(cancelled)
            if self._killing:
                w.process.kill()
            else:
                try:
                    w.conn.send_bytes(pickle.dumps(None))
                except OSError:
                    pass
        deadline = time.perf_counter() + _JOIN_SECONDS
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.perf_counter()))
            if w.process.exitcode is None:
                w.process.kill()
                w.process.join(_JOIN_SECONDS)
            w.conn.close()
        self._workers.clear()
        self._wake_r.close()
        self._wake_w.close()


class ThreadBackend(Backend):
    """Threads in this process: for items that wait (I/O, sleep, GIL-free native code)."""

    kind = "threads"

    def __init__(self, n_threads: int) -> None:
        self._n = n_threads
        self._pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="amortune")

    def capacity(self) -> int:
        return self._n

    def submit(self, fn: FunctionRef, items: list[Any], start: int, *, mode: str = "map",
               timeout_seconds: float | None = None) -> Future[ChunkOutcome]:
        return self._pool.submit(_run_in_thread, fn.func, items, start, mode)

    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)


def _run_in_thread(func: Callable[..., Any], items: list[Any], start: int, mode: str) -> ChunkOutcome:
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    try:
        results = run_items(func, items, start, mode)
    except BaseException as exc:
        from .._errors import add_note

        index = getattr(exc, "amortune_index", None)
        if index is not None:
            add_note(exc, f"amortune: raised while processing item {index}")
        raise
    return ChunkOutcome(results, time.perf_counter() - wall0, time.thread_time() - cpu0, 0)


# -- the warm pool ---------------------------------------------------------------------------
_WARM: dict[str, ProcessBackend] = {}
_WARM_LOCK = threading.Lock()


def get_warm_pool(n_workers: int, start_method: str, *, thread_cap: int | None = None,
                  memory_growth_bytes: int | None = None) -> ProcessBackend:
    """The process-wide reusable pool for ``start_method``, started or grown to ``n_workers``."""
    with _WARM_LOCK:
        pool = _WARM.get(start_method)
        if pool is not None and pool.alive and pool._init is None:
            pool.resize(n_workers)
            return pool
        if pool is not None:
            pool.shutdown(wait=False, kill=True)
        pool = ProcessBackend(n_workers, start_method=start_method, thread_cap=thread_cap,
                              memory_growth_bytes=memory_growth_bytes)
        _WARM[start_method] = pool
        return pool


def peek_warm_pool(start_method: str) -> ProcessBackend | None:
    """The warm pool for ``start_method`` if one is alive, without starting anything."""
    pool = _WARM.get(start_method)
    return pool if pool is not None and pool.alive else None


def shutdown_warm_pools(kill: bool = False) -> None:
    """Stop every warm pool (called at exit; tests call it to check nothing leaks)."""
    with _WARM_LOCK:
        pools = list(_WARM.values())
        _WARM.clear()
    for pool in pools:
        pool.shutdown(wait=True, kill=kill)


def discard_warm_pool(pool: ProcessBackend) -> None:
    """Forget ``pool`` as the warm pool (after Ctrl-C killed it) so the next call starts afresh."""
    with _WARM_LOCK:
        for key, value in list(_WARM.items()):
            if value is pool:
                del _WARM[key]


atexit.register(shutdown_warm_pools)
