"""Threads in the caller's process: for items that wait (sleep, network, disk, GIL-free calls).

Each thread takes ``(task, future)`` pairs from one queue and settles the chunk's own future:
one future, one queue operation and no helper object per chunk, since a plan of 64 threads over
5 ms items hands over thousands of chunks a second through one interpreter. Threads start on
demand, up to ``n_threads``, and each keeps its slot id. The caller starts a thread only when
none is idle; a thread that takes a job while more are queued than threads are idle starts two
more, so the pool doubles with every start latency (each ~0.2-0.6 ms): 64 threads after about
6, nearly none of them paid in the caller. A thread cannot be killed, so per-item
timeouts need processes; a cancelled chunk stops before its next item. Imports the standard
library, ``_worker`` and ``._base`` only.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

from .._model import THREAD_DISPATCH_SECONDS
from .._worker import run_chunk
from ._base import Backend, BackendInfo, ChunkFuture, ChunkOutcome, ChunkTask, Slot, settle
from .serial import run_setup_in_caller

__all__ = ["THREAD_DISPATCH_SECONDS", "ThreadBackend"]

#: Threads each new thread starts while work is queued and the pool is below its size.
FAN_OUT = 2

#: Threads of backends shut down without waiting: idle, told to end, not joined yet. Before a
#: fork, :func:`join_ending_threads` waits for them (a few ms), so they never make a process
#: that is single-threaded in all but these look multi-threaded.
_ENDING: list[threading.Thread] = []
_ENDING_LOCK = threading.Lock()


def join_ending_threads() -> None:
    """Wait for the threads of backends shut down with ``wait=False`` to end."""
    with _ENDING_LOCK:
        ending = list(_ENDING)
        _ENDING.clear()
    current = threading.current_thread()
    for t in ending:
        if t is not current and t.ident is not None:
            t.join()


# Any fork, this package's or the program's own, first waits for them: a child is then forked
# from a process whose only threads are its own.
os.register_at_fork(before=join_ending_threads)


class ThreadBackend(Backend):
    """Threads in this process: for items that wait (I/O, sleep, GIL-free native code)."""

    name = "threads"

    def __init__(self, n_threads: int) -> None:
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        self._n = n_threads
        self._queue: queue.SimpleQueue[tuple[ChunkTask, ChunkFuture] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a job, or made and about to
        self._lock = threading.Lock()
        self._closed = False

    def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, slots=tuple(Slot(i) for i in range(self._n)),
                           dispatch_seconds=THREAD_DISPATCH_SECONDS, in_caller=True,
                           ready_slots=self._n, start_reason="threads in this process")

    def submit(self, task: ChunkTask) -> Future[ChunkOutcome]:
        fut = ChunkFuture()  # cancel() sets cancel_requested, read between items
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a backend that is shut down")
            self._queue.put((task, fut))
            # A thread of the caller's only when none is idle or about to be: the threads
            # themselves grow the pool while work is queued.
            new = self._add_threads(1) if self._idle == 0 else []
        for t in new:
            t.start()
        return fut

    def _add_threads(self, n: int) -> list[threading.Thread]:
        """Up to ``n`` more threads, made under ``_lock`` and started by the caller outside it:
        ``Thread.start()`` waits for the new thread to run, and the caller's ``submit`` must not
        wait behind that."""
        new: list[threading.Thread] = []
        while len(new) < n and len(self._threads) < self._n and not self._closed:
            slot = len(self._threads)
            t = threading.Thread(target=self._serve, args=(slot,), name=f"amortune_{slot}",
                                 daemon=True)
            self._threads.append(t)
            self._idle += 1  # it takes a job first thing
            new.append(t)
        return new

    def _serve(self, slot: int) -> None:
        while True:
            job = self._queue.get()
            with self._lock:
                self._idle -= 1
                # More work queued than idle threads: grow, from here, not in the caller. Two
                # each, so the threads double with every start latency (a tree, not a chain).
                wanted = self._queue.qsize() - self._idle if job is not None else 0
                new = self._add_threads(min(FAN_OUT, wanted)) if wanted > 0 else []
            for t in new:
                t.start()
            if job is None:
                return
            del new
            task, fut = job
            if fut.set_running_or_notify_cancel():
                try:
                    settle(fut, result=self._run(task, fut, slot))
                except BaseException as exc:  # the initializer failed: the chunk reports it
                    settle(fut, exc)
            del job, task, fut  # nothing of a finished chunk is kept while waiting
            with self._lock:
                self._idle += 1

    @staticmethod
    def _run(task: ChunkTask, fut: ChunkFuture, slot: int) -> ChunkOutcome:
        run_setup_in_caller(task.setup)
        started, cpu0 = time.perf_counter(), time.thread_time()
        results, error = run_chunk(task.fn.func, task.items, task.style,
                                   lambda k: not fut.cancel_requested)
        finished = time.perf_counter()
        return ChunkOutcome(results, finished - started, time.thread_time() - cpu0, 0, slot,
                            started, finished, None, error)

    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        """Cancel chunks not started yet, let running ones finish (``wait``: wait for them)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        pending: list[Any] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                pending.append(job[1])
        for fut in pending:
            fut.cancel()
        for _ in threads:  # one each, so they all wake at once
            self._queue.put(None)
        if wait:
            current = threading.current_thread()
            for t in threads:
                # One made but not started yet runs no chunk: it takes its None and ends.
                if t is not current and t.ident is not None:
                    t.join()
        else:
            with _ENDING_LOCK:
                _ENDING.extend(threads)
