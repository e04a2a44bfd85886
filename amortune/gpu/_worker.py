"""Worker side: load the model once, then run tasks in batches of this device's size.

The entry points (``_init_worker``, ``_run_task``, ``_probe_task``) run in a spawned child and
are module-level so they pickle by reference.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .. import _device
from .._errors import add_note, describe_indices
from .._record import record, replace
from ._collate import _split_n, _to_device, default_collate, default_predict
from ._constants import (
    CPU_MAX_BATCH_SIZE,
    CPU_MAX_TOKENS,
    CPU_START_BATCH_SIZE,
    WORKER_DEVICE_ENV,
    WORKER_SLOT_ENV,
    log,
)
from ._exceptions import ItemTooLargeError
from ._search import BatchSizeReport, pack_batches, search_batch_size, timed_repeats
from ._transfer import _as_list, _pack, _Rows, _unpack


@record(frozen=True)
class _WorkerConfig:
    predict: Callable[[Any, Any], Any] | None
    collate: Callable[[Sequence[Any]], Any] | None
    split: Callable[[Any, Any], list[Any]] | None
    n_threads: int | None
    #: ``"items"``, ``"tokens"`` or ``None`` (sizes fixed by the caller).
    search: str | None
    item_cap: int
    token_cap: int | None
    #: Largest tokens the token search tries.
    token_limit: int | None
    sample: tuple[Any, ...]
    sample_lengths: tuple[int, ...] | None
    margin: float
    probe_seconds: float
    #: Folder where each worker notes the task it runs (which device lost a batch).
    trace_dir: str | None
    #: Items are sequences (``length=`` given): the default collate always pads them.
    sequences: bool = False
    #: Resident memory a CPU worker's probe batch may grow by.
    memory_budget_bytes: int | None = None


@record()
class _Task:
    """Items to run, their input indices, lengths, and the sizes known per device."""

    seq: int
    indices: tuple[int, ...]
    #: A list, or a :class:`_Packed` on its way to the worker.
    items: Any
    lengths: list[int] | None
    caps: dict[str, tuple[int, int | None]]


class _TaskResult(NamedTuple):
    #: One output per item, as :func:`_pack` sends them.
    outputs: Any
    device: str
    item_cap: int
    token_cap: int | None
    report: BatchSizeReport | None
    oom_splits: int


class _WorkerState:
    def __init__(self, model: Any, device: _device.Device, config: _WorkerConfig) -> None:
        self.model, self.device, self.config = model, device, config
        self.item_cap = config.item_cap
        self.token_cap = config.token_cap
        self.probed = config.search is None
        self.oom_splits = 0


_STATE: _WorkerState | None = None


def _init_worker(load_model: Callable[[], Any], config: _WorkerConfig) -> None:
    """In a new worker: cap torch's threads, pick the device, load the model once."""
    global _STATE
    import torch

    if config.n_threads:
        torch.set_num_threads(config.n_threads)
    device = _device.worker_device(os.environ.get(WORKER_DEVICE_ENV, "cpu"))
    _STATE = _load(load_model, config, device, "in the worker")


def _load(load_model: Callable[[], Any], config: _WorkerConfig, device: _device.Device,
          where: str) -> _WorkerState:
    """Load the model onto ``device``, in eval mode."""
    import torch

    device.check()
    try:
        model = load_model()
    except BaseException as exc:
        add_note(exc, f"amortune: raised by load_model {where} for device {device.id}")
        raise
    if isinstance(model, torch.nn.Module):
        model = model.to(device.torch_device)
    if hasattr(model, "eval"):
        model.eval()
    return _WorkerState(model, device, config)


def _state() -> _WorkerState:
    if _STATE is None:
        raise RuntimeError("amortune.gpu worker used before its model was loaded")
    return _STATE


def _predict_batch(st: _WorkerState, items: Sequence[Any]) -> Sequence[Any]:
    """Collate, move to the device, predict under inference mode, back to CPU, one per item."""
    import torch

    cfg = st.config
    with st.device.measure():
        if cfg.collate is not None:
            batch = cfg.collate(_as_list(items))
        else:
            batch = default_collate(items, pad=cfg.sequences)
        batch = _to_device(batch, st.device.torch_device)
        with torch.inference_mode():
            output = (cfg.predict or default_predict)(st.model, batch)
            output = _to_device(output, "cpu")
            if cfg.split is not None:
                per_item: Sequence[Any] = cfg.split(output, batch)
            elif isinstance(output, torch.Tensor) and output.dim() >= 1 \
                    and output.shape[0] == len(items):
                per_item = _Rows(output)  # kept whole: packed for the pipe without a split
            else:
                per_item = _split_n(output, len(items))
        del batch, output
    if len(per_item) != len(items):
        raise ValueError(f"split returned {len(per_item)} outputs for a batch of {len(items)}")
    return per_item


def _free(device: _device.Device) -> None:
    gc.collect()
    device.empty_cache()


def _note_batch(st: _WorkerState, exc: BaseException, indices: Sequence[int]) -> None:
    add_note(exc, f"amortune: raised by the batch of {describe_indices(tuple(indices))} on "
                  f"device {st.device.id}")


def _run_safely(st: _WorkerState, task: _Task, lo: int, hi: int) -> list[Sequence[Any]]:
    """Run items ``[lo, hi)`` of ``task``; out of memory splits them in two and lowers the cap."""
    items = task.items[lo:hi]
    oom = False
    try:
        return [_predict_batch(st, items)]
    except BaseException as exc:
        if not st.device.is_out_of_memory(exc):
            _note_batch(st, exc, task.indices[lo:hi])
            raise
        oom = True
    assert oom
    _free(st.device)
    if hi - lo == 1:
        raise ItemTooLargeError(
            f"item {task.indices[lo]} alone does not fit in the memory of device {st.device.id}",
            indices=task.indices[lo:hi], items=_as_list(items), device=st.device.id,
            details="out of memory with a batch of one item")
    st.oom_splits += 1
    st.item_cap = max(1, min(st.item_cap, math.floor((hi - lo) * (1 - st.config.margin))))
    if task.lengths is not None and st.token_cap is not None:
        used = (hi - lo) * max(task.lengths[lo:hi])
        st.token_cap = max(1, min(st.token_cap, math.floor(used * (1 - st.config.margin))))
    log.info("amortune: out of memory on device %s with %d items; halving, cap now %d",
             st.device.id, hi - lo, st.item_cap)
    mid = lo + (hi - lo) // 2
    return _run_safely(st, task, lo, mid) + _run_safely(st, task, mid, hi)


def _trace(st: _WorkerState, seq: int) -> None:
    if st.config.trace_dir:
        path = os.path.join(st.config.trace_dir, os.environ.get(WORKER_SLOT_ENV, "0"))
        with contextlib.suppress(OSError), open(path, "w") as f:
            f.write(str(seq))


def _run_task(task: _Task) -> _TaskResult:
    """In a worker: run a task in batches of this device's size (probing it first if unknown)."""
    st = _state()
    _trace(st, task.seq)
    task = replace(task, items=_unpack(task.items))
    report = None
    if not st.probed:
        hint = task.caps.get(st.device.id)
        if hint is not None:
            st.item_cap, st.token_cap = hint
            st.probed = True
        else:
            report = _probe(st, _as_list(task.items), task.lengths)
    parts: list[Sequence[Any]] = []
    for lo, hi in pack_batches(task.lengths, len(task.items), st.item_cap, st.token_cap):
        parts.extend(_run_safely(st, task, lo, hi))
    return _TaskResult(_join(parts), st.device.id, st.item_cap, st.token_cap, report,
                       st.oom_splits)


def _join(parts: list[Sequence[Any]]) -> Any:
    """One task's outputs for the pipe: its batches' blocks as one, or item by item."""
    import torch

    blocks = [p.block for p in parts if isinstance(p, _Rows)]
    if blocks and len(blocks) == len(parts) and all(
            b.dtype == blocks[0].dtype and b.shape[1:] == blocks[0].shape[1:] for b in blocks):
        return _pack(_Rows(blocks[0] if len(blocks) == 1 else torch.cat(blocks)))
    return _pack([v for p in parts for v in _as_list(p)])


def _probe_task(task: _Task) -> _TaskResult:
    """In a worker: find this device's batch size (a no-op when the sizes are fixed)."""
    st = _state()
    _trace(st, task.seq)
    items = _as_list(_unpack(task.items))
    report = _probe(st, items, task.lengths) if not st.probed else None
    return _TaskResult([], st.device.id, st.item_cap, st.token_cap, report, st.oom_splits)


def _timed(st: _WorkerState, items: list[Any], repeat: bool) -> float:
    """Seconds one batch of ``items`` takes (typical of several runs with ``repeat``); on a CPU
    worker a batch whose memory grows past the budget raises ``MemoryError``, as a GPU would."""
    budget = st.config.memory_budget_bytes if not (st.device.is_cuda or st.device.fake) else None

    def once() -> float:
        if budget:
            st.device.reset_peak()
        st.device.synchronize()
        began = time.perf_counter()
        _predict_batch(st, items)
        st.device.synchronize()
        seconds = time.perf_counter() - began
        peak = st.device.peak_bytes() if budget else None
        if budget and peak is not None and peak > budget:
            raise MemoryError(f"a batch of {len(items)} items grew this worker by {peak} bytes, "
                              f"over its budget of {budget} bytes")
        return seconds

    return timed_repeats(once, repeat=repeat)


def _probe(st: _WorkerState, fallback_items: Sequence[Any],
           fallback_lengths: Sequence[int] | None) -> BatchSizeReport:
    """Search this device's batch size (items, or copies of the longest item for tokens)."""
    cfg = st.config
    sample = list(cfg.sample) or list(fallback_items)
    lengths = list(cfg.sample_lengths) if cfg.sample_lengths else (
        list(fallback_lengths) if fallback_lengths is not None else None)
    if not sample:
        raise ValueError("the batch-size search needs at least one sample item")
    # GPUs: the largest size that fits. CPU workers: memory is the machine's, so grow only while
    # throughput does (a CPU rarely reports running out; the system kills the process instead).
    by_throughput = not (st.device.is_cuda or st.device.fake)
    start = CPU_START_BATCH_SIZE if by_throughput else 1
    if cfg.search == "tokens":
        assert lengths is not None
        longest = max(range(len(sample)), key=lambda i: lengths[i])
        width = max(1, lengths[longest])
        tokens_limit = cfg.token_limit or width
        if by_throughput:
            tokens_limit = min(tokens_limit, CPU_MAX_TOKENS)
        limit = max(1, min(cfg.item_cap, tokens_limit // width))

        def make(b: int) -> list[Any]:
            return [sample[longest]] * b
    else:
        width = 1
        limit = max(1, min(cfg.item_cap, CPU_MAX_BATCH_SIZE if by_throughput else cfg.item_cap))

        def make(b: int) -> list[Any]:
            return [sample[i % len(sample)] for i in range(b)]

    found = search_batch_size(lambda b: _timed(st, make(b), by_throughput), limit=limit,
                              start=start, margin=cfg.margin, by_throughput=by_throughput,
                              max_seconds=cfg.probe_seconds, is_oom=st.device.is_out_of_memory,
                              after_oom=lambda: _free(st.device))
    if found.size == 0:
        raise ItemTooLargeError(
            f"one sample item alone does not fit in the memory of device {st.device.id}",
            items=sample[:1], device=st.device.id, details="out of memory with one item")
    size = found.size
    st.device.reset_peak()
    seconds = _timed(st, make(size), True)
    peak = st.device.peak_bytes()
    if cfg.search == "tokens":
        st.token_cap = max(width, math.floor(found.largest_ok * width * (1 - cfg.margin))
                           if found.smallest_failed is not None else size * width)
        tokens: int | None = st.token_cap
    else:
        st.item_cap = size
        tokens = st.token_cap
    st.probed = True
    return BatchSizeReport(st.device.id, size, tokens, peak, size / max(seconds, 1e-9),
                           found.limited_by, found.trials)
