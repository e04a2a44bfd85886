"""Threads in the caller's process: for items that wait (sleep, network, disk, GIL-free calls).

A thread cannot be killed, so per-item timeouts need processes (``_optimize`` picks them when a
timeout is given). Imports the standard library, ``_worker`` and ``_errors`` only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .._errors import add_note
from .._worker import run_items
from ._base import Backend, ChunkOutcome, FunctionRef

__all__ = ["ThreadBackend"]


class ThreadBackend(Backend):
    """Threads in this process: for items that wait (I/O, sleep, GIL-free native code)."""

    kind = "threads"

    def __init__(self, n_threads: int) -> None:
        self._n = n_threads
        self._pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="amortune")

    def capacity(self) -> int:
        return self._n

    def submit(self, fn: FunctionRef, items: list[Any], start: int, *, mode: str = "map",
               timeout_seconds: float | None = None) -> Future[ChunkOutcome]:
        return self._pool.submit(_run_in_thread, fn.func, items, start, mode)

    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)


def _run_in_thread(func: Callable[..., Any], items: list[Any], start: int, mode: str) -> ChunkOutcome:
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    try:
        results = run_items(func, items, start, mode)
    except BaseException as exc:
        index = getattr(exc, "amortune_index", None)
        if index is not None:
            add_note(exc, f"amortune: raised while processing item {index}")
        raise
    return ChunkOutcome(results, time.perf_counter() - wall0, time.thread_time() - cpu0, 0)
