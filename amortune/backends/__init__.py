"""Where chunks run, behind one contract (:mod:`amortune.backends._base`), and the registry.

``backend=`` on every entry point takes a registered name (``"serial"``, ``"threads"``,
``"processes"``, ``"dask"``, ``"gpu"``), a :class:`Backend` instance, or an object a registered
backend recognises (a ``distributed.Client``, an address such as ``"tcp://host:8786"``).
Optional backends are imported only when asked for, so ``import amortune`` stays light.

Register your own with :func:`register_backend`::

    register_backend("mine", lambda n_jobs, config: MyBackend(n_jobs))
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

from ._base import (
    STYLES,
    Backend,
    BackendInfo,
    ChunkFuture,
    ChunkOutcome,
    ChunkTask,
    FunctionRef,
    Slot,
    WorkerSetup,
)

__all__ = [
    "STYLES",
    "Backend",
    "BackendInfo",
    "ChunkFuture",
    "ChunkOutcome",
    "ChunkTask",
    "FunctionRef",
    "Slot",
    "WorkerSetup",
    "register_backend",
    "resolve_backend",
    "shutdown_warm_pools",
]

#: ``factory(n_jobs, config) -> Backend``, by name.
Factory = Callable[[int | None, Any], Backend]
#: ``recognise(obj, n_jobs, config) -> Backend | None`` for objects that are not names.
Recogniser = Callable[[Any, "int | None", Any], "Backend | None"]

#: Names the engine runs itself (no Backend object needed to plan them).
BUILTIN = ("serial", "threads", "processes")
#: Optional backends: name -> module that registers it when imported.
_LAZY_MODULES = {"dask": "amortune.backends.dask", "gpu": "amortune.gpu"}
_FACTORIES: dict[str, Factory] = {}
_RECOGNISERS: list[tuple[str, Recogniser]] = []
_LOCK = threading.Lock()


def register_backend(name: str, factory: Factory, recognise: Recogniser | None = None) -> None:
    """Make ``backend=name`` build ``factory(n_jobs, config)``; ``recognise`` maps other objects."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a backend name must be a non-empty string, got {name!r}")
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in backend and cannot be replaced")
    with _LOCK:
        _FACTORIES[name] = factory
        _RECOGNISERS[:] = [(n, r) for n, r in _RECOGNISERS if n != name]
        if recognise is not None:
            _RECOGNISERS.append((name, recognise))


def _load_optional(name: str) -> None:
    module = _LAZY_MODULES.get(name)
    if module is not None and name not in _FACTORIES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            extra = "torch" if name == "gpu" else name
            raise ImportError(
                f"backend={name!r} needs an optional package ({exc.name or exc}); install it "
                f"with: pip install 'amortune[{extra}]'") from exc


def resolve_backend(spec: Any, *, n_jobs: int | None, config: Any) -> str | Backend:
    """A built-in name, or a :class:`Backend` for ``spec`` (a name, an instance, an object).

    Raises ``ValueError`` naming the choices for an unknown name and ``TypeError`` for an
    object no registered backend recognises.
    """
    if isinstance(spec, Backend):
        return spec
    if isinstance(spec, str):
        if spec in BUILTIN:
            return spec
        if "://" in spec:  # an address: ask the recognisers (the dask backend takes tcp://...)
            _load_optional("dask")
        else:
            _load_optional(spec)
            factory = _FACTORIES.get(spec)
            if factory is not None:
                return factory(n_jobs, config)
    for name in _LAZY_MODULES:  # objects of optional packages that are already imported
        if _module_loaded_for(name, spec):
            _load_optional(name)
    for _, recognise in list(_RECOGNISERS):
        backend = recognise(spec, n_jobs, config)
        if backend is not None:
            return backend
    names = sorted({*BUILTIN, *_FACTORIES, *_LAZY_MODULES})
    if isinstance(spec, str):
        raise ValueError(f"unknown backend {spec!r}; choose one of {', '.join(names)}, or pass "
                         "a Backend instance")
    raise TypeError(f"backend must be a name ({', '.join(names)}), a Backend instance or an "
                    f"object a registered backend recognises, got {type(spec).__name__}")


def _module_loaded_for(name: str, obj: Any) -> bool:
    root = (type(obj).__module__ or "").split(".")[0]
    return (name == "dask" and root in ("distributed", "dask")) or (
        name == "gpu" and root == "torch")


def shutdown_warm_pools(kill: bool = False) -> None:
    """Stop the reusable worker pools now instead of at interpreter exit."""
    from ._warm import shutdown_warm_pools as _shutdown

    _shutdown(kill=kill)
