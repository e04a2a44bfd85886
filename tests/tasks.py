"""Module-level, picklable tasks for the test suite (workers import them by reference)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def square(x: int) -> int:
    return x * x


def identity(x: Any) -> Any:
    return x


def add(a: int, b: int) -> int:
    return a + b


def spin(seconds: float) -> float:
    """Burn CPU for ``seconds`` (a CPU-bound item)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def raise_value_error_at(x: int, at: int = 7) -> int:
    if x == at:
        raise ValueError(f"bad item {x}")
    return x


def fail_on_7(x: int) -> int:
    return raise_value_error_at(x, 7)


def exit_hard(x: int) -> int:
    if x == 5:
        os._exit(3)
    return x


def kill_self(x: int) -> int:
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def segfault(x: int) -> int:
    if x == 5:
        import ctypes

        ctypes.string_at(0)
    return x


def sys_exit(x: int) -> int:
    if x == 5:
        raise SystemExit(4)
    return x


def sleep_forever_at_3(x: int) -> int:
    if x == 3:
        time.sleep(3600)
    return x


class Unpicklable:
    """An object that refuses to be pickled."""

    def __reduce__(self) -> Any:
        raise TypeError("Unpicklable cannot be pickled")


def return_unpicklable(x: int) -> Any:
    return Unpicklable() if x == 4 else x


def once_per_item(arg: tuple[str, int]) -> int:
    """Creates a marker file per item; a second call on the same item raises."""
    folder, i = arg
    fd = os.open(os.path.join(folder, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.close(fd)
    return i


def crash_once(arg: tuple[str, int]) -> int:
    """SIGKILLs its worker the first time it sees item 5 (a marker file remembers)."""
    folder, i = arg
    if i == 5:
        marker = os.path.join(folder, "crashed")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    return i


class Flaky(Exception):
    pass


def flaky_once(arg: tuple[str, int]) -> int:
    folder, i = arg
    if i == 3:
        marker = os.path.join(folder, "flaked")
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise Flaky("transient")
    return i


def return_mb(x: int) -> Any:
    import numpy as np

    return np.full(1 << 17, x, dtype=np.float64)  # 1 MiB


# --- tasks for tests/test_batches.py -----------------------------------------------------------


def worker_pid(x: int) -> int:
    """The PID of the process that ran this item (proves one pool serves every batch)."""
    return os.getpid()


def count_codons(seq: str) -> Any:
    """Codon counts of a DNA string in reading frame 0 (the per-batch work of a codon-count ETL)."""
    from collections import Counter

    return Counter(seq[i:i + 3] for i in range(0, len(seq) - 2, 3))


def merge_counts(a: Any, b: Any) -> Any:
    """Merge two codon Counters without mutating either."""
    out = a.copy()
    out.update(b)
    return out


def process_image(img: Any) -> Any:
    """Stand-in for the batch-processing guide's image resize: a 2x upscale of a small array."""
    return img.repeat(2, axis=0).repeat(2, axis=1)


def process_record(record: dict[str, Any]) -> dict[str, Any]:
    """Stand-in for the batch-processing guide's database record transform (arrays in a dict)."""
    import numpy as np

    values = np.asarray(record["values"], dtype=np.float64)
    return {
        "id": record["id"],
        "features": np.outer(values, values).ravel(),
        "embeddings": np.cumsum(values),
        "metadata": {"n": len(values), "name": record["name"].upper()},
    }


def log_then_maybe_kill(arg: tuple[str, int]) -> int:
    """Log one line per computation; SIGKILL the caller once at the item in ``kill_at``.

    The folder holds ``kill_at`` (an item index), ``caller.pid`` (the process running the batch
    loop) and, after the kill, the marker ``killed`` so that a rerun is not killed again.
    """
    folder, i = arg
    fd = os.open(os.path.join(folder, "log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"%d\n" % i)
    finally:
        os.close(fd)
    kill_at = os.path.join(folder, "kill_at")
    if os.path.exists(kill_at):
        with open(kill_at) as f:
            at = int(f.read())
        marker = os.path.join(folder, "killed")
        if i == at and not os.path.exists(marker):
            open(marker, "w").close()
            with open(os.path.join(folder, "caller.pid")) as f:
                os.kill(int(f.read()), signal.SIGKILL)
            time.sleep(0.1)  # the worker that killed the caller computes nothing more meanwhile
    return i * i


# --- tasks for tests/test_pool.py --------------------------------------------------------------


def sleep_then_return(seconds: float) -> float:
    """Wait ``seconds`` without using the CPU, then return them."""
    time.sleep(seconds)
    return seconds


_INITIALIZED: Any = None


def set_initialized(value: Any) -> None:
    """A pool initializer: stores ``value`` in this worker's module global."""
    global _INITIALIZED
    _INITIALIZED = value


def get_initialized(x: Any) -> tuple[Any, Any]:
    """``(x, value set by set_initialized in this process)``."""
    return x, _INITIALIZED


def kwargs_echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Return the positional and keyword arguments it was called with."""
    return args, kwargs


# --- tasks for tests/test_faults.py ------------------------------------------------------------


def crash_once_how(arg: tuple[str, str, int]) -> int:
    """Crash the worker at item 5 the first time (a marker file remembers), in one of four ways.

    ``how`` is ``"kill"`` (SIGKILL), ``"exit"`` (``os._exit(3)``), ``"segv"`` (a NULL read) or
    ``"sys_exit"`` (``SystemExit(4)`` raised by the function).
    """
    folder, how, i = arg
    marker = os.path.join(folder, "crashed")
    if i == 5 and not os.path.exists(marker):
        open(marker, "w").close()
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "exit":
            os._exit(3)
        elif how == "segv":
            import ctypes

            ctypes.string_at(0)
        raise SystemExit(4)
    return i


def slow_once(arg: tuple[str, int]) -> int:
    """Hang at item 3 the first time only (a marker file remembers); instant otherwise."""
    folder, i = arg
    marker = os.path.join(folder, "slowed")
    if i == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(3600)
    return i


def record_pid_and_sleep(arg: tuple[str, int]) -> int:
    """From item 2 on: leave a file named after this process's PID in ``folder``, then sleep."""
    folder, i = arg
    if i >= 2:
        open(os.path.join(folder, str(os.getpid())), "w").close()
        time.sleep(60)
    return i


_LEAK: list[bytes] = []


def leak_mb(arg: tuple[int, int]) -> tuple[int, int]:
    """In a worker, keep ``mb`` MiB alive in a module list; returns (pid, blocks held here)."""
    import multiprocessing

    mb, _ = arg
    if multiprocessing.parent_process() is not None:  # never grow the test process itself
        _LEAK.append(b"\x01" * (mb << 20))
    return os.getpid(), len(_LEAK)


def init_raises() -> None:
    """A worker initializer that fails."""
    raise ValueError("init failed")


def init_exits() -> None:
    """A worker initializer that ends its process."""
    os._exit(7)


def init_exits_first_time(marker: str) -> None:
    """A worker initializer that ends the first process to run it (after a pause), only that one."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    time.sleep(0.3)  # long enough for the first chunk to be sent to this process
    os._exit(7)


def pid_after(seconds: float) -> int:
    """Sleep, then the PID of the process that ran this item."""
    time.sleep(seconds)
    return os.getpid()


def _refuse_to_unpickle() -> Any:
    raise ValueError("this object cannot be rebuilt")


class FailsToUnpickle:
    """Pickles fine, but raises when unpickled (in the worker)."""

    def __reduce__(self) -> Any:
        return _refuse_to_unpickle, ()


def nested_execute(x: int) -> int:
    """Runs amortune inside a worker process (nested call)."""
    import amortune

    return sum(amortune.execute(square, range(x, x + 50), executor="processes"))


def stuck_first(x: int) -> int:
    if x == 0:
        time.sleep(3600)
    return x


_seen_flaky: set[int] = set()


def flaky_in_process(x: int) -> int:
    """Fails the first time it sees item 1 in this process (a transient error)."""
    if x == 1 and x not in _seen_flaky:
        _seen_flaky.add(x)
        raise Flaky(x)
    return x


def touch_and_square(folder: str, x: int) -> int:
    """Leave one marker file per call, so a test can count how often each item ran."""
    import uuid

    with open(os.path.join(folder, f"{x}.{uuid.uuid4().hex}"), "w"):
        pass
    return x * x


def nested_plan(n: int) -> tuple[str, tuple[str, ...]]:
    """Plan a CPU-bound map from inside a worker process."""
    import amortune

    plan = amortune.optimize(spin, [0.002] * (n // 10))
    return plan.executor, plan.reasons


def worker_pid_of(x: int) -> int:
    """``worker_pid`` for starmap: one positional argument."""
    return os.getpid()


def square_all(xs: list[int]) -> list[int]:
    """A per-chunk function: the whole chunk in, one result per item out."""
    return [x * x for x in xs]


def stop_at_5(x: int) -> int:
    if x == 5:
        raise StopIteration("a function must not end the map")
    return x


def fail_once_where_3(folder: str, x: int) -> int:
    """Items x % 10 == 3 fail with Flaky the first time they run, in whatever process."""
    import uuid

    path = os.path.join(folder, f"{x}.{uuid.uuid4().hex}")
    first = not any(name.startswith(f"{x}.") for name in os.listdir(folder))
    with open(path, "w"):
        pass
    if x % 10 == 3 and first:
        raise Flaky(f"item {x} failed once")
    return x


def fail_at_7_until_allowed(folder: str, marks: str, x: int) -> int:
    import uuid

    with open(os.path.join(marks, f"{x}.{uuid.uuid4().hex}"), "w"):
        pass
    if x == 7 and not os.path.exists(os.path.join(folder, "allowed")):
        raise ValueError("item 7 not yet allowed")
    return x


_INIT: dict[str, int] = {}


def set_init(k: int) -> None:
    _INIT["k"] = k


def read_init(x: int) -> int:
    return x + _INIT["k"]


def timed_spin(seconds: float) -> tuple[float, float]:
    """Spin and return (start, end) on the machine-wide monotonic clock."""
    t0 = time.perf_counter()
    spin(seconds)
    return t0, time.perf_counter()


def read_env(name: str) -> str | None:
    return os.environ.get(name)


def record_start_fail_at_40(folder: str, x: int) -> int:
    with open(os.path.join(folder, str(x)), "w") as f:
        f.write(repr(time.time()))
    spin(0.002)
    if x == 40:
        raise ValueError("item 40 is bad")
    return x


def interrupt_at_5(x: int) -> int:
    spin(0.005)
    if x == 5:
        raise KeyboardInterrupt
    return x


def rising_spin(x: int) -> int:
    """Cost grows along the input: ~0 at the start, ~6 ms at item 300, ~8 ms at item 400."""
    spin(2e-5 * x)
    return x


def blas_threads(x: int) -> int | None:
    """How many threads the BLAS pool of this worker would use."""
    from threadpoolctl import threadpool_info

    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts) if counts else None


def slow_first_call(x: int) -> int:
    """A one-off cost on the first call in each process (an import, a model load)."""
    if not _INIT.get("loaded"):
        time.sleep(0.15)
        _INIT["loaded"] = 1
    return x


def late_spin(x: int) -> int:
    """Free for the first 150 items, 4 ms each after: a cheap head hides the real cost."""
    if x >= 150:
        spin(0.004)
    return x


def zeros_8mb(x: int) -> Any:
    """A large result that is almost free to make: 8 MiB of lazily mapped zeros."""
    import numpy as np

    return np.zeros(1 << 20)


def return_lock(x: Any) -> Any:
    """A result no pickler can send back."""
    import threading

    return threading.Lock()


def spin_square_failing(x: int, *, in_worker_at: int | None = None,
                        in_caller_from: int | None = None, at: tuple[int, ...] = (),
                        marks: str | None = None) -> int:
    """2 ms of CPU, then ``x * x``; raises ``KeyError`` at item ``in_worker_at`` in a worker
    process, ``ValueError`` from item ``in_caller_from`` on in the calling process (where
    the planner samples) and ``LookupError`` at the items ``at`` wherever they run. With ``marks``,
    a worker's item writes a file there when done."""
    from amortune._start import in_worker_process  # not multiprocessing: the caller lacks it

    in_worker = in_worker_process()
    if not in_worker and in_caller_from is not None and x >= in_caller_from:
        raise ValueError(f"the caller's item {x}")
    spin(0.002)
    if in_worker and x == in_worker_at:
        raise KeyError(x)
    if x in at:
        raise LookupError(x)
    if in_worker and marks is not None:
        with open(os.path.join(marks, f"{x}.done"), "w"):
            pass
    return x * x


def spin_kill_at_5(x: int) -> int:
    """2 ms of CPU; item 5 SIGKILLs the worker process running it (never the caller)."""
    from amortune._start import in_worker_process

    spin(0.002)
    if x == 5 and in_worker_process():
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def spin_pid(x: int) -> int:
    """2 ms of CPU, then the PID of the process that ran this item."""
    spin(0.002)
    return os.getpid()


def spin_as_seen_by_multiprocessing(x: int, caller: int) -> list[Any] | None:
    """2 ms of CPU; in a worker, ``[pid, daemonic, parent's pid]`` as ``multiprocessing``
    reports them (imported only there, so the caller never loads it)."""
    spin(0.002)
    if os.getpid() == caller:
        return None
    import multiprocessing

    parent = multiprocessing.parent_process()
    return [os.getpid(), multiprocessing.current_process().daemon,
            None if parent is None else parent.pid]
