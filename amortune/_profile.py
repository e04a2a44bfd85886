"""Sampling in the caller's process: cheap, and never wasted.

Owns: running ``func`` on the first items until a small time or item budget is spent, timing each
call (wall and CPU), measuring pickled sizes and pickling time, result memory (numpy-aware) and
whether the function can travel to a worker. The sampled results are kept and reused by the run,
so no item is computed twice; items read ahead to learn the input's length are handed back too.
Clocks are arguments so tests can drive it with a virtual clock.
"""

from __future__ import annotations

import collections
import itertools
import math
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ._config import Config
from ._model import PARALLEL_FLOOR_SECONDS, WorkloadProfile
from ._quick import READ_AHEAD_BYTES, READ_AHEAD_ITEMS
from ._record import record, replace
from ._serde import dumps_function, note_item

__all__ = ["Sampled", "count_items", "result_nbytes", "sample", "unsampled"]

#: Read-ahead to learn a generator's length stops at ``READ_AHEAD_ITEMS`` items or
#: ``READ_AHEAD_BYTES`` of input: the first look's bounds (``_quick``), so both agree on "short".
#: With at least this many sampled items, a one-off stall is discounted from the item cost.
ROBUST_MIN_ITEMS = 5
#: At most this many sampled items are pickled to measure transfer cost, and probing stops once
#: this many bytes were pickled (one 1 MiB array is a precise enough probe; four cost ~1.5 ms).
PICKLE_PROBES = 4
PICKLE_PROBE_BYTES = 1 << 20
#: A first item this many times slower than the median of the others paid a one-off (an import
#: or a model load), which is neither the item cost nor a reason to start workers.
FIRST_CALL_FACTOR = 5.0
#: A first item slower than this is taken as a slow item, not a one-off: sampling more items in
#: the caller would keep them from running in parallel.
FIRST_CALL_MAX_SECONDS = 1.0
#: In-band pickling of a large buffer is a copy into a new bytes object: pickle.dumps of a
#: 1 MiB float64 array takes ~0.64 ms (1.6 GB/s) on the reference machine.
MEMCPY_BYTES_PER_SECOND = 1.6e9


@record()
class Sampled:
    """What sampling produced: the profile, the results so far and the rest of the input."""

    profile: WorkloadProfile
    results: list[Any]
    inputs: list[Any]
    read_ahead: list[Any]
    rest: Iterator[Any]
    n_remaining: int
    n_remaining_known: bool
    func_bytes: bytes | None
    #: ``False`` when the function was not pickled yet (``probe_function=False``): it is assumed
    #: to travel until a plan needs it to (:func:`finish_function_probe`).
    function_probed: bool = True

    def remaining_items(self) -> Iterator[Any]:
        """The items not yet run, in order: the read-ahead buffer, then the rest of the input."""
        if self.read_ahead:
            return itertools.chain(self.read_ahead, self.rest)
        return self.rest


def count_items(data: Iterable[Any]) -> int | None:
    """``len(data)`` when the input has a length, else ``None`` (generators, iterators)."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def result_nbytes(obj: Any, _depth: int = 0) -> int:
    """Approximate memory held by ``obj``: numpy arrays by ``nbytes``, containers one level deep."""
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int) and not isinstance(obj, memoryview):
        return nbytes + 112
    size = sys.getsizeof(obj, 64)
    if _depth < 2:
        if isinstance(obj, (list, tuple, set, frozenset)):
            size += sum(result_nbytes(x, _depth + 1) for x in itertools.islice(obj, 1000))
        elif isinstance(obj, dict):
            size += sum(
                result_nbytes(k, _depth + 1) + result_nbytes(v, _depth + 1)
                for k, v in itertools.islice(obj.items(), 1000)
            )
    return size


def _pickle_cost(objs: list[Any], clock: Callable[[], float]) -> tuple[float, float, str]:
    """Mean pickled bytes and seconds per object over a few probes; reason text if one fails."""
    if not objs:
        return 0.0, 0.0, ""
    total_bytes = probed = copied = 0
    t0 = clock()
    try:
        for obj in objs:
            # Large buffers (numpy arrays) are measured out of band instead of copied: sending
            # them costs one copy, priced at MEMCPY_BYTES_PER_SECOND below.
            buffers: list[pickle.PickleBuffer] = []
            total_bytes += len(pickle.dumps(obj, protocol=5, buffer_callback=buffers.append))
            for buf in buffers:
                n = buf.raw().nbytes
                total_bytes += n
                copied += n
            probed += 1
            if total_bytes >= PICKLE_PROBE_BYTES:
                break
    except Exception:
        try:
            import cloudpickle

            total_bytes = sum(len(cloudpickle.dumps(o)) for o in objs)
        except Exception as exc:
            return 0.0, 0.0, f"{type(exc).__name__}: {exc}"
        probed = len(objs)
    seconds = clock() - t0 + copied / MEMCPY_BYTES_PER_SECOND
    return total_bytes / probed, seconds / probed, ""


def _func_bytes(func: Callable[..., Any]) -> tuple[bytes | None, str]:
    """The function as workers receive it: by reference when importable (cloudpickle, and its
    import, only for ``__main__`` functions, lambdas and closures, which travel by value)."""
    try:
        return dumps_function(func), ""
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _median(values: Sequence[float]) -> float:
    """The median (``statistics`` is not imported: it pulls in ``fractions``, ``decimal`` and
    ``random``, milliseconds of a one-shot script's first call)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _fmean(values: Iterable[float]) -> float:
    items = list(values)
    return math.fsum(items) / len(items)


def _trend(walls: Sequence[float]) -> tuple[float, float]:
    """How wall time grows with position: a slope (seconds per item) and a rank correlation.

    Both resist the odd item the OS preempted: the slope is the median of the slopes between
    each item of the first half and its partner half a sample later, the correlation is
    Spearman's (ranks, not values).
    """
    n = len(walls)
    if n < 3:
        return 0.0, 0.0
    half = n // 2
    slope = _median([(walls[i + half] - walls[i]) / half for i in range(n - half)])
    order = sorted(range(n), key=walls.__getitem__)
    ranks = [0.0] * n
    start = 0
    while start < n:  # equal times share their average rank
        end = start
        while end + 1 < n and walls[order[end + 1]] == walls[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2
        start = end + 1
    mean = (n - 1) / 2
    spread = math.sqrt(sum((i - mean) ** 2 for i in range(n))
                       * sum((r - mean) ** 2 for r in ranks))
    if spread == 0:
        return slope, 0.0
    return slope, sum((i - mean) * (ranks[i] - mean) for i in range(n)) / spread


def sample(
    func: Callable[[Any], Any],
    data: Iterable[Any],
    config: Config,
    *,
    parallel_floor_seconds: float = PARALLEL_FLOOR_SECONDS,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.thread_time,
    runqueue_clock: Callable[[], float] | None = None,
    start_index: int = 0,
    probe_function: bool = True,
) -> Sampled:
    """Run ``func`` on the first items of ``data`` and measure it.

    Stops after ``config.sample_items`` items or ``config.sample_seconds`` of wall time. Pickling
    is measured only when the rest of the work could pay for parallel execution (more than
    ``parallel_floor_seconds`` of predicted serial time), so a trivial map spends nothing on it.
    ``probe_function=False`` leaves the function itself unpickled (a ``__main__`` function needs
    cloudpickle, whose import is ~10 ms of a one-shot script): for items that wait, whose plan is
    threads unless the model says otherwise, and then :func:`finish_function_probe` pickles
    it. An input without a length is read ahead right after its first item (the buffer's
    bound depends on its size). CPU time is the calling thread's (``cpu_clock``): what other
    threads burn meanwhile says nothing of the items (OpenBLAS's threads spin for ~50 ms after
    ``import numpy``, so a script's first map of waiting items looked busy). ``runqueue_clock``
    (default: the kernel's per-thread run-queue time) lets the time the caller waited for a busy
    CPU be told apart from time the function spent waiting.
    An exception from ``func`` propagates with the item's index in a note.
    """
    n_total = count_items(data)
    it = iter(data)
    results: list[Any] = []
    inputs: list[Any] = []
    walls: list[float] = []
    cpus: list[float] = []
    if runqueue_clock is None:
        runqueue_clock = _runqueue_seconds
    rq_start = runqueue_clock()
    cpu_start = cpu_clock()
    start = clock()
    deadline = start + config.sample_seconds
    limit = config.sample_items
    # A length-less input is read ahead once its first item is known (the buffer's size depends
    # on it), and the sample continues from that buffer.
    early: collections.deque[Any] | None = None
    early_total: int | None = None
    while True:
        try:
            item = early.popleft() if early else next(it)
        except StopIteration:
            break
        except Exception as exc:  # the input itself failed: say so, with the item it was reading
            note_item(exc, start_index + len(results), by_input=True)
            raise
        attempt = 0
        while True:
            c0 = cpu_clock()
            t0 = clock()
            try:
                r = func(item)
                break
            except StopIteration as stop:
                err = RuntimeError("func raised StopIteration; amortune treats it as an error, "
                                   "not as the end of the input")
                err.__cause__ = stop
                note_item(err, start_index + len(results))
                raise err from stop
            except BaseException as exc:
                if config.retry_on and isinstance(exc, config.retry_on) and attempt < config.retries:
                    attempt += 1  # a transient failure: the same backoff as chunks get
                    time.sleep(config.retry_backoff_seconds * 2 ** (attempt - 1))
                    continue
                note_item(exc, start_index + len(results))
                raise
        t1 = clock()
        cpus.append(cpu_clock() - c0)
        results.append(r)
        inputs.append(item)
        walls.append(t1 - t0)
        if len(results) == 1:
            # The first call often pays a one-off (an import, a cache fill, a model load): when
            # it took most of the budget, give the sample room for a few items after it, so the
            # one-off can be told apart from the item cost.
            if config.sample_seconds / 2 < t1 - start < FIRST_CALL_MAX_SECONDS:
                deadline = max(deadline, t1 + config.sample_seconds)
            if n_total is None:
                buffered, it, ahead = _read_ahead(it, inputs)
                early = collections.deque(buffered)
                if len(buffered) < ahead:
                    early_total = 1 + len(buffered)
        if len(results) >= limit or t1 >= deadline:
            break
    sampled_wall = clock() - start
    sampled_cpu = cpu_clock() - cpu_start
    runqueue = max(0.0, runqueue_clock() - rq_start)
    n = len(results)

    read_ahead: list[Any] = list(early) if early else []
    if n_total is not None:
        n_remaining, known = n_total - n, True
    else:
        known = early is None or early_total is not None  # None: it ended before a first item
        if not known:  # longer than the first read: keep a full buffer past the sample
            more, it, ahead = _read_ahead(it, inputs, have=len(read_ahead))
            read_ahead.extend(more)
            known = len(read_ahead) < ahead
        n_remaining = len(read_ahead)

    one_off = 0.0
    if n >= 3:
        rest_median = _median(walls[1:])
        if walls[0] > FIRST_CALL_FACTOR * rest_median and walls[0] - rest_median > 1e-3:
            one_off = walls[0] - rest_median
    mean_wall = (sampled_wall - one_off) / n if n else 0.0
    mean_cpu = max(0.0, sampled_cpu - min(one_off, cpus[0] if cpus else 0.0)) / n if n else 0.0
    if one_off:
        walls = [rest_median, *walls[1:]]
        cpus = [min(cpus[0], rest_median), *cpus[1:]]
    slope, trend_r = _trend(walls)
    cv = 0.0
    if n > 1 and mean_wall > 0:
        mean_each = _fmean(walls)
        cv = math.sqrt(_fmean([(w - mean_each) ** 2 for w in walls])) / mean_wall
    if n:
        # An item's cost is its CPU time plus the time it really waited (sleep, I/O). Time the
        # caller sat in the run queue because other processes held the cores is not the
        # function's: on a busy machine it made CPU-bound items look I/O-bound. One long wait
        # among five or more items is also more likely the OS parking the caller than the
        # function (a 10 ms stall among 64 items of 1 µs), so it is dropped.
        cpu_each = [min(c, w) for c, w in zip(cpus, walls, strict=True)]
        waits = [w - c for c, w in zip(cpu_each, walls, strict=True)]
        wait = max(0.0, sum(waits) - runqueue) / n
        if n >= ROBUST_MIN_ITEMS:
            wait = min(wait, (sum(waits) - max(waits)) / (n - 1))
        mean_cpu = min(mean_cpu, _fmean(cpu_each))
        mean_wall = min(mean_wall, mean_cpu + wait)
    in_b = out_b = in_s = out_s = 0.0
    func_bytes: bytes | None = None
    picklable, why = True, ""
    worth_pickling = bool(n and n_remaining * mean_wall > parallel_floor_seconds)
    if worth_pickling:
        func_bytes, why = _func_bytes(func) if probe_function else (None, "")
        picklable = func_bytes is not None or not probe_function
        if picklable:
            in_b, in_s, why_in = _pickle_cost(inputs[:PICKLE_PROBES], clock)
            out_b, out_s, why_out = _pickle_cost(results[:PICKLE_PROBES], clock)
            if why_in or why_out:
                picklable = False
                why = f"an input cannot be pickled: {why_in}" if why_in else (
                    f"a result cannot be pickled: {why_out}")
    mem = _fmean(result_nbytes(r) for r in results[:PICKLE_PROBES]) if n else 0.0
    profile = WorkloadProfile(
        n_sampled=n,
        sampled_wall_seconds=sampled_wall,
        item_wall_seconds=mean_wall,
        item_cpu_seconds=min(mean_cpu, mean_wall) if mean_wall else mean_cpu,
        item_wall_cv=cv,
        max_item_wall_seconds=max(walls, default=0.0),
        in_bytes=in_b,
        out_bytes=out_b,
        pickle_in_seconds=in_s,
        pickle_out_seconds=out_s,
        result_memory_bytes=max(mem, out_b),
        picklable=picklable,
        not_picklable_reason=why,
        first_call_seconds=one_off,
        item_wall_slope=slope,
        item_wall_trend_r=trend_r,
    )
    return Sampled(profile, results, inputs, read_ahead, it, n_remaining, known, func_bytes,
                   function_probed=probe_function or not picklable or not worth_pickling)


def finish_function_probe(sampled: Sampled, func: Callable[..., Any]) -> Sampled:
    """``sampled`` with the function pickled (a no-op when it was): unpicklable, the profile
    says so and the plan must not send it anywhere."""
    if sampled.function_probed:
        return sampled
    func_bytes, why = _func_bytes(func)
    sampled.func_bytes, sampled.function_probed = func_bytes, True
    if func_bytes is None:
        sampled.profile = replace(sampled.profile, picklable=False,
                                              not_picklable_reason=why)
    return sampled


def unsampled(func: Callable[..., Any], data: Iterable[Any]) -> Sampled | None:
    """A :class:`Sampled` with nothing run in the caller (``None`` if ``func`` cannot travel).

    For runs where no item may execute in the caller, such as a per-item timeout: the plan then
    starts from one-item chunks and the scheduler measures the rest.
    """
    func_bytes, why = _func_bytes(func)
    if func_bytes is None:
        return None
    n_total = count_items(data)
    profile = WorkloadProfile(n_sampled=0, sampled_wall_seconds=0.0, item_wall_seconds=0.0,
                              item_cpu_seconds=0.0)
    return Sampled(profile, [], [], [], iter(data), n_total or 0, n_total is not None, func_bytes)


def _runqueue_seconds() -> float:
    """Seconds this thread has waited for a CPU (Linux schedstat), 0.0 where unavailable."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class _Raises:
    """An iterator that raises the input's own error where the input failed."""

    def __init__(self, exc: BaseException) -> None:
        self.exc: BaseException | None = exc

    def __iter__(self) -> _Raises:
        return self

    def __next__(self) -> Any:
        exc, self.exc = self.exc, None
        if exc is None:
            raise StopIteration
        raise exc


def _read_ahead(it: Iterator[Any], sampled_inputs: list[Any], have: int = 0
                ) -> tuple[list[Any], Iterator[Any], int]:
    """Buffer the next items of a length-less input so the model knows how much work is left.

    Reads up to the limit less the ``have`` items already buffered; returns the items, the
    iterator left and the limit (past the items and ``have`` when the input failed: it ends
    there)."""
    per_item = 0
    if sampled_inputs:
        try:
            per_item = len(pickle.dumps(sampled_inputs[0], protocol=pickle.HIGHEST_PROTOCOL))
        except Exception:
            per_item = result_nbytes(sampled_inputs[0])
    limit = READ_AHEAD_ITEMS
    if per_item:
        limit = max(1, min(limit, READ_AHEAD_BYTES // per_item))
    items: list[Any] = []
    try:
        items.extend(itertools.islice(it, max(0, limit - have)))
    except Exception as exc:
        # The input itself failed: the items before the failure still run first (as in map),
        # and the error is raised in its place, once they are done.
        return items, _Raises(exc), have + len(items) + 1
    return items, it, limit
