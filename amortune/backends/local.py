"""Local backends: worker processes with crash detection, and threads for I/O-bound work.

Data flow of :class:`ProcessBackend`::

    caller thread                 manager thread                       worker processes
    submit(fn, items) ──Task──▶ pending deque ──assign to idle──▶ pipe ──▶ _worker.worker_main
         ▲                          │  wait(pipes + sentinels + wakeup, deadline)      │
         └──── Future ◀── result / exception / WorkerCrashedError / timeout ◀── pipe ──┘

One pipe and one sentinel per worker, one task per worker at a time, so a death or a timeout is
attributed to exactly one chunk. Dead, timed-out, memory-bloated and never-ready workers are
replaced; three start failures in a row break the pool instead of looping. Every future settles:
the manager thread fails whatever it holds when it stops, and ``shutdown(kill=True)`` kills the
workers from the calling thread, so even a manager blocked writing to a stuck worker is freed
(the write fails with EPIPE). A warm pool per start method is reused by later calls; at exit,
idle workers are stopped and busy ones killed (nobody can wait for their results any more).
"""

from __future__ import annotations

import atexit
import collections
import logging
import multiprocessing as mp
import pickle
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from multiprocessing.connection import wait as mp_wait
from typing import Any

from .._errors import (
    AmortuneError,
    NotPicklableError,
    TaskTimeoutError,
    WorkerCrashedError,
    add_note,
    describe_indices,
    exit_reason,
    rebuild,
)
from .._worker import FUNC_CACHE_SIZE, dumps, first_unpicklable, load_prctl, worker_main
from ._base import Backend, ChunkOutcome, FunctionRef

__all__ = ["ProcessBackend", "get_warm_pool", "peek_warm_pool",
           "shutdown_warm_pools", "discard_warm_pool", "start_cost"]

log = logging.getLogger("amortune")
#: Seconds a worker gets to exit after being asked before it is killed.
_JOIN_SECONDS = 1.0
#: A worker not ready this long after its start is killed and counts as a failed start (a child
#: forked while another thread held a lock can hang forever; spawn with heavy imports takes ~10 s).
_START_TIMEOUT_SECONDS = 60.0
#: Workers dying before they are ready this many times in a row break the pool.
_MAX_START_FAILURES = 3
#: A task is queued behind a running one only if what must be sent for it fits in this many
#: bytes, well inside a pipe's 64 KiB buffer: sending it then never blocks this thread on a busy
#: worker. Queuing halves the idle gap between a worker's tasks (Pool.apply_async round trips).
_QUEUE_BEHIND_BYTES = 32 << 10
#: Delay before trying again to start a worker whose start failed.
_START_RETRY_SECONDS = 0.1


def _settle(fut: Future[Any], exc: BaseException | None = None, result: Any = None) -> None:
    """Finish ``fut`` unless it is already done (a caller may cancel a pending one meanwhile)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


def _failed(exc: BaseException) -> Future[ChunkOutcome]:
    fut: Future[ChunkOutcome] = Future()
    fut.set_exception(exc)
    return fut


class _Task:
    __slots__ = ("fn", "items", "start", "mode", "timeout", "future", "payload", "running")

    def __init__(self, fn: FunctionRef, items: list[Any], start: int, mode: str,
                 timeout: float | None, payload: bytes) -> None:
        self.fn, self.items, self.start, self.mode = fn, items, start, mode
        self.timeout, self.payload, self.running = timeout, payload, False
        self.future: Future[ChunkOutcome] = Future()

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(range(self.start, self.start + len(self.items)))


class _Worker:
    __slots__ = ("process", "conn", "task", "queued", "item_started", "item_index", "funcs",
                 "ready", "rss", "baseline_rss", "retiring", "started_at", "tasks_done", "note")

    def __init__(self, process: Any, conn: Any) -> None:
        self.process, self.conn = process, conn
        self.task: _Task | None = None
        self.queued: _Task | None = None  # sent behind ``task``; starts when ``task`` replies
        self.item_started = self.started_at = time.perf_counter()
        self.item_index = 0
        self.funcs: dict[str, None] = {}  # tokens the worker holds, in the order it got them
        self.ready = self.retiring = False  # retiring: asked to exit, or killed; gets no task
        self.rss = self.baseline_rss = self.tasks_done = 0
        self.note = ""  # why it died, when the worker or the manager knows better than the code


# Measured start-up per start method, filled by the first pool of each method in this process:
# (seconds until the first worker is ready, seconds per further worker).
_START_COSTS: dict[str, tuple[float, float]] = {}
# Before anything was measured here: a cold forkserver or spawn pool needs ~0.1 s for its first
# worker (a fresh interpreter plus imports, measured by benchmarks/calibrate.py).
_DEFAULT_START_COSTS = {"fork": (0.01, 0.002), "forkserver": (0.1, 0.006), "spawn": (0.1, 0.05)}


def _preload_forkserver() -> None:
    """Have the fork server import the worker code once, so each worker starts without it.

    Otherwise every worker pays 20-60 ms importing amortune (on Python 3.11 the server does not
    even preload ``__main__``); preloaded, a worker forked from a running server is ready in
    ~4-7 ms. Modules already listed are kept; a server that already runs is not affected.
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    current = list(getattr(server, "_preload_modules", None) or ["__main__"])
    wanted = [m for m in ("amortune._worker",) if m not in current]
    if wanted:
        mp.set_forkserver_preload(current + wanted)


def start_cost(start_method: str) -> tuple[float, float]:
    """(first worker, each further worker) start-up seconds: measured here once, else defaults."""
    return _START_COSTS.get(start_method, _DEFAULT_START_COSTS.get(start_method, (0.05, 0.04)))


class ProcessBackend(Backend):
    """Worker processes behind a manager thread; a dead or stuck worker never hangs the caller."""

    kind = "processes"

    def __init__(self, n_workers: int, *, start_method: str, thread_cap: int | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 max_tasks_per_child: int | None = None,
                 memory_growth_bytes: int | None = None) -> None:
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        if mp.current_process().daemon:
            raise AmortuneError("a worker process cannot start worker processes of its own "
                                "(it is daemonic); run nested maps serially or on threads")
        self._ctx: Any = mp.get_context(start_method)
        if start_method == "forkserver":
            _preload_forkserver()
        self.start_method = start_method
        self._n = n_workers
        self._thread_cap = thread_cap
        self._init: bytes | None = None
        self.setup_workers(initializer, initargs)
        self._max_tasks = max_tasks_per_child
        self._growth = memory_growth_bytes
        self._pending: collections.deque[_Task] = collections.deque()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._woken = False
        self._closing = self._killing = self._abandon = False
        self._broken: BaseException | None = None
        self._start_failures = 0
        self._retry_start_at: float | None = None
        self._first_start: float | None = None
        self._thread = threading.Thread(target=self._manage, name="amortune-manager", daemon=True)
        self._thread.start()
        _LIVE.add(self)

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
        try:  # pickled here, in the caller: a bad function must not reach the manager thread
            fn.token  # noqa: B018
        except Exception as exc:
            return _failed(NotPicklableError(
                f"the function {fn.func!r} cannot be pickled to send it to a worker: {exc}"))
        try:
            payload = dumps(items)
        except Exception as exc:
            bad = first_unpicklable(items, start)
            err = NotPicklableError(f"item {bad} cannot be pickled to send it to a worker: {exc}")
            err.amortune_index = bad  # type: ignore[attr-defined]
            add_note(err, f"amortune: raised while processing item {bad}")
            return _failed(err)
        task = _Task(fn, items, start, mode, timeout_seconds, payload)
        with self._lock:
            if self._broken is not None:
                return _failed(self._broken)
            if self._closing:
                raise RuntimeError("cannot submit to a backend that is shut down")
            self._pending.append(task)
        self._wake()
        return task.future

    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        """Stop the pool: after the queued work (default), or at once with ``kill``."""
        with self._lock:
            self._closing = True
            self._killing = self._killing or kill
        if kill:  # from this thread too: frees a manager blocked writing to a worker
            for w in list(self._workers):
                _kill(w.process)
        self._wake()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _abandon_at_exit(self) -> None:
        with self._lock:
            self._closing = self._abandon = True
        for w in list(self._workers):
            if w.task is not None:  # also frees a manager blocked writing that task
                _kill(w.process)
        self._wake()
        self._thread.join(_START_TIMEOUT_SECONDS)

    def _wake(self) -> None:
        # One pending wake-up byte at most: a manager that is busy for a while must not let the
        # pipe fill and block callers in submit().
        with self._lock:
            if self._woken:
                return
            self._woken = True
        try:
            self._wake_w.send_bytes(b"")
        except (OSError, ValueError):
            pass

    # -- manager thread -----------------------------------------------------------------------
    def _spawn(self) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        inherited: list[Any] = []
        load_prctl()
        if self.start_method == "fork":
            inherited = [parent, self._wake_r, self._wake_w, *(w.conn for w in self._workers)]
        args = (child, self._thread_cap, self._init, self._max_tasks, self.start_method, inherited)
        proc = self._ctx.Process(target=worker_main, args=args, name="amortune-worker", daemon=True)
        try:
            proc.start()
        except BaseException:
            parent.close()
            raise
        finally:
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
                if self._closing:
                    self._pending = collections.deque(
                        t for t in self._pending if not t.future.cancelled())
                closing, pending = self._closing, bool(self._pending)
                if self._killing or self._abandon or (
                        closing and not pending and all(w.task is None for w in self._workers)):
                    return
            while (not closing or pending) and self._broken is None and len(self._workers) < self._n:
                try:
                    self._spawn()
                except Exception as exc:
                    self._start_failed(f"could not start a worker process: {exc!r}")
                    # Try again soon (a passing EMFILE/EAGAIN) even if nothing else wakes us.
                    self._retry_start_at = time.perf_counter() + _START_RETRY_SECONDS
                    break
            self._assign()
            waitables: list[Any] = [self._wake_r]
            for w in self._workers:
                waitables += [w.conn, w.process.sentinel]
            ready = mp_wait(waitables, self._next_deadline())
            if self._wake_r in ready:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
                with self._lock:  # after draining: a wake-up from now on writes a new byte
                    self._woken = False
            for w in list(self._workers):
                if w.conn in ready:
                    self._receive(w)
                if w.process.sentinel in ready or not w.process.is_alive():
                    self._reap(w)
            self._check_deadlines()

    def _assign(self) -> None:
        # Idle workers first; then one small task queued behind a running one, so a worker
        # starts its next task without waiting for the round trip through this thread.
        for queue_behind in (False, True):
            for w in self._workers:
                if not w.ready or w.retiring or w.queued is not None:
                    continue
                if (w.task is not None) != queue_behind:
                    continue
                if queue_behind and not self._may_queue_behind(w):
                    continue
                task = self._next_task()
                if task is None:
                    return
                if queue_behind and self._bytes_to_send(w, task) > _QUEUE_BEHIND_BYTES:
                    with self._lock:  # too big to sit in the pipe: it waits for an idle worker
                        self._pending.appendleft(task)
                    continue
                self._send(w, task, queue_behind)

    def _may_queue_behind(self, w: _Worker) -> bool:
        running = w.task
        if running is None or running.timeout is not None:
            return False  # a timed item's clock must start when it starts
        return self._max_tasks is None or w.tasks_done + 2 <= self._max_tasks

    @staticmethod
    def _bytes_to_send(w: _Worker, task: _Task) -> float:
        if task.timeout is not None:
            return float("inf")
        func = 0 if task.fn.token in w.funcs else len(task.fn.payload)
        return len(task.payload) + func

    def _send(self, w: _Worker, task: _Task, queue_behind: bool) -> None:
        if queue_behind:
            w.queued = task
        else:
            w.task = task
            w.item_started, w.item_index = time.perf_counter(), task.start
        try:
            if task.fn.token not in w.funcs:
                w.conn.send_bytes(dumps(("func", task.fn.token, task.fn.payload)))
                if len(w.funcs) >= FUNC_CACHE_SIZE:
                    w.funcs.pop(next(iter(w.funcs)))
                w.funcs[task.fn.token] = None
            msg = ("task", id(task), task.fn.token, task.start, task.mode, task.payload,
                   task.timeout is not None, self._growth)
            w.conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            # The worker died before it had the whole task, so it cannot have run any of it:
            # hand the task to another worker; the sentinel reports the death.
            if queue_behind:
                w.queued = None
            else:
                w.task = None
            w.retiring = True
            with self._lock:
                self._pending.appendleft(task)

    def _next_task(self) -> _Task | None:
        """The oldest pending task nobody cancelled, marked running; ``None`` when none is left."""
        while True:
            with self._lock:
                if not self._pending:
                    return None
                task = self._pending.popleft()
            if task.running or task.future.set_running_or_notify_cancel():
                task.running = True
                return task

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
                w.baseline_rss, self._start_failures = w.rss, 0
                if self._first_start is not None and self.start_method not in _START_COSTS:
                    first = time.perf_counter() - self._first_start
                    per = _DEFAULT_START_COSTS.get(self.start_method, (0.05, 0.04))[1]
                    _START_COSTS[self.start_method] = (first, per)
            elif kind == "tick":
                w.item_started = time.perf_counter()
                w.item_index = w.item_index if msg[2] is None else msg[2]
            elif kind == "retiring":  # grown past the limit: it exits without running more
                w.retiring = True
                unstarted, w.task = w.task, None
                if unstarted is not None:
                    with self._lock:
                        self._pending.appendleft(unstarted)
            elif kind == "exiting":
                w.note = f" (func raised SystemExit({msg[3]!r}) at item {msg[2]})"
            elif kind == "init_error":
                w.retiring = True
                self._broken = rebuild(msg[1])
                self._fail_all(self._broken)
            elif kind in ("done", "error"):
                task, w.task, w.queued = w.task, w.queued, None
                if w.task is not None:  # replies come in order: the queued task starts now
                    w.item_started, w.item_index = time.perf_counter(), w.task.start
                wall, cpu, w.rss = msg[3], msg[4], msg[5]
                w.tasks_done += 1
                if self._max_tasks is not None and w.tasks_done >= self._max_tasks:
                    w.retiring = True  # it exits by itself; no task may be sent to it now
                if task is not None:
                    self._finish(task, kind, msg[2], wall, cpu, w.rss)

    @staticmethod
    def _finish(task: _Task, kind: str, body: Any, wall: float, cpu: float, rss: int) -> None:
        if kind == "error":
            return _settle(task.future, rebuild(body))
        try:
            results = pickle.loads(body)
        except BaseException as exc:
            return _settle(task.future, NotPicklableError(
                f"results of {describe_indices(task.indices)} cannot be unpickled in the caller: "
                f"{exc!r}"))
        _settle(task.future, result=ChunkOutcome(results, wall, cpu, rss))

    def _retire(self, w: _Worker) -> None:
        w.retiring = True
        try:
            w.conn.send_bytes(pickle.dumps(None))
        except OSError:
            pass  # already gone

    def _reap(self, w: _Worker) -> None:
        w.process.join(0)
        code = w.process.exitcode
        if code is None or self._killing:  # killed on purpose: _stop_all settles what it held
            return
        self._receive(w)  # a reply written just before the exit still counts
        self._workers.remove(w)
        w.conn.close()
        task, w.task, queued, w.queued = w.task, None, w.queued, None
        if queued is not None:  # its predecessor never replied, so it never started: rerun it
            with self._lock:
                self._pending.appendleft(queued)
        if task is not None:
            _settle(task.future, WorkerCrashedError(
                f"a worker process (pid {w.process.pid}) died with {exit_reason(code)}{w.note} "
                f"while running {describe_indices(task.indices)}; pass retries=N to run lost "
                "chunks again", exitcode=code, indices=task.indices, rss_bytes=w.rss or None))
        elif not w.ready and not w.retiring and not self._closing:
            self._start_failed(f"a worker process exited with {exit_reason(code)}{w.note} "
                               "before it was ready", code)

    def _start_failed(self, message: str, code: int | None = None) -> None:
        self._start_failures += 1
        if self._start_failures >= _MAX_START_FAILURES and self._broken is None:
            self._broken = WorkerCrashedError(
                f"{message} ({self._start_failures} failed starts in a row)", exitcode=code)
            self._fail_all(self._broken)

    def _next_deadline(self) -> float | None:
        deadlines = [w.item_started + w.task.timeout for w in self._workers
                     if w.task is not None and w.task.timeout is not None and not w.retiring]
        deadlines += [w.started_at + _START_TIMEOUT_SECONDS for w in self._workers
                      if not w.ready and not w.retiring]
        if self._retry_start_at is not None:
            deadlines.append(self._retry_start_at)
            self._retry_start_at = None
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.perf_counter()) + 0.001

    def _check_deadlines(self) -> None:
        now = time.perf_counter()
        for w in list(self._workers):
            task = w.task
            if w.retiring:
                continue
            if not w.ready and now - w.started_at > _START_TIMEOUT_SECONDS:
                w.note = f" (killed: not ready after {_START_TIMEOUT_SECONDS:.0f} s)"
                _kill(w.process)
            if task is None or task.timeout is None or now - w.item_started <= task.timeout:
                continue
            self._receive(w)  # a reply or tick that arrived meanwhile wins over the clock
            if w.task is not task or time.perf_counter() - w.item_started <= task.timeout:
                continue
            w.task, w.retiring = None, True
            _kill(w.process)
            _settle(task.future, TaskTimeoutError(
                f"item {w.item_index} ran longer than the timeout of {task.timeout} s; its "
                "worker was killed and replaced", indices=(w.item_index,)))

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            pending, self._pending = list(self._pending), collections.deque()
        for task in pending:
            _settle(task.future, exc)

    def _stop_all(self) -> None:
        exc = self._broken or CancelledError("the amortune backend was shut down")
        self._fail_all(exc)
        for w in self._workers:
            if w.queued is not None:
                _settle(w.queued.future, exc)
                w.queued = None
            busy, w.task = w.task, None
            if busy is not None:
                _settle(busy.future, exc)
            if self._killing or (self._abandon and busy is not None):
                _kill(w.process)
            else:
                self._retire(w)
        deadline = time.perf_counter() + _JOIN_SECONDS
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.perf_counter()))
            if w.process.exitcode is None:
                _kill(w.process)
                w.process.join(_JOIN_SECONDS)
            w.conn.close()
        self._workers.clear()
        with self._lock:
            self._woken = True  # nothing reads the wake-up pipe any more
        self._wake_r.close()
        self._wake_w.close()


def _kill(process: Any) -> None:
    try:
        process.kill()
    except (OSError, ValueError, AttributeError):
        pass


# -- the warm pool ---------------------------------------------------------------------------
_WARM: dict[str, ProcessBackend] = {}
_WARM_LOCK = threading.Lock()
#: Every process backend not yet stopped, so the exit handler can stop the ones nobody closed.
_LIVE: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()


def get_warm_pool(n_workers: int, start_method: str, *, thread_cap: int | None = None,
                  memory_growth_bytes: int | None = None) -> ProcessBackend:
    """The process-wide reusable pool for ``start_method``, started or grown to ``n_workers``.

    ``memory_growth_bytes`` applies from the next chunk on, so each run's config is honoured.
    """
    with _WARM_LOCK:
        pool = _WARM.get(start_method)
        if pool is not None and pool.alive and pool._init is None:
            pool._growth = memory_growth_bytes
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
    """Stop every warm pool after its queued work (tests call it to check nothing leaks)."""
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


@atexit.register
def _at_exit() -> None:
    # Registered after multiprocessing's own exit handler, so it runs first. Results of busy
    # workers can no longer be waited for: kill those, let idle ones exit cleanly.
    with _WARM_LOCK:
        _WARM.clear()
    for pool in list(_LIVE):
        pool._abandon_at_exit()
