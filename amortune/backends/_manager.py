"""The manager thread of a process backend: it alone talks to the workers.

Data flow::

    caller threads ──Pending(task)──▶ pending deque ──assign to a ready worker──▶ pipe ──▶ worker
         ▲                               │  wait(pipes + sentinels + wake-up pipe, deadline)   │
         └── ChunkFuture ◀── Done / Skipped / WorkerCrashedError / timeout ◀──── pipe ─────────┘

One pipe and one sentinel per worker. Each worker runs one task; small tasks may wait behind it
in its pipe (a backlog of a few milliseconds of measured work), so tiny tasks do not each wait
for a round trip through this thread. Replies come in order, so a death or a timeout is
attributed to exactly one chunk and the backlog behind it, never started, runs elsewhere. A
worker belongs to a :class:`Slot`; its replacement takes the same slot id and environment (a
device). Every future settles: whatever the manager holds when it stops fails, and a kill from
the caller's thread frees a manager blocked writing to a stuck worker. Imports the standard library, ``_errors``, ``_protocol``,
``_serde``, ``_serve``, ``_worker`` and ``_start``.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import pickle
import select
import threading
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any

from .. import _errors
from .._errors import TaskTimeoutError, exit_reason, rebuild
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
from .._serve import load_prctl, worker_main
from .._start import record_start_cost, start_process
from .._worker import FUNC_CACHE_SIZE, MessageReader
from ._base import Slot, settle
from ._pending import Flags, Pending, WorkerState, describe, finish, kill, memory_hint

if TYPE_CHECKING:
    from .._prefork import Forked

__all__ = ["Flags", "Manager", "Pending", "settle"]

log = logging.getLogger("amortune")
#: Seconds a worker gets to exit after being asked before it is killed.
_JOIN_SECONDS = 1.0
#: A worker not ready this long after its start is killed and counts as a failed start (spawn
#: with heavy imports takes ~10 s; a forked child stuck on an inherited lock never gets ready).
_START_TIMEOUT_SECONDS = 60.0
#: Workers dying before they are ready this many times in a row break the pool.
_MAX_START_FAILURES = 3
#: Tasks wait behind a running one only while what was sent for them fits in this many bytes,
#: well inside a pipe's 64 KiB buffer, so sending never blocks this thread on a busy worker.
_QUEUE_BEHIND_BYTES = 32 << 10
#: A worker's backlog holds about this much measured work (at most ``_MAX_BACKLOG`` tasks): deep
#: enough that tiny tasks do not wait on this thread, shallow enough to keep the workers even.
_BACKLOG_SECONDS = 0.002
_MAX_BACKLOG = 64
#: Delay before trying again to start a worker whose start failed.
_START_RETRY_SECONDS = 0.1




def _wake_pipe() -> tuple[Any, Any]:
    """The manager's wake-up pipe, ``(read end, write end)``: a plain pipe where ``select.poll``
    can watch it (no ``multiprocessing`` import for a pool whose workers were all adopted)."""
    if hasattr(select, "poll"):
        from .._prefork import PipeConnection

        pipe = PipeConnection(*os.pipe())
        return pipe, pipe
    import multiprocessing  # pragma: no cover - Windows

    return multiprocessing.Pipe(duplex=False)  # pragma: no cover


class Manager:
    """Owns the workers of one process backend; runs in its own thread once started."""

    def __init__(self, slots: list[Slot], *, methods: tuple[str, str],
                 thread_cap: int | None, init_payload: bytes | None, max_tasks: int | None,
                 flags: Flags, start_timeout_seconds: float = _START_TIMEOUT_SECONDS) -> None:
        self.start_timeout = start_timeout_seconds
        self.methods = methods
        self.slots = slots
        self.thread_cap, self.init_payload, self.max_tasks = thread_cap, init_payload, max_tasks
        self.flags = flags
        self.pending: collections.deque[Pending] = collections.deque()
        self.cancels: list[Pending] = []
        self.kills: list[Pending] = []
        self.workers: list[WorkerState] = []
        self.wake_r, self.wake_w = _wake_pipe()
        self.wake_reader = MessageReader(self.wake_r)
        self._poll: Any = None
        self._poll_key: tuple[int, ...] = ()
        self._poll_fds: dict[int, Any] = {}
        self.start_failures = 0
        self.task_seconds: float | None = None  # a moving average of the tasks' wall time
        from .._system import oom_kill_count

        self.oom_kills = oom_kill_count()  # a rise later says a SIGKILL was the OOM killer's
        self.retry_start_at: float | None = None
        self.first_start: float | None = None
        self.start_log: dict[int, tuple[float, float]] = {}
        self.sent = threading.Event()  # set while nothing submitted waits to be sent
        self.thread = threading.Thread(target=self._main, name="amortune-manager", daemon=True)

    # -- called from the caller's thread -------------------------------------------------------
    def fork_initial(self, adopt: Sequence[tuple[Forked, Pending]] = (), *,
                     spawn: bool = True) -> None:
        """Fork every slot's first worker now, from the caller's (only) thread.

        ``adopt``: workers already forked with their first task (``_prefork``), each with the
        ``Pending`` that task is; they take the first slots. ``spawn=False`` leaves the other
        slots to the manager thread.
        """
        for slot, (forked, p) in zip(self.slots, adopt, strict=False):
            self._adopt(slot, forked, p)
        if spawn:
            for slot in self.slots[len(adopt):]:
                self._spawn(slot, self.methods[0], early=True)

    def _adopt(self, slot: Slot, forked: Forked, p: Pending) -> None:
        w = WorkerState(forked.process, forked.conn, slot, forked=True)
        w.started_at = w.item_started = forked.started
        w.item_index = p.task.start
        w.funcs[p.task.fn.token] = None
        setup = p.task.setup
        if setup is not None and (setup.env is not None or setup.thread_cap):
            w.env_token = f"{setup.env_token}:{setup.thread_cap}"  # as forked: nothing to send
        p.running = True
        w.task = p
        self.workers.append(w)
        if self.first_start is None:
            self.first_start = forked.started

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
            kill(w.process)

    # -- the manager thread --------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # pragma: no cover - a bug here must not hang callers
            log.exception("amortune manager thread failed")
            self.flags.broken = _errors.WorkerCrashedError(f"amortune's manager thread failed: {exc!r}")
        finally:
            self._stop_all()

    def _spawn(self, slot: Slot, method: str, early: bool = False) -> None:
        """Start ``slot``'s worker; ``early``: forked now from the caller's only thread."""
        import multiprocessing  # here: a pool whose workers were all adopted never needs it

        from ._warm import exit_before_multiprocessing

        exit_before_multiprocessing()
        ctx: Any = multiprocessing.get_context(method)
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
            start_process(proc, method, slot.env)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        # Forked from the caller's only thread with no initializer to run, it is ready within
        # milliseconds; any other worker may take long (or hang) before it is.
        quick = early and method == "fork" and self.init_payload is None
        self.workers.append(WorkerState(proc, parent, slot, forked=quick))
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
                    self._spawn(slot, self.methods[1])
                except Exception as exc:
                    self._start_failed(f"could not start a worker process: {exc!r}")
                    self.retry_start_at = time.perf_counter() + _START_RETRY_SECONDS
                    break
            self._assign()
            if not self.sent.is_set():  # (set already: no lock taken on every round)
                with flags.lock:
                    if not self.pending:
                        self.sent.set()
            ready = self._wait_ready(self._next_deadline())
            if self.wake_r in ready:
                while self.wake_reader.has_message():
                    self.wake_reader.recv_bytes()
                with flags.lock:  # after draining: a wake-up from now on writes a new byte
                    flags.woken = False
            for w in list(self.workers):
                if w.conn in ready:
                    self._receive(w)
                if w.process.sentinel in ready or not w.process.is_alive():
                    self._reap(w)
            self._check_deadlines()

    def _wait_ready(self, timeout: float | None) -> set[Any]:
        """The wake-up pipe, worker pipes and sentinels ready within ``timeout`` seconds.

        One ``select.poll`` object, rebuilt only when the workers change: building a selector
        per wait (``multiprocessing.connection.wait``) costs more than a tiny task does.
        """
        waitables: list[Any] = [self.wake_r]
        for w in self.workers:
            waitables += [w.conn, w.process.sentinel]
        if not hasattr(select, "poll"):  # pragma: no cover - Windows
            from multiprocessing.connection import wait as mp_wait

            return set(mp_wait(waitables, timeout))
        key = tuple(id(x) for x in waitables)
        if key != self._poll_key:
            self._poll, self._poll_key = select.poll(), key
            self._poll_fds = {}
            for x in waitables:
                fd = x if isinstance(x, int) else x.fileno()
                self._poll.register(fd, select.POLLIN)
                self._poll_fds[fd] = x
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        return {self._poll_fds[fd] for fd, _ in self._poll.poll(ms) if fd in self._poll_fds}

    def _apply_cancels(self, cancels: list[Pending], kills: list[Pending]) -> None:
        for p in kills:
            for w in self.workers:
                if w.task is p or p in w.backlog:
                    w.note = " (killed: its call was interrupted)"
                    w.retiring = True
                    self._requeue([q for q in (w.task, *w.backlog) if q is not None and q is not p])
                    w.task = None
                    w.backlog.clear()
                    kill(w.process)
            settle(p.future, CancelledError("the call was interrupted"))
        for p in cancels:
            for w in self.workers:
                if w.task is p or p in w.backlog:
                    try:
                        w.conn.send_bytes(dumps(Cancel(p.id)))
                    except OSError:
                        pass

    def _assign(self) -> None:
        """Hand waiting tasks to workers, then write each worker's share in one system call."""
        self._assign_tasks()
        for w in self.workers:
            if w.outbox:
                self._flush(w)

    def _assign_tasks(self) -> None:
        for w in self.workers:  # idle workers first
            if w.ready and not w.retiring and w.task is None:
                p = self._next_task()
                if p is None:
                    return
                self._send(w, p, False)
        # A worker forked from the caller's only thread is ready within milliseconds: its first
        # task waits in its pipe instead of behind another worker's.
        for w in self.workers:
            if w.forked and not w.ready and not w.retiring and w.task is None:
                p = self._next_task()
                if p is None:
                    return
                if w.bytes_to_send(p) > _QUEUE_BEHIND_BYTES:
                    self._requeue([p])  # a write this big could block on a worker not reading
                    break
                self._send(w, p, False)
        # Then small tasks behind running ones, one per worker a round, so they stay even.
        depth = self._backlog_depth()
        sent = True
        while sent:
            sent = False
            for w in self.workers:
                if not w.ready or w.retiring or len(w.backlog) >= depth:
                    continue
                if not self._may_queue_behind(w):
                    continue
                p = self._next_task()
                if p is None:
                    return
                size = w.bytes_to_send(p)
                if w.backlog_bytes + size > _QUEUE_BEHIND_BYTES:
                    self._requeue([p])
                    continue
                w.backlog_bytes += int(size)
                self._send(w, p, True)
                sent = True

    def _backlog_depth(self) -> int:
        """How many tasks may wait behind a running one: 1 until a task's time is known."""
        t = self.task_seconds
        if t is None:
            return 1
        return max(1, min(_MAX_BACKLOG, int(_BACKLOG_SECONDS / max(t, 1e-6))))

    def _may_queue_behind(self, w: WorkerState) -> bool:
        running = w.task
        if running is None or running.task.timeout_seconds is not None:
            return False  # a timed item's clock must start when it starts
        return self.max_tasks is None or w.tasks_done + len(w.backlog) + 2 <= self.max_tasks

    def _requeue(self, tasks: list[Pending]) -> None:
        """Put tasks that never started back at the front of the queue, in their order."""
        with self.flags.lock:
            self.pending.extendleft(reversed(tasks))

    def _send(self, w: WorkerState, p: Pending, queue_behind: bool) -> None:
        """Make ``p`` ``w``'s task (or queue it behind) and put its messages in ``w``'s outbox."""
        task = p.task
        if queue_behind:
            w.backlog.append(p)
        else:
            w.task = p
            w.item_started, w.item_index = time.perf_counter(), task.start
        if task.fn.token not in w.funcs:
            w.put(dumps(Func(task.fn.token, task.fn.payload)))
            if len(w.funcs) >= FUNC_CACHE_SIZE:
                w.funcs.pop(next(iter(w.funcs)))
            w.funcs[task.fn.token] = None
        setup = task.setup
        if setup is not None and (setup.env is not None or setup.thread_cap):
            token = f"{setup.env_token}:{setup.thread_cap}"
            if token != w.env_token:
                w.put(dumps(Env(token, setup.env, setup.thread_cap)))
                w.env_token = token
        growth = getattr(self, "growth_limit", None)
        msg = Run(p.id, task.fn.token, task.start, task.style, p.payload,
                  task.timeout_seconds is not None, growth)
        w.put(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL), p)

    def _flush(self, w: WorkerState) -> None:
        """Write ``w``'s outbox; tasks that did not get through whole go to another worker."""
        lost = w.flush()
        if lost:
            # The worker died before it had these whole, so it cannot have run them: hand them
            # to another worker; the sentinel reports the death.
            for p in lost:
                if w.task is p:
                    w.task = None
                elif p in w.backlog:
                    w.backlog.remove(p)
            w.retiring = True
            self._requeue(lost)

    def _next_task(self) -> Pending | None:
        while True:
            with self.flags.lock:
                if not self.pending:
                    return None
                p = self.pending.popleft()
            if p.future.done():
                continue  # settled while it waited (killed with its call, or cancelled): never run
            if p.running or p.future.set_running_or_notify_cancel():
                p.running = True
                return p

    def _receive(self, w: WorkerState) -> None:
        while True:
            try:
                if not w.has_message():
                    return
                msg = pickle.loads(w.reader.recv_bytes())
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
                # After its last Done, the backlog's first task became ``task``; none started.
                self._requeue([q for q in (w.task, *w.backlog) if q is not None])
                w.task = None
                w.backlog.clear()
            elif isinstance(msg, Exiting):
                w.note = f" (func raised SystemExit({msg.code!r}) at item {msg.item})"
            elif isinstance(msg, InitError):
                w.retiring = True
                self.flags.broken = rebuild(msg.captured)
                self._fail_all(self.flags.broken)
            elif isinstance(msg, (Done, Skipped)):
                p = w.pop_reply()
                if isinstance(msg, Skipped):
                    if p is not None:
                        settle(p.future, CancelledError("cancelled before it ran"))
                    continue
                w.rss = msg.rss
                w.tasks_done += 1
                t = self.task_seconds
                self.task_seconds = msg.wall if t is None else 0.8 * t + 0.2 * msg.wall
                if self.max_tasks is not None and w.tasks_done >= self.max_tasks:
                    w.retiring = True  # it exits by itself; no task may be sent to it now
                if p is not None:
                    finish(p, msg, w.slot.id)

    def _reap(self, w: WorkerState) -> None:
        w.process.join(0)
        code = w.process.exitcode
        if code is None or self.flags.killing:  # killed on purpose: _stop_all settles the rest
            return
        self._receive(w)  # a reply written just before the exit still counts
        self.workers.remove(w)
        w.conn.close()
        p, w.task = w.task, None
        self._requeue(list(w.backlog))  # behind a task that never replied: never started
        w.backlog.clear()
        if p is not None and not w.ready:  # sent before it was ready: it never started
            if self.flags.broken is not None:
                settle(p.future, self.flags.broken)
            else:
                self._requeue([p])
            p = None
        if p is not None:
            hint, self.oom_kills = memory_hint(w.rss, self.oom_kills)
            crash = _errors.WorkerCrashedError(
                f"a worker process (pid {w.process.pid}, slot {w.slot.id}) died with "
                f"{exit_reason(code, memory_hint=hint)}{w.note} while running "
                f"{describe(p.task)}; pass retries=N to run lost chunks again",
                exitcode=code, indices=p.task.indices, rss_bytes=w.rss or None)
            crash.slot = w.slot.id  # type: ignore[attr-defined]
            settle(p.future, crash)
        elif not w.ready and not w.retiring and not self.flags.closing:
            self._start_failed(f"a worker process exited with {exit_reason(code)}{w.note} "
                               "before it was ready", code)

    def _start_failed(self, message: str, code: int | None = None) -> None:
        self.start_failures += 1
        if self.start_failures >= _MAX_START_FAILURES and self.flags.broken is None:
            self.flags.broken = _errors.WorkerCrashedError(
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
                kill(w.process)
            p = w.task
            timeout = None if p is None else p.task.timeout_seconds
            if p is None or timeout is None or now - w.item_started <= timeout:
                continue
            self._receive(w)  # a reply or tick that arrived meanwhile wins over the clock
            if w.task is not p or time.perf_counter() - w.item_started <= timeout:
                continue
            w.task, w.retiring = None, True
            kill(w.process)
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
            for p in (*w.backlog, w.task):
                if p is not None:
                    settle(p.future, exc)
            busy = w.task is not None
            w.task = None
            w.backlog.clear()
            if flags.killing or (flags.abandon and busy):
                kill(w.process)
            else:
                try:
                    w.conn.send_bytes(pickle.dumps(None))
                except OSError:
                    pass
        deadline = time.perf_counter() + _JOIN_SECONDS
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.perf_counter()))
            if w.process.exitcode is None:
                kill(w.process)
                w.process.join(_JOIN_SECONDS)
            w.conn.close()
        self.workers.clear()
        with flags.lock:
            flags.woken = True  # nothing reads the wake-up pipe any more
        self.wake_r.close()
        self.wake_w.close()
