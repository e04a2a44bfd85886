"""One frozen options object, and the only place ``AMORTUNE_*`` environment variables are read.

Every entry point accepts a few keyword shortcuts plus ``config=``; only a :class:`Config` travels
inward. Imports the standard library only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from ._record import record, replace

__all__ = ["Config", "default_start_method"]

_START_METHODS = ("fork", "forkserver", "spawn")


def default_start_method() -> str:
    """The start method for workers started once the caller has threads of its own.

    ``forkserver`` on Linux: safe with the caller's threads (plain ``fork`` is not, and Python 3.14
    made forkserver the default there too), and after its one-time start a worker costs ~6 ms
    against ~40 ms for ``spawn`` (measured on the 2-core reference machine). ``spawn`` elsewhere.
    With ``Config(start_method=None)`` (the default) the first workers are forked from a
    single-threaded caller instead (a few ms), see ``amortune._start``.
    """
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


@record(frozen=True)
class Config:
    """Options for planning and running a map; every field has a safe default.

    Parameters
    ----------
    max_workers:
        Upper bound on worker processes (``AMORTUNE_MAX_WORKERS``); ``None`` means usable cores.
    max_threads:
        Upper bound on threads for I/O-bound work (``AMORTUNE_MAX_THREADS``).
    start_method:
        ``"fork"``, ``"forkserver"`` or ``"spawn"`` (``AMORTUNE_START_METHOD``); ``None`` forks
        the first workers from a single-threaded caller and uses forkserver (spawn off Linux)
        for later ones, unless ``multiprocessing.set_start_method()`` chose a method.
    sample_seconds, sample_items:
        Sampling in the caller stops at whichever budget is reached first.
    target_chunk_seconds:
        Wall time one chunk should take in a worker: long enough to hide dispatch cost, short
        enough to balance the load and to notice a slow item.
    memory_fraction:
        Share of available memory results in flight may take (``max_memory_percent``).
    worker_memory_growth_bytes:
        A worker whose resident memory grows by more than this is replaced after its chunk.
    retries, timeout_seconds, retry_on, retry_backoff_seconds:
        Fault handling: how many times a lost or failing chunk is re-run, the per-item timeout,
        which exception types from ``func`` count as transient, and the first retry's delay
        (doubling with each further try).
    sample_in_caller:
        ``False`` runs every item in a worker process, none in the caller: for functions that may
        crash their process (a segfaulting extension) or must not touch the caller's state. The
        plan then starts from one-item chunks instead of a sample (``timeout_seconds`` implies it).
    """

    max_workers: int | None = None
    max_threads: int = 64
    start_method: str | None = None
    sample_seconds: float = 0.02
    sample_items: int = 64
    target_chunk_seconds: float = 0.05
    memory_fraction: float = 0.5
    worker_memory_growth_bytes: int | None = 2 << 30
    retries: int = 0
    timeout_seconds: float | None = None
    retry_on: tuple[type[BaseException], ...] = ()
    retry_backoff_seconds: float = 0.05
    sample_in_caller: bool = True

    def __post_init__(self) -> None:
        if self.max_workers is not None and self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1 or None, got {self.max_workers!r}")
        if self.max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {self.max_threads!r}")
        if self.start_method is not None and self.start_method not in _START_METHODS:
            raise ValueError(
                f"start_method must be one of {_START_METHODS}, got {self.start_method!r}"
            )
        if not self.sample_seconds > 0:
            raise ValueError(f"sample_seconds must be > 0, got {self.sample_seconds!r}")
        if self.sample_items < 1:
            raise ValueError(f"sample_items must be >= 1, got {self.sample_items!r}")
        if not self.target_chunk_seconds > 0:
            raise ValueError(
                f"target_chunk_seconds must be > 0, got {self.target_chunk_seconds!r}"
            )
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(
                f"memory_fraction (max_memory_percent) must be in (0, 1], got {self.memory_fraction!r}"
            )
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries!r}")
        if self.timeout_seconds is not None and not self.timeout_seconds > 0:
            raise ValueError(f"timeout must be > 0 or None, got {self.timeout_seconds!r}")
        if self.retry_backoff_seconds < 0:
            raise ValueError(
                f"retry_backoff_seconds must be >= 0, got {self.retry_backoff_seconds!r}")
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on):
            raise TypeError(f"retry_on must be a tuple of exception types, got {self.retry_on!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Defaults, then ``AMORTUNE_*`` variables, then explicit ``overrides`` (``None`` skipped)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field, conv in (
            ("AMORTUNE_MAX_WORKERS", "max_workers", int),
            ("AMORTUNE_MAX_THREADS", "max_threads", int),
            ("AMORTUNE_START_METHOD", "start_method", str),
            ("AMORTUNE_TARGET_CHUNK_SECONDS", "target_chunk_seconds", float),
        ):
            raw = env.get(name)
            if raw:
                try:
                    values[field] = conv(raw)
                except ValueError:
                    raise ValueError(f"{name}={raw!r} is not a valid {conv.__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
