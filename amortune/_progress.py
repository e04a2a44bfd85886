"""Progress reporting shared by every entry point: a tqdm bar and/or a callback.

tqdm is imported only when a bar is asked for. Imports the standard library only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Progress"]


class Progress:
    """Fans item counts out to a tqdm bar and/or a ``progress_callback(phase, fraction)``."""

    def __init__(self, progress: Any, callback: Callable[[str, float], None] | None,
                 total: int | None, initial: int = 0, desc: str = "amortune") -> None:
        self.callback, self.total, self.done = callback, total, initial
        self._last = -1.0
        self.bar: Any = None
        self._own = False
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="item", desc=desc, dynamic_ncols=True)
            self._own = True
        elif progress is not None and progress is not False:
            self.bar = progress
            if total is not None and getattr(self.bar, "total", None) is None:
                self.bar.total = total
            self.bar.update(initial)
        if callback is not None:
            callback("optimize", 1.0)
            self._emit()

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None:
            self._emit()

    def _emit(self) -> None:
        if self.callback is not None:
            frac = self.done / self.total if self.total else (1.0 if self.total == 0 else 0.0)
            self._last = min(1.0, frac)
            self.callback("execute", self._last)

    def close(self) -> None:
        """Report completion once (unknown totals and empty input included); close an own bar."""
        if self.callback is not None and self._last < 1.0:
            self._last = 1.0
            self.callback("execute", 1.0)
        if self._own and self.bar is not None:
            self.bar.close()
