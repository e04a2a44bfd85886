"""amortune on a Dask cluster, beside plain ``client.map`` and joblib's Dask backend.

One local cluster of two single-threaded worker processes serves every contestant. Workloads:
1,000 tiny items (``x * x``) and 1,000 items that each burn 2 ms of CPU. Contestants run
interleaved, in a rotating order, repeat after repeat (after one warm-up round that is not
counted); the table shows medians in seconds and the ratios the targets are about::

    python benchmarks/dask_bench.py            # 7 repeats
    python benchmarks/dask_bench.py --quick    # 3 repeats

*ideal* is the 2 ms row's total work divided by the number of worker threads: what two workers
would take with no overhead at all. *ref* is a yardstick measured in the same rounds: one task
per worker with an equal share, submitted at once, i.e. what the cluster delivered for evenly
split work at that moment (it moves with the machine's load; *ideal* does not).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

N_ITEMS = 1000
SPIN_SECONDS = 0.002
N_WORKERS = 2
#: The second amortune column: chunks of this many seconds instead of the default 0.05 (each
#: Dask task costs a few milliseconds, so longer chunks pay it less often).
LONG_CHUNK_SECONDS = 0.2


def tiny(x: int) -> int:
    return x * x


def spin(x: int) -> int:
    """Burn ``SPIN_SECONDS`` of CPU."""
    end = time.perf_counter() + SPIN_SECONDS
    while time.perf_counter() < end:
        pass
    return x


def run_amortune(client: Any, func: Callable[[int], int], data: list[int]) -> list[int]:
    import amortune

    return amortune.execute(func, data, backend=client)


def run_amortune_long_chunks(client: Any, func: Callable[[int], int],
                             data: list[int]) -> list[int]:
    import amortune

    config = amortune.Config.from_env(target_chunk_seconds=LONG_CHUNK_SECONDS)
    return amortune.execute(func, data, backend=client, config=config)


def run_client_map(client: Any, func: Callable[[int], int], data: list[int]) -> list[int]:
    futures = client.map(func, data, pure=False)
    try:
        return list(client.gather(futures))
    finally:
        del futures


def _apply(func: Callable[[int], int], items: list[int]) -> list[int]:
    return [func(x) for x in items]


def run_reference(client: Any, func: Callable[[int], int], data: list[int]) -> list[int]:
    """The yardstick: one task per worker with an equal share, submitted at once."""
    step = -(-len(data) // N_WORKERS)
    futures = [client.submit(_apply, func, data[i:i + step], pure=False)
               for i in range(0, len(data), step)]
    try:
        return [r for part in client.gather(futures) for r in part]
    finally:
        del futures


def run_joblib(client: Any, func: Callable[[int], int], data: list[int]) -> list[int]:
    import joblib

    with joblib.parallel_config(backend="dask"):
        return list(joblib.Parallel()(joblib.delayed(func)(x) for x in data))


CONTESTANTS: dict[str, Callable[[Any, Callable[[int], int], list[int]], list[int]]] = {
    "amortune": run_amortune,
    f"amortune ({LONG_CHUNK_SECONDS:g} s chunks)": run_amortune_long_chunks,
    "client.map": run_client_map,
    "joblib-dask": run_joblib,
    "ref": run_reference,
}
WORKLOADS: dict[str, Callable[[int], int]] = {"tiny": tiny, "cpu-2ms": spin}


def measure(client: Any, repeats: int) -> dict[tuple[str, str], list[float]]:
    """Seconds per (workload, contestant), interleaved and in a rotating order."""
    data = list(range(N_ITEMS))
    times: dict[tuple[str, str], list[float]] = {}
    names = list(CONTESTANTS)
    for round_no in range(repeats + 1):  # round 0 warms every path up and is not counted
        for workload, func in WORKLOADS.items():
            expected = [func(x) for x in data] if func is tiny else data
            shift = round_no % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                out = CONTESTANTS[name](client, func, data)
                seconds = time.perf_counter() - t0
                if out != expected:
                    raise AssertionError(f"{name} returned wrong results for {workload}")
                if round_no:
                    times.setdefault((workload, name), []).append(seconds)
        if round_no:
            print(f"  round {round_no}/{repeats} done", file=sys.stderr)
    return times


def table(times: dict[tuple[str, str], list[float]]) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    ideal = N_ITEMS * SPIN_SECONDS / N_WORKERS
    names = list(CONTESTANTS)
    long_name = names[1]
    lines = [
        "| workload | " + " | ".join(names) + " | ideal | client.map / amortune "
        "| amortune / ideal | amortune / ref | joblib-dask / amortune |",
        "|---|" + "---|" * (len(names) + 5),
    ]
    for workload in WORKLOADS:
        a, a2, m, j, r = (med[(workload, n)] for n in names)
        is_spin = workload == "cpu-2ms"

        def both(x: float, y: float, fmt: str) -> str:
            return f"{fmt.format(x)} ({fmt.format(y)})"

        lines.append(
            f"| {workload} | {a:.3f} s | {a2:.3f} s | {m:.3f} s | {j:.3f} s | {r:.3f} s | "
            f"{f'{ideal:.3f} s' if is_spin else '–'} | {both(m / a, m / a2, '{:.1f}×')} | "
            f"{both(a / ideal, a2 / ideal, '{:.2f}×') if is_spin else '–'} | "
            f"{both(a / r, a2 / r, '{:.2f}×')} | {both(j / a, j / a2, '{:.2f}×')} |")
    lines.append("")
    lines.append(f"Ratios: amortune with its defaults, in brackets {long_name}. *ref* is a "
                 f"yardstick, not a contestant: one task per worker with an equal share, "
                 f"submitted at once (what the cluster delivered for evenly split work at that "
                 f"moment); *ideal* is total work / {N_WORKERS} workers.")
    return "\n".join(lines)


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--repeats", type=int, default=None, help="counted repeats")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)

    import dask
    import joblib

    import amortune

    distributed: Any = __import__("distributed")  # typed loosely: its API has no annotations

    cluster = distributed.LocalCluster(
        n_workers=N_WORKERS, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, silence_logs=logging.ERROR)
    client = distributed.Client(cluster)
    try:
        client.wait_for_workers(N_WORKERS, timeout=60)
        print(f"# Dask backend benchmark: {N_ITEMS} items, {N_WORKERS} single-threaded Dask "
              f"worker processes on this machine, medians of {repeats} interleaved repeats")
        print(f"# Python {platform.python_version()}, amortune {amortune.__version__}, "
              f"dask {getattr(dask, '__version__', '?')}, distributed {distributed.__version__}, "
              f"joblib {joblib.__version__}")
        load0 = _load()
        times = measure(client, repeats)
        print(f"# load average (1 min) {load0} before, {_load()} after: other programs' CPU "
              "use shows in the times")
        print()
        print(table(times))
        print()
        for (workload, name), values in sorted(times.items()):
            print(f"# {workload:8s} {name:12s} " + " ".join(f"{v:.3f}" for v in values))
    finally:
        client.close()
        cluster.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
