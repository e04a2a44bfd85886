"""``execute`` and ``process_in_batches``: input stream → plan → scheduler → results.

Data flow::

    data ──▶ plan_run (sample in the caller; results kept) ──▶ serial loop in the caller
                                                          └──▶ run_chunks on a backend
                                                               (warm process pool or threads)
    results: sampled results + the rest, in input order ──▶ list, spill segments or a reduction

Owns the batch loop (budget, spill, reduce, checkpoint) and Ctrl-C handling (workers are
killed, never orphaned); progress reporting lives in ``_progress``.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from ._config import Config
from ._errors import add_note
from ._model import PROCESS_DISPATCH_SECONDS, THREAD_DISPATCH_SECONDS
from ._optimize import PlannedRun, plan_run
from ._profile import count_items
from ._progress import Progress
from ._schedule import ChunkPolicy, FixedChunkPolicy, RunStats, run_chunks
from ._worker import rss_bytes
from .backends._base import Backend, FunctionRef
from .backends.local import discard_warm_pool, get_warm_pool
from .backends.threads import ThreadBackend

__all__ = ["estimate_safe_batch_size", "execute", "process_in_batches", "stream_results"]

T = TypeVar("T")
R = TypeVar("R")

#: The serial loop reports progress every this many items (a tqdm update costs ~1 µs).
_SERIAL_PROGRESS_STEP = 256


def _serial(func: Callable[[Any], Any], items: Iterator[Any], offset: int,
            progress: Progress | None) -> Iterator[list[Any]]:
    """Run the rest in the caller; yields result lists (one, or slices when reporting progress)."""
    step = _SERIAL_PROGRESS_STEP if progress is not None else None
    while True:
        out: list[Any] = []
        try:
            out.extend(map(func, items if step is None else itertools.islice(items, step)))
        except BaseException as exc:
            add_note(exc, f"amortune: raised while processing item {offset + len(out)}")
            raise
        if not out:
            return
        offset += len(out)
        if progress is not None:
            progress.update(len(out))
        yield out
        if step is None:
            return


def stream_results(
    func: Callable[[Any], Any],
    run: PlannedRun,
    config: Config,
    items: Iterator[Any],
    *,
    start_index: int,
    n_remaining: int | None,
    progress: Progress | None = None,
    stats: RunStats | None = None,
    max_items_in_flight: int | None = None,
    backend: Backend | None = None,
) -> Iterator[list[Any]]:
    """Yield result lists for ``items`` (input indices from ``start_index``) following ``run.plan``."""
    plan = run.plan
    if plan.executor == "serial" and backend is None:
        yield from _serial(func, items, start_index, progress)
        return
    fn = FunctionRef(func, run.sampled.func_bytes)
    own: Backend | None = None
    if backend is None:
        if plan.executor == "threads":
            backend = own = ThreadBackend(plan.n_jobs)
        else:
            backend = get_warm_pool(plan.n_jobs, config.start_method, thread_cap=plan.thread_cap,
                                    memory_growth_bytes=config.worker_memory_growth_bytes)
    n_workers = plan.n_jobs
    per_item = plan.profile.result_memory_bytes + plan.profile.in_bytes
    if max_items_in_flight is None and per_item > 0:
        budget = config.memory_fraction * run.system.available_memory_bytes
        max_items_in_flight = max(n_workers * 2, int(budget // per_item))
    dispatch = PROCESS_DISPATCH_SECONDS if backend.kind == "processes" else THREAD_DISPATCH_SECONDS
    policy = (FixedChunkPolicy(plan.chunksize, n_workers, config.target_chunk_seconds)
              if run.chunksize_pinned else
              ChunkPolicy(plan.chunksize, n_workers, config.target_chunk_seconds,
                          dispatch_seconds=dispatch))
    try:
        yield from run_chunks(
            backend, fn, items,
            start_index=start_index,
            policy=policy,
            n_remaining=n_remaining,
            retries=config.retries,
            retry_on=config.retry_on,
            retry_backoff_seconds=config.retry_backoff_seconds,
            timeout_seconds=config.timeout_seconds,
            max_chunks_in_flight=2 * n_workers + 1,
            max_items_in_flight=max_items_in_flight,
            on_progress=progress.update if progress is not None else None,
            stats=stats,
        )
    except KeyboardInterrupt:
        backend.shutdown(wait=True, kill=True)
        if own is None:
            discard_warm_pool(backend)  # type: ignore[arg-type]
        raise
    finally:
        if own is not None:
            own.shutdown(wait=True)


def execute(
    func: Callable[[T], R],
    data: Iterable[T],
    *,
    n_jobs: int | None = None,
    chunksize: int | None = None,
    executor: str | None = None,
    progress: Any = False,
    progress_callback: Callable[[str, float], None] | None = None,
    retries: int | None = None,
    timeout: float | None = None,
    retry_on: tuple[type[BaseException], ...] | None = None,
    config: Config | None = None,
) -> list[R]:
    """``list(map(func, data))``, measured and run the fastest way this machine allows.

    Samples ``func`` on the first items in the caller (those results are kept), decides serial,
    processes or threads with ``n_jobs`` and ``chunksize``, and runs the rest. Results come back
    in input order; an exception from ``func`` is re-raised with its own type, the worker's
    traceback as ``__cause__`` and the item's index in a note.

    Parameters
    ----------
    n_jobs, chunksize, executor:
        Pin what the plan would choose (``executor``: ``"serial"``, ``"processes"``, ``"threads"``).
    progress:
        ``True`` for a tqdm bar, or a tqdm instance to update.
    progress_callback:
        ``callback(phase, fraction)`` with phases ``"optimize"`` and ``"execute"``.
    retries, timeout, retry_on:
        Re-run chunks lost to a dead worker or a timeout up to ``retries`` times; ``timeout`` is
        seconds per item (the worker is killed and replaced); ``retry_on`` lists exception types
        from ``func`` worth retrying with backoff.

    Examples
    --------
    >>> import amortune
    >>> amortune.execute(lambda x: x * x, range(5))
    [0, 1, 4, 9, 16]
    """
    cfg = (config or Config.from_env()).replace(
        retries=retries, timeout_seconds=timeout, retry_on=retry_on)
    run = plan_run(func, data, cfg, n_jobs=n_jobs, chunksize=chunksize, executor=executor)
    _warn(run)
    results: list[Any] = run.sampled.results
    prog = None
    if (progress is not None and progress is not False) or progress_callback is not None:
        prog = Progress(progress, progress_callback, run.plan.n_items, initial=len(results))
    try:
        if run.plan.executor == "serial" and prog is None:
            try:  # straight into the result list: the fastest loop Python has
                results.extend(map(func, run.sampled.remaining_items()))
            except BaseException as exc:
                add_note(exc, f"amortune: raised while processing item {len(results)}")
                raise
            return results
        for chunk in stream_results(
            func, run, cfg, run.sampled.remaining_items(),
            start_index=len(results),
            n_remaining=run.sampled.n_remaining if run.sampled.n_remaining_known else None,
            progress=prog,
        ):
            results.extend(chunk)
    finally:
        if prog is not None:
            prog.close()
    return results


def _warn(run: PlannedRun) -> None:
    import warnings

    from ._errors import AmortuneWarning

    for message in run.fallbacks:
        warnings.warn(message, AmortuneWarning, stacklevel=3)


def estimate_safe_batch_size(result_size_bytes: int, max_memory_percent: float = 0.5) -> int:
    """How many results of ``result_size_bytes`` fit in ``max_memory_percent`` of available memory.

    ``floor(max_memory_percent * available_memory / result_size_bytes)``, at least 1; available
    memory respects container limits.

    Examples
    --------
    >>> import amortune
    >>> amortune.estimate_safe_batch_size(1, 0.5) > 1000
    True
    """
    from ._model import estimate_safe_batch_size_for
    from ._system import memory_snapshot

    return estimate_safe_batch_size_for(result_size_bytes, max_memory_percent, memory_snapshot())


#: In a batch loop, results held in a batch take at most this share of the memory budget; the
#: rest covers chunks in flight and pickled buffers (measured: peak ≈ 1.6 × batch results).
_BATCH_SHARE = 0.6
_OPTIMIZE_KEYS = frozenset({"n_jobs", "chunksize", "executor", "config", "retries", "timeout",
                            "retry_on", "profile", "max_memory_bytes"})


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, flush=True)


def _release_freed_memory() -> None:
    """Hand memory freed by the last batch back to the OS (glibc keeps freed 1 MB blocks)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def process_in_batches(
    func: Callable[[T], R],
    data: Iterable[T],
    batch_size: int | None = None,
    max_memory_percent: float = 0.5,
    sample_size: int = 5,
    verbose: bool = False,
    *,
    spill: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    reduce: Callable[[Any, Any], Any] | None = None,
    progress: Any = False,
    progress_callback: Callable[[str, float], None] | None = None,
    **optimize_kwargs: Any,
) -> Any:
    """Map ``func`` over ``data`` in sequential batches that fit a memory budget.

    One optimization and one warm pool serve the whole loop; the input is streamed (only the
    current batch's inputs are held). Returns the list of all results; with ``spill="disk"`` (a
    private temporary folder) or ``spill=path`` a lazy read-only sequence backed by one segment
    file per batch; with ``reduce=fn`` the aggregate ``fn(fn(r0, r1), r2)...``. With
    ``checkpoint=path`` finished batches are recorded, and the same call after a crash resumes
    after them.

    Parameters
    ----------
    batch_size:
        Items per batch; ``None`` derives it from the sampled result size and the budget.
    max_memory_percent:
        Share of available memory (container limits included) results may take.
    sample_size:
        Items sampled to measure the function.
    verbose:
        Print one line per batch.
    optimize_kwargs:
        ``n_jobs``, ``chunksize``, ``executor``, ``retries``, ``timeout``, ``retry_on``,
        ``max_memory_bytes`` (an absolute budget), ``config``, ``profile`` (print the plan).

    Raises
    ------
    MemoryBudgetError
        When one result alone is larger than the budget.
    ValueError
        For invalid parameters, or a checkpoint written by another function or input.

    Examples
    --------
    >>> from amortune import process_in_batches
    >>> process_in_batches(abs, range(-3, 3), batch_size=4)
    [3, 2, 1, 0, 1, 2]
    >>> process_in_batches(abs, range(-3, 3), batch_size=4, reduce=lambda a, b: a + b)
    9
    """
    unknown = set(optimize_kwargs) - _OPTIMIZE_KEYS
    if unknown:
        raise TypeError(f"process_in_batches() got unexpected keyword arguments {sorted(unknown)}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if not isinstance(sample_size, int) or sample_size < 1:
        raise ValueError(f"sample_size must be a positive int, got {sample_size!r}")
    if reduce is not None and not callable(reduce):
        raise TypeError(f"reduce must be a function of two results, got {reduce!r}")
    max_bytes = optimize_kwargs.get("max_memory_bytes")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_memory_bytes must be > 0, got {max_bytes!r}")
    cfg = (optimize_kwargs.get("config") or Config.from_env()).replace(
        memory_fraction=max_memory_percent,
        sample_items=sample_size,
        retries=optimize_kwargs.get("retries"),
        timeout_seconds=optimize_kwargs.get("timeout"),
        retry_on=optimize_kwargs.get("retry_on"),
    )
    if spill is not None and not isinstance(spill, (os.PathLike, str)):
        raise TypeError(f"spill must be 'disk', a folder path or None, got {spill!r}")
    ckpt = None
    if checkpoint is not None:
        from ._checkpoint import Checkpoint, describe_function, function_fingerprint

        ckpt = Checkpoint.open(checkpoint, fingerprint=function_fingerprint(func),
                               mode="list" if reduce is None else "reduce",
                               function_name=describe_function(func))
    sink = _BatchSink(reduce, ckpt)
    try:
        source: Iterable[Any] = data
        it = iter(data)
        done_items = 0
        if ckpt is not None and ckpt.batches:
            from ._checkpoint import input_digest

            for rec in ckpt.batches:
                items = list(itertools.islice(it, rec.stop - rec.start))
                ckpt.verify_batch(rec.seq, rec.start, rec.start + len(items), input_digest(items))
            done_items = ckpt.next_start
            n_total = count_items(data)
            source = it if n_total is None else _Sized(it, n_total - done_items)
            if reduce is not None:
                sink.aggregate = ckpt.aggregate()
            _say(verbose, f"Resuming from checkpoint {ckpt.path}: {len(ckpt.batches)} batches "
                          f"({done_items} items) already done")
        if spill is not None and ckpt is None and reduce is None:
            # With reduce= only the running aggregate is kept, so there is nothing to spill; with
            # a checkpoint the checkpoint's own segments are the spill.
            from ._spill import SpillStore

            sink.store = SpillStore(None if spill == "disk" else spill)
        _batch_loop(func, source, cfg, sink, batch_size=batch_size, verbose=verbose,
                    done_items=done_items, progress=progress,
                    progress_callback=progress_callback, opts=optimize_kwargs)
        return sink.result(lazy=spill is not None)
    except BaseException:
        if sink.store is not None:
            sink.store.close()
        raise
    finally:
        if ckpt is not None:
            ckpt.close()


class _Sized:
    """An iterator that still knows how many items it will yield (after a resume skip)."""

    def __init__(self, it: Iterator[Any], n: int) -> None:
        self._it, self._n = it, max(0, n)

    def __iter__(self) -> Iterator[Any]:
        return self._it

    def __len__(self) -> int:
        return self._n


class _Nothing:
    def __repr__(self) -> str:
        return "<nothing>"


_NOTHING: Any = _Nothing()


class _BatchSink:
    """Where finished batches go: a list, spill segments, a running reduction or a checkpoint."""

    def __init__(self, reduce: Callable[[Any, Any], Any] | None, ckpt: Any) -> None:
        self.reduce, self.ckpt = reduce, ckpt
        self.store: Any = None
        self.aggregate: Any = _NOTHING
        self.collected: list[Any] = []
        self.seq = len(ckpt.batches) if ckpt is not None else 0

    @property
    def returns_list(self) -> bool:
        """True when every result ends up in one list in memory."""
        return self.store is None and self.reduce is None

    def write(self, start: int, inputs: list[Any], results: list[Any]) -> None:
        """Take batch ``self.seq`` (input indices from ``start``)."""
        if self.reduce is not None:
            partial = functools.reduce(self.reduce, results)
            self.aggregate = (partial if self.aggregate is _NOTHING
                              else self.reduce(self.aggregate, partial))
        if self.ckpt is not None:
            from ._checkpoint import input_digest

            stop, digest = start + len(results), input_digest(inputs)
            if self.reduce is not None:
                self.ckpt.record_batch(self.seq, start, stop, digest, aggregate=self.aggregate)
            else:
                self.ckpt.record_batch(self.seq, start, stop, digest, results=results)
        elif self.store is not None:
            self.store.write_segment(self.seq, results)
        elif self.reduce is None:
            self.collected.extend(results)
        self.seq += 1

    def result(self, *, lazy: bool) -> Any:
        """The aggregate, the lazy spilled sequence (``lazy``) or the list of all results."""
        if self.reduce is not None:
            if self.aggregate is _NOTHING:
                raise ValueError("reduce= needs at least one item: the input is empty")
            return self.aggregate
        if self.ckpt is not None:
            seq = self.ckpt.results()
            if lazy:
                return seq
            with seq:
                return list(seq)
        if self.store is not None:
            return self.store.results()
        return self.collected


def _batch_loop(func: Callable[[Any], Any], it: Iterable[Any], cfg: Config, sink: _BatchSink,
                *, batch_size: int | None, verbose: bool, done_items: int, progress: Any,
                progress_callback: Callable[[str, float], None] | None,
                opts: dict[str, Any]) -> None:
    """Sample once, then run the input batch by batch into ``sink`` within the memory budget."""
    import time
    import warnings

    from ._errors import AmortuneWarning, MemoryBudgetError
    from ._model import fmt_bytes

    run = plan_run(func, it, cfg, n_jobs=opts.get("n_jobs"), chunksize=opts.get("chunksize"),
                   executor=opts.get("executor"))
    plan, sampled = run.plan, run.sampled
    if opts.get("profile"):
        _say(True, plan.explain())
    budget = cfg.memory_fraction * run.system.available_memory_bytes
    if opts.get("max_memory_bytes") is not None:
        budget = min(budget, float(opts["max_memory_bytes"]))
    per_result = plan.profile.result_memory_bytes
    if per_result > budget:
        raise MemoryBudgetError(
            f"one result takes about {fmt_bytes(per_result)}, more than the whole memory budget "
            f"of {fmt_bytes(budget)}; raise max_memory_percent or make results smaller")
    safe = max(1, int(_BATCH_SHARE * budget // per_result)) if per_result else 1 << 62
    if batch_size is None:
        batch_size = max(1, min(safe, plan.batch_size if plan.n_items else safe))
    elif batch_size > safe:
        warnings.warn(f"batch_size={batch_size} holds about {fmt_bytes(batch_size * per_result)} "
                      f"of results, more than the budget of {fmt_bytes(budget)}; "
                      f"batch_size={safe} would fit", AmortuneWarning, stacklevel=3)
    n_items = plan.n_items
    total = None if n_items is None else done_items + n_items
    if sink.returns_list and n_items is not None and n_items * per_result > budget:
        warnings.warn(
            f"the {n_items} results (about {fmt_bytes(n_items * per_result)}) will not fit the "
            f"memory budget of {fmt_bytes(budget)} as one list; pass spill='disk' to keep them "
            "on disk, or reduce= to aggregate them", AmortuneWarning, stacklevel=3)
    n_batches = "?" if n_items is None else str(-(-n_items // batch_size))
    _say(verbose, f"Processing {'an unknown number of' if n_items is None else n_items} items in "
                  f"batches of {batch_size} ({n_batches} batches); plan: {plan.executor}, "
                  f"n_jobs={plan.n_jobs}, chunksize={plan.chunksize}")
    for w in plan.warnings:
        _say(verbose, f"Warning: {w}")
    prog = None
    if (progress is not None and progress is not False) or progress_callback is not None:
        prog = Progress(progress, progress_callback, total, initial=done_items + len(sampled.results))
    backend: Backend | None = ThreadBackend(plan.n_jobs) if plan.executor == "threads" else None
    pending_results: list[Any] = sampled.results
    head = sampled.inputs
    rest = sampled.remaining_items()
    n_rest = sampled.n_remaining if sampled.n_remaining_known else None
    start = done_items
    baseline_rss = rss_bytes()
    max_in_flight = max(2 * plan.n_jobs, int(0.25 * budget // max(per_result, 1)))
    try:
        while True:
            t0 = time.perf_counter()
            take = max(0, batch_size - len(pending_results))
            batch_inputs = list(itertools.islice(rest, take))
            if n_rest is not None:
                n_rest -= len(batch_inputs)
            if not batch_inputs and not pending_results:
                break
            batch_results = pending_results
            pending_results = sampled.results = []
            for part in stream_results(func, run, cfg, iter(batch_inputs),
                                       start_index=start + len(batch_results),
                                       n_remaining=len(batch_inputs), progress=prog,
                                       max_items_in_flight=max_in_flight, backend=backend):
                batch_results.extend(part)
            part = []  # drop the reference to the last chunk's results
            count = len(batch_results)
            sink.write(start, head + batch_inputs, batch_results)
            head = sampled.inputs = sampled.read_ahead = []
            del batch_results
            _release_freed_memory()
            # Results live in this process; workers hold one chunk each and are recycled by
            # Config.worker_memory_growth_bytes, so the caller's growth is what the budget bounds.
            rss = rss_bytes()
            of_total = f" of {total}" if total is not None else ""
            _say(verbose, f"Batch {sink.seq}: items {start}-{start + count - 1} ({count} items, "
                          f"{start + count}{of_total} done) in {time.perf_counter() - t0:.2f} s, "
                          f"memory {fmt_bytes(rss)}")
            kept = len(sink.collected) * per_result  # a returned list is meant to stay
            if rss - baseline_rss - kept > budget and batch_size > 1:
                batch_size = max(1, batch_size // 2)
                warnings.warn(f"memory grew to {fmt_bytes(rss - baseline_rss - kept)} above the start, "
                              f"more than the budget of {fmt_bytes(budget)}; next batches hold "
                              f"{batch_size} items", AmortuneWarning, stacklevel=3)
            start += count
    finally:
        if backend is not None:
            backend.shutdown(wait=True)
        if prog is not None:
            prog.close()
