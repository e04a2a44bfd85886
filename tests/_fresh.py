"""Run code in a fresh interpreter from the repository root and read the JSON it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def fresh_json(code: str, *args: str, timeout: float = 120) -> Any:
    """``python -c code args...`` in a new process; fails the test on a non-zero exit, else
    returns the JSON value of its last line of output."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])
