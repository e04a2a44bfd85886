"""The cost model: pure functions from measured numbers to a decision.

Owns: the :class:`WorkloadProfile` and :class:`Costs` inputs, the time predictions for serial,
process and thread execution, the n_jobs search, chunk sizing, memory-safe batch sizing and the
readable reasons behind each choice. No clock, no OS, no globals, no I/O: every input is an
argument, so tests drive it with synthetic profiles. Imports the standard library only.

Each constant names the measurement behind it (``python benchmarks/calibrate.py`` on the 2-core
reference machine prints them).
"""

from __future__ import annotations

import math

from ._record import record, replace

__all__ = [
    "Costs",
    "Decision",
    "WorkloadProfile",
    "decide",
    "estimate_safe_batch_size_for",
    "fmt_bytes",
    "fmt_seconds",
    "predict_process_seconds",
    "process_chunksize",
    "thread_chunksize",
    "predict_thread_seconds",
    "project_rising_costs",
    "MIN_SPEEDUP",
]

#: Parallel must beat serial by this factor, or we stay serial: below it the run-to-run noise of a
#: shared machine (±10% on the reference box) and the model's own error (±25% target) can turn a
#: predicted gain into a loss.
MIN_SPEEDUP = 1.2
#: Below this much serial work nothing parallel can pay: even a warm pool's dispatch, transfer and
#: the last item's straggle eat most of the few milliseconds it could save. Sampling does not
#: measure transfer costs below it, so the model must not consider parallel plans there.
PARALLEL_FLOOR_SECONDS = 0.01
#: Caller-side cost of one chunk round trip to a worker process (manager thread, two pipe messages,
#: task bookkeeping): 120-180 µs measured with empty chunks.
PROCESS_DISPATCH_SECONDS = 150e-6
#: Handing one chunk to a thread and back through a future: 20-40 µs measured.
THREAD_DISPATCH_SECONDS = 30e-6
#: Starting one thread: 85-800 µs measured (benchmarks/calibrate.py). Threads start one another
#: while work is queued, so ``P`` threads are up after ``ceil(log2 P) + 1`` starts, not ``P``.
THREAD_START_SECONDS = 150e-6
#: A fresh process's first process plan imports the engine, multiprocessing and the process
#: backend before any worker starts: 20-50 ms on the reference machines (``python -X
#: importtime``). Every process plan counts it while those are not loaded (``Costs``), so a job
#: that would save less than them stays serial, and the prediction is what the call will take.
ENGINE_IMPORT_SECONDS = 0.03
#: A thread plan's share of those: the engine and the thread backend, no multiprocessing (3-6 ms).
THREAD_IMPORT_SECONDS = 0.005
#: Pipe throughput between caller and worker (send_bytes/recv_bytes of 1-64 MB): 0.5-1.4 GB/s.
PIPE_BYTES_PER_SECOND = 1.0e9
#: Unpickling costs about as much as pickling for arrays and common containers.
UNPICKLE_OVER_PICKLE = 1.0
#: Resident memory of an idle worker (interpreter + amortune + cloudpickle): ~25 MB measured; a
#: worker that imports numpy in the function adds ~20 MB.
WORKER_BASE_BYTES = 48 << 20
#: Thread chunks target this duration: dispatch is cheap, so smaller chunks balance better.
THREAD_TARGET_CHUNK_SECONDS = 0.005
#: Each worker should get at least this many chunks, so the scheduler can rebalance skewed costs.
MIN_CHUNKS_PER_WORKER = 4
#: Costs rising along the input are projected onto the rest only from this many sampled items,
#: with wall time rank-correlated with position at least this much, and when the projection is
#: at least this many times the sample's mean. The ranks of pure noise reach 0.8 in about 1 of
#: 350 samples of 10 items and 1 of 10,000 of 16 (simulated); the cheap head of a rising input
#: showed 0.90-1.00 on the reference machine (``rising-0-8ms`` of the cold benchmark).
TREND_MIN_ITEMS = 10
TREND_MIN_CORRELATION = 0.8
TREND_MIN_FACTOR = 1.25
#: Below this CPU share of wall time an item is waiting (sleep, network, disk), not computing. Above
#: it, the missing CPU time is more likely the sampler being starved by other processes (on the
#: reference machine under load 3, CPU-bound items showed a 60-90% share), so threads get no credit.
IO_BOUND_CPU_SHARE = 0.3


@record(frozen=True)
class WorkloadProfile:
    """What sampling measured, per item, in seconds and bytes (means over the sampled items)."""

    n_sampled: int
    sampled_wall_seconds: float
    item_wall_seconds: float
    item_cpu_seconds: float
    item_wall_cv: float = 0.0
    max_item_wall_seconds: float = 0.0
    in_bytes: float = 0.0
    out_bytes: float = 0.0
    pickle_in_seconds: float = 0.0
    pickle_out_seconds: float = 0.0
    result_memory_bytes: float = 0.0
    picklable: bool = True
    not_picklable_reason: str = ""
    #: A one-off cost of the first call (an import, a model load), excluded from the item cost.
    first_call_seconds: float = 0.0
    #: How an item's wall time grew along the sampled items: the least-squares slope (seconds per
    #: item) and the correlation of wall time with position (files sorted by size, ever longer
    #: sequences). The model projects rising costs onto the rest (:func:`project_rising_costs`).
    item_wall_slope: float = 0.0
    item_wall_trend_r: float = 0.0
    #: When the trend was measured before the sample, over this many items (the first look's
    #: growing chunks, whose last two rates rose): 0 when it is the sample's own fit.
    trend_items: int = 0


@record(frozen=True)
class Costs:
    """The machine and pool facts the model needs (from ``_system`` and the backend)."""

    usable_cores: int
    available_memory_bytes: int
    memory_fraction: float = 0.5
    process_start_seconds: float = 0.05
    per_worker_start_seconds: float = 0.006
    warm_workers: int = 0
    max_threads: int = 64
    target_chunk_seconds: float = 0.05
    #: Caller-side seconds per chunk on the chosen backend (a Dask task costs ~1-2 ms).
    dispatch_seconds: float = PROCESS_DISPATCH_SECONDS
    #: Slots the backend offers (a cluster's threads); ``None``: the usable cores.
    max_slots: int | None = None
    #: Imports a process or a thread plan still has to pay in this process before its first
    #: item runs (a fresh process's first parallel run; 0 once loaded).
    process_import_seconds: float = 0.0
    thread_import_seconds: float = 0.0


@record(frozen=True)
class Decision:
    """The model's output: what to run, how, and why."""

    executor: str
    n_jobs: int
    chunksize: int
    batch_size: int
    predicted_serial_seconds: float
    predicted_seconds: float
    thread_cap: int | None
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def estimated_speedup(self) -> float:
        """Predicted serial time over predicted time of the chosen plan."""
        return self.predicted_serial_seconds / max(self.predicted_seconds, 1e-12)


def estimate_safe_batch_size_for(
    result_size_bytes: float, max_memory_percent: float, available_memory_bytes: int
) -> int:
    """``floor(max_memory_percent * available / result_size)``, at least 1.

    >>> estimate_safe_batch_size_for(10 * 2**20, 0.5, 16 * 2**30)
    819
    """
    if not 0 < max_memory_percent <= 1:
        raise ValueError(f"max_memory_percent must be in (0, 1], got {max_memory_percent!r}")
    if result_size_bytes < 0:
        raise ValueError(f"result_size_bytes must be >= 0, got {result_size_bytes!r}")
    if result_size_bytes < 1:  # an empty result still occupies its slot in the list
        result_size_bytes = 1
    return max(1, int(max_memory_percent * available_memory_bytes // result_size_bytes))


def process_chunksize(p: WorkloadProfile, n_items: int, n_jobs: int, target: float,
                      dispatch_seconds: float = PROCESS_DISPATCH_SECONDS) -> int:
    per_item = p.item_wall_seconds + p.pickle_in_seconds + p.pickle_out_seconds
    # No chunk shorter than one round of dispatches: the caller hands out every chunk.
    by_time = max(1, int(max(target, n_jobs * dispatch_seconds, 40 * dispatch_seconds)
                         / max(per_item, 1e-9)))
    by_balance = max(1, math.ceil(n_items / (MIN_CHUNKS_PER_WORKER * n_jobs)))
    return max(1, min(by_time, by_balance))


def thread_chunksize(p: WorkloadProfile, n_items: int, n_threads: int) -> int:
    by_time = int(THREAD_TARGET_CHUNK_SECONDS / max(p.item_wall_seconds, 1e-9))
    by_balance = math.ceil(n_items / (MIN_CHUNKS_PER_WORKER * n_threads))
    return max(1, min(by_time, by_balance))


def _tail_seconds(p: WorkloadProfile) -> float:
    # The scheduler shrinks chunks toward the end, so the last worker straggles by about one
    # item of the spread seen, not by one whole chunk.
    return p.item_wall_seconds * (1.0 + p.item_wall_cv)


def predict_process_seconds(
    p: WorkloadProfile, n_items: int, n_jobs: int, chunksize: int, costs: Costs
) -> float:
    """Predicted wall time to run ``n_items`` more items on ``n_jobs`` worker processes."""
    if n_items <= 0:
        return 0.0
    chunks = math.ceil(n_items / chunksize)
    unpickle = UNPICKLE_OVER_PICKLE
    caller = n_items * (
        p.pickle_in_seconds
        + unpickle * p.pickle_out_seconds
        + (p.in_bytes + p.out_bytes) / PIPE_BYTES_PER_SECOND
    ) + chunks * costs.dispatch_seconds
    worker_item = p.item_wall_seconds + unpickle * p.pickle_in_seconds + p.pickle_out_seconds
    workers = n_items * worker_item / n_jobs
    cpu_item = p.item_cpu_seconds + unpickle * p.pickle_in_seconds + p.pickle_out_seconds
    # The caller competes with the workers for the same cores.
    cpu_bound = (caller + n_items * cpu_item) / max(costs.usable_cores, 1)
    new_workers = max(0, n_jobs - costs.warm_workers)
    start = costs.process_import_seconds
    if new_workers:
        start += (costs.process_start_seconds if costs.warm_workers == 0 else 0.0) + (
            new_workers * costs.per_worker_start_seconds
        )
    return start + max(caller, workers, cpu_bound) + _tail_seconds(p)


def predict_thread_seconds(
    p: WorkloadProfile, n_items: int, n_threads: int, chunksize: int,
    import_seconds: float = 0.0,
) -> float:
    """Predicted wall time on ``n_threads`` threads: CPU time is serialised by the GIL;
    ``import_seconds`` is what the thread backend's imports still cost this process."""
    if n_items <= 0:
        return 0.0
    chunks = math.ceil(n_items / chunksize)
    cpu_share = p.item_cpu_seconds / max(p.item_wall_seconds, 1e-12)
    gil = n_items * (p.item_cpu_seconds if cpu_share < IO_BOUND_CPU_SHARE else p.item_wall_seconds)
    spread = n_items * p.item_wall_seconds / n_threads
    starts = math.ceil(math.log2(max(1, n_threads))) + 1  # each running thread starts one more
    overhead = chunks * THREAD_DISPATCH_SECONDS + starts * THREAD_START_SECONDS + import_seconds
    return max(gil, spread) + overhead + _tail_seconds(p)


def project_rising_costs(p: WorkloadProfile, n_items: int) -> tuple[WorkloadProfile, float]:
    """The profile of the ``n_items`` after the sample when item costs rise along the input.

    The sample saw the cheap head of the input; when its wall times grow with position
    (correlation at least :data:`TREND_MIN_CORRELATION`), or the first look measured them rising
    before it (``trend_items``; its slope is then the profile's), the rest is charged the line at
    its own middle, ``(n_sampled + n_items) / 2`` items past the sample's middle, instead of the
    sample's mean. Returns the profile (unchanged without such a trend) and the factor applied.
    """
    fitted = p.n_sampled >= TREND_MIN_ITEMS and p.item_wall_trend_r >= TREND_MIN_CORRELATION
    if (not (fitted or p.trend_items >= TREND_MIN_ITEMS)
            or p.item_wall_slope <= 0 or n_items <= 0 or p.item_wall_seconds <= 0):
        return p, 1.0
    projected = p.item_wall_seconds + p.item_wall_slope * (p.n_sampled + n_items) / 2
    # A line through zero cost at the first item is the steepest a real cost can rise: its rest
    # averages (2 + n_items / n_sampled) times the sample's mean. A steeper fit is noise.
    factor = min(projected / p.item_wall_seconds, 2 + n_items / max(1, p.n_sampled))
    projected = p.item_wall_seconds * factor
    if factor < TREND_MIN_FACTOR:
        return p, 1.0
    last = p.item_wall_seconds + (projected - p.item_wall_seconds) * (
        (p.n_sampled / 2 + n_items) / ((p.n_sampled + n_items) / 2))
    return replace(p, item_wall_seconds=projected, item_cpu_seconds=p.item_cpu_seconds * factor,
                   max_item_wall_seconds=max(p.max_item_wall_seconds, last)), factor


def _thread_counts(max_threads: int, n_items: int, cores: int) -> list[int]:
    counts = {min(cores, max_threads)}
    n = 2
    while n <= max_threads:
        counts.add(n)
        n *= 2
    counts.add(max_threads)
    return sorted(c for c in counts if 2 <= c <= max(2, n_items))


def decide(
    p: WorkloadProfile,
    n_items: int,
    costs: Costs,
    *,
    n_items_known: bool = True,
    n_jobs: int | None = None,
    chunksize: int | None = None,
    executor: str | None = None,
) -> Decision:
    """Choose serial, processes or threads, with n_jobs and chunksize, for ``n_items`` more items.

    ``n_items`` counts the items still to run after the sample; ``n_jobs``, ``chunksize`` and
    ``executor`` pin what the caller fixed. The choice is the lowest predicted time, and parallel
    must beat serial by :data:`MIN_SPEEDUP`.
    """
    reasons: list[str] = []
    warnings: list[str] = []
    remaining = max(0, n_items)
    total_items = remaining + p.n_sampled
    sampled_mean = p.item_wall_seconds
    if n_items_known:
        p, rising = project_rising_costs(p, remaining)
        if rising > 1.0:
            measured = (f"{fmt_seconds(p.item_wall_slope)} more each item over the first "
                        f"{p.trend_items} items" if p.trend_items else
                        f"correlation {p.item_wall_trend_r:.2f} over {p.n_sampled} sampled items")
            reasons.append(
                f"item costs grow along the input ({measured}): the {remaining} left are "
                f"predicted at "
                f"{fmt_seconds(p.item_wall_seconds)} each, {rising:.1f}x the sample's "
                f"{fmt_seconds(sampled_mean)}")
    serial_rest = remaining * p.item_wall_seconds
    serial_total = p.sampled_wall_seconds + serial_rest
    cores = max(1, costs.usable_cores)
    slots = max(1, costs.max_slots) if costs.max_slots is not None else cores
    budget = costs.memory_fraction * costs.available_memory_bytes

    batch_size = estimate_safe_batch_size_for(
        p.result_memory_bytes, costs.memory_fraction, costs.available_memory_bytes
    )
    if n_items_known:
        batch_size = min(batch_size, max(1, total_items))
        result_total = total_items * p.result_memory_bytes
        if result_total > budget:
            warnings.append(
                f"Result memory exceeds safety threshold: {total_items} results of about "
                f"{fmt_bytes(p.result_memory_bytes)} need {fmt_bytes(result_total)}, more than "
                f"{costs.memory_fraction:.0%} of available memory ({fmt_bytes(budget)}); use "
                f"process_in_batches(func, data, spill='disk') or batch_size={batch_size}"
            )
    if p.result_memory_bytes > budget:
        warnings.append(
            f"A single result ({fmt_bytes(p.result_memory_bytes)}) is larger than the memory "
            f"budget ({fmt_bytes(budget)})"
        )

    candidates: list[tuple[str, int, int, float]] = [("serial", 1, 1, serial_rest)]
    footprint_cap = cores
    worth_it = serial_rest > PARALLEL_FLOOR_SECONDS
    if p.picklable and worth_it:
        chunk_guess = process_chunksize(p, max(remaining, 1), slots, costs.target_chunk_seconds,
                                        costs.dispatch_seconds)
        footprint = WORKER_BASE_BYTES + 2 * chunk_guess * (p.in_bytes + p.result_memory_bytes)
        footprint_cap = max(1, int(budget // max(footprint, 1)))
        if footprint_cap < slots and costs.max_slots is None:
            reasons.append(
                f"memory allows {footprint_cap} worker(s) of about {fmt_bytes(footprint)} each"
            )
        top = slots if costs.max_slots is not None else min(slots, footprint_cap)
        for n in range(2, top + 1):
            c = process_chunksize(p, max(remaining, 1), n, costs.target_chunk_seconds,
                                  costs.dispatch_seconds)
            candidates.append(("processes", n, c, predict_process_seconds(p, remaining, n, c, costs)))
    for n in _thread_counts(costs.max_threads, remaining, cores) if worth_it else ():
        c = thread_chunksize(p, max(remaining, 1), n)
        candidates.append(("threads", n, c, predict_thread_seconds(
            p, remaining, n, c, costs.thread_import_seconds)))

    pinned = [
        cand
        for cand in candidates
        if (executor is None or cand[0] == executor) and (n_jobs is None or cand[1] == n_jobs)
    ]
    best = min(candidates, key=lambda cand: cand[3])
    if executor is not None or n_jobs is not None:
        if not pinned:
            kind = executor or ("processes" if p.picklable else "threads")
            n = n_jobs or (cores if kind != "threads" else costs.max_threads)
            if chunksize is not None:
                c = chunksize
            elif kind == "processes":
                c = process_chunksize(p, max(remaining, 1), n, costs.target_chunk_seconds,
                                      costs.dispatch_seconds)
            elif kind == "threads":
                c = thread_chunksize(p, max(remaining, 1), n)
            else:
                c = 1
            if kind == "processes":
                t = predict_process_seconds(p, remaining, n, c, costs)
            elif kind == "threads":
                t = predict_thread_seconds(p, remaining, n, c, costs.thread_import_seconds)
            else:
                t = serial_rest
            pinned = [(kind, n, c, t)]
        choice = min(pinned, key=lambda cand: cand[3])
        reasons.append(f"{choice[0]} with n_jobs={choice[1]} as requested")
    else:
        choice = best
        if not p.picklable:
            reasons.append(f"the function cannot be pickled ({p.not_picklable_reason}); "
                           "worker processes are ruled out")
        if choice[0] != "serial" and choice[3] * MIN_SPEEDUP > serial_rest:
            reasons.append(
                f"predicted gain of {choice[0]} ({serial_rest / max(choice[3], 1e-12):.2f}x) is "
                f"below the {MIN_SPEEDUP}x threshold"
            )
            choice = candidates[0]
        _explain_choice(p, remaining, n_items_known, choice, reasons)
    kind, n, c, t = choice
    if chunksize is not None and kind != "serial":
        c = chunksize
        t = (predict_process_seconds(p, remaining, n, c, costs) if kind == "processes"
             else predict_thread_seconds(p, remaining, n, c, costs.thread_import_seconds))
    thread_cap = max(1, cores // n) if kind == "processes" else None
    if kind == "processes" and thread_cap is not None:
        reasons.append(f"native thread pools in workers limited to {thread_cap} thread(s) each")
    imports = {"processes": costs.process_import_seconds,
               "threads": costs.thread_import_seconds}.get(kind, 0.0)
    if imports:
        reasons.append(f"the prediction includes ~{imports * 1e3:.0f} ms of imports this process "
                       "pays once, for its first parallel run")
    return Decision(
        executor=kind,
        n_jobs=n if kind != "serial" else 1,
        chunksize=c if kind != "serial" else max(1, remaining),
        batch_size=batch_size,
        predicted_serial_seconds=serial_total,
        predicted_seconds=p.sampled_wall_seconds + t,
        thread_cap=thread_cap,
        reasons=tuple(reasons),
        warnings=tuple(warnings),
    )


def _explain_choice(
    p: WorkloadProfile,
    remaining: int,
    n_items_known: bool,
    choice: tuple[str, int, int, float],
    reasons: list[str],
) -> None:
    kind, n, c, _ = choice
    per = fmt_seconds(p.item_wall_seconds)
    if remaining == 0:
        reasons.append("sampling already processed every item")
        return
    count = f"{remaining}{'' if n_items_known else '+'} items left"
    if kind == "serial":
        reasons.append(
            f"serial: {count} at {per} each; starting workers and moving data would cost more "
            "than it saves"
        )
    elif kind == "threads":
        share = p.item_cpu_seconds / max(p.item_wall_seconds, 1e-12)
        reasons.append(
            f"threads: items spend {share:.0%} of their {per} on the CPU, so {n} threads overlap "
            f"the waiting ({count}, chunks of {c})"
        )
    else:
        reasons.append(
            f"processes: {count} at {per} each, {n} workers, chunks of {c} "
            f"(about {fmt_seconds(c * p.item_wall_seconds)} per chunk)"
        )
    if p.item_wall_cv > 1.0:
        reasons.append(f"item cost varies widely (cv {p.item_wall_cv:.1f}); chunks adapt during the run")


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
