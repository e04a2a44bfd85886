"""Code that runs inside a worker: the chunk runner, its timing, RSS probe and exception capture.

Data flow (one worker process, one duplex pipe to the caller's manager thread)::

    caller ──("func", token, bytes)────────▶ worker: cache the unpickled function by token
    caller ──("task", id, token, start, mode, items bytes)──▶ worker: run func over the chunk
    worker ──("tick", id, i)──▶ caller         (only with a timeout: item i has started)
    worker ──("done", id, results bytes, wall_s, cpu_s, rss)──▶ caller
    worker ──("error", id, captured exception, wall_s, cpu_s, rss)──▶ caller
    caller ──None──▶ worker exits

Messages are plain tuples of builtins and bytes. Imports the standard library, ``_errors`` and
(lazily, for the odd object plain pickle refuses) cloudpickle; nothing caller-side.
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

__all__ = ["dumps", "run_items", "worker_main", "rss_bytes", "THREAD_ENV_VARS"]

THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def worker_main(
    conn: Any, n_threads: int | None, initializer: bytes | None, max_tasks: int | None
) -> None:
    """Entry point of a worker process: serve tasks from ``conn`` until told to stop.

    Runs in a child. SIGINT is ignored (the caller owns Ctrl-C and terminates workers itself), and
    on Linux the worker is killed if its parent dies, so no orphan outlives the caller.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    _limit_native_threads(n_threads)
    funcs: dict[str, Any] = {}
    send = conn.send_bytes
    if initializer is not None:
        try:
            init, initargs = pickle.loads(initializer)
            init(*initargs)
        except BaseException as exc:
            send(dumps(("init_error", capture(exc, None))))
            return
    send(dumps(("ready", os.getpid(), rss_bytes())))
    done_tasks = 0
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        msg = pickle.loads(raw)
        if msg is None:
            return
        kind = msg[0]
        if kind == "func":
            _, token, payload = msg
            if len(funcs) >= 16:
                funcs.pop(next(iter(funcs)))
            try:
                funcs[token] = pickle.loads(payload)
            except BaseException as exc:  # reported with the first task that needs it
                funcs[token] = _LoadFailed(capture(exc, None))
            continue
        _, task_id, token, start, mode, payload, ticks = msg
        wall0, cpu0 = time.perf_counter(), time.process_time()
        reply: tuple[Any, ...]
        try:
            func = funcs[token]
            if isinstance(func, _LoadFailed):
                reply = ("error", task_id, func.captured)
                raise _Reported
            items = pickle.loads(payload)
            on_item = (lambda i, t=task_id: send(dumps(("tick", t, i)))) if ticks else None
            results = run_items(func, items, start, mode, on_item)
            try:
                body = dumps(results)
            except Exception as exc:
                bad = _first_unpicklable(results, start)
                err = NotPicklableError(f"the result of item {bad} cannot be pickled: {exc}")
                err.amortune_index = bad  # type: ignore[attr-defined]
                raise err from None
            reply = ("done", task_id, body)
        except _Reported:
            pass
        except BaseException as exc:
            index = getattr(exc, "amortune_index", None)
            reply = ("error", task_id, capture(exc, index))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        send(dumps((*reply, wall, cpu, rss_bytes())))
        done_tasks += 1
        if max_tasks is not None and done_tasks >= max_tasks:
            return


class _LoadFailed:
    """Stands in for a function that could not be unpickled in this worker."""

    def __init__(self, captured: Any) -> None:
        self.captured = captured


class _Reported(Exception):
    """Internal: the reply is already set."""


def _first_unpicklable(results: list[Any], start: int) -> int:
    for i, r in enumerate(results):
        try:
            dumps(r)
        except Exception:
            return start + i
    return start
