"""Code that runs where items run: the chunk runner and what every worker needs around it.

:func:`run_chunk` is shared by every backend (the caller's serial loop, threads, worker
processes, Dask tasks): it applies ``func`` in one of the call styles and returns the results of
the items before a failure together with the failure, so the scheduler retries only the failing
item. Also here: native thread caps, the caller's environment in a worker, the shared
``__main__`` namespace for functions sent by value, and the cheap RSS reading. The worker
process's message loop is :mod:`amortune._serve`. Imports the standard library only
(threadpoolctl lazily, to cap native thread pools); nothing caller-side.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["FUNC_CACHE_SIZE", "THREAD_ENV_VARS", "apply_env", "limit_native_threads", "poller",
           "rss_bytes", "run_chunk", "share_main_globals"]

THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
#: Modules whose native thread pools threadpoolctl can cap once they are loaded.
_NATIVE_POOL_MODULES = ("numpy", "scipy", "torch", "sklearn", "numexpr")

#: Functions a worker keeps unpickled, oldest evicted first; the caller mirrors this exactly to
#: know which functions it must send again.
FUNC_CACHE_SIZE = 16

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_statm: tuple[int, int] | None = None  # (pid, fd of /proc/self/statm as that pid opened it)


def rss_bytes() -> int:
    """Resident memory of this process; cheap on Linux (one ``pread`` of /proc/self/statm)."""
    global _statm
    try:
        pid = os.getpid()
        if _statm is None or _statm[0] != pid:  # a forked child must not read its parent's
            _statm = (pid, os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
        return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError, AttributeError):
        try:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        except Exception:
            return 0


def poller(conn: Any) -> Callable[[], bool]:
    """A zero-timeout "has a message arrived?" for ``conn``: ~1 µs, where ``conn.poll()`` builds
    a selector each call (~20 µs). A Unix pipe connection buffers nothing, so a readable file
    descriptor means a message is there."""
    import select

    try:
        fd = conn.fileno()
        p = select.poll()
        p.register(fd, select.POLLIN)
    except (AttributeError, OSError, ValueError):
        return lambda: bool(conn.poll())
    return lambda: bool(p.poll(0))


def _call(func: Callable[..., Any], style: str) -> Callable[[Any], Any]:
    if style == "item":
        return func
    if style == "star":
        return lambda x: func(*x)
    if style == "apply":
        return lambda x: func(*x[0], **x[1])
    raise ValueError(f"unknown call style {style!r}")


def run_chunk(
    func: Callable[..., Any],
    items: Sequence[Any],
    style: str = "item",
    on_item: Callable[[int], bool] | None = None,
) -> tuple[list[Any], BaseException | None]:
    """Apply ``func`` to ``items`` in ``style``; returns ``(results, error)``.

    ``results`` hold the items before the first failure and ``error`` is that failure (or
    ``None``). ``"chunk"`` calls ``func(list(items))`` once and checks it returns one result per
    item. ``on_item(k)`` runs before item ``k`` (timeouts, cancellation); returning ``False``
    stops the chunk there. ``StopIteration`` from ``func`` becomes a ``RuntimeError`` here, on
    every backend alike, so it can never silently end a ``map`` early.
    """
    out: list[Any] = []
    try:
        if style == "chunk":
            got = func(list(items))
            try:
                out = list(got)
            except TypeError:
                raise TypeError(f"a per-chunk function must return a list, got "
                                f"{type(got).__name__}") from None
            if len(out) != len(items):
                raise ValueError(f"a per-chunk function returned {len(out)} results for "
                                 f"{len(items)} items")
        elif on_item is None:
            out.extend(map(_call(func, style), items))
            if len(out) < len(items):  # map ended early: func raised StopIteration
                raise _stop_iteration_error(None)
        else:
            call = _call(func, style)
            for k, item in enumerate(items):
                if not on_item(k):
                    break
                out.append(call(item))
    except StopIteration as exc:
        return (out if style != "chunk" else []), _stop_iteration_error(exc)
    except BaseException as exc:  # noqa: B036 - reported to the caller with its type
        return (out if style != "chunk" else []), exc
    return out, None


def _stop_iteration_error(exc: StopIteration | None) -> RuntimeError:
    # Inside map() a StopIteration from func ends the map silently, truncating the results;
    # every plan reports it the same way instead, as an error at that item.
    err = RuntimeError("func raised StopIteration; amortune treats it as an error, not as the "
                       "end of the input")
    err.__cause__ = exc
    return err


#: The namespace every by-value ``__main__`` function shares in this worker, as functions of one
#: module share its globals: what the initializer sets (``STATE["model"] = ...``) the function
#: then sees, although each arrived in a pickle of its own.
_MAIN_GLOBALS: dict[str, Any] = {}


def share_main_globals(obj: Any, _seen: dict[int, Any] | None = None) -> Any:
    """``obj`` with its ``__main__`` functions rebound to this worker's one shared namespace.

    cloudpickle gives each function pickled by value a fresh globals dict, so an initializer
    and the function it prepares would not see each other's module state. Data already in the
    shared namespace is kept (module state lives on between calls, as in a real module); newer
    functions and classes replace older ones, and the ``__main__`` functions it calls are
    rebound too.
    """
    import types

    seen = {} if _seen is None else _seen
    if isinstance(obj, tuple):
        return tuple(share_main_globals(x, seen) for x in obj)
    if not isinstance(obj, types.FunctionType) or obj.__module__ != "__main__":
        return obj
    if obj.__globals__ is _MAIN_GLOBALS:
        return obj
    if id(obj) in seen:
        return seen[id(obj)]
    shared = types.FunctionType(obj.__code__, _MAIN_GLOBALS, obj.__name__, obj.__defaults__,
                                obj.__closure__)
    shared.__kwdefaults__ = obj.__kwdefaults__
    shared.__qualname__ = obj.__qualname__
    shared.__dict__.update(obj.__dict__)
    seen[id(obj)] = shared
    for name, value in list(obj.__globals__.items()):
        if isinstance(value, types.FunctionType) and value.__module__ == "__main__":
            _MAIN_GLOBALS[name] = share_main_globals(value, seen)
        elif (name not in _MAIN_GLOBALS or isinstance(value, (type, types.ModuleType))
              or callable(value)):
            _MAIN_GLOBALS[name] = value
    if obj.__qualname__ == obj.__name__:
        _MAIN_GLOBALS[obj.__name__] = shared  # other functions calling it find this one
    return shared


def limit_native_threads(n_threads: int | None) -> None:
    """Cap OpenMP/BLAS pools at ``n_threads``: env vars for pools not started yet, threadpoolctl
    for libraries already loaded (a fork or a preloaded ``__main__`` that imported numpy)."""
    if not n_threads:
        return
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n_threads)
    if any(m in sys.modules for m in _NATIVE_POOL_MODULES):
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(n_threads)
        except ImportError:
            pass


def apply_env(pairs: Sequence[tuple[str, str]], keep: Sequence[str] = THREAD_ENV_VARS) -> None:
    """Make ``os.environ`` equal to ``pairs`` (the caller's), keeping the thread caps set here."""
    wanted = dict(pairs)
    for name in list(os.environ):
        if name not in wanted and name not in keep:
            del os.environ[name]
    for name, value in wanted.items():
        if name not in keep and os.environ.get(name) != value:
            os.environ[name] = value
