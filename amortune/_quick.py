"""The first look at a call: settle a clearly serial map before anything heavy is imported.

Most maps in scripts are small. Parallel execution must pay a pool start-up of at least a fork
(:data:`CHEAPEST_START_SECONDS`), and in a fresh process the engine's imports
(:data:`ENGINE_IMPORT_SECONDS`), before it can save anything, so when the whole rest of the
input is predicted to take less than :data:`SERIAL_CERTAIN_FACTOR` times that, serial wins
whatever the model would add. This module times the first items itself (the first call apart:
an import or a cache fill is paid once), runs the rest in growing chunks while re-checking the
rate, and hands over to the full planner with every result so far the moment the remaining work
could pay for workers (costs that grow along the input). An input without a length is read
ahead after its first item: a short one is judged the same way. Imports ``time`` and
``itertools`` and ``math`` only (``pickle`` to size an input without a length).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._serde import note_item

__all__ = ["QuickOutcome", "quick_serial"]

#: The cheapest pool start there is: forking two workers from a single-threaded caller and
#: getting their first replies takes 5-15 ms on the reference machine.
CHEAPEST_START_SECONDS = 0.01
#: In a fresh process, going parallel first imports the planner, the engine and multiprocessing:
#: 30-50 ms on the reference machine (``python -X importtime``), paid before any worker starts.
ENGINE_IMPORT_SECONDS = 0.03
#: Threads need no fork: the thread backend's imports (the engine, no multiprocessing; the same
#: number as ``_model.THREAD_IMPORT_SECONDS``, kept equal by tests/test_model.py) and a few
#: thread starts with a first round of chunks (~1 ms).
THREAD_IMPORT_SECONDS = 0.005
CHEAPEST_THREAD_START_SECONDS = 0.001
#: Below this much serial work no plan goes parallel (``_model.PARALLEL_FLOOR_SECONDS``).
PARALLEL_FLOOR_SECONDS = 0.01
#: With 2 cores and the 1.2x rule, parallel can only win once the serial rest exceeds
#: 1.2 * start / (1 - 1.2 / cores) = 3 starts; above that the full model decides.
SERIAL_CERTAIN_FACTOR = 3.0
#: Serial chunks between rate checks grow to about this long.
CHECK_SECONDS = 0.02
#: Costs count as rising along the input when the latest timed chunk's rate is this many times
#: the one before it (a cost proportional to the index doubles from chunk to chunk, as the chunks
#: double): the rest is then projected linearly, not at the latest rate.
GROWTH_RATIO = 1.5
#: A rate is trusted once a chunk ran this long or held this many items (below, a chunk's time
#: is mostly islice/map/extend overhead, ~1 µs per call on the reference machine).
MIN_TIMED_SECONDS = 0.5e-3
MIN_TIMED_ITEMS = 1024
#: Below this per item, no plan goes parallel however long the input: the caller's own work for
#: each item sent to a worker (pickling it and unpickling its result, 0.5-1 µs each for small
#: objects on the reference machine, as the planner measures them) exceeds what a worker saves.
MIN_PARALLEL_ITEM_SECONDS = 1e-6
#: The same numbers as ``_model.PIPE_BYTES_PER_SECOND`` and ``_model.MIN_SPEEDUP`` (that module
#: is not imported here: the first look must stay cheap); tests/test_model.py keeps them equal.
PIPE_BYTES_PER_SECOND = 1.0e9
MIN_SPEEDUP = 1.2
#: An input without a length is read ahead this far (items, and bytes pickled as its first item)
#: to learn whether it is short; the sampler's read-ahead (``_profile``) uses the same bounds.
READ_AHEAD_ITEMS = 4096
READ_AHEAD_BYTES = 64 << 20


class QuickOutcome:
    """Results so far; ``rest`` is ``None`` when the whole input is done, ``n_rest`` ``None``
    when how many items it holds is not known (an input without a length, past the read-ahead).

    ``cpu_share`` is the caller thread's CPU time over the wall time of the timed items
    (``None`` if none was timed): a low share means the items wait (I/O, sleep). ``seconds`` is
    the wall time the first look ran items, which the planner's own sample need not repeat.
    ``growth`` is how many seconds each item costs more than the one before it when the last
    two timed chunks show costs rising along the input (0.0 otherwise), ``rate_at`` the index
    where ``item_seconds`` was measured: :meth:`seconds_of` projects the rest with both.
    """

    __slots__ = ("results", "rest", "n_rest", "item_seconds", "cpu_share", "seconds", "growth",
                 "rate_at")

    def __init__(self, results: list[Any], rest: Iterator[Any] | None, n_rest: int | None,
                 item_seconds: float, cpu_share: float | None = None,
                 seconds: float = 0.0, growth: float = 0.0, rate_at: float = 0.0) -> None:
        self.results, self.rest, self.n_rest, self.item_seconds = results, rest, n_rest, item_seconds
        self.cpu_share, self.seconds = cpu_share, seconds
        self.growth, self.rate_at = growth, rate_at

    def _cost_at(self, index: int) -> float:
        return self.item_seconds + self.growth * max(0.0, index - self.rate_at)

    def seconds_of(self, start: int, n: int) -> float:
        """Projected seconds of the ``n`` items from index ``start`` (costs rising linearly)."""
        if n <= 0:
            return 0.0
        return n * self._cost_at(start) + self.growth * n * (n - 1) / 2

    def items_within(self, start: int, seconds: float) -> int:
        """How many items from index ``start`` the projection fits in ``seconds`` (at least 1)."""
        c0, g = max(self._cost_at(start), 1e-12), self.growth
        if g <= 0.0:
            return max(1, int(seconds / c0))
        b = c0 - g / 2  # solves n * c0 + g * n * (n - 1) / 2 = seconds for n
        root = math.sqrt(b * b + 2 * g * seconds)
        n = 2 * seconds / (root + b) if b > 0 else (root - b) / g  # no cancellation either way
        return max(1, int(n * (1 + 1e-12)))  # an exact whole n must not round down to n - 1


def _growth(previous: tuple[float, float] | None, rate: float, middle: float) -> float:
    """Seconds per item per index by which costs rise, from two timed chunks' rates (0.0 unless
    the later one is ``GROWTH_RATIO`` times the earlier: noise and one-offs are not a trend).

    A cost proportional to the index (a line through zero at the first item) is the steepest a
    real cost rises along the input, as in ``_model.project_rising_costs``: a steeper fit is
    noise and is cut to that line.
    """
    if previous is None:
        return 0.0
    before, at = previous
    if rate < GROWTH_RATIO * before or middle <= at:
        return 0.0
    return min((rate - before) / (middle - at), rate / middle)


def _moving_costs_more(result: Any, item_seconds: float) -> bool:
    """True when moving an input or a result between processes costs more than computing it saves.

    A parallel run unpickles every result in the caller, one after another: with buffers of
    ``nbytes`` that alone takes ``nbytes / PIPE_BYTES_PER_SECOND`` per item, and when that
    exceeds the item's compute time divided by the 1.2x rule, no number of workers can win.
    """
    nbytes = getattr(result, "nbytes", None)
    if not isinstance(nbytes, int) or isinstance(result, memoryview):
        return False
    return nbytes / PIPE_BYTES_PER_SECOND * MIN_SPEEDUP >= item_seconds


def _stopped() -> RuntimeError:
    # A StopIteration from func inside map() silently ends the map: report it as an error.
    return RuntimeError("func raised StopIteration; amortune treats it as an error, not as the "
                        "end of the input")


def _pickled_size(item: Any) -> int:
    nbytes = getattr(item, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    import pickle  # only for inputs without a length

    try:
        return len(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        import sys

        return sys.getsizeof(item)


def _raises(exc: Exception) -> Iterator[Any]:
    raise exc
    yield  # pragma: no cover - makes this a generator


def _read_ahead(it: Iterator[Any], first_input: Any) -> tuple[list[Any], Iterator[Any] | None]:
    """The items after the first of an input without a length, up to the read-ahead bounds;
    the iterator left, or ``None`` when the input ended within them (an error of the input
    itself is raised in its place, after the items before it)."""
    limit = max(1, min(READ_AHEAD_ITEMS, READ_AHEAD_BYTES // max(1, _pickled_size(first_input))))
    items: list[Any] = []
    try:
        items.extend(itertools.islice(it, limit))
    except Exception as exc:
        return items, _raises(exc)
    return items, (it if len(items) >= limit else None)


def quick_serial(func: Callable[[Any], Any], data: Iterable[Any], *,
                 threshold_seconds: float = SERIAL_CERTAIN_FACTOR * (
                     CHEAPEST_START_SECONDS + ENGINE_IMPORT_SECONDS),
                 waiting_threshold_seconds: float | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] = time.thread_time) -> QuickOutcome:
    """Run ``func`` over ``data`` in the caller while that is certainly the fastest way.

    The rest is handed over once it is predicted to take more than ``threshold_seconds``, or
    ``waiting_threshold_seconds`` while items spend under ``WAITING_CPU_SHARE`` of their time on
    this thread's CPU (threads, which cost far less to start, may overlap their waiting).

    Returns a :class:`QuickOutcome` whose ``rest`` is ``None`` when every item ran here, or the
    items left when the rest could pay for workers. An input without a length is read ahead
    after its first item: one that ends within the bounds is judged as a list; a longer one
    comes back after its first item, ``n_rest`` ``None`` (the planner decides).
    """
    try:
        n_total: int | None = len(data)  # type: ignore[arg-type]
    except TypeError:
        n_total = None
    it = iter(data)
    out: list[Any] = []
    append = out.append
    try:
        t0 = clock()
        first_input: Any = None
        for item in itertools.islice(it, 1):
            first_input = item
            try:
                append(func(item))
            except StopIteration as exc:
                raise _stopped() from exc
        first = clock() - t0
        if n_total is None:
            buffered, left_over = _read_ahead(it, first_input) if out else ([], None)
            if left_over is not None:
                return QuickOutcome(out, itertools.chain(buffered, left_over), None, first,
                                    None, clock() - t0)
            n_total, it = len(out) + len(buffered), iter(buffered)
        size, per_item, done_timed, spent, cpu = 1, first, 0, 0.0, 0.0
        previous: tuple[float, float] | None = None  # the last timed chunk's rate and middle
        growth, rate_at = 0.0, 0.0
        while len(out) < n_total:
            c1, t1 = cpu_clock(), clock()
            before = len(out)
            out.extend(map(func, itertools.islice(it, size)))
            took = clock() - t1
            cpu += cpu_clock() - c1
            if len(out) - before < min(size, n_total - before):
                raise _stopped()
            done_timed += size
            spent += took
            rate = took / size  # the latest chunk: costs may grow along the input
            per_item = max(rate, spent / done_timed)  # the first call's one-off is not in it
            left = n_total - len(out)
            # A chunk shorter than MIN_TIMED_SECONDS is mostly the loop's own overhead: keep
            # doubling until the rate is measured, then judge the rest by it.
            timed = took >= MIN_TIMED_SECONDS or size >= MIN_TIMED_ITEMS
            if timed:
                middle = before + (size - 1) / 2
                growth = _growth(previous, rate, middle)
                previous, rate_at = (rate, middle), middle
            limit = threshold_seconds
            if waiting_threshold_seconds is not None and cpu < WAITING_CPU_SHARE * spent:
                limit = waiting_threshold_seconds
            if (timed and left * per_item > limit
                    and per_item >= MIN_PARALLEL_ITEM_SECONDS
                    and not _moving_costs_more(out[-1], per_item)
                    and not _moving_costs_more(first_input, per_item)):
                return QuickOutcome(out, it, left, per_item, min(1.0, cpu / max(spent, 1e-9)),
                                    clock() - t0, growth, rate_at)
            size = max(1, min(left, size * 2, int(CHECK_SECONDS / max(per_item, 1e-9))))
    except BaseException as exc:
        note_item(exc, len(out))
        raise
    return QuickOutcome(out, None, 0, per_item)


#: Items this much of whose time is CPU wait on something else (I/O, sleep): the planner then
#: samples only briefly, since every extra serial item is time many threads would share.
WAITING_CPU_SHARE = 0.3
#: The planner's sampling budget after the first look saw waiting items, and the least it gets
#: after a first look that already ran items for longer than its usual budget.
WAITING_SAMPLE_SECONDS = 0.005
