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

__all__ = ["FUNC_CACHE_SIZE", "THREAD_ENV_VARS", "MessageReader", "apply_env", "frame_header",
           "limit_native_threads", "rss_bytes", "run_chunk", "share_main_globals", "write_all"]

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


_statm: int | None = None  # a descriptor of /proc/self/statm, opened by this process


def _forget_statm() -> None:
    global _statm
    _statm = None  # a forked child must not read its parent's (the descriptor stays open)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_statm)


def rss_bytes() -> int:
    """Resident memory of this process; cheap on Linux (one ``pread`` of /proc/self/statm)."""
    global _statm
    try:
        if _statm is None:
            _statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        return int(os.pread(_statm, 128, 0).split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError, AttributeError):
        try:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        except Exception:
            return 0


def frame_header(n: int) -> bytes:
    """The length prefix of an ``n``-byte message in ``multiprocessing.connection``'s framing."""
    if n <= 0x7FFFFFFF:
        return n.to_bytes(4, "big", signed=True)
    return (-1).to_bytes(4, "big", signed=True) + n.to_bytes(8, "big")


def write_all(fd: int, buffers: Sequence[bytes]) -> int:
    """Write ``buffers`` to ``fd`` in as few system calls as it takes, without joining them.

    Returns the bytes written; on ``OSError`` the error carries them as ``written``, so a caller
    knows which messages got through whole.
    """
    total, i, offset = 0, 0, 0
    bufs = [memoryview(b) for b in buffers]
    try:
        while i < len(bufs):
            batch = bufs[i:i + 512]
            batch[0] = batch[0][offset:]
            n = os.writev(fd, batch)
            total += n
            n += offset
            while i < len(bufs) and n >= len(bufs[i]):
                n -= len(bufs[i])
                i += 1
            offset = n
    except OSError as exc:
        exc.written = total  # type: ignore[attr-defined]
        raise
    return total


#: Bytes one read asks for: every small message that has arrived comes in one system call.
_READ_SIZE = 1 << 16


class MessageReader:
    """Reads ``conn``'s messages (``multiprocessing.connection`` framing: a 4-byte big-endian
    length, or -1 and an 8-byte one) through one buffer.

    One ``read`` takes every message waiting in the pipe, where ``recv_bytes`` costs two reads a
    message and a poll before each: for a stream of tiny tasks those system calls were most of
    the cost of a task. Where ``conn`` has no file descriptor to read (Windows), it reads
    ``conn`` itself. Only this reader may read ``conn`` once it has been made.
    """

    __slots__ = ("_conn", "_fd", "_buf", "_pos", "_poll", "_eof")

    def __init__(self, conn: Any) -> None:
        import select

        self._conn, self._buf, self._pos, self._eof = conn, bytearray(), 0, False
        try:
            self._fd: int | None = conn.fileno()
            self._poll: Any = select.poll()
            self._poll.register(self._fd, select.POLLIN)
        except (AttributeError, OSError, ValueError):
            self._fd = self._poll = None

    def has_message(self) -> bool:
        """Whether a message has begun to arrive (or the pipe closed), without blocking: then
        :meth:`recv_bytes` returns it (or raises ``EOFError``), waiting only for its rest."""
        if self._poll is None:
            return bool(self._conn.poll())
        if self._pos < len(self._buf) or self._eof:
            return True
        if self._poll.poll(0):
            self._fill(_READ_SIZE)
            return self._pos < len(self._buf) or self._eof
        return False

    def recv_bytes(self) -> bytes | bytearray:
        """The next message, blocking until it has arrived whole; ``EOFError`` at the end."""
        if self._poll is None:
            return self._conn.recv_bytes()  # type: ignore[no-any-return]
        size, head = self._header()
        start = self._pos + head
        have = len(self._buf) - start
        if have >= size:
            self._pos = start + size
            msg = bytes(self._buf[start:self._pos])
            if self._pos == len(self._buf):
                self._buf.clear()
                self._pos = 0
            return msg
        # The rest goes straight into the message's own buffer: a large result is copied once.
        out = bytearray(size)
        out[:have] = self._buf[start:]
        self._buf.clear()
        self._pos = 0
        view = memoryview(out)
        while have < size:
            n = os.readv(self._fd, [view[have:]])  # type: ignore[arg-type]
            if not n:
                raise OSError("got end of file during message")
            have += n
        return out

    def _header(self) -> tuple[int, int]:
        """``(size, header bytes)`` of the buffered message, reading until its header is in."""
        while True:
            avail = len(self._buf) - self._pos
            if avail >= 4:
                size = int.from_bytes(self._buf[self._pos:self._pos + 4], "big", signed=True)
                if size != -1:
                    return size, 4
                if avail >= 12:
                    return int.from_bytes(self._buf[self._pos + 4:self._pos + 12], "big"), 12
            if self._eof:
                if avail:
                    raise OSError("got end of file during message")
                raise EOFError
            self._fill(_READ_SIZE)

    def _fill(self, n: int) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > _READ_SIZE:
            del self._buf[:self._pos]
            self._pos = 0
        data = os.read(self._fd, n)  # type: ignore[arg-type]
        if data:
            self._buf += data
        else:
            self._eof = True


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
