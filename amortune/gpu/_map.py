"""Offline runs: :func:`map_model` over a data set, and :func:`find_batch_size` alone."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from .._record import replace
from ._constants import (
    DEFAULT_MAX_BATCH_SIZE,
    MAX_CHUNK_BYTES,
    MAX_TASKS_PER_CHUNK,
    TASK_CHUNK_SECONDS,
    log,
)
from ._local import run_here, runs_here
from ._plan import _check_retries, _check_size, _fingerprint, _Plan, _plan, _usable_cores
from ._pool import _RUN_REF, _Workers
from ._search import BatchSizeReport, pack_batches
from ._transfer import _as_list, _compact, _pack, _stored_rows, _unpack
from ._worker import _join, _Task


def map_model(
    load_model: Callable[[], Any],
    data: Iterable[Any],
    *,
    predict: Callable[[Any, Any], Any] | None = None,
    collate: Callable[[Sequence[Any]], Any] | None = None,
    split: Callable[[Any, Any], list[Any]] | None = None,
    length: Callable[[Any], int] | None = None,
    devices: Any = "auto",
    batch_size: int | str = "auto",
    max_batch_size: int | None = None,
    max_tokens: int | str | None = None,
    timeout: float | None = None,
    retries: int = 1,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: Any = False,
    progress_callback: Callable[[str, float], None] | None = None,
) -> list[Any]:
    """Run a model over ``data`` in batches on every GPU, one worker per device.

    Parameters
    ----------
    load_model:
        A picklable function returning the model, called once in each worker (never in the
        caller). A ``torch.nn.Module`` is moved to the worker's device and put in eval mode.
    data:
        The items (tensors, arrays, numbers, token lists, tuples or dicts of those, anything
        ``collate`` accepts). A generator is read in full.
    predict:
        ``predict(model, batch) -> output``, run under ``torch.inference_mode()``; default
        :func:`default_predict` (``model(batch)``).
    collate:
        ``collate(items) -> batch``; default :func:`default_collate` (stack, or pad ragged
        sequences into :class:`Padded`).
    split:
        ``split(output, batch) -> list`` with one output per item; default
        :func:`default_split`. :func:`trim_padding` cuts sequence outputs to each item's length.
    length:
        ``length(item) -> int`` tokens of an item: items then run longest first, packed under a
        token budget that counts padding.
    devices:
        ``"auto"`` (every GPU, else CPU workers), ``"cpu"``, a number of GPUs, or device ids.
    batch_size, max_batch_size:
        Items per batch, or ``"auto"`` to find the largest that fits on each device (at most
        ``max_batch_size``).
    max_tokens:
        Token budget per batch with ``length=`` (``"auto"``, the default there, finds it).
    timeout:
        Seconds a batch may run before its worker is replaced and the batch runs again.
    retries:
        How many times a batch lost to a timeout or a dead worker runs again.
    checkpoint:
        A folder recording finished batches; the same call after a crash resumes from it.
    progress, progress_callback:
        A tqdm bar (``True`` or a bar) and/or ``callback(phase, fraction)``.

    Returns
    -------
    list
        One output per item, in input order (CPU tensors with the default ``split``).

    Raises
    ------
    ModelBatchError
        A batch timed out or killed its worker on every try (:class:`BatchTimeoutError`,
        :class:`ModelWorkerCrashedError`), or one item alone does not fit in memory
        (:class:`ItemTooLargeError`); ``failed_sequences`` holds the items.
    """
    from .._progress import Progress

    _check_retries(retries)
    items = list(data)
    plan = _plan(load_model, items, predict=predict, collate=collate, split=split, length=length,
                 devices=devices, batch_size=batch_size, max_batch_size=max_batch_size,
                 max_tokens=max_tokens, timeout=timeout)
    n = len(items)
    out: list[Any] = [None] * n
    ckpt = None
    if checkpoint is not None:
        from .._checkpoint import Checkpoint, describe_function

        ckpt = Checkpoint.open(checkpoint, fingerprint=_fingerprint(
            load_model, predict, collate, split, length), mode="list",
            function_name=describe_function(load_model))
    bar = Progress(progress, progress_callback, total=n)
    try:
        done = 0
        if ckpt is not None:
            for rec in ckpt.batches:
                ckpt.verify_batch(rec.seq, rec.start, rec.stop,
                                  _digest(plan.order[rec.start:rec.stop], items))
            prior = ckpt.results()
            try:
                for p, value in enumerate(prior):
                    out[plan.order[p]] = value
            finally:
                prior.close()
            done = ckpt.next_start
            bar.update(done)
        if done < n:
            _run_all(load_model, plan, items, done, out, ckpt, bar, timeout=timeout,
                     retries=retries)
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.close()
    return out


def _digest(positions: Sequence[int], items: Sequence[Any]) -> str:
    from .._checkpoint import input_digest

    return input_digest([(i, items[i]) for i in positions])


def _run_all(load_model: Any, plan: _Plan, items: list[Any], done: int, out: list[Any],
             ckpt: Any, bar: Any, *, timeout: float | None, retries: int) -> None:
    """Probe, pack the rest of the input at the sizes found, run it on the scheduler."""
    from .._policy import ChunkPolicy
    from .._schedule import Scheduler

    n = len(items)
    config = plan.config
    packed = [plan.lengths[i] for i in plan.order] if plan.lengths is not None else None
    if runs_here(plan.devices, timeout):
        _run_here(load_model, plan, items, packed, done, out, ckpt, bar)
        return
    began = time.perf_counter()
    with _Workers(plan.devices, load_model, config) as workers:
        caps: dict[str, tuple[int, int | None]] = {}
        reports = workers.probe_all(timeout) if config.search is not None else []
        if reports:
            for r in reports:
                caps[r.device] = (r.item_cap, r.token_cap)
                if r.report is not None:
                    log.info("amortune: device %s: batch size %d, tokens %s (%s)", r.device,
                             r.report.batch_size, r.report.max_tokens, r.report.limited_by)
            log.info("amortune: %d model workers started and probed in %.2f s",
                     len(plan.devices), time.perf_counter() - began)
        began = time.perf_counter()
        item_cap = max((c[0] for c in caps.values()), default=config.item_cap)
        token_cap = max((c[1] or 0 for c in caps.values()), default=0) or config.token_cap
        bounds = [(done + a, done + b) for a, b in pack_batches(
            packed[done:] if packed is not None else None, n - done, item_cap, token_cap)]
        seq0 = len(ckpt.batches) if ckpt is not None else 0
        tasks: list[_Task] = []  # as the caller knows them (items unpacked), for errors

        def make_tasks() -> Iterator[_Task]:
            for k, (a, b) in enumerate(bounds):
                positions = plan.order[a:b]
                task = _Task(k, tuple(positions), [items[i] for i in positions],
                             packed[a:b] if packed is not None else None, dict(caps))
                tasks.append(task)
                yield replace(task, items=_pack(task.items))

        # A chunk of the scheduler is a run of tasks (each a device batch or so), sized to run
        # about TASK_CHUNK_SECONDS: one round trip then serves many batches.
        rate = max((r.report.items_per_second for r in reports if r.report), default=0.0)
        task_bytes = max(1, item_cap * max((_nbytes(x) for x in config.sample), default=0))
        most = max(1, min(MAX_TASKS_PER_CHUNK, MAX_CHUNK_BYTES // task_bytes))
        first = max(1, min(most, round(TASK_CHUNK_SECONDS * rate / item_cap)))
        sched = Scheduler(workers.backend, _RUN_REF,
                          policy=ChunkPolicy(first, len(plan.devices), TASK_CHUNK_SECONDS,
                                             max_size=most),
                          style="item", setup=workers.setup, retries=retries,
                          timeout_seconds=timeout)
        # Outputs stay packed until the run ends: making a tensor object per item holds the
        # interpreter lock for a while, and the backend's manager thread needs it meanwhile to
        # keep the workers fed.
        finished: list[tuple[list[int], Any]] = []
        k = 0
        try:
            for results in sched.run(make_tasks(), start_index=0, n_remaining=len(bounds)):
                for result in results:
                    caps[result.device] = (result.item_cap, result.token_cap)
                    a, b = bounds[k]
                    positions = plan.order[a:b]
                    finished.append((positions, result.outputs))
                    if ckpt is not None:
                        ckpt.record_batch(seq0 + k, a, b, _digest(positions, items),
                                          results=_stored_rows(result.outputs))
                    tasks[k] = replace(tasks[k], items=[])  # done: let them go
                    bar.update(b - a)
                    k += 1
            for positions, packed_outputs in finished:
                for i, value in zip(positions, _as_list(_unpack(packed_outputs)), strict=True):
                    out[i] = value
            busy = sum(e.wall_seconds for e in sched.stats.events)
            log.info("amortune: ran %d items in %d batches in %.2f s (%d round trips, workers "
                     "busy %.2f s)", n - done, k, time.perf_counter() - began,
                     len(sched.stats.events), busy)
        except BaseException as exc:
            lost = [i for i in getattr(exc, "indices", ()) or ()
                    if isinstance(i, int) and 0 <= i < len(tasks)]
            if workers.backend.is_lost(exc) and lost:
                index = workers.running(lost)
                task = tasks[lost[0] if index is None else index]
                raise workers.lost_error(exc, task, retries)  # noqa: B904
            _drop_task_note(exc)
            raise


def _run_here(load_model: Any, plan: _Plan, items: list[Any], packed: list[int] | None,
              done: int, out: list[Any], ckpt: Any, bar: Any) -> None:
    """One CPU worker: run in this process, each batch stored as it finishes."""
    seq = len(ckpt.batches) if ckpt is not None else 0
    in_order = plan.lengths is None  # the order is the input's: slices serve

    def task(a: int, b: int) -> _Task:
        positions = plan.order[a:b]
        batch = items[a:b] if in_order else [items[i] for i in positions]
        return _Task(seq, tuple(positions), batch,
                     packed[a:b] if packed is not None else None, {})

    def emit(a: int, b: int, parts: list[Any]) -> None:
        nonlocal seq
        positions = plan.order[a:b]
        values = [v for part in parts for v in _as_list(part)]
        if len(values) != b - a:
            raise ValueError(f"{len(values)} outputs for a batch of {b - a} items")
        if in_order:
            out[a:b] = values
        else:
            for i, value in zip(positions, values, strict=True):
                out[i] = value
        if ckpt is not None:
            ckpt.record_batch(seq, a, b, _digest(positions, items),
                              results=_stored_rows(_join(parts)))
        seq += 1
        bar.update(b - a)

    run_here(load_model, plan.config, packed, done, len(items), task, emit, _usable_cores())


def _nbytes(item: Any) -> int:
    """Bytes of an item's tensors and arrays (0 for anything else)."""
    if hasattr(item, "element_size") and hasattr(item, "numel"):
        return int(item.element_size() * item.numel())
    if hasattr(item, "nbytes") and isinstance(getattr(item, "nbytes", None), int):
        return int(item.nbytes)
    if isinstance(item, (tuple, list)):
        return sum(_nbytes(v) for v in item)
    if isinstance(item, Mapping):
        return sum(_nbytes(v) for v in item.values())
    return 0


def _drop_task_note(exc: BaseException) -> None:
    """The scheduler numbers tasks, not items: its note would name a task as an item; the
    worker's own note names the batch's items and device."""
    from .._serde import ITEM_NOTE

    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list) and any("on device" in n for n in notes):
        notes[:] = [n for n in notes if not n.startswith(ITEM_NOTE)]


def find_batch_size(
    load_model: Callable[[], Any],
    sample_items: Iterable[Any],
    *,
    predict: Callable[[Any, Any], Any] | None = None,
    collate: Callable[[Sequence[Any]], Any] | None = None,
    split: Callable[[Any, Any], list[Any]] | None = None,
    length: Callable[[Any], int] | None = None,
    devices: Any = "auto",
    max_batch_size: int | None = None,
    max_tokens: int | str | None = None,
    timeout: float | None = None,
) -> list[BatchSizeReport]:
    """Run the batch-size search alone, on every device, and report what it found.

    Batches are built from ``sample_items`` (repeated as needed; with ``length=``, copies of the
    longest, and the search is in tokens). Returns one :class:`BatchSizeReport` per device, in
    device order: the size found, the memory it peaked at and its items/s.
    """
    items = [_compact(x) for x in sample_items]
    if not items:
        raise ValueError("find_batch_size needs at least one sample item")
    limit = _check_size("max_batch_size", max_batch_size, auto=False) or DEFAULT_MAX_BATCH_SIZE
    plan = _plan(load_model, items, predict=predict, collate=collate, split=split, length=length,
                 devices=devices, batch_size="auto", max_batch_size=limit,
                 max_tokens="auto" if length is not None and max_tokens is None else max_tokens,
                 timeout=timeout)
    longest = max(plan.lengths) if plan.lengths else 1
    config = replace(
        plan.config, item_cap=limit,
        token_limit=limit * longest if plan.config.search == "tokens" else None,
        search=plan.config.search or "items")
    # One backend per device: each probe then surely runs on its own device, all at once.
    pools: list[_Workers] = []
    try:
        for device in plan.devices:
            pools.append(_Workers([device], load_model, config))
        results = [pool.probe_all(timeout)[0] for pool in pools]
    finally:
        for pool in pools:
            pool.shutdown()
    return [r.report for r in results if r.report is not None]
