"""``amortune run --report``: record the run and write its report."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ._errors import UsageError

REPORT_FORMATS = (".html", ".htm", ".png", ".txt")


def _check_report_path(path: str) -> str:
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in REPORT_FORMATS:
        raise UsageError(f"--report must end in {', '.join(REPORT_FORMATS)}, got {path}")
    if p.is_dir():
        raise UsageError(f"--report {path} is a folder; give a file name")
    if not p.resolve().parent.is_dir():
        raise UsageError(f"cannot write {path}: folder {p.resolve().parent} does not exist")
    if suffix == ".png":
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("a .png report needs matplotlib: pip install 'amortune[plot]' "
                             "(or write --report run.html, which needs nothing)")
    return path


def _write_report(report: Any, path: str) -> None:
    suffix = Path(path).suffix.lower()
    if suffix in (".html", ".htm"):
        report.to_html(path)
    elif suffix == ".png":
        report.to_png(path)
    else:
        Path(path).write_text(report.explain() + "\n", encoding="utf-8")


def _run_with_report(call: Callable[..., Any], func: Callable[[Any], Any], data: Any,
                     kwargs: dict[str, Any], *, checkpoint: bool) -> tuple[Any, Any]:
    """Run and collect a :class:`~amortune._report.RunReport`.

    The engine's own record is used when it keeps one (``amortune.report()`` as a context
    manager, or ``report=True`` with ``amortune.last_report()``). Otherwise this command records
    when and where each item ran, and rebuilds the chunks from that.
    """
    import amortune
    from amortune._report import RunReport

    engine_cm = getattr(amortune, "report", None)
    last = getattr(amortune, "last_report", None)
    if callable(engine_cm):
        with engine_cm() as rep:
            results = call(func, data, **kwargs)
        return results, _as_report(rep)
    if callable(last):
        if _accepts(call, "report"):
            kwargs = {**kwargs, "report": True}
        results = call(func, data, **kwargs)
        return results, _as_report(last())

    from amortune._stats import RunStats

    stats = RunStats()
    sampler = _MemorySampler(stats)
    kwargs = {**kwargs, "progress_callback": sampler}
    if checkpoint:
        # Wrapping the function would change its fingerprint, and a resumed run would refuse
        # the checkpoint: record the run's length and memory only.
        with sampler:
            stats.started_at = time.perf_counter()
            results = call(func, data, **kwargs)
            stats.finished_at = time.perf_counter()
        stats.items = len(results) if hasattr(results, "__len__") else 0
        note = "per-chunk events are not recorded for a run with --checkpoint"
        return results, RunReport(stats, None, notes=(note,))
    timed = _Timed(func)
    with sampler:
        stats.started_at = time.perf_counter()
        wrapped = call(timed, data, **kwargs)
        stats.finished_at = time.perf_counter()
    _events_from_items(stats, wrapped)
    note = ("recorded by the command line from the time and place of each item: a chunk here is "
            "a run of items one worker ran back to back; dispatch times and worker start-up are "
            "not recorded")
    return _Unwrapped(wrapped), RunReport(stats, None, notes=(note,))


def _accepts(call: Callable[..., Any], name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False


def _as_report(obj: Any) -> Any:
    from amortune._report import RunReport, build_report
    from amortune._stats import RunStats

    if isinstance(obj, RunReport):
        return obj
    if isinstance(obj, RunStats):
        return build_report(obj, None)
    stats = getattr(obj, "stats", None)
    if isinstance(stats, RunStats):
        return build_report(stats, getattr(obj, "plan", None))
    return build_report(RunStats(), None)


class _Timed:
    """``func`` returning ``(result, started, finished, cpu, pid, thread)`` for each item."""

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func

    def __call__(self, item: Any) -> tuple[Any, float, float, float, int, int]:
        c0 = time.thread_time()
        t0 = time.perf_counter()
        value = self.func(item)
        t1 = time.perf_counter()
        return value, t0, t1, time.thread_time() - c0, os.getpid(), threading.get_ident()


class _Unwrapped(Sequence[Any]):
    """The results of a timed run, without the timings (lazily, for spilled results)."""

    def __init__(self, wrapped: Sequence[Any]) -> None:
        self.wrapped = wrapped

    def __len__(self) -> int:
        return len(self.wrapped)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [r[0] for r in self.wrapped[i]]
        return self.wrapped[i][0]

    def __iter__(self) -> Iterator[Any]:
        return (r[0] for r in self.wrapped)

    def close(self) -> None:
        close = getattr(self.wrapped, "close", None)
        if callable(close):
            close()


#: Items of one worker that ran closer together than this count as one chunk. A rebuilt chunk is
#: a run of back-to-back items: a worker handed the next chunk before it finished the last one
#: starts it within microseconds, so adjacent chunks of one worker may merge.
_SAME_CHUNK_GAP = 1e-3


def _events_from_items(stats: Any, wrapped: Iterable[Any]) -> None:
    from amortune._stats import ChunkEvent

    me, main_thread = os.getpid(), threading.main_thread().ident
    slots: dict[tuple[int, int], int] = {}
    events: list[ChunkEvent] = []
    run: list[Any] = []

    def flush() -> None:
        if not run:
            return
        _, t0, _, _, pid, tid = run[0]
        caller = pid == me and tid == main_thread
        if caller:
            slot, backend = 0, "serial"
        else:
            slot = slots.setdefault((pid, tid), len(slots))
            backend = "processes" if pid != me else "threads"
        start = len_before[0]
        events.append(ChunkEvent(
            start_index=start, n_items=len(run), slot=slot, backend=backend, submitted=0.0,
            received=run[-1][2], started=t0, finished=run[-1][2],
            wall_seconds=sum(r[2] - r[1] for r in run), cpu_seconds=sum(r[3] for r in run)))
        stats.chunk_sizes.append((t0, len(run)))
        len_before[0] += len(run)
        run.clear()

    len_before = [0]
    for r in wrapped:
        if run and ((r[4], r[5]) != (run[-1][4], run[-1][5]) or
                    r[1] - run[-1][2] > _SAME_CHUNK_GAP):
            flush()
        run.append(r)
    flush()
    stats.events = events
    stats.chunks = len(events)
    stats.items = len_before[0]
    stats.caller_item_seconds = sum(e.wall_seconds for e in events if e.backend == "serial")
    stats.chunk_sizes.sort()


class _MemorySampler:
    """Records the caller's resident memory at the start, at each progress step and at the end.

    It rides on ``progress_callback`` (called in the caller's thread after each chunk) instead
    of a thread of its own: a second thread would change how workers start (amortune forks the
    first workers only from a single-threaded process) and so change the run being reported.
    """

    MAX_SAMPLES = 5000

    def __init__(self, stats: Any) -> None:
        import psutil

        self.stats = stats
        self.proc = psutil.Process()

    def sample(self) -> None:
        samples = self.stats.memory
        with contextlib.suppress(Exception):
            samples.append((time.perf_counter(), int(self.proc.memory_info().rss)))
        if len(samples) >= self.MAX_SAMPLES:
            del samples[1:-1:2]

    def __call__(self, phase: str, fraction: float) -> None:
        self.sample()

    def __enter__(self) -> _MemorySampler:
        self.sample()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()
