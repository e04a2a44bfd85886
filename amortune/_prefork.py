"""Workers forked before the engine is imported, each holding its first chunk.

In a fresh process a parallel map would pay the engine's imports (~15 ms: futures, the manager,
the scheduler) and ``multiprocessing``'s (~10 ms) before any worker starts. Here the first
workers fork with only the worker's own code loaded, each inheriting its first chunk and the
function in memory (a fork copies them: no function is sent, no chunk waits in a pipe), so they
compute while the caller imports the engine and plans; the warm pool then adopts them
(``Manager.fork_initial``) as if it had started them and sent those chunks.

Where ``multiprocessing`` is not imported yet, the workers are forked with :func:`os.fork` and
talk over plain pipes (:class:`PipeConnection`, :class:`ForkedChild`): importing it first would
delay every worker by that much. Such a worker marks itself daemonic if it ever imports
``multiprocessing``, as that module's own workers are. Where it is imported already (the
user's script did), ``multiprocessing.Process`` forks them. Imports the standard library,
``_protocol``, ``_serde``, ``_serve`` and ``_start``.
"""

from __future__ import annotations

import itertools
import os
import select
import signal
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, NoReturn

from ._protocol import TASK_IDS, Run
from ._serde import digest, dumps, dumps_function, script_function
from ._serve import load_prctl, worker_main
from ._start import choose_start, in_worker_process
from ._worker import frame_header

__all__ = ["Forked", "ForkedChild", "PipeConnection", "PreForked", "abandon", "fork_with_chunks"]

#: Numbers the tokens of script functions, which the early workers inherit before any pickling.
_SCRIPT_FUNCTIONS = itertools.count(1)
#: Messages up to this size go out in one write with their header (as ``multiprocessing``'s).
_SMALL_MESSAGE = 16384


class Forked(NamedTuple):
    """One forked worker and the chunk it runs first."""

    process: Any  # a ForkedChild or a multiprocessing.Process
    conn: Any  # a PipeConnection or a multiprocessing Connection
    task_id: int
    start: int
    items: list[Any]
    payload: bytes  # the items pickled: what sending the chunk elsewhere takes
    started: float  # perf_counter() just before the fork


class PreForked(NamedTuple):
    """Workers forked with their first chunks, and the function as every later worker gets it
    (``None`` for a function of the script: pickled later, in the caller)."""

    func_payload: bytes | None
    token: str
    workers: list[Forked]


class PipeConnection:
    """A duplex message channel over two pipes, framed as ``multiprocessing.connection``'s
    (a 4-byte big-endian length, or -1 and an 8-byte one): ``send_bytes``, ``recv_bytes``,
    ``poll``, ``fileno`` (the end it reads), ``write_fileno`` and ``close``."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._r, self._w = read_fd, write_fd

    def fileno(self) -> int:
        return self._r

    def write_fileno(self) -> int:
        return self._w

    def send_bytes(self, buf: bytes) -> None:
        header = frame_header(len(buf))
        if len(buf) > _SMALL_MESSAGE:
            self._write(header)
            self._write(buf)
        else:
            self._write(header + buf)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._w, view):]

    def recv_bytes(self) -> bytes:
        size = int.from_bytes(self._read(4), "big", signed=True)
        if size == -1:
            size = int.from_bytes(self._read(8), "big")
        return self._read(size)

    def _read(self, n: int) -> bytes:
        data = os.read(self._r, n) if n else b""
        if not data and n:
            raise EOFError
        while len(data) < n:
            more = os.read(self._r, n - len(data))
            if not more:
                raise OSError("got end of file during message")
            data += more
        return data

    def poll(self, timeout: float | None = 0.0) -> bool:
        p = select.poll()
        p.register(self._r, select.POLLIN)
        return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000))))

    def close(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._r = self._w = -1


class ForkedChild:
    """A worker forked with :func:`os.fork`: what the manager uses of a
    ``multiprocessing.Process`` (``pid``, ``sentinel``, ``exitcode``, ``is_alive``, ``join``,
    ``kill``). ``sentinel`` becomes readable when the child exits."""

    def __init__(self, pid: int, sentinel: int) -> None:
        self.pid, self.sentinel = pid, sentinel
        self._exitcode: int | None = None
        self.close = weakref.finalize(self, os.close, sentinel)  # closes the sentinel once

    @property
    def exitcode(self) -> int | None:
        if self._exitcode is None:
            self._wait(os.WNOHANG)
        return self._exitcode

    def _wait(self, flags: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped by someone else: its exit code is lost
            return
        if pid:
            self._exitcode = os.waitstatus_to_exitcode(status)

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        if self._exitcode is not None:
            return
        if timeout is not None:
            p = select.poll()
            p.register(self.sentinel, select.POLLIN)
            if not p.poll(max(0, int(timeout * 1000))):
                return
        self._wait(os.WNOHANG if timeout == 0 else 0)

    def kill(self) -> None:
        if self._exitcode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class _AsMultiprocessingChild:
    """Installed in a worker forked before ``multiprocessing`` was imported: once it is, this
    process is what ``multiprocessing``'s own forked workers are, daemonic (it refuses this
    worker children of its own, which nothing would stop when the worker is killed) and with
    ``parent_process()`` naming the caller."""

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid, self.done = parent_pid, False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "multiprocessing" or self.done:
            return None
        self.done = True
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        loader = None if spec is None else spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            process = module.process
            process.current_process()._config["daemon"] = True
            try:  # readable once the parent exits, as the sentinel multiprocessing passes
                sentinel = os.pidfd_open(self.parent_pid)
            except (AttributeError, OSError):
                return
            process._parent_process = process._ParentProcess(
                "MainProcess", self.parent_pid, sentinel)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def fork_with_chunks(func: Callable[..., Any], chunks: Sequence[tuple[int, list[Any]]], *,
                     thread_cap: int | None, growth_limit: int | None) -> PreForked | None:
    """Fork one worker per chunk, ``(start, items)``, each running its chunk at once.

    ``None`` when forking is not safe here (another thread, CUDA, a start method the user chose)
    or ``func`` cannot be pickled for the workers started later; a chunk whose items cannot be
    pickled, and every chunk after it, gets no worker (the planner meets the problem).

    ``func`` is pickled first, and one that cannot be pickled forks nothing: it never runs in a
    worker (what makes it unpicklable, an open file, a socket, a lock, is what a child must not
    share), and no item runs twice. A function of the script that reaches only modules,
    importable functions and plain data (``script_function``) is pickled after the fork instead:
    ``func_payload`` is then ``None``.
    """
    if in_worker_process() or choose_start(None).first != "fork":
        return None
    func_payload: bytes | None = None
    if script_function(func):
        # What it reaches pickles surely: by value, for the workers started later, once these
        # run (cloudpickle's import is 12-19 ms); should that fail, the rest of the input
        # runs in the caller.
        token = digest(f"{os.getpid()}:{id(func)}:{next(_SCRIPT_FUNCTIONS)}".encode())
    else:
        try:
            func_payload = dumps_function(func)
        except Exception:
            return None
        token = digest(func_payload)
    load_prctl()  # loaded once, here: the children need no import to die with this process
    raw = "multiprocessing" not in sys.modules
    workers: list[Forked] = []
    proc: Any = None
    try:
        for start, items in chunks:
            try:
                payload = dumps(items)
            except Exception:
                break
            run = Run(next(TASK_IDS), token, start, "item", payload, False, growth_limit)
            first = (func, run)
            started = time.perf_counter()
            if raw:
                if not _fork_raw(workers, first, thread_cap, start, items, payload, started):
                    break
                continue
            import multiprocessing

            ctx = multiprocessing.get_context("fork")
            parent, child = ctx.Pipe(duplex=True)
            inherited = [parent, *(w.conn for w in workers)]
            proc = ctx.Process(target=worker_main, name=f"amortune-worker-{len(workers)}",
                               args=(child, thread_cap, None, None, "fork", inherited, (), first),
                               daemon=True)
            try:
                proc.start()
            except Exception:
                parent.close()
                break
            finally:
                child.close()
            workers.append(Forked(proc, parent, run.task_id, start, items, payload, started))
            proc = None
    except BaseException:  # Ctrl-C while forking: no worker may run on
        if proc is not None and proc.pid is not None:  # started, not yet in ``workers``
            proc.kill()
            proc.join()
        abandon(PreForked(func_payload, token, workers))
        raise
    return PreForked(func_payload, token, workers) if workers else None


def _fork_raw(workers: list[Forked], first: tuple[Any, Run], thread_cap: int | None,
              start: int, items: list[Any], payload: bytes, started: float) -> bool:
    """Fork one worker with :func:`os.fork` and append it to ``workers``; ``False`` if the
    fork failed. SIGINT waits until the child is in ``workers``, so Ctrl-C cannot lose it."""
    fds: list[int] = []
    mask = {signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    try:
        try:
            down_r, down_w = os.pipe()  # caller -> worker
            fds += [down_r, down_w]
            up_r, up_w = os.pipe()  # worker -> caller
            fds += [up_r, up_w]
            sentinel_r, sentinel_w = os.pipe()  # the worker holds the write end until it exits
            fds += [sentinel_r, sentinel_w]
            parent_pid = os.getpid()
            pid = os.fork()
        except OSError:
            for fd in fds:
                os.close(fd)
            return False
        if pid == 0:
            for fd in (down_w, up_r, sentinel_r):
                os.close(fd)
            _child_main(PipeConnection(down_r, up_w), workers, first, thread_cap, parent_pid)
        for fd in (down_r, up_w, sentinel_w):
            os.close(fd)
        workers.append(Forked(ForkedChild(pid, sentinel_r), PipeConnection(up_r, down_w),
                              first[1].task_id, start, items, payload, started))
        return True
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, mask)


def _child_main(conn: PipeConnection, siblings: list[Forked], first: tuple[Any, Run],
                thread_cap: int | None, parent_pid: int) -> NoReturn:
    """A raw-forked worker's life: what ``multiprocessing`` does around a forked target (stdin
    from ``/dev/null``, exit codes, flushed output), then :func:`worker_main`."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        for w in siblings:  # the caller's ends of earlier workers' pipes: theirs, not ours
            w.conn.close()
            w.process.close()
        sys.meta_path.insert(0, _AsMultiprocessingChild(parent_pid))
        _stdin_from_devnull()
        worker_main(conn, thread_cap, None, None, "fork", (), (), first, parent_pid)
        code = 0
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            sys.stderr.write(f"{exc.code}\n")
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass
        os._exit(code)


def _stdin_from_devnull() -> None:
    if sys.stdin is None:
        return
    try:
        sys.stdin.close()
    except (OSError, ValueError):
        pass
    try:
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - lives as long as we do
    except OSError:
        pass


def abandon(forked: PreForked) -> None:
    """Kill and reap workers no pool adopted (the caller was interrupted before it could)."""
    for w in forked.workers:
        w.process.kill()
    for w in forked.workers:
        w.process.join()
        w.conn.close()
