"""Where chunks run. A backend implements ``capacity``, ``setup_workers``, ``submit`` and
``shutdown`` (see :class:`~amortune.backends._base.Backend`); the scheduler does the rest.

Local processes and threads live in :mod:`amortune.backends.local`. Optional backends are
imported only when asked for by name.
"""

from __future__ import annotations

from ._base import Backend, ChunkOutcome, FunctionRef

__all__ = ["Backend", "ChunkOutcome", "FunctionRef", "shutdown_warm_pools"]


def shutdown_warm_pools(kill: bool = False) -> None:
    """Stop the reusable worker pools now instead of at interpreter exit."""
    from .local import shutdown_warm_pools as _shutdown

    _shutdown(kill=kill)
