"""The entry point of a worker process: it serves :mod:`amortune._protocol` messages.

One duplex pipe to the caller's manager thread::

    caller ──Func(token, bytes)──▶ cache the unpickled function (oldest evicted first)
    caller ──Env(token, pairs)───▶ make os.environ match the caller's as of the call
    caller ──Run(id, token, start, style, items, ...)──▶ run the chunk ──Done(...)──▶ caller
    caller ──Cancel(id)──▶ skip that task, or stop it before its next item ──Skipped(id)──▶
    caller ──None──▶ exit

A worker never outlives the caller: the kernel SIGKILLs it when its parent dies (Linux) and it
exits on EOF of its pipe. Imports the standard library, ``_errors``, ``_serde``, ``_protocol``,
``_start`` and ``_worker``.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from ._errors import NotPicklableError, capture
from ._protocol import (
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
from ._serde import dumps, first_unpicklable
from ._start import mark_worker
from ._worker import (
    _NATIVE_POOL_MODULES,
    FUNC_CACHE_SIZE,
    THREAD_ENV_VARS,
    MessageReader,
    apply_env,
    limit_native_threads,
    rss_bytes,
    run_chunk,
    share_main_globals,
)

__all__ = ["load_prctl", "worker_main"]

#: A worker reads its memory after a task that took this long, and otherwise at most this often:
#: tiny tasks in a stream then cost no read each (a task too short to grow memory much).
_RSS_EVERY_SECONDS = 0.002
#: While a chunk runs, the worker looks for a Cancel at most this often (a poll is ~1 µs).
_CANCEL_POLL_SECONDS = 0.005
_PR_SET_PDEATHSIG = 1
_prctl: Any = None


def load_prctl() -> Any:
    """libc's ``prctl`` (Linux) or ``None``, loaded once.

    The caller loads it before it forks, so a forked worker needs no import (and no import lock
    another thread of the caller might hold at the moment of the fork).
    """
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        try:
            _prctl = _libc_function("prctl")
        except Exception:
            try:
                import ctypes

                _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
            except Exception:
                _prctl = False
    return _prctl or None


def _libc_function(name: str) -> Any:
    """libc's ``name`` (``int`` result, ``int`` arguments) through ``_ctypes``, the C module
    behind ``ctypes``: ``import ctypes`` costs about 1 ms more (its type classes), paid before
    the first worker forks."""
    import _ctypes

    class CInt(_ctypes._SimpleCData):  # type: ignore[type-arg]
        _type_ = "i"

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = CInt

    class Libc:
        _handle = _ctypes.dlopen("libc.so.6")

    return Function((name, Libc()))  # type: ignore[arg-type]  # a CDLL is what has _handle


def _die_with_parent(parent_is_forkserver: bool, parent_pid: int | None = None) -> None:
    """Ask the kernel to SIGKILL this worker when its parent dies, then exit if that happened.

    Forkserver workers also drop their copy of the server's "alive" pipe: the server exits when
    its last holder closes it, and a busy worker would otherwise keep it alive forever after a
    SIGKILLed caller. ``parent_pid``: a worker forked by ``_prefork`` knows its parent without
    ``multiprocessing`` (which it has not imported).
    """
    prctl = load_prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid is not None:
        if os.getppid() != parent_pid:
            os._exit(1)
        return
    import multiprocessing

    if parent_is_forkserver:
        from multiprocessing import forkserver

        server: Any = getattr(forkserver, "_forkserver", None)
        fd = getattr(server, "_forkserver_alive_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
            server._forkserver_alive_fd = None
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    gone = not parent.is_alive() if parent_is_forkserver else os.getppid() != parent.pid
    if gone:
        os._exit(1)


def worker_main(
    conn: Any,
    n_threads: int | None,
    initializer: bytes | None,
    max_tasks: int | None,
    start_method: str = "spawn",
    inherited: Sequence[Any] = (),
    env: Sequence[tuple[str, str]] = (),
    first: tuple[Any, Run] | None = None,
    parent_pid: int | None = None,
) -> None:
    """Entry point of a worker process: serve tasks from ``conn`` until told to stop.

    Runs in a child. SIGINT is ignored (the caller owns Ctrl-C). ``inherited`` are the caller's
    pipe ends a forked child got by accident; closing them lets every worker see EOF when the
    caller goes away. ``env`` is the slot's own environment (a device id), set before the
    initializer runs. A ``SystemExit`` from ``func`` ends the worker with that exit code.
    ``first`` is a forked child's first task, inherited with its function instead of sent:
    ``(func, Run)``, served before anything from ``conn``; ``parent_pid``, its parent's pid.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mark_worker()
    for other in inherited:
        other.close()
    _die_with_parent(start_method == "forkserver", parent_pid)
    os.environ.update(dict(env))
    limit_native_threads(n_threads)
    try:
        if initializer is not None:
            try:
                init, initargs = share_main_globals(pickle.loads(initializer))
                init(*initargs)
            except BaseException as exc:
                conn.send_bytes(dumps(InitError(capture(exc, None))))
                return
            limit_native_threads(n_threads)  # the initializer may have loaded numpy
        baseline_rss = rss_bytes()
        conn.send_bytes(dumps(Ready(os.getpid(), baseline_rss)))
        server = _Server(conn, max_tasks, baseline_rss, n_threads, tuple(k for k, _ in env))
        if first is not None:
            server.funcs[first[1].token] = first[0]
            server.inbox.append(first[1])
        server.serve()
    except (EOFError, OSError):  # the caller is gone: nothing to report to
        return


class _LoadFailed:
    """Stands in for a function that could not be unpickled in this worker."""

    def __init__(self, captured: Any) -> None:
        self.captured = captured


class _Server:
    """One worker's message loop; messages that arrive while a chunk runs wait in ``inbox``."""

    def __init__(self, conn: Any, max_tasks: int | None, baseline_rss: int,
                 n_threads: int | None, slot_env: tuple[str, ...]) -> None:
        self.conn, self.max_tasks, self.baseline_rss = conn, max_tasks, baseline_rss
        self.reader = MessageReader(conn)
        self.has_message = self.reader.has_message
        self.n_threads: int | None = n_threads
        self.keep_env = (*THREAD_ENV_VARS, *slot_env)
        self.funcs: dict[str, Any] = {}
        self.called: set[str] = set()
        self.env_token: str | None = None
        self.inbox: deque[Any] = deque()
        self.cancelled: set[int] = set()
        self.done_tasks = 0
        # CPU time as the last reply left: blocked on the pipe since, the worker used none, so
        # the next task starts from it (one clock read a task, not two). ``None`` after anything
        # else ran here (a function loaded may have imported a library).
        self.cpu_mark: float | None = None
        self.rss, self.rss_at = 0, -1.0

    def send(self, msg: Any) -> None:
        self.conn.send_bytes(dumps(msg))

    def _read(self) -> Any:
        return self.inbox.popleft() if self.inbox else pickle.loads(self.reader.recv_bytes())

    def _drain(self) -> None:
        """Read what has arrived without blocking; note cancellations at once."""
        while self.has_message():
            msg = pickle.loads(self.reader.recv_bytes())
            if isinstance(msg, Cancel):
                self.cancelled.add(msg.task_id)
            else:
                self.inbox.append(msg)

    def serve(self) -> None:
        while True:
            msg = self._read()
            if msg is None:
                return
            if not isinstance(msg, Run):
                self.cpu_mark = None
            if isinstance(msg, Func):
                self._load(msg)
            elif isinstance(msg, Env):
                if msg.token != self.env_token:
                    if msg.pairs is not None:
                        apply_env(msg.pairs, self.keep_env)
                    if msg.thread_cap and msg.thread_cap != self.n_threads:
                        self.n_threads = msg.thread_cap
                        limit_native_threads(msg.thread_cap)
                    self.env_token = msg.token
            elif isinstance(msg, Cancel):
                self.cancelled.add(msg.task_id)
            elif isinstance(msg, Run):
                self._drain()  # a Cancel sent after this task must win over starting it
                if msg.task_id in self.cancelled:
                    self.cancelled.discard(msg.task_id)
                    self.send(Skipped(msg.task_id))
                    continue
                if not self._run(msg):
                    return

    def _load(self, msg: Func) -> None:
        if len(self.funcs) >= FUNC_CACHE_SIZE:  # the manager evicts the same one (oldest first)
            old = next(iter(self.funcs))
            self.funcs.pop(old)
            self.called.discard(old)
        had_native = any(m in sys.modules for m in _NATIVE_POOL_MODULES)
        try:
            self.funcs[msg.token] = share_main_globals(pickle.loads(msg.payload))
        except BaseException as exc:  # reported with the first task that needs it
            self.funcs[msg.token] = _LoadFailed(capture(exc, None))
        if not had_native:  # the function's module may have loaded numpy just now
            limit_native_threads(self.n_threads)

    def _run(self, msg: Run) -> bool:
        """Run one task and reply; ``False`` when the worker must exit afterwards."""
        wall0 = time.perf_counter()
        cpu0 = time.process_time() if self.cpu_mark is None else self.cpu_mark
        func = self.funcs.get(msg.token)
        first_call: float | None = None
        if func is None or isinstance(func, _LoadFailed):
            captured = func.captured if func is not None else capture(
                NotPicklableError("the function was not sent to this worker"), None)
            self._reply(msg, b"", wall0, cpu0, 0.0, None, captured)
            return True
        try:
            items = pickle.loads(msg.items)
        except BaseException as exc:
            err = NotPicklableError(f"the items of the chunk starting at item {msg.start} cannot "
                                    f"be unpickled in the worker: {exc!r}")
            err.__cause__ = exc
            self._reply(msg, b"", wall0, cpu0, 0.0, None, capture(err, msg.start))
            return True
        serde = time.perf_counter() - wall0
        last_poll = [time.perf_counter()]
        first = msg.token not in self.called
        first_end: list[float] = []

        def on_item(k: int) -> bool:
            now = time.perf_counter()
            if k == 1 and first:
                first_end.append(now)
            if msg.ticks:
                self.send(Tick(msg.task_id, msg.start + k))
            if k and now - last_poll[0] > _CANCEL_POLL_SECONDS:
                last_poll[0] = now
                self._drain()
                if msg.task_id in self.cancelled:
                    return False
            return True

        started = time.perf_counter()
        slow_path = msg.ticks or first or len(items) > 1
        try:
            results, error = run_chunk(func, items, msg.style,
                                       on_item if slow_path and msg.style != "chunk" else None)
        except BaseException as exc:  # pragma: no cover - run_chunk returns errors
            results, error = [], exc
        self.called.add(msg.token)
        finished = time.perf_counter()
        if first:
            first_call = (first_end[0] if first_end else finished) - started
        if isinstance(error, SystemExit):
            index = msg.start + len(results)
            self.send(Exiting(msg.task_id, index, error.code))
            raise error
        if msg.task_id in self.cancelled and error is None and len(results) < len(items):
            self.cancelled.discard(msg.task_id)
            self.send(Skipped(msg.task_id))
            return True
        if msg.ticks:
            self.send(Tick(msg.task_id, None))  # pickling results is not an item's time
        t_pickle = time.perf_counter()
        try:
            body = dumps(results)
        except Exception as exc:
            bad = first_unpicklable(results, msg.start)
            err = NotPicklableError(f"the result of item {bad} cannot be pickled: {exc}")
            err.amortune_unsendable = _unsendable(exc, results[bad - msg.start])  # type: ignore[attr-defined]
            body, results, error = dumps(results[: bad - msg.start]), [], err
            err.amortune_index = bad  # type: ignore[attr-defined]
        serde += time.perf_counter() - t_pickle
        captured = None
        if error is not None:
            at = getattr(error, "amortune_index", None)
            captured = capture(error, at if at is not None else msg.start + len(results))
        rss = self._reply(msg, body, wall0, cpu0, serde, first_call, captured, started, finished)
        self.done_tasks += 1
        if msg.growth_limit is not None and rss - self.baseline_rss > msg.growth_limit:
            # Grown too much: leave before any task queued behind this one starts, and say so,
            # so the caller reruns that task elsewhere instead of reporting a crash.
            self.send(Retiring(msg.task_id))
            return False
        return self.max_tasks is None or self.done_tasks < self.max_tasks

    def _reply(self, msg: Run, body: bytes, wall0: float, cpu0: float, serde: float,
               first_call: float | None, captured: Any, started: float = 0.0,
               finished: float = 0.0) -> int:
        now = time.perf_counter()
        if now - wall0 >= _RSS_EVERY_SECONDS or now - self.rss_at >= _RSS_EVERY_SECONDS:
            self.rss, self.rss_at = rss_bytes(), now
        cpu = self.cpu_mark = time.process_time()
        self.send(Done(msg.task_id, body, now - wall0, cpu - cpu0, self.rss, started, finished,
                       first_call, serde, captured))
        return self.rss


def _unsendable(exc: BaseException, value: Any) -> tuple[str, str]:
    """``(repr(exc), repr(value))``, what ``multiprocessing.pool.MaybeEncodingError`` holds."""
    try:
        shown = repr(value)
    except Exception as err:  # a repr that fails must not hide the pickling error
        shown = f"<{type(value).__name__} object (repr failed: {err!r})>"
    return repr(exc), shown
