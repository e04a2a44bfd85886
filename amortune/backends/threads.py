"""Threads in the caller's process: for items that wait (sleep, network, disk, GIL-free calls).

A thread cannot be killed, so per-item timeouts need processes. A cancelled chunk stops before
its next item. Imports the standard library, ``_worker`` and ``._base`` only.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from .._model import THREAD_DISPATCH_SECONDS
from .._worker import run_chunk
from ._base import Backend, BackendInfo, ChunkFuture, ChunkOutcome, ChunkTask, Slot
from .serial import run_setup_in_caller

__all__ = ["THREAD_DISPATCH_SECONDS", "ThreadBackend"]


class ThreadBackend(Backend):
    """Threads in this process: for items that wait (I/O, sleep, GIL-free native code)."""

    name = "threads"

    def __init__(self, n_threads: int) -> None:
        self._n = n_threads
        self._pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="amortune")
        self._slots = threading.local()
        self._next_slot = 0
        self._lock = threading.Lock()

    def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, slots=tuple(Slot(i) for i in range(self._n)),
                           dispatch_seconds=THREAD_DISPATCH_SECONDS, in_caller=True,
                           ready_slots=self._n, start_reason="threads in this process")

    def submit(self, task: ChunkTask) -> Future[ChunkOutcome]:
        fut = ChunkFuture()  # cancel() sets cancel_requested, read between items
        inner = self._pool.submit(self._run, task, fut)
        inner.add_done_callback(lambda f: _copy(f, fut))
        return fut

    def _slot(self) -> int:
        slot = getattr(self._slots, "id", None)
        if slot is None:
            with self._lock:
                slot, self._next_slot = self._next_slot, self._next_slot + 1
            self._slots.id = slot
        return int(slot)

    def _run(self, task: ChunkTask, fut: ChunkFuture) -> ChunkOutcome | None:
        if not fut.set_running_or_notify_cancel():
            return None
        run_setup_in_caller(task.setup)
        started, cpu0 = time.perf_counter(), time.thread_time()
        results, error = run_chunk(task.fn.func, task.items, task.style,
                                   lambda k: not fut.cancel_requested)
        finished = time.perf_counter()
        return ChunkOutcome(results, finished - started, time.thread_time() - cpu0, 0,
                            self._slot(), started, finished, None, error)

    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)


def _copy(inner: Future[ChunkOutcome | None], fut: ChunkFuture) -> None:
    if fut.done():
        return
    if inner.cancelled():
        fut.cancel()
        return
    exc = inner.exception()
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            result = inner.result()
            if result is not None:
                fut.set_result(result)
    except Exception:  # settled meanwhile
        pass
