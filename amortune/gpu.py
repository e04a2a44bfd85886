"""Model inference on GPUs: one spawned worker per device, the model loaded once in each, and
batches whose size is found on the device, not guessed.

Data flow of :func:`map_model`::

    caller                                                 worker (spawned, one per device)
    data ─▶ length()? sort longest first                   CUDA_VISIBLE_DEVICES=<its device>
         ─▶ probe task per device ─────────────────────▶   load_model() once (initializer)
         ◀─ batch size (or token budget) per device ◀────   double until out of memory, bisect,
         ─▶ pack tasks at the largest size found               keep a margin
         ─▶ tasks to idle workers (retry on a new one) ─▶   split to this device's size
                                                           collate ─▶ predict under
                                                           inference_mode ─▶ CPU ─▶ one per item
         ◀─ outputs per task, in task order ◀─────────────  (out of memory: halve, lower the size)
         ─▶ checkpoint ─▶ results in input order

The caller never imports torch for this and never initialises CUDA: devices are counted by
:mod:`amortune._device`, and each worker is a process-backend slot started with ``spawn`` whose
environment holds its own ``CUDA_VISIBLE_DEVICES`` before the model loads, so torch in the worker
sees exactly one device, ``cuda:0``. The scheduler (:mod:`amortune._schedule`) sends the tasks in
runs sized by their measured time; a worker that dies or runs a batch past ``timeout`` is
replaced in the same slot (the same device) and its tasks run again (``retries``), then the call
fails with a :class:`ModelBatchError` naming the items and the device. Without a GPU (or with
``devices="cpu"``) the same code runs on CPU workers sharing the cores.

Worker-side functions (``_init_worker``, ``_run_task``, ``_probe``) run in a child and are
module-level so they pickle by reference. Imports the standard library and lower amortune layers
(the process backend, the scheduler, the checkpoint); torch loads only in workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import itertools
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

from . import _device
from ._errors import AmortuneError, add_note, describe_indices

__all__ = [
    "BatchSizeReport",
    "BatchTimeoutError",
    "ItemTooLargeError",
    "ModelBatchError",
    "ModelWorkerCrashedError",
    "ModelWorkers",
    "Padded",
    "SearchResult",
    "default_collate",
    "default_predict",
    "default_split",
    "device_backend",
    "find_batch_size",
    "map_model",
    "pack_batches",
    "search_batch_size",
    "trim_padding",
]

log = logging.getLogger("amortune")

#: The found batch size keeps this fraction below the largest that ran: activations do not grow
#: exactly linearly, the allocator fragments over a long run, and later items may be heavier
#: than the probe's sample.
MARGIN = 0.1
#: Bisection stops when the bracket is this fraction of the size that ran (well inside MARGIN).
BISECT_TOLERANCE = 1 / 64
#: On CPU workers memory is the machine's (a CPU rarely reports running out: the system kills
#: the process instead), so the search grows while items/s holds up: it stops once KNEE_PATIENCE
#: sizes in a row run below (1 - 2 * KNEE_GAIN) of the best rate, and keeps the largest size
#: within KNEE_GAIN of it (noise only ever slows a run, and too small a batch costs far more
#: than too large a one). A batch whose resident memory grows past CPU_MEMORY_FRACTION of the
#: available memory (shared among the workers) counts as out of memory.
KNEE_GAIN = 0.05
KNEE_PATIENCE = 2
CPU_MEMORY_FRACTION = 0.5
#: CPU workers start the search here (smaller batches never pay off) and stop at these sizes.
CPU_START_BATCH_SIZE = 8
CPU_MAX_BATCH_SIZE = 4096
CPU_MAX_TOKENS = 1 << 17
#: Each probe size on a CPU worker runs at least 3 times and until this long (at most 10 times)
#: and keeps its best time: noise on a busy machine only ever slows a run down.
MIN_TIMING_SECONDS = 0.1
#: Largest batch the search tries when ``max_batch_size`` is not given.
DEFAULT_MAX_BATCH_SIZE = 1 << 15
#: Items of the input shipped to each worker as the probe's sample (the longest, with length=).
SAMPLE_ITEMS = 64
#: map_model sends tasks (device batches) in runs of about this many seconds, at most
#: MAX_TASKS_PER_CHUNK tasks and about MAX_CHUNK_BYTES of input: a worker waits for each run
#: while the last one's outputs travel back and the next one's inputs travel out (tens of ms
#: for megabytes, benchmarks/gpu_bench.py), so a run must be long against that.
TASK_CHUNK_SECONDS = 0.5
MAX_TASKS_PER_CHUNK = 256
MAX_CHUNK_BYTES = 64 << 20
#: Seconds a probe may spend growing and bisecting; it then keeps the largest size that ran.
PROBE_MAX_SECONDS = 60.0
#: CPU workers for ``devices="cpu"``: one per this many usable cores (torch threads split evenly).
CORES_PER_CPU_WORKER = 4
#: Seconds map_model and ModelWorkers wait for every worker to import torch and load its model.
START_TIMEOUT_SECONDS = 600.0
#: Environment variable telling a worker which device id it was given (``"cpu"`` for none).
WORKER_DEVICE_ENV = "AMORTUNE_WORKER_DEVICE"
WORKER_SLOT_ENV = "AMORTUNE_WORKER_SLOT"


# ---------------------------------------------------------------------------------------------
# Errors


class ModelBatchError(AmortuneError):
    """A batch could not be run: its items (``failed_sequences``), their indices and the device.

    ``failed_indices`` are input positions, ``failed_sequences`` the input items themselves,
    ``device`` the device id (``CUDA_VISIBLE_DEVICES`` value, ``"cpu"`` for a CPU worker) and
    ``error_details`` a one-line reason.
    """

    def __init__(self, message: str, *, indices: Sequence[int] = (),
                 items: Sequence[Any] | None = None, device: str | None = None,
                 details: str = "") -> None:
        super().__init__(message)
        self.failed_indices = tuple(indices)
        self.failed_sequences = list(items) if items is not None else []
        self.device = device
        self.error_details = details or message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self), str(self), self.failed_indices,
                                 self.failed_sequences, self.device, self.error_details))


def _rebuild_error(cls: type[ModelBatchError], message: str, indices: tuple[int, ...],
                   items: list[Any], device: str | None, details: str) -> ModelBatchError:
    return cls(message, indices=indices, items=items, device=device, details=details)


class BatchTimeoutError(ModelBatchError, TimeoutError):
    """A batch ran past ``timeout`` on every try; its worker was replaced each time."""


class ModelWorkerCrashedError(ModelBatchError):
    """The worker holding a batch died on every try (``exitcode`` says how)."""

    exitcode: int | None = None


class ItemTooLargeError(ModelBatchError, MemoryError):
    """One item alone does not fit in the device's memory, so no batch size can hold it."""


# ---------------------------------------------------------------------------------------------
# Collate, predict, split (run in workers; torch imported inside)


@dataclasses.dataclass
class Padded:
    """Ragged sequences padded to one tensor: ``values`` (batch, longest, ...) zero-padded,
    ``lengths`` (batch,) and ``mask`` (batch, longest), true on real positions."""

    values: Any
    lengths: Any
    mask: Any

    def __len__(self) -> int:
        return int(self.lengths.shape[0])


def _as_tensor(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if type(x).__module__ == "numpy" and hasattr(x, "shape"):
        import numpy as np

        arr = np.asarray(x)
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr).copy()
        return torch.from_numpy(arr)
    if isinstance(x, (bool, int, float)) or (isinstance(x, list) and x and all(
            isinstance(v, (bool, int, float)) for v in x)):
        return torch.tensor(x)
    return None


def default_collate(items: Sequence[Any], *, pad: bool = False) -> Any:
    """Items to one batch: stack equal shapes, pad ragged sequences, recurse into tuples/dicts.

    Tensors, numpy arrays, numbers and lists of numbers of one shape are stacked into a tensor.
    Sequences that differ only in their first dimension (all sequences, with ``pad=True``, which
    :func:`map_model` uses when given ``length=``) are zero-padded to the longest into a
    :class:`Padded` (values, lengths, mask). Tuples and dicts are collated field by field; other
    items are passed on as the list itself.
    """
    import torch

    if not items:
        raise ValueError("cannot collate an empty batch")
    if isinstance(items, _Rows):  # equal-shape items sent as one block: the batch already
        block = items.block
        if not (pad and block.dim() >= 2):
            return block
        lengths = torch.full((len(items),), block.shape[1], dtype=torch.long)
        return Padded(block, lengths, torch.ones(block.shape[:2], dtype=torch.bool))
    first = items[0]
    if isinstance(first, Mapping):
        return {k: default_collate([it[k] for it in items], pad=pad) for k in first}
    if isinstance(first, tuple):
        fields = [default_collate(list(f), pad=pad) for f in zip(*items, strict=True)]
        return type(first)(*fields) if hasattr(first, "_fields") else tuple(fields)
    tensors = [_as_tensor(x) for x in items]
    if any(t is None for t in tensors):
        return list(items)
    shape = tensors[0].shape
    if all(t.shape == shape for t in tensors) and not (pad and len(shape) >= 1):
        return torch.stack(tensors)
    if all(t.dim() >= 1 and t.shape[1:] == shape[1:] for t in tensors):
        lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)
        values = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)
        mask = torch.arange(values.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        return Padded(values, lengths, mask)
    raise ValueError(f"cannot collate items of shapes {sorted({tuple(t.shape) for t in tensors})}: "
                     "pass collate=")


def default_predict(model: Any, batch: Any) -> Any:
    """``model(batch)``; ``model(values, lengths)`` for a :class:`Padded` batch, ``model(*batch)``
    for a tuple and ``model(**batch)`` for a dict."""
    if isinstance(batch, Padded):
        return model(batch.values, batch.lengths)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def _split_n(output: Any, n: int) -> list[Any]:
    torch = sys.modules.get("torch")
    if output is None:
        return [None] * n
    if torch is not None and isinstance(output, torch.Tensor):
        if output.dim() == 0 or output.shape[0] != n:
            raise ValueError(f"the model returned a tensor of shape {tuple(output.shape)} for a "
                             f"batch of {n} items; pass split=")
        return list(output.unbind(0))  # views; _pack copies them into one buffer
    if type(output).__module__ == "numpy" and hasattr(output, "shape"):
        if not output.shape or output.shape[0] != n:
            raise ValueError(f"the model returned an array of shape {output.shape} for a batch "
                             f"of {n} items; pass split=")
        return [output[i].copy() for i in range(n)]
    if isinstance(output, Mapping):
        keys = list(output)
        columns = [_split_n(output[k], n) for k in keys]
        return [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)]
    if isinstance(output, tuple):
        columns = [_split_n(v, n) for v in output]
        rows = [tuple(r) for r in zip(*columns, strict=True)]
        return [type(output)(*r) for r in rows] if hasattr(output, "_fields") else rows
    if isinstance(output, list) and len(output) == n:
        return output
    raise TypeError(f"cannot split a model output of type {type(output).__name__} into {n} "
                    "items; pass split=")


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Padded):
        return len(batch)
    if isinstance(batch, Mapping):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, tuple):
        return _batch_len(batch[0])
    if hasattr(batch, "shape"):
        return int(batch.shape[0])
    return len(batch)


def default_split(output: Any, batch: Any) -> list[Any]:
    """One output per item: rows of a tensor or array (copied), per-item dicts and tuples."""
    return [_compact(v) for v in _split_n(output, _batch_len(batch))]


def trim_padding(output: Any, batch: Any) -> list[Any]:
    """Like :func:`default_split`, but each item of a :class:`Padded` batch keeps only its own
    length along the sequence dimension (dimension 1 of the output)."""
    if not isinstance(batch, Padded):
        return default_split(output, batch)
    lengths = [int(v) for v in batch.lengths]
    return [output[i, :n] for i, n in enumerate(lengths)]


def _to_device(obj: Any, device: Any) -> Any:
    torch = sys.modules["torch"]
    if isinstance(obj, torch.Tensor):
        # Asynchronous only towards the device: a copy back to pageable host memory must be
        # complete before anything reads it.
        return obj.to(device, non_blocking=str(device) != "cpu")
    if isinstance(obj, Padded):
        return Padded(*(_to_device(v, device) for v in (obj.values, obj.lengths, obj.mask)))
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        moved = [_to_device(v, device) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else tuple(moved)
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


def _compact(item: Any) -> Any:
    """A tensor view pickles its whole storage: send a copy of just the view instead."""
    torch = sys.modules.get("torch")
    if torch is None:
        return item
    if isinstance(item, torch.Tensor):
        if item.untyped_storage().nbytes() > item.numel() * item.element_size():
            return item.clone()
        return item
    if isinstance(item, tuple) and not hasattr(item, "_fields"):
        return tuple(_compact(v) for v in item)
    if isinstance(item, list):
        return [_compact(v) for v in item]
    if isinstance(item, dict):
        return {k: _compact(v) for k, v in item.items()}
    return item


class _Packed(NamedTuple):
    """Tensors of one dtype as one flat numpy buffer, for the pipe: a tensor pickles in ~0.2 ms
    (its storage object), one buffer of thousands of them in about that time.

    ``shape`` set: ``n`` items of that shape (the rows of one block); else ``shapes`` lists each
    item's shape.
    """

    flat: Any
    n: int
    shape: tuple[int, ...] | None
    shapes: tuple[tuple[int, ...], ...] = ()


class _Rows(Sequence[Any]):
    """Items that are the rows of one tensor: :func:`default_collate` uses the block as it is,
    so a batch of equal-shape items costs no per-item operation."""

    def __init__(self, block: Any) -> None:
        self.block = block

    def __len__(self) -> int:
        return int(self.block.shape[0])

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return _Rows(self.block[index])
        return self.block[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.block.unbind(0))


def _packable(values: Sequence[Any]) -> bool:
    """Tensors of one dtype (device, layout and gradients are checked by stacking them)."""
    torch = sys.modules.get("torch")
    if torch is None or not values:
        return False
    tensor, dtype = torch.Tensor, getattr(values[0], "dtype", None)
    return all(isinstance(v, tensor) and v.dtype == dtype for v in values)


def _numpy(t: Any) -> Any:
    """``t`` flat as a numpy array, or ``None`` (bfloat16 has no numpy dtype; a CUDA tensor, a
    sparse one or one needing gradients is not sent this way)."""
    if t.device.type != "cpu" or t.layout is not sys.modules["torch"].strided or t.requires_grad:
        return None
    try:
        return t.reshape(-1).numpy()
    except (TypeError, RuntimeError):
        return None


def _pack(values: Sequence[Any]) -> Any:
    """``values`` as a :class:`_Packed` when they are CPU tensors of one dtype, else as a list
    (tensor views copied, so none pickles its whole batch's storage)."""
    import torch

    if isinstance(values, _Rows):
        flat = _numpy(values.block.contiguous())
        if flat is not None:
            return _Packed(flat, len(values), tuple(values.block.shape[1:]))
        values = list(values)
    if _packable(values):
        try:
            stacked = torch.stack(list(values))  # equal shapes: one block
        except RuntimeError:
            stacked = None
        if stacked is not None:
            flat = _numpy(stacked)
            if flat is not None:
                return _Packed(flat, len(values), tuple(stacked.shape[1:]))
        else:
            shapes = [tuple(v.shape) for v in values]
            try:
                if all(len(s) >= 1 and s[1:] == shapes[0][1:] for s in shapes):
                    joined = torch.cat(list(values))  # ragged along the first dimension
                else:
                    joined = torch.cat([v.reshape(-1) for v in values])
            except RuntimeError:  # tensors on different devices, sparse ones
                joined = None
            flat = None if joined is None else _numpy(joined)
            if flat is not None:
                return _Packed(flat, len(values), None, tuple(shapes))
    return [_compact(v) for v in values]


def _unpack(values: Any) -> Sequence[Any]:
    """The items :func:`_pack` was given: rows of one block (views of one buffer)."""
    if not isinstance(values, _Packed):
        return list(values)
    import torch

    flat = torch.from_numpy(values.flat)
    if values.shape is not None:
        return _Rows(flat.view(values.n, *values.shape))
    parts = torch.split(flat, [math.prod(s) for s in values.shapes])
    return [p if len(s) == 1 else p.view(s) for p, s in zip(parts, values.shapes, strict=True)]


def _as_list(values: Sequence[Any]) -> list[Any]:
    return list(values.block.unbind(0)) if isinstance(values, _Rows) else list(values)


class _AsNumpy:
    """A CPU tensor that pickles through numpy (~6x faster both ways) and unpickles as a tensor,
    so a checkpoint of many small outputs is cheap to write and to resume."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor

    def __reduce__(self) -> tuple[Any, ...]:
        import torch

        return (torch.from_numpy, (self.tensor.numpy(),))


class _ArrayAsTensor:
    """A numpy row that unpickles as a CPU tensor (see :class:`_AsNumpy`)."""

    __slots__ = ("array",)

    def __init__(self, array: Any) -> None:
        self.array = array

    def __reduce__(self) -> tuple[Any, ...]:
        import torch

        return (torch.from_numpy, (self.array,))


def _stored_rows(outputs: Any) -> list[Any]:
    """One task's outputs as a checkpoint stores them: one entry per item, each unpickling as
    the tensor (or object) the caller gets back."""
    if isinstance(outputs, _Packed) and outputs.shape is not None:
        rows = outputs.flat.reshape(outputs.n, *outputs.shape)
        return [_ArrayAsTensor(r) for r in rows]  # no tensor object per item made here
    return [_stored(v) for v in _as_list(_unpack(outputs))]


def _stored(value: Any) -> Any:
    torch = sys.modules.get("torch")
    if (torch is not None and isinstance(value, torch.Tensor) and value.device.type == "cpu"
            and value.layout == torch.strided and not value.requires_grad):
        try:
            value.numpy()
        except (TypeError, RuntimeError):
            return value
        return _AsNumpy(value)
    return value


# ---------------------------------------------------------------------------------------------
# Packing and the batch-size search (pure: no torch, no clock unless given)


def pack_batches(lengths: Sequence[int] | None, n: int, max_items: int | None,
                 max_tokens: int | None = None) -> list[tuple[int, int]]:
    """Cut ``n`` items, in order, into ``(start, stop)`` batches.

    A batch holds at most ``max_items`` items and, with ``lengths``, at most ``max_tokens``
    tokens counted with padding (items times the longest of them). An item alone always makes a
    batch, even past the budget.

    >>> pack_batches(None, 5, 2)
    [(0, 2), (2, 4), (4, 5)]
    >>> pack_batches([5, 4, 2, 2, 1], 5, None, max_tokens=8)
    [(0, 1), (1, 3), (3, 5)]
    """
    cap = max_items if max_items and max_items > 0 else n or 1
    if lengths is None or max_tokens is None:
        return [(a, min(a + cap, n)) for a in range(0, n, cap)]
    out: list[tuple[int, int]] = []
    start, longest = 0, 0
    for i in range(n):
        length = lengths[i]
        count = i - start
        widest = max(longest, length)
        full = count >= cap or (count > 0 and (count + 1) * widest > max_tokens)
        if full:
            out.append((start, i))
            start, widest = i, length
        longest = widest
    if n:
        out.append((start, n))
    return out


class SearchResult(NamedTuple):
    """What :func:`search_batch_size` found.

    ``size`` is the size to use (0 when a single unit does not fit), ``largest_ok`` the largest
    that ran, ``smallest_failed`` the smallest that ran out of memory, ``limited_by`` one of
    ``"memory"``, ``"throughput"``, ``"limit"`` or ``"time"``, and ``trials`` every
    ``(size, ran, seconds)`` in order.
    """

    size: int
    largest_ok: int
    smallest_failed: int | None
    limited_by: str
    trials: tuple[tuple[int, bool, float], ...]


def search_batch_size(
    run: Callable[[int], float],
    *,
    limit: int,
    start: int = 1,
    margin: float = MARGIN,
    by_throughput: bool = False,
    max_seconds: float | None = None,
    is_oom: Callable[[BaseException], bool] = _device.is_out_of_memory,
    after_oom: Callable[[], object] = gc.collect,
    clock: Callable[[], float] = time.perf_counter,
) -> SearchResult:
    """The largest batch size that runs: double from ``start`` until out of memory, then bisect.

    ``run(size)`` runs one batch of ``size`` and returns its seconds; an exception ``is_oom``
    accepts means "too big" (``after_oom`` then frees memory before the next try), any other
    propagates. Growth stops at ``limit``, after ``max_seconds``, or, with ``by_throughput``,
    once ``size / seconds`` clearly falls (the largest size within ``KNEE_GAIN`` of the best
    rate is kept). A size found by running out of memory keeps ``margin`` below the largest
    that ran.

    >>> search_batch_size(lambda b: 1.0 if b <= 100 else 1 / 0, limit=1000,
    ...                   is_oom=lambda e: isinstance(e, ZeroDivisionError), margin=0.1).size
    90
    """
    trials: list[tuple[int, bool, float]] = []
    began = clock()

    def attempt(size: int) -> float | None:
        failed = False
        try:
            seconds = run(size)
        except BaseException as exc:
            if not is_oom(exc):
                raise
            failed = True
        if failed:  # outside the except block: its traceback no longer holds the batch
            after_oom()
            trials.append((size, False, 0.0))
            return None
        trials.append((size, True, seconds))
        return seconds

    def out_of_time() -> bool:
        return max_seconds is not None and clock() - began > max_seconds

    lo, hi = 0, None
    rates: dict[int, float] = {}
    stale = 0
    limited_by = "limit"
    size = max(1, min(start, limit))
    while True:
        seconds = attempt(size)
        if seconds is None:
            hi, limited_by = size, "memory"
            break
        lo = size
        if by_throughput:
            rates[size] = rate = size / max(seconds, 1e-9)
            stale = stale + 1 if rate < max(rates.values()) * (1 - 2 * KNEE_GAIN) else 0
            if stale >= KNEE_PATIENCE:
                limited_by = "throughput"
                break
        if size >= limit:
            break
        if out_of_time():
            limited_by = "time"
            break
        size = min(size * 2, limit)
    while hi is not None and hi - lo > max(1, int(lo * BISECT_TOLERANCE)) and not out_of_time():
        mid = (lo + hi) // 2
        if attempt(mid) is None:
            hi = mid
        else:
            lo = mid
    if lo == 0:
        return SearchResult(0, 0, hi, "memory", tuple(trials))
    chosen = lo
    if hi is not None:
        chosen = max(1, math.floor(lo * (1 - margin)))
    if by_throughput and rates:
        best = max(rates.values())
        chosen = min(chosen, max(b for b, r in rates.items() if r >= best * (1 - KNEE_GAIN)))
    return SearchResult(chosen, lo, hi, limited_by, tuple(trials))


class BatchSizeReport(NamedTuple):
    """What the probe found on one device.

    ``batch_size`` is the number of items per batch (with a token budget: of the longest sample
    item), ``max_tokens`` the token budget (``None`` without ``length=``), ``peak_memory_bytes``
    the device memory a batch of that size peaked at (``None`` on a CPU worker), and
    ``items_per_second`` its measured rate.
    """

    device: str
    batch_size: int
    max_tokens: int | None
    peak_memory_bytes: int | None
    items_per_second: float
    limited_by: str
    trials: tuple[tuple[int, bool, float], ...]


# ---------------------------------------------------------------------------------------------
# Worker side


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass
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
    device.check()
    try:
        model = load_model()
    except BaseException as exc:
        add_note(exc, f"amortune: raised by load_model in the worker for device {device.id}")
        raise
    if isinstance(model, torch.nn.Module):
        model = model.to(device.torch_device)
    if hasattr(model, "eval"):
        model.eval()
    _STATE = _WorkerState(model, device, config)


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


def _run_safely(st: _WorkerState, task: _Task, lo: int, hi: int) -> list[Sequence[Any]]:
    """Run items ``[lo, hi)`` of ``task``; out of memory splits them in two and lowers the cap."""
    items = task.items[lo:hi]
    oom = False
    try:
        return [_predict_batch(st, items)]
    except BaseException as exc:
        if not st.device.is_out_of_memory(exc):
            indices = task.indices[lo:hi]
            add_note(exc, f"amortune: raised by the batch of {describe_indices(indices)} on "
                          f"device {st.device.id}")
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
    task = dataclasses.replace(task, items=_unpack(task.items))
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
    """Seconds one batch of ``items`` takes (best of several with ``repeat``); on a CPU worker a
    batch whose memory grows past the budget raises ``MemoryError``, as a GPU would."""
    budget = st.config.memory_budget_bytes if not (st.device.is_cuda or st.device.fake) else None
    best, total, reps = math.inf, 0.0, 0
    while reps == 0 or (repeat and (total < MIN_TIMING_SECONDS or reps < 3) and reps < 10):
        if budget:
            st.device.reset_peak()
        st.device.synchronize()
        began = time.perf_counter()
        _predict_batch(st, items)
        st.device.synchronize()
        seconds = time.perf_counter() - began
        best, total, reps = min(best, seconds), total + seconds, reps + 1
        peak = st.device.peak_bytes() if budget else None
        if budget and peak is not None and peak > budget:
            raise MemoryError(f"a batch of {len(items)} items grew this worker by {peak} bytes, "
                              f"over its budget of {budget} bytes")
    return best


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


# ---------------------------------------------------------------------------------------------
# Caller side


def _slot_env(device: str, slot: int) -> dict[str, str]:
    """The variables a worker starts with: its device (no GPU at all for a CPU worker)."""
    return {_device.VISIBLE_ENV: "" if device == "cpu" else device, WORKER_DEVICE_ENV: device,
            WORKER_SLOT_ENV: str(slot)}


def _usable_cores() -> int:
    """Cores this process may use: affinity, cgroup quota and AMORTUNE_MAX_WORKERS applied."""
    from ._system import probe_system

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
    from ._system import memory_snapshot

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
    from ._checkpoint import function_fingerprint

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


class _Workers:
    """One spawned worker per device on the process backend, each with the model loaded.

    The slots' environments pin the devices (a replacement worker gets the same one), the
    initializer loads the model, and each worker notes which task it runs in a private folder,
    so a batch lost with its worker is reported with that worker's device.
    """

    def __init__(self, devices: Sequence[str], load_model: Callable[[], Any],
                 config: _WorkerConfig) -> None:
        from .backends import Slot, WorkerSetup
        from .backends.processes import ProcessBackend

        self.devices = list(devices)
        self.trace_dir = tempfile.mkdtemp(prefix="amortune-gpu-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.trace_dir, True)
        config = dataclasses.replace(config, trace_dir=self.trace_dir)
        self.config = config
        slots = [Slot(i, devices=() if d == "cpu" else (d,), env=_slot_env(d, i))
                 for i, d in enumerate(self.devices)]
        self.setup = WorkerSetup(initializer=_init_worker, initargs=(load_model, config),
                                 thread_cap=config.n_threads)
        try:
            self.backend = ProcessBackend(len(slots), start_method="spawn", slots=slots,
                                          setup=self.setup)
        except BaseException:
            self._cleanup()
            raise

    def submit(self, task: _Task, fn: Any, timeout: float | None) -> Future[Any]:
        from .backends import ChunkTask

        return self.backend.submit(ChunkTask(fn, [task], 0, "item", timeout, self.setup))

    def _traces(self) -> dict[int, tuple[float, int]]:
        """Task seq -> (when, slot) of the last worker that started it, from the trace files."""
        out: dict[int, tuple[float, int]] = {}
        try:
            entries = os.listdir(self.trace_dir)
        except OSError:
            return out
        for name in entries:
            path = os.path.join(self.trace_dir, name)
            try:
                with open(path) as f:
                    seq = int(f.read().strip())
                when, slot = os.stat(path).st_mtime, int(name)
            except (OSError, ValueError):
                continue
            if 0 <= slot < len(self.devices) and when >= out.get(seq, (-1.0, 0))[0]:
                out[seq] = (when, slot)
        return out

    def running(self, seqs: Sequence[int]) -> int | None:
        """Which of ``seqs`` (the tasks of a lost chunk) a worker was running last."""
        traces = self._traces()
        found = [(traces[s][0], s) for s in seqs if s in traces]
        return max(found)[1] if found else None

    def device_of(self, seq: int) -> str | None:
        """The device whose worker last started task ``seq``."""
        hit = self._traces().get(seq)
        if hit is not None:
            return self.devices[hit[1]]
        return self.devices[0] if len(set(self.devices)) == 1 else None

    def lost_error(self, exc: BaseException, task: _Task, retries: int) -> BaseException:
        """A :class:`ModelBatchError` for a batch lost to a timeout or a dead worker."""
        from ._errors import TaskTimeoutError, WorkerCrashedError

        device = self.device_of(task.seq)
        where = f"device {device}" if device is not None else "its device"
        what = describe_indices(task.indices) if task.indices else "the probe batch"
        tries = f"{retries + 1} time{'s' if retries else ''} (retries={retries})"
        err: ModelBatchError
        if isinstance(exc, TaskTimeoutError):
            err = BatchTimeoutError(
                f"the batch of {what} ran past the timeout on {where} {tries}; its worker was "
                "replaced each time", indices=task.indices, items=task.items, device=device,
                details=str(exc))
        elif isinstance(exc, WorkerCrashedError):
            err = ModelWorkerCrashedError(
                f"the worker for {where} died while running the batch of {what}, {tries}: "
                f"{exc}", indices=task.indices, items=task.items, device=device, details=str(exc))
            err.exitcode = exc.exitcode
        else:
            return exc  # not a lost batch: raised as it is, its own cause kept
        err.__cause__ = exc
        return err

    def wait_ready(self) -> None:
        """Until every worker has started and loaded its model (or the backend gave up)."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while (self.backend.warm_workers < len(self.devices) and self.backend.alive
               and time.monotonic() < deadline):
            time.sleep(0.01)

    def probe_all(self, timeout: float | None) -> list[_TaskResult]:
        """Ask every worker for its batch size (each finds it now if it must).

        Sent once every worker is ready, each probe task goes to an idle worker: one per device.
        They carry a timeout, so none waits behind a running one; should a worker still answer
        twice, another finds its size on its first batch instead (tasks carry the sizes known).
        """
        self.wait_ready()
        futures = [self.submit(_Task(-1 - i, (), [], None, {}), _PROBE_REF,
                               _probe_timeout(timeout)) for i in range(len(self.devices))]
        out: list[_TaskResult] = []
        for i, fut in enumerate(futures):
            try:
                outcome = fut.result()
            except BaseException as exc:
                raise self.lost_error(exc, _Task(-1 - i, (), [], None, {}), 0)  # noqa: B904
            if outcome.error is not None:
                raise outcome.error
            out.append(outcome.results[0])
        return out

    def shutdown(self, *, kill: bool = False) -> None:
        try:
            self.backend.shutdown(wait=True, kill=kill)
        finally:
            self._cleanup()

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(kill=exc[0] is not None)


def _function_ref(func: Callable[..., Any]) -> Any:
    from .backends import FunctionRef

    return FunctionRef(func)


_RUN_REF = _function_ref(_run_task)
_PROBE_REF = _function_ref(_probe_task)


def _probe_timeout(timeout: float | None) -> float:
    # Generous, but always set: a task with a timeout never waits behind another (probe_all).
    return (3600.0 if timeout is None else 4 * timeout) + PROBE_MAX_SECONDS


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
    from ._progress import Progress

    _check_retries(retries)
    items = list(data)
    plan = _plan(load_model, items, predict=predict, collate=collate, split=split, length=length,
                 devices=devices, batch_size=batch_size, max_batch_size=max_batch_size,
                 max_tokens=max_tokens, timeout=timeout)
    n = len(items)
    out: list[Any] = [None] * n
    ckpt = None
    if checkpoint is not None:
        from ._checkpoint import Checkpoint, describe_function

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
    from ._checkpoint import input_digest

    return input_digest([(i, items[i]) for i in positions])


def _run_all(load_model: Any, plan: _Plan, items: list[Any], done: int, out: list[Any],
             ckpt: Any, bar: Any, *, timeout: float | None, retries: int) -> None:
    """Probe, pack the rest of the input at the sizes found, run it on the scheduler."""
    from ._policy import ChunkPolicy
    from ._schedule import Scheduler

    n = len(items)
    config = plan.config
    packed = [plan.lengths[i] for i in plan.order] if plan.lengths is not None else None
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
                yield dataclasses.replace(task, items=_pack(task.items))

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
                    tasks[k] = dataclasses.replace(tasks[k], items=[])  # done: let them go
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
    from ._serde import ITEM_NOTE

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
    config = dataclasses.replace(
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


class ModelWorkers:
    """Long-lived model workers, one per device, for online use (:class:`amortune.Batcher`).

    The constructor returns once every worker has loaded its model. ``predict(items)`` runs one
    batch on an idle worker and returns one output per item; it is thread-safe, so
    ``n_workers`` callers keep every device busy. A batch is split to each
    device's found size (found from ``sample_items``, or from the first batch a worker gets).
    A batch lost with its worker runs again up to ``retries`` times.
    """

    def __init__(self, load_model: Callable[[], Any], *, predict: Any = None, collate: Any = None,
                 split: Any = None, devices: Any = "auto", batch_size: int | str = "auto",
                 max_batch_size: int | None = None, sample_items: Iterable[Any] = (),
                 timeout: float | None = None, retries: int = 1) -> None:
        _check_retries(retries)
        sample = [_compact(x) for x in sample_items]
        plan = _plan(load_model, sample, predict=predict, collate=collate, split=split,
                     length=None, devices=devices, batch_size=batch_size,
                     max_batch_size=max_batch_size, max_tokens=None, timeout=timeout)
        limit = _check_size("max_batch_size", max_batch_size, auto=False) or DEFAULT_MAX_BATCH_SIZE
        config = plan.config
        if config.search is not None:
            config = dataclasses.replace(config, item_cap=limit)
        self.devices = plan.devices
        self.timeout, self.retries = timeout, retries
        self._workers = _Workers(plan.devices, load_model, config)
        self._caps: dict[str, tuple[int, int | None]] = {}
        self._seq = itertools.count()
        try:
            self._workers.wait_ready()  # served requests never wait for a cold start
        except BaseException:
            self._workers.shutdown(kill=True)
            raise

    @property
    def n_workers(self) -> int:
        return len(self.devices)

    def predict(self, items: Sequence[Any]) -> list[Any]:
        """Run ``items`` as one batch on an idle worker; one output per item, in order."""
        batch = list(items)
        task = _Task(next(self._seq), tuple(range(len(batch))), batch, None, dict(self._caps))
        sent = dataclasses.replace(task, items=_pack(batch))
        for attempt in range(self.retries + 1):
            fut = self._workers.submit(sent, _RUN_REF, self.timeout)
            try:
                outcome = fut.result()
            except BaseException as exc:
                if self._workers.backend.is_lost(exc) and attempt < self.retries:
                    continue
                raise self._workers.lost_error(exc, task, attempt)  # noqa: B904
            if outcome.error is not None:
                raise outcome.error
            result: _TaskResult = outcome.results[0]
            self._caps[result.device] = (result.item_cap, result.token_cap)
            return _as_list(_unpack(result.outputs))
        raise AssertionError("unreachable")

    def close(self, *, kill: bool = False) -> None:
        self._workers.shutdown(kill=kill)

    def __enter__(self) -> ModelWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(kill=exc[0] is not None)


# ---------------------------------------------------------------------------------------------
# backend="gpu": any function, in one spawned worker per device


def device_backend(devices: Any = "auto") -> Any:
    """A process backend with one spawned worker per device, each pinned by its environment.

    ``execute(func, data, backend="gpu")`` uses it; ``backend=torch.device("cuda:1")`` pins one.
    """
    from .backends import Slot
    from .backends.processes import ProcessBackend

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
    from .backends import register_backend

    register_backend("gpu", _backend_factory, _recognise)


_register()
