"""The contract every place-to-run implements (v2), and the values that cross it.

A backend only runs chunks. Tuning, ordering, retries, progress, spill and checkpoints live once,
in the scheduler (:mod:`amortune._schedule`), which sees a backend through four things:

``info()``
    A :class:`BackendInfo`: the slots (how many chunks run at once, each with a stable id, its
    devices and its memory), start-up and per-dispatch cost, whether an item can be stopped
    midway (timeouts) and whether items run in the caller's process. It is cheap and never starts
    anything: the planner reads it before deciding.
``submit(task)``
    Run a :class:`ChunkTask` and return a future of a :class:`ChunkOutcome`. ``func``'s own
    exception comes back *inside* the outcome (``error``, with the results of the items before
    the failing one), so the scheduler retries the failing item alone. The future itself fails
    only when the chunk is lost or cannot be sent. ``future.cancel()`` reaches the place the chunk
    runs: a chunk not yet started there never starts.
``is_lost(exc)``
    Whether a failed future means "the chunk was lost, run it again" (a dead process, a Dask
    ``KilledWorker``, a dead GPU worker) rather than an error to report.
``shutdown(wait, kill)``
    Stop the workers.

Per-worker set-up (:class:`WorkerSetup`: ``initializer(*initargs)``, a thread cap and the
caller's environment) travels with each task; a backend runs the initializer once in each worker
before its first item and applies an environment only when it changed. Three call styles
(:data:`STYLES`): ``"item"`` is ``func(x)``, ``"star"`` is ``func(*x)``, ``"chunk"`` is
``func(list_of_items) -> list`` (model batches), and ``"apply"`` is ``func(*args, **kwargs)``.

Imports the standard library and :mod:`amortune._serde` only.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from typing import Any, NamedTuple

from .._record import field, record
from .._serde import digest as _token
from .._serde import dumps_function

__all__ = [
    "STYLES",
    "Backend",
    "BackendInfo",
    "ChunkFuture",
    "ChunkOutcome",
    "ChunkTask",
    "FunctionRef",
    "Slot",
    "WorkerSetup",
    "environment_snapshot",
]

#: Call styles: ``func(x)``, ``func(*x)``, ``func(list) -> list`` and ``func(*args, **kwargs)``.
STYLES = ("item", "star", "chunk", "apply")


@record(frozen=True)
class Slot:
    """One place where one chunk runs at a time; ``id`` stays when its worker is replaced.

    ``devices`` are the device ids the slot's worker owns (``CUDA_VISIBLE_DEVICES`` values), and
    ``env`` the variables its worker starts with, so a replacement gets the same device.
    """

    id: int
    devices: tuple[str, ...] = ()
    memory_bytes: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)


@record(frozen=True)
class BackendInfo:
    """What the planner and the scheduler need to know about a backend, without starting it."""

    name: str
    slots: tuple[Slot, ...]
    #: Seconds until the first slot can run a chunk (0 when the workers are already up).
    start_seconds: float = 0.0
    #: Seconds each further slot adds to the start-up.
    per_slot_start_seconds: float = 0.0
    #: Caller-side seconds of one chunk round trip (send, bookkeeping, receive).
    dispatch_seconds: float = 0.0
    #: Whether an item can be stopped midway (``timeout=`` needs it).
    can_interrupt: bool = False
    #: Whether items run in the caller's process (serial, threads): no pickling, shared state.
    in_caller: bool = False
    #: Slots whose worker is started and ready now.
    ready_slots: int = 0
    #: How workers are started and why (shown by ``explain()``).
    start_reason: str = ""

    @property
    def n_slots(self) -> int:
        return len(self.slots)


@record(frozen=True)
class WorkerSetup:
    """What a worker needs before its first item: set-up function, native thread cap, env."""

    initializer: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    thread_cap: int | None = None
    #: The caller's environment as of the call, as sorted ``(name, value)`` pairs.
    env: tuple[tuple[str, str], ...] | None = None

    @property
    def init_token(self) -> str | None:
        """A stable id of the initializer and its arguments (``None`` without one)."""
        if self.initializer is None:
            return None
        return _token(self.init_payload)

    @property
    def init_payload(self) -> bytes:
        payload: bytes = _cached_payload(self, "_init_payload",
                                         lambda: dumps_function((self.initializer, self.initargs)))
        return payload

    @property
    def env_token(self) -> str | None:
        if self.env is None:
            return None
        token: str = _cached_payload(self, "_env_token",
                                     lambda: _token(repr(self.env).encode()))
        return token


def _cached_payload(obj: Any, name: str, make: Callable[[], Any]) -> Any:
    value = obj.__dict__.get(name)
    if value is None:
        value = make()
        object.__setattr__(obj, name, value)
    return value


def environment_snapshot() -> tuple[tuple[str, str], ...]:
    """The caller's ``os.environ`` now, as workers must see it for this call."""
    return tuple(sorted(os.environ.items()))


@record()
class FunctionRef:
    """A function with its pickled form computed once and a token workers cache it under.

    Functions importable by name are pickled by reference (tracebacks then show their real file
    and line); ``__main__`` functions, lambdas and closures by value (cloudpickle).
    """

    func: Callable[..., Any]
    _payload: bytes | None = field(default=None, repr=False)
    _token: str | None = field(default=None, repr=False)

    @property
    def payload(self) -> bytes:
        if self._payload is None:
            self._payload = dumps_function(self.func)
        return self._payload

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = _token(self.payload)
        return self._token


@record()
class ChunkTask:
    """One chunk to run: ``fn`` over ``items`` (input indices from ``start``) in ``style``."""

    fn: FunctionRef
    items: list[Any]
    start: int
    style: str = "item"
    timeout_seconds: float | None = None
    setup: WorkerSetup | None = None

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(range(self.start, self.start + len(self.items)))


class ChunkOutcome(NamedTuple):
    """A chunk that ran: its results in order and what running it cost where it ran.

    With ``error`` set, ``func`` raised at item ``start + len(results)``: ``results`` are the
    items before it, ``error`` is the exception (its own type, the worker's traceback as
    ``__cause__``). ``started``/``finished`` are ``time.perf_counter()`` readings on this machine
    (0.0 where the backend cannot tell), ``slot`` is the slot id, ``first_call_seconds`` the wall
    time of the chunk's first item when it was the first call of this function in its worker (a
    one-off import or model load, not an item cost).
    """

    results: list[Any]
    wall_seconds: float
    cpu_seconds: float
    rss_bytes: int = 0
    slot: int = 0
    started: float = 0.0
    finished: float = 0.0
    first_call_seconds: float | None = None
    error: BaseException | None = None
    #: Seconds the worker spent unpickling items and pickling results.
    serde_seconds: float = 0.0


class ChunkFuture(Future):  # type: ignore[type-arg]
    """A future whose ``cancel()`` also reaches the place the chunk runs.

    ``on_cancel`` is called once, from the cancelling thread, when a future that is already
    running (sent to a worker) is cancelled: the backend then keeps the chunk from starting, or
    stops it between items.
    """

    def __init__(self, on_cancel: Callable[[ChunkFuture], None] | None = None) -> None:
        super().__init__()
        self._on_cancel = on_cancel
        self.cancel_requested = False

    def cancel(self) -> bool:
        self.cancel_requested = True
        if super().cancel():
            return True
        hook, self._on_cancel = self._on_cancel, None
        if hook is not None and not self.done():
            hook(self)
        return False


def settle(fut: Future[Any], exc: BaseException | None = None, result: Any = None) -> None:
    """Finish ``fut`` unless it is already done (a caller may have cancelled it meanwhile)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


def failed(exc: BaseException) -> Future[ChunkOutcome]:
    """A future that already failed with ``exc`` (a task that could not be sent)."""
    fut: Future[ChunkOutcome] = Future()
    fut.set_exception(exc)
    return fut


class Backend(ABC):
    """Where chunks run; see the module docstring for the contract."""

    name: str = "abstract"

    @abstractmethod
    def info(self) -> BackendInfo:
        """Slots, costs and capabilities; cheap, and never starts a worker."""

    def capacity(self) -> int:
        """How many chunks run at once (``len(info().slots)``)."""
        return self.info().n_slots

    @abstractmethod
    def submit(self, task: ChunkTask) -> Future[ChunkOutcome]:
        """Run ``task``; ``func``'s exception comes back in the outcome, lost chunks fail it."""

    def is_lost(self, exc: BaseException) -> bool:
        """Whether a failed future means the chunk was lost and may run again."""
        from .._errors import TaskTimeoutError, WorkerCrashedError

        return isinstance(exc, (WorkerCrashedError, TaskTimeoutError))

    def ready(self) -> bool:
        """Whether at least one slot can run a chunk now (the caller helps while none can)."""
        return True

    @abstractmethod
    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        """Stop the workers; ``kill`` ends them at once (Ctrl-C, terminate)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True, kill=exc[0] is not None)
