"""Command line: ``python -m amortune demo`` and ``python -m amortune profile module:func``.

The only module that prints. Argument parsing and presentation only; the work is the library's.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main"]


# -- demo workloads: module-level so worker processes import them by reference ---------------
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
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def demo(out: Any = sys.stdout) -> int:
    """Optimize and run built-in workloads; show each plan beside a plain loop and Pool.map."""
    import amortune

    workloads: list[tuple[str, Callable[[Any], Any], Sequence[Any]]] = [
        ("tiny x*x, 200k items", tiny, range(200_000)),
        ("2 ms CPU items x 600", cpu_2ms, range(600)),
        ("5 ms sleep items x 300", sleepy, [0.0] * 300),
        ("rising cost x 400", skewed, range(400)),
    ]
    print(amortune.probe_system().describe(), file=out)
    print(file=out)
    rows = []
    for name, func, data in workloads:
        plan = amortune.optimize(func, data)
        print(f"== {name}", file=out)
        print(plan.explain(), file=out)
        t_loop, expected = _time(functools.partial(_loop, func, data))
        repeats = 3 if t_loop < 0.5 else 1  # best of 3 where one run is too short to trust
        with multiprocessing.get_context("forkserver").Pool() as pool:
            t_pool, got_pool = _time(functools.partial(pool.map, func, data), repeats)
        t_am, got = _time(functools.partial(amortune.execute, func, data), repeats)
        t_loop = min(t_loop, _time(functools.partial(_loop, func, data), repeats - 1)[0]
                     if repeats > 1 else t_loop)
        ok = got == expected and got_pool == expected
        rows.append((name, t_loop, t_pool, t_am, plan.estimated_speedup, ok))
        print(file=out)
    print(f"{'workload':28} {'loop':>8} {'Pool.map':>9} {'amortune':>9} {'vs loop':>8} "
          f"{'predicted':>9}  correct", file=out)
    for name, t_loop, t_pool, t_am, predicted, ok in rows:
        print(f"{name:28} {t_loop:7.3f}s {t_pool:8.3f}s {t_am:8.3f}s {t_loop / t_am:7.2f}x "
              f"{predicted:8.2f}x  {'yes' if ok else 'NO'}", file=out)
    return 0 if all(r[-1] for r in rows) else 1


def _load(spec: str) -> Callable[[Any], Any]:
    module, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"expected module:function, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"amortune: cannot load {spec!r}: {exc}") from None
    if not callable(obj):
        raise SystemExit(f"amortune: {spec!r} is not callable")
    return obj  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``amortune`` and ``python -m amortune``."""
    parser = argparse.ArgumentParser(prog="amortune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="optimize and run built-in workloads, compared with a loop and Pool")
    prof = sub.add_parser("profile", help="print the plan for module:function over data")
    prof.add_argument("function", help="module:function to map")
    prof.add_argument("--range", type=int, default=1000, metavar="N",
                      help="map over range(N) (default 1000)")
    prof.add_argument("--json-lines", metavar="FILE",
                      help="map over the JSON values, one per line, in FILE")
    prof.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo()
    import amortune

    func = _load(args.function)
    data: Sequence[Any]
    if args.json_lines:
        with open(args.json_lines, encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
    else:
        data = range(args.range)
    plan = amortune.optimize(func, data)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.explain())
    return 0
