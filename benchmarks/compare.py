"""Two versions of amortune side by side on the warm table's workloads, in one interleaved run.

Each version runs in a long-lived process of its own (its warm pool started before the clock, as
in ``run.py``); the driver sends both the same workload in turn, alternating which goes first,
and each process times its own plain loop and then ``amortune.execute``. Both versions run the
workload functions of this checkout, with item costs calibrated once, here::

    python benchmarks/compare.py /path/to/other/checkout          # that checkout against this one
    python benchmarks/compare.py A_DIR B_DIR --reps 12 --only cpu-2ms --only sleep-5ms

On a shared machine a loop's time moves by tens of percent between repeats, so the column to
read is the paired one: the ratio of the two versions' times for the same workload, taken one
right after the other, summarised by its geometric mean and a 90% bootstrap interval. An interval
that contains 1.0 is a difference this machine cannot tell from noise.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def serve(per_iteration: float, iterations_2ms: int) -> None:
    """The per-version process: warm up, then time each workload named on stdin."""
    from _measure import same
    from workloads import build

    import amortune

    workloads = {w.name: w for w in build(per_iteration, iterations_2ms)}
    warm = workloads["cpu-2ms"]
    amortune.execute(warm.func, warm.make_data())  # starts the warm pool, imports the engine
    print(json.dumps({"ready": os.path.dirname(os.path.dirname(amortune.__file__))}), flush=True)
    expected: dict[str, list[Any]] = {}
    for line in sys.stdin:
        w = workloads[line.strip()]
        data = w.make_data()
        gc.collect()
        t0 = time.perf_counter()
        out = list(map(w.func, data))
        loop = time.perf_counter() - t0
        expected.setdefault(w.name, out)
        del out, data
        data = w.make_data()
        gc.collect()
        t0 = time.perf_counter()
        out = amortune.execute(w.func, data)
        seconds = time.perf_counter() - t0
        print(json.dumps({"loop": loop, "amortune": seconds,
                          "ok": same(out, expected[w.name])}), flush=True)
        del out, data


def start(tree: str, per_iteration: float, iterations_2ms: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(tree), HERE]))
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve", str(per_iteration),
         str(iterations_2ms)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        cwd=HERE)
    assert proc.stdout is not None
    ready = json.loads(proc.stdout.readline())["ready"]
    if os.path.realpath(ready) != os.path.realpath(tree):
        proc.kill()
        raise SystemExit(f"{tree}: the process imported amortune from {ready} instead")
    return proc


def geometric_interval(logs: list[float], rng: random.Random) -> tuple[float, float, float]:
    """Geometric mean of the paired ratios and a 90% bootstrap interval of it."""
    means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(4000))
    return (math.exp(statistics.fmean(logs)), math.exp(means[len(means) // 20]),
            math.exp(means[-len(means) // 20]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="+", help="A [B]: checkouts to compare (B: this one)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--only", action="append", default=[], metavar="NAME")
    args = ap.parse_args(argv)
    if len(args.trees) > 2:
        ap.error("give one or two checkouts")
    a, b = (args.trees + [REPO])[:2]
    sys.path.insert(0, HERE)
    from workloads import build, calibrate_iterations

    iterations_2ms, per_iteration = calibrate_iterations()
    names = args.only or [w.name for w in build(per_iteration, iterations_2ms, scale=0.01)]
    procs = {"A": start(a, per_iteration, iterations_2ms), "B": start(b, per_iteration,
                                                                     iterations_2ms)}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {k: {n: [] for n in names} for k in procs}
    try:
        for rep in range(args.reps):
            for i, name in enumerate(names):
                for k in (("A", "B") if (rep + i) % 2 == 0 else ("B", "A")):
                    p = procs[k]
                    assert p.stdin is not None and p.stdout is not None
                    p.stdin.write(name + "\n")
                    p.stdin.flush()
                    runs[k][name].append(json.loads(p.stdout.readline()))
            print(f"  repeat {rep + 1}/{args.reps} done", file=sys.stderr)
    finally:
        for p in procs.values():
            if p.stdin is not None:
                p.stdin.close()
            p.wait(60)
    rng = random.Random(1)
    print(f"A: {a}\nB: {b}\n{args.reps} interleaved repeats, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| workload | A ÷ loop | B ÷ loop | B ÷ A, paired: geometric mean | 90% interval |")
    print("|---|---|---|---|---|")
    for name in names:
        ra, rb = runs["A"][name], runs["B"][name]
        if not all(r["ok"] for r in ra + rb):
            print(f"| {name} | wrong results | | | |")
            continue
        logs = [math.log(y["amortune"] / x["amortune"]) for x, y in zip(ra, rb, strict=True)]
        mean, lo, hi = geometric_interval(logs, rng)
        to_loop = [statistics.median(r["amortune"] / r["loop"] for r in v) for v in (ra, rb)]
        print(f"| {name} | {to_loop[0]:.3f} | {to_loop[1]:.3f} | {mean:.3f} | "
              f"{lo:.3f}–{hi:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(float(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
