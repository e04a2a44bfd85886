"""The run's timeline as inline SVG: a lane per slot, a bar per chunk, two sparklines."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._model import fmt_bytes, fmt_seconds
from .._record import record
from .._stats import ChunkEvent
from ._timeline import _items, _Lane, _ran

if TYPE_CHECKING:
    from ._runreport import RunReport

#: Chunk colours by status (ok, func raised, lost to a crash or timeout, cancelled).
STATUS_COLOURS = {"ok": "#4c78a8", "error": "#e45756", "lost": "#f58518", "cancelled": "#b8b0aa"}
STARTUP_COLOUR = "#8d99a6"
WAIT_COLOUR = "#e9b92f"
SERDE_COLOUR = "#1f3b5a"


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


@record()
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
