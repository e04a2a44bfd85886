"""Run reports: what one call did, as text, a self-contained HTML page and a PNG.

:func:`build_report` turns a :class:`~amortune._stats.RunStats` (and the plan the run started
from, if known) into a :class:`RunReport`. ``explain()`` splits each slot's time into start-up,
compute, serialization, idle and waiting on the caller, and follows chunk sizes, memory, the
speedup and the plan changes over the run. ``to_html()`` draws the timeline as inline SVG (no
dependency, no script); ``to_png()`` draws it with matplotlib when the ``plot`` extra is installed.
Imports the standard library only; matplotlib is imported by ``to_png()`` alone.
"""

from __future__ import annotations

import contextlib
import html
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._model import fmt_bytes, fmt_seconds
from ._stats import ChunkEvent, Recorder, RunStats, pop_recorder, push_recorder

if TYPE_CHECKING:
    from ._plan import OptimizationResult

__all__ = ["RunReport", "SlotTime", "build_report"]

#: Chunk colours by status (ok, func raised, lost to a crash or timeout, cancelled).
STATUS_COLOURS = {"ok": "#4c78a8", "error": "#e45756", "lost": "#f58518", "cancelled": "#b8b0aa"}
STARTUP_COLOUR = "#8d99a6"
WAIT_COLOUR = "#e9b92f"
SERDE_COLOUR = "#1f3b5a"
#: Lanes whose chunk events come from these backends ran in the caller's own process.
CALLER_BACKENDS = frozenset({"serial", "caller"})
#: Workers that waited on the caller or sat idle for more than this share of their time get a
#: finding in ``explain()``.
NOTABLE_SHARE = 0.15
_SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class SlotTime:
    """How one slot (a worker, a thread, or the caller) spent the run, in seconds.

    ``startup`` is the worker booting; ``compute`` the chunks running (first item's start to last
    item's end); ``serialization`` unpickling items and pickling results in the worker;
    ``waiting`` the time the slot had finished its previous chunk and the caller had not yet sent
    the next one; ``idle`` everything else in the run (the chunk in transit, nothing left to do
    while other slots finish).
    """

    lane: str
    slot: int
    chunks: int
    items: int
    span: float
    startup: float
    compute: float
    serialization: float
    waiting: float
    idle: float
    lost: int = 0
    errors: int = 0


@dataclass(frozen=True)
class _Lane:
    key: tuple[int, int]  # (0 for the caller, 1 for workers; slot)
    label: str
    events: tuple[ChunkEvent, ...]


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


# -- the time split --------------------------------------------------------------------------
def _sent(e: ChunkEvent) -> float:
    return e.submitted


def _ran(e: ChunkEvent) -> tuple[float, float]:
    """When a chunk ran where it ran; the caller's view when the backend could not tell."""
    if e.started > 0 and e.finished >= e.started:
        return e.started, e.finished
    return e.submitted, e.received


def _window(stats: RunStats) -> tuple[float, float]:
    times = [t for e in stats.events for t in (e.submitted, e.received, e.started, e.finished)
             if t > 0]
    times += [t for t, _ in stats.memory] + [t for t, _ in stats.chunk_sizes]
    times += [t for pair in stats.worker_starts.values() for t in pair]
    times += [c.at for c in stats.changes]
    start = stats.started_at if stats.started_at or not times else min(times)
    if times:
        start = min(start, min(times))
    end = stats.finished_at if stats.finished_at > start else max(times, default=start)
    if times:
        end = max(end, max(times))
    return start, end


def _lanes(events: Sequence[ChunkEvent]) -> list[_Lane]:
    by: dict[tuple[int, int], list[ChunkEvent]] = {}
    for e in events:
        key = (0, 0) if e.backend in CALLER_BACKENDS else (1, e.slot)
        by.setdefault(key, []).append(e)
    lanes = []
    for key in sorted(by):
        evs = tuple(sorted(by[key], key=lambda e: _ran(e)[0]))
        label = "caller" if key[0] == 0 else _slot_name(key[1], evs)
        lanes.append(_Lane(key, label, evs))
    return lanes


def _slot_name(slot: int, events: Iterable[ChunkEvent]) -> str:
    kinds = {e.backend for e in events if e.slot == slot}
    if kinds <= CALLER_BACKENDS and kinds:
        return "caller"
    if kinds == {"threads"}:
        return f"thread {slot}"
    if kinds == {"gpu"}:
        return f"gpu {slot}"
    return f"worker {slot}"


def _split(lane: _Lane, start: tuple[float, float] | None, t0: float, t1: float) -> SlotTime:
    begin = t0
    startup = 0.0
    free_at = t0  # when the slot could take its next chunk
    if start is not None:
        s, r = max(t0, start[0]), min(t1, max(start[0], start[1]))
        startup = max(0.0, r - s)
        begin = min(begin, s)
        free_at = max(r, t0)
    compute = serde = waiting = 0.0
    for e in lane.events:
        a, b = _ran(e)
        compute += max(0.0, b - a) if e.started > 0 else e.wall_seconds
        serde += e.serde_seconds
        if e.started > 0 and lane.key[0]:
            # The slot was free from ``free_at``; the chunk left the caller at ``submitted``.
            gap = max(0.0, a - free_at)
            waiting += min(gap, max(0.0, e.submitted - free_at))
        free_at = max(free_at, b + e.serde_seconds)
    span = max(0.0, t1 - begin)
    idle = max(0.0, span - startup - compute - serde - waiting)
    return SlotTime(
        lane=lane.label, slot=lane.key[1], chunks=len(lane.events),
        items=sum(e.n_items for e in lane.events if e.status == "ok"), span=span,
        startup=startup, compute=compute, serialization=serde, waiting=waiting, idle=idle,
        lost=sum(1 for e in lane.events if e.status == "lost"),
        errors=sum(1 for e in lane.events if e.status == "error"))


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


def _items(e: ChunkEvent) -> str:
    return f"{e.start_index}-{e.start_index + e.n_items - 1}" if e.n_items > 1 else str(
        e.start_index)


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


def _nice_step(span: float, target: int = 8) -> float:
    if span <= 0:
        return 1.0
    raw = span / target
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag  # pragma: no cover


def _fmt_tick(t: float, step: float) -> str:
    if step >= 1:
        return f"{t:g} s"
    if step >= 1e-3:
        return f"{t * 1e3:g} ms"
    return f"{t * 1e6:g} µs"


# -- SVG -------------------------------------------------------------------------------------
def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


class _Svg:
    LEFT = 112
    RIGHT = 34
    LANE = 22
    GAP = 6
    SPARK = 54

    def __init__(self, report: RunReport, width: int) -> None:
        self.r = report
        self.width = max(400, width)
        self.plot_w = self.width - self.LEFT - self.RIGHT
        self.span = max(report.wall_seconds, 1e-9)
        self.parts: list[str] = []

    def x(self, t: float) -> float:
        return self.LEFT + (t - self.r.t0) / self.span * self.plot_w

    def rel_x(self, t: float) -> float:
        return self.LEFT + t / self.span * self.plot_w

    def add(self, s: str) -> None:
        self.parts.append(s)

    def render(self) -> str:
        lanes = self.r._lanes
        top = 26
        lanes_h = max(1, len(lanes)) * (self.LANE + self.GAP)
        axis_y = top + lanes_h + 2
        spark1 = axis_y + 34
        spark2 = spark1 + self.SPARK + 22
        rows = 1 + max(row for _, row, _, _ in self._legend_layout())
        legend_y = spark2 + self.SPARK + 22
        height = legend_y + 20 * (rows - 1) + 14
        self.add(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.width} {height}" '
                 f'width="100%" role="img" aria-label="timeline of the run" '
                 f'font-family="system-ui, -apple-system, Segoe UI, sans-serif" font-size="12">')
        self.add('<defs><pattern id="startup" width="6" height="6" patternUnits="userSpaceOnUse" '
                 'patternTransform="rotate(45)"><rect width="6" height="6" fill="#d5dbe1"/>'
                 f'<line x1="0" y1="0" x2="0" y2="6" stroke="{STARTUP_COLOUR}" '
                 'stroke-width="3"/></pattern></defs>')
        self.add(f'<rect x="0" y="0" width="{self.width}" height="{height}" fill="#ffffff"/>')
        self._grid(top, axis_y)
        if not lanes:
            self.add(f'<text x="{self.LEFT + 8}" y="{top + 15}" fill="#6b7785">no chunk events '
                     'were recorded for this run</text>')
        for i, lane in enumerate(lanes):
            self._lane(lane, top + i * (self.LANE + self.GAP))
        self._changes(top, axis_y)
        self._spark(spark1, "chunk size", self.r.chunk_sizes(), str, step=True,
                    colour="#4c78a8")
        self._spark(spark2, "caller memory", self.r.memory(), fmt_bytes, step=False,
                    colour="#54a24b")
        self._legend(legend_y)
        self.add("</svg>")
        return "\n".join(self.parts)

    def _grid(self, top: int, axis_y: int) -> None:
        step = _nice_step(self.span)
        n = int(self.span / step + 1e-9)
        for k in range(n + 1):
            t = k * step
            x = self.rel_x(t)
            self.add(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{axis_y}" '
                     'stroke="#e6e9ed" stroke-width="1"/>')
            self.add(f'<text x="{x:.1f}" y="{axis_y + 14}" text-anchor="middle" '
                     f'fill="#4a5561">{_esc(_fmt_tick(t, step))}</text>')
        self.add(f'<line x1="{self.LEFT}" y1="{axis_y}" x2="{self.LEFT + self.plot_w}" '
                 f'y2="{axis_y}" stroke="#9aa4ae"/>')

    def _lane(self, lane: _Lane, y: float) -> None:
        st = self.r.stats
        h = self.LANE
        self.add(f'<text x="{self.LEFT - 10}" y="{y + h / 2 + 4:.1f}" text-anchor="end" '
                 f'fill="#26313c">{_esc(lane.label)}</text>')
        self.add(f'<rect x="{self.LEFT}" y="{y:.1f}" width="{self.plot_w}" height="{h}" '
                 'fill="#f4f6f8"/>')
        start = st.worker_starts.get(lane.key[1]) if lane.key[0] else None
        if start is not None:
            x0, x1 = self.x(start[0]), self.x(max(start[0], start[1]))
            self.add(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(1.0, x1 - x0):.1f}" '
                     f'height="{h}" fill="url(#startup)"><title>{_esc(lane.label)} starting: '
                     f'{_esc(fmt_seconds(max(0.0, start[1] - start[0])))}</title></rect>')
        free = None if not lane.key[0] else (start[1] if start is not None else self.r.t0)
        for bar in _coalesce(lane.events, self.span / self.plot_w, free):
            a, b = bar.begin, bar.end
            if bar.waiting > 0:
                wx0, wx1 = self.x(bar.wait_from), self.x(bar.wait_from + bar.waiting)
                self.add(f'<rect x="{wx0:.1f}" y="{y + h - 5:.1f}" '
                         f'width="{max(0.8, wx1 - wx0):.1f}" height="5" fill="{WAIT_COLOUR}">'
                         f'<title>waiting on the caller: {_esc(fmt_seconds(bar.waiting))}'
                         '</title></rect>')
            x0, x1 = self.x(a), self.x(b)
            fill = STATUS_COLOURS.get(bar.status, STATUS_COLOURS["ok"])
            style = ' fill-opacity="0.55" stroke-dasharray="3 2" stroke="#4c78a8"' if (
                bar.caller_view) else ' stroke="#ffffff" stroke-width="0.7"'
            self.add(f'<rect x="{x0:.1f}" y="{y + 1:.1f}" width="{max(0.8, x1 - x0):.1f}" '
                     f'height="{h - 2}" fill="{fill}"{style}><title>{_esc(bar.title)}</title>'
                     '</rect>')
            if bar.serde > 0:
                sx1 = self.x(b + bar.serde)
                if sx1 - x1 >= 0.6:
                    self.add(f'<rect x="{x1:.1f}" y="{y + 1:.1f}" width="{sx1 - x1:.1f}" '
                             f'height="{h - 2}" fill="{SERDE_COLOUR}"><title>serialization '
                             f'{_esc(fmt_seconds(bar.serde))}</title></rect>')

    def _changes(self, top: int, axis_y: int) -> None:
        for i, c in enumerate(sorted(self.r.stats.changes, key=lambda c: c.at), start=1):
            x = self.x(c.at)
            self.add(f'<g><title>{_esc(c.what)}</title>'
                     f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{axis_y}" '
                     'stroke="#7d3c98" stroke-width="1.4" stroke-dasharray="4 3"/>'
                     f'<circle cx="{x:.1f}" cy="{top - 13}" r="7" fill="#7d3c98"/>'
                     f'<text x="{x:.1f}" y="{top - 9}" text-anchor="middle" fill="#ffffff" '
                     f'font-size="10" font-weight="bold">{i}</text></g>')

    def _spark(self, y: float, label: str, points: Sequence[tuple[float, float]],
               fmt: Any, *, step: bool, colour: str) -> None:
        h = self.SPARK
        self.add(f'<text x="{self.LEFT - 10}" y="{y + h / 2 + 4:.1f}" text-anchor="end" '
                 f'fill="#26313c">{_esc(label)}</text>')
        self.add(f'<rect x="{self.LEFT}" y="{y:.1f}" width="{self.plot_w}" height="{h}" '
                 'fill="#fafbfc" stroke="#e6e9ed"/>')
        if not points:
            self.add(f'<text x="{self.LEFT + 8}" y="{y + h / 2 + 4:.1f}" fill="#8a949e">'
                     'not recorded</text>')
            return
        hi = max(v for _, v in points)
        lo = 0.0
        scale = (h - 8) / max(hi - lo, 1e-12)

        def py(v: float) -> float:
            return y + h - 3 - (v - lo) * scale

        coords: list[tuple[float, float]] = []
        for t, v in _per_pixel(points, self.span / self.plot_w):
            x = min(self.LEFT + self.plot_w, max(self.LEFT, self.rel_x(t)))
            if step and coords:
                coords.append((x, coords[-1][1]))
            coords.append((x, py(v)))
        if step:
            coords.append((self.LEFT + self.plot_w, coords[-1][1]))
        path = " ".join(f"{x:.1f},{yy:.1f}" for x, yy in coords)
        base = y + h - 3
        self.add(f'<polygon points="{coords[0][0]:.1f},{base:.1f} {path} '
                 f'{coords[-1][0]:.1f},{base:.1f}" fill="{colour}" fill-opacity="0.15"/>')
        self.add(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        self.add(f'<text x="{self.LEFT + self.plot_w}" y="{y - 4:.1f}" text-anchor="end" '
                 f'fill="#4a5561" font-size="11">max {_esc(fmt(hi))}</text>')

    def _legend_layout(self) -> list[tuple[float, int, str, str]]:
        """``(x, row, name, swatch)`` for each legend entry, wrapped to the picture's width."""
        entries = [("start-up", "url(#startup)"), ("ok", STATUS_COLOURS["ok"]),
                   ("func raised", STATUS_COLOURS["error"]),
                   ("lost (crash, timeout)", STATUS_COLOURS["lost"]),
                   ("cancelled", STATUS_COLOURS["cancelled"]), ("serialization", SERDE_COLOUR),
                   ("waiting on the caller", WAIT_COLOUR), ("plan change", "line")]
        out = []
        x, row = float(self.LEFT), 0
        for name, swatch in entries:
            w = 17 + 6.8 * len(name) + 18
            if x + w > self.width - 8 and x > self.LEFT:
                x, row = float(self.LEFT), row + 1
            out.append((x, row, name, swatch))
            x += w
        return out

    def _legend(self, y: float) -> None:
        for x, row, name, swatch in self._legend_layout():
            yy = y + 20 * row
            if swatch == "line":
                self.add(f'<line x1="{x:.1f}" y1="{yy - 3}" x2="{x + 12:.1f}" y2="{yy - 3}" '
                         'stroke="#7d3c98" stroke-width="1.4" stroke-dasharray="4 3"/>')
            else:
                self.add(f'<rect x="{x:.1f}" y="{yy - 9}" width="12" height="12" '
                         f'fill="{swatch}"/>')
            self.add(f'<text x="{x + 17:.1f}" y="{yy + 1}" fill="#4a5561">{_esc(name)}</text>')


def _per_pixel(points: Sequence[tuple[float, float]], seconds_per_px: float
               ) -> list[tuple[float, float]]:
    """At most one point per pixel column (its largest value), so a long run stays small."""
    if len(points) <= 2000:
        return list(points)
    out: list[tuple[float, float]] = []
    column = None
    for t, v in points:
        c = int(t / max(seconds_per_px, 1e-12))
        if c == column:
            out[-1] = (out[-1][0], max(out[-1][1], v))
        else:
            out.append((t, v))
            column = c
    return out


@dataclass
class _Bar:
    begin: float
    end: float
    status: str
    serde: float
    waiting: float
    wait_from: float
    caller_view: bool
    title: str
    count: int = 1


def _coalesce(events: Sequence[ChunkEvent], seconds_per_px: float,
              free_at: float | None = None) -> list[_Bar]:
    """One bar per chunk; neighbours narrower than a pixel merge so the page stays small.

    ``free_at`` is when the slot could first take a chunk (``None``: do not show waiting).
    """
    bars: list[_Bar] = []
    track = free_at is not None
    for e in events:
        a, b = _ran(e)
        waiting, wait_from = 0.0, a
        if track and e.started > 0 and free_at is not None and e.submitted > free_at:
            wait_from = free_at
            waiting = min(max(0.0, a - free_at), e.submitted - free_at)
        free_at = max(free_at or b, b + e.serde_seconds)
        title = (f"items {_items(e)} ({e.n_items}) · {e.status} · ran "
                 f"{fmt_seconds(max(0.0, b - a))}"
                 + (f" · attempt {e.attempt}" if e.attempt > 1 else "")
                 + (f" · {fmt_bytes(e.rss_bytes)} resident" if e.rss_bytes else "")
                 + ("" if e.started > 0 else " · as seen by the caller"))
        prev = bars[-1] if bars else None
        if (prev is not None and prev.status == e.status == "ok"
                and not prev.caller_view and e.started > 0
                and (b - a) < seconds_per_px and (prev.end - prev.begin) < 2 * seconds_per_px
                and a - prev.end < seconds_per_px):
            prev.end = max(prev.end, b)
            prev.serde += e.serde_seconds
            prev.waiting += waiting
            prev.count += 1
            prev.title = f"{prev.count} small chunks, up to item {e.start_index + e.n_items - 1}"
            continue
        bars.append(_Bar(a, b, e.status, e.serde_seconds, waiting, wait_from, e.started <= 0,
                         title))
    return bars


# -- HTML ------------------------------------------------------------------------------------
_CSS = """
body{margin:0;background:#f3f5f7;color:#1d2730;font:14px/1.45 system-ui,-apple-system,
"Segoe UI",sans-serif}
main{max-width:1160px;margin:24px auto;padding:0 20px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:16px;margin:26px 0 10px}
.sub{color:#5b6773;margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:18px}
.card{flex:1 1 112px;background:#fff;border:1px solid #e1e5ea;border-radius:8px;padding:10px 14px}
.card b{display:block;font-size:19px;white-space:nowrap}
.card span{color:#5b6773;font-size:12px}
.panel{background:#fff;border:1px solid #e1e5ea;border-radius:8px;padding:12px 14px}
table{border-collapse:collapse;width:100%}
th,td{padding:5px 8px;text-align:right;border-bottom:1px solid #edf0f3;white-space:nowrap}
th:first-child,td:first-child,th.l,td.l{text-align:left}
th{color:#5b6773;font-weight:600;font-size:12px}
.split{display:flex;height:12px;width:260px;border-radius:3px;overflow:hidden;background:#eef1f4}
.split i{display:block;height:100%}
ul{margin:0;padding-left:20px}
pre{background:#fff;border:1px solid #e1e5ea;border-radius:8px;padding:12px 14px;overflow:auto;
font-size:12.5px;margin:0}
.muted{color:#6b7785}
"""
_SPLIT_COLOURS = (("start-up", STARTUP_COLOUR), ("compute", STATUS_COLOURS["ok"]),
                  ("serialization", SERDE_COLOUR), ("waiting on caller", WAIT_COLOUR),
                  ("idle", "#d9dee3"))


def _html_page(r: RunReport) -> str:
    st = r.stats
    slots = r.slots()
    measured = r.measured_speedup()
    n_items = st.items or sum(e.n_items for e in st.events if e.status == "ok")
    n_chunks = st.chunks or sum(1 for e in st.events if e.status == "ok")
    peak = max((b for _, b in st.memory), default=0)
    cards = [(fmt_seconds(r.wall_seconds), "wall time"), (f"{n_items:,}", "items"),
             (f"{n_chunks:,}", "chunks"),
             (str(sum(1 for s in slots if s.lane != "caller")), "workers")]
    if r.plan is not None:
        cards.append((f"{r.plan.estimated_speedup:.2f}x", "predicted speedup"))
    if measured is not None:
        cards.append((f"{measured:.2f}x", "measured speedup"))
    if peak:
        cards.append((fmt_bytes(peak), "peak caller memory"))
    if st.retries:
        cards.append((str(st.retries), "retries"))
    sub = (f"{r.plan.executor}, n_jobs={r.plan.n_jobs}" if r.plan is not None else
           "plan not recorded")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>amortune run report</title>", f"<style>{_CSS}</style></head><body><main>",
           "<h1>amortune run report</h1>",
           f'<p class="sub">{_esc(sub)} · {n_items:,} items in {_esc(fmt_seconds(r.wall_seconds))}'
           " · hover a bar for its items and times</p>"]
    out += [f'<p class="sub">{_esc(n)}</p>' for n in r.notes]
    out += [
           '<div class="cards">']
    out += [f'<div class="card"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>' for v, k in cards]
    out += ["</div>", '<h2>Timeline</h2><div class="panel">', r.to_svg(), "</div>"]
    if st.changes:
        out.append("<h2>What the run changed in the plan</h2><div class=\"panel\"><ol>")
        out += [f"<li><b>{_esc(fmt_seconds(max(0.0, c.at - r.t0)))}</b> {_esc(c.what)}</li>"
                for c in sorted(st.changes, key=lambda c: c.at)]
        out.append("</ol></div>")
    if slots:
        out.append('<h2>Where each slot\'s time went</h2><div class="panel"><table><tr>'
                   "<th>slot</th><th class=\"l\">split</th><th>start-up</th><th>compute</th>"
                   "<th>serialization</th><th>waiting on caller</th><th>idle</th>"
                   "<th>chunks</th><th>items</th></tr>")
        for s in slots:
            values = (s.startup, s.compute, s.serialization, s.waiting, s.idle)
            bar = "".join(
                f'<i style="width:{100 * v / s.span:.2f}%;background:{c}" '
                f'title="{_esc(name)} {_esc(fmt_seconds(v))}"></i>'
                for v, (name, c) in zip(values, _SPLIT_COLOURS, strict=True)
                if s.span > 0 and v > 0)
            if s.lane == "caller":  # the rest of the caller's time is its own business
                values = (0.0, s.compute, 0.0, 0.0, 0.0)
            cells = "".join(f"<td>{_esc(fmt_seconds(v)) if v > 0 else '–'}</td>" for v in values)
            out.append(f"<tr><td>{_esc(s.lane)}</td><td class=\"l\"><div class=\"split\">{bar}</div></td>"
                       f"{cells}<td>{s.chunks}</td><td>{s.items:,}</td></tr>")
        out.append("</table></div>")
    findings = r.findings()
    out.append('<h2>Findings</h2><div class="panel">')
    if findings:
        out.append("<ul>" + "".join(f"<li>{_esc(f)}</li>" for f in findings) + "</ul>")
    else:
        out.append('<p class="muted" style="margin:0">Nothing stood out: the workers spent '
                   "their time running items.</p>")
    out.append("</div>")
    out += ["<h2>The run in words</h2>", f"<pre>{_esc(r.explain())}</pre>"]
    if r.plan is not None:
        out += ["<h2>The plan it started from</h2>", f"<pre>{_esc(r.plan.explain())}</pre>"]
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


# -- PNG -------------------------------------------------------------------------------------
def _draw_png(r: RunReport, figure: Any, canvas: Any, path: str | os.PathLike[str],
              dpi: int) -> None:
    lanes = r._lanes
    n = max(1, len(lanes))
    fig = figure(figsize=(11, 2.2 + 0.32 * n + 2.4), dpi=dpi)
    canvas(fig)
    grid = fig.add_gridspec(3, 1, height_ratios=[max(1.2, 0.32 * n), 1, 1], hspace=0.35)
    ax = fig.add_subplot(grid[0])
    ax_c = fig.add_subplot(grid[1], sharex=ax)
    ax_m = fig.add_subplot(grid[2], sharex=ax)
    for i, lane in enumerate(lanes):
        y = n - 1 - i
        start = r.stats.worker_starts.get(lane.key[1]) if lane.key[0] else None
        if start is not None:
            ax.broken_barh([(start[0] - r.t0, max(0.0, start[1] - start[0]))], (y - 0.4, 0.8),
                           facecolors="#d5dbe1", edgecolors=STARTUP_COLOUR, hatch="///")
        free = None if not lane.key[0] else (start[1] if start is not None else r.t0)
        for bar in _coalesce(lane.events, r.wall_seconds / 900 if r.wall_seconds else 1e-9, free):
            ax.broken_barh([(bar.begin - r.t0, max(bar.end - bar.begin, 1e-9))], (y - 0.4, 0.8),
                           facecolors=STATUS_COLOURS.get(bar.status, STATUS_COLOURS["ok"]),
                           edgecolors="white", linewidth=0.4,
                           alpha=0.55 if bar.caller_view else 1.0)
            if bar.waiting > 0:
                ax.broken_barh([(bar.wait_from - r.t0, bar.waiting)], (y - 0.4, 0.2),
                               facecolors=WAIT_COLOUR)
    for c in r.stats.changes:
        ax.axvline(c.at - r.t0, color="#7d3c98", linestyle="--", linewidth=1)
    ax.set_yticks(range(n))
    ax.set_yticklabels([lane.label for lane in reversed(lanes)] or [""])
    ax.set_xlim(0, max(r.wall_seconds, 1e-9))
    ax.set_title("amortune run: " + r.explain().splitlines()[0].split(": ", 1)[1], fontsize=10,
                 loc="left")
    for axis, points, label, colour in (
            (ax_c, r.chunk_sizes(), "chunk size", "#4c78a8"),
            (ax_m, [(t, b / 2**20) for t, b in r.memory()], "caller MiB", "#54a24b")):
        if points:
            xs, ys = zip(*points, strict=True)
            step = "post" if label == "chunk size" else None
            if step:
                axis.step(xs, ys, where="post", color=colour)
            else:
                axis.plot(xs, ys, color=colour)
            axis.fill_between(xs, ys, step=step, color=colour, alpha=0.15)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    ax_m.set_xlabel("seconds since the start of the run")
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="#d5dbe1", edgecolor=STARTUP_COLOUR, hatch="///",
                     label="start-up")]
    handles += [Patch(facecolor=c, label=name) for name, c in (
        ("ok", STATUS_COLOURS["ok"]), ("func raised", STATUS_COLOURS["error"]),
        ("lost", STATUS_COLOURS["lost"]), ("cancelled", STATUS_COLOURS["cancelled"]),
        ("waiting on the caller", WAIT_COLOUR))]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.savefig(os.fspath(path), dpi=dpi, bbox_inches="tight")


@contextlib.contextmanager
def report() -> Iterator[Recording]:
    """Record every map run in this thread inside the ``with`` block, to look at afterwards.

    >>> import amortune
    >>> with amortune.report() as rep:
    ...     _ = amortune.execute(abs, range(-5, 5), backend="threads", n_jobs=2)
    >>> rep.stats.items > 0
    True
    """
    rec = Recording()
    push_recorder(rec)
    try:
        yield rec
    finally:
        pop_recorder(rec)


class Recording(Recorder):
    """The runs recorded by :func:`report`; the last one as a :class:`RunReport`."""

    def report(self, index: int = -1) -> RunReport:
        """The run ``index`` (default: the last) as a :class:`RunReport`."""
        if not self.runs:
            raise LookupError("no map ran inside this amortune.report() block")
        plan, stats = self.runs[index]
        return build_report(stats, plan)

    def explain(self) -> str:
        """Text report of the last run."""
        return self.report().explain()

    def to_html(self, path: str | os.PathLike[str] | None = None) -> str:
        """Self-contained HTML page (SVG timeline) of the last run."""
        return self.report().to_html(path)

    def to_png(self, path: str | os.PathLike[str], *, dpi: int = 120) -> None:
        """PNG of the last run (needs the ``plot`` extra, matplotlib)."""
        self.report().to_png(path, dpi=dpi)
