"""Importing amortune is cheap and stdlib-only, and the modules respect the layer table.

The fresh-interpreter checks run ``python -c`` in a subprocess, so modules this test session
already imported cannot hide a heavy import. The layer check parses every module with ``ast``
(imports inside functions included) and fails on any import of a higher layer.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import amortune

PACKAGE = Path(amortune.__file__).resolve().parent
ROOT = PACKAGE.parent

HEAVY = ("numpy", "psutil", "tqdm", "cloudpickle", "torch", "dask", "distributed", "joblib")

#: The import DAG: a module may import its own layer or lower.
#: ``_schedule`` sits between the backends it drives and ``_batches``/``_pool`` that drive it.
LAYERS: dict[str, float] = {
    "amortune._record": 0,
    "amortune._serde": 0,
    "amortune._protocol": 0,
    "amortune._stats": 0,
    "amortune._errors": 0.5,
    "amortune._config": 0.5,
    "amortune._quick": 0.5,
    "amortune._system": 1,
    "amortune._model": 1,
    "amortune._worker": 1,
    "amortune._serve": 1,
    "amortune._start": 1,
    "amortune._policy": 1,
    "amortune._safedir": 1,
    "amortune._files": 1,
    "amortune._profile": 2,
    "amortune._plan": 2,
    "amortune._progress": 2,
    "amortune._device": 2,
    "amortune._prefork": 2,
    "amortune.backends": 3,
    "amortune._spill": 3,
    "amortune._checkpoint": 3,
    "amortune._segments": 3,
    "amortune._fingerprint": 3,
    "amortune._chunks": 3.4,
    "amortune._schedule": 3.5,
    "amortune._optimize": 3.5,
    "amortune._simulate": 3.6,
    "amortune._engine": 3.7,
    "amortune._report": 3.8,
    "amortune._batches": 4,
    "amortune._execute": 4,
    "amortune._sendable": 3.9,
    "amortune._pool": 4,
    "amortune._batcher": 4,
    "amortune.gpu": 4,
    "amortune.backends.dask": 4,
    "amortune": 5,
    "amortune.cli": 5,
    "amortune.__main__": 5,
}


def python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter from the repository root."""
    return subprocess.run(
        [sys.executable, *args, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> float:
    """The layer of ``module``: its own entry, else the entry of its nearest listed package."""
    name = module
    while name:
        if name in LAYERS:
            return LAYERS[name]
        name = name.rpartition(".")[0]
    raise KeyError(module)


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every ``amortune`` module ``path`` imports, anywhere in the file, as absolute names."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "amortune"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "amortune":
                continue
            submodules = []
            for alias in node.names:  # ``from . import _model`` imports a module
                sub = f"{target}.{alias.name}"
                if (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    ROOT / Path(*sub.split(".")) / "__init__.py"
                ).exists():
                    submodules.append(sub)
            found.update(submodules)
            if len(submodules) < len(node.names):  # names taken from the package itself
                found.add(target)
    found.discard(this)
    return found


def test_import_loads_no_heavy_or_optional_package() -> None:
    code = (
        "import sys, json, amortune\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_a_threads_run_of_an_importable_function_imports_what_it_needs_only() -> None:
    # An importable function travels by reference: no cloudpickle, no statistics, no hashlib,
    # and no multiprocessing for items that run on threads.
    code = (
        "import sys, json, amortune\n"
        "from tests import tasks\n"
        "assert amortune.execute(tasks.sleep_then_return, [0.005] * 200) == [0.005] * 200\n"
        "mods = ('cloudpickle', 'statistics', 'hashlib', 'multiprocessing', 'numpy')\n"
        "print(json.dumps([m for m in mods if m in sys.modules]))"
    )
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_a_threads_run_of_a_main_function_never_imports_cloudpickle() -> None:
    # A function defined in __main__ would travel by value: items that wait run on threads,
    # so it is never pickled, and cloudpickle (~10 ms to import) is never loaded.
    code = (
        "import sys, json, time, amortune\n"
        "def nap(x):\n"
        "    time.sleep(0.005)\n"
        "    return x\n"
        "assert amortune.execute(nap, range(200)) == list(range(200))\n"
        "print(json.dumps([m for m in ('cloudpickle', 'multiprocessing') if m in sys.modules]))"
    )
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_a_finished_threads_run_leaves_the_process_free_to_fork() -> None:
    # The run returns without joining its idle threads; the next start-method choice waits for
    # them, so a process that was single-threaded before the run may still fork its workers.
    code = (
        "import threading, amortune\n"
        "from tests import tasks\n"
        "from amortune._start import choose_start\n"
        "amortune.execute(tasks.sleep_then_return, [0.005] * 300)\n"
        "print(choose_start(None).first, threading.active_count())"
    )
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["fork", "1"]


@pytest.mark.parametrize("shape", ["range(2000)", "(i for i in range(2000))"])
def test_a_serial_verdict_on_a_small_input_loads_the_first_look_only(shape: str) -> None:
    # A short generator is read ahead and judged like a list: no planner, engine or pool.
    code = (
        "import sys, json, amortune\n"
        "from tests import tasks\n"
        f"assert amortune.execute(tasks.square, {shape}) == [i * i for i in range(2000)]\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('amortune'))))"
    )
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["amortune", "amortune._execute", "amortune._quick",
                                       "amortune._serde"]


def test_import_loads_only_the_init_module() -> None:
    code = (
        "import sys, json, amortune\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('amortune'))))"
    )
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["amortune"]


def test_every_public_name_resolves_without_optional_packages() -> None:
    code = (
        "import sys, json, amortune\n"
        "missing = [n for n in amortune.__all__ if getattr(amortune, n, None) is None]\n"
        "heavy = [m for m in ('torch', 'dask', 'distributed') if m in sys.modules]\n"
        "print(json.dumps({'missing': missing, 'heavy': heavy, 'dir': dir(amortune)}))"
    )
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["missing"] == []
    assert out["heavy"] == []
    assert set(amortune.__all__) <= set(out["dir"])


def test_public_surface_is_small() -> None:
    # The functions, Pool, Config, the plan, the errors users catch and report(): 22 at most.
    assert len(amortune.__all__) <= 22
    assert len(set(amortune.__all__)) == len(amortune.__all__)
    assert amortune.__version__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        amortune.nope  # noqa: B018


def test_python_m_amortune_has_a_main_guard() -> None:
    proc = python("import amortune.__main__")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def test_every_module_is_in_the_layer_table() -> None:
    unknown = []
    for path in package_modules():
        try:
            layer_of(module_name(path))
        except KeyError:
            unknown.append(module_name(path))
    assert not unknown, f"add these modules to LAYERS in tests/test_import.py: {unknown}"


def test_lower_layers_never_import_higher_ones() -> None:
    violations = []
    for path in package_modules():
        here = module_name(path)
        for target in sorted(imported_modules(path)):
            if layer_of(target) > layer_of(here):
                violations.append(
                    f"{here} (L{layer_of(here):g}) imports {target} (L{layer_of(target):g})"
                )
    assert not violations, "\n".join(violations)


def test_layer_zero_and_pure_modules_import_no_amortune_module_above_them() -> None:
    for name in ("_record", "_serde", "_protocol"):
        assert imported_modules(PACKAGE / f"{name}.py") == set(), name
    record = {"amortune._record"}
    assert imported_modules(PACKAGE / "_stats.py") == record
    assert imported_modules(PACKAGE / "_errors.py") == {"amortune._serde"}
    assert imported_modules(PACKAGE / "_config.py") == record
    assert imported_modules(PACKAGE / "_model.py") == record


def test_import_parser_sees_relative_and_lazy_imports() -> None:
    """The layer check would notice an import hidden in a function or written relatively."""
    found = imported_modules(PACKAGE / "_optimize.py")
    assert {"amortune._model", "amortune._profile", "amortune._start"} <= found
    assert "amortune._errors" in imported_modules(PACKAGE / "backends" / "processes.py")  # ``..``
    batches = imported_modules(PACKAGE / "_batches.py")
    assert "amortune._checkpoint" in batches  # imported inside a function
