"""Workers forked before the engine is imported, each holding its first chunk.

In a fresh process a parallel map would pay the engine's imports (~15 ms: futures, the manager,
the scheduler) before any worker starts. Here the first workers fork with only the worker's own
code loaded, each inheriting its first chunk and the function in memory (a fork copies them: no
function is sent, no chunk waits in a pipe), so they compute while the caller imports the engine
and plans; the warm pool then adopts them (``Manager.fork_initial``) as if it had started them and
sent those chunks. Imports the standard library, ``_protocol``, ``_serde``, ``_serve`` and
``_start``.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ._protocol import TASK_IDS, Run
from ._serde import digest, dumps, dumps_function
from ._serve import load_prctl, worker_main
from ._start import choose_start

__all__ = ["Forked", "PreForked", "abandon", "fork_with_chunks"]


class Forked(NamedTuple):
    """One forked worker and the chunk it runs first."""

    process: Any
    conn: Any
    task_id: int
    start: int
    items: list[Any]
    payload: bytes  # the items pickled: what sending the chunk elsewhere takes
    started: float  # perf_counter() just before the fork


class PreForked(NamedTuple):
    """Workers forked with their first chunks, and the function as every later worker gets it."""

    func_payload: bytes
    token: str
    workers: list[Forked]


def fork_with_chunks(func: Callable[..., Any], chunks: Sequence[tuple[int, list[Any]]], *,
                     thread_cap: int | None, growth_limit: int | None) -> PreForked | None:
    """Fork one worker per chunk, ``(start, items)``, each running its chunk at once.

    ``None`` when forking is not safe here (another thread, CUDA, a start method the user chose)
    or ``func`` cannot be pickled for the workers started later; a chunk whose items cannot be
    pickled, and every chunk after it, gets no worker (the planner meets the problem).

    ``func`` is pickled first, and one that cannot be pickled forks nothing: it never runs in a
    worker (what makes it unpicklable, an open file, a socket, a lock, is what a child must not
    share), and no item runs twice.
    """
    if choose_start(None).first != "fork" or multiprocessing.current_process().daemon:
        return None
    try:
        func_payload = dumps_function(func)
    except Exception:
        return None
    token = digest(func_payload)
    ctx = multiprocessing.get_context("fork")
    load_prctl()  # loaded once, here: the children need no import to die with this process
    workers: list[Forked] = []
    proc: Any = None
    try:
        for start, items in chunks:
            try:
                payload = dumps(items)
            except Exception:
                break
            run = Run(next(TASK_IDS), token, start, "item", payload, False, growth_limit)
            parent, child = ctx.Pipe(duplex=True)
            inherited = [parent, *(w.conn for w in workers)]
            proc = ctx.Process(target=worker_main, name=f"amortune-worker-{len(workers)}",
                               args=(child, thread_cap, None, None, "fork", inherited, (),
                                     (func, run)),
                               daemon=True)
            started = time.perf_counter()
            try:
                proc.start()
            except Exception:
                parent.close()
                break
            finally:
                child.close()
            workers.append(Forked(proc, parent, run.task_id, start, items, payload, started))
            proc = None
    except BaseException:  # Ctrl-C while forking: no worker may run on
        if proc is not None and proc.pid is not None:  # started, not yet in ``workers``
            proc.kill()
            proc.join()
        abandon(PreForked(func_payload, token, workers))
        raise
    return PreForked(func_payload, token, workers) if workers else None


def abandon(forked: PreForked) -> None:
    """Kill and reap workers no pool adopted (the caller was interrupted before it could)."""
    for w in forked.workers:
        w.process.kill()
    for w in forked.workers:
        w.process.join()
        w.conn.close()
