"""The caller's own process as a backend: chunks run in the calling thread, one at a time.

Serial runs go through the same scheduler as every other plan, so retries, ``retry_on``,
progress and checkpoints mean the same thing everywhere. ``submit`` runs the chunk before it
returns (an already finished future), so there is nothing to cancel and nothing to shut down.
The initializer runs once, before the first item. Imports the standard library, ``_worker`` and
``._base`` only.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

from .._worker import run_chunk
from ._base import Backend, BackendInfo, ChunkOutcome, ChunkTask, Slot, WorkerSetup

__all__ = ["SerialBackend", "run_setup_in_caller"]

#: Initializers already run in this process, by identity (the function is kept alive so its id
#: is never reused). Not by pickled form: a ``__main__`` initializer pickles by value with the
#: globals it changed, so its bytes differ once it has run.
_INITIALISED: dict[tuple[int, str], Any] = {}


def run_setup_in_caller(setup: WorkerSetup | None) -> None:
    """Run ``setup.initializer`` in this process once per initializer (the caller is a worker too)."""
    if setup is None or setup.initializer is None:
        return
    key = (id(setup.initializer), repr(setup.initargs))
    if key not in _INITIALISED:
        setup.initializer(*setup.initargs)
        _INITIALISED[key] = setup.initializer


class SerialBackend(Backend):
    """Runs every chunk in the caller, in order; one slot, no start-up, no pickling."""

    name = "serial"

    def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, slots=(Slot(0),), in_caller=True, ready_slots=1,
                           dispatch_seconds=2e-6, start_reason="items run in this process")

    def submit(self, task: ChunkTask) -> Future[ChunkOutcome]:
        fut: Future[ChunkOutcome] = Future()
        fut.set_running_or_notify_cancel()
        try:
            run_setup_in_caller(task.setup)
        except BaseException as exc:
            fut.set_exception(exc)
            return fut
        started, cpu0 = time.perf_counter(), time.thread_time()
        results, error = run_chunk(task.fn.func, task.items, task.style)
        finished = time.perf_counter()
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise error  # the caller's own Ctrl-C or exit: not an item error to retry
        fut.set_result(ChunkOutcome(results, finished - started, time.thread_time() - cpu0, 0, 0,
                                    started, finished, None, error))
        return fut

    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        pass
