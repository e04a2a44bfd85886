"""The :class:`RunReport` of one run: its numbers and its account in words."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._model import fmt_bytes, fmt_seconds
from .._stats import RunStats
from ._html import _html_page
from ._png import _draw_png
from ._svg import _Svg
from ._timeline import (
    CALLER_BACKENDS,
    SlotTime,
    _items,
    _lanes,
    _ran,
    _sent,
    _slot_name,
    _split,
    _window,
)

if TYPE_CHECKING:
    from .._plan import OptimizationResult

#: Workers that waited on the caller or sat idle for more than this share of their time get a
#: finding in ``explain()``.
NOTABLE_SHARE = 0.15
_SPARK = "▁▂▃▄▅▆▇█"


def build_report(stats: RunStats, plan: OptimizationResult | None = None, *,
                 notes: Sequence[str] = ()) -> RunReport:
    """The report of a run: ``stats`` from the scheduler, ``plan`` the plan it started from."""
    return RunReport(stats, plan, notes=notes)


class RunReport:
    """What one run did, drawn from its :class:`~amortune._stats.RunStats`.

    Parameters
    ----------
    stats:
        The run's chunk events, plan changes, memory samples, chunk sizes and worker starts.
    plan:
        The plan the run started from (for predicted against measured), or ``None``.
    notes:
        Lines about how the run was recorded, shown with the report.

    Examples
    --------
    >>> from amortune._stats import ChunkEvent, RunStats
    >>> stats = RunStats(items=4, started_at=10.0, finished_at=10.2, events=[
    ...     ChunkEvent(0, 2, 0, "processes", 10.0, 10.1, 10.01, 10.09, 0.08, 0.08),
    ...     ChunkEvent(2, 2, 1, "processes", 10.0, 10.2, 10.01, 10.19, 0.18, 0.18)])
    >>> report = build_report(stats)
    >>> print(report.explain().splitlines()[0])
    amortune run: 4 items in 2 chunks on 2 worker(s), 200.00 ms wall
    >>> [round(s.compute, 2) for s in report.slots()]
    [0.08, 0.18]
    """

    def __init__(self, stats: RunStats, plan: OptimizationResult | None = None, *,
                 notes: Sequence[str] = ()) -> None:
        self.stats = stats
        self.plan = plan
        self.notes = tuple(notes)
        self.t0, self.t1 = _window(stats)
        self._lanes = _lanes(stats.events)

    # -- numbers -----------------------------------------------------------------------------
    @property
    def wall_seconds(self) -> float:
        """Seconds from the start of the run to its end."""
        return max(0.0, self.t1 - self.t0)

    def slots(self) -> list[SlotTime]:
        """The time split of every lane: the caller first (if it ran items), then each slot."""
        out = []
        for lane in self._lanes:
            start = self.stats.worker_starts.get(lane.key[1]) if lane.key[0] else None
            out.append(_split(lane, start, self.t0, self.t1))
        return out

    def item_seconds(self) -> float:
        """Seconds spent running items, summed over every slot and the caller."""
        busy = sum(s.compute for s in self.slots())
        if not any(lane.key[0] == 0 for lane in self._lanes):
            busy += self.stats.caller_item_seconds
        return busy

    def measured_speedup(self) -> float | None:
        """Item time over wall time: how many slots' worth of work the run kept busy."""
        wall = self.wall_seconds
        busy = self.item_seconds()
        if wall <= 0 or busy <= 0:
            return None
        return busy / wall

    def chunk_sizes(self) -> list[tuple[float, int]]:
        """``(seconds since the start, chunk size)``: the policy's choices, else the chunks sent."""
        if self.stats.chunk_sizes:
            return sorted((t - self.t0, n) for t, n in self.stats.chunk_sizes)
        firsts = [e for e in self.stats.events if e.attempt == 1]
        return [(e.submitted - self.t0, e.n_items) for e in sorted(firsts, key=_sent)]

    def memory(self) -> list[tuple[float, int]]:
        """``(seconds since the start, resident bytes of the caller)``."""
        return sorted((t - self.t0, b) for t, b in self.stats.memory)

    # -- text --------------------------------------------------------------------------------
    def explain(self) -> str:
        """A readable account of the run: time per slot, chunk sizes, memory, speedup, changes."""
        st = self.stats
        slots = self.slots()
        workers = [s for s in slots if s.lane != "caller"]
        n_chunks = st.chunks or sum(1 for e in st.events if e.status == "ok")
        n_items = st.items or sum(e.n_items for e in st.events if e.status == "ok")
        where = f"{len(workers)} worker(s)" if workers else "the caller"
        ran = f" in {n_chunks} chunks on {where}" if st.events else ""
        head = f"amortune run: {n_items} items{ran}, {fmt_seconds(self.wall_seconds)} wall"
        extras = []
        if self.plan is not None:
            extras.append(f"plan: {self.plan.executor}, n_jobs={self.plan.n_jobs}")
        if st.retries:
            extras.append(f"{st.retries} retr{'y' if st.retries == 1 else 'ies'}")
        lines = [head + (f" ({', '.join(extras)})" if extras else "")]

        if slots:
            lines.append("  time per slot:")
            lines += ["    " + row for row in _slot_table(slots)]
        elif st.caller_item_seconds:
            lines.append(f"  the caller ran items for {fmt_seconds(st.caller_item_seconds)}")
        if slots and st.caller_item_seconds and not any(s.lane == "caller" for s in slots):
            lines.append(f"  the caller also ran items for {fmt_seconds(st.caller_item_seconds)} "
                         "(sampling, or helping while workers started)")
        for slot, seconds in sorted(st.first_calls.items()):
            lines.append(f"  {_slot_name(slot, st.events)} paid {fmt_seconds(seconds)} on its "
                         "first call (imports, caches, model loads): not counted as item time")

        lines.append("  " + self._speedup_line())
        sizes = self.chunk_sizes()
        if sizes:
            values = [n for _, n in sizes]
            peak_at = sizes[values.index(max(values))][0]
            lines.append(f"  chunk sizes: {_sparkline(values)}  first {values[0]}, largest "
                         f"{max(values)} at {fmt_seconds(max(0.0, peak_at))}, last {values[-1]} "
                         f"({len(values)} chunks)")
        mem = self.memory()
        if mem:
            values = [b for _, b in mem]
            peak = max(values)
            peak_at = mem[values.index(peak)][0]
            lines.append(f"  caller memory: {_sparkline(values)}  {fmt_bytes(values[0])} at the "
                         f"start, peak {fmt_bytes(peak)} at {fmt_seconds(max(0.0, peak_at))}, "
                         f"{fmt_bytes(values[-1])} at the end")
        rss = max((e.rss_bytes for e in st.events), default=0)
        if rss:
            lines.append(f"  largest worker: {fmt_bytes(rss)} resident")
        if st.changes:
            lines.append("  what the run changed in the plan:")
            lines += [f"    at {fmt_seconds(max(0.0, c.at - self.t0))}: {c.what}"
                      for c in sorted(st.changes, key=lambda c: c.at)]
        else:
            lines.append("  the run kept the plan as it was")
        lines += [f"  finding: {f}" for f in self.findings()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def findings(self) -> list[str]:
        """Plain-language observations: where the time went that did not run items."""
        out: list[str] = []
        st = self.stats
        workers = [s for s in self.slots() if s.lane != "caller"]
        span = sum(s.span for s in workers)
        if workers and span > 0:
            waiting = sum(s.waiting for s in workers)
            idle = sum(s.idle for s in workers)
            startup = sum(s.startup for s in workers)
            serde = sum(s.serialization for s in workers)
            if waiting / span > NOTABLE_SHARE:
                out.append(f"workers waited {waiting / span:.0%} of their time for the caller to "
                           "send the next chunk: the caller is the bottleneck (pickling large "
                           "inputs or results, or chunks too small to pay for their dispatch)")
            if startup / span > NOTABLE_SHARE:
                out.append(f"worker start-up took {startup / span:.0%} of the workers' time; a "
                           "later call in the same process reuses the warm workers")
            if serde / span > NOTABLE_SHARE:
                out.append(f"serialization took {serde / span:.0%} of the workers' time: items or "
                           "results are large for the work done on them")
            if idle / span > NOTABLE_SHARE:
                out.append(f"workers sat idle {idle / span:.0%} of their time (the last chunks, "
                           "or work that arrives slower than the workers finish it)")
        plan = self.plan
        if plan is not None and plan.predicted_seconds > 0 and self.wall_seconds > 0:
            ratio = self.wall_seconds / plan.predicted_seconds
            done = sum(e.n_items for e in st.events if e.status == "ok")
            sampled = plan.profile.item_wall_seconds
            if ratio > 1.5:
                why = "the machine was busier than when the plan was made, or items cost more "
                if done and sampled > 0 and self.item_seconds() / done > 1.5 * sampled:
                    why = (f"items took {fmt_seconds(self.item_seconds() / done)} each in the "
                           f"run against {fmt_seconds(sampled)} when sampled: the machine was "
                           "busier, or items cost more ")
                out.append(f"the run took {ratio:.1f}x its predicted time; {why}further along "
                           "the input")
        worker_events = [e for e in st.events if e.backend not in CALLER_BACKENDS]
        if worker_events and not st.worker_starts and self.wall_seconds > 0:
            late = min(_ran(e)[0] for e in worker_events) - self.t0
            if late / self.wall_seconds > NOTABLE_SHARE:
                out.append(f"the workers' first item started {fmt_seconds(late)} into the run "
                           f"({late / self.wall_seconds:.0%} of it): starting workers and "
                           "importing the function's module; a later call in the same process "
                           "reuses the warm workers")
        lost = sum(1 for e in st.events if e.status == "lost")
        if lost:
            out.append(f"{lost} chunk(s) were lost to a dead or stopped worker"
                       + (f"; {st.retries} retried" if st.retries else ""))
        errors = sum(1 for e in st.events if e.status == "error")
        if errors:
            failed = min((e for e in st.events if e.status == "error"),
                         key=lambda e: e.start_index)
            out.append(f"the function raised in {errors} chunk(s), first at items "
                       f"{_items(failed)}")
        return out

    def _speedup_line(self) -> str:
        measured = self.measured_speedup()
        busy = self.item_seconds()
        parts = []
        if self.plan is not None:
            parts.append(f"predicted {self.plan.estimated_speedup:.2f}x")
        if measured is not None:
            parts.append(f"measured {measured:.2f}x ({fmt_seconds(busy)} of item time in "
                         f"{fmt_seconds(self.wall_seconds)})")
        text = "speedup: " + (", ".join(parts) if parts else "not measured (no item times)")
        if self.plan is not None and self.plan.predicted_seconds > 0 and self.wall_seconds > 0:
            err = self.wall_seconds / self.plan.predicted_seconds - 1
            text += (f"; wall predicted {fmt_seconds(self.plan.predicted_seconds)}, took "
                     f"{fmt_seconds(self.wall_seconds)} ({err:+.0%})")
        return text

    def __str__(self) -> str:
        return self.explain()

    def __repr__(self) -> str:
        return (f"<RunReport {len(self.stats.events)} chunk events, "
                f"{fmt_seconds(self.wall_seconds)}>")

    # -- pictures ----------------------------------------------------------------------------
    def to_svg(self, width: int = 1100) -> str:
        """The timeline as one SVG element: a lane per slot, a bar per chunk, two sparklines."""
        return _Svg(self, width).render()

    def to_html(self, path: str | os.PathLike[str] | None = None) -> str:
        """A self-contained HTML page of the run (inline SVG, no script); written to ``path``."""
        page = _html_page(self)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page

    def to_png(self, path: str | os.PathLike[str], *, dpi: int = 120) -> None:
        """Draw the timeline with matplotlib (``pip install 'amortune[plot]'``) into ``path``."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(
                "RunReport.to_png() needs matplotlib; install it with: pip install "
                "'amortune[plot]' (or use to_html(), which needs nothing)") from exc
        _draw_png(self, Figure, FigureCanvasAgg, path, dpi)


def _slot_table(slots: Sequence[SlotTime]) -> list[str]:
    head = ["", "start-up", "compute", "serialization", "idle", "waiting on caller", "chunks",
            "items"]
    rows = [head]
    for s in slots:
        def cell(v: float, s: SlotTime = s) -> str:
            if v <= 0:
                return "-"
            return f"{fmt_seconds(v)} {v / s.span:.0%}" if s.span > 0 else fmt_seconds(v)
        worker = s.lane != "caller"  # the rest of the caller's time is dispatching, not idling
        rows.append([s.lane, cell(s.startup), cell(s.compute), cell(s.serialization),
                     cell(s.idle) if worker else "-", cell(s.waiting) if worker else "-",
                     str(s.chunks), str(s.items)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]


def _sparkline(values: Sequence[float], width: int = 32) -> str:
    """Values as a row of block characters, averaged into at most ``width`` columns."""
    if not values:
        return ""
    cols = _buckets(values, width)
    lo, hi = min(cols), max(cols)
    if hi - lo <= 0.01 * abs(hi):  # flat within 1%: do not magnify noise into a shape
        return _SPARK[3] * len(cols)
    return "".join(_SPARK[min(7, int((v - lo) / (hi - lo) * 7.999))] for v in cols)


def _buckets(values: Sequence[float], width: int) -> list[float]:
    n = len(values)
    if n <= width:
        return [float(v) for v in values]
    out = []
    for i in range(width):
        part = values[i * n // width:(i + 1) * n // width]
        out.append(sum(part) / len(part))
    return out
