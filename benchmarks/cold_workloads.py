"""Workloads of the cold benchmark (``benchmarks/cold.py``): functions and inputs by name.

Worker processes import these functions by reference, so this module loads only the standard
library: a pure-Python workload must not make every worker import numpy. The numpy workloads
import it inside the function (their probe script imports it at its top, as a numpy user's
script does, so the caller and any process that re-imports the script already hold it).

CPU-bound items are pure-Python integer arithmetic (:func:`spin`) whose step count the parent
calibrates once (:func:`calibrate`) and hands to every probe, so every contestant computes the
same items and "2 ms" means 2 ms on the machine running the benchmark.
"""

from __future__ import annotations

import math
import random
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

#: float64 values in 1 MiB.
MIB_ITEMS = 1 << 17

#: The first call in a process of :func:`slow_first_call` costs this many items' worth of steps.
FIRST_CALL_FACTOR = 75  # ~150 ms for ~2 ms items


def spin(n: int) -> int:
    """``n`` steps of a Lehmer generator: pure Python, holds the GIL, allocates nothing."""
    x = 1
    for _ in range(n):
        x = x * 48271 % 2147483647
    return x


def square(x: int) -> int:
    """Far cheaper than any dispatch."""
    return x * x


def nap(x: int) -> int:
    """Waits 5 ms without using the CPU (stands in for network or disk)."""
    time.sleep(0.005)
    return x


def full_mib(x: int) -> Any:
    """Cheap compute, a 1 MiB array out: the cost is moving the result."""
    import numpy as np

    return np.full(MIB_ITEMS, x, dtype=np.float64)


def array_sum(arr: Any) -> float:
    """Cheap compute on a 1 MiB array in: the cost is moving the input."""
    return float(arr.sum())


def svd_sum(seed: int) -> float:
    """Singular value decomposition of a 250×250 normal matrix made from ``seed``; sum of S."""
    import numpy as np

    a = np.random.default_rng(seed).standard_normal((250, 250))
    _, s, _ = np.linalg.svd(a)
    return float(s.sum())


_warmed = False


def slow_first_call(n: int) -> int:
    """:func:`spin` ``n`` steps; the first call in each process first spins 75× that (a model or
    table loaded once per process)."""
    global _warmed
    if not _warmed:
        spin(FIRST_CALL_FACTOR * n)
        _warmed = True
    return spin(n)


def calibrate(target_seconds: float = 0.002, repeats: int = 15) -> tuple[int, float]:
    """Steps of :func:`spin` that take ``target_seconds`` here, and seconds per step.

    The fastest of ``repeats`` timings counts: on a shared machine the slower ones measured a
    neighbour's work as well as ours.
    """
    probe = 40_000
    spin(probe)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        spin(probe)
        best = min(best, time.perf_counter() - t0)
    per_step = best / probe
    return max(1, round(target_seconds / per_step)), per_step


@dataclass(frozen=True)
class Spec:
    """One row of the cold table."""

    name: str
    n_items: int
    kind: str  # "spin" (ideal: loop / cores), "cpu", "tiny", "inputs", "results", "sleep"
    note: str
    numpy_at_top: bool = False  # the probe script starts with ``import numpy``
    iterable_items: bool = False  # items are sequences themselves (mpire would unpack them)
    #: The probe script defines the function itself (``spin``, in ``__main__``), as a script does:
    #: pickling it by reference fails, so each contestant sends it its own way.
    in_script: bool = False


SPECS: tuple[Spec, ...] = (
    Spec("x*x", 200_000, "tiny", "x*x"),
    Spec("spin-2ms", 1000, "spin", "~2 ms pure-Python items"),
    Spec("lognormal-2ms", 800, "spin", "lognormal costs, sigma 1.5, mean 2 ms"),
    Spec("rising-0-8ms", 600, "spin", "cost rises 0 → 8 ms along the input"),
    Spec("1MiB-results", 300, "results", "np.full(2**17, x): 1 MiB out", numpy_at_top=True),
    Spec("1MiB-inputs", 300, "inputs", "arr.sum() of a 1 MiB array: 1 MiB in",
         numpy_at_top=True, iterable_items=True),
    Spec("sleep-5ms", 400, "sleep", "time.sleep(0.005)"),
    Spec("generator-2ms", 600, "spin", "~2 ms items from a generator (no len)"),
    Spec("script-2ms", 600, "spin", "~2 ms items, the function defined in the script",
         in_script=True),
    Spec("svd-250", 200, "cpu", "np.linalg.svd of 250×250 (numpy imported at the top)",
         numpy_at_top=True),
    Spec("first-call-150ms", 400, "cpu", "~2 ms items, the first call per process 150 ms"),
)
BY_NAME = {s.name: s for s in SPECS}


def n_items(spec: Spec, scale: float) -> int:
    return max(20, int(spec.n_items * scale))


def build(name: str, scale: float, steps_2ms: int, per_step: float
          ) -> tuple[Callable[[Any], Any], Iterable[Any]]:
    """The function and a fresh input of workload ``name`` (the same in every process)."""
    spec = BY_NAME[name]
    n = n_items(spec, scale)
    if name == "x*x":
        return square, list(range(n))
    if name == "spin-2ms":
        return spin, [steps_2ms + i % 7 for i in range(n)]
    if name == "lognormal-2ms":
        sigma, mean = 1.5, 0.002
        mu = math.log(mean) - sigma**2 / 2  # mean of a lognormal = exp(mu + sigma^2 / 2)
        rng = random.Random(12345)
        return spin, [max(1, int(rng.lognormvariate(mu, sigma) / per_step)) for _ in range(n)]
    if name == "rising-0-8ms":
        return spin, [max(1, int(0.008 * (i + 0.5) / n / per_step)) for i in range(n)]
    if name == "1MiB-results":
        return full_mib, range(n)
    if name == "1MiB-inputs":
        import numpy as np

        return array_sum, [np.full(MIB_ITEMS, float(i)) for i in range(n)]
    if name == "sleep-5ms":
        return nap, range(n)
    if name == "generator-2ms":
        return spin, (steps_2ms + i % 7 for i in range(n))
    if name == "script-2ms":  # the probe swaps in its own copy of ``spin``
        return spin, [steps_2ms + i % 7 for i in range(n)]
    if name == "svd-250":
        return svd_sum, list(range(n))
    if name == "first-call-150ms":
        return slow_first_call, [steps_2ms + i % 7 for i in range(n)]
    raise KeyError(name)


def digest(results: Iterable[Any]) -> dict[str, Any]:
    """A checksum of ``results`` (arrays by dtype, shape and bytes); floats also listed, so
    results computed with a different number of native threads can be compared with a tolerance."""
    if hasattr(results, "dtype"):  # one array where a list was due: never the loop's results
        return {"n": -1, "crc": -1, "floats": None}
    crc, count, floats = 0, 0, []
    for r in results:
        count += 1
        if hasattr(r, "dtype") and hasattr(r, "shape"):
            crc = zlib.crc32(f"{r.dtype}{r.shape}".encode(), crc)
            crc = zlib.crc32(r.tobytes() if not r.flags.c_contiguous else r, crc)
        else:
            crc = zlib.crc32(repr(r).encode(), crc)
            if isinstance(r, float):
                floats.append(r)
    return {"n": count, "crc": crc,
            "floats": floats if floats and len(floats) == count and count <= 5000 else None}


def tree_pss() -> int:
    """Proportional set size of this process and all its descendants, in bytes."""
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def same_results(a: dict[str, Any], b: dict[str, Any], rel: float = 1e-9) -> bool:
    """Two :func:`digest` values describe the same results (floats within ``rel``)."""
    if a["n"] != b["n"]:
        return False
    if a["crc"] == b["crc"]:
        return True
    fa, fb = a.get("floats"), b.get("floats")
    return (fa is not None and fb is not None
            and all(math.isclose(x, y, rel_tol=rel) for x, y in zip(fa, fb, strict=True)))
