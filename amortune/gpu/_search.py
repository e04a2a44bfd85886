"""Packing items into batches and the batch-size search (pure: no torch, no clock unless
given)."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .. import _device
from ._constants import BISECT_TOLERANCE, KNEE_GAIN, KNEE_PATIENCE, MARGIN, MIN_TIMING_SECONDS


def pack_batches(lengths: Sequence[int] | None, n: int, max_items: int | None,
                 max_tokens: int | None = None) -> list[tuple[int, int]]:
    """Cut ``n`` items, in order, into ``(start, stop)`` batches.

    A batch holds at most ``max_items`` items and, with ``lengths``, at most ``max_tokens``
    tokens counted with padding (items times the longest of them). An item alone always makes a
    batch, even past the budget.

    >>> pack_batches(None, 5, 2)
    [(0, 2), (2, 4), (4, 5)]
    >>> pack_batches([5, 4, 2, 2, 1], 5, None, max_tokens=8)
    [(0, 1), (1, 3), (3, 5)]
    """
    cap = max_items if max_items and max_items > 0 else n or 1
    if lengths is None or max_tokens is None:
        return [(a, min(a + cap, n)) for a in range(0, n, cap)]
    out: list[tuple[int, int]] = []
    start, longest = 0, 0
    for i in range(n):
        length = lengths[i]
        count = i - start
        widest = max(longest, length)
        full = count >= cap or (count > 0 and (count + 1) * widest > max_tokens)
        if full:
            out.append((start, i))
            start, widest = i, length
        longest = widest
    if n:
        out.append((start, n))
    return out


def typical_seconds(runs: Sequence[float]) -> float:
    """What one batch of a size takes over a whole run, from its repeated runs: the mean of all
    but the first (which pays the size's first allocations).

    A run's time is the sum of its batches, so the mean is what a size delivers. The best run,
    or even the median, would flatter small batches on a busy machine: a short batch often fits
    between two interruptions, a long one never does.

    >>> typical_seconds([9.0, 1.0, 3.0, 2.0])
    2.0
    """
    rest = runs[1:] if len(runs) >= 3 else runs
    return sum(rest) / len(rest)


def timed_repeats(once: Callable[[], float], *, repeat: bool = True,
                  min_seconds: float = MIN_TIMING_SECONDS) -> float:
    """Run ``once()`` (it returns its seconds) at least 3 times and until ``min_seconds`` have
    passed, at most 10 times, and return :func:`typical_seconds` of the runs; without
    ``repeat``, the one run's seconds."""
    runs: list[float] = []
    while not runs or (repeat and (sum(runs) < min_seconds or len(runs) < 3) and len(runs) < 10):
        runs.append(once())
    return typical_seconds(runs)


class SearchResult(NamedTuple):
    """What :func:`search_batch_size` found.

    ``size`` is the size to use (0 when a single unit does not fit), ``largest_ok`` the largest
    that ran, ``smallest_failed`` the smallest that ran out of memory, ``limited_by`` one of
    ``"memory"``, ``"throughput"``, ``"limit"`` or ``"time"``, and ``trials`` every
    ``(size, ran, seconds)`` in order.
    """

    size: int
    largest_ok: int
    smallest_failed: int | None
    limited_by: str
    trials: tuple[tuple[int, bool, float], ...]


def search_batch_size(
    run: Callable[[int], float],
    *,
    limit: int,
    start: int = 1,
    margin: float = MARGIN,
    by_throughput: bool = False,
    max_seconds: float | None = None,
    is_oom: Callable[[BaseException], bool] = _device.is_out_of_memory,
    after_oom: Callable[[], object] = gc.collect,
    clock: Callable[[], float] = time.perf_counter,
) -> SearchResult:
    """The largest batch size that runs: double from ``start`` until out of memory, then bisect.

    ``run(size)`` runs one batch of ``size`` and returns its seconds; an exception ``is_oom``
    accepts means "too big" (``after_oom`` then frees memory before the next try), any other
    propagates. Growth stops at ``limit``, after ``max_seconds``, or, with ``by_throughput``,
    once ``size / seconds`` clearly falls (the largest size within ``KNEE_GAIN`` of the best
    rate is kept). A size found by running out of memory keeps ``margin`` below the largest
    that ran.

    >>> search_batch_size(lambda b: 1.0 if b <= 100 else 1 / 0, limit=1000,
    ...                   is_oom=lambda e: isinstance(e, ZeroDivisionError), margin=0.1).size
    90
    """
    trials: list[tuple[int, bool, float]] = []
    began = clock()

    def attempt(size: int) -> float | None:
        failed = False
        try:
            seconds = run(size)
        except BaseException as exc:
            if not is_oom(exc):
                raise
            failed = True
        if failed:  # outside the except block: its traceback no longer holds the batch
            after_oom()
            trials.append((size, False, 0.0))
            return None
        trials.append((size, True, seconds))
        return seconds

    def out_of_time() -> bool:
        return max_seconds is not None and clock() - began > max_seconds

    lo, hi = 0, None
    rates: dict[int, float] = {}
    stale = 0
    limited_by = "limit"
    size = max(1, min(start, limit))
    while True:
        seconds = attempt(size)
        if seconds is None:
            hi, limited_by = size, "memory"
            break
        lo = size
        if by_throughput:
            rates[size] = rate = size / max(seconds, 1e-9)
            stale = stale + 1 if rate < max(rates.values()) * (1 - 2 * KNEE_GAIN) else 0
            if stale >= KNEE_PATIENCE:
                limited_by = "throughput"
                break
        if size >= limit:
            break
        if out_of_time():
            limited_by = "time"
            break
        size = min(size * 2, limit)
    while hi is not None and hi - lo > max(1, int(lo * BISECT_TOLERANCE)) and not out_of_time():
        mid = (lo + hi) // 2
        if attempt(mid) is None:
            hi = mid
        else:
            lo = mid
    if lo == 0:
        return SearchResult(0, 0, hi, "memory", tuple(trials))
    chosen = lo
    if hi is not None:
        chosen = max(1, math.floor(lo * (1 - margin)))
    if by_throughput and rates:
        best = max(rates.values())
        near_best = max(b for b, r in rates.items() if r >= best * (1 - KNEE_GAIN))
        if near_best < chosen:
            chosen = near_best
            if limited_by in ("limit", "time"):  # larger sizes ran, but slower
                limited_by = "throughput"
    return SearchResult(chosen, lo, hi, limited_by, tuple(trials))


class BatchSizeReport(NamedTuple):
    """What the probe found on one device.

    ``batch_size`` is the number of items per batch (with a token budget: of the longest sample
    item), ``max_tokens`` the token budget (``None`` without ``length=``), ``peak_memory_bytes``
    the device memory a batch of that size peaked at (``None`` on a CPU worker), and
    ``items_per_second`` its measured rate.
    """

    device: str
    batch_size: int
    max_tokens: int | None
    peak_memory_bytes: int | None
    items_per_second: float
    limited_by: str
    trials: tuple[tuple[int, bool, float], ...]
