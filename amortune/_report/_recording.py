"""``amortune.report()``: record the runs of a ``with`` block."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .._stats import Recorder, pop_recorder, push_recorder
from ._runreport import RunReport, build_report


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
