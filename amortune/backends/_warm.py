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

__all__ = ["discard_warm_pool", "exit_before_multiprocessing", "get_warm_pool", "peek_warm_pool", "shutdown_warm_pools"]

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
    # Runs before multiprocessing's own exit handler (see ``exit_before_multiprocessing``), and
    # again, doing nothing, if that one runs first. Results of busy
    # workers can no longer be waited for: kill those, let idle ones exit cleanly. The pools are
    # held here first: LIVE holds them weakly, and clearing the registry could free a warm pool
    # unstopped, its manager thread still replacing the workers multiprocessing's handler kills
    # next (a spawn cut short by the exit prints "EOFError: Ran out of input").
    pools = list(LIVE)
    with _LOCK:
        _WARM.clear()
    for pool in pools:
        pool.abandon_at_exit()


_EXIT_ORDERED = False


def exit_before_multiprocessing() -> None:
    """Have ``multiprocessing``'s exit handler stop amortune's pools before it stops children.

    Exit handlers run last registered first, and amortune may be imported before
    ``multiprocessing`` (a fresh script's first workers fork without it), or
    ``multiprocessing.get_logger()`` may register its handler again later. Run first, that
    handler terminates the workers it started and joins every child while the manager thread,
    not stopped yet, starts replacements: the join waited on one forever. Its finalizers of
    priority 0 and up run before it touches a child, so the pools are stopped as one of them.
    Called before a ``multiprocessing`` worker starts; cheap after the first call.
    """
    global _EXIT_ORDERED
    if _EXIT_ORDERED:
        return
    from multiprocessing import util

    util.Finalize(None, _at_exit, exitpriority=100)
    _EXIT_ORDERED = True
