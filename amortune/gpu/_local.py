"""One CPU worker in the calling process: no interpreter to start, nothing to pickle, and the
batch-size search runs on the input itself, so every batch it times is part of the result."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .. import _device
from ._constants import (
    CPU_MAX_BATCH_SIZE,
    CPU_MAX_TOKENS,
    CPU_START_BATCH_SIZE,
    log,
)
from ._exceptions import ItemTooLargeError
from ._search import (
    BatchSizeReport,
    SearchResult,
    pack_batches,
    search_batch_size,
    timed_repeats,
)
from ._worker import (
    _free,
    _load,
    _note_batch,
    _predict_batch,
    _run_safely,
    _Task,
    _WorkerConfig,
    _WorkerState,
)

#: ``emit(start, stop, parts)``: packed positions ``[start, stop)`` ran; ``parts`` hold their
#: outputs in order (each a sequence with one output per item).
Emit = Callable[[int, int, list[Sequence[Any]]], None]
#: ``task(start, stop)``: the task of packed positions ``[start, stop)``.
MakeTask = Callable[[int, int], _Task]


def runs_here(devices: Sequence[str], timeout: float | None) -> bool:
    """Whether :func:`map_model` runs in this process: one CPU worker and no ``timeout`` (a
    batch past a timeout needs a worker process that can be replaced)."""
    return list(devices) == ["cpu"] and timeout is None


@contextlib.contextmanager
def _threads_at_most(cores: int) -> Iterator[None]:
    """Torch threads of this thread capped at ``cores`` for the call (an explicit, smaller
    setting is kept), then restored."""
    import torch

    before = torch.get_num_threads()
    if before > cores:
        torch.set_num_threads(cores)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class _InputDone(Exception):
    """The search ran out of input: every item has run."""


def run_here(load_model: Callable[[], Any], config: _WorkerConfig, lengths: list[int] | None,
             start: int, n: int, task: MakeTask, emit: Emit, cores: int) -> None:
    """Load the model here, find the batch size on the first items (if asked) and run the
    packed positions ``[start, n)`` in batches of that size."""
    import torch

    # Collate and split run under inference mode too (as predict does): tensors made there
    # skip autograd's bookkeeping, as in a plain loop under one inference_mode block.
    with _threads_at_most(cores), torch.inference_mode():
        began = time.perf_counter()
        st = _load(load_model, config, _device.worker_device("cpu", {}), "in this process")
        log.info("amortune: model loaded in this process in %.2f s", time.perf_counter() - began)
        began = time.perf_counter()
        batches = 0

        def counted(a: int, b: int, parts: list[Sequence[Any]]) -> None:
            nonlocal batches
            batches += 1
            emit(a, b, parts)

        cursor = start
        if config.search is not None:
            report, cursor = search_on_input(st, lengths, start, n, task, counted)
            if report is not None:
                log.info("amortune: device cpu: batch size %d, tokens %s (%s)",
                         report.batch_size, report.max_tokens, report.limited_by)
            log.info("amortune: batch size searched on %d items in %.2f s, in this process",
                     cursor - start, time.perf_counter() - began)
        while cursor < n:
            caps = (st.item_cap, st.token_cap)
            rest = lengths[cursor:] if lengths is not None else None
            at = cursor
            for a, b in pack_batches(rest, n - at, *caps):
                counted(at + a, at + b, _run_safely(st, task(at + a, at + b), 0, b - a))
                cursor = at + b
                if (st.item_cap, st.token_cap) != caps:
                    break  # out of memory lowered the size: pack the rest again
        log.info("amortune: ran %d items in %d batches in %.2f s, in this process", n - start,
                 batches, time.perf_counter() - began)


def search_on_input(st: _WorkerState, lengths: Sequence[int] | None, start: int, n: int,
                    task: MakeTask, emit: Emit) -> tuple[BatchSizeReport | None, int]:
    """The CPU search of the batch size (grow while items/s holds up), each trial a batch of
    the next items of the input, whose outputs are kept.

    Returns the report (``None`` when the input ran out first) and the first position left.
    With a token budget a trial of ``size`` holds the items that fit ``size`` times the longest
    remaining item's tokens, and its time is scaled to that many padded tokens.
    """
    cfg = st.config
    tokens = cfg.search == "tokens"
    if tokens and lengths is None:
        raise ValueError("a token search needs the items' lengths")
    width = max(1, lengths[start]) if tokens and lengths is not None else 1
    if tokens:
        limit = max(1, min(cfg.item_cap, min(cfg.token_limit or width, CPU_MAX_TOKENS) // width))
    else:
        limit = max(1, min(cfg.item_cap, CPU_MAX_BATCH_SIZE))
    budget = cfg.memory_budget_bytes
    cursor = start

    def once(size: int) -> float:
        nonlocal cursor
        if cursor >= n:
            raise _InputDone
        if tokens and lengths is not None:
            widest = max(1, lengths[cursor])
            count = max(1, min(n - cursor, cfg.item_cap, size * width // widest))
            units = count * widest / width
        else:
            count = min(n - cursor, size)
            units = count
        t = task(cursor, cursor + count)
        if budget:
            st.device.reset_peak()
        began = time.perf_counter()
        try:
            outputs = _predict_batch(st, t.items)
        except BaseException as exc:
            if not st.device.is_out_of_memory(exc):
                _note_batch(st, exc, t.indices)
            raise
        seconds = time.perf_counter() - began
        peak = st.device.peak_bytes() if budget else None
        if budget and peak is not None and peak > budget:
            raise MemoryError(f"a batch of {count} items grew this process by {peak} bytes, "
                              f"over its budget of {budget} bytes")
        emit(cursor, cursor + count, [outputs])
        cursor += count
        return seconds * size / units

    def run(size: int) -> float:
        return timed_repeats(lambda: once(size))

    try:
        found = search_batch_size(run, limit=limit, start=CPU_START_BATCH_SIZE, margin=cfg.margin,
                                  by_throughput=True, max_seconds=cfg.probe_seconds,
                                  is_oom=st.device.is_out_of_memory,
                                  after_oom=lambda: _free(st.device))
    except _InputDone:
        return None, cursor
    if found.size == 0:
        t = task(cursor, cursor + 1)
        raise ItemTooLargeError(
            f"item {t.indices[0]} alone does not fit in the memory of device cpu",
            indices=t.indices, items=list(t.items), device="cpu",
            details="out of memory with a batch of one item")
    return _apply(st, found, width), cursor


def _apply(st: _WorkerState, found: SearchResult, width: int) -> BatchSizeReport:
    """Set the state's sizes from what the search found; the report of it."""
    cfg = st.config
    size = found.size
    if cfg.search == "tokens":
        st.token_cap = max(width, math.floor(found.largest_ok * width * (1 - cfg.margin))
                           if found.smallest_failed is not None else size * width)
    else:
        st.item_cap = size
    st.probed = True
    ran = [(s, sec) for s, ok, sec in found.trials if ok and sec > 0]
    at = [s / sec for s, sec in ran if s == size] or [s / sec for s, sec in ran
                                                      if s == found.largest_ok]
    return BatchSizeReport("cpu", size, st.token_cap if cfg.search == "tokens" else None, None,
                           max(at, default=0.0), found.limited_by, found.trials)
