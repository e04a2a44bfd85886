"""Every script in ``examples/`` runs as a user runs it: a fresh process, exit status 0.

Each runs with its own temporary folder (``TMPDIR``), so checkpoints and spill folders of one
run never meet another's, and with a hard timeout.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import amortune

ROOT = Path(amortune.__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _has_map_model() -> bool:
    try:
        from amortune import gpu
    except ImportError:
        return False
    return hasattr(gpu, "map_model")


def _execute_has_backend() -> bool:
    return "backend" in inspect.signature(amortune.execute).parameters


#: script -> (arguments, a line its output must contain (a regex), why it cannot run here or "")
CASES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "quickstart.py": ((), r"^2000 results, same as a plain loop$", ""),
    "io_bound.py": ((), r"^500 items in [\d.]+ s", ""),
    "pool_dropin.py": ((), r"^\d+ \d+$", ""),
    "codon_counts.py": (("2000",), r"^\d+ distinct codons, [\d,]+ codons; most common:", ""),
    "spill_large_results.py": ((), r"^SpilledResults 400 tiles; tile 123 mean", ""),
    "diagnose_slow_map.py": ((), r"^amortune was [\d.]+x faster than ProcessPoolExecutor.map "
                                 r"here, with the same 10000 results$", ""),
    "etl_spill_resume.py": ((), r"^resumed and finished: 1000 results, SpilledResults", ""),
    "model_inference.py": (
        (), r"^(512 predictions of shape \(4,\)|torch is not installed)",
        "" if _has_map_model() else "amortune.gpu has no map_model yet"),
    "dask_cluster.py": (
        (), r"^(400 results from 2 workers on the Dask cluster|dask.distributed is not installed)",
        "" if _execute_has_backend() else "amortune.execute has no backend parameter yet"),
}


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script: str, tmp_path: Path) -> None:
    args, expected, why_not = CASES[script]
    if why_not:
        pytest.skip(why_not)
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240, check=False, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(expected, proc.stdout, re.M), proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
