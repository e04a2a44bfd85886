"""Measurement helpers for ``run.py``: result checks, a PSS sampler, and fresh-process probes.

Some numbers need a fresh interpreter: the cold first call (no warm pool yet) and the memory
peaks of ``process_in_batches`` (a process that already held 1 GB would hide them). ``run.py``
starts this file as a script for those (``python benchmarks/_measure.py cold|pib ...``); it
prints one JSON object on stdout.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def same(got: Any, expected: Sequence[Any]) -> bool:
    """``got`` equals ``expected`` item by item (numpy arrays by value, shape and dtype)."""
    import numpy as np

    got = list(got)
    if len(got) != len(expected):
        return False
    for a, b in zip(got, expected, strict=True):
        if isinstance(b, np.ndarray):
            if not (isinstance(a, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)):
                return False
        elif a != b:
            return False
    return True


class PlanRecorder:
    """Records the plans ``amortune.execute`` used, by wrapping the planner's ``plan_run``.

    A benchmark-only peek behind the public API (``optimize`` samples afresh, so its plan can
    differ from the one a timed call ran); if the internal name moves, nothing is recorded.
    """

    def __init__(self) -> None:
        self.plans: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def recording(self, active: bool = True) -> Iterator[None]:
        import amortune._optimize as batches  # execute imports plan_run from here per call

        original = getattr(batches, "plan_run", None)
        if not active or original is None:
            yield
            return

        def spy(*args: Any, **kwargs: Any) -> Any:
            run = original(*args, **kwargs)
            plan = run.plan
            self.plans.append((f"{plan.executor} n_jobs={plan.n_jobs}", plan.chunksize))
            return run

        batches.plan_run = spy
        try:
            yield
        finally:
            batches.plan_run = original

    def summary(self) -> str:
        """``"processes n_jobs=2 chunksize 25-40 ×4, threads n_jobs=4 chunksize 1 ×1"``."""
        chunks: dict[str, list[int]] = collections.defaultdict(list)
        for kind, chunksize in self.plans:
            chunks[kind].append(chunksize)
        parts = []
        for kind, sizes in sorted(chunks.items(), key=lambda kv: -len(kv[1])):
            lo, hi = min(sizes), max(sizes)
            parts.append(f"{kind} chunksize {lo if lo == hi else f'{lo}-{hi}'} ×{len(sizes)}")
        return ", ".join(parts) or "(not recorded)"


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes on this machine have used (``/proc/stat``); None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and its descendants, reaped ones included."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class OthersLoad:
    """How many cores *other* processes kept busy while the block ran (a shared machine's noise).

    Machine-wide busy time from ``/proc/stat`` minus this process tree's CPU time, over the
    block's wall time; jiffy resolution, so only meaningful for blocks of 100 ms or more.
    """

    cores: float | None = None

    def __enter__(self) -> OthersLoad:
        self._busy, self._tree, self._t0 = (machine_busy_seconds(), tree_cpu_seconds(),
                                            time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        busy = machine_busy_seconds()
        if busy is not None and self._busy is not None and wall > 0:
            mine = tree_cpu_seconds() - self._tree
            self.cores = max(0.0, (busy - self._busy) - mine) / wall


def tree_pss() -> int:
    """Proportional set size of this process and all its descendants (workers, forkserver)."""
    import psutil

    me = psutil.Process()
    total = me.memory_full_info().pss
    for child in me.children(recursive=True):
        try:
            total += child.memory_full_info().pss
        except psutil.Error:
            pass
    return int(total)


class PssSampler:
    """Samples :func:`tree_pss` every ``interval_seconds`` in a thread; ``peak`` is the maximum."""

    def __init__(self, interval_seconds: float = 0.01) -> None:
        self.interval = interval_seconds
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_pss())
            self.samples += 1
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_pss())


def run_probe(args: list[str], *, env: dict[str, str] | None = None,
              timeout: float = 600) -> dict[str, Any]:
    """Run this file in a fresh interpreter with ``args``; return the JSON it prints."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_measure.py"), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"probe {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- fresh-process probes ------------------------------------------------------------------------


def _cold(iterations: int, n_items: int) -> dict[str, Any]:
    """First ``amortune.execute`` in a new process (pool start included), then a warm one."""
    import workloads

    import amortune

    data = [iterations + i % 7 for i in range(n_items)]
    t0 = time.perf_counter()
    amortune.execute(workloads.burn, data)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    amortune.execute(workloads.burn, data)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    list(map(workloads.burn, data))
    loop = time.perf_counter() - t0
    return {"cold": cold, "warm": warm, "loop": loop}


def _raw_write(n_items: int) -> None:
    """Write ``n_items`` MB sequentially to one file in the temp folder, fsync, remove it."""
    import tempfile

    import numpy as np
    import workloads

    path = os.path.join(tempfile.gettempdir(), "raw-write.bin")
    try:
        with open(path, "wb", buffering=0) as f:
            for i in range(n_items):
                f.write(memoryview(np.full(workloads.MB_ITEMS, float(i))).cast("B"))
            os.fsync(f.fileno())
    finally:
        os.unlink(path)


def _pib(variant: str, n_items: int, budget_bytes: int, batch_size: int) -> dict[str, Any]:
    """One ``process_in_batches`` memory/time variant; peak PSS of the process tree."""
    import warnings

    import numpy as np  # noqa: F401  (in the baseline, as in any numpy user's process)
    import workloads

    import amortune

    gc.collect()
    interpreter = tree_pss()
    if variant in ("spill", "ram"):  # a warm pool, as in a long-running process
        amortune.execute(workloads.square, range(200), executor="processes")
    time.sleep(0.2)
    baseline = tree_pss()
    out: dict[str, Any] = {"variant": variant, "interpreter_pss": interpreter,
                           "baseline_pss": baseline}
    res: Any = None
    run: Callable[[], Any]
    if variant == "loop":
        def run() -> Any:
            return list(map(workloads.full_mb, range(n_items)))
    elif variant == "spill":
        def run() -> Any:
            return amortune.process_in_batches(workloads.full_mb, range(n_items), spill="disk",
                                               max_memory_bytes=budget_bytes)
    elif variant == "ram":
        def run() -> Any:
            return amortune.process_in_batches(workloads.full_mb, range(n_items),
                                               batch_size=batch_size)
    elif variant == "raw":
        def run() -> Any:
            return _raw_write(n_items)
    else:
        raise ValueError(variant)
    with warnings.catch_warnings(record=True) as caught, PssSampler() as sampler:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        res = run()
        out["seconds"] = time.perf_counter() - t0
    out["peak_pss"] = sampler.peak
    out["samples"] = sampler.samples
    out["warnings"] = [str(w.message) for w in caught]
    if res is not None:
        out["correct"] = len(res) == n_items and all(
            r.shape == (workloads.MB_ITEMS,) and r[0] == i and r[-1] == i
            for i, r in enumerate(res))
        store = getattr(res, "_store", None)
        if store is not None:  # the batch size the spill run chose (largest segment)
            out["batch_size"] = max(s.count for s in store.segments())
            out["spill_dir"] = str(store.directory)
            res.close()
    return out


def main(argv: list[str]) -> None:
    sys.path.insert(0, HERE)
    if argv[0] == "cold":
        result = _cold(int(argv[1]), int(argv[2]))
    elif argv[0] == "pib":
        result = _pib(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
    else:
        raise SystemExit(f"unknown probe {argv[0]!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
