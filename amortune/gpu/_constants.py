"""Tuning constants of the model mode and the logger it writes to."""

from __future__ import annotations

import logging

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
#: within KNEE_GAIN of it (too small a batch costs far more than too large a one). A batch
#: whose resident memory grows past CPU_MEMORY_FRACTION of the available memory (shared among
#: the workers) counts as out of memory.
KNEE_GAIN = 0.05
KNEE_PATIENCE = 2
CPU_MEMORY_FRACTION = 0.5
#: CPU workers start the search here (smaller batches never pay off) and stop at these sizes.
CPU_START_BATCH_SIZE = 8
CPU_MAX_BATCH_SIZE = 4096
CPU_MAX_TOKENS = 1 << 17
#: Each probe size on a CPU worker runs at least 3 times and until this long (at most 10 times)
#: and keeps the mean of its runs but the first (``_search.typical_seconds``).
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
