"""Measure the constants of amortune's cost model on this machine; print them beside the code's.

Usage: ``python benchmarks/calibrate.py [--quick]``. Each constant of ``amortune/_model.py`` (and
the start-up defaults in ``amortune/_start.py``) names the measurement behind it; this
script is that measurement, through the backends themselves (``ProcessBackend``,
``ThreadBackend``, ``submit(ChunkTask(...))``). Medians of many repeats; on a shared machine run
it twice.

numpy is imported only inside functions: the forkserver preloads this module, and an idle worker's
memory must not include numpy unless the function imports it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from amortune import _model
from amortune._config import default_start_method
from amortune._start import _DEFAULTS as _DEFAULT_START_COSTS
from amortune.backends._base import ChunkTask, FunctionRef
from amortune.backends.processes import ProcessBackend
from amortune.backends.threads import ThreadBackend

MB = 1 << 20


def _median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _empty(fn: FunctionRef) -> ChunkTask:
    """A chunk of no items: only the round trip is measured."""
    return ChunkTask(fn, [], 0)


def process_dispatch(repeats: int) -> tuple[float, float]:
    """Empty-chunk round trip through ProcessBackend: one at a time, and pipelined over 2 workers."""
    fn = FunctionRef(abs)
    with ProcessBackend(1, start_method=default_start_method()) as be:
        be.submit(_empty(fn)).result()  # start the worker, send the function
        latency = _median_time(lambda: be.submit(_empty(fn)).result(), repeats)
    with ProcessBackend(2, start_method=default_start_method()) as be:
        wait([be.submit(_empty(fn)) for _ in range(4)])
        n = repeats * 4
        t0 = time.perf_counter()
        wait([be.submit(_empty(fn)) for _ in range(n)])
        pipelined = (time.perf_counter() - t0) / n
    return latency, pipelined


def thread_dispatch(repeats: int) -> tuple[float, float]:
    """Empty-chunk round trip through ThreadBackend, one at a time and pipelined."""
    fn = FunctionRef(abs)
    be = ThreadBackend(1)
    try:
        be.submit(_empty(fn)).result()
        latency = _median_time(lambda: be.submit(_empty(fn)).result(), repeats)
        n = repeats * 4
        t0 = time.perf_counter()
        wait([be.submit(_empty(fn)) for _ in range(n)])
        pipelined = (time.perf_counter() - t0) / n
    finally:
        be.shutdown()
    return latency, pipelined


def thread_start(n_threads: int = 64, repeats: int = 5) -> float:
    """Seconds per extra thread when a ThreadPoolExecutor grows to ``n_threads`` busy threads."""
    results = []
    for _ in range(repeats):
        gate = threading.Event()
        ex = ThreadPoolExecutor(max_workers=n_threads)
        t0 = time.perf_counter()
        futures = [ex.submit(gate.wait) for _ in range(n_threads)]  # each submit starts a thread
        elapsed = time.perf_counter() - t0
        gate.set()
        wait(futures)
        ex.shutdown()
        results.append(elapsed / n_threads)
    return statistics.median(results)


def _pipe_peer(conn: Any) -> None:
    """Child side of :func:`pipe_throughput`: ack what arrives, send what is asked for."""
    while True:
        msg = conn.recv_bytes()
        if msg == b"stop":
            return
        if msg.startswith(b"send "):
            conn.send_bytes(bytes(int(msg[5:])))
        else:
            conn.send_bytes(b"k")


def pipe_throughput(sizes_mb: tuple[int, ...], repeats: int) -> dict[int, tuple[float, float]]:
    """Bytes/s of send_bytes/recv_bytes between processes: {MB: (caller→worker, worker→caller)}."""
    ctx = mp.get_context(default_start_method())
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_pipe_peer, args=(child,), daemon=True)
    proc.start()
    child.close()
    out = {}
    try:
        for mb in sizes_mb:
            buf = bytes(mb * MB)

            def to_worker(buf: bytes = buf) -> None:
                parent.send_bytes(buf)
                parent.recv_bytes()

            def to_caller(mb: int = mb) -> None:
                parent.send_bytes(b"send %d" % (mb * MB))
                parent.recv_bytes()

            to_worker()
            to_caller()
            out[mb] = (mb * MB / _median_time(to_worker, repeats),
                       mb * MB / _median_time(to_caller, repeats))
    finally:
        parent.send_bytes(b"stop")
        proc.join(5)
        parent.close()
    return out


def worker_start(method: str, repeats: int) -> dict[str, float]:
    """ProcessBackend start-up until ``n`` workers are ready, and the RSS of an idle worker."""
    import psutil

    def ready_after(n: int) -> tuple[float, ProcessBackend]:
        t0 = time.perf_counter()
        be = ProcessBackend(n, start_method=method)
        while be.warm_workers < n:
            if time.perf_counter() - t0 > 120:
                be.shutdown(wait=False, kill=True)
                raise RuntimeError(f"{n} {method} workers not ready after 120 s")
            time.sleep(0.0005)
        return time.perf_counter() - t0, be

    first_ever, be = ready_after(1)
    be.shutdown()
    one, two, rss, uss = [], [], [], []
    for _ in range(repeats):
        t, be = ready_after(1)
        one.append(t)
        be.shutdown()
        t, be = ready_after(2)
        two.append(t)
        for pid in be.pids():
            info = psutil.Process(pid).memory_full_info()
            rss.append(info.rss)
            uss.append(info.uss)
        be.shutdown()
    return {"first_ever": first_ever, "first": statistics.median(one),
            "per_extra": statistics.median(two) - statistics.median(one),
            "rss": statistics.median(rss), "uss": statistics.median(uss)}


def forkserver_without_main(repeats: int, preload: tuple[str, ...] = ()) -> dict[str, float]:
    """Forkserver start-up when ``__main__`` has no file (``python -c``), optionally preloading.

    On Python < 3.13 the forkserver never preloads ``__main__`` (CPython gh-126631/gh-137996),
    so each worker re-runs the main script's imports; this shows the cost without them, and with
    the worker's own modules imported once in the server (``set_forkserver_preload``).
    """
    import json
    import subprocess

    code = (
        "import json, multiprocessing, sys\n"
        f"if {list(preload)!r}: multiprocessing.set_forkserver_preload({list(preload)!r})\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "from calibrate import worker_start\n"
        f"print(json.dumps(worker_start('forkserver', {repeats})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def worker_rss_with_numpy() -> float:
    """RSS of a worker after running a function whose module imports numpy."""
    import psutil

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import workloads

    with ProcessBackend(1, start_method=default_start_method()) as be:
        be.submit(ChunkTask(FunctionRef(workloads.square), [3], 0)).result()
        return float(psutil.Process(be.pids()[0]).memory_info().rss)


def unpickle_over_pickle(repeats: int) -> dict[str, float]:
    """loads time / dumps time for a 1 MB array, a list of 10k ints and a list of 1k strings."""
    import numpy as np

    objs = {"1 MB array": np.ones(1 << 17), "10k ints": list(range(10_000)),
            "1k strings": [f"item-{i}" * 4 for i in range(1000)]}
    out = {}
    for name, obj in objs.items():
        blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        dump = _median_time(lambda obj=obj: pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL),
                            repeats)
        load = _median_time(lambda blob=blob: pickle.loads(blob), repeats)
        out[name] = load / dump
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args()
    reps = 50 if args.quick else 300
    rows: list[tuple[str, str, str]] = []

    def row(name: str, measured: str, code: str) -> None:
        rows.append((name, measured, code))
        print(f"{name:<46} {measured:<34} {code}", file=sys.stderr)

    lat, pipe = process_dispatch(reps)
    row("PROCESS_DISPATCH_SECONDS", f"{lat * 1e6:.0f} µs latency, {pipe * 1e6:.0f} µs pipelined",
        f"{_model.PROCESS_DISPATCH_SECONDS * 1e6:.0f} µs")
    lat, pipe = thread_dispatch(reps)
    row("THREAD_DISPATCH_SECONDS", f"{lat * 1e6:.0f} µs latency, {pipe * 1e6:.0f} µs pipelined",
        f"{_model.THREAD_DISPATCH_SECONDS * 1e6:.0f} µs")
    row("THREAD_START_SECONDS", f"{thread_start() * 1e6:.0f} µs per thread",
        f"{_model.THREAD_START_SECONDS * 1e6:.0f} µs")
    sizes = (1, 4, 16) if args.quick else (1, 4, 16, 64)
    for mb, (down, up) in pipe_throughput(sizes, 5 if args.quick else 15).items():
        row(f"PIPE_BYTES_PER_SECOND ({mb} MB)",
            f"{down / 1e9:.2f} GB/s to worker, {up / 1e9:.2f} GB/s back",
            f"{_model.PIPE_BYTES_PER_SECOND / 1e9:.2f} GB/s")
    for name, ratio in unpickle_over_pickle(20 if args.quick else 100).items():
        row(f"UNPICKLE_OVER_PICKLE ({name})", f"{ratio:.2f}", f"{_model.UNPICKLE_OVER_PICKLE:.2f}")
    base = None
    for method in mp.get_all_start_methods():
        s = worker_start(method, 2 if args.quick else 5)
        first, per = _DEFAULT_START_COSTS.get(method, (float("nan"), float("nan")))
        row(f"start {method}: first worker / each extra",
            f"{s['first'] * 1e3:.1f} / {s['per_extra'] * 1e3:.1f} ms "
            f"(first ever {s['first_ever'] * 1e3:.0f} ms)",
            f"{first * 1e3:.1f} / {per * 1e3:.1f} ms (_start.py)")
        if method == default_start_method():
            base = s
    if "forkserver" in mp.get_all_start_methods():
        first, per = _DEFAULT_START_COSTS["forkserver"]
        for label, preload in (("`python -c` main", ()),
                               ("`python -c` main, worker modules preloaded",
                                ("amortune._worker", "amortune.backends.processes",
                                 "ctypes"))):
            s = forkserver_without_main(2 if args.quick else 5, preload)
            row(f"start forkserver, {label}",
                f"{s['first'] * 1e3:.1f} / {s['per_extra'] * 1e3:.1f} ms "
                f"(first ever {s['first_ever'] * 1e3:.0f} ms)",
                f"{first * 1e3:.1f} / {per * 1e3:.1f} ms (_start.py)")
    if base is not None:
        row("WORKER_BASE_BYTES (idle worker)",
            f"RSS {base['rss'] / MB:.0f} MiB, USS {base['uss'] / MB:.0f} MiB",
            f"{_model.WORKER_BASE_BYTES / MB:.0f} MiB")
    row("WORKER_BASE_BYTES (worker that imported numpy)",
        f"RSS {worker_rss_with_numpy() / MB:.0f} MiB", f"{_model.WORKER_BASE_BYTES / MB:.0f} MiB")

    print("\n| constant | measured | in the code |\n|---|---|---|")
    for name, measured, code in rows:
        print(f"| {name} | {measured} | {code} |")


if __name__ == "__main__":
    main()
