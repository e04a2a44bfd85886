"""``process_in_batches``: a memory-safe batch loop on the engine, with spill, reduce, resume.

Data flow::

    data ──▶ plan_run once (sample in the caller; results kept) ──▶ batches sized to the budget
         ──▶ per batch: _engine.stream (one policy and one backend for the whole loop)
         ──▶ sink: a list, spill segments, a running reduction (strictly in input order), or a
             checkpoint (resume after a crash, never mixing runs)

Owns the batch loop (budget, spill, reduce, checkpoint). Ctrl-C stops this call's workers only.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from ._config import Config
from ._engine import CallOptions, sample_stats, stream
from ._optimize import PlannedRun, plan_run
from ._profile import count_items
from ._progress import Progress
from ._worker import rss_bytes
from .backends._base import FunctionRef

__all__ = ["estimate_safe_batch_size", "process_in_batches"]

T = TypeVar("T")
R = TypeVar("R")


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
_OPTIMIZE_KEYS = frozenset({"n_jobs", "chunksize", "executor", "backend", "config", "retries",
                            "timeout", "retry_on", "profile", "max_memory_bytes",
                            "initializer", "initargs"})


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
    from ._spill import resolve_spill_target

    spill_target = resolve_spill_target(spill)  # None, "disk" or a folder; refuses "ram"
    ckpt = None
    if checkpoint is not None:
        from ._checkpoint import Checkpoint, describe_function, function_fingerprint

        ckpt = Checkpoint.open(checkpoint, fingerprint=function_fingerprint(func),
                               mode="list" if reduce is None else "reduce",
                               function_name=describe_function(func))
    sink = _BatchSink(reduce, ckpt)
    sink.lazy = spill_target is not None
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

            sink.store = SpillStore(None if spill_target == "disk" else spill_target)
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
        #: Results come back as a lazy disk-backed sequence (spill=, or a checkpoint's segments).
        self.lazy = False

    @property
    def returns_list(self) -> bool:
        """True when every result ends up in one list in memory."""
        return self.store is None and self.reduce is None and not self.lazy

    def write(self, start: int, inputs: list[Any], results: list[Any]) -> None:
        """Take batch ``self.seq`` (input indices from ``start``)."""
        if self.reduce is not None:
            # Strictly in input order, one result at a time: fn(fn(r0, r1), r2)... whatever the
            # batch size, so a non-associative fn gives the same answer on every machine.
            agg, fold = self.aggregate, self.reduce
            for r in results:
                agg = r if agg is _NOTHING else fold(agg, r)
            self.aggregate = agg
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

    if opts.get("initializer") is not None:
        from .backends._base import WorkerSetup
        from .backends.serial import run_setup_in_caller

        run_setup_in_caller(WorkerSetup(opts["initializer"], tuple(opts.get("initargs") or ())))
    t_plan = time.perf_counter()
    run = plan_run(func, it, cfg, n_jobs=opts.get("n_jobs"), chunksize=opts.get("chunksize"),
                   executor=opts.get("backend") or opts.get("executor"), start_index=done_items)
    _warn(run)
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
    pending_results: list[Any] = sampled.results
    sampled.results = []
    inputs_seen: collections.deque[Any] = collections.deque(sampled.inputs)
    sampled.inputs = []
    rest = _Recording(sampled.remaining_items(), inputs_seen)
    n_rest = sampled.n_remaining if sampled.n_remaining_known else None
    start = done_items
    baseline_rss = rss_bytes()
    max_in_flight = max(2 * plan.n_jobs, int(0.25 * budget // max(per_result, 1)))
    stats = sample_stats(run, done_items, t_plan)
    fn = FunctionRef(func, sampled.func_bytes)
    scheds: list[Any] = []
    parts = stream(func, run, cfg, iter(rest), start_index=done_items + len(pending_results),
                   n_remaining=n_rest, fn=fn, stats=stats,
                   opts=CallOptions(max_items_in_flight=max(1, min(
                                        max_in_flight, batch_size - len(pending_results))),
                                    initializer=opts.get("initializer"),
                                    initargs=tuple(opts.get("initargs") or ())),
                   on_progress=prog.update if prog is not None else None,
                   on_scheduler=scheds.append)
    t0 = time.perf_counter()
    batch_results = pending_results

    def bound() -> None:
        # Read no further than the current batch: inputs and results alive stay within it.
        if scheds:
            scheds[0].max_items = max(1, min(max_in_flight, (batch_size or 1) - len(batch_results)))

    try:
        ended = False
        while True:
            while batch_results and (len(batch_results) >= batch_size or ended):
                take = batch_results[:batch_size]
                batch_results = batch_results[batch_size:]
                count = len(take)
                inputs = [inputs_seen.popleft() for _ in range(count)]
                sink.write(start, inputs, take)
                del take, inputs
                _release_freed_memory()
                rss = rss_bytes()
                of_total = f" of {total}" if total is not None else ""
                _say(verbose, f"Batch {sink.seq}: items {start}-{start + count - 1} ({count} "
                              f"items, {start + count}{of_total} done) in "
                              f"{time.perf_counter() - t0:.2f} s, memory {fmt_bytes(rss)}")
                t0 = time.perf_counter()
                kept = len(sink.collected) * per_result  # a returned list is meant to stay
                if rss - baseline_rss - kept > budget and batch_size > 1:
                    batch_size = max(1, batch_size // 2)
                    warnings.warn(f"memory grew to {fmt_bytes(rss - baseline_rss - kept)} above "
                                  f"the start, more than the budget of {fmt_bytes(budget)}; next "
                                  f"batches hold {batch_size} items", AmortuneWarning,
                                  stacklevel=3)
                start += count
            if ended:
                break
            bound()
            part = next(parts, None)
            if part is None:
                ended = True
            else:
                batch_results.extend(part)
            part = None
    finally:
        parts.close()  # type: ignore[attr-defined]
        if prog is not None:
            prog.close()


class _Recording:
    """Iterates the input and keeps every item read until its batch is written (digests)."""

    def __init__(self, it: Iterator[Any], seen: collections.deque[Any]) -> None:
        self._it, self._seen = it, seen

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = next(self._it)
        self._seen.append(item)
        return item
