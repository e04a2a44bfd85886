"""Chunks on a Dask cluster: the same plans, with ``distributed`` worker threads as the slots.

``backend="dask"`` (the active ``distributed.Client``), ``backend=client``, a cluster object, or
``backend="tcp://host:8786"`` / ``"tls://..."`` (a client of amortune's own, shared per
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

``distributed`` is imported in this package and nowhere else; the registry imports it only when
a Dask backend is asked for. Workers must be able to import ``amortune``.
"""

from __future__ import annotations

from typing import Any

from distributed.deploy.cluster import Cluster

from .. import register_backend
from ._backend import OFFLOAD_RESULT_BYTES as OFFLOAD_RESULT_BYTES
from ._backend import DaskBackend
from ._cluster import INFO_TTL_SECONDS as INFO_TTL_SECONDS
from ._connect import _CONNECTIONS as _CONNECTIONS
from ._connect import CONNECT_TIMEOUT_SECONDS, Client, DaskConnectionError, close_connections
from ._scatter import SCATTER_ITEMS_BYTES as SCATTER_ITEMS_BYTES
from ._scatter import SCATTER_SHARED_BYTES as SCATTER_SHARED_BYTES
from ._task import run_chunk_task

__all__ = ["CONNECT_TIMEOUT_SECONDS", "DaskBackend", "DaskConnectionError", "close_connections",
           "run_chunk_task"]


def _factory(n_jobs: int | None, config: Any) -> DaskBackend:
    return DaskBackend(None, n_jobs=n_jobs)


def _recognise(obj: Any, n_jobs: int | None, config: Any) -> DaskBackend | None:
    if isinstance(obj, (Client, Cluster)):
        return DaskBackend(obj, n_jobs=n_jobs)
    if isinstance(obj, str) and obj.startswith(("tcp://", "tls://")):
        return DaskBackend(obj, n_jobs=n_jobs)
    return None


register_backend("dask", _factory, _recognise)
