"""The process-wide warm pool: one reusable :class:`ProcessBackend`, owned by this process.

Later calls reuse its workers, so only the first call pays for start-up. A forked child forgets
the registry it inherited (``os.register_at_fork``) and never touches its parent's workers; it
starts a pool of its own if it needs one. At exit, idle workers are stopped and busy ones killed.
Imports the standard library and :mod:`.processes` only.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._base import ChunkTask, WorkerSetup
from .processes import LIVE, ProcessBackend

if TYPE_CHECKING:
    from .._prefork import Forked

__all__ = ["discard_warm_pool", "get_warm_pool", "peek_warm_pool", "shutdown_warm_pools"]

_WARM: dict[str | None, ProcessBackend] = {}
_LOCK = threading.Lock()


def get_warm_pool(n_workers: int, start_method: str | None, *, thread_cap: int | None = None,
                  memory_growth_bytes: int | None = None,
                  adopt: Sequence[tuple[Forked, ChunkTask]] = ()) -> ProcessBackend:
    """The reusable pool for ``start_method``, started or grown to ``n_workers``.

    ``adopt``: workers already forked with their first chunks (``_prefork``) become the new
    pool's first workers; a pool that was alive is then stopped after its queued work.
    """
    with _LOCK:
        pool = _WARM.get(start_method)
        if adopt and pool is not None:
            pool.shutdown(wait=False)
            pool = None
        if pool is not None and pool.alive and not pool.has_initializer:
            pool._mgr.growth_limit = memory_growth_bytes  # type: ignore[attr-defined]
            pool.resize(n_workers)
            return pool
        if pool is not None:
            pool.shutdown(wait=False, kill=True)
        pool = ProcessBackend(n_workers, start_method=start_method,
                              setup=WorkerSetup(thread_cap=thread_cap),
                              memory_growth_bytes=memory_growth_bytes, adopt=adopt)
        _WARM[start_method] = pool
        return pool


def peek_warm_pool(start_method: str | None) -> ProcessBackend | None:
    """The warm pool for ``start_method`` if one is alive, without starting anything."""
    pool = _WARM.get(start_method)
    return pool if pool is not None and pool.alive else None


def all_warm_pools() -> list[ProcessBackend]:
    return list(_WARM.values())


def shutdown_warm_pools(kill: bool = False) -> None:
    """Stop every warm pool after its queued work (tests call it to check nothing leaks)."""
    with _LOCK:
        pools = list(_WARM.values())
        _WARM.clear()
    for pool in pools:
        pool.shutdown(wait=True, kill=kill)


def discard_warm_pool(pool: ProcessBackend) -> None:
    """Forget ``pool`` as the warm pool so the next call starts afresh."""
    with _LOCK:
        for key, value in list(_WARM.items()):
            if value is pool:
                del _WARM[key]


def _forget_in_child() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # it may have been held by another thread at the fork
    _WARM.clear()
    LIVE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _at_exit() -> None:
    # Registered after multiprocessing's own exit handler, so it runs first. Results of busy
    # workers can no longer be waited for: kill those, let idle ones exit cleanly. The pools are
    # held here first: LIVE holds them weakly, and clearing the registry could free a warm pool
    # unstopped, its manager thread still replacing the workers multiprocessing's handler kills
    # next (a spawn cut short by the exit prints "EOFError: Ran out of input").
    pools = list(LIVE)
    with _LOCK:
        _WARM.clear()
    for pool in pools:
        pool.abandon_at_exit()
