"""``optimize()``: probe the machine, sample the function, ask the model, return a plan.

Orchestration only; the decisions live in ``_model``. Also owns :func:`plan_run`, which every
entry point shares so the sampled results are reused, never recomputed. Planning never starts a
process: a backend's costs come from its ``info()`` (or, for the built-in process pool, from
start costs measured earlier in this process and the warm pool, if one is already running).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable
from typing import Any

from ._config import Config
from ._model import (
    ENGINE_IMPORT_SECONDS,
    PROCESS_DISPATCH_SECONDS,
    THREAD_IMPORT_SECONDS,
    TREND_MIN_ITEMS,
    Costs,
    Decision,
    decide,
)
from ._plan import OptimizationResult
from ._profile import Sampled, finish_function_probe, sample, unsampled
from ._record import record, replace
from ._start import choose_start, in_worker_process, start_cost
from ._system import SystemSnapshot, probe_system
from .backends import Backend, resolve_backend

__all__ = ["PlannedRun", "normalise_n_jobs", "optimize", "plan_run"]

@record()
class PlannedRun:
    """A plan plus what sampling already produced (results to reuse, the rest of the input)."""

    plan: OptimizationResult
    sampled: Sampled
    system: SystemSnapshot
    chunksize_pinned: bool = False
    #: Warnings about a request that could not be honoured (a fallback), as opposed to advice.
    fallbacks: tuple[str, ...] = ()
    #: The backend the caller passed (or a registry built); ``None`` for the built-in ones.
    backend: Backend | None = None
    #: ``n_jobs`` the caller fixed (after normalising -1/-2), so limits hold on a bigger pool.
    n_jobs_limit: int | None = None
    #: The caller chose where items run (``backend=``/``executor=``): the caller then runs no
    #: item beyond the sample, not even while workers start.
    executor_pinned: bool = False
    #: ``backend`` was built for this call (from a name or an address): shut down at its end.
    backend_owned: bool = False


def normalise_n_jobs(n_jobs: int | None, cores: int) -> int | None:
    """``None`` stays; ``-1`` is every usable core, ``-2`` all but one, and so on (as joblib)."""
    if n_jobs is None:
        return None
    if not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or n_jobs == 0:
        raise ValueError(f"n_jobs must be a positive int, -1 (all cores), -2 (all but one) ... "
                         f"or None, got {n_jobs!r}")
    if n_jobs < 0:
        return max(1, cores + 1 + n_jobs)
    return n_jobs


def _costs(config: Config, system: SystemSnapshot, backend: Backend | None) -> Costs:
    common = dict(usable_cores=system.usable_cores,
                  available_memory_bytes=system.available_memory_bytes,
                  memory_fraction=config.memory_fraction, max_threads=config.max_threads,
                  target_chunk_seconds=config.target_chunk_seconds)
    if backend is not None:
        info = backend.info()
        return Costs(**common, process_start_seconds=info.start_seconds,  # type: ignore[arg-type]
                     per_worker_start_seconds=info.per_slot_start_seconds,
                     warm_workers=info.ready_slots, dispatch_seconds=info.dispatch_seconds,
                     max_slots=info.n_slots)
    warm = 0
    if "amortune.backends._warm" in sys.modules:  # a warm pool can only exist if it was loaded
        from .backends._warm import peek_warm_pool

        pool = peek_warm_pool(config.start_method)
        warm = pool.warm_workers if pool is not None else 0
    first, per = start_cost(choose_start(config.start_method).first)
    # What a parallel run still has to import here (a fresh process's first one): not paid yet,
    # so a job that would save less than it stays serial.
    loaded = sys.modules
    return Costs(**common, process_start_seconds=first,  # type: ignore[arg-type]
                 per_worker_start_seconds=per, warm_workers=warm,
                 dispatch_seconds=PROCESS_DISPATCH_SECONDS,
                 process_import_seconds=(0.0 if "amortune.backends.processes" in loaded
                                         else ENGINE_IMPORT_SECONDS),
                 thread_import_seconds=(0.0 if "amortune.backends.threads" in loaded
                                        else THREAD_IMPORT_SECONDS))


def plan_run(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    config: Config,
    *,
    n_jobs: int | None = None,
    chunksize: int | None = None,
    executor: Any = None,
    start_index: int = 0,
    lazy_function_probe: bool = False,
    rising: tuple[float, int] | None = None,
) -> PlannedRun:
    """Sample ``func`` on ``data`` and decide how to run the rest.

    ``executor`` is a backend spec (``backend=``): a built-in name, a :class:`Backend`, or an
    object a registered backend recognises. ``lazy_function_probe`` (items that wait: threads
    are likely) pickles ``func`` only if the plan turns out to need processes. ``rising`` is
    ``(seconds more each item, over how many items)`` when the first look saw costs rise: a
    sample too short to fit a trend of its own (the early workers' case) takes that one.
    """
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
        raise ValueError(f"chunksize must be >= 1 or None, got {chunksize!r}")
    system = probe_system(config)
    backend: Backend | None = None
    pinned = executor is not None
    owned = False
    if executor is not None:
        # Backends built from a name or an address belong to this call; one passed in is the
        # caller's to shut down.
        owned = not isinstance(executor, Backend)
        resolved = resolve_backend(executor, n_jobs=n_jobs if (n_jobs or 0) > 0 else None,
                                   config=config)
        if isinstance(resolved, Backend):
            backend, executor = resolved, None
        else:
            executor, owned = resolved, False
    # -1 is every slot there is: this machine's usable cores, or a cluster's worker threads.
    slots = backend.capacity() if backend is not None else system.usable_cores
    n_jobs = normalise_n_jobs(n_jobs, slots)
    reasons: list[str] = []
    warnings: list[str] = []
    if backend is None and executor in (None, "processes") and in_worker_process():
        if executor == "processes":
            warnings.append("processes are not available inside a worker process; running "
                            "serially instead")
        else:
            reasons.append("running inside a worker process, which cannot start workers of its "
                           "own: nested calls stay in this process")
        executor, n_jobs = "serial", None

    planned_chunksize = chunksize
    sampled: Sampled | None = None
    isolate = config.timeout_seconds is not None or not config.sample_in_caller
    why = "a timeout was given" if config.timeout_seconds is not None else "sample_in_caller=False"
    if config.timeout_seconds is not None and executor in ("serial", "threads"):
        warnings.append(f"timeout is ignored: {executor} cannot be stopped in the middle of "
                        "an item; only processes can")
    elif isolate and executor != "serial" and not in_worker_process():
        if (sampled := unsampled(func, data)) is not None:
            # Only a process can be stopped in the middle of an item (or survive a crash), so
            # no item runs in the caller: chunks start at one item and grow with measured times.
            if backend is None:
                executor = "processes"
            planned_chunksize = chunksize or 1
            reasons.append(f"{why}: every item runs in a worker process, none in the caller")
        else:
            warnings.append(f"{why}, but the function cannot be pickled to run in a worker "
                            "process; it runs in the caller")
    if sampled is None:
        sampled = sample(func, data, config, start_index=start_index,
                         probe_function=not (lazy_function_probe and executor is None
                                             and backend is None))
    if (rising is not None and rising[0] > 0 and rising[1] >= TREND_MIN_ITEMS
            and sampled.profile.n_sampled < TREND_MIN_ITEMS):
        sampled.profile = replace(sampled.profile, item_wall_slope=rising[0],
                                  trend_items=rising[1])
    if (executor == "processes" or backend is not None) and not sampled.profile.picklable:
        warnings.append(f"cannot use {'processes' if backend is None else backend.name}: "
                        f"{sampled.profile.not_picklable_reason}; running serially instead")
        executor, n_jobs, backend = "serial", None, None
    def _cannot_travel() -> str:
        return f"func cannot run in worker processes ({sampled.profile.not_picklable_reason})"

    if not sampled.profile.picklable and sampled.n_remaining:
        warnings.append(_cannot_travel())
    def _decide() -> Decision:
        return decide(sampled.profile, sampled.n_remaining, _costs(config, system, backend),
                      n_items_known=sampled.n_remaining_known, n_jobs=n_jobs,
                      chunksize=planned_chunksize,
                      executor="processes" if backend is not None else executor)

    decision = _decide()
    if decision.executor == "processes" and not sampled.function_probed:
        finish_function_probe(sampled, func)  # the plan sends it to workers: can it travel?
        if not sampled.profile.picklable:
            warnings.append(_cannot_travel())
            decision = _decide()
    n_items = (sampled.profile.n_sampled + sampled.n_remaining
               if sampled.n_remaining_known else None)
    # A re-iterable input is handed back as is; a one-shot iterator is chained back together
    # (sampled items, read-ahead, rest). Only one of plan.data and the run consumes ``rest``.
    chained: Iterable[Any] = data if iter(data) is not sampled.rest else itertools.chain(
        sampled.inputs, sampled.read_ahead, sampled.rest)
    start = choose_start(config.start_method)
    start_text = ""
    if backend is not None:
        start_text = backend.info().start_reason
    elif decision.executor == "processes":
        start_text = start.reason
    plan = OptimizationResult.from_decision(
        decision,
        sampled.profile,
        chained,
        n_items=n_items,
        start_method=start.first if backend is None else backend.name,
        system=system.describe(),
        extra_reasons=tuple(reasons) + ((start_text,) if start_text else ()),
        extra_warnings=tuple(warnings),
    )
    if backend is not None and plan.executor != "serial":
        plan = replace(plan, executor=backend.name)
    return PlannedRun(plan, sampled, system, chunksize_pinned=chunksize is not None,
                      fallbacks=tuple(warnings), backend=backend, n_jobs_limit=n_jobs,
                      executor_pinned=pinned, backend_owned=owned and backend is not None)


def optimize(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    *,
    sample_size: int | None = None,
    n_jobs: int | None = None,
    executor: str | None = None,
    backend: Any = None,
    max_memory_percent: float | None = None,
    config: Config | None = None,
    profile: bool = False,
) -> OptimizationResult:
    """Measure ``func`` on the first items of ``data`` and decide how to map it; run nothing else.

    Returns an :class:`OptimizationResult` with ``n_jobs``, ``chunksize``, ``batch_size``,
    ``executor``, ``estimated_speedup``, ``reasons`` and ``warnings``; its ``data`` is the input
    with the sampled items chained back, so a generator is not lost. Pass the plan to
    ``execute(func, plan.data, plan=plan)`` to run it without sampling again. ``profile=True``
    prints the plan (``plan.explain()``) as well.

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
    run = plan_run(func, data, cfg, n_jobs=n_jobs, executor=backend or executor)
    object.__setattr__(run.plan, "_run", run)  # execute(plan=...) reuses the sampled results
    if profile:
        print(run.plan.explain())
    return run.plan
