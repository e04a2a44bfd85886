"""Plan, explain and run: the three calls most programs need."""

from __future__ import annotations

import math

import amortune


def simulate_particle(seed: int) -> float:
    """About a millisecond of pure-Python arithmetic."""
    x = float(seed)
    for i in range(10_000):
        x = math.sin(x + i) * 0.5
    return x


if __name__ == "__main__":
    data = range(2_000)
    plan = amortune.optimize(simulate_particle, data)
    print(plan.explain())
    results = amortune.execute(simulate_particle, data, progress=True)
    assert results == list(map(simulate_particle, data))
    print(f"{len(results)} results, same as a plain loop")
