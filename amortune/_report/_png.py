"""The run's timeline drawn with matplotlib, which the caller imports and passes in."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._svg import STARTUP_COLOUR, STATUS_COLOURS, WAIT_COLOUR, _coalesce

if TYPE_CHECKING:
    from ._runreport import RunReport


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
