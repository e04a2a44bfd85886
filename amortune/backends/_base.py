"""The small interface every place-to-run implements, and the values that cross it.

A backend only runs chunks: tuning, ordering, retries, progress, spill and checkpoints live once,
in the scheduler. Imports the standard library only (cloudpickle lazily, for functions).
"""

from __future__ import annotations

import hashlib
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["Backend", "ChunkOutcome", "FunctionRef"]


class ChunkOutcome(NamedTuple):
    """A finished chunk: its results in order and what running it cost in the worker."""

    results: list[Any]
    wall_seconds: float
    cpu_seconds: float
    rss_bytes: int


@dataclass
class FunctionRef:
    """A function with its pickled form computed once and a token workers cache it under."""

    func: Callable[..., Any]
    _payload: bytes | None = field(default=None, repr=False)
    _token: str | None = field(default=None, repr=False)

    @property
    def payload(self) -> bytes:
        if self._payload is None:
            import cloudpickle  # by value for __main__ functions, lambdas and closures

            self._payload = cloudpickle.dumps(self.func, protocol=pickle.HIGHEST_PROTOCOL)
        return self._payload

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = hashlib.sha1(self.payload).hexdigest()[:20]
        return self._token


class Backend(ABC):
    """Where chunks run: ``capacity``, ``setup_workers``, ``submit``, ``shutdown``."""

    kind: str = "abstract"

    @abstractmethod
    def capacity(self) -> int:
        """How many chunks can run at once."""

    def setup_workers(self, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...] = ()) -> None:
        """Run ``initializer(*initargs)`` once in every worker before its first chunk."""
        if initializer is not None:
            raise NotImplementedError(f"the {self.kind} backend has no per-worker initializer")

    @abstractmethod
    def submit(
        self,
        fn: FunctionRef,
        items: list[Any],
        start: int,
        *,
        mode: str = "map",
        timeout_seconds: float | None = None,
    ) -> Future[ChunkOutcome]:
        """Run ``fn`` over ``items`` (input indices ``start``...) and return a future outcome."""

    @abstractmethod
    def shutdown(self, wait: bool = True, *, kill: bool = False) -> None:
        """Stop the workers; ``kill`` ends them at once (Ctrl-C, terminate)."""

    @property
    def warm_workers(self) -> int:
        """Workers already started and idle-ready (start-up cost of a run is then ~0)."""
        return 0

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True, kill=exc[0] is not None)
