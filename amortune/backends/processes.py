"""Worker processes on this machine: the caller's side of the process backend.

:class:`ProcessBackend` pickles a task in the caller's thread (a bad function or item never
reaches the manager), queues it for the manager thread (:mod:`._manager`), and answers with a
:class:`~amortune.backends.ChunkFuture` whose ``cancel()`` reaches the worker. Slots have stable
ids: a replacement worker takes the dead one's slot and environment (its device). Imports the
standard library and the rest of :mod:`amortune.backends` only.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from .._errors import AmortuneError, NotPicklableError
from .._model import PROCESS_DISPATCH_SECONDS
from .._serde import dumps, first_unpicklable, note_item
from .._start import choose_start, in_worker_process, start_cost
from ._base import (
    Backend,
    BackendInfo,
    ChunkFuture,
    ChunkOutcome,
    ChunkTask,
    Slot,
    WorkerSetup,
    failed,
)
from ._manager import Flags, Manager, Pending

if TYPE_CHECKING:
    from .._prefork import Forked

__all__ = ["PROCESS_DISPATCH_SECONDS", "ProcessBackend"]

#: Every process backend not yet stopped, so the exit handler can stop the ones nobody closed.
LIVE: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()


class ProcessBackend(Backend):
    """Worker processes behind a manager thread; a dead or stuck worker never hangs the caller.

    Parameters
    ----------
    n_workers:
        Number of slots (ignored when ``slots`` is given).
    start_method:
        ``"fork"``, ``"forkserver"``, ``"spawn"``, or ``None`` to fork the first workers from a
        single-threaded caller and use forkserver/spawn later (see :mod:`._start`).
    slots:
        Slots with their devices and environment (``CUDA_VISIBLE_DEVICES`` per GPU).
    setup:
        ``initializer(*initargs)`` runs once in every worker before its first item;
        ``thread_cap`` caps native thread pools.
    start_timeout_seconds:
        A worker not ready this long after its start (the initializer included: a model load)
        is killed and counts as a failed start.
    """

    name = "processes"

    def __init__(self, n_workers: int = 1, *, start_method: str | None = None,
                 slots: Sequence[Slot] | None = None, setup: WorkerSetup | None = None,
                 thread_cap: int | None = None, max_tasks_per_child: int | None = None,
                 memory_growth_bytes: int | None = None,
                 start_timeout_seconds: float = 60.0,
                 adopt: Sequence[tuple[Forked, ChunkTask]] = ()) -> None:
        slot_list = list(slots) if slots is not None else [Slot(i) for i in range(n_workers)]
        if not slot_list:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        if len({s.id for s in slot_list}) != len(slot_list):
            raise ValueError("slot ids must be unique")
        if in_worker_process():
            raise AmortuneError("a worker process cannot start worker processes of its own "
                                "(it is daemonic); run nested maps serially or on threads")
        plan = choose_start(start_method)
        self.start_plan = plan
        self.start_method = plan.first
        self.owner_pid = os.getpid()
        self.setup = setup or WorkerSetup(thread_cap=thread_cap)
        cap = self.setup.thread_cap if self.setup.thread_cap is not None else thread_cap
        init = self.setup.init_payload if self.setup.initializer is not None else None
        self.flags = Flags()
        self._mgr = Manager(slot_list, methods=(plan.first, plan.later), thread_cap=cap,
                            init_payload=init, max_tasks=max_tasks_per_child, flags=self.flags,
                            start_timeout_seconds=start_timeout_seconds)
        self._mgr.growth_limit = memory_growth_bytes  # type: ignore[attr-defined]
        #: Futures of the tasks the adopted workers (``adopt``) inherited, in their order.
        self.adopted: list[ChunkFuture] = []
        pending = []
        for forked, task in adopt:
            fut = ChunkFuture(self._cancel_running)
            p = Pending(task, forked.payload, fut, forked.task_id)
            fut._amortune_pending = p  # type: ignore[attr-defined]
            fut.set_running_or_notify_cancel()
            pending.append((forked, p))
            self.adopted.append(fut)
        # Before the manager thread exists: one thread forks.
        self._mgr.fork_initial(pending, spawn=plan.first == "fork")
        self._mgr.thread.start()
        LIVE.add(self)

    # -- the contract ----------------------------------------------------------------------------
    def info(self) -> BackendInfo:
        ready = self.warm_workers
        first, per = start_cost(self.start_plan.first)
        return BackendInfo(
            name=self.name, slots=tuple(self._mgr.slots),
            start_seconds=0.0 if ready else first, per_slot_start_seconds=per,
            dispatch_seconds=PROCESS_DISPATCH_SECONDS, can_interrupt=True, in_caller=False,
            ready_slots=ready, start_reason=self.start_plan.reason)

    def ready(self) -> bool:
        return self.warm_workers > 0

    @property
    def warm_workers(self) -> int:
        """Workers started and ready now."""
        return sum(1 for w in list(self._mgr.workers) if w.ready and not w.retiring)

    @property
    def alive(self) -> bool:
        return (not self.flags.closing and self.flags.broken is None
                and self._mgr.thread.is_alive() and os.getpid() == self.owner_pid)

    @property
    def has_initializer(self) -> bool:
        return self.setup.initializer is not None

    def start_times(self) -> dict[int, tuple[float, float]]:
        """``slot -> (started, ready)`` on the caller's clock, for run reports."""
        return dict(self._mgr.start_log)

    def resize(self, n_workers: int) -> None:
        """Grow (never shrink) the pool to ``n_workers`` slots."""
        with self.flags.lock:
            have = len(self._mgr.slots)
            start = max((s.id for s in self._mgr.slots), default=-1) + 1
            self._mgr.slots.extend(Slot(start + i) for i in range(max(0, n_workers - have)))
        self._mgr.wake()

    def pids(self) -> list[int]:
        """PIDs of the live workers (tests use this to prove nothing is left behind)."""
        return [w.process.pid for w in list(self._mgr.workers) if w.process.pid is not None]

    def submit(self, task: ChunkTask) -> Future[ChunkOutcome]:
        try:  # pickled here, in the caller: a bad function must not reach the manager thread
            task.fn.payload  # noqa: B018
            task.fn.token  # noqa: B018
        except Exception as exc:
            err = NotPicklableError(
                f"the function {task.fn.func!r} cannot be pickled to send it to a worker: {exc}")
            err.__cause__ = exc
            return failed(err)
        try:
            payload = dumps(task.items)
        except Exception as exc:
            bad = first_unpicklable(task.items, task.start)
            err = NotPicklableError(f"item {bad} cannot be pickled to send it to a worker: {exc}")
            err.__cause__ = exc
            note_item(err, bad)
            return failed(err)
        fut = ChunkFuture(self._cancel_running)
        p = Pending(task, payload, fut)
        fut._amortune_pending = p  # type: ignore[attr-defined]
        with self.flags.lock:
            if self.flags.broken is not None:
                return failed(self.flags.broken)
            if self.flags.closing:
                raise RuntimeError("cannot submit to a backend that is shut down")
            self._mgr.pending.append(p)
            if self._mgr.sent.is_set():  # clear() takes the event's lock: only when needed
                self._mgr.sent.clear()
        self._mgr.wake()
        return fut

    def wait_sent(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every task submitted is in a worker's pipe.

        The manager thread sends them the moment the caller's thread lets it run; a caller
        that goes on computing would keep it waiting for the interpreter's switch interval.
        """
        return self._mgr.sent.wait(timeout)

    def _cancel_running(self, fut: ChunkFuture) -> None:
        p = getattr(fut, "_amortune_pending", None)
        if p is not None:
            with self.flags.lock:
                self._mgr.cancels.append(p)
            self._mgr.wake()

    def kill_tasks(self, futures: Iterable[Future[Any]]) -> None:
        """Stop these tasks now: their workers are killed (and replaced), the rest carry on."""
        ps = [getattr(f, "_amortune_pending", None) for f in futures]
        with self.flags.lock:
            self._mgr.kills.extend(p for p in ps if p is not None and not p.future.done())
        self._mgr.wake()

    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        """Stop the pool: after the queued work (default), or at once with ``kill``."""
        if os.getpid() != self.owner_pid:
            return  # a forked child: the parent's workers are not ours to stop
        with self.flags.lock:
            self.flags.closing = True
            self.flags.killing = self.flags.killing or kill
        if kill:  # from this thread too: frees a manager blocked writing to a worker
            self._mgr.kill_all()
        self._mgr.wake()
        import threading

        if wait and threading.current_thread() is not self._mgr.thread:
            self._mgr.thread.join()

    def abandon_at_exit(self) -> None:
        """At interpreter exit: idle workers exit, busy ones are killed (nobody waits for them)."""
        if os.getpid() != self.owner_pid:
            return
        with self.flags.lock:
            self.flags.closing = self.flags.abandon = True
        for w in list(self._mgr.workers):
            if w.task is not None:
                try:
                    w.process.kill()
                except (OSError, ValueError, AttributeError):
                    pass
        self._mgr.wake()
        self._mgr.thread.join(60.0)
