"""Why is my parallel map slow? Time it, read the plan, then run the plan.

The usual culprit is many cheap items sent to workers one at a time: every item pays a round
trip to a worker process (``ProcessPoolExecutor.map`` sends one item per task by default), and
the round trips cost more than the work. ``amortune.optimize`` measures the item on a few
samples and says what would pay; ``amortune.execute`` runs that plan.

    python examples/diagnose_slow_map.py

For a timeline of where each worker's time went, run the same function from the command line:

    cd examples && amortune run diagnose_slow_map:score --range 10000 --out scores.jsonl \\
        --report run.html
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor

import amortune


def score(x: int) -> float:
    """About 20 µs of arithmetic: a cheap item."""
    total = 0.0
    for i in range(300):
        total += (x * i) % 7
    return total


def timed(label: str, run):
    t0 = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - t0
    print(f"{label:34} {seconds:6.2f} s")
    return out, seconds


if __name__ == "__main__":
    data = range(10_000)
    print("1. the map as written")
    with ProcessPoolExecutor() as ex:
        expected, slow = timed("ProcessPoolExecutor.map", lambda: list(ex.map(score, data)))
    _, loop = timed("plain loop", lambda: list(map(score, data)))

    print("\n2. what the work costs, and what would pay")
    plan = amortune.optimize(score, data)
    print(plan.explain())

    print("\n3. the plan, run")
    results, fast = timed(f"amortune.execute ({plan.executor})",
                          lambda: amortune.execute(score, data))
    assert results == expected
    print(f"\namortune was {slow / fast:.1f}x faster than ProcessPoolExecutor.map here, "
          f"with the same {len(results)} results")
