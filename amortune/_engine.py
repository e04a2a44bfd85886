"""From a plan to a running scheduler: pick the backend, the chunk policy, the limits.

Data flow::

    PlannedRun ──▶ backend: the one given, threads, the warm process pool, or serial (the caller)
               ──▶ ChunkPolicy from the sampled item time, bounds from n_jobs and the budget
               ──▶ Scheduler.run() ──▶ result lists in input order
    serial plans keep timing their chunks and move to workers when the rest of the input turns
    out to be worth it (costs that grow along the input); the change is noted in the run stats.

Every entry point (``execute``, ``imap``, ``process_in_batches``, ``Pool``, ``gpu``) runs through
:func:`stream`. A Ctrl-C stops this call's chunks only; other threads' calls on the same warm
pool carry on. Imports the engine's lower layers only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ._config import Config
from ._model import MIN_SPEEDUP, PROCESS_DISPATCH_SECONDS, THREAD_DISPATCH_SECONDS, decide
from ._optimize import PlannedRun, _costs
from ._policy import ChunkPolicy, FixedChunkPolicy
from ._record import record, replace
from ._schedule import Adopted, Scheduler
from ._start import in_worker_process
from ._stats import RunStats, active_recorders
from ._worker import rss_bytes
from .backends._base import Backend, FunctionRef, WorkerSetup, environment_snapshot
from .backends.serial import SerialBackend

__all__ = ["CallOptions", "finish_adopted", "sample_stats", "stream"]

log = logging.getLogger("amortune")
#: A serial run re-plans at most this often (chunks of ~20 ms between checks).
SERIAL_TARGET_CHUNK_SECONDS = 0.02
#: A chunk runs at least this many dispatch costs long (2.5% overhead): 6 ms locally, where the
#: 50 ms target wins; ~0.1 s on a Dask cluster, where one task costs ~2.5 ms (dask_bench.py).
DISPATCH_SHARE_FACTOR = 40


@record(frozen=True)
class CallOptions:
    """What one call asked for beyond the plan: call style, set-up, bounds, ordering."""

    style: str = "item"
    initializer: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    ordered: bool = True
    max_items_in_flight: int | None = None
    #: The caller may run items itself (sampling, helping while workers boot); not for Pool.
    caller_may_run: bool = True
    #: What happened before this stream (a quick serial start), for the run's record.
    notes: tuple[str, ...] = ()


DEFAULT_OPTIONS = CallOptions()


def _open_backend(run: PlannedRun, config: Config, opts: CallOptions,
                  n_jobs: int) -> tuple[Backend, bool]:
    """The backend for this plan, and whether this call owns it (and must shut it down)."""
    if run.backend is not None:
        return run.backend, run.backend_owned
    kind = run.plan.executor
    if kind == "threads":
        from .backends.threads import ThreadBackend

        return ThreadBackend(n_jobs), True
    if kind == "serial":
        return SerialBackend(), False
    if opts.initializer is not None:
        from .backends.processes import ProcessBackend

        setup = WorkerSetup(opts.initializer, opts.initargs, run.plan.thread_cap)
        return ProcessBackend(n_jobs, start_method=config.start_method, setup=setup,
                              memory_growth_bytes=config.worker_memory_growth_bytes), True
    from .backends._warm import get_warm_pool

    return get_warm_pool(n_jobs, config.start_method, thread_cap=run.plan.thread_cap,
                         memory_growth_bytes=config.worker_memory_growth_bytes), False


def _policy(run: PlannedRun, config: Config, backend: Backend, n_workers: int) -> ChunkPolicy:
    plan = run.plan
    if run.chunksize_pinned:
        return FixedChunkPolicy(plan.chunksize, n_workers, config.target_chunk_seconds)
    info = backend.info()
    if info.name == "serial":
        per = max(plan.profile.item_wall_seconds, 1e-9)
        return ChunkPolicy(max(1, int(SERIAL_TARGET_CHUNK_SECONDS / per)), 1,
                           SERIAL_TARGET_CHUNK_SECONDS)
    dispatch = info.dispatch_seconds or (
        THREAD_DISPATCH_SECONDS if info.in_caller else PROCESS_DISPATCH_SECONDS)
    # A costly dispatch (a cluster task: ~2.5 ms of scheduler work) needs longer chunks for it
    # to stay a small share of the work.
    target = max(config.target_chunk_seconds, DISPATCH_SHARE_FACTOR * dispatch)
    return ChunkPolicy(plan.chunksize, n_workers, target, dispatch_seconds=dispatch)


def _setup(run: PlannedRun, opts: CallOptions) -> WorkerSetup:
    return WorkerSetup(opts.initializer, opts.initargs, run.plan.thread_cap,
                       environment_snapshot())


def stream(func: Callable[..., Any], run: PlannedRun, config: Config, items: Iterator[Any], *,
           start_index: int, n_remaining: int | None, opts: CallOptions = DEFAULT_OPTIONS,
           on_progress: Callable[[int], None] | None = None, stats: RunStats | None = None,
           backend: Backend | None = None, may_escalate: bool = True,
           fn: FunctionRef | None = None,
           on_scheduler: Callable[[Scheduler], None] | None = None,
           adopted: Sequence[Adopted] = (), adopted_from: Backend | None = None,
           settled: tuple[int, list[Any], list[Any]] | None = None) -> Iterator[list[Any]]:
    """Yield result lists for ``items`` (input indices from ``start_index``) following ``run``.

    ``adopted`` chunks (handed to ``adopted_from``'s workers before the plan) and the
    ``settled`` sample come first: see :meth:`Scheduler.run`.
    """
    plan = run.plan
    owned = False
    if backend is None:
        backend, owned = _open_backend(run, config, opts, plan.n_jobs)
    n_workers = plan.n_jobs if plan.executor != "serial" else 1
    per_item = plan.profile.result_memory_bytes + plan.profile.in_bytes
    max_items = opts.max_items_in_flight
    if max_items is None and per_item > 0:
        budget = config.memory_fraction * run.system.available_memory_bytes
        max_items = max(n_workers * 2, int(budget // per_item))
    slots = backend.capacity()
    limit = run.n_jobs_limit
    # n_jobs is a resource limit: on a bigger (warm) pool, at most n_jobs chunks are unfinished.
    max_chunks = limit if limit is not None and limit < slots else 2 * min(slots, n_workers) + 1
    if backend.name == "serial":
        max_chunks = 1  # it runs each chunk as it is submitted
    stats = stats if stats is not None else RunStats()
    recorders = active_recorders()
    for rec in recorders:
        rec.add(plan, stats)
    for note in opts.notes:
        moved = f"; moved to {plan.executor} (n_jobs={plan.n_jobs})" if plan.parallel else ""
        stats.note(stats.started_at, note + moved)
    helper = None
    if (opts.caller_may_run and config.sample_in_caller and config.timeout_seconds is None
            and not backend.info().in_caller and run.backend is None and not run.executor_pinned):
        helper = SerialBackend()  # the caller runs items while no worker is ready yet
    escalate = None
    if (may_escalate and plan.executor == "serial" and run.backend is None
            and plan.profile.picklable and run.sampled.function_probed
            and opts.caller_may_run and n_remaining
            and run.n_jobs_limit is None and run.system.usable_cores > 1
            and not run.chunksize_pinned and not in_worker_process()):
        escalate = _Escalation(run, config, opts, stats)
    sched = Scheduler(
        backend, fn or FunctionRef(func, run.sampled.func_bytes), policy=_policy(run, config, backend, n_workers),
        style=opts.style, setup=_setup(run, opts), retries=config.retries,
        retry_on=config.retry_on, retry_backoff_seconds=config.retry_backoff_seconds,
        timeout_seconds=config.timeout_seconds if not backend.info().in_caller else None,
        max_chunks_in_flight=max_chunks, max_items_in_flight=max_items, ordered=opts.ordered,
        on_progress=on_progress, on_outcome=escalate, stats=stats, helper=helper,
        sample_memory=rss_bytes if recorders else None)
    if on_scheduler is not None:
        on_scheduler(sched)  # the batch loop tightens the items in flight to its batch
    finished = False
    try:
        yield from sched.run(items, start_index=start_index, n_remaining=n_remaining,
                             adopted=adopted, adopted_from=adopted_from, settled=settled)
        finished = True
    finally:
        for b in (backend, escalate.owned if escalate is not None else None):
            starts = getattr(b, "start_times", None)
            if recorders and starts is not None:  # workers a warm pool had before are not ours
                stats.worker_starts.update({slot: t for slot, t in starts().items()
                                            if t[0] >= stats.started_at})
        if escalate is not None and escalate.owned is not None:
            escalate.owned.shutdown(wait=True)
        if owned:
            # After a finished run a thread backend's threads are idle: they end on their own
            # (64 of them take milliseconds to join), and the caller need not wait for that.
            backend.shutdown(wait=not (finished and backend.name == "threads"))


def finish_adopted(fn: FunctionRef, backend: Backend, adopted: Sequence[Adopted],
                   config: Config, *, start_index: int, error: BaseException,
                   error_at: int) -> Iterator[list[Any]]:
    """Chunks handed to workers before a plan whose sample failed at ``error_at``: their
    results, or the first error in input order (theirs, else ``error``); always raises."""
    sched = Scheduler(backend, fn, policy=FixedChunkPolicy(1, backend.capacity(),
                                                            config.target_chunk_seconds),
                      retries=config.retries, retry_on=config.retry_on,
                      retry_backoff_seconds=config.retry_backoff_seconds)
    yield from sched.run(iter(()), start_index=start_index, n_remaining=0, adopted=adopted,
                         input_error=(error_at, error))


def sample_stats(run: PlannedRun, offset: int, started: float) -> RunStats:
    """A run's record, starting with the items sampled in the caller while planning."""
    import time

    from ._stats import ChunkEvent

    stats = RunStats(started_at=started)
    n = len(run.sampled.results)
    if n:
        wall = run.plan.profile.sampled_wall_seconds
        stats.events.append(ChunkEvent(offset, n, -1, "caller", started, time.perf_counter(),
                                       started, started + wall, wall,
                                       run.plan.profile.item_cpu_seconds * n))
        stats.caller_item_seconds += wall
        stats.items += n
        stats.chunks += 1
    return stats


class _Escalation:
    """A serial run's check after each chunk: would workers now pay for the rest?"""

    def __init__(self, run: PlannedRun, config: Config, opts: CallOptions, stats: RunStats) -> None:
        self.run, self.config, self.opts, self.stats = run, config, opts, stats
        self.owned: Backend | None = None
        self.checked_at = 0.0

    def __call__(self, sched: Scheduler, n_items: int, seconds: float) -> None:
        remaining = sched.remaining
        item = sched.policy.item_seconds
        if not remaining or not item or sched.backend.name != "serial" or sched.failed_at is not None:
            return
        p = self.run.plan.profile
        cpu_share = p.item_cpu_seconds / p.item_wall_seconds if p.item_wall_seconds else 1.0
        profile = replace(p, item_wall_seconds=item, item_cpu_seconds=item * min(1.0, cpu_share),
                          item_wall_cv=max(p.item_wall_cv, 0.5))
        decision = decide(profile, remaining, _costs(self.config, self.run.system, None))
        if decision.executor == "serial" or decision.estimated_speedup < MIN_SPEEDUP:
            return
        plan = replace(self.run.plan, executor=decision.executor, n_jobs=decision.n_jobs,
                       chunksize=decision.chunksize, thread_cap=decision.thread_cap)
        new_run = replace(self.run, plan=plan)
        backend, owned = _open_backend(new_run, self.config, self.opts, decision.n_jobs)
        self.owned = backend if owned else None
        what = (f"moved to {decision.executor} (n_jobs={decision.n_jobs}) after item "
                f"{sched.next_start - 1}: items now take {item * 1e3:.2f} ms, and the "
                f"{remaining} left are worth {decision.estimated_speedup:.2f}x in parallel")
        log.info("amortune: %s", what)
        self.stats.note(sched.clock(), what)
        sched.setup = _setup(new_run, self.opts)
        sched.switch(backend, _policy(new_run, self.config, backend, decision.n_jobs),
                     max_chunks_in_flight=2 * decision.n_jobs + 1,
                     helper=SerialBackend() if not backend.info().in_caller else None)
