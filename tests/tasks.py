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
