"""The messages between a process backend's manager thread and its workers, as typed tuples.

Each is a tuple of builtins and bytes with a name per field (pickled by reference to this
module), so both sides read fields by name, never ``msg[5]``. Type checkers read them as
``NamedTuple`` classes; at run time :class:`Message` builds them without compiling code per class
(about 10 µs a class instead of 75: a one-shot parallel call imports this module before its
first worker forks). Imports the standard library only.

Caller to worker: :class:`Func`, :class:`Env`, :class:`Run`, :class:`Cancel`, ``None`` (exit).
Worker to caller: :class:`Ready`, :class:`Tick`, :class:`Done`, :class:`Skipped`,
:class:`Exiting`, :class:`InitError`, :class:`Retiring`.
"""

from __future__ import annotations

import itertools
import operator
from typing import TYPE_CHECKING, Any

__all__ = ["TASK_IDS", "Cancel", "Done", "Env", "Exiting", "Func", "InitError", "Ready",
           "Retiring", "Run", "Skipped", "Tick"]

#: Ids of the tasks sent to workers, unique in this process (a reply names its task by id).
TASK_IDS = itertools.count(1)

if TYPE_CHECKING:
    from typing import NamedTuple as Message
else:
    class _MessageType(type):
        """Makes each class declared on :class:`Message` a tuple with a property per annotated
        field, in the order declared."""

        def __new__(mcls, name, bases, ns):
            if bases != (tuple,):
                fields = tuple(ns.get("__annotations__", ()))
                ns = {**ns, "__slots__": (), "_fields": fields}
                for i, field in enumerate(fields):
                    ns[field] = property(operator.itemgetter(i), doc=f"Field {i}.")
            return super().__new__(mcls, name, bases, ns)

    class Message(tuple, metaclass=_MessageType):
        """A named tuple: ``Run(task_id, token, ...)``, every field given, in order."""

        __slots__ = ()
        _fields: tuple[str, ...] = ()

        def __new__(cls, *values):
            if len(values) != len(cls._fields):
                raise TypeError(f"{cls.__name__} takes {len(cls._fields)} fields "
                                f"({', '.join(cls._fields)}), got {len(values)}")
            return tuple.__new__(cls, values)

        def __getnewargs__(self):
            return tuple(self)

        def __repr__(self):
            shown = ", ".join(f"{f}={v!r}" for f, v in zip(self._fields, self, strict=True))
            return f"{type(self).__name__}({shown})"


class Func(Message):
    """A function to cache under ``token`` (the worker evicts oldest first, as the caller)."""

    token: str
    payload: bytes


class Env(Message):
    """The caller's environment and native thread cap for the tasks that follow."""

    token: str
    pairs: tuple[tuple[str, str], ...] | None
    thread_cap: int | None


class Run(Message):
    """Run ``token``'s function over the pickled ``items`` (input indices from ``start``)."""

    task_id: int
    token: str
    start: int
    style: str
    items: bytes
    ticks: bool
    growth_limit: int | None


class Cancel(Message):
    """Do not start task ``task_id``, or stop it before its next item."""

    task_id: int


class Ready(Message):
    pid: int
    rss: int


class Tick(Message):
    """Item ``item`` of ``task_id`` started (``None``: pickling the results)."""

    task_id: int
    item: int | None


class Done(Message):
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


class Skipped(Message):
    """Task ``task_id`` was cancelled before it started (or between items, with partial results)."""

    task_id: int


class Exiting(Message):
    """``func`` raised ``SystemExit(code)`` at ``item``: the worker exits with it."""

    task_id: int
    item: int | None
    code: Any


class InitError(Message):
    captured: Any


class Retiring(Message):
    """Grown past its memory limit: the worker exits without running ``task_id``'s successors."""

    task_id: int
