"""The messages between a process backend's manager thread and its workers, as typed tuples.

Each is a ``NamedTuple`` of builtins and bytes (pickled by reference to this module), so both
sides read fields by name, never ``msg[5]``. Imports the standard library only.

Caller to worker: :class:`Func`, :class:`Env`, :class:`Run`, :class:`Cancel`, ``None`` (exit).
Worker to caller: :class:`Ready`, :class:`Tick`, :class:`Done`, :class:`Skipped`,
:class:`Exiting`, :class:`InitError`, :class:`Retiring`.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

__all__ = ["TASK_IDS", "Cancel", "Done", "Env", "Exiting", "Func", "InitError", "Ready",
           "Retiring", "Run", "Skipped", "Tick"]

#: Ids of the tasks sent to workers, unique in this process (a reply names its task by id).
TASK_IDS = itertools.count(1)


class Func(NamedTuple):
    """A function to cache under ``token`` (the worker evicts oldest first, as the caller)."""

    token: str
    payload: bytes


class Env(NamedTuple):
    """The caller's environment and native thread cap for the tasks that follow."""

    token: str
    pairs: tuple[tuple[str, str], ...] | None
    thread_cap: int | None


class Run(NamedTuple):
    """Run ``token``'s function over the pickled ``items`` (input indices from ``start``)."""

    task_id: int
    token: str
    start: int
    style: str
    items: bytes
    ticks: bool
    growth_limit: int | None


class Cancel(NamedTuple):
    """Do not start task ``task_id``, or stop it before its next item."""

    task_id: int


class Ready(NamedTuple):
    pid: int
    rss: int


class Tick(NamedTuple):
    """Item ``item`` of ``task_id`` started (``None``: pickling the results)."""

    task_id: int
    item: int | None


class Done(NamedTuple):
    """A task ran: pickled results (the items before ``error`` when it is set)."""

    task_id: int
    results: bytes
    wall: float
    cpu: float
    rss: int
    started: float
    finished: float
    first_call: float | None
    serde: float
    #: ``_errors.capture`` output of ``func``'s exception, or ``None``.
    error: Any


class Skipped(NamedTuple):
    """Task ``task_id`` was cancelled before it started (or between items, with partial results)."""

    task_id: int


class Exiting(NamedTuple):
    """``func`` raised ``SystemExit(code)`` at ``item``: the worker exits with it."""

    task_id: int
    item: int | None
    code: Any


class InitError(NamedTuple):
    captured: Any


class Retiring(NamedTuple):
    """Grown past its memory limit: the worker exits without running ``task_id``'s successors."""

    task_id: int
