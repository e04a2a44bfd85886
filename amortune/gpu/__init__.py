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
``devices="cpu"``) the same code runs on CPU workers sharing the cores; a single CPU worker
without a ``timeout`` runs in the calling process (``_local``), its batch-size search timing
batches of the input itself.

Modules: ``_map`` (:func:`map_model`, :func:`find_batch_size`), ``_local`` (one CPU worker
in this process), ``_online``
(:class:`ModelWorkers`), ``_plan`` and ``_pool`` (caller side), ``_worker`` (what runs in a
worker), ``_search`` (the batch-size search), ``_collate``, ``_transfer`` (items through the
pipe), ``_backend`` (``backend="gpu"``). Imports the standard library and lower amortune layers
(the process backend, the scheduler, the checkpoint); torch loads only in workers (and in this
process for a run there).
"""

from __future__ import annotations

from . import _local as _local
from ._backend import _register, device_backend
from ._collate import Padded, default_collate, default_predict, default_split, trim_padding
from ._constants import BISECT_TOLERANCE as BISECT_TOLERANCE
from ._constants import CORES_PER_CPU_WORKER as CORES_PER_CPU_WORKER
from ._constants import CPU_MAX_BATCH_SIZE as CPU_MAX_BATCH_SIZE
from ._constants import CPU_MAX_TOKENS as CPU_MAX_TOKENS
from ._constants import CPU_MEMORY_FRACTION as CPU_MEMORY_FRACTION
from ._constants import CPU_START_BATCH_SIZE as CPU_START_BATCH_SIZE
from ._constants import DEFAULT_MAX_BATCH_SIZE as DEFAULT_MAX_BATCH_SIZE
from ._constants import KNEE_GAIN as KNEE_GAIN
from ._constants import KNEE_PATIENCE as KNEE_PATIENCE
from ._constants import MARGIN as MARGIN
from ._constants import MAX_CHUNK_BYTES as MAX_CHUNK_BYTES
from ._constants import MAX_TASKS_PER_CHUNK as MAX_TASKS_PER_CHUNK
from ._constants import MIN_TIMING_SECONDS as MIN_TIMING_SECONDS
from ._constants import PROBE_MAX_SECONDS as PROBE_MAX_SECONDS
from ._constants import SAMPLE_ITEMS as SAMPLE_ITEMS
from ._constants import START_TIMEOUT_SECONDS as START_TIMEOUT_SECONDS
from ._constants import TASK_CHUNK_SECONDS as TASK_CHUNK_SECONDS
from ._constants import WORKER_DEVICE_ENV as WORKER_DEVICE_ENV
from ._constants import WORKER_SLOT_ENV as WORKER_SLOT_ENV
from ._constants import log as log
from ._exceptions import (
    BatchTimeoutError,
    ItemTooLargeError,
    ModelBatchError,
    ModelWorkerCrashedError,
)
from ._map import find_batch_size, map_model
from ._online import ModelWorkers
from ._plan import resolve_devices as resolve_devices
from ._plan import worker_threads as worker_threads
from ._search import BatchSizeReport, SearchResult, pack_batches, search_batch_size

# isort: split
# Internals the tests drive directly (worker state lives in ``_worker``), and the rebuilder
# that errors pickled before the split into a package refer to.
from ._exceptions import _rebuild_error as _rebuild_error
from ._transfer import _as_list as _as_list
from ._transfer import _unpack as _unpack
from ._worker import _predict_batch as _predict_batch
from ._worker import _probe as _probe
from ._worker import _run_task as _run_task
from ._worker import _Task as _Task
from ._worker import _WorkerConfig as _WorkerConfig
from ._worker import _WorkerState as _WorkerState

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

_register()
