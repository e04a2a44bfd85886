"""The ``demo`` and ``bench`` commands: amortune beside a plain loop and ``Pool.map``."""

from __future__ import annotations

import functools
import math
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


# Module-level, so worker processes import them by reference.
def tiny(x: int) -> int:
    """A 0.1 µs item: no pool can beat a plain loop here."""
    return x * x


def cpu_2ms(x: int) -> int:
    """About 2 ms of pure-Python arithmetic (a CPU-bound item)."""
    total = 0
    for i in range(55_000):
        total += (i * x) % 7
    return total


def sleepy(x: float) -> float:
    """Waits 5 ms, like a network or disk call (an I/O-bound item)."""
    time.sleep(0.005)
    return x


def skewed(x: int) -> int:
    """Cost grows with the index: the last items are ~10x the first (0.3 to 3 ms)."""
    n = 10_000 + 250 * x
    return sum(i % 3 for i in range(n))


def _loop(func: Callable[[Any], Any], data: Sequence[Any]) -> list[Any]:
    return list(map(func, data))


def _time(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _pool_context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else None)


def _compare(workloads: Sequence[tuple[str, Callable[[Any], Any], Sequence[Any]]],
             out: Any, *, plans: bool, repeats: int | None = None) -> int:
    """Time a loop, ``multiprocessing.Pool.map`` (pool creation included) and amortune."""
    import amortune

    print(amortune.probe_system().describe(), file=out)
    print(file=out)
    rows = []
    for name, func, data in workloads:
        plan = amortune.optimize(func, data)
        if plans:
            print(f"== {name}", file=out)
            print(plan.explain(), file=out)
            print(file=out)
        t_loop, expected = _time(functools.partial(_loop, func, data))
        reps = repeats if repeats is not None else (3 if t_loop < 0.5 else 1)
        if reps > 1:  # best of several where one run is too short to trust
            t_loop = min(t_loop, _time(functools.partial(_loop, func, data), reps - 1)[0])

        def with_pool(func: Callable[[Any], Any] = func, data: Sequence[Any] = data) -> Any:
            with _pool_context().Pool() as pool:
                return pool.map(func, data)

        t_pool, got_pool = _time(with_pool, reps)
        t_am, got = _time(functools.partial(amortune.execute, func, data), reps)
        ok = got == expected and got_pool == expected
        rows.append((name, t_loop, t_pool, t_am, plan, ok))
        out.flush()
    print(f"{'workload':28} {'loop':>8} {'Pool.map':>9} {'amortune':>9} {'vs loop':>8} "
          f"{'predicted':>9}  correct", file=out)
    for name, t_loop, t_pool, t_am, plan, ok in rows:
        print(f"{name:28} {t_loop:7.3f}s {t_pool:8.3f}s {t_am:8.3f}s {t_loop / t_am:7.2f}x "
              f"{plan.estimated_speedup:8.2f}x  {'yes' if ok else 'NO'}", file=out)
    print("\nvs loop: the loop's time over amortune's (above 1 is faster); Pool.map includes "
          "starting the pool, as a script pays it.", file=out)
    return 0 if all(r[-1] for r in rows) else 1


def demo(out: Any = sys.stdout) -> int:
    """Optimize and run built-in workloads; show each plan beside a plain loop and Pool.map."""
    return _compare([
        ("tiny x*x, 200k items", tiny, range(200_000)),
        ("2 ms CPU items x 600", cpu_2ms, range(600)),
        ("5 ms sleep items x 300", sleepy, [0.0] * 300),
        ("rising cost x 400", skewed, range(400)),
    ], out, plans=True)


def _source_benchmark() -> Path | None:
    """``benchmarks/run.py`` when amortune runs from a source checkout."""
    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / "run.py"
    return script if script.is_file() and (root / "pyproject.toml").is_file() else None


def bench(*, quick: bool = False, builtin: bool = False, out: Any = sys.stdout) -> int:
    """``benchmarks/run.py`` in a source checkout, else a built-in comparison."""
    script = None if builtin else _source_benchmark()
    if script is not None:
        import subprocess

        cmd = [sys.executable, str(script), *(["--quick"] if quick else [])]
        print(f"running {script}{' --quick' if quick else ''}", file=sys.stderr, flush=True)
        return subprocess.call(cmd, cwd=script.parent.parent)
    scale = 4 if quick else 1
    return _compare([
        (f"tiny x*x, {200_000 // scale // 1000}k items", tiny, range(200_000 // scale)),
        (f"2 ms CPU items x {600 // scale}", cpu_2ms, range(600 // scale)),
        (f"5 ms sleep items x {300 // scale}", sleepy, [0.0] * (300 // scale)),
        (f"rising cost x {400 // scale}", skewed, range(400 // scale)),
    ], out, plans=False, repeats=1 if quick else None)
