"""Caller side, before any worker starts: devices, thread and memory shares, and the checked
arguments of a call as a plan."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from .. import _device
from ._constants import (
    CORES_PER_CPU_WORKER,
    CPU_MEMORY_FRACTION,
    DEFAULT_MAX_BATCH_SIZE,
    MARGIN,
    PROBE_MAX_SECONDS,
    SAMPLE_ITEMS,
    WORKER_DEVICE_ENV,
    WORKER_SLOT_ENV,
    log,
)
from ._transfer import _compact
from ._worker import _WorkerConfig


def _slot_env(device: str, slot: int) -> dict[str, str]:
    """The variables a worker starts with: its device (no GPU at all for a CPU worker)."""
    return {_device.VISIBLE_ENV: "" if device == "cpu" else device, WORKER_DEVICE_ENV: device,
            WORKER_SLOT_ENV: str(slot)}


def _usable_cores() -> int:
    """Cores this process may use: affinity, cgroup quota and AMORTUNE_MAX_WORKERS applied."""
    from .._system import probe_system

    try:
        return max(1, probe_system().usable_cores)
    except Exception:  # an unreadable /proc: the affinity mask alone
        try:
            return len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return os.cpu_count() or 1


def _cpu_budget(devices: Sequence[str]) -> int | None:
    """Memory one CPU worker's batch may use: a share of what is available now."""
    n_cpu = sum(1 for d in devices if d == "cpu")
    if not n_cpu:
        return None
    from .._system import memory_snapshot

    try:
        return int(memory_snapshot() * CPU_MEMORY_FRACTION / n_cpu)
    except Exception:
        return None


def worker_threads(n_workers: int) -> int:
    """Torch threads per worker: the usable cores less one for the caller, shared evenly.

    The caller packs and unpacks every batch while the workers compute; a worker whose thread
    team includes the caller's core stalls each time the caller runs (a parallel operation
    waits for its slowest thread).
    """
    cores = _usable_cores()
    return max(1, (cores - 1 if cores > 1 else 1) // max(1, n_workers))


def resolve_devices(devices: Any = "auto") -> list[str]:
    """Device ids for the workers: GPU ids (``"0"``, ``"GPU-…"``, ``"MIG-…"``) or ``"cpu"``.

    ``"auto"``: every GPU found, else CPU workers; ``"cpu"``: CPU workers (one per
    ``CORES_PER_CPU_WORKER`` usable cores); an int ``k``: the first ``k`` GPUs; a sequence: those
    ids (``"cpu"`` entries make CPU workers).
    """
    if devices is None or devices == "auto":
        found = _device.discover_devices()
        if found.ids:
            return list(found.ids)
        log.info("amortune: no GPU (%s); running on CPU workers", found.source)
        devices = "cpu"
    if devices == "cpu":
        return ["cpu"] * max(1, _usable_cores() // CORES_PER_CPU_WORKER)
    if isinstance(devices, int) and not isinstance(devices, bool):
        found = _device.discover_devices()
        if devices < 1 or devices > len(found.ids):
            raise ValueError(f"devices={devices} but {len(found.ids)} GPU(s) were found "
                             f"({found.source})")
        return list(found.ids[:devices])
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Iterable):
        raise ValueError(f"devices must be 'auto', 'cpu', a number of GPUs or a sequence of "
                         f"device ids, got {devices!r}")
    ids = [str(d) for d in devices]
    if not ids:
        raise ValueError("devices is empty")
    return ids


def _check_size(name: str, value: Any, *, auto: bool = True) -> int | None:
    if value is None or (auto and value == "auto"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "'auto' or an int >= 1" if auto else "an int >= 1"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def _check_retries(retries: Any) -> None:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")


def _fingerprint(*funcs: Any) -> str:
    from .._checkpoint import function_fingerprint

    h = hashlib.sha256()
    for f in funcs:
        h.update((function_fingerprint(f) if f is not None else "-").encode())
    return h.hexdigest()


class _Plan(NamedTuple):
    devices: list[str]
    config: _WorkerConfig
    order: list[int]
    lengths: list[int] | None


def _plan(load_model: Any, items: list[Any], *, predict: Any, collate: Any, split: Any,
          length: Any, devices: Any, batch_size: Any, max_batch_size: Any, max_tokens: Any,
          timeout: float | None) -> _Plan:
    if not callable(load_model):
        raise TypeError(f"load_model must be a callable returning the model, got {load_model!r}")
    fixed_items = _check_size("batch_size", batch_size)
    limit = _check_size("max_batch_size", max_batch_size, auto=False) or DEFAULT_MAX_BATCH_SIZE
    fixed_tokens = _check_size("max_tokens", max_tokens)
    if length is None and max_tokens is not None:
        raise ValueError("max_tokens needs length= (how many tokens an item has)")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    ids = resolve_devices(devices)
    lengths = None
    order = list(range(len(items)))
    if length is not None:
        lengths = [int(length(x)) for x in items]
        if any(n < 0 for n in lengths):
            raise ValueError("length() returned a negative number")
        order.sort(key=lambda i: -lengths[i])  # stable: ties keep input order
    search: str | None = None
    token_mode = length is not None and (max_tokens is not None or fixed_items is None)
    if token_mode and fixed_tokens is None:
        search = "tokens"
    elif fixed_items is None and not token_mode:
        search = "items"
    # No batch is bigger than one worker's share of the input: it would only idle the others.
    share = max(1, math.ceil(len(items) / len(ids))) if items else limit
    item_cap = fixed_items or (min(limit, share) if search == "items" else limit)
    packed_lengths = [lengths[i] for i in order] if lengths is not None else None
    token_limit = None
    if search == "tokens" and packed_lengths:
        token_limit = max(packed_lengths[0], math.ceil(len(items) * packed_lengths[0] / len(ids)))
    sample_pos = range(min(SAMPLE_ITEMS, len(items)))
    sample = tuple(_compact(items[order[p]]) for p in sample_pos)
    sample_lengths = tuple(packed_lengths[p] for p in sample_pos) if packed_lengths else None
    config = _WorkerConfig(
        predict=predict, collate=collate, split=split,
        n_threads=worker_threads(len(ids)), search=search, item_cap=item_cap,
        token_cap=fixed_tokens, token_limit=token_limit, sample=sample,
        sample_lengths=sample_lengths, margin=MARGIN,
        probe_seconds=PROBE_MAX_SECONDS if timeout is None else min(PROBE_MAX_SECONDS, timeout / 2),
        trace_dir=None, sequences=length is not None,
        memory_budget_bytes=_cpu_budget(ids))
    return _Plan(ids, config, order, lengths)
