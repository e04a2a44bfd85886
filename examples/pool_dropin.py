"""Code written for multiprocessing.Pool runs unchanged on amortune.Pool (chunksize tuned)."""

from __future__ import annotations

import amortune


def work(x: int) -> int:
    return sum(i * i for i in range(x % 1000))


if __name__ == "__main__":
    with amortune.Pool() as pool:  # was: multiprocessing.Pool()
        squares = pool.map(work, range(5_000))
        lazy = pool.imap(work, range(100))
        first = next(lazy)
        total = pool.apply_async(sum, (squares,)).get(timeout=10)
    print(first, total)
