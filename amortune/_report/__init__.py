"""Run reports: what one call did, as text, a self-contained HTML page and a PNG.

:func:`build_report` turns a :class:`~amortune._stats.RunStats` (and the plan the run started
from, if known) into a :class:`RunReport`. ``explain()`` splits each slot's time into start-up,
compute, serialization, idle and waiting on the caller, and follows chunk sizes, memory, the
speedup and the plan changes over the run. ``to_html()`` draws the timeline as inline SVG (no
dependency, no script); ``to_png()`` draws it with matplotlib when the ``plot`` extra is installed.
Imports the standard library only; matplotlib is imported by ``to_png()`` alone.
"""

from ._recording import Recording as Recording
from ._recording import report as report
from ._runreport import RunReport, build_report
from ._timeline import SlotTime

__all__ = ["RunReport", "SlotTime", "build_report"]
