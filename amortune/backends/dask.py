"""Chunks on a Dask cluster: the same plans, with ``distributed`` worker threads as the slots.

``backend="dask"`` (the active ``distributed.Client``), ``backend=client``, a cluster object, or
``backend="tcp://host:8786"`` / ``"tls://..."`` (a client of this module's own, shared per
address). Data flow::

    caller                                          scheduler + workers
    submit(ChunkTask) ─┬─ function, initializer, env: inside the task when small; else scattered
                       │    to every worker once per token (workers cache the function by token)
                       ├─ initializer also as a worker plugin: it runs as each worker starts
                       └─ one Dask task per chunk: run_chunk_task(fn, items pickle, start, ...)
    ChunkFuture ◀── settle ◀── gather, release ◀── awaited on the client's event loop ◀── done

A task never raises for ``func``'s sake: it returns a :class:`_Reply` with the pickled results of
the items before a failure and the captured failure, which the caller rebuilds with its own type,
the worker's traceback as ``__cause__`` and the item's index in a note. A task whose worker died
(``KilledWorker``, a closed connection) fails its future with :class:`WorkerCrashedError`, which
:meth:`DaskBackend.is_lost` recognises, so the scheduler's retries run the chunk again. Results
stay on the cluster only until they are gathered.

``distributed`` is imported here and nowhere else; the registry imports this module only when a
Dask backend is asked for. Workers must be able to import ``amortune``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import os
import pickle
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import wait as wait_futures
from typing import Any, NamedTuple

import distributed
from distributed import WorkerPlugin
from distributed.comm.core import CommClosedError
from distributed.deploy.cluster import Cluster
from distributed.utils import offload

from .._errors import (
    AmortuneError,
    NotPicklableError,
    WorkerCrashedError,
    capture,
    describe_indices,
    rebuild,
)
from .._serde import add_note, dumps, first_unpicklable, note_item
from .._worker import FUNC_CACHE_SIZE, THREAD_ENV_VARS, limit_native_threads, rss_bytes
from .._worker import run_chunk as _run_items
from . import register_backend
from ._base import (
    STYLES,
    Backend,
    BackendInfo,
    ChunkFuture,
    ChunkOutcome,
    ChunkTask,
    Slot,
    WorkerSetup,
    failed,
    settle,
)

try:
    from distributed.client import FutureCancelledError
except ImportError:  # older distributed: a cancelled future raises the plain CancelledError
    FutureCancelledError = CancelledError  # type: ignore[misc,assignment]

__all__ = ["CONNECT_TIMEOUT_SECONDS", "DaskBackend", "DaskConnectionError", "close_connections",
           "run_chunk_task"]

log = logging.getLogger("amortune")
#: ``distributed.Client``, typed loosely (its constructor has no annotations).
Client: Any = distributed.Client

#: Seconds to wait for a scheduler given by address before giving up.
CONNECT_TIMEOUT_SECONDS = 10.0
#: A chunk whose pickled items are larger than this is scattered to a worker first instead of
#: travelling inside the task through the scheduler.
SCATTER_ITEMS_BYTES = 1 << 20
#: A function, initializer or environment whose pickle is larger than this is scattered to every
#: worker once (per token) and tasks refer to it; a smaller one travels inside each task, which
#: is cheaper than the scatter's round trip.
SCATTER_SHARED_BYTES = 32 << 10
#: Results larger than this are unpickled off the client's event loop.
OFFLOAD_RESULT_BYTES = 1 << 20
#: How long ``info()`` reuses what the scheduler said about its workers.
INFO_TTL_SECONDS = 0.5
#: Empty tasks sent in one burst to measure the per-task cost, and how often.
_PROBE_TASKS = 24
_PROBE_ROUNDS = 2
#: Per-task cost assumed until one was measured (no worker yet).
_DEFAULT_DISPATCH_SECONDS = 2e-3
#: Shared values (functions, environments, initializers) kept on the cluster per backend.
_SHARED_CACHE_SIZE = 32
#: Seconds ``shutdown`` gives the cluster to unregister plugins and a client of ours to close.
_CLOSE_TIMEOUT_SECONDS = 5.0

#: Variables that describe the worker's own machine: a caller's environment never replaces them.
_MACHINE_ENV = frozenset({
    "PATH", "HOME", "PWD", "OLDPWD", "USER", "LOGNAME", "SHELL", "HOSTNAME", "TERM", "DISPLAY",
    "TMPDIR", "TMP", "TEMP", "LD_LIBRARY_PATH", "LD_PRELOAD", "DYLD_LIBRARY_PATH", "PYTHONPATH",
    "PYTHONHOME", "PYTHONEXECUTABLE", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "MALLOC_TRIM_THRESHOLD_",
    *THREAD_ENV_VARS,
})
_MACHINE_ENV_PREFIXES = ("DASK_", "SLURM_", "PBS_", "LSB_", "SGE_", "KUBERNETES_", "SSH_", "XDG_",
                         "CONDA_", "JUPYTER", "MPLCONFIG")


class DaskConnectionError(AmortuneError, ConnectionError):
    """No Dask scheduler could be reached (an address that does not answer, or no client)."""


# -- what runs on a Dask worker ------------------------------------------------------------------


#: An exception as :func:`amortune._errors.capture` packs it.
Captured = tuple[bytes | None, str, str, int | None]


class _Reply(NamedTuple):
    """What a chunk task sends back: plain data only (the caller rebuilds exceptions)."""

    results: bytes
    wall_seconds: float
    cpu_seconds: float
    rss_bytes: int
    started: float
    finished: float
    first_call_seconds: float | None
    serde_seconds: float
    worker: str
    thread: int
    clock: str
    #: ``func``'s failure at item ``error_index`` (a ``capture`` tuple), after ``results``.
    error: Captured | None = None
    error_index: int | None = None
    #: A failure that is no item's: the function or the items could not be loaded, or the
    #: initializer raised; with a note saying which.
    fatal: Captured | None = None
    fatal_note: str = ""


_W_LOCK = threading.RLock()
_W_FUNCS: collections.OrderedDict[str, Any] = collections.OrderedDict()
_W_CALLED: set[str] = set()
#: Initializer token -> ``None`` once it ran, or its captured failure.
_W_INIT: dict[str, Captured | None] = {}
_W_STATE: dict[str, Any] = {"env": None, "base_env": None, "cap": None}
_W_THREADS: dict[int, int] = {}
_CLOCK: list[str] = []


def _clock_id() -> str:
    """Names this machine's ``perf_counter`` clock: equal ids mean comparable readings.

    On Linux ``perf_counter`` is ``CLOCK_MONOTONIC``, shared by every process of one boot.
    """
    if not _CLOCK:
        ident = ""
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                ident = f.read().strip()
        except OSError:
            pass
        _CLOCK.append(f"{socket.gethostname()}/{ident}")
    return _CLOCK[0]


def _machine_local(name: str) -> bool:
    return name in _MACHINE_ENV or name.startswith(_MACHINE_ENV_PREFIXES)


def _apply_env(pairs: Sequence[tuple[str, str]]) -> None:
    """Make this worker's environment the caller's, except for what describes this machine.

    Names the caller lacks fall back to the worker's own environment as it was before amortune
    first changed it; machine-local names (paths, devices, scheduler and batch-system variables,
    thread caps) always keep the worker's values.
    """
    base = _W_STATE["base_env"]
    if base is None:
        base = _W_STATE["base_env"] = dict(os.environ)
    wanted = dict(base)
    wanted.update((k, v) for k, v in pairs if not _machine_local(k))
    for name in list(os.environ):
        if name not in wanted and not _machine_local(name):
            del os.environ[name]
    for name, value in wanted.items():
        if not _machine_local(name) and os.environ.get(name) != value:
            os.environ[name] = value


def _prepare(init_token: str | None, init_payload: bytes | None, env_token: str | None,
             env_pairs: Sequence[tuple[str, str]] | None,
             thread_cap: int | None) -> tuple[Captured, str] | None:
    """Environment, thread cap and initializer, each applied only when it changed.

    Returns ``(captured failure, note)`` when the initializer failed in this process (now or
    before), else ``None``.
    """
    with _W_LOCK:
        if env_token is not None and env_pairs is not None and _W_STATE["env"] != env_token:
            _apply_env(env_pairs)
            _W_STATE["env"] = env_token
        if thread_cap and _W_STATE["cap"] != thread_cap:
            limit_native_threads(thread_cap)
            _W_STATE["cap"] = thread_cap
        if init_token is None:
            return None
        if init_token not in _W_INIT:
            if init_payload is None:  # cannot happen: the caller sends both or neither
                return None
            try:
                init, initargs = pickle.loads(init_payload)
                init(*initargs)
                _W_INIT[init_token] = None
            except BaseException as exc:  # noqa: B036 - reported with every chunk of this worker
                _W_INIT[init_token] = capture(exc, None)
        failed = _W_INIT[init_token]
    if failed is None:
        return None
    return failed, f"amortune: raised by the initializer in Dask worker {_worker_label()}"


def _worker_label() -> str:
    try:
        worker = distributed.get_worker()
    except ValueError:
        return f"pid {os.getpid()}"
    return f"{worker.name!r} ({worker.address})"


def _load_function(token: str, payload: bytes) -> Any:
    with _W_LOCK:
        func = _W_FUNCS.get(token)
        if func is not None:
            _W_FUNCS.move_to_end(token)
            return func
    func = pickle.loads(payload)
    with _W_LOCK:
        _W_FUNCS[token] = func
        while len(_W_FUNCS) > FUNC_CACHE_SIZE:
            _W_FUNCS.popitem(last=False)
    return func


def _where() -> tuple[str, int]:
    """(this worker's name, this executor thread's position among the worker's threads)."""
    try:
        worker = distributed.get_worker()
    except ValueError:  # called outside a Dask worker (directly, in a test)
        return "", 0
    ident = threading.get_ident()
    with _W_LOCK:
        index = _W_THREADS.setdefault(ident, len(_W_THREADS))
    return str(worker.name), index % max(1, worker.state.nthreads)


def run_chunk_task(fn_token: str, fn_payload: bytes, items: bytes, start: int, style: str,
                   init_token: str | None = None, init_payload: bytes | None = None,
                   env_token: str | None = None,
                   env_pairs: Sequence[tuple[str, str]] | None = None,
                   thread_cap: int | None = None) -> _Reply:
    """Run one chunk on a Dask worker; never raises for ``func``'s or the payloads' sake.

    ``fn_payload`` and ``items`` are pickles; the function is unpickled once per worker process
    and kept by ``fn_token`` (a large one arrives as a value scattered to every worker). Results
    are pickled here, so a result that cannot be pickled is reported as that item's error and
    what the cluster stores is sized exactly. The times cover the items and their pickling, not
    the set-up or the loading of the function (one-offs, as in a local worker).
    """
    started, cpu0 = time.perf_counter(), time.thread_time()
    worker, thread = _where()

    def reply(results: bytes = b"", serde: float = 0.0, first: float | None = None,
              **failure: Any) -> _Reply:
        finished = time.perf_counter()
        return _Reply(results, finished - started, time.thread_time() - cpu0, rss_bytes(),
                      started, finished, first, serde, worker, thread, _clock_id(), **failure)

    failed = _prepare(init_token, init_payload, env_token, env_pairs, thread_cap)
    if failed is not None:
        return reply(fatal=failed[0], fatal_note=failed[1])
    try:
        func = _load_function(fn_token, fn_payload)
    except BaseException as exc:  # noqa: B036
        return reply(fatal=capture(exc, None), fatal_note=(
            f"amortune: the function could not be loaded in Dask worker {_worker_label()} "
            "(is every module it needs installed there?)"))
    started, cpu0 = time.perf_counter(), time.thread_time()
    try:
        values = pickle.loads(items)
    except BaseException as exc:  # noqa: B036
        err = NotPicklableError(f"the items of the chunk starting at item {start} cannot be "
                                f"unpickled in the Dask worker: {exc!r}")
        err.__cause__ = exc
        return reply(fatal=capture(err, None), fatal_note="")
    serde = time.perf_counter() - started

    first: float | None = None
    if fn_token not in _W_CALLED and style != "chunk" and values:
        with _W_LOCK:
            _W_CALLED.add(fn_token)
        t1 = time.perf_counter()
        results, error = _run_items(func, values[:1], style)
        first = time.perf_counter() - t1
        if error is None:
            more, error = _run_items(func, values[1:], style)
            results.extend(more)
    else:
        _W_CALLED.add(fn_token)
        results, error = _run_items(func, values, style)

    t2 = time.perf_counter()
    try:
        body = dumps(results)
    except Exception as exc:
        bad = first_unpicklable(results, start)
        err = NotPicklableError(f"the result of item {bad} cannot be pickled: {exc}")
        error, results = err, results[:bad - start]
        body = dumps(results)
    serde += time.perf_counter() - t2
    if error is None:
        return reply(body, serde, first)
    index = start + len(results)
    return reply(body, serde, first, error=capture(error, index), error_index=index)


def _noop() -> None:
    """The empty task used to measure what one task costs."""


class _SetupPlugin(WorkerPlugin):
    """Runs a call's initializer once in each worker process, as soon as the worker has it."""

    def __init__(self, init_token: str, init_payload: bytes, env_token: str | None,
                 env_pairs: Sequence[tuple[str, str]] | None, thread_cap: int | None) -> None:
        self.args = (init_token, init_payload, env_token, env_pairs, thread_cap)

    async def setup(self, worker: Any) -> None:
        # In a thread: a slow initializer (a model load) must not stall the worker's event loop.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _prepare, *self.args)


# -- the caller's side ---------------------------------------------------------------------------


class _DaskChunkFuture(ChunkFuture):
    """A chunk's future; cancelling it cancels its Dask task (which then never starts)."""

    dask_future: Any = None


class _Running(NamedTuple):
    future: Any
    chunk: _DaskChunkFuture
    indices: tuple[int, ...]
    items_ref: Any


#: Measured per-task cost by client, so backends made again for one client do not re-measure.
_DISPATCH: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
_LOST_TYPES: tuple[type[BaseException], ...] = (distributed.KilledWorker, CommClosedError)


#: Clients this module connected, by (address, security), with how many backends use each: the
#: backends of one address share one connection, closed when the last of them shuts down (or by
#: :func:`close_connections`, or at exit).
_CONNECTIONS: dict[tuple[str, int], list[Any]] = {}
_CONNECTIONS_LOCK = threading.Lock()


def _acquire_client(address: str, timeout: float, security: Any) -> Any:
    key = (address, id(security) if security is not None else 0)
    with _CONNECTIONS_LOCK:
        entry = _CONNECTIONS.get(key)
        if entry is not None and entry[0].status == "running":
            entry[1] += 1
            return entry[0]
        client = _connect(address, timeout, security)
        if entry is not None:
            _close_quietly(entry[0])
        _CONNECTIONS[key] = [client, 1, security]  # holding security keeps its id unique
        return client


def _release_client(client: Any) -> None:
    with _CONNECTIONS_LOCK:
        for key, entry in list(_CONNECTIONS.items()):
            if entry[0] is client:
                entry[1] -= 1
                if entry[1] > 0:
                    return
                del _CONNECTIONS[key]
                break
    _close_quietly(client)


def close_connections() -> None:
    """Close every client this module connected to a scheduler address (at exit, too).

    Backends still using one fail their next chunk; a client passed in is never touched.
    """
    with _CONNECTIONS_LOCK:
        clients = [entry[0] for entry in _CONNECTIONS.values()]
        _CONNECTIONS.clear()
    for client in clients:
        _close_quietly(client)


def _close_quietly(client: Any) -> None:
    try:
        client.close(timeout=_CLOSE_TIMEOUT_SECONDS)
    except Exception:
        pass


atexit.register(close_connections)


def _connect(address: str, timeout: float, security: Any) -> Any:
    try:
        return Client(address, timeout=timeout, security=security, set_as_default=False)
    except Exception as exc:
        _stop_half_made_client(exc)
        if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError)):
            hint = "check the address, that the scheduler runs and that this machine may reach it"
        elif address.startswith("tls://"):
            hint = ("a tls:// address needs a security configuration: pass security="
                    "distributed.security.Security(...) or set Dask's distributed.comm.tls options")
        else:
            hint = "check the address"
        raise DaskConnectionError(f"could not connect to the Dask scheduler at {address} "
                                  f"within {timeout:g} s ({exc}); {hint}") from exc


def _stop_half_made_client(exc: BaseException) -> None:
    """A client whose first connection failed keeps its event-loop thread running: stop it."""
    tb = exc.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, Client):
            runner = getattr(obj, "_loop_runner", None)
            try:
                obj.close(timeout=1)
                if runner is not None:
                    runner.stop()
            except Exception:
                pass
            return
        tb = tb.tb_next


def _sort_key(name: Any) -> tuple[int, int, str]:
    text = str(name)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


class DaskBackend(Backend):
    """Chunks as tasks on a Dask cluster; one slot per worker thread.

    Parameters
    ----------
    client:
        A ``distributed.Client`` (used, never closed), a scheduler address such as
        ``"tcp://host:8786"`` or ``"tls://host:8786"``, or a ``distributed`` cluster object
        (``LocalCluster``, a dask-jobqueue or Kubernetes cluster), or ``None`` for the active
        client. For an address or a cluster this module connects a client of its own (within
        ``connect_timeout`` seconds), shared by the backends of that address and closed when
        the last of them shuts down, by :func:`close_connections`, or at exit.
    n_jobs:
        At most this many slots (``None``: every worker thread).
    resources:
        Dask resources each chunk needs, such as ``{"GPU": 1}``; slots then follow how many
        chunks each worker can hold at once. ``gpu=True`` is ``{"GPU": 1}``.
    security:
        A ``distributed.security.Security`` for an address (default: Dask's configuration).
    """

    name = "dask"

    def __init__(self, client: Any = None, *, n_jobs: int | None = None,
                 resources: Mapping[str, float] | None = None, gpu: bool = False,
                 connect_timeout: float = CONNECT_TIMEOUT_SECONDS, security: Any = None) -> None:
        if n_jobs is not None and n_jobs < 1:
            raise ValueError(f"n_jobs must be >= 1 or None, got {n_jobs!r}")
        self._owns_client = False
        if client is None:
            try:
                client = Client.current()
            except ValueError:
                raise DaskConnectionError(
                    "backend='dask' needs a running distributed.Client in this process (create "
                    "one with distributed.Client(address)), or pass the client or the "
                    "scheduler's address as backend=") from None
        elif isinstance(client, str):
            client = _acquire_client(client, connect_timeout, security)
            self._owns_client = True
        elif isinstance(client, Cluster):
            client = _acquire_client(client.scheduler_address, connect_timeout,
                                     security or getattr(client, "security", None))
            self._owns_client = True
        elif not isinstance(client, Client):
            raise TypeError(f"expected a distributed.Client, a scheduler address or None, got "
                            f"{type(client).__name__}")
        if client.asynchronous:
            raise AmortuneError("the Dask backend needs a synchronous distributed.Client "
                                "(asynchronous=False)")
        self.client: Any = client
        self.address = str(getattr(client.scheduler, "address", "") or "")
        res = dict(resources or {})
        if gpu:
            res.setdefault("GPU", 1)
        self._resources: dict[str, float] | None = res or None
        self._n_jobs = n_jobs
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}
        self._shared: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._plugins: set[str] = set()
        self._slot_ids: dict[tuple[str, int], int] = {}
        self._info: BackendInfo | None = None
        self._info_at = 0.0
        self._closed = False

    # -- info -----------------------------------------------------------------------------------
    def info(self) -> BackendInfo:
        """Slots from the scheduler's worker list (cached briefly) and the measured task cost."""
        with self._lock:
            if self._info is not None and time.monotonic() - self._info_at < INFO_TTL_SECONDS:
                return self._info
        workers = self._workers()
        slots = self._slots(workers)
        dispatch = self._dispatch_seconds() if workers else _DEFAULT_DISPATCH_SECONDS
        threads = sum(int(w.get("nthreads", 0) or 0) for w in workers.values())
        ready = len(slots)
        memory = [s.memory_bytes for s in slots if s.memory_bytes]
        reason = (f"Dask scheduler {self.address}: {len(workers)} worker(s), {threads} thread(s)"
                  + (f", {ready} slot(s) with resources {self._resources}" if self._resources
                     else "")
                  + (f", {min(memory) / 2**30:.1f} GiB of worker memory per slot" if memory
                     else "")
                  + f"; {dispatch * 1e3:.1f} ms per task")
        if not slots:  # a cluster still waiting for workers: chunks queue until one arrives
            slots = [Slot(0)]
            reason += "; no worker yet, chunks wait on the scheduler"
        info = BackendInfo(name=self.name, slots=tuple(slots), start_seconds=0.0,
                           per_slot_start_seconds=0.0, dispatch_seconds=dispatch,
                           can_interrupt=False, in_caller=False, ready_slots=ready,
                           start_reason=reason)
        with self._lock:
            self._info, self._info_at = info, time.monotonic()
        return info

    def capacity(self) -> int:
        return self.info().n_slots

    def ready(self) -> bool:
        return self.info().ready_slots > 0

    def _workers(self) -> dict[str, dict[str, Any]]:
        try:
            info = self.client.scheduler_info(n_workers=-1)  # every worker, not the first few
        except TypeError:  # a distributed that lists every worker anyway
            info = self.client.scheduler_info()
        return dict(info.get("workers", {}))

    def _slots(self, workers: Mapping[str, Mapping[str, Any]]) -> list[Slot]:
        slots: list[Slot] = []
        ordered = sorted(workers.values(), key=lambda w: _sort_key(w.get("name")))
        with self._lock:
            for w in ordered:
                name = str(w.get("name"))
                nthreads = max(1, int(w.get("nthreads", 1) or 1))
                limit = int(w.get("memory_limit") or 0)
                count, devices = nthreads, False
                if self._resources:
                    have = w.get("resources") or {}
                    count = min([nthreads] + [int(have.get(r, 0) // need) if need > 0 else nthreads
                                              for r, need in self._resources.items()])
                    devices = "GPU" in self._resources
                for k in range(count):
                    slot_id = self._slot_ids.setdefault((name, k), len(self._slot_ids))
                    slots.append(Slot(slot_id, devices=(str(k),) if devices else (),
                                      memory_bytes=limit // count if limit > 0 else None))
        slots.sort(key=lambda s: s.id)
        if self._n_jobs is not None:
            slots = slots[:self._n_jobs]
        return slots

    def _slot(self, worker: str, thread: int) -> int:
        with self._lock:
            return self._slot_ids.setdefault((worker, thread), len(self._slot_ids))

    def _dispatch_seconds(self) -> float:
        """Seconds one task costs end to end when tasks are streamed: measured once per client.

        Bursts of a few and of more empty tasks: the difference per extra task is the cost of
        one more task in a stream of them, without the fixed latency of the client's message
        batching (which a stream of chunks shares). The better of two rounds.
        """
        cached = _DISPATCH.get(self.client)
        if cached is not None:
            return cached
        client = self.client
        client.submit(_noop, pure=False).result()  # first use: imports this module on a worker

        def burst(n: int) -> float:
            t0 = time.perf_counter()
            client.gather([client.submit(_noop, pure=False) for _ in range(n)])
            return time.perf_counter() - t0

        small, large = _PROBE_TASKS // 4, _PROBE_TASKS
        best = float("inf")
        for _ in range(_PROBE_ROUNDS):
            few, many = burst(small), burst(large)
            per_task = (many - few) / (large - small)
            best = min(best, max(per_task, many / large / 4))  # noise cannot make it ~0
        best = min(best, 0.1)
        _DISPATCH[client] = best
        return best

    # -- submit ---------------------------------------------------------------------------------
    def submit(self, task: ChunkTask) -> Future[ChunkOutcome]:
        """Send ``task`` as one Dask task; its future settles when that task is done."""
        if task.style not in STYLES:
            raise ValueError(f"unknown call style {task.style!r}; expected one of {STYLES}")
        if self._closed:
            raise RuntimeError("cannot submit to a Dask backend that is shut down")
        if task.timeout_seconds is not None:
            return failed(AmortuneError(
                "timeout= needs a backend that can stop an item midway; a Dask task cannot be "
                "stopped once it runs (use the local processes backend for timeouts)"))
        try:
            fn_payload, fn_token = task.fn.payload, task.fn.token
        except Exception as exc:
            return failed(NotPicklableError(
                f"the function {task.fn.func!r} cannot be pickled to send it to Dask: {exc}"))
        try:
            items = dumps(task.items)
        except Exception as exc:
            bad = first_unpicklable(task.items, task.start)
            err = NotPicklableError(f"item {bad} cannot be pickled to send it to Dask: {exc}")
            note_item(err, bad)
            return failed(err)
        try:
            setup_args = self._setup_args(task.setup)
            fn_ref = self._share("fn", fn_token, fn_payload)
            items_ref: Any = None
            if len(items) > SCATTER_ITEMS_BYTES:
                items_ref = self.client.scatter(items, hash=False)
            key = f"amortune-chunk-{uuid.uuid4().hex}"
            dask_future = self.client.submit(
                run_chunk_task, fn_token, fn_ref, items if items_ref is None else items_ref,
                task.start, task.style, *setup_args, key=key, pure=False,
                resources=self._resources)
        except Exception as exc:
            if self._lost(exc):
                return failed(self._crashed(exc, task.indices))
            raise
        chunk = _DaskChunkFuture(self._cancel)
        chunk.dask_future = dask_future
        chunk.set_running_or_notify_cancel()  # sent: cancel() now goes through the hook
        with self._lock:
            self._running[key] = _Running(dask_future, chunk, task.indices, items_ref)
        # The Dask future's completion is awaited on the client's event loop, so chunks that
        # finish together are gathered together rather than one blocking call after another.
        self.client.loop.add_callback(self._collect, key, task.start)
        return chunk

    def _share(self, kind: str, token: str, value: Any, size: int | None = None) -> Any:
        """``value`` itself when small, else a future of it on every worker, scattered once
        per token by this backend (the worker receives the value either way)."""
        if size is None:
            size = len(value) if isinstance(value, bytes) else len(dumps(value))
        if size <= SCATTER_SHARED_BYTES:
            return value
        name = f"{kind}:{token}"
        with self._lock:
            ref = self._shared.get(name)
            if ref is not None and ref.status == "finished":
                self._shared.move_to_end(name)
                return ref
        ref = self.client.scatter([value], broadcast=True, hash=False)[0]  # a list: one value
        evicted = []
        with self._lock:
            self._shared[name] = ref
            while len(self._shared) > _SHARED_CACHE_SIZE:
                evicted.append(self._shared.popitem(last=False)[1])
        for old in evicted:  # tasks still waiting on one keep it on the cluster until they ran
            old.release()
        return ref

    def _setup_args(self, setup: WorkerSetup | None) -> tuple[Any, ...]:
        if setup is None:
            return (None, None, None, None, None)
        env_token = setup.env_token
        env_ref = None
        if env_token is not None and setup.env is not None:
            size = sum(len(k) + len(v) + 8 for k, v in setup.env)
            env_ref = self._share("env", env_token, setup.env, size)
        init_token = setup.init_token
        init_ref = None
        if init_token is not None:
            init_ref = self._share("init", init_token, setup.init_payload)
            self._register_setup(init_token, setup)
        return (init_token, init_ref, env_token, env_ref, setup.thread_cap)

    def _register_setup(self, init_token: str, setup: WorkerSetup) -> None:
        """Install the initializer as a worker plugin: it runs in every worker, also in those
        that start later, before their first chunk. Each task checks again, so a worker that
        missed the plugin still runs the initializer first, and never twice."""
        name = f"amortune-setup-{init_token}"
        with self._lock:
            if name in self._plugins:
                return
            self._plugins.add(name)
        plugin = _SetupPlugin(init_token, setup.init_payload, setup.env_token, setup.env,
                              setup.thread_cap)
        register = (getattr(self.client, "register_plugin", None)
                    or self.client.register_worker_plugin)
        try:
            register(plugin, name=name)
        except Exception as exc:  # the tasks run the initializer themselves
            log.debug("amortune: could not register the worker set-up plugin: %r", exc)

    # -- completion -----------------------------------------------------------------------------
    async def _collect(self, key: str, start: int) -> None:
        """On the client's event loop: await the chunk's task, gather it, release it, settle."""
        with self._lock:
            running = self._running.get(key)
        if running is None:
            return
        chunk, dask_future = running.chunk, running.future
        try:
            try:
                reply = await dask_future
            except asyncio.CancelledError:  # the loop itself is stopping (the client closes)
                settle(chunk, self._failure(CancelledError(), chunk, running.indices))
                raise
            except BaseException as exc:  # noqa: B036 - every kind of failure settles the chunk
                settle(chunk, self._failure(exc, chunk, running.indices))
                return
            if chunk.done():
                return
            try:
                if len(reply.results) > OFFLOAD_RESULT_BYTES:
                    outcome = await offload(self._outcome, reply, start)
                else:
                    outcome = self._outcome(reply, start)
            except BaseException as exc:  # noqa: B036
                settle(chunk, exc)
                return
            if isinstance(outcome, BaseException):
                settle(chunk, outcome)
            else:
                settle(chunk, result=outcome)
        finally:
            with self._lock:
                self._running.pop(key, None)
            for ref in (dask_future, running.items_ref):
                if ref is not None:
                    try:
                        ref.release()
                    except Exception:
                        pass

    def _outcome(self, reply: _Reply, start: int) -> ChunkOutcome | BaseException:
        if reply.fatal is not None:
            exc = rebuild(reply.fatal)
            if reply.fatal_note:
                add_note(exc, reply.fatal_note)
            return exc
        results = pickle.loads(reply.results) if reply.results else []
        error: BaseException | None = None
        if reply.error is not None:
            error = rebuild(reply.error)
            note_item(error, start + len(results) if reply.error_index is None
                      else reply.error_index)
        same_clock = reply.clock == _clock_id()
        return ChunkOutcome(
            results, reply.wall_seconds, reply.cpu_seconds, reply.rss_bytes,
            self._slot(reply.worker, reply.thread),
            reply.started if same_clock else 0.0, reply.finished if same_clock else 0.0,
            reply.first_call_seconds, error, reply.serde_seconds)

    def _failure(self, exc: BaseException, chunk: _DaskChunkFuture,
                 indices: tuple[int, ...]) -> BaseException:
        if isinstance(exc, CancelledError) and (chunk.cancel_requested or self._closed):
            return CancelledError()
        if self._lost(exc):
            return self._crashed(exc, indices)
        if isinstance(exc, ImportError) and "amortune" in str(exc):
            add_note(exc, "amortune: install amortune on every Dask worker (the same version "
                          "as here)")
        return exc

    def _lost(self, exc: BaseException) -> bool:
        return isinstance(exc, (*_LOST_TYPES, FutureCancelledError, OSError))

    def _crashed(self, exc: BaseException, indices: tuple[int, ...]) -> WorkerCrashedError:
        if isinstance(exc, distributed.KilledWorker):
            what = (f"the Dask task ran on workers that died ({exc}); the last was "
                    f"{getattr(exc, 'last_worker', None)!r}")
        elif isinstance(exc, FutureCancelledError):
            what = f"the Dask scheduler dropped the task ({exc.reason})"
        else:
            what = f"the connection to the Dask cluster failed ({exc!r})"
        err = WorkerCrashedError(f"the chunk of {describe_indices(indices)} was lost: {what}",
                                 indices=indices)
        err.__cause__ = exc
        return err

    def is_lost(self, exc: BaseException) -> bool:
        """True for dead workers and dropped connections (the chunk may run again)."""
        return super().is_lost(exc) or isinstance(exc, _LOST_TYPES)

    # -- cancel and shutdown --------------------------------------------------------------------
    def _cancel(self, chunk: ChunkFuture) -> None:
        """``on_cancel``: cancel the chunk's Dask task; its awaiting settles the chunk."""
        dask_future = getattr(chunk, "dask_future", None)
        if dask_future is None:
            return
        try:  # from any thread, without waiting (the hook may run on the event loop itself)
            self.client.loop.add_callback(self.client.cancel, [dask_future])
        except Exception as exc:  # the client is gone: nothing will settle it but us
            settle(chunk, CancelledError(f"cancelled ({exc!r})"))

    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        """Stop using the cluster: after outstanding chunks (default), or cancelling them (kill).

        Releases what this backend put on the cluster and unregisters its initializer plugins.
        A client passed in stays open; one this backend connected itself is closed.
        """
        with self._lock:
            already = self._closed
            self._closed = True
            running = list(self._running.values())
        if kill and running:
            for r in running:
                r.chunk.cancel_requested = True
            try:
                self.client.cancel([r.future for r in running], force=True)
            except Exception:
                pass
            for r in running:
                settle(r.chunk, CancelledError("the Dask backend was shut down"))
        elif wait and running:
            wait_futures([r.chunk for r in running])
        if already:
            return
        with self._lock:
            shared = list(self._shared.values())
            self._shared.clear()
            plugins = sorted(self._plugins)
        for ref in shared:
            try:
                ref.release()
            except Exception:
                pass
        for name in plugins:
            try:
                self.client.unregister_worker_plugin(name)
            except Exception:
                pass
        if self._owns_client:
            _release_client(self.client)

    def __repr__(self) -> str:
        return f"DaskBackend({self.address or self.client!r})"


# -- registry ------------------------------------------------------------------------------------


def _factory(n_jobs: int | None, config: Any) -> DaskBackend:
    return DaskBackend(None, n_jobs=n_jobs)


def _recognise(obj: Any, n_jobs: int | None, config: Any) -> DaskBackend | None:
    if isinstance(obj, (Client, Cluster)):
        return DaskBackend(obj, n_jobs=n_jobs)
    if isinstance(obj, str) and obj.startswith(("tcp://", "tls://")):
        return DaskBackend(obj, n_jobs=n_jobs)
    return None


register_backend("dask", _factory, _recognise)
