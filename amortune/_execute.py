"""``execute`` and ``imap``: a map, planned by measurement and run on one engine.

Data flow::

    data ──▶ quick look (_quick: a clearly serial map finishes here, almost nothing imported)
         ├─▶ a long CPU-bound rest: workers forked now, a first chunk each (adopted later)
         └─▶ plan_run (sample in the caller; results kept) ──▶ _engine.stream ──▶ Scheduler
    results: first look + adopted chunks + sample + the rest, in input order ──▶ list (execute)
    or a stream (imap)

Call styles: ``func(x)``; ``star=True`` for ``func(*x)`` (as ``Pool.starmap``); ``per_chunk=True``
for ``func(list_of_items) -> list`` (model batches). ``initializer(*initargs)`` runs once in every
process that runs items, the caller included when items run there.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ._config import Config
    from ._quick import QuickOutcome
    from ._schedule import Adopted
    from .backends._base import FunctionRef
    from .backends.processes import ProcessBackend

__all__ = ["execute", "imap"]

T = TypeVar("T")
R = TypeVar("R")

#: ``imap`` samples at most this many items in the caller before the first result streams.
IMAP_SAMPLE_ITEMS = 8
_ENV_KEYS = ("AMORTUNE_MAX_WORKERS", "AMORTUNE_MAX_THREADS", "AMORTUNE_START_METHOD",
             "AMORTUNE_TARGET_CHUNK_SECONDS")


class StarCall:
    """``func(*args)`` as a one-argument function, so an unpacking map is sampled like a map."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func

    def __call__(self, args: Iterable[Any]) -> Any:
        return self.func(*args)


class OneOfChunk:
    """A per-chunk function called on one item (sampling), returning that item's result."""

    def __init__(self, func: Callable[[list[Any]], list[Any]]) -> None:
        self.func = func

    def __call__(self, item: Any) -> Any:
        out = list(self.func([item]))
        if len(out) != 1:
            raise ValueError(f"a per-chunk function returned {len(out)} results for 1 item")
        return out[0]


#: When the first look predicts this much serial work left in items that compute, processes are
#: all but certain: the warm pool is forked before the planner imports and samples, so the
#: workers' start-up (10-30 ms from fork to ready on the reference machine) overlaps the
#: sample instead of following it.
EARLY_START_SECONDS = 0.5
#: Once workers are forked early the sample after the fork is cut to this (at least one item):
#: with the engine's imports and the plan it stays inside the workers' first chunks
#: (``PRELAUNCH_SECONDS``), so they never wait for it. The run's own chunk timings correct what
#: a short sample misjudges.
EARLY_SAMPLE_SECONDS = 0.005
#: Workers forked early get a chunk each at once, about this much of the items after the first
#: look's: it outlasts the caller's sample and plan, so the workers compute instead of waiting
#: for them (15-20 ms on the reference machine alone, 25-35 ms while the early workers share
#: its two cores: a 20 ms chunk left the least slowed worker idle ~10 ms before its second);
#: in a fresh process, where the workers fork before the engine is imported, the engine's
#: imports (``ENGINE_IMPORT_SECONDS``) are added.
PRELAUNCH_SECONDS = 0.04
#: ... and together never more than one in this many of the items left.
PRELAUNCH_SHARE = 4
#: The caller waits at most this long for the manager thread to send those chunks.
PRELAUNCH_SEND_SECONDS = 0.005


def _usable_cores() -> int:
    """Cores this process may use, or 0 where it cannot start workers (it is one itself)."""
    from ._start import in_worker_process

    if in_worker_process():
        return 0  # a worker process cannot start workers of its own
    from ._config import Config
    from ._system import probe_usable_cores

    return probe_usable_cores(Config())


def _start_workers_early(cores: int) -> ProcessBackend:
    """Fork the warm pool now, one worker per usable core, while this process is single-threaded.

    The plan made next finds it warm; a plan that does not use it leaves it idle (it is the
    same pool a later call would reuse, stopped at exit).
    """
    from ._config import Config
    from .backends._warm import get_warm_pool

    return get_warm_pool(cores, None, thread_cap=1,
                         memory_growth_bytes=Config().worker_memory_growth_bytes)


def _engine_loaded() -> bool:
    """Whether this process has imported the process engine (a call before this one did)."""
    import sys

    return "amortune.backends._warm" in sys.modules


def _engine_import_seconds() -> float:
    from ._quick import ENGINE_IMPORT_SECONDS

    return ENGINE_IMPORT_SECONDS


Early = tuple["ProcessBackend | None", "list[Adopted]", Iterator[Any], "FunctionRef | None"]


def _prelaunch(func: Callable[..., Any], rest: Iterator[Any], start: int, n_rest: int,
               cost: QuickOutcome) -> Early:
    """When ``n_rest`` items that compute leave ``EARLY_START_SECONDS`` of work (as ``cost``
    projects it: costs rising along the input count): start the warm pool now, each worker
    with a chunk of the items at ``start`` (about ``PRELAUNCH_SECONDS`` of them), so the
    workers compute while the caller plans.

    Returns the pool (``None`` when none started), the chunks it runs (the scheduler adopts
    them), the input left and the function as sent. In a fresh process the workers fork before
    the engine is imported, each inheriting its chunk (``_prefork``); in one that has the engine
    the chunks are submitted to the pool. No chunk is handed over when ``func`` or an item
    cannot travel, or the input fails while being read: the planner then meets the problem
    where it always does (what was read comes back first in the input left).
    """
    if cost.seconds_of(start, n_rest) < EARLY_START_SECONDS:
        return None, [], rest, None
    cores = _usable_cores()
    if cores < 2:
        return None, [], rest, None
    fresh = not _engine_loaded()
    seconds = PRELAUNCH_SECONDS + (_engine_import_seconds() if fresh else 0.0)
    cap = n_rest // (PRELAUNCH_SHARE * cores)
    sizes: list[int] = []
    while cap >= 1 and len(sizes) < cores:  # each chunk about `seconds`, rising costs or not
        sizes.append(min(cap, cost.items_within(start + sum(sizes), seconds)))
    head: list[Any] = []
    if sizes:
        try:
            head.extend(itertools.islice(rest, sum(sizes)))
        except Exception as exc:  # the input failed: it fails in its place, after these items
            from ._quick import _raises

            return _start_workers_early(cores), [], itertools.chain(head, _raises(exc)), None
    bounds = list(itertools.accumulate(sizes, initial=0))
    chunks = [(start + a, head[a:b]) for a, b in itertools.pairwise(bounds) if head[a:b]]
    if chunks and fresh:
        early = _fork_with_chunks(func, chunks, cores)
        if early is not None:
            pool, sent, forked_fn = early
            at = sum(len(chunk[1]) for chunk in sent)
            return (pool, sent, itertools.chain(head[at:], rest) if at < len(head) else rest,
                    forked_fn)
    pool = _start_workers_early(cores)
    sent, fn = _submit_early(pool, func, chunks)
    at = sum(len(chunk[1]) for chunk in sent)
    return pool, sent, itertools.chain(head[at:], rest) if at < len(head) else rest, fn


def _fork_with_chunks(func: Callable[..., Any], chunks: list[tuple[int, list[Any]]], cores: int
                      ) -> tuple[ProcessBackend, list[Adopted], FunctionRef] | None:
    """Fork a worker per chunk before the engine loads, then start the warm pool around them."""
    from ._config import Config
    from ._prefork import abandon, fork_with_chunks

    growth = Config().worker_memory_growth_bytes
    forked = fork_with_chunks(func, chunks, thread_cap=1, growth_limit=growth)
    if forked is None:
        return None
    try:
        from .backends._base import ChunkTask, FunctionRef, WorkerSetup, environment_snapshot
        from .backends._warm import get_warm_pool

        fn = FunctionRef(func, forked.func_payload, forked.token)
        setup = WorkerSetup(thread_cap=1, env=environment_snapshot())
        tasks = [(w, ChunkTask(fn, w.items, w.start, "item", None, setup))
                 for w in forked.workers]
        pool = get_warm_pool(cores, None, thread_cap=1, memory_growth_bytes=growth, adopt=tasks)
    except BaseException:  # Ctrl-C before the pool owns them: no worker runs on
        abandon(forked)
        raise
    sent: list[Adopted] = [(w.start, w.items, fut, w.started)
                           for w, fut in zip(forked.workers, pool.adopted, strict=True)]
    return pool, sent, fn


def _submit_early(pool: ProcessBackend, func: Callable[..., Any],
                  chunks: list[tuple[int, list[Any]]]) -> tuple[list[Adopted], FunctionRef | None]:
    """Submit ``chunks`` to the early-started ``pool``: the chunks sent and the function."""
    import time

    from .backends._base import ChunkTask, FunctionRef, WorkerSetup, environment_snapshot

    if not chunks:
        return [], None
    fn = FunctionRef(func)
    try:
        fn.token  # noqa: B018 - pickled now: a function that cannot travel is not sent
    except Exception:
        return [], None
    setup = WorkerSetup(thread_cap=1, env=environment_snapshot())
    sent: list[Adopted] = []
    for at, items in chunks:
        submitted = time.perf_counter()
        fut = pool.submit(ChunkTask(fn, items, at, "item", None, setup))
        if fut.done() and fut.exception() is not None:
            break  # an item that cannot be pickled (or a broken pool): the planner decides
        sent.append((at, items, fut, submitted))
    if sent:
        pool.wait_sent(PRELAUNCH_SEND_SECONDS)  # the workers start now, not when the GIL frees
    return sent, fn if sent else None


def _quick_allowed(config: Config | None, options: dict[str, Any]) -> bool:
    import sys

    stats = sys.modules.get("amortune._stats")  # not loaded: no report() is recording
    recording = stats is not None and bool(stats.active_recorders())
    return (config is None and all(v is None or v is False for v in options.values())
            and not any(k in os.environ for k in _ENV_KEYS) and not recording)


def _thresholds() -> tuple[float, float]:
    """Serial-for-certain thresholds of the first look, for items that compute and for items
    that wait (threads start in a fraction of a millisecond): lower once a pool is warm."""
    import sys

    from ._quick import (
        CHEAPEST_START_SECONDS,
        CHEAPEST_THREAD_START_SECONDS,
        ENGINE_IMPORT_SECONDS,
        PARALLEL_FLOOR_SECONDS,
        SERIAL_CERTAIN_FACTOR,
        THREAD_IMPORT_SECONDS,
    )

    loaded = sys.modules
    threads = 0.0 if "amortune.backends.threads" in loaded else THREAD_IMPORT_SECONDS
    waiting = max(PARALLEL_FLOOR_SECONDS,
                  SERIAL_CERTAIN_FACTOR * (CHEAPEST_THREAD_START_SECONDS + threads))
    warm = loaded.get("amortune.backends._warm")
    if warm is not None and any(p.alive for p in warm.all_warm_pools()):
        return PARALLEL_FLOOR_SECONDS, waiting
    imports = 0.0 if "amortune.backends.processes" in loaded else ENGINE_IMPORT_SECONDS
    return SERIAL_CERTAIN_FACTOR * (CHEAPEST_START_SECONDS + imports), waiting


def execute(
    func: Callable[..., R],
    data: Iterable[Any],
    *,
    n_jobs: int | None = None,
    chunksize: int | None = None,
    backend: Any = None,
    executor: str | None = None,
    plan: Any = None,
    star: bool = False,
    per_chunk: bool = False,
    initializer: Callable[..., Any] | None = None,
    initargs: Iterable[Any] = (),
    progress: Any = False,
    progress_callback: Callable[[str, float], None] | None = None,
    retries: int | None = None,
    timeout: float | None = None,
    retry_on: tuple[type[BaseException], ...] | None = None,
    config: Config | None = None,
) -> list[R]:
    """``list(map(func, data))``, measured and run the fastest way this machine allows.

    Samples ``func`` on the first items in the caller (those results are kept), decides serial,
    processes or threads with ``n_jobs`` and ``chunksize``, and runs the rest; a serial run that
    turns out to be worth workers moves to them. Results come back in input order; an exception
    from ``func`` is re-raised with its own type, the worker's traceback as ``__cause__`` and the
    item's index in a note.

    Parameters
    ----------
    n_jobs, chunksize:
        Pin what the plan would choose; ``n_jobs=-1`` is every usable core, ``-2`` all but one.
        ``n_jobs`` is a limit: never more items run at once, even on a bigger warm pool.
    backend:
        ``"serial"``, ``"threads"``, ``"processes"``, ``"dask"``, a ``Backend`` instance, or an
        object a registered backend recognises (a ``distributed.Client``). ``executor`` is the
        older name of the built-in choices.
    plan:
        A plan from :func:`amortune.optimize`; with ``data=plan.data`` its sampled results are
        reused, so no item runs twice.
    star, per_chunk:
        ``func(*item)`` (as ``Pool.starmap``), or ``func(list_of_items) -> list`` per chunk.
    initializer, initargs:
        ``initializer(*initargs)`` runs once in each process that runs items, before its first
        item (load a model, open a connection); functions from ``__main__`` and lambdas work.
    progress, progress_callback:
        ``True`` for a tqdm bar (or a tqdm instance); ``callback(phase, fraction)``.
    retries, timeout, retry_on:
        Re-run chunks lost to a dead worker or a timeout up to ``retries`` times; ``timeout`` is
        seconds per item (the worker is killed and replaced); an item failing with a
        ``retry_on`` type runs again alone, after a doubling backoff.

    Examples
    --------
    >>> import amortune
    >>> amortune.execute(lambda x: x * x, range(5))
    [0, 1, 4, 9, 16]
    >>> amortune.execute(pow, [(2, 3), (3, 2)], star=True)
    [8, 9]
    """
    if star and per_chunk:
        raise ValueError("star=True and per_chunk=True cannot be combined")
    initargs = tuple(initargs)
    options = dict(n_jobs=n_jobs, chunksize=chunksize, backend=backend, executor=executor,
                   plan=plan, star=star, per_chunk=per_chunk, initializer=initializer,
                   progress=progress, progress_callback=progress_callback, retries=retries,
                   timeout=timeout, retry_on=retry_on)
    results: list[Any] = []
    if _quick_allowed(config, options):
        if not callable(func):
            raise TypeError(f"func must be callable, got {type(func).__name__}")
        from ._quick import WAITING_CPU_SHARE, WAITING_SAMPLE_SECONDS, quick_serial

        computing, waiting = _thresholds()
        quick = quick_serial(func, data, threshold_seconds=computing,
                             waiting_threshold_seconds=waiting)
        if quick.rest is None:
            return quick.results
        results = quick.results
        if quick.n_rest is None:  # no length, and longer than the read-ahead: the planner decides
            data = quick.rest
        else:
            data = _Sized(quick.rest, quick.n_rest)
            rising = (f", rising {quick.growth * 1e6:.3g} µs an item along the input "
                      f"({quick.seconds_of(len(results), quick.n_rest):.3g} s in all)"
                      if quick.growth > 0 else "")
            options["notes"] = (f"ran items 0-{len(results) - 1} in the caller while they were "
                                f"cheap; the {quick.n_rest} left take "
                                f"{quick.item_seconds * 1e3:.3f} ms each{rising}",)
            # The planner samples what the first look has not already timed: waiting items
            # need little (they told us), others the default budget less the first look's time.
            waiting = quick.cpu_share is not None and quick.cpu_share < WAITING_CPU_SHARE
            from ._config import Config
            budget = WAITING_SAMPLE_SECONDS if waiting else Config.sample_seconds
            options["sample_seconds"] = max(WAITING_SAMPLE_SECONDS, budget - quick.seconds)
            options["waiting"] = waiting  # threads are likely: pickle func only if not
            if quick.growth > 0:
                options["rising"] = (quick.growth, len(results))
            pool, sent, rest, fn = ((None, [], quick.rest, None) if waiting else _prelaunch(
                func, quick.rest, len(results), quick.n_rest, quick))
            if pool is not None:
                options["sample_seconds"] = EARLY_SAMPLE_SECONDS
                if sent:
                    n_sent = sum(len(chunk[1]) for chunk in sent)
                    data = _Sized(rest, quick.n_rest - n_sent)
                    options.update(adopted=sent, adopted_from=pool, fn=fn)
                    options["notes"] += (f"items {len(results)}-{len(results) + n_sent - 1} "
                                         f"went to {len(sent)} workers as they started",)
                elif rest is not quick.rest:
                    data = _Sized(rest, quick.n_rest)
    options["initargs"] = initargs
    parts = _run(func, data, options, config, len(results), ordered=True)
    for part in parts:
        results.extend(part)
    return results


def imap(
    func: Callable[..., R],
    data: Iterable[Any],
    *,
    ordered: bool = True,
    n_jobs: int | None = None,
    chunksize: int | None = None,
    backend: Any = None,
    star: bool = False,
    initializer: Callable[..., Any] | None = None,
    initargs: Iterable[Any] = (),
    progress: Any = False,
    retries: int | None = None,
    timeout: float | None = None,
    retry_on: tuple[type[BaseException], ...] | None = None,
    config: Config | None = None,
) -> Iterator[R]:
    """Stream ``map(func, data)``: results as they finish, in input order (``ordered=False``:
    in completion order), with bounded memory, so an endless generator works when the
    consumer stops early. Work starts when iteration starts; closing the iterator stops it.

    Examples
    --------
    >>> import amortune, itertools
    >>> list(itertools.islice(amortune.imap(abs, itertools.count(-3)), 5))
    [3, 2, 1, 0, 1]
    """
    options = dict(n_jobs=n_jobs, chunksize=chunksize, backend=backend, executor=None,
                   plan=None, star=star, per_chunk=False, initializer=initializer,
                   progress=progress, progress_callback=None, retries=retries,
                   timeout=timeout, retry_on=retry_on, initargs=tuple(initargs))
    from ._config import Config

    cfg = config or Config.from_env()
    cfg = cfg.replace(sample_items=min(cfg.sample_items, IMAP_SAMPLE_ITEMS))

    def results() -> Iterator[R]:
        parts = _run(func, data, options, cfg, 0, ordered=ordered, streaming=True)
        try:
            for part in parts:
                yield from part
        finally:
            parts.close()  # type: ignore[attr-defined]

    return results()


def _run(func: Callable[..., Any], data: Iterable[Any], options: dict[str, Any],
         config: Config | None, offset: int, *, ordered: bool,
         streaming: bool = False) -> Iterator[list[Any]]:
    """Plan and run: yields the sampled results, then the rest as the engine finishes them."""
    from ._config import Config
    from .backends._base import WorkerSetup
    from .backends.serial import run_setup_in_caller

    cfg = (config or Config.from_env()).replace(
        retries=options["retries"], timeout_seconds=options["timeout"],
        retry_on=options["retry_on"])
    if options.get("sample_seconds"):
        cfg = cfg.replace(sample_seconds=options["sample_seconds"])
    star, per_chunk = options["star"], options["per_chunk"]
    initializer = options["initializer"]
    initargs = tuple(options.get("initargs") or ())
    sampled_func: Callable[..., Any] = (StarCall(func) if star else
                                        OneOfChunk(func) if per_chunk else func)
    style = "star" if star else "chunk" if per_chunk else "item"
    setup = WorkerSetup(initializer, initargs)
    if initializer is not None and cfg.sample_in_caller and cfg.timeout_seconds is None:
        run_setup_in_caller(setup)  # the caller samples: it is a process that runs items
    import time

    t_plan = time.perf_counter()
    # Chunks the first look handed to early-forked workers come before the sample's items.
    adopted = options.get("adopted") or ()
    adopted_from = options.get("adopted_from")
    sample_at = offset + sum(len(chunk[1]) for chunk in adopted)
    try:
        yield from _planned(func, sampled_func, data, options, cfg, offset, sample_at, t_plan,
                            style, ordered, streaming, adopted, adopted_from)
    finally:
        running = [chunk[2] for chunk in adopted if not chunk[2].done()]
        if adopted_from is not None and running:  # nothing of this call may run on after it
            from concurrent.futures import wait

            from ._schedule import STOP_GRACE_SECONDS

            adopted_from.kill_tasks(running)
            wait(running, timeout=STOP_GRACE_SECONDS)


def _planned(func: Callable[..., Any], sampled_func: Callable[..., Any], data: Iterable[Any],
             options: dict[str, Any], cfg: Config, offset: int, sample_at: int,
             t_plan: float, style: str, ordered: bool, streaming: bool,
             adopted: Sequence[Adopted], adopted_from: ProcessBackend | None
             ) -> Iterator[list[Any]]:
    from ._engine import CallOptions, finish_adopted, sample_stats, stream
    from ._optimize import plan_run
    from ._progress import Progress
    from .backends._base import FunctionRef

    initializer = options["initializer"]
    initargs = tuple(options.get("initargs") or ())
    plan = options.get("plan")
    run = getattr(plan, "_run", None) if plan is not None else None
    if run is not None and plan is not None and data is plan.data and not getattr(
            run, "_used", False):
        run._used = True
        it = iter(data)
        for _ in itertools.islice(it, len(run.sampled.results)):
            pass  # already computed while planning
        run.sampled.rest = it
        run.sampled.read_ahead = []
    else:
        pins: dict[str, Any] = {}
        if plan is not None:
            pins = dict(n_jobs=plan.n_jobs if plan.executor != "serial" else None,
                        executor=plan.executor)
        failed: Exception | None = None
        try:
            run = plan_run(sampled_func, data, cfg,
                           n_jobs=(options["n_jobs"] if options["n_jobs"] is not None
                                   else pins.get("n_jobs")),
                           chunksize=options["chunksize"],
                           executor=(options["backend"] or options["executor"]
                                     or pins.get("executor")),
                           start_index=sample_at,
                           lazy_function_probe=bool(options.get("waiting")),
                           rising=options.get("rising"))
        except Exception as exc:
            if not adopted or adopted_from is None:
                raise
            failed = exc
        if failed is not None and adopted_from is not None:  # earlier items, earlier errors
            yield from finish_adopted(options["fn"], adopted_from, adopted, cfg,
                                      start_index=offset, error=failed, error_at=sample_at)
            raise failed  # pragma: no cover - finish_adopted raises it, or an earlier error
    assert run is not None
    _warn(run)
    first = run.sampled.results
    progress, callback = options["progress"], options["progress_callback"]
    prog = None
    if (progress is not None and progress is not False) or callback is not None:
        total = None if run.plan.n_items is None else run.plan.n_items + offset
        prog = Progress(progress, callback, total, initial=offset + len(first))
    stats = sample_stats(run, sample_at, t_plan)
    fn = options.get("fn") or FunctionRef(func, run.sampled.func_bytes
                                          if sampled_func is func else None)
    opts = CallOptions(style=style, initializer=initializer, initargs=initargs, ordered=ordered,
                       caller_may_run=True, notes=tuple(options.get("notes") or ()))
    try:
        remaining = run.sampled.remaining_items()
        n_left = run.sampled.n_remaining if run.sampled.n_remaining_known else None
        if adopted:
            settled = (sample_at, run.sampled.inputs, first)
            run.sampled.results = []
            yield from stream(fn.func, run, cfg, remaining, start_index=offset,
                              n_remaining=n_left, opts=opts, fn=fn, stats=stats,
                              on_progress=prog.update if prog is not None else None,
                              may_escalate=not streaming, adopted=adopted,
                              adopted_from=adopted_from, settled=settled)
            return
        if first:
            run.sampled.results = []
            yield first
        yield from stream(fn.func, run, cfg, remaining, start_index=offset + len(first),
                          n_remaining=n_left, opts=opts, fn=fn, stats=stats,
                          on_progress=prog.update if prog is not None else None,
                          may_escalate=not streaming)
    finally:
        if prog is not None:
            prog.close()


class _Sized:
    """An iterator that still knows how many items it will yield."""

    def __init__(self, it: Iterator[Any], n: int | None) -> None:
        self._it, self._n = it, max(0, n or 0)

    def __iter__(self) -> Iterator[Any]:
        return self._it

    def __len__(self) -> int:
        return self._n


def _warn(run: Any) -> None:
    import warnings

    from ._errors import AmortuneWarning

    for message in run.fallbacks:
        warnings.warn(message, AmortuneWarning, stacklevel=4)
