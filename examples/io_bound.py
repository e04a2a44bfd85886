"""Items that wait (network, disk, sleep) get many threads, not processes."""

from __future__ import annotations

import time

import amortune


def fetch(url: str) -> int:
    time.sleep(0.01)  # stands in for a network round trip
    return len(url)


if __name__ == "__main__":
    urls = [f"https://example.invalid/item/{i}" for i in range(500)]
    plan = amortune.optimize(fetch, urls)
    print(plan.explain())
    t0 = time.perf_counter()
    sizes = amortune.execute(fetch, urls)
    print(f"{len(sizes)} items in {time.perf_counter() - t0:.2f} s (a loop takes ~5 s)")
