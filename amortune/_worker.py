"""Code that runs inside a worker: the chunk runner, its timing, RSS probe and exception capture.

Data flow (one worker process, one duplex pipe to the caller's manager thread)::

    caller ──("func", token, bytes)────────▶ worker: cache the unpickled function by token
    caller ──("task", id, token, start, mode, items bytes, ticks)──▶ worker: run func over the chunk
    worker ──("tick", id, i)──▶ caller         (only with a timeout: item i has started; i is
                                                None while the chunk's results are pickled)
    worker ──("done", id, results bytes, wall_s, cpu_s, rss)──▶ caller
    worker ──("error", id, captured exception, wall_s, cpu_s, rss)──▶ caller
    worker ──("exiting", id, i, code)──▶ caller  (func raised SystemExit: the worker exits with it)
    caller ──None──▶ worker exits

Messages are plain tuples of builtins and bytes. A worker never outlives the caller: it is
SIGKILLed by the kernel when its parent dies (Linux), and it exits on EOF of its pipe. Imports the
standard library, ``_errors`` and (lazily, for the odd object plain pickle refuses) cloudpickle;
nothing caller-side.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._errors import NotPicklableError, capture

__all__ = ["dumps", "first_unpicklable", "load_prctl", "run_items", "worker_main", "rss_bytes",
           "THREAD_ENV_VARS"]

THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

#: Functions a worker keeps unpickled, oldest evicted first; the caller mirrors this exactly to
#: know which functions it must send again.
FUNC_CACHE_SIZE = 16

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PR_SET_PDEATHSIG = 1
_prctl: Any = None


def dumps(obj: Any) -> bytes:
    """Pickle with the fast stdlib pickler; fall back to cloudpickle for lambdas and closures."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]


def rss_bytes() -> int:
    """Resident memory of this process; cheap on Linux (one read of /proc/self/statm)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        try:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        except Exception:
            return 0


def run_items(
    func: Callable[..., Any],
    items: Sequence[Any],
    start: int,
    mode: str,
    on_item: Callable[[int], None] | None = None,
) -> list[Any]:
    """Apply ``func`` to each item in order; ``mode`` is ``"map"``, ``"star"`` or ``"apply"``.

    An exception propagates with ``amortune_index`` set to the failing item's input index.
    """
    out: list[Any] = []
    append = out.append
    try:
        if on_item is None and mode == "map":
            for item in items:
                append(func(item))
        else:
            for item in items:
                if on_item is not None:
                    on_item(start + len(out))
                if mode == "map":
                    append(func(item))
                elif mode == "star":
                    append(func(*item))
                else:
                    args, kwargs = item
                    append(func(*args, **kwargs))
    except BaseException as exc:
        exc.amortune_index = start + len(out)  # type: ignore[attr-defined]
        raise
    return out


def _limit_native_threads(n_threads: int | None) -> None:
    if not n_threads:
        return
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n_threads)
    if "numpy" in sys.modules:  # already loaded (inherited from a preloaded parent)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(n_threads)
        except Exception:
            pass


def load_prctl() -> Any:
    """libc's ``prctl`` (Linux) or ``None``, loaded once.

    The caller loads it before it forks, so a forked worker needs no import (and no import lock
    another thread of the caller might hold at the moment of the fork).
    """
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        try:
            import ctypes

            _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
        except Exception:
            _prctl = False
    return _prctl or None


def _die_with_parent(parent_is_forkserver: bool) -> None:
    """Ask the kernel to SIGKILL this worker when its parent dies, then exit if that happened.

    The parent is the caller, or the forkserver, which exits when the caller does. A caller that
    died before the request was made cannot trigger it, so check once by hand afterwards.
    """
    prctl = load_prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    import multiprocessing

    if parent_is_forkserver:
        # The forkserver exits when the last holder of its "alive" pipe closes it, and it hands a
        # copy to every child it forks: a busy worker would keep it, and so itself, alive forever
        # after the caller died. This worker never forks through that server (a nested forkserver
        # use starts its own, as the pid is unknown here), so drop the copy.
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
    # With fork or spawn the parent is the caller itself, and a new parent pid means it is gone.
    # Forkserver workers watch the caller's sentinel pipe instead.
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
) -> None:
    """Entry point of a worker process: serve tasks from ``conn`` until told to stop.

    Runs in a child. SIGINT is ignored (the caller owns Ctrl-C and terminates workers itself).
    ``inherited`` are the caller's pipe ends a forked child got by accident; closing them lets
    every worker see EOF when the caller goes away. A ``SystemExit`` from ``func`` ends the worker
    with that exit code, as it would end a plain script.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for other in inherited:
        other.close()
    _die_with_parent(start_method == "forkserver")
    _limit_native_threads(n_threads)
    try:
        if initializer is not None:
            try:
                init, initargs = pickle.loads(initializer)
                init(*initargs)
            except BaseException as exc:
                conn.send_bytes(dumps(("init_error", capture(exc, None))))
                return
        baseline_rss = rss_bytes()
        conn.send_bytes(dumps(("ready", os.getpid(), baseline_rss)))
        _serve(conn, max_tasks, baseline_rss)
    except (EOFError, OSError):  # the caller is gone: nothing to report to
        return


def _serve(conn: Any, max_tasks: int | None, baseline_rss: int) -> None:
    funcs: dict[str, Any] = {}
    send = conn.send_bytes
    done_tasks = 0
    while True:
        msg = pickle.loads(conn.recv_bytes())
        if msg is None:
            return
        if msg[0] == "func":
            _, token, payload = msg
            if len(funcs) >= FUNC_CACHE_SIZE:  # the manager evicts the same one (oldest first)
                funcs.pop(next(iter(funcs)))
            try:
                funcs[token] = pickle.loads(payload)
            except BaseException as exc:  # reported with the first task that needs it
                funcs[token] = _LoadFailed(capture(exc, None))
            continue
        _, task_id, token, start, mode, payload, ticks, growth_limit = msg
        wall0, cpu0 = time.perf_counter(), time.process_time()
        reply: tuple[Any, ...]
        on_item = (lambda i, t=task_id: send(dumps(("tick", t, i)))) if ticks else None
        try:
            func = funcs[token]
            if isinstance(func, _LoadFailed):
                reply = ("error", task_id, func.captured)
                raise _Reported
            try:
                items = pickle.loads(payload)
            except BaseException as exc:
                raise NotPicklableError(
                    f"the items of the chunk starting at item {start} cannot be unpickled in the "
                    f"worker: {exc!r}") from exc
            results = run_items(func, items, start, mode, on_item)
            if on_item is not None:
                send(dumps(("tick", task_id, None)))  # pickling results is not an item's time
            try:
                body = dumps(results)
            except Exception as exc:
                bad = first_unpicklable(results, start)
                err = NotPicklableError(f"the result of item {bad} cannot be pickled: {exc}")
                err.amortune_index = bad  # type: ignore[attr-defined]
                raise err from None
            reply = ("done", task_id, body)
        except _Reported:
            pass
        except SystemExit as exc:
            send(dumps(("exiting", task_id, getattr(exc, "amortune_index", None), exc.code)))
            raise
        except BaseException as exc:
            index = getattr(exc, "amortune_index", None)
            reply = ("error", task_id, capture(exc, index))
        wall, cpu, rss = time.perf_counter() - wall0, time.process_time() - cpu0, rss_bytes()
        send(dumps((*reply, wall, cpu, rss)))
        done_tasks += 1
        if growth_limit is not None and rss - baseline_rss > growth_limit:
            # Grown too much: leave before any task queued behind this one starts, and say so,
            # so the caller reruns that task elsewhere instead of reporting a crash.
            send(dumps(("retiring", task_id)))
            return
        if max_tasks is not None and done_tasks >= max_tasks:
            return


class _LoadFailed:
    """Stands in for a function that could not be unpickled in this worker."""

    def __init__(self, captured: Any) -> None:
        self.captured = captured


class _Reported(Exception):
    """Internal: the reply is already set."""


def first_unpicklable(objs: Sequence[Any], start: int) -> int:
    """Input index of the first of ``objs`` (indices from ``start``) that cannot be pickled."""
    for i, r in enumerate(objs):
        try:
            dumps(r)
        except Exception:
            return start + i
    return start
