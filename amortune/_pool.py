"""``amortune.Pool``: a drop-in for :class:`multiprocessing.pool.Pool` on amortune's scheduler.

Data flow::

    map / starmap  ──▶ Scheduler on the pool's ProcessBackend, every item in a worker; chunks
                       start at one item and follow their measured times (chunksize=None), and
                       every item runs before the first error is raised (fail_fast=False)
    imap           ──▶ the same, lazily in the consumer's thread (bounded chunks in flight, so
                       an endless generator works)
    imap_unordered ──▶ the same Scheduler with ordered=False
    map_async      ──▶ one driver thread per call runs the same stream ──▶ AsyncResult
    apply_async    ──▶ backend.submit(ChunkTask(style="apply")) ──▶ AsyncResult reading the
                       future (a done-callback settles it when callbacks were given)

Each pool owns a private ProcessBackend (initializer and maxtasksperchild are per pool) started at
construction and stopped by close()+join(), terminate(), the context manager or a finalizer. A
dead worker fails its chunk with WorkerCrashedError instead of hanging the caller; the user's
exceptions come back with their own type, the worker's traceback as a
``multiprocessing.pool.RemoteTraceback`` ``__cause__``. Imports the engine (``_schedule``,
``backends``) and ``_progress.Progress``; nothing imports this module but ``__init__``.
"""

from __future__ import annotations

import functools
import logging
import operator
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import CancelledError, Future
from concurrent.futures import wait as futures_wait
from multiprocessing import TimeoutError as MPTimeoutError
from typing import Any, Generic, TypeVar

from ._config import Config
from ._errors import NotPicklableError
from ._model import PROCESS_DISPATCH_SECONDS
from ._profile import count_items
from ._progress import Progress
from ._schedule import ChunkPolicy, FixedChunkPolicy, Scheduler
from ._sendable import as_stdlib as _as_stdlib
from ._sendable import function_ref as _function_ref
from ._system import probe_system
from .backends._base import ChunkOutcome, ChunkTask, FunctionRef, WorkerSetup
from .backends.processes import ProcessBackend

__all__ = ["AsyncResult", "Pool"]

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("amortune")
_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"
_INDEX_NOTE = "amortune: raised while processing item"


class AsyncResult(Generic[R]):
    """The pending result of an ``*_async`` call, as :class:`multiprocessing.pool.AsyncResult`.

    ``callback(value)`` or ``error_callback(exception)`` runs once, before :meth:`get` returns.
    """

    def __init__(self, pool: Pool | None, callback: Callable[[Any], object] | None,
                 error_callback: Callable[[BaseException], object] | None) -> None:
        self._event = threading.Event()
        # Keeps the pool alive while work is pending, as the stdlib does (bpo-35493).
        self._pool = pool
        self._callback, self._error_callback = callback, error_callback
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        """Whether the call has finished."""
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether the call finished without raising; ``ValueError`` if it has not finished."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the result is ready or ``timeout`` seconds have passed."""
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> R:
        """The result; raises the call's exception, or ``multiprocessing.TimeoutError``."""
        self.wait(timeout)
        if not self.ready():
            raise MPTimeoutError
        if self._success:
            return self._value  # type: ignore[no-any-return]
        raise self._value

    def _set(self, success: bool, value: Any) -> None:
        self._success, self._value = success, value
        callback = self._callback if success else self._error_callback
        try:
            if callback is not None:
                callback(value)
        except Exception:
            log.exception("amortune.Pool: a %s raised", "callback" if success else "error_callback")
        finally:
            self._event.set()
            self._pool = self._callback = self._error_callback = None


class Pool:
    """A process pool with the API of :class:`multiprocessing.pool.Pool`, tuned by measurement.

    Every item runs in a worker process, as with the stdlib. ``chunksize=None`` (the default
    everywhere) means tuned: chunks start at one item and follow the measured times of the
    first chunks in the workers. An explicit ``chunksize`` is honoured exactly. ``map`` runs
    every item and raises the first error in input order once all have finished. Functions
    importable by name travel by reference (tracebacks show their real source lines);
    ``__main__`` functions, lambdas and closures by value, and so do results plain pickle
    refuses (a lambda result comes back, where the stdlib would fail). A worker that dies raises
    :class:`~amortune.WorkerCrashedError` instead of hanging.

    Parameters
    ----------
    processes:
        Number of worker processes; ``None`` means usable cores (affinity and cgroup quota).
    initializer, initargs:
        ``initializer(*initargs)`` runs once in each worker when it starts.
    maxtasksperchild:
        A worker is replaced after this many chunks (``None``: never).
    context:
        A multiprocessing context or start-method name; default ``Config().start_method``.

    Examples
    --------
    >>> import amortune
    >>> with amortune.Pool(2) as pool:
    ...     pool.map(abs, range(-3, 3))
    [3, 2, 1, 0, 1, 2]
    """

    def __init__(self, processes: int | None = None,
                 initializer: Callable[..., object] | None = None, initargs: Iterable[Any] = (),
                 maxtasksperchild: int | None = None, context: Any = None) -> None:
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
                not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        cfg = Config.from_env()
        if context is not None:
            method = context if isinstance(context, str) else context.get_start_method()
            cfg = cfg.replace(start_method=method)
        cores = probe_system(cfg).usable_cores
        self._processes = processes or cores
        self._config = cfg
        self._backend = ProcessBackend(
            self._processes, start_method=cfg.start_method,
            setup=WorkerSetup(initializer, tuple(initargs), max(1, cores // self._processes)),
            max_tasks_per_child=maxtasksperchild,
            memory_growth_bytes=cfg.worker_memory_growth_bytes)
        # Holds no reference to the pool: an unclosed pool is terminated when collected or at exit.
        self._finalizer = weakref.finalize(self, self._backend.shutdown, wait=True, kill=True)
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._state = _RUN

    # -- the multiprocessing.Pool API ------------------------------------------------------
    def apply(self, func: Callable[..., R], args: Iterable[Any] = (),
              kwds: Mapping[str, Any] | None = None) -> R:
        """``func(*args, **kwds)`` in a worker; waits for the result."""
        self._check_not_in_callback("apply")
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable[..., R], args: Iterable[Any] = (),
                    kwds: Mapping[str, Any] | None = None,
                    callback: Callable[[R], object] | None = None,
                    error_callback: Callable[[BaseException], object] | None = None,
                    ) -> AsyncResult[R]:
        """``func(*args, **kwds)`` in a worker; returns an :class:`AsyncResult` at once."""
        self._check_running()
        try:
            fut = self._backend.submit(ChunkTask(_function_ref(func),
                                                 [(tuple(args), dict(kwds or {}))], 0, "apply"))
        except Exception as exc:
            result: AsyncResult[R] = AsyncResult(self, callback, error_callback)
            result._set(False, _as_stdlib(exc))
            return result
        if callback is None and error_callback is None:
            # Nothing to run when it finishes: the result reads the future itself, so the
            # manager thread settles one future per call and no more (apply_async in a loop).
            return _FutureResult(self, fut)
        result = AsyncResult(self, callback, error_callback)
        fut.add_done_callback(functools.partial(_complete_apply, result))
        return result

    def map(self, func: Callable[[T], R], iterable: Iterable[T], chunksize: int | None = None,
            *, progress: Any = False) -> list[R]:
        """``list(map(func, iterable))`` in the workers, in order.

        ``progress=True`` (or a tqdm instance) shows a progress bar.
        """
        return self._map(func, iterable, chunksize, "item", progress)

    def starmap(self, func: Callable[..., R], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None) -> list[R]:
        """``[func(*args) for args in iterable]`` in the workers, in order."""
        return self._map(func, iterable, chunksize, "star", False)

    def map_async(self, func: Callable[[T], R], iterable: Iterable[T],
                  chunksize: int | None = None, callback: Callable[[list[R]], object] | None = None,
                  error_callback: Callable[[BaseException], object] | None = None,
                  ) -> AsyncResult[list[R]]:
        """:meth:`map` without waiting: returns an :class:`AsyncResult` of the list."""
        return self._map_async(func, iterable, chunksize, "item", callback, error_callback)

    def starmap_async(self, func: Callable[..., R], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None,
                      callback: Callable[[list[R]], object] | None = None,
                      error_callback: Callable[[BaseException], object] | None = None,
                      ) -> AsyncResult[list[R]]:
        """:meth:`starmap` without waiting: returns an :class:`AsyncResult` of the list."""
        return self._map_async(func, iterable, chunksize, "star", callback, error_callback)

    def imap(self, func: Callable[[T], R], iterable: Iterable[T], chunksize: int | None = None,
             *, progress: Any = False) -> Iterator[R]:
        """Results in input order, yielded as they complete; lazy, with bounded work in flight.

        Work starts when iteration starts; at most a few items are sampled in the caller, so an
        endless generator can be consumed partially. An exception ends the iteration.
        """
        return _flatten(self._start_stream(func, iterable, chunksize, progress, ordered=True))

    def imap_unordered(self, func: Callable[[T], R], iterable: Iterable[T],
                       chunksize: int | None = None, *, progress: Any = False) -> Iterator[R]:
        """Like :meth:`imap`, but results are yielded in completion order."""
        return _flatten(self._start_stream(func, iterable, chunksize, progress, ordered=False))

    def close(self) -> None:
        """Accept no more work; submitted work still finishes (see :meth:`join`)."""
        if self._state == _RUN:
            self._state = _CLOSE

    def terminate(self) -> None:
        """Stop at once: workers are killed and pending results fail."""
        self._state = _TERMINATE
        self._finalizer()
        self._join_threads()

    def join(self) -> None:
        """Wait for submitted work and the workers to finish; call :meth:`close` first."""
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        self._join_threads()
        if self._finalizer.detach() is not None:
            self._backend.shutdown(wait=True)

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __reduce__(self) -> Any:
        raise NotImplementedError(
            "pool objects cannot be passed between processes or pickled")

    def __repr__(self) -> str:
        return f"<amortune.Pool state={self._state} pool_size={self._processes}>"

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_state", None) == _RUN:
            try:
                _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning,
                      source=self)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    # -- internals -------------------------------------------------------------------------
    def _check_not_in_callback(self, what: str) -> None:
        if threading.current_thread() is self._backend._mgr.thread:
            raise RuntimeError(
                f"Pool.{what}() was called from a callback of this pool: callbacks run in the "
                "thread that delivers results, so waiting there for a result can never finish; "
                "use the *_async form in a callback, or wait outside it")

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def _join_threads(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join()

    def _map(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None,
             mode: str, progress: Any) -> list[Any]:
        self._check_running()
        self._check_not_in_callback("map" if mode == "item" else "starmap")
        size = _check_chunksize(chunksize)
        out: list[Any] = []
        try:
            fn = _function_ref(func)
            for part in self._stream(fn, iterable, size, mode, progress, fail_fast=False):
                out.extend(part)
        except NotPicklableError as exc:
            err = _as_stdlib(exc)
            raise err from err.__cause__
        return out

    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any],
                   chunksize: int | None, mode: str,
                   callback: Callable[[Any], object] | None,
                   error_callback: Callable[[BaseException], object] | None) -> AsyncResult[Any]:
        self._check_running()
        size = _check_chunksize(chunksize)
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)  # read the input now, as the stdlib does
        result: AsyncResult[Any] = AsyncResult(self, callback, error_callback)
        try:
            fn = _function_ref(func)
        except Exception as exc:
            result._set(False, _as_stdlib(exc))
            return result
        # Nothing is sampled in the caller: the call must return at once, and terminate() must
        # be able to stop every item (a thread running func in this process cannot be killed).
        thread = threading.Thread(target=self._drive, args=(result, fn, iterable, size, mode),
                                  name="amortune-pool-async", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return result

    def _drive(self, result: AsyncResult[Any], fn: FunctionRef, items: Iterable[Any],
               chunksize: int | None, mode: str) -> None:
        try:
            out: list[Any] = []
            for part in self._stream(fn, items, chunksize, mode, False, fail_fast=False):
                out.extend(part)
        except BaseException as exc:
            result._set(False, _as_stdlib(exc))
        else:
            result._set(True, out)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _start_stream(self, func: Callable[..., Any], iterable: Iterable[Any],
                      chunksize: int | None, progress: Any, *, ordered: bool
                      ) -> Iterator[list[Any]]:
        self._check_running()
        size = _check_chunksize(chunksize)
        try:
            fn = _function_ref(func)
        except NotPicklableError as exc:
            err = _as_stdlib(exc)
            raise err from err.__cause__
        return self._stream(fn, iterable, size, "item", progress, ordered=ordered)

    def _stream(self, fn: FunctionRef, iterable: Iterable[Any], chunksize: int | None,
                mode: str, progress: Any, *, ordered: bool = True, fail_fast: bool = True,
                ) -> Iterator[list[Any]]:
        """Yield result lists from the pool's workers; every item runs in a worker process.

        ``chunksize=None`` starts from one-item chunks and follows the chunks' measured times
        in the workers (no item runs in the caller, as with ``multiprocessing.Pool``).
        """
        total = count_items(iterable)
        n, target = self._processes, self._config.target_chunk_seconds
        policy: ChunkPolicy
        if chunksize is not None:
            policy = FixedChunkPolicy(chunksize, n, target)
        else:
            policy = ChunkPolicy(1, n, target, dispatch_seconds=PROCESS_DISPATCH_SECONDS)
        prog = None
        if progress is not None and progress is not False:
            prog = Progress(progress, None, total)
        try:
            sched = Scheduler(self._backend, fn, policy=policy, style=mode,
                              setup=self._backend.setup, ordered=ordered, fail_fast=fail_fast,
                              input_error_keeps_chunk=chunksize is None,
                              on_progress=None if prog is None else prog.update)
            yield from sched.run(iter(iterable), start_index=0, n_remaining=total)
        except NotPicklableError as exc:
            err = _as_stdlib(exc)
            raise err from err.__cause__
        finally:
            if prog is not None:
                prog.close()


def _flatten(parts: Iterator[list[Any]]) -> Iterator[Any]:
    try:
        for part in parts:
            yield from part
    finally:
        parts.close()  # type: ignore[attr-defined]


def _check_chunksize(chunksize: int | None) -> int | None:
    if chunksize is None:
        return None
    size = operator.index(chunksize)
    if size < 1:
        raise ValueError(f"chunksize must be >= 1 or None, got {chunksize!r}")
    return size


def _apply_outcome(fut: Future[ChunkOutcome]) -> tuple[bool, Any]:
    """``(success, value or exception)`` of a finished apply future, as the stdlib reports it."""
    try:
        if fut.cancelled():
            raise CancelledError("the pool was terminated")
        exc = fut.exception()
        if exc is None:
            outcome = fut.result()
            if outcome.error is None:
                return True, outcome.results[0]
            exc = outcome.error
        notes = getattr(exc, "__notes__", None)
        if isinstance(notes, list):  # "item 0" means nothing for apply
            notes[:] = [n for n in notes if not n.startswith(_INDEX_NOTE)]
    except BaseException as err:  # whatever happens, the result settles: get() never hangs
        exc = err
    return False, _as_stdlib(exc)


def _complete_apply(result: AsyncResult[Any], fut: Future[ChunkOutcome]) -> None:
    """Done-callback of an apply future (runs in the backend's manager thread)."""
    result._set(*_apply_outcome(fut))


class _FutureResult(AsyncResult[R]):
    """An ``apply_async`` result without callbacks: it reads its future when asked, so
    nothing runs for it in the manager thread when the call finishes."""

    def __init__(self, pool: Pool, fut: Future[ChunkOutcome]) -> None:
        self._fut = fut
        self._pool = pool  # alive while this result is pending (bpo-35493)
        self._outcome: tuple[bool, Any] | None = None

    def _settled(self) -> tuple[bool, Any] | None:
        if self._outcome is None and self._fut.done():
            self._outcome = _apply_outcome(self._fut)
            self._pool = None
        return self._outcome

    def ready(self) -> bool:
        return self._fut.done()

    def successful(self) -> bool:
        settled = self._settled()
        if settled is None:
            raise ValueError(f"{self!r} not ready")
        return settled[0]

    def wait(self, timeout: float | None = None) -> None:
        futures_wait((self._fut,), timeout)

    def get(self, timeout: float | None = None) -> R:
        self.wait(timeout)
        settled = self._settled()
        if settled is None:
            raise MPTimeoutError
        if settled[0]:
            return settled[1]  # type: ignore[no-any-return]
        raise settled[1]
