"""The command line in a fresh interpreter: ``python -m amortune profile`` and ``demo``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import amortune

ROOT = Path(amortune.__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m amortune ARGS`` from the repository root (so ``tests.tasks`` imports)."""
    return subprocess.run(
        [sys.executable, "-m", "amortune", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_profile_prints_a_plan() -> None:
    proc = cli("profile", "tests.tasks:square", "--range", "100")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^amortune plan: (serial|processes|threads), n_jobs=\d+, chunksize=\d+",
                     proc.stdout, re.M), proc.stdout
    assert re.search(r"measured on \d+ item\(s\) of 100:", proc.stdout)
    assert re.search(r"^  - ", proc.stdout, re.M), "the plan lists its reasons"
    assert "Traceback" not in proc.stderr


def test_profile_json_is_parseable() -> None:
    proc = cli("profile", "tests.tasks:square", "--range", "100", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["executor"] == "serial"
    assert plan["n_items"] == 100
    assert plan["n_jobs"] == 1
    assert plan["reasons"]
    assert plan["profile"]["n_sampled"] >= 1


def test_profile_json_lines_input(tmp_path: Path) -> None:
    data = tmp_path / "values.jsonl"
    data.write_text("\n".join(str(i) for i in range(50)) + "\n\n", encoding="utf-8")
    proc = cli("profile", "tests.tasks:square", "--json-lines", str(data), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_items"] == 50


@pytest.mark.parametrize(
    "spec, mentions",
    [
        ("tests.tasks", "module:function"),  # no function part
        ("no_such_module_xyz:f", "no_such_module_xyz"),
        ("tests.tasks:no_such_function", "no_such_function"),
    ],
)
def test_bad_spec_exits_nonzero_with_a_message(spec: str, mentions: str) -> None:
    proc = cli("profile", spec, "--range", "10")
    assert proc.returncode != 0
    assert mentions in proc.stderr
    assert proc.stdout == ""
    # A user error deserves one line, not a traceback.
    assert "Traceback" not in proc.stderr, proc.stderr


def test_function_error_exits_nonzero_naming_the_item() -> None:
    proc = cli("profile", "tests.tasks:fail_on_7", "--range", "100")
    assert proc.returncode != 0
    assert "bad item 7" in proc.stderr
    assert "item 7" in proc.stderr


def test_usage_errors() -> None:
    assert cli().returncode == 2
    assert cli("profile").returncode == 2
    assert cli("profile", "tests.tasks:square", "--range", "ten").returncode == 2
    proc = cli("--help")
    assert proc.returncode == 0
    assert "profile" in proc.stdout and "demo" in proc.stdout


@pytest.mark.slow
def test_demo_runs_and_is_correct() -> None:
    proc = cli("demo", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if re.search(r"x\s*(yes|NO)$", line)]
    assert len(rows) == 4, proc.stdout
    assert all(line.endswith("yes") for line in rows)
    assert proc.stdout.count("amortune plan:") == 4
