"""Benchmark of the model mode on the CPU: ``gpu.map_model`` against plain loops, and ``Batcher``
against calling the function once per item.

Run: ``python benchmarks/gpu_bench.py [--quick] [--json out.json]``

Workloads, built here: an MLP over fixed-size vectors, and a masked 1-D conv net over ragged
sequences (``length=len``). For each, items/s of

* a plain loop calling the model on one item at a time (batch 1),
* plain loops over fixed batches of 8, 32, 128 and 512 items in input order (for the ragged
  workload also sorted longest first, shown for reference). Batches of 32 and more run the whole
  input, as ``map_model`` does: a loop's rate falls as its input grows (a million output tensors
  make the garbage collector and the caches work harder: batch 128 runs about 20 % slower over
  the whole MLP input than over a fifth of it), so a part would flatter it. The slow loops
  (batch 1 and 8) run a part, which can only flatter them,
* ``map_model(devices="cpu")`` with its batch size found, end to end. With one CPU worker (a
  machine of fewer than eight cores) it runs in this process: the model loads here and the
  batch-size search times batches of the input itself, whose outputs are kept. The search's
  share of the run is shown apart (from amortune's log), and so is a one-batch call;
* for reference, ``map_model`` in a spawned worker process (``timeout=`` given, which needs a
  worker that can be replaced): a fresh interpreter importing torch, the model load, the probe
  on sample copies, the run, the shutdown; its start-up and probe are shown apart.

Each rate is the best of three runs (one with ``--quick``), ``map_model``'s too; the runs are
interleaved (every round runs each contestant once), so a slow spell of a shared machine does
not fall on one contestant's runs alone. Targets:
``map_model`` at least 5x the batch-1 loop and at least 0.9x the best fixed batch.

``Batcher``: four threads submit items and wait for their results (one, or sixteen, outstanding
per thread); the batched function is the MLP on a stacked numpy batch, on one torch thread per
call (the four clients already share the cores). Reported: latency
percentiles, from ``submit`` to the future's completion (a done-callback's timestamp, so that a
client still busy submitting does not add its own delay to results it reads later), and
throughput, against the four threads calling the function per item.
Target: p99 latency at most ``max_wait`` plus twice the measured batch time.

The loops and ``map_model`` in this process use the same torch threads: by default torch's own
default (capped at the usable cores), which is what a plain loop in a script gets and what
``map_model`` keeps when it runs in this process. ``--loop-threads 1`` runs everything on one
thread, as many as a spawned CPU worker gets on two cores; ``--cores N`` pins everything to N
cores. Wall-clock numbers on a shared machine are noisy: torch threads on
cores that other processes also use stall each other (an operation waits for a descheduled
thread), so the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from amortune import gpu  # noqa: E402
from amortune._batcher import Batcher  # noqa: E402

FIXED = (8, 32, 128, 512)
#: The Batcher's clients are four threads on a small machine: each call of the model gets one
#: torch thread, or the clients' and torch's threads would contend for the same cores.
BATCHER_TORCH_THREADS = 1
IN, HIDDEN, OUT = 64, 512, 10
CHANNELS = 32


def make_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, OUT)).eval()


class ConvNet(torch.nn.Module):
    """Two masked 1-D convolutions and a masked mean over ragged sequences of scalars."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(1, CHANNELS)
        self.conv1 = torch.nn.Conv1d(CHANNELS, CHANNELS, 5, padding=2)
        self.conv2 = torch.nn.Conv1d(CHANNELS, CHANNELS, 5, padding=2)
        self.head = torch.nn.Linear(CHANNELS, OUT)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(values.shape[1], device=values.device)
        mask = (positions[None, :] < lengths[:, None]).unsqueeze(1).to(values.dtype)
        h = self.embed(values.unsqueeze(-1)).transpose(1, 2) * mask
        h = torch.relu(self.conv1(h)) * mask
        h = torch.relu(self.conv2(h)) * mask
        return self.head(h.sum(2) / lengths[:, None].to(values.dtype))


def make_conv() -> torch.nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def mlp_data(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return list(torch.rand(n, IN, generator=g).unbind(0))


def ragged_data(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(16, 257, (n,), generator=g)
    return [torch.rand(int(k), generator=g) for k in lengths]


def run_fixed(model: torch.nn.Module, data: list[torch.Tensor], size: int, ragged: bool,
              sort: bool = False) -> list[torch.Tensor]:
    order = sorted(range(len(data)), key=lambda i: -len(data[i])) if sort else range(len(data))
    items = [data[i] for i in order]
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for a in range(0, len(items), size):
            chunk = items[a:a + size]
            if ragged:
                lengths = torch.tensor([len(x) for x in chunk])
                batch = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True)
                out.extend(model(batch, lengths).unbind(0))
            else:
                out.extend(model(torch.stack(chunk)).unbind(0))
    if sort:
        back: list[torch.Tensor] = [torch.empty(0)] * len(data)
        for pos, i in enumerate(order):
            back[i] = out[pos]
        out = back
    return out


def run_one_by_one(model: torch.nn.Module, data: list[torch.Tensor], ragged: bool) -> list:
    with torch.inference_mode():
        if ragged:
            return [model(x[None], torch.tensor([len(x)]))[0] for x in data]
        return [model(x[None])[0] for x in data]


def interleaved(contestants: dict[str, tuple[Callable[[], object], int]], repeats: int
                ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Items/s of each contestant, best of ``repeats``, the repeats interleaved (each round runs
    every contestant once, in a rotated order), so a slow spell of a shared machine hits all of
    them alike instead of one contestant's runs. Also every run's seconds, by name."""
    names = list(contestants)
    walls: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, _ = contestants[name]
            began = time.perf_counter()
            fn()
            walls[name].append(time.perf_counter() - began)
    return {k: contestants[k][1] / min(walls[k]) for k in names}, walls


def bench_map_model(name: str, factory, data: list[torch.Tensor], ragged: bool,
                    quick: bool) -> dict:
    repeats = 1 if quick else 3
    model = factory()
    # A rate falls as the input grows: the contestants for the best fixed batch run all of it;
    # the slow loops run a part, which only flatters them.
    one_by_one = data[: len(data) // 40]
    kwargs = {"length": len} if ragged else {}
    contestants: dict[str, tuple[Callable[[], object], int]] = {
        "loop, batch 1": (lambda: run_one_by_one(model, one_by_one, ragged), len(one_by_one))}
    for size in FIXED:
        part = one_by_one if size == 8 else data
        contestants[f"loop, batch {size}"] = (
            lambda s=size, d=part: run_fixed(model, d, s, ragged), len(part))
    if ragged:
        for size in FIXED:
            contestants[f"loop, batch {size}, longest first"] = (
                lambda s=size: run_fixed(model, data, s, ragged, sort=True), len(data))
    outputs: list[list[torch.Tensor]] = []
    contestants["map_model (end to end)"] = (
        lambda: outputs.append(gpu.map_model(factory, data, devices="cpu", **kwargs))
        if not outputs else gpu.map_model(factory, data, devices="cpu", **kwargs),
        len(data))
    kwargs = {"length": len} if ragged else {}
    logged: list[str] = []
    handler, level = _Capture(logged), gpu.log.level
    gpu.log.addHandler(handler)
    gpu.log.setLevel(logging.INFO)
    try:
        rows, walls_by = interleaved(contestants, repeats)
        walls = walls_by["map_model (end to end)"]
        out = outputs[0]
        here = list(logged)
        began = time.perf_counter()
        gpu.map_model(factory, data[:64], devices="cpu", **kwargs)
        startup = time.perf_counter() - began
        del logged[:]
        began = time.perf_counter()
        spawned = gpu.map_model(factory, data, devices=["cpu"], timeout=3600.0, **kwargs)
        spawned_wall = time.perf_counter() - began
        there = list(logged)
    finally:
        gpu.log.removeHandler(handler)
        gpu.log.setLevel(level)
    reference = run_fixed(model, data, 512, ragged)
    for got in (out, spawned):
        assert got is not None and torch.allclose(torch.stack(got), torch.stack(reference),
                                                  atol=1e-4), "map_model results differ"
    wall = min(walls)
    searched = [(int(k), float(s)) for m in here
                for k, s in re.findall(r"searched on (\d+) items in ([\d.]+) s", m)]
    ran = [float(x) for m in there for x in re.findall(r"batches in ([\d.]+) s", m)]
    probed = [float(x) for m in there for x in re.findall(r"probed in ([\d.]+) s", m)]
    busy = [float(x) for m in there for x in re.findall(r"workers busy ([\d.]+) s", m)]
    rows["map_model in a worker process (end to end)"] = len(data) / spawned_wall
    rows["map_model in a worker process (after start-up and probe)"] = len(data) / ran[0]
    fixed = {k: v for k, v in rows.items() if k.startswith("loop, batch") and "first" not in k
             and k != "loop, batch 1"}
    best_name = max(fixed, key=fixed.__getitem__)
    fastest = walls.index(wall)
    return {"workload": name, "items": len(data), "items_per_second": rows,
            "map_model_seconds": wall, "startup_seconds": startup,
            "search_items": searched[fastest][0] if searched else 0,
            "search_seconds": searched[fastest][1] if searched else 0.0,
            "spawned_seconds": spawned_wall,
            "spawned_startup_and_probe_seconds": probed[0] if probed else 0.0,
            "spawned_worker_busy_fraction": busy[0] / ran[0] if busy else 0.0,
            "found": [m for m in here if m.startswith("amortune: device")][fastest:][:1],
            "found_spawned": [m for m in there if "batch size" in m],
            "vs_batch1": rows["map_model (end to end)"] / rows["loop, batch 1"],
            "vs_best_fixed": rows["map_model (end to end)"] / fixed[best_name],
            "best_fixed": best_name}


class _Capture(logging.Handler):
    """Keeps amortune's log messages (the batch size each device found)."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.INFO)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def bench_batcher(quick: bool) -> dict:
    model = make_mlp()

    capped = threading.local()

    def fn(batch: np.ndarray) -> np.ndarray:
        if not getattr(capped, "done", False):  # OpenMP's setting is per thread
            torch.set_num_threads(BATCHER_TORCH_THREADS)
            capped.done = True
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    per_thread = 500 if quick else 3000
    g = np.random.default_rng(3)
    items = [g.random(IN, dtype=np.float32) for _ in range(per_thread)]
    max_wait = 0.002
    out: dict = {"max_wait_seconds": max_wait, "threads": 4, "items_per_thread": per_thread}

    def clients(submit, window: int) -> tuple[list[float], float]:
        latencies: list[float] = []
        lock = threading.Lock()

        def client() -> None:
            mine: list[float] = []
            pending: list[tuple[float, object, list[float]]] = []
            for x in items:
                began, fut = time.perf_counter(), submit(x)
                pending.append((began, fut, _stamp(fut)))
                if len(pending) >= window:
                    mine.append(_latency(*pending.pop(0)))
            mine.extend(_latency(*p) for p in pending)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client) for _ in range(4)]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return latencies, 4 * per_thread / (time.perf_counter() - began)

    for window in (1, 16):
        with Batcher(fn, max_batch_size=64, max_wait=max_wait) as b:
            lat, thr = clients(b.submit, window)
            stats = b.stats()
        batch_time = stats["batch_seconds_p50"]
        p99 = percentile(lat, 0.99)
        out[f"batcher, {window} outstanding per thread"] = {
            "throughput": thr, "p50": percentile(lat, 0.5), "p95": percentile(lat, 0.95),
            "p99": p99, "batch_size_mean": stats["batch_size_mean"],
            "batch_seconds_p50": batch_time, "p99_bound": max_wait + 2 * batch_time,
            "p99_target_met": p99 <= max_wait + 2 * batch_time}
    lat, thr = clients(lambda x: _Done(fn(x[None])[0]), 1)
    out["per-item calls (4 threads)"] = {"throughput": thr, "p50": percentile(lat, 0.5),
                                         "p95": percentile(lat, 0.95),
                                         "p99": percentile(lat, 0.99)}
    return out


class _Done:
    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value


def _stamp(fut) -> list[float]:
    """When ``fut`` completes (filled by a done-callback), so that a result the client looks
    at late, behind another it was waiting for, is not charged the client's own delay."""
    done: list[float] = []
    if hasattr(fut, "add_done_callback"):
        fut.add_done_callback(lambda _: done.append(time.perf_counter()))
    return done


def _latency(began: float, fut, done: list[float]) -> float:
    """Seconds from submit to the result being ready."""
    fut.result()
    return (done[0] if done else time.perf_counter()) - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, single runs")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--cores", type=int, help="pin this process and its workers to this "
                        "many cores")
    parser.add_argument("--loop-threads", type=int, help="torch threads of the loops and of "
                        "map_model in this process (default: torch's, capped at the usable "
                        "cores)")
    args = parser.parse_args()
    if args.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    # Like with like: the loops, and map_model in this process (it keeps the caller's setting),
    # run with the same torch threads; by default those a plain script gets.
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.loop_threads or min(torch.get_num_threads(), cores))
    # A worker process pays a fresh interpreter importing torch (seconds): big inputs amortise
    # it, as a real model run over a data set does.
    n_mlp, n_conv = (200_000, 8_000) if args.quick else (1_000_000, 40_000)
    load_before = os.getloadavg()[0]
    report = {"cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
              "quick": args.quick, "workloads": []}
    for name, factory, data, ragged in (
            ("MLP 64-512-512-10", make_mlp, mlp_data(n_mlp), False),
            ("conv1d, ragged 16-256", make_conv, ragged_data(n_conv), True)):
        report["workloads"].append(bench_map_model(name, factory, data, ragged, args.quick))
    torch.set_num_threads(BATCHER_TORCH_THREADS)  # the pool every thread's calls share too
    report["batcher"] = bench_batcher(args.quick)
    report["load_average"] = [load_before, os.getloadavg()[0]]
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def print_report(report: dict) -> None:
    print(f"cores: {report['cores']}, torch threads: {report['torch_threads']}, "
          f"load average before/after: {report['load_average'][0]:.1f}/"
          f"{report['load_average'][1]:.1f}")
    for w in report["workloads"]:
        print(f"\n## {w['workload']}, {w['items']} items\n")
        print("| run | items/s |\n|---|---|")
        for k, v in w["items_per_second"].items():
            print(f"| {k} | {v:,.0f} |")
        print(f"\nmap_model: {w['map_model_seconds']:.2f} s end to end, in this process; its "
              f"batch-size search ran the first {w['search_items']:,} items in "
              f"{w['search_seconds']:.2f} s (one-batch call: {w['startup_seconds']:.2f} s); "
              f"found: {'; '.join(w['found']) or '?'}")
        print(f"map_model in a worker process: {w['spawned_seconds']:.2f} s end to end, of which "
              f"{w['spawned_startup_and_probe_seconds']:.2f} s worker start-up and probe; the "
              f"worker was busy {100 * w['spawned_worker_busy_fraction']:.0f} % of the run; "
              f"found: {'; '.join(w['found_spawned']) or '?'}")
        ok1 = "met" if w["vs_batch1"] >= 5 else "MISSED"
        ok2 = "met" if w["vs_best_fixed"] >= 0.9 else "MISSED"
        print(f"target >= 5x batch 1: {w['vs_batch1']:.1f}x ({ok1}); target >= 0.9x best fixed "
              f"({w['best_fixed']}): {w['vs_best_fixed']:.2f}x ({ok2})")
    b = report["batcher"]
    print(f"\n## Batcher, 4 threads x {b['items_per_thread']} items, max_wait "
          f"{b['max_wait_seconds'] * 1e3:.0f} ms, max_batch_size 64\n")
    print("| run | items/s | p50 ms | p95 ms | p99 ms | mean batch | batch p50 ms | p99 bound ms |")
    print("|---|---|---|---|---|---|---|---|")
    for k, v in b.items():
        if not isinstance(v, dict):
            continue
        bound = f"{v['p99_bound'] * 1e3:.2f} ({'met' if v['p99_target_met'] else 'MISSED'})" \
            if "p99_bound" in v else "–"
        mean = f"{v['batch_size_mean']:.1f}" if "batch_size_mean" in v else "1"
        bt = f"{v['batch_seconds_p50'] * 1e3:.2f}" if "batch_seconds_p50" in v else "–"
        print(f"| {k} | {v['throughput']:,.0f} | {v['p50'] * 1e3:.2f} | {v['p95'] * 1e3:.2f} | "
              f"{v['p99'] * 1e3:.2f} | {mean} | {bt} | {bound} |")


if __name__ == "__main__":
    main()
