"""The benchmark workloads: module-level functions (workers import them by reference) and inputs.

Each :class:`Workload` names a function, a factory for a fresh input (a generator cannot be read
twice) and how to judge it. CPU-bound items are pure-Python arithmetic whose iteration count is
calibrated at start-up (:func:`calibrate_iterations`), so "2 ms" means 2 ms on the machine running
the benchmark, not on the one this was written on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Items of a 1 MB numpy array: 2**17 float64 values.
MB_ITEMS = 1 << 17


def square(x: int) -> int:
    """The tiny workload: far cheaper than any dispatch."""
    return x * x


def burn(n: int) -> int:
    """Pure-Python arithmetic, ``n`` iterations (holds the GIL, releases nothing)."""
    acc = 0
    for i in range(n):
        acc = (acc * 31 + i) % 1000003
    return acc


def full_mb(x: int) -> np.ndarray:
    """Cheap compute, 1 MB result: the cost is moving the result."""
    return np.full(MB_ITEMS, x, dtype=np.float64)


def array_sum(arr: np.ndarray) -> float:
    """Cheap compute on a 1 MB input: the cost is moving the input."""
    return float(arr.sum())


def nap(x: int) -> int:
    """Waits 5 ms without using the CPU (stands in for network or disk)."""
    time.sleep(0.005)
    return x


def calibrate_iterations(target_seconds: float = 0.002, repeats: int = 7) -> tuple[int, float]:
    """Iterations of :func:`burn` that take ``target_seconds`` here; also seconds per iteration.

    The fastest of ``repeats`` timings is used: on a shared machine, slower ones measured a
    neighbour's work, not ours.
    """
    probe = 20_000
    burn(probe)  # warm the code path
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        burn(probe)
        best = min(best, time.perf_counter() - t0)
    per_iteration = best / probe
    return max(1, round(target_seconds / per_iteration)), per_iteration


@dataclass(frozen=True)
class Workload:
    """One row of the benchmark table."""

    name: str
    func: Callable[[Any], Any]
    make_data: Callable[[], Iterable[Any]]
    n_items: int
    kind: str  # "cpu" (ideal: loop / cores), "tiny", "data" (target vs loop), "sleep"
    note: str = ""


def build(per_iteration: float, iterations_2ms: int, *, scale: float = 1.0) -> list[Workload]:
    """The benchmark's workloads; ``scale`` < 1 shrinks item counts for a smoke test."""

    def n(count: int) -> int:
        return max(10, int(count * scale))

    tiny = list(range(n(200_000)))
    homogeneous = [iterations_2ms + i % 7 for i in range(n(1000))]
    rng = np.random.default_rng(12345)
    sigma, mean_seconds = 1.5, 0.001
    mu = math.log(mean_seconds) - sigma**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    lognormal = [max(1, int(s / per_iteration)) for s in rng.lognormal(mu, sigma, n(1000))]
    n_rising = n(1000)
    rising = [max(1, int(2 * mean_seconds * (i + 0.5) / n_rising / per_iteration))
              for i in range(n_rising)]
    arrays = [np.full(MB_ITEMS, float(i)) for i in range(n(300))]
    n_gen = n(1000)

    def generator() -> Iterable[int]:
        return (iterations_2ms + i % 7 for i in range(n_gen))

    return [
        Workload("tiny", square, lambda: tiny, len(tiny), "tiny", "x*x"),
        Workload("cpu-2ms", burn, lambda: homogeneous, len(homogeneous), "cpu",
                 "~2 ms pure-Python items"),
        Workload("skew-lognormal", burn, lambda: lognormal, len(lognormal), "cpu",
                 f"lognormal sigma 1.5, mean 1 ms (max {max(lognormal) * per_iteration * 1e3:.0f} ms)"),
        Workload("skew-rising", burn, lambda: rising, len(rising), "cpu",
                 "cost rises linearly with the index, mean 1 ms"),
        Workload("1MB-results", full_mb, lambda: range(n(300)), n(300), "data",
                 "np.full(2**17, x): 1 MB out"),
        Workload("1MB-inputs", array_sum, lambda: arrays, len(arrays), "data",
                 "arr.sum() of a 1 MB array: 1 MB in"),
        Workload("sleep-5ms", nap, lambda: range(n(400)), n(400), "sleep", "time.sleep(0.005)"),
        Workload("generator-2ms", burn, generator, n_gen, "cpu",
                 "~2 ms items from a generator (no len)"),
    ]
