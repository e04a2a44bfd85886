"""``OptimizationResult``: the frozen plan ``optimize()`` returns, with ``explain()`` and ``to_dict()``.

Owns presentation of a decision; it decides nothing. Imports ``_model`` for the numbers it shows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._model import Decision, WorkloadProfile, fmt_bytes, fmt_seconds
from ._record import asdict, field, record

__all__ = ["OptimizationResult"]


@record(frozen=True)
class OptimizationResult:
    """A plan for mapping a function over data, and the measurements behind it.

    ``data`` is the input with the sampled items chained back on, so a generator can still be
    passed to ``Pool.map(func, plan.data, chunksize=plan.chunksize)``. Sampled results are not
    kept here; ``execute`` reuses them internally.
    """

    n_jobs: int
    chunksize: int
    batch_size: int
    executor: str
    estimated_speedup: float
    predicted_serial_seconds: float
    predicted_seconds: float
    reasons: tuple[str, ...]
    warnings: list[str]
    data: Iterable[Any] = field(repr=False, compare=False)
    profile: WorkloadProfile = field(repr=False)
    n_items: int | None = None
    start_method: str = "forkserver"
    system: str = ""
    thread_cap: int | None = None

    @classmethod
    def from_decision(
        cls,
        decision: Decision,
        profile: WorkloadProfile,
        data: Iterable[Any],
        *,
        n_items: int | None,
        start_method: str,
        system: str,
        extra_reasons: tuple[str, ...] = (),
        extra_warnings: tuple[str, ...] = (),
    ) -> OptimizationResult:
        """Wrap a model :class:`~amortune._model.Decision` with its context."""
        return cls(
            n_jobs=decision.n_jobs,
            chunksize=decision.chunksize,
            batch_size=decision.batch_size,
            executor=decision.executor,
            estimated_speedup=decision.estimated_speedup,
            predicted_serial_seconds=decision.predicted_serial_seconds,
            predicted_seconds=decision.predicted_seconds,
            reasons=extra_reasons + decision.reasons,
            warnings=list(extra_warnings + decision.warnings),
            data=data,
            profile=profile,
            n_items=n_items,
            start_method=start_method,
            system=system,
            thread_cap=decision.thread_cap,
        )

    @property
    def parallel(self) -> bool:
        """True when the plan runs on more than one worker."""
        return self.executor != "serial"

    def explain(self) -> str:
        """A readable report: the decision, the predicted speedup, the measurements, the reasons."""
        p = self.profile
        items = "unknown" if self.n_items is None else str(self.n_items)
        # A serial plan runs in the caller: it has no chunks, and sampling does not pickle
        # anything when the work is too small for workers to matter.
        chunks = f", chunksize={self.chunksize}" if self.parallel else ""
        if p.in_bytes or p.out_bytes:
            pickled = f"pickled in {fmt_bytes(p.in_bytes)}, out {fmt_bytes(p.out_bytes)}"
        else:
            pickled = "pickled sizes not measured" + (" (serial plan)" if not self.parallel
                                                       else "")
        lines = [
            f"amortune plan: {self.executor}, n_jobs={self.n_jobs}{chunks}, "
            f"batch_size={self.batch_size}",
            f"  predicted: {fmt_seconds(self.predicted_seconds)} vs "
            f"{fmt_seconds(self.predicted_serial_seconds)} serial "
            f"(speedup {self.estimated_speedup:.2f}x)",
            f"  measured on {p.n_sampled} item(s) of {items}: {fmt_seconds(p.item_wall_seconds)} "
            f"wall, {fmt_seconds(p.item_cpu_seconds)} CPU per item (cv {p.item_wall_cv:.2f}); "
            f"{pickled}; result memory {fmt_bytes(p.result_memory_bytes)}",
        ]
        if self.system:
            lines.append(f"  machine: {self.system}")
        lines += [f"  - {r}" for r in self.reasons]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data (JSON-serialisable), without the input."""
        return {
            "n_jobs": self.n_jobs,
            "chunksize": self.chunksize,
            "batch_size": self.batch_size,
            "executor": self.executor,
            "estimated_speedup": self.estimated_speedup,
            "predicted_serial_seconds": self.predicted_serial_seconds,
            "predicted_seconds": self.predicted_seconds,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "n_items": self.n_items,
            "start_method": self.start_method,
            "system": self.system,
            "thread_cap": self.thread_cap,
            "profile": asdict(self.profile),
        }

    def __str__(self) -> str:
        return self.explain()
