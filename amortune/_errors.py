"""The error tree, and how a worker's exception crosses the process boundary.

Owns: the public exception and warning classes, and the helpers that capture an exception in a
worker and rebuild it in the caller with its own type, the worker's traceback as ``__cause__`` and
the failing item's index as a note. Imports the standard library only; the two stdlib types
whose modules pull in multiprocessing (``BrokenProcessPool``, the Pool's ``RemoteTraceback``)
load on first use, so a serial run never imports them.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

from ._serde import add_note, note_item

if TYPE_CHECKING:
    from concurrent.futures.process import BrokenProcessPool

    RemoteTraceback = Exception

__all__ = [
    "AmortuneError",
    "AmortuneWarning",
    "MemoryBudgetError",
    "NotPicklableError",
    "RemoteTraceback",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "add_note",
    "exit_reason",
]


class AmortuneError(Exception):
    """Base class of every error amortune raises itself."""


class AmortuneWarning(UserWarning):
    """Base class of amortune's warnings (fallbacks, noisy profiles, memory advice)."""


class NotPicklableError(AmortuneError, TypeError):
    """The function, an argument or a result cannot be sent to or from a worker."""


class MemoryBudgetError(AmortuneError, MemoryError):
    """A single result is larger than the whole memory budget, so no batch size can hold it."""


class TaskTimeoutError(AmortuneError, TimeoutError):
    """An item ran longer than ``timeout`` seconds; its worker was killed and replaced."""

    def __init__(self, message: str, indices: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.indices = indices

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskTimeoutError, (str(self), self.indices))


def _crash_init(self: Any, message: str, *, exitcode: int | None = None,
                indices: tuple[int, ...] = (), rss_bytes: int | None = None) -> None:
    Exception.__init__(self, message)
    self.exitcode = exitcode
    self.indices = indices
    self.rss_bytes = rss_bytes


def _crash_reduce(self: Any) -> tuple[Any, ...]:
    return (_rebuild_crash, (str(self), self.exitcode, self.indices, self.rss_bytes))


if TYPE_CHECKING:
    class WorkerCrashedError(AmortuneError, BrokenProcessPool):
        """A worker process died while it held a chunk."""

        exitcode: int | None
        indices: tuple[int, ...]
        rss_bytes: int | None

        def __init__(self, message: str, *, exitcode: int | None = None,
                     indices: tuple[int, ...] = (), rss_bytes: int | None = None) -> None: ...


def _make_crash_class() -> type:
    from concurrent.futures.process import BrokenProcessPool

    doc = """A worker process died while it held a chunk.

    ``exitcode`` is the process exit code (negative for a signal), ``indices`` the input indices
    of the chunk that was lost, and ``rss_bytes`` the last resident memory seen for that worker.
    It is a :class:`concurrent.futures.process.BrokenProcessPool`, so code written for the stdlib
    executors catches it.
    """
    return type("WorkerCrashedError", (AmortuneError, BrokenProcessPool), {
        "__doc__": doc, "__module__": __name__, "__qualname__": "WorkerCrashedError",
        "__init__": _crash_init, "__reduce__": _crash_reduce})


def _rebuild_crash(message: str, exitcode: int | None, indices: tuple[int, ...],
                   rss_bytes: int | None) -> WorkerCrashedError:
    return WorkerCrashedError(message, exitcode=exitcode, indices=indices, rss_bytes=rss_bytes)


def _remote_traceback_type() -> type[Exception]:
    """The stdlib Pool's ``RemoteTraceback``, so code written for ``multiprocessing`` matches."""
    import multiprocessing.pool

    cls: type[Exception] = getattr(multiprocessing.pool, "RemoteTraceback")  # noqa: B009
    return cls


def __getattr__(name: str) -> Any:
    if name == "WorkerCrashedError":
        value: Any = _make_crash_class()
    elif name == "RemoteTraceback":
        value = _remote_traceback_type()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def exit_reason(exitcode: int | None, *, memory_hint: bool | None = None) -> str:
    """Describe a process exit code: ``'signal SIGKILL'`` or ``'exit code 3'``.

    ``memory_hint`` says whether the evidence (the worker's last RSS near the memory available,
    the cgroup's OOM-kill count) points at the system killing it for memory; ``None`` (no
    evidence either way) keeps the hint on SIGKILL.
    """
    if exitcode is None:
        return "unknown exit status"
    if exitcode < 0:
        import signal  # only a dead worker is described: a run that loses none never loads it

        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        hint = ""
        if name == "SIGKILL" and memory_hint is not False:
            hint = " (the system may have killed it for using too much memory)"
        return f"signal {name}{hint}"
    return f"exit code {exitcode}"


def describe_indices(indices: tuple[int, ...] | list[int]) -> str:
    """Short text for a set of item indices: ``'items 10-19'`` or ``'item 4'``."""
    if not indices:
        return "no items"
    lo, hi = min(indices), max(indices)
    if lo == hi:
        return f"item {lo}"
    if hi - lo + 1 == len(indices):
        return f"items {lo}-{hi}"
    return f"{len(indices)} items between {lo} and {hi}"


def capture(exc: BaseException, index: int | None) -> tuple[bytes | None, str, str, int | None]:
    """Package an exception raised in a worker as plain data.

    Returns ``(pickled exception or None, type name, formatted traceback, item index)``; the
    pickled form is ``None`` when the exception itself cannot be pickled, and the caller then
    raises an :class:`AmortuneError` carrying the type name and text instead.
    """
    import traceback  # here: a worker forked early starts without it (~2 ms of imports)

    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc.__traceback__ = None
    payload: bytes | None = None
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        payload = data
    except Exception:
        try:  # exception classes defined in __main__ or a closure travel by value
            import cloudpickle

            data = cloudpickle.dumps(exc)
            pickle.loads(data)
            payload = data
        except Exception:
            payload = None
    return payload, f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}", tb_text, index


def rebuild(captured: tuple[bytes | None, str, str, int | None]) -> BaseException:
    """Turn :func:`capture` output back into an exception of the original type."""
    payload, summary, tb_text, index = captured
    exc: BaseException
    if payload is not None:
        try:
            exc = pickle.loads(payload)
        except Exception:
            exc = AmortuneError(summary)
    else:
        exc = AmortuneError(f"worker raised an exception that cannot be pickled: {summary}")
    exc.__cause__ = _remote_traceback_type()(f'\n"""\n{tb_text}"""')
    if index is not None:
        note_item(exc, index)
    return exc
