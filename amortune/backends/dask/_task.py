"""On a Dask worker: one chunk as one task, answered with plain data (:class:`_Reply`)."""

from __future__ import annotations

import collections
import pickle
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import distributed

from ..._errors import NotPicklableError, capture
from ..._serde import dumps, first_unpicklable
from ..._worker import FUNC_CACHE_SIZE, rss_bytes
from ..._worker import run_chunk as _run_items
from ._setup import _W_LOCK, Captured, _prepare, _worker_label


class _Reply(NamedTuple):
    """What a chunk task sends back: plain data only (the caller rebuilds exceptions)."""

    results: bytes
    wall_seconds: float
    cpu_seconds: float
    rss_bytes: int
    started: float
    finished: float
    first_call_seconds: float | None
    serde_seconds: float
    worker: str
    thread: int
    clock: str
    #: ``func``'s failure at item ``error_index`` (a ``capture`` tuple), after ``results``.
    error: Captured | None = None
    error_index: int | None = None
    #: A failure that is no item's: the function or the items could not be loaded, or the
    #: initializer raised; with a note saying which.
    fatal: Captured | None = None
    fatal_note: str = ""


_W_FUNCS: collections.OrderedDict[str, Any] = collections.OrderedDict()
_W_CALLED: set[str] = set()
_W_THREADS: dict[int, int] = {}
_CLOCK: list[str] = []


def _clock_id() -> str:
    """Names this machine's ``perf_counter`` clock: equal ids mean comparable readings.

    On Linux ``perf_counter`` is ``CLOCK_MONOTONIC``, shared by every process of one boot.
    """
    if not _CLOCK:
        ident = ""
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                ident = f.read().strip()
        except OSError:
            pass
        _CLOCK.append(f"{socket.gethostname()}/{ident}")
    return _CLOCK[0]


def _load_function(token: str, payload: bytes) -> Any:
    with _W_LOCK:
        func = _W_FUNCS.get(token)
        if func is not None:
            _W_FUNCS.move_to_end(token)
            return func
    func = pickle.loads(payload)
    with _W_LOCK:
        _W_FUNCS[token] = func
        while len(_W_FUNCS) > FUNC_CACHE_SIZE:
            _W_FUNCS.popitem(last=False)
    return func


def _where() -> tuple[str, int]:
    """(this worker's name, this executor thread's position among the worker's threads)."""
    try:
        worker = distributed.get_worker()
    except ValueError:  # called outside a Dask worker (directly, in a test)
        return "", 0
    ident = threading.get_ident()
    with _W_LOCK:
        index = _W_THREADS.setdefault(ident, len(_W_THREADS))
    return str(worker.name), index % max(1, worker.state.nthreads)


def run_chunk_task(fn_token: str, fn_payload: bytes, items: bytes, start: int, style: str,
                   init_token: str | None = None, init_payload: bytes | None = None,
                   env_token: str | None = None,
                   env_pairs: Sequence[tuple[str, str]] | None = None,
                   thread_cap: int | None = None) -> _Reply:
    """Run one chunk on a Dask worker; never raises for ``func``'s or the payloads' sake.

    ``fn_payload`` and ``items`` are pickles; the function is unpickled once per worker process
    and kept by ``fn_token`` (a large one arrives as a value scattered to every worker). Results
    are pickled here, so a result that cannot be pickled is reported as that item's error and
    what the cluster stores is sized exactly. The times cover the items and their pickling, not
    the set-up or the loading of the function (one-offs, as in a local worker).
    """
    started, cpu0 = time.perf_counter(), time.thread_time()
    worker, thread = _where()

    def reply(results: bytes = b"", serde: float = 0.0, first: float | None = None,
              **failure: Any) -> _Reply:
        finished = time.perf_counter()
        return _Reply(results, finished - started, time.thread_time() - cpu0, rss_bytes(),
                      started, finished, first, serde, worker, thread, _clock_id(), **failure)

    failed = _prepare(init_token, init_payload, env_token, env_pairs, thread_cap)
    if failed is not None:
        return reply(fatal=failed[0], fatal_note=failed[1])
    try:
        func = _load_function(fn_token, fn_payload)
    except BaseException as exc:  # noqa: B036
        return reply(fatal=capture(exc, None), fatal_note=(
            f"amortune: the function could not be loaded in Dask worker {_worker_label()} "
            "(is every module it needs installed there?)"))
    started, cpu0 = time.perf_counter(), time.thread_time()
    try:
        values = pickle.loads(items)
    except BaseException as exc:  # noqa: B036
        err = NotPicklableError(f"the items of the chunk starting at item {start} cannot be "
                                f"unpickled in the Dask worker: {exc!r}")
        err.__cause__ = exc
        return reply(fatal=capture(err, None), fatal_note="")
    serde = time.perf_counter() - started

    first: float | None = None
    if fn_token not in _W_CALLED and style != "chunk" and values:
        with _W_LOCK:
            _W_CALLED.add(fn_token)
        t1 = time.perf_counter()
        results, error = _run_items(func, values[:1], style)
        first = time.perf_counter() - t1
        if error is None:
            more, error = _run_items(func, values[1:], style)
            results.extend(more)
    else:
        _W_CALLED.add(fn_token)
        results, error = _run_items(func, values, style)

    t2 = time.perf_counter()
    try:
        body = dumps(results)
    except Exception as exc:
        bad = first_unpicklable(results, start)
        err = NotPicklableError(f"the result of item {bad} cannot be pickled: {exc}")
        error, results = err, results[:bad - start]
        body = dumps(results)
    serde += time.perf_counter() - t2
    if error is None:
        return reply(body, serde, first)
    index = start + len(results)
    return reply(body, serde, first, error=capture(error, index), error_index=index)


def _noop() -> None:
    """The empty task used to measure what one task costs."""
