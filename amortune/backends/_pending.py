"""What a process backend's manager thread holds: tasks, workers, flags, and finished replies.

:class:`Pending` is a submitted task with its pickled items and its future; :class:`WorkerState`
the manager's view of one worker process (its pipe, slot, running task and backlog);
:class:`Flags` the state callers read under one lock. :func:`finish` turns a worker's reply into
the task's :class:`~amortune.backends.ChunkOutcome`. Imports the standard library, ``_errors``,
``_protocol``, ``_worker`` and ``_base``.
"""

from __future__ import annotations

import collections
import os
import pickle
import threading
import time
from typing import Any

from .._errors import NotPicklableError, rebuild
from .._protocol import TASK_IDS, Done
from .._record import field, record
from .._worker import MessageReader, frame_header, write_all
from ._base import ChunkFuture, ChunkOutcome, ChunkTask, Slot, settle

__all__ = ["Flags", "Pending", "WorkerState", "describe", "finish", "kill", "memory_hint"]


class Pending:
    """A submitted task, its pickled items and its future."""

    __slots__ = ("task", "payload", "future", "id", "running")
    def __init__(self, task: ChunkTask, payload: bytes, future: ChunkFuture,
                 task_id: int | None = None) -> None:
        self.task, self.payload, self.future = task, payload, future
        self.id = next(TASK_IDS) if task_id is None else task_id
        self.running = False


@record()
class Flags:
    """The manager's state flags in one place (read by callers under ``lock``)."""

    closing: bool = False
    killing: bool = False
    abandon: bool = False
    woken: bool = False
    broken: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class WorkerState:
    __slots__ = ("process", "conn", "slot", "task", "backlog", "backlog_bytes", "item_started",
                 "item_index", "funcs", "ready", "rss", "retiring", "started_at", "tasks_done",
                 "note", "env_token", "reader", "has_message", "forked", "outbox", "write_fd")

    def __init__(self, process: Any, conn: Any, slot: Slot, forked: bool = False) -> None:
        self.process, self.conn, self.slot = process, conn, slot
        self.forked = forked  # forked from the caller's only thread: ready within milliseconds
        self.reader = MessageReader(conn)  # the only reader of ``conn``
        self.has_message = self.reader.has_message
        #: Messages not written yet, each with the task it runs: one write sends them all.
        self.outbox: list[tuple[bytes, Pending | None]] = []
        write_fileno = getattr(conn, "write_fileno", None)
        self.write_fd: int | None = (write_fileno() if write_fileno is not None
                                     else conn.fileno() if os.name == "posix" else None)
        self.task: Pending | None = None
        # Sent behind ``task``, in order; the first starts when ``task`` replies.
        self.backlog: collections.deque[Pending] = collections.deque()
        self.backlog_bytes = 0
        self.item_started = self.started_at = time.perf_counter()
        self.item_index = 0
        self.funcs: dict[str, None] = {}  # tokens the worker holds, in the order it got them
        self.ready = self.retiring = False
        self.rss = self.tasks_done = 0
        self.note = ""
        self.env_token: str | None = None

    def bytes_to_send(self, p: Pending) -> float:
        """What sending ``p`` to this worker writes into its pipe (a timed task never waits)."""
        if p.task.timeout_seconds is not None:
            return float("inf")
        func = 0 if p.task.fn.token in self.funcs else len(p.task.fn.payload)
        return len(p.payload) + func

    def put(self, body: bytes, task: Pending | None = None) -> None:
        """Queue a message for the next :meth:`flush`; ``task``: the task it runs, if any."""
        self.outbox.append((body, task))

    def flush(self) -> list[Pending]:
        """Write the outbox; returns the tasks whose message did not get through whole (every
        task from the first message cut short on: the pipe broke there)."""
        out, self.outbox = self.outbox, []
        written = 0
        try:
            if self.write_fd is None:  # no descriptor to write (Windows): one message at a time
                for body, _ in out:
                    self.conn.send_bytes(body)
                    written += len(frame_header(len(body))) + len(body)
            else:
                written = write_all(self.write_fd,
                                    [b for body, _ in out for b in (frame_header(len(body)), body)])
            return []
        except OSError as exc:
            written = getattr(exc, "written", written)
        lost, end = [], 0
        for body, task in out:
            end += len(frame_header(len(body))) + len(body)
            if task is not None and end > written:
                lost.append(task)
        return lost

    def pop_reply(self) -> Pending | None:
        """The task a reply belongs to; replies come in order, so the next task starts now."""
        p = self.task
        self.task = self.backlog.popleft() if self.backlog else None
        # What was sent for it leaves the pipe (a function sent with it stays counted until the
        # backlog empties: the budget errs on the safe side).
        self.backlog_bytes = (0 if not self.backlog or self.task is None
                              else max(0, self.backlog_bytes - len(self.task.payload)))
        if self.task is not None:
            self.item_started, self.item_index = time.perf_counter(), self.task.task.start
        return p


def describe(task: ChunkTask) -> str:
    from .._errors import describe_indices

    return describe_indices(task.indices)


def finish(p: Pending, msg: Done, slot: int) -> None:
    try:
        results = pickle.loads(msg.results) if msg.results else []
    except BaseException as exc:
        settle(p.future, NotPicklableError(
            f"results of {describe(p.task)} cannot be unpickled in the caller: {exc!r}"))
        return
    error = rebuild(msg.error) if msg.error is not None else None
    settle(p.future, result=ChunkOutcome(
        results, msg.wall, msg.cpu, msg.rss, slot, msg.started, msg.finished, msg.first_call,
        error, msg.serde))


def memory_hint(rss: int, oom_kills_before: int | None) -> tuple[bool | None, int | None]:
    """Whether a SIGKILLed worker was likely killed for memory, and the OOM-kill count now.

    Yes when the cgroup's OOM-kill count rose since ``oom_kills_before``; otherwise when the
    worker's last RSS was over half of the memory available now; ``None`` with no evidence.
    """
    try:
        from .._system import memory_snapshot, oom_kill_count

        now = oom_kill_count()
        if now is not None and oom_kills_before is not None and now > oom_kills_before:
            return True, now
        if not rss:
            return None, now
        return rss > 0.5 * memory_snapshot(), now
    except Exception:
        return None, None


def kill(process: Any) -> None:
    try:
        process.kill()
    except (OSError, ValueError, AttributeError):
        pass
