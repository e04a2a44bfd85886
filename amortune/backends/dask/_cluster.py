"""What a Dask cluster offers: slots from the scheduler's worker list, and what a task costs."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from .._base import Slot
from ._task import _noop

#: How long ``info()`` reuses what the scheduler said about its workers.
INFO_TTL_SECONDS = 0.5
#: Empty tasks sent in one burst to measure the per-task cost, and how often.
_PROBE_TASKS = 24
_PROBE_ROUNDS = 2
#: Per-task cost assumed until one was measured (no worker yet).
_DEFAULT_DISPATCH_SECONDS = 2e-3

#: Measured per-task cost by client, so backends made again for one client do not re-measure.
_DISPATCH: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def _sort_key(name: Any) -> tuple[int, int, str]:
    text = str(name)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _workers(client: Any) -> dict[str, dict[str, Any]]:
    try:
        info = client.scheduler_info(n_workers=-1)  # every worker, not the first few
    except TypeError:  # a distributed that lists every worker anyway
        info = client.scheduler_info()
    return dict(info.get("workers", {}))


def _slots(workers: Mapping[str, Mapping[str, Any]], resources: Mapping[str, float] | None,
           n_jobs: int | None, slot_ids: dict[tuple[str, int], int],
           lock: threading.Lock) -> list[Slot]:
    """One slot per worker thread (or per chunk a worker's resources hold), at most ``n_jobs``.

    ``slot_ids`` keeps each (worker, thread) on the same slot id from call to call; ``lock``
    guards it.
    """
    slots: list[Slot] = []
    ordered = sorted(workers.values(), key=lambda w: _sort_key(w.get("name")))
    with lock:
        for w in ordered:
            name = str(w.get("name"))
            nthreads = max(1, int(w.get("nthreads", 1) or 1))
            limit = int(w.get("memory_limit") or 0)
            count, devices = nthreads, False
            if resources:
                have = w.get("resources") or {}
                count = min([nthreads] + [int(have.get(r, 0) // need) if need > 0 else nthreads
                                          for r, need in resources.items()])
                devices = "GPU" in resources
            for k in range(count):
                slot_id = slot_ids.setdefault((name, k), len(slot_ids))
                slots.append(Slot(slot_id, devices=(str(k),) if devices else (),
                                  memory_bytes=limit // count if limit > 0 else None))
    slots.sort(key=lambda s: s.id)
    if n_jobs is not None:
        slots = slots[:n_jobs]
    return slots


def _dispatch_seconds(client: Any) -> float:
    """Seconds one task costs a worker when tasks are streamed: measured once per client.

    Two figures, the larger wins. Bursts of a few and of more empty tasks: the difference per
    extra task is the cost of one more task in a stream of them. And half the round trip of a
    single task: the scheduler keeps queued tasks until a worker has a free thread, so between
    two chunks a worker waits for its "done" to reach the scheduler and the next task to come
    back, about half of a whole round trip. The better of two rounds each.
    """
    cached = _DISPATCH.get(client)
    if cached is not None:
        return cached
    client.submit(_noop, pure=False).result()  # first use: imports this package on a worker

    def burst(n: int) -> float:
        t0 = time.perf_counter()
        client.gather([client.submit(_noop, pure=False) for _ in range(n)])
        return time.perf_counter() - t0

    small, large = _PROBE_TASKS // 4, _PROBE_TASKS
    best = gap = float("inf")
    for _ in range(_PROBE_ROUNDS):
        few, many = burst(small), burst(large)
        per_task = (many - few) / (large - small)
        best = min(best, max(per_task, many / large / 4))  # noise cannot make it ~0
        gap = min(gap, burst(1) / 2)
    best = min(max(best, gap), 0.1)
    _DISPATCH[client] = best
    return best
