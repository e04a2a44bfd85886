"""The caller's side: :class:`DaskBackend` sends chunks as tasks and settles their futures."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import CancelledError, Future
from concurrent.futures import wait as wait_futures
from typing import Any, NamedTuple

import distributed
from distributed.comm.core import CommClosedError
from distributed.utils import offload

from ..._errors import (
    AmortuneError,
    NotPicklableError,
    WorkerCrashedError,
    describe_indices,
    rebuild,
)
from ..._serde import add_note, dumps, first_unpicklable, note_item
from .._base import (
    STYLES,
    Backend,
    BackendInfo,
    ChunkFuture,
    ChunkOutcome,
    ChunkTask,
    Slot,
    failed,
    settle,
)
from ._cluster import (
    _DEFAULT_DISPATCH_SECONDS,
    INFO_TTL_SECONDS,
    _dispatch_seconds,
    _slots,
    _workers,
)
from ._connect import CONNECT_TIMEOUT_SECONDS, _release_client, _resolve_client
from ._scatter import _scatter_items, _Shared
from ._task import _clock_id, _Reply, run_chunk_task

try:
    from distributed.client import FutureCancelledError
except ImportError:  # older distributed: a cancelled future raises the plain CancelledError
    FutureCancelledError = CancelledError  # type: ignore[misc,assignment]

#: Results larger than this are unpickled off the client's event loop.
OFFLOAD_RESULT_BYTES = 1 << 20

_LOST_TYPES: tuple[type[BaseException], ...] = (distributed.KilledWorker, CommClosedError)


class _DaskChunkFuture(ChunkFuture):
    """A chunk's future; cancelling it cancels its Dask task (which then never starts)."""

    dask_future: Any = None


class _Running(NamedTuple):
    future: Any
    chunk: _DaskChunkFuture
    indices: tuple[int, ...]
    items_ref: Any


class DaskBackend(Backend):
    """Chunks as tasks on a Dask cluster; one slot per worker thread.

    Parameters
    ----------
    client:
        A ``distributed.Client`` (used, never closed), a scheduler address such as
        ``"tcp://host:8786"`` or ``"tls://host:8786"``, or a ``distributed`` cluster object
        (``LocalCluster``, a dask-jobqueue or Kubernetes cluster), or ``None`` for the active
        client. For an address or a cluster amortune connects a client of its own (within
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
        client, self._owns_client = _resolve_client(client, connect_timeout, security)
        self.client: Any = client
        self.address = str(getattr(client.scheduler, "address", "") or "")
        res = dict(resources or {})
        if gpu:
            res.setdefault("GPU", 1)
        self._resources: dict[str, float] | None = res or None
        self._n_jobs = n_jobs
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}
        self._shared = _Shared(client, self._lock)
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
        workers = _workers(self.client)
        slots = _slots(workers, self._resources, self._n_jobs, self._slot_ids, self._lock)
        dispatch = _dispatch_seconds(self.client) if workers else _DEFAULT_DISPATCH_SECONDS
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

    def _slot(self, worker: str, thread: int) -> int:
        with self._lock:
            return self._slot_ids.setdefault((worker, thread), len(self._slot_ids))

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
            setup_args = self._shared.setup_args(task.setup)
            fn_ref = self._shared.share("fn", fn_token, fn_payload)
            items_ref = _scatter_items(self.client, items)
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
        self._shared.release()
        if self._owns_client:
            _release_client(self.client)

    def __repr__(self) -> str:
        return f"DaskBackend({self.address or self.client!r})"
