"""``optimize()``: probe the machine, sample the function, ask the model, return a plan.

Orchestration only; the decisions live in ``_model``. Also owns :func:`plan_run`, which
``execute`` and ``process_in_batches`` share so the sampled results are reused, never recomputed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ._config import Config
from ._model import IO_BOUND_CPU_SHARE, Costs, decide
from ._plan import OptimizationResult
from ._profile import READ_AHEAD_ITEMS, Sampled, sample, unsampled
from ._system import SystemSnapshot, probe_system
from .backends.local import get_warm_pool, peek_warm_pool, start_cost

__all__ = ["optimize", "plan_run", "PlannedRun"]

#: Start the warm pool during sampling when the first item predicts at least this much serial
#: work: a cold pool costs ~0.1 s (forkserver, 2 workers, measured), which such a run recovers.
PRESTART_SECONDS = 0.25


@dataclass
class PlannedRun:
    """A plan plus what sampling already produced (results to reuse, the rest of the input)."""

    plan: OptimizationResult
    sampled: Sampled
    system: SystemSnapshot
    chunksize_pinned: bool = False
    #: Warnings about a request that could not be honoured (a fallback), as opposed to advice.
    fallbacks: tuple[str, ...] = ()


def _costs(config: Config, system: SystemSnapshot) -> Costs:
    first, per = start_cost(config.start_method)
    warm = peek_warm_pool(config.start_method)
    return Costs(
        usable_cores=system.usable_cores,
        available_memory_bytes=system.available_memory_bytes,
        memory_fraction=config.memory_fraction,
        process_start_seconds=first,
        per_worker_start_seconds=per,
        warm_workers=warm.warm_workers if warm is not None else 0,
        max_threads=config.max_threads,
        target_chunk_seconds=config.target_chunk_seconds,
    )


def plan_run(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    config: Config,
    *,
    n_jobs: int | None = None,
    chunksize: int | None = None,
    executor: str | None = None,
    prestart: bool = True,
) -> PlannedRun:
    """Sample ``func`` on ``data`` and decide how to run the rest.

    With ``prestart``, CPU-bound work that looks long enough starts the warm pool while sampling.
    """
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    if n_jobs is not None and n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1 or None, got {n_jobs!r}")
    if chunksize is not None and chunksize < 1:
        raise ValueError(f"chunksize must be >= 1 or None, got {chunksize!r}")
    if executor not in (None, "serial", "processes", "threads"):
        raise ValueError(f"executor must be 'serial', 'processes', 'threads' or None, got {executor!r}")
    system = probe_system(config)
    reasons: list[str] = []
    warnings: list[str] = []
    if executor in (None, "processes") and _in_daemon_process():
        # A daemonic process (an amortune or multiprocessing worker) may not have children.
        if executor == "processes":
            warnings.append("processes are not available inside a worker process; running "
                            "serially instead")
        else:
            reasons.append("running inside a worker process, which cannot start workers of its "
                           "own: nested calls stay in this process")
        executor, n_jobs = "serial", None

    def start_workers_early(wall: float, cpu: float, n_total: int | None) -> None:
        # CPU-bound work that will take a while: start the warm pool now, so the workers boot
        # while the rest of the sample runs (a cold forkserver pool needs ~0.1 s).
        if not prestart or executor in ("serial", "threads") or n_jobs == 1 or system.usable_cores < 2:
            return
        if cpu < IO_BOUND_CPU_SHARE * wall:
            return
        if wall * (n_total if n_total is not None else READ_AHEAD_ITEMS) >= PRESTART_SECONDS:
            get_warm_pool(system.usable_cores, config.start_method, thread_cap=1,
                          memory_growth_bytes=config.worker_memory_growth_bytes)

    planned_chunksize = chunksize
    sampled: Sampled | None = None
    isolate = config.timeout_seconds is not None or not config.sample_in_caller
    why = "a timeout was given" if config.timeout_seconds is not None else "sample_in_caller=False"
    if config.timeout_seconds is not None and executor in ("serial", "threads"):
        warnings.append(f"timeout is ignored: {executor} cannot be stopped in the middle of "
                        "an item; only processes can")
    elif isolate and executor != "serial" and not _in_daemon_process():
        if (sampled := unsampled(func, data)) is not None:
            # Only a process can be stopped in the middle of an item (or survive a crash), so
            # no item runs in the caller: chunks start at one item and grow with measured times.
            executor = "processes"
            planned_chunksize = chunksize or 1
            reasons.append(f"{why}: every item runs in a worker process, none in the caller")
        else:
            warnings.append(f"{why}, but the function cannot be pickled to run in a worker "
                            "process; it runs in the caller")
    if sampled is None:
        sampled = sample(func, data, config, on_first_item=start_workers_early)
    if executor == "processes" and not sampled.profile.picklable:
        warnings.append(f"cannot use processes: {sampled.profile.not_picklable_reason}; "
                        "running serially instead")
        executor, n_jobs = "serial", None
    if not sampled.profile.picklable and sampled.n_remaining:
        warnings.append(
            f"func cannot run in worker processes ({sampled.profile.not_picklable_reason})")
    decision = decide(
        sampled.profile,
        sampled.n_remaining,
        _costs(config, system),
        n_items_known=sampled.n_remaining_known,
        n_jobs=n_jobs,
        chunksize=planned_chunksize,
        executor=executor,
    )
    n_items = (sampled.profile.n_sampled + sampled.n_remaining
               if sampled.n_remaining_known else None)
    # A re-iterable input is handed back as is; a one-shot iterator is chained back together
    # (sampled items, read-ahead, rest). Only one of plan.data and the run consumes ``rest``.
    chained: Iterable[Any] = data if iter(data) is not sampled.rest else itertools.chain(
        sampled.inputs, sampled.read_ahead, sampled.rest)
    plan = OptimizationResult.from_decision(
        decision,
        sampled.profile,
        chained,
        n_items=n_items,
        start_method=config.start_method,
        system=system.describe(),
        extra_reasons=tuple(reasons),
        extra_warnings=tuple(warnings),
    )
    return PlannedRun(plan, sampled, system, chunksize_pinned=chunksize is not None,
                      fallbacks=tuple(warnings))


def _in_daemon_process() -> bool:
    import multiprocessing

    return bool(multiprocessing.current_process().daemon)


def optimize(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    *,
    sample_size: int | None = None,
    n_jobs: int | None = None,
    executor: str | None = None,
    max_memory_percent: float | None = None,
    config: Config | None = None,
    profile: bool = False,
) -> OptimizationResult:
    """Measure ``func`` on the first items of ``data`` and decide how to map it; run nothing else.

    Returns an :class:`OptimizationResult` with ``n_jobs``, ``chunksize``, ``batch_size``,
    ``executor``, ``estimated_speedup``, ``reasons`` and ``warnings``; its ``data`` is the input
    with the sampled items chained back, so a generator is not lost. ``profile`` is accepted for
    code written against the batch-processing document; the plan always carries its measurements
    (``plan.profile``, ``plan.explain()``).

    Examples
    --------
    >>> import amortune
    >>> plan = amortune.optimize(abs, range(-1000, 1000))
    >>> plan.executor, plan.n_jobs
    ('serial', 1)
    >>> list(plan.data)[:3]
    [-1000, -999, -998]
    """
    cfg = (config or Config.from_env()).replace(
        sample_items=sample_size, memory_fraction=max_memory_percent)
    return plan_run(func, data, cfg, n_jobs=n_jobs, executor=executor, prestart=False).plan
