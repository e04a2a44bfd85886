"""The warm benchmark: amortune in a long-lived process against a loop, Pool, PPE and joblib.

This is the **warm** (long-lived process) table: one process runs every measurement, so
amortune's pool and joblib's executor are started once and reused, as in a server or a notebook.
For one call per fresh process (a script, a cron job) see ``benchmarks/cold.py``.

Usage::

    python benchmarks/run.py                       # full run, prints Markdown tables
    python benchmarks/run.py --quick               # smoke test: smaller inputs, one repeat
    python benchmarks/run.py --only cpu-2ms        # one workload (or: optimize, cold, batches, pool)
    python benchmarks/run.py --write docs/benchmarks.md --note "quiet machine"
    python benchmarks/run.py --reps 7               # more repeats (default 5)

Contestants run interleaved (round-robin, the order rotated every repeat); times are medians over
the repeats and ratios are medians of per-repeat ratios, so a neighbour's burst of work hits every
contestant alike. Each contestant is timed as a user writes it: the pool's creation is included
for ``Pool`` and ``ProcessPoolExecutor``; amortune and joblib reuse their warm workers, as they do
in a long-running process (the cold first call is reported separately here, and every
contestant cold in ``benchmarks/cold.py``). On CPU-bound rows a
yardstick (``ref``: a warm pool, one static chunk per core) and the CPU other processes used show
what the machine could deliver at that moment.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import multiprocessing
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import Pool
from typing import Any

from _measure import OthersLoad, PlanRecorder, median, run_probe, same
from workloads import Workload, build, calibrate_iterations, square

import amortune

try:
    import joblib
except ImportError:  # optional contestant
    joblib = None

MB = 1 << 20


def run_loop(f: Callable[[Any], Any], data: Iterable[Any]) -> list[Any]:
    return list(map(f, data))


def run_amortune(f: Callable[[Any], Any], data: Iterable[Any]) -> list[Any]:
    return amortune.execute(f, data)


def run_pool(f: Callable[[Any], Any], data: Iterable[Any]) -> list[Any]:
    with Pool() as p:
        return p.map(f, data)


def run_executor(f: Callable[[Any], Any], data: Iterable[Any]) -> list[Any]:
    with ProcessPoolExecutor() as ex:
        return list(ex.map(f, data))


def run_joblib(f: Callable[[Any], Any], data: Iterable[Any]) -> list[Any]:
    assert joblib is not None
    return joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in data)


_REFERENCE: list[tuple[Any, int]] = []  # (pool, workers), started in main() before anything else


def run_reference(f: Callable[[Any], Any], data: Iterable[Any]) -> list[Any]:
    """The machine's practical best for even CPU work: a warm fork pool, one chunk per worker."""
    pool, workers = _REFERENCE[0]
    items = list(data)
    return pool.map(f, items, chunksize=max(1, -(-len(items) // workers)))


#: Timed only on CPU-bound rows, as a yardstick: what this machine delivers right now.
REFERENCE = "ref"

CONTESTANTS: dict[str, Callable[[Callable[[Any], Any], Iterable[Any]], list[Any]]] = {
    "loop": run_loop,
    "amortune": run_amortune,
    "Pool.map": run_pool,
    "PPE.map": run_executor,
}
if joblib is not None:
    CONTESTANTS["joblib"] = run_joblib


def bench_workload(w: Workload, reps: int, cores: int) -> dict[str, Any]:
    """Time every contestant on ``w`` ``reps`` times, interleaved; medians and checks.

    Ratios are medians of per-repeat ratios: one repeat runs every contestant back to back, so a
    neighbour's load that comes and goes cancels out of the ratio better than out of the times.
    """
    expected = run_loop(w.func, w.make_data())
    names = list(CONTESTANTS) + ([REFERENCE] if w.kind == "cpu" and _REFERENCE else [])
    run = {**CONTESTANTS, REFERENCE: run_reference}
    times: dict[str, list[float]] = {c: [] for c in names}
    wrong: set[str] = set()
    predicted: list[float] = []
    plans = PlanRecorder()
    load: list[float] = []  # cores others kept busy during the loop and amortune runs
    for rep in range(reps):
        for c in names[rep % len(names):] + names[:rep % len(names)]:
            data = w.make_data()
            gc.collect()
            with plans.recording(c == "amortune"), OthersLoad() as others:
                t0 = time.perf_counter()
                out = run[c](w.func, data)
                times[c].append(time.perf_counter() - t0)
            if others.cores is not None and c in ("loop", "amortune"):
                load.append(others.cores)
            if not same(out, expected):
                wrong.add(c)
            del out
        predicted.append(amortune.optimize(w.func, w.make_data()).estimated_speedup)
        print(f"  {w.name} rep {rep + 1}/{reps}: "
              + ", ".join(f"{c} {times[c][-1]:.3f}s" for c in names), file=sys.stderr)
    scale = cores if w.kind == "cpu" else 1  # ideal = loop / cores for CPU-bound work
    to_loop = {c: median([t / lt for t, lt in zip(times[c], times["loop"], strict=True)])
               for c in names}
    return {
        "workload": w, "seconds": {c: median(v) for c, v in times.items()},
        "to_loop": to_loop, "to_ideal": {c: r * scale for c, r in to_loop.items()},
        "wrong": sorted(wrong), "predicted": median(predicted),
        "measured": 1 / to_loop["amortune"], "plan": plans.summary(),
        "others": median(load) if load else None,
    }


def target(row: dict[str, Any]) -> tuple[str, bool]:
    """The product target for one workload row: (description, passed)."""
    kind = row["workload"].kind
    r, i = row["to_loop"]["amortune"], row["to_ideal"]["amortune"]
    others = [c for c in row["to_ideal"] if c not in ("loop", "amortune", REFERENCE)]
    best = min(others, key=lambda c: row["to_ideal"][c])
    ref = f"; best other: {best} {row['to_ideal'][best]:.2f}×" if kind == "cpu" else ""
    if REFERENCE in row["to_ideal"]:
        ref += f"; ref {row['to_ideal'][REFERENCE]:.2f}×"
    if kind == "cpu" and row["others"] is not None:
        ref += f"; other jobs kept {row['others']:.1f} cores busy"
    if kind == "tiny":
        return f"≤ 1.2× loop ({r:.2f}×)", r <= 1.2
    if kind == "data":
        return f"≤ 1.10× loop ({r:.2f}×)", r <= 1.10
    if kind == "sleep":
        return f"≤ 0.10× loop ({r:.3f}×)", r <= 0.10
    return f"≤ 1.10× ideal ({i:.2f}×{ref})", i <= 1.10


def optimize_overhead(w: Workload, runs: int = 20) -> dict[str, float]:
    """Median time of ``optimize`` on the tiny workload minus the time of the items it sampled."""
    data = w.make_data()
    per_item = median([_timed(run_loop, w.func, data) for _ in range(5)]) / w.n_items
    total, overhead = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        plan = amortune.optimize(w.func, data)
        dt = time.perf_counter() - t0
        total.append(dt)
        overhead.append(dt - plan.profile.n_sampled * per_item)
    return {"optimize": median(total), "overhead": median(overhead),
            "n_sampled": plan.profile.n_sampled, "per_item": per_item}


def _timed(fn: Callable[..., Any], *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def bench_batches(n_items: int, budget: int, reps: int) -> dict[str, Any]:
    """process_in_batches with spill vs in RAM vs the loop vs a raw write, fresh process each."""
    tmp = tempfile.mkdtemp(prefix="bench-spill-")  # private TMPDIR: spill + raw write go here
    env = {"TMPDIR": tmp}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in ("loop", "spill", "ram", "raw")}
    batch = 0
    try:
        for rep in range(reps):
            for v in ("spill", "ram", "loop", "raw"):  # spill first: it fixes the batch size
                r = run_probe(["pib", v, str(n_items), str(budget), str(batch or 1)], env=env)
                batch = batch or r.get("batch_size", 0)
                runs[v].append(r)
                print(f"  batches rep {rep + 1}/{reps} {v}: {r['seconds']:.2f}s "
                      f"peak {r['peak_pss'] / MB:.0f} MiB", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, Any] = {"n_items": n_items, "budget": budget, "batch_size": batch,
                           "correct": all(r.get("correct", True) for v in runs.values() for r in v),
                           "warnings": sorted({m for r in runs["spill"] for m in r["warnings"]}),
                           "spill_dir": os.path.dirname(runs["spill"][0].get("spill_dir", tmp))}
    for v, rs in runs.items():
        out[v] = {k: median([r[k] for r in rs])
                  for k in ("seconds", "peak_pss", "baseline_pss", "interpreter_pss")}
    return out


def bench_pool(reps: int, cores: int, n: int = 2000) -> dict[str, Any]:
    """``amortune.Pool`` against ``multiprocessing.Pool``: many small calls, pools already started.

    The drop-in's own costs: ``n`` ``apply_async`` calls then every ``get()``, and ``imap`` over
    ``n`` tiny items with each pool's default chunksize. Interleaved; who goes first alternates.
    """
    ops = ("apply_async", "imap")
    times: dict[tuple[str, str], list[float]] = {(o, c): [] for o in ops
                                                  for c in ("multiprocessing", "amortune")}
    expected = [square(i) for i in range(n)]
    makers: list[tuple[str, Callable[[], Any]]] = [
        ("multiprocessing", lambda: multiprocessing.Pool(cores)),
        ("amortune", lambda: amortune.Pool(cores))]
    for rep in range(reps):
        for name, make in makers if rep % 2 == 0 else makers[::-1]:
            with make() as pool:
                pool.apply(square, (1,))  # every pool has its workers up before the clock
                t0 = time.perf_counter()
                rs = [pool.apply_async(square, (i,)) for i in range(n)]
                out = [r.get() for r in rs]
                times["apply_async", name].append(time.perf_counter() - t0)
                assert out == expected, name
                t0 = time.perf_counter()
                out = list(pool.imap(square, range(n)))
                times["imap", name].append(time.perf_counter() - t0)
                assert out == expected, name
        print(f"  pool rep {rep + 1}/{reps}", file=sys.stderr)
    return {"n": n, "cores": cores, "reps": reps,
            "seconds": {k: median(v) for k, v in times.items()},
            "ratio": {o: median([a / m for a, m in zip(times[o, "amortune"],
                                                      times[o, "multiprocessing"], strict=True)])
                      for o in ops}}


def _pool_report(p: dict[str, Any], checks: list[tuple[str, bool]]) -> list[str]:
    sec, ratio = p["seconds"], p["ratio"]
    r = ratio["apply_async"]
    checks.append((f"Pool.apply_async × {p['n']}: amortune ≤ 1.0 × multiprocessing.Pool "
                   f"({r:.2f}×)", r <= 1.0))
    rows = [[f"`apply_async` × {p['n']}, then `get()`", f"{sec['apply_async', 'multiprocessing']:.3f}",
             f"{sec['apply_async', 'amortune']:.3f}", f"{r:.2f}×"],
            [f"`imap` over {p['n']} tiny items (default chunksize)",
             f"{sec['imap', 'multiprocessing']:.3f}", f"{sec['imap', 'amortune']:.3f}",
             f"{ratio['imap']:.2f}×"]]
    return ["", f"## Pool drop-in: {p['cores']} workers started before the clock (median of "
            f"{p['reps']} interleaved repeats)", "",
            *_table(["operation", "multiprocessing.Pool s", "amortune.Pool s",
                     "amortune ÷ multiprocessing (median of per-repeat ratios)"], rows)]


# -- report ---------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def report(rows: list[dict[str, Any]], extra: dict[str, Any], cores: int) -> list[str]:
    names = list(CONTESTANTS) + ([REFERENCE] if any(REFERENCE in r["seconds"] for r in rows) else [])
    md: list[str] = []

    def cell(r: dict[str, Any], key: str, c: str, fmt: str) -> str:
        return format(r[key][c], fmt) + ("" if key == "seconds" else "×") if c in r[key] else "–"

    checks: list[tuple[str, bool]] = []
    if rows:
        md += ["## Warm (long-lived process): wall time (median seconds)", ""]
        md += _table(["workload", "items", "ms/item (loop)", *names, "others' load"],
                     [[r["workload"].name, str(r["workload"].n_items),
                       f"{r['seconds']['loop'] / r['workload'].n_items * 1e3:.3g}",
                       *(cell(r, "seconds", c, ".3f") for c in names),
                       "–" if r["others"] is None or r["seconds"]["loop"] < 0.1
                       else f"{r['others']:.2f} cores"]
                      for r in rows])
        md += ["", "*others' load*: cores kept busy by processes outside this benchmark during the "
               "loop and amortune runs (`/proc/stat` minus this process tree, shown for rows whose "
               "loop takes 0.1 s or more), median; on an idle "
               "machine it is ~0, and the CPU-bound rows can only reach the ideal then. *ref* "
               "(CPU-bound rows only) is a yardstick, not a contestant: a warm fork pool of one "
               "worker per core, one static chunk per worker, i.e. what this machine delivered "
               "for evenly split work at that moment."]
        md += ["", "## Warm (long-lived process): ratio to the loop (median of per-repeat "
               "ratios; lower is better)", ""]
        md += _table(["workload", *names[1:]],
                     [[r["workload"].name, *(cell(r, "to_loop", c, ".2f") for c in names[1:])]
                      for r in rows])
        md += ["", f"## Warm (long-lived process): ratio to the ideal (loop / {cores} usable "
               "cores for CPU-bound rows; "
               "the loop itself for tiny, 1 MB and sleep rows)", ""]
        md += _table(["workload", *names[1:]],
                     [[r["workload"].name, *(cell(r, "to_ideal", c, ".2f") for c in names[1:])]
                      for r in rows])
        md += ["", "## Warm (long-lived process): amortune's plan, predicted vs measured "
               "speedup, correctness", ""]
        body = []
        for r in rows:
            err = (r["predicted"] - r["measured"]) / r["measured"]
            goal, ok = target(r)
            checks.append((f"{r['workload'].name}: {goal}", ok))
            checks.append((f"{r['workload'].name}: predicted within ±25% of measured "
                           f"({err:+.0%})", abs(err) <= 0.25))
            body.append([r["workload"].name, r["workload"].note, r["plan"],
                         f"{r['predicted']:.2f}×", f"{r['measured']:.2f}×", f"{err:+.0%}",
                         "all match" if not r["wrong"] else "WRONG: " + ", ".join(r["wrong"]),
                         "pass" if ok else "FAIL"])
        md += _table(["workload", "what", "plans used by the timed calls", "predicted", "measured",
                      "error", "results vs loop", "target"], body)
    if "cold" in extra:
        c = extra["cold"]
        md += ["", f"## Cold first call (fresh process, {c['n']} items of ~2 ms, median of 3 "
               "processes; every contestant cold: benchmarks/cold.py)", "",
               f"First `amortune.execute` in a new process (starts the pool): {c['cold']:.3f} s; "
               f"the same call warm: {c['warm']:.3f} s; the loop: {c['loop']:.3f} s "
               f"(cold costs {c['cold'] - c['warm']:+.3f} s once per process)."]
    if "optimize" in extra:
        o = extra["optimize"]
        ok = o["overhead"] <= 0.005
        checks.append((f"optimize() overhead ≤ 5 ms ({o['overhead'] * 1e3:.2f} ms)", ok))
        md += ["", "## optimize() overhead (tiny workload, warm process, median of 20)", "",
               f"`optimize` took {o['optimize'] * 1e3:.2f} ms, of which {o['n_sampled']} sampled "
               f"items cost {o['n_sampled'] * o['per_item'] * 1e3:.3f} ms: overhead "
               f"**{o['overhead'] * 1e3:.2f} ms** (target ≤ 5 ms: {'pass' if ok else 'FAIL'})."]
    if "batches" in extra:
        md += _batches_report(extra["batches"], checks)
    if "pool" in extra:
        md += _pool_report(extra["pool"], checks)
    if checks:
        md += ["", "## Targets (warm benchmark)", ""]
        md += _table(["target", "result"], [[t, "pass" if ok else "**FAIL**"] for t, ok in checks])
    return md


def _batches_report(b: dict[str, Any], checks: list[tuple[str, bool]]) -> list[str]:
    total = b["n_items"] * MB
    budget, sp, ram = b["budget"], b["spill"], b["ram"]
    bound = 1.3 * (budget + sp["baseline_pss"])
    checks.append((f"spill peak PSS ≤ 1.3 × (budget + baseline) ({sp['peak_pss'] / MB:.0f} MiB ≤ "
                   f"{bound / MB:.0f} MiB)", sp["peak_pss"] <= bound))
    checks.append((f"spill time ≤ 1.3 × in-RAM batches ({sp['seconds'] / ram['seconds']:.2f}×)",
                   sp["seconds"] <= 1.3 * ram["seconds"]))
    rows = []
    for v, label in (("loop", "`list(map(f, data))` (all results held)"),
                     ("spill", f"`process_in_batches(spill='disk', max_memory_bytes={budget // MB} MiB)`"),
                     ("ram", f"`process_in_batches(batch_size={b['batch_size']})`, in RAM"),
                     ("raw", "raw sequential write + fsync of the same bytes")):
        r = b[v]
        rows.append([label, f"{r['seconds']:.2f}", f"{total / r['seconds'] / MB:.0f}",
                     f"{r['peak_pss'] / MB:.0f}", f"{r['baseline_pss'] / MB:.0f}",
                     f"{r['interpreter_pss'] / MB:.0f}"])
    lines = ["", f"## process_in_batches: {b['n_items']} results of 1 MiB "
             f"({total / 2**30:.2f} GiB), budget {budget // MB} MiB", "",
             "Each variant runs in a fresh process; PSS of the process tree (caller, forkserver, "
             "workers) is sampled every 10 ms. *Baseline* is the tree just before the call (for "
             "amortune: with its warm pool started); *interpreter* is the caller alone after "
             f"imports. Spill folder and raw file share one filesystem ({b['spill_dir']}).", ""]
    lines += _table(["variant", "seconds", "MiB/s", "peak PSS MiB", "baseline MiB",
                     "interpreter MiB"], rows)
    lines += ["", f"Spill chose batches of {b['batch_size']} items; spill peak is "
              f"{sp['peak_pss'] / (budget + sp['baseline_pss']):.2f}× (budget + baseline); "
              f"spill time is {sp['seconds'] / ram['seconds']:.2f}× the in-RAM batches; results "
              f"{'all match' if b['correct'] else 'WRONG'}."]
    lines += [f"Warning seen: {w}" for w in b["warnings"]]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs, one repeat")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="a workload name, or optimize / cold / batches / pool (repeatable)")
    ap.add_argument("--reps", type=int, default=None, help="repeats (default 5, quick 1)")
    ap.add_argument("--write", metavar="PATH", help="also write the report as Markdown to PATH")
    ap.add_argument("--note", default="", help="a line to put under the report's header")
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 5)
    scale = 0.2 if args.quick else 1.0
    system = amortune.probe_system()
    cores = system.usable_cores
    iterations, per_iteration = calibrate_iterations()
    print(f"calibrated: {iterations} iterations ≈ 2 ms ({per_iteration * 1e9:.1f} ns each); "
          f"{system.describe()}", file=sys.stderr)
    workloads = build(per_iteration, iterations, scale=scale)
    known = {w.name for w in workloads} | {"optimize", "cold", "batches", "pool"}
    for name in args.only:
        if name not in known:
            ap.error(f"--only {name!r}: choose from {', '.join(sorted(known))}")
    wanted = set(args.only) or known
    load_before = os.getloadavg()

    # The yardstick pool forks first, while this process has no threads yet.
    _REFERENCE.append((multiprocessing.get_context("fork").Pool(cores), cores))
    # Warm up amortune's pool and joblib's reusable executor, as a long-running process has them.
    amortune.execute(workloads[1].func, list(workloads[1].make_data())[:50], executor="processes")
    if joblib is not None:
        run_joblib(square, range(100))
    rows = []
    for w in workloads:
        if w.name in wanted:
            print(f"{w.name}: {w.n_items} items, {reps} repeats", file=sys.stderr)
            rows.append(bench_workload(w, reps, cores))
    extra: dict[str, Any] = {}
    if "optimize" in wanted:
        extra["optimize"] = optimize_overhead(workloads[0])
    if "cold" in wanted:
        n = max(50, int(250 * scale))
        probes = [run_probe(["cold", str(iterations), str(n)]) for _ in range(3)]
        extra["cold"] = {k: median([p[k] for p in probes]) for k in probes[0]} | {"n": n}
    if "batches" in wanted:
        extra["batches"] = bench_batches(int(1000 * scale), 100 * MB, max(1, min(reps, 3)))
    if "pool" in wanted:
        extra["pool"] = bench_pool(reps, cores, n=max(200, int(2000 * scale)))
    load_after = os.getloadavg()
    _REFERENCE.pop()[0].terminate()

    md = report(rows, extra, cores)
    print("\n".join(md))
    if args.write:
        command = shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])
        header = [
            "# amortune benchmarks", "",
            "Warm table: one long-lived process runs every measurement (amortune's pool and "
            "joblib's executor reused); the cold, fresh-process table comes from "
            "`benchmarks/cold.py`.", "",
            f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            f"- machine: {system.describe()} ({platform.processor() or platform.machine()})",
            f"- Python {platform.python_version()}, amortune {amortune.__version__}, numpy "
            f"{__import__('numpy').__version__}, joblib {joblib.__version__ if joblib else 'absent'}",
            f"- command: `{command}` ({reps} interleaved repeats, medians)",
            f"- load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
            f"~2 ms = {iterations} iterations of `burn` ({per_iteration * 1e9:.1f} ns each)",
        ]
        if args.note:
            header += [f"- note: {args.note}"]
        header += ["", "Contestants: `list(map(f, data))`; `amortune.execute(f, data)` (warm "
                   "pool); `with Pool() as p: p.map(f, data)`; `with ProcessPoolExecutor() as "
                   "ex: list(ex.map(f, data))` (chunksize=1); `Parallel(n_jobs=-1)(delayed(f)(x) "
                   "for x in data)` (joblib's reusable executor warm). Pool creation is timed.", ""]
        with open(args.write, "w", encoding="utf-8") as f:
            f.write("\n".join(header + md) + "\n")
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
