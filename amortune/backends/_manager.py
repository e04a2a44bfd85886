"""The manager thread of a process backend: it alone talks to the workers.

Data flow::

    caller threads ──Pending(task)──▶ pending deque ──assign to a ready worker──▶ pipe ──▶ worker
         ▲                               │  wait(pipes + sentinels + wake-up pipe, deadline)   │
         └── ChunkFuture ◀── Done / Skipped / WorkerCrashedError / timeout ◀──── pipe ─────────┘

One pipe and one sentinel per worker, at most one running and one queued task per worker, so a
death or a timeout is attributed to exactly one chunk. A worker belongs to a :class:`Slot`; its
replacement takes the same slot id and environment (a device). Every future settles: whatever
the manager holds when it stops fails, and a kill from the caller's thread frees a manager
blocked writing to a stuck worker. Imports the standard library, ``_errors``, ``_protocol``,
``_serde``, ``_worker`` and ``_start``.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from typing import Any

from .._errors import NotPicklableError, TaskTimeoutError, WorkerCrashedError, exit_reason, rebuild
from .._protocol import (
    Cancel,
    Done,
    Env,
    Exiting,
    Func,
    InitError,
    Ready,
    Retiring,
    Run,
    Skipped,
    Tick,
)
from .._serde import dumps
from .._worker import FUNC_CACHE_SIZE, load_prctl, worker_main
from ._base import ChunkFuture, ChunkOutcome, ChunkTask, Slot, settle
from ._start import record_start_cost

__all__ = ["Flags", "Manager", "Pending", "settle"]

log = logging.getLogger("amortune")
#: Seconds a worker gets to exit after being asked before it is killed.
_JOIN_SECONDS = 1.0
#: A worker not ready this long after its start is killed and counts as a failed start (spawn
#: with heavy imports takes ~10 s; a forked child stuck on an inherited lock never gets ready).
_START_TIMEOUT_SECONDS = 60.0
#: Workers dying before they are ready this many times in a row break the pool.
_MAX_START_FAILURES = 3
#: A task is queued behind a running one only if what must be sent for it fits in this many
#: bytes, well inside a pipe's 64 KiB buffer, so sending never blocks this thread on a busy worker.
_QUEUE_BEHIND_BYTES = 32 << 10
#: Delay before trying again to start a worker whose start failed.
_START_RETRY_SECONDS = 0.1


_ENV_LOCK = threading.Lock()


class Pending:
    """A submitted task, its pickled items and its future."""

    __slots__ = ("task", "payload", "future", "id", "running")
    _ids = iter(range(1, 1 << 62))

    def __init__(self, task: ChunkTask, payload: bytes, future: ChunkFuture) -> None:
        self.task, self.payload, self.future = task, payload, future
        self.id = next(Pending._ids)
        self.running = False


@dataclass
class Flags:
    """The manager's state flags in one place (read by callers under ``lock``)."""

    closing: bool = False
    killing: bool = False
    abandon: bool = False
    woken: bool = False
    broken: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Worker:
    __slots__ = ("process", "conn", "slot", "task", "queued", "item_started", "item_index",
                 "funcs", "ready", "rss", "retiring", "started_at", "tasks_done", "note",
                 "env_token")

    def __init__(self, process: Any, conn: Any, slot: Slot) -> None:
        self.process, self.conn, self.slot = process, conn, slot
        self.task: Pending | None = None
        self.queued: Pending | None = None  # sent behind ``task``; starts when ``task`` replies
        self.item_started = self.started_at = time.perf_counter()
        self.item_index = 0
        self.funcs: dict[str, None] = {}  # tokens the worker holds, in the order it got them
        self.ready = self.retiring = False
        self.rss = self.tasks_done = 0
        self.note = ""
        self.env_token: str | None = None


class Manager:
    """Owns the workers of one process backend; runs in its own thread once started."""

    def __init__(self, ctx_first: Any, ctx_later: Any, slots: list[Slot], *, methods: tuple[str, str],
                 thread_cap: int | None, init_payload: bytes | None, max_tasks: int | None,
                 flags: Flags, start_timeout_seconds: float = _START_TIMEOUT_SECONDS) -> None:
        self.ctx_first, self.ctx_later = ctx_first, ctx_later
        self.start_timeout = start_timeout_seconds
        self.methods = methods
        self.slots = slots
        self.thread_cap, self.init_payload, self.max_tasks = thread_cap, init_payload, max_tasks
        self.flags = flags
        self.pending: collections.deque[Pending] = collections.deque()
        self.cancels: list[Pending] = []
        self.kills: list[Pending] = []
        self.workers: list[_Worker] = []
        self.wake_r, self.wake_w = ctx_later.Pipe(duplex=False)
        self.start_failures = 0
        self.retry_start_at: float | None = None
        self.first_start: float | None = None
        self.start_log: dict[int, tuple[float, float]] = {}
        self.thread = threading.Thread(target=self._main, name="amortune-manager", daemon=True)

    # -- called from the caller's thread -------------------------------------------------------
    def fork_initial(self) -> None:
        """Fork every slot's first worker now, from the caller's (only) thread."""
        for slot in self.slots:
            self._spawn(slot, self.ctx_first, self.methods[0])

    def wake(self) -> None:
        # One pending wake-up byte at most: a busy manager must not let the pipe fill.
        with self.flags.lock:
            if self.flags.woken:
                return
            self.flags.woken = True
        try:
            self.wake_w.send_bytes(b"")
        except (OSError, ValueError):
            pass

    def kill_all(self) -> None:
        for w in list(self.workers):
            _kill(w.process)

    # -- the manager thread --------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # pragma: no cover - a bug here must not hang callers
            log.exception("amortune manager thread failed")
            self.flags.broken = WorkerCrashedError(f"amortune's manager thread failed: {exc!r}")
        finally:
            self._stop_all()

    def _spawn(self, slot: Slot, ctx: Any, method: str) -> None:
        parent, child = ctx.Pipe(duplex=True)
        inherited: list[Any] = []
        load_prctl()
        if method == "fork":
            inherited = [parent, self.wake_r, self.wake_w, *(w.conn for w in self.workers)]
        args = (child, self.thread_cap, self.init_payload, self.max_tasks, method, inherited,
                tuple(slot.env.items()))
        proc = ctx.Process(target=worker_main, args=args, name=f"amortune-worker-{slot.id}",
                           daemon=True)
        try:
            if method == "spawn" and slot.env:
                # A spawned child imports the caller's __main__ before worker_main runs: its
                # device variables must be in the environment it starts with.
                with _ENV_LOCK:
                    saved = {k: os.environ.get(k) for k in slot.env}
                    os.environ.update(slot.env)
                    try:
                        proc.start()
                    finally:
                        for k, v in saved.items():
                            if v is None:
                                os.environ.pop(k, None)
                            else:
                                os.environ[k] = v
            else:
                proc.start()
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.workers.append(_Worker(proc, parent, slot))
        if self.first_start is None:
            self.first_start = time.perf_counter()

    def _free_slots(self) -> list[Slot]:
        taken = {w.slot.id for w in self.workers}
        return [s for s in self.slots if s.id not in taken]

    def _loop(self) -> None:
        flags = self.flags
        while True:
            with flags.lock:
                if flags.closing:
                    self.pending = collections.deque(
                        t for t in self.pending if not t.future.cancelled())
                closing, has_pending = flags.closing, bool(self.pending)
                cancels, self.cancels = self.cancels, []
                kills, self.kills = self.kills, []
                if flags.killing or flags.abandon or (
                        closing and not has_pending and all(w.task is None for w in self.workers)):
                    return
            self._apply_cancels(cancels, kills)
            for slot in self._free_slots():
                if (closing and not has_pending) or flags.broken is not None:
                    break
                try:
                    self._spawn(slot, self.ctx_later, self.methods[1])
                except Exception as exc:
                    self._start_failed(f"could not start a worker process: {exc!r}")
                    self.retry_start_at = time.perf_counter() + _START_RETRY_SECONDS
                    break
            self._assign()
            waitables: list[Any] = [self.wake_r]
            for w in self.workers:
                waitables += [w.conn, w.process.sentinel]
            ready = mp_wait(waitables, self._next_deadline())
            if self.wake_r in ready:
                while self.wake_r.poll():
                    self.wake_r.recv_bytes()
                with flags.lock:  # after draining: a wake-up from now on writes a new byte
                    flags.woken = False
            for w in list(self.workers):
                if w.conn in ready:
                    self._receive(w)
                if w.process.sentinel in ready or not w.process.is_alive():
                    self._reap(w)
            self._check_deadlines()

    def _apply_cancels(self, cancels: list[Pending], kills: list[Pending]) -> None:
        for p in kills:
            for w in self.workers:
                if w.task is p or w.queued is p:
                    w.note = " (killed: its call was interrupted)"
                    w.retiring = True
                    if w.queued is not None and w.queued is not p:
                        with self.flags.lock:
                            self.pending.appendleft(w.queued)
                    if w.task is not None and w.task is not p:
                        with self.flags.lock:
                            self.pending.appendleft(w.task)
                    w.task = w.queued = None
                    _kill(w.process)
            settle(p.future, CancelledError("the call was interrupted"))
        for p in cancels:
            for w in self.workers:
                if w.task is p or w.queued is p:
                    try:
                        w.conn.send_bytes(dumps(Cancel(p.id)))
                    except OSError:
                        pass

    def _assign(self) -> None:
        # Idle workers first; then one small task queued behind a running one, so a worker
        # starts its next task without waiting for the round trip through this thread.
        for queue_behind in (False, True):
            for w in self.workers:
                if not w.ready or w.retiring or w.queued is not None:
                    continue
                if (w.task is not None) != queue_behind:
                    continue
                if queue_behind and not self._may_queue_behind(w):
                    continue
                p = self._next_task()
                if p is None:
                    return
                if queue_behind and self._bytes_to_send(w, p) > _QUEUE_BEHIND_BYTES:
                    with self.flags.lock:
                        self.pending.appendleft(p)
                    continue
                self._send(w, p, queue_behind)

    def _may_queue_behind(self, w: _Worker) -> bool:
        running = w.task
        if running is None or running.task.timeout_seconds is not None:
            return False  # a timed item's clock must start when it starts
        return self.max_tasks is None or w.tasks_done + 2 <= self.max_tasks

    @staticmethod
    def _bytes_to_send(w: _Worker, p: Pending) -> float:
        if p.task.timeout_seconds is not None:
            return float("inf")
        func = 0 if p.task.fn.token in w.funcs else len(p.task.fn.payload)
        return len(p.payload) + func

    def _send(self, w: _Worker, p: Pending, queue_behind: bool) -> None:
        task = p.task
        if queue_behind:
            w.queued = p
        else:
            w.task = p
            w.item_started, w.item_index = time.perf_counter(), task.start
        try:
            if task.fn.token not in w.funcs:
                w.conn.send_bytes(dumps(Func(task.fn.token, task.fn.payload)))
                if len(w.funcs) >= FUNC_CACHE_SIZE:
                    w.funcs.pop(next(iter(w.funcs)))
                w.funcs[task.fn.token] = None
            setup = task.setup
            if setup is not None and (setup.env is not None or setup.thread_cap):
                token = f"{setup.env_token}:{setup.thread_cap}"
                if token != w.env_token:
                    w.conn.send_bytes(dumps(Env(token, setup.env, setup.thread_cap)))
                    w.env_token = token
            growth = getattr(self, "growth_limit", None)
            msg = Run(p.id, task.fn.token, task.start, task.style, p.payload,
                      task.timeout_seconds is not None, growth)
            w.conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            # The worker died before it had the whole task, so it cannot have run any of it:
            # hand the task to another worker; the sentinel reports the death.
            if queue_behind:
                w.queued = None
            else:
                w.task = None
            w.retiring = True
            with self.flags.lock:
                self.pending.appendleft(p)

    def _next_task(self) -> Pending | None:
        while True:
            with self.flags.lock:
                if not self.pending:
                    return None
                p = self.pending.popleft()
            if p.running or p.future.set_running_or_notify_cancel():
                p.running = True
                return p

    def _receive(self, w: _Worker) -> None:
        while True:
            try:
                if not w.conn.poll():
                    return
                msg = pickle.loads(w.conn.recv_bytes())
            except (EOFError, OSError):
                return
            if isinstance(msg, Ready):
                w.ready, w.rss, self.start_failures = True, msg.rss, 0
                now = time.perf_counter()
                self.start_log[w.slot.id] = (w.started_at, now)
                if self.first_start is not None:
                    record_start_cost(self.methods[0], now - self.first_start)
            elif isinstance(msg, Tick):
                w.item_started = time.perf_counter()
                w.item_index = w.item_index if msg.item is None else msg.item
            elif isinstance(msg, Retiring):  # grown past the limit: exits without running more
                w.retiring = True
                # After its last Done, a queued task became ``task``; it never started.
                for unstarted in (w.queued, w.task):
                    if unstarted is not None:
                        with self.flags.lock:
                            self.pending.appendleft(unstarted)
                w.task = w.queued = None
            elif isinstance(msg, Exiting):
                w.note = f" (func raised SystemExit({msg.code!r}) at item {msg.item})"
            elif isinstance(msg, InitError):
                w.retiring = True
                self.flags.broken = rebuild(msg.captured)
                self._fail_all(self.flags.broken)
            elif isinstance(msg, (Done, Skipped)):
                p = self._pop_reply(w)
                if isinstance(msg, Skipped):
                    if p is not None:
                        settle(p.future, CancelledError("cancelled before it ran"))
                    continue
                w.rss = msg.rss
                w.tasks_done += 1
                if self.max_tasks is not None and w.tasks_done >= self.max_tasks:
                    w.retiring = True  # it exits by itself; no task may be sent to it now
                if p is not None:
                    _finish(p, msg, w.slot.id)

    @staticmethod
    def _pop_reply(w: _Worker) -> Pending | None:
        p, w.task, w.queued = w.task, w.queued, None
        if w.task is not None:  # replies come in order: the queued task starts now
            w.item_started, w.item_index = time.perf_counter(), w.task.task.start
        return p

    def _reap(self, w: _Worker) -> None:
        w.process.join(0)
        code = w.process.exitcode
        if code is None or self.flags.killing:  # killed on purpose: _stop_all settles the rest
            return
        self._receive(w)  # a reply written just before the exit still counts
        self.workers.remove(w)
        w.conn.close()
        p, w.task, queued, w.queued = w.task, None, w.queued, None
        if queued is not None:  # its predecessor never replied, so it never started: rerun it
            with self.flags.lock:
                self.pending.appendleft(queued)
        if p is not None:
            hint = _memory_hint(w.rss)
            crash = WorkerCrashedError(
                f"a worker process (pid {w.process.pid}, slot {w.slot.id}) died with "
                f"{exit_reason(code, memory_hint=hint)}{w.note} while running "
                f"{_describe(p.task)}; pass retries=N to run lost chunks again",
                exitcode=code, indices=p.task.indices, rss_bytes=w.rss or None)
            crash.slot = w.slot.id  # type: ignore[attr-defined]
            settle(p.future, crash)
        elif not w.ready and not w.retiring and not self.flags.closing:
            self._start_failed(f"a worker process exited with {exit_reason(code)}{w.note} "
                               "before it was ready", code)

    def _start_failed(self, message: str, code: int | None = None) -> None:
        self.start_failures += 1
        if self.start_failures >= _MAX_START_FAILURES and self.flags.broken is None:
            self.flags.broken = WorkerCrashedError(
                f"{message} ({self.start_failures} failed starts in a row)", exitcode=code)
            self._fail_all(self.flags.broken)

    def _next_deadline(self) -> float | None:
        deadlines = [w.item_started + w.task.task.timeout_seconds for w in self.workers
                     if w.task is not None and w.task.task.timeout_seconds is not None
                     and not w.retiring]
        deadlines += [w.started_at + self.start_timeout for w in self.workers
                      if not w.ready and not w.retiring]
        if self.retry_start_at is not None:
            deadlines.append(self.retry_start_at)
            self.retry_start_at = None
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.perf_counter()) + 0.001

    def _check_deadlines(self) -> None:
        now = time.perf_counter()
        for w in list(self.workers):
            if w.retiring:
                continue
            if not w.ready and now - w.started_at > self.start_timeout:
                w.note = f" (killed: not ready after {self.start_timeout:.0f} s)"
                _kill(w.process)
            p = w.task
            timeout = None if p is None else p.task.timeout_seconds
            if p is None or timeout is None or now - w.item_started <= timeout:
                continue
            self._receive(w)  # a reply or tick that arrived meanwhile wins over the clock
            if w.task is not p or time.perf_counter() - w.item_started <= timeout:
                continue
            w.task, w.retiring = None, True
            _kill(w.process)
            late = TaskTimeoutError(
                f"item {w.item_index} ran longer than the timeout of {timeout} s; its "
                f"worker (slot {w.slot.id}) was killed and replaced", indices=(w.item_index,))
            late.slot = w.slot.id  # type: ignore[attr-defined]
            settle(p.future, late)

    def _fail_all(self, exc: BaseException) -> None:
        with self.flags.lock:
            pending, self.pending = list(self.pending), collections.deque()
        for p in pending:
            settle(p.future, exc)

    def _stop_all(self) -> None:
        flags = self.flags
        exc = flags.broken or CancelledError("the amortune backend was shut down")
        self._fail_all(exc)
        for w in self.workers:
            for p in (w.queued, w.task):
                if p is not None:
                    settle(p.future, exc)
            busy = w.task is not None
            w.task = w.queued = None
            if flags.killing or (flags.abandon and busy):
                _kill(w.process)
            else:
                try:
                    w.conn.send_bytes(pickle.dumps(None))
                except OSError:
                    pass
        deadline = time.perf_counter() + _JOIN_SECONDS
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.perf_counter()))
            if w.process.exitcode is None:
                _kill(w.process)
                w.process.join(_JOIN_SECONDS)
            w.conn.close()
        self.workers.clear()
        with flags.lock:
            flags.woken = True  # nothing reads the wake-up pipe any more
        self.wake_r.close()
        self.wake_w.close()


def _describe(task: ChunkTask) -> str:
    from .._errors import describe_indices

    return describe_indices(task.indices)


def _finish(p: Pending, msg: Done, slot: int) -> None:
    try:
        results = pickle.loads(msg.results) if msg.results else []
    except BaseException as exc:
        settle(p.future, NotPicklableError(
            f"results of {_describe(p.task)} cannot be unpickled in the caller: {exc!r}"))
        return
    error = rebuild(msg.error) if msg.error is not None else None
    settle(p.future, result=ChunkOutcome(
        results, msg.wall, msg.cpu, msg.rss, slot, msg.started, msg.finished, msg.first_call,
        error, msg.serde))


def _memory_hint(rss: int) -> bool | None:
    """Whether a SIGKILLed worker was likely killed for memory: its RSS against what is free."""
    if not rss:
        return None
    try:
        from .._system import memory_snapshot

        available = memory_snapshot()
    except Exception:
        return None
    return rss > 0.5 * available


def _kill(process: Any) -> None:
    try:
        process.kill()
    except (OSError, ValueError, AttributeError):
        pass
