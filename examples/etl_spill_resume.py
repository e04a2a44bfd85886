"""An ETL job that keeps memory bounded, spills results to disk and resumes after a crash.

Each record becomes a 64 KiB array; 1,000 of them (64 MiB) run in batches that fit a 32 MiB
budget. The first run is a separate process that crashes part way (the transform raises at
record 600, on purpose); the second run, the same call with the same checkpoint, skips the
batches already finished and returns what an uninterrupted run would.

    python examples/etl_spill_resume.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import amortune

N_RECORDS = 1_000


def transform(record_id: int) -> np.ndarray:
    """Parse and enrich one record (a stand-in): 64 KiB of float64 per record."""
    # Workers see the caller's environment as of the call: the switch below reaches them.
    if int(os.environ.get("ETL_CRASH_AT", "-1")) == record_id:
        raise RuntimeError(f"simulated crash at record {record_id}")
    rng = np.random.default_rng(record_id)
    return rng.standard_normal(8192)


def run(checkpoint: Path):
    return amortune.process_in_batches(
        transform, range(N_RECORDS), max_memory_bytes=32 * 2**20, spill="disk",
        checkpoint=checkpoint, verbose=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--job":  # the job itself, run as its own process
        run(Path(sys.argv[2]))
        sys.exit(0)

    workdir = Path(tempfile.mkdtemp(prefix="etl-example-"))
    checkpoint = workdir / "run.ckpt"
    try:
        print("first run (crashes at record 600):", flush=True)
        crashing = dict(os.environ, ETL_CRASH_AT="600")
        job = subprocess.run([sys.executable, __file__, "--job", str(checkpoint)], env=crashing,
                             stdout=None, stderr=subprocess.PIPE, text=True, check=False)
        errors = [line for line in job.stderr.splitlines() if "Error: " in line]
        print(f"  the job died (exit status {job.returncode}): {errors[-1] if errors else ''}")

        print("second run, the same call:", flush=True)
        results = run(checkpoint)
        total = sum(float(r.sum()) for r in results)
        print(f"resumed and finished: {len(results)} results, {type(results).__name__} "
              f"read lazily from disk, checksum {total:.3f}")
        assert np.array_equal(results[600], transform(600))
        results.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
