"""amortune: measure, then map.

``optimize(func, data)`` samples a function on a few items, reads the machine and decides serial,
processes or threads with ``n_jobs``, ``chunksize`` and a memory-safe ``batch_size``, with reasons.
``execute``, ``process_in_batches`` and :class:`Pool` run that plan with bounded memory, ordered
results and workers that never hang the caller. Importing this package loads only the standard
library; numpy, psutil, tqdm, torch and dask load when a call needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AmortuneError",
    "AmortuneWarning",
    "Batcher",
    "CheckpointError",
    "CheckpointMismatchError",
    "Config",
    "MemoryBudgetError",
    "NotPicklableError",
    "OptimizationResult",
    "Pool",
    "SpillError",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "estimate_safe_batch_size",
    "execute",
    "imap",
    "optimize",
    "probe_system",
    "process_in_batches",
    "report",
    "__version__",
]

# name -> module that defines it; loaded on first access (PEP 562) so `import amortune` stays fast.
_LAZY = {
    "AmortuneError": "._errors",
    "AmortuneWarning": "._errors",
    "MemoryBudgetError": "._errors",
    "NotPicklableError": "._errors",
    "WorkerCrashedError": "._errors",
    "TaskTimeoutError": "._errors",
    "SpillError": "._spill",
    "CheckpointError": "._checkpoint",
    "CheckpointMismatchError": "._checkpoint",
    "Config": "._config",
    "OptimizationResult": "._plan",
    "probe_system": "._system",
    "optimize": "._optimize",
    "execute": "._execute",
    "imap": "._execute",
    "process_in_batches": "._batches",
    "estimate_safe_batch_size": "._batches",
    "Pool": "._pool",
    "Batcher": "._batcher",
    "report": "._report",
}

#: Public submodules, imported on first access.
_SUBMODULES = ("backends", "gpu")

if TYPE_CHECKING:
    from ._batcher import Batcher
    from ._batches import estimate_safe_batch_size, process_in_batches
    from ._checkpoint import CheckpointError, CheckpointMismatchError
    from ._config import Config
    from ._errors import (
        AmortuneError,
        AmortuneWarning,
        MemoryBudgetError,
        NotPicklableError,
        TaskTimeoutError,
        WorkerCrashedError,
    )
    from ._execute import execute, imap
    from ._optimize import optimize
    from ._plan import OptimizationResult
    from ._pool import Pool
    from ._report import report
    from ._spill import SpillError
    from ._system import probe_system


def __getattr__(name: str) -> Any:
    from importlib import import_module

    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'amortune' has no attribute {name!r}")

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
