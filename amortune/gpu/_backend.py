"""``backend="gpu"``: any function, in one spawned worker per device."""

from __future__ import annotations

import sys
from typing import Any

from .. import _device
from ._plan import _slot_env, resolve_devices, worker_threads


def device_backend(devices: Any = "auto") -> Any:
    """A process backend with one spawned worker per device, each pinned by its environment.

    ``execute(func, data, backend="gpu")`` uses it; ``backend=torch.device("cuda:1")`` pins one.
    """
    from ..backends import Slot
    from ..backends.processes import ProcessBackend

    ids = resolve_devices(devices)
    slots = [Slot(i, devices=() if d == "cpu" else (d,), env=_slot_env(d, i))
             for i, d in enumerate(ids)]
    return ProcessBackend(len(slots), start_method="spawn", slots=slots,
                          thread_cap=worker_threads(len(ids)))


def _backend_factory(n_jobs: int | None, config: Any) -> Any:
    ids = resolve_devices("auto")
    return device_backend(ids[:n_jobs] if n_jobs else ids)


def _recognise(obj: Any, n_jobs: int | None, config: Any) -> Any:
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.device) or obj.type != "cuda":
        return None
    ids = list(_device.discover_devices().ids)
    index = obj.index or 0
    if index >= len(ids):
        raise ValueError(f"{obj} asked for, but {len(ids)} GPU(s) were found")
    return device_backend([ids[index]])


def _register() -> None:
    from ..backends import register_backend

    register_backend("gpu", _backend_factory, _recognise)
