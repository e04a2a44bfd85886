"""The self-contained HTML page of a run: cards, the SVG timeline, the time split, findings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._model import fmt_bytes, fmt_seconds
from ._svg import SERDE_COLOUR, STARTUP_COLOUR, STATUS_COLOURS, WAIT_COLOUR, _esc

if TYPE_CHECKING:
    from ._runreport import RunReport

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
